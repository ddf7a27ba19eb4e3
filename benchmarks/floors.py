"""procpool's small-message targets against the peers and a raw pipe, in one run (issue 13).

Usage::

    python benchmarks/floors.py            # 3 repeats, medians
    python benchmarks/floors.py --repeat 1

Measured, each in this one process, one after the other:

* round-trip latency p50: one tiny task at a time, 2,000 of them: procpool, billiard,
  multiprocessing.Pool, and a raw ``multiprocessing.Pipe`` ping-pong with a forked echo process;
* map of 200,000 tiny items: ``pool.map(...).chunks()``, the per-item ``async for``, and
  ``multiprocessing.Pool.map``;
* cold start: first result of a first pool in a fresh interpreter, and of a second pool in the
  same process (each in a child process, so every repeat is really cold).

Each target is printed as met or not, as ratios within the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
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


def raw_ping_pong() -> float:
    a, b = multiprocessing.Pipe(duplex=False)
    c, d = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.get_context("fork").Process(target=_pong, args=(a, d))
    proc.start()
    lat = []
    for i in range(N_LATENCY):
        t = time.perf_counter()
        b.send(i)
        c.recv()
        lat.append(time.perf_counter() - t)
    proc.kill()
    proc.join()
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


COLD = """
import asyncio, json, sys, time
sys.path.insert(0, {here!r})
import workloads as w
import procpool

async def main():
    t0 = time.perf_counter()  # pool creation to first result, as benchmarks/compare.py measures
    async with procpool.WorkerPool() as pool:
        await pool.submit(w.square, 2)
        first = time.perf_counter() - t0
    t = time.perf_counter()
    async with procpool.WorkerPool() as pool:
        await pool.submit(w.square, 2)
        second = time.perf_counter() - t
    print(json.dumps({{"first_ms": first * 1e3, "second_ms": second * 1e3}}))

if __name__ == "__main__":
    asyncio.run(main())
"""


def cold_start(tmp: Path) -> dict[str, float]:
    script = tmp / "cold_start.py"
    script.write_text(COLD.format(here=str(Path(__file__).resolve().parent)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def one_run(tmp: Path) -> dict[str, float]:
    import billiard

    figures = asyncio.run(procpool_figures())
    figures["raw_us"] = raw_ping_pong()
    with billiard.Pool(3) as bp:
        figures["billiard_us"] = sync_pool_latency(bp)
    with multiprocessing.Pool(3) as mp:
        figures["mp_us"] = sync_pool_latency(mp)
        mp.map(w.square, range(100))
        t = time.perf_counter()
        mp.map(w.square, range(N_MAP))
        figures["mp_map"] = N_MAP / (time.perf_counter() - t)
    figures.update(cold_start(tmp))
    return figures


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            print(f"repeat {r + 1}/{args.repeat}", file=sys.stderr, flush=True)
            runs.append(one_run(Path(tmp)))
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    best_peer = min(med["billiard_us"], med["mp_us"])
    checks = [
        ("latency p50 at most the best peer's", med["latency_us"] <= best_peer,
         f"{med['latency_us']:.0f} us vs billiard {med['billiard_us']:.0f}, multiprocessing.Pool {med['mp_us']:.0f}"),
        ("latency p50 at most 1.3x a raw pipe ping-pong", med["latency_us"] <= 1.3 * med["raw_us"],
         f"{med['latency_us']:.0f} us vs raw {med['raw_us']:.0f} us ({med['latency_us'] / med['raw_us']:.2f}x)"),
        ("map of 200,000 tiny items at least multiprocessing.Pool.map", med["map_chunks"] >= med["mp_map"],
         f"chunks() {med['map_chunks'] / 1e6:.2f}M/s, per item {med['map_items'] / 1e6:.2f}M/s, "
         f"multiprocessing.Pool.map {med['mp_map'] / 1e6:.2f}M/s"),
        ("first result from a cold start within 40 ms", med["first_ms"] <= 40, f"{med['first_ms']:.0f} ms"),
        ("a second pool within 15 ms", med["second_ms"] <= 15, f"{med['second_ms']:.1f} ms"),
    ]  # fmt: skip
    for name, met, detail in checks:
        print(f"[{'met' if met else 'NOT met'}] {name}: {detail}")
    if args.json:
        args.json.write_text(json.dumps({"medians": med, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
