"""Task functions for the tests. They live in a module so that worker processes can import them."""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def pid() -> int:
    return os.getpid()


def slow_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def sleep_then(seconds: float, value: object) -> object:
    time.sleep(seconds)
    return value


async def async_double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


class CustomError(Exception):
    pass


def raise_custom(message: str) -> None:
    raise CustomError(message)


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def exit_now(code: int) -> None:
    os._exit(code)


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


def segfault() -> None:
    faulthandler.disable()  # keep the test output quiet
    faulthandler._sigsegv()


def touch_after(path: str, seconds: float) -> None:
    """Sleep, then create a file: if the file appears, the task was not stopped."""
    time.sleep(seconds)
    Path(path).touch()


def count_and_return(path: str, value: object) -> object:
    """Append one line per run, so a test can count how often the task ran."""
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


def wait_for_file(path: str, timeout: float = 30.0) -> int:
    """Block until a file exists (a barrier the test opens), then return this worker's pid."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return os.getpid()


def mark_then_wait(mark: str, barrier: str, timeout: float = 30.0) -> int:
    """Create ``mark`` (the test knows the task started), then wait for ``barrier``."""
    Path(mark).touch()
    return wait_for_file(barrier, timeout)


def busy_loop(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def unpicklable_result() -> object:
    return threading.Lock()


class Unloadable:
    """Pickles fine, fails to unpickle: __reduce__ names a function that raises."""

    def __reduce__(self):
        return (_refuse, ())


def _refuse() -> None:
    raise RuntimeError("this object refuses to be unpickled")


def unloadable_result() -> object:
    return Unloadable()


class NeedsArgsError(Exception):
    """An exception whose unpickling fails: __init__ needs two arguments, args holds one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_needs_args() -> None:
    raise NeedsArgsError("x", "y")


def raise_unpicklable() -> None:
    err = ValueError("carries a lock")
    err.lock = threading.Lock()  # type: ignore[attr-defined]
    raise err


def failing_initializer() -> None:
    raise RuntimeError("initializer refuses")


_initialized: list[str] = []


def record_init(value: str) -> None:
    _initialized.append(value)


def initialized() -> list[str]:
    return list(_initialized)


def prompt_handler(prompt: str, context: dict) -> str:
    if prompt == "fail":
        raise ValueError("handler failed on purpose")
    return f"{prompt.upper()}:{context.get('n', 0)}"


async def async_handler(prompt: str, context: dict) -> str:
    await asyncio.sleep(0)
    return prompt[::-1]


def fail_on_seven(x: int) -> int:
    return fail_on(x, 7)


def regex_forever() -> None:
    """C code that never returns to the interpreter: catastrophic backtracking, GIL held."""
    import re

    re.match(r"(a+)+$", "a" * 64 + "b")


def heartbeat_sleep(seconds: float, step: float = 0.1) -> str:
    """Wait without using CPU, but report progress with procpool.heartbeat()."""
    import procpool

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        procpool.heartbeat()
        time.sleep(step)
    return "done"


def sleep_in_named_function(seconds: float) -> None:
    time.sleep(seconds)


_hoard: list[bytes] = []


def hold_memory(mb: int, seconds: float = 0.0) -> int:
    """Allocate and keep ``mb`` MiB in the worker, then optionally wait."""
    _hoard.append(bytearray(mb * 2**20))
    for block in _hoard:
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it counts in RSS
    time.sleep(seconds)
    return os.getpid()


def spawn_and_wait(pidfile: str, seconds: float) -> None:
    """Start a long-running subprocess, record its pid, then block."""
    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    Path(pidfile).write_text(str(proc.pid))
    time.sleep(seconds)


def chaos(kind: str, runs: str, task_id: int) -> object:
    """One chaos-test task: record that it ran, then behave as ``kind`` says."""
    with open(runs, "a") as f:
        f.write(f"{task_id}\n")
    if kind == "ok":
        return task_id
    if kind == "raise":
        raise ValueError(f"task {task_id} raised")
    if kind == "exit":
        os._exit(3)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "segfault":
        segfault()
    if kind in ("timeout", "stuck", "cancel"):
        time.sleep(60)
    if kind == "memory":
        hold_memory(300, 60)
    if kind == "unpicklable":
        return threading.Lock()
    raise AssertionError(kind)


def ignore_sigterm_then_sleep(seconds: float) -> float:
    """Like a library that installs its own SIGTERM handler: survive SIGTERM, then finish."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return seconds


def finish_on_sigterm(timeout: float = 30.0) -> str:
    """Like a library that catches SIGTERM to wind down: return as soon as SIGTERM arrives."""
    asked: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: asked.append(signum))
    try:
        deadline = time.monotonic() + timeout
        while not asked:
            if time.monotonic() > deadline:
                raise TimeoutError("no SIGTERM came")
            time.sleep(0.005)
        return "stopped"
    finally:
        signal.signal(signal.SIGTERM, previous)


def sleep_if_exists(path: str, seconds: float) -> None:
    """An initializer that is slow only once the test has created ``path``."""
    if os.path.exists(path):
        time.sleep(seconds)


def exit_if_exists(path: str) -> None:
    """An initializer that fails (exit code 4) once the test has created ``path``."""
    if os.path.exists(path):
        os._exit(4)


# -- process-level robustness (issue 9, items 6, 9, 10) ----------------------------------------------

_DAEMON = """
import os, sys, time
pidfile, seconds = sys.argv[1], float(sys.argv[2])
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
with open(pidfile + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(pidfile + ".tmp", pidfile)
time.sleep(seconds)
"""


def text_when_ready(path: str, timeout: float = 30.0) -> str:
    """Block until ``path`` exists; return its text."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return Path(path).read_text()


def leave_daemon(pidfile: str, seconds: float, then_sleep: float = 0.0) -> int:
    """Start a double-forked daemon in a new session (its parent exits at once), then sleep."""
    subprocess.run([sys.executable, "-c", _DAEMON, pidfile, str(seconds)], check=True)
    pid = int(text_when_ready(pidfile))
    time.sleep(then_sleep)
    return pid


def spawn_new_session_and_wait(pidfile: str, seconds: float) -> None:
    """Start a subprocess in a session of its own, record its pid, then block."""
    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"], start_new_session=True)
    Path(pidfile).write_text(str(proc.pid))
    time.sleep(seconds)


_kept: list[subprocess.Popen[bytes]] = []


def start_kept_child(code: int) -> int:
    """Start a child that exits with ``code`` at once, and keep its Popen for a later task."""
    proc = subprocess.Popen(["sh", "-c", f"exit {code}"])
    _kept.append(proc)
    return proc.pid


def wait_kept_child() -> int:
    """The exit code of the child start_kept_child started, as its Popen reports it."""
    return _kept.pop().wait()


def wait_for_file_then_exit(path: str, code: int) -> None:
    """Block until ``path`` exists, then end the worker with exit code ``code``."""
    text_when_ready(path, 120)
    os._exit(code)


def close_fd_linked_to(links: list[str], seconds: float, code: int) -> None:
    """Close this process's end of any pipe whose /proc link is in ``links``, live on, then exit."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in links:
                os.close(int(fd))
        except OSError:
            pass
    time.sleep(seconds)
    os._exit(code)


def put_on(queue: Any, value: Any) -> Any:
    """Put value on a queue passed as an argument (a multiprocessing Manager's proxy)."""
    queue.put(value)
    return value


def multiprocessing_facts() -> tuple[str | None, str]:
    """What multiprocessing says in a worker: its start method and the process's name."""
    import multiprocessing

    return multiprocessing.get_start_method(allow_none=True), multiprocessing.current_process().name


def register_exit_marks(directory: str) -> int:
    """Register an atexit handler and a multiprocessing finalizer that each leave a file when the
    worker process ends."""
    import atexit
    import multiprocessing.util

    atexit.register(Path(directory, "atexit").touch)
    multiprocessing.util.Finalize(None, Path(directory, "finalizer").touch, exitpriority=0)
    return os.getpid()


_initargs: list[Any] = []


def keep_objects(*objects: Any) -> None:
    """An initializer that keeps what it is given (pipe ends passed as initargs, say)."""
    _initargs.extend(objects)


def multiprocessing_facts_after_looking_it_up(authkey: bytes) -> tuple[str | None, str, bool]:
    """Look multiprocessing up (as a library checking for it may) before importing it, then say
    its start method, the process's name and whether the authkey is ``authkey``."""
    import importlib.util

    assert importlib.util.find_spec("multiprocessing") is not None
    import multiprocessing

    current = multiprocessing.current_process()
    return multiprocessing.get_start_method(allow_none=True), current.name, bytes(current.authkey) == authkey


def leave_process(seconds: float) -> int:
    """Start a non-daemon multiprocessing child that sleeps, and return its pid without joining it."""
    import multiprocessing

    child = multiprocessing.Process(target=time.sleep, args=(seconds,))
    child.start()
    _initargs.append(child)
    assert child.pid is not None
    return child.pid
