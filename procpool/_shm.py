"""Shared memory for large buffers: one anonymous arena per worker process, and its allocator.

Each worker process gets one ``memfd`` (an anonymous file: no name in ``/dev/shm``, nothing for a
resource tracker to clean up; the kernel frees it with its last descriptor and mapping, however
the parent and the worker die). It is ``2 * limit`` bytes long, sparse, and both sides map all of
it once, so it never has to be resized or remapped:

    [0, limit)          the call area: the parent writes calls' buffers, the worker reads them
    [limit, 2 * limit)  the result area: the worker writes results' buffers, the parent reads them

Each area has exactly one writer, which allocates from a FIFO ring (``Ring``): messages on one
pipe are consumed in the order they were written, so space is freed in the order it was taken.
The parent frees a call's space when that call's reply arrives (the worker copied the buffers
out when it started the task); the worker frees a result's space once the parent has written the
result's seq to the shared ``RESULT_ACK`` slot (the parent has copied the buffers out).

Pages above ``RETAIN`` in an area go back to the kernel as soon as the message using them is
consumed, so a pool that once moved a 1 GiB array does not keep 1 GiB of memory. The rings start
each message as low in their area as they can, so a stream of large messages stays in pages that
are already there.

A receiver copies each buffer out of the arena into memory of its own. Memory that a process has
not touched yet costs a page fault and a zeroed page per 4 KiB (about 1 to 2 GB/s here, against
10 GB/s and more for a copy into memory the process already has), and glibc's malloc gives back
large blocks as soon as they are freed. In a worker process (``worker_arena``) procpool therefore
asks malloc to keep them (``keep_freed_bytes``); in the parent, the caller's process, only if the
caller opts in (``keep_freed_memory``, public as ``procpool.keep_freed_memory``). Where malloc
does not keep them, a copy of ``HUGE_COPY`` bytes or more asks for transparent huge pages for the
new object's own memory (``copy_out``): one fault and one zeroed 2 MiB page instead of 512 small
ones. In the parent, the buffer of a numpy array rebuilt by numpy lands instead in memory of
procpool's own that is reused once nothing refers to it any more (``Landing``): no fresh pages.
"""

from __future__ import annotations

import collections
import mmap
import os
import sys

# typing.TYPE_CHECKING without importing typing (every worker imports this module).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = (
    "Arena",
    "Landing",
    "Ring",
    "copy_out",
    "keep_freed_bytes",
    "keep_freed_memory",
    "limit_from_env",
    "worker_arena",
)

# Out-of-band buffers at least this large travel through the arena; smaller ones are pickled
# in-band (for them, a pipe write costs less than an allocation, a copy and a descriptor).
THRESHOLD = 64 * 1024
# The largest sum of out-of-band buffers in one message, and so each area's size, by default.
# Larger messages fail with a clear error (SerializationError), never a hang nor an OOM.
DEFAULT_LIMIT_MB = 1024
LIMIT_ENV = "PROCPOOL_SHM_LIMIT_MB"
# Bytes at the start of each area whose pages stay resident between messages: moving a 64 MiB
# array again does not fault its pages in again, even with a second one queued behind it (a
# worker runs one task and holds the next). Above it, pages are returned after each message.
RETAIN = 128 * 1024 * 1024
# Buffers start on cache-line boundaries (and numpy's dtypes on their natural alignment).
ALIGN = 64
# In a worker process, allocations below this come from malloc's heap, and up to this much freed
# heap is kept for the next task instead of being given back (see keep_freed_bytes).
KEEP_FREED = 128 * 1024 * 1024
# The parent's opt-in (keep_freed_memory), in MiB: its default, and the most mallopt takes (an int).
PARENT_KEEP_FREED_MB = 256
MAX_KEEP_FREED_MB = (2**31 - 1) // (1024 * 1024)
# A receiver's copy of a buffer at least this large asks for huge pages (copy_out): it then holds
# at least one whole aligned huge page.
HUGE_COPY = 4 * 1024 * 1024
HUGE_PAGE = 2 * 1024 * 1024
# The most memory one worker's Landing keeps mapped in the parent (see Landing).
LANDING_MAX = 128 * 1024 * 1024
# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def limit_from_env() -> int:
    """The per-message limit in bytes (``PROCPOOL_SHM_LIMIT_MB``, 0 turns shared memory off)."""
    text = os.environ.get(LIMIT_ENV)
    if text is None or not text.strip():
        return DEFAULT_LIMIT_MB * 1024 * 1024
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"{LIMIT_ENV} must be a number of megabytes, got {text!r}") from None
    if not mb >= 0:
        raise ValueError(f"{LIMIT_ENV} must be at least 0 (0 turns shared memory off), got {text!r}")
    return int(mb * 1024 * 1024)


def create(limit: int) -> int | None:
    """A sparse anonymous file for one worker's two areas, or None where there is no memfd."""
    try:
        fd = os.memfd_create("procpool-arena", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return None
    try:
        os.ftruncate(fd, 2 * limit)
    except OSError:
        os.close(fd)
        return None
    return fd


def aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class Ring:
    """A FIFO allocator over ``[0, size)``: regions are freed in the order they were taken."""

    __slots__ = ("live", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        # (tag, start, end) of the regions in use, oldest first; tags only grow.
        self.live: collections.deque[tuple[int, int, int]] = collections.deque()

    def alloc(self, n: int, tag: int) -> int | None:
        """The start of ``n`` free bytes (aligned), or None when the ring has no such room now."""
        n = aligned(max(n, 1))
        live = self.live
        if not live:
            start = 0
        else:
            oldest = live[0][1]
            newest_start, head = live[-1][1], live[-1][2]
            if newest_start >= oldest:  # in use: [oldest, head); free: [head, size) and [0, oldest)
                # Back to the start as soon as it has room: the low pages are resident (RETAIN),
                # while running on through the area would fault fresh pages in for every message.
                if n <= oldest:
                    start = 0
                elif head + n <= self.size:
                    start = head
                else:
                    return None
            elif head + n <= oldest:  # wrapped; in use: [0, head) and [oldest, size)
                start = head
            else:
                return None
        if start + n > self.size:
            return None
        live.append((tag, start, start + n))
        return start

    def free_through(self, tag: int) -> list[tuple[int, int]]:
        """Free every region tagged ``tag`` or earlier; return their (start, end)."""
        freed = []
        live = self.live
        while live and live[0][0] <= tag:
            _, start, end = live.popleft()
            freed.append((start, end))
        return freed


class Arena:
    """One process's mapping of a worker's arena file (both areas)."""

    def __init__(self, fd: int, limit: int) -> None:
        """Map the arena file ``fd`` and take it over: it is closed here (the mapping keeps the
        file, and Python's mmap holds a descriptor of its own until ``close``)."""
        self.limit = limit
        try:
            self._map = mmap.mmap(fd, 2 * limit)
        finally:
            os.close(fd)
        self.view = memoryview(self._map)

    def release(self, base: int, start: int, end: int) -> None:
        """Give back the pages of ``[start, end)`` of the area at ``base`` that lie above RETAIN."""
        start = max(start, RETAIN)
        if end <= start:
            return
        page = mmap.PAGESIZE
        start = base + (start + page - 1) // page * page
        end = base + end // page * page
        if end > start:
            try:
                self._map.madvise(mmap.MADV_REMOVE, start, end - start)
            except (AttributeError, OSError, ValueError):  # pragma: no cover - no MADV_REMOVE
                pass

    def close(self) -> None:
        """Unmap the arena (the kernel frees it with the last mapping and descriptor)."""
        try:
            self.view.release()
            self._map.close()
        except BufferError:  # pragma: no cover - a view is still alive; the GC unmaps it
            pass


def keep_freed_memory(megabytes: int = PARENT_KEEP_FREED_MB) -> bool:
    """Let this process's malloc keep up to `megabytes` MiB of freed memory, for large results.

    An opt-in for the process that runs the pools (procpool never calls it there: it is your
    process). Each large result (`bytes`, a numpy array) is copied out of shared memory into a
    new object. glibc serves a block that large with a fresh mapping, unmapped again when it is
    freed, and gives free heap back to the kernel, so every result lands in new pages, each
    faulted in and zeroed 4 KiB at a time; above a few MiB that, not the copy, limits how fast a
    stream of results arrives. This sets glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD`
    (`mallopt(3)`) to `megabytes` MiB: smaller blocks come from the heap, and up to that much free
    heap stays, so the next result reuses the last one's pages.

    Use it when results of about 1 to 4 MiB stream back and the process can spare the memory;
    call it once, at start, before the pools run. From 4 MiB up procpool needs no help: copies
    that large are advised for huge pages and numpy's land in reused blocks (``copy_out``,
    ``Landing``). Measured on a shared 2-core VM (glibc 2.36, echo tasks, 6 in flight, medians of
    3 runs): 1 MiB `bytes` results went from 2,323 to 9,691 MiB/s and 1 MiB numpy arrays from
    3,514 to 9,054 MiB/s; 16 MiB `bytes` from 4,448 to 4,504. After a stream of 64 MiB results,
    all of them dropped, the parent's private memory stayed 129 to 193 MiB over what it was
    before the stream (measured before the landing blocks, which the pool gives back about a
    second after a stream ends; 1 MiB over without the call).

    The cost, all of it process-wide (every thread's allocations, not only procpool's): the
    process may keep up to `megabytes` MiB of freed memory it would have given back, and more
    when a long-lived object allocated after a large block pins the heap above it (glibc gives
    heap back only from its top). It cannot be undone: glibc's own adaptive thresholds stay off
    for the life of the process once set; a later call replaces both values (a smaller one keeps
    less from then on). It changes this process only: worker processes start as new interpreters,
    and procpool tunes those itself; a child made by a plain `os.fork()` inherits it.

    Args:
        megabytes: MiB of freed memory to keep, also the size under which a block comes from
            the heap; 1 to 2047 (`mallopt` takes an `int` of bytes).

    Returns:
        True where it took effect (glibc); False elsewhere (musl, macOS, Windows) and on older
        glibc releases that refuse an mmap threshold over 32 MiB (call it with 32 there), where
        nothing changed.

    Raises:
        TypeError: `megabytes` is not an `int` (a `bool` is refused too).
        ValueError: `megabytes` is under 1 or over 2047.
    """
    if isinstance(megabytes, bool) or not isinstance(megabytes, int):
        raise TypeError(f"keep_freed_memory() takes a whole number of megabytes, got {megabytes!r}")
    if not 1 <= megabytes <= MAX_KEEP_FREED_MB:
        raise ValueError(f"keep_freed_memory() takes 1 to {MAX_KEEP_FREED_MB} megabytes, got {megabytes}")
    return keep_freed_bytes(megabytes * 1024 * 1024)


def keep_freed_bytes(size: int = KEEP_FREED) -> bool:
    """Make this process's malloc keep large freed blocks for reuse; True where it took effect.

    procpool calls it in worker processes (it owns them); in the parent, the caller's process, only
    the caller does, through ``keep_freed_memory``. glibc serves a block over its mmap threshold
    (128 KiB, raised on the fly up to 32 MiB) with a fresh mapping and unmaps it when it is freed,
    and gives back free heap over its trim threshold; so each task's large argument, copied out of
    the arena, would land in fresh pages, faulted and zeroed one by one. With both thresholds at
    ``size``, blocks under it come from the heap and up to ``size`` of free heap stays, so the next
    task's argument reuses the last one's pages (a 64 MiB echo ran about 1.6x faster for the same
    CPU here). The cost: a worker's RSS can stay up to about ``size`` over what its live objects
    need, which counts toward ``max_memory_mb``. Elsewhere than glibc (musl, macOS) nothing
    changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
    except (ValueError, OSError, AttributeError, ImportError):  # pragma: no cover - no glibc mallopt
        return False
    # 1 on success. Setting either turns glibc's moving threshold off, so both are set.
    kept = bool(mallopt(_M_MMAP_THRESHOLD, size) == 1 and mallopt(_M_TRIM_THRESHOLD, size) == 1)
    if kept:  # large copies now come from the heap and reuse its pages: no advice (see copy_out)
        global _advise_copies
        _advise_copies = False
    return kept


class _Copier:
    """ctypes' handles for ``copy_out``, made on its first large copy (ctypes costs milliseconds
    to import; a worker's fork server has it already)."""

    def __init__(self) -> None:
        import ctypes

        # A PyDLL of our own: ctypes.pythonapi's function objects are shared by the whole process,
        # and their argtypes and restype are whatever the last library to set them chose.
        api = ctypes.PyDLL(None)
        self.new: dict[type, Any] = {}
        self.data: dict[type, Any] = {}
        for kind, prefix in ((bytes, "PyBytes"), (bytearray, "PyByteArray")):
            new = getattr(api, f"{prefix}_FromStringAndSize")
            new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
            new.restype = ctypes.py_object
            data = getattr(api, f"{prefix}_AsString")
            data.argtypes = (ctypes.py_object,)
            data.restype = ctypes.c_void_p
            self.new[kind], self.data[kind] = new, data
        self.madvise = ctypes.CDLL(None, use_errno=True).madvise
        self.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self.madvise.restype = ctypes.c_int
        # A writable memoryview of memory at an address (PyBUF_WRITE): bytes has none of its own.
        self.view = api.PyMemoryView_FromMemory
        self.view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
        self.view.restype = ctypes.py_object


_copier: _Copier | None = None
_HUGE_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)
# False once this process's malloc keeps freed memory (keep_freed_bytes): see copy_out.
_advise_copies = True
_PYBUF_WRITE = 0x200


def copy_out(src: Any, kind: type[bytes] | type[bytearray]) -> bytes | bytearray:
    """``kind(src)``: a new bytes or bytearray with the contents of ``src``, a view of the arena.

    When ``src`` is ``HUGE_COPY`` bytes or more, the new object's memory (fresh pages, for a block
    that large from glibc's default malloc) is first advised for transparent huge pages
    (``madvise(MADV_HUGEPAGE)`` on the whole 2 MiB pages inside it, nothing else): where the
    kernel allows them (``enabled`` is ``always`` or ``madvise``), a 64 MiB result takes 32 page
    faults instead of 16,384 and costs the parent about a third of the CPU. Only whole pages
    inside the object are advised, so a huge page faulted there lies inside it. The advice stays
    on that address range after the object is freed: where malloc reuses the range from its heap
    and something later gives part of it back (``malloc_trim``), touching that part again faults
    in a whole 2 MiB page. A process whose malloc keeps freed memory (``keep_freed_bytes``: every
    worker, and a parent that called ``keep_freed_memory``) reuses heap pages that are already
    there, so its copies are not advised at all. Elsewhere (no ``madvise``, not CPython), a plain
    copy.
    """
    global _copier, _advise_copies
    n = src.nbytes if type(src) is memoryview and src.ndim == 1 and src.format == "B" else 0
    if n < HUGE_COPY or _HUGE_ADVICE is None or not _advise_copies:
        return kind(src)
    if _copier is None:
        try:
            _copier = _Copier()
        except (OSError, AttributeError, ImportError):  # pragma: no cover - not CPython on glibc
            _advise_copies = False  # copies only: Landing's blocks advise through mmap itself
            return kind(src)
    copier = _copier
    obj = copier.new[kind](None, n)  # not initialised: every byte is written below
    address = copier.data[kind](obj)
    start = (address + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = (address + n) & ~(HUGE_PAGE - 1)
    if end > start:
        copier.madvise(start, end - start, _HUGE_ADVICE)  # refused (EINVAL): small pages, as before
    view = copier.view(address, n, _PYBUF_WRITE)
    view[:] = src  # one memcpy
    view.release()
    return obj  # type: ignore[no-any-return]


class Landing:
    """Where the parent copies the buffers of a worker's large numpy arrays: blocks, reused.

    ``copy_out`` gives each buffer a fresh bytearray, and a fresh block that large is fresh pages,
    zeroed by the kernel (above 32 MiB glibc maps each one anew). The buffer of a numpy array that
    numpy rebuilds (marked ``LAND`` by its sender) lands instead in a block of procpool's own, a
    private anonymous mapping advised for huge pages, reused for a later array as soon as nothing
    refers to the block any more. An array rebuilt on a block holds its memoryview, whose buffer holds the
    block, and so do any view, slice, ``memoryview``, read-only wrapper or pickle buffer made from
    it: so a block whose only reference is this list is unused, a liveness test without callbacks.
    (numpy keeps no export of that memoryview, so releasing it by hand under a live array,
    ``arr.base.base.release()``, defeats the test, as it would free a bytearray under the array.)

    A block is reused only for an array of at least half its size, so a small kept array does
    not hold a large block. A channel keeps at most LANDING_MAX bytes of blocks, used or not;
    when the arrays the caller keeps take them all, the next one is a plain copy. ``trim``
    unmaps the blocks left unused since the last ``trim`` (the pool's monitor calls it every
    half second), so memory goes back soon after a stream ends; ``close`` unmaps the unused ones
    when the worker leaves, and one still in use then stays until its last array goes.
    """

    __slots__ = ("_idle", "blocks")

    def __init__(self) -> None:
        self.blocks: list[mmap.mmap] = []
        # ids of the blocks unused at the last trim and not handed out since.
        self._idle: set[int] = set()

    def copy(self, src: Any) -> Any:
        """A buffer with the contents of ``src`` (a view of the result area) that the caller owns."""
        n = src.nbytes
        block = self._block(n) if n >= HUGE_COPY else None
        if block is None:
            return copy_out(src, bytearray)
        self._idle.discard(id(block))
        view = memoryview(block)[:n]
        view[:] = src
        return view

    def _unused(self) -> list[int]:
        """Indices of the blocks nothing else refers to (closed ones are dropped first)."""
        blocks = self.blocks
        if any(b.closed for b in blocks):  # closed by hand through a reference to it
            blocks[:] = [b for b in blocks if not b.closed]
        # The list's reference and getrefcount's own argument: nothing else holds the block.
        return [i for i in range(len(blocks)) if sys.getrefcount(blocks[i]) == 2]

    def _block(self, n: int) -> mmap.mmap | None:
        blocks = self.blocks
        unused = self._unused()
        fits = [i for i in unused if n <= len(blocks[i]) <= 2 * n]
        if fits:
            return blocks[min(fits, key=lambda i: len(blocks[i]))]
        size = (n + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
        total = sum(len(b) for b in blocks)
        for i in sorted(unused, reverse=True):  # no fit: make room (indices fall from the end)
            if total + size <= LANDING_MAX:
                break
            total -= len(blocks[i])
            blocks.pop(i).close()
        if total + size > LANDING_MAX:
            return None
        # Private: a fork of the parent gets its own copy of the arrays, and huge pages follow
        # the kernel's setting for anonymous memory (a shared mapping follows shmem's).
        block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # mmap adds MAP_ANONYMOUS
        if _HUGE_ADVICE is not None:
            try:
                block.madvise(_HUGE_ADVICE)
            except OSError:  # pragma: no cover - a kernel without transparent huge pages
                pass
        blocks.append(block)
        return block

    def trim(self) -> None:
        """Unmap the blocks unused now and at the last trim, with none handed out in between."""
        blocks = self.blocks
        unused = {id(blocks[i]) for i in self._unused()}
        stale = unused & self._idle
        if stale:
            for block in [b for b in blocks if id(b) in stale]:
                blocks.remove(block)
                block.close()
        self._idle = unused - stale

    def close(self) -> None:
        """Unmap the unused blocks and forget the rest (the arrays on them unmap them at the end)."""
        for i in self._unused():
            try:
                self.blocks[i].close()
            except BufferError:  # pragma: no cover - an export holds a reference: not unused
                pass
        self.blocks = []
        self._idle = set()


def worker_arena(fd: int, limit: int) -> Arena:
    """The worker process's end of its arena; its malloc keeps freed memory for the next task's
    buffers (``keep_freed_bytes``), since each task's large arguments are copied out into it."""
    keep_freed_bytes()
    return Arena(fd, limit)
