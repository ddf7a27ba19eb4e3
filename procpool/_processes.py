"""Worker processes at the level of the operating system: start arguments, liveness, kills.

Nothing here knows about tasks or pools. It holds what the parent needs to start a worker
process that cannot outlive it (the lifeline), through procpool's fork server (``ForkServer``,
``ForkServerProcess``; the server's own code is ``procpool._forkserver``) or spawn, to tell a
worker's death from its fork server's (pidfd, sentinel at end of file), to hand a worker an
anonymous file, and to kill a process tree.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import fcntl
import multiprocessing.context
import multiprocessing.popen_fork
import multiprocessing.process
import multiprocessing.reduction
import multiprocessing.spawn
import multiprocessing.util
import os
import pickle
import select
import signal
import socket
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from procpool import _child, _forkserver, _messages, _shm

if TYPE_CHECKING:
    # Imported where it is used: a main module importing WorkerPool is also imported by the fork
    # server, which then need not import psutil (the parent imports it when it first looks).
    import psutil

__all__ = ("Launch",)

# fcntl's F_SETPIPE_SZ (Linux; Python names it from 3.10 on some builds only).
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Pipe capacity asked for (the default is 64 KiB; 1 MiB is what an unprivileged process may ask).
PIPE_SIZE = 1 << 20


@attrs.frozen
class Launch:
    """What a worker process is started with: shared by a pool's three slots."""

    ctx: Any
    loop: asyncio.AbstractEventLoop
    handler: str | None
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    # Largest sum of buffers one message may move through shared memory (0: none do), read
    # from PROCPOOL_SHM_LIMIT_MB when the pool starts.
    shm_limit: int = attrs.field(factory=_shm.limit_from_env)


_lifeline = -1
_lifeline_write_fd = -1


def lifeline() -> int:
    """The read end of a pipe whose write end only this process holds, for workers to watch.

    It reads EOF when this process dies, however it dies. A worker's parent is the fork server,
    so no parent sentinel of multiprocessing's could tell it that this process died. The write end is
    close-on-exec (os.pipe's default) and closed in any plain fork of this process (a fork-context
    multiprocessing.Process, os.fork), so no helper of the parent keeps the workers alive.
    """
    global _lifeline, _lifeline_write_fd
    if _lifeline < 0:
        # The write end stays open, unused, until this process exits (both are close-on-exec).
        _lifeline, _lifeline_write_fd = os.pipe()
    return _lifeline


def _drop_lifeline_in_child() -> None:
    """After a plain fork: let go of the parent's lifeline; a pool made here makes its own."""
    global _lifeline, _lifeline_write_fd
    if _lifeline_write_fd >= 0:
        try:
            os.close(_lifeline_write_fd)
        except OSError:
            pass
        _lifeline_write_fd = -1
    if _lifeline >= 0:
        try:
            os.close(_lifeline)
        except OSError:
            pass
        _lifeline = -1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_lifeline_in_child)


def anonymous_file(name: str = "procpool-stack") -> int | None:
    """A file with no name, freed by the kernel with its last descriptor: nothing is left on
    disk when the parent is killed. memfd where there is one, else an unlinked temporary file."""
    try:
        return os.memfd_create(name)
    except (AttributeError, OSError):
        pass
    try:
        with tempfile.TemporaryFile() as f:
            return os.dup(f.fileno())
    except OSError:  # pragma: no cover - no writable temporary directory
        return None


class PassFd:
    """An open file descriptor among a worker's Process arguments; the child receives an int
    naming the same open file (multiprocessing passes it like a Pipe's descriptors). The child
    rebuilds it with ``procpool._child.received_fd``, so it never imports this module."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_child.received_fd, (multiprocessing.reduction.DupFd(self.fd),))


def new_state() -> tuple[int, memoryview]:
    """A fresh shared state for one worker process (``_messages.map_state``): its file, for the
    child, and the parent's view of it, all 0. The kernel frees it with its last mapping."""
    fd = anonymous_file("procpool-state")
    if fd is None:  # pragma: no cover - no memfd and no writable temporary directory
        raise OSError("no anonymous file for a worker's shared state")
    try:
        os.ftruncate(fd, _messages.STATE_SIZE * 8)
        return fd, _messages.map_state(fd, close=False)
    except BaseException:
        os.close(fd)
        raise


def open_pidfd(pid: int) -> int | None:
    """A file descriptor that reads ready when ``pid`` exits, whoever its parent is (Linux 5.3+)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def readable(fd: int, timeout: float = 0.0) -> bool:
    """Whether ``fd`` is readable now (or becomes so within ``timeout`` seconds)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def at_eof(fd: int) -> bool:
    """Whether a readable pipe is at end of file, without consuming what it holds."""
    try:
        pending = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return int.from_bytes(pending, sys.byteorder) == 0


class ForkServerGone(ConnectionError):
    """The fork server died before it could start a worker (a new one is started on the next try)."""

    def __init__(self, message: str, server_pid: int | None = None) -> None:
        super().__init__(message)
        self.server_pid = server_pid


# How long a start waits for the fork server's answer (the first, for the server to start).
LAUNCH_TIMEOUT = 60.0


class ForkServer:
    """The parent's end of procpool's fork server (``procpool._forkserver``), a child of it.

    It is started as ``python -c`` with the parent's interpreter flags and ``sys.path``, and
    serves this process until its socket closes. Starting a worker (``launch``) blocks until the
    server has forked it: the first time, until the server has started (about 20 ms here).
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        code = f"import sys; sys.path[:] = {sys.path!r}; from procpool._forkserver import main; main({theirs.fileno()})"
        exe = multiprocessing.spawn.get_executable()
        args = [exe, *multiprocessing.util._args_from_interpreter_flags(), "-c", code]  # type: ignore[attr-defined]
        try:
            self.pid: int = multiprocessing.util.spawnv_passfds(os.fsencode(exe), args, [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._socket = ours
        self._lock = threading.Lock()

    def launch(self, fds: list[int]) -> tuple[int, int, int]:
        """Ask for a worker that inherits ``fds``: its pid, the read end of its status pipe (the
        sentinel) and the write end of the pipe its start spec goes through.

        ForkServerGone if the server is dead; OSError if it could not fork (its errno) or a
        descriptor could not be sent.
        """
        if len(fds) + 2 > _forkserver.MAX_FDS:
            raise OSError(
                errno.EMSGSIZE,
                f"procpool's fork server could not start a worker: its start arguments hold {len(fds)} "
                f"descriptors, over the {_forkserver.MAX_FDS - 2} one request can pass (the pipes, "
                "queues or files among initargs count)",
            )
        status_r, status_w = os.pipe()
        data_r, data_w = os.pipe()
        try:
            try:
                with self._lock:
                    socket.send_fds(self._socket, [b"L"], [status_w, data_r, *fds])
                os.close(status_w)
                status_w = -1
                pid = _read_signed(status_r, LAUNCH_TIMEOUT)
            finally:
                os.close(data_r)
        except BaseException as exc:
            for fd in (status_r, status_w, data_w):
                if fd >= 0:
                    os.close(fd)
            if isinstance(exc, TimeoutError):  # stopped or wedged: replaced by a new one
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            elif not isinstance(exc, (EOFError, BrokenPipeError, ConnectionResetError)) and not (
                isinstance(exc, OSError) and exc.errno in (errno.EBADF, errno.ENOTCONN)  # closed meanwhile
            ):
                raise
            raise ForkServerGone(f"the fork server (pid {self.pid}) is gone: {exc!r}", self.pid) from exc
        if pid <= 0:  # the server's answer to a request it could not serve: -errno
            for fd in (status_r, data_w):
                os.close(fd)
            raise OSError(-pid, f"procpool's fork server could not start a worker: {os.strerror(-pid)}")
        return pid, status_r, data_w

    def close(self) -> None:
        """Close this end: the server exits once it reads EOF."""
        self._socket.close()


def _read_signed(fd: int, timeout: float | None = None) -> int:
    """One SIGNED value from a pipe; EOFError if it closes first (TimeoutError after ``timeout``)."""
    data = b""
    while len(data) < _forkserver.SIGNED.size:
        if timeout is not None and not readable(fd, timeout):
            raise TimeoutError(f"procpool's fork server did not answer within {timeout:g} s")
        chunk = os.read(fd, _forkserver.SIGNED.size - len(data))
        if not chunk:
            raise EOFError("the status pipe closed")
        data += chunk
    value: int = _forkserver.SIGNED.unpack(data)[0]
    return value


class ForkServerPopen(multiprocessing.popen_fork.Popen):
    """A worker process forked by procpool's fork server, with multiprocessing's Popen interface
    (``multiprocessing.popen_forkserver``'s semantics: the exit code comes through the sentinel
    pipe; if the pipe closes without one, the server died: ``server_lost``, and exit code 255)."""

    method = "forkserver"
    DupFd = _forkserver.InheritedFd

    def __init__(self, process_obj: Any) -> None:
        self._fds: list[int] = []
        self.server_pid: int | None = None  # the server that forked it
        self.server_lost = False
        super().__init__(process_obj)

    def duplicate_for_child(self, fd: int) -> int:
        self._fds.append(fd)
        return len(self._fds) - 1

    def _launch(self, process_obj: Any) -> None:
        prep = multiprocessing.spawn.get_preparation_data(process_obj.name)
        where = pickle.dumps(
            {
                "name": process_obj.name,
                "authkey": bytes(process_obj.authkey),
                "sys_path": prep["sys_path"],
                "argv": prep["sys_argv"],
                "cwd": prep.get("dir"),
                "main_path": prep.get("init_main_from_path"),
                "main_name": prep.get("init_main_from_name"),
            }
        )
        multiprocessing.context.set_spawning_popen(self)  # type: ignore[arg-type]
        try:
            run = multiprocessing.reduction.ForkingPickler.dumps(
                (process_obj._target, process_obj._args, process_obj._kwargs)
            )
        finally:
            multiprocessing.context.set_spawning_popen(None)
        server = fork_server()
        self.server_pid = server.pid
        self.pid, self.sentinel, data_w = server.launch(self._fds)
        self.finalizer = multiprocessing.util.Finalize(self, os.close, (self.sentinel,))
        try:
            with open(data_w, "wb", closefd=True) as f:
                f.write(_forkserver.HEADER.pack(len(where), len(run)) + where)
                f.write(run)
        except OSError:  # the child died before reading it: its exit status tells
            pass

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        if self.returncode is None:
            if flag == os.WNOHANG and not readable(self.sentinel):
                return None
            try:
                self.returncode = _read_signed(self.sentinel)
            except (OSError, EOFError):
                self.server_lost = True
                self.returncode = 255
        returncode: int | None = self.returncode
        return returncode


class ForkServerProcess(multiprocessing.process.BaseProcess):
    """A ``multiprocessing.Process`` that procpool's fork server starts."""

    _start_method = "forkserver"

    @staticmethod
    def _Popen(process_obj: Any) -> ForkServerPopen:
        return ForkServerPopen(process_obj)


_server: ForkServer | None = None
_server_lock = threading.Lock()


def fork_server() -> ForkServer:
    """This process's fork server, started if none runs."""
    global _server
    with _server_lock:
        if _server is None:
            # A worker importing its main module (a task defined there) must not start pools of
            # its own: multiprocessing's bootstrapping-phase RuntimeError, as for a Process.
            multiprocessing.spawn._check_not_importing_main()  # type: ignore[attr-defined]
            _server = ForkServer()
            atexit.register(_close_fork_server, _server)
        return _server


def _close_fork_server(server: ForkServer) -> None:
    """At exit: close the server's socket (it exits then); a start after this starts a new one."""
    _forget(server.pid)
    server.close()


def fork_server_pid() -> int | None:
    server = _server
    return None if server is None else server.pid


def start_fork_server() -> None:
    """Start the fork server now, unless one runs (a pool does it first, so that the server's
    interpreter starts while the pool sets its slots up)."""
    fork_server()


def _forget_server_in_child() -> None:
    """After a plain fork: the server and its workers are the parent's; a pool made here starts
    its own (and multiprocessing's cleanup here must not read the parent's workers' exit codes)."""
    global _server, _server_lock
    server, _server, _server_lock = _server, None, threading.Lock()
    if server is not None:
        server.close()
    children = multiprocessing.process._children  # type: ignore[attr-defined]
    for child in [c for c in children if isinstance(c, ForkServerProcess)]:
        children.discard(child)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_server_in_child)


def forget_fork_server(pid: int | None, loop: Any) -> bool:
    """Start a new fork server on the next start instead of server ``pid`` (whichever runs when
    None), which has died or is dying, and reap it from the loop without blocking."""
    server = _forget(pid)
    if server is None:
        return False
    _reap_server(server.pid, loop, 0.001, time.monotonic() + 60)
    return True


def _forget(pid: int | None) -> ForkServer | None:
    """Drop server ``pid`` (whichever runs when None) and close its socket; the one dropped."""
    global _server
    with _server_lock:
        server = _server
        if server is None or (pid is not None and server.pid != pid):
            return None
        _server = None
    server.close()
    return server


def _reap_server(pid: int, loop: Any, delay: float, deadline: float) -> None:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return
    if not done and time.monotonic() < deadline:
        loop.call_later(delay, _reap_server, pid, loop, min(delay * 2, 1.0), deadline)


def grow_pipe(fd: int) -> None:
    """Make a pipe hold PIPE_SIZE bytes (Linux), so large messages take fewer writes and reads
    and fewer wake-ups; quietly keep the default where the kernel refuses (pipe-max-size)."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


def start_worker(launch: Launch, state_fd: int, name: str) -> tuple[Any, Any, Any, int | None, int | None]:
    """Start a worker process; return it, the parent's ends of its call and result pipes, the
    anonymous file its faulthandler writes stacks to and its shared-memory arena (None where
    none could be made or shared memory is off)."""
    ctx = launch.ctx
    forkserver = ctx.get_start_method() == "forkserver"
    call_r, call_w = ctx.Pipe(duplex=False)
    result_r, result_w = ctx.Pipe(duplex=False)
    grow_pipe(call_w.fileno())
    grow_pipe(result_r.fileno())
    stack_fd = anonymous_file()
    arena_fd = _shm.create(launch.shm_limit) if launch.shm_limit > 0 else None
    args = (
        PassFd(call_r.fileno()),
        PassFd(result_w.fileno()),
        PassFd(state_fd),
        launch.handler,
        launch.initializer,
        launch.initargs,
        None if stack_fd is None else PassFd(stack_fd),
        PassFd(lifeline()),
        None if arena_fd is None else PassFd(arena_fd),
        launch.shm_limit,
    )
    process_type = ForkServerProcess if forkserver else ctx.Process
    process = process_type(target=_child.main, args=args, name=name)
    try:
        try:
            process.start()
        except ForkServerGone as exc:
            # The fork server died a moment ago, before the pool noticed: forget it, so that a
            # new one starts now.
            forget_fork_server(exc.server_pid, launch.loop)
            process = process_type(target=_child.main, args=args, name=name)
            process.start()
    except BaseException:
        call_w.close()
        result_r.close()
        for fd in (stack_fd, arena_fd):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        call_r.close()
        result_w.close()
    return process, call_w, result_r, stack_fd, arena_fd


def descendants(pid: int | None) -> list[psutil.Process]:
    """Every live process below ``pid`` (a worker's tasks' processes), or [] when it is gone."""
    if pid is None:
        return []  # psutil.Process(None) would be this very process
    import psutil

    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return children


def kill_group(pid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal the process group ``pid`` leads, or the process alone; False if neither exists."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    """Signal each process, ignoring those already gone."""
    import psutil

    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def sample(proc: psutil.Process) -> tuple[str, int, float] | None:
    """psutil status, RSS bytes and CPU seconds of a process; None if it is gone."""
    import psutil

    try:
        with proc.oneshot():
            times = proc.cpu_times()
            return proc.status(), proc.memory_info().rss, times.user + times.system
    except psutil.Error:
        return None


def resources(probe: psutil.Process | None) -> dict[str, Any]:
    """RSS in MB, CPU seconds and psutil status of a process (None when unknown)."""
    if probe is None:
        return {"rss_mb": None, "cpu_seconds": None, "process_status": None}
    figures = sample(probe)
    if figures is None:
        return {"rss_mb": None, "cpu_seconds": None, "process_status": "gone"}
    status, rss, cpu = figures
    return {"rss_mb": round(rss / 2**20, 1), "cpu_seconds": round(cpu, 3), "process_status": status}


def tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds of the processes below ``proc``: the live ones and those it has reaped."""
    import psutil

    try:
        times = proc.cpu_times()
        total: float = times.children_user + times.children_system
        children = proc.children(recursive=True)
    except psutil.Error:
        return 0.0
    for child in children:
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total
