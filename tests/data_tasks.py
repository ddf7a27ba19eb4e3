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


def kill_if_marked(value: Any) -> int:
    """Kill this worker if the buffer's first byte is 1, else return the sum of its bytes."""
    if memoryview(value).cast("B")[0] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return total(value)


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


def address_of(value: Any) -> int:
    """Where ``value``'s bytes start in this process (bytes, bytearray or a numpy array)."""
    import ctypes

    if isinstance(value, bytes):
        as_string = ctypes.PyDLL(None).PyBytes_AsString  # not pythonapi's, which the process shares
        as_string.argtypes, as_string.restype = (ctypes.py_object,), ctypes.c_void_p
        return int(as_string(value))
    if isinstance(value, bytearray):
        return ctypes.addressof(ctypes.c_char.from_buffer(value))
    return int(value.ctypes.data)


def huge_page_advised(address: int) -> bool:
    """Whether the mapping holding ``address`` in this process is advised for huge pages (``hg``)."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's first line: start-end ...
                start, end = (int(x, 16) for x in first.split("-"))
                inside = start <= address < end
            elif inside and first == "VmFlags:":
                return "hg" in line.split()[1:]
    raise LookupError(f"no mapping holds {address:#x}")


def argument_is_huge_page_advised(value: Any) -> bool:
    """In the worker: whether the argument's memory (well inside it) is advised for huge pages."""
    return huge_page_advised(address_of(value) + len(memoryview(value).cast("B")) // 2)


def filled(n: int, value: int, readonly: bool = False) -> Any:
    """An ``n``-byte numpy array of ``value``, made here (read-only if asked)."""
    import numpy as np

    out = np.full(n, value, dtype=np.uint8)
    out.flags.writeable = not readonly
    return out


def pickle_buffer(n: int) -> Any:
    """A result that is a bare PickleBuffer: not numpy's, so it arrives as a bytearray."""
    import pickle

    return pickle.PickleBuffer(bytearray(b"\x05") * n)


def pickle_buffer_of_array(n: int) -> Any:
    """A bare PickleBuffer a task made of a numpy array: numpy does not rebuild it."""
    import pickle

    import numpy as np

    return pickle.PickleBuffer(np.full(n, 5, dtype=np.uint8))


def _explode() -> None:
    raise ValueError("this object cannot be rebuilt")


class Unloadable:
    """Pickles in the worker; rebuilding it in the parent raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def array_then_unloadable(n: int) -> tuple[Any, Unloadable]:
    import numpy as np

    return np.full(n, 1, dtype=np.uint8), Unloadable()


class CountsItsPickling:
    """Counts how often it is pickled, in the process that pickles it."""

    def __init__(self) -> None:
        self.pickled = 0

    def __reduce__(self) -> tuple[Any, ...]:
        self.pickled += 1
        return (CountsItsPickling, ())
