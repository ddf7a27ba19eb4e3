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

import collections
import concurrent.futures
import functools
import itertools
import math
import multiprocessing.context
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from procpool import _log, errors
from procpool._executor_core import (
    P,
    T,
    _Core,
    _cores,
    _executor_numbers,
    _run_chunk,
)
from procpool._pool import POOL_SIZE, WorkerPool
from procpool.errors import RemoteTraceback

__all__ = ("Executor",)

log = _log.get("executor")


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

    def _put(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> concurrent.futures.Future[Any]:
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
