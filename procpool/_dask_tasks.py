"""A DaskPool's task book: the pending queue, one task per ready slot, outcomes, retries, timeouts, cancels.

It registers tasks, sends each to a ready slot through the cluster link, watches its Dask
future and resolves the caller's future once. It never touches a worker process: to stop work
that runs (a timeout, a cancel, a shutdown) it asks the link to kill the worker.

Scheduling is the local pool's (issue 15), built from the same parts: the pending queue is the
core's [`PendingQueue`][procpool._dispatch.PendingQueue] (highest priority first, FIFO within
one), and a failed task is retried or quarantined by the core's rules (``_retry.next_step``);
a map() chunk (a ``ChunkRetry`` policy) is handed back to map as ``RetryItems`` instead, to run
its items again one per task.
A slot holds one task and nothing is prefetched, so a high-priority task waits at most for the
three tasks running when it was queued.

Invariant: every task is in exactly one place: ``pending``, ``delayed`` (waiting out a retry's
back-off), one slot's ``task``, or done (its future resolved once).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import pickle
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import distributed

from procpool import Health, PoolStatistics, _log, _retry
from procpool._dask_link import ClusterLink
from procpool._dask_slots import DaskTask, DaskWorker, SlotState
from procpool._dispatch import PendingQueue
from procpool._messages import decode_error
from procpool._retry import RetryPolicy
from procpool._stats import LATENCY_WINDOW, Counters, PriorityStatistics, percentile
from procpool._task import TaskFuture, TaskState
from procpool.errors import BrokenPool, PoisonTask, SerializationError, TaskTimeout, WorkerCrashed, task_error

__all__ = ("TaskBook",)

log = _log.get("dask")


class TaskBook:
    """Tasks from submission to resolution, for one pool."""

    def __init__(
        self, pool_id: str, link: ClusterLink, max_pending: int, on_scheduler_lost: Callable[[str], None]
    ) -> None:
        self.pool_id = pool_id
        self.link = link
        self.max_pending = max_pending
        self.on_scheduler_lost = on_scheduler_lost
        self.counts = Counters()
        # Tasks waiting for a slot (DaskTasks), highest priority first, oldest first within one.
        self.pending = PendingQueue()
        # Failed tasks waiting out their retry's back-off (their timer is task.timer).
        self.delayed: set[DaskTask] = set()
        # Recent waits (submission to a worker, seconds) per priority, for statistics.
        self.waits: dict[int, collections.deque[float]] = {}
        # Recent poison tasks (newest last), and the digests of their calls: refused at once.
        self.quarantine = _retry.Quarantine()
        # Whether tasks may be sent to workers now (the pool is RUNNING).
        self.sending = False
        # Callers waiting for room in the pending queue, oldest first.
        self._room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # Callers of wait_change(), woken by the next change.
        self._change_waiters: list[asyncio.Future[None]] = []
        # When the pool was made and started, for its statistics.
        self.created_at = time.time()
        self.started_at: float | None = None
        self._ids = itertools.count(1)
        # Watchers of running tasks, referenced until they end.
        self._watchers: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        return sum(w.task is not None for w in self.link.workers)

    def statistics(self, pool_id: str, state: str, health: tuple[str, str | None, int]) -> PoolStatistics:
        """The pool's figures now, as a frozen snapshot (the same type a local pool returns)."""
        counts, workers = self.counts, self.link.workers
        return PoolStatistics(
            pool_id=pool_id,
            state=state,
            health=Health(health[0]),
            health_reason=health[1],
            workers_healthy=health[2],
            queue_size=len(self.pending),
            tasks_in_flight=self.running,
            tasks_submitted=counts.tasks_submitted,
            tasks_completed=counts.tasks_completed,
            tasks_failed=counts.tasks_failed,
            tasks_cancelled=counts.tasks_cancelled,
            tasks_timed_out=counts.tasks_timed_out,
            tasks_crashed=counts.tasks_crashed,
            workers_restarted=sum(w.restarts for w in workers),
            workers_recycled=0,  # a Dask worker is never recycled
            workers_stuck=0,  # nor judged stuck: a timeout is the only limit
            tasks_retried=counts.tasks_retried,
            tasks_quarantined=counts.tasks_quarantined,
            priorities=self._priority_statistics(),
            poison_tasks=tuple(self.quarantine.recent),
            recent_durations=tuple(counts.latencies),
            created_at=self.created_at,
            started_at=self.started_at,
            workers=tuple(w.statistics() for w in workers),
        )

    def _priority_statistics(self) -> tuple[PriorityStatistics, ...]:
        queued = self.pending.counts()
        levels = sorted({*queued, *self.waits}, reverse=True)
        waits = {p: sorted(self.waits.get(p, ())) for p in levels}
        return tuple(PriorityStatistics(p, queued.get(p, 0), len(waits[p]), percentile(waits[p], 50)) for p in levels)

    async def wait_change(self) -> None:
        """Wait until a task ends, a worker is lost or comes back, or the pool breaks."""
        waiter = asyncio.get_running_loop().create_future()
        self._change_waiters.append(waiter)
        await waiter

    def _changed(self) -> None:
        waiters, self._change_waiters = self._change_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def has_room(self) -> bool:
        """Whether a task may be queued now without overtaking a caller waiting for room."""
        return not self._room_waiters and len(self.pending) < self.max_pending

    async def wait_for_room(self, check_open: Callable[[], None]) -> None:
        """Wait in line until the pending queue has room; ``check_open`` raises if the pool closed meanwhile."""
        while not self.has_room():
            waiter = asyncio.get_running_loop().create_future()
            self._room_waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._room_waiters.remove(waiter)
            check_open()
            if len(self.pending) < self.max_pending:
                return

    def on_room(self, count: int | None = None) -> None:
        """Wake ``count`` callers waiting for room, oldest first (all when None)."""
        waiters = self._room_waiters
        while waiters and (count is None or count > 0):
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if count is not None:
                    count -= 1

    def submit(self, payload: bytes, timeout: float | None, priority: int, retry: RetryPolicy | None) -> DaskTask:
        """Queue a task and send it at once if a slot is free (a quarantined call fails at once)."""
        future = TaskFuture(loop=asyncio.get_running_loop())
        task = DaskTask(next(self._ids), payload, future, timeout, time.monotonic(), priority=priority, retry=retry)
        future.book = self  # future.cancel() calls self.cancelled(task)
        future.task = task
        self.counts.tasks_submitted += 1
        poison = self.quarantine.find(payload) if retry is not None else None
        if poison is not None:
            self.resolve(task, False, poison)  # quarantined: the same call is not run again
            return task
        self.pending.append(task)
        self.dispatch()
        return task

    def dispatch(self) -> None:
        """Give each ready slot without a task the next pending task (called after every change)."""
        self._changed()
        if not self.sending:
            return
        for slot in self.link.workers:
            if not self.pending:
                break
            if slot.state == SlotState.READY and slot.task is None and slot.address is not None:
                self._send(slot, cast(DaskTask, self.pending.popleft()))
        self.on_room(self.max_pending - len(self.pending))

    def _send(self, slot: DaskWorker, task: DaskTask) -> None:
        waits = self.waits.get(task.priority)
        if waits is None:
            waits = self.waits[task.priority] = collections.deque(maxlen=LATENCY_WINDOW)
        task.started = time.monotonic()
        waits.append(task.started - task.submitted_at)
        task.state = TaskState.SENT
        task.worker, task.slot, task.worker_id, task.pid = slot, self.link.workers.index(slot), slot.worker_id, slot.pid
        slot.task = task
        # A key of our own: two pools, two runs of one pool, or two attempts never share a Dask result.
        key = f"procpool-{self.pool_id}-{task.id}-{uuid.uuid4().hex[:8]}"
        task.dask_future = self.link.submit(slot, task.payload, key)
        if task.retry is None:
            task.payload = b""  # kept only to send it again
        loop = asyncio.get_running_loop()
        if task.timeout is not None:
            task.timer = loop.call_later(task.timeout, self._on_timeout, task)
        task.watcher = watcher = loop.create_task(self._watch(task), name=f"procpool-dask-watch-{task.id}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, task: DaskTask) -> None:
        """Wait for a running task's Dask future and resolve the caller's future from it."""
        dask_future = task.dask_future
        assert dask_future is not None
        try:
            ok, data = await dask_future
        except distributed.client.FutureCancelledError as exc:
            if task.dask_future is not dask_future:
                return  # we let it go: timed out, cancelled by its caller, shut down or retried
            if exc.reason == "scheduler-connection-lost":
                self.on_scheduler_lost("the connection closed under a running task (scheduler-connection-lost)")
            else:
                self._failed(task, BrokenPool(f"dask cancelled the task ({exc.reason}): {exc.msg or ''}"))
            return
        except distributed.scheduler.KilledWorker as exc:
            self.worker_lost(task.worker, str(exc), task)
            return
        except (OSError, distributed.comm.core.CommClosedError) as exc:
            # The result could not be fetched: the worker or the scheduler went away.
            self.worker_lost(task.worker, f"the result could not be fetched: {type(exc).__name__}: {exc}", task)
            return
        except Exception as exc:  # a Dask-side failure: the worker could not run run_call at all
            self._failed(task, exc)
            return
        if task.dask_future is not dask_future:
            return
        slot = task.worker
        assert slot is not None
        task.duration = time.monotonic() - task.started
        if ok:
            try:
                value = pickle.loads(data)
            except BaseException as err:  # unpickling runs the sender's code: SystemExit included
                error = SerializationError(f"the task's result could not be unpickled in the parent: {err!r}")
                self._failed(task, error)
                return
            slot.tasks_succeeded += 1
            slot.consecutive_failures = 0
            self._finish(task, True, value)
        else:
            slot.tasks_failed += 1
            slot.consecutive_failures += 1
            self._finish(task, False, decode_error(data))

    def _finish(self, task: DaskTask, ok: bool, value: Any) -> None:
        """A task ended on its worker: free the slot, resolve (or retry), send the next task."""
        slot = task.worker
        self._forget(task)
        if slot is not None and slot.task is task:
            slot.task = None
            slot.tasks_processed += 1
            slot.last_activity = time.time()
            if task.duration is not None:
                slot.processing_time += task.duration
                self.counts.latencies.append(task.duration)
        if ok:
            self.resolve(task, True, value)
        else:
            self.fail(task, value)
        self.dispatch()

    def _failed(self, task: DaskTask, error: BaseException) -> None:
        if task.worker is not None:
            task.worker.tasks_failed += 1
            task.worker.consecutive_failures += 1
        self._finish(task, False, error)

    def fail(self, task: DaskTask, error: BaseException) -> None:
        """A task failed: run it again if its retry policy says so, else resolve it with the error.

        The same decision as a local pool's (``_retry.next_step``); the caller detached the task
        from its worker first.
        """
        policy = task.retry
        if policy is None or task.future.done() or not self.sending:
            self.resolve(task, False, error)
            return
        if task.attempts is None:
            task.attempts = []
        what = f"task {task.id} of pool {self.pool_id!r}"
        error = task_error(error)
        step = _retry.next_step(policy, task.attempts, task.pid, None, error, what)
        if step is not error and isinstance(policy, _retry.ChunkRetry):
            # A map() chunk, as on a local pool: which of its items failed is unknown, so none is
            # blamed (nor quarantined); map runs them again one per task, this attempt the first of each.
            self.counts.tasks_retried += 1
            delay = step if isinstance(step, float) else policy.delay(len(task.attempts))
            log.warning(
                "%s (a map chunk) failed (%s: %s); running its items again one per task",
                what,
                type(error).__name__,
                error,
            )
            task.state = TaskState.DONE
            task.future.set_exception(_retry.RetryItems(error, task.attempts, delay))
            return
        if isinstance(step, float):
            self.counts.tasks_retried += 1
            log.warning("%s failed (%s: %s); retrying in %.3g s", what, type(error).__name__, error, step)
            task.state = TaskState.PENDING
            self.delayed.add(task)
            task.timer = asyncio.get_running_loop().call_later(step, self._retry_now, task)
            return
        if isinstance(step, PoisonTask):
            self.counts.tasks_quarantined += 1
            self.quarantine.add(task.payload, step)
            log.error("%s", step)
        self.resolve(task, False, step)

    def count_retry(self) -> None:
        """A failed run is run again by its caller's code (map() retrying an item of a chunk)."""
        self.counts.tasks_retried += 1

    def _retry_now(self, task: DaskTask) -> None:
        """A retry's back-off ended: the task goes back to the front of its priority."""
        task.timer = None
        if task in self.delayed:
            self.delayed.discard(task)
            self.pending.extendleft([task])
            self.dispatch()

    def resolve(self, task: DaskTask, ok: bool, value: Any) -> None:
        """Resolve a task's future once, and count the outcome."""
        task.state = TaskState.DONE
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        future = task.future
        future.task = None  # no cycle left: the task is freed by reference counting
        if future.done():
            return
        if ok:
            self.counts.tasks_completed += 1
            future.set_result(value)
        else:
            self.counts.tasks_failed += 1
            future.set_exception(task_error(value))

    def _forget(self, task: DaskTask) -> None:
        """Detach a task from its run: stop its clock and its watcher, and let Dask forget the run."""
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        if task.watcher is not None and task.watcher is not asyncio.current_task():
            task.watcher.cancel()
        task.watcher = None
        if task.dask_future is not None:
            with contextlib.suppress(Exception):
                task.dask_future.release()  # type: ignore[no-untyped-call]
            task.dask_future = None

    def _on_timeout(self, task: DaskTask) -> None:
        task.timer = None
        slot = task.worker
        if task.state is not TaskState.SENT or slot is None or slot.task is not task:
            return
        self.counts.tasks_timed_out += 1
        log.warning(
            "task %s timed out after %s s on dask worker %s (pid %s); killing the worker",
            task.id,
            task.timeout,
            slot.address,
            slot.pid,
        )
        self.stop(slot, TaskTimeout(task.timeout or 0.0, slot.pid, f"dask worker {slot.address}"), "its task timed out")

    def cancelled(self, task: DaskTask) -> None:
        """A caller cancels a task's future: drop it if it has not started, else kill its worker."""
        self.counts.tasks_cancelled += 1
        if task.state is TaskState.PENDING:
            with contextlib.suppress(ValueError):
                self.pending.remove(task)
            if task.timer is not None:  # waiting out a retry's back-off
                task.timer.cancel()
                task.timer = None
            self.delayed.discard(task)
            task.state = TaskState.DONE
            self.on_room(1)
        elif task.state is TaskState.SENT and task.worker is not None and task.worker.task is task:
            task.state = TaskState.DONE
            self.stop(task.worker, None, "its task was cancelled")

    def stop(self, slot: DaskWorker, error: BaseException | None, why: str) -> None:
        """Fail (retry, or drop) the slot's task and kill its worker, so the work really stops."""
        task = slot.task
        slot.task = None
        if task is not None:
            self._forget(task)
            if error is not None:
                self.fail(task, error)
        self.link.kill(slot, why)
        self.dispatch()

    def worker_lost(self, slot: DaskWorker | None, evidence: str, task: DaskTask | None = None) -> None:
        """The slot's worker died (or left the cluster): its task fails with WorkerCrashed (or is retried).

        With ``task``, only if that task is still the slot's (the news may come late).
        """
        if slot is None or slot.address is None or (task is not None and slot.task is not task):
            return
        task = slot.task
        pid, address = slot.pid, slot.address
        log.warning("dask worker %s (%s, pid %s) died: %s", address, slot.worker_id, pid, evidence)
        self.link.retire(slot)
        slot.task = None
        if task is not None and task.state is not TaskState.DONE:
            self.counts.tasks_crashed += 1
            slot.tasks_failed += 1
            slot.consecutive_failures += 1
            self._forget(task)
            self.fail(task, WorkerCrashed(pid, None, f"dask worker {address} ({slot.worker_id}) was lost: {evidence}"))
        self.dispatch()

    def fail_all(self, error: BaseException, *, running: bool = True) -> None:
        """Fail every queued or delayed task (and every running one, with ``running``) with ``error``."""
        if running:
            for slot in self.link.workers:
                held, slot.task = slot.task, None
                if held is not None:
                    self._forget(held)
                    self.resolve(held, False, error)
        for task in self.pending.take(len(self.pending)):
            self.resolve(cast(DaskTask, task), False, error)
        while self.delayed:
            self.resolve(self.delayed.pop(), False, error)
        self.on_room()
        self._changed()

    async def close(self) -> None:
        """Stop watching: every task is resolved by now."""
        for watcher in list(self._watchers):
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
