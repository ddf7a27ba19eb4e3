"""procpool's small-message targets against the peers and a raw pipe, in one run (issue 13).

Usage::

    python benchmarks/floors.py              # 3 repeats, medians
    python benchmarks/floors.py --repeat 1
    python benchmarks/floors.py --cold-only  # only the cold start and the second pool
    python benchmarks/floors.py --quick      # one repeat, a quarter of the tasks (what procpool bench --quick passes)

Measured, each in this one process, one after the other:

* round-trip latency p50: one tiny task at a time, 2,000 of them: procpool, billiard,
  multiprocessing.Pool, and a raw ``multiprocessing.Pipe`` ping-pong with a forked echo process;
  then procpool and the raw ping-pong again with the parent and the other side pinned to the
  same CPU, and to two different CPUs (Linux, 2 CPUs or more): where the scheduler puts the two
  sides changes a round trip more than either side's code does (on a 2-vCPU VM here: about
  12 µs against 53 µs for the raw ping-pong), so only the pinned pairs compare like with like;
  beside them, the raw ping-pong with the parent waiting on an asyncio event loop, a future per
  call (the floor of any coordinator built on asyncio);
* map of 200,000 tiny items: ``pool.map(...).chunks()``, the per-item ``async for``, and
  ``multiprocessing.Pool.map``;
* cold start: in a fresh interpreter per library and repeat, so every repeat is really cold, the
  time from a first pool's creation to its first result, then the same for a second pool in that
  process: procpool, and loky and aiomultiprocess where installed. The script imports the library
  at its top, as a user's does; that import is timed apart (``import_ms``), not in the cold start.
  procpool's bytecode is compiled first, as an installed package's is (the peers are installed).

Each target is printed as met or not, as ratios within the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import workloads as w

N_LATENCY = 2000
N_MAP = 200_000


def _pong(calls: multiprocessing.connection.Connection, results: multiprocessing.connection.Connection) -> None:
    while True:
        try:
            x = calls.recv()
        except EOFError:
            return
        results.send(x * x)


# Pinned placements for the latency pairs: (the parent's CPU, the other side's CPU).
PLACEMENTS = {"same": (0, 0), "cross": (0, 1)}


def _can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2 and {0, 1} <= os.sched_getaffinity(0)


def _pinned(pids: list[int], placement: tuple[int, int] | None) -> set[int] | None:
    """Pin this thread and ``pids`` as ``placement`` says; the thread's CPUs before, to restore."""
    if placement is None:
        return None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {placement[0]})
    for pid in pids:
        os.sched_setaffinity(pid, {placement[1]})
    return before


def raw_ping_pong(placement: tuple[int, int] | None = None) -> float:
    a, b = multiprocessing.Pipe(duplex=False)
    c, d = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.get_context("fork").Process(target=_pong, args=(a, d))
    proc.start()
    assert proc.pid is not None
    before = _pinned([proc.pid], placement)
    lat = []
    for i in range(N_LATENCY):
        t = time.perf_counter()
        b.send(i)
        c.recv()
        lat.append(time.perf_counter() - t)
    proc.kill()
    proc.join()
    if before is not None:
        os.sched_setaffinity(0, before)
    return statistics.median(lat) * 1e6


async def loop_ping_pong(placement: tuple[int, int] | None = None) -> float:
    """The raw ping-pong with the parent waiting on an asyncio event loop, as any coordinator on
    asyncio does: a future per call, resolved by a reader callback (the floor of such a design)."""
    loop = asyncio.get_running_loop()
    a, b = multiprocessing.Pipe(duplex=False)
    c, d = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.get_context("fork").Process(target=_pong, args=(a, d))
    proc.start()
    assert proc.pid is not None
    waiting: list[asyncio.Future[int]] = []
    loop.add_reader(c.fileno(), lambda: waiting.pop().set_result(c.recv()))
    before = _pinned([proc.pid], placement)
    lat = []
    try:
        for i in range(200 + N_LATENCY):
            t = time.perf_counter()
            waiting.append(loop.create_future())
            b.send(i)
            await waiting[-1]
            lat.append(time.perf_counter() - t)
    finally:
        loop.remove_reader(c.fileno())
        proc.kill()
        proc.join()
        if before is not None:
            os.sched_setaffinity(0, before)
    return statistics.median(lat[200:]) * 1e6


async def procpool_latency(placement: tuple[int, int]) -> float:
    """procpool's round trip with the event loop and the workers pinned as ``placement`` says."""
    import procpool

    async with procpool.WorkerPool() as pool:
        for i in range(200):
            await pool.submit(w.square, i)
        before = _pinned([worker.pid for worker in pool.workers if worker.pid is not None], placement)
        lat = []
        for i in range(N_LATENCY):
            t = time.perf_counter()
            await pool.submit(w.square, i)
            lat.append(time.perf_counter() - t)
        if before is not None:
            os.sched_setaffinity(0, before)
    return statistics.median(lat) * 1e6


def sync_pool_latency(pool: object) -> float:
    pool.apply(w.square, (1,))  # type: ignore[attr-defined]
    lat = []
    for i in range(N_LATENCY):
        t = time.perf_counter()
        pool.apply(w.square, (i,))  # type: ignore[attr-defined]
        lat.append(time.perf_counter() - t)
    return statistics.median(lat) * 1e6


async def procpool_figures() -> dict[str, float]:
    import procpool

    async with procpool.WorkerPool() as pool:
        for i in range(200):
            await pool.submit(w.square, i)
        lat = []
        for i in range(N_LATENCY):
            t = time.perf_counter()
            await pool.submit(w.square, i)
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        out: list[int] = []
        async for chunk in pool.map(w.square, range(N_MAP)).chunks():
            out.extend(chunk)
        chunks = N_MAP / (time.perf_counter() - t)
        t = time.perf_counter()
        items = [y async for y in pool.map(w.square, range(N_MAP))]
        per_item = N_MAP / (time.perf_counter() - t)
        assert len(out) == len(items) == N_MAP
    return {"latency_us": statistics.median(lat) * 1e6, "map_chunks": chunks, "map_items": per_item}


# Cold start, one fresh interpreter per library and repeat, as a user's script is written: the
# library is imported at the top (timed apart, as import_ms), then the clock runs from the pool's
# creation to its first result; then a second pool in the same process, the same way. The script
# is also what multiprocessing's fork server (procpool) or each worker (loky, aiomultiprocess)
# imports as the main module.
COLD_HEAD = """
import asyncio, json, sys, time
sys.path.insert(0, {here!r})
import workloads as w
t_import = time.perf_counter()
{import_line}
import_ms = (time.perf_counter() - t_import) * 1e3
"""
COLD_TAIL = """
if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
"""
COLD = {
    "procpool": """
async def main():
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        async with WorkerPool() as pool:
            assert await pool.submit(w.square, 2) == 4
            times.append((time.perf_counter() - t0) * 1e3)
    return {"first_ms": times[0], "second_ms": times[1], "import_ms": import_ms}
""",
    "loky": """
async def main():
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        # A private executor, not get_reusable_executor(): the second one starts its own workers.
        executor = loky.ProcessPoolExecutor(3)
        assert executor.submit(w.square, 2).result() == 4
        times.append((time.perf_counter() - t0) * 1e3)
        executor.shutdown()
    return {"loky_first_ms": times[0], "loky_second_ms": times[1], "loky_import_ms": import_ms}
""",
    "aiomultiprocess": """
async def main():
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        async with aiomultiprocess.Pool(3) as pool:
            assert await pool.apply(w.asquare, (2,)) == 4
            times.append((time.perf_counter() - t0) * 1e3)
    return {"aiomp_first_ms": times[0], "aiomp_second_ms": times[1], "aiomp_import_ms": import_ms}
""",
}
IMPORTS = {
    "procpool": "from procpool import WorkerPool",
    "loky": "import loky",
    "aiomultiprocess": "import aiomultiprocess",
}


def cold_start(tmp: Path) -> dict[str, float]:
    """procpool's cold start and second pool, and loky's and aiomultiprocess's where installed."""
    import importlib.util

    w.compile_procpool()
    figures: dict[str, float] = {}
    for lib, body in COLD.items():
        if lib != "procpool" and importlib.util.find_spec(lib) is None:
            continue
        script = tmp / f"cold_start_{lib}.py"
        head = COLD_HEAD.format(here=str(Path(__file__).resolve().parent), import_line=IMPORTS[lib])
        script.write_text(head + body + COLD_TAIL)
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True)
        figures.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return figures


def one_run(tmp: Path, cold_only: bool = False) -> dict[str, float]:
    # The cold starts first, before this process has pools of its own and before the map and
    # latency stages load the machine: their children start on an otherwise idle machine.
    cold = cold_start(tmp)
    if cold_only:
        return cold
    import billiard

    figures = asyncio.run(procpool_figures())
    figures["raw_us"] = raw_ping_pong()
    if _can_pin():
        for name, placement in PLACEMENTS.items():
            figures[f"latency_{name}_us"] = asyncio.run(procpool_latency(placement))
            figures[f"raw_{name}_us"] = raw_ping_pong(placement)
            figures[f"loop_{name}_us"] = asyncio.run(loop_ping_pong(placement))
    with billiard.Pool(3) as bp:
        figures["billiard_us"] = sync_pool_latency(bp)
    with multiprocessing.Pool(3) as mp:
        figures["mp_us"] = sync_pool_latency(mp)
        mp.map(w.square, range(100))
        t = time.perf_counter()
        mp.map(w.square, range(N_MAP))
        figures["mp_map"] = N_MAP / (time.perf_counter() - t)
    figures.update(cold)
    return figures


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=None, help="repeats (default 3, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="one repeat and a quarter of the latency and map tasks")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cold-only", action="store_true", help="measure only the cold start and second pool")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.quick:
        global N_LATENCY, N_MAP
        N_LATENCY, N_MAP = N_LATENCY // 4, N_MAP // 4
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            print(f"repeat {r + 1}/{args.repeat}", file=sys.stderr, flush=True)
            runs.append(one_run(Path(tmp), args.cold_only))
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    peers = ", ".join(
        f"{label} {med[key + '_first_ms']:.0f} ms (second {med[key + '_second_ms']:.0f} ms)"
        for key, label in (("loky", "loky"), ("aiomp", "aiomultiprocess"))
        if key + "_first_ms" in med
    )
    cold = [
        ("first result from a cold start within 40 ms", med["first_ms"] <= 40,
         f"{med['first_ms']:.0f} ms (import of procpool before it: {med['import_ms']:.0f} ms); {peers or 'no peers'}"),
        ("a second pool within 15 ms", med["second_ms"] <= 15, f"{med['second_ms']:.1f} ms"),
    ]  # fmt: skip
    checks = cold if args.cold_only else _floor_checks(med) + cold
    for name, met, detail in checks:
        print(f"[{'met' if met else 'NOT met'}] {name}: {detail}")
    if args.json:
        targets = [{"target": name, "met": met, "detail": detail} for name, met, detail in checks]
        args.json.write_text(json.dumps({"medians": med, "runs": runs, "targets": targets}, indent=1))
    return 0


def _floor_checks(med: dict[str, float]) -> list[tuple[str, bool, str]]:
    best_peer = min(med["billiard_us"], med["mp_us"])
    return [
        ("latency p50 at most the best peer's", med["latency_us"] <= best_peer,
         f"{med['latency_us']:.0f} us vs billiard {med['billiard_us']:.0f}, multiprocessing.Pool {med['mp_us']:.0f}"),
        ("latency p50 at most 1.3x a raw pipe ping-pong", med["latency_us"] <= 1.3 * med["raw_us"],
         f"{med['latency_us']:.0f} us vs raw {med['raw_us']:.0f} us ({med['latency_us'] / med['raw_us']:.2f}x)"),
        *[
            (f"latency p50 at most 1.3x the raw ping-pong, both pinned to {label}",
             med[f"latency_{name}_us"] <= 1.3 * med[f"raw_{name}_us"],
             f"{med[f'latency_{name}_us']:.0f} us vs raw {med[f'raw_{name}_us']:.0f} us "
             f"({med[f'latency_{name}_us'] / med[f'raw_{name}_us']:.2f}x; the raw ping-pong on an event loop: "
             f"{med[f'loop_{name}_us']:.0f} us)")
            for name, label in (("same", "one CPU"), ("cross", "two CPUs"))
            if f"latency_{name}_us" in med
        ],
        (f"map of {N_MAP:,} tiny items at least multiprocessing.Pool.map", med["map_chunks"] >= med["mp_map"],
         f"chunks() {med['map_chunks'] / 1e6:.2f}M/s, per item {med['map_items'] / 1e6:.2f}M/s, "
         f"multiprocessing.Pool.map {med['mp_map'] / 1e6:.2f}M/s"),
    ]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
