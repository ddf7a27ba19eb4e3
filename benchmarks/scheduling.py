"""Scheduling benchmark (issue 15): what priorities buy under a burst, and what they cost per task.

Two measurements, each in one run on one machine:

1. **Burst**: 2,000 tasks of about 1 ms submitted at once, one in ten at priority 10, the rest at
   0, into a pool that honours the priorities and into a FIFO pool (every task at priority 0, same
   submission order). The wait of a task is from its submission to its start in the worker
   (``time.monotonic`` is one clock for every process on Linux). Printed: p50/p99 wait of the
   high-priority tasks in both pools, and of the low-priority ones.
2. **Overhead**: ``N`` no-op tasks, one ``submit`` each, gathered, in microseconds per task:
   plain submits (every task at priority 0), submits at three mixed priorities (0, 5, 10 in
   turn, so they run in another order than submitted), and submits with a retry policy. The
   modes take turns in one pool, ``--repeat`` rounds, each round in a rotated order, so that a
   shared machine's drift and the parent's heap growth fall on every mode alike; printed: the
   median of the rounds (and the best), wall clock and the parent process's CPU time (what the
   scheduling code costs, less sensitive to other jobs on the machine). The goal: within 10 %
   of plain submits.

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


def call_options(mode: str) -> list[dict[str, Any]]:
    """The keyword arguments of the submits of ``mode``, used in turn."""
    if mode == "plain":
        return [{}]
    if mode == "priorities":
        return [{"priority": p} for p in (0, 5, 10)]
    from procpool import RetryPolicy

    return [{"retry": RetryPolicy()}]


async def overhead(tasks: int, repeat: int, modes: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Per mode, microseconds per task of ``tasks`` no-op submits in each round: (wall, parent CPU)."""
    results: dict[str, tuple[list[float], list[float]]] = {mode: ([], []) for mode in modes}
    async with WorkerPool("overhead") as pool:
        await asyncio.gather(*(pool.submit(noop) for _ in range(1000)))  # warm
        for round_ in range(repeat):
            turn = round_ % len(modes)
            for mode in modes[turn:] + modes[:turn]:
                options = call_options(mode)
                count = len(options)
                cpu, start = time.process_time(), time.perf_counter()
                futures = [pool.submit(noop, **options[i % count]) for i in range(tasks)]
                await asyncio.gather(*futures)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                results[mode][0].append(wall / tasks * 1e6)
                results[mode][1].append(cpu / tasks * 1e6)
    return results


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
    print(
        f"overhead: {args.overhead_tasks} no-op tasks, one submit each; the modes take turns in one pool, "
        f"{args.repeat} rounds; medians per task (best in brackets)"
    )
    results = await overhead(args.overhead_tasks, args.repeat, modes)
    plain_wall, plain_cpu = (statistics.median(values) for values in results["plain"])
    worst = 0.0
    for mode in modes:
        walls, cpus = results[mode]
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        worst = max(worst, wall / plain_wall - 1)
        print(
            f"  {mode:<11} {wall:6.2f} us/task ({min(walls):6.2f})  {wall / plain_wall - 1:+6.1%} vs plain   "
            f"parent CPU {cpu:6.2f} us/task  {cpu / plain_cpu - 1:+6.1%}"
        )
    if len(modes) > 1:
        verdict = "met" if worst <= 0.10 else "not met"
        print(f"goal (every mode within 10 % of plain, wall-clock medians): {verdict} (worst {worst:+.1%})")


if __name__ == "__main__":
    asyncio.run(main())
