"""Task functions the benchmarks send to every pool.

They live in their own module so that workers of every start method (fork, forkserver, spawn,
loky) can import them by name. aiomultiprocess only runs coroutines, hence the ``a*`` twins.
"""

from __future__ import annotations

import os
import signal
import time


def square(x: int) -> int:
    return x * x


async def asquare(x: int) -> int:
    return x * x


def burn(iterations: int) -> int:
    """Pure-Python CPU work: a fixed amount of it, so its duration reflects the CPU a worker gets."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


async def aburn(iterations: int) -> int:
    return burn(iterations)


def suicide() -> None:
    """Kill the worker running this task, as a segfault or the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


async def asuicide() -> None:
    suicide()


def calibrate_burn(seconds: float) -> int:
    """How many ``burn`` iterations take about ``seconds`` here (best of three: least noise)."""
    probe = 200_000
    best = min(_timed(burn, probe) for _ in range(3))
    return max(1000, int(probe * seconds / best))


def _timed(fn, arg: int) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def echo(value: object) -> object:
    """The payload sweep's task: the argument back, so it travels both ways."""
    return value


def compile_procpool() -> None:
    """Compile procpool's bytecode, as installing a package does (pip compiles it): a checkout
    run with PYTHONDONTWRITEBYTECODE would otherwise compile its modules again in every fresh
    process, and a cold start would measure the compiler (the peers are installed packages)."""
    import compileall
    from pathlib import Path

    import procpool

    compileall.compile_dir(str(Path(procpool.__file__).parent), quiet=1)
