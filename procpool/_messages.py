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

# _pickle: the C pickler, which the pickle module re-exports. pickle.py adds a pure-Python
# fallback and imports re: a few ms more at every worker's start (its fork server imports this).
import _pickle as pickle
import mmap
import os
import struct
import sys
import types
import weakref
from collections.abc import Callable

from procpool import _shm

# typing.TYPE_CHECKING without importing typing; procpool.errors is imported where an error is
# raised: every worker imports this module, and neither is needed to run a task.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ()

# Layout of the small array of int64 each worker process shares with the parent (an anonymous
# file both map: ``_processes.new_state``, ``map_state``); the parent reads it without a round trip.
CURRENT = 0  # seq of the task running now, 0 when idle
BEAT = 1  # time.monotonic_ns() of the task's start or its last heartbeat()
CANCEL = 2  # CANCEL_RING slots: seq of a committed task cancelled before it started
CANCEL_RING = 512
RESULT_ACK = CANCEL + CANCEL_RING  # seq of the last result whose shared-memory buffers the parent copied
REPLIED = RESULT_ACK + 1  # seq of the last task whose reply the worker has written
STATE_SIZE = REPLIED + 1


def map_state(fd: int, close: bool = True) -> memoryview:
    """The shared state in file ``fd`` as a view of STATE_SIZE int64 (the mapping lives as long
    as the view); ``fd`` is closed unless ``close`` is False."""
    try:
        return memoryview(mmap.mmap(fd, STATE_SIZE * 8)).cast("q")
    finally:
        if close:
            os.close(fd)


# parent -> child
CALL = 1  # payload: the function part, then the pickle of the call
EXIT = 2  # no payload; the child leaves its loop
CALL_OOB = 3  # payload: the function part, then the buffer table and the pickle of the call
# child -> parent
READY = 10  # seq is the worker's pid; sent first
INIT_FAILED = 11  # payload: utf-8 traceback of the failed handler import or initializer
OK = 12  # payload: pickle of the result
ERROR = 13  # payload: pickle of (type name, traceback text, pickle of the exception or None)
SKIPPED = 14  # the task was cancelled before it started; it did not run
OK_OOB = 15  # payload: buffer table, then the pickle of the result made with it

HEADER = struct.Struct("!qB")
LENGTH = struct.Struct("!i")
_HUGE_LENGTH = struct.Struct("!Q")
# Connection's length header and a body's header in one: a message is one pack and one join.
_FRAMED = struct.Struct("!iqB")
# A buffer table: how many buffers, then for each its place and size. The place is an offset in
# the sender's area of the arena, or, with INLINE, in the body after the pickle (the fallback when
# the area is full). OWN marks buffers of bytes/bytearray/memoryview, which their own rebuild
# function copies; any other (numpy's, a PickleBuffer's) is copied into a bytearray on arrival,
# except that LAND marks those of numpy's own reduction of an ndarray, which may land in the
# parent's reused blocks (_shm.Landing; see _dumps_marking_arrays).
_COUNT = struct.Struct("!HQ")  # buffer count, pickle length
_ENTRY = struct.Struct("!QQB")  # offset, length, flags
INLINE = 1
OWN = 2
LAND = 4
# The function part of a call's payload: the length of the function's pickle (!H), then that
# pickle, when the function is a plain one (a reference to its module and name); the call is then
# (args, kwargs). A length of 0 (NO_FUNCTION): the call is (fn, args, kwargs). Each side keeps
# the references it has seen (pickle_call, load_function), so a stream of calls to one function
# pickles it once in the caller and imports it once in the worker: about 1 us of each round trip
# of a tiny task.
_REF_LENGTH = struct.Struct("!H")
NO_FUNCTION = _REF_LENGTH.pack(0)
# How many functions each side remembers (then it starts again from none).
MAX_REFS = 256
# One read takes whatever the pipe holds, up to this much: many small messages per syscall.
READ_SIZE = 1 << 18


def body(seq: int, kind: int, payload: bytes = b"") -> bytes:
    """Build one message body: the header, then the payload."""
    return HEADER.pack(seq, kind) + payload


def framed(seq: int, kind: int, payload: bytes) -> bytes:
    """``frame(body(seq, kind, payload))``, in one step."""
    n = HEADER.size + len(payload)
    if n > 0x7FFFFFFF:
        return frame(body(seq, kind, payload))
    return _FRAMED.pack(n, seq, kind) + payload


def frame(data: bytes) -> bytes:
    """Prefix a body with Connection's length header, ready for a raw write."""
    n = len(data)
    if n > 0x7FFFFFFF:
        return LENGTH.pack(-1) + _HUGE_LENGTH.pack(n) + data
    return LENGTH.pack(n) + data


def frame_header(n: int) -> bytes:
    """Connection's length header for a body of ``n`` bytes written separately."""
    if n > 0x7FFFFFFF:
        return LENGTH.pack(-1) + _HUGE_LENGTH.pack(n)
    return LENGTH.pack(n)


class FrameReader:
    """Cut the byte stream of a pipe into message bodies, read from its descriptor.

    Bodies are memoryviews of the bytes read (no copy); a body too large for one read is read
    straight into a buffer of its own size, so a large message is copied once, by the kernel.
    """

    __slots__ = ("_big", "_big_view", "_filled", "_rest", "_scratch", "fd")

    def __init__(self, fd: int = -1) -> None:
        self.fd = fd
        # The start of a frame that is not complete yet (small: a copy is cheap).
        self._rest = b""
        # A large body being read in place, and how much of it has arrived.
        self._big: bytearray | None = None
        self._big_view: memoryview | None = None
        self._filled = 0
        self._scratch: memoryview | None = None

    def read(self) -> list[Any]:
        """Read once from the pipe; return the bodies now complete. EOFError at end of file."""
        if self._big_view is not None:
            n = os.readv(self.fd, [self._big_view[self._filled :]])
            if not n:
                raise EOFError
            self._filled += n
            if self._filled < len(self._big_view):
                return []
            big = self._big
            self._big = self._big_view = None
            return [big]
        # Into a buffer kept for the purpose, then copied at its size: os.read(fd, READ_SIZE)
        # would allocate READ_SIZE bytes per call, and an allocation that large is an mmap, a
        # page fault and a munmap each time (~25 us, measured: as much as the whole round trip).
        if self._scratch is None:
            self._scratch = memoryview(bytearray(READ_SIZE))
        scratch = self._scratch
        n = os.readv(self.fd, [scratch])
        if not n:
            raise EOFError
        if not self._rest and n > 4 and LENGTH.unpack_from(scratch)[0] == n - 4:
            return [memoryview(bytes(scratch[4:n]))]  # exactly one body, the usual read of a round trip
        return self.feed(bytes(scratch[:n]))

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes read from the pipe; return every body now complete."""
        if self._rest:
            data = self._rest + data
            self._rest = b""
        view = memoryview(data)
        bodies: list[Any] = []
        start = 0
        end = len(data)
        while end - start >= 4:
            (n,) = LENGTH.unpack_from(data, start)
            head = 4
            if n == -1:
                if end - start < 12:
                    break
                (n,) = _HUGE_LENGTH.unpack_from(data, start + 4)
                head = 12
            stop = start + head + n
            if stop > end:
                if n > READ_SIZE:  # read the rest of this body in place
                    self._big = bytearray(n)
                    self._big_view = memoryview(self._big)
                    self._filled = end - start - head
                    self._big_view[: self._filled] = view[start + head : end]
                    return bodies
                break
            bodies.append(view[start + head : stop])
            start = stop
        if start < end:
            self._rest = bytes(view[start:end])
        return bodies


# -- pickling with out-of-band buffers ---------------------------------------------------------


class OutOfBand(bytes):
    """A pickle (these bytes) whose large buffers travel beside it, through shared memory.

    ``buffers`` are views of the sender's own objects: they are copied into the arena when the
    message is written to a worker (at once when a worker is idle, else when one frees up). A
    bytes subclass, so that a call's payload is bytes wherever it is queued.
    """

    buffers: list[memoryview]
    flags: list[int]
    nbytes: int
    # A call's function part (pickle_call), which goes before the buffer table.
    function = NO_FUNCTION

    def __new__(cls, data: bytes, buffers: list[memoryview], flags: list[int]) -> OutOfBand:
        self = super().__new__(cls, data)
        self.buffers = buffers
        self.flags = flags
        self.nbytes = sum(b.nbytes for b in buffers)
        return self

    def table(self, offsets: list[int], inline: bool) -> bytes:
        """The buffer table and the pickle, for a body (``offsets`` in the area or the body)."""
        flags = INLINE if inline else 0
        parts = [_COUNT.pack(len(self.buffers), len(self))]
        parts += [
            _ENTRY.pack(o, b.nbytes, f | flags) for o, b, f in zip(offsets, self.buffers, self.flags, strict=True)
        ]
        parts.append(self)
        return b"".join(parts)

    def inline_parts(self) -> list[Any]:
        """The table and the buffers themselves, to write in one body when the area is full."""
        offsets = []
        at = 0
        for b in self.buffers:
            offsets.append(at)
            at += b.nbytes
        return [self.table(offsets, True), *self.buffers]


class _Own:
    """A large bytes, bytearray or memoryview at the top of a message: pickled out of band."""

    __slots__ = ("obj", "own")

    def __init__(self, obj: Any, own: dict[int, Any]) -> None:
        self.obj = obj
        # ids of the PickleBuffers made here: their rebuild function copies, so they can be
        # handed the shared memory itself (numpy's would keep a view of it).
        self.own = own

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        obj = self.obj
        if type(obj) is memoryview:
            # A copy, not a PickleBuffer over the caller's memoryview: that would hold an export
            # of it, and a memoryview with exports that ends in a reference cycle crashes the
            # garbage collector (CPython's memory_clear); a copy is also a snapshot.
            buf = pickle.PickleBuffer(obj.tobytes())
            self.own[id(buf)] = buf
            return (_rebuild_view, (buf, obj.readonly, obj.format, obj.shape))
        buf = pickle.PickleBuffer(obj)
        self.own[id(buf)] = buf
        return (_rebuild_bytes if type(obj) is bytes else _rebuild_bytearray, (buf,))


def _rebuild_bytes(buf: Any) -> bytes:
    return _shm.copy_out(buf, bytes)  # type: ignore[return-value]


def _rebuild_bytearray(buf: Any) -> bytearray:
    return _shm.copy_out(buf, bytearray)  # type: ignore[return-value]


def _rebuild_view(buf: Any, readonly: bool, fmt: str, shape: tuple[int, ...]) -> memoryview:
    data = _shm.copy_out(buf, bytes if readonly else bytearray)
    view: Any = memoryview(data)
    return view if fmt == "B" and len(shape) == 1 else view.cast(fmt, shape)  # type: ignore[no-any-return]


_LARGE_TYPES = (bytes, bytearray, memoryview)
# Types whose pickle can hold no out-of-band buffer.
SCALARS = frozenset({int, float, str, bool, type(None), complex})


def _wrap(obj: Any, threshold: int, own: dict[int, Any]) -> Any:
    """``obj`` with a large bytes/bytearray/memoryview at its top level (or one level into a short
    tuple or list) marked for out-of-band pickling; the pickler never offers them on its own."""
    t = type(obj)
    if t is memoryview:  # it has no pickle of its own
        return _Own(obj, own) if obj.contiguous else obj
    if t is bytes or t is bytearray:
        return _Own(obj, own) if len(obj) >= threshold else obj
    if (t is tuple or t is list) and len(obj) <= 16:
        items = [_wrap(x, threshold, own) if type(x) in _LARGE_TYPES else x for x in obj]
        if any(type(x) is _Own for x in items):
            return tuple(items) if t is tuple else items
    return obj


def _dumps_marking_arrays(obj: Any, take: Any, ndarray: type, lands: dict[int, Any]) -> bytes:
    """``pickle.dumps(obj, 5, buffer_callback=take)``, with the PickleBuffers that numpy's own
    reduction of a plain ``ndarray`` hands out put in ``lands`` (kept alive, so that their ids
    stay theirs): the receiver rebuilds those with numpy's ``_frombuffer``, which keeps whatever
    buffer it is given, so they may land in the parent's reused blocks (``_shm.Landing``). Any
    other buffer, even one a task made of an array itself, arrives as a bytearray."""
    import copyreg
    import io

    def reduce_array(array: Any) -> Any:
        rv = array.__reduce_ex__(5)
        args = rv[1] if type(rv) is tuple and len(rv) > 1 else ()
        if getattr(rv[0], "__name__", None) == "_frombuffer" and args and type(args[0]) is pickle.PickleBuffer:
            lands[id(args[0])] = args[0]
        return rv

    out = io.BytesIO()
    pickler = pickle.Pickler(out, 5, buffer_callback=take)
    # The exact type only (subclasses pickle their own way), and the process's table for the rest.
    pickler.dispatch_table = {**copyreg.dispatch_table, ndarray: reduce_array}
    pickler.dump(obj)
    return out.getvalue()


def dumps(
    obj: Any, limit: int | None = None, threshold: int = _shm.THRESHOLD, own: dict[int, Any] | None = None
) -> bytes | OutOfBand:
    """Pickle ``obj``; buffers of at least ``threshold`` bytes are left out of band (protocol 5).

    Returns plain bytes when there are none. SerializationError when they add up to more than
    ``limit`` bytes (None: ``PROCPOOL_SHM_LIMIT_MB``, read only then). With ``limit`` 0
    everything is in band.
    """
    if type(obj) in SCALARS:  # the hot path of tiny tasks: nothing to look for
        return pickle.dumps(obj, 5)
    if own is None:  # else the caller has wrapped what needs it
        own = {}
        obj = _wrap(obj, threshold, own)
    if limit is not None and limit <= 0:
        return pickle.dumps(obj, 5)  # the wrapped buffers go in band too
    buffers: list[memoryview] = []
    flags: list[int] = []

    def take(buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: in band
            return True
        if raw.nbytes < threshold:
            return True
        buffers.append(raw)
        flags.append(OWN if id(buf) in own else LAND if id(buf) in lands else 0)
        return False

    lands: dict[int, Any] = {}
    numpy = sys.modules.get("numpy")
    if numpy is None:  # then obj holds no array
        data = pickle.dumps(obj, 5, buffer_callback=take)
    else:
        data = _dumps_marking_arrays(obj, take, numpy.ndarray, lands)
    if not buffers:
        return data
    if limit is None:
        limit = _shm.limit_from_env()
        if limit <= 0:
            return pickle.dumps(obj, 5)
    message = OutOfBand(data, buffers, flags)
    if message.nbytes > limit:
        from procpool.errors import SerializationError

        mib = 1024 * 1024
        raise SerializationError(
            f"its buffers add up to {message.nbytes / mib:.1f} MiB, over the shared-memory limit of "
            f"{limit / mib:.0f} MiB per message (raise PROCPOOL_SHM_LIMIT_MB before the pool starts)"
        )
    return message


def write_all(fd: int, parts: list[Any]) -> None:
    """Write ``parts`` (bytes-like, one byte per item) to a blocking descriptor, whole."""
    while parts:
        n = os.writev(fd, parts) if len(parts) > 1 else os.write(fd, parts[0])
        while parts and n >= len(parts[0]):
            n -= len(parts[0])
            parts.pop(0)
        if n:
            parts[0] = memoryview(parts[0])[n:]


def spans(payload: Any) -> list[tuple[int, int]]:
    """(offset, length) of each buffer of a buffer table that lies in the arena."""
    count, _ = _COUNT.unpack_from(payload)
    out = []
    for i in range(count):
        offset, length, flag = _ENTRY.unpack_from(payload, _COUNT.size + i * _ENTRY.size)
        if not flag & INLINE:
            out.append((offset, length))
    return out


def loads(payload: Any, area: memoryview | None, landing: _shm.Landing | None = None) -> Any:
    """Unpickle a buffer table and its pickle; buffers come from ``area`` or from the payload.

    Every buffer is copied out (into the object that uses it; for numpy's, into ``landing`` if
    given; else into a bytearray), so the result owns its memory and the area can be reused as
    soon as this returns.
    """
    payload = memoryview(payload)  # a large body arrives as a bytearray: slice it without copies
    count, size = _COUNT.unpack_from(payload)
    at = _COUNT.size
    entries = []
    for _ in range(count):
        entries.append(_ENTRY.unpack_from(payload, at))
        at += _ENTRY.size
    data = payload[at : at + size]
    inline_base = at + size
    buffers: list[Any] = []
    for offset, length, flag in entries:
        if flag & INLINE:
            src = payload[inline_base + offset : inline_base + offset + length]
        else:
            assert area is not None
            src = area[offset : offset + length]
        if flag & OWN:
            buffers.append(src)
        elif flag & LAND and landing is not None:
            buffers.append(landing.copy(src))
        else:
            buffers.append(_shm.copy_out(src, bytearray))
    src = None
    try:
        return pickle.loads(data, buffers=buffers)
    except BaseException:
        buffers.clear()  # the traceback keeps this frame: it must not keep landed blocks in use
        raise


# Plain functions pickle as a reference to their module and name, the same bytes every time; so
# do builtin functions of a module (not builtin methods bound to an object, such as
# ``a_list.append``: they pickle their object, whose state can change between calls).
_REFERENCE_TYPES = frozenset({types.FunctionType, types.BuiltinFunctionType})
# id(function) -> (a weak reference to it, its function part), for the functions this process has
# sent; an entry goes with its function.
_refs: dict[int, tuple[Any, bytes]] = {}


def _is_plain(fn: Any) -> bool:
    return type(fn) is types.FunctionType or type(getattr(fn, "__self__", None)) is types.ModuleType


def _reference(fn: Any) -> bytes:
    """The function part of a call to the plain function ``fn``: its length, then its pickle.

    ``fn`` is pickled once, and with it comes pickle's check that its module has it under its
    name: a function sent before that name was rebound (by ``mock.patch``, say) still goes after,
    as a reference to the name, which the worker imports as it is there.
    """
    entry = _refs.get(id(fn))
    if entry is not None and entry[0]() is fn:
        return entry[1]
    data = pickle.dumps(fn, 5)
    if len(data) > 0xFFFF:  # pragma: no cover - a reference is a module and a name
        return NO_FUNCTION
    if len(_refs) >= MAX_REFS:
        _refs.clear()
    key = id(fn)
    part = _REF_LENGTH.pack(len(data)) + data
    _refs[key] = (weakref.ref(fn, lambda _, key=key: _refs.pop(key, None)), part)  # type: ignore[misc]
    return part


def load_function(body: memoryview, at: int, functions: dict[bytes, Any]) -> tuple[Any, int]:
    """The function of the call whose payload starts at ``body[at]`` (None when it is in the
    call's pickle) and where the rest of the payload starts. ``functions`` holds the functions of
    the references seen before, by their pickle: each is imported once, so a task that rebinds a
    module's function in its worker does not change what later calls by reference run there."""
    (n,) = _REF_LENGTH.unpack_from(body, at)
    at += _REF_LENGTH.size
    if not n:
        return None, at
    key = bytes(body[at : at + n])
    fn = functions.get(key)
    if fn is None:
        fn = pickle.loads(key)
        if len(functions) >= MAX_REFS:
            functions.clear()
        functions[key] = fn
    return fn, at + n


def pickle_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call in the caller, so a bad argument fails there and nothing is sent.

    Large buffers (numpy arrays, and bytes, bytearray or memoryview arguments) are left out of
    band, to travel through shared memory: see ``dumps``. A plain function goes as a reference
    (``_reference``) in the payload's function part.
    """
    sent_args, sent_kwargs = args, kwargs
    own: dict[int, Any] = {}
    scalars = not kwargs
    for a in args:
        t = type(a)
        if t not in SCALARS:
            scalars = False
        if t in _LARGE_TYPES:
            sent_args = tuple(_wrap(a, _shm.THRESHOLD, own) for a in args)
            break
    if kwargs:
        sent_kwargs = {k: _wrap(v, _shm.THRESHOLD, own) for k, v in kwargs.items()}
    try:
        function = _reference(fn) if type(fn) in _REFERENCE_TYPES and _is_plain(fn) else NO_FUNCTION
        if function is NO_FUNCTION:
            call: tuple[Any, ...] = (fn, sent_args, sent_kwargs)
        else:
            call = (sent_args, sent_kwargs)
        # The function part is joined to the pickle (a copy of it: a large argument that stays in
        # band, a long str say, is copied once here and not again on its way to the worker).
        if scalars:  # no buffer can hide in these: skip the out-of-band machinery
            return function + pickle.dumps(call, 5)
        data = dumps(call, own=own)
        if isinstance(data, OutOfBand):
            data.function = function  # Channel writes it before the buffer table
            return data
        return function + data
    except Exception as exc:
        from procpool.errors import SerializationError

        if isinstance(exc, SerializationError):
            raise SerializationError(f"cannot send the task to a worker: {exc}") from None
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
            pickle.dumps(obj, 5)
        except Exception:
            return label
    return "the call"


def encode_error(exc: BaseException) -> bytes:
    """An ERROR payload: the exception's type name, its traceback text, and its pickle if it has one.

    Whatever the exception does when formatted or pickled (its ``__str__`` or ``__reduce__`` may
    raise, even SystemExit), the worker survives and the parent gets an answer.
    """
    import traceback  # here, not in every worker's start

    try:
        tb = "".join(traceback.format_exception(exc))
    except BaseException as err:
        tb = f"{type(exc).__qualname__} (its traceback could not be formatted: {type(err).__qualname__})"
    try:
        exc_bytes: bytes | None = pickle.dumps(exc, 5)
    except BaseException:
        exc_bytes = None
    return pickle.dumps((type(exc).__qualname__, tb, exc_bytes), 5)


def decode_error(payload: bytes) -> BaseException:
    """Rebuild a task's exception from an ERROR payload, the remote traceback as its cause."""
    from procpool.errors import RemoteTraceback, SerializationError

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
