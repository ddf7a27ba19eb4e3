"""procpool.compat.session_buddy keeps session-buddy 0.23's pool API shapes, on real worker processes.

tests/upstream/ runs session-buddy's own MCP tools on it; these need no session-buddy.
"""

from __future__ import annotations

import datetime

import pytest
from helpers import assert_gone, pids_of

from procpool import NoPoolAvailable, PoolClosed, PoolNotFound
from procpool.compat.session_buddy import PoolManager

pytestmark = pytest.mark.anyio

UPSTREAM_STATUS_KEYS = {
    "pool_id",
    "running",
    "workers_count",
    "queue_size",
    "tasks_submitted",
    "tasks_completed",
    "tasks_failed",
    "success_rate",
    "created_at",
    "started_at",
    "workers",
}


@pytest.fixture
async def manager():
    """A started compat manager; stopped after the test, and no worker process of it survives."""
    m = PoolManager()
    await m.start()
    seen: set[int] = set()
    try:
        yield m, seen
    finally:
        for pool in m.pools.values():
            seen.update(pids_of(pool.pool))
        await m.stop()
        assert_gone(sorted(seen))


def test_manager_errors_are_value_errors():
    """PoolNotFound and NoPoolAvailable are ValueErrors, as upstream raises; PoolNotFound stays a KeyError."""
    assert issubclass(PoolNotFound, ValueError) and issubclass(PoolNotFound, KeyError)
    assert issubclass(NoPoolAvailable, ValueError)


async def test_pools_have_upstream_shapes(manager):
    """create/get/execute/batch/status/health/delete return what session-buddy's own API returns."""
    m, seen = manager
    pool = await m.create_pool("sb")
    seen.update(pids_of(pool.pool))
    assert await m.get_pool("sb") is pool and await m.get_pool("nope") is None
    with pytest.raises(ValueError, match="already exists"):
        await m.create_pool("sb")
    result = await m.execute_on_pool("sb", "hello", {"k": 1})
    worker_ids = [w.worker_id for w in pool.workers]
    assert result["worker_id"] in worker_ids and result["pool_id"] == "sb"
    assert (result["prompt"], result["context"]) == ("hello", {"k": 1})
    assert result["response"]["prompt"] == "hello" and result["response"]["pid"] == result["pid"]
    with pytest.raises(ValueError, match="not found"):
        await m.execute_on_pool("nope", "hello")
    assert await pool.execute_batch([]) == []
    batch = await pool.execute_batch(["a", "b", "c"])
    assert [r["prompt"] for r in batch] == ["a", "b", "c"]
    status = pool.get_status()
    assert set(status) >= UPSTREAM_STATUS_KEYS and status["status"] == "healthy"
    assert (status["workers_count"], status["tasks_submitted"], status["tasks_completed"]) == (3, 4, 4)
    assert datetime.datetime.fromisoformat(status["created_at"]) <= datetime.datetime.fromisoformat(
        status["started_at"]
    )
    assert isinstance(pool.created_at, datetime.datetime) and pool.created_at.tzinfo is datetime.UTC
    assert [w["pool_id"] for w in status["workers"]] == ["sb"] * 3
    assert [s["pool_id"] for s in await m.list_pools()] == ["sb"]
    health = await pool.health_check()
    assert (health["status"], health["workers_healthy"], health["workers_total"]) == ("healthy", 3, 3)
    assert {w["worker_id"] for w in health["worker_health"]} == set(worker_ids)
    overall = await m.get_health_status()
    assert {"pool_manager_running", "pools_total", "pools_healthy", "pool_details"} <= set(overall)
    assert (overall["pool_manager_running"], overall["pools_total"], overall["pools_healthy"]) == (True, 1, 1)
    assert await m.delete_pool("sb") is True and await m.delete_pool("sb") is False
    assert not pool.running and pool.workers == [] and (await pool.health_check())["status"] == "not_running"
    with pytest.raises(PoolClosed):
        await pool.execute("late")


async def test_failures_stay_in_place_and_timeouts_are_timeout_errors(manager):
    """A failing prompt leaves its exception in its batch slot, and a task past its timeout raises TimeoutError."""
    m, seen = manager
    pool = await m.create_pool("cmd", handler="procpool.handlers:command")
    seen.update(pids_of(pool.pool))
    ok, failed = await pool.execute_batch(["echo fine", "exit 3"])
    assert ok["response"]["stdout"] == "fine\n" and isinstance(failed, Exception) and "exit code 3" in str(failed)
    with pytest.raises(TimeoutError):
        await pool.execute("sleep 30", timeout=0.5)
    seen.update(pids_of(pool.pool))
    assert pool.get_status()["tasks_failed"] == 2


async def test_routing_rotates_and_refuses_with_value_errors(manager):
    """round_robin visits each pool in turn; no pools or a bad selector is a ValueError; a stopped manager restarts."""
    m, seen = manager
    with pytest.raises(ValueError, match="No pools"):
        await m.route_task("x")
    for name in ("p1", "p2"):
        seen.update(pids_of((await m.create_pool(name)).pool))
    picked = [(await m.route_task("x", selector="round_robin"))[0] for _ in range(4)]
    assert picked == ["p1", "p2", "p1", "p2"]
    pool_id, result = await m.route_task("x")
    assert pool_id in ("p1", "p2") and result["pool_id"] == pool_id
    with pytest.raises(ValueError, match="Unknown selector"):
        await m.route_task("x", selector="fastest")
    await m.stop()
    assert not m.running and m.pools == {}
    await m.start()
    seen.update(pids_of((await m.create_pool("again")).pool))
    assert (await m.execute_on_pool("again", "hi"))["pool_id"] == "again"
