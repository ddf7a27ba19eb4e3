"""WorkerPool: three worker processes behind one asyncio coordinator; the public face of a pool.

The work is split the way pebble splits its pool, into parts that do not write each other's fields:

    WorkerPool   this module: options, the calls (submit, apply, execute, map...), statistics
    Supervisor   _supervisor.py: the lifecycle and the three slots, refilled when a process dies
    Dispatcher   _dispatch.py: tasks from submission to resolution (queue, timeouts, cancellation)
    Worker       _worker.py: one slot's process and pipes, reporting through three callbacks
    Monitor      _monitor.py: psutil looks at the processes, and the verdicts drawn from them

Data flow (each slot has its own one-way pipes; nothing blocks the event loop)::

    submit/apply/execute/map -> Dispatcher.pending -> dispatch --call pipe i--> worker i
    future resolved <- Dispatcher.finished <- on_result <- result pipe i <-------- worker i
    worker i exits (sentinel) -> on_exit -> fail the task it ran, requeue the rest, respawn slot i

Invariant: every task is in exactly one place: the pending queue, one worker's ``in_flight``
(whose head is the task that worker runs), or done (its future resolved once).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from procpool import _child, _graph
from procpool._config import DEFAULT_MAX_PENDING, DEFAULT_START_TIMEOUT, DEFAULT_STUCK_AFTER, PoolConfig, check_seconds
from procpool._map import MapIterator
from procpool._messages import pickle_call
from procpool._progress import ProgressArg, make_progress
from procpool._retry import RetryPolicy
from procpool._stats import Counters, PoolStatistics, PriorityStatistics, percentile, status_dict
from procpool._supervisor import POOL_SIZE, PoolState, Supervisor
from procpool._task import Task, TaskReport
from procpool.errors import BrokenPool, PoolClosed

__all__ = ("POOL_SIZE", "PoolState", "WorkerPool")


class WorkerPool:
    """A pool of exactly three worker processes, driven from asyncio.

    Args:
        pool_id: a name for logs, status and managers; generated when omitted.
        handler: what ``execute`` runs: ``"package.module:function"`` or a module-level function
            taking ``(prompt, context)``; checked now, imported by each worker.
        task_timeout: default run-time limit in seconds for every task (None: no limit).
        initializer: called with ``initargs`` in each worker before it takes work.
        initargs: the initializer's positional arguments (default: none). They reach the workers
            as multiprocessing passes process arguments, so a ``multiprocessing.Queue`` works.
        start_method: ``"forkserver"`` (default where available) or ``"spawn"``. ``"fork"`` is
            refused: forking a parent that runs threads and an event loop is unsafe.
        max_pending: how many tasks may wait for a worker (backpressure; default 100,000).
        stuck_after: seconds a worker may hold one task with no CPU progress (its own or its
            child processes') and no [`procpool.heartbeat`][] before it is judged stuck
            (default 300, at least 0.1; None: never).
        replace_stuck: kill and replace a stuck worker, failing its task with
            [`WorkerStuck`][procpool.WorkerStuck] (default); if False it is only reported unhealthy.
        max_tasks_per_worker: replace a worker after it has run this many tasks.
        max_memory_mb: replace a worker whose RSS passes this: after a task, gracefully; while
            a task runs, at once, failing the task with [`MemoryLimitExceeded`][procpool.MemoryLimitExceeded].
            Leave room for the up to 128 MiB of freed memory a worker keeps (glibc only).
        start_timeout: seconds a new worker may take to become ready (import the handler, run
            the initializer) before its start counts as failed (default 60; None: no limit).
            Three failed starts in a row make the pool BROKEN.
        retry: the default [`RetryPolicy`][procpool.RetryPolicy] of every call (default None:
            a failed task is never run again); a call's own ``retry=`` replaces it.
        tags: labels a [`PoolManager`][procpool.PoolManager] routes on (``requires={"llm"}``).

    Attributes:
        pool_id: the pool's name.
        config: the validated options ([`PoolConfig`][procpool.PoolConfig]).
        workers: the three [`Worker`][procpool.Worker] slots (each keeps its identity across restarts).

    All methods must be called from the thread running the pool's event loop; a call from
    anywhere else raises RuntimeError before anything is sent.
    """

    def __init__(
        self,
        pool_id: str | None = None,
        handler: str | Callable[..., Any] | None = None,
        *,
        task_timeout: float | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Sequence[Any] = (),
        start_method: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        stuck_after: float | None = DEFAULT_STUCK_AFTER,
        replace_stuck: bool = True,
        max_tasks_per_worker: int | None = None,
        max_memory_mb: float | None = None,
        start_timeout: float | None = DEFAULT_START_TIMEOUT,
        retry: RetryPolicy | None = None,
        tags: Iterable[str] = (),
    ) -> None:
        if pool_id is not None and (not isinstance(pool_id, str) or not pool_id):
            raise TypeError(f"pool_id must be a non-empty string or None, got {pool_id!r}")
        options: dict[str, Any] = {"start_method": start_method} if start_method is not None else {}
        self.config = PoolConfig(
            handler=handler,
            task_timeout=task_timeout,
            initializer=initializer,
            initargs=initargs,
            max_pending=max_pending,
            stuck_after=stuck_after,
            replace_stuck=replace_stuck,
            max_tasks_per_worker=max_tasks_per_worker,
            max_memory_mb=max_memory_mb,
            start_timeout=start_timeout,
            **options,
        )
        self.retry = _check_retry(retry)
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise TypeError(f"tags must be an iterable of strings, such as {{'llm'}}, not {tags!r}")
        self.tags = frozenset(tags)
        self.pool_id = pool_id or f"pool-{os.getpid()}-{next(_pool_numbers)}"
        self._counters = Counters()
        self._supervisor = Supervisor(self.pool_id, self.config, self._counters)
        self.workers = self._supervisor.workers
        self._tasks = self._supervisor.tasks
        self._monitor = self._supervisor.monitor
        self.created_at = time.time()

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def state(self) -> PoolState:
        """Where the pool is in its lifecycle (see [`PoolState`][procpool.PoolState])."""
        return self._supervisor.state

    @property
    def running(self) -> bool:
        """Whether the pool is RUNNING: started, not broken, not shut down."""
        return self._supervisor.state is PoolState.RUNNING

    async def initialize(self) -> None:
        """Start the three workers; return when all are ready. Idempotent.

        Raises:
            BrokenPool: the workers could not be started (the message says why).
            PoolClosed: the pool was shut down.
            RuntimeError: the pool was started on another event loop.
        """
        await self._supervisor.start()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Refuse new work, let running tasks finish until ``timeout``, then stop the workers.

        Tasks that never started fail with [`PoolClosed`][procpool.PoolClosed]; tasks still
        running at the deadline are killed (SIGTERM, then SIGKILL) and fail with PoolClosed too.
        No worker process is left behind. Calling it again is harmless. A pool whose event loop
        has ended (started under an earlier ``asyncio.run()``) can still be shut down from a new
        loop: its workers are killed at once.

        Args:
            timeout: seconds to let running tasks finish (``math.inf``: wait as long as they run).

        Raises:
            ValueError: ``timeout`` is negative or not a number.
            RuntimeError: called outside the pool's event loop while that loop still runs.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
        await self._supervisor.close(timeout)

    async def __aenter__(self) -> WorkerPool:
        await self.initialize()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -- submitting work ---------------------------------------------------------------------------

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, priority: int = 0, retry: RetryPolicy | None = None, **kwargs: Any
    ) -> asyncio.Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a worker; return a future of its result.

        ``fn`` may be an ``async def`` function: the worker runs it on its own event loop.
        ``priority`` and ``retry`` belong to the pool; to pass arguments of those names to ``fn``,
        use [`apply`][procpool.WorkerPool.apply] with ``kwds``.

        Args:
            fn: a module-level function (plain or ``async def``), so workers can import it.
            *args: its positional arguments.
            priority: higher runs first; FIFO within a priority (default 0).
            retry: when a failed run is run again (default: the pool's ``retry``).
            **kwargs: its keyword arguments.

        Raises:
            TypeError: ``fn`` is not callable.
            SerializationError: ``fn`` or an argument cannot be pickled (nothing is queued).
            PoolFull: ``max_pending`` tasks are already waiting.
            PoolClosed: the pool is shut down.
            RuntimeError: called outside the pool's event loop, or before it was started.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        priority, retry = self._call_options(priority, retry)
        payload = pickle_call(fn, args, kwargs)
        self._supervisor.check_open()
        self._tasks.check_room()
        return self._tasks.submit(payload, self.config.task_timeout, priority, retry).future

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
        """Run ``fn(*args, **kwds)`` in a worker and return its result; wait for room if needed.

        Args:
            fn: a module-level function (plain or ``async def``), so workers can import it.
            args: its positional arguments.
            kwds: its keyword arguments.
            timeout: run-time limit in seconds (default: the pool's ``task_timeout``). When it
                expires the worker is killed and replaced and [`TaskTimeout`][procpool.TaskTimeout] is raised.
            priority: higher runs first; FIFO within a priority (default 0). A task never waits
                behind more lower-priority tasks than those already written to workers.
            retry: when a failed run is run again (default: the pool's ``retry``; see
                [`RetryPolicy`][procpool.RetryPolicy]).

        Raises:
            Exception: the task's own exception, with the remote traceback as ``__cause__``
                (StopIteration arrives as RuntimeError, SystemExit and other non-Exception
                errors as [`TaskExited`][procpool.TaskExited]).
            TaskTimeout: the task ran past its timeout; its worker was replaced.
            WorkerCrashed: the worker died while running it (or was stuck, or over its memory limit).
            PoisonTask: with ``retry``, the task killed its worker on every attempt (quarantined).
            SerializationError: the call, its result or its exception could not cross.
            PoolClosed: the pool is shut down.
            BrokenPool: the pool's workers cannot start.
            TypeError: an argument has the wrong type (ValueError: a bad value).
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"args must be a tuple or list, not {type(args).__name__}")
        if kwds is not None and not isinstance(kwds, dict):
            raise TypeError(f"kwds must be a dict or None, not {type(kwds).__name__}")
        timeout = self._timeout_or_default(timeout)
        options = self._call_options(priority, retry)
        payload = pickle_call(fn, tuple(args), kwds or {})
        return await (await self._enqueue(payload, timeout, *options)).future

    async def execute(
        self,
        prompt: str,
        context: dict[str, Any] | None = None,
        timeout: float | None = None,
        *,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> Any:
        """Run the pool's handler on ``(prompt, context)`` in a worker; return what it returns.

        Args:
            prompt: the string handed to the pool's handler.
            context: the dict handed to the handler with it (default: empty).
            timeout: run-time limit in seconds (default: the pool's ``task_timeout``); past it the
                worker is killed and replaced.
            priority: higher runs first; FIFO within a priority (default 0).
            retry: when a failed run is run again (default: the pool's ``retry``).

        Raises:
            RuntimeError: the pool has no handler.
            TypeError: ``prompt`` is not a string or ``context`` not a dict.
            Exception: whatever [`apply`][procpool.WorkerPool.apply] raises, for the same reasons.
        """
        payload, timeout = self._prompt_call(prompt, context, timeout)
        return await (await self._enqueue(payload, timeout, *self._call_options(priority, retry))).future

    async def execute_detailed(
        self,
        prompt: str,
        context: dict[str, Any] | None = None,
        timeout: float | None = None,
        *,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> TaskReport:
        """Like [`execute`][procpool.WorkerPool.execute], but report the outcome instead of raising the task's error.

        For callers that show results to someone else (the MCP server, orchestrator adapters):
        the report names the task, the worker that ran it and how long it took. A task's own
        failure (its exception, a crash, a timeout, a SystemExit) is in the report, not raised.

        Args:
            prompt: the string handed to the pool's handler.
            context: the dict handed to the handler with it (default: empty).
            timeout: run-time limit in seconds (default: the pool's ``task_timeout``); past it the
                worker is killed and replaced.
            priority: higher runs first; FIFO within a priority (default 0).
            retry: when a failed run is run again (default: the pool's ``retry``).

        Raises:
            TypeError: an argument has the wrong type (ValueError: a bad value).
            PoolClosed: the pool is shut down.
            BrokenPool: the pool's workers cannot start.
        """
        payload, timeout = self._prompt_call(prompt, context, timeout)
        task = await self._enqueue(payload, timeout, *self._call_options(priority, retry))
        started = time.monotonic()
        try:
            value: Any = await task.future
            error: BaseException | None = None
        except (asyncio.CancelledError, PoolClosed, BrokenPool):
            raise
        except Exception as exc:
            value, error = None, exc
        return TaskReport(
            task_id=task.id,
            pool_id=self.pool_id,
            worker_id=task.worker_id,
            pid=task.pid,
            status="completed" if error is None else "failed",
            result=value,
            error=error,
            duration=task.duration if task.duration is not None else time.monotonic() - started,
        )

    async def execute_batch(
        self,
        prompts: Sequence[str],
        context: dict[str, Any] | None = None,
        timeout: float | None = None,
        *,
        progress: ProgressArg = None,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> list[Any]:
        """Run the handler on every prompt concurrently; results in input order.

        A prompt that fails leaves its exception in its place in the list; the others still run.

        Args:
            prompts: the prompts, each handed to the handler with ``context``.
            context: the dict handed to the handler with every prompt (default: empty).
            timeout: run-time limit of each prompt in seconds (default: the pool's
                ``task_timeout``).
            progress: ``True`` for a progress bar on an interactive stderr (needs rich), or a
                callable ``callback(done, total)`` called as prompts finish.
            priority: the priority of every prompt (default 0). retry: their retry policy.

        Raises:
            ValueError: ``prompts`` is empty. TypeError: it is not a list of strings.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, not {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts must not be empty")
        calls = [self._prompt_call(p, context, timeout) for p in prompts]
        options = self._call_options(priority, retry)
        futures: list[asyncio.Future[Any]] = []
        # Futures report their end through a queue, so progress callbacks run here, in the
        # caller's task, where their exceptions reach the caller (not the loop's error handler).
        finished: asyncio.Queue[asyncio.Future[Any]] = asyncio.Queue()
        with make_progress(progress, len(calls), f"{self.pool_id}: batch") as reporter:
            try:
                for payload, task_timeout in calls:
                    future = (await self._enqueue(payload, task_timeout, *options)).future
                    future.add_done_callback(finished.put_nowait)
                    futures.append(future)
                for _ in futures:
                    await finished.get()
                    reporter.advance()
                return list(await asyncio.gather(*futures, return_exceptions=True))
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise

    def map(
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        timeout: float | None = None,
        progress: ProgressArg = None,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> MapIterator:
        """Iterate over ``fn(item)`` for every item, in input order, consuming the input lazily.

        Use it with ``async for``. Items travel in chunks; without ``chunksize`` the chunks grow
        until each takes about 10 ms in a worker. The first item that raises ends the iteration
        with its exception, after the results before it. Leaving the loop early (``break``, an
        exception, a cancellation) cancels the chunks still queued or running at once.

        Args:
            fn: a module-level function of one argument (plain or ``async def``).
            iterable: the items; read lazily, so a generator or a very long input works.
            chunksize: items per chunk sent to a worker (default: sized to about 10 ms of work).
            timeout: run-time limit of each chunk.
            progress: ``True`` for a progress bar on an interactive stderr (needs rich), or a
                callable ``callback(done, total)``; ``total`` is None for inputs without a length.
            priority: the priority of every chunk (default 0).
            retry: the retry policy of every item (default: the pool's ``retry``), per item:
                a chunk whose worker died runs again one item per task (the items before the
                culprit twice in all, their results lost with the worker), so only the culprit
                is quarantined; an item raising an error of ``on`` runs again alone.

        Raises:
            TypeError: ``fn`` is not callable. ValueError: a bad ``chunksize`` or ``timeout``.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive integer or None, got {chunksize!r}")
        timeout = self._timeout_or_default(timeout)
        priority, retry = self._call_options(priority, retry)
        enqueue, label = functools.partial(self._enqueue_with, priority), f"{self.pool_id}: map"
        return MapIterator(enqueue, fn, iterable, chunksize, timeout, progress, label, retry, self._tasks.count_retry)

    async def run_graph(
        self, graph: _graph.TaskGraph | Mapping[str, Any], *, return_exceptions: bool = False
    ) -> dict[str, Any]:
        """Run a [`TaskGraph`][procpool.TaskGraph] on this pool: each task once the tasks it needs are done.

        Args:
            graph: the graph (or a dict ``{name: (fn, args...)}``, see [`TaskGraph`][procpool.TaskGraph]).
            return_exceptions: put each failed task's error in the result instead of raising.

        Returns:
            ``{name: result}`` of every task.

        Raises:
            GraphFailed: a task failed; its dependants did not run ([`DependencyFailed`][procpool.DependencyFailed]).
            ValueError: the graph has a cycle or needs a task it does not have (nothing runs).
        """
        return await _graph.run_graph(graph, self._run_node, return_exceptions)

    async def _run_node(self, node: _graph.Node, args: tuple[Any, ...], kwds: dict[str, Any]) -> Any:
        return await self.apply(node.fn, args, kwds, node.timeout, priority=node.priority, retry=node.retry)

    # -- internals: submission ---------------------------------------------------------------------

    def _call_options(self, priority: Any, retry: Any) -> tuple[int, RetryPolicy | None]:
        if type(priority) is not int and (isinstance(priority, bool) or not isinstance(priority, int)):
            raise TypeError(f"priority must be an int (higher runs first), not {type(priority).__name__}")
        return priority, self.retry if retry is None else _check_retry(retry)

    def _timeout_or_default(self, timeout: Any) -> float | None:
        return self.config.task_timeout if timeout is None else check_seconds(timeout)

    def _prompt_call(self, prompt: Any, context: Any, timeout: Any) -> tuple[bytes, float | None]:
        if self.config.handler is None:
            raise RuntimeError(
                f"pool {self.pool_id!r} has no prompt handler: create it with "
                "handler='package.module:function' (for example 'procpool.handlers:echo')"
            )
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, not {type(prompt).__name__}")
        if context is not None and not isinstance(context, dict):
            raise TypeError(f"context must be a dict or None, not {type(context).__name__}")
        return pickle_call(_child.run_handler, (prompt, context or {}), {}), self._timeout_or_default(timeout)

    async def _enqueue(
        self, payload: bytes, timeout: float | None, priority: int = 0, retry: RetryPolicy | None = None
    ) -> Task:
        """Start the pool if needed, wait for room in the queue, then queue the task."""
        supervisor = self._supervisor
        if supervisor.state is PoolState.INITIAL:
            await self.initialize()
        supervisor.check_open()
        await self._tasks.wait_for_room()
        supervisor.check_open()
        return self._tasks.submit(payload, timeout, priority, retry)

    async def _enqueue_with(
        self, priority: int, payload: bytes, timeout: float | None, retry: RetryPolicy | None
    ) -> Task:
        return await self._enqueue(payload, timeout, priority, retry)

    # -- health and statistics ---------------------------------------------------------------------

    @property
    def handler(self) -> str | None:
        """The prompt handler's import path, or None when the pool has none."""
        return self.config.handler

    @property
    def load(self) -> int:
        """Tasks waiting plus tasks held by workers: a cheap figure for routing."""
        return len(self._tasks.pending) + self._tasks.in_flight

    @property
    def workers_healthy(self) -> int:
        """How many of the three workers are healthy now (cheap: for routing)."""
        return sum(w.is_healthy() for w in self.workers)

    @property
    def recent_failures(self) -> int:
        """Failures in a row across the workers; a success resets a worker's count (for routing)."""
        return sum(w.consecutive_failures for w in self.workers)

    @property
    def health(self) -> str:
        """``healthy``, ``degraded``, ``broken`` or ``not_running``, computed without psutil."""
        return self._supervisor.judge_health()[0].value

    async def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until the pool is RUNNING with all three workers healthy (starting it if needed).

        Nothing polls: the wait wakes when a worker becomes ready, finishes a task, is judged
        stuck or no longer stuck, or exits.

        Args:
            timeout: seconds to wait at most (None: as long as it takes).

        Raises:
            TimeoutError: not healthy within ``timeout``.
            BrokenPool: the pool broke. PoolClosed: it was shut down.
        """
        async with asyncio.timeout(check_seconds(timeout)):
            if self._supervisor.state is PoolState.INITIAL:
                await self.initialize()
            await self._supervisor.wait_healthy()

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the pool: state, health, queue, totals, latency and workers."""
        health, reason, healthy = self._supervisor.judge_health()
        c = self._counters
        return PoolStatistics(
            pool_id=self.pool_id,
            state=self._supervisor.state.value,
            health=health,
            health_reason=reason,
            workers_healthy=healthy,
            queue_size=len(self._tasks.pending),
            tasks_in_flight=self._tasks.in_flight,
            tasks_submitted=c.tasks_submitted,
            tasks_completed=c.tasks_completed,
            tasks_failed=c.tasks_failed,
            tasks_cancelled=c.tasks_cancelled,
            tasks_timed_out=c.tasks_timed_out,
            tasks_crashed=c.tasks_crashed,
            workers_restarted=c.workers_restarted,
            workers_recycled=c.workers_recycled,
            workers_stuck=c.workers_stuck,
            tasks_retried=c.tasks_retried,
            tasks_quarantined=c.tasks_quarantined,
            priorities=tuple(
                PriorityStatistics(p, queued, len(waits), percentile(sorted(waits), 50))
                for p, (queued, waits) in self._tasks.priority_statistics().items()
            ),
            poison_tasks=tuple(self._tasks.quarantine.recent),
            recent_durations=tuple(c.latencies),
            created_at=self.created_at,
            started_at=self._supervisor.started_at,
            workers=tuple(w.statistics() for w in self.workers),
        )

    async def health_check(self) -> dict[str, Any]:
        """Pool health: ``status`` is healthy, degraded (with ``reason``), broken or not_running."""
        stats = self.statistics()
        return {
            "pool_id": self.pool_id,
            "status": stats.health.value,
            "reason": stats.health_reason,
            "workers_healthy": stats.workers_healthy,
            "workers_total": POOL_SIZE,
            "workers": [w.get_status() for w in self.workers],
        }

    def get_status(self) -> dict[str, Any]:
        """A JSON-ready snapshot of the pool's state and statistics (built from ``statistics()``)."""
        stats = self.statistics()
        resources = [w.resources() for w in self.workers]
        extra = {"running": self.running, "tags": sorted(self.tags), "start_method": self.config.start_method}
        return status_dict(stats, resources, handler=self.config.handler, **extra)

    def __repr__(self) -> str:
        return (
            f"<WorkerPool {self.pool_id!r} {self._supervisor.state.value} pending={len(self._tasks.pending)} "
            f"in_flight={self._tasks.in_flight} completed={self._counters.tasks_completed} "
            f"failed={self._counters.tasks_failed}>"
        )


_pool_numbers = itertools.count(1)


def _check_retry(retry: Any) -> RetryPolicy | None:
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry must be a procpool.RetryPolicy or None, not {type(retry).__name__}")
    return retry
