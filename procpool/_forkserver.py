"""procpool's fork server: a small interpreter that forks every worker process (forkserver only).

The parent starts it once (``procpool._processes.ForkServer``), handing it one end of a Unix
socket pair. It imports what a worker runs (``procpool._child``, and what unpickling a worker's
start arguments needs) and nothing else, so a worker forked from it starts with that code loaded
and without the parent's main module or its asyncio. multiprocessing's own fork server would
import its whole package, start a resource tracker and run the main module first: about 50 ms
more before the first worker.

One request per worker::

    parent -> server   one byte, with [status_w, data_r, *the worker's descriptors] (SCM_RIGHTS)
    server             forks; writes the child's pid to status_w (-errno if it cannot), later
                       its exit code, then closes it (the status pipe reads EOF early only if
                       the server died)
    parent -> child    the start spec through data_r, read by size: where to run (sys.path,
                       argv, cwd, the main module, authkey, name), then the pickled target and
                       arguments
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
import atexit
import ctypes  # noqa: F401 - every worker's start calls prctl and mallopt through it: once, here
import errno
import os
import select
import signal
import socket
import struct
import sys
import threading
import types

# The worker's code, imported here once instead of in every worker (its start arguments are
# plain descriptors and the caller's own objects: unpickling them needs nothing more).
import procpool._child

# typing.TYPE_CHECKING without importing typing (see procpool._child).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec

__all__ = ("HEADER", "SIGNED", "InheritedFd", "main")

SIGNED = struct.Struct("q")
# The start spec's prefix: the sizes of its two pickles (where to run; what to run).
HEADER = struct.Struct("qq")
# Descriptors one request may carry (the kernel's limit per message): status, data and the
# worker's own (its pipes, files, arena, and any its initargs hold).
MAX_FDS = 253

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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (workers too)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    control = socket.socket(fileno=control_fd)
    children: dict[int, int] = {}  # pid -> write end of its status pipe
    poller = select.poll()  # not select(): the parent may hand over a descriptor above 1023
    poller.register(control_fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    try:
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if wake_r in ready:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                _reap(children)
            if control_fd in ready and not _serve_one(control, children, (wake_r, wake_w)):
                return
    finally:
        control.close()


def _serve_one(control: socket.socket, children: dict[int, int], own: tuple[int, ...]) -> bool:
    """Fork a worker for the next request; False once the parent is gone."""
    try:
        msg, fds, flags, _ = socket.recv_fds(control, 1, MAX_FDS)
    except OSError:
        return False
    if not msg:
        return False
    if len(fds) < 2:  # not a request of ours
        for fd in fds:
            os.close(fd)
        return True
    status_w, data_r, *worker_fds = fds
    if flags & socket.MSG_CTRUNC:  # the server is out of descriptors itself
        return _refuse(status_w, [data_r, *worker_fds], errno.EMFILE)
    try:
        pid = os.fork()
    except OSError as exc:  # no more processes or memory: the parent counts a failed start
        return _refuse(status_w, [data_r, *worker_fds], exc.errno or errno.EAGAIN)
    if pid == 0:
        code = 1
        try:
            control.close()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (*own, status_w, *children.values()):
                os.close(fd)
            atexit._clear()  # the server's handlers are not the worker's
            code = _run_child(data_r, worker_fds)
        finally:
            os._exit(code)
    for fd in (data_r, *worker_fds):
        os.close(fd)
    try:
        os.write(status_w, SIGNED.pack(pid))
    except OSError:  # the parent gave up on it; the child reads a short spec and exits
        os.close(status_w)
    else:
        children[pid] = status_w
    return True


def _refuse(status_w: int, fds: list[int], error: int) -> bool:
    """Answer a request with ``-error`` instead of a pid (the parent raises OSError)."""
    for fd in fds:
        os.close(fd)
    try:
        os.write(status_w, SIGNED.pack(-error))
    except OSError:
        pass
    os.close(status_w)
    return True


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


def _read_spec(fd: int) -> tuple[bytes, bytes] | None:
    """The two pickles of the start spec, read by their sizes (not to end of file: a plain fork
    of the parent may hold the write end open); None if the parent closed it short."""
    with open(fd, "rb", closefd=True) as f:
        head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            return None
        where_size, run_size = HEADER.unpack(head)
        where, run = f.read(where_size), f.read(run_size)
    if len(where) < where_size or len(run) < run_size:
        return None
    return where, run


def _run_child(data_fd: int, fds: list[int]) -> int:
    """In a fresh child: read the start spec, run its target; the exit code (multiprocessing's
    rules for a process's exit code, and its end-of-process work)."""
    global inherited_fds
    for fd in fds:
        os.set_inheritable(fd, False)
    inherited_fds = fds
    spec = _read_spec(data_fd)
    if spec is None:
        return 1  # the parent gave up on this worker before it sent the spec
    # As multiprocessing's children: standard input is the parent's, not a task's to read.
    if sys.stdin is not None:
        try:
            sys.stdin.close()
            sys.stdin = open(os.devnull)  # noqa: SIM115 - stays open for the process's life
        except (OSError, ValueError):
            pass
    name = "procpool-worker"
    try:
        where = pickle.loads(spec[0])
        name = where["name"]
        sys.path[:] = where["sys_path"]
        sys.argv[:] = where["argv"]
        if where["cwd"]:
            os.chdir(where["cwd"])
        if "multiprocessing" in sys.modules:  # the server had it (a .pth file, sitecustomize)
            _configure_multiprocessing(sys.modules["multiprocessing"], where["authkey"], name)
        else:
            sys.meta_path.insert(0, _ConfigureMultiprocessing(where["authkey"], name))
        _stand_in_for_main(where["main_path"], where["main_name"])
        procpool._child.process_name = name
        target, args, kwargs = pickle.loads(spec[1])
        del spec
        target(*args, **kwargs)
        code = 0
    except SystemExit as exc:
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
    _end_of_process()
    return code


def _end_of_process() -> None:
    """What multiprocessing runs as its children end: from Python 3.13 the atexit handlers, then
    its finalizers; then flush the standard streams. Unlike multiprocessing, the processes a task
    left running are not waited for (the parent ends the worker's whole process group)."""
    util = sys.modules.get("multiprocessing.util")
    if sys.version_info >= (3, 13):
        if util is not None:  # its exit handler joins the processes a task left: not run here
            atexit.unregister(util._exit_function)
        atexit._run_exitfuncs()
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        try:
            util._run_finalizers(0)
            util._run_finalizers()
        except BaseException:  # the exit code is already decided
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _configure_multiprocessing(mp: types.ModuleType, authkey: bytes, name: str) -> None:
    """As multiprocessing's own fork-server children have it: the parent's authkey (a Manager's
    proxies among a task's arguments connect with it), the worker's process name, and the
    forkserver start method for any process a task starts."""
    current = mp.current_process()
    current.authkey = authkey
    current.name = name
    mp.set_start_method("forkserver", force=True)


class _ConfigureMultiprocessing:
    """A meta-path finder that waits for the worker's first import of multiprocessing (procpool
    does not import it to start a worker) and configures it once it has run."""

    def __init__(self, authkey: bytes, name: str) -> None:
        self.authkey = authkey
        self.name = name

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "multiprocessing":
            return None
        # The spec the other finders give, with no import here (this runs under the import lock).
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec: ModuleSpec | None = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        run = getattr(spec.loader, "exec_module", None)
        if run is None:
            return spec

        def exec_module(module: types.ModuleType) -> None:
            run(module)
            # Done (a spec merely looked for leaves the finder in place); rebound, not mutated,
            # so that an import running in another thread walks the list it started with.
            sys.meta_path = [f for f in sys.meta_path if f is not self]
            _configure_multiprocessing(module, self.authkey, self.name)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign,union-attr]
        return spec


def _stand_in_for_main(main_path: str | None, main_name: str | None) -> None:
    """Make ``__main__`` a module that imports the parent's main module when first asked for a
    name it lacks (multiprocessing's ``__mp_main__``, with its checks), then answers from it.
    Without a main module to import (an interactive parent, ``python -c``), an empty one."""
    stand_in = types.ModuleType("__mp_main__")
    sys.modules["__main__"] = sys.modules["__mp_main__"] = stand_in
    if not main_path and not main_name:
        return
    # One import at a time. While it runs, a lookup from its own thread (the main module asking
    # for its own names) or from another one (a thread its top level starts) finds nothing, as
    # under spawn, where ``__main__`` becomes the module only once it has run.
    lock = threading.Lock()

    def __getattr__(name: str) -> object:
        if (name.startswith("__") and name.endswith("__")) or not lock.acquire(blocking=False):
            raise AttributeError(name)
        try:
            module = sys.modules["__main__"]
            if module is stand_in:
                module = _import_main(main_path, main_name)
        finally:
            lock.release()
        if module is stand_in:
            raise AttributeError(f"module '__main__' has no attribute {name!r}")
        return getattr(module, name)

    stand_in.__getattr__ = __getattr__  # type: ignore[method-assign]


def _import_main(main_path: str | None, main_name: str | None) -> types.ModuleType:
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
