"""The engine behind procpool.Executor: one private event loop in one thread, feeding the pools.

See ``procpool/executor.py`` for the threads, the data flow, the lifecycle and the invariants;
this module holds the part that runs in the executor thread (``_Core``) and the chunk runner
that ``Executor.map`` sends to the workers.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import functools
import itertools
import pickle
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from procpool import _log
from procpool._manager import PoolManager
from procpool._pool import POOL_SIZE, WorkerPool
from procpool.errors import BrokenPool, NoPoolAvailable, PoolClosed, SerializationError

__all__ = ()

log = _log.get("executor")

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

    def put(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> concurrent.futures.Future[Any]:
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
            # The manager types its pools PoolLike; these are local (their options were checked
            # against WorkerPool), and the executor reads their processes and options.
            self.slots = [_Slot(pool) for pool in pools if isinstance(pool, WorkerPool)]
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
