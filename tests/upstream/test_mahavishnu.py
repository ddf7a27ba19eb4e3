"""Mahavishnu 0.14.0's own PoolManager, pool MCP tools and MemoryAggregator driving procpool pools, unpatched.

Skipped when Mahavishnu is not installed: scripts/upstream-check builds a Python 3.13 venv with it.
"""

from __future__ import annotations

import http.server
import json
import threading
from typing import ClassVar

import pytest
from helpers import assert_gone, pids_of

pytest.importorskip("mahavishnu.pools.manager", reason="Mahavishnu is not installed (scripts/upstream-check does it)")
fastmcp = pytest.importorskip("fastmcp", reason="fastmcp is not installed")

from mahavishnu.mcp.protocols.message_bus import MessageType  # noqa: E402
from mahavishnu.mcp.tools.pool_tools import register_pool_tools  # noqa: E402
from mahavishnu.pools.base import BasePool, PoolConfig, PoolMetrics  # noqa: E402
from mahavishnu.pools.manager import PoolSelector  # noqa: E402
from mahavishnu.pools.memory_aggregator import MemoryAggregator  # noqa: E402

from procpool.integrations.mahavishnu import ProcPoolAdapter, ProcPoolManager, spawn_procpool  # noqa: E402

pytestmark = pytest.mark.anyio


class Capture(http.server.BaseHTTPRequestHandler):
    """Records the JSON bodies posted to it and answers 200, standing in for session-buddy's and Akosha's HTTP."""

    bodies: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def capture_url():
    """An HTTP server on 127.0.0.1 that records posts; shut down after the test."""
    Capture.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
async def manager(monkeypatch):
    """Mahavishnu's PoolManager (the procpool-aware subclass); all pools closed after the test, leaving no worker."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    m = ProcPoolManager(terminal_manager=None)
    m.created = []

    async def created(message) -> None:
        m.created.append(message.payload["pool_id"])

    m.message_bus.subscribe(MessageType.POOL_CREATED, created)
    seen: set[int] = set()
    try:
        yield m, seen
    finally:
        for pool in m._pools.values():
            if isinstance(pool, ProcPoolAdapter):
                seen.update(pids_of(pool.pool))
        await m.close_all()
        assert m._pools == {}
        assert_gone(sorted(seen))


def config(name: str, **extra) -> PoolConfig:
    """Mahavishnu's own PoolConfig for a procpool pool."""
    return PoolConfig(name=name, pool_type="procpool", extra_config=extra)


async def test_the_manager_spawns_routes_monitors_aggregates_and_closes(manager, capture_url):
    """spawn_pool, execute_on_pool, route_task, list_pools, health_check, aggregate_results, memory sync, close_pool."""
    m, seen = manager
    first = await m.spawn_pool("procpool", config("a", task_handler="adapter_handlers:record"))
    second = await spawn_procpool(m, config("b"))  # the helper works on any Mahavishnu PoolManager
    pools = [m._pools[first], m._pools[second]]
    for pool in pools:
        seen.update(pids_of(pool.pool))
        assert isinstance(pool, BasePool) and pool.pool_id.startswith("procpool_")
    assert m._pool_worker_counts == {first: 3, second: 3}
    task = {"prompt": "p", "command": "make", "model": "m", "max_tokens": 9, "task_id": "t1"}
    result = await m.execute_on_pool(first, task)
    assert result["status"] == "completed" and result["output"]["task"] == task
    assert result["output"]["context"]["worker_id"] == result["worker_id"] in pools[0]._workers
    rotation = PoolSelector.ROUND_ROBIN
    picked = [(await m.route_task({"prompt": "r"}, pool_selector=rotation))["pool_id"] for _ in range(4)]
    assert picked == [first, second, first, second]
    assert m.created == [first, second]  # pool_created reached the message bus's subscribers
    least = await m.route_task({"prompt": "l"}, pool_selector=PoolSelector.LEAST_LOADED)
    assert least["status"] == "completed" and least["pool_id"] in (first, second)
    listed = {p["pool_id"]: p for p in await m.list_pools()}
    assert {(p["pool_type"], p["status"], p["workers"]) for p in listed.values()} == {("procpool", "running", 3)}
    assert (await m.health_check())["status"] == "healthy"
    metrics = await pools[0].get_metrics()
    ran = {first: 1 + picked.count(first), second: picked.count(second)}
    ran[least["pool_id"]] += 1
    assert isinstance(metrics, PoolMetrics) and metrics.tasks_completed == ran[first]
    once = await m.aggregate_results()
    assert once == await m.aggregate_results()  # collect_memory is a read: the second reader sees the same
    assert once == {pool_id: {"memory_count": count, "status": "running"} for pool_id, count in ran.items()}
    aggregator = MemoryAggregator(session_buddy_url=capture_url, akosha_url=capture_url)
    try:
        stats = await aggregator.get_pool_memory_stats(m)
        assert {pid: s["memory_count"] for pid, s in stats.items()} == ran
        synced = await aggregator.collect_and_sync(m)
        assert (synced["pools_synced"], synced["memory_items_synced"]) == (2, 6)
    finally:
        await aggregator.stop()
    stored = [b["arguments"] for b in Capture.bodies if b["name"] == "store_memory"]
    assert len(stored) == 6 and {s["metadata"]["pool_id"] for s in stored} == {first, second}
    assert {s["metadata"]["task_id"] for s in stored} >= {"t1"}
    await m.close_pool(second)
    assert second not in m._pools and await pools[1].status() == "stopped"
    assert_gone(pids_of(pools[1].pool))


async def test_the_pool_mcp_tools_spawn_and_drive_procpool_pools(manager):
    """Mahavishnu's pool_spawn (no extra_config: default handler), pool_execute, scale, monitor and close tools work."""
    m, seen = manager
    server = fastmcp.FastMCP("mahavishnu-pools")
    register_pool_tools(server, m)

    async def call(client, tool: str, **arguments):
        result = await client.call_tool(tool, arguments)
        assert not result.is_error, result
        return result.structured_content if result.structured_content is not None else result.data

    async with fastmcp.Client(server) as client:
        spawned = await call(client, "pool_spawn", pool_type="procpool", name="tools")
        assert spawned["status"] == "created", spawned
        pool_id = spawned["pool_id"]
        seen.update(pids_of(m._pools[pool_id].pool))
        executed = await call(client, "pool_execute", pool_id=pool_id, prompt="hello", timeout=30)
        assert executed["status"] == "completed" and executed["output"]["prompt"] == "hello"
        assert executed["output"]["task"]["caller_kind"] == "unknown"  # every key of Mahavishnu's task arrives
        assert executed["worker_id"] == executed["output"]["worker_id"]
        scaled = await call(client, "pool_scale", pool_id=pool_id, target_workers=3)
        assert (scaled["status"], scaled["actual_workers"]) == ("scaled", 3)
        refused = await call(client, "pool_scale", pool_id=pool_id, target_workers=5)
        assert refused["status"] == "failed" and "does not support scaling" in refused["error"]
        outside = await call(client, "pool_scale", pool_id=pool_id, target_workers=50)
        assert outside["status"] == "failed" and "outside [1, 10]" in outside["error"]
        monitored = await call(client, "pool_monitor")
        assert monitored[pool_id] == {"memory_count": 1, "status": "running"}
        health = await call(client, "pool_health")
        assert health["status"] == "healthy" and health["pools_active"] == 1
        bad = await call(client, "pool_spawn", pool_type="procpool", name="too-big", min_workers=5)
        assert bad["status"] == "failed" and "exactly 3 workers" in bad["error"]
        closed = await call(client, "pool_close_all")
        assert closed == {"pools_closed": 1, "status": "all_closed"}
    assert m._pools == {}
