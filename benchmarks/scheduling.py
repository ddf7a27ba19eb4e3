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

    python benchmarks/scheduling.py [--tasks 2000] [--overhead-tasks 50000] [--repeat 5] [--json out.json]
    python benchmarks/scheduling.py --quick           # 500 burst tasks, 3 rounds of 10,000
    python benchmarks/scheduling.py --overhead-only   # also runs on a procpool without priorities
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
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
    parser.add_argument("--tasks", type=int, default=None, help="burst tasks (default 2000, 500 with --quick)")
    parser.add_argument(
        "--overhead-tasks", type=int, default=None, help="tasks per round (default 50000, 10000 with --quick)"
    )
    parser.add_argument("--repeat", type=int, default=None, help="overhead rounds (default 5, 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smaller burst and fewer, shorter rounds")
    parser.add_argument("--overhead-only", action="store_true", help="only plain submits (any procpool)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures and targets here")
    args = parser.parse_args()
    tasks = args.tasks or (500 if args.quick else 2000)
    overhead_tasks = args.overhead_tasks or (10_000 if args.quick else 50_000)
    repeat = args.repeat or (3 if args.quick else 5)
    report: dict[str, Any] = {"burst": {}, "overhead": {}, "targets": []}
    if not args.overhead_only:
        print(f"burst: {tasks} tasks of {TASK_SECONDS * 1e3:g} ms, 1 in {HIGH_EVERY} at priority {HIGH}")
        for honour in (True, False):
            result = await burst(tasks, honour)
            report["burst"]["priorities" if honour else "fifo"] = result
            name = "priorities" if honour else "FIFO      "
            (h50, h99), (l50, l99) = result["high"], result["low"]
            print(f"  {name}  high p50 {h50:7.1f} ms  p99 {h99:7.1f} ms   low p50 {l50:7.1f} ms  p99 {l99:7.1f} ms")
        prio, fifo = report["burst"]["priorities"]["high"][0], report["burst"]["fifo"]["high"][0]
        report["targets"].append(
            {
                "target": "high-priority tasks of a burst wait less than in a FIFO pool (p50)",
                "met": prio < fifo,
                "detail": f"{prio:.1f} ms against {fifo:.1f} ms FIFO",
            }
        )
    modes = ["plain"] if args.overhead_only else ["plain", "priorities", "retry"]
    print(
        f"overhead: {overhead_tasks} no-op tasks, one submit each; the modes take turns in one pool, "
        f"{repeat} rounds; medians per task (best in brackets)"
    )
    results = await overhead(overhead_tasks, repeat, modes)
    plain_wall, plain_cpu = (statistics.median(values) for values in results["plain"])
    worst = 0.0
    for mode in modes:
        walls, cpus = results[mode]
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        worst = max(worst, wall / plain_wall - 1)
        report["overhead"][mode] = {"wall_us": wall, "cpu_us": cpu, "rounds_wall_us": walls}
        print(
            f"  {mode:<11} {wall:6.2f} us/task ({min(walls):6.2f})  {wall / plain_wall - 1:+6.1%} vs plain   "
            f"parent CPU {cpu:6.2f} us/task  {cpu / plain_cpu - 1:+6.1%}"
        )
    if len(modes) > 1:
        verdict = "met" if worst <= 0.10 else "not met"
        print(f"goal (every mode within 10 % of plain, wall-clock medians): {verdict} (worst {worst:+.1%})")
        report["targets"].append(
            {
                "target": "scheduling overhead per task within 10 % of plain submits (priorities, retry)",
                "met": worst <= 0.10,
                "detail": ", ".join(
                    f"{mode} {report['overhead'][mode]['wall_us'] / plain_wall - 1:+.1%}" for mode in modes[1:]
                )
                + f" vs plain {plain_wall:.2f} us/task",
            }
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
