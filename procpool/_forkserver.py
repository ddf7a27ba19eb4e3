"""procpool's fork server: a small interpreter that forks every worker process (forkserver only).

The parent starts it once (``procpool._processes.ForkServer``), handing it one end of a Unix
socket pair. It imports what a worker runs (``procpool._child``, and what unpickling a worker's
start arguments needs) and nothing else, so a worker forked from it starts with that code loaded
and without the parent's main module or its asyncio. multiprocessing's own fork server would
import its whole package, start a resource tracker and run the main module first: about 50 ms
more before the first worker.

One request per worker::

    parent -> server   one byte, with [status_w, data_r, *the worker's descriptors] (SCM_RIGHTS)
    server             forks; writes the child's pid to status_w, later its exit code, then
                       closes it (the status pipe reads EOF early only if the server died)
    parent -> child    the start spec through data_r: where to run (sys.path, argv, cwd, the
                       main module), then the pickled target and arguments
    child              runs the target and exits with its exit code, as multiprocessing's
                       children do

The main module is imported in a worker only when something it receives is defined there (a
task function, an initializer): ``__main__`` is a stand-in that imports the real module, as
multiprocessing does (``__mp_main__``), on the first lookup of a name it lacks. A script's
top-level code thus runs in no worker that does not need it, and never in the server.

The server exits when the parent's end of the socket closes, however the parent ends. Workers
do not depend on it: each watches the parent itself (its lifeline).
"""

from __future__ import annotations

import _pickle as pickle  # the C pickler, as in _messages (pickle.py itself imports re)
import ctypes  # noqa: F401 - every worker's start calls prctl and mallopt through it: once, here
import os
import select
import signal
import socket
import struct
import sys
import types

# The worker's code, imported here once instead of in every worker (its start arguments are
# plain descriptors and the caller's own objects: unpickling them needs nothing more).
import procpool._child

__all__ = ("SIGNED", "InheritedFd", "main")

SIGNED = struct.Struct("q")
# Descriptors one request may carry: status, data and the worker's own (its pipes, files, arena).
MAX_FDS = 32

# In a worker: the descriptors its request carried, by index (see InheritedFd).
inherited_fds: list[int] = []


class InheritedFd:
    """A descriptor among a worker's start arguments, by its index among the request's own.

    The parent's Popen puts one in place of each descriptor it passes (multiprocessing's
    ``DupFd`` protocol), so unpickling in the worker finds the descriptor it received.
    """

    def __init__(self, index: int) -> None:
        self.index = index

    def detach(self) -> int:
        return inherited_fds[self.index]


def main(control_fd: int) -> None:
    """Serve fork requests on ``control_fd`` until the parent closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    control = socket.socket(fileno=control_fd)
    children: dict[int, int] = {}  # pid -> write end of its status pipe
    while True:
        ready, _, _ = select.select([control_fd, wake_r], [], [])
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap(children)
        if control_fd not in ready:
            continue
        try:
            msg, fds, flags, _ = socket.recv_fds(control, 1, MAX_FDS)
        except OSError:
            return
        if not msg:
            return  # the parent is gone
        if flags & socket.MSG_CTRUNC or len(fds) < 2:
            for fd in fds:
                os.close(fd)
            continue
        status_w, data_r, *worker_fds = fds
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                control.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                for fd in (wake_r, wake_w, status_w, *children.values()):
                    os.close(fd)
                code = _run_child(data_r, worker_fds)
            finally:
                os._exit(code)
        os.close(data_r)
        for fd in worker_fds:
            os.close(fd)
        try:
            os.write(status_w, SIGNED.pack(pid))
        except OSError:  # the parent gave up on it; the child reads EOF and exits
            os.close(status_w)
        else:
            children[pid] = status_w


def _reap(children: dict[int, int]) -> None:
    """Collect every exited child and write its exit code to its status pipe."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = children.pop(pid, None)
        if fd is None:
            continue
        try:
            os.write(fd, SIGNED.pack(os.waitstatus_to_exitcode(status)))
        except OSError:
            pass
        os.close(fd)


def _run_child(data_fd: int, fds: list[int]) -> int:
    """In a fresh child: read the start spec, run its target; the exit code."""
    global inherited_fds
    for fd in fds:
        os.set_inheritable(fd, False)
    inherited_fds = fds
    with open(data_fd, "rb", closefd=True) as f:
        data = f.read()
    # As multiprocessing's children: standard input is the parent's, not a task's to read.
    if sys.stdin is not None:
        try:
            sys.stdin.close()
            sys.stdin = open(os.devnull)  # noqa: SIM115 - stays open for the process's life
        except (OSError, ValueError):
            pass
    name = "procpool-worker"
    try:
        (size,) = SIGNED.unpack_from(data)
        where = pickle.loads(memoryview(data)[SIGNED.size : SIGNED.size + size])
        name = where["name"]
        sys.path[:] = where["sys_path"]
        sys.argv[:] = where["argv"]
        if where["cwd"]:
            os.chdir(where["cwd"])
        _stand_in_for_main(where["main_path"], where["main_name"])
        procpool._child.process_name = name
        target, args, kwargs = pickle.loads(memoryview(data)[SIGNED.size + size :])
        del data
        target(*args, **kwargs)
        code = 0
    except SystemExit as exc:  # multiprocessing's rules for a process's exit code
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            sys.stderr.write(f"{exc.code}\n")
            code = 1
    except BaseException:
        import traceback

        sys.stderr.write(f"Process {name}:\n")
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    return code


def _stand_in_for_main(main_path: str | None, main_name: str | None) -> None:
    """Make ``__main__`` a module that imports the parent's main module when first asked for a
    name it lacks (multiprocessing's ``__mp_main__``, with its checks), then answers from it."""
    if not main_path and not main_name:
        return
    stand_in = types.ModuleType("__mp_main__")
    importing = False

    def __getattr__(name: str) -> object:
        nonlocal importing
        if importing or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        importing = True
        try:
            module = _import_main(main_path, main_name)
        finally:
            importing = False
        if module is stand_in:
            raise AttributeError(f"module '__main__' has no attribute {name!r}")
        return getattr(module, name)

    stand_in.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules["__main__"] = sys.modules["__mp_main__"] = stand_in


def _import_main(main_path: str | None, main_name: str | None) -> object:
    # multiprocessing's own functions, so the main module is imported exactly as under spawn.
    # While it runs, starting processes raises multiprocessing's "bootstrapping phase" error
    # (a script whose pools start outside 'if __name__ == "__main__":').
    from multiprocessing import process, spawn

    current = process.current_process()
    current._inheriting = True  # type: ignore[attr-defined]
    try:
        if main_path:
            spawn.import_main_path(main_path)
        else:
            spawn._fixup_main_from_name(main_name)  # type: ignore[attr-defined]
    finally:
        del current._inheriting  # type: ignore[attr-defined]
    return sys.modules["__main__"]
