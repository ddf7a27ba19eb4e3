"""Priorities: higher first, FIFO within a priority, and the starvation bound of the prefetch window."""

from __future__ import annotations

import asyncio
import fcntl

import pytest
import sched_tasks as st
from helpers import assert_gone, pids_of

from procpool import PoolStatistics, WorkerPool
from procpool._dispatch import MAX_WINDOW, PendingQueue

pytestmark = pytest.mark.anyio


async def _closed(pool: WorkerPool) -> None:
    pids = pids_of(pool)
    await pool.shutdown(timeout=5)
    assert_gone(pids)


async def test_tasks_start_by_priority_and_in_submission_order_within_one(tmp_path):
    """Queued tasks start highest priority first, and in submission order within a priority."""
    pool = WorkerPool("prio-order")
    await pool.initialize()
    try:
        tmp = tmp_path
        lock_a, lock_b, log = tmp / "a", tmp / "b", str(tmp / "log")
        with open(lock_a, "w") as a, open(lock_b, "w") as b:
            fcntl.flock(a, fcntl.LOCK_EX)
            fcntl.flock(b, fcntl.LOCK_EX)
            # One gate per worker; only the gate on lock b opens, so one worker runs everything
            # else in the order it is dispatched (its pipe is FIFO). Every task takes over 2 ms,
            # so the prefetch window stays at one task and the gated workers are sent nothing.
            gates = [pool.submit(st.gate, str(lock_a)), pool.submit(st.gate, str(lock_a))]
            gates.append(pool.submit(st.gate, str(lock_b), 0.01))
            assert all(len(w.in_flight) == 1 for w in pool.workers)
            specs = [(0, "l0"), (5, "m0"), (10, "h0"), (0, "l1"), (10, "h1"), (-3, "n0"), (5, "m1"), (0, "l2")]
            specs += [(10, "h2"), (-3, "n1"), (5, "m2")]
            futures = [pool.submit(st.record, log, name, 0.005, priority=p) for p, name in specs]
            assert pool.statistics().queue_size == len(specs)
            fcntl.flock(b, fcntl.LOCK_UN)
            await asyncio.wait_for(asyncio.gather(*futures), 60)
            fcntl.flock(a, fcntl.LOCK_UN)
            await asyncio.wait_for(asyncio.gather(*gates), 60)
        started = [line.split()[1] for line in st.lines(log)]
        expected = [name for _, name in sorted(specs, key=lambda s: -s[0])]  # sorted() is stable: FIFO
        assert started == expected
        assert len({line.split()[0] for line in st.lines(log)}) == 1
    finally:
        await _closed(pool)


async def test_a_high_priority_task_waits_only_behind_tasks_already_handed_to_workers(tmp_path):
    """Behind a queue of thousands, a high-priority task starts after at most its worker's prefetch window."""
    pool = WorkerPool("prio-bound")
    await pool.initialize()
    try:
        log = str(tmp_path / "log")
        count = 10_000  # leaves a long queue behind it even when a loaded loop lags far behind its workers
        lows = [pool.submit(st.record, log, str(i)) for i in range(count)]
        # Tiny tasks: once some are measured the window grows, so workers hold many each. The
        # high-priority task is submitted from the 300th completion (of any task: under load one
        # worker can be descheduled while the other two drain the queue), in the loop.
        launched: asyncio.Future[tuple[PoolStatistics, int, asyncio.Future[str]]] = asyncio.Future()
        done = 0

        def launch(_: object) -> None:
            nonlocal done
            done += 1
            if done == 300:
                stats, seen = pool.statistics(), len(st.lines(log))
                launched.set_result((stats, seen, pool.submit(st.record, log, "high", priority=10)))

        for low in lows:
            low.add_done_callback(launch)
        stats, seen, high = await asyncio.wait_for(launched, 60)
        sent = count - stats.queue_size  # lows 0 .. sent-1 were handed to workers (FIFO)
        assert stats.queue_size > 1000, "the test needs a long queue behind the high-priority task"
        await asyncio.wait_for(high, 60)
        await asyncio.wait_for(asyncio.gather(*lows), 120)
        entries = [line.split() for line in st.lines(log)]
        at = next(i for i, (_, name) in enumerate(entries) if name == "high")
        high_pid = entries[at][0]
        mine = [int(name) for pid, name in entries[:at] if pid == high_pid]
        # The worker's pipe is FIFO: nothing dispatched after the high-priority task ran before it.
        assert all(i < sent for i in mine), f"tasks queued after it ran first: {[i for i in mine if i >= sent]}"
        # What ran on its worker between its submission and its start was already in that
        # worker's pipe: at most the window (+1 for a task that had started but not yet logged).
        ahead = [pid for pid, _ in entries[seen:at] if pid == high_pid]
        assert len(ahead) <= MAX_WINDOW + 1
        assert stats.tasks_in_flight <= 3 * MAX_WINDOW
    finally:
        await _closed(pool)


async def test_statistics_report_each_priority_s_queue_and_median_wait(tmp_path):
    """statistics() and get_status() give, per priority, the tasks queued and the median wait."""
    pool = WorkerPool("prio-stats")
    await pool.initialize()
    try:
        tmp = tmp_path
        with open(tmp / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            gates = [pool.submit(st.gate, str(tmp / "lock")) for _ in range(3)]
            queued = [pool.submit(st.add, i, 1, priority=i % 2) for i in range(6)]
            levels = {p.priority: p for p in pool.statistics().priorities}
            assert (levels[1].queued, levels[0].queued) == (3, 3)
            fcntl.flock(lock, fcntl.LOCK_UN)
            await asyncio.wait_for(asyncio.gather(*gates, *queued), 60)
        levels = {p.priority: p for p in pool.statistics().priorities}
        assert levels[1].queued == 0 and levels[1].dispatched == 3 and levels[1].wait_p50 > 0
        status = {p["priority"]: p for p in pool.get_status()["priorities"]}
        assert status[0]["dispatched"] == 3 + 3  # the gates ran at priority 0 too
    finally:
        await _closed(pool)


async def test_priority_must_be_an_int():
    """A priority that is not an int is refused at the call, before anything is queued."""
    pool = WorkerPool("prio-type")
    await pool.initialize()
    try:
        with pytest.raises(TypeError, match="priority"):
            pool.submit(st.add, 1, 2, priority="high")
        with pytest.raises(TypeError, match="priority"):
            await pool.apply(st.add, (1, 2), priority=1.5)
        assert pool.statistics().tasks_submitted == 0
    finally:
        await _closed(pool)


def test_the_pending_queue_keeps_requeued_tasks_at_the_front_of_their_priority():
    """Tasks put back after a worker died go first within their own priority, never ahead of a higher one."""

    class T:
        def __init__(self, name: str, priority: int) -> None:
            self.name, self.priority = name, priority

    queue = PendingQueue()
    for task in (T("a", 0), T("b", 0), T("h", 5)):
        queue.append(task)  # type: ignore[arg-type]
    queue.extendleft([T("r1", 0), T("r2", 0)])  # type: ignore[list-item]
    assert [t.name for t in queue] == ["h", "r1", "r2", "a", "b"]
    assert [t.name for t in queue.take(2)] == ["h", "r1"]
    assert len(queue) == 3 and queue.counts() == {0: 3}
