"""Exit statuses and the fork server (issue 9, items 9 and 10): a worker's death is reported with
its real exit code, the monitor never mistakes a dead worker for a live one, and the fork
server's death costs no task. Real processes and real signals."""

from __future__ import annotations

import asyncio
import multiprocessing.connection
import os
import signal
import time

import psutil
import pytest
import tasks
from helpers import all_healthy, wait_until

from procpool import WorkerCrashed, WorkerPool, _processes

pytestmark = pytest.mark.anyio


def _server_pid() -> int:
    pid = _processes.fork_server_pid()
    assert pid is not None
    return pid


def _running(pool: WorkerPool, n: int = 3) -> bool:
    return sum(bool(w.in_flight) and w.is_running(w.in_flight[0]) for w in pool.workers) >= n


def _gone(pid: int) -> bool:
    """Whether pid has exited (a zombie counts: it has exited, only its status is unread)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("kill_a_worker_too", [False, True], ids=["server-only", "server-and-worker"])
async def test_the_fork_servers_death_costs_no_task(tmp_path, kill_a_worker_too):
    """When the fork server dies, running tasks finish on their workers and the next replacement
    worker starts at once; only a worker that really dies costs its task."""
    gate = tmp_path / "gate"
    async with WorkerPool(start_method="forkserver") as pool:
        futures = [pool.submit(tasks.wait_for_file, str(gate), 60) for _ in range(3)]
        await wait_until(lambda: _running(pool))
        before = {w.pid for w in pool.workers}
        server = _server_pid()
        victim_pid = pool.workers[0].pid
        os.kill(server, signal.SIGKILL)
        if kill_a_worker_too:
            os.kill(victim_pid, signal.SIGKILL)
        await wait_until(lambda: _gone(server))
        # Every worker's status pipe has closed; let the pool see it before the tasks finish.
        await wait_until(lambda: _processes.fork_server_pid() != server)
        gate.touch()
        results = await asyncio.gather(*futures, return_exceptions=True)
        if kill_a_worker_too:
            crashed = [r for r in results if isinstance(r, WorkerCrashed)]
            assert [r.pid for r in crashed] == [victim_pid], results
            assert sorted(r for r in results if isinstance(r, int)) == sorted(before - {victim_pid})
            assert pool.statistics().tasks_crashed == 1
        else:
            assert all(isinstance(r, int) for r in results), results
            assert sorted(results) == sorted(before)
            assert {w.pid for w in pool.workers} == before
            assert pool.statistics().tasks_crashed == 0
            # A worker that dies after the server did is replaced, and costs only its task.
            fut = pool.submit(tasks.kill_self)
            with pytest.raises(WorkerCrashed):
                await fut
            assert pool.statistics().tasks_crashed == 1
        await all_healthy(pool)
        assert pool._supervisor._start_failures == 0
        assert pool.statistics().workers_restarted == 1
        assert await pool.apply(tasks.square, (7,)) == 49
        assert _server_pid() != server
        await wait_until(lambda: not psutil.pid_exists(server))  # reaped, not left a zombie


async def test_a_crash_the_monitor_sees_first_keeps_its_exit_code(tmp_path):
    """A worker the monitor finds a zombie before its death is reported still fails its task with its real exit code."""
    gate = tmp_path / "gate"
    async with WorkerPool(start_method="forkserver") as pool:
        future = pool.submit(tasks.wait_for_file_then_exit, str(gate), 3)
        await wait_until(lambda: _running(pool, 1))
        worker = next(w for w in pool.workers if w.in_flight)
        looks = 0
        check = pool._monitor.check

        def counting_check(w):
            nonlocal looks
            looks += w is worker
            check(w)

        pool._monitor.check = counting_check  # type: ignore[method-assign]
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
        assert pool.statistics().tasks_crashed == 1
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


async def test_a_death_whose_status_multiprocessing_already_read_keeps_its_exit_code():
    """A worker whose exit status multiprocessing's own cleanup read first still fails its task with that status."""
    async with WorkerPool(start_method="forkserver") as pool:
        future = pool.submit(tasks.slow_pid, 60)
        await wait_until(lambda: _running(pool, 1))
        worker = next(w for w in pool.workers if w.in_flight)
        sentinel = worker.process.sentinel
        os.kill(worker.pid, signal.SIGKILL)
        # Before the event loop sees the death: wait (blocking) for the fork server to write the
        # status, then let multiprocessing collect it, as every Process.start() does.
        assert multiprocessing.connection.wait([sentinel], timeout=30)
        multiprocessing.active_children()
        with pytest.raises(WorkerCrashed) as info:
            await asyncio.wait_for(future, 30)
        assert info.value.exitcode == -signal.SIGKILL, str(info.value)
        await all_healthy(pool)
