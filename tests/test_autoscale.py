"""Autoscaling by pools: up under a burst, down after idle, never losing or repeating a task."""

from __future__ import annotations

import asyncio
import collections
import fcntl

import pytest
import sched_tasks as st
from helpers import assert_gone, pids_of, wait_until

from procpool import AutoscalePolicy, PoolManager

pytestmark = pytest.mark.anyio


async def test_pools_are_added_under_a_burst_and_deleted_after_idle_without_losing_a_task(tmp_path):
    """A burst adds pools up to max_pools, idleness deletes them down to min_pools; every task runs exactly once."""
    log = str(tmp_path / "log")
    policy = AutoscalePolicy(
        min_pools=1,
        max_pools=3,
        template={"tags": {"cpu"}},
        scale_up_when=6,
        scale_up_after=0.1,
        scale_down_after=0.5,
        cooldown=0.1,
        interval=0.05,
    )
    pids: set[int] = set()
    async with PoolManager(autoscale=policy) as manager:
        scaler = manager.autoscaler
        assert scaler is not None and [p["pool_id"] for p in await manager.list_pools()] == ["auto-1"]
        futures: list[asyncio.Future[str]] = []
        routed: collections.Counter[str] = collections.Counter()

        def note_pids() -> None:
            for status in manager._pools.values():
                pids.update(pids_of(status.pool))

        # Tasks arrive faster than one pool runs them (three workers, 20 ms each), until the
        # third pool exists and has taken some.
        n = 0
        while len(routed) < 3 or routed[max(routed)] < 10:
            for _ in range(4):
                pool_id, future = manager.submit(st.record, log, str(n), 0.02, requires={"cpu"})
                routed[pool_id] += 1
                futures.append(future)
                n += 1
            note_pids()
            await asyncio.wait(futures[-4:], timeout=0.01)  # pace the arrivals
            assert n < 20_000, "the manager never scaled up"
        await asyncio.wait_for(asyncio.gather(*futures), 120)
        assert set(routed) == {"auto-1", "auto-2", "auto-3"}
        # Idle now: back down to min_pools.
        await wait_until(lambda: len(manager._pools) == 1, timeout=60)
        stats = scaler.statistics()
        assert stats.scale_ups == 3 and stats.scale_downs == 2 and stats.pools == ("auto-1",)
        assert [d.action for d in stats.decisions].count("down") == 2
        note_pids()
    ran = collections.Counter(line.split()[1] for line in st.lines(log))
    assert ran == collections.Counter(str(i) for i in range(n))  # no task lost, none run twice
    assert_gone(sorted(pids))


async def test_a_pool_holding_a_task_is_never_deleted(tmp_path):
    """An autoscaled pool whose worker still runs a task stays, however long it has been idle otherwise."""
    # A callable condition: a pool whenever there is none; deleted after 0.5 s without a task.
    policy = AutoscalePolicy(
        min_pools=0,
        max_pools=1,
        scale_up_when=lambda m: m.pools == 0,
        scale_up_after=0,
        scale_down_after=0.5,
        cooldown=0,
        interval=0.05,
    )
    async with PoolManager(autoscale=policy) as manager:
        assert manager.autoscaler is not None
        await wait_until(lambda: manager.autoscaler.statistics().scale_ups == 1)
        scaler = manager.autoscaler
        pool = manager.get_pool("auto-1")
        pids = pids_of(pool)
        path = tmp_path / "lock"
        with open(path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            running = pool.submit(st.gate, str(path))
            # Forty samples, four scale_down_after periods, pass while the task holds the pool.
            samples = scaler.statistics().samples
            await wait_until(lambda: scaler.statistics().samples >= samples + 40)
            assert manager.get_pool("auto-1") is pool and scaler.statistics().scale_downs == 0
            fcntl.flock(lock, fcntl.LOCK_UN)
        await running
        await wait_until(lambda: not manager._pools, timeout=30)
        assert scaler.statistics().scale_downs == 1
    assert_gone(pids)


def test_autoscale_policy_refuses_nonsense():
    """Bad bounds, thresholds or a template that names a pool id are refused when the policy is made."""
    with pytest.raises(ValueError):
        AutoscalePolicy(min_pools=3, max_pools=2)
    with pytest.raises(ValueError):
        AutoscalePolicy(scale_down_after=-1)
    with pytest.raises(ValueError):
        AutoscalePolicy(template={"pool_id": "x"})
