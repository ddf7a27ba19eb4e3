"""The task side of a pool: the pending queue, room for callers, dispatch, timeouts, cancellation.

Like pebble's task manager, the [`Dispatcher`][procpool._dispatch.Dispatcher] registers tasks,
hands them to ready workers, times them out and resolves their futures; it never starts or reaps
a process (a timeout or a cancellation of a running task asks the worker's slot to kill it).

Topology::

    submit -> pending (by priority, FIFO within one; <= max_pending) -> dispatch --call pipe i--> worker i
    callers waiting for room: a FIFO of futures, one woken per place that frees up
    a failed task whose retry policy says so -> delayed (back-off timer) -> front of its priority

Priorities (issue 15): a higher ``priority`` leaves the pending queue first, FIFO within a
priority. What is already written to a worker cannot be taken back, so the bound on how long a
high-priority task waits is the prefetch window: it never starts after more than the tasks
already handed to workers when it was submitted (at most ``window`` per worker: one while tasks
take over ~2 ms, ``MAX_WINDOW`` for tiny ones), whatever the number of lower-priority tasks queued.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from procpool import _log, _retry
from procpool._config import PoolConfig
from procpool._messages import CANCEL_RING
from procpool._monitor import KILL_GRACE
from procpool._stats import LATENCY_WINDOW, Counters
from procpool._task import Task, TaskFuture, TaskState
from procpool._worker import Worker, WorkerState
from procpool.errors import PoisonTask, PoolFull, TaskTimeout, task_error

__all__ = ("Dispatcher", "PendingQueue")

log = _log.get("pool")

# How much queued work (in seconds of measured task time) a worker may hold beyond the task it
# runs. Tiny tasks then travel many per syscall; tasks over ~2 ms are sent one at a time, so a
# slow task never holds up work that another worker could take.
PREFETCH_SECONDS = 0.002
# Tasks in one worker's pipe at most: the child's cancel ring must be able to hold them all.
MAX_WINDOW = CANCEL_RING // 2


class PendingQueue:
    """Tasks waiting for a worker: the highest priority first, FIFO within a priority.

    One deque per priority level; with a single level (the usual case) every operation is a
    deque operation plus a list lookup.
    """

    __slots__ = ("_len", "_levels", "_order")

    def __init__(self) -> None:
        # priority -> its tasks, oldest first (levels are kept once created).
        self._levels: dict[int, collections.deque[Task]] = {}
        # The priorities that have tasks, highest first (negated, for bisect).
        self._order: list[int] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Task]:
        for negated in self._order:
            yield from self._levels[-negated]

    def _level(self, priority: int) -> collections.deque[Task]:
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = collections.deque()
        if not level:
            bisect.insort(self._order, -priority)
        return level

    def append(self, task: Task) -> None:
        level = self._levels.get(task.priority)
        if level:  # the hot path: the level already has tasks
            level.append(task)
        else:
            self._level(task.priority).append(task)
        self._len += 1

    def extendleft(self, tasks: list[Task]) -> None:
        """Put tasks back at the front of their priority levels, keeping their order."""
        for task in reversed(tasks):
            self._level(task.priority).appendleft(task)
        self._len += len(tasks)

    def popleft(self) -> Task:
        return self.take(1)[0]

    def take(self, count: int) -> list[Task]:
        """Remove and return up to ``count`` tasks, in the order they must run."""
        taken: list[Task] = []
        order = self._order
        while order and len(taken) < count:
            level = self._levels[-order[0]]
            want = count - len(taken)
            if want >= len(level):
                taken.extend(level)
                level.clear()
                del order[0]
            else:
                taken.extend(level.popleft() for _ in range(want))
        self._len -= len(taken)
        return taken

    def remove(self, task: Task) -> None:
        """Remove a task (ValueError if it is not queued)."""
        level = self._levels.get(task.priority)
        if level is None:
            raise ValueError("task not queued")
        level.remove(task)
        self._len -= 1
        if not level:
            self._order.remove(-task.priority)

    def counts(self) -> dict[int, int]:
        """Tasks queued per priority, highest first."""
        return {-negated: len(self._levels[-negated]) for negated in self._order}


class Dispatcher:
    """Tasks from submission to resolution, for one pool's workers."""

    def __init__(
        self,
        pool_id: str,
        config: PoolConfig,
        workers: Sequence[Worker],
        counters: Counters,
        recycle: Callable[[Worker, str], None],
    ) -> None:
        self.pool_id = pool_id
        self._config = config
        self._workers = workers
        self._counters = counters
        self._recycle = recycle
        self._loop: asyncio.AbstractEventLoop | None = None
        # Tasks waiting for a worker, highest priority first, oldest first within a priority.
        self.pending = PendingQueue()
        # Failed tasks waiting for their retry's back-off to end (their timer is task.timer).
        self.delayed: set[Task] = set()
        # Recent waits (submission to dispatch, seconds) per priority, for statistics.
        self.waits: dict[int, collections.deque[float]] = {}
        # Recent poison tasks (newest last), and the digests of their calls: refused at once.
        self.quarantine = _retry.Quarantine()
        self._ids = itertools.count(1)
        self._dispatch_scheduled = False
        # Whether dispatch may send work (the pool is RUNNING).
        self.open = False
        # Callers waiting for room in the pending queue, woken one per free place, oldest first;
        # room_granted counts the woken ones that have not submitted yet (their place is taken).
        self.room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.room_granted = 0
        # Smoothed task duration, for the prefetch window.
        self._avg_duration: float | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def in_flight(self) -> int:
        return sum(len(w.in_flight) for w in self._workers)

    # -- room ------------------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether a sync submit may queue a task now (never ahead of callers waiting in line)."""
        return not self.room_waiters and len(self.pending) + self.room_granted < self._config.max_pending

    def check_room(self) -> None:
        if not self.has_room():
            raise PoolFull(
                f"pool {self.pool_id!r} has {len(self.pending)} tasks waiting (max_pending); "
                "await pool.apply() to wait for room instead"
            )

    async def wait_for_room(self) -> None:
        """Wait in line until the pending queue has a place for one more task."""
        if self.has_room():
            return
        # One waiter is woken per place that frees up, so 10,000 waiters cost 10,000 wake-ups,
        # not 10,000 per freed place.
        assert self._loop is not None
        waiter = self._loop.create_future()
        self.room_waiters.append(waiter)
        self.update_room()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.room_granted -= 1  # woken, then cancelled: pass the place on
                self.update_room()
            else:
                with contextlib.suppress(ValueError):  # update_room may have dropped it already
                    self.room_waiters.remove(waiter)
            raise
        self.room_granted -= 1
        if self.room_waiters:
            # Our task may go straight to an idle worker and leave the queue's place free: after
            # it is submitted (this step), let the next waiter see whether there is room.
            self._loop.call_soon(self.update_room)

    def update_room(self) -> None:
        """Wake as many callers waiting for room as the pending queue has free places, FIFO."""
        waiters = self.room_waiters
        free = self._config.max_pending - len(self.pending) - self.room_granted
        while waiters and free > 0:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.room_granted += 1
                free -= 1

    def wake_all(self) -> None:
        """Wake every caller waiting for room (the pool is closing or broken: they will see it)."""
        while self.room_waiters:
            waiter = self.room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.room_granted += 1

    # -- submission and dispatch -------------------------------------------------------------------

    def submit(self, payload: bytes, timeout: float | None, priority: int = 0, retry: Any = None) -> Task:
        """Queue a task (the caller checked the pool is open and that there is room)."""
        loop = self._loop
        assert loop is not None
        future = TaskFuture(loop=loop)
        task = Task(next(self._ids), payload, future, timeout, time.monotonic(), priority=priority, retry=retry)
        future.book = self  # future.cancel() calls self.cancelled(task)
        future.task = task
        self._counters.tasks_submitted += 1
        if retry is not None:
            poison = self.quarantine.find(payload)
            if poison is not None:
                self.resolve(task, False, poison)  # quarantined: the same call is not run again
                return task
        pending = self.pending
        if not pending and self.open:
            # Fast path for latency: an idle worker takes the task right now.
            for worker in self._workers:
                if worker.state is WorkerState.IDLE and not worker.in_flight:
                    self._send(worker, [task])
                    return task
        pending.append(task)
        self.schedule()
        return task

    def schedule(self) -> None:
        """Dispatch pending tasks at the next loop step (once, however often asked)."""
        if self.pending and not self._dispatch_scheduled:
            assert self._loop is not None
            self._dispatch_scheduled = True
            self._loop.call_soon(self.dispatch)

    def _window(self) -> int:
        avg = self._avg_duration
        if avg is None:
            return 1  # nothing measured yet: assume tasks are long
        return max(1, min(MAX_WINDOW, int(PREFETCH_SECONDS / avg) + 1)) if avg > 0 else MAX_WINDOW

    def dispatch(self) -> None:
        """Hand pending tasks to ready workers, spreading them evenly, one write per worker."""
        self._dispatch_scheduled = False
        pending = self.pending
        if not pending or not self.open:
            self.update_room()
            return
        window = self._window()
        ready = [w for w in self._workers if w.state in _TAKES_WORK and len(w.in_flight) < window]
        ready.sort(key=lambda w: len(w.in_flight))
        limit = self._config.max_tasks_per_worker
        for i, worker in enumerate(ready):
            if not pending:
                break
            share = -(-len(pending) // (len(ready) - i))
            take = min(share, window - len(worker.in_flight))
            if limit is not None:
                take = min(take, limit - worker.sent_count)
            batch = pending.take(take)
            if batch:
                self._send(worker, batch)
        self.update_room()

    def _send(self, worker: Worker, batch: list[Task]) -> None:
        now = time.monotonic()
        priority = None
        recent: collections.deque[float] | None = None
        for task in batch:
            if task.priority != priority or recent is None:
                priority = task.priority
                recent = self.waits.get(priority)
                if recent is None:
                    recent = self.waits[priority] = collections.deque(maxlen=LATENCY_WINDOW)
            recent.append(now - task.submitted_at)
        worker.send(batch)
        self.arm_head(worker)
        limit = self._config.max_tasks_per_worker
        if limit is not None and worker.sent_count >= limit:
            self._recycle(worker, f"it has run {limit} tasks (max_tasks_per_worker)")

    def requeue(self, tasks: list[Task]) -> None:
        """Put tasks that never started back at the front of their priority, in their order."""
        for task in tasks:
            # Its clock restarts on its next worker: one armed while it was its old worker's
            # head (a child skipping it after a kill) would fire for the old slot.
            if task.timer is not None:
                task.timer.cancel()
                task.timer = None
            task.state = TaskState.PENDING
            task.slot = None
        self.pending.extendleft(tasks)
        self.schedule()

    # -- retries (issue 15) ------------------------------------------------------------------------

    def fail(self, task: Task, error: BaseException, exitcode: int | None = None) -> None:
        """A task failed: run it again if its retry policy says so, else resolve it with the error.

        ``exitcode``: how its worker ended, when the failure cost the worker its life (evidence).
        """
        policy = task.retry
        if policy is None or task.future.done() or not self.open:
            self.resolve(task, False, error)
            return
        if task.attempts is None:  # made at the first failure: most tasks never fail
            task.attempts = []
        what = f"task {task.id} of pool {self.pool_id!r}"
        error = task_error(error)
        step = _retry.next_step(policy, task.attempts, task.pid, exitcode, error, what)
        if step is not error and isinstance(policy, _retry.ChunkRetry):
            # A map() chunk: which of its items failed is unknown, so none is blamed (nor
            # quarantined); map runs them again one per task, this attempt the first of each.
            self._counters.tasks_retried += 1
            delay = step if isinstance(step, float) else policy.delay(len(task.attempts))
            log.warning(
                "%s (a map chunk) failed (%s: %s); running its items again one per task",
                what,
                type(error).__name__,
                error,
            )
            self._settle(task)
            task.future.set_exception(_retry.RetryItems(error, task.attempts, delay))
            return
        if isinstance(step, float):
            self._counters.tasks_retried += 1
            log.warning("%s failed (%s: %s); retrying in %.3g s", what, type(error).__name__, error, step)
            task.state = TaskState.PENDING
            task.slot = None
            self.delayed.add(task)
            assert self._loop is not None
            task.timer = self._loop.call_later(step, self._retry_now, task)
            return
        if isinstance(step, PoisonTask):
            self._counters.tasks_quarantined += 1
            self.quarantine.add(task.payload, step)
            log.error("%s", step)
        self.resolve(task, False, step)

    def count_retry(self) -> None:
        """A failed run is run again by its caller's code (map() retrying an item of a chunk)."""
        self._counters.tasks_retried += 1

    def _retry_now(self, task: Task) -> None:
        task.timer = None
        if task in self.delayed:
            self.delayed.discard(task)
            self.requeue([task])

    def fail_waiting(self, error: BaseException) -> None:
        """Fail every task that is not in a worker: queued, or waiting to be retried."""
        for task in self.pending.take(len(self.pending)):
            self.resolve(task, False, error)
        while self.delayed:
            self.resolve(self.delayed.pop(), False, error)

    # -- outcomes ----------------------------------------------------------------------------------

    def _settle(self, task: Task) -> None:
        """Mark a task done (its clock stopped) without resolving its future."""
        task.state = TaskState.DONE
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        # No cycle left: the task is freed as soon as nothing else holds it, not by the garbage collector.
        task.future.task = None

    def resolve(self, task: Task, ok: bool, value: Any) -> None:
        """Resolve a task's future once, and count the outcome."""
        self._settle(task)
        future = task.future
        if future.done():
            return
        if ok:
            self._counters.tasks_completed += 1
            future.set_result(value)
        else:
            self._counters.tasks_failed += 1
            # A task's StopIteration or SystemExit must reach its caller as a failure, never as
            # a TypeError from asyncio here (which would strand this future and the results read
            # after it) nor as an exit of the caller.
            future.set_exception(task_error(value))

    def finished(self, task: Task, ok: bool, value: Any, duration: float | None) -> None:
        """A worker ran the task: record its duration and resolve it (or retry it)."""
        task.duration = duration
        if duration is not None:
            self._counters.latencies.append(duration)
            avg = self._avg_duration
            self._avg_duration = duration if avg is None else avg + 0.1 * (duration - avg)
        if ok or task.retry is None:
            self.resolve(task, ok, value)
        else:
            self.fail(task, value)

    def fail_all(self, error: BaseException) -> None:
        """Fail every task the pool holds, queued, waiting to be retried or in a worker."""
        self.fail_waiting(error)
        for worker in self._workers:
            for task in worker.in_flight:
                self.resolve(task, False, error)

    # -- timeouts and cancellation -----------------------------------------------------------------

    def arm_head(self, worker: Worker) -> None:
        """Start the run-time clock of the task the worker runs now, if it has a limit."""
        if worker.in_flight and worker.state is not WorkerState.DEAD:
            head = worker.in_flight[0]
            if head.timeout is not None and head.timer is None:
                assert self._loop is not None
                head.timer = self._loop.call_later(head.timeout, self._on_timeout, worker, head)

    def _on_timeout(self, worker: Worker, task: Task) -> None:
        task.timer = None
        if task.state is not TaskState.SENT or task.slot != worker.index or task.future.done():
            return
        error = TaskTimeout(task.timeout or 0.0, worker.pid)
        if not worker.kill(error, KILL_GRACE, seq=task.seq):
            # It finished as its clock ran out, its reply waiting in the pipe to be read: the
            # kill would have hit the task its worker runs now instead.
            return
        self._counters.tasks_timed_out += 1
        if task.retry is not None and isinstance(error, task.retry.on):
            # Retried: the task stays in its worker until the kill ends it; the exit handler
            # then hands the timeout to fail(), which retries it.
            log.warning("task %s timed out after %s s; killing worker %s", task.id, task.timeout, worker.worker_id)
            return
        log.warning(
            "task %s timed out after %s s on worker %s (pid %s); replacing the worker",
            task.id,
            task.timeout,
            worker.worker_id,
            worker.pid,
        )
        self.resolve(task, False, error)

    def cancelled(self, task: Task) -> None:
        """A caller cancels a task's future: drop it if it has not started, else kill its worker."""
        self._counters.tasks_cancelled += 1
        if task.state is TaskState.PENDING:
            try:
                self.pending.remove(task)
            except ValueError:
                pass
            if task.timer is not None:  # waiting to be retried
                task.timer.cancel()
                task.timer = None
            self.delayed.discard(task)
            task.state = TaskState.DONE
            self.update_room()
        elif task.state is TaskState.SENT and task.slot is not None:
            worker = self._workers[task.slot]
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

    def priority_statistics(self) -> dict[int, tuple[int, list[float]]]:
        """Per priority: tasks queued now and recent waits (seconds from submission to a worker)."""
        queued = self.pending.counts()
        return {
            p: (queued.get(p, 0), list(self.waits.get(p, ()))) for p in sorted({*queued, *self.waits}, reverse=True)
        }


_TAKES_WORK = (WorkerState.IDLE, WorkerState.BUSY)
