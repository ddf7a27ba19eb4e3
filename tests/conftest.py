"""Shared fixtures. Async tests run on asyncio through anyio's pytest plugin (each module sets
``pytestmark = pytest.mark.anyio``); every pool a test makes is shut down and checked for leftover processes."""

from __future__ import annotations

import pytest
from helpers import assert_gone, pids_of

from procpool import WorkerPool


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def pool():
    """A running pool; shut down after the test, and none of its processes may survive."""
    p = WorkerPool("test", handler="procpool.handlers:echo")
    await p.initialize()
    seen: set[int] = set(pids_of(p))
    p._test_seen_pids = seen  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        seen.update(pids_of(p))
        await p.shutdown(timeout=5)
        assert_gone(sorted(seen))
