"""What crosses between the parent and one worker: framed messages, calls, errors, shared state.

Every message is one frame of ``multiprocessing.connection.Connection``'s wire format (a
big-endian ``!i`` length, or ``-1`` then a ``!Q`` length for huge bodies), so the child reads and
writes plain ``Connection.recv_bytes``/``send_bytes`` while the parent reads and writes the same
bytes on non-blocking file descriptors from its event loop.

A body starts with a fixed binary header ``(seq, kind)`` followed by a pickle. The header is
deliberately not part of the pickle: when a result fails to unpickle in the parent, the parent
still knows which task it belonged to and fails exactly that task (a pickled message object would
take its task id down with it). Tuples of bytes also pickle several times faster than attrs
instances, and this is the hot path.
"""

from __future__ import annotations

import pickle
import struct
import traceback
from collections.abc import Callable
from typing import Any

from procpool.errors import RemoteTraceback, SerializationError

__all__ = ()

# Layout of the small array each worker shares with the parent
# (multiprocessing.RawArray("q", STATE_SIZE)); the parent reads it without a round trip.
CURRENT = 0  # seq of the task running now, 0 when idle
BEAT = 1  # time.monotonic_ns() of the task's start or its last heartbeat()
CANCEL = 2  # CANCEL_RING slots: seq of a committed task cancelled before it started
CANCEL_RING = 512
STATE_SIZE = CANCEL + CANCEL_RING

# parent -> child
CALL = 1  # payload: pickle of (fn, args, kwargs)
EXIT = 2  # no payload; the child leaves its loop
# child -> parent
READY = 10  # seq is the worker's pid; sent first
INIT_FAILED = 11  # payload: utf-8 traceback of the failed handler import or initializer
OK = 12  # payload: pickle of the result
ERROR = 13  # payload: pickle of (type name, traceback text, pickle of the exception or None)
SKIPPED = 14  # the task was cancelled before it started; it did not run

HEADER = struct.Struct("!qB")
_LENGTH = struct.Struct("!i")
_HUGE_LENGTH = struct.Struct("!Q")


def body(seq: int, kind: int, payload: bytes = b"") -> bytes:
    """Build one message body: the header, then the payload."""
    return HEADER.pack(seq, kind) + payload


def frame(data: bytes) -> bytes:
    """Prefix a body with Connection's length header, ready for a raw write."""
    n = len(data)
    if n > 0x7FFFFFFF:
        return _LENGTH.pack(-1) + _HUGE_LENGTH.pack(n) + data
    return _LENGTH.pack(n) + data


class FrameReader:
    """Cut a byte stream read from a pipe into message bodies."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes just read from the pipe; return every body now complete."""
        buf = self._buffer
        buf += data
        bodies = []
        start = 0
        end = len(buf)
        while end - start >= 4:
            (n,) = _LENGTH.unpack_from(buf, start)
            head = 4
            if n == -1:
                if end - start < 12:
                    break
                (n,) = _HUGE_LENGTH.unpack_from(buf, start + 4)
                head = 12
            if end - start < head + n:
                break
            bodies.append(bytes(buf[start + head : start + head + n]))
            start += head + n
        del buf[:start]
        return bodies


def pickle_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call in the caller, so a bad argument fails there and nothing is sent."""
    try:
        return pickle.dumps((fn, args, kwargs), pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        culprit = _find_unpicklable(fn, args, kwargs)
        hint = ""
        if culprit.startswith("the function"):
            hint = " (functions must be defined at module level, so the worker can import them)"
        raise SerializationError(f"cannot send the task to a worker: {culprit} cannot be pickled{hint}: {exc}") from exc


def _find_unpicklable(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    candidates: list[tuple[str, Any]] = [(f"the function {fn!r}", fn)]
    candidates += [(f"argument {i} ({type(a).__qualname__})", a) for i, a in enumerate(args)]
    candidates += [(f"keyword argument {k!r} ({type(v).__qualname__})", v) for k, v in kwargs.items()]
    for label, obj in candidates:
        try:
            pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        except Exception:
            return label
    return "the call"


def encode_error(exc: BaseException) -> bytes:
    """An ERROR payload: the exception's type name, its traceback text, and its pickle if it has one.

    Whatever the exception does when formatted or pickled (its ``__str__`` or ``__reduce__`` may
    raise, even SystemExit), the worker survives and the parent gets an answer.
    """
    try:
        tb = "".join(traceback.format_exception(exc))
    except BaseException as err:
        tb = f"{type(exc).__qualname__} (its traceback could not be formatted: {type(err).__qualname__})"
    try:
        exc_bytes: bytes | None = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
    except BaseException:
        exc_bytes = None
    return pickle.dumps((type(exc).__qualname__, tb, exc_bytes), pickle.HIGHEST_PROTOCOL)


def decode_error(payload: bytes) -> BaseException:
    """Rebuild a task's exception from an ERROR payload, the remote traceback as its cause."""
    name, tb, exc_bytes = pickle.loads(payload)
    exc: BaseException
    if exc_bytes is None:
        exc = SerializationError(f"the task raised {name}, which could not be pickled; see the cause")
    else:
        try:
            exc = pickle.loads(exc_bytes)
            if not isinstance(exc, BaseException):
                raise TypeError(f"it unpickled as {type(exc).__qualname__}")
        except BaseException as err:  # unpickling runs the sender's code: SystemExit included
            exc = SerializationError(
                f"the task raised {name}, which could not be unpickled in the parent ({err!r}); see the cause"
            )
    exc.__cause__ = RemoteTraceback(tb)
    return exc
