"""Task functions for the scheduling tests (priorities, retries, graphs, tags, autoscaling).

Each one that matters for counting writes a line to a log file with O_APPEND when it starts, so
a test can count every execution and see the order in which they started.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time


def log(path: str, text: str) -> None:
    """Append one line in one write (lines of concurrent workers never interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def lines(path: str) -> list[str]:
    """The lines logged so far (none if nothing was logged)."""
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def gate(lock_path: str, then: float = 0.0) -> int:
    """Block until the test releases its exclusive lock on ``lock_path``, work ``then`` seconds; return the pid."""
    with open(lock_path) as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        fcntl.flock(f, fcntl.LOCK_UN)
    time.sleep(then)
    return os.getpid()


def record(path: str, name: str, seconds: float = 0.0) -> str:
    """Log ``pid name`` at the start, then work for ``seconds``."""
    log(path, f"{os.getpid()} {name}")
    if seconds:
        time.sleep(seconds)
    return name


def crash_until(path: str, runs: int) -> int:
    """Log the run; kill the worker on the first ``runs - 1`` runs, return the run count on the next."""
    log(path, f"{os.getpid()} {time.monotonic()}")
    count = len(lines(path))
    if count < runs:
        os.kill(os.getpid(), signal.SIGKILL)
    return count


def raise_value_error(path: str) -> None:
    """Log the run, then raise ValueError (the task's own failure)."""
    log(path, str(os.getpid()))
    raise ValueError("the task's own failure")


def sleep_logged(path: str, seconds: float) -> None:
    """Log the run, then sleep past any short timeout."""
    log(path, str(os.getpid()))
    time.sleep(seconds)


def add(a: int, b: int) -> int:
    """a + b, logged nowhere."""
    return a + b


def pid_after(path: str, name: str, seconds: float) -> tuple[str, int, float, float]:
    """Log ``name``, work ``seconds``; return (name, pid, start, end) in monotonic time."""
    start = time.monotonic()
    log(path, name)
    time.sleep(seconds)
    return name, os.getpid(), start, time.monotonic()


def fail_with(message: str) -> None:
    """Raise RuntimeError(message)."""
    raise RuntimeError(message)


def map_item(arg: tuple[str, int, int, str]) -> int:
    """Log ``value``; if it is ``poison``, kill the worker ("crash") or raise ValueError on its first run ("raise")."""
    path, value, poison, how = arg
    log(path, str(value))
    if value == poison:
        if how == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if lines(path).count(str(value)) == 1:
            raise ValueError(f"item {value} fails on its first run")
    return value * 10
