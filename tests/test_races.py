"""Races between results, deaths, timers, the monitor, cancellation and recycling."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import tasks
from helpers import all_healthy, assert_gone, pids_of, wait_until

from procpool import PoolClosed, TaskTimeout, WorkerPool, _processes
from procpool import _messages as m
from procpool._dispatch import Dispatcher

pytestmark = pytest.mark.anyio


async def test_cancelling_the_pending_task_makes_room_for_a_waiting_caller(tmp_path):
    """A caller waiting for room (max_pending) proceeds when the pending task is cancelled."""
    barrier = tmp_path / "go"
    async with WorkerPool(max_pending=1) as pool:
        blockers = []
        while pool.get_status()["queue_size"] == 0:  # fill every worker's window, then one more
            blockers.append(pool.submit(tasks.wait_for_file, str(barrier)))
            await asyncio.sleep(0)  # let the dispatch run
        queued = blockers.pop()
        waiter = asyncio.ensure_future(pool.apply(tasks.square, (7,)))
        await wait_until(lambda: len(pool._tasks.room_waiters) == 1)  # the caller waits for room
        assert not waiter.done()
        queued.cancel()
        barrier.touch()
        await asyncio.gather(*blockers)
        assert await asyncio.wait_for(waiter, 15) == 49


async def test_a_process_that_fails_to_start_once_is_retried_and_harms_nothing(monkeypatch):
    """If starting a replacement process fails once, the slot is retried, work finishes and no bystander is hit."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        async with WorkerPool() as pool:
            real_start = _processes.ForkServerProcess.start
            failures = []

            def start_once_failing(self):
                if not failures:
                    failures.append(self)
                    raise OSError(11, "Resource temporarily unavailable")
                return real_start(self)

            monkeypatch.setattr(_processes.ForkServerProcess, "start", start_once_failing)
            victim = pool.workers[0].pid
            os.kill(victim, signal.SIGKILL)
            assert await asyncio.wait_for(asyncio.gather(*(pool.submit(tasks.square, i) for i in range(30))), 15) == [
                i * i for i in range(30)
            ]
            await all_healthy(pool)
            assert failures and victim not in pids_of(pool)
        assert bystander.poll() is None  # an unrelated child of ours was not killed
    finally:
        bystander.kill()
        bystander.wait()


async def test_a_requeued_task_keeps_its_timeout(tmp_path):
    """A task moved off a dead worker before it started still times out on the worker that runs it."""
    barrier = tmp_path / "go"
    async with WorkerPool() as pool:
        blockers = [pool.submit(tasks.wait_for_file, str(barrier)) for _ in range(2)]
        await wait_until(lambda: pool.workers[0].in_flight and pool.workers[1].in_flight)
        os.kill(pool.workers[2].pid, signal.SIGSTOP)  # found by the monitor, then killed
        # The limit outlasts the dead worker, so only a clock restarted on the new worker fires.
        slow = asyncio.ensure_future(pool.apply(tasks.slow_pid, (30,), timeout=3.0))
        await wait_until(lambda: pool.get_status()["workers_restarted"] == 1)
        barrier.touch()
        with pytest.raises(TaskTimeout):
            await asyncio.wait_for(slow, 15)
        await asyncio.gather(*blockers)


async def test_a_kill_for_one_task_does_not_blame_the_next_one():
    """When a timed-out task finishes during the kill's grace period, the tasks behind it run elsewhere."""
    async with WorkerPool(task_timeout=2.0) as pool:
        await asyncio.gather(*(pool.submit(tasks.square, i) for i in range(3000)))  # deep prefetch
        # It runs until the kill's SIGTERM, then finishes: in the grace period whatever the load.
        stubborn = pool.submit(tasks.finish_on_sigterm)
        behind = [pool.submit(tasks.sleep_then, 0.3, i) for i in range(9)]
        await asyncio.sleep(0)
        assert len(pool.workers[0].in_flight) > 1  # some of them wait behind the stubborn task
        with pytest.raises(TaskTimeout):
            await stubborn
        assert await asyncio.gather(*behind) == list(range(9))


async def test_a_task_skipped_by_a_killed_worker_is_timed_afresh_where_it_runs_next(tmp_path):
    """A task that a worker being killed skipped gets a clock of its own on the worker that runs it.

    While the killed task finishes in the grace period, the task behind it is briefly its worker's
    head, which starts its clock; the child then skips it and it is requeued. That clock must not
    follow it: left running it fired for the old slot and the task, gone to another worker, had no
    time limit at all (on the old slot's replacement it would cut the task's run short instead).
    """
    gate = tmp_path / "go"
    async with WorkerPool(task_timeout=2.0) as pool:
        await asyncio.gather(*(pool.submit(tasks.square, i) for i in range(3000)))  # deep prefetch
        stubborn = pool.submit(tasks.finish_on_sigterm)  # worker 0: times out, ends in the grace period
        blockers = [pool.submit(tasks.wait_for_file, str(gate)) for _ in range(2)]  # workers 1 and 2
        behind = pool.submit(tasks.slow_pid, 60)  # queued behind the stubborn task
        await wait_until(lambda: len(pool.workers[0].in_flight) == 2)
        gate.touch()  # workers 1 and 2 go idle, ready to take the skipped task
        await asyncio.wait_for(asyncio.gather(*blockers), 15)
        with pytest.raises(TaskTimeout):
            await asyncio.wait_for(stubborn, 15)
        with pytest.raises(TaskTimeout):  # on the idle worker it went to, within its own 2 s
            await asyncio.wait_for(behind, 15)


async def test_requeued_tasks_go_to_idle_workers_without_waiting_for_the_replacement(tmp_path):
    """Tasks requeued from a dead worker run on the idle workers while its replacement is still starting."""
    slow_start = tmp_path / "slow"
    pool = WorkerPool(initializer=tasks.sleep_if_exists, initargs=(str(slow_start), 30))
    await pool.initialize()
    try:
        slow_start.touch()  # from now on a new worker takes 30 s to start
        os.kill(pool.workers[0].pid, signal.SIGSTOP)
        task = pool.submit(tasks.pid)  # the fast path hands it to the stopped worker
        assert pool.workers[0].in_flight
        ran_on = await asyncio.wait_for(task, 15)
        assert ran_on in (pool.workers[1].pid, pool.workers[2].pid)
        assert pool.workers[0].state == "starting"
    finally:
        await pool.shutdown(timeout=1)


async def test_a_retiring_worker_takes_no_new_work_even_when_judged_stuck():
    """A worker recycling after max_tasks_per_worker never becomes idle again, stuck verdict or not."""
    async with WorkerPool(max_tasks_per_worker=1, stuck_after=0.3, replace_stuck=False) as pool:
        first = pool.submit(tasks.slow_pid, 1.5)
        retiring = next(w for w in pool.workers if w.in_flight)
        await wait_until(lambda: pool.get_status()["workers_stuck"] == 1)
        pid = await first  # read before the retired process can be replaced by a new one
        assert retiring.pid != pid or retiring.state != "idle"
        results = await asyncio.gather(*(pool.submit(tasks.pid) for _ in range(6)))
        assert pid not in results


async def test_shutdown_during_a_respawn_backoff_finishes(tmp_path):
    """shutdown() completes while a slot waits to retry a failed start."""
    slow_start = tmp_path / "fail"
    pool = WorkerPool(initializer=tasks.exit_if_exists, initargs=(str(slow_start),))
    await pool.initialize()
    pids = pids_of(pool)
    slow_start.touch()  # replacements now fail to start
    os.kill(pool.workers[0].pid, signal.SIGKILL)
    await wait_until(lambda: pool.workers[0].restarts >= 1)
    await asyncio.wait_for(pool.shutdown(timeout=1), 15)
    assert_gone(pids)
    with pytest.raises(PoolClosed):
        await pool.apply(tasks.square, (1,))


async def test_a_task_that_finishes_as_its_clock_runs_out_keeps_its_result_and_spares_the_next(tmp_path, monkeypatch):
    """A task whose reply is written but not yet read when its time limit fires is not killed:
    its result counts, and the task its worker has started since runs on unharmed."""
    gate, go = tmp_path / "gate", tmp_path / "go"
    real_on_timeout = Dispatcher._on_timeout

    raced: list[bool] = []

    def late_timeout(self, worker, task):
        # The race, made certain: the task finishes and its worker starts the next one before
        # this timer's callback acts (the loop has not read the reply yet).
        go.touch()
        deadline = time.monotonic() + 30
        while worker.shared[m.CURRENT] in (0, task.seq) and time.monotonic() < deadline:
            time.sleep(0.001)
        raced.append(worker.shared[m.CURRENT] not in (0, task.seq))
        real_on_timeout(self, worker, task)

    monkeypatch.setattr(Dispatcher, "_on_timeout", late_timeout)
    async with WorkerPool() as pool:
        await asyncio.gather(*(pool.submit(tasks.square, i) for i in range(3000)))  # deep prefetch
        blockers = [pool.submit(tasks.wait_for_file, str(gate), 60) for _ in range(2)]
        await wait_until(lambda: sum(bool(w.in_flight) and w.is_running(w.in_flight[0]) for w in pool.workers) == 2)
        racing = asyncio.ensure_future(pool.apply(tasks.wait_for_file, (str(go), 60), timeout=0.5))
        await wait_until(lambda: any(t.timeout == 0.5 for w in pool.workers for t in w.in_flight))
        # Spread over the three workers: some wait behind the racing task, in its worker's pipe.
        behind = [pool.submit(tasks.sleep_then, 0.2, i) for i in range(9)]
        assert isinstance(await asyncio.wait_for(racing, 30), int)
        assert raced == [True], "the worker did not move on to a task behind the racing one"
        gate.touch()
        assert await asyncio.wait_for(asyncio.gather(*behind), 30) == list(range(9))
        assert pool.get_status()["tasks_timed_out"] == 0
        await asyncio.gather(*blockers)
        await all_healthy(pool)
