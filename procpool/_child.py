"""The worker process: block on the call queue, run the call, put the result, repeat.

It knows nothing of asyncio state, psutil, routing or statistics: the parent owns all of that,
because a stuck child cannot report on itself. Its only shared state is a small array that the
parent reads (which task is running, the last heartbeat) and writes (tasks cancelled before they
started). ``serve`` only calls ``.get()``/``.put()``, so a test can drive it with ``queue.Queue``.
"""

from __future__ import annotations

import _pickle as pickle  # the C pickler, as in _messages (pickle.py itself imports re)
import collections
import faulthandler
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from types import CoroutineType, GeneratorType

from procpool import _messages as m
from procpool import _shm
from procpool._messages import BEAT, CANCEL, CANCEL_RING, CURRENT, REPLIED, RESULT_ACK

# typing.TYPE_CHECKING without importing typing (nor procpool.errors, imported where raised):
# every worker imports this module.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    class _Queue(Protocol):
        def get(self) -> Any: ...
        def put(self, data: Any) -> None: ...


# prctl option: orphaned descendants are re-parented to this process instead of init (Linux).
PR_SET_CHILD_SUBREAPER = 36
# How often, at most, a subreaper worker reaps exited orphans between two tasks.
REAP_EVERY_NS = 1_000_000_000

# Set in a worker process only.
# The worker's process name ("procpool-<worker id>") where procpool's fork server started it; a
# worker started by spawn has it as multiprocessing.current_process().name instead.
process_name: str | None = None
_state: Any = None
_handler: Callable[..., Any] | None = None
_loop: Any = None
_subreaper = False


class ConnectionQueue:
    """One end of a one-way ``multiprocessing`` Pipe (its descriptor) as a queue of bodies.

    It speaks Connection's wire format on the raw descriptor: one read takes every call the
    parent has written (a batch of tiny tasks costs one syscall, not two per task), and a body
    goes out with its header in one ``writev``, large buffers without being joined first.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd  # the worker's for its whole life
        self._frames = m.FrameReader(fd)
        self._bodies: collections.deque[Any] = collections.deque()

    def get(self) -> Any:
        """The next body (a bytes-like object), or None once the parent is gone."""
        while not self._bodies:
            try:
                self._bodies.extend(self._frames.read())
            except (EOFError, OSError):
                return None
        return self._bodies.popleft()

    def put(self, data: Any) -> None:
        """Write one body: bytes-like, or a list of parts sent as one body."""
        if type(data) is bytes and len(data) <= select.PIPE_BUF - 4:  # one write, whole (atomic)
            os.write(self.fd, m.LENGTH.pack(len(data)) + data)
            return
        parts = data if type(data) is list else [data]
        m.write_all(self.fd, [m.frame_header(sum(len(p) for p in parts)), *parts])


def heartbeat() -> None:
    """Tell the pool the running task is making progress (resets its stuck clock).

    Call it from long I/O waits inside a task. Outside a worker process it does nothing.
    """
    if _state is not None:
        _state[BEAT] = time.monotonic_ns()


def run_handler(prompt: Any, context: Any) -> Any:
    """Run the pool's prompt handler (resolved once at worker start)."""
    if _handler is None:  # pragma: no cover - the parent refuses execute() without a handler
        raise RuntimeError("this pool has no prompt handler")
    return _handler(prompt, context)


# Results that are never awaitable: map() skips the (slow, ABC-based) check for them.
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), tuple, list, dict, complex})


def run_chunk(fn: Callable[[Any], Any], items: list[Any]) -> tuple[list[Any], bytes | None]:
    """Run ``fn`` over a map() chunk; stop at the first error and return it encoded."""
    out: list[Any] = []
    plain = _PLAIN_TYPES
    for item in items:
        try:
            value = fn(item)
            if type(value) not in plain and isawaitable(value):
                value = _run_coroutine(value)
        except BaseException as exc:
            return out, m.encode_error(exc)
        out.append(value)
    return out, None


def isawaitable(value: Any) -> bool:
    """``inspect.isawaitable`` without importing inspect in every worker."""
    if isinstance(value, (CoroutineType, Awaitable)):
        return True
    # A generator-based coroutine (types.coroutine): the flag inspect checks, CO_ITERABLE_COROUTINE.
    return isinstance(value, GeneratorType) and bool(value.gi_code.co_flags & 0x100)


def _run_coroutine(coro: Any) -> Any:
    global _loop
    if _loop is None:
        import asyncio

        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coro)


def serve(call_queue: _Queue, result_queue: _Queue, state: Any, arena: _shm.Arena | None = None) -> None:
    """Run calls until the parent sends EXIT or goes away."""
    dumps = m.dumps
    load_function = m.load_function
    loads = pickle.loads
    functions: dict[bytes, Any] = {}  # the functions of the references received, by their pickle
    plain = _PLAIN_TYPES
    header = m.HEADER
    header_size = header.size
    pack_header = header.pack
    OK = m.OK
    scalars = m.SCALARS
    reaping = _subreaper
    next_reap = 0
    limit = 0 if arena is None else arena.limit
    results = None if arena is None else _shm.Ring(arena.limit)
    out: Any = None
    while True:
        data = call_queue.get()
        if data is None:
            return
        seq, kind = header.unpack_from(data)
        if kind != m.CALL and kind != m.CALL_OOB:
            return
        if state[CANCEL + seq % CANCEL_RING] == seq:
            result_queue.put(m.body(seq, m.SKIPPED))
            continue
        state[CURRENT] = seq
        state[BEAT] = started = time.monotonic_ns()
        try:
            try:
                view = memoryview(data)
                fn, at = load_function(view, header_size, functions)
                # Out of band, the buffers are copied out of the arena here: the task owns what it gets.
                call = loads(view[at:]) if kind == m.CALL else m.loads(view[at:], arena.view if arena else None)
                if fn is None:
                    fn, args, kwargs = call
                else:
                    args, kwargs = call
            except BaseException as exc:
                from procpool.errors import SerializationError

                raise SerializationError(f"the task could not be unpickled in the worker: {exc!r}") from exc
            del data, view, call
            result = fn(*args, **kwargs)
            if type(result) not in plain and isawaitable(result):
                result = _run_coroutine(result)
            try:
                # dumps' own fast path for scalars, and below m.body, inlined: measured, about 0.5 us
                # of a tiny task's round trip on one CPU.
                out = pickle.dumps(result, 5) if type(result) in scalars else dumps(result, limit)
            except BaseException as exc:
                from procpool.errors import SerializationError

                raise SerializationError(
                    f"the task's result ({type(result).__qualname__}) could not be pickled: {exc!r}"
                ) from exc
            if type(out) is bytes:
                reply: Any = pack_header(seq, OK) + out
            else:
                assert arena is not None and results is not None
                reply = _place_result(seq, out, arena, results, state)
        except BaseException as exc:
            reply = m.body(seq, m.ERROR, m.encode_error(exc))
        fn = args = kwargs = result = out = None  # drop references before blocking again
        result_queue.put(reply)
        # Cleared only after the reply is out: a worker that dies before this point is judged to
        # have been running the task, so a task is never re-run after it may have had effects.
        state[REPLIED] = seq
        state[CURRENT] = 0
        if reaping and started >= next_reap:
            next_reap = started + REAP_EVERY_NS
            reap_orphans()


def _place_result(seq: int, out: m.OutOfBand, arena: _shm.Arena, ring: _shm.Ring, state: Any) -> Any:
    """An OK_OOB reply: the result's buffers copied into the result area (or, if it is full of
    results the parent has not read yet, sent inline in the reply itself)."""
    ring.free_through(state[RESULT_ACK])  # the parent has copied those out
    sizes = [_shm.aligned(b.nbytes) for b in out.buffers]
    start = ring.alloc(sum(sizes), seq)
    if start is None:
        return [m.body(seq, m.OK_OOB), *out.inline_parts()]
    at = arena.limit + start  # offsets are absolute in the arena
    offsets = []
    view = arena.view
    for buf, size in zip(out.buffers, sizes, strict=True):
        view[at : at + buf.nbytes] = buf
        offsets.append(at)
        at += size
    return m.body(seq, m.OK_OOB, out.table(offsets, False))


def become_subreaper() -> bool:
    """Adopt every orphaned descendant (Linux): a daemon a task double-forks, or a process left
    behind when its parent exits, becomes this worker's child instead of init's, so the kill of a
    worker (and the parent-death watch) still finds it among the worker's descendants."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return False


def reap_orphans() -> None:
    """Reap the exited children that nothing in this process will wait for.

    A subreaper inherits the orphans of its tasks, and their exit statuses are its to collect, or
    they stay zombies as long as the worker lives. It runs between tasks only (no task code is
    waiting then), and skips children that a live ``subprocess.Popen`` (asyncio's subprocesses
    included) or ``multiprocessing.Process`` of this process may still wait for, so a child a task
    keeps for a later task still reports its own exit code. A child started with a bare
    ``os.fork()`` and waited for with ``os.waitpid`` in a later task is not protected.
    """
    try:
        if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return  # nothing has exited: one syscall
    except ChildProcessError:
        return
    import gc
    import multiprocessing
    import subprocess

    # active_children() first joins its own exited children, keeping their exit codes.
    keep = {p.pid for p in multiprocessing.active_children()}
    keep.update(o.pid for o in gc.get_objects() if isinstance(o, subprocess.Popen) and o.returncode is None)
    for pid in _child_pids():
        if pid not in keep:
            try:
                os.waitpid(pid, os.WNOHANG)  # reaps it if it has exited; a live one is left alone
            except ChildProcessError:
                pass


def _child_pids() -> list[int]:
    pids: list[int] = []
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in threads:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += map(int, f.read().split())
        except OSError:
            pass
    return pids


def kill_descendants() -> None:
    """SIGKILL every process descended from this one, those that left its session included."""
    import psutil

    me = psutil.Process()
    killed: set[int] = set()
    for _ in range(50):  # one may fork while we kill; its children are found on the next round
        try:
            fresh = [p for p in me.children(recursive=True) if p.pid not in killed]
        except psutil.Error:
            return
        if not fresh:
            return
        for proc in fresh:
            killed.add(proc.pid)
            try:
                proc.kill()
            except psutil.Error:
                pass


def _watch_parent(lifeline: int) -> None:
    """Kill every process its tasks started, then this worker and its process group, once the
    parent dies, even by SIGKILL: the lifeline pipe reads EOF then. Descendants are found by
    parentage (this worker is their subreaper), so one that left the session dies too."""
    poller = select.poll()
    poller.register(lifeline, select.POLLIN)
    while not poller.poll():
        pass
    try:
        kill_descendants()
    finally:
        os.killpg(0, signal.SIGKILL)


def received_fd(dup: Any) -> int:
    """A descriptor the parent passed among the start arguments (``_processes.PassFd``)."""
    return int(dup.detach())


def main(
    call_fd: int,
    result_fd: int,
    state_fd: int,
    handler_path: str | None,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    stack_fd: int | None,
    lifeline: int,
    arena_fd: int | None = None,
    arena_limit: int = 0,
) -> None:
    """Entry point of a worker process: its pipes, shared state, stack file, lifeline and arena
    are descriptors (``_processes.PassFd``)."""
    global _state, _handler, _subreaper
    # Own process group: the parent can kill a task's whole process tree with one killpg, and
    # Ctrl-C in a terminal reaches the parent only, which then shuts the pool down in order.
    os.setsid()
    _subreaper = become_subreaper()
    threading.Thread(target=_watch_parent, args=(lifeline,), name="procpool-parent-watch", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if stack_fd is not None:
        # Lets the parent capture the stack of a stuck task before it kills the worker: an
        # anonymous file the parent holds too and reads by descriptor.
        faulthandler.register(signal.SIGUSR1, file=stack_fd, all_threads=True)
        # A fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) writes the crashing stack
        # there too, so the task's WorkerCrashed can say where it died.
        faulthandler.enable(file=stack_fd, all_threads=True)
    _state = state = m.map_state(state_fd)
    calls = ConnectionQueue(call_fd)
    results = ConnectionQueue(result_fd)
    try:
        if handler_path is not None:
            import pkgutil

            _handler = pkgutil.resolve_name(handler_path)
        if initializer is not None:
            initializer(*initargs)
    except BaseException:
        import traceback

        results.put(m.body(os.getpid(), m.INIT_FAILED, traceback.format_exc().encode()))
        return
    results.put(m.body(os.getpid(), m.READY))
    serve(calls, results, state, None if arena_fd is None else _shm.worker_arena(arena_fd, arena_limit))
