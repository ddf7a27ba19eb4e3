"""Specialised pools: pools carry tags, and routing with requires= chooses among matching pools only."""

from __future__ import annotations

import pytest
import sched_tasks as st
from helpers import assert_gone, pids_of

from procpool import NoPoolAvailable, PoolManager, PoolSnapshot

pytestmark = pytest.mark.anyio


@pytest.fixture
async def manager():
    """A manager with an llm pool, a cpu pool and an untagged one; no worker survives it."""
    pids: set[int] = set()
    async with PoolManager() as m:
        for pool_id, tags in (("llm", {"llm", "gpu"}), ("cpu", {"cpu"}), ("plain", ())):
            pool = await m.create_pool(pool_id, handler="procpool.handlers:echo", tags=tags)
            pids.update(pids_of(pool))
        yield m
    assert_gone(sorted(pids))


async def test_requires_routes_only_to_pools_carrying_every_tag(manager):
    """route_apply, submit, route_task and choose_pool with requires= never pick a pool lacking a tag."""
    for _ in range(6):
        assert (await manager.route_apply(st.add, (1, 2), requires={"llm"}))[0] == "llm"
        assert (await manager.route_apply(st.add, (1, 2), selector="round_robin", requires={"cpu"}))[0] == "cpu"
    pool_id, future = manager.submit(st.add, 2, 2, requires={"gpu", "llm"})
    assert (pool_id, await future) == ("llm", 4)
    assert (await manager.route_task("hi", requires={"cpu"}))[0] == "cpu"
    assert manager.choose_pool(requires=["llm"]).pool_id == "llm"
    spread = {(await manager.route_apply(st.add, (0, 0), selector="round_robin"))[0] for _ in range(3)}
    assert spread == {"llm", "cpu", "plain"}  # without requires every pool is a candidate


async def test_no_pool_with_the_tags_is_a_clear_refusal(manager):
    """When no pool carries every required tag, routing raises NoPoolAvailable naming what each lacks."""
    with pytest.raises(NoPoolAvailable) as caught:
        await manager.route_apply(st.add, (1, 2), requires={"llm", "cpu"})
    message = str(caught.value)
    assert "llm lacks tag cpu" in message and "cpu lacks tag llm" in message
    with pytest.raises(TypeError, match="set of tags"):
        manager.choose_pool(requires="llm")  # a string would mean the tags l and m


async def test_selectors_see_the_tags_and_pools_report_them(manager):
    """PoolSnapshot carries the pool's tags, and the pool's status lists them."""
    seen: list[tuple[PoolSnapshot, ...]] = []

    def spy(candidates):
        seen.append(tuple(candidates))
        return candidates[0].pool_id

    await manager.route_apply(st.add, (1, 1), selector=spy, requires={"gpu"})
    assert [(c.pool_id, c.tags) for c in seen[0]] == [("llm", frozenset({"llm", "gpu"}))]
    assert {p["pool_id"]: p["tags"] for p in await manager.list_pools()} == {
        "llm": ["gpu", "llm"],
        "cpu": ["cpu"],
        "plain": [],
    }


async def test_the_manager_passes_the_priority_to_the_chosen_pool(manager):
    """The manager hands priority= to the chosen pool: its statistics count that priority level."""
    pool_id, result = await manager.route_apply(st.add, (1, 2), requires={"cpu"}, priority=7)
    assert (pool_id, result) == ("cpu", 3)
    levels = {p.priority for p in manager.get_pool("cpu").statistics().priorities}
    assert 7 in levels
    futures = [manager.submit(st.add, i, i, requires={"llm"}, priority=i) for i in range(3)]
    assert [await f for _, f in futures] == [0, 2, 4]


async def test_the_mcp_tools_create_tagged_pools_and_route_by_tag_and_priority():
    """The MCP tools take tags on create_pool, requires and priority on route_to_pool, priority on execute_on_pool."""
    from procpool.mcp.tools import PoolTools, RequestRefused, ServerConfig

    pids: set[int] = set()
    async with PoolManager() as m:
        tools = PoolTools(ServerConfig({"echo": "procpool.handlers:echo"}), m)
        created = await tools.create_pool("agents", tags=["llm"])
        await tools.create_pool("batch", tags=["cpu"])
        for pool in (m.get_pool("agents"), m.get_pool("batch")):
            pids.update(pids_of(pool))
        assert created["tags"] == ["llm"]
        for _ in range(3):
            routed = await tools.route_to_pool("hello", requires=["cpu"], priority=3)
            assert routed["pool_id"] == "batch" and routed["result"]["prompt"] == "hello"
        assert 3 in {p.priority for p in m.get_pool("batch").statistics().priorities}
        done = await tools.execute_on_pool("agents", "hi", priority=-2)
        assert done["pool_id"] == "agents" and done["result"]["prompt"] == "hi"
        assert -2 in {p.priority for p in m.get_pool("agents").statistics().priorities}
        with pytest.raises(RequestRefused, match="priority"):
            await tools.execute_on_pool("agents", "hi", priority=10**9)
        with pytest.raises(RequestRefused, match="requires"):
            await tools.route_to_pool("hi", requires=["not a tag!"])
        with pytest.raises(NoPoolAvailable):
            await tools.route_to_pool("hi", requires=["gpu"])
    assert_gone(sorted(pids))
