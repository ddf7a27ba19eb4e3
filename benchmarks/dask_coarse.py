"""Coarse tasks on three workers: a local WorkerPool, a DaskPool on its own LocalCluster, and a
plain ``dask.distributed`` client on the same kind of cluster, in one run (issue 14)::

    python benchmarks/dask_coarse.py              # 60 tasks of 50 ms, 3 repeats
    python benchmarks/dask_coarse.py --quick      # 30 tasks of 20 ms, 1 repeat
    python benchmarks/dask_coarse.py --json out.json

Each contender has three single-threaded worker processes on this machine. Per contender it
reports the start time (until three workers are ready), the wall time of the batch (all tasks
submitted at once, results gathered), its efficiency (ideal time = tasks x duration / 3 over the
measured time), the p50 of lone round trips of an empty task, and the RSS of all its processes.
Every contender runs in a child process of its own, so one's leftovers cannot slow the next; a
child past its deadline is killed with its descendants.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve()
CONTENDERS = ("procpool-local", "procpool-dask", "dask-client")
# Seconds one contender's child may take; a healthy quick run takes ~5 s.
CHILD_DEADLINE = 180
ROUND_TRIPS = 50


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _nothing() -> None:
    return None


def _rss_mb() -> float:
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


async def _run_procpool(kind: str, tasks: int, duration: float) -> dict[str, Any]:
    from procpool import WorkerPool

    started = time.perf_counter()
    if kind == "procpool-dask":
        from procpool.dask import DaskPool

        pool: Any = DaskPool("bench")
    else:
        pool = WorkerPool("bench")
    await pool.initialize()
    start_s = time.perf_counter() - started
    try:
        await pool.apply(_nothing)  # warm-up: imports in each worker are not the batch's cost
        t0 = time.perf_counter()
        await asyncio.gather(*(pool.apply(_sleep, (duration,)) for _ in range(tasks)))
        batch_s = time.perf_counter() - t0
        trips = []
        for _ in range(ROUND_TRIPS):
            t0 = time.perf_counter()
            await pool.apply(_nothing)
            trips.append(time.perf_counter() - t0)
        rss = _rss_mb()
    finally:
        await pool.shutdown()
    return {"start_s": start_s, "batch_s": batch_s, "round_trip_p50_ms": statistics.median(trips) * 1e3, "rss_mb": rss}


async def _run_dask_client(tasks: int, duration: float) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    started = time.perf_counter()
    cluster = await LocalCluster(
        n_workers=3,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        host="127.0.0.1",
        asynchronous=True,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )
    client = await Client(cluster, asynchronous=True)
    start_s = time.perf_counter() - started
    try:
        await client.submit(_nothing, pure=False)
        t0 = time.perf_counter()
        await client.gather(client.map(_sleep, [duration] * tasks, pure=False))
        batch_s = time.perf_counter() - t0
        trips = []
        for _ in range(ROUND_TRIPS):
            t0 = time.perf_counter()
            await client.submit(_nothing, pure=False)
            trips.append(time.perf_counter() - t0)
        rss = _rss_mb()
    finally:
        await client.close()
        await cluster.close()
    return {"start_s": start_s, "batch_s": batch_s, "round_trip_p50_ms": statistics.median(trips) * 1e3, "rss_mb": rss}


def child(kind: str, tasks: int, duration: float) -> None:
    """Run one contender once and print its figures as one JSON line."""
    if kind == "dask-client":
        result = asyncio.run(_run_dask_client(tasks, duration))
    else:
        result = asyncio.run(_run_procpool(kind, tasks, duration))
    result["efficiency"] = tasks * duration / 3 / result["batch_s"]
    print(json.dumps({"contender": kind, **result}), flush=True)


def _run_child(kind: str, tasks: int, duration: float) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE), "--child", kind, "--tasks", str(tasks), "--duration", str(duration)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=CHILD_DEADLINE)
    except subprocess.TimeoutExpired:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait()
        raise SystemExit(f"{kind} missed its {CHILD_DEADLINE} s deadline") from None
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 tasks of 20 ms, 1 repeat")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds each task sleeps")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tasks = args.tasks or (30 if args.quick else 60)
    duration = args.duration or (0.02 if args.quick else 0.05)
    if args.child:
        child(args.child, tasks, duration)
        return
    repeats = args.repeats or (1 if args.quick else 3)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in CONTENDERS}
    for r in range(repeats):
        for kind in CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]:
            runs[kind].append(_run_child(kind, tasks, duration))
    ideal = tasks * duration / 3
    print(f"{tasks} tasks of {duration * 1e3:g} ms on 3 workers (ideal {ideal:.2f} s), median of {repeats} run(s)\n")
    print("| contender | start (s) | batch (s) | efficiency | lone round trip p50 (ms) | RSS, all processes (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    summary = {}
    for kind, results in runs.items():
        med = {key: statistics.median(r[key] for r in results) for key in results[0] if key != "contender"}
        summary[kind] = med
        print(
            f"| {kind} | {med['start_s']:.2f} | {med['batch_s']:.2f} | {med['efficiency']:.0%} "
            f"| {med['round_trip_p50_ms']:.2f} | {med['rss_mb']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"tasks": tasks, "duration": duration, "results": summary}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
