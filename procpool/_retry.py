"""Retries and poison-task quarantine: what a caller's ``retry=RetryPolicy(...)`` decides.

procpool never re-runs a task on its own: a task that died with its worker may have had effects
(a row written, a mail sent), and only the caller knows whether running it again is safe.
``retry=`` is that statement. The decision is taken where a failure becomes the task's error
(the [`Dispatcher`][procpool._dispatch.Dispatcher] for the task's own exceptions and timeouts,
the supervisor's exit handler for crashes), so a retried task keeps its future, its priority and
its place: it goes back to the front of its priority level after the back-off.

Decision for a failed attempt::

    error is PoolClosed/BrokenPool, or not one of policy.on  -> fail with the error
    the task has killed quarantine_after workers              -> fail with PoisonTask (quarantined)
    attempts used up                                          -> fail with the error
    otherwise                                                 -> run again after backoff(n)

A ``map()`` chunk is retried per item, not whole: its policy is a
[`ChunkRetry`][procpool._retry.ChunkRetry], and a failure that would run it again (or quarantine
it: which of its items killed the worker is unknown, so none is blamed) resolves it with
[`RetryItems`][procpool._retry.RetryItems] instead; map then runs its items again one per task,
each with the chunk's failed attempt as its first (see ``procpool._map``).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable
from typing import Any

import attrs

from procpool.errors import (
    Attempt,
    BrokenPool,
    PoisonTask,
    PoolClosed,
    TaskTimeout,
    WorkerCrashed,
)

__all__ = ("QUARANTINE_SIZE", "ChunkRetry", "Quarantine", "RetryItems", "RetryPolicy", "next_step", "payload_digest")

# How much of a stuck or crashed task's stack an Attempt keeps.
STACK_EXCERPT = 2000
# Recent poison tasks a pool lists in its status, and quarantined calls it refuses at once.
QUARANTINE_SIZE = 100


def _check_on(value: Any) -> tuple[type[BaseException], ...]:
    types: tuple[Any, ...] = (value,) if isinstance(value, type) else tuple(value)
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise TypeError(f"on must be an exception type or a tuple of them, got {value!r}")
    return types


def _positive_int(_: Any, attribute: Any, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


def _backoff(_: Any, attribute: Any, value: Any) -> None:
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"backoff must be a non-negative number of seconds or a callable, got {value!r}")


@attrs.frozen
class RetryPolicy:
    """When a failed task runs again; opt-in, because only the caller knows a task is idempotent.

    Attributes:
        attempts: how many times the task may run in all, the first run included (default 3).
        on: the failures that are retried (default ``(WorkerCrashed,)``: the worker died, was
            stuck or over its memory limit, so the task did not complete). Add ``TaskTimeout``
            to retry timeouts, or the task's own exception types to retry those.
            ``PoolClosed`` and ``BrokenPool`` are never retried.
        backoff: seconds before the next run: a number is the first delay, doubled at each
            retry and capped at ``max_backoff``; a callable gets the number of the failed
            attempt (1, 2 ...) and returns the delay.
        max_backoff: the cap of the doubling back-off, in seconds.
        quarantine_after: a task that has killed this many workers (crashes, stuck or memory
            kills, timeouts) is poison: it fails with [`PoisonTask`][procpool.PoisonTask] and is
            not run again (default: ``attempts``).
    """

    attempts: int = attrs.field(default=3, validator=_positive_int)
    on: tuple[type[BaseException], ...] = attrs.field(default=(WorkerCrashed,), converter=_check_on)
    backoff: float | Callable[[int], float] = attrs.field(default=0.1, validator=_backoff)
    max_backoff: float = 5.0
    quarantine_after: int | None = attrs.field(default=None, validator=_positive_int)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 for the first run)."""
        if callable(self.backoff):
            return max(0.0, float(self.backoff(attempt)))
        return float(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))


@attrs.frozen
class ChunkRetry(RetryPolicy):
    """The policy of a map() chunk of several items: the caller's, and a failure of the chunk that
    the policy would retry is handed back to map as [`RetryItems`][procpool._retry.RetryItems]."""

    @classmethod
    def of(cls, policy: RetryPolicy) -> ChunkRetry:
        return cls(policy.attempts, policy.on, policy.backoff, policy.max_backoff, policy.quarantine_after)


class RetryItems(Exception):
    """A map() chunk failed in a way its policy retries: run its items again, one per task.

    Internal: only map() awaits a chunk's future. ``attempts`` is the chunk's evidence (one
    attempt), each item's first; ``delay`` the back-off before they run.
    """

    def __init__(self, error: BaseException, attempts: list[Attempt], delay: float) -> None:
        super().__init__(f"the chunk failed ({type(error).__name__}: {error}); its items run again one per task")
        self.error = error
        self.attempts = attempts
        self.delay = delay


def _killed_worker(error: BaseException) -> bool:
    return isinstance(error, (WorkerCrashed, TaskTimeout)) and not isinstance(error, PoisonTask)


def _evidence(number: int, pid: int | None, exitcode: int | None, error: BaseException) -> Attempt:
    stack = None
    if isinstance(error, WorkerCrashed) and "\nstack of the " in error.detail:
        # A stuck worker's stack, captured before its kill, or a crashed one's (fatal signal).
        stack = error.detail.split("\nstack of the ", 1)[1][-STACK_EXCERPT:]
    exitcode = getattr(error, "exitcode", None) or exitcode
    return Attempt(
        number,
        getattr(error, "pid", None) or pid,
        exitcode,
        f"{type(error).__name__}: {error}",
        _killed_worker(error),
        stack,
    )


def next_step(
    policy: RetryPolicy, attempts: list[Attempt], pid: int | None, exitcode: int | None, error: BaseException, what: str
) -> Any:
    """Record a failed attempt; return the delay before the next one, or the error to fail with.

    ``pid`` and ``exitcode`` are the worker's that ran it, when the error does not carry them.

    Returns a float (retry after that many seconds) or the exception the task fails with.
    """
    if isinstance(error, (PoolClosed, BrokenPool, PoisonTask)) or not isinstance(error, policy.on):
        return error
    attempts.append(_evidence(len(attempts) + 1, pid, exitcode, error))
    kills = sum(1 for a in attempts if a.killed_worker)
    if _killed_worker(error) and kills >= (policy.quarantine_after or policy.attempts):
        return PoisonTask(what, tuple(attempts))
    if len(attempts) >= policy.attempts:
        return error
    return policy.delay(len(attempts))


def payload_digest(payload: bytes) -> bytes:
    """What identifies a call for the quarantine: a hash of its pickled bytes, and for a call with
    buffers out of band (an ``OutOfBand``), of its function part and its buffers too, which its
    pickle leaves out. Hashed only while something is quarantined, and when quarantining."""
    digest = hashlib.blake2b(getattr(payload, "function", b""), digest_size=16)
    digest.update(payload)
    for buffer in getattr(payload, "buffers", ()):
        digest.update(buffer.nbytes.to_bytes(8, "little"))  # the pickle does not say where one ends
        digest.update(buffer)
    return digest.digest()


class Quarantine:
    """A pool's recent poison tasks: listed in its status, and the same call (the same pickled
    bytes) submitted again with a retry policy is refused at once with its PoisonTask."""

    def __init__(self, size: int = QUARANTINE_SIZE) -> None:
        self.recent: collections.deque[PoisonTask] = collections.deque(maxlen=size)
        self._size = size
        self._by_call: dict[bytes, PoisonTask] = {}

    def add(self, payload: bytes, poison: PoisonTask) -> None:
        """Quarantine the call whose pickled bytes are ``payload``."""
        self.recent.append(poison)
        self._by_call[payload_digest(payload)] = poison
        while len(self._by_call) > self._size:
            del self._by_call[next(iter(self._by_call))]

    def find(self, payload: bytes) -> PoisonTask | None:
        """The PoisonTask of this call if it is quarantined."""
        return self._by_call.get(payload_digest(payload)) if self._by_call else None
