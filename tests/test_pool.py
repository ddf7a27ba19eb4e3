"""The core WorkerPool: three real worker processes, results, errors, crashes, shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import signal
import threading
import time
import types
import weakref

import psutil
import pytest
import tasks
from helpers import all_healthy, assert_gone, pids_of, wait_until

import procpool
from procpool import (
    BrokenPool,
    PoolClosed,
    RemoteTraceback,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    WorkerPool,
)
from procpool.handlers import CommandFailed

pytestmark = pytest.mark.anyio


# -- basics -------------------------------------------------------------------------------------


async def test_initialize_starts_exactly_three_live_processes(pool):
    """A pool runs exactly POOL_SIZE (3) distinct live worker processes."""
    assert len(pool.workers) == 3
    pids = pids_of(pool)
    assert len(set(pids)) == 3
    assert all(psutil.pid_exists(p) and p != os.getpid() for p in pids)


async def test_initialize_is_idempotent(pool):
    """Calling initialize() again keeps the same three workers."""
    before = pids_of(pool)
    await pool.initialize()
    assert pids_of(pool) == before


async def test_apply_and_submit_return_results(pool):
    """apply and submit run the function in a worker and return its value."""
    assert await pool.apply(tasks.add, (2,), {"b": 3}) == 5
    assert await pool.submit(tasks.square, 9) == 81
    assert await pool.apply(tasks.pid) in pids_of(pool)


async def test_async_functions_run_on_the_workers_own_loop(pool):
    """An async def function is awaited inside the worker and its result returned."""
    assert await pool.apply(tasks.async_double, (21,)) == 42


async def test_many_submissions_all_resolve_in_order(pool):
    """Thousands of one-per-task submissions all resolve with their own results."""
    futures = [pool.submit(tasks.square, i) for i in range(3000)]
    assert await asyncio.gather(*futures) == [i * i for i in range(3000)]
    assert pool.get_status()["tasks_completed"] == 3000


async def test_work_is_spread_over_the_three_workers(pool):
    """Concurrent slow tasks run on all three workers at once."""
    pids = await asyncio.gather(*(pool.apply(tasks.slow_pid, (0.3,)) for _ in range(6)))
    assert set(pids) == set(pids_of(pool))


async def test_map_yields_in_input_order_and_consumes_lazily(pool):
    """map returns results in input order and pulls input only as it needs it."""
    pulled = 0

    def source():
        nonlocal pulled
        for i in range(100_000):
            pulled += 1
            yield i

    seen = []
    async for value in pool.map(tasks.square, source()):
        seen.append(value)
        if len(seen) == 10:
            break
    assert seen == [i * i for i in range(10)]
    assert pulled < 100_000
    results = [v async for v in pool.map(tasks.square, range(5000))]
    assert results == [i * i for i in range(5000)]


async def test_map_raises_the_first_failing_items_error_after_earlier_results(pool):
    """map yields every result before a failing item, then raises that item's exception."""
    seen = []
    with pytest.raises(ValueError, match="bad item 7"):
        async for value in pool.map(tasks.fail_on_seven, range(20), chunksize=3):
            seen.append(value)
    assert seen == list(range(7))


async def test_execute_runs_the_handler_with_prompt_and_context():
    """execute calls the pool's handler with (prompt, context) in a worker."""
    async with WorkerPool(handler="tasks:prompt_handler") as pool:
        assert await pool.execute("hi", {"n": 2}) == "HI:2"
        assert await pool.execute("yo") == "YO:0"


async def test_async_handler_is_supported():
    """An async def handler is awaited in the worker."""
    async with WorkerPool(handler=tasks.async_handler) as pool:
        assert await pool.execute("abc") == "cba"


async def test_execute_batch_keeps_order_and_failures_in_place():
    """execute_batch returns results in order with each failure's exception in its slot."""
    async with WorkerPool(handler="tasks:prompt_handler") as pool:
        results = await pool.execute_batch(["a", "fail", "c"], context={"n": 1})
    assert results[0] == "A:1" and results[2] == "C:1"
    assert isinstance(results[1], ValueError)


async def test_echo_and_command_handlers(tmp_path):
    """The shipped echo handler returns its input; command runs a program in context['repo'] and fails on exit 3."""
    async with WorkerPool(handler="procpool.handlers:echo") as pool:
        echoed = await pool.execute("ping", {"k": "v"})
    assert echoed["prompt"] == "ping" and echoed["context"] == {"k": "v"}
    async with WorkerPool(handler="procpool.handlers:command") as pool:
        out = await pool.execute("pwd; echo ok", {"repo": str(tmp_path)})
        assert out["exit_code"] == 0
        assert out["stdout"].split() == [str(tmp_path), "ok"]
        with pytest.raises(CommandFailed) as info:
            await pool.execute("echo err >&2; exit 3", {"repo": str(tmp_path)})
    assert info.value.returncode == 3
    assert info.value.stderr.strip() == "err"


async def test_initializer_runs_in_every_worker():
    """The initializer runs with initargs in each worker before it takes work."""
    async with WorkerPool(initializer=tasks.record_init, initargs=("ready",)) as pool:
        results = await asyncio.gather(*(pool.apply(tasks.initialized) for _ in range(6)))
    assert all(r == ["ready"] for r in results)


# -- failure behaviour 1: a task raises -----------------------------------------------------------


async def test_task_exception_keeps_its_type_and_remote_traceback(pool):
    """A task's exception reaches the caller as its own type with the worker traceback as cause."""
    before = pids_of(pool)
    with pytest.raises(tasks.CustomError, match="boom") as info:
        await pool.apply(tasks.raise_custom, ("boom",))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_custom" in str(cause) and "CustomError: boom" in str(cause)
    assert pids_of(pool) == before  # the worker lives on
    assert await pool.apply(tasks.square, (3,)) == 9


# -- failure behaviour 2: a worker dies mid-task ----------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "args", "expect"),
    [
        (tasks.exit_now, (7,), "exit code 7"),
        (tasks.kill_self, (signal.SIGKILL,), "signal SIGKILL"),
        (tasks.segfault, (), "signal SIGSEGV"),
    ],
    ids=["os._exit", "SIGKILL", "segfault"],
)
async def test_worker_death_fails_only_its_task_and_the_slot_is_refilled(pool, fn, args, expect):
    """A dying worker fails only the task it ran, with pid and exit cause; all other work finishes."""
    others = [pool.submit(tasks.sleep_then, 0.05, i) for i in range(12)]
    crash = pool.submit(fn, *args)
    later = [pool.submit(tasks.sleep_then, 0.01, i) for i in range(12, 24)]
    with pytest.raises(WorkerCrashed) as info:
        await crash
    assert expect in str(info.value)
    assert info.value.pid is not None and str(info.value.pid) in str(info.value)
    assert await asyncio.gather(*others, *later) == list(range(24))
    await all_healthy(pool)
    assert pool.get_status()["workers_restarted"] == 1
    assert pool.get_status()["tasks_crashed"] == 1
    assert not psutil.pid_exists(info.value.pid) or psutil.Process(info.value.pid).status() == psutil.STATUS_ZOMBIE


async def test_tasks_queued_behind_a_dead_worker_run_elsewhere(tmp_path):
    """Tasks already written to a worker that dies are run by other workers, exactly once each."""
    log = str(tmp_path / "runs")
    async with WorkerPool() as pool:
        # Tiny tasks make the pool prefetch several per worker; then one worker dies.
        await asyncio.gather(*(pool.submit(tasks.square, i) for i in range(2000)))
        futures = [pool.submit(tasks.count_and_return, log, i) for i in range(300)]
        crash = pool.submit(tasks.exit_now, 1)
        futures += [pool.submit(tasks.count_and_return, log, i) for i in range(300, 600)]
        with pytest.raises(WorkerCrashed):
            await crash
        assert await asyncio.gather(*futures) == list(range(600))
    with open(log) as f:
        runs = sorted(int(line) for line in f)
    assert runs == list(range(600))  # every task ran exactly once


# -- failure behaviour 3: pickling -------------------------------------------------------------------


async def test_unpicklable_argument_fails_at_submission_and_nothing_is_queued(pool):
    """An argument that cannot pickle raises SerializationError at the call, naming it."""
    submitted = pool.get_status()["tasks_submitted"]
    with pytest.raises(SerializationError, match=r"argument 1 \(lock\)"):
        pool.submit(tasks.add, 1, threading.Lock())
    with pytest.raises(SerializationError, match="keyword argument 'b'"):
        await pool.apply(tasks.add, (1,), {"b": threading.Lock()})
    with pytest.raises(SerializationError, match="module level"):
        pool.submit(lambda: 1)
    assert pool.get_status()["tasks_submitted"] == submitted


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (tasks.unpicklable_result, "result .* could not be pickled"),
        (tasks.unloadable_result, "could not be unpickled in the parent"),
        (tasks.raise_needs_args, "raised NeedsArgsError, which could not be unpickled"),
        (tasks.raise_unpicklable, "raised ValueError, which could not be pickled"),
    ],
    ids=["result-unpicklable", "result-unloadable", "exception-unloadable", "exception-unpicklable"],
)
async def test_values_that_cannot_cross_fail_that_task_only(pool, fn, match):
    """A result or exception that cannot cross the process boundary fails its task clearly."""
    before = pids_of(pool)
    with pytest.raises(SerializationError, match=match) as info:
        await pool.apply(fn)
    assert info.value.__cause__ is not None
    assert pids_of(pool) == before
    assert await pool.apply(tasks.square, (4,)) == 16


# -- failure behaviour 4: timeouts --------------------------------------------------------------------


async def test_timeout_kills_the_task_and_replaces_the_worker(pool, tmp_path):
    """On timeout the caller gets TaskTimeout, the task is stopped and its worker replaced."""
    marker = tmp_path / "not-stopped"
    victim = None
    started = time.monotonic()
    with pytest.raises(TaskTimeout) as info:
        await pool.apply(tasks.touch_after, (str(marker), 3.0), timeout=0.5)
    assert time.monotonic() - started < 2.5
    assert isinstance(info.value, TimeoutError)
    victim = info.value.pid
    assert victim is not None
    assert_gone([victim])
    await all_healthy(pool)
    assert victim not in pids_of(pool)
    assert pool.get_status()["tasks_timed_out"] == 1
    assert not marker.exists()  # and never will: the task's process is gone


async def test_pool_task_timeout_applies_by_default():
    """A pool-wide task_timeout limits every task that sets none itself."""
    async with WorkerPool(task_timeout=0.3) as pool:
        with pytest.raises(TaskTimeout):
            await pool.apply(tasks.slow_pid, (5,))
        assert await pool.apply(tasks.square, (5,)) == 25


# -- failure behaviour 5: shutdown ---------------------------------------------------------------------


async def test_shutdown_finishes_running_work_fails_queued_work_and_leaves_no_process(tmp_path):
    """shutdown lets running tasks finish, fails never-run ones with PoolClosed, and stops every worker."""
    pool = WorkerPool()
    await pool.initialize()
    pids = pids_of(pool)
    barrier = tmp_path / "go"
    marks = [tmp_path / f"m{i}" for i in range(3)]
    running = [pool.submit(tasks.mark_then_wait, str(m), str(barrier)) for m in marks]
    queued = [pool.submit(tasks.square, i) for i in range(10)]
    await wait_until(lambda: all(m.exists() for m in marks))
    closing = asyncio.ensure_future(pool.shutdown(timeout=20))
    await asyncio.sleep(0)
    with pytest.raises(PoolClosed):
        pool.submit(tasks.square, 1)
    barrier.touch()
    await closing
    assert sorted(await asyncio.gather(*running)) == sorted(pids)
    for fut in queued:
        with pytest.raises(PoolClosed, match="before the task ran"):
            fut.result()
    assert_gone(pids)
    await pool.shutdown()  # twice is harmless
    with pytest.raises(PoolClosed):
        await pool.apply(tasks.square, (1,))


async def test_shutdown_deadline_kills_running_tasks_and_fails_them(tmp_path):
    """Tasks still running at the shutdown deadline are killed and fail with PoolClosed."""
    pool = WorkerPool()
    await pool.initialize()
    pids = pids_of(pool)
    long = [pool.submit(tasks.slow_pid, 60) for _ in range(3)]
    await wait_until(lambda: all(w.in_flight for w in pool.workers))
    started = time.monotonic()
    await pool.shutdown(timeout=0.5)
    assert time.monotonic() - started < 5
    for fut in long:
        with pytest.raises(PoolClosed):
            fut.result()
    assert_gone(pids)


async def test_context_manager_shuts_down():
    """Leaving 'async with' shuts the pool down and stops its workers."""
    async with WorkerPool() as pool:
        pids = pids_of(pool)
        assert await pool.apply(tasks.square, (2,)) == 4
    assert pool.state is procpool.PoolState.CLOSED
    assert_gone(pids)


# -- failure behaviour 6: bad input ---------------------------------------------------------------------


async def test_bad_input_is_refused_at_the_call(pool):
    """Wrong types, empty batches and bad timeouts raise TypeError/ValueError and queue nothing."""
    submitted = pool.get_status()["tasks_submitted"]
    with pytest.raises(TypeError):
        pool.submit(42)
    with pytest.raises(TypeError):
        await pool.apply(tasks.add, 1)
    with pytest.raises(TypeError):
        await pool.apply(tasks.add, (1,), kwds=[("b", 2)])
    with pytest.raises(ValueError):
        await pool.apply(tasks.add, (1,), timeout=-1)
    with pytest.raises(TypeError):
        await pool.apply(tasks.add, (1,), timeout="soon")
    with pytest.raises(ValueError):
        await pool.execute_batch([])
    with pytest.raises(TypeError):
        await pool.execute_batch("not a list")
    with pytest.raises(TypeError):
        await pool.execute(123)
    with pytest.raises(TypeError):
        await pool.execute("x", context="not a dict")
    with pytest.raises(ValueError):
        [v async for v in pool.map(tasks.square, [1], chunksize=0)]
    assert pool.get_status()["tasks_submitted"] == submitted


def test_bad_pool_options_are_refused_at_creation():
    """Unknown handlers, unsafe start methods and bad limits fail when the pool is created."""
    with pytest.raises(ValueError, match="no_such_module"):
        WorkerPool(handler="no_such_module:fn")
    with pytest.raises(ValueError, match="cannot be loaded"):
        WorkerPool(handler="procpool.handlers:no_such_function")
    with pytest.raises(ValueError, match=r"package\.module:function"):
        WorkerPool(handler="just-a-name")
    with pytest.raises(ValueError, match="module-level"):
        WorkerPool(handler=lambda p, c: p)
    with pytest.raises(TypeError):
        WorkerPool(handler=42)
    with pytest.raises(ValueError, match="fork"):
        WorkerPool(start_method="fork")
    with pytest.raises(ValueError):
        WorkerPool(task_timeout=0)
    with pytest.raises(ValueError):
        WorkerPool(max_pending=0)


async def test_execute_without_handler_says_how_to_configure_one(pool):
    """execute on a pool without a handler raises a RuntimeError that names the option."""
    plain = WorkerPool()
    with pytest.raises(RuntimeError, match="handler="):
        await plain.execute("hello")
    assert plain.state is procpool.PoolState.INITIAL  # nothing was started


async def test_submit_before_initialize_is_a_clear_error():
    """submit on a pool that was never started raises a RuntimeError telling what to do."""
    with pytest.raises(RuntimeError, match="initialize"):
        WorkerPool().submit(tasks.square, 1)


# -- start failures ---------------------------------------------------------------------------------------


async def test_failing_initializer_breaks_the_pool_quickly_without_leftovers():
    """A failing initializer makes initialize() raise BrokenPool with the traceback, and no process stays."""
    pool = WorkerPool(initializer=tasks.failing_initializer)
    started = time.monotonic()
    with pytest.raises(BrokenPool, match="initializer refuses"):
        await pool.initialize()
    assert time.monotonic() - started < 15
    await pool.shutdown()
    assert all(w.process is None for w in pool.workers)


# -- health and status --------------------------------------------------------------------------------------


async def test_health_and_status_report_the_documented_fields(pool):
    """health_check and get_status report workers, counts and the success rate of finished tasks."""
    await pool.apply(tasks.square, (1,))
    with pytest.raises(ValueError):
        await pool.apply(tasks.fail_on, (1, 1))
    pending = pool.submit(tasks.slow_pid, 0.5)
    health = await pool.health_check()
    assert health["status"] == "healthy"
    assert health["workers_healthy"] == health["workers_total"] == 3
    assert len(health["workers"]) == 3
    status = pool.get_status()
    for key in (
        "pool_id",
        "running",
        "workers_count",
        "queue_size",
        "tasks_submitted",
        "tasks_completed",
        "tasks_failed",
        "success_rate",
        "workers_healthy",
        "created_at",
        "started_at",
        "workers",
    ):
        assert key in status
    assert status["tasks_submitted"] == 3
    assert status["success_rate"] == 0.5  # finished tasks only: one of two
    worker = pool.workers[0].get_status()
    for key in (
        "worker_id",
        "pid",
        "tasks_processed",
        "tasks_succeeded",
        "tasks_failed",
        "success_rate",
        "average_processing_time",
        "last_activity",
        "rss_mb",
        "cpu_seconds",
        "restarts",
        "state",
    ):
        assert key in worker
    assert worker["rss_mb"] > 0
    assert await pool.workers[0].health_check() is True
    await pending


async def test_three_failures_in_a_row_make_a_worker_unhealthy_until_it_succeeds():
    """A worker with 3+ consecutive failures is unhealthy; a success makes it healthy again."""
    async with WorkerPool() as pool:
        # Drive failures through real tasks until some worker has three in a row.
        for _ in range(30):
            await asyncio.gather(*(pool.apply(tasks.fail_on, (1, 1)) for _ in range(3)), return_exceptions=True)
            if any(w.consecutive_failures >= 3 for w in pool.workers):
                break
        sick = [w for w in pool.workers if w.consecutive_failures >= 3]
        assert sick and not await sick[0].health_check()
        assert (await pool.health_check())["status"] == "degraded"
        for _ in range(30):
            await asyncio.gather(*(pool.apply(tasks.square, (2,)) for _ in range(6)))
            if all(w.consecutive_failures == 0 for w in pool.workers):
                break
        assert await sick[0].health_check()


async def test_idle_workers_stay_healthy(pool):
    """A worker that has done nothing for a while is still healthy."""
    await asyncio.sleep(0.5)
    assert all([await w.health_check() for w in pool.workers])
    assert (await pool.health_check())["status"] == "healthy"


async def test_status_of_a_pool_not_started():
    """A pool that is not running reports not_running, with no workers healthy."""
    pool = WorkerPool()
    health = await pool.health_check()
    assert health["status"] == "not_running"
    assert pool.get_status()["running"] is False


# -- errors ---------------------------------------------------------------------------------------------------


def test_errors_pickle_and_keep_their_message():
    """Every procpool error survives pickling with its fields and message."""
    errors = [
        WorkerCrashed(12, -9, "task 3"),
        procpool.WorkerStuck(12, -9, "stuck 5 s"),
        procpool.MemoryLimitExceeded(12, -9, "rss 900 MB"),
        TaskTimeout(1.5, 12),
        SerializationError("nope"),
        BrokenPool("broken"),
        PoolClosed("closed"),
        procpool.PoolFull("full"),
        procpool.PoolNotFound("no pool x"),
        procpool.NoPoolAvailable("none"),
        RemoteTraceback("Traceback ..."),
    ]
    for err in errors:
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err) and str(copy) == str(err)
    assert "signal SIGKILL" in str(WorkerCrashed(12, -9))
    assert isinstance(TaskTimeout(1.0), TimeoutError)
    assert isinstance(PoolClosed(), RuntimeError)
    assert isinstance(procpool.PoolNotFound("x"), KeyError)
    import concurrent.futures

    assert isinstance(BrokenPool(), concurrent.futures.BrokenExecutor)


async def test_cancelled_error_passes_through_untouched(pool):
    """Cancelling the caller raises asyncio.CancelledError itself, never a wrapped error."""
    task = asyncio.ensure_future(pool.apply(tasks.slow_pid, (5,)))
    await wait_until(lambda: any(w.in_flight for w in pool.workers))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_public_names_match_all():
    """procpool.__all__ lists exactly the public names the package exports."""
    # Submodules (errors, handlers, and any another test imported) are not names to export.
    public = {
        name
        for name in dir(procpool)
        if not name.startswith("_") and not isinstance(getattr(procpool, name), types.ModuleType)
    }
    exported = set(procpool.__all__) - {"__version__"}
    assert exported <= public
    assert public - exported == set()


def test_pool_runs_with_spawn_too():
    """The spawn start method works as well as the default."""

    async def main():
        async with WorkerPool(start_method="spawn") as pool:
            return await pool.apply(tasks.square, (6,))

    assert asyncio.run(main()) == 36


async def test_map_and_execute_batch_report_progress_to_a_callback():
    """progress= callbacks see every item of map and every prompt of execute_batch, ending at the total."""
    seen: list[tuple[int, int | None]] = []
    async with WorkerPool(handler="tasks:prompt_handler") as pool:
        results = [v async for v in pool.map(tasks.square, range(500), progress=lambda d, t: seen.append((d, t)))]
        assert results == [i * i for i in range(500)]
        assert seen[-1] == (500, 500) and all(t == 500 for _, t in seen)
        seen.clear()
        await pool.execute_batch(["a", "b", "c"], progress=lambda d, t: seen.append((d, t)))
        assert seen == [(1, 3), (2, 3), (3, 3)]


async def test_execute_detailed_reports_worker_duration_and_failures():
    """execute_detailed returns the result or the error with task id, worker id, pid and duration."""
    async with WorkerPool("detail", handler="tasks:prompt_handler") as pool:
        good = await pool.execute_detailed("hi", {"n": 1})
        bad = await pool.execute_detailed("fail")
    assert good.ok and good.result == "HI:1" and good.status == "completed"
    assert good.pool_id == "detail" and good.worker_id.startswith("detail-w") and good.pid > 0
    assert good.duration > 0 and good.task_id >= 1
    assert not bad.ok and bad.status == "failed" and isinstance(bad.error, ValueError)
    assert bad.error_message() == "ValueError: handler failed on purpose"


async def test_cancelling_shutdown_still_stops_every_worker():
    """A shutdown whose caller is cancelled kills the running tasks and still closes the pool."""
    pool = WorkerPool()
    await pool.initialize()
    pids = pids_of(pool)
    running = [pool.submit(tasks.slow_pid, 60) for _ in range(3)]
    # Started in the workers, not only written to them: one not started yet is skipped instead.
    await wait_until(lambda: all(w.in_flight and w.is_running(w.in_flight[0]) for w in pool.workers))
    closing = asyncio.ensure_future(pool.shutdown(timeout=60))
    await wait_until(lambda: pool.state is procpool.PoolState.CLOSING)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await asyncio.wait_for(pool.shutdown(), 10)  # a second call waits for the first to finish
    assert pool.state is procpool.PoolState.CLOSED
    for fut in running:
        with pytest.raises(PoolClosed, match="cancelled"):
            fut.result()
    assert_gone(pids)


async def test_a_failing_progress_callback_reaches_the_caller():
    """An exception raised by a progress callback surfaces in execute_batch and map, not in a log."""

    def broken(done, total):
        raise KeyError("callback bug")

    async with WorkerPool(handler="tasks:prompt_handler") as pool:
        with pytest.raises(KeyError, match="callback bug"):
            await pool.execute_batch(["a", "b"], progress=broken)
        with pytest.raises(KeyError, match="callback bug"):
            [v async for v in pool.map(tasks.square, range(10), progress=broken)]


async def test_a_finished_task_is_freed_by_reference_counting_not_left_to_the_garbage_collector():
    """A resolved task's record is freed as soon as the pool lets go of it: no reference cycle with its future."""
    gc.disable()  # whatever is still alive below is held by references, not awaiting a collection
    try:
        async with WorkerPool() as pool:
            ok, failed = pool.submit(tasks.add, 1, 2), pool.submit(tasks.raise_custom, "boom")
            records = [weakref.ref(ok.task), weakref.ref(failed.task)]
            assert await ok == 3
            with pytest.raises(Exception, match="boom"):
                await failed
            assert [record() for record in records] == [None, None]
    finally:
        gc.enable()
