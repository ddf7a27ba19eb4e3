"""Run CPython's own concurrent.futures tests against procpool.Executor (issue 12).

The test classes come from the Python 3.13 interpreter's own ``test.test_concurrent_futures``
package; nothing of them is copied here. Under another Python, or one without its ``test``
package, or without ``PROCPOOL_CONFORMANCE=1``, nothing in this directory is collected:
``tests/conformance/run.sh`` builds a 3.13 environment and runs it.

Every case listed in DIFFERENCES.md is marked as an expected failure (strict: a listed case that
starts passing fails the run, so the table cannot go stale), with the table's reason.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

DIFFERENCES = Path(__file__).with_name("DIFFERENCES.md")
# A table row of DIFFERENCES.md: | `Class.test_name` | CPython expects | procpool does | pinned by |
ROW = re.compile(r"^\|\s*`(?P<case>\w+\.\w+)`\s*\|(?P<expects>[^|]*)\|(?P<why>[^|]*)\|")


def _available() -> bool:
    # Only when asked (run.sh sets it): the regular suite on 3.13 must not run these 40 s too.
    if os.environ.get("PROCPOOL_CONFORMANCE") != "1":
        return False
    if sys.version_info[:2] != (3, 13):
        return False
    try:
        import test.test_concurrent_futures.executor  # noqa: F401
    except ImportError:
        return False
    return True


collect_ignore_glob = [] if _available() else ["test_*.py"]


def differences() -> dict[str, str]:
    """``{"Class.test_name": reason}`` for every row of DIFFERENCES.md."""
    out = {}
    for line in DIFFERENCES.read_text().splitlines():
        match = ROW.match(line)
        if match:
            out[match["case"]] = " ".join(match["why"].split())
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's: touch only ours.
    ours = [item for item in items if Path(str(item.path)).parent == DIFFERENCES.parent]
    if not ours:
        return
    known = differences()
    for item in ours:
        cls = getattr(item, "cls", None)
        if cls is None:
            continue
        case = f"{cls.__name__.removeprefix('Procpool')}.{item.name}"
        if case in known:
            item.add_marker(pytest.mark.xfail(reason=known.pop(case), strict=True))
    if known and not config.option.keyword and not config.option.markexpr and len(ours) > 1:
        raise pytest.UsageError(f"DIFFERENCES.md lists cases that do not exist: {sorted(known)}")
