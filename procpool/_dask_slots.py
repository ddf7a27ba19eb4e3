"""The parts of a DaskPool that hold no behaviour: its slots, its tasks, and how calls and errors
are pickled on the way to a Dask worker and back. Its counters, statistics and status dictionaries
are the core's (``_stats``), and its task is the core's [`Task`][procpool._task.Task] with the
Dask worker and future added, so the core's pending queue and retry rules take it.

Each field of a [`DaskWorker`][procpool.dask.DaskWorker] has one writer: the cluster link
(``_dask_link``) writes the worker's address, pid and state; the task book (``_dask_tasks``)
writes ``task`` and the task counters.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from typing import Any

import attrs
import cloudpickle
import distributed

from procpool import POOL_SIZE, PoolState, WorkerStatistics, _dask_worker
from procpool._stats import worker_dict
from procpool._task import Task
from procpool.errors import BrokenPool, PoolClosed, SerializationError

__all__ = (
    "DaskTask",
    "DaskWorker",
    "SlotState",
    "check_open",
    "pickle_call",
    "pool_health",
    "prompt_call",
)

# Failures in a row that make a slot unhealthy (as a local worker).
UNHEALTHY_AFTER_FAILURES = 3


class SlotState:
    """Whether a slot has a worker; a READY slot without a task is given the next one."""

    # Waiting for its Dask worker to be found (at start, or after the worker died or was killed).
    STARTING = "starting"
    # Has a live worker (idle or busy, as ``task`` says).
    READY = "ready"
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
    # A SlotState; written by the cluster link only.
    state: str = SlotState.STARTING
    # Addresses this slot's worker had before it died or was killed: never used again.
    retired: set[str] = attrs.Factory(set)
    restarts: int = 0
    # The task the worker runs now; this and the counters below are the task book's.
    task: DaskTask | None = None
    tasks_processed: int = 0
    tasks_succeeded: int = 0
    tasks_failed: int = 0
    consecutive_failures: int = 0
    processing_time: float = 0.0
    last_activity: float | None = None

    @property
    def activity(self) -> str:
        """``idle`` or ``busy`` for a slot with a worker, else its SlotState (as a local worker reports)."""
        if self.state != SlotState.READY:
            return self.state
        return "busy" if self.task is not None else "idle"

    def is_healthy(self) -> bool:
        """Has a worker, and fewer than three failures in a row."""
        return self.state == SlotState.READY and self.consecutive_failures < UNHEALTHY_AFTER_FAILURES

    def resources(self) -> dict[str, Any]:
        """What a slot's status adds to its statistics: where its worker is (a local worker adds psutil's figures)."""
        return {"address": self.address, "nanny": self.nanny}

    def get_status(self) -> dict[str, Any]:
        """A JSON-ready snapshot of this slot (the keys of a local worker's, with ``address`` and ``nanny``)."""
        return worker_dict(self.statistics(), self.resources())

    def statistics(self) -> WorkerStatistics:
        """This slot now, as a frozen snapshot."""
        return WorkerStatistics(
            worker_id=self.worker_id,
            pid=self.pid,
            state=self.activity,
            healthy=self.is_healthy(),
            restarts=self.restarts,
            tasks_in_flight=int(self.task is not None),
            tasks_processed=self.tasks_processed,
            tasks_succeeded=self.tasks_succeeded,
            tasks_failed=self.tasks_failed,
            consecutive_failures=self.consecutive_failures,
            processing_time=self.processing_time,
            last_activity=self.last_activity,
        )

    def __repr__(self) -> str:
        return f"<DaskWorker {self.worker_id} {self.address} pid={self.pid} {self.activity} restarts={self.restarts}>"


@attrs.define(eq=False, repr=False)
class DaskTask(Task):
    """One unit of work: the core's [`Task`][procpool._task.Task] (priority, retry policy, attempts,
    state: PENDING in the queue, SENT to a Dask worker, DONE), plus where it runs on the cluster.

    ``slot`` is the index of the slot it was sent to; ``worker`` is that slot.
    """

    worker: DaskWorker | None = None
    # The Dask future of the run under way; None once settled (the cluster may then forget it).
    dask_future: distributed.Future[Any] | None = None
    # The coroutine awaiting dask_future; cancelled when the pool settles the task itself.
    watcher: asyncio.Task[None] | None = None
    started: float = 0.0

    def __repr__(self) -> str:
        return f"<DaskTask {self.id} {self.state.value} priority={self.priority}>"


def check_open(pool_id: str, state: PoolState, loop: asyncio.AbstractEventLoop | None, broken: str | None) -> None:
    """Raise what a call to a pool in ``state`` must raise (nothing when it takes work)."""
    if state is PoolState.RUNNING or state is PoolState.STARTING:
        if asyncio._get_running_loop() is not loop:
            raise RuntimeError(
                f"pool {pool_id!r} was called outside the event loop it was started on; call it from that loop's thread"
            )
        return
    if state is PoolState.INITIAL:
        raise RuntimeError(f"pool {pool_id!r} is not started: await pool.initialize() or use 'async with'")
    if state is PoolState.BROKEN:
        raise BrokenPool(broken)
    raise PoolClosed(f"pool {pool_id!r} is shut down")


def pickle_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call in the caller (with cloudpickle, as Dask would), so a bad argument fails here."""
    try:
        data: bytes = cloudpickle.dumps((fn, args, kwargs), pickle.HIGHEST_PROTOCOL)
        return data
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


def prompt_call(pool_id: str, handler: str | None, prompt: Any, context: Any) -> bytes:
    """Check a prompt and pickle the call of the pool's handler on it."""
    if handler is None:
        raise RuntimeError(
            f"pool {pool_id!r} has no prompt handler: create it with "
            "handler='package.module:function' (for example 'procpool.handlers:echo')"
        )
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, not {type(prompt).__name__}")
    if context is not None and not isinstance(context, dict):
        raise TypeError(f"context must be a dict or None, not {type(context).__name__}")
    return pickle_call(_dask_worker.run_handler, (handler, prompt, context or {}), {})


def pool_health(state: PoolState, broken_cause: str | None, workers: list[DaskWorker]) -> tuple[str, str | None, int]:
    """``(health, reason, healthy workers)``, as a local pool reports them."""
    healthy = sum(w.is_healthy() for w in workers)
    if state is PoolState.BROKEN:
        return "broken", broken_cause, healthy
    if state is not PoolState.RUNNING:
        return "not_running", f"pool is {state.value}", healthy
    if healthy == POOL_SIZE:
        return "healthy", None, healthy
    sick = [
        f"{w.worker_id} is {w.state}"
        if w.state != SlotState.READY
        else f"{w.worker_id} failed {w.consecutive_failures} tasks in a row"
        for w in workers
        if not w.is_healthy()
    ]
    return "degraded", "; ".join(sick), healthy
