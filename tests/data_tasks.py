"""Task functions for the data-plane tests: they live in a module so workers can import them."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def identity(value: Any) -> Any:
    return value


def pair(a: Any, b: Any) -> tuple[Any, Any]:
    return a, b


def fill(n: int, byte: int = 7) -> bytes:
    return bytes([byte]) * n


def array(n: int) -> Any:
    import numpy as np

    return np.arange(n, dtype=np.int64)


def total(value: Any) -> int:
    import numpy as np

    return int(np.asarray(value).sum())


def keep(value: Any) -> int:
    """Keep the argument in the worker across tasks (it must not change under the next call)."""
    global _kept
    _kept = value
    return len(value)


def kept() -> Any:
    return _kept


_kept: Any = None


def faults_of_a_second_buffer(n: int) -> tuple[int, int]:
    """Fill an ``n``-byte buffer, free it, fill another: (minor page faults of the second, pages)."""
    import resource

    pages = n // os.sysconf("SC_PAGE_SIZE")
    for _ in range(2):  # the first one frees a block like the second
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buf = bytearray(n)
        buf[:: os.sysconf("SC_PAGE_SIZE")] = bytes(pages)  # touch every page, whatever bytearray() did
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        del buf
    return faults, pages


def kill_self_after_copy(value: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_with(value: Any, seconds: float = 30.0) -> int:
    if len(value):
        time.sleep(seconds)
    return len(value)


def arena_fds() -> list[str]:
    """What the worker's descriptors point to, for the leak tests."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def square(x: int) -> int:
    return x * x


def fail_on_seven(x: int) -> int:
    if x == 7:
        raise ValueError("bad 7")
    return x
