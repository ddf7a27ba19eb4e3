"""procpool.Executor: a ``concurrent.futures.Executor`` for synchronous code, on procpool's pools.

Threads and data flow::

    any thread                             executor thread (a private event loop)
    ----------                             ---------------------------------------
    submit() -> inbox (deque) --one wake-up per burst--> queue (deque, futures PENDING)
                                                            |  feed: at most `limit` tasks per pool
                                                            v  (future -> RUNNING)
                                                         PoolManager -> WorkerPool.submit -> 3 workers
    Future.result() <-- set_result/set_exception <------ done callback (frees room, feeds again)

Lifecycle::

    STARTING --pools ready--> RUNNING --shutdown()--> CLOSING --queue empty, nothing running-->
        manager.stop() --> CLOSED (thread ends)
    STARTING/RUNNING --pools cannot start or all pools broken--> BROKEN (queued futures fail
        with BrokenPool; submit raises it) --shutdown()--> CLOSED

Invariants:
    * Every future ``submit`` returned is resolved exactly once: by its task, by ``cancel()``
      while it waited in the queue, by ``shutdown(cancel_futures=True)``, or with BrokenPool.
    * A future is RUNNING exactly when its task has been handed to a pool; until then it can be
      cancelled, as with ProcessPoolExecutor. Each pool holds at most ``limit`` tasks: one per
      worker plus about AHEAD_SECONDS of measured work, so tiny tasks travel in batches and
      long ones wait here, cancellable.
    * Only the executor thread touches the pools, the manager and the queue; other threads
      touch only the inbox and flags, under ``_lock``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import functools
import itertools
import logging
import math
import multiprocessing.context
import os
import pickle
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

from procpool import errors
from procpool._manager import PoolManager
from procpool._pool import POOL_SIZE, WorkerPool
from procpool.errors import BrokenPool, NoPoolAvailable, PoolClosed, RemoteTraceback, SerializationError

__all__ = ("Executor",)

log = logging.getLogger("procpool.executor")

P = ParamSpec("P")
T = TypeVar("T")

# How much measured work (seconds) a pool may hold beyond one task per worker. Larger keeps
# workers fed with tiny tasks in fewer writes; smaller keeps more futures PENDING (cancellable)
# and lets a second pool take work sooner.
AHEAD_SECONDS = 0.005
# Upper bound on the tasks a pool holds beyond one per worker, however tiny the tasks.
MAX_AHEAD = 1024
# Tasks a pool may hold before any task time has been measured.
INITIAL_LIMIT = 2 * POOL_SIZE
# Seconds each pool's running tasks get to finish once shutdown has drained the queue; only a
# task still running then (impossible unless a future was abandoned) is killed.
STOP_TIMEOUT = 5.0

# Set by the interpreter-exit hook: no executor takes new work after it.
_global_shutdown = False
_cores: weakref.WeakSet[_Core] = weakref.WeakSet()
_executor_numbers = itertools.count(1)


def _python_exit() -> None:
    """At interpreter exit (before atexit hooks), let every executor finish its work, then stop.

    Like the stdlib's executors: work already submitted still runs, then the workers and the
    executor thread end, so none outlives the interpreter.
    """
    global _global_shutdown
    _global_shutdown = True
    cores = list(_cores)
    for core in cores:
        core.request_shutdown(cancel_futures=False)
    for core in cores:
        core.join()


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]


# -- what runs in the workers ------------------------------------------------------------------


def _run_chunk(fn: Callable[..., Any], items: list[Any], star: bool) -> tuple[list[Any], Any]:
    """Run ``fn`` over a map() chunk, stopping at the first error.

    An error on the first item is raised, so it takes the pool's own error path. An error later
    returns the values so far with ``(exception, traceback text)``: the caller yields those
    values, then raises it, as a plain ``map`` would.
    """
    values: list[Any] = []
    try:
        # extend() keeps what it appended before fn raised, and runs the loop in C.
        values.extend(itertools.starmap(fn, items) if star else map(fn, items))
    except BaseException as exc:
        if not values:
            raise
        tb = "".join(traceback.format_exception(exc))
        try:
            pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
        except Exception as err:
            exc = SerializationError(f"the task's exception {type(exc).__qualname__} could not be pickled: {err!r}")
        return values, (exc, tb)
    return values, None


# -- the executor thread -------------------------------------------------------------------------


class _WorkItem:
    """One submitted call, from submit() until it is handed to a pool."""

    __slots__ = ("args", "fn", "future", "kwargs", "timeout")

    def __init__(
        self,
        future: concurrent.futures.Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout


class _Slot:
    """The executor's view of one pool: tasks handed to it and how fast it finishes them."""

    __slots__ = ("busy_since", "gap", "handed", "last_done", "limit", "pool")

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        # Tasks handed to the pool and not finished.
        self.handed = 0
        self.limit = INITIAL_LIMIT
        # Average seconds between two results while every worker was busy (None: not measured).
        self.gap: float | None = None
        self.last_done = 0.0
        # When `handed` last reached POOL_SIZE: gaps are measured from then, not across idleness.
        self.busy_since = 0.0


class _Core:
    """Everything the executor thread owns. The public Executor is a thin facade over it, so
    that dropping the last reference to the Executor shuts it down (the thread holds only this).
    """

    def __init__(self, name: str, pools: int, pool_options: dict[str, Any]) -> None:
        self.name = name
        self.pool_count = pools
        self.pool_options = pool_options
        # Guards the inbox hand-over and the flags below, which other threads read and write.
        self.lock = threading.Lock()
        self.inbox: collections.deque[_WorkItem] = collections.deque()
        # A wake-up is scheduled and has not drained the inbox yet.
        self.wake_pending = False
        self.shutdown_requested = False
        # The cause, once the executor is broken.
        self.broken: str | None = None
        # Executor thread only, from here on.
        self.queue: collections.deque[_WorkItem] = collections.deque()
        self.slots: list[_Slot] = []
        self.by_id: dict[str, _Slot] = {}
        self.manager = PoolManager()
        self.started = False
        self.closing = False
        self.cancel_all = False
        self.loop = asyncio.new_event_loop()
        self.context = contextvars.Context()
        self.idle: asyncio.Future[None] = self.loop.create_future()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- any thread ------------------------------------------------------------------------------

    def put(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        item = _WorkItem(future, fn, args, kwargs, timeout)
        with self.lock:
            if self.broken is not None:
                raise BrokenPool(self.broken)
            if _global_shutdown:
                raise PoolClosed("cannot schedule new futures after interpreter shutdown")
            if self.shutdown_requested:
                raise PoolClosed("cannot schedule new futures after shutdown")
            self.inbox.append(item)
            if not self.wake_pending:
                self.wake_pending = True
                self.loop.call_soon_threadsafe(self._drain_inbox)
        return future

    def request_shutdown(self, cancel_futures: bool) -> None:
        with self.lock:
            first = not self.shutdown_requested
            self.shutdown_requested = True
            if not (first or cancel_futures) or self.loop.is_closed():
                return
            self.loop.call_soon_threadsafe(self._begin_shutdown, cancel_futures)

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def worker_pids(self) -> dict[int, Any]:
        """A snapshot ``pid -> multiprocessing.Process`` of the live workers (read-only)."""
        out = {}
        for slot in list(self.slots):
            for worker in list(slot.pool.workers):
                process, pid = worker.process, worker.pid
                if process is not None and pid is not None:
                    out[pid] = process
        return out

    # -- executor thread -------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException:  # pragma: no cover - _main handles its own errors
            log.exception("%s: the executor thread failed", self.name)
            self._set_broken("the executor thread failed; see the log")
        finally:
            try:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                with self.lock:
                    self.loop.close()
                _cores.discard(self)

    async def _main(self) -> None:
        options = self.pool_options
        try:
            creating = [self.manager.create_pool(f"{self.name}-{i}", **options) for i in range(self.pool_count)]
            pools = await asyncio.gather(*creating)
        except Exception as exc:
            self._set_broken(f"its pools could not start: {exc}")
        else:
            self.slots = [_Slot(pool) for pool in pools]
            self.by_id = {slot.pool.pool_id: slot for slot in self.slots}
            self.started = True
            self._feed()
        try:
            await self.idle
        finally:
            await self.manager.stop(STOP_TIMEOUT)

    def _drain_inbox(self) -> None:
        with self.lock:
            self.wake_pending = False
            inbox, self.inbox = self.inbox, collections.deque()
        if self.broken is not None:
            self._fail_all(inbox)
            return
        if self.cancel_all:
            self._cancel_all(inbox)
            return
        self.queue.extend(inbox)
        self._feed()

    def _begin_shutdown(self, cancel_futures: bool) -> None:
        self._drain_inbox()
        self.closing = True
        if cancel_futures:
            self.cancel_all = True
            self._cancel_all(self.queue)
        self._check_idle()

    def _check_idle(self) -> None:
        if self.closing and not self.queue and not self.idle.done() and not any(s.handed for s in self.slots):
            self.idle.set_result(None)

    def _cancel_all(self, items: collections.deque[_WorkItem]) -> None:
        while items:
            future = items.popleft().future
            if future.cancel():
                future.set_running_or_notify_cancel()  # wakes wait() and as_completed()

    def _fail_all(self, items: collections.deque[_WorkItem]) -> None:
        error = BrokenPool(self.broken)
        while items:
            future = items.popleft().future
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        self._check_idle()

    def _set_broken(self, cause: str) -> None:
        with self.lock:
            if self.broken is None:
                self.broken = f"executor {self.name!r} is broken: {cause}"
                log.error(self.broken)
            inbox, self.inbox = self.inbox, collections.deque()
        self.queue.extend(inbox)
        self._fail_all(self.queue)
        self.closing = True  # a broken executor takes no more work; shutdown() still stops it
        self._check_idle()

    def _pick(self) -> _Slot | None:
        """The least-loaded pool with room for one more task, None if none has room."""
        if len(self.slots) == 1:
            slot = self.slots[0]
            if not slot.pool.running:
                raise NoPoolAvailable(f"pool {slot.pool.pool_id!r} is {slot.pool.state.value}")
        else:
            slot = self.by_id[self.manager.choose_pool("least_loaded").pool_id]
        return slot if slot.handed < slot.limit else None

    def _feed(self) -> None:
        """Hand queued calls to pools while they have room."""
        if not self.started:
            return
        queue = self.queue
        single = len(self.slots) == 1
        while queue:
            try:
                slot = self._pick()
            except (NoPoolAvailable, PoolClosed) as exc:
                self._set_broken(f"no pool can take work: {exc}")
                return
            if slot is None:
                return
            # One pool: fill its room in one go. Several: pick again, as the loads change.
            for _ in range(slot.limit - slot.handed if single else 1):
                if not queue:
                    break
                item = queue.popleft()
                if item.future.set_running_or_notify_cancel():  # False: cancelled while it waited
                    self._hand_off(slot, item)
        self._check_idle()

    def _hand_off(self, slot: _Slot, item: _WorkItem) -> None:
        pool = slot.pool
        fn, args, kwargs, timeout = item.fn, item.args, item.kwargs, item.timeout
        # The pool has the call pickled now: drop the references (gh-16284: no stale references).
        item.fn = item.args = item.kwargs = None  # type: ignore[assignment]
        try:
            if timeout is None:
                task: asyncio.Future[Any] = pool.submit(fn, *args, **kwargs)
            else:
                task = self.loop.create_task(pool.apply(fn, args, kwargs, timeout))
        except Exception as exc:  # SerializationError, or the pool closed under us
            item.future.set_exception(exc)
            return
        del fn, args, kwargs
        slot.handed += 1
        if slot.handed == POOL_SIZE:
            slot.busy_since = time.monotonic()
        # An explicit context: add_done_callback would otherwise copy the current one per task.
        task.add_done_callback(functools.partial(self._task_done, slot, item.future), context=self.context)

    def _task_done(self, slot: _Slot, future: concurrent.futures.Future[Any], task: asyncio.Future[Any]) -> None:
        now = time.monotonic()
        if slot.handed >= POOL_SIZE:
            # Every worker was busy since the last result: the gap measures the pool's pace.
            gap = now - max(slot.last_done, slot.busy_since)
            slot.gap = avg = gap if slot.gap is None else slot.gap + 0.1 * (gap - slot.gap)
            slot.limit = POOL_SIZE + (MAX_AHEAD if avg <= 0 else min(MAX_AHEAD, int(AHEAD_SECONDS / avg)))
            limit = slot.pool.config.max_pending
            if slot.limit > limit:
                slot.limit = limit
        slot.last_done = now
        slot.handed -= 1
        if task.cancelled():
            future.set_exception(PoolClosed("the task was cancelled by its pool's shutdown"))
        else:
            exc = task.exception()
            if exc is None:
                future.set_result(task.result())
            else:
                future.set_exception(exc)
                if isinstance(exc, BrokenPool) and not any(s.pool.running for s in self.slots):
                    self._set_broken(str(exc))
        del task, future
        if self.queue:
            self._feed()
        elif self.closing:
            self._check_idle()


# -- the public facade -----------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer or None, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be greater than 0, got {value}")
    return value


def _default_pools() -> int:
    if hasattr(os, "process_cpu_count"):  # Python 3.13: honours the affinity mask and -X cpu_count
        cpus = os.process_cpu_count() or 1
    elif hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, cpus // POOL_SIZE)


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` running calls in procpool worker processes.

    A drop-in for ``ProcessPoolExecutor`` in synchronous code (and in ``loop.run_in_executor``).
    Workers come in pools of exactly three: ``max_workers`` is rounded up to a multiple of 3, and
    the executor runs ``max_workers / 3`` pools behind a [`PoolManager`][] that hands each task
    to the least-loaded pool. The pools run on a private event loop in one background thread;
    every method may be called from any thread, an event loop's thread included, and only
    ``shutdown(wait=True)`` and ``Future.result()`` block.

    A worker that dies fails only the task it was running ([`WorkerCrashed`][]) and is
    replaced; the executor is never broken by one death. It is broken ([`BrokenPool`][], a
    ``BrokenExecutor``) only when its workers cannot start at all: a failing initializer, a
    crash loop.

    Args:
        max_workers: worker processes wanted, rounded up to a multiple of 3. None: one pool of
            three per three CPUs, at least one pool.
        initializer: called with ``initargs`` in each worker before it takes work. If it raises,
            the workers cannot start and the executor is broken.
        initargs: the initializer's positional arguments.
        task_timeout: run-time limit in seconds for every task; a task past it fails with
            [`TaskTimeout`][] and its worker is replaced. Per call: [`with_options`][].
        max_tasks_per_worker: replace a worker after it has run this many tasks.
        mp_context: accepted for ``ProcessPoolExecutor`` compatibility: a multiprocessing
            context whose start method (``"forkserver"`` or ``"spawn"``) the workers use.
            ``"fork"`` is refused (ValueError): forking a process that runs threads is unsafe.
        max_tasks_per_child: ``ProcessPoolExecutor``'s name for ``max_tasks_per_worker``.
        **pool_options: passed to every [`WorkerPool`][] (``start_method``, ``max_memory_mb``,
            ``stuck_after``, ``replace_stuck``, ``max_pending``, ``handler`` ...).

    Raises:
        ValueError: ``max_workers`` is below 1, or a bad pool option.
        TypeError: an argument has the wrong type.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        task_timeout: float | None = None,
        max_tasks_per_worker: int | None = None,
        mp_context: multiprocessing.context.BaseContext | None = None,
        max_tasks_per_child: int | None = None,
        **pool_options: Any,
    ) -> None:
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError(f"max_workers must be an integer or None, not {type(max_workers).__name__}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        pools = _default_pools() if max_workers is None else math.ceil(max_workers / POOL_SIZE)
        if max_tasks_per_child is not None:
            if max_tasks_per_worker is not None:
                raise TypeError("pass max_tasks_per_worker or max_tasks_per_child, not both")
            max_tasks_per_worker = max_tasks_per_child
        if mp_context is not None:
            if "start_method" in pool_options:
                raise TypeError("pass start_method or mp_context, not both")
            pool_options["start_method"] = mp_context.get_start_method()
        options = dict(
            pool_options,
            initializer=initializer,
            initargs=tuple(initargs),
            task_timeout=task_timeout,
            max_tasks_per_worker=max_tasks_per_worker,
        )
        # Build one pool object here, never started, so that a bad option raises in the caller
        # (TypeError/ValueError) rather than breaking the executor later.
        probe = WorkerPool("executor-options-check", **options)
        self._max_workers = pools * POOL_SIZE
        self._mp_context = multiprocessing.get_context(probe.config.start_method)
        self._core = core = _Core(f"procpool-executor-{next(_executor_numbers)}", pools, options)
        _cores.add(core)
        core.thread.start()
        # Dropping the last reference shuts the executor down without waiting, as the stdlib's do.
        weakref.finalize(self, core.request_shutdown, False).atexit = False

    # -- the Executor API ------------------------------------------------------------------------

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        """Schedule ``fn(*args, **kwargs)`` in a worker; return a future of its result.

        Never blocks. ``fn`` and the arguments are pickled when the task is handed to a pool,
        so a value that cannot be pickled fails the future with [`SerializationError`][]
        (a ``pickle.PicklingError``). ``fn`` may be an ``async def`` function.

        Args:
            fn: a module-level function (plain or ``async def``), so workers can import it.
            *args: its positional arguments.
            **kwargs: its keyword arguments.

        Raises:
            TypeError: ``fn`` is not callable.
            PoolClosed: the executor is shut down (a ``RuntimeError``, as the stdlib raises).
            BrokenPool: the executor is broken (a ``BrokenExecutor``).
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        return self._core.put(fn, args, kwargs, None)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Like the built-in ``map(fn, *iterables)``, run in the workers; results in order.

        Args:
            fn: a module-level function (plain or ``async def``), so workers can import it. It takes
                one argument from each iterable.
            *iterables: the inputs, zipped as the built-in ``map`` does.
            timeout: seconds from this call until the last result; past it, ``__next__`` raises
                ``TimeoutError``. None: no limit.
            chunksize: items sent to a worker as one task. Tiny tasks need large chunks (as for
                ``ProcessPoolExecutor``): ``len(items) / 12`` is a good start.
            buffersize: at most this many chunks submitted and not yet yielded (Python 3.14's
                ``buffersize``); the input is then read as results are consumed. None: every
                chunk is submitted now.

        Raises:
            ValueError: ``chunksize`` or ``buffersize`` is below 1.
            Exception: from ``__next__``: the first failing item's exception, at its position.
        """
        return self._map(fn, iterables, timeout, chunksize, buffersize, None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work; let submitted work finish, then stop the workers and the thread.

        Args:
            wait: block until every submitted task has finished and every worker has exited.
                Called from inside one of the executor's own callbacks, it cannot wait.
            cancel_futures: cancel the futures that have not been handed to a worker yet.
        """
        core = self._core
        core.request_shutdown(cancel_futures)
        if wait:
            core.join()

    # -- procpool additions ----------------------------------------------------------------------

    def with_options(self, *, task_timeout: float | None = None) -> BoundExecutor:
        """A view of this executor whose ``submit`` and ``map`` use other per-task options.

        ``executor.with_options(task_timeout=5).submit(fn, x)`` runs ``fn(x)`` with a 5 s
        run-time limit: past it the task fails with [`TaskTimeout`][] and its worker is
        replaced. In ``map`` the limit applies to each chunk. The view shares the executor's
        workers and lifetime; it has no ``shutdown``.

        Args:
            task_timeout: run-time limit in seconds of each task (of each chunk in ``map``); None:
                the executor's.

        Raises:
            ValueError: ``task_timeout`` is not a positive, finite number of seconds.
        """
        if task_timeout is not None:
            if isinstance(task_timeout, bool) or not isinstance(task_timeout, (int, float)):
                raise TypeError(f"task_timeout must be a number of seconds, not {type(task_timeout).__name__}")
            if not 0 < task_timeout < math.inf:
                raise ValueError(f"task_timeout must be a positive, finite number of seconds, got {task_timeout!r}")
            task_timeout = float(task_timeout)
        return BoundExecutor(self, task_timeout)

    @property
    def pools(self) -> int:
        """How many pools of three workers the executor runs."""
        return self._max_workers // POOL_SIZE

    @property
    def _broken(self) -> str | bool:
        # ProcessPoolExecutor's attribute, read by code that checks whether it is broken.
        return self._core.broken or False

    @property
    def _processes(self) -> dict[int, Any]:
        # ProcessPoolExecutor's attribute: a snapshot pid -> multiprocessing.Process.
        return self._core.worker_pids()

    def __repr__(self) -> str:
        core = self._core
        if core.broken is not None:
            state = "broken"
        elif core.shutdown_requested:
            state = "closed" if not core.thread.is_alive() else "closing"
        else:
            state = "running" if core.started else "starting"
        return f"<procpool.Executor {state} workers={self._max_workers} queued={len(core.queue) + len(core.inbox)}>"

    # -- internals -------------------------------------------------------------------------------

    def _put(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        return self._core.put(fn, args, kwargs, timeout)

    def _map(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        buffersize: int | None,
        task_timeout: float | None,
    ) -> Iterator[Any]:
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an integer, not {type(chunksize).__name__}")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if isinstance(buffersize, bool) or not isinstance(buffersize, int):
                raise TypeError(f"buffersize must be an integer or None, not {type(buffersize).__name__}")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0.")
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        end_time = None if timeout is None else timeout + time.monotonic()
        star = len(iterables) != 1
        items: Iterator[Any] = zip(*iterables, strict=False) if star else iter(iterables[0])
        chunks = iter(functools.partial(_take, items, chunksize), [])
        # The core's put, not self._put: a buffersize iterator must not keep the executor alive.
        put = self._core.put
        submitted = (put(_run_chunk, (fn, chunk, star), {}, task_timeout) for chunk in chunks)
        if buffersize is None:
            futures = collections.deque(submitted)
            return _results(futures, end_time, None)
        futures = collections.deque(itertools.islice(submitted, buffersize))
        # Weak, so that an abandoned iterator does not keep the executor alive.
        return _results(futures, end_time, _Refill(weakref.ref(self), submitted))


class BoundExecutor:
    """[`Executor.with_options`][]'s view: ``submit`` and ``map`` with per-task options."""

    def __init__(self, executor: Executor, task_timeout: float | None) -> None:
        self.executor = executor
        self.task_timeout = task_timeout

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        """[`Executor.submit`][] with this view's options."""
        return self.executor._put(fn, args, kwargs, self.task_timeout)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """[`Executor.map`][] with this view's options (a task timeout limits each chunk)."""
        return self.executor._map(fn, iterables, timeout, chunksize, buffersize, self.task_timeout)

    def __repr__(self) -> str:
        return f"<procpool.BoundExecutor task_timeout={self.task_timeout} of {self.executor!r}>"


def _take(items: Iterator[Any], n: int) -> list[Any]:
    return list(itertools.islice(items, n))


class _Refill:
    """Submits the next chunk of a ``buffersize`` map while its executor is alive and open."""

    def __init__(self, executor: weakref.ref[Executor], submitted: Iterator[Any]) -> None:
        self.executor = executor
        self.submitted = submitted

    def next(self) -> Any:
        if self.executor() is None:
            return None
        return next(self.submitted, None)


def _results(
    futures: collections.deque[concurrent.futures.Future[Any]], end_time: float | None, refill: _Refill | None
) -> Iterator[Any]:
    """Yield each chunk's values in order; cancel what is left if the caller stops early."""
    try:
        while futures:
            if refill is not None:
                nxt = refill.next()
                if nxt is not None:
                    futures.append(nxt)
            future = futures.popleft()
            try:
                if end_time is None:
                    values, failure = future.result()
                else:
                    values, failure = future.result(end_time - time.monotonic())
            finally:
                future.cancel()  # a no-op once it ran; frees a chunk nobody will read
            del future
            values.reverse()
            while values:
                yield values.pop()  # hold no reference to a value once it is yielded
            if failure is not None:
                original, tb = failure
                carrier = errors.task_error(original)  # SystemExit -> TaskExited, as submit() does
                original.__cause__ = RemoteTraceback(tb)
                raise carrier
    finally:
        for future in futures:
            future.cancel()
