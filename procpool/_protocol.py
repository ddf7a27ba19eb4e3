"""What every kind of pool offers: the interface the manager, the MCP tools and adapters rely on.

[`WorkerPool`][procpool.WorkerPool] (three local processes) and
[`DaskPool`][procpool.dask.DaskPool] (three workers of a Dask cluster) both implement
`PoolLike`; code written against it takes either. The protocol is
written from WorkerPool's public surface and holds nothing a remote pool could not provide
(no pipes, no psutil figures, no process objects). Every submission entry point takes
``priority=`` (higher first, FIFO within a priority) and ``retry=`` (a
[`RetryPolicy`][procpool.RetryPolicy], or None for the pool's default), as issue 15 asks, so a
manager may pass them to any pool and a type checker refuses a pool kind that lacks them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import asyncio

    from procpool import PoolState, PoolStatistics, TaskReport
    from procpool._retry import RetryPolicy

__all__ = ("PoolLike", "WorkerLike")


@runtime_checkable
class WorkerLike(Protocol):
    """One of a pool's three worker slots, as a manager or a status page reads it."""

    # Stable for the pool's life, whatever process fills the slot now.
    worker_id: str
    # The process filling the slot now (on its own host for a remote pool), None while it restarts.
    pid: int | None
    # How many tasks in a row this slot failed; three make it unhealthy.
    consecutive_failures: int

    def is_healthy(self) -> bool:
        """Alive, ready, and fewer than three failures in a row."""
        ...

    def get_status(self) -> dict[str, Any]:
        """A JSON-ready snapshot of the slot."""
        ...


@runtime_checkable
class PoolLike(Protocol):
    """A pool of exactly three workers, driven from asyncio; see [`WorkerPool`][procpool.WorkerPool].

    Every method must be called from the thread running the event loop the pool was started on.
    Failures arrive as the same errors whatever the backend: [`WorkerCrashed`][procpool.errors.WorkerCrashed],
    [`TaskTimeout`][procpool.errors.TaskTimeout], [`SerializationError`][procpool.errors.SerializationError],
    [`BrokenPool`][procpool.errors.BrokenPool], [`PoolClosed`][procpool.errors.PoolClosed], or the task's own
    exception with a [`RemoteTraceback`][procpool.errors.RemoteTraceback] as its ``__cause__``.
    """

    pool_id: str

    @property
    def workers(self) -> Sequence[WorkerLike]:
        """The three worker slots."""
        ...

    @property
    def state(self) -> PoolState:
        """Where the pool is in its lifecycle."""
        ...

    @property
    def running(self) -> bool:
        """Whether the pool is RUNNING."""
        ...

    @property
    def handler(self) -> str | None:
        """The prompt handler's ``"package.module:function"`` path, or None."""
        ...

    @property
    def load(self) -> int:
        """Tasks waiting plus tasks held by workers."""
        ...

    @property
    def health(self) -> str:
        """``healthy``, ``degraded``, ``broken`` or ``not_running``."""
        ...

    @property
    def workers_healthy(self) -> int:
        """How many of the three workers are healthy now."""
        ...

    @property
    def recent_failures(self) -> int:
        """Failures in a row, summed over the three workers (what selectors weigh)."""
        ...

    def statistics(self) -> PoolStatistics:
        """The pool's figures now, as a frozen snapshot."""
        ...

    async def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until the pool is RUNNING with three healthy workers (starting it if needed)."""
        ...

    async def initialize(self) -> None:
        """Start the three workers; return when all are ready."""
        ...

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Refuse new work, let running tasks finish until ``timeout``, then stop the workers."""
        ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, priority: int = 0, retry: RetryPolicy | None = None, **kwargs: Any
    ) -> asyncio.Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a worker; return a future of its result."""
        ...

    async def apply(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any] = (),
        kwds: dict[str, Any] | None = None,
        timeout: float | None = None,
        *,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> Any:
        """Run ``fn(*args, **kwds)`` in a worker and return its result."""
        ...

    def map(
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        timeout: float | None = None,
        progress: Any = None,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> AsyncIterator[Any]:
        """Yield ``fn(item)`` for every item, in input order."""
        ...

    async def execute(
        self,
        prompt: str,
        context: dict[str, Any] | None = None,
        timeout: float | None = None,
        *,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> Any:
        """Run the pool's handler on ``(prompt, context)``; return what it returns."""
        ...

    async def execute_detailed(
        self,
        prompt: str,
        context: dict[str, Any] | None = None,
        timeout: float | None = None,
        *,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> TaskReport:
        """Like ``execute``, but report the outcome instead of raising the task's error."""
        ...

    async def execute_batch(
        self,
        prompts: Sequence[str],
        context: dict[str, Any] | None = None,
        timeout: float | None = None,
        *,
        progress: Any = None,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> list[Any]:
        """Run the handler on every prompt concurrently; results (or exceptions) in input order."""
        ...

    async def health_check(self) -> dict[str, Any]:
        """Pool health: ``status``, ``reason``, ``workers_healthy``, ``workers``."""
        ...

    def get_status(self) -> dict[str, Any]:
        """A JSON-ready snapshot of the pool's state and statistics."""
        ...
