"""PoolManager routing across a local pool and a Dask pool: the selectors see both kinds alike.

Every Dask pool runs on 127.0.0.1 (its own LocalCluster, or one the test owns); every process
is stopped by pid and checked gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sched_tasks as st
import tasks
from helpers import assert_gone, dask_cluster, wait_until

from procpool import POOL_SIZE, NoPoolAvailable, PoolLike, PoolManager, PoolState, RetryPolicy, TaskGraph, WorkerPool

pytest.importorskip("distributed")
from procpool.dask import DaskPool

pytestmark = pytest.mark.anyio


def _pids(pool: PoolLike) -> set[int]:
    return {w.pid for w in pool.workers if w.pid is not None}


@contextlib.asynccontextmanager
async def manager_of_two() -> AsyncIterator[tuple[PoolManager, WorkerPool, DaskPool]]:
    """A manager with a local pool ``local`` and a Dask pool ``remote`` on its own LocalCluster; stopped
    after, and every worker either pool had is gone."""
    manager = PoolManager()
    seen: set[int] = set()
    pools: list[PoolLike] = []
    try:
        pools.append(await manager.create_pool("local"))
        pools.append(await manager.create_pool("remote", backend="dask"))
        local, remote = pools
        assert isinstance(local, WorkerPool) and isinstance(remote, DaskPool)
        seen = _pids(local) | _pids(remote)
        yield manager, local, remote
    finally:
        for pool in pools:
            seen |= _pids(pool)
        await manager.stop(timeout=5)
    assert_gone(sorted(seen))


async def test_round_robin_and_least_loaded_route_across_a_local_and_a_dask_pool(tmp_path: Path) -> None:
    """round_robin alternates a local and a Dask pool, and least_loaded sends work to whichever of them is idle."""
    async with manager_of_two() as (manager, local, remote):
        rotation = [await manager.route_apply(tasks.pid, selector="round_robin") for _ in range(4)]
        assert [pool_id for pool_id, _ in rotation] == ["local", "remote", "local", "remote"]
        # Each task really ran where the manager said: in a local worker, or in a Dask worker.
        for pool_id, pid in rotation:
            assert pid in _pids(manager.get_pool(pool_id))
        assert not _pids(local) & _pids(remote)

        # A burst is spread by load, which a Dask pool counts as a local one does.
        burst = [manager.submit(tasks.sleep_then, 0.2, i) for i in range(2 * POOL_SIZE)]
        assert sorted(pool_id for pool_id, _ in burst) == ["local"] * POOL_SIZE + ["remote"] * POOL_SIZE
        assert local.load == remote.load == POOL_SIZE
        assert await asyncio.gather(*(future for _, future in burst)) == list(range(2 * POOL_SIZE))

        for busy, idle in ((local, "remote"), (remote, "local")):
            release = tmp_path / f"release-{busy.pool_id}"
            marks = [tmp_path / f"{busy.pool_id}-{i}" for i in range(POOL_SIZE)]
            blockers = [busy.submit(tasks.mark_then_wait, str(m), str(release), 60) for m in marks]
            await wait_until(lambda marks=marks: all(m.exists() for m in marks), timeout=30)
            pool_id, pid = await manager.route_apply(tasks.pid, selector="least_loaded")
            assert pool_id == idle and pid in _pids(manager.get_pool(idle))
            release.touch()
            await asyncio.gather(*blockers)


async def test_a_dask_pool_that_lost_its_scheduler_is_routed_around() -> None:
    """A Dask pool whose scheduler is gone is broken: every selector routes to the local pool; alone, it is none."""
    async with dask_cluster() as cluster:
        manager = PoolManager()
        local_pids: set[int] = set()
        try:
            local = await manager.create_pool("local")
            remote = await manager.create_pool("remote", backend="dask", address=cluster.scheduler_address)
            local_pids = _pids(local)
            assert remote.address == cluster.scheduler_address and remote.health == "healthy"
            assert (await manager.route_apply(tasks.pid, selector="round_robin"))[0] == "local"
            assert (await manager.route_apply(tasks.pid, selector="round_robin"))[0] == "remote"

            await cluster.close()
            await wait_until(lambda: remote.health == "broken", timeout=30)
            assert remote.state is PoolState.BROKEN
            for selector in ("round_robin", "round_robin", "least_loaded", "random"):
                pool_id, pid = await manager.route_apply(tasks.pid, selector=selector)
                assert pool_id == "local" and pid in _pids(local)
            health = await manager.get_health_status()
            assert health["status"] == "degraded" and health["pools_healthy"] == 1

            await manager.delete_pool("local")
            with pytest.raises(NoPoolAvailable, match="remote is broken"):
                await manager.route_apply(tasks.pid)
        finally:
            await manager.stop(timeout=5)
        assert_gone(sorted(local_pids))


async def test_create_pool_checks_the_backend_before_starting_anything() -> None:
    """An unknown backend, or an address for a local pool, is a ValueError and registers nothing."""
    async with PoolManager() as manager:
        with pytest.raises(ValueError, match="unknown backend 'ray'"):
            await manager.create_pool("x", backend="ray")
        with pytest.raises(ValueError, match=r"address=.* is for backend='dask'"):
            await manager.create_pool("x", address="tcp://127.0.0.1:8786")
        assert await manager.list_pools() == []


@pytest.mark.timeout(180)
async def test_the_manager_routes_priority_and_retry_to_a_dask_pool(tmp_path: Path) -> None:
    """Every routing entry point passes priority= and retry= to a Dask pool, which orders and retries by them."""
    manager = PoolManager()
    seen: set[int] = set()
    try:
        pool = await manager.create_pool("remote", backend="dask", handler="procpool.handlers:echo")
        seen = _pids(pool)
        policy = RetryPolicy(attempts=3, backoff=0.05)
        log = str(tmp_path / "log")
        # The first run kills its Dask worker; the retry completes.
        assert await manager.route_apply(st.crash_until, (log, 2), priority=7, retry=policy) == ("remote", 2)
        assert len(st.lines(log)) == 2 and pool.statistics().tasks_retried == 1
        seen |= _pids(pool)
        pool_id, future = manager.submit(st.add, 2, 3, priority=-1, retry=policy)
        assert (pool_id, await future) == ("remote", 5)
        routed = await manager.route_task("hi", priority=3, retry=policy)
        assert routed[0] == "remote" and routed[1]["prompt"] == "hi"
        assert (await manager.execute_on_pool("remote", "ho", priority=3, retry=policy))["prompt"] == "ho"
        graph = TaskGraph()
        first = graph.add("a", st.add, (1, 2), priority=9, retry=policy)
        graph.add("b", st.add, (first, 4), priority=9)
        assert (await manager.run_graph(graph))["b"] == 7
        assert [p.priority for p in pool.statistics().priorities] == [9, 7, 3, -1]
    finally:
        for entry in await manager.list_pools():
            seen |= {w["pid"] for w in entry["workers"] if w["pid"] is not None}
        await manager.stop(timeout=5)
    assert_gone(sorted(seen))
