#!/usr/bin/env bash
# Run CPython 3.13's own concurrent.futures tests against procpool.Executor (issue 12).
#
# Needs a Python 3.13 that ships its `test` package. Builds build/conformance-venv with it,
# installs procpool there and runs pytest on tests/conformance; extra arguments go to pytest.
# Without such a Python it prints one line saying so and exits 0, so a fresh machine passes.
set -euo pipefail
cd "$(dirname "$0")/../.."

has_tests() { "$@" -c 'import sys, test.test_concurrent_futures.executor; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; }

python=()
if [[ -n "${CONFORMANCE_PYTHON:-}" ]] && has_tests "$CONFORMANCE_PYTHON"; then
    python=("$CONFORMANCE_PYTHON")
elif command -v pyenv >/dev/null && has_tests env PYENV_VERSION=3.13.0 python3; then
    python=(env PYENV_VERSION=3.13.0 python3)
elif has_tests "$HOME/.pyenv/versions/3.13.0/bin/python3"; then
    python=("$HOME/.pyenv/versions/3.13.0/bin/python3")
elif command -v python3.13 >/dev/null && has_tests python3.13; then
    python=(python3.13)
fi
if [[ ${#python[@]} -eq 0 ]]; then
    echo "conformance: skipped: no Python 3.13 with its test package (set CONFORMANCE_PYTHON, or install 3.13.0 with pyenv)"
    exit 0
fi

venv=build/conformance-venv
if [[ ! -x "$venv/bin/python" ]]; then
    "${python[@]}" -m venv "$venv"
fi
log=$(mktemp)
if ! "$venv/bin/python" -m pip install -q -e . 'pytest>=8' 'pytest-timeout>=2.2' 'anyio>=4.4' >"$log" 2>&1; then
    cat "$log"
    rm -f "$log"
    exit 1
fi
rm -f "$log"
PROCPOOL_CONFORMANCE=1 exec "$venv/bin/python" -m pytest tests/conformance -p no:cacheprovider "$@"
