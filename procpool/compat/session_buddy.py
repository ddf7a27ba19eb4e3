"""session-buddy's pool API (``session_buddy.pools``, release 0.23.0) on procpool pools.

A drop-in for session-buddy's ``PoolManager`` and ``WorkerPool``: the same methods, arguments,
return shapes and errors, with real worker processes behind them. [`install`][] makes it the
manager that session-buddy's own pool MCP tools use.

What is the same as upstream:
    * ``PoolManager``: ``start``, ``stop``, ``create_pool(pool_id=None)`` (ValueError for a
      duplicate id), async ``get_pool`` returning None for an unknown id, ``delete_pool``
      returning a bool, ``list_pools``, ``execute_on_pool`` (ValueError for an unknown pool),
      ``route_task`` returning ``(pool_id, result)`` (ValueError for no pools and for an
      unknown selector), ``get_health_status`` with ``pool_manager_running``, ``pools_total``,
      ``pools_healthy`` and ``pool_details``; the attributes ``pools`` and ``running``.
    * ``WorkerPool``: ``initialize``, ``shutdown``, ``execute``, ``execute_batch`` (failures
      in place, ``[]`` for no prompts), ``health_check`` with ``worker_health``, ``get_status``
      with ``status``; ``pool_id``, ``running``, ``workers``, ``created_at``/``started_at`` as
      UTC datetimes, ``tasks_submitted``/``tasks_completed``/``tasks_failed``.
    * A result is a dict naming the worker: ``pool_id``, ``worker_id``, ``task_id``,
      ``prompt``, ``context``, ``response`` (what the handler returned), plus ``pid`` and
      ``duration``. Without a ``handler`` the pool runs ``procpool.handlers:echo``.

What differs, on purpose:
    * ``round_robin`` really rotates (upstream always picks the first pool), and
      ``least_loaded`` counts running tasks as well as queued ones.
    * A timeout kills the task's worker (and its process tree) and replaces it; upstream stops
      waiting while the task keeps running. The error is still a ``TimeoutError``.
    * Shutting down fails the queued callers with ``procpool.PoolClosed``; upstream leaves them
      waiting forever.
    * Health has ``broken`` (workers cannot start) besides ``healthy``, ``degraded`` and
      ``not_running``, and a ``reason``; worker dicts carry procpool's fields (pid, state,
      restarts, RSS ...) besides upstream's.
    * ``route_task`` refuses to guess between pools running different handlers: pass
      ``handler=`` (upstream pools all run the same placeholder).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Sequence
from typing import Any

from procpool import POOL_SIZE, PoolLike, PoolState
from procpool import PoolManager as _CorePoolManager
from procpool import WorkerPool as _CoreWorkerPool
from procpool.errors import PoolClosed, PoolNotFound

__all__ = ("DEFAULT_HANDLER", "WORKERS_PER_POOL", "PoolManager", "WorkerPool", "get_pool_manager", "install")

log = logging.getLogger("procpool.compat.session_buddy")

# session-buddy's constant: every pool has exactly three workers.
WORKERS_PER_POOL = POOL_SIZE
# What a pool runs when created without a handler, as session-buddy's API has none: a diagnostic
# that returns the prompt, the context and the worker's pid from a real worker process.
DEFAULT_HANDLER = "procpool.handlers:echo"


def _utc(epoch: float | None) -> datetime.datetime | None:
    return None if epoch is None else datetime.datetime.fromtimestamp(epoch, datetime.UTC)


def _iso(epoch: float | None) -> str | None:
    moment = _utc(epoch)
    return None if moment is None else moment.isoformat()


class WorkerPool:
    """session-buddy's ``WorkerPool`` on a procpool [`WorkerPool`][procpool.WorkerPool].

    Args:
        pool_id: the pool's id; ``pool_<8 hex digits>``-style when omitted (procpool's default).
        pool: the procpool pool to wrap (created by [`PoolManager.create_pool`][]); when omitted
            one is made with ``handler`` and ``pool_options``.
        handler: the prompt handler, ``"package.module:function"`` taking ``(prompt, context)``
            (default: ``procpool.handlers:echo``).
        **pool_options: other [`WorkerPool`][procpool.WorkerPool] options (``task_timeout`` ...).
    """

    def __init__(
        self,
        pool_id: str | None = None,
        *,
        pool: PoolLike | None = None,
        handler: Any = None,
        **pool_options: Any,
    ) -> None:
        if pool is None:
            pool = _CoreWorkerPool(pool_id, handler=handler or DEFAULT_HANDLER, **pool_options)
        self.pool = pool
        self.pool_id = pool.pool_id

    # -- upstream attributes ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the pool is started and not shut down (or broken)."""
        return self.pool.running

    @property
    def workers(self) -> list[Any]:
        """The three worker slots while the pool runs (upstream empties the list at shutdown)."""
        return list(self.pool.workers) if self.pool.state in (PoolState.STARTING, PoolState.RUNNING) else []

    @property
    def created_at(self) -> datetime.datetime:
        """When the pool was created (UTC)."""
        return _utc(self.pool.get_status()["created_at"])  # type: ignore[return-value]

    @property
    def started_at(self) -> datetime.datetime | None:
        """When its workers were all ready (UTC), or None."""
        return _utc(self.pool.get_status()["started_at"])

    @property
    def tasks_submitted(self) -> int:
        """Tasks submitted so far."""
        return int(self.pool.get_status()["tasks_submitted"])

    @property
    def tasks_completed(self) -> int:
        """Tasks that returned a result."""
        return int(self.pool.get_status()["tasks_completed"])

    @property
    def tasks_failed(self) -> int:
        """Tasks that raised, crashed or timed out."""
        return int(self.pool.get_status()["tasks_failed"])

    # -- lifecycle -------------------------------------------------------------------------------

    async def initialize(self) -> None:
        """Start the three workers (idempotent)."""
        await self.pool.initialize()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the workers; running tasks get ``timeout`` seconds, queued ones fail with PoolClosed.

        Args:
            timeout: seconds running tasks get before their workers are killed (default 5).
        """
        await self.pool.shutdown(timeout)

    # -- work ------------------------------------------------------------------------------------

    async def execute(self, prompt: str, context: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Run the handler on ``(prompt, context)`` in a worker.

        Args:
            prompt: the task prompt.
            context: a dict handed to the handler with it.
            timeout: seconds the task may run; past it the worker is killed and replaced.

        Returns:
            ``{"pool_id", "worker_id", "task_id", "pid", "prompt", "context", "response",
            "duration"}``; ``response`` is what the handler returned.

        Raises:
            RuntimeError: the pool is not running (``procpool.PoolClosed`` once shut down).
            TimeoutError: the task ran past ``timeout`` (``procpool.TaskTimeout``).
            Exception: the handler's own exception, or ``procpool.WorkerCrashed``.
        """
        if self.pool.state is PoolState.INITIAL:
            raise RuntimeError(f"Pool {self.pool_id} is not running")
        report = await self.pool.execute_detailed(prompt, context, timeout)
        if report.error is not None:
            raise report.error
        return {
            "pool_id": report.pool_id,
            "worker_id": report.worker_id,
            "task_id": f"{self.pool_id}-task-{report.task_id}",
            "pid": report.pid,
            "prompt": prompt,
            "context": context or {},
            "response": report.result,
            "duration": report.duration,
        }

    async def execute_batch(
        self, prompts: Sequence[str], context: dict[str, Any] | None = None, timeout: float | None = None
    ) -> list[Any]:
        """Run every prompt concurrently; a failure stays in its place as the exception.

        Args:
            prompts: the prompts (an empty list gives ``[]``).
            context: a dict handed to the handler with every prompt.
            timeout: seconds each prompt may run.

        Returns:
            Results as from [`execute`][], or exceptions, in input order.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, not {type(prompts).__name__}")
        if self.pool.state is PoolState.INITIAL:
            raise RuntimeError(f"Pool {self.pool_id} is not running")
        return list(await asyncio.gather(*(self.execute(p, context, timeout) for p in prompts), return_exceptions=True))

    # -- status ----------------------------------------------------------------------------------

    def _worker_status(self, status: dict[str, Any]) -> dict[str, Any]:
        """A procpool worker status dict with upstream's keys added."""
        finished = status["tasks_succeeded"] + status["tasks_failed"]
        average = status["average_processing_time"] or 0.0
        return {
            **status,
            "pool_id": self.pool_id,
            "running": status["state"] in ("idle", "busy"),
            "avg_processing_time": average,
            "total_processing_time": average * finished,
            "last_activity": _iso(status["last_activity"]),
        }

    async def health_check(self) -> dict[str, Any]:
        """Health without waiting on busy workers.

        Returns:
            ``{"pool_id", "status", "reason", "workers_healthy", "workers_total",
            "worker_health"}``; ``status`` is healthy, degraded, broken or not_running.
        """
        health = await self.pool.health_check()
        if health["status"] == "not_running":
            return {"pool_id": self.pool_id, "status": "not_running", "reason": health["reason"], "workers": []}
        return {
            "pool_id": self.pool_id,
            "status": health["status"],
            "reason": health["reason"],
            "workers_healthy": health["workers_healthy"],
            "workers_total": health["workers_total"],
            "worker_health": [self._worker_status(w) for w in health["workers"]],
        }

    def get_status(self) -> dict[str, Any]:
        """Upstream's status keys (with ``status``, its health) plus procpool's statistics."""
        status = self.pool.get_status()
        live = self.pool.state in (PoolState.STARTING, PoolState.RUNNING)
        status.update(
            status=status["health"],
            workers_count=POOL_SIZE if live else 0,
            created_at=_iso(status["created_at"]),
            started_at=_iso(status["started_at"]),
            workers=[self._worker_status(w) for w in status["workers"]] if live else [],
        )
        return status

    def __repr__(self) -> str:
        return (
            f"WorkerPool(id={self.pool_id}, running={self.running}, workers={len(self.workers)}, "
            f"queue_size={self.pool.get_status()['queue_size']})"
        )


class PoolManager:
    """session-buddy's ``PoolManager`` on procpool's [`PoolManager`][procpool.PoolManager].

    Unlike procpool's, it restarts after [`stop`][], as upstream's does.
    """

    def __init__(self) -> None:
        self._core = _CorePoolManager()
        # pool id -> the wrapper handed out, in creation order (upstream's ``pools`` dict).
        self.pools: dict[str, WorkerPool] = {}
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        """True between [`start`][] and [`stop`][]."""
        return self._core.running

    @property
    def core(self) -> _CorePoolManager:
        """The procpool [`PoolManager`][procpool.PoolManager] doing the work."""
        return self._core

    async def start(self) -> None:
        """Start the manager (again, after a stop)."""
        if not self._core.running:
            try:
                await self._core.start()
            except PoolClosed:  # stopped before: upstream restarts, so start a fresh core
                self._core = _CorePoolManager()
                await self._core.start()

    async def stop(self, timeout: float = 5.0) -> None:
        """Shut every pool down concurrently; no worker process is left.

        Args:
            timeout: seconds each pool's running tasks get (default 5).
        """
        async with self._lock:
            self.pools.clear()
            await self._core.stop(timeout)

    async def create_pool(self, pool_id: str | None = None, **pool_options: Any) -> WorkerPool:
        """Create a pool, start its three workers and register it.

        Args:
            pool_id: the pool's id (generated when omitted).
            **pool_options: procpool [`WorkerPool`][procpool.WorkerPool] options; ``handler``
                defaults to ``procpool.handlers:echo``.

        Raises:
            ValueError: a pool with this id exists.
            procpool.BrokenPool: the workers could not start.
        """
        async with self._lock:
            if pool_id and pool_id in self.pools:
                raise ValueError(f"Pool {pool_id} already exists")
            pool_options.setdefault("handler", DEFAULT_HANDLER)
            if pool_options["handler"] is None:
                pool_options["handler"] = DEFAULT_HANDLER
            await self.start()
            core_pool = await self._core.create_pool(pool_id, **pool_options)
            pool = self.pools[core_pool.pool_id] = WorkerPool(pool=core_pool)
            log.info("created pool %s", pool.pool_id)
            return pool

    async def get_pool(self, pool_id: str) -> WorkerPool | None:
        """The pool with this id, or None."""
        return self.pools.get(pool_id)

    async def delete_pool(self, pool_id: str, timeout: float = 5.0) -> bool:
        """Shut a pool down and forget it.

        Args:
            pool_id: the pool's id.
            timeout: seconds its running tasks get (default 5).

        Returns:
            True if it was deleted, False if there was no such pool.
        """
        async with self._lock:
            if self.pools.pop(pool_id, None) is None:
                return False
            try:
                await self._core.delete_pool(pool_id, timeout)
            except PoolNotFound:  # the manager was stopped meanwhile, which shut it down
                pass
            return True

    async def list_pools(self) -> list[dict[str, Any]]:
        """Every pool's [`WorkerPool.get_status`][], oldest first."""
        return [pool.get_status() for pool in self.pools.values()]

    async def execute_on_pool(
        self, pool_id: str, prompt: str, context: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run a prompt on the named pool (see [`WorkerPool.execute`][]).

        Raises:
            ValueError: no such pool.
        """
        pool = await self.get_pool(pool_id)
        if pool is None:
            raise ValueError(f"Pool {pool_id} not found")
        return await pool.execute(prompt=prompt, context=context, timeout=timeout)

    async def route_task(
        self,
        prompt: str,
        context: dict[str, Any] | None = None,
        selector: str = "least_loaded",
        timeout: float | None = None,
        *,
        handler: str | None = None,
    ) -> tuple[str, Any]:
        """Run a prompt on the pool the selector picks.

        Args:
            prompt: the task prompt.
            context: a dict handed to the handler with it.
            selector: ``least_loaded`` (default), ``round_robin`` or ``random``.
            timeout: seconds the task may run.
            handler: route only to pools running this handler; needed when pools run several.

        Returns:
            ``(pool_id, result)``.

        Raises:
            ValueError: no pools (``procpool.NoPoolAvailable``), an unknown selector, or pools
                of several handlers without ``handler``.
        """
        if not self.pools:
            raise ValueError("No pools available for routing")
        if not isinstance(selector, str) or selector not in ("least_loaded", "round_robin", "random"):
            raise ValueError(f"Unknown selector strategy: {selector}")
        chosen = self._core.choose_pool(selector, needs_handler=True, handler=handler)
        pool = self.pools[chosen.pool_id]
        return pool.pool_id, await pool.execute(prompt=prompt, context=context, timeout=timeout)

    async def get_health_status(self) -> dict[str, Any]:
        """Health of the manager and every pool.

        Returns:
            ``{"pool_manager_running", "status", "pools_total", "pools_healthy",
            "pools_degraded", "pool_details"}``.
        """
        health = await self._core.get_health_status()
        details = [await pool.health_check() for pool in self.pools.values()]
        return {
            "pool_manager_running": self.running,
            "status": health["status"],
            "pools_total": len(details),
            "pools_healthy": sum(d["status"] == "healthy" for d in details),
            "pools_degraded": sum(d["status"] == "degraded" for d in details),
            "pool_details": details,
        }

    def __repr__(self) -> str:
        return f"PoolManager(running={self.running}, pools={len(self.pools)})"


_manager: PoolManager | None = None


async def get_pool_manager() -> PoolManager:
    """The process-wide manager (started), as upstream's ``get_pool_manager``."""
    global _manager
    if _manager is None:
        _manager = PoolManager()
    await _manager.start()
    return _manager


def install(manager: PoolManager | None = None) -> PoolManager:
    """Make ``manager`` the one session-buddy's ``get_pool_manager()`` returns.

    session-buddy's pool MCP tools (``create_pool``, ``execute_on_pool`` ...) call
    ``session_buddy.pools.get_pool_manager()``, which returns its module's manager once set;
    this sets it, so those tools run on procpool. Call it before the first tool call.

    Args:
        manager: the manager to use (default: this module's process-wide one).

    Raises:
        ImportError: session-buddy is not installed.
    """
    global _manager
    import session_buddy.pools

    if manager is None:
        manager = _manager = _manager or PoolManager()
    session_buddy.pools._global_pool_manager = manager  # type: ignore[assignment]
    return manager
