"""Worker processes at the level of the operating system: start arguments, liveness, kills.

Nothing here knows about tasks or pools. It holds what the parent needs to start a worker
process that cannot outlive it (the lifeline), to tell a worker's death from its fork server's
(pidfd, sentinel at end of file), to hand a worker an anonymous file, and to kill a process tree.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.reduction
import multiprocessing.spawn
import os
import select
import signal
import sys
import tempfile
import termios
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from procpool import _child, _shm

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


_lifeline: Any = None
_lifeline_write_fd = -1


def lifeline() -> Any:
    """The read end of a pipe whose write end only this process holds, for workers to watch.

    It reads EOF when this process dies, however it dies. multiprocessing's own parent sentinel
    cannot serve: under forkserver every child also holds the server's liveness pipe, so the
    server and its children keep each other alive after the parent is gone. The write end is
    close-on-exec (os.pipe's default) and closed in any plain fork of this process (a fork-context
    multiprocessing.Process, os.fork), so no helper of the parent keeps the workers alive.
    """
    global _lifeline, _lifeline_write_fd
    if _lifeline is None:
        read_fd, _lifeline_write_fd = os.pipe()  # the write end stays open, unused, until we exit
        os.set_inheritable(_lifeline_write_fd, False)
        _lifeline = multiprocessing.connection.Connection(read_fd, writable=False)
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
    if _lifeline is not None:
        try:
            _lifeline.close()
        except OSError:
            pass
        _lifeline = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_lifeline_in_child)


def anonymous_file() -> int | None:
    """A file with no name, freed by the kernel with its last descriptor: nothing is left on
    disk when the parent is killed. memfd where there is one, else an unlinked temporary file."""
    try:
        return os.memfd_create("procpool-stack")
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


def open_pidfd(pid: int) -> int | None:
    """A file descriptor that reads ready when ``pid`` exits, whoever its parent is (Linux 5.3+)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def at_eof(fd: int) -> bool:
    """Whether a readable pipe is at end of file, without consuming what it holds."""
    try:
        pending = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return int.from_bytes(pending, sys.byteorder) == 0


def fork_server_pid() -> int | None:
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    return getattr(server, "_forkserver_pid", None)


# What the fork server imports before it forks a worker, and the variable through which it learns
# the parent's main module (procpool._forkserver reads it; no string import, so the name is here).
FORK_SERVER_PRELOAD = ["procpool._forkserver"]
FORK_SERVER_ENV = "_PROCPOOL_FORKSERVER_MAIN"


def start_fork_server(ctx: Any) -> None:
    """Start multiprocessing's fork server, unless one runs, so that it imports procpool's
    worker code and this process's main module once, before it forks any worker.

    Without it each worker would run the main module again (with everything it imports) as it
    starts: multiprocessing's own ``"__main__"`` preload does nothing on Python 3.11 to 3.13.7.
    The main module is described in an environment variable, set only while the server is
    spawned (``procpool._forkserver`` removes it there).
    """
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    if fork_server_pid() is not None:
        return  # running (or dead and not yet noticed: multiprocessing restarts it plainly)
    data = multiprocessing.spawn.get_preparation_data("procpool-fork-server")
    main = {
        "ppid": os.getpid(),
        "sys_path": data.get("sys_path"),
        "argv": data.get("sys_argv"),
        "main_path": data.get("init_main_from_path"),
        "main_name": data.get("init_main_from_name"),
    }
    try:
        os.environ[FORK_SERVER_ENV] = json.dumps(main)
    except (TypeError, ValueError):  # pragma: no cover - a sys.path or argv entry json cannot hold
        pass
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.pop(FORK_SERVER_ENV, None)


def forget_fork_server(pid: int | None, loop: Any) -> bool:
    """Make multiprocessing start a new fork server on the next start.

    ``ensure_running()`` restarts a server only once ``waitpid`` shows it dead, and a server that
    has just closed its socket is not a zombie yet: a start in that moment fails with
    ConnectionRefusedError. Forget the server (``pid``, or whichever it is when None) as
    ``ensure_running()`` does for a dead one, and reap it from the loop without blocking.
    """
    server: Any = getattr(multiprocessing.forkserver, "_forkserver", None)
    lock = getattr(server, "_lock", None)
    if lock is None:  # pragma: no cover - another multiprocessing
        return False
    with lock:
        current = getattr(server, "_forkserver_pid", None)
        if current is None or (pid is not None and current != pid):
            return False
        alive_fd = server._forkserver_alive_fd
        server._forkserver_pid = server._forkserver_address = server._forkserver_alive_fd = None
    if alive_fd is not None:
        os.close(alive_fd)
    _reap_server(current, loop, 0.001, time.monotonic() + 60)
    return True


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


def start_worker(launch: Launch, shared: Any, name: str) -> tuple[Any, Any, Any, int | None, int | None]:
    """Start a worker process; return it, the parent's ends of its call and result pipes, the
    anonymous file its faulthandler writes stacks to and its shared-memory arena (None where
    none could be made or shared memory is off)."""
    ctx = launch.ctx
    forkserver = ctx.get_start_method() == "forkserver"
    if forkserver:
        start_fork_server(ctx)
    call_r, call_w = ctx.Pipe(duplex=False)
    result_r, result_w = ctx.Pipe(duplex=False)
    grow_pipe(call_w.fileno())
    grow_pipe(result_r.fileno())
    stack_fd = anonymous_file()
    arena_fd = _shm.create(launch.shm_limit) if launch.shm_limit > 0 else None
    process = ctx.Process(
        target=_child.main,
        args=(
            call_r,
            result_w,
            shared,
            launch.handler,
            launch.initializer,
            launch.initargs,
            None if stack_fd is None else PassFd(stack_fd),
            lifeline(),
            None if arena_fd is None else PassFd(arena_fd),
            launch.shm_limit,
        ),
        name=name,
    )
    try:
        try:
            process.start()
        except (ConnectionRefusedError, FileNotFoundError):
            # The fork server died a moment ago; multiprocessing still trusts it until the
            # kernel has made it a zombie. Forget it, so that a new one starts now.
            if not forkserver or not forget_fork_server(None, launch.loop):
                raise
            start_fork_server(ctx)
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
