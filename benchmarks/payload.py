"""Payload sweep: echo tasks carrying 1 KiB .. 64 MiB of ``bytes`` and of numpy arrays, in and back.

Usage::

    python benchmarks/payload.py                       # every peer, 3 repeats, JSON + plot
    python benchmarks/payload.py --quick               # 1 repeat, smaller volumes
    python benchmarks/payload.py --peers procpool,multiprocessing --json out.json --plot out.png
    python benchmarks/payload.py --quick --peers procpool,procpool-keep   # the parent's opt-in

Every contender (3 workers each, its library's default start method) runs in a child process of
its own, once per repeat, in a rotating order; the table gives medians. A point sends a fixed
volume as echo tasks of one size, WINDOW of them in flight at once, and drops each result as it
arrives (a stream, as a real pipeline would: keeping every result would measure page faults of
fresh memory instead). Each point starts with WINDOW untimed tasks of its size, for every
contender and floor alike, so that it measures the stream and not the first touch of a new
size. Throughput is MiB/s each way: payload size x tasks / elapsed time.

``procpool-keep`` is procpool in a child that first calls ``procpool.keep_freed_memory()``, the
opt-in that lets the parent's malloc keep freed memory for the next result (glibc); the issue's
targets compare plain ``procpool``, the default, and count neither as a peer.

Two floors measured by the same script, with the same three worker processes and window:

* ``raw-pipe``: the bytes themselves through a pipe pair per worker, blocking reads and writes;
* ``raw-shm``: a memfd segment per worker, a tiny pipe message each way; the parent copies the
  payload in and the result out, the worker copies it out and back in (as procpool does).

Parent peak RSS: one more child per contender runs the 64 MiB numpy echo one task at a time and
reports its peak RSS over its RSS before the first payload, in multiples of the payload.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KiB, MiB = 1024, 1024 * 1024
SIZES = [KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB]
KINDS = ["bytes", "numpy"]
WINDOW = 6  # two tasks per worker: one running, one waiting
FULL = {"volume": 512 * MiB, "max_tasks": 4000, "min_tasks": 6}
QUICK = {"volume": 128 * MiB, "max_tasks": 1000, "min_tasks": 6}
PEERS = [
    "procpool",
    "procpool-keep",
    "multiprocessing",
    "futures",
    "loky",
    "pebble",
    "mpire",
    "billiard",
    "raw-pipe",
    "raw-shm",
]
FLOORS = ("raw-pipe", "raw-shm")
# procpool as it is, and with the parent's opt-in procpool.keep_freed_memory(): neither is a peer.
PROCPOOLS = ("procpool", "procpool-keep")
CHILD_DEADLINE = 900


def payload(kind: str, size: int) -> Any:
    if kind == "bytes":
        return os.urandom(size)
    import numpy as np

    return np.frombuffer(os.urandom(size), dtype=np.uint8).copy()


def tasks_for(size: int, config: dict[str, int]) -> int:
    return max(config["min_tasks"], min(config["max_tasks"], config["volume"] // size))


# -- the child: one contender ----------------------------------------------------------------------


class Pool:
    """A contender behind submit()/wait(): the window loop is the same for all."""

    def __init__(self, key: str) -> None:
        import workloads

        self.key = key
        self.echo = workloads.echo
        if key == "multiprocessing":
            import multiprocessing

            self.pool = multiprocessing.Pool(3)
        elif key == "billiard":
            import billiard

            self.pool = billiard.Pool(3)
        elif key == "futures":
            import concurrent.futures

            self.pool = concurrent.futures.ProcessPoolExecutor(3)
        elif key == "loky":
            import loky

            self.pool = loky.get_reusable_executor(max_workers=3)
        elif key == "pebble":
            import pebble

            self.pool = pebble.ProcessPool(max_workers=3)
        elif key == "mpire":
            import mpire

            self.pool = mpire.WorkerPool(n_jobs=3)
            self.pool.__enter__()
        else:
            raise ValueError(key)

    def submit(self, arg: Any) -> Any:
        if self.key in ("multiprocessing", "billiard", "mpire"):
            return self.pool.apply_async(self.echo, (arg,))
        if self.key == "pebble":
            return self.pool.schedule(self.echo, (arg,))
        return self.pool.submit(self.echo, arg)

    def wait(self, handle: Any) -> Any:
        return handle.get() if self.key in ("multiprocessing", "billiard", "mpire") else handle.result()

    def close(self) -> None:
        if self.key in ("multiprocessing", "billiard"):
            self.pool.terminate()
            self.pool.join()
        elif self.key == "mpire":
            self.pool.__exit__(None, None, None)
        elif self.key == "pebble":
            self.pool.stop()
            self.pool.join()
        elif self.key == "loky":
            self.pool.shutdown(wait=True, kill_workers=True)
        else:
            self.pool.shutdown(wait=True)


def run_sync(pool: Pool, arg: Any, n: int, window_size: int) -> float:
    import collections

    size = len(arg) if isinstance(arg, bytes) else arg.nbytes
    window: collections.deque[Any] = collections.deque()
    start = time.perf_counter()
    for _ in range(n):
        if len(window) >= window_size:
            assert _size(pool.wait(window.popleft())) == size
        window.append(pool.submit(arg))
    while window:
        assert _size(pool.wait(window.popleft())) == size
    return time.perf_counter() - start


def _size(value: Any) -> int:
    return len(value) if isinstance(value, bytes) else int(value.nbytes)


async def run_procpool(pool: Any, echo: Any, arg: Any, n: int, window_size: int) -> float:
    import collections

    size = _size(arg)
    window: collections.deque[Any] = collections.deque()
    start = time.perf_counter()
    for _ in range(n):
        if len(window) >= window_size:
            assert _size(await window.popleft()) == size
        window.append(pool.submit(echo, arg))
    while window:
        assert _size(await window.popleft()) == size
    return time.perf_counter() - start


def child(key: str, config: dict[str, int], rss: bool) -> None:
    """Measure every point for one contender; print one JSON line per point."""
    points = [("numpy", 64 * MiB)] if rss else [(kind, size) for size in SIZES for kind in KINDS]
    window_size = 1 if rss else WINDOW
    if key in FLOORS:
        import raw_echo

        runner: Any = raw_echo.Floor(key, WINDOW)
        measure = runner.run
    elif key in PROCPOOLS:
        import asyncio

        import workloads

        import procpool

        if key == "procpool-keep" and not procpool.keep_freed_memory():
            sys.exit("procpool-keep: procpool.keep_freed_memory() has no effect here (glibc only)")
        loop = asyncio.new_event_loop()
        pp = procpool.WorkerPool()
        loop.run_until_complete(pp.initialize())

        def measure(arg: Any, n: int) -> float:
            return loop.run_until_complete(run_procpool(pp, workloads.echo, arg, n, window_size))

        def close() -> None:
            loop.run_until_complete(pp.shutdown())
            loop.close()

        runner = type("R", (), {"close": staticmethod(close)})
    else:
        runner = Pool(key)

        def measure(arg: Any, n: int) -> float:
            return run_sync(runner, arg, n, window_size)

    try:
        measure(payload("bytes", KiB), 30)  # warm up: workers started, code paths taken
        for kind, size in points:
            arg = payload(kind, size)
            n = 3 if rss else tasks_for(size, config)
            if not rss:
                # Untimed, for every contender alike: a size's first tasks pay first-touch costs
                # (fresh shared memory, pipe buffers growing, the receivers' first large blocks)
                # that a stream of that size pays once; the point measures the stream.
                measure(arg, window_size)
            before = _rss()
            elapsed = measure(arg, n)
            line = {"kind": kind, "size": size, "tasks": n, "mib_s": size * n / MiB / elapsed}
            if rss:
                line["peak_rss_mib"] = (_peak_rss() - before) / MiB
            print(json.dumps(line), flush=True)
            del arg
    finally:
        runner.close()


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# -- the parent: every contender, repeats, medians, plot -----------------------------------------


def run_child(key: str, config: dict[str, int], rss: bool = False) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", key, "--config", json.dumps(config)]
    if rss:
        cmd.append("--rss")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_DEADLINE, env=env)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        print(f"{key}: exit {proc.returncode}: {proc.stderr[-800:]}", file=sys.stderr)
    return lines


def summarise(runs: dict[str, list[list[dict[str, Any]]]]) -> dict[str, dict[str, float]]:
    """contender -> "kind:size" -> median MiB/s over the repeats."""
    out: dict[str, dict[str, float]] = {}
    for key, repeats in runs.items():
        points: dict[str, list[float]] = {}
        for lines in repeats:
            for line in lines:
                points.setdefault(f"{line['kind']}:{line['size']}", []).append(line["mib_s"])
        out[key] = {point: statistics.median(values) for point, values in points.items()}
    return out


def targets(summary: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Issue 13's payload targets, each met or not, as ratios within this run."""
    pp = summary.get("procpool", {})
    peers = {k: v for k, v in summary.items() if k not in PROCPOOLS and k not in FLOORS}
    out = []
    for kind in KINDS:

        def best(point: str) -> tuple[str, float]:
            scored = [(v.get(point, 0.0), k) for k, v in peers.items()]
            value, key = max(scored) if scored else (0.0, "-")
            return key, value

        for size, factor in ((MiB, 3.0), (16 * MiB, 5.0)):
            point = f"{kind}:{size}"
            key, value = best(point)
            ratio = pp.get(point, 0.0) / value if value else None
            out.append(
                {
                    "target": f"{kind} {size // MiB} MiB at least {factor:g}x the best peer",
                    "met": ratio is not None and ratio >= factor,
                    "detail": f"{pp.get(point, 0):.0f} MiB/s vs {key} {value:.0f} ({ratio or 0:.2f}x)",
                }
            )
        point = f"{kind}:{16 * MiB}"
        raw = summary.get("raw-shm", {}).get(point)
        if raw:
            ratio = pp.get(point, 0.0) / raw
            out.append(
                {
                    "target": f"{kind} 16 MiB at least 1/3 of the raw shared-memory echo",
                    "met": ratio >= 1 / 3,
                    "detail": f"{pp.get(point, 0):.0f} vs raw-shm {raw:.0f} MiB/s ({ratio:.2f})",
                }
            )
        series = [pp.get(f"{kind}:{s}", 0.0) for s in SIZES if s >= MiB]
        # "never falls": each size at least the one before, within 10 % (the run-to-run noise here)
        steady = all(b >= 0.9 * a for a, b in itertools.pairwise(series))
        out.append(
            {
                "target": f"{kind}: throughput does not fall from 1 MiB to 64 MiB",
                "met": steady,
                "detail": " -> ".join(f"{v:.0f}" for v in series) + " MiB/s",
            }
        )
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    keys = list(summary)
    head = "| payload | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    rows = []
    for kind in KINDS:
        for size in SIZES:
            point = f"{kind}:{size}"
            label = f"{kind} {size // KiB} KiB" if size < MiB else f"{kind} {size // MiB} MiB"
            rows.append(f"| {label} | " + " | ".join(f"{summary[k].get(point, 0):,.0f}" for k in keys) + " |")
    return head + "\n".join(rows)


def plot(summary: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, kind in zip(axes, KINDS, strict=True):
        for key, points in summary.items():
            ys = [points.get(f"{kind}:{s}") for s in SIZES]
            style = "--" if key in FLOORS else "-." if key == "procpool-keep" else "-"
            width = 2.5 if key in PROCPOOLS else 1.2
            ax.plot([s / KiB for s in SIZES], ys, style, marker="o", linewidth=width, label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([s / KiB for s in SIZES], ["1 KiB", "64 KiB", "1 MiB", "16 MiB", "64 MiB"])
        ax.set_title(f"echo of {kind}, 3 workers, {WINDOW} in flight")
        ax.set_xlabel("payload size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("MiB/s each way (median)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="only redraw the plot and table")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.config), args.rss)
        return 0
    if args.from_json:
        report = json.loads(args.from_json.read_text())
    else:
        config = QUICK if args.quick else FULL
        repeat = args.repeat or (1 if args.quick else 3)
        keys = [k for k in args.peers.split(",") if k]
        runs: dict[str, list[list[dict[str, Any]]]] = {k: [] for k in keys}
        for r in range(repeat):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                print(f"repeat {r + 1}/{repeat}: {key}", file=sys.stderr, flush=True)
                runs[key].append(run_child(key, config))
        rss = {}
        for key in keys:
            if key not in FLOORS:
                lines = run_child(key, config, rss=True)
                if lines:
                    rss[key] = lines[0]["peak_rss_mib"] / 64
        summary = summarise(runs)
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "load": os.getloadavg(),
            "config": config,
            "repeat": repeat,
            "window": WINDOW,
            "summary": summary,
            "peak_rss_x_payload_64mib": rss,
            "targets": targets(summary),
            "raw": runs,
        }
    print(table(report["summary"]))
    print()
    for key, x in report["peak_rss_x_payload_64mib"].items():
        print(f"parent peak RSS, 64 MiB numpy echo one at a time: {key} {x:.1f}x the payload")
    print()
    for t in report["targets"]:
        print(f"[{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['detail']}")
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report["summary"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
