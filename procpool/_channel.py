"""The parent's end of one worker process's pipes and shared memory, on the event loop.

Writes never block the loop: what the call pipe will not take now waits in a queue of
memoryviews (sliced, never moved) and goes out with ``writev`` when the pipe drains. Reads take
whatever the result pipe holds and cut it into bodies without copying (``FrameReader``).

Copies of a large buffer on its way (see docs/design.md, "The data path"):

* call: the caller's object -> the call area (``send``), then the area -> the worker's own
  object (``_messages.loads`` in the child). Two copies, no pickle of the data, no pipe.
* result: the worker's object -> the result area (``_child``), then the area -> the parent's
  own object (``load_result``), or for a large numpy array, a block of the channel's
  ``_shm.Landing``, reused once the array is gone. Two copies.
* when an area is full (calls prefetched behind a running task, or results not read yet), the
  buffers go inline through the pipe instead: slower, never blocked, never unbounded.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from procpool import _messages as m
from procpool import _shm

__all__ = ("Channel",)

# writev takes at most this many buffers at once (IOV_MAX is 1024 on Linux).
MAX_PARTS = 512


class Channel:
    """Non-blocking I/O with one worker process: calls out, result bodies in."""

    __slots__ = ("_arena", "_call_fd", "_calls", "_frames", "_landing", "_loop", "_out", "_result_fd", "_shared")

    def __init__(self, loop: Any, call_fd: int, result_fd: int, arena_fd: int | None, limit: int, shared: Any) -> None:
        self._loop = loop
        self._call_fd = call_fd
        self._result_fd = result_fd
        os.set_blocking(call_fd, False)
        os.set_blocking(result_fd, False)
        # Parts the call pipe has not taken yet, oldest first (the first may be partly written).
        self._out: collections.deque[Any] = collections.deque()
        self._frames = m.FrameReader(result_fd)
        self._arena = None if arena_fd is None else _shm.Arena(arena_fd, limit)
        # Space in the call area, tagged with the seq of the call using it.
        self._calls = _shm.Ring(limit) if self._arena is not None else None
        # Where large results such as numpy's arrays are copied, in blocks reused once free.
        self._landing = _shm.Landing()
        self._shared = shared

    # -- calls -------------------------------------------------------------------------------------

    def send(self, calls: list[tuple[int, Any]]) -> None:
        """Write calls ``(seq, payload)``, in order, with as few syscalls as the pipe allows."""
        small: list[bytes] = []
        parts: list[Any] = []
        for seq, payload in calls:
            message: Any
            if type(payload) is bytes:
                if len(payload) < _shm.THRESHOLD:
                    small.append(m.framed(seq, m.CALL, payload))
                    continue
                message = [m.body(seq, m.CALL), payload]  # a large pickle goes as it is, not joined
            else:
                message = self._place_call(seq, payload)
            if type(message) is bytes:
                small.append(m.frame(message))
            else:  # parts of one body (a large pickle, inline buffers): as they are, not joined
                if small:
                    parts.append(b"".join(small))
                    small = []
                parts.append(m.frame_header(sum(len(p) for p in message)))
                parts += message
        if small:
            parts.append(b"".join(small) if len(small) > 1 else small[0])
        self.write(parts)

    def _place_call(self, seq: int, payload: m.OutOfBand) -> Any:
        """A CALL_OOB body with the buffers copied into the call area, or its inline parts."""
        head = m.body(seq, m.CALL_OOB) + payload.function
        ring = self._calls
        sizes = [_shm.aligned(b.nbytes) for b in payload.buffers]
        start = None if ring is None else ring.alloc(sum(sizes), seq)
        if start is None:
            return [head, *payload.inline_parts()]
        assert self._arena is not None
        view = self._arena.view
        offsets = []
        for buf, size in zip(payload.buffers, sizes, strict=True):
            view[start : start + buf.nbytes] = buf
            offsets.append(start)
            start += size
        return head + payload.table(offsets, False)

    def call_done(self, seq: int) -> None:
        """The worker answered call ``seq``: the call area space of it and the calls before it is free."""
        if self._calls is not None and self._calls.live:
            assert self._arena is not None
            for start, end in self._calls.free_through(seq):
                self._arena.release(0, start, end)

    def write(self, parts: list[Any]) -> None:
        """Write now what the pipe takes; queue the rest for when it drains."""
        if self._call_fd < 0 or not parts:
            return
        if self._out:
            self._out.extend(parts)
            return
        try:
            n = os.writev(self._call_fd, parts) if len(parts) > 1 else os.write(self._call_fd, parts[0])
        except BlockingIOError:
            n = 0
        except OSError:  # the child is gone; its sentinel reports the death
            return
        out = self._out
        for part in parts:
            size = len(part)
            if n >= size:
                n -= size
            else:
                out.append(memoryview(part)[n:] if n else part)
                n = 0
        if out:
            self._loop.add_writer(self._call_fd, self._on_writable)

    def _on_writable(self) -> None:
        out = self._out
        parts = [out[i] for i in range(min(len(out), MAX_PARTS))]
        try:
            n = os.writev(self._call_fd, parts)
        except BlockingIOError:
            return
        except OSError:  # the child is gone: drop what it will never read
            out.clear()
            n = 0
        while out and n >= len(out[0]):
            n -= len(out.popleft())
        if n:
            out[0] = memoryview(out[0])[n:]
        if not out:
            self._loop.remove_writer(self._call_fd)

    # -- results -----------------------------------------------------------------------------------

    def read(self) -> list[Any]:
        """Bodies now complete on the result pipe. EOFError at its end; BlockingIOError if empty."""
        return self._frames.read()

    def load_result(self, seq: int, payload: Any) -> Any:
        """Unpickle an OK_OOB result, copying its buffers out of the result area, then hand the
        area's space back to the worker (and its pages above RETAIN to the kernel)."""
        arena = self._arena
        try:
            return m.loads(payload, None if arena is None else arena.view, self._landing)
        finally:
            if arena is not None:
                for offset, length in m.spans(payload):
                    arena.release(arena.limit, offset - arena.limit, offset - arena.limit + length)
                self._shared[m.RESULT_ACK] = seq

    def trim(self) -> None:
        """Unmap the landing blocks that no result has used since the last trim."""
        self._landing.trim()

    def close(self) -> None:
        """Forget what was not written and unmap the arena (the owner closes the pipes and
        removes them from the loop, which may be closed by now)."""
        self._call_fd = self._result_fd = -1
        self._out.clear()
        self._landing.close()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
            self._calls = None
