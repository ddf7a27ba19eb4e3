"""DaskPool: a pool of three workers of a Dask cluster, with WorkerPool's surface and errors.

Lifecycle (the same [`PoolState`][procpool.PoolState] as a local pool)::

    INITIAL --initialize()--> STARTING --client connected, 3 workers found--> RUNNING --shutdown()--> CLOSING --> CLOSED
                                  |                                              |
                                  +--scheduler unreachable, < 3 workers, ------>  +--scheduler lost--> BROKEN
                                     handler import fails on a worker --> BROKEN

Three parts, as pebble splits its pool, none writing another's fields: DaskPool (options,
lifecycle, public methods, health); TaskBook (``_dask_tasks``: queue, one task per ready slot,
outcomes, timeouts, cancels); ClusterLink (``_dask_link``: client, cluster, three workers pinned
by address and followed through their nannies' restarts, kills, the scheduler's loss)::

    apply/submit/execute/map -> TaskBook.pending (the core's PendingQueue: by priority, FIFO within one)
        -> ClusterLink.submit(run_call, workers=[address])
    a watcher per running task awaits its Dask future -> the caller's future
    KilledWorker, "remove-worker" event -> TaskBook.worker_lost -> WorkerCrashed
    timeout, cancel, shutdown -> TaskBook.stop -> ClusterLink.kill -> the nanny restarts the worker
    a failure its retry= policy covers -> back-off -> front of its priority (or PoisonTask after N kills)
    map() -> the core's MapIterator: a chunk whose worker died -> its items again one per task

Invariants:
    * A slot holds at most one task, and a task runs only on the worker it was sent to: a task
      whose worker died is never re-run elsewhere by Dask, whatever the scheduler's
      ``allowed-failures`` (the pool also sets it to 0 on the clusters it starts).
    * RUNNING implies the scheduler answered within the last SUPERVISE_INTERVAL + PING_TIMEOUT.
    * The pool never shuts down a cluster it did not start.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from procpool import POOL_SIZE, PoolState, PoolStatistics, TaskReport, _dask_worker, _log
from procpool._config import check_seconds, handler_path
from procpool._dask_link import ClusterLink
from procpool._dask_slots import DaskTask, DaskWorker, check_open, pickle_call, pool_health, prompt_call
from procpool._dask_tasks import TaskBook
from procpool._map import MapIterator
from procpool._pool import _check_retry as check_retry
from procpool._progress import ProgressArg, make_progress
from procpool._retry import RetryPolicy
from procpool._stats import status_dict
from procpool.errors import BrokenPool, PoolClosed, PoolFull

__all__ = ("DaskPool",)

log = _log.get("dask")

# Tasks waiting for a worker, per pool (as a local pool's max_pending).
DEFAULT_MAX_PENDING = 100_000
# Seconds to reach a remote scheduler and find three workers there, or to start a local cluster.
DEFAULT_START_TIMEOUT = 60.0
# map() without a chunksize sizes chunks to take about this long in a worker: a Dask round trip
# costs ~10-15 ms, ten times a local pool's, so chunks are ten times longer.
TARGET_CHUNK_SECONDS = 0.1

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
        retry: the default [`RetryPolicy`][procpool.RetryPolicy] of every call (default None:
            a failed task is never run again); a call's own ``retry=`` replaces it. A worker
            that died counts as a kill towards the quarantine, as locally.

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
        retry: RetryPolicy | None = None,
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
        self._handler_path = handler_path(handler)
        self.task_timeout = check_seconds(task_timeout, "task_timeout")
        self.start_timeout = check_seconds(start_timeout, "start_timeout")
        self.address = address
        self.max_pending = max_pending
        self.retry = check_retry(retry)
        self._link = ClusterLink(
            self.pool_id,
            address,
            security,
            tuple(workers) if workers is not None else None,
            on_worker_lost=lambda slot, evidence: self._tasks.worker_lost(slot, evidence),
            on_workers_back=lambda: self._tasks.dispatch(),
            on_scheduler_lost=self._lose_scheduler,
        )
        self._tasks = TaskBook(self.pool_id, self._link, max_pending, self._lose_scheduler)
        self._state = PoolState.INITIAL
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set when initialize() ended, whichever way; later callers wait on it.
        self._started: asyncio.Future[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._closed_event: asyncio.Event | None = None
        self._broken_cause: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def workers(self) -> list[DaskWorker]:
        """The three slots (empty until the pool has started)."""
        return self._link.workers

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
        return self._link.scheduler_address

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
            self._state = PoolState.STARTING
            self._starting = self._loop.create_task(self._start(), name=f"procpool-dask-start-{self.pool_id}")
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
                await self._link.open(self._handler_path)
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
            self._break(f"pool {self.pool_id!r} could not start on {self._link.where()}: {cause}")
            self._started.set_exception(BrokenPool(self._broken_cause))
            self._started.exception()
            self._tasks.fail_all(BrokenPool(self._broken_cause))
            await self._link.close()
            return
        self._state = PoolState.RUNNING
        self._tasks.started_at = time.time()
        self._started.set_result(None)
        self._link.start_supervising()
        self._tasks.sending = True
        log.info("pool %s running on %s: %s", self.pool_id, self._link.where(), [w.address for w in self.workers])
        self._tasks.dispatch()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Refuse new work, let running tasks finish until ``timeout``, then stop.

        Tasks that never started fail with [`PoolClosed`][]; tasks still running at the deadline
        fail with it too and their workers are killed (a remote cluster's nannies replace them).
        A local cluster is closed; a remote one is left running.

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
            if self._starting is not None:
                self._starting.cancel()
                await asyncio.gather(self._starting, return_exceptions=True)
            self._tasks.sending = False  # nothing more is sent, nor retried
            self._tasks.fail_all(PoolClosed(f"pool {self.pool_id!r} shut down before the task ran"), running=False)
            running = [w.task.future for w in self.workers if w.task is not None]
            if running and timeout > 0:
                await asyncio.wait(running, timeout=timeout)
            stopped = PoolClosed(f"pool {self.pool_id!r} shut down; the task was stopped")
            for slot in self.workers:
                if slot.task is not None:
                    self._tasks.stop(slot, stopped, f"pool {self.pool_id!r} shut down while it ran a task")
            await self._tasks.close()
            await self._link.close()
        finally:
            self._state = PoolState.CLOSED
            self._closed_event.set()
            log.info("pool %s shut down", self.pool_id)

    async def __aenter__(self) -> DaskPool:
        await self.initialize()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -- submitting work -------------------------------------------------------------------------
    # Each call takes what WorkerPool's takes and means the same (see its docstrings); what differs
    # is said here. ``priority`` and ``retry`` are the local pool's too: the core's pending queue
    # orders the tasks and the core's retry rules decide what runs again (issue 15).

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, priority: int = 0, retry: RetryPolicy | None = None, **kwargs: Any
    ) -> asyncio.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a Dask worker; return a future of its result.

        As [`WorkerPool.submit`][procpool.WorkerPool.submit], except that cloudpickle ships
        ``fn``, so it need not be importable on the workers.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        options = self._call_options(priority, retry)
        payload = pickle_call(fn, args, kwargs)
        self._check_open()
        if not self._tasks.has_room():
            raise PoolFull(
                f"pool {self.pool_id!r} has {len(self._tasks.pending)} tasks waiting (max_pending); "
                "await pool.apply() to wait for room instead"
            )
        return self._submit(payload, self.task_timeout, *options).future

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
        """Run ``fn(*args, **kwds)`` on a Dask worker and return its result.

        As [`WorkerPool.apply`][procpool.WorkerPool.apply]: the same arguments and errors. A task
        waits at most for the three tasks running when it was queued (nothing is prefetched).
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
        """Run the pool's handler on ``(prompt, context)`` on a Dask worker; return its result.

        As [`WorkerPool.execute`][procpool.WorkerPool.execute]; a worker that cannot import the
        handler fails the prompt with ImportError naming the worker.
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
        """Like ``execute``, but report the outcome instead of raising the task's error.

        As [`WorkerPool.execute_detailed`][procpool.WorkerPool.execute_detailed].
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
        """Run the handler on every prompt concurrently; results (or exceptions) in input order.

        As [`WorkerPool.execute_batch`][procpool.WorkerPool.execute_batch].
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, not {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts must not be empty")
        calls = [self._prompt_call(p, context, timeout) for p in prompts]
        options = self._call_options(priority, retry)
        futures: list[asyncio.Future[Any]] = []
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
        """Yield ``fn(item)`` for every item, in input order, consuming the input lazily.

        As [`WorkerPool.map`][procpool.WorkerPool.map], by the same iterator (``retry=`` per item,
        ``chunks()``), except that without ``chunksize`` the chunks grow until each takes about
        100 ms on a worker (a Dask round trip costs ten times a local one).
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive integer or None, got {chunksize!r}")
        timeout = self._timeout_or_default(timeout)
        priority, retry = self._call_options(priority, retry)
        return MapIterator(
            functools.partial(self._enqueue_at, priority),
            fn,
            iterable,
            chunksize,
            timeout,
            progress,
            f"{self.pool_id}: map",
            retry,
            self._tasks.count_retry,
            run_chunk=_dask_worker.run_chunk,
            pickle=pickle_call,
            target_seconds=TARGET_CHUNK_SECONDS,
        )

    def _call_options(self, priority: Any, retry: Any) -> tuple[int, RetryPolicy | None]:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int (higher runs first), not {type(priority).__name__}")
        return priority, self.retry if retry is None else check_retry(retry)

    def _timeout_or_default(self, timeout: Any) -> float | None:
        return self.task_timeout if timeout is None else check_seconds(timeout, "timeout")

    def _prompt_call(self, prompt: Any, context: Any, timeout: Any) -> tuple[bytes, float | None]:
        return prompt_call(self.pool_id, self._handler_path, prompt, context), self._timeout_or_default(timeout)

    def _check_open(self) -> None:
        check_open(self.pool_id, self._state, self._loop, self._broken_cause)

    async def _enqueue(
        self, payload: bytes, timeout: float | None, priority: int, retry: RetryPolicy | None
    ) -> DaskTask:
        """Start the pool if needed, wait until the pending queue has room, then queue the task."""
        if self._state is PoolState.INITIAL:
            await self.initialize()
        self._check_open()
        await self._tasks.wait_for_room(self._check_open)
        return self._submit(payload, timeout, priority, retry)

    async def _enqueue_at(
        self, priority: int, payload: bytes, timeout: float | None, retry: RetryPolicy | None
    ) -> DaskTask:
        return await self._enqueue(payload, timeout, priority, retry)

    def _submit(self, payload: bytes, timeout: float | None, priority: int, retry: RetryPolicy | None) -> DaskTask:
        self._check_open()
        return self._tasks.submit(payload, timeout, priority, retry)

    def _break(self, cause: str) -> None:
        self._state = PoolState.BROKEN
        self._broken_cause = cause
        log.error("pool %s is broken: %s", self.pool_id, cause)

    def _lose_scheduler(self, cause: str) -> None:
        """The scheduler is gone: the pool breaks and every caller waiting on it gets BrokenPool."""
        if self._state is not PoolState.RUNNING:
            return
        self._break(f"pool {self.pool_id!r} lost {self._link.where()}: {cause}")
        self._tasks.sending = False
        self._tasks.fail_all(BrokenPool(self._broken_cause))
        for slot in self.workers:
            self._link.retire(slot)

    # -- health and statistics -------------------------------------------------------------------

    @property
    def handler(self) -> str | None:
        """The prompt handler's import path, or None when the pool has none."""
        return self._handler_path

    @property
    def load(self) -> int:
        """Tasks waiting plus tasks running on the pool's three workers."""
        return len(self._tasks.pending) + self._tasks.running

    @property
    def health(self) -> str:
        """``healthy``, ``degraded``, ``broken`` or ``not_running``."""
        return self._health()[0]

    def _health(self) -> tuple[str, str | None, int]:
        return pool_health(self._state, self._broken_cause, self.workers)

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

    @property
    def workers_healthy(self) -> int:
        """How many of the three workers are healthy now."""
        return self._health()[2]

    @property
    def recent_failures(self) -> int:
        """Failures in a row, summed over the three workers (for selectors)."""
        return sum(w.consecutive_failures for w in self.workers)

    def statistics(self) -> PoolStatistics:
        """The pool's figures now, as a frozen [`PoolStatistics`][procpool.PoolStatistics]."""
        return self._tasks.statistics(self.pool_id, self._state.value, self._health())

    async def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until the pool is RUNNING with three healthy workers (starting it if needed).

        Args:
            timeout: seconds to wait at most (None: as long as it takes).

        Raises:
            TimeoutError: not healthy within ``timeout``. BrokenPool, PoolClosed: as ``apply``.
        """
        async with asyncio.timeout(check_seconds(timeout, "timeout")):
            if self._state is PoolState.INITIAL:
                await self.initialize()
            while self.health != "healthy":
                self._check_open()
                await self._tasks.wait_change()

    def get_status(self) -> dict[str, Any]:
        """A JSON-ready snapshot of the pool's state and statistics (``backend`` is ``"dask"``)."""
        extra = {"backend": "dask", "running": self.running, "scheduler_address": self.scheduler_address}
        return status_dict(
            self.statistics(), [w.resources() for w in self.workers], handler=self._handler_path, **extra
        )

    def __repr__(self) -> str:
        counts = self._tasks.counts
        return (
            f"<DaskPool {self.pool_id!r} {self._state.value} on {self.scheduler_address or 'a local cluster'} "
            f"pending={len(self._tasks.pending)} running={self._tasks.running} "
            f"completed={counts.tasks_completed} failed={counts.tasks_failed}>"
        )
