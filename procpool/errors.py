"""The errors procpool raises.

Every failure path ends in one of these, or in the task's own exception type:

    ProcPoolError
    ├── WorkerCrashed            a worker process died while running the task (pid, exit code/signal)
    │   ├── WorkerStuck          ... was judged stuck by the monitor and replaced
    │   └── MemoryLimitExceeded  ... grew past max_memory_mb and was replaced
    ├── TaskTimeout              (also TimeoutError) the task ran past its timeout; worker replaced
    ├── TaskExited               the task raised SystemExit, KeyboardInterrupt, GeneratorExit or
    │                            another BaseException that would end the caller; carried as a failure
    ├── SerializationError       (also pickle.PicklingError) an argument, result or exception
    │                            could not cross the process boundary
    ├── BrokenPool               (also concurrent.futures.BrokenExecutor) workers cannot start
    ├── PoolClosed               (also RuntimeError) the pool is shut down or shutting down
    ├── PoolFull                 the pool's pending queue is at max_pending (sync submit only)
    ├── PoolNotFound             (also KeyError and ValueError) no pool with that id in a PoolManager
    └── NoPoolAvailable          (also ValueError) a PoolManager has no pool that can take work

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

__all__ = (
    "BrokenPool",
    "MemoryLimitExceeded",
    "NoPoolAvailable",
    "PoolClosed",
    "PoolFull",
    "PoolNotFound",
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
