"""The Mahavishnu adapter, held to the pool contract written as a Protocol, on a real pool."""

from __future__ import annotations

import collections
import dataclasses
import inspect
from typing import Any

import anyio
import pytest
import tasks
from helpers import assert_gone, pids_of

from procpool import BrokenPool, PoolClosed
from procpool.integrations.mahavishnu import (
    PoolConfig,
    PoolConfigLike,
    PoolContract,
    PoolMetrics,
    PoolStatus,
    ProcPoolAdapter,
)

pytestmark = pytest.mark.anyio

RESULT_KEYS = {"pool_id", "worker_id", "status", "output", "error", "duration"}


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


async def wait_for(predicate, timeout: float = 20.0) -> None:
    """Wait for a state the pool reaches through its own events; the deadline only guards a hang."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


# -- the contract itself ------------------------------------------------------------------------------

CONTRACT_METHODS = {name: member for name, member in vars(PoolContract).items() if inspect.iscoroutinefunction(member)}


def test_the_contract_names_mahavishnus_pool_interface():
    """The Protocol holds Mahavishnu's BasePool methods and attributes; a pool missing any method fails it."""
    assert set(CONTRACT_METHODS) == {
        "start",
        "execute_task",
        "execute_batch",
        "scale",
        "health_check",
        "get_metrics",
        "collect_memory",
        "status",
        "stop",
    }
    assert {"pool_id", "config", "_workers"} <= set(PoolContract.__annotations__)

    async def stub(self, *args):
        return None

    def pool_class(methods):
        return type("Pool", (), {"pool_id": "x", "config": PoolConfig(name="x"), "_workers": {}, **methods})

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
    assert await adapter.status() == PoolStatus.RUNNING == "running"


# -- behaviour through the contract --------------------------------------------------------------------


async def test_execute_task_reports_worker_status_output_and_duration(adapter):
    """execute_task returns the contract's six keys for a completed, a failed and a timed-out task."""
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
    await wait_for(lambda: adapter.pool.health == "healthy")  # the timed-out worker was replaced
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
    assert len(memory) == 3 and await adapter.collect_memory() == []  # drained
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
    for target in (1, 4):
        with pytest.raises(ValueError, match="exactly 3 worker processes"):
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
    """Malformed task dicts raise TypeError/ValueError at the call, and a bad batch runs none of its tasks."""
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
    assert adapter.pool.tasks_submitted == 0


async def test_configuration_is_checked_and_a_failed_start_is_reported():
    """No handler or a worker range without 3 is refused; a pool that cannot start reports FAILED and leaves nothing."""
    with pytest.raises(ValueError, match="needs a prompt handler"):
        ProcPoolAdapter(PoolConfig(name="x"))
    with pytest.raises(ValueError, match=r"outside this config's range \[5, 10\]"):
        ProcPoolAdapter(PoolConfig(name="x", min_workers=5, max_workers=10), handler="procpool.handlers:echo")
    with pytest.raises(TypeError, match="like Mahavishnu's PoolConfig"):
        ProcPoolAdapter({"name": "x"}, handler="procpool.handlers:echo")  # type: ignore[arg-type]
    unstarted = ProcPoolAdapter(handler="procpool.handlers:echo")
    assert await unstarted.status() == "pending" and unstarted.config.pool_type == "procpool"
    with pytest.raises(RuntimeError, match="not started"):
        await unstarted.execute_task({"prompt": "hi"})
    doomed = ProcPoolAdapter(handler="procpool.handlers:echo", initializer=tasks.failing_initializer)
    with pytest.raises(BrokenPool, match="initializer refuses"):
        await doomed.start()
    assert await doomed.status() == PoolStatus.FAILED
    assert (await doomed.health_check())["status"] == "unhealthy"
    assert_gone(pids_of(doomed.pool))
