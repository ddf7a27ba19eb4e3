"""Task functions that abuse the worker the way an adversarial user would (issue 9's attacks).

They live in a module so that worker processes can import them.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time


def first_over(xs: list[int], t: int) -> int:
    """The classic way to leak StopIteration: ``next()`` on a generator that finds nothing."""
    return next(x for x in xs if x > t)


def stop_at_three(x: int) -> int:
    if x == 3:
        raise StopIteration(x)
    return x


def stop_async() -> None:
    raise StopAsyncIteration


def stop_handler(prompt: str, context: dict) -> str:
    """A prompt handler that raises StopIteration for the prompt "stop"."""
    if prompt == "stop":
        raise StopIteration
    return prompt


def ident(x: object) -> object:
    return x


def sys_exit(code: object) -> None:
    sys.exit(code)


def keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def cancelled() -> None:
    raise asyncio.CancelledError


async def async_sys_exit(code: int) -> None:
    sys.exit(code)


def exit_handler(prompt: str, context: dict) -> str:
    """A prompt handler that calls sys.exit(3) for the prompt "exit"."""
    if prompt == "exit":
        sys.exit(3)
    return prompt


class ExitOnReduce(Exception):
    """An exception whose pickling raises SystemExit."""

    def __reduce__(self):  # type: ignore[override]
        raise SystemExit(4)


def raise_exit_on_reduce() -> None:
    raise ExitOnReduce("boom")


class ExitOnLoad:
    """A result that calls sys.exit when unpickled (pickle runs the sender's code)."""

    def __reduce__(self):  # type: ignore[override]
        return (sys.exit, (5,))


def exit_on_load_result() -> object:
    return ExitOnLoad()


def hang_forever() -> None:
    """An initializer that never returns."""
    threading.Event().wait()


def leave_thread(seconds: float) -> int:
    """Start a non-daemon thread that outlives the task by ``seconds``."""
    threading.Thread(target=time.sleep, args=(seconds,), daemon=False).start()
    return os.getpid()


def child_sleeps(seconds: float) -> int:
    """Wait on a child process that uses no CPU at all."""
    import subprocess

    subprocess.run([sys.executable, "-c", f"import time; time.sleep({seconds})"], check=True)
    return os.getpid()


def child_burns_cpu(seconds: float) -> int:
    """Wait on a child process that uses CPU the whole time (as a build would)."""
    import subprocess

    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    subprocess.run([sys.executable, "-c", code], check=True)
    return os.getpid()


def segfault_in_c() -> None:
    """Dereference NULL in C: the worker dies of SIGSEGV inside this function."""
    import ctypes

    ctypes.string_at(0)
