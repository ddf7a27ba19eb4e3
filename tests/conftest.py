"""Shared fixtures. Async tests run on asyncio through anyio's pytest plugin (each module sets
``pytestmark = pytest.mark.anyio``); every pool a test makes is shut down and checked for leftover processes."""

from __future__ import annotations

import psutil
import pytest

from procpool import WorkerPool


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pids_of(pool: WorkerPool) -> list[int]:
    return [w.pid for w in pool.workers if w.pid is not None]


def assert_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Every pid has exited (zombies count as gone) within the deadline."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    alive = [p for p in alive if _status(p) != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left behind: {alive}"


def _status(proc: psutil.Process) -> str:
    try:
        return proc.status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_ZOMBIE


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
