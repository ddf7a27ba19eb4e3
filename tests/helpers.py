"""Helpers shared by the tests: finding a pool's processes, waiting for conditions, leak checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil

from procpool import WorkerPool


def console_script() -> list[str]:
    """The command that runs the installed ``procpool`` console script (``python -m procpool`` without one)."""
    script = Path(sys.executable).with_name("procpool")
    return [str(script)] if script.exists() else [sys.executable, "-m", "procpool"]


def pids_of(pool: WorkerPool) -> list[int]:
    """The pids of the pool's live worker processes."""
    return [w.pid for w in pool.workers if w.pid is not None]


def processes(pids: list[int]) -> list[psutil.Process]:
    """psutil handles for the pids that still exist."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return procs


def lingering(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` that are alive and not zombies (one that is reaped meanwhile is gone)."""
    return [p for p in procs if _status(p) != psutil.STATUS_ZOMBIE]


def assert_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Every pid has exited (zombies count as gone) within the deadline."""
    _, alive = psutil.wait_procs(processes(pids), timeout=timeout)
    alive = lingering(alive)
    assert not alive, f"processes left behind: {alive}"


def _status(proc: psutil.Process) -> str:
    try:
        return proc.status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_ZOMBIE


async def wait_until(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    """Wait for a condition the pool reaches through its own events, with a generous deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def all_healthy(pool: WorkerPool) -> None:
    """Wait until all three workers of the pool are healthy (woken by the pool's events, not a timer)."""
    await pool.wait_healthy(timeout=30.0)


def _cluster_worker_pids(cluster: Any) -> set[int]:
    return {w.pid for w in cluster.scheduler.workers.values() if w.pid}


@contextlib.asynccontextmanager
async def dask_cluster() -> AsyncIterator[Any]:
    """A Dask ``LocalCluster`` of three one-thread worker processes on 127.0.0.1, owned by the test.

    Its scheduler runs in this process, so closing the cluster is losing the scheduler. On exit
    it is closed, and every worker process it ever had is killed by pid if still there and
    checked gone.
    """
    import distributed

    cluster = await distributed.LocalCluster(
        n_workers=3,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        asynchronous=True,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )
    seen = _cluster_worker_pids(cluster)
    try:
        yield cluster
    finally:
        if cluster.status.name != "closed":
            seen |= _cluster_worker_pids(cluster)
        await cluster.close()
        for pid in seen:
            # Only a worker still ours: a pid already reaped may belong to someone else by now.
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).ppid() == os.getpid():
                    os.kill(pid, signal.SIGKILL)
        assert_gone(sorted(seen))
