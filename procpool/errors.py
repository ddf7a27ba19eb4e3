"""The errors procpool raises.

Every failure path ends in one of these, or in the task's own exception type:

    ProcPoolError
    ├── WorkerCrashed            a worker process died while running the task (pid, exit code/signal)
    │   ├── WorkerStuck          ... was judged stuck by the monitor and replaced
    │   ├── MemoryLimitExceeded  ... grew past max_memory_mb and was replaced
    │   └── PoisonTask           the task killed its worker on every retry: quarantined, with
    │                            every attempt's evidence (retry=RetryPolicy(...) only)
    ├── TaskTimeout              (also TimeoutError) the task ran past its timeout; worker replaced
    ├── TaskExited               the task raised SystemExit, KeyboardInterrupt, GeneratorExit or
    │                            another BaseException that would end the caller; carried as a failure
    ├── SerializationError       (also pickle.PicklingError) an argument, result or exception
    │                            could not cross the process boundary
    ├── BrokenPool               (also concurrent.futures.BrokenExecutor) workers cannot start
    ├── PoolClosed               (also RuntimeError) the pool is shut down or shutting down
    ├── PoolFull                 the pool's pending queue is at max_pending (sync submit only)
    ├── PoolNotFound             (also KeyError and ValueError) no pool with that id in a PoolManager
    ├── NoPoolAvailable          (also ValueError) a PoolManager has no pool that can take work
    ├── DependencyFailed         a task graph's task did not run: a task it needs failed
    └── GraphFailed              run_graph: some tasks failed (each one's error, the results of the rest)

A task's own exception is re-raised in the caller as its own type, with a
[`RemoteTraceback`][] (the worker-side traceback text) as ``__cause__``. Two kinds cannot be
re-raised as they are without harming the caller, so they are carried the way PEP 479 does:
``StopIteration`` and ``StopAsyncIteration`` (which asyncio futures and generators refuse) arrive
as ``RuntimeError`` with the original as ``__cause__``; a ``BaseException`` that is not an
``Exception`` (``SystemExit``, ``KeyboardInterrupt``, a task's own ``asyncio.CancelledError``)
arrives as [`TaskExited`][], so a task can never exit, interrupt or cancel its caller.

All errors pickle: their fields are positional arguments kept in ``args``.
"""

from __future__ import annotations

import concurrent.futures
import pickle
import signal
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = (
    "Attempt",
    "BrokenPool",
    "DependencyFailed",
    "GraphFailed",
    "MemoryLimitExceeded",
    "NoPoolAvailable",
    "PoolClosed",
    "PoolFull",
    "PoolNotFound",
    "PoisonTask",
    "ProcPoolError",
    "RemoteTraceback",
    "SerializationError",
    "TaskExited",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerStuck",
    "describe_exit",
    "task_error",
)


def describe_exit(exitcode: int | None) -> str:
    """Say how a process ended: ``exit code 3``, ``signal SIGKILL`` or ``exit status unknown``.

    Args:
        exitcode: a process's exit code as ``multiprocessing`` reports it: negative for a signal,
            None when unknown.
    """
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class ProcPoolError(Exception):
    """Base class of every error procpool raises itself."""

    # What str() says when the error was raised without a message.
    default_message = "procpool error"

    def __str__(self) -> str:
        # Explicit, so KeyError's quoting and multiple inheritance never change the message.
        return str(self.args[0]) if self.args else self.default_message


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as ``__cause__``.

    Args:
        tb: the worker-side traceback, as text.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class WorkerCrashed(ProcPoolError):
    """The worker process running the task died; the pool replaced it.

    Args:
        pid: the dead worker's process id (None if it never had one).
        exitcode: its exit code, negative for a signal, None when unknown.
        detail: what else is known: the task, the likely cause.

    Attributes:
        pid: the dead worker's process id.
        exitcode: its exit code, negative for a signal (``-9`` is SIGKILL).
        detail: what else is known (the task, the likely cause).
    """

    def __init__(self, pid: int | None, exitcode: int | None, detail: str = "") -> None:
        super().__init__(pid, exitcode, detail)
        self.pid = pid
        self.exitcode = exitcode
        self.detail = detail

    def __str__(self) -> str:
        text = f"worker pid {self.pid} died ({describe_exit(self.exitcode)}) while running the task"
        return f"{text}: {self.detail}" if self.detail else text


class WorkerStuck(WorkerCrashed):
    """The worker held the task without progress for too long; it was killed and replaced.

    ``detail`` carries the evidence: how long, CPU seconds, psutil status and the task's stack.
    """

    def __str__(self) -> str:
        return f"worker pid {self.pid} was stuck and replaced: {self.detail}"


class MemoryLimitExceeded(WorkerCrashed):
    """The worker's RSS passed ``max_memory_mb`` while running the task; it was replaced."""

    def __str__(self) -> str:
        return f"worker pid {self.pid} exceeded its memory limit and was replaced: {self.detail}"


class Attempt(NamedTuple):
    """The evidence of one failed run of a task, as [`PoisonTask`][] carries it."""

    # 1 for the first run.
    number: int
    # The worker process that ran it, and how that process ended (negative: a signal).
    pid: int | None
    exitcode: int | None
    # ``"TypeName: message"`` of the failure.
    error: str
    # Whether the failure cost the worker its life (a crash, a stuck or memory kill, a timeout).
    killed_worker: bool = False
    # The end of the task's stack when one was captured (a stuck worker's, or a crashed one's
    # after a fatal signal such as SIGSEGV), else None.
    stack: str | None = None

    def __str__(self) -> str:
        how = describe_exit(self.exitcode) if self.exitcode is not None else "exit status unknown"
        return f"attempt {self.number}: pid {self.pid}, {how}: {self.error}"


class PoisonTask(WorkerCrashed):
    """The task killed a worker on each of its last attempts; it is quarantined and not run again.

    Only tasks submitted with ``retry=RetryPolicy(...)`` are retried, so only they can become
    poison. The pool's status lists recent poison tasks, and a later submission of the very same
    call (same pickled bytes) with a retry policy fails at once with this error.

    Args:
        description: which task, on which pool.
        attempts: one [`Attempt`][] per failed run, oldest first.

    Attributes:
        attempts: one [`Attempt`][] per failed run (pid, exit code or signal, error, stack excerpt).
        pid: the pid of the last worker it killed; ``exitcode`` how that worker ended.
    """

    def __init__(self, description: str, attempts: tuple[Attempt, ...]) -> None:
        ProcPoolError.__init__(self, description, tuple(attempts))
        self.description = description
        self.attempts = tuple(attempts)
        last = self.attempts[-1] if self.attempts else None
        self.pid = last.pid if last else None
        self.exitcode = last.exitcode if last else None
        self.detail = description

    def __str__(self) -> str:
        runs = "; ".join(str(a) for a in self.attempts)
        return f"{self.description} was quarantined after killing {len(self.attempts)} workers ({runs})"


class TaskTimeout(ProcPoolError, TimeoutError):
    """The task ran longer than its timeout; its worker (and its process tree) was killed.

    Args:
        timeout: the limit in seconds.
        pid: the worker that ran it, or None if it never started.
        detail: what else is known.

    Attributes:
        timeout: the limit in seconds.
        pid: the worker that ran it, or None if it never started.
    """

    def __init__(self, timeout: float, pid: int | None = None, detail: str = "") -> None:
        super().__init__(timeout, pid, detail)
        self.timeout = timeout
        self.pid = pid
        self.detail = detail

    def __str__(self) -> str:
        where = f" on worker pid {self.pid}" if self.pid is not None else ""
        text = f"task timed out after {self.timeout:g} s{where}; the worker was killed and replaced"
        return f"{text}: {self.detail}" if self.detail else text


class TaskExited(ProcPoolError):
    """The task raised a ``BaseException`` that is not an ``Exception``; the worker survived it.

    ``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit`` or an ``asyncio.CancelledError``
    raised by the task itself would end, interrupt or cancel the caller if re-raised there, so
    they arrive as this error instead; the original is its ``__cause__``.

    Args:
        exc_type: the original exception's type name, e.g. ``"SystemExit"``.
        code: ``SystemExit.code`` for a ``SystemExit``, else None.

    Attributes:
        exc_type: the original exception's type name, e.g. ``"SystemExit"``.
        code: ``SystemExit.code`` for a ``SystemExit``, else None.
    """

    def __init__(self, exc_type: str, code: object = None) -> None:
        super().__init__(exc_type, code)
        self.exc_type = exc_type
        self.code = code

    def __str__(self) -> str:
        if self.exc_type == "SystemExit":
            return f"the task raised SystemExit({self.code!r}); it was treated as the task's failure"
        return f"the task raised {self.exc_type}; it was treated as the task's failure"


def task_error(exc: BaseException) -> BaseException:
    """What the caller of a task that raised ``exc`` gets: ``exc`` itself, or a carrier for it.

    ``StopIteration``/``StopAsyncIteration`` become ``RuntimeError`` (as PEP 479 does) and other
    non-``Exception`` errors [`TaskExited`][], each with the original as ``__cause__``.

    Args:
        exc: the exception the task raised, as unpickled in the parent.
    """
    if isinstance(exc, (StopIteration, StopAsyncIteration)):
        carrier: BaseException = RuntimeError(f"the task raised {type(exc).__name__}")
    elif not isinstance(exc, Exception):
        carrier = TaskExited(type(exc).__qualname__, exc.code if isinstance(exc, SystemExit) else None)
    else:
        return exc
    carrier.__cause__ = exc
    return carrier


class SerializationError(ProcPoolError, pickle.PicklingError):
    """A task's function, argument, result or exception could not be pickled or unpickled."""

    default_message = "serialization failed"


class BrokenPool(ProcPoolError, concurrent.futures.BrokenExecutor):
    """The pool cannot run work: its workers fail to start (crash loop or failing initializer)."""

    default_message = "the pool is broken"


class PoolClosed(ProcPoolError, RuntimeError):
    """The pool is shut down (or shutting down) and takes no more work."""

    default_message = "the pool is closed"


class PoolFull(ProcPoolError):
    """``submit`` found ``max_pending`` tasks already waiting; await ``apply`` to wait for room."""

    default_message = "the pool's pending queue is full"


class PoolNotFound(ProcPoolError, KeyError, ValueError):
    """A PoolManager has no pool with the given id."""

    default_message = "no such pool"


class NoPoolAvailable(ProcPoolError, ValueError):
    """A PoolManager has no running pool to route the task to."""

    default_message = "no pool available"


class DependencyFailed(ProcPoolError):
    """A task graph's task was not run because a task it needs failed.

    Args:
        task: the name of the task that did not run.
        root: the name of the failed task at the root of the chain.
        error: ``"TypeName: message"`` of the root task's error (the error itself is ``__cause__``).
    """

    def __init__(self, task: str, root: str, error: str) -> None:
        super().__init__(task, root, error)
        self.task = task
        self.root = root
        self.error = error

    def __str__(self) -> str:
        return f"task {self.task!r} did not run: it depends on {self.root!r}, which failed with {self.error}"


class GraphFailed(ProcPoolError):
    """``run_graph``: some tasks failed; the others ran to the end.

    Args:
        errors: task name -> its error (the failed tasks' own errors, [`DependencyFailed`][] for
            the tasks that depended on them).
        results: task name -> result, for the tasks that succeeded.
    """

    def __init__(self, errors: Mapping[str, BaseException], results: Mapping[str, Any]) -> None:
        super().__init__(dict(errors), dict(results))
        self.errors = dict(errors)
        self.results = dict(results)

    @property
    def roots(self) -> dict[str, BaseException]:
        """The failed tasks that are not mere dependants: the causes."""
        return {k: e for k, e in self.errors.items() if not isinstance(e, DependencyFailed)}

    def __str__(self) -> str:
        causes = "; ".join(f"{k!r} failed with {type(e).__name__}: {e}" for k, e in self.roots.items())
        skipped = sorted(k for k, e in self.errors.items() if isinstance(e, DependencyFailed))
        text = f"task graph failed: {causes}"
        return f"{text}; not run because of it: {', '.join(skipped)}" if skipped else text
