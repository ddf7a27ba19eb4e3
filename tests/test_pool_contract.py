"""The pool contract (procpool.PoolLike), run over both backends by one parametrized fixture.

Each test holds for a local [WorkerPool] and for a [DaskPool] on its own LocalCluster: the same
calls give the same results and the same errors. Differences between the backends are pinned in
test_dask.py instead, and written down in docs/scale-out.md.
"""

from __future__ import annotations

import asyncio
import os
import threading

import attrs
import psutil
import pytest
import tasks
from helpers import assert_gone, wait_until

from procpool import (
    POOL_SIZE,
    Health,
    PoolClosed,
    PoolStatistics,
    RemoteTraceback,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    WorkerPool,
)
from procpool._protocol import PoolLike, WorkerLike

pytestmark = pytest.mark.anyio

BACKENDS = ["local", "dask"]


def _make(backend: str, **options):
    if backend == "dask":
        pytest.importorskip("distributed")
        from procpool.dask import DaskPool

        return DaskPool(f"contract-{backend}", **options)
    return WorkerPool(f"contract-{backend}", **options)


def _pids(pool: PoolLike) -> set[int]:
    return {w.pid for w in pool.workers if w.pid is not None}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def wait_gone(pids: list[int]) -> None:
    """Wait, with the event loop free (a Dask pool's kill travels through it), until every pid has exited."""
    await wait_until(lambda: not any(_alive(p) for p in pids), timeout=30)


@pytest.fixture(params=BACKENDS)
async def any_pool(request):
    """A running pool of either backend; after the test it is shut down and none of its workers survive."""
    pool = _make(request.param, handler="tasks:prompt_handler")
    await pool.initialize()
    seen = _pids(pool)
    pool._test_seen_pids = seen
    try:
        yield pool
    finally:
        seen |= _pids(pool)
        await pool.shutdown(timeout=5)
        assert_gone(sorted(seen))


async def all_healthy(pool: PoolLike) -> None:
    """Wait until the pool reports three healthy workers."""
    await wait_until(lambda: pool.health == "healthy" and len(_pids(pool)) == POOL_SIZE)


async def test_both_pools_implement_the_protocol(any_pool):
    """A started pool of either backend is a PoolLike with three WorkerLike slots, running and healthy."""
    assert isinstance(any_pool, PoolLike)
    assert len(any_pool.workers) == POOL_SIZE
    assert all(isinstance(w, WorkerLike) for w in any_pool.workers)
    assert any_pool.running and any_pool.health == "healthy"
    assert len(_pids(any_pool)) == POOL_SIZE and os.getpid() not in _pids(any_pool)


async def test_apply_submit_and_async_functions(any_pool):
    """apply and submit return the function's result from a worker process; async def functions are awaited there."""
    assert await any_pool.apply(tasks.add, (2,), {"b": 3}) == 5
    assert await any_pool.submit(tasks.square, 9) == 81
    assert await any_pool.apply(tasks.async_double, (21,)) == 42
    assert await any_pool.apply(tasks.pid) in _pids(any_pool)


async def test_task_exception_keeps_its_type_and_remote_traceback(any_pool):
    """A task's own exception reaches the caller as its own type, with the worker's traceback as __cause__."""
    with pytest.raises(tasks.CustomError, match="boom") as info:
        await any_pool.apply(tasks.raise_custom, ("boom",))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_custom" in str(info.value.__cause__)


async def test_map_keeps_order_and_stops_at_the_first_error(any_pool):
    """map yields results in input order, and the first failing item ends it with that item's exception."""
    assert [x async for x in any_pool.map(tasks.square, range(20))] == [x * x for x in range(20)]
    seen = []
    with pytest.raises(ValueError, match="7"):
        async for value in any_pool.map(tasks.fail_on_seven, range(10), chunksize=2):
            seen.append(value)
    assert seen == list(range(7))


async def test_execute_detailed_and_batch_run_the_handler(any_pool):
    """execute runs the handler, execute_detailed names the worker, a batch keeps a failure in its place."""
    assert await any_pool.execute("hi", {"n": 2}) == "HI:2"
    report = await any_pool.execute_detailed("fail")
    assert report.status == "failed" and isinstance(report.error, ValueError)
    assert report.worker_id in {w.worker_id for w in any_pool.workers} and report.pid in _pids(any_pool)
    results = await any_pool.execute_batch(["a", "fail", "c"])
    assert results[0] == "A:0" and results[2] == "C:0" and isinstance(results[1], ValueError)


async def test_unpicklable_arguments_and_results_are_serialization_errors(any_pool):
    """An unpicklable argument fails in the caller with nothing queued; an unpicklable result fails alike."""
    with pytest.raises(SerializationError, match="argument 0"):
        any_pool.submit(tasks.square, threading.Lock())
    assert any_pool.load == 0
    with pytest.raises(SerializationError):
        await any_pool.apply(tasks.unpicklable_result)
    assert await any_pool.apply(tasks.square, (3,)) == 9


async def test_timeout_stops_the_work_and_replaces_the_worker(any_pool):
    """A task past its timeout fails with TaskTimeout, its process is gone, and three workers serve again."""
    before = _pids(any_pool)
    with pytest.raises(TaskTimeout) as info:
        await any_pool.apply(tasks.busy_loop, (60,), timeout=0.5)
    assert info.value.pid in before
    await wait_gone([info.value.pid])
    await all_healthy(any_pool)
    assert info.value.pid not in _pids(any_pool)
    assert await any_pool.apply(tasks.square, (4,)) == 16


async def test_killed_worker_fails_its_task_and_is_replaced(any_pool):
    """A worker killed while running a task fails it with WorkerCrashed; the pool gets back to three workers."""
    with pytest.raises(WorkerCrashed) as info:
        await any_pool.apply(tasks.kill_self)
    assert info.value.pid is not None
    await all_healthy(any_pool)
    assert info.value.pid not in _pids(any_pool)
    assert await any_pool.apply(tasks.square, (5,)) == 25


async def test_cancelling_a_running_task_stops_its_worker(any_pool, tmp_path):
    """Cancelling a task that runs kills the worker running it, and the pool gets back to three workers."""
    mark = tmp_path / "started"
    future = any_pool.submit(tasks.mark_then_wait, str(mark), str(tmp_path / "never"), 60)
    await wait_until(mark.exists)
    running = [w.pid for w in any_pool.workers if w.pid is not None and _busy(w)]
    future.cancel()
    assert len(running) == 1
    await wait_gone(running)
    await all_healthy(any_pool)
    await wait_until(lambda: any_pool.load == 0)


def _busy(worker: WorkerLike) -> bool:
    return worker.get_status()["tasks_in_flight"] > 0


async def test_shutdown_fails_queued_tasks_and_refuses_new_ones(any_pool):
    """shutdown fails tasks that never started with PoolClosed, stops every worker, and refuses later work."""
    pids = sorted(_pids(any_pool))
    futures = [any_pool.submit(tasks.sleep_then, 0.2, i) for i in range(12)]
    await any_pool.shutdown(timeout=10)
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert any(isinstance(o, PoolClosed) for o in outcomes)
    assert all(o in range(12) or isinstance(o, PoolClosed) for o in outcomes)
    assert any_pool.state.value == "closed" and any_pool.health == "not_running"
    with pytest.raises(PoolClosed):
        await any_pool.apply(tasks.square, (2,))
    await wait_gone(pids)


async def test_statistics_is_a_frozen_snapshot_of_the_same_figures(any_pool):
    """statistics() returns the shared frozen PoolStatistics; wait_healthy returns once three workers serve again."""
    with pytest.raises(WorkerCrashed):
        await any_pool.apply(tasks.kill_self)
    await any_pool.wait_healthy(timeout=60)
    await asyncio.gather(*(any_pool.apply(tasks.square, (i,)) for i in range(6)))
    stats = any_pool.statistics()
    assert isinstance(stats, PoolStatistics) and stats.health is Health.HEALTHY
    assert stats.tasks_completed >= 6 and stats.tasks_crashed == 1 and stats.workers_restarted >= 1
    assert len(stats.workers) == POOL_SIZE and stats.workers_healthy == any_pool.workers_healthy == POOL_SIZE
    assert stats.load == any_pool.load == 0 and stats.recent_failures == any_pool.recent_failures
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.queue_size = 1


async def test_status_and_load_report_the_work(any_pool):
    """get_status and health_check report three workers and the finished tasks, and load is back to 0 after the work."""
    await asyncio.gather(*(any_pool.apply(tasks.square, (i,)) for i in range(9)))
    status = any_pool.get_status()
    assert status["tasks_completed"] >= 9 and status["workers_count"] == POOL_SIZE
    assert status["state"] == "running" and len(status["workers"]) == POOL_SIZE
    health = await any_pool.health_check()
    assert health["status"] == "healthy" and health["workers_healthy"] == POOL_SIZE
    assert any_pool.load == 0
