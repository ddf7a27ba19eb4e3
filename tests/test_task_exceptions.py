"""Whatever a task raises reaches its own caller as a failure of that task, and nothing else."""

from __future__ import annotations

import asyncio

import attacks
import pytest

from procpool import SerializationError, TaskExited, WorkerPool

pytestmark = pytest.mark.anyio

# A hang fails the test here instead of waiting for pytest-timeout.
DEADLINE = 30


async def test_stopiteration_fails_its_task_as_runtimeerror():
    """A task leaking StopIteration fails with RuntimeError whose cause is the StopIteration."""
    async with WorkerPool() as pool:
        with pytest.raises(RuntimeError, match="raised StopIteration") as info:
            await asyncio.wait_for(pool.apply(attacks.first_over, ([1, 2], 5)), DEADLINE)
        assert isinstance(info.value.__cause__, StopIteration)


async def test_stopiteration_never_shifts_other_tasks_results():
    """Tasks raising StopIteration between others leave every other task its own result."""
    async with WorkerPool() as pool:
        futures = [
            pool.submit(attacks.first_over, [1], 5) if i % 7 == 3 else pool.submit(attacks.ident, i) for i in range(300)
        ]
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), DEADLINE)
        for i, outcome in enumerate(outcomes):
            if i % 7 == 3:
                assert isinstance(outcome, RuntimeError)
            else:
                assert outcome == i
        assert await asyncio.wait_for(pool.apply(attacks.ident, (1,)), DEADLINE) == 1


async def test_stopasynciteration_fails_its_task_as_runtimeerror():
    """A task raising StopAsyncIteration fails with RuntimeError, the original as its cause."""
    async with WorkerPool() as pool:
        with pytest.raises(RuntimeError, match="raised StopAsyncIteration") as info:
            await asyncio.wait_for(pool.apply(attacks.stop_async), DEADLINE)
        assert isinstance(info.value.__cause__, StopAsyncIteration)


async def test_map_item_raising_stopiteration_ends_map_with_the_carrier():
    """A map item raising StopIteration ends map with procpool's RuntimeError after the items before it."""
    async with WorkerPool() as pool:
        seen = []

        async def consume() -> None:
            async for value in pool.map(attacks.stop_at_three, range(10), chunksize=2):
                seen.append(value)

        with pytest.raises(RuntimeError, match="the task raised StopIteration"):
            await asyncio.wait_for(consume(), DEADLINE)
        assert seen == [0, 1, 2]


async def test_execute_batch_with_a_handler_raising_stopiteration_returns():
    """execute_batch returns with a RuntimeError in the place of a prompt whose handler raised StopIteration."""
    async with WorkerPool(handler=attacks.stop_handler) as pool:
        results = await asyncio.wait_for(pool.execute_batch(["a", "stop", "b"]), DEADLINE)
        assert results[0] == "a" and results[2] == "b"
        assert isinstance(results[1], RuntimeError)


async def test_systemexit_is_a_task_failure_and_the_worker_survives():
    """A task calling sys.exit(3) fails with TaskExited(code=3) and its worker keeps serving."""
    async with WorkerPool() as pool:
        pids = {w.pid for w in pool.workers}
        with pytest.raises(TaskExited) as info:
            await asyncio.wait_for(pool.apply(attacks.sys_exit, (3,)), DEADLINE)
        assert info.value.exc_type == "SystemExit" and info.value.code == 3
        assert isinstance(info.value.__cause__, SystemExit)
        assert "SystemExit(3)" in str(info.value)
        assert await asyncio.wait_for(pool.apply(attacks.ident, (7,)), DEADLINE) == 7
        assert {w.pid for w in pool.workers} == pids
        assert pool.get_status()["workers_restarted"] == 0


async def test_async_task_calling_sys_exit_is_a_task_failure():
    """An async task calling sys.exit fails with TaskExited, and async tasks still run after it."""
    async with WorkerPool() as pool:
        with pytest.raises(TaskExited):
            await asyncio.wait_for(pool.apply(attacks.async_sys_exit, (2,)), DEADLINE)
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.apply(attacks.async_sys_exit, (0,)) for _ in range(3)), return_exceptions=True),
            DEADLINE,
        )
        assert all(isinstance(r, TaskExited) for r in results)


async def test_keyboardinterrupt_is_a_task_failure():
    """A task raising KeyboardInterrupt fails with TaskExited naming it, not an interrupt of the caller."""
    async with WorkerPool() as pool:
        with pytest.raises(TaskExited) as info:
            await asyncio.wait_for(pool.apply(attacks.keyboard_interrupt), DEADLINE)
        assert info.value.exc_type == "KeyboardInterrupt"


async def test_cancellederror_raised_by_a_task_does_not_cancel_the_caller():
    """A task raising CancelledError fails with TaskExited; the caller's asyncio task is not cancelled."""
    async with WorkerPool() as pool:

        async def caller() -> str:
            try:
                await pool.apply(attacks.cancelled)
            except TaskExited as exc:
                return exc.exc_type
            return "no error"

        task = asyncio.ensure_future(caller())
        assert await asyncio.wait_for(task, DEADLINE) == "CancelledError"
        assert not task.cancelled()


async def test_execute_detailed_reports_systemexit_as_failed():
    """execute_detailed reports a handler's sys.exit as a failed task instead of raising it."""
    async with WorkerPool(handler=attacks.exit_handler) as pool:
        report = await asyncio.wait_for(pool.execute_detailed("exit"), DEADLINE)
        assert report.status == "failed"
        assert isinstance(report.error, TaskExited) and report.error.code == 3
        assert (await pool.execute_detailed("fine")).result == "fine"


async def test_exception_whose_pickling_raises_systemexit_is_a_serialization_error():
    """An exception whose __reduce__ raises SystemExit gives SerializationError and the worker survives."""
    async with WorkerPool() as pool:
        pids = {w.pid for w in pool.workers}
        with pytest.raises(SerializationError, match="ExitOnReduce"):
            await asyncio.wait_for(pool.apply(attacks.raise_exit_on_reduce), DEADLINE)
        assert await asyncio.wait_for(pool.apply(attacks.ident, (1,)), DEADLINE) == 1
        assert {w.pid for w in pool.workers} == pids


async def test_result_that_exits_when_unpickled_cannot_exit_the_parent():
    """A result whose unpickling calls sys.exit fails its task with SerializationError in the parent."""
    async with WorkerPool() as pool:
        with pytest.raises(SerializationError, match="could not be unpickled"):
            await asyncio.wait_for(pool.apply(attacks.exit_on_load_result), DEADLINE)
        assert await asyncio.wait_for(pool.apply(attacks.ident, (2,)), DEADLINE) == 2
