"""Mahavishnu's pool types, or look-alikes with the same fields when Mahavishnu is not installed.

When Mahavishnu is importable, ``PoolConfig``, ``PoolMetrics``, ``PoolStatus`` and the
``BasePool`` the adapter is built on are Mahavishnu's own; without it, nothing of Mahavishnu is
imported. [`PoolContract`][procpool.integrations.mahavishnu.PoolContract] writes the interface
down as a ``typing.Protocol``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

__all__ = ("MAHAVISHNU", "POOL_TYPE", "PoolConfig", "PoolConfigLike", "PoolContract", "PoolMetrics", "PoolStatus")

POOL_TYPE = "procpool"

if TYPE_CHECKING:
    _BasePool = object
    from mahavishnu.core.status import PoolStatus
    from mahavishnu.pools.base import PoolConfig, PoolMetrics

    MAHAVISHNU: bool
else:
    try:
        from mahavishnu.core.status import PoolStatus
        from mahavishnu.pools.base import BasePool as _BasePool
        from mahavishnu.pools.base import PoolConfig, PoolMetrics

        MAHAVISHNU = True
    except ImportError:
        MAHAVISHNU = False
        _BasePool = object

        class PoolStatus(enum.StrEnum):
            """Pool lifecycle status: Mahavishnu's ``PoolStatus`` values, so they compare equal."""

            PENDING = "pending"
            INITIALIZING = "initializing"
            RUNNING = "running"
            SCALING = "scaling"
            DEGRADED = "degraded"
            STOPPED = "stopped"
            FAILED = "failed"

        @attrs.define
        class PoolConfig:
            """Mahavishnu's ``PoolConfig`` fields, for use without Mahavishnu.

            ``extra_config`` may carry [`WorkerPool`][procpool.WorkerPool] options and
            ``task_handler`` or ``handler`` (see [`ProcPoolAdapter`][]).
            """

            name: str
            pool_type: str = POOL_TYPE
            min_workers: int = 1
            max_workers: int = 10
            worker_type: str = "process"
            auto_scale: bool = False
            memory_enabled: bool = True
            extra_config: dict[str, Any] = attrs.Factory(dict)

            def get(self, key: str, default: Any = None) -> Any:
                """A value from ``extra_config``."""
                return self.extra_config.get(key, default)

        @attrs.define
        class PoolMetrics:
            """Mahavishnu's ``PoolMetrics`` fields."""

            pool_id: str
            status: PoolStatus
            active_workers: int
            total_workers: int
            tasks_completed: int = 0
            tasks_failed: int = 0
            avg_task_duration: float = 0.0
            memory_usage_mb: float = 0.0


@runtime_checkable
class PoolConfigLike(Protocol):
    """What the adapter needs of a pool configuration (Mahavishnu's ``PoolConfig`` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def pool_type(self) -> str: ...
    @property
    def min_workers(self) -> int: ...
    @property
    def max_workers(self) -> int: ...
    @property
    def worker_type(self) -> str: ...
    @property
    def extra_config(self) -> dict[str, Any]: ...


@runtime_checkable
class PoolContract(Protocol):
    """Mahavishnu's pool interface (its ``BasePool``), as a structural type."""

    pool_id: str
    config: PoolConfigLike
    # worker id -> worker handle; Mahavishnu counts workers with len(pool._workers).
    _workers: dict[str, Any]

    async def start(self) -> str:
        """Start the workers; return the pool id."""

    async def execute_task(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run a task dict; return ``pool_id, worker_id, status, output, error, duration``.

        Args:
            task: the task, with any keys the pool's handler reads.
        """

    async def execute_batch(self, tasks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Run tasks concurrently; return ``{task_id: execute_task-style result}``.

        Args:
            tasks: task dicts as for ``execute_task``.
        """

    async def scale(self, target_worker_count: int) -> None:
        """Resize: ValueError outside [min_workers, max_workers], NotImplementedError if it cannot.

        Args:
            target_worker_count: the number of workers wanted.
        """

    async def health_check(self) -> dict[str, Any]:
        """Return ``pool_id, pool_type, status`` (healthy/degraded/unhealthy), ``workers_active``."""

    async def get_metrics(self) -> Any:
        """Return a ``PoolMetrics``."""

    async def collect_memory(self) -> list[dict[str, Any]]:
        """Return ``{"content", "metadata"}`` records of finished tasks (a read, not a drain)."""

    async def status(self) -> Any:
        """Return the lifecycle status (a ``PoolStatus``)."""

    async def stop(self) -> None:
        """Shut the pool down."""


# -- task dicts --------------------------------------------------------------------------------
