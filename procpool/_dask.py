"""DaskPool: a pool of three workers of a Dask cluster, with WorkerPool's surface and errors.

Lifecycle (the same [`PoolState`][procpool.PoolState] as a local pool)::

    INITIAL --initialize()--> STARTING --client connected, 3 workers found--> RUNNING --shutdown()--> CLOSING --> CLOSED
                                  |                                              |
                                  +--scheduler unreachable, < 3 workers, ------>  +--scheduler lost--> BROKEN
                                     handler import fails on a worker --> BROKEN

Slots: the pool pins each of its three slots to one Dask worker, by address, and follows the
worker's nanny across restarts (a restarted worker gets a new address from the same nanny)::

    apply/submit/execute/map -> pending (deque) -> dispatch: one task per idle slot
        client.submit(run_call, payload, workers=[slot.address], allow_other_workers=False)
    watcher awaits the Dask future -> resolve the caller's future
    KilledWorker / "remove-worker" event -> the slot's task fails with WorkerCrashed
    timeout / cancel -> the slot's worker is killed (Client.run(exit_worker)); its nanny restarts it
    supervisor (every SUPERVISE_INTERVAL or on a worker event) -> ping the scheduler, re-find
        each slot's worker by its nanny, break the pool if the scheduler is gone

Invariants:
    * A slot holds at most one task, and a task runs only on the worker it was sent to: a task
      whose worker died is never re-run elsewhere by Dask, whatever the scheduler's
      ``allowed-failures`` (the pool also sets it to 0 on the clusters it starts).
    * Every task is in exactly one place: ``_pending``, one slot's ``task``, or done (its
      future resolved once).
    * The pool never shuts down a cluster it did not start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import os
import pickle
import pkgutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence, Sized
from typing import Any

import attrs
import cloudpickle
import distributed

from procpool import POOL_SIZE, PoolState, TaskReport, _dask_worker
from procpool._progress import ProgressArg, make_progress
from procpool.errors import (
    BrokenPool,
    PoolClosed,
    PoolFull,
    RemoteTraceback,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    task_error,
)

__all__ = ("DaskPool", "DaskWorker")

log = logging.getLogger("procpool.dask")

# Tasks waiting for a worker, per pool (as a local pool's max_pending).
DEFAULT_MAX_PENDING = 100_000
# Seconds to reach a remote scheduler and find three workers there, or to start a local cluster.
DEFAULT_START_TIMEOUT = 60.0
# How often the supervisor pings the scheduler and re-finds the slots' workers, when no worker
# event wakes it earlier. Bounds how late a silent scheduler loss is noticed (plus PING_TIMEOUT).
SUPERVISE_INTERVAL = 1.0
# A scheduler that does not answer a ping this long is lost: the pool breaks.
PING_TIMEOUT = 10.0
# Failures in a row that make a slot unhealthy (as a local worker).
UNHEALTHY_AFTER_FAILURES = 3
# map() without a chunksize sizes chunks to take about this long in a worker: a Dask round trip
# costs ~10-15 ms, ten times a local pool's, so chunks are ten times longer.
TARGET_CHUNK_SECONDS = 0.1
MAX_CHUNKSIZE = 8192


class SlotState:
    """What a slot is doing; a worker is only given work when IDLE."""

    # Waiting for its Dask worker to be found (at start, or after the worker died or was killed).
    STARTING = "starting"
    # Has a worker and no task.
    IDLE = "idle"
    # Its worker runs one of the pool's tasks.
    BUSY = "busy"
    # Its worker left and no nanny will bring it back (a worker started with --no-nanny).
    LOST = "lost"


@attrs.define(eq=False, repr=False)
class DaskWorker:
    """One of a DaskPool's three slots and the Dask worker that currently fills it.

    Read-only for users: ``worker_id``, ``address``, ``pid``, ``state``, ``restarts``,
    ``is_healthy()``, ``get_status()``.
    """

    worker_id: str
    # The nanny that restarts this slot's worker; how the slot finds its worker again after a
    # restart (the worker's own address changes). None for a worker without a nanny.
    nanny: str | None
    # The worker's address now; None while the slot waits for its (restarted) worker.
    address: str | None = None
    # The worker process's pid, on the worker's own host.
    pid: int | None = None
    state: str = SlotState.STARTING
    # The task the worker runs now.
    task: _Task | None = None
    # Addresses this slot's worker had before it died or was killed: never used again.
    retired: set[str] = attrs.Factory(set)
    restarts: int = 0
    tasks_processed: int = 0
    tasks_succeeded: int = 0
    tasks_failed: int = 0
    consecutive_failures: int = 0
    processing_time: float = 0.0
    last_activity: float | None = None

    def is_healthy(self) -> bool:
        """Has a worker, and fewer than three failures in a row."""
        return self.state in (SlotState.IDLE, SlotState.BUSY) and self.consecutive_failures < UNHEALTHY_AFTER_FAILURES

    def get_status(self) -> dict[str, Any]:
        """A JSON-ready snapshot of this slot."""
        finished = self.tasks_succeeded + self.tasks_failed
        return {
            "worker_id": self.worker_id,
            "pid": self.pid,
            "address": self.address,
            "nanny": self.nanny,
            "state": self.state,
            "healthy": self.is_healthy(),
            "restarts": self.restarts,
            "tasks_in_flight": int(self.task is not None),
            "tasks_processed": self.tasks_processed,
            "tasks_succeeded": self.tasks_succeeded,
            "tasks_failed": self.tasks_failed,
            "consecutive_failures": self.consecutive_failures,
            "success_rate": self.tasks_succeeded / finished if finished else 1.0,
            "average_processing_time": self.processing_time / finished if finished else None,
            "last_activity": self.last_activity,
        }

    def __repr__(self) -> str:
        return (
            f"<DaskWorker {self.worker_id} {self.address} pid={self.pid} state={self.state} restarts={self.restarts}>"
        )


@attrs.define(eq=False, repr=False)
class _Task:
    """One unit of work, from submission until its future is resolved."""

    id: int
    payload: bytes
    future: asyncio.Future[Any]
    timeout: float | None
    # "pending" (in the pool's queue), "running" (held by a slot) or "done".
    state: str = "pending"
    slot: DaskWorker | None = None
    # The pid of the worker it was sent to.
    pid: int | None = None
    dask_future: distributed.Future | None = None
    # The coroutine awaiting dask_future; cancelled when the pool settles the task itself.
    watcher: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    started: float = 0.0
    duration: float | None = None

    def __repr__(self) -> str:
        return f"<_Task {self.id} {self.state}>"


class _TaskFuture(asyncio.Future[Any]):
    """A task's future that tells the pool of a cancellation at once, inside ``cancel()``."""

    on_cancel: Callable[[], None] | None = None

    def cancel(self, msg: Any = None) -> bool:
        if self.done():
            return False
        hook, self.on_cancel = self.on_cancel, None
        if hook is not None:
            hook()
        return super().cancel(msg)


def _check_seconds(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def _handler_path(handler: Any) -> str | None:
    """Check a handler here, now, and return the import path the workers resolve."""
    if handler is None:
        return None
    if callable(handler) and not isinstance(handler, str):
        handler = f"{getattr(handler, '__module__', None)}:{getattr(handler, '__qualname__', None)}"
    if not isinstance(handler, str):
        raise TypeError(f"handler must be a 'module:function' string or a function, not {type(handler).__name__}")
    if handler.count(":") != 1 or not all(handler.split(":")):
        raise ValueError(f"handler must look like 'package.module:function', got {handler!r}")
    try:
        found = pkgutil.resolve_name(handler)
    except Exception as exc:
        raise ValueError(f"handler {handler!r} cannot be loaded: {exc}") from exc
    if not callable(found):
        raise ValueError(f"handler {handler!r} is not a function")
    return handler


def _pickle_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call in the caller (with cloudpickle, as Dask would), so a bad argument fails here."""
    try:
        return cloudpickle.dumps((fn, args, kwargs), pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        culprit = "the call"
        labelled = [(f"the function {fn!r}", fn)]
        labelled += [(f"argument {i} ({type(a).__qualname__})", a) for i, a in enumerate(args)]
        labelled += [(f"keyword argument {k!r} ({type(v).__qualname__})", v) for k, v in kwargs.items()]
        for label, obj in labelled:
            try:
                cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
            except Exception:
                culprit = label
                break
        raise SerializationError(f"cannot send the task to a dask worker: {culprit} cannot be pickled: {exc}") from exc


def _decode_error(payload: bytes) -> BaseException:
    """Rebuild a task's exception from the worker's encoding, the remote traceback as its cause."""
    name, tb, exc_bytes = pickle.loads(payload)
    exc: BaseException
    if exc_bytes is None:
        exc = SerializationError(f"the task raised {name}, which could not be pickled; see the cause")
    else:
        try:
            exc = pickle.loads(exc_bytes)
            if not isinstance(exc, BaseException):
                raise TypeError(f"it unpickled as {type(exc).__qualname__}")
        except BaseException as err:  # unpickling runs the sender's code: SystemExit included
            exc = SerializationError(
                f"the task raised {name}, which could not be unpickled in the parent ({err!r}); see the cause"
            )
    exc.__cause__ = RemoteTraceback(tb)
    return exc


_pool_numbers = itertools.count(1)


class DaskPool:
    """A pool of exactly three workers of a Dask cluster, driven from asyncio like [`WorkerPool`][procpool.WorkerPool].

    Without ``address`` the pool starts its own ``LocalCluster`` (three worker processes with
    one thread each, on 127.0.0.1, no dashboard) and closes it at shutdown. With
    ``address="tcp://host:port"`` it connects to a running cluster, takes three of its
    workers, and never shuts that cluster down. See docs/scale-out.md.

    Args:
        pool_id: a name for logs, status and managers; generated when omitted.
        handler: what ``execute`` runs: ``"package.module:function"`` (or a module-level
            function), checked here and imported by each Dask worker at start.
        task_timeout: default run-time limit in seconds for every task (None: no limit). Past
            it the task fails with [`TaskTimeout`][] and its worker is
            killed, so the work really stops; the worker's nanny starts a fresh one.
        address: the scheduler of a running cluster (``"tcp://host:port"``, or ``"tls://..."``);
            None starts a local cluster.
        security: a ``distributed.Security`` (or ``True`` for temporary TLS credentials) for
            a TLS cluster; None uses Dask's configuration.
        workers: which three workers of a remote cluster to take, by address or name (default:
            the first three by address). Ignored for a local cluster.
        max_pending: how many tasks may wait for a worker (default 100,000).
        start_timeout: seconds to start a local cluster, or to reach a remote scheduler and
            find three workers there (default 60).

    Attributes:
        pool_id: the pool's name.
        workers: the three [`DaskWorker`][procpool.dask.DaskWorker] slots.
    """

    def __init__(
        self,
        pool_id: str | None = None,
        handler: str | Callable[..., Any] | None = None,
        *,
        task_timeout: float | None = None,
        address: str | None = None,
        security: Any = None,
        workers: Sequence[str] | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        start_timeout: float | None = DEFAULT_START_TIMEOUT,
    ) -> None:
        if pool_id is not None and (not isinstance(pool_id, str) or not pool_id):
            raise TypeError(f"pool_id must be a non-empty string or None, got {pool_id!r}")
        if address is not None and (not isinstance(address, str) or "://" not in address):
            raise ValueError(f"address must look like 'tcp://host:port', got {address!r}")
        if workers is not None:
            if isinstance(workers, str) or len(workers) != POOL_SIZE or not all(isinstance(w, str) for w in workers):
                raise ValueError(f"workers must name exactly {POOL_SIZE} workers, got {workers!r}")
            if address is None:
                raise ValueError("workers= chooses workers of a remote cluster: pass address= too")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}")
        self.pool_id = pool_id or f"dask-{os.getpid()}-{next(_pool_numbers)}"
        self._handler_path = _handler_path(handler)
        self.task_timeout = _check_seconds(task_timeout, "task_timeout")
        self.start_timeout = _check_seconds(start_timeout, "start_timeout")
        self.address = address
        self.security = security
        self.max_pending = max_pending
        self._wanted = tuple(workers) if workers is not None else None
        self.workers: list[DaskWorker] = []
        self._state = PoolState.INITIAL
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cluster: Any = None
        self._client: distributed.Client | None = None
        # Set when initialize() ended, whichever way; later callers wait on it.
        self._started: asyncio.Future[None] | None = None
        self._closed_event: asyncio.Event | None = None
        self._pending: collections.deque[_Task] = collections.deque()
        # Callers of apply/execute waiting for room in the pending queue, oldest first.
        self._room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._task_ids = itertools.count(1)
        self._broken_cause: str | None = None
        # Wakes the supervisor before its interval ends (a worker joined or left).
        self._wake: asyncio.Event | None = None
        self._supervisor: asyncio.Task[None] | None = None
        # Watchers of running tasks and fire-and-forget kills, referenced until they end.
        self._background: set[asyncio.Task[Any]] = set()
        self._latencies: collections.deque[float] = collections.deque(maxlen=1000)
        self.created_at = time.time()
        self.started_at: float | None = None
        self.tasks_submitted = 0
        self.tasks_completed = 0
        self.tasks_failed = 0
        self.tasks_cancelled = 0
        self.tasks_timed_out = 0
        self.tasks_crashed = 0
        self.workers_restarted = 0

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def state(self) -> PoolState:
        """Where the pool is in its lifecycle (see [`PoolState`][procpool.PoolState])."""
        return self._state

    @property
    def running(self) -> bool:
        """Whether the pool is RUNNING: started, not broken, not shut down."""
        return self._state is PoolState.RUNNING

    @property
    def scheduler_address(self) -> str | None:
        """The address of the scheduler the pool talks to (its own cluster's, once started)."""
        if self._client is not None and self._client.scheduler is not None:
            return str(self._client.scheduler.address)
        return self.address

    async def initialize(self) -> None:
        """Connect (or start a local cluster), take three workers, check the handler on each. Idempotent.

        Raises:
            BrokenPool: the scheduler cannot be reached, it has fewer than three workers, or a
                worker cannot import the handler (the message names the worker).
            PoolClosed: the pool was shut down.
        """
        if self._state is PoolState.RUNNING:
            return
        if self._state in (PoolState.CLOSING, PoolState.CLOSED):
            raise PoolClosed(f"pool {self.pool_id!r} is shut down")
        if self._state is PoolState.BROKEN:
            raise BrokenPool(self._broken_cause)
        if self._state is PoolState.INITIAL:
            self._loop = asyncio.get_running_loop()
            self._started = self._loop.create_future()
            self._closed_event = asyncio.Event()
            self._wake = asyncio.Event()
            self._state = PoolState.STARTING
            starting = self._loop.create_task(self._start(), name=f"procpool-dask-start-{self.pool_id}")
            self._background.add(starting)
            starting.add_done_callback(self._background.discard)
        assert self._started is not None
        try:
            await asyncio.shield(self._started)
        except asyncio.CancelledError:
            if self._state is PoolState.STARTING:
                await asyncio.shield(self.shutdown(timeout=0))
            raise

    async def _start(self) -> None:
        assert self._started is not None
        try:
            async with asyncio.timeout(self.start_timeout):
                await self._connect()
                await self._take_workers()
        except asyncio.CancelledError:
            if not self._started.done():
                self._started.set_exception(PoolClosed(f"pool {self.pool_id!r} was shut down while starting"))
            raise
        except BaseException as exc:
            if self._state is not PoolState.STARTING:  # shut down meanwhile
                return
            cause = exc.args[0] if isinstance(exc, BrokenPool) and exc.args else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, TimeoutError) and not isinstance(exc, BrokenPool):
                cause = f"the pool did not start within {self.start_timeout:g} s (start_timeout)"
            self._break(f"pool {self.pool_id!r} could not start on {self._where()}: {cause}")
            self._started.set_exception(BrokenPool(self._broken_cause))
            self._started.exception()
            await self._close_client()
            return
        self._state = PoolState.RUNNING
        self.started_at = time.time()
        self._started.set_result(None)
        assert self._loop is not None and self._client is not None
        self._client.subscribe_topic("all", self._on_cluster_event)
        self._supervisor = self._loop.create_task(self._supervise(), name=f"procpool-dask-supervisor-{self.pool_id}")
        log.info("pool %s running on %s: %s", self.pool_id, self._where(), [w.address for w in self.workers])
        self._dispatch()

    def _where(self) -> str:
        return f"the dask scheduler at {self.scheduler_address}" if self.address else "a local dask cluster"

    async def _connect(self) -> None:
        if self.address is None:
            # One thread per worker process: a worker runs one task at a time, as a local one.
            # allowed_failures=0: a task whose worker died fails (KilledWorker) instead of being
            # re-run, so a task that may have had effects runs at most once, as locally. The
            # HTTP server (metrics; the dashboard is off) takes a free port on 127.0.0.1 only.
            self._cluster = await distributed.LocalCluster(
                n_workers=POOL_SIZE,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                host="127.0.0.1",
                asynchronous=True,
                silence_logs=False,
                scheduler_kwargs={"allowed_failures": 0, "dashboard_address": "127.0.0.1:0"},
            )
            self._client = await distributed.Client(self._cluster, asynchronous=True, set_as_default=False)
        else:
            kwargs: dict[str, Any] = {"asynchronous": True, "set_as_default": False}
            if self.security is not None:
                kwargs["security"] = self.security
            if self.start_timeout is not None:
                kwargs["timeout"] = self.start_timeout
            self._client = client = distributed.Client(self.address, **kwargs)
            try:
                await client
            except (OSError, TimeoutError) as exc:
                raise BrokenPool(f"cannot reach it: {type(exc).__name__}: {exc}") from exc

    async def _take_workers(self) -> None:
        client = self._client
        assert client is not None
        if self._cluster is None:
            # Async client: this returns a coroutine, whatever its annotation says.
            await client.wait_for_workers(POOL_SIZE)  # type: ignore[func-returns-value,misc]
        info = (await client.scheduler.identity())["workers"]
        if self._wanted is not None:
            by_name = {str(w.get("name")): addr for addr, w in info.items()}
            missing = [w for w in self._wanted if w not in info and w not in by_name]
            if missing:
                raise BrokenPool(f"no worker named {', '.join(map(repr, missing))} among {sorted(info)}")
            chosen = [w if w in info else by_name[w] for w in self._wanted]
        else:
            chosen = sorted(info)[:POOL_SIZE]
        self.workers = [
            DaskWorker(f"{self.pool_id}-w{i}", info[addr].get("nanny"), addr) for i, addr in enumerate(chosen)
        ]
        if self._handler_path is not None:
            checks = await client.run(_dask_worker.check_handler, self._handler_path, workers=chosen, on_error="return")
        else:
            checks = await client.run(os.getpid, workers=chosen, on_error="return")
        for slot in self.workers:
            result = checks.get(slot.address)
            if isinstance(result, BaseException):
                raise BrokenPool(
                    f"dask worker {slot.address} failed its start check: {type(result).__name__}: {result}"
                )
            slot.pid = result
            slot.state = SlotState.IDLE

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Refuse new work, let running tasks finish until ``timeout``, then stop.

        Tasks that never started fail with [`PoolClosed`][]; tasks still
        running at the deadline fail with it too and their workers are killed (a remote
        cluster's nannies replace them). A local cluster is closed; a remote one is left running.

        Args:
            timeout: seconds to let running tasks finish.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
        if self._state is PoolState.INITIAL:
            self._state = PoolState.CLOSED
            return
        assert self._closed_event is not None and self._started is not None
        if self._state in (PoolState.CLOSING, PoolState.CLOSED):
            await self._closed_event.wait()
            return
        self._state = PoolState.CLOSING
        try:
            if not self._started.done():
                self._started.set_exception(PoolClosed(f"pool {self.pool_id!r} was shut down while starting"))
                self._started.exception()
            self._wake_room_waiters()
            never_ran = PoolClosed(f"pool {self.pool_id!r} shut down before the task ran")
            while self._pending:
                self._resolve(self._pending.popleft(), False, never_ran)
            running = [w.task.future for w in self.workers if w.task is not None]
            if running and timeout > 0:
                await asyncio.wait(running, timeout=timeout)
            for slot in self.workers:
                task = slot.task
                if task is not None and not task.future.done():
                    self._resolve(task, False, PoolClosed(f"pool {self.pool_id!r} shut down; the task was stopped"))
                    self._kill_worker(slot, f"pool {self.pool_id!r} shut down while it ran a task")
            if self._supervisor is not None:
                self._supervisor.cancel()
            jobs = [self._supervisor, *self._background] if self._supervisor else list(self._background)
            for job in jobs:
                # A kill must reach its worker before the client goes; everything else stops now.
                if not job.get_name().startswith("procpool-dask-kill"):
                    job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            await self._close_client()
        finally:
            self._state = PoolState.CLOSED
            self._closed_event.set()
            log.info("pool %s shut down", self.pool_id)

    async def _close_client(self) -> None:
        client, cluster = self._client, self._cluster
        self._cluster = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic("all")
            with contextlib.suppress(Exception):
                await client.close()
        if cluster is not None:
            # Closes the nannies, which stop their worker processes; no process is left.
            await cluster.close()

    async def __aenter__(self) -> DaskPool:
        await self.initialize()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -- submitting work -------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a Dask worker; return a future of its result.

        Args:
            fn: a function (plain or ``async def``); cloudpickle ships it, so it need not be
                importable on the workers unless it lives in a module they import.
            *args: its positional arguments.
            **kwargs: its keyword arguments.

        Raises:
            TypeError: ``fn`` is not callable.
            SerializationError: ``fn`` or an argument cannot be pickled (nothing is queued).
            PoolFull: ``max_pending`` tasks are already waiting.
            PoolClosed: the pool is shut down. BrokenPool: it lost its scheduler.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        payload = _pickle_call(fn, args, kwargs)
        self._check_open()
        if self._room_waiters or len(self._pending) >= self.max_pending:
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
        """Run ``fn(*args, **kwds)`` on a Dask worker and return its result.

        Args:
            fn: a function (plain or ``async def``).
            args: its positional arguments.
            kwds: its keyword arguments.
            timeout: run-time limit in seconds (default: the pool's ``task_timeout``).

        Raises:
            Exception: the task's own exception, with the remote traceback as ``__cause__``.
            TaskTimeout: the task ran past its timeout; its worker was killed and restarted.
            WorkerCrashed: the worker died while running it.
            SerializationError: the call, its result or its exception could not cross.
            PoolClosed: the pool is shut down. BrokenPool: it lost (or never reached) its scheduler.
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
        """Run the pool's handler on ``(prompt, context)`` on a Dask worker; return its result.

        Args:
            prompt: the string handed to the handler.
            context: the dict handed to it with the prompt (default: empty).
            timeout: run-time limit in seconds (default: the pool's ``task_timeout``).

        Raises:
            RuntimeError: the pool has no handler.
            ImportError: the worker cannot import the handler (the message names the worker).
            Exception: whatever [`apply`][] raises.
        """
        payload, timeout = self._prompt_call(prompt, context, timeout)
        await self._wait_ready_for_work()
        return await self._submit(payload, timeout).future

    async def execute_detailed(
        self, prompt: str, context: dict[str, Any] | None = None, timeout: float | None = None
    ) -> TaskReport:
        """Like ``execute``, but report the outcome instead of raising the task's error.

        Args:
            prompt: the string handed to the handler.
            context: the dict handed to it with the prompt (default: empty).
            timeout: run-time limit in seconds (default: the pool's ``task_timeout``).

        Raises:
            PoolClosed: the pool is shut down. BrokenPool: it lost its scheduler.
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
        return TaskReport(
            task_id=task.id,
            pool_id=self.pool_id,
            worker_id=task.slot.worker_id if task.slot is not None else None,
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
            timeout: run-time limit of each prompt in seconds.
            progress: ``True`` for a progress bar, or a callable ``callback(done, total)``.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, not {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts must not be empty")
        calls = [self._prompt_call(p, context, timeout) for p in prompts]
        futures: list[asyncio.Future[Any]] = []
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
        100 ms on a worker (a Dask round trip costs ten times a local one). The first item that
        raises ends the iteration with its exception.

        Args:
            fn: a function of one argument (plain or ``async def``).
            iterable: the items, read lazily.
            chunksize: items per chunk (default: sized to about 100 ms of work).
            timeout: run-time limit of each chunk.
            progress: ``True`` for a progress bar, or a callable ``callback(done, total)``.
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
        window: collections.deque[tuple[_Task, int]] = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(window) < 2 * POOL_SIZE + 1:
                    chunk = list(itertools.islice(items, size))
                    if not chunk:
                        exhausted = True
                        break
                    payload = _pickle_call(_dask_worker.run_chunk, (fn, chunk), {})
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
                    raise task_error(_decode_error(error))
        finally:
            reporter.close()
            for task, _ in window:
                task.future.cancel()

    # -- internals: submission and dispatch --------------------------------------------------------

    def _timeout_or_default(self, timeout: Any) -> float | None:
        return self.task_timeout if timeout is None else _check_seconds(timeout, "timeout")

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
        call = (self._handler_path, prompt, context or {})
        return _pickle_call(_dask_worker.run_handler, call, {}), self._timeout_or_default(timeout)

    def _check_open(self) -> None:
        state = self._state
        if state is PoolState.RUNNING or state is PoolState.STARTING:
            if asyncio._get_running_loop() is not self._loop:
                raise RuntimeError(
                    f"pool {self.pool_id!r} was called outside the event loop it was started on; call it "
                    "from that loop's thread"
                )
            return
        if state is PoolState.INITIAL:
            raise RuntimeError(f"pool {self.pool_id!r} is not started: await pool.initialize() or use 'async with'")
        if state is PoolState.BROKEN:
            raise BrokenPool(self._broken_cause)
        raise PoolClosed(f"pool {self.pool_id!r} is shut down")

    async def _wait_ready_for_work(self) -> None:
        """Start the pool if needed, then wait until the pending queue has room."""
        if self._state is PoolState.INITIAL:
            await self.initialize()
        self._check_open()
        while self._room_waiters or len(self._pending) >= self.max_pending:
            assert self._loop is not None
            waiter = self._loop.create_future()
            self._room_waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._room_waiters.remove(waiter)
            self._check_open()
            if len(self._pending) < self.max_pending:
                return

    def _wake_room_waiters(self, count: int | None = None) -> None:
        """Wake ``count`` callers waiting for room, oldest first (all when None)."""
        waiters = self._room_waiters
        while waiters and (count is None or count > 0):
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if count is not None:
                    count -= 1

    def _submit(self, payload: bytes, timeout: float | None) -> _Task:
        self._check_open()
        assert self._loop is not None
        future = _TaskFuture(loop=self._loop)
        task = _Task(next(self._task_ids), payload, future, timeout)
        future.on_cancel = lambda: self._on_cancel(task)
        self.tasks_submitted += 1
        self._pending.append(task)
        self._dispatch()
        return task

    def _dispatch(self) -> None:
        """Give each idle slot one pending task."""
        if self._state is not PoolState.RUNNING:
            return
        for slot in self.workers:
            if not self._pending:
                break
            if slot.state == SlotState.IDLE and slot.address is not None:
                self._send(slot, self._pending.popleft())
        self._wake_room_waiters(self.max_pending - len(self._pending))

    def _send(self, slot: DaskWorker, task: _Task) -> None:
        client = self._client
        assert client is not None and self._loop is not None and slot.address is not None
        task.state = "running"
        task.slot = slot
        task.pid = slot.pid
        task.started = time.monotonic()
        slot.state = SlotState.BUSY
        slot.task = task
        # A key of our own: two pools, or two runs of one pool, never share a Dask result.
        key = f"procpool-{self.pool_id}-{task.id}-{uuid.uuid4().hex[:8]}"
        task.dask_future = client.submit(
            _dask_worker.run_call,
            task.payload,
            key=key,
            workers=[slot.address],
            allow_other_workers=False,
            pure=False,
        )
        task.payload = b""
        if task.timeout is not None:
            task.timer = self._loop.call_later(task.timeout, self._on_timeout, task)
        task.watcher = watcher = self._loop.create_task(self._watch(task), name=f"procpool-dask-watch-{task.id}")
        self._background.add(watcher)
        watcher.add_done_callback(self._background.discard)

    async def _watch(self, task: _Task) -> None:
        """Wait for a running task's Dask future and resolve the caller's future from it."""
        assert task.dask_future is not None
        try:
            ok, data = await task.dask_future
        except distributed.client.FutureCancelledError as exc:
            if task.state == "done":
                return  # we cancelled it: timed out, cancelled by its caller, or shut down
            if exc.reason == "scheduler-connection-lost":
                self._lose_scheduler("the connection closed under a running task (scheduler-connection-lost)")
            else:
                self._task_failed(task, BrokenPool(f"dask cancelled the task ({exc.reason}): {exc.msg or ''}"))
            return
        except distributed.scheduler.KilledWorker as exc:
            self._worker_died(task.slot, str(exc), task)
            return
        except (OSError, distributed.comm.CommClosedError) as exc:
            # The result could not be fetched: the worker or the scheduler went away.
            self._wake_supervisor()
            self._worker_died(task.slot, f"the result could not be fetched: {type(exc).__name__}: {exc}", task)
            return
        except Exception as exc:  # a Dask-side failure: the worker could not run run_call at all
            self._task_failed(task, exc)
            return
        if task.state == "done":
            return
        slot = task.slot
        assert slot is not None
        task.duration = time.monotonic() - task.started
        if ok:
            try:
                value = pickle.loads(data)
            except BaseException as err:  # unpickling runs the sender's code: SystemExit included
                self._task_failed(
                    task, SerializationError(f"the task's result could not be unpickled in the parent: {err!r}")
                )
                return
            slot.tasks_succeeded += 1
            slot.consecutive_failures = 0
            self._finish(task, True, value)
        else:
            slot.tasks_failed += 1
            slot.consecutive_failures += 1
            self._finish(task, False, _decode_error(data))

    def _finish(self, task: _Task, ok: bool, value: Any) -> None:
        """A task ended on its worker: free the slot, resolve, dispatch the next task."""
        task.dask_future = None  # the cluster may forget the result now
        slot = task.slot
        if slot is not None and slot.task is task:
            slot.task = None
            slot.tasks_processed += 1
            slot.last_activity = time.time()
            if task.duration is not None:
                slot.processing_time += task.duration
                self._latencies.append(task.duration)
            if slot.state == SlotState.BUSY:
                slot.state = SlotState.IDLE
        self._resolve(task, ok, value)
        self._dispatch()

    def _task_failed(self, task: _Task, error: BaseException) -> None:
        if task.slot is not None:
            task.slot.tasks_failed += 1
            task.slot.consecutive_failures += 1
        self._finish(task, False, error)

    def _resolve(self, task: _Task, ok: bool, value: Any) -> None:
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
            future.set_exception(task_error(value))

    def _on_timeout(self, task: _Task) -> None:
        task.timer = None
        slot = task.slot
        if task.state != "running" or slot is None or slot.task is not task:
            return
        self.tasks_timed_out += 1
        log.warning(
            "task %s timed out after %s s on dask worker %s (pid %s); killing the worker",
            task.id,
            task.timeout,
            slot.address,
            slot.pid,
        )
        error = TaskTimeout(task.timeout or 0.0, slot.pid, f"dask worker {slot.address}")
        self._stop_slot(slot, error, "its task timed out")

    def _on_cancel(self, task: _Task) -> None:
        """A caller cancels a task's future: drop it if it has not started, else kill its worker."""
        self.tasks_cancelled += 1
        if task.state == "pending":
            with contextlib.suppress(ValueError):
                self._pending.remove(task)
            task.state = "done"
            self._wake_room_waiters(1)
        elif task.state == "running" and task.slot is not None and task.slot.task is task:
            task.state = "done"
            if task.timer is not None:
                task.timer.cancel()
            self._stop_slot(task.slot, None, "its task was cancelled")

    def _stop_slot(self, slot: DaskWorker, error: BaseException | None, why: str) -> None:
        """Fail (or drop) the slot's task and kill its worker, so the work really stops."""
        task = slot.task
        slot.task = None
        if task is not None:
            if error is not None:
                self._resolve(task, False, error)
            self._forget(task)
        self._kill_worker(slot, why)
        self._dispatch()

    def _kill_worker(self, slot: DaskWorker, why: str) -> None:
        """Kill the slot's worker (and its children) through the scheduler; its nanny restarts it."""
        address = slot.address
        self._retire(slot)
        if address is None or self._client is None or self._loop is None:
            return
        log.info("killing dask worker %s (%s): %s", address, slot.worker_id, why)
        job = self._loop.create_task(self._run_kill(address), name=f"procpool-dask-kill-{address}")
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def _run_kill(self, address: str) -> None:
        assert self._client is not None
        try:
            await self._client.run(_dask_worker.exit_worker, workers=[address], wait=False)
        except Exception as exc:  # already gone, or the scheduler is: nothing left to stop
            log.info("could not kill dask worker %s: %r", address, exc)

    def _forget(self, task: _Task) -> None:
        """Settle a running task here: stop watching it and let Dask forget it."""
        task.state = "done"
        if task.watcher is not None and task.watcher is not asyncio.current_task():
            task.watcher.cancel()
        if task.dask_future is not None:
            with contextlib.suppress(Exception):
                task.dask_future.release()
            task.dask_future = None

    def _retire(self, slot: DaskWorker) -> None:
        """The slot's worker is dead or being killed: wait for its nanny's next one."""
        if slot.address is not None:
            slot.retired.add(slot.address)
        slot.address = None
        slot.pid = None
        if slot.state != SlotState.LOST:
            slot.state = SlotState.STARTING
        self._wake_supervisor()

    def _worker_died(self, slot: DaskWorker | None, evidence: str, task: _Task | None = None) -> None:
        """The slot's worker died (or left the cluster): its task fails with WorkerCrashed.

        With ``task``, only if that task is still the slot's (the news may come late).
        """
        if slot is None or slot.address is None or (task is not None and slot.task is not task):
            return
        task = slot.task
        pid, address = slot.pid, slot.address
        log.warning("dask worker %s (%s, pid %s) died: %s", address, slot.worker_id, pid, evidence)
        self._retire(slot)
        slot.task = None
        if task is not None and task.state != "done":
            self.tasks_crashed += 1
            slot.tasks_failed += 1
            slot.consecutive_failures += 1
            error = WorkerCrashed(pid, None, f"dask worker {address} ({slot.worker_id}) was lost: {evidence}")
            self._resolve(task, False, error)
            self._forget(task)
        self._dispatch()

    def _break(self, cause: str) -> None:
        self._state = PoolState.BROKEN
        self._broken_cause = cause
        log.error("pool %s is broken: %s", self.pool_id, cause)

    def _lose_scheduler(self, cause: str) -> None:
        """The scheduler is gone: the pool breaks and every caller waiting on it gets BrokenPool."""
        if self._state is not PoolState.RUNNING:
            return
        self._break(f"pool {self.pool_id!r} lost {self._where()}: {cause}")
        error = BrokenPool(self._broken_cause)
        for slot in self.workers:
            if slot.task is not None:
                self._resolve(slot.task, False, error)
                self._forget(slot.task)
                slot.task = None
            self._retire(slot)
        while self._pending:
            self._resolve(self._pending.popleft(), False, error)
        self._wake_room_waiters()

    # -- internals: the supervisor -----------------------------------------------------------------

    def _on_cluster_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """A worker joined or left the cluster: re-find the slots' workers now, not at the next tick."""
        _, message = event
        if message.get("action") in ("add-worker", "remove-worker"):
            removed = message.get("worker")
            for slot in self.workers:
                if removed is not None and slot.address == removed and message.get("action") == "remove-worker":
                    self._worker_died(slot, f"it left the cluster ({message.get('stimulus_id', 'no reason given')})")
            self._wake_supervisor()

    def _wake_supervisor(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _supervise(self) -> None:
        assert self._wake is not None
        while self._state is PoolState.RUNNING:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SUPERVISE_INTERVAL)
            self._wake.clear()
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pool %s: supervising the dask workers failed", self.pool_id)

    async def _sync(self) -> None:
        """Ping the scheduler; follow each slot's worker through its nanny's restarts."""
        client = self._client
        assert client is not None
        if client.status != "running":
            self._lose_scheduler(f"the connection closed (the client is {client.status!r})")
            return
        try:
            info = (await asyncio.wait_for(client.scheduler.identity(), PING_TIMEOUT))["workers"]
        except (OSError, TimeoutError, distributed.comm.CommClosedError) as exc:
            self._lose_scheduler(f"it did not answer a ping within {PING_TIMEOUT:g} s ({type(exc).__name__}: {exc})")
            return
        if self._state is not PoolState.RUNNING:
            return
        for slot in self.workers:
            if slot.address is not None and slot.address not in info:
                self._worker_died(slot, "it is no longer in the cluster")
        found: dict[DaskWorker, str] = {}
        for slot in self.workers:
            if slot.address is not None or slot.state == SlotState.LOST:
                continue
            if slot.nanny is None:
                slot.state = SlotState.LOST  # no nanny: nothing restarts it
                continue
            for addr, worker in info.items():
                if worker.get("nanny") == slot.nanny and addr not in slot.retired:
                    found[slot] = addr
        if not found:
            return
        pids = await client.run(os.getpid, workers=list(found.values()), on_error="return")
        for slot, addr in found.items():
            if slot.address is not None or self._state is not PoolState.RUNNING:
                continue
            pid = pids.get(addr)
            if isinstance(pid, BaseException) or pid is None:
                continue  # it went again; the next sync looks once more
            slot.address, slot.pid, slot.state = addr, pid, SlotState.IDLE
            slot.restarts += 1
            self.workers_restarted += 1
            log.info("pool %s: slot %s has worker %s (pid %s) again", self.pool_id, slot.worker_id, addr, pid)
        self._dispatch()

    # -- health and statistics -------------------------------------------------------------------

    @property
    def handler(self) -> str | None:
        """The prompt handler's import path, or None when the pool has none."""
        return self._handler_path

    @property
    def load(self) -> int:
        """Tasks waiting plus tasks running on the pool's three workers."""
        return len(self._pending) + sum(w.task is not None for w in self.workers)

    @property
    def health(self) -> str:
        """``healthy``, ``degraded``, ``broken`` or ``not_running``."""
        return self._health()[0]

    def _health(self) -> tuple[str, str | None, int]:
        healthy = sum(w.is_healthy() for w in self.workers)
        if self._state is PoolState.BROKEN:
            return "broken", self._broken_cause, healthy
        if self._state is not PoolState.RUNNING:
            return "not_running", f"pool is {self._state.value}", healthy
        if healthy == POOL_SIZE:
            return "healthy", None, healthy
        sick = [
            f"{w.worker_id} is {w.state}"
            if w.state not in (SlotState.IDLE, SlotState.BUSY)
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
        """A JSON-ready snapshot of the pool's state and statistics (``backend`` is ``"dask"``)."""
        finished = self.tasks_completed + self.tasks_failed
        status, reason, healthy = self._health()
        latencies = sorted(self._latencies)
        return {
            "pool_id": self.pool_id,
            "backend": "dask",
            "scheduler_address": self.scheduler_address,
            "state": self._state.value,
            "running": self.running,
            "health": status,
            "health_reason": reason,
            "workers_count": POOL_SIZE,
            "queue_size": len(self._pending),
            "tasks_in_flight": sum(w.task is not None for w in self.workers),
            "tasks_submitted": self.tasks_submitted,
            "tasks_completed": self.tasks_completed,
            "tasks_failed": self.tasks_failed,
            "tasks_cancelled": self.tasks_cancelled,
            "tasks_timed_out": self.tasks_timed_out,
            "tasks_crashed": self.tasks_crashed,
            "workers_restarted": self.workers_restarted,
            "success_rate": self.tasks_completed / finished if finished else 1.0,
            "workers_healthy": healthy,
            "latency_p50": _percentile(latencies, 50),
            "latency_p95": _percentile(latencies, 95),
            "latency_p99": _percentile(latencies, 99),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "handler": self._handler_path,
            "workers": [w.get_status() for w in self.workers],
        }

    def __repr__(self) -> str:
        return (
            f"<DaskPool {self.pool_id!r} {self._state.value} on {self.scheduler_address or 'a local cluster'} "
            f"pending={len(self._pending)} running={sum(w.task is not None for w in self.workers)} "
            f"completed={self.tasks_completed} failed={self.tasks_failed}>"
        )


def _percentile(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    import statistics

    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(pct) - 1]
