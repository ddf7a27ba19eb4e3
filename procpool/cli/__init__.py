"""The ``procpool`` command line: ``demo``, ``run``, ``bench`` and ``mcp`` (the ``cli`` extra).

    procpool.cli          main(): the console script and ``python -m procpool``. It imports no
                          click, so a base install prints one line naming the extra, not a traceback
    procpool.cli.group    the click group: logging, one-line usage errors, the lazy ``mcp`` command
    procpool.cli.run      ``procpool run``: map a user's function over inputs, JSON lines out
    procpool.cli.demo     ``procpool demo``: count primes on pools, kill a worker, time out a task
    procpool.cli.bench    ``procpool bench``: benchmarks/compare.py from a source checkout
    procpool.cli.mcp      ``procpool mcp``: flags -> the server's config; loaded only when asked for
    procpool.cli.params   parameter checks the commands share

Imports point down: ``main`` -> ``group`` -> the commands -> ``procpool`` (and, for ``mcp`` only,
``procpool.mcp``).
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ("main",)

# What the command line needs beyond the base install, and the extra that brings it.
EXTRA_MODULES = ("click", "rich")
EXTRA = "procpool[cli]"


def main(argv: list[str] | None = None) -> None:
    """Run the ``procpool`` command line (the console script and ``python -m procpool``).

    Exits 2 with one line on stderr when click or rich is missing (a base install).
    """
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"procpool: the command line needs {' and '.join(missing)}, which the base install leaves out: "
            f"pip install '{EXTRA}'",
            file=sys.stderr,
        )
        sys.exit(2)
    from procpool.cli.group import run_command_line

    run_command_line(argv)
