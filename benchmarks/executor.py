"""procpool.Executor from synchronous code, against ProcessPoolExecutor and multiprocessing.Pool.

compare.py runs this after its own table (``run`` + ``render``); it also runs alone::

    python benchmarks/executor.py                 # full sizes, 3 repeats
    python benchmarks/executor.py --quick         # smaller sizes, 1 repeat

Every contender has 3 workers and is driven the way synchronous code drives it: one
``submit(fn, x)`` per task then ``.result()`` on each future (``apply_async``/``get`` for
multiprocessing.Pool), ``map`` with multiprocessing.Pool's default chunk size (n / 12) given to
both executors, and round trips (submit, then wait for the result) for latency. Each runs in a
child process of its own, one per repeat, in a rotating order; a child that misses its deadline
is killed with its workers, and any worker that outlives its child is reported and killed.

The targets (issue 12): one submit per tiny task at least 2x ProcessPoolExecutor's rate, map at
least 1.0x multiprocessing.Pool.map's, and p50 round-trip latency no worse than
ProcessPoolExecutor's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve()
WORKERS = 3
CONTENDERS = {
    "executor": "procpool.Executor",
    "futures": "ProcessPoolExecutor",
    "multiprocessing": "multiprocessing.Pool",
}
FULL_SIZES = {"submit": 20_000, "map": 200_000, "latency": 2_000}
QUICK_SIZES = {"submit": 5_000, "map": 50_000, "latency": 500}
# A child's whole run must finish within this (seconds); healthy full-size runs take ~5 s.
CHILD_DEADLINE = 120
# Latency sampling stops after this many seconds, whatever the sample count.
LATENCY_BUDGET = 5.0
# (metric, label, unit, higher is better)
METRICS = (
    ("submit_tasks_per_s", "one submit per task, {submit:,} tiny tasks", "tasks/s", True),
    ("map_tasks_per_s", "map, {map:,} tiny tasks", "tasks/s", True),
    ("latency_p50_us", "round-trip latency p50", "µs", False),
    ("latency_p99_us", "round-trip latency p99", "µs", False),
)


# -- the child: one contender, measured from synchronous code -------------------------------------


def measure(key: str, sizes: dict[str, int]) -> dict[str, Any]:
    """Open the contender's pool, time the three workloads, shut it down; report the pids seen."""
    import workloads as w

    chunksize = lambda n: max(1, -(-n // (4 * WORKERS)))  # noqa: E731 - multiprocessing.Pool's default
    if key == "multiprocessing":
        import multiprocessing

        mp_pool = multiprocessing.Pool(WORKERS)

        def submit(x: int) -> Any:
            return mp_pool.apply_async(w.square, (x,))

        def get(handle: Any) -> int:
            return handle.get()  # type: ignore[no-any-return]

        def map_all(n: int) -> list[int]:
            return mp_pool.map(w.square, range(n))

        def pids() -> list[int]:
            return [p.pid for p in mp_pool._pool]  # type: ignore[attr-defined]

        def close() -> None:
            mp_pool.close()
            mp_pool.join()

    else:
        if key == "executor":
            from procpool import Executor

            executor: Any = Executor(WORKERS)
        else:
            import concurrent.futures

            executor = concurrent.futures.ProcessPoolExecutor(WORKERS)

        def submit(x: int) -> Any:
            return executor.submit(w.square, x)

        def get(handle: Any) -> int:
            return handle.result()  # type: ignore[no-any-return]

        def map_all(n: int) -> list[int]:
            return list(executor.map(w.square, range(n), chunksize=chunksize(n)))

        def pids() -> list[int]:
            return list(executor._processes)

        def close() -> None:
            executor.shutdown(wait=True)

    def many(n: int) -> list[int]:
        handles = [submit(i) for i in range(n)]
        return [get(h) for h in handles]

    seen: set[int] = set()
    try:
        for i in range(50):
            assert get(submit(i)) == i * i
        many(min(500, sizes["submit"]))
        map_all(min(5000, sizes["map"]))
        seen.update(pids())

        n = sizes["submit"]
        start = time.perf_counter()
        results = many(n)
        submit_rate = n / (time.perf_counter() - start)
        assert results == [i * i for i in range(n)]

        n = sizes["map"]
        start = time.perf_counter()
        results = map_all(n)
        map_rate = n / (time.perf_counter() - start)
        assert results == [i * i for i in range(n)]

        samples = []
        stop = time.perf_counter() + LATENCY_BUDGET
        for i in range(sizes["latency"]):
            start = time.perf_counter()
            value = get(submit(i))
            end = time.perf_counter()
            assert value == i * i
            samples.append(end - start)
            if end > stop:
                break
        samples.sort()
        seen.update(pids())
    finally:
        close()
    return {
        "submit_tasks_per_s": submit_rate,
        "map_tasks_per_s": map_rate,
        "latency_p50_us": statistics.median(samples) * 1e6,
        "latency_p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6,
        "round_trips": len(samples),
        "pids": sorted(seen),
    }


# -- the parent: children, medians, ratios ----------------------------------------------------------


def run(sizes: dict[str, int], repeat: int, peers: list[str] | None = None) -> dict[str, Any]:
    """Measure the Executor and ``peers`` (default: both), ``repeat`` times each, in rotation.

    Returns ``{"sizes", "repeat", "results": {key: {metric: median}}, "ratios": {peer: {metric:
    ratio}}, "targets": [...], "problems": [...], "leftover": [...]}``; a ratio above 1 means the
    Executor is ahead.
    """
    keys = ["executor", *(k for k in CONTENDERS if k != "executor" and (peers is None or k in peers))]
    sizes = {k: sizes[k] for k in FULL_SIZES}
    lines: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    problems: list[str] = []
    leftover: list[str] = []
    for r in range(repeat):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            line, problem, left = _run_child(key, sizes)
            if line is not None:
                lines[key].append(line)
            if problem:
                problems.append(f"run {r + 1}: {key}: {problem}")
            leftover += left
    results = {
        key: {m: statistics.median(line[m] for line in runs) for m, *_ in METRICS} if runs else {}
        for key, runs in lines.items()
    }
    mine = results["executor"]
    ratios: dict[str, dict[str, float | None]] = {}
    for key in keys[1:]:
        theirs = results[key]
        ratios[key] = {}
        for metric, _, _, higher in METRICS:
            a, b = mine.get(metric), theirs.get(metric)
            ratios[key][metric] = None if not a or not b else (a / b if higher else b / a)
    return {
        "sizes": sizes,
        "repeat": repeat,
        "results": results,
        "ratios": ratios,
        "targets": _targets(ratios),
        "problems": problems,
        "leftover": leftover,
    }


def _targets(ratios: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    def check(name: str, peer: str, metric: str, at_least: float) -> dict[str, Any]:
        ratio = ratios.get(peer, {}).get(metric)
        met = None if ratio is None else ratio >= at_least
        return {"target": name, "peer": peer, "metric": metric, "ratio": ratio, "met": met}

    return [
        check("one submit per tiny task at least 2x ProcessPoolExecutor", "futures", "submit_tasks_per_s", 2.0),
        check("map at least 1.0x multiprocessing.Pool.map", "multiprocessing", "map_tasks_per_s", 1.0),
        check("p50 round-trip latency no worse than ProcessPoolExecutor's", "futures", "latency_p50_us", 1.0),
    ]


def _run_child(key: str, sizes: dict[str, int]) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """One child for one contender: (its line, what went wrong, workers it left behind)."""
    child = subprocess.Popen(
        [sys.executable, str(HERE), "--child", key, json.dumps(sizes)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tree: list[psutil.Process] = []
    try:
        out, err = child.communicate(timeout=CHILD_DEADLINE)
    except subprocess.TimeoutExpired:
        try:
            tree = psutil.Process(child.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        child.kill()
        out, err = child.communicate()
        _kill(tree)
        return None, f"did not finish within {CHILD_DEADLINE} s and was killed", []
    if child.returncode != 0:
        return None, f"exited with {child.returncode}: {err.strip()[-600:]}", []
    line = json.loads(out.strip().splitlines()[-1])
    procs = []
    for pid in line.pop("pids"):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    alive = [p for p in alive if _alive(p)]
    _kill(alive)
    return line, None, [f"{key}: pid {p.pid}" for p in alive]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()  # psutil checks that the pid still names the same process
        except psutil.NoSuchProcess:
            pass


# -- rendering ---------------------------------------------------------------------------------------


def _format(value: float | None, unit: str) -> str:
    if value is None:
        return "failed"
    if unit == "tasks/s":
        return f"{value / 1e6:.2f}M/s" if value >= 1e6 else f"{value / 1e3:.1f}k/s"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"


def render(section: dict[str, Any]) -> str:
    """The section as text: a Markdown table, how to read it, the targets, any problems."""
    keys = list(section["results"])
    header = ["from synchronous code (median)", *(CONTENDERS[k] for k in keys)]
    rows = [header]
    for metric, label, unit, _ in METRICS:
        row = [label.format(**section["sizes"])]
        for key in keys:
            cell = _format(section["results"][key].get(metric), unit)
            ratio = section["ratios"].get(key, {}).get(metric)
            row.append(f"{cell} ({ratio:.2f}x)" if ratio else cell)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    table.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out = [
        f"procpool.Executor from synchronous code, 3 workers each; medians of {section['repeat']} run(s).",
        "",
        *table,
        "",
        "(Nx) = how many times better procpool.Executor is than that peer; map gets n / 12 as chunksize.",
        "",
        "Targets:",
    ]
    for t in section["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        ratio = f" ({t['ratio']:.2f}x)" if t["ratio"] else ""
        out.append(f"- {t['target']}: {verdict}{ratio}")
    if section["problems"] or section["leftover"]:
        out += ["", "Problems:", *(f"- {p}" for p in section["problems"])]
        out += [f"- worker left behind (killed): {p}" for p in section["leftover"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="executor.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads and 1 repeat")
    parser.add_argument("--repeat", type=int, default=None, help="runs per contender (default 3, --quick 1)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every task count")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the section as JSON")
    parser.add_argument("--child", nargs=2, metavar=("KEY", "SIZES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        key, sizes = args.child
        print(json.dumps(measure(key, json.loads(sizes))), flush=True)
        return 0
    base = QUICK_SIZES if args.quick else FULL_SIZES
    sizes = {k: max(20, round(v * args.scale)) for k, v in base.items()}
    section = run(sizes, args.repeat or (1 if args.quick else 3))
    print(render(section))
    if args.json:
        args.json.write_text(json.dumps(section, indent=2, ensure_ascii=False) + "\n")
    return 1 if section["leftover"] or not section["results"]["executor"] else 0


if __name__ == "__main__":
    sys.exit(main())
