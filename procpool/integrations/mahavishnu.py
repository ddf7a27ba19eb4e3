"""Run a procpool pool as a Mahavishnu pool.

Mahavishnu (an orchestrator, Python >= 3.13) drives every pool type through its ``BasePool``:
``start``/``stop``/``scale``, ``execute_task``/``execute_batch`` on task dicts, ``health_check``,
``get_metrics``, ``collect_memory`` and ``status``, plus ``pool_id``, ``config``, ``_status`` and
``_workers``. [`ProcPoolAdapter`][] implements it on a [`WorkerPool`][procpool.WorkerPool].

When Mahavishnu is importable, the adapter *is* a ``mahavishnu.pools.base.BasePool`` (the class
is built on it when this module is imported) and ``PoolConfig``, ``PoolMetrics`` and
``PoolStatus`` here are Mahavishnu's own. Without it they are look-alikes with the same fields
and values, and nothing of Mahavishnu is imported. [`PoolContract`][] writes the interface down
as a ``typing.Protocol``.

[`spawn_procpool`][] registers a procpool pool with Mahavishnu's real ``PoolManager`` exactly as
its ``spawn_pool`` registers its own types, and ``ProcPoolManager`` (built on first use, only
with Mahavishnu) is its ``PoolManager`` that also accepts ``spawn_pool("procpool", config)``, so
its ``pool_spawn`` MCP tool can create procpool pools. See docs/embedding.md.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import inspect
import itertools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from procpool import POOL_SIZE, PoolState, WorkerPool
from procpool.errors import BrokenPool, PoolClosed, TaskTimeout
from procpool.integrations._mahavishnu_types import (
    MAHAVISHNU,
    POOL_TYPE,
    PoolConfig,
    PoolConfigLike,
    PoolContract,
    PoolMetrics,
    PoolStatus,
    _BasePool,
)
from procpool.integrations.tasks import DEFAULT_TASK_HANDLER, RUN_TASK, check_handler

__all__ = (
    "MAHAVISHNU",
    "POOL_TYPE",
    "PoolConfig",
    "PoolConfigLike",
    "PoolContract",
    "PoolMetrics",
    "PoolStatus",
    "ProcPoolAdapter",
    "register_pool",
    "spawn_procpool",
)

log = logging.getLogger("procpool.integrations.mahavishnu")

# Finished-task records kept for collect_memory(). Mahavishnu reads them repeatedly (its
# aggregate_results, MemoryAggregator and memory stats each call it), so reading does not drain
# them; past this many the oldest are dropped rather than growing without bound.
MEMORY_LIMIT = 10_000
# WorkerPool options that may come from config.extra_config: every keyword but the id and the
# handler, which the adapter chooses (its task runner, or the prompt handler given as `handler`).
_POOL_OPTIONS = frozenset(inspect.signature(WorkerPool).parameters) - {"pool_id", "handler"}


def _check_timeout(task: Mapping[str, Any]) -> float | None:
    timeout = task.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf
    ):
        raise ValueError(f"task 'timeout' must be a positive number of seconds or None, got {timeout!r}")
    return timeout


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=repr, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


# -- the adapter -------------------------------------------------------------------------------


class ProcPoolAdapter(_BasePool):
    """A procpool [`WorkerPool`][procpool.WorkerPool] (three worker processes) as a Mahavishnu pool.

    A task is a dict with any keys. The pool's *task handler* receives the whole dict and a
    [`TaskContext`][procpool.integrations.tasks.TaskContext] naming the pool, worker and task id
    (``handler(task, context)``, see `procpool.integrations.tasks`); the default,
    ``procpool.integrations.tasks:echo_task``, runs nothing and returns the task. Alternatively
    a procpool *prompt handler* ``handler(prompt, context)`` runs ``task["prompt"]`` with
    ``task["context"]``. The adapter reads two keys itself: ``timeout`` (seconds) and
    ``task_id``. A task's failure, crash or timeout comes back as a result with ``status``
    ``"failed"`` or ``"timeout"`` and an ``error`` text; a malformed task raises
    TypeError/ValueError, and a pool that is not running raises.

    Args:
        config: Mahavishnu's ``PoolConfig`` (default: one named after the pool, of type
            ``procpool``). ``min_workers <= 3 <= max_workers`` must hold. Its ``extra_config``
            may hold ``task_handler``, ``handler`` and [`WorkerPool`][procpool.WorkerPool]
            options (``task_timeout``, ``initializer``, ``start_method`` ...); other keys are
            ignored. ``memory_enabled=False`` keeps no memory records.
        pool_id: the pool id (default ``f"{config.pool_type}_{id(pool)}"``, as Mahavishnu's).
        terminal_manager: accepted and ignored, as Mahavishnu's pool factories receive it.
        session_buddy_client: accepted and ignored, for the same reason.
        **pool_options: ``task_handler``, ``handler`` or WorkerPool options; they override
            ``extra_config``.

    Raises:
        ValueError: a worker range that excludes 3, both handler kinds, or a handler that cannot
            be imported.
        TypeError: ``config`` lacks ``PoolConfig``'s fields.
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
            config = PoolConfig(name=pool_id or POOL_TYPE, pool_type=POOL_TYPE)
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
        options = dict(config.extra_config or {})
        options.update(pool_options)
        task_handler, prompt_handler = options.pop("task_handler", None), options.pop("handler", None)
        if task_handler is not None and prompt_handler is not None:
            raise ValueError("give a task_handler (task, context) or a prompt handler (prompt, context), not both")
        if prompt_handler is None:
            self.task_handler: str | None = check_handler(task_handler or DEFAULT_TASK_HANDLER)
        else:
            self.task_handler = None
        if _BasePool is object:
            self.config = config
            self.pool_id = pool_id or f"{config.pool_type}_{id(self)}"
        else:
            super().__init__(config, pool_id)  # type: ignore[call-arg]
        self._pool = WorkerPool(
            self.pool_id,
            handler=prompt_handler if prompt_handler is not None else RUN_TASK,
            **{k: v for k, v in options.items() if k in _POOL_OPTIONS},
        )
        self._start_failed = False
        self._task_numbers = itertools.count(1)
        self._memory: collections.deque[dict[str, Any]] = collections.deque(maxlen=MEMORY_LIMIT)

    @property
    def pool(self) -> WorkerPool:
        """The underlying [`WorkerPool`][procpool.WorkerPool]."""
        return self._pool

    # BasePool keeps `_workers` and `_status` as attributes, assigned in its __init__; here they
    # are derived from the WorkerPool, so the assignments are ignored.

    @property
    def _workers(self) -> dict[str, int | None]:
        # worker id -> pid (None while the slot restarts). Mahavishnu counts workers with
        # len(pool._workers) and routes least-loaded to the fewest, so a slot being replaced
        # still counts: three while the pool runs (issue 11, item 10); health shows the restart.
        if self._pool.state not in (PoolState.STARTING, PoolState.RUNNING):
            return {}
        return {w.worker_id: w.pid for w in self._pool.workers}

    @_workers.setter
    def _workers(self, value: Any) -> None:
        pass

    @property
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

    @_status.setter
    def _status(self, value: Any) -> None:
        pass

    def _ready_workers(self, workers: list[dict[str, Any]]) -> int:
        if self._pool.state is not PoolState.RUNNING:
            return 0
        return sum(w["state"] in ("idle", "busy") for w in workers)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> str:
        """Start the three workers and return the pool id.

        Raises:
            BrokenPool: the workers could not start (the pool is then shut down; status FAILED).
            PoolClosed: the pool was stopped.
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
        """Shut the pool down (see [`WorkerPool.shutdown`][procpool.WorkerPool.shutdown]); no worker is left.

        Args:
            timeout: seconds running tasks get to finish before the workers are killed (default 5).
        """
        await self._pool.shutdown(timeout)

    async def scale(self, target_worker_count: int) -> None:
        """Keep the pool's three workers; refuse any other count as the contract says.

        Args:
            target_worker_count: the number of workers wanted.

        Raises:
            ValueError: the target is outside the config's ``[min_workers, max_workers]``.
            NotImplementedError: the target is inside it but not 3: a procpool pool cannot
                scale (start another pool for more capacity).
            TypeError: the target is not an int.
        """
        if isinstance(target_worker_count, bool) or not isinstance(target_worker_count, int):
            raise TypeError(f"target_worker_count must be an int, not {type(target_worker_count).__name__}")
        low, high = self.config.min_workers, self.config.max_workers
        if not low <= target_worker_count <= high:
            raise ValueError(f"target_worker_count {target_worker_count} is outside [{low}, {high}]")
        if target_worker_count != POOL_SIZE:
            raise NotImplementedError(
                f"a procpool pool has exactly {POOL_SIZE} worker processes and cannot scale to "
                f"{target_worker_count}; start another pool for more capacity"
            )

    async def status(self) -> PoolStatus:
        """The lifecycle status: pending, initializing, running, degraded, stopped or failed."""
        return self._status

    # -- tasks ---------------------------------------------------------------------------------

    def _parse(self, task: Any, task_id: str | None = None) -> tuple[str, dict[str, Any] | None, float | None, str]:
        """Check a task up front; return the prompt, context and timeout for the WorkerPool, and its id."""
        if not isinstance(task, Mapping):
            raise TypeError(f"a task must be a dict, not {type(task).__name__}")
        timeout = _check_timeout(task)
        if task_id is None:
            task_id = (
                str(task["task_id"])
                if task.get("task_id") is not None
                else f"{self.pool_id}-task-{next(self._task_numbers)}"
            )
        if self.task_handler is not None:
            prompt = task.get("prompt")
            call = {"handler": self.task_handler, "task": dict(task), "pool_id": self.pool_id, "task_id": task_id}
            return prompt if isinstance(prompt, str) else "", call, timeout, task_id
        prompt = task.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(
                f"this pool runs the prompt handler {self._pool.get_status()['handler']}: "
                f"a task needs a 'prompt' string, got {prompt!r}"
            )
        context = task.get("context")
        if context is not None and not isinstance(context, dict):
            raise TypeError(f"task 'context' must be a dict or None, not {type(context).__name__}")
        return prompt, context, timeout, task_id

    def _check_can_run(self) -> None:
        state = self._pool.state
        if state is PoolState.INITIAL:
            raise RuntimeError(f"pool {self.pool_id!r} is not started: await start() first")
        if state is PoolState.BROKEN or self._start_failed:
            raise BrokenPool(f"pool {self.pool_id!r} failed; see the error start() raised")
        if state in (PoolState.CLOSING, PoolState.CLOSED):
            raise PoolClosed(f"pool {self.pool_id!r} is stopped")

    async def _run(
        self, task: Mapping[str, Any], prompt: str, context: dict[str, Any] | None, timeout: float | None, task_id: str
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
        if getattr(self.config, "memory_enabled", True):
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
                        "prompt": task.get("prompt"),
                        "error": error,
                    },
                }
            )
        return {
            "pool_id": self.pool_id,
            "worker_id": worker_id,
            "task_id": task_id,
            "status": status,
            "output": output,
            "error": error,
            "duration": duration,
        }

    async def execute_task(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run one task on whichever worker is free.

        Args:
            task: a dict with any keys the handler reads; ``timeout`` (seconds) and ``task_id``
                are read by the adapter too. With a prompt handler, ``prompt`` (str) is needed
                and ``context`` (dict) is passed with it.

        Returns:
            ``{"pool_id", "worker_id", "task_id", "status", "output", "error", "duration"}``;
            ``status`` is ``"completed"``, ``"failed"`` or ``"timeout"``, ``duration`` the
            seconds it ran.

        Raises:
            TypeError: the task is not a dict (or a prompt task's context is not a dict).
            ValueError: a bad ``timeout``, or a prompt task without a ``prompt`` string.
            procpool.SerializationError: a task value cannot be pickled; nothing ran.
            RuntimeError: the adapter is not started.
            PoolClosed: the pool is stopped.
            BrokenPool: the pool failed to start.
        """
        prompt, context, timeout, task_id = self._parse(task)
        self._check_can_run()
        return await self._run(task, prompt, context, timeout, task_id)

    async def execute_batch(self, tasks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Run tasks concurrently over the three workers.

        Every task is checked before any runs. A task's id is its ``task_id`` (or ``id``) key,
        else its position in the list as a string.

        Args:
            tasks: task dicts as for [`execute_task`][].

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
            if not isinstance(task, Mapping):
                raise TypeError(f"a task must be a dict, not {type(task).__name__}")
            task_id = str(task.get("task_id", task.get("id", i)))
            if task_id in parsed:
                raise ValueError(f"task id {task_id!r} appears twice in the batch")
            parsed[task_id] = (task, *self._parse(task, task_id))
        self._check_can_run()
        results = await asyncio.gather(*(self._run(*call) for call in parsed.values()))
        return dict(zip(parsed, results, strict=True))

    # -- health, metrics, memory ----------------------------------------------------------------

    async def health_check(self) -> dict[str, Any]:
        """Health without waiting on busy workers.

        Returns:
            ``{"pool_id", "pool_type", "status", "workers_active", "workers_total", "reason",
            "worker_health", "tasks_completed", "tasks_failed"}``; ``status`` is ``healthy``,
            ``degraded`` (a worker is being replaced or keeps failing; ``reason`` says which)
            or ``unhealthy`` (not running, stopped or broken); ``workers_active`` counts the
            workers ready now.
        """
        health = await self._pool.health_check()
        stats = self._pool.get_status()
        return {
            "pool_id": self.pool_id,
            "pool_type": self.config.pool_type,
            "status": health["status"] if health["status"] in ("healthy", "degraded") else "unhealthy",
            "workers_active": self._ready_workers(health["workers"]),
            "workers_total": POOL_SIZE,
            "reason": health["reason"],
            "worker_health": health["workers"],
            "tasks_completed": stats["tasks_completed"],
            "tasks_failed": stats["tasks_failed"],
        }

    async def get_metrics(self) -> PoolMetrics:
        """Counts, average task duration (seconds) and the workers' memory (RSS, MB)."""
        stats = self._pool.get_status()
        workers = stats["workers"]
        finished = sum(w["tasks_succeeded"] + w["tasks_failed"] for w in workers)
        busy_time = sum(
            (w["average_processing_time"] or 0.0) * (w["tasks_succeeded"] + w["tasks_failed"]) for w in workers
        )
        rss = [w.get("rss_mb") for w in workers if w["state"] in ("idle", "busy")]
        return PoolMetrics(
            pool_id=self.pool_id,
            status=self._status,
            active_workers=self._ready_workers(workers),
            total_workers=POOL_SIZE,
            tasks_completed=stats["tasks_completed"],
            tasks_failed=stats["tasks_failed"],
            avg_task_duration=busy_time / finished if finished else 0.0,
            memory_usage_mb=float(sum(r for r in rss if r is not None)),
        )

    async def collect_memory(self) -> list[dict[str, Any]]:
        """The records of finished tasks, oldest first; reading them leaves them in place.

        Each is ``{"content": output or error text, "metadata": {"type": "pool_worker_execution",
        "pool_id", "pool_type", "worker_id", "status", "timestamp", "duration_seconds",
        "task_id", "prompt", "error"}}``. The newest MEMORY_LIMIT are kept; none when the
        config's ``memory_enabled`` is false.
        """
        return [{"content": r["content"], "metadata": dict(r["metadata"])} for r in self._memory]

    def __repr__(self) -> str:
        return f"<ProcPoolAdapter {self.pool_id!r} {self._status.value} pool={self._pool!r}>"


# -- registering with Mahavishnu's PoolManager ---------------------------------------------------


async def register_pool(manager: Any, pool: ProcPoolAdapter) -> str:
    """Start ``pool`` and register it with Mahavishnu's ``PoolManager`` as its ``spawn_pool`` does.

    It starts the pool, then fills the manager's ``_pools``, ``_pool_worker_counts`` and the heap
    its least-loaded routing reads, persists the pool state when the manager has a state store,
    publishes ``pool_created`` on its message bus and refreshes its worker metrics. From then on
    the manager routes to, monitors, aggregates memory from and closes the pool like its own.

    Args:
        manager: a ``mahavishnu.pools.manager.PoolManager``.
        pool: the adapter to start and register.

    Returns:
        The pool id.

    Raises:
        ValueError: the manager already has a pool with this id (nothing is started).
        BrokenPool: the pool could not start (nothing is registered).
    """
    if pool.pool_id in manager._pools:
        raise ValueError(f"the manager already has a pool {pool.pool_id!r}")
    pool_id = await pool.start()
    manager._pools[pool_id] = pool
    count = len(pool._workers)
    async with manager._heap_lock:
        manager._pool_worker_counts[pool_id] = count
        heapq.heappush(manager._worker_count_heap, (count, pool_id))
    persist = getattr(manager, "_persist_pool_state", None)
    if persist is not None:
        await persist(pool_id, pool, "running")
    config = pool.config
    await manager.message_bus.publish(
        {
            "type": "pool_created",
            "source_pool_id": pool_id,
            "payload": {
                "pool_id": pool_id,
                "pool_type": config.pool_type,
                "config": {"name": config.name, "min_workers": config.min_workers, "max_workers": config.max_workers},
            },
        }
    )
    refresh = getattr(manager, "_refresh_pool_worker_metrics", None)
    if refresh is not None:
        refresh()
    log.info("procpool pool %s registered with %r", pool_id, manager)
    return pool_id


async def spawn_procpool(manager: Any, config: PoolConfigLike | None = None, **pool_options: Any) -> str:
    """Create a [`ProcPoolAdapter`][] and [`register_pool`][] it: ``spawn_pool`` for procpool.

    Args:
        manager: a ``mahavishnu.pools.manager.PoolManager``.
        config: its ``PoolConfig`` (default: a ``procpool`` config).
        **pool_options: passed to [`ProcPoolAdapter`][] (``task_handler``, ``handler`` ...).

    Returns:
        The pool id.
    """
    return await register_pool(manager, ProcPoolAdapter(config, **pool_options))


def _make_manager_class() -> type:
    from mahavishnu.pools.manager import PoolManager as MahavishnuPoolManager

    class ProcPoolManager(MahavishnuPoolManager):  # type: ignore[misc, valid-type]
        """Mahavishnu's ``PoolManager`` that also spawns ``procpool`` pools.

        ``spawn_pool("procpool", config)`` starts a [`ProcPoolAdapter`][] (with the default task
        handler unless ``config.extra_config`` names one) and registers it; other pool types go
        to Mahavishnu's own ``spawn_pool``. So Mahavishnu's ``pool_spawn`` MCP tool, given this
        manager, creates procpool pools too.
        """

        async def spawn_pool(self, pool_type: str, config: Any) -> str:
            if pool_type != POOL_TYPE:
                return await super().spawn_pool(pool_type, config)
            return await spawn_procpool(self, config)

    ProcPoolManager.__module__ = __name__
    ProcPoolManager.__qualname__ = "ProcPoolManager"
    return ProcPoolManager


_manager_class: type | None = None


def __getattr__(name: str) -> Any:
    # ProcPoolManager is built on first use: importing Mahavishnu's PoolManager pulls in much
    # more of Mahavishnu than BasePool does.
    global _manager_class
    if name == "ProcPoolManager":
        if not MAHAVISHNU:
            raise ImportError("ProcPoolManager needs Mahavishnu (pip install mahavishnu)")
        if _manager_class is None:
            _manager_class = _make_manager_class()
        return _manager_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
