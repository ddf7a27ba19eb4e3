"""Selectors: how a PoolManager picks one pool among the routable ones for a task.

A selector is any callable that takes the candidates (frozen [`PoolSnapshot`][procpool.PoolSnapshot]s
of the RUNNING pools that are healthy or degraded, in registration order) and returns the id of
the pool to use, or None to decline them all. The manager calls it synchronously, so nothing can
change between the snapshot and the choice.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Protocol

import attrs

__all__ = ("HEALTH_RANK", "LeastLoaded", "PoolSnapshot", "RoundRobin", "Selector", "pick_random", "prefer_healthy")

# Health values a routable pool can have, best first (see WorkerPool.health).
HEALTH_RANK = {"healthy": 0, "degraded": 1}


@attrs.frozen
class PoolSnapshot:
    """What a selector knows about one routable pool, taken at the moment of routing.

    Attributes:
        pool_id: the pool's id in the manager.
        order: registration order (smaller is older); stable while the pool is registered.
        health: ``"healthy"`` or ``"degraded"`` (broken or closing pools are never offered).
        load: tasks waiting in the pool plus tasks held by its workers.
        recent_failures: failures in a row across the pool's workers (a success resets a
            worker's count), so a pool whose tasks keep failing ranks lower.
        workers_healthy: how many of its three workers are healthy.
        tags: the pool's tags (``WorkerPool(tags=...)``); routing with ``requires=`` offers only
            pools carrying all of them.
    """

    pool_id: str
    order: int
    health: str
    load: int
    recent_failures: int
    workers_healthy: int
    tags: frozenset[str] = frozenset()


class Selector(Protocol):
    """Chooses a pool for one task.

    Called with the routable pools (never empty, in registration order) and returns the chosen
    ``pool_id``, or None to decline them all (the caller then gets [`NoPoolAvailable`][]).
    It runs synchronously in the event loop between snapshot and submission, so it must be
    quick and must not block.
    """

    def __call__(self, candidates: Sequence[PoolSnapshot], /) -> str | None: ...


def prefer_healthy(candidates: Sequence[PoolSnapshot]) -> Sequence[PoolSnapshot]:
    """The healthy candidates if there are any, else all of them (degraded pools).

    Args:
        candidates: the snapshots a selector was offered.
    """
    healthy = [c for c in candidates if c.health == "healthy"]
    return healthy or candidates


class LeastLoaded:
    """Fewest tasks queued and held; ties go to the healthier pool, then to fewer recent
    failures, then to the pool chosen longest ago (so one-at-a-time work is spread too).

    Load comes first even against health: a degraded pool with idle workers runs a task sooner
    than a healthy one with a queue, and routing some work to it lets a worker whose tasks
    failed earn back its health.
    """

    def __init__(self) -> None:
        self._turn = itertools.count()
        # pool_id -> turn at which it was last chosen.
        self._last_chosen: dict[str, int] = {}

    def __call__(self, candidates: Sequence[PoolSnapshot], /) -> str:
        last = self._last_chosen
        best = min(
            candidates,
            key=lambda c: (c.load, HEALTH_RANK.get(c.health, 2), c.recent_failures, last.get(c.pool_id, -1), c.order),
        )
        last[best.pool_id] = next(self._turn)
        if len(last) > 2 * len(candidates) + 8:  # forget deleted pools
            live = {c.pool_id for c in candidates}
            self._last_chosen = {k: v for k, v in last.items() if k in live}
        return best.pool_id


class RoundRobin:
    """Each pool in registration order, one task at a time; healthy pools only while any exist.

    The rotation remembers the last pool it chose, not an index, so adding, deleting or
    skipping a pool never makes it hand one pool two turns in a row.
    """

    def __init__(self) -> None:
        self._last_order = -1

    def __call__(self, candidates: Sequence[PoolSnapshot], /) -> str:
        pools = prefer_healthy(candidates)
        chosen = next((c for c in pools if c.order > self._last_order), pools[0])
        self._last_order = chosen.order
        return chosen.pool_id


def pick_random(candidates: Sequence[PoolSnapshot], /) -> str:
    """A uniformly random pool, among the healthy ones while any exist."""
    return random.choice(list(prefer_healthy(candidates))).pool_id
