"""Backpressure: callers waiting for room in a full pending queue are woken one per free place."""

from __future__ import annotations

import asyncio
import pickle

import attacks
import pytest
import tasks

from procpool import PoolFull, WorkerPool
from procpool import _messages as m

pytestmark = pytest.mark.anyio


async def test_many_waiters_for_a_small_queue_finish_in_linear_time():
    """20,000 concurrent apply() calls through max_pending=50 all finish (quadratic wake-ups took minutes)."""
    async with WorkerPool(max_pending=50) as pool:
        calls = [pool.apply(attacks.ident, (i,)) for i in range(20_000)]
        results = await asyncio.wait_for(asyncio.gather(*calls), 45)
        assert results == list(range(20_000))
        assert pool.load == 0


async def test_a_late_caller_queues_behind_the_waiting_ones(tmp_path):
    """A caller arriving while others wait for room gets its place after them, not before."""
    barrier = tmp_path / "go"
    pool = WorkerPool(max_pending=1)
    queued: list[object] = []
    submit = pool._tasks.submit

    def recording_submit(payload: bytes, timeout: float | None, *options: object):
        _, at = m.load_function(memoryview(payload), 0, {})
        queued.append(pickle.loads(payload[at:])[0][0])  # the argument of every task, in queue order
        return submit(payload, timeout, *options)

    pool._tasks.submit = recording_submit  # type: ignore[method-assign]
    async with pool:
        blockers = [pool.submit(tasks.wait_for_file, str(barrier)) for _ in range(4)]  # 3 run, 1 waits
        early = [asyncio.ensure_future(pool.apply(attacks.ident, (i,))) for i in range(5)]
        while len(pool._tasks.room_waiters) < 5:
            await asyncio.sleep(0)
        late = asyncio.ensure_future(pool.apply(attacks.ident, (99,)))
        await asyncio.sleep(0)
        with pytest.raises(PoolFull):  # a sync submit never jumps the line either
            pool.submit(attacks.ident, 0)
        barrier.touch()
        await asyncio.wait_for(asyncio.gather(*blockers, *early, late), 30)
        assert queued[4:] == [0, 1, 2, 3, 4, 99]


async def test_a_cancelled_waiter_passes_its_place_on(tmp_path):
    """A waiter cancelled after being woken hands its place to the next waiter; nobody is stranded."""
    barrier = tmp_path / "go"
    async with WorkerPool(max_pending=1) as pool:
        blockers = [pool.submit(tasks.wait_for_file, str(barrier)) for _ in range(4)]
        first = asyncio.ensure_future(pool.apply(attacks.ident, (1,)))
        second = asyncio.ensure_future(pool.apply(attacks.ident, (2,)))
        while len(pool._tasks.room_waiters) < 2:
            await asyncio.sleep(0)
        barrier.touch()
        # Cancel the first waiter right after the room it was given appears.
        await asyncio.wait_for(blockers[0], 30)
        first.cancel()
        assert await asyncio.wait_for(second, 30) == 2
        await asyncio.gather(*blockers)
        assert pool._tasks.room_granted == 0 and not pool._tasks.room_waiters


async def test_a_cancelled_waiter_that_room_skipped_ends_cancelled(tmp_path):
    """A waiter cancelled just before room frees up ends with CancelledError, not an error of the pool's own."""
    barrier = tmp_path / "go"
    async with WorkerPool(max_pending=1) as pool:
        blockers = [pool.submit(tasks.wait_for_file, str(barrier)) for _ in range(4)]  # 3 run, 1 waits
        waiter = asyncio.ensure_future(pool.apply(attacks.ident, (1,)))
        while not pool._tasks.room_waiters:
            await asyncio.sleep(0)
        waiter.cancel()  # its future in the line is cancelled now; the task sees it next step
        blockers[3].cancel()  # frees the queue's place in this same step: room looks at the line
        with pytest.raises(asyncio.CancelledError):
            await waiter
        barrier.touch()
        await asyncio.wait_for(asyncio.gather(*blockers[:3]), 30)
        assert pool._tasks.room_granted == 0 and not pool._tasks.room_waiters
