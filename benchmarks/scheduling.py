"""Scheduling benchmark (issue 15): what priorities buy under a burst, and what they cost per task.

Two measurements, each in one run on one machine:

1. **Burst**: 2,000 tasks of about 1 ms submitted at once, one in ten at priority 10, the rest at
   0, into a pool that honours the priorities and into a FIFO pool (every task at priority 0, same
   submission order). The wait of a task is from its submission to its start in the worker
   (``time.monotonic`` is one clock for every process on Linux). Printed: p50/p99 wait of the
   high-priority tasks in both pools, and of the low-priority ones.
2. **Overhead**: ``N`` no-op tasks, one ``submit`` each, gathered; best of ``--repeat`` runs, in
   microseconds per task: plain submits (every task at priority 0), submits at three mixed
   priorities, and submits with a retry policy. The goal: within 10 % of plain submits.

Usage::

    python benchmarks/scheduling.py [--tasks 2000] [--overhead-tasks 50000] [--repeat 5]
    python benchmarks/scheduling.py --overhead-only   # also runs on a procpool without priorities
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from procpool import WorkerPool

HIGH = 10
# One task in HIGH_EVERY is high priority in the burst.
HIGH_EVERY = 10
# Seconds each burst task works (sleeps), so the burst takes a while on three workers.
TASK_SECONDS = 0.001


def started_at(seconds: float) -> float:
    """The worker's monotonic clock when the task started; then work ``seconds``."""
    start = time.monotonic()
    time.sleep(seconds)
    return start


def noop() -> None:
    """Nothing: the task for per-task overhead."""


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49] * 1e3, cuts[98] * 1e3


async def burst(tasks: int, honour: bool) -> dict[str, tuple[float, float]]:
    """Submit the mixed burst at once; the waits of the high and low tasks, p50/p99 in ms."""
    async with WorkerPool("burst-prio" if honour else "burst-fifo") as pool:
        await pool.apply(started_at, (0.0,))  # warm
        submitted, futures, high = [], [], []
        for i in range(tasks):
            is_high = i % HIGH_EVERY == HIGH_EVERY - 1
            priority = HIGH if honour and is_high else 0
            submitted.append(time.monotonic())
            futures.append(pool.submit(started_at, TASK_SECONDS, priority=priority))
            high.append(is_high)
        starts = await asyncio.gather(*futures)
    waits = [start - sub for start, sub in zip(starts, submitted, strict=True)]
    return {
        "high": percentiles([w for w, h in zip(waits, high, strict=True) if h]),
        "low": percentiles([w for w, h in zip(waits, high, strict=True) if not h]),
    }


async def overhead(tasks: int, repeat: int, mode: str) -> float:
    """Best microseconds per task of ``tasks`` no-op submits in ``mode``."""
    options: list[dict[str, Any]]
    if mode == "plain":
        options = [{}]
    elif mode == "priorities":
        options = [{"priority": p} for p in (0, 5, 10)]
    else:
        from procpool import RetryPolicy

        options = [{"retry": RetryPolicy()}]
    best = float("inf")
    async with WorkerPool(f"overhead-{mode}") as pool:
        await asyncio.gather(*(pool.submit(noop) for _ in range(1000)))  # warm
        for _ in range(repeat):
            start = time.perf_counter()
            futures = [pool.submit(noop, **options[i % len(options)]) for i in range(tasks)]
            await asyncio.gather(*futures)
            best = min(best, (time.perf_counter() - start) / tasks * 1e6)
    return best


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--overhead-tasks", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--overhead-only", action="store_true", help="only plain submits (any procpool)")
    args = parser.parse_args()
    if not args.overhead_only:
        print(f"burst: {args.tasks} tasks of {TASK_SECONDS * 1e3:g} ms, 1 in {HIGH_EVERY} at priority {HIGH}")
        for honour in (True, False):
            result = await burst(args.tasks, honour)
            name = "priorities" if honour else "FIFO      "
            (h50, h99), (l50, l99) = result["high"], result["low"]
            print(f"  {name}  high p50 {h50:7.1f} ms  p99 {h99:7.1f} ms   low p50 {l50:7.1f} ms  p99 {l99:7.1f} ms")
    modes = ["plain"] if args.overhead_only else ["plain", "priorities", "retry"]
    print(f"overhead: {args.overhead_tasks} no-op tasks, one submit each, best of {args.repeat}")
    plain = None
    for mode in modes:
        us = await overhead(args.overhead_tasks, args.repeat, mode)
        plain = plain or us
        print(f"  {mode:<11} {us:6.2f} us/task  ({us / plain - 1:+.1%} vs plain)")


if __name__ == "__main__":
    asyncio.run(main())
