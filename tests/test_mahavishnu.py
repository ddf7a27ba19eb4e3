"""The Mahavishnu adapter, held to the pool contract written as a Protocol, on a real pool.

These run with or without Mahavishnu installed; tests/upstream/ runs the adapter under Mahavishnu's own code.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import os
import signal
from typing import Any

import adapter_handlers
import pytest
import tasks
from helpers import assert_gone, pids_of, wait_until

from procpool import BrokenPool, PoolClosed, SerializationError
from procpool.integrations.mahavishnu import (
    PoolConfig,
    PoolConfigLike,
    PoolContract,
    PoolMetrics,
    PoolStatus,
    ProcPoolAdapter,
)

pytestmark = pytest.mark.anyio

RESULT_KEYS = {"pool_id", "worker_id", "task_id", "status", "output", "error", "duration"}


@dataclasses.dataclass
class MahavishnuStyleConfig:
    """A stand-in with the shape of Mahavishnu's PoolConfig: a mutable dataclass with its fields."""

    name: str
    pool_type: str
    min_workers: int = 1
    max_workers: int = 10
    worker_type: str = "terminal-claude"
    auto_scale: bool = False
    memory_enabled: bool = True
    extra_config: dict[str, Any] = dataclasses.field(default_factory=dict)


@pytest.fixture
async def adapter():
    """A started adapter made the way Mahavishnu's pool factory makes one; stopped, and no worker survives."""
    config = MahavishnuStyleConfig(
        name="sweep", pool_type="procpool", extra_config={"handler": "procpool.handlers:command", "other": "ignored"}
    )
    a = ProcPoolAdapter(config=config, terminal_manager=object(), session_buddy_client=None)
    assert await a.start() == a.pool_id
    seen = set(pids_of(a.pool))
    try:
        yield a
    finally:
        seen.update(pids_of(a.pool))
        await a.stop()
        assert_gone(sorted(seen))


# -- the contract itself ------------------------------------------------------------------------------

CONTRACT_METHODS = {name: member for name, member in vars(PoolContract).items() if inspect.iscoroutinefunction(member)}


def test_the_contract_refuses_a_pool_missing_a_method():
    """A class with every coroutine method of the Protocol satisfies it; one missing any method does not."""
    assert CONTRACT_METHODS  # the checks below are over these

    async def stub(self, *args):
        return None

    def pool_class(methods):
        return type(
            "Pool",
            (),
            {"pool_id": "x", "config": PoolConfig(name="x", pool_type="procpool"), "_workers": {}, **methods},
        )

    assert isinstance(pool_class(dict.fromkeys(CONTRACT_METHODS, stub))(), PoolContract)
    for missing in CONTRACT_METHODS:
        partial = pool_class({name: stub for name in CONTRACT_METHODS if name != missing})
        assert not isinstance(partial(), PoolContract), missing


async def test_adapter_satisfies_the_contract(adapter):
    """The adapter has every member of the Protocol, with coroutine methods that take the contract's arguments."""
    assert isinstance(adapter, PoolContract)
    assert isinstance(adapter.config, PoolConfigLike)
    for name, member in CONTRACT_METHODS.items():
        method = getattr(adapter, name)
        assert inspect.iscoroutinefunction(method), name
        positional = [p for p in inspect.signature(member).parameters.values() if p.name != "self"]
        inspect.signature(method).bind(*(None for _ in positional))  # TypeError if the arguments do not fit
    assert len(adapter._workers) == 3
    assert await adapter.status() == PoolStatus.RUNNING


# -- behaviour through the contract --------------------------------------------------------------------


async def test_execute_task_reports_worker_status_output_and_duration(adapter):
    """execute_task returns the contract's keys and the task id for a completed, a failed and a timed-out task."""
    done = await adapter.execute_task({"prompt": "echo hi", "timeout": 30})
    assert set(done) == RESULT_KEYS
    assert (done["pool_id"], done["status"], done["error"]) == (adapter.pool_id, "completed", None)
    assert done["output"]["stdout"] == "hi\n"
    assert done["worker_id"] in adapter._workers and done["duration"] > 0
    failed = await adapter.execute_task({"prompt": "true", "context": {"repo": "/nonexistent-procpool-dir"}})
    assert (failed["status"], failed["output"]) == ("failed", None)
    assert failed["error"].startswith("FileNotFoundError:") and failed["worker_id"] is not None
    slow = await adapter.execute_task({"prompt": "sleep 30", "timeout": 0.5})
    assert slow["status"] == "timeout" and "timed out" in slow["error"]
    assert 0.5 <= slow["duration"] < 10
    await adapter.pool.wait_healthy(timeout=20)  # the timed-out worker was replaced
    assert len(adapter._workers) == 3


async def test_execute_batch_health_metrics_memory_and_stop(adapter):
    """execute_batch keys results by task id; health, metrics and memory records follow the contract; stop ends it."""
    results = await adapter.execute_batch(
        [{"prompt": "echo a", "task_id": "first"}, {"prompt": "echo b"}, {"prompt": "exit 0", "id": 7}]
    )
    assert list(results) == ["first", "1", "7"]
    assert all(set(r) == RESULT_KEYS and r["status"] == "completed" for r in results.values())
    assert [r["output"]["stdout"] for r in results.values()][:2] == ["a\n", "b\n"]
    assert results["7"]["output"]["exit_code"] == 0
    health = await adapter.health_check()
    assert {"pool_id", "pool_type", "status", "workers_active"} <= set(health)
    assert (health["pool_type"], health["status"], health["workers_active"]) == ("procpool", "healthy", 3)
    metrics = await adapter.get_metrics()
    assert isinstance(metrics, PoolMetrics)
    assert (metrics.pool_id, metrics.status, metrics.active_workers, metrics.total_workers) == (
        adapter.pool_id,
        "running",
        3,
        3,
    )
    assert (metrics.tasks_completed, metrics.tasks_failed) == (3, 0)
    assert metrics.avg_task_duration > 0 and metrics.memory_usage_mb > 0
    memory = await adapter.collect_memory()
    assert len(memory) == 3 and await adapter.collect_memory() == memory  # a read: a second reader sees the same
    for record in memory:
        meta = record["metadata"]
        assert {"type", "pool_id", "pool_type", "worker_id", "status", "timestamp"} <= set(meta)
        assert (meta["type"], meta["pool_id"], meta["pool_type"], meta["status"]) == (
            "pool_worker_execution",
            adapter.pool_id,
            "procpool",
            "completed",
        )
        assert meta["worker_id"].startswith(adapter.pool_id) and isinstance(record["content"], str)
    assert collections.Counter(r["metadata"]["task_id"] for r in memory) == {"first": 1, "1": 1, "7": 1}
    await adapter.scale(3)
    for target in (1, 4, 10):  # inside the config's [1, 10]: the pool cannot scale
        with pytest.raises(NotImplementedError, match="exactly 3 worker processes"):
            await adapter.scale(target)
    for target in (0, 11):
        with pytest.raises(ValueError, match=r"outside \[1, 10\]"):
            await adapter.scale(target)
    await adapter.stop()
    assert await adapter.status() == "stopped"
    assert adapter._workers == {} and (await adapter.health_check())["status"] == "unhealthy"
    with pytest.raises(PoolClosed):
        await adapter.execute_task({"prompt": "echo late"})
    with pytest.raises(PoolClosed):
        await adapter.start()
    assert await adapter.status() == "stopped"  # refused, not failed


async def test_bad_tasks_raise_before_anything_runs(adapter):
    """With a prompt handler, malformed task dicts raise TypeError/ValueError at the call; a bad batch runs none."""
    for bad, error in (
        ("echo hi", TypeError),
        ({"prompt": 5}, ValueError),
        ({"prompt": "x", "context": "repo"}, TypeError),
        ({"prompt": "x", "timeout": -1}, ValueError),
    ):
        with pytest.raises(error):
            await adapter.execute_task(bad)
    with pytest.raises(ValueError, match="'prompt'"):
        await adapter.execute_batch([{"prompt": "echo ok"}, {"command": "ls"}])
    with pytest.raises(ValueError, match="appears twice"):
        await adapter.execute_batch([{"prompt": "echo 1", "task_id": "t"}, {"prompt": "echo 2", "task_id": "t"}])
    assert adapter.pool.get_status()["tasks_submitted"] == 0


async def test_configuration_is_checked_and_a_failed_start_is_reported():
    """A worker range without 3, two handlers or a bad one are refused; a pool that cannot start reports FAILED."""
    with pytest.raises(ValueError, match=r"outside this config's range \[5, 10\]"):
        ProcPoolAdapter(PoolConfig(name="x", pool_type="procpool", min_workers=5, max_workers=10))
    with pytest.raises(TypeError, match="like Mahavishnu's PoolConfig"):
        ProcPoolAdapter({"name": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        ProcPoolAdapter(handler="procpool.handlers:echo", task_handler="adapter_handlers:record")
    with pytest.raises(ValueError, match="cannot be loaded"):
        ProcPoolAdapter(task_handler="adapter_handlers:no_such_function")
    unstarted = ProcPoolAdapter(PoolConfig(name="x", pool_type="procpool"))
    assert await unstarted.status() == "pending" and unstarted.pool_id == f"procpool_{id(unstarted)}"
    assert unstarted._workers == {}
    with pytest.raises(RuntimeError, match="not started"):
        await unstarted.execute_task({"prompt": "hi"})
    doomed = ProcPoolAdapter(initializer=tasks.failing_initializer)
    with pytest.raises(BrokenPool, match="initializer refuses"):
        await doomed.start()
    assert await doomed.status() == PoolStatus.FAILED
    assert (await doomed.health_check())["status"] == "unhealthy"
    assert_gone(pids_of(doomed.pool))


# -- task handlers: whole task dicts and where they ran ------------------------------------------------


@pytest.fixture
async def task_pool():
    """A started adapter whose task handler returns what it received; stopped, and no worker survives."""
    a = ProcPoolAdapter(
        PoolConfig(name="tasks", pool_type="procpool", extra_config={"task_handler": "adapter_handlers:record"})
    )
    await a.start()
    seen = set(pids_of(a.pool))
    try:
        yield a
    finally:
        seen.update(pids_of(a.pool))
        await a.stop()
        assert_gone(sorted(seen))


async def test_a_task_handler_gets_the_whole_task_and_where_it_runs(task_pool):
    """Any task keys reach the handler, with a context naming the pool, the worker (as the result does) and the task."""
    task = {"command": "make", "model": "m", "system": "s", "max_tokens": 5, "task_id": "job-1", "timeout": 30}
    result = await task_pool.execute_task(task)
    assert result["status"] == "completed" and result["task_id"] == "job-1"
    seen = result["output"]
    assert seen["task"] == task and seen["context_type"] == "TaskContext"
    context = seen["context"]
    assert (context["pool_id"], context["task_id"], context["worker_id"]) == (
        task_pool.pool_id,
        "job-1",
        result["worker_id"],
    )
    assert context["pid"] == task_pool._workers[result["worker_id"]]
    unnamed = await task_pool.execute_task({"prompt": 5})
    assert unnamed["task_id"].startswith(f"{task_pool.pool_id}-task-") and unnamed["output"]["task"] == {"prompt": 5}
    batch = await task_pool.execute_batch([{"a": 1}, {"b": 2, "task_id": "x"}])
    assert {k: r["output"]["context"]["task_id"] for k, r in batch.items()} == {"0": "0", "x": "x"}
    with pytest.raises(SerializationError):
        await task_pool.execute_task({"callback": lambda: None})


async def test_default_async_and_failing_task_handlers():
    """Without a handler the default echoes the task from a worker; async handlers run; a raising one fails the task."""
    for handler, check in (
        (None, lambda out, r: out["task"] == {"x": 1} and out["worker_id"] == r["worker_id"] and out["pid"] > 0),
        ("adapter_handlers:record_async", lambda out, r: out["context"]["worker_id"] == r["worker_id"]),
    ):
        a = ProcPoolAdapter(task_handler=handler) if handler else ProcPoolAdapter()
        await a.start()
        try:
            result = await a.execute_task({"x": 1})
            assert result["status"] == "completed" and check(result["output"], result), result
        finally:
            pids = pids_of(a.pool)
            await a.stop()
            assert_gone(pids)
    a = ProcPoolAdapter(task_handler="adapter_handlers:fail")
    await a.start()
    try:
        result = await a.execute_task({"message": "no good"})
        assert (result["status"], result["output"], result["error"]) == ("failed", None, "ValueError: no good")
        assert result["worker_id"] is not None
    finally:
        pids = pids_of(a.pool)
        await a.stop()
        assert_gone(pids)


async def test_memory_can_be_turned_off():
    """A config with memory_enabled=False keeps no memory records."""
    a = ProcPoolAdapter(PoolConfig(name="quiet", pool_type="procpool", memory_enabled=False))
    await a.start()
    try:
        assert (await a.execute_task({"x": 1}))["status"] == "completed"
        assert await a.collect_memory() == []
    finally:
        pids = pids_of(a.pool)
        await a.stop()
        assert_gone(pids)


async def test_a_restarting_slot_still_counts_as_a_worker(tmp_path):
    """While a killed worker's slot restarts, _workers still has 3 entries; health shows the restart."""
    fifo = str(tmp_path / "hold")
    a = ProcPoolAdapter(initializer=adapter_handlers.block_on_fifo, initargs=(fifo,))
    await a.start()
    seen = set(pids_of(a.pool))
    try:
        os.mkfifo(fifo)  # from now on a new worker waits in its initializer until we open the FIFO
        victim = a.pool.workers[0].pid
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: a.pool.workers[0].pid not in (None, victim))
        seen.update(pids_of(a.pool))
        assert len(a._workers) == 3
        health = await a.health_check()
        assert (health["status"], health["workers_active"]) == ("degraded", 2)
        assert await a.status() == PoolStatus.DEGRADED and (await a.get_metrics()).active_workers == 2
        with open(fifo, "w"):  # let the new worker finish starting
            pass
        await a.pool.wait_healthy(timeout=20)
        assert (await a.health_check())["workers_active"] == 3 and await a.status() == PoolStatus.RUNNING
    finally:
        seen.update(pids_of(a.pool))
        await a.stop()
        assert_gone(sorted(seen))
