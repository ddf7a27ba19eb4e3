"""session-buddy 0.23.0's own pool MCP tools, served by its FastMCP and called through a real client, run on procpool.

Skipped when session-buddy is not installed: scripts/upstream-check builds a Python 3.13 venv with it.
"""

from __future__ import annotations

import re

import pytest
from helpers import assert_gone, pids_of

pytest.importorskip("session_buddy", reason="session-buddy is not installed (scripts/upstream-check installs it)")
fastmcp = pytest.importorskip("fastmcp", reason="fastmcp is not installed (session-buddy brings it)")

import session_buddy.pools  # noqa: E402
from session_buddy.mcp.tools.infrastructure import pools as sb_tools  # noqa: E402

from procpool.compat import session_buddy as compat  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
async def manager():
    """A compat manager installed as session-buddy's; stopped and uninstalled after the test, leaving no worker."""
    m = compat.install(compat.PoolManager())
    assert await session_buddy.pools.get_pool_manager() is m
    try:
        yield m
    finally:
        pids = [pid for pool in m.pools.values() for pid in pids_of(pool.pool)]
        await m.stop()
        session_buddy.pools._global_pool_manager = None
        assert_gone(pids)


async def call(client, tool: str, **arguments) -> str:
    """Call one tool through the client and return its text."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result
    return result.content[0].text


async def test_the_nine_pool_tools_return_real_results(manager):
    """create, execute, batch, route, list, status, health, manager status and delete all answer from real workers."""
    server = fastmcp.FastMCP("session-buddy-pools")
    sb_tools.register_pool_tools(server)
    async with fastmcp.Client(server) as client:
        names = {t.name for t in await client.list_tools()}
        assert {
            "create_pool",
            "execute_on_pool",
            "execute_batch_on_pool",
            "route_to_pool",
            "list_pools",
            "get_pool_status",
            "check_pool_health",
            "delete_pool",
            "get_pool_manager_status",
        } <= names
        assert await call(client, "create_pool", pool_id="sb1") == "✅ Created pool sb1 with 3 workers"
        assert await call(client, "create_pool", pool_id="sb2") == "✅ Created pool sb2 with 3 workers"
        executed = await call(client, "execute_on_pool", pool_id="sb1", prompt="hello", context={"k": 1})
        worker = re.fullmatch(r"✅ Task executed on pool sb1 by worker (\S+)", executed)
        assert worker and worker[1] in {w.worker_id for w in manager.pools["sb1"].workers}
        assert await call(client, "execute_batch_on_pool", pool_id="sb1", prompts=["a", "b", "c", "d"]) == (
            "✅ Executed 4 tasks on pool sb1"
        )
        routed = [await call(client, "route_to_pool", prompt="x", selector="round_robin") for _ in range(2)]
        assert routed == [
            "✅ Routed task to pool sb1 using round_robin strategy",
            "✅ Routed task to pool sb2 using round_robin strategy",
        ]
        listed = await call(client, "list_pools")
        assert "Pools (2 total)" in listed and "sb1: running=True, workers=3" in listed
        status = await call(client, "get_pool_status", pool_id="sb1")
        assert "Running: True" in status and "Tasks completed: 6" in status and "Success rate: 100.0%" in status
        health = await call(client, "check_pool_health", pool_id="sb1")
        assert "Status: healthy" in health and "Healthy workers: 3/3" in health
        overall = await call(client, "check_pool_health")
        assert "Running: True" in overall and "Total pools: 2" in overall and "Healthy pools: 2" in overall
        assert "Total pools: 2" in await call(client, "get_pool_manager_status")
        assert "not found" in await call(client, "execute_on_pool", pool_id="nope", prompt="x")
        assert await call(client, "delete_pool", pool_id="sb2") == "✅ Deleted pool sb2"
        assert await call(client, "delete_pool", pool_id="sb2") == "⚠️ Pool sb2 not found"
        assert "Total pools: 1" in await call(client, "get_pool_manager_status")


async def test_the_tool_functions_get_upstream_shapes(manager):
    """session-buddy's tool functions read worker_id, status and timestamps from procpool's results as from its own."""
    created = await sb_tools.pool_create("fn")
    assert created["success"] and created["status"] == "healthy" and created["workers_count"] == 3
    executed = await sb_tools.pool_execute("fn", "hi", timeout=30)
    assert executed["success"] and executed["worker_id"] == executed["result"]["worker_id"]
    assert executed["result"]["response"]["pid"] in pids_of(manager.pools["fn"].pool)
    await manager.create_pool("cmd", handler="procpool.handlers:command")
    failed = await sb_tools.pool_execute("cmd", "sleep 30", timeout=0.5)
    assert failed["success"] is False and "timed out" in failed["error"]
    batch = await sb_tools.pool_execute_batch("fn", [])
    assert batch["success"] and batch["results_count"] == 0
    assert (await sb_tools.pool_route_task("x", selector="nope"))["success"] is False
    health = await sb_tools.pool_health("fn")
    assert health["health"]["workers_total"] == 3 and len(health["health"]["worker_health"]) == 3
    assert (await sb_tools.pool_manager_status())["health"]["pool_manager_running"] is True
    assert (await sb_tools.pool_delete("fn"))["deleted"] is True
    assert (await sb_tools.pool_status("fn"))["success"] is False
