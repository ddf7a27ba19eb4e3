"""map() stops its work as soon as the caller stops iterating; statistics are frozen; health can be awaited."""

from __future__ import annotations

import asyncio
import os
import signal

import attacks
import attrs
import pytest
import tasks
from helpers import wait_until

from procpool import BrokenPool, Health, PoolClosed, PoolStatistics, WorkerPool, WorkerState
from procpool._map import WINDOW

pytestmark = pytest.mark.anyio


async def test_breaking_out_of_map_cancels_its_chunks_at_once():
    """After `break` in `async for ... in pool.map(...)`, no chunk of it is queued or running (load is 0)."""
    async with WorkerPool() as pool:
        async for value in pool.map(tasks.slow_pid, [0.0] + [30.0] * 20, chunksize=1):
            assert value > 0
            break
        assert pool.statistics().tasks_cancelled == WINDOW - 1  # the rest of the window, queued and running
        assert not pool._tasks.pending
        await wait_until(lambda: pool.load == 0)  # the killed workers have exited


async def test_an_exception_in_the_loop_body_cancels_the_map():
    """An exception raised inside `async for` over pool.map cancels its remaining chunks at once."""
    async with WorkerPool() as pool:
        with pytest.raises(ZeroDivisionError):
            async for _ in pool.map(tasks.slow_pid, [0.0] + [30.0] * 20, chunksize=1):
                1 / 0  # noqa: B018
        assert pool.statistics().tasks_cancelled == WINDOW - 1
        await wait_until(lambda: pool.load == 0)


async def test_cancelling_the_consumer_cancels_the_map():
    """Cancelling the task that iterates over pool.map cancels the map's chunks too."""
    async with WorkerPool() as pool:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in pool.map(tasks.slow_pid, [0.0] + [30.0] * 20, chunksize=1):
                started.set()

        consumer = asyncio.ensure_future(consume())
        await asyncio.wait_for(started.wait(), 30)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert pool.statistics().tasks_cancelled >= WINDOW - 1  # the window, refilled or not
        await wait_until(lambda: pool.load == 0)


async def test_map_as_a_context_manager_closes_on_exit():
    """`async with pool.map(...) as results` cancels what is left when the block ends."""
    async with WorkerPool() as pool:
        async with pool.map(attacks.ident, range(100), chunksize=1) as results:
            assert await results.__anext__() == 0
        await wait_until(lambda: pool.load == 0)
        assert [x async for x in results] == []


def test_map_checks_its_arguments_at_the_call():
    """pool.map refuses a bad function or chunksize when called, before any iteration."""
    pool = WorkerPool()
    with pytest.raises(TypeError):
        pool.map(42, [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunksize"):
        pool.map(attacks.ident, [1], chunksize=0)


async def test_statistics_is_a_frozen_snapshot():
    """statistics() returns a frozen snapshot whose figures do not move when the pool does."""
    async with WorkerPool() as pool:
        before = pool.statistics()
        assert isinstance(before, PoolStatistics) and before.health is Health.HEALTHY
        await pool.apply(attacks.ident, (1,))
        after = pool.statistics()
        assert (before.tasks_completed, after.tasks_completed) == (0, 1)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            before.tasks_completed = 5  # type: ignore[misc]
        assert [w.state for w in after.workers] == ["idle"] * 3
        assert pool.get_status()["tasks_completed"] == 1


async def test_wait_healthy_returns_once_a_killed_worker_is_replaced():
    """wait_healthy() returns when the slot of a SIGKILLed worker is refilled and ready."""
    async with WorkerPool() as pool:
        victim = pool.workers[0].pid
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: pool.workers[0].pid != victim)
        await asyncio.wait_for(pool.wait_healthy(), 30)
        assert pool.health == "healthy"
        assert all(w.state is WorkerState.IDLE for w in pool.workers)


async def test_wait_healthy_raises_brokenpool_for_a_pool_that_cannot_start():
    """wait_healthy() starts a new pool and raises BrokenPool when its workers cannot start."""
    pool = WorkerPool(initializer=attacks.hang_forever, start_timeout=0.3)
    with pytest.raises(BrokenPool):
        await asyncio.wait_for(pool.wait_healthy(), 30)
    await pool.shutdown()


async def test_wait_healthy_times_out_while_a_worker_is_stuck():
    """wait_healthy(timeout) raises TimeoutError while a worker stays stuck (replace_stuck=False)."""
    async with WorkerPool(stuck_after=0.2, replace_stuck=False) as pool:
        stuck = pool.submit(tasks.slow_pid, 30)
        await wait_until(lambda: any(w.state is WorkerState.STUCK for w in pool.workers))
        with pytest.raises(TimeoutError):
            await pool.wait_healthy(timeout=0.3)
    # Killed by the shutdown; retrieved here, else asyncio reports an exception never retrieved
    # as soon as the pool lets go of the future.
    with pytest.raises(PoolClosed):
        await stuck
