"""Exit statuses and the fork server (issue 9, items 9 and 10): a worker's death is reported with
its real exit code, the monitor never mistakes a dead worker for a live one, and the fork
server's death costs no task. Real processes and real signals."""

from __future__ import annotations

import asyncio
import multiprocessing.forkserver
import os
import time

import psutil
import pytest
import tasks
from test_pool import all_healthy, wait_until

from procpool import WorkerCrashed, WorkerPool

pytestmark = pytest.mark.anyio


def _server_pid() -> int:
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    assert pid is not None
    return pid


def _running(pool: WorkerPool, n: int = 3) -> bool:
    return sum(bool(w.in_flight) and w.is_running(w.in_flight[0]) for w in pool.workers) >= n


async def test_a_crash_the_monitor_sees_first_keeps_its_exit_code(tmp_path):
    """A worker the monitor finds a zombie before its death is reported still fails its task with its real exit code."""
    gate = tmp_path / "gate"
    async with WorkerPool(start_method="forkserver") as pool:
        future = pool.submit(tasks.wait_for_file_then_exit, str(gate), 3)
        await wait_until(lambda: _running(pool, 1))
        worker = next(w for w in pool.workers if w.in_flight)
        looks = 0
        check = pool._check_worker

        def counting_check(w):
            nonlocal looks
            looks += w is worker
            check(w)

        pool._check_worker = counting_check  # type: ignore[method-assign]
        # A stopped fork server cannot reap the worker: it stays a zombie, seen by the monitor.
        server = psutil.Process(_server_pid())
        server.suspend()
        try:
            gate.touch()
            await wait_until(lambda: psutil.Process(worker.pid).status() == psutil.STATUS_ZOMBIE)
            seen = looks
            await wait_until(lambda: looks >= seen + 3)
        finally:
            server.resume()
        with pytest.raises(WorkerCrashed) as info:
            await future
        assert info.value.exitcode == 3, str(info.value)
        assert pool.tasks_crashed == 1
        await all_healthy(pool)


async def test_reaping_a_dead_worker_never_blocks_the_loop(tmp_path):
    """When a worker's sentinel fires before it can be reaped, the loop keeps running and the death
    is reported with the real exit code once it comes."""
    async with WorkerPool(start_method="spawn") as pool:
        links = [os.readlink(f"/proc/self/fd/{w.process.sentinel}") for w in pool.workers]
        gaps: list[float] = []
        stop = False

        async def ticker() -> None:
            last = time.monotonic()
            while not stop:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.get_running_loop().create_task(ticker())
        try:
            with pytest.raises(WorkerCrashed) as info:
                await pool.apply(tasks.close_fd_linked_to, (links, 1.0, 5))
        finally:
            stop = True
            await ticking
        assert info.value.exitcode == 5, str(info.value)
        assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f} s"
        await all_healthy(pool)
