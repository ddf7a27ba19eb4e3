"""What a pool counts, and the frozen snapshots it reports: statistics and health.

The pool owns one mutable [`Counters`][procpool._stats.Counters]; readers get frozen
[`PoolStatistics`][procpool.PoolStatistics] and [`WorkerStatistics`][procpool.WorkerStatistics]
(trio's ``statistics()`` is the model), from which ``get_status()`` and ``health_check()``
build the seed API's dictionaries.
"""

from __future__ import annotations

import collections
import enum
import statistics as stats_lib
from typing import Any

import attrs

__all__ = (
    "LATENCY_WINDOW",
    "Counters",
    "Health",
    "PoolStatistics",
    "PriorityStatistics",
    "WorkerStatistics",
    "percentile",
    "status_dict",
)

# Recent task durations kept for latency percentiles.
LATENCY_WINDOW = 1000


class Health(enum.Enum):
    """How well a pool can take work, best first; a manager routes to the first two only."""

    # Running, and all three workers are healthy.
    HEALTHY = "healthy"
    # Running, but a worker is restarting, stuck, stopping or failing task after task.
    DEGRADED = "degraded"
    # Workers keep failing to start: no work can run until the pool is replaced.
    BROKEN = "broken"
    # Not started yet, starting, shutting down or shut down.
    NOT_RUNNING = "not_running"

    @property
    def routable(self) -> bool:
        """Whether a manager may send work to a pool in this health."""
        return self is Health.HEALTHY or self is Health.DEGRADED


@attrs.define
class Counters:
    """A pool's running totals; only the pool writes them."""

    tasks_submitted: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    tasks_cancelled: int = 0
    tasks_timed_out: int = 0
    tasks_crashed: int = 0
    workers_restarted: int = 0
    workers_recycled: int = 0
    workers_stuck: int = 0
    # Failed runs that were run again (retry=), and tasks quarantined as poison (issue 15).
    tasks_retried: int = 0
    tasks_quarantined: int = 0
    # Recent task durations in seconds, newest last.
    latencies: collections.deque[float] = attrs.Factory(lambda: collections.deque(maxlen=LATENCY_WINDOW))


@attrs.frozen
class WorkerStatistics:
    """One worker slot at one moment (the slot keeps its id across restarts)."""

    worker_id: str
    pid: int | None
    # A WorkerState value: starting, idle, busy, stuck, retiring, stopping or dead.
    state: str
    healthy: bool
    restarts: int
    tasks_in_flight: int
    tasks_processed: int
    tasks_succeeded: int
    tasks_failed: int
    consecutive_failures: int
    # Seconds spent running tasks, in total.
    processing_time: float
    # Wall-clock time (epoch seconds) of the last finished task, or None.
    last_activity: float | None

    @property
    def success_rate(self) -> float:
        finished = self.tasks_succeeded + self.tasks_failed
        return self.tasks_succeeded / finished if finished else 1.0

    @property
    def average_processing_time(self) -> float | None:
        finished = self.tasks_succeeded + self.tasks_failed
        return self.processing_time / finished if finished else None


@attrs.frozen
class PriorityStatistics:
    """One priority level of a pool's queue (issue 15)."""

    priority: int
    # Tasks of this priority waiting for a worker now.
    queued: int
    # How many recent waits the median is over (up to LATENCY_WINDOW).
    dispatched: int
    # Median seconds from submission until a worker was handed the task (None before any).
    wait_p50: float | None


@attrs.frozen
class PoolStatistics:
    """A pool at one moment: its lifecycle state, health, queue, totals and latency."""

    pool_id: str
    # A PoolState value.
    state: str
    health: Health
    # Why the pool is not healthy (None when it is).
    health_reason: str | None
    workers_healthy: int
    queue_size: int
    tasks_in_flight: int
    tasks_submitted: int
    tasks_completed: int
    tasks_failed: int
    tasks_cancelled: int
    tasks_timed_out: int
    tasks_crashed: int
    workers_restarted: int
    workers_recycled: int
    workers_stuck: int
    # The last LATENCY_WINDOW task durations in seconds, oldest first (percentiles below).
    recent_durations: tuple[float, ...]
    created_at: float
    started_at: float | None
    workers: tuple[WorkerStatistics, ...]
    # Failed runs run again under a retry policy; tasks quarantined as poison (issue 15).
    tasks_retried: int = 0
    tasks_quarantined: int = 0
    # One entry per priority seen, highest first; the recent PoisonTask errors, newest last.
    priorities: tuple[PriorityStatistics, ...] = ()
    poison_tasks: tuple[Any, ...] = ()

    @property
    def load(self) -> int:
        """Tasks waiting plus tasks held by workers."""
        return self.queue_size + self.tasks_in_flight

    @property
    def success_rate(self) -> float:
        finished = self.tasks_completed + self.tasks_failed
        return self.tasks_completed / finished if finished else 1.0

    @property
    def recent_failures(self) -> int:
        """Failures in a row across the workers (a success resets a worker's count)."""
        return sum(w.consecutive_failures for w in self.workers)

    # Percentiles of the recent task durations, in seconds (None before any task); computed when
    # read, so that taking a snapshot stays cheap enough for routing every task.
    @property
    def latency_p50(self) -> float | None:
        return percentile(sorted(self.recent_durations), 50)

    @property
    def latency_p95(self) -> float | None:
        return percentile(sorted(self.recent_durations), 95)

    @property
    def latency_p99(self) -> float | None:
        return percentile(sorted(self.recent_durations), 99)


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """The ``pct`` percentile of already sorted values (None for none)."""
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    return stats_lib.quantiles(sorted_values, n=100, method="inclusive")[int(pct) - 1]


def worker_dict(stats: WorkerStatistics, resources: dict[str, Any]) -> dict[str, Any]:
    """The seed API's JSON-ready worker status, built from a snapshot and psutil's figures."""
    return {
        "worker_id": stats.worker_id,
        "pid": stats.pid,
        "state": stats.state,
        "healthy": stats.healthy,
        "restarts": stats.restarts,
        "tasks_in_flight": stats.tasks_in_flight,
        "tasks_processed": stats.tasks_processed,
        "tasks_succeeded": stats.tasks_succeeded,
        "tasks_failed": stats.tasks_failed,
        "consecutive_failures": stats.consecutive_failures,
        "success_rate": stats.success_rate,
        "average_processing_time": stats.average_processing_time,
        "last_activity": stats.last_activity,
        **resources,
    }


def status_dict(stats: PoolStatistics, resources: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The seed API's JSON-ready pool status (``WorkerPool.get_status``), from a snapshot."""
    return {
        "pool_id": stats.pool_id,
        "state": stats.state,
        "health": stats.health.value,
        "health_reason": stats.health_reason,
        "workers_count": len(stats.workers),
        "queue_size": stats.queue_size,
        "tasks_in_flight": stats.tasks_in_flight,
        "tasks_submitted": stats.tasks_submitted,
        "tasks_completed": stats.tasks_completed,
        "tasks_failed": stats.tasks_failed,
        "tasks_cancelled": stats.tasks_cancelled,
        "tasks_timed_out": stats.tasks_timed_out,
        "tasks_crashed": stats.tasks_crashed,
        "tasks_retried": stats.tasks_retried,
        "tasks_quarantined": stats.tasks_quarantined,
        "workers_restarted": stats.workers_restarted,
        "workers_recycled": stats.workers_recycled,
        "workers_stuck": stats.workers_stuck,
        "success_rate": stats.success_rate,
        "workers_healthy": stats.workers_healthy,
        "latency_p50": stats.latency_p50,
        "latency_p95": stats.latency_p95,
        "latency_p99": stats.latency_p99,
        "priorities": [attrs.asdict(p) for p in stats.priorities],
        "poison_tasks": [
            {"task": e.description, "attempts": [a._asdict() for a in e.attempts]} for e in stats.poison_tasks
        ],
        "created_at": stats.created_at,
        "started_at": stats.started_at,
        **extra,
        "workers": [worker_dict(w, resources[i]) for i, w in enumerate(stats.workers)],
    }
