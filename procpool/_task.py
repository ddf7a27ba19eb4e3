"""One unit of work in the parent, from submission until its future is resolved.

States::

    PENDING --dispatch--> SENT --result, error, skip, crash, timeout, cancel--> DONE
       |                   |
       +-- cancel ---------+-- requeue (its worker died before starting it) --> PENDING

Invariant: a task is in exactly one place: the pool's pending queue (PENDING), one worker's
``in_flight`` (SENT; the head of it is the task that worker runs), or nowhere (DONE: its future
is resolved, or it was dropped after a cancellation).
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any

import attrs

__all__ = ("Task", "TaskFuture", "TaskReport", "TaskState")


class TaskState(enum.Enum):
    """Where a task is."""

    # In the pool's pending queue, waiting for a worker.
    PENDING = "pending"
    # Written to a worker's call pipe; running if it is the head of the worker's in_flight.
    SENT = "sent"
    # Finished, failed, cancelled or dropped: nothing will touch it again.
    DONE = "done"


class TaskFuture(asyncio.Future[Any]):
    """A task's future that tells the pool of a cancellation at once, inside ``cancel()``.

    asyncio runs done-callbacks a loop step later; in that step a worker could start the task the
    caller has just cancelled, and a cancelled task must never run.

    Who is told: ``book.cancelled(task)``, where ``book`` is the pool's task book (a local pool's
    dispatcher or a Dask pool's; two slot writes per task, no closure and no instance dict). The
    book clears ``task`` when it resolves the future, so a finished task and its future are freed
    by reference counting, not left as a cycle for the garbage collector.
    """

    # Slots, unset until assigned (read with getattr on the rare cancel path).
    __slots__ = ("book", "task")

    book: Any
    task: Any

    def cancel(self, msg: Any = None) -> bool:
        if self.done():
            return False
        task = getattr(self, "task", None)
        if task is not None:
            self.task = None
            self.book.cancelled(task)
        return super().cancel(msg)


@attrs.define(eq=False, repr=False)
class Task:
    """One submitted call: its pickled payload, its future and where it is."""

    id: int
    payload: bytes
    future: TaskFuture
    # Run-time limit in seconds (None: none); the clock starts when a worker takes it.
    timeout: float | None
    submitted_at: float
    state: TaskState = TaskState.PENDING
    # Position in its worker's stream; set when sent.
    seq: int = 0
    # The slot (index and id) it was last sent to, and that slot's pid then.
    slot: int | None = None
    worker_id: str | None = None
    pid: int | None = None
    # The armed run-time limit, while the task is its worker's head.
    timer: asyncio.TimerHandle | None = None
    # Seconds it ran in its worker, once finished there.
    duration: float | None = None
    # Higher runs first; FIFO within a priority (issue 15).
    priority: int = 0
    # The caller's retry policy (a RetryPolicy), and the evidence of its failed attempts.
    retry: Any = None
    attempts: list[Any] | None = None

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.state.value} seq={self.seq}>"


@attrs.frozen
class TaskReport:
    """The outcome of one prompt task, from [`WorkerPool.execute_detailed`][procpool.WorkerPool.execute_detailed]."""

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
