"""PoolManager: routing across real pools, selectors, deletion, shutdown and the process-wide manager."""

from __future__ import annotations

import asyncio
import collections
import os
import signal

import anyio
import attrs
import pytest
import tasks
from helpers import assert_gone, pids_of

import procpool
from procpool import (
    BrokenPool,
    NoPoolAvailable,
    PoolClosed,
    PoolManager,
    PoolNotFound,
    PoolSnapshot,
    PoolState,
    ProcPoolError,
    get_pool_manager,
)

pytestmark = pytest.mark.anyio

ECHO = "procpool.handlers:echo"
COMMAND = "procpool.handlers:command"


async def wait_for(predicate, timeout: float = 20.0) -> None:
    """Wait for a state the pools reach through their own events; the deadline only guards a hang."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


@pytest.fixture
async def manager():
    """A started manager; stopped after the test, and no worker of its pools may survive."""
    m = PoolManager()
    await m.start()
    try:
        yield m
    finally:
        pids = [w["pid"] for status in await m.list_pools() for w in status["workers"] if w["pid"]]
        await m.stop(timeout=5)
        assert_gone(pids)


def chosen(results) -> list[str]:
    return [pool_id for pool_id, _ in results]


# -- selectors ------------------------------------------------------------------------------------


async def test_round_robin_is_an_exact_rotation(manager):
    """round_robin sends 30 tasks over 3 pools 10 each, in turn, and routed submit continues the turn."""
    for name in ("p0", "p1", "p2"):
        await manager.create_pool(name)
    results = await asyncio.gather(
        *(manager.route_apply(tasks.square, (i,), selector="round_robin") for i in range(30))
    )
    assert chosen(results) == ["p0", "p1", "p2"] * 10
    assert [value for _, value in results] == [i * i for i in range(30)]
    assert collections.Counter(chosen(results)) == {"p0": 10, "p1": 10, "p2": 10}
    submitted = [manager.submit(tasks.add, i, selector="round_robin", b=1) for i in range(3)]
    assert [pool_id for pool_id, _ in submitted] == ["p0", "p1", "p2"]
    assert await asyncio.gather(*(future for _, future in submitted)) == [1, 2, 3]


async def test_least_loaded_sends_work_to_the_idle_pool_while_another_is_busy(manager, tmp_path):
    """With one pool's workers all busy, least_loaded routes new work to the idle pool."""
    busy = await manager.create_pool("busy", handler=ECHO)  # registered first: a naive router picks it
    idle = await manager.create_pool("idle", handler=ECHO)
    barrier = str(tmp_path / "open")
    blocked = [busy.submit(tasks.wait_for_file, barrier) for _ in range(3)]
    try:
        for _ in range(3):
            pool_id, pid = await manager.route_apply(tasks.pid)
            assert pool_id == "idle" and pid in pids_of(idle)
        pool_id, echoed = await manager.route_task("hello", {"k": 1})
        assert pool_id == "idle" and echoed["prompt"] == "hello"
    finally:
        open(barrier, "w").close()
        assert set(await asyncio.gather(*blocked)) <= set(pids_of(busy))
    # Equal loads: one-at-a-time work still alternates instead of piling onto the first pool.
    results = [await manager.route_apply(tasks.square, (3,)) for _ in range(4)]
    assert collections.Counter(chosen(results)) == {"busy": 2, "idle": 2}


async def troubled_pool_first(manager, troubled: str, healthy: str, marker, patience: float):
    """Register a pool whose new workers wait ``patience`` s for ``marker`` to start, then a healthy pool;
    remove the marker and SIGKILL one worker of the first, so its replacement cannot start yet."""
    marker.touch()
    pool = await manager.create_pool(troubled, initializer=tasks.wait_for_file, initargs=(str(marker), patience))
    await manager.create_pool(healthy)
    marker.unlink()
    os.kill(pool.workers[0].pid, signal.SIGKILL)
    return pool


async def test_degraded_pool_is_routed_around_until_it_recovers(manager, tmp_path):
    """While a pool replaces a worker it is degraded, and every built-in selector prefers the healthy pool."""
    marker = tmp_path / "may-start"
    # Its replacement worker waits in the initializer until the marker exists again.
    sick = await troubled_pool_first(manager, "sick", "well", marker, patience=30.0)
    await wait_for(lambda: sick.health == "degraded" and sick.workers[0].state == "starting")
    for selector in ("least_loaded", "round_robin", "random"):
        results = [await manager.route_apply(tasks.square, (2,), selector=selector) for _ in range(4)]
        assert set(chosen(results)) == {"well"}, selector
    health = await manager.get_health_status()
    assert (health["status"], health["pools_total"], health["pools_healthy"], health["pools_degraded"]) == (
        "degraded",
        2,
        1,
        1,
    )
    marker.touch()
    await wait_for(lambda: sick.health == "healthy")
    results = [await manager.route_apply(tasks.square, (2,), selector="round_robin") for _ in range(4)]
    assert collections.Counter(chosen(results)) == {"sick": 2, "well": 2}


async def test_broken_pool_is_routed_around_and_never_offered(manager, tmp_path):
    """A pool that broke after registration gets no work; with only broken pools left, NoPoolAvailable."""
    # Its replacement workers give up on the marker and fail to start, so the pool breaks.
    fragile = await troubled_pool_first(manager, "fragile", "sound", tmp_path / "may-start", patience=0.05)
    await wait_for(lambda: fragile.state is PoolState.BROKEN)
    for selector in ("least_loaded", "round_robin", "random"):
        results = [await manager.route_apply(tasks.square, (2,), selector=selector) for _ in range(3)]
        assert set(chosen(results)) == {"sound"}, selector
    health = await manager.get_health_status()
    assert (health["pools_total"], health["pools_healthy"]) == (2, 1)
    await manager.delete_pool("sound")
    with pytest.raises(NoPoolAvailable, match="fragile is broken"):
        await manager.route_apply(tasks.square, (2,))
    assert (await manager.get_health_status())["status"] == "unhealthy"


async def test_custom_selectors_get_frozen_snapshots_and_are_checked(manager, tmp_path):
    """A registered or passed-in selector sees frozen snapshots with real loads, and its choice is honoured."""
    a = await manager.create_pool("a")
    await manager.create_pool("b")
    seen: list[tuple[PoolSnapshot, ...]] = []

    def affinity(candidates):
        seen.append(tuple(candidates))
        return "b"

    manager.register_selector("affinity", affinity)
    assert manager.selectors == ("least_loaded", "round_robin", "random", "affinity")
    barrier = str(tmp_path / "open")
    blocked = a.submit(tasks.wait_for_file, barrier)
    try:
        assert (await manager.route_apply(tasks.square, (5,), selector="affinity")) == ("b", 25)
    finally:
        open(barrier, "w").close()
        await blocked
    snapshots = seen[0]
    assert [(s.pool_id, s.load, s.health, s.workers_healthy) for s in snapshots] == [
        ("a", 1, "healthy", 3),
        ("b", 0, "healthy", 3),
    ]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snapshots[0].load = 0  # type: ignore[misc]
    pool_id, future = manager.submit(tasks.square, 4, selector=lambda candidates: candidates[0].pool_id)
    assert (pool_id, await future) == ("a", 16)
    with pytest.raises(NoPoolAvailable, match="declined"):
        await manager.route_apply(tasks.square, (1,), selector=lambda candidates: None)
    with pytest.raises(ValueError, match=r"'nope', which is not one of the candidate pools"):
        await manager.route_apply(tasks.square, (1,), selector=lambda candidates: "nope")
    with pytest.raises(ValueError, match="already registered"):
        manager.register_selector("round_robin", affinity)


# -- pools: create, delete, errors ------------------------------------------------------------------


async def test_delete_pool_stops_routing_at_once_and_leaves_no_process(manager, tmp_path):
    """delete_pool removes the id at once, other pools keep serving during its shutdown, and no worker survives."""
    a = await manager.create_pool("a")
    await manager.create_pool("b")
    a_pids = pids_of(a)
    barrier = str(tmp_path / "open")
    running = a.submit(tasks.wait_for_file, barrier)
    deleting = asyncio.ensure_future(manager.delete_pool("a", timeout=30))
    try:
        await wait_for(lambda: a.state is PoolState.CLOSING)
        with pytest.raises(PoolNotFound):
            manager.get_pool("a")
        results = [await manager.route_apply(tasks.square, (3,), selector=s) for s in ("round_robin", "least_loaded")]
        assert chosen(results) == ["b", "b"]
        assert not deleting.done()  # still letting a's running task finish
    finally:
        open(barrier, "w").close()
    assert await running in a_pids
    await deleting
    assert a.state is PoolState.CLOSED
    assert_gone(a_pids)
    assert [s["pool_id"] for s in await manager.list_pools()] == ["b"]


async def test_unknown_pools_selectors_and_bad_options_raise_typed_errors(manager):
    """Unknown pool: PoolNotFound (a KeyError); unknown selector: ValueError naming the known ones; no duplicates."""
    with pytest.raises(NoPoolAvailable, match="no pools"):
        await manager.route_task("hi")
    plain = await manager.create_pool("x")  # no handler: can run callables, not prompts
    with pytest.raises(ValueError, match="already exists"):
        await manager.create_pool("x")
    with pytest.raises(TypeError):
        await manager.create_pool("y", no_such_option=1)
    assert [s["pool_id"] for s in await manager.list_pools()] == ["x"]
    with pytest.raises(NoPoolAvailable, match="x has no prompt handler"):
        await manager.route_task("hi")
    with pytest.raises(PoolNotFound, match="no pool 'nope' in this manager") as info:
        manager.get_pool("nope")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ProcPoolError)
    with pytest.raises(PoolNotFound, match="nope"):
        await manager.execute_on_pool("nope", "hi")
    with pytest.raises(PoolNotFound, match="nope"):
        await manager.delete_pool("nope")
    with pytest.raises(ValueError, match="'least_loaded', 'round_robin', 'random'"):
        await manager.route_apply(tasks.square, (1,), selector="fastest")
    with pytest.raises(TypeError, match="selector"):
        manager.submit(tasks.square, 1, selector=42)
    assert (await manager.route_apply(tasks.square, (6,))) == ("x", 36)
    assert manager.get_pool("x") is plain


async def test_route_task_refuses_to_guess_between_handlers_and_routes_only_to_the_one_named(manager, tmp_path):
    """With pools of two handlers, routing a prompt needs handler=, which then offers only that handler's pools."""
    marker = tmp_path / "ran"
    prompt = f"touch {marker}"  # what a shell-command pool would run
    await manager.create_pool("e1", handler=ECHO)
    await manager.create_pool("sh", handler=COMMAND)
    await manager.create_pool("e2", handler=ECHO)
    assert manager.handlers() == (ECHO, COMMAND)
    for _ in range(3):
        with pytest.raises(ValueError, match=f"2 different handlers \\({ECHO}, {COMMAND}\\); pass handler="):
            await manager.route_task(prompt, selector="round_robin")
    with pytest.raises(ValueError, match="pass handler="):
        manager.choose_pool(needs_handler=True)
    routed = [await manager.route_task(prompt, handler=ECHO, selector="round_robin") for _ in range(4)]
    assert chosen(routed) == ["e1", "e2", "e1", "e2"]
    assert all(reply["prompt"] == prompt for _, reply in routed)
    assert not marker.exists()
    assert manager.choose_pool(handler=COMMAND).pool_id == "sh"
    with pytest.raises(NoPoolAvailable, match=r"e1 runs procpool\.handlers:echo"):
        await manager.route_task("x", handler="tasks:no_such_handler")
    with pytest.raises(TypeError, match="handler must be"):
        await manager.route_task("x", handler=42)
    # Callables are not prompts: route_apply still uses every pool.
    applied = [await manager.route_apply(tasks.square, (3,), selector="round_robin") for _ in range(3)]
    assert sorted(chosen(applied)) == ["e1", "e2", "sh"]
    await manager.delete_pool("sh")
    assert (await manager.route_task("one handler left"))[0] in ("e1", "e2")


async def test_create_pool_that_cannot_start_is_not_registered(manager):
    """A pool whose workers cannot start raises BrokenPool from create_pool, is not registered and leaves no process."""
    with pytest.raises(BrokenPool, match="initializer refuses"):
        await manager.create_pool("doomed", initializer=tasks.failing_initializer)
    assert await manager.list_pools() == []
    pool = await manager.create_pool("doomed")  # the id is free again
    assert await manager.route_apply(tasks.square, (2,)) == ("doomed", 4)
    assert pool.running


async def test_health_does_not_wait_on_busy_workers_and_stop_leaves_no_process(tmp_path):
    """Health answers while every worker is busy; stop() ends all pools, even hung tasks, and then refuses work."""
    barrier = str(tmp_path / "never")
    async with PoolManager() as manager:
        pools = [await manager.create_pool(name) for name in ("a", "b")]
        hung = [pool.submit(tasks.wait_for_file, barrier) for pool in pools for _ in range(3)]
        with anyio.fail_after(2):
            health = await manager.get_health_status()
        assert (health["status"], health["pools_total"], health["pools_healthy"]) == ("healthy", 2, 2)
        assert [d["pool_id"] for d in health["pool_details"]] == ["a", "b"]
        pids = [pid for pool in pools for pid in pids_of(pool)]
        with anyio.fail_after(15):
            await manager.stop(timeout=0.2)
    assert_gone(pids)
    assert not manager.running and all(pool.state is PoolState.CLOSED for pool in pools)
    for future in hung:
        with pytest.raises(PoolClosed):
            await future
    with pytest.raises(PoolClosed):
        await manager.create_pool("late")
    with pytest.raises(PoolClosed):
        await manager.route_apply(tasks.square, (1,))


async def test_a_cancelled_stop_still_finishes_and_a_later_stop_waits_for_it(tmp_path):
    """Cancelling the caller of stop() neither aborts the shutdown nor leaves a later stop() waiting forever."""
    manager = PoolManager()
    pool = await manager.create_pool("a")
    pids = pids_of(pool)
    hung = [pool.submit(tasks.wait_for_file, str(tmp_path / "never")) for _ in range(3)]
    first = asyncio.ensure_future(manager.stop(timeout=0.3))
    await wait_for(lambda: pool.state is PoolState.CLOSING)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    with anyio.fail_after(15):
        await manager.stop()
    assert pool.state is PoolState.CLOSED and not manager.running
    assert_gone(pids)
    for future in hung:
        with pytest.raises(PoolClosed):
            await future


# -- the process-wide manager -----------------------------------------------------------------------


@pytest.fixture
def slow_start(monkeypatch):
    """Make PoolManager.start yield to the loop a few times, so concurrent first calls really contend."""
    real_start = PoolManager.start
    calls = []

    async def start(self):
        calls.append(self)
        for _ in range(3):
            await asyncio.sleep(0)
        await real_start(self)

    monkeypatch.setattr(PoolManager, "start", start)
    return calls


async def test_get_pool_manager_is_shared_under_concurrent_first_calls_and_restarts_after_stop(slow_start):
    """Concurrent first calls get one started manager; after stop() the next call gets a fresh running one."""
    first = await asyncio.gather(*(get_pool_manager() for _ in range(10)))
    manager = first[0]
    try:
        assert all(m is manager for m in first) and manager.running
        assert slow_start.count(manager) == 1
        assert await procpool.get_pool_manager() is manager
    finally:
        await manager.stop()
    fresh = await get_pool_manager()
    try:
        assert fresh is not manager and fresh.running
    finally:
        await fresh.stop()


def test_get_pool_manager_survives_a_new_event_loop(slow_start):
    """The singleton's lock and manager work on a later event loop, even one whose predecessor never stopped it."""

    async def contend() -> PoolManager:
        managers = await asyncio.gather(*(get_pool_manager() for _ in range(5)))
        assert all(m is managers[0] for m in managers)
        return managers[0]

    abandoned = asyncio.run(contend())  # left running when its loop closes

    async def second_loop() -> PoolManager:
        manager = await contend()
        await manager.stop()
        return manager

    replacement = asyncio.run(second_loop())
    assert replacement is not abandoned and not replacement.running
    assert asyncio.run(second_loop()) is not replacement
