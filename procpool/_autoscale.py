"""Autoscaling by pools: a PoolManager adds and deletes whole pools of a template (issue 15).

Every pool keeps exactly three workers, so scaling means more pools or fewer. The autoscaler
samples the pools it created every ``interval`` seconds (resource use and queues produce no
event, as with the monitor) and decides::

    scale_up_when(metrics) held for scale_up_after s, below max_pools  -> create a pool of the template
    a pool had no task for scale_down_after s, above min_pools          -> delete it (never one with a task)
    after any change: nothing for cooldown s                             (with the two delays: hysteresis)

Deleting is safe by construction: the pool is taken out of routing in the same event-loop step
in which its load is read as zero, so no task can be routed to it between the check and the
removal, and a pool holding a task is never chosen. Every decision is logged on
``procpool.autoscale`` and counted in [`AutoscaleStatistics`][procpool.AutoscaleStatistics].
Only pools the autoscaler created are ever deleted by it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from procpool import _log
from procpool._stats import percentile
from procpool.errors import PoolNotFound

__all__ = ("AutoscaleMetrics", "AutoscalePolicy", "AutoscaleStatistics", "Autoscaler", "AutoscaleDecision")

log = _log.get("autoscale")

# Recent decisions kept for statistics().
DECISIONS_KEPT = 100


@attrs.frozen
class AutoscaleMetrics:
    """What the autoscaler measured over its pools at one sample; ``scale_up_when`` gets this."""

    # Autoscaled pools registered and running.
    pools: int
    # Tasks waiting in them, and tasks their workers hold.
    queued: int
    in_flight: int
    # Median wait (submission to a worker) over the pools' recent tasks, None before any.
    wait_p50: float | None
    # Pools holding no task now.
    idle_pools: int

    @property
    def queued_per_pool(self) -> float:
        return self.queued / self.pools if self.pools else float(self.queued)


def _positive(_: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{attribute.name} must be a non-negative number, got {value!r}")


@attrs.frozen
class AutoscalePolicy:
    """How a [`PoolManager`][procpool.PoolManager] adds and deletes pools of one template.

    Attributes:
        min_pools: pools kept at all times (created when the manager starts; default 1).
        max_pools: pools at most (default 4).
        template: the [`WorkerPool`][procpool.WorkerPool] options of the pools it creates
            (``handler``, ``tags``, ``task_timeout`` ...).
        scale_up_when: a number: add a pool when more tasks than this wait per pool (default 4);
            or a callable taking [`AutoscaleMetrics`][procpool.AutoscaleMetrics] and returning True
            to add one (``lambda m: (m.wait_p50 or 0) > 0.5``).
        scale_up_after: seconds the condition must hold before a pool is added (default 0.5).
        scale_down_after: seconds a pool must hold no task before it is deleted (default 30).
        cooldown: seconds after any change before the next one (default 1).
        interval: seconds between samples (default 0.1).
        prefix: the created pools' ids are ``prefix-1``, ``prefix-2`` ...
    """

    min_pools: int = 1
    max_pools: int = 4
    template: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    scale_up_when: float | Callable[[AutoscaleMetrics], bool] = 4.0
    scale_up_after: float = attrs.field(default=0.5, validator=_positive)
    scale_down_after: float = attrs.field(default=30.0, validator=_positive)
    cooldown: float = attrs.field(default=1.0, validator=_positive)
    interval: float = attrs.field(default=0.1, validator=_positive)
    prefix: str = "auto"

    def __attrs_post_init__(self) -> None:
        for name in ("min_pools", "max_pools"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_pools < max(1, self.min_pools):
            raise ValueError(f"max_pools ({self.max_pools}) must be at least 1 and at least min_pools")
        if not callable(self.scale_up_when):
            _positive(None, attrs.fields(AutoscalePolicy).scale_up_when, self.scale_up_when)
        if "pool_id" in self.template:
            raise ValueError("the template must not name a pool_id: each pool gets prefix-N")

    def wants_more(self, metrics: AutoscaleMetrics) -> bool:
        """Whether the metrics call for another pool."""
        if callable(self.scale_up_when):
            return bool(self.scale_up_when(metrics))
        return metrics.queued_per_pool > self.scale_up_when


@attrs.frozen
class AutoscaleDecision:
    """One thing the autoscaler did or declined to do, and why."""

    # Wall-clock time (epoch seconds).
    at: float
    # "up", "down", "at_max" (more wanted, max_pools reached) or "failed" (a pool did not start).
    action: str
    pool_id: str | None
    reason: str
    # Autoscaled pools after the decision.
    pools: int


@attrs.frozen
class AutoscaleStatistics:
    """The autoscaler's counters and its recent decisions (newest last)."""

    pools: tuple[str, ...]
    # Samples taken so far (one per interval).
    samples: int
    scale_ups: int
    scale_downs: int
    at_max: int
    failures: int
    decisions: tuple[AutoscaleDecision, ...]


class Autoscaler:
    """Adds and deletes one manager's pools of a template, by its [`AutoscalePolicy`][procpool.AutoscalePolicy]."""

    def __init__(self, manager: Any, policy: AutoscalePolicy) -> None:
        if not isinstance(policy, AutoscalePolicy):
            raise TypeError(f"autoscale must be a procpool.AutoscalePolicy, not {type(policy).__name__}")
        self.policy = policy
        self._manager = manager
        # Pools it created and has not deleted: pool_id -> last time it held a task (monotonic).
        self._busy_at: dict[str, float] = {}
        self._numbers = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        # When the scale-up condition started to hold (None: it does not), and the end of the cooldown.
        self._wanted_since: float | None = None
        self._quiet_until = 0.0
        self._counts: collections.Counter[str] = collections.Counter()
        self._decisions: collections.deque[AutoscaleDecision] = collections.deque(maxlen=DECISIONS_KEPT)

    async def start(self) -> None:
        """Create ``min_pools`` pools and start sampling."""
        for _ in range(self.policy.min_pools):
            await self._add("min_pools")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="procpool-autoscale")

    def stop(self) -> asyncio.Task[None]:
        """Stop sampling at once (the manager shuts the pools down); returns the task to wait for."""
        task = self._task
        if task is None:
            task = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        task.cancel()
        return task

    def statistics(self) -> AutoscaleStatistics:
        """The counters and the recent decisions."""
        c = self._counts
        return AutoscaleStatistics(
            tuple(self._busy_at), c["sample"], c["up"], c["down"], c["at_max"], c["failed"], tuple(self._decisions)
        )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed decision must not end autoscaling
                log.exception("autoscaling step failed")

    def _pools(self) -> dict[str, Any]:
        """The autoscaled pools still registered (one deleted by someone else is forgotten)."""
        pools = {}
        for pool_id in list(self._busy_at):
            try:
                pools[pool_id] = self._manager.get_pool(pool_id)
            except PoolNotFound:
                del self._busy_at[pool_id]
        return pools

    def measure(self, pools: Mapping[str, Any]) -> AutoscaleMetrics:
        """The metrics over ``pools`` now; also notes which pools hold tasks."""
        now = time.monotonic()
        queued = in_flight = idle = 0
        waits: list[float] = []
        for pool_id, pool in pools.items():
            stats = pool.statistics()
            queued += stats.queue_size
            in_flight += stats.tasks_in_flight
            if stats.load:
                self._busy_at[pool_id] = now
            else:
                idle += 1
            waits.extend(p.wait_p50 for p in stats.priorities if p.wait_p50 is not None)
        return AutoscaleMetrics(len(pools), queued, in_flight, percentile(sorted(waits), 50), idle)

    async def step(self) -> None:
        """Take one sample and make at most one decision."""
        policy = self.policy
        self._counts["sample"] += 1
        pools = self._pools()
        metrics = self.measure(pools)
        now = time.monotonic()
        wanted = policy.wants_more(metrics)
        if wanted and self._wanted_since is None:
            self._wanted_since = now
        elif not wanted:
            self._wanted_since = None
        if now < self._quiet_until:
            return
        if wanted and self._wanted_since is not None and now - self._wanted_since >= policy.scale_up_after:
            why = f"{metrics.queued} tasks waiting in {metrics.pools} pools (p50 wait {metrics.wait_p50})"
            if len(pools) >= policy.max_pools:
                self._decide("at_max", None, f"{why}; max_pools={policy.max_pools} reached", len(pools))
                self._wanted_since = None  # counted once per episode
            else:
                await self._add(why)
            self._quiet_until = time.monotonic() + policy.cooldown
            return
        if wanted or len(pools) <= policy.min_pools:
            return
        idle = [pool_id for pool_id, pool in pools.items() if not pool.load]
        idle = [p for p in idle if now - self._busy_at[p] >= policy.scale_down_after]
        if idle:
            pool_id = idle[-1]  # the newest idle pool goes first
            await self._remove(pool_id, pools[pool_id], f"no task for {now - self._busy_at[pool_id]:.1f} s")
            self._quiet_until = time.monotonic() + policy.cooldown

    async def _add(self, why: str) -> None:
        pool_id = f"{self.policy.prefix}-{next(self._numbers)}"
        try:
            await self._manager.create_pool(pool_id, **self.policy.template)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._decide("failed", pool_id, f"{why}; the pool did not start: {exc!r}", len(self._busy_at))
            return
        self._busy_at[pool_id] = time.monotonic()
        self._decide("up", pool_id, why, len(self._busy_at))

    async def _remove(self, pool_id: str, pool: Any, why: str) -> None:
        """Delete an idle pool: delete_pool takes it out of routing before its first await, so in
        the same loop step as the load check; its shutdown then has nothing to wait for."""
        assert not pool.load, "never delete a pool holding a task"
        del self._busy_at[pool_id]
        self._decide("down", pool_id, why, len(self._busy_at))
        await self._manager.delete_pool(pool_id)

    def _decide(self, action: str, pool_id: str | None, reason: str, pools: int) -> None:
        self._counts[action] += 1
        self._decisions.append(AutoscaleDecision(time.time(), action, pool_id, reason, pools))
        level = logging.WARNING if action == "failed" else logging.INFO
        log.log(level, "autoscale %s: pool %s (%s); %d autoscaled pools", action, pool_id, reason, pools)
