"""Run a procpool pool as a Mahavishnu pool, without importing Mahavishnu.

Mahavishnu (an orchestrator) drives every pool type through one interface, its ``BasePool``:
``start``/``stop``/``scale``, ``execute_task``/``execute_batch`` on task dicts, ``health_check``,
``get_metrics``, ``collect_memory`` and ``status``, plus the attributes ``pool_id``, ``config``
and ``_workers``. [`PoolContract`][] writes that interface down as a
``typing.Protocol``; [`ProcPoolAdapter`][] implements it on top of a [`WorkerPool`][].

Mahavishnu needs Python 3.13 and many dependencies, so procpool never imports it; the adapter is
duck-typed against the contract, and Mahavishnu's own ``PoolConfig`` works as its ``config``.
See docs/embedding.md for registering it.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import inspect
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from procpool._pool import POOL_SIZE, PoolState, WorkerPool
from procpool.errors import BrokenPool, PoolClosed, TaskTimeout

__all__ = (
    "POOL_TYPE",
    "PoolConfig",
    "PoolConfigLike",
    "PoolContract",
    "PoolMetrics",
    "PoolStatus",
    "ProcPoolAdapter",
)

log = logging.getLogger("procpool.integrations.mahavishnu")

POOL_TYPE = "procpool"
# Finished-task records kept for collect_memory(), which drains them. An orchestrator collects
# every minute or so; past this many the oldest are dropped rather than growing without bound.
MEMORY_LIMIT = 10_000
# WorkerPool options that may come from config.extra_config (every keyword but the id).
_POOL_OPTIONS = frozenset(inspect.signature(WorkerPool).parameters) - {"pool_id"}


class PoolStatus(enum.StrEnum):
    """Pool lifecycle status; the same strings as Mahavishnu's ``PoolStatus``, so they compare equal."""

    PENDING = "pending"
    INITIALIZING = "initializing"
    RUNNING = "running"
    SCALING = "scaling"
    DEGRADED = "degraded"
    STOPPED = "stopped"
    FAILED = "failed"


@runtime_checkable
class PoolConfigLike(Protocol):
    """What the contract needs of a pool configuration (Mahavishnu's ``PoolConfig`` fits).

    Read-only here, so frozen and mutable configurations both qualify.
    """

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


@attrs.frozen
class PoolConfig:
    """A pool configuration with Mahavishnu's field names, for use without Mahavishnu.

    ``extra_config`` may carry [`WorkerPool`][] options: ``handler`` (required unless passed
    to the adapter), ``task_timeout``, ``initializer``, ``start_method`` ...
    """

    name: str
    pool_type: str = POOL_TYPE
    min_workers: int = POOL_SIZE
    max_workers: int = POOL_SIZE
    worker_type: str = "process"
    auto_scale: bool = False
    memory_enabled: bool = True
    extra_config: dict[str, Any] = attrs.Factory(dict)

    def get(self, key: str, default: Any = None) -> Any:
        """A value from ``extra_config``."""
        return self.extra_config.get(key, default)


@attrs.frozen
class PoolMetrics:
    """Pool metrics with the field names of Mahavishnu's ``PoolMetrics``."""

    pool_id: str
    status: PoolStatus
    active_workers: int
    total_workers: int
    tasks_completed: int = 0
    tasks_failed: int = 0
    avg_task_duration: float = 0.0
    memory_usage_mb: float = 0.0


@runtime_checkable
class PoolContract(Protocol):
    """Mahavishnu's pool interface (its ``BasePool``), as a structural type.

    ``isinstance(obj, PoolContract)`` checks that every member exists; the contract tests also
    check that the methods are coroutine functions with these parameters.
    """

    pool_id: str
    config: PoolConfigLike
    # worker id -> worker handle; Mahavishnu counts workers with len(pool._workers).
    _workers: dict[str, Any]

    async def start(self) -> str:
        """Start the workers; return the pool id."""

    async def execute_task(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run ``task["prompt"]``; return ``pool_id, worker_id, status, output, error, duration``.

        Args:
            task: a dict: ``prompt`` (str, required), ``context`` (dict, optional), ``timeout``
                (seconds, optional).
        """

    async def execute_batch(self, tasks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Run tasks concurrently; return ``{task_id: execute_task-style result}``.

        Args:
            tasks: a list of task dicts as for ``execute_task``.
        """

    async def scale(self, target_worker_count: int) -> None:
        """Resize the pool, or raise ValueError/NotImplementedError.

        Args:
            target_worker_count: the number of workers wanted.
        """

    async def health_check(self) -> dict[str, Any]:
        """Return ``pool_id, pool_type, status`` (healthy/degraded/unhealthy), ``workers_active``."""

    async def get_metrics(self) -> Any:
        """Return metrics with PoolMetrics' fields."""

    async def collect_memory(self) -> list[dict[str, Any]]:
        """Return ``{"content", "metadata"}`` records of finished tasks."""

    async def status(self) -> str:
        """Return the lifecycle status (a PoolStatus value)."""

    async def stop(self) -> None:
        """Shut the pool down."""


# -- task dicts --------------------------------------------------------------------------------


def _parse_task(task: Any) -> tuple[str, dict[str, Any] | None, float | None]:
    """Check a task dict up front: ``prompt`` (str), optional ``context`` (dict), ``timeout``."""
    if not isinstance(task, Mapping):
        raise TypeError(f"a task must be a dict with a 'prompt', not {type(task).__name__}")
    prompt = task.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"a task needs a 'prompt' string, got {prompt!r}")
    context = task.get("context")
    if context is not None and not isinstance(context, dict):
        raise TypeError(f"task 'context' must be a dict or None, not {type(context).__name__}")
    timeout = task.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf
    ):
        raise ValueError(f"task 'timeout' must be a positive number of seconds or None, got {timeout!r}")
    return prompt, context, timeout


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=repr, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


# -- the adapter -------------------------------------------------------------------------------


class ProcPoolAdapter:
    """A procpool [`WorkerPool`][] (three worker processes) behind Mahavishnu's pool contract.

    Tasks are dicts: ``{"prompt": str, "context": dict (optional), "timeout": seconds (optional),
    "task_id": str (optional, for execute_batch)}``; the pool's handler runs
    ``handler(prompt, context)`` in a worker. A task's failure, crash or timeout comes back as a
    result with ``status`` ``"failed"`` or ``"timeout"`` and an ``error`` text; bad task dicts
    raise TypeError/ValueError, and a pool that is not running raises.

    Args:
        config: Mahavishnu's ``PoolConfig`` or `PoolConfig`; default: a procpool config.
            Its ``extra_config`` may hold [`WorkerPool`][] options (``handler`` ...).
            ``min_workers <= 3 <= max_workers`` must hold: a procpool pool has three workers.
        pool_id: the pool id; generated when omitted.
        terminal_manager: accepted and ignored, so that the class itself can be registered as a
            Mahavishnu pool factory (which passes it).
        session_buddy_client: accepted and ignored, for the same reason.
        **pool_options: [`WorkerPool`][] options; they override ``extra_config``.

    Raises:
        ValueError: no handler, or a worker range that excludes 3.
        TypeError: ``config`` lacks the contract's fields.
    """

    def __init__(
        self,
        config: PoolConfigLike | None = None,
        pool_id: str | None = None,
        *,
        terminal_manager: Any = None,
        session_buddy_client: Any = None,
        **pool_options: Any,
    ) -> None:
        if config is None:
            config = PoolConfig(name=pool_id or POOL_TYPE)
        if not isinstance(config, PoolConfigLike):
            raise TypeError(
                "config must have name, pool_type, min_workers, max_workers, worker_type and "
                f"extra_config, like Mahavishnu's PoolConfig; got {type(config).__name__}"
            )
        if not config.min_workers <= POOL_SIZE <= config.max_workers:
            raise ValueError(
                f"a procpool pool has exactly {POOL_SIZE} workers, outside this config's range "
                f"[{config.min_workers}, {config.max_workers}]"
            )
        options = {k: v for k, v in (config.extra_config or {}).items() if k in _POOL_OPTIONS}
        options.update(pool_options)
        if options.get("handler") is None:
            raise ValueError(
                "a ProcPoolAdapter needs a prompt handler: pass handler='package.module:function' "
                "or put it in config.extra_config['handler'] (e.g. 'procpool.handlers:command')"
            )
        self.config = config
        self._pool = WorkerPool(pool_id, **options)
        self.pool_id = self._pool.pool_id
        self._start_failed = False
        self._memory: collections.deque[dict[str, Any]] = collections.deque(maxlen=MEMORY_LIMIT)

    @property
    def pool(self) -> WorkerPool:
        """The underlying [`WorkerPool`][]."""
        return self._pool

    @property
    def _workers(self) -> dict[str, int | None]:
        # Part of the contract, read by Mahavishnu (len() counts workers): the ready workers,
        # worker id -> pid, recomputed so replaced workers show their new pids.
        return {w.worker_id: w.pid for w in self._pool.workers if w.state in ("idle", "busy")}

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> str:
        """Start the three workers and return the pool id.

        Raises:
            BrokenPool: the workers could not start (the pool is then shut down; status FAILED).
        """
        try:
            await self._pool.initialize()
        except BrokenPool:
            self._start_failed = True
            await asyncio.shield(self._pool.shutdown(timeout=0))  # reap what is left of it
            raise
        log.info("procpool pool %s started for %s", self.pool_id, self.config.name)
        return self.pool_id

    async def stop(self, timeout: float = 5.0) -> None:
        """Shut the pool down (see [`WorkerPool.shutdown`][]); no worker process is left.

        Args:
            timeout: seconds running tasks get to finish before the workers are killed (default 5).
        """
        await self._pool.shutdown(timeout)

    async def scale(self, target_worker_count: int) -> None:
        """Accept only the pool's fixed size.

        Args:
            target_worker_count: must be 3.

        Raises:
            ValueError: any target but 3; for more capacity, start another pool.
            TypeError: the target is not an int.
        """
        if isinstance(target_worker_count, bool) or not isinstance(target_worker_count, int):
            raise TypeError(f"target_worker_count must be an int, not {type(target_worker_count).__name__}")
        if target_worker_count != POOL_SIZE:
            raise ValueError(
                f"a procpool pool has exactly {POOL_SIZE} worker processes and cannot scale to "
                f"{target_worker_count}; start another pool for more capacity"
            )

    def _status(self) -> PoolStatus:
        state = self._pool.state
        if self._start_failed or state is PoolState.BROKEN:
            return PoolStatus.FAILED
        if state is PoolState.INITIAL:
            return PoolStatus.PENDING
        if state is PoolState.STARTING:
            return PoolStatus.INITIALIZING
        if state is PoolState.RUNNING:
            return PoolStatus.DEGRADED if self._pool.health == "degraded" else PoolStatus.RUNNING
        return PoolStatus.STOPPED

    async def status(self) -> PoolStatus:
        """The lifecycle status: pending, initializing, running, degraded, stopped or failed."""
        return self._status()

    # -- tasks ---------------------------------------------------------------------------------

    def _check_can_run(self) -> None:
        state = self._pool.state
        if state is PoolState.INITIAL:
            raise RuntimeError(f"pool {self.pool_id!r} is not started: await start() first")
        if state is PoolState.BROKEN or self._start_failed:
            raise BrokenPool(f"pool {self.pool_id!r} failed; see the error start() raised")
        if state in (PoolState.CLOSING, PoolState.CLOSED):
            raise PoolClosed(f"pool {self.pool_id!r} is stopped")

    async def _run(
        self, prompt: str, context: dict[str, Any] | None, timeout: float | None, task_id: str | None
    ) -> dict[str, Any]:
        started = time.monotonic()
        try:
            report = await self._pool.execute_detailed(prompt, context, timeout)
            output, failure, worker_id, duration = report.result, report.error, report.worker_id, report.duration
        except (PoolClosed, BrokenPool) as exc:  # the pool stopped or broke while the task waited
            output, failure, worker_id, duration = None, exc, None, time.monotonic() - started
        if failure is None:
            status, error, content = "completed", None, _as_text(output)
        else:
            status = "timeout" if isinstance(failure, TaskTimeout) else "failed"
            error = content = f"{type(failure).__name__}: {failure}"
        self._memory.append(
            {
                "content": content,
                "metadata": {
                    "type": "pool_worker_execution",
                    "pool_id": self.pool_id,
                    "pool_type": self.config.pool_type,
                    "worker_id": worker_id,
                    "status": status,
                    "timestamp": time.time(),
                    "duration_seconds": duration,
                    "task_id": task_id,
                    "prompt": prompt,
                    "error": error,
                },
            }
        )
        return {
            "pool_id": self.pool_id,
            "worker_id": worker_id,
            "status": status,
            "output": output,
            "error": error,
            "duration": duration,
        }

    async def execute_task(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run one task on whichever worker is free.

        Args:
            task: a dict: ``prompt`` (str, required), ``context`` (dict, optional), ``timeout``
                (seconds, optional).

        Returns:
            ``{"pool_id", "worker_id", "status", "output", "error", "duration"}``; ``status`` is
            ``"completed"``, ``"failed"`` or ``"timeout"``, ``duration`` the seconds it ran.

        Raises:
            TypeError: the task is not a dict, or its context is not a dict.
            ValueError: no ``prompt`` string, or a bad ``timeout``.
            RuntimeError: the adapter is not started.
            PoolClosed: the pool is stopped.
            BrokenPool: the pool failed to start.
        """
        prompt, context, timeout = _parse_task(task)
        self._check_can_run()
        return await self._run(prompt, context, timeout, task.get("task_id"))

    async def execute_batch(self, tasks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Run tasks concurrently over the three workers.

        Every task is checked before any runs. A task's id is its ``task_id`` (or ``id``) key,
        else its position in the list as a string.

        Args:
            tasks: task dicts as for [`execute_task`][]; a ``task_id`` (or ``id``) key names its
                result.

        Returns:
            ``{task_id: result}``, results as from [`execute_task`][], in input order.

        Raises:
            TypeError: ``tasks`` is not a list, or a task is malformed; nothing is run.
            ValueError: a task is malformed or a task id repeats; nothing is run.
        """
        if isinstance(tasks, (str, bytes, Mapping)) or not isinstance(tasks, Sequence):
            raise TypeError(f"tasks must be a list of task dicts, not {type(tasks).__name__}")
        parsed = {}
        for i, task in enumerate(tasks):
            call = _parse_task(task)
            task_id = str(task.get("task_id", task.get("id", i)))
            if task_id in parsed:
                raise ValueError(f"task id {task_id!r} appears twice in the batch")
            parsed[task_id] = call
        self._check_can_run()
        results = await asyncio.gather(*(self._run(*call, task_id) for task_id, call in parsed.items()))
        return dict(zip(parsed, results, strict=True))

    # -- health, metrics, memory ----------------------------------------------------------------

    async def health_check(self) -> dict[str, Any]:
        """Health without waiting on busy workers.

        Returns:
            ``{"pool_id", "pool_type", "status", "workers_active", "workers_total", "reason",
            "worker_health", "tasks_completed", "tasks_failed"}``; ``status`` is ``healthy``,
            ``degraded`` (a worker is being replaced or keeps failing) or ``unhealthy`` (not
            running, stopped or broken).
        """
        health = await self._pool.health_check()
        status = health["status"] if health["status"] in ("healthy", "degraded") else "unhealthy"
        return {
            "pool_id": self.pool_id,
            "pool_type": self.config.pool_type,
            "status": status,
            "workers_active": len(self._workers),
            "workers_total": POOL_SIZE,
            "reason": health["reason"],
            "worker_health": health["workers"],
            "tasks_completed": self._pool.tasks_completed,
            "tasks_failed": self._pool.tasks_failed,
        }

    async def get_metrics(self) -> PoolMetrics:
        """Counts, average task duration (seconds) and the workers' memory (RSS, MB)."""
        workers = self._pool.workers
        finished = sum(w.tasks_processed for w in workers)
        rss = [w.resources()["rss_mb"] for w in workers if w.state in ("idle", "busy")]
        return PoolMetrics(
            pool_id=self.pool_id,
            status=self._status(),
            active_workers=len(self._workers),
            total_workers=POOL_SIZE,
            tasks_completed=self._pool.tasks_completed,
            tasks_failed=self._pool.tasks_failed,
            avg_task_duration=sum(w.processing_time for w in workers) / finished if finished else 0.0,
            memory_usage_mb=float(sum(r for r in rss if r is not None)),
        )

    async def collect_memory(self) -> list[dict[str, Any]]:
        """The records of tasks finished since the last call, oldest first (and forget them).

        Each is ``{"content": output or error text, "metadata": {"type": "pool_worker_execution",
        "pool_id", "pool_type", "worker_id", "status", "timestamp", "duration_seconds",
        "task_id", "prompt", "error"}}``. At most MEMORY_LIMIT are kept between calls.
        """
        records = list(self._memory)
        self._memory.clear()
        return records

    def __repr__(self) -> str:
        return f"<ProcPoolAdapter {self.pool_id!r} {self._status().value} pool={self._pool!r}>"
