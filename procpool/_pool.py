"""WorkerPool: exactly three worker processes and one asyncio coordinator.

Lifecycle::

    INITIAL --initialize()--> STARTING --3 workers Ready--> RUNNING --shutdown()--> CLOSING --> CLOSED
                                  |                            |
                                  +--workers keep failing to start (crash loop)--> BROKEN --shutdown()--> CLOSED

Queue topology (one pair of one-way multiprocessing Pipes per slot; the parent writes calls and
reads results without blocking, from the event loop)::

    submit/apply/execute/map -> pending (deque, <= max_pending) -> dispatch --call pipe i--> worker i
    future.set_result/exception <- _task_finished <- result pipe i <------------------------- worker i
    worker death (sentinel i readable) -> _worker_exited -> fail the running task, requeue the rest,
                                                            respawn slot i with fresh pipes

Invariants:
    * ``len(self.workers) == POOL_SIZE`` always; a slot is refilled whenever its process dies,
      until the pool is CLOSING, CLOSED or BROKEN.
    * Every task is in exactly one place: ``_pending``, one worker's ``in_flight`` (whose head is
      the task that worker runs), or done (its future resolved). A future is resolved once.
    * A task in ``in_flight`` behind the head has not started; when a worker dies only the task
      it was running (``shared[CURRENT]``) fails, the others go back to the front of ``_pending``.
    * The coordinator never blocks: results and deaths wake it through ``loop.add_reader``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import enum
import functools
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import signal
import statistics as stats_lib
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence, Sized
from typing import Any

import attrs
import psutil

from procpool import _child
from procpool._progress import ProgressArg, make_progress
from procpool._worker import Worker, decode_error
from procpool.errors import (
    BrokenPool,
    MemoryLimitExceeded,
    PoolClosed,
    PoolFull,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    WorkerStuck,
    describe_exit,
    task_error,
)

__all__ = ("POOL_SIZE", "PoolState", "TaskReport", "WorkerPool")

log = logging.getLogger("procpool.pool")

POOL_SIZE = 3
# Tasks waiting for a worker, per pool. Sync submit() raises PoolFull past it; the async entry
# points wait for room. Large enough for bulk submission, small enough to bound memory.
DEFAULT_MAX_PENDING = 100_000
# How much queued work (in seconds of measured task time) a worker may hold beyond the task it
# runs. Tiny tasks then travel many per syscall; tasks over ~2 ms are sent one at a time, so a
# slow task never holds up work that another worker could take.
PREFETCH_SECONDS = 0.002
MAX_WINDOW = _child.CANCEL_RING // 2
# SIGTERM, then SIGKILL this long after, when a worker is stopped on purpose.
KILL_GRACE = 0.2
# Workers that die before Ready this many times in a row make the pool BROKEN.
MAX_START_FAILURES = 3
# Respawn delays after failed starts: 0.1 s, 0.2 s, 0.4 s ... (no retry storm).
START_BACKOFF = 0.1
# A worker not ready this long after its start (a hanging initializer or import) failed to start.
DEFAULT_START_TIMEOUT = 60.0
# A recycled worker that has not exited this long after its last task (a non-daemon thread, a
# slow exit hook) is killed, so its slot is refilled.
RETIRE_GRACE = 5.0
# The shortest stuck_after: the monitor samples every stuck_after / 4 seconds, and sampling
# faster would cost the parent more CPU than it could ever save.
MIN_STUCK_AFTER = 0.1
# map() without a chunksize sizes chunks to take about this long in a worker.
TARGET_CHUNK_SECONDS = 0.01
MAX_CHUNKSIZE = 8192
# Recent task durations kept for latency percentiles.
LATENCY_WINDOW = 1000
# A worker holding one task this long without using CPU or sending a heartbeat is stuck.
DEFAULT_STUCK_AFTER = 300.0
# How often the monitor samples the workers with psutil (capped by stuck_after / 4). Results and
# deaths never wait for it: they wake the loop directly. It only watches resources and progress.
MONITOR_INTERVAL = 0.5
# CPU seconds a task must use between two looks to count as progress (one clock tick).
CPU_PROGRESS = 0.01
# Between asking a stuck worker for its stack (SIGUSR1 -> faulthandler) and killing it.
STACK_DUMP_GRACE = 0.25


class PoolState(enum.Enum):
    """A pool's lifecycle: INITIAL, STARTING, RUNNING, then CLOSING and CLOSED (or BROKEN)."""

    INITIAL = "initial"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"
    BROKEN = "broken"


@attrs.define(eq=False, repr=False)
class Task:
    """One unit of work, from submission until its future is resolved."""

    id: int
    payload: bytes
    future: asyncio.Future[Any]
    timeout: float | None
    submitted_at: float
    # "pending" (in the pool's queue), "sent" (in a worker's in_flight) or "done".
    state: str = "pending"
    # Position in its worker's stream; set when sent.
    seq: int = 0
    worker: Worker | None = None
    timer: asyncio.TimerHandle | None = None
    duration: float | None = None
    # The pid of the worker the task was last sent to.
    pid: int | None = None

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.state} seq={self.seq}>"


@attrs.frozen
class TaskReport:
    """The outcome of one prompt task, from [`WorkerPool.execute_detailed`][]."""

    task_id: int
    pool_id: str
    worker_id: str | None
    # The worker process that ran it (None if it never reached one).
    pid: int | None
    # "completed" or "failed".
    status: str
    result: Any
    error: BaseException | None
    # Seconds the task ran in its worker (wall time since submission when it never finished there).
    duration: float

    @property
    def ok(self) -> bool:
        return self.error is None

    def error_message(self) -> str | None:
        """``"TypeName: message"`` of the error, or None."""
        return None if self.error is None else f"{type(self.error).__name__}: {self.error}"


class _TaskFuture(asyncio.Future[Any]):
    """A task's future that tells the pool of a cancellation at once, inside ``cancel()``.

    asyncio runs done-callbacks a loop step later; in that step a worker could start the task the
    caller has just cancelled, and a cancelled task must never run.
    """

    on_cancel: Callable[[], None] | None = None

    def cancel(self, msg: Any = None) -> bool:
        if self.done():
            return False
        hook, self.on_cancel = self.on_cancel, None
        if hook is not None:
            hook()
        return super().cancel(msg)


_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _kill_leftover_workers() -> None:
    """At interpreter exit, kill the workers of pools nobody shut down.

    Registered after multiprocessing's own exit hook, so it runs first; otherwise that hook
    would wait forever on our non-daemon workers.
    """
    for pool in list(_live_pools):
        for worker in pool.workers:
            if worker.process is not None and worker.pid is not None:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(worker.pid, signal.SIGKILL)
                        break
                    except (ProcessLookupError, PermissionError):
                        continue
                worker.process.join(1.0)


def _check_timeout(timeout: Any, name: str = "timeout", unit: str = "seconds") -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{name} must be a number of {unit} or None, not {type(timeout).__name__}")
    if not timeout > 0 or math.isinf(timeout):
        raise ValueError(f"{name} must be a positive, finite number of {unit}, got {timeout!r}")
    return float(timeout)


def _handler_path(handler: Any) -> str | None:
    """Check a handler now (not on the first task) and return its import path for workers."""
    if handler is None:
        return None
    if isinstance(handler, str):
        if handler.count(":") != 1 or not all(handler.split(":")):
            raise ValueError(f"handler must look like 'package.module:function', got {handler!r}")
        try:
            _child.resolve(handler)
        except (ImportError, AttributeError, TypeError) as exc:
            raise ValueError(f"handler {handler!r} cannot be loaded: {exc}") from exc
        return handler
    if callable(handler):
        path = f"{getattr(handler, '__module__', None)}:{getattr(handler, '__qualname__', None)}"
        try:
            found = _child.resolve(path)
        except (ImportError, AttributeError, TypeError, ValueError):
            found = None
        if found is not handler:
            raise ValueError(
                f"handler {handler!r} must be a module-level function that workers can import "
                "(or pass its 'package.module:function' path)"
            )
        return path
    raise TypeError(f"handler must be a 'module:function' string or a function, not {type(handler).__name__}")


def _pickle_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call in the caller, so a bad argument fails here and nothing is sent."""
    try:
        return pickle.dumps((fn, args, kwargs), pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        culprit = _find_unpicklable(fn, args, kwargs)
        hint = ""
        if culprit.startswith("the function"):
            hint = " (functions must be defined at module level, so the worker can import them)"
        raise SerializationError(f"cannot send the task to a worker: {culprit} cannot be pickled{hint}: {exc}") from exc


def _find_unpicklable(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    candidates: list[tuple[str, Any]] = [(f"the function {fn!r}", fn)]
    candidates += [(f"argument {i} ({type(a).__qualname__})", a) for i, a in enumerate(args)]
    candidates += [(f"keyword argument {k!r} ({type(v).__qualname__})", v) for k, v in kwargs.items()]
    for label, obj in candidates:
        try:
            pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        except Exception:
            return label
    return "the call"


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class WorkerPool:
    """A pool of exactly three worker processes, driven from asyncio.

    Args:
        pool_id: a name for logs, status and managers; generated when omitted.
        handler: what ``execute`` runs: ``"package.module:function"`` or a module-level function
            taking ``(prompt, context)``; checked now, imported by each worker.
        task_timeout: default run-time limit in seconds for every task (None: no limit).
        initializer: called with ``initargs`` in each worker before it takes work.
        initargs: the initializer's positional arguments (default: none).
        start_method: ``"forkserver"`` (default where available) or ``"spawn"``. ``"fork"`` is
            refused: forking a parent that runs threads and an event loop is unsafe.
        max_pending: how many tasks may wait for a worker (backpressure; default 100,000).
        stuck_after: seconds a worker may hold one task with no CPU progress and no
            [`procpool.heartbeat`][] before it is judged stuck (default 300; None: never).
        replace_stuck: kill and replace a stuck worker, failing its task with
            [`WorkerStuck`][] (default); if False it is only reported unhealthy.
        max_tasks_per_worker: replace a worker after it has run this many tasks.
        max_memory_mb: replace a worker whose RSS passes this: after a task, gracefully; while
            a task runs, at once, failing the task with [`MemoryLimitExceeded`][].
        start_timeout: seconds a new worker may take to become ready (import the handler, run
            the initializer) before its start counts as failed (default 60; None: no limit).
            Three failed starts in a row make the pool BROKEN.

    Attributes:
        pool_id: the pool's name.
        workers: the three [`Worker`][] slots (each keeps its identity across restarts).

    All methods must be called from the thread running the pool's event loop.
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
    ) -> None:
        if pool_id is not None and (not isinstance(pool_id, str) or not pool_id):
            raise TypeError(f"pool_id must be a non-empty string or None, got {pool_id!r}")
        if start_method is None:
            start_method = _default_start_method()
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"start_method must be 'forkserver' or 'spawn', got {start_method!r} "
                "('fork' is unsafe in a process that runs threads and an event loop)"
            )
        if start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start_method {start_method!r} is not available on this platform")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be callable")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}")
        for name, value in (("max_tasks_per_worker", max_tasks_per_worker),):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.stuck_after = _check_timeout(stuck_after, "stuck_after")
        if self.stuck_after is not None and self.stuck_after < MIN_STUCK_AFTER:
            raise ValueError(f"stuck_after must be at least {MIN_STUCK_AFTER} seconds (or None), got {stuck_after!r}")
        self.start_timeout = _check_timeout(start_timeout, "start_timeout")
        self.replace_stuck = bool(replace_stuck)
        self.max_tasks_per_worker = max_tasks_per_worker
        self.max_memory_mb = _check_timeout(max_memory_mb, "max_memory_mb", "megabytes")
        self.pool_id = pool_id or f"pool-{os.getpid()}-{next(_pool_numbers)}"
        self._handler_path = _handler_path(handler)
        self.task_timeout = _check_timeout(task_timeout, "task_timeout")
        self._initializer = initializer
        self._initargs = tuple(initargs)
        if initializer is not None:
            _pickle_call(initializer, self._initargs, {})
        self.start_method = start_method
        self.max_pending = max_pending
        self.workers: list[Worker] = [Worker(self, i, f"{self.pool_id}-w{i}") for i in range(POOL_SIZE)]
        self._state = PoolState.INITIAL
        self._ctx: Any = None
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._pending: collections.deque[Task] = collections.deque()
        self._task_ids = itertools.count(1)
        self._dispatch_scheduled = False
        # Resolved when all three workers are ready (or the pool breaks).
        self._started: asyncio.Future[None] | None = None
        # Resolved when the last worker has exited during shutdown.
        self._all_exited: asyncio.Future[None] | None = None
        self._closed_event: asyncio.Event | None = None
        # Callers waiting for room in the pending queue, woken one per free place, oldest first;
        # _room_granted counts the woken ones that have not submitted yet (their place is taken).
        self._room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._room_granted = 0
        self._broken_cause: str | None = None
        self._start_failures = 0
        # Smoothed task duration, for the prefetch window.
        self._avg_duration: float | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.created_at = time.time()
        self.started_at: float | None = None
        self.tasks_submitted = 0
        self.tasks_completed = 0
        self.tasks_failed = 0
        self.tasks_cancelled = 0
        self.tasks_timed_out = 0
        self.tasks_crashed = 0
        self.workers_restarted = 0
        self.workers_recycled = 0
        self.workers_stuck = 0
        self._monitor: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def state(self) -> PoolState:
        """Where the pool is in its lifecycle (see [`PoolState`][])."""
        return self._state

    @property
    def running(self) -> bool:
        """Whether the pool is RUNNING: started, not broken, not shut down."""
        return self._state is PoolState.RUNNING

    async def initialize(self) -> None:
        """Start the three workers; return when all are ready. Idempotent.

        Raises:
            BrokenPool: the workers could not be started (the message says why).
            PoolClosed: the pool was shut down.
        """
        if self._state is not PoolState.INITIAL and asyncio.get_running_loop() is not self._loop:
            raise self._wrong_loop()
        if self._state is PoolState.RUNNING:
            return
        if self._state in (PoolState.CLOSING, PoolState.CLOSED):
            raise PoolClosed(f"pool {self.pool_id!r} is shut down")
        if self._state is PoolState.BROKEN:
            raise BrokenPool(self._broken_cause)
        if self._state is PoolState.INITIAL:
            self._loop = asyncio.get_running_loop()
            self._ctx = multiprocessing.get_context(self.start_method)
            if self.start_method == "forkserver":
                # The fork server imports these once; each worker forked from it then starts
                # without re-importing them, the main module (with everything it imports) included.
                self._ctx.set_forkserver_preload(["__main__", "procpool._child"])
            self._started = self._loop.create_future()
            self._closed_event = asyncio.Event()
            self._state = PoolState.STARTING
            _live_pools.add(self)
            self._monitor = self._loop.create_task(self._monitor_loop(), name=f"procpool-monitor-{self.pool_id}")
            try:
                for worker in self.workers:
                    self._spawn(worker)
            except BaseException:
                await self.shutdown(timeout=0)
                raise
        assert self._started is not None
        try:
            await asyncio.shield(self._started)
        except asyncio.CancelledError:
            if self._state is PoolState.STARTING:
                await asyncio.shield(self.shutdown(timeout=0))
            raise

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Refuse new work, let running tasks finish until ``timeout``, then stop the workers.

        Tasks that never started fail with [`PoolClosed`][]; tasks still running at the
        deadline are killed (SIGTERM, then SIGKILL) and fail with [`PoolClosed`][] too. No
        worker process is left behind. Calling it again is harmless.

        A pool whose event loop has ended (it was started under an earlier ``asyncio.run()``)
        can still be shut down from a new loop: its workers are killed at once.

        Args:
            timeout: seconds to let running tasks finish (``math.inf``: wait as long as they run).

        Raises:
            ValueError: ``timeout`` is negative or not a number.
            RuntimeError: called outside the pool's event loop while that loop still runs.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
        if self._state is PoolState.INITIAL:
            self._state = PoolState.CLOSED
            return
        if asyncio.get_running_loop() is not self._loop:
            if self._state is PoolState.CLOSED:
                return
            if self._loop.is_closed():
                await self._abandon()
                return
            raise self._wrong_loop()
        if self._state in (PoolState.CLOSING, PoolState.CLOSED):
            assert self._closed_event is not None
            await self._closed_event.wait()
            return
        self._state = PoolState.CLOSING
        assert self._started is not None and self._closed_event is not None
        if not self._started.done():
            self._started.set_exception(PoolClosed(f"pool {self.pool_id!r} was shut down while starting"))
            self._started.exception()  # mark retrieved
        self._wake_all_room_waiters()  # they see the pool is closing
        never_ran = PoolClosed(f"pool {self.pool_id!r} shut down before the task ran")
        while self._pending:
            self._resolve(self._pending.popleft(), False, never_ran)
        live = [w for w in self.workers if w.process is not None]
        self._all_exited = self._loop.create_future()
        # The pool is CLOSED when its last worker has exited, whether or not anyone still waits.
        self._all_exited.add_done_callback(self._closed)
        if not live:
            self._all_exited.set_result(None)
        for worker in live:
            for task in itertools.islice(worker.in_flight, 1, None):
                worker.cancel_unstarted(task)
            worker.send_exit()
        try:
            await asyncio.wait_for(asyncio.shield(self._all_exited), None if math.isinf(timeout) else timeout)
        except TimeoutError:
            self._kill_all(f"the task was killed after {timeout:g} s")
            await asyncio.shield(self._all_exited)
        except asyncio.CancelledError:
            # The caller stopped waiting: stop now rather than leave workers running unwatched.
            self._kill_all("the shutdown was cancelled, so running tasks were killed")
            raise

    async def _abandon(self) -> None:
        """Stop a pool whose event loop has closed: kill its workers and reap them in a thread.

        Its futures belong to the dead loop, so nobody can be waiting on them any more.
        """
        self._state = PoolState.CLOSED
        _live_pools.discard(self)
        processes = []
        for worker in self.workers:
            if worker.process is not None and worker.pid is not None:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(worker.pid, signal.SIGKILL)
                        break
                    except (ProcessLookupError, PermissionError):
                        continue
                processes.append(worker.process)
        await asyncio.to_thread(lambda: [p.join(10) for p in processes])
        for worker in self.workers:
            for conn in worker._conns:
                conn.close()
            worker._conns = ()
            worker.process = None
            worker.state = "dead"
        log.warning("pool %s was shut down after its event loop had closed; its workers were killed", self.pool_id)

    def _kill_all(self, why: str) -> None:
        reason = PoolClosed(f"pool {self.pool_id!r} shut down; {why}")
        for worker in self.workers:
            if worker.process is not None:
                worker.kill(reason, KILL_GRACE)

    def _closed(self, _: asyncio.Future[None]) -> None:
        self._state = PoolState.CLOSED
        _live_pools.discard(self)
        if self._monitor is not None:
            self._monitor.cancel()
        assert self._closed_event is not None
        self._closed_event.set()
        log.info("pool %s shut down", self.pool_id)

    async def __aenter__(self) -> WorkerPool:
        await self.initialize()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -- submitting work -------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a worker; return a future of its result.

        ``fn`` may be an ``async def`` function: the worker runs it on its own event loop.
        Must be called from the pool's event loop thread.

        Args:
            fn: a module-level function (plain or ``async def``), so workers can import it.
            *args: its positional arguments.
            **kwargs: its keyword arguments.

        Raises:
            TypeError: ``fn`` is not callable.
            SerializationError: ``fn`` or an argument cannot be pickled (nothing is queued).
            PoolFull: ``max_pending`` tasks are already waiting.
            PoolClosed: the pool is shut down.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        payload = _pickle_call(fn, args, kwargs)
        self._check_open()
        if self._room_waiters or len(self._pending) + self._room_granted >= self.max_pending:
            raise PoolFull(
                f"pool {self.pool_id!r} has {len(self._pending)} tasks waiting (max_pending); "
                "await pool.apply() to wait for room instead"
            )
        return self._submit(payload, self.task_timeout).future

    async def apply(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any] = (),
        kwds: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``fn(*args, **kwds)`` in a worker and return its result.

        Args:
            fn: a module-level function (plain or ``async def``), so workers can import it.
            args: its positional arguments.
            kwds: its keyword arguments.
            timeout: run-time limit in seconds (default: the pool's ``task_timeout``). When it
                expires the worker is killed and replaced and [`TaskTimeout`][] is raised.

        Raises:
            Exception: the task's own exception, with the remote traceback as ``__cause__``.
            TaskTimeout: the task ran past its timeout; its worker was replaced.
            WorkerCrashed: the worker died while running it (or was stuck, or over its memory limit).
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
        payload = _pickle_call(fn, tuple(args), kwds or {})
        await self._wait_ready_for_work()
        return await self._submit(payload, timeout).future

    async def execute(self, prompt: str, context: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Run the pool's handler on ``(prompt, context)`` in a worker; return what it returns.

        Args:
            prompt: the string handed to the pool's handler.
            context: the dict handed to the handler with it (default: empty).
            timeout: run-time limit in seconds (default: the pool's ``task_timeout``); past it the
                worker is killed and replaced.

        Raises:
            RuntimeError: the pool has no handler.
            TypeError: ``prompt`` is not a string or ``context`` not a dict.
            Exception: whatever [`apply`][] raises, for the same reasons.
        """
        payload, timeout = self._prompt_call(prompt, context, timeout)
        await self._wait_ready_for_work()
        return await self._submit(payload, timeout).future

    async def execute_detailed(
        self, prompt: str, context: dict[str, Any] | None = None, timeout: float | None = None
    ) -> TaskReport:
        """Like [`execute`][], but report the outcome instead of raising the task's error.

        For callers that show results to someone else (the MCP server, orchestrator adapters):
        the report names the task, the worker that ran it and how long it took.

        Args:
            prompt: the string handed to the pool's handler.
            context: the dict handed to the handler with it (default: empty).
            timeout: run-time limit in seconds (default: the pool's ``task_timeout``); past it the
                worker is killed and replaced.

        Raises:
            TypeError: an argument has the wrong type (ValueError: a bad value).
            PoolClosed: the pool is shut down.
            BrokenPool: the pool's workers cannot start.

        A task's own failure (its exception, a crash, a timeout) is in the report, not raised.
        """
        payload, timeout = self._prompt_call(prompt, context, timeout)
        await self._wait_ready_for_work()
        task = self._submit(payload, timeout)
        started = time.monotonic()
        try:
            value: Any = await task.future
            error: BaseException | None = None
        except (asyncio.CancelledError, PoolClosed, BrokenPool):
            raise
        except Exception as exc:
            value, error = None, exc
        worker = task.worker
        return TaskReport(
            task_id=task.id,
            pool_id=self.pool_id,
            worker_id=worker.worker_id if worker is not None else None,
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

        Raises:
            ValueError: ``prompts`` is empty. TypeError: it is not a list of strings.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, not {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts must not be empty")
        calls = [self._prompt_call(p, context, timeout) for p in prompts]
        futures: list[asyncio.Future[Any]] = []
        # Futures report their end through a queue, so progress callbacks run here, in the
        # caller's task, where their exceptions reach the caller (not the loop's error handler).
        finished: asyncio.Queue[asyncio.Future[Any]] = asyncio.Queue()
        with make_progress(progress, len(calls), f"{self.pool_id}: batch") as reporter:
            try:
                for payload, task_timeout in calls:
                    await self._wait_ready_for_work()
                    future = self._submit(payload, task_timeout).future
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

    async def map(
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        timeout: float | None = None,
        progress: ProgressArg = None,
    ) -> AsyncIterator[Any]:
        """Yield ``fn(item)`` for every item, in input order, consuming the input lazily.

        Items travel in chunks; without ``chunksize`` the chunks grow until each takes about
        10 ms in a worker. The first item that raises ends the iteration with its exception.

        Args:
            fn: a module-level function of one argument (plain or ``async def``).
            iterable: the items; read lazily, so a generator or a very long input works.
            chunksize: items per chunk sent to a worker (default: sized to about 10 ms of work).
            timeout: run-time limit of each chunk.
            progress: ``True`` for a progress bar on an interactive stderr (needs rich), or a
                callable ``callback(done, total)``; ``total`` is None for inputs without a length.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive integer or None, got {chunksize!r}")
        timeout = self._timeout_or_default(timeout)
        total = len(iterable) if isinstance(iterable, Sized) else None
        reporter = make_progress(progress, total, f"{self.pool_id}: map")
        items = iter(iterable)
        size = chunksize or 1
        window: collections.deque[tuple[Task, int]] = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(window) < 2 * POOL_SIZE + 1:
                    chunk = list(itertools.islice(items, size))
                    if not chunk:
                        exhausted = True
                        break
                    payload = _pickle_call(_child.run_chunk, (fn, chunk), {})
                    await self._wait_ready_for_work()
                    window.append((self._submit(payload, timeout), len(chunk)))
                if not window:
                    return
                task, count = window.popleft()
                values, error = await task.future
                if chunksize is None and task.duration:
                    size = max(1, min(MAX_CHUNKSIZE, int(TARGET_CHUNK_SECONDS * count / task.duration)))
                reporter.advance(len(values))
                for value in values:
                    yield value
                if error is not None:
                    raise task_error(decode_error(error))
        finally:
            reporter.close()
            for task, _ in window:
                task.future.cancel()

    # -- internals: submission and dispatch --------------------------------------------------------

    def _timeout_or_default(self, timeout: Any) -> float | None:
        return self.task_timeout if timeout is None else _check_timeout(timeout)

    def _prompt_call(self, prompt: Any, context: Any, timeout: Any) -> tuple[bytes, float | None]:
        if self._handler_path is None:
            raise RuntimeError(
                f"pool {self.pool_id!r} has no prompt handler: create it with "
                "handler='package.module:function' (for example 'procpool.handlers:echo')"
            )
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, not {type(prompt).__name__}")
        if context is not None and not isinstance(context, dict):
            raise TypeError(f"context must be a dict or None, not {type(context).__name__}")
        return _pickle_call(_child.run_handler, (prompt, context or {}), {}), self._timeout_or_default(timeout)

    def _check_open(self) -> None:
        state = self._state
        if state is PoolState.RUNNING or state is PoolState.STARTING:
            if asyncio._get_running_loop() is not self._loop:
                raise self._wrong_loop()
            return
        if state is PoolState.INITIAL:
            raise RuntimeError(f"pool {self.pool_id!r} is not started: await pool.initialize() or use 'async with'")
        if state is PoolState.BROKEN:
            raise BrokenPool(self._broken_cause)
        raise PoolClosed(f"pool {self.pool_id!r} is shut down")

    def _wrong_loop(self) -> RuntimeError:
        """The error for a call made outside the pool's event loop (checked before anything is sent)."""
        if asyncio._get_running_loop() is None:
            where = "from a thread with no running event loop"
        else:
            where = "from another event loop (was the pool started under another asyncio.run()?)"
        return RuntimeError(
            f"pool {self.pool_id!r} was called {where}; its methods must be called from the thread running "
            "the event loop it was started on (from other threads use asyncio.run_coroutine_threadsafe "
            "with that loop, or procpool.Executor for synchronous code)"
        )

    async def _wait_ready_for_work(self) -> None:
        """Start the pool if needed, then wait until the pending queue has room."""
        if self._state is PoolState.INITIAL:
            await self.initialize()
        self._check_open()
        if not self._room_waiters and len(self._pending) + self._room_granted < self.max_pending:
            return
        # Wait in line: one waiter is woken per place that frees up, so 10,000 waiters cost
        # 10,000 wake-ups, not 10,000 per freed place.
        waiter = self._loop.create_future()
        self._room_waiters.append(waiter)
        self._update_room()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._room_granted -= 1  # woken, then cancelled: pass the place on
                self._update_room()
            else:
                self._room_waiters.remove(waiter)
            raise
        self._room_granted -= 1
        if self._room_waiters:
            # Our task may go straight to an idle worker and leave the queue's place free: after
            # it is submitted (this step), let the next waiter see whether there is room.
            self._loop.call_soon(self._update_room)
        self._check_open()

    def _submit(self, payload: bytes, timeout: float | None) -> Task:
        """Queue a task; the caller has checked for room (submit) or waited for it."""
        self._check_open()
        pending = self._pending
        loop = self._loop
        future = _TaskFuture(loop=loop)
        task = Task(next(self._task_ids), payload, future, timeout, time.monotonic())
        future.on_cancel = functools.partial(self._on_cancel, task)
        self.tasks_submitted += 1
        if not pending and self._state is PoolState.RUNNING:
            # Fast path for latency: an idle worker takes the task right now.
            for worker in self.workers:
                if worker.state == "idle" and not worker.in_flight:
                    worker.send([task])
                    if self.max_tasks_per_worker is not None and worker.sent_count >= self.max_tasks_per_worker:
                        self._recycle(worker, f"it has run {self.max_tasks_per_worker} tasks (max_tasks_per_worker)")
                    return task
        pending.append(task)
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            loop.call_soon(self._dispatch)
        return task

    def _window(self) -> int:
        avg = self._avg_duration
        if avg is None:
            return 1  # nothing measured yet: assume tasks are long
        return max(1, min(MAX_WINDOW, int(PREFETCH_SECONDS / avg) + 1)) if avg > 0 else MAX_WINDOW

    def _dispatch(self) -> None:
        """Hand pending tasks to ready workers, spreading them evenly, one write per worker."""
        self._dispatch_scheduled = False
        pending = self._pending
        if not pending or self._state is not PoolState.RUNNING:
            self._update_room()
            return
        window = self._window()
        ready = [w for w in self.workers if w.state in ("idle", "busy") and len(w.in_flight) < window]
        ready.sort(key=lambda w: len(w.in_flight))
        limit = self.max_tasks_per_worker
        for i, worker in enumerate(ready):
            if not pending:
                break
            share = -(-len(pending) // (len(ready) - i))
            take = min(share, window - len(worker.in_flight))
            if limit is not None:
                take = min(take, limit - worker.sent_count)
            batch = [pending.popleft() for _ in range(min(take, len(pending)))]
            if batch:
                worker.send(batch)
            if limit is not None and worker.sent_count >= limit:
                self._recycle(worker, f"it has run {limit} tasks (max_tasks_per_worker)")
        self._update_room()

    def _update_room(self) -> None:
        """Wake as many callers waiting for room as the pending queue has free places, FIFO."""
        waiters = self._room_waiters
        free = self.max_pending - len(self._pending) - self._room_granted
        while waiters and free > 0:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._room_granted += 1
                free -= 1

    def _wake_all_room_waiters(self) -> None:
        """Wake every caller waiting for room (the pool is closing or broken: they will see it)."""
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._room_granted += 1

    def _schedule_dispatch(self) -> None:
        if self._pending and not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            self._loop.call_soon(self._dispatch)

    def _resolve(self, task: Task, ok: bool, value: Any) -> None:
        """Resolve a task's future once, and count the outcome."""
        task.state = "done"
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        future = task.future
        if future.done():
            return
        if ok:
            self.tasks_completed += 1
            future.set_result(value)
        else:
            self.tasks_failed += 1
            # A task's StopIteration or SystemExit must reach its caller as a failure, never as
            # a TypeError from asyncio here (which would strand this future and the results read
            # after it) nor as an exit of the caller.
            future.set_exception(task_error(value))

    def _arm_timeout(self, worker: Worker, task: Task) -> None:
        assert task.timeout is not None
        task.timer = self._loop.call_later(task.timeout, self._on_timeout, worker, task)

    def _on_timeout(self, worker: Worker, task: Task) -> None:
        task.timer = None
        if task.state != "sent" or task.worker is not worker or task.future.done():
            return
        self.tasks_timed_out += 1
        error = TaskTimeout(task.timeout or 0.0, worker.pid)
        log.warning(
            "task %s timed out after %s s on worker %s (pid %s); replacing the worker",
            task.id,
            task.timeout,
            worker.worker_id,
            worker.pid,
        )
        self._resolve(task, False, error)
        worker.kill(error, KILL_GRACE)

    def _on_cancel(self, task: Task) -> None:
        """A caller cancels a task's future: drop it if it has not started, else kill its worker."""
        self.tasks_cancelled += 1
        if task.state == "pending":
            try:
                self._pending.remove(task)
            except ValueError:
                pass
            task.state = "done"
            self._update_room()
        elif task.state == "sent" and task.worker is not None:
            worker = task.worker
            if worker.is_running(task):
                log.info(
                    "task %s cancelled while running; replacing worker %s (pid %s)",
                    task.id,
                    worker.worker_id,
                    worker.pid,
                )
                worker.kill(None, KILL_GRACE)
            else:
                worker.cancel_unstarted(task)

    # -- internals: events from workers ----------------------------------------------------------

    def _task_finished(self, worker: Worker, task: Task, ok: bool | None, value: Any, duration: float | None) -> None:
        if ok is None:  # skipped: cancelled before it started, or shut down
            if not task.future.done():
                self._resolve(task, False, PoolClosed(f"pool {self.pool_id!r} shut down before the task ran"))
            task.state = "done"
        else:
            task.duration = duration
            if duration is not None:
                self._latencies.append(duration)
                avg = self._avg_duration
                self._avg_duration = duration if avg is None else avg + 0.1 * (duration - avg)
            self._resolve(task, ok, value)
            if self.max_memory_mb is not None and not worker.retiring:
                rss_mb = worker.rss_mb()
                if rss_mb is not None and rss_mb > self.max_memory_mb:
                    self._recycle(worker, f"its RSS is {rss_mb:.0f} MB, over max_memory_mb={self.max_memory_mb:g}")
        if worker.retiring and not worker.in_flight:
            self._arm_retire_deadline(worker)
        self._schedule_dispatch()

    def _worker_ready(self, worker: Worker) -> None:
        self._start_failures = 0
        if worker.restarts:
            log.info("worker %s replaced: pid %s ready (restart %d)", worker.worker_id, worker.pid, worker.restarts)
        else:
            log.info("worker %s ready (pid %s)", worker.worker_id, worker.pid)
        if self._state is PoolState.STARTING and all(w.state in ("idle", "busy") for w in self.workers):
            self._state = PoolState.RUNNING
            self.started_at = time.time()
            assert self._started is not None
            if not self._started.done():
                self._started.set_result(None)
            log.info("pool %s running with %d workers", self.pool_id, POOL_SIZE)
        if self._state is PoolState.CLOSING:
            worker.send_exit()
        self._dispatch()

    def _worker_exited(
        self, worker: Worker, pid: int | None, exitcode: int | None, tasks: list[Task], running: int, never_ready: bool
    ) -> None:
        closing = self._state in (PoolState.CLOSING, PoolState.CLOSED, PoolState.BROKEN)
        requeue = []
        for task in tasks:
            if task.timer is not None:  # a requeued task's clock restarts on its next worker
                task.timer.cancel()
                task.timer = None
            if task.future.done():
                task.state = "done"
                continue
            if task.seq == running:
                # The kill's reason belongs to the task the kill was decided for; any other
                # running task died with the worker.
                reason = worker.kill_reason if task.seq == worker.kill_seq else None
                if isinstance(reason, WorkerCrashed) and reason.exitcode is None:
                    reason = type(reason)(reason.pid, exitcode, reason.detail)  # now we know how it ended
                if reason is None:
                    detail = f"task {task.id} on worker {worker.worker_id}"
                    if worker.kill_reason is not None:
                        detail += f", killed while the worker was being replaced ({worker.kill_reason})"
                    reason = WorkerCrashed(pid, exitcode, detail)
                    self.tasks_crashed += 1
                self._resolve(task, False, reason)
            elif closing:
                self._resolve(task, False, PoolClosed(f"pool {self.pool_id!r} shut down before the task ran"))
            else:
                task.state = "pending"
                task.worker = None
                requeue.append(task)
        self._pending.extendleft(reversed(requeue))
        if closing:
            log.debug("worker %s (pid %s) exited: %s", worker.worker_id, pid, describe_exit(exitcode))
            exited = self._all_exited
            if exited is not None and not exited.done() and all(w.process is None for w in self.workers):
                exited.set_result(None)
            return
        if never_ready:
            self._start_failed(worker, pid, exitcode)
            self._schedule_dispatch()
            return
        if worker.retiring and exitcode == 0:
            log.info("worker %s (pid %s) recycled", worker.worker_id, pid)
        elif worker.kill_reason is None:
            log.warning("worker %s (pid %s) died: %s; replacing it", worker.worker_id, pid, describe_exit(exitcode))
        else:
            log.info("worker %s (pid %s) stopped (%s); replacing it", worker.worker_id, pid, describe_exit(exitcode))
        worker.restarts += 1
        self.workers_restarted += 1
        self._respawn(worker)
        self._schedule_dispatch()  # requeued tasks may go to the other workers now

    def _spawn(self, worker: Worker) -> None:
        """Start a process in the slot, with a deadline for becoming ready."""
        worker.spawn()
        if self.start_timeout is not None:
            self._loop.call_later(self.start_timeout, self._start_overdue, worker, worker.process)

    def _start_overdue(self, worker: Worker, process: Any) -> None:
        """A worker still not ready at start_timeout failed to start: kill it, the exit counts."""
        if worker.process is not process or worker.state != "starting":
            return
        worker.init_failure = (
            f"it was not ready within start_timeout={self.start_timeout:g} s "
            "(a handler import or initializer that does not return?)"
        )
        log.warning("worker %s (pid %s): %s; killing it", worker.worker_id, worker.pid, worker.init_failure)
        worker.kill_tree()

    def _respawn(self, worker: Worker) -> None:
        """Refill a slot; a process that cannot even be created counts as a failed start."""
        try:
            self._spawn(worker)
        except Exception as exc:
            log.exception("could not start a process for worker %s", worker.worker_id)
            worker.init_failure = None
            self._start_failed(worker, None, None, f"starting the process raised {exc!r}")

    def _start_failed(self, worker: Worker, pid: int | None, exitcode: int | None, why: str | None = None) -> None:
        self._start_failures += 1
        cause = f"worker {worker.worker_id} (pid {pid}) failed to start: {why or describe_exit(exitcode)}"
        if worker.init_failure:
            cause += f"; {worker.init_failure}"
        elif exitcode is not None and getattr(sys.modules.get("__main__"), "__file__", None):
            cause += (
                "; workers import the main module, so a script must start its pools only under "
                "'if __name__ == \"__main__\":' (see the worker's traceback above in stderr)"
            )
        log.error("%s (%d in a row)", cause, self._start_failures)
        if self._start_failures >= MAX_START_FAILURES:
            self._break(cause)
            return
        delay = START_BACKOFF * 2 ** (self._start_failures - 1)
        worker.restarts += 1
        self.workers_restarted += 1
        self._loop.call_later(delay, self._respawn_if_open, worker)

    def _respawn_if_open(self, worker: Worker) -> None:
        if self._state in (PoolState.STARTING, PoolState.RUNNING) and worker.process is None:
            self._respawn(worker)

    def _break(self, cause: str) -> None:
        """Too many failed starts: fail everything with BrokenPool and stop the survivors."""
        self._state = PoolState.BROKEN
        self._broken_cause = f"pool {self.pool_id!r} is broken: {cause}"
        log.error(self._broken_cause)
        error = BrokenPool(self._broken_cause)
        assert self._started is not None
        if not self._started.done():
            self._started.set_exception(error)
        while self._pending:
            self._resolve(self._pending.popleft(), False, error)
        for worker in self.workers:
            for task in worker.in_flight:
                self._resolve(task, False, error)
            if worker.process is not None:
                worker.kill(error, 0)
        self._wake_all_room_waiters()

    def _recycle(self, worker: Worker, why: str) -> None:
        """Replace a worker gracefully: it runs what it holds, exits, and a fresh one follows."""
        if worker.retiring:
            return
        log.info("recycling worker %s (pid %s): %s", worker.worker_id, worker.pid, why)
        self.workers_recycled += 1
        worker.retire()
        if not worker.in_flight:
            self._arm_retire_deadline(worker)

    def _arm_retire_deadline(self, worker: Worker) -> None:
        self._loop.call_later(RETIRE_GRACE, self._retire_overdue, worker, worker.process)

    def _retire_overdue(self, worker: Worker, process: Any) -> None:
        """A recycled worker that ran its last task but has not exited is killed."""
        if worker.process is not process or process is None or not worker.retiring:
            return
        log.warning(
            "worker %s (pid %s) did not exit within %g s of its last task (a non-daemon thread?); killing it",
            worker.worker_id,
            worker.pid,
            RETIRE_GRACE,
        )
        worker.kill(None, 0)

    # -- internals: the monitor ------------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        """Sample every worker with psutil: stopped or zombie processes, memory, progress."""
        interval = MONITOR_INTERVAL
        if self.stuck_after is not None:
            interval = min(interval, self.stuck_after / 4)
        while self._state in (PoolState.STARTING, PoolState.RUNNING):
            await asyncio.sleep(interval)
            for worker in self.workers:
                try:
                    self._check_worker(worker)
                except Exception:  # pragma: no cover - the monitor must outlive any surprise
                    log.exception("monitor failed on worker %s", worker.worker_id)

    def _check_worker(self, worker: Worker) -> None:
        if worker.process is None or worker._killing or worker.state in ("starting", "dead"):
            return
        sample = worker.sample()
        if sample is None:  # vanished: its sentinel reports the exit
            return
        status, rss, cpu = sample
        pid = worker.pid
        if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return  # it has exited: its sentinel reports the death, with the real exit status
        if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
            log.warning("worker %s (pid %s) is %s; replacing it", worker.worker_id, pid, status)
            worker.kill(WorkerCrashed(pid, None, f"the worker process was found {status} by the monitor"), KILL_GRACE)
            return
        head = worker.in_flight[0] if worker.in_flight else None
        if head is None or not worker.is_running(head):
            worker.watch_seq = 0
            return
        rss_mb = rss / 2**20
        if self.max_memory_mb is not None and rss_mb > self.max_memory_mb:
            log.warning(
                "worker %s (pid %s) RSS %.0f MB over max_memory_mb=%g; replacing it",
                worker.worker_id,
                pid,
                rss_mb,
                self.max_memory_mb,
            )
            worker.kill(
                MemoryLimitExceeded(
                    pid,
                    None,
                    f"RSS {rss_mb:.0f} MB seen while running task {head.id}, over max_memory_mb={self.max_memory_mb:g}",
                ),
                KILL_GRACE,
            )
            return
        # A task waiting on processes it started (a build, a compressor) progresses through them.
        cpu += worker.descendants_cpu()
        now = time.monotonic()
        beat = worker.shared[_child.BEAT] / 1e9
        if worker.watch_seq != head.seq:
            worker.watch_seq = head.seq
            worker.watch_cpu = cpu
            worker.progress_at = beat or now  # the child stamps the task's start
            worker.task_cpu_start = cpu
            return
        if cpu - worker.watch_cpu >= CPU_PROGRESS:
            worker.progress_at = now
            worker.watch_cpu = cpu
        if beat > worker.progress_at:
            worker.progress_at = beat
        idle_for = now - worker.progress_at
        if self.stuck_after is None or idle_for < self.stuck_after:
            if worker.stuck:
                worker.stuck = False
                if worker.state == "stuck":
                    worker.state = "busy"
            return
        if worker.stuck:
            return
        worker.stuck = True
        if not worker.retiring:  # a retiring worker stays "stopping": it must not take work
            worker.state = "stuck"
        self.workers_stuck += 1
        evidence = (
            f"task {head.id} made no progress for {idle_for:.1f} s (stuck_after={self.stuck_after:g}); "
            f"CPU {cpu - worker.task_cpu_start:.2f} s used by the task, process status {status!r}"
        )
        log.warning("worker %s (pid %s) is stuck: %s", worker.worker_id, pid, evidence)
        if self.replace_stuck:
            self._loop.create_task(self._replace_stuck(worker, head, evidence))

    async def _replace_stuck(self, worker: Worker, task: Task, evidence: str) -> None:
        """Capture the stuck task's Python stack, then kill and replace its worker."""
        process, pid = worker.process, worker.pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGUSR1)  # faulthandler in the child writes every thread's stack
            except ProcessLookupError:
                pass
            await asyncio.sleep(STACK_DUMP_GRACE)
        if worker.process is not process or task.state != "sent":
            return  # it finished or died meanwhile
        stack = worker.read_stack()
        detail = evidence + (f"\nstack of the stuck worker:\n{stack}" if stack else "")
        worker.kill(WorkerStuck(pid, None, detail), KILL_GRACE)

    # -- health and statistics -------------------------------------------------------------------

    @property
    def handler(self) -> str | None:
        """The prompt handler's import path, or None when the pool has none."""
        return self._handler_path

    @property
    def load(self) -> int:
        """Tasks waiting plus tasks held by workers: a cheap figure for routing."""
        return len(self._pending) + sum(len(w.in_flight) for w in self.workers)

    @property
    def health(self) -> str:
        """``healthy``, ``degraded``, ``broken`` or ``not_running``, computed without psutil."""
        return self._health()[0]

    def _health(self) -> tuple[str, str | None, int]:
        healthy = sum(w.is_healthy() for w in self.workers)
        state = self._state
        if state is PoolState.BROKEN:
            return "broken", self._broken_cause, healthy
        if state is not PoolState.RUNNING:
            return "not_running", f"pool is {state.value}", healthy
        if healthy == POOL_SIZE:
            return "healthy", None, healthy
        sick = [
            f"{w.worker_id} is {w.state}"
            if w.state not in ("idle", "busy")
            else f"{w.worker_id} failed {w.consecutive_failures} tasks in a row"
            for w in self.workers
            if not w.is_healthy()
        ]
        return "degraded", "; ".join(sick), healthy

    async def health_check(self) -> dict[str, Any]:
        """Pool health: ``status`` is healthy, degraded (with ``reason``), broken or not_running."""
        status, reason, healthy = self._health()
        return {
            "pool_id": self.pool_id,
            "status": status,
            "reason": reason,
            "workers_healthy": healthy,
            "workers_total": POOL_SIZE,
            "workers": [w.get_status() for w in self.workers],
        }

    def get_status(self) -> dict[str, Any]:
        """A JSON-ready snapshot of the pool's state and statistics."""
        finished = self.tasks_completed + self.tasks_failed
        status, reason, healthy = self._health()
        latencies = sorted(self._latencies)
        return {
            "pool_id": self.pool_id,
            "state": self._state.value,
            "running": self.running,
            "health": status,
            "health_reason": reason,
            "workers_count": POOL_SIZE,
            "queue_size": len(self._pending),
            "tasks_in_flight": sum(len(w.in_flight) for w in self.workers),
            "tasks_submitted": self.tasks_submitted,
            "tasks_completed": self.tasks_completed,
            "tasks_failed": self.tasks_failed,
            "tasks_cancelled": self.tasks_cancelled,
            "tasks_timed_out": self.tasks_timed_out,
            "tasks_crashed": self.tasks_crashed,
            "workers_restarted": self.workers_restarted,
            "workers_recycled": self.workers_recycled,
            "workers_stuck": self.workers_stuck,
            "success_rate": self.tasks_completed / finished if finished else 1.0,
            "workers_healthy": healthy,
            "latency_p50": _percentile(latencies, 50),
            "latency_p95": _percentile(latencies, 95),
            "latency_p99": _percentile(latencies, 99),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "start_method": self.start_method,
            "handler": self._handler_path,
            "workers": [w.get_status() for w in self.workers],
        }

    def __repr__(self) -> str:
        return (
            f"<WorkerPool {self.pool_id!r} {self._state.value} pending={len(self._pending)} "
            f"in_flight={sum(len(w.in_flight) for w in self.workers)} "
            f"completed={self.tasks_completed} failed={self.tasks_failed}>"
        )


_pool_numbers = itertools.count(1)


def _percentile(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    return stats_lib.quantiles(sorted_values, n=100, method="inclusive")[int(pct) - 1]
