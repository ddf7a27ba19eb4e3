"""What crosses the pipes between the parent and one worker, and how it is framed.

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

import struct

__all__ = ()

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
