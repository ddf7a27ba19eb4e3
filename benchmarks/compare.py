"""procpool against its peers, side by side in one run, on the same workloads.

Usage::

    python benchmarks/compare.py                 # full sizes, 3 repeats (several minutes)
    python benchmarks/compare.py --quick         # smaller sizes, 1 repeat (well under 2 minutes)
    python benchmarks/compare.py --scale 0.01 --peers multiprocessing --json out.json

Contenders, all with 3 workers and their library's default start method: procpool,
``concurrent.futures.ProcessPoolExecutor``, ``multiprocessing.Pool``, ``aiomultiprocess.Pool``,
and ``loky`` and ``pebble`` when installed. Each library runs in its own child process
(benchmarks/measure.py), one per repeat, in a rotating order; every step has a deadline, and a
child that misses it is killed with every process it started. After each child, any process it
started that is still alive is reported and killed.

The table shows medians over the repeats. Each peer's cell carries a ratio that reads as "how
many times better procpool is": peer / procpool for times, procpool / peer for rates and
speed-ups. Above 1, procpool is ahead.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import executor as executor_bench
import psutil
import workloads as w

MEASURE = Path(__file__).resolve().with_name("measure.py")

STEPS = ("cold", "submit", "map", "latency", "cpu", "kill", "crash")
FULL_SIZES = {"submit": 20_000, "map": 200_000, "latency": 2_000, "cpu": 24, "kills": 5}
QUICK_SIZES = {"submit": 5_000, "map": 50_000, "latency": 500, "cpu": 12, "kills": 3}
# --scale never shrinks a workload below these: percentiles and speed-ups need a few samples.
MIN_SIZES = {"submit": 30, "map": 100, "latency": 20, "cpu": 3, "kills": 1}
CPU_TASK_MS = 50
# Seconds. "bound" caps every wait that a broken peer can turn into a hang (its answer is then
# "hangs"); the latency step stops early past its budget (aiomultiprocess polls every 5 ms).
FULL_LIMITS = {"bound": 5.0, "latency_budget": 5.0}
QUICK_LIMITS = {"bound": 2.0, "latency_budget": 1.5}
# Seconds per step before the child is deemed stuck and killed: generous safety nets, far above
# any healthy run (the slowest, aiomultiprocess's map of 200,000, takes ~15 s).
FULL_DEADLINES = {"cold": 60, "submit": 120, "map": 240, "latency": 60, "cpu": 120, "kill": 120, "crash": 120}
QUICK_DEADLINES = dict.fromkeys(STEPS, 30) | {"map": 60}
END_DEADLINE = 30
# How long processes of a finished child may take to exit before they count as left behind.
LEFTOVER_GRACE = 5.0


@attrs.frozen
class Contender:
    key: str
    label: str
    module: str
    dist: str | None
    # Issue 2's targets compare procpool with the best of these.
    required: bool


CONTENDERS = (
    Contender("procpool", "procpool", "procpool", "procpool", False),
    Contender("futures", "ProcessPoolExecutor", "concurrent.futures", None, True),
    Contender("multiprocessing", "multiprocessing.Pool", "multiprocessing", None, True),
    Contender("aiomultiprocess", "aiomultiprocess.Pool", "aiomultiprocess", "aiomultiprocess", True),
    Contender("loky", "loky", "loky", "loky", False),
    Contender("pebble", "pebble", "pebble", "pebble", False),
)
BY_KEY = {c.key: c for c in CONTENDERS}


@attrs.frozen
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    # For recovery metrics: the step field that says "recovers" or what went wrong instead.
    outcome: str | None = None


METRICS = (
    Metric("cold_start_ms", "first result from a cold start", "ms", False),
    Metric("submit_tasks_per_s", "one submit per task, {submit:,} tiny tasks", "tasks/s", True),
    Metric("map_tasks_per_s", "map, {map:,} tiny tasks", "tasks/s", True),
    Metric("latency_p50_us", "round-trip latency p50", "µs", False),
    Metric("latency_p99_us", "round-trip latency p99", "µs", False),
    Metric("cpu_speedup", "speed-up, {cpu} CPU tasks of ~50 ms", "x", True),
    Metric("kill_ms", "idle worker SIGKILLed: 3 workers again + a task done", "ms", False, outcome="kill"),
    Metric("crash_caller_ms", "task kills its worker: the caller gets", "ms", False, outcome="crash_caller"),
    Metric("crash_ms", "task kills its worker: 3 workers again + a task done", "ms", False, outcome="crash"),
)


# -- running the children -------------------------------------------------------------------------


@attrs.define
class PeerRun:
    """What one child reported, step by step, and what went wrong around it."""

    lines: dict[str, dict[str, Any]] = attrs.Factory(dict)
    problems: list[str] = attrs.Factory(list)
    leftover: list[str] = attrs.Factory(list)


def run_peer(key: str, config: dict[str, Any], deadlines: dict[str, float]) -> PeerRun:
    """Run every step for one library; a step that hangs costs only itself (a new child goes on)."""
    run = PeerRun()
    remaining = list(STEPS)
    while remaining:
        stuck = _run_child(key, remaining, config, deadlines, run)
        if stuck is None:
            break
        remaining = remaining[remaining.index(stuck) + 1 :]
    return run


def _run_child(
    key: str, steps: list[str], config: dict[str, Any], deadlines: dict[str, float], run: PeerRun
) -> str | None:
    """One child for ``steps``; returns the step it got stuck on (child killed), or None."""
    arg = json.dumps({"peer": key, "steps": steps, **config})
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen([sys.executable, str(MEASURE), arg], stdout=subprocess.PIPE, stderr=errors, text=True)
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_read_lines, args=(child.stdout, lines), daemon=True)
        reader.start()
        processes: dict[int, float] = {}
        stuck = None
        try:
            for step in [*steps, "end"]:
                line = _next_line(child, lines, deadlines.get(step, END_DEADLINE))
                if line is None:
                    what = "exited" if child.poll() is not None else "did not answer in time and was killed"
                    stuck = step
                    if step != "end":
                        run.lines[step] = {"ok": False, "error": f"the benchmark process {what}"}
                    run.problems.append(f"{key}/{step}: the benchmark process {what}{_tail(errors)}")
                    break
                processes.update((pid, created) for pid, created in line.pop("processes"))
                run.problems.extend(f"{key}/{step}: {note}" for note in line.pop("notes"))
                if step == "end":
                    if line["leftover"]:
                        run.problems.append(f"{key}: pool shutdown left processes {line['leftover']}")
                else:
                    run.lines[step] = line
                    if not line["ok"]:
                        run.problems.append(f"{key}/{step}: {line['error']}")
        finally:
            _stop_child(child, processes)
            run.leftover += [f"{key}: {name}" for name in _reap(processes)]
        return stuck if stuck != "end" else None


def _read_lines(stream: Any, lines: queue.Queue[str | None]) -> None:
    for text in stream:
        lines.put(text)
    lines.put(None)


def _next_line(child: subprocess.Popen[str], lines: queue.Queue[str | None], deadline: float) -> dict[str, Any] | None:
    """The child's next JSON line, or None if it exits or stays silent past the deadline."""
    until = time.monotonic() + deadline
    while time.monotonic() < until:
        try:
            text = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            continue  # not ours: stray output cannot reach this pipe, but be lenient
    return None


def _tail(errors: Any, limit: int = 600) -> str:
    errors.seek(0)
    text = errors.read().strip()
    return f"; its last output: {text[-limit:]}" if text else ""


def _stop_child(child: subprocess.Popen[str], processes: dict[int, float]) -> None:
    """Let a finished child exit; kill a stuck one together with everything it started."""
    try:
        child.wait(timeout=10)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        tree = psutil.Process(child.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for proc in [*tree, *_still_ours(processes)]:
        _kill(proc)
    child.kill()
    child.wait()


def _still_ours(processes: dict[int, float]) -> list[psutil.Process]:
    """The reported processes still alive: same pid AND same start time (no recycled pids)."""
    alive = []
    for pid, created in processes.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _reap(processes: dict[int, float]) -> list[str]:
    """Processes a child started that outlive it by LEFTOVER_GRACE: killed, and named."""
    _, alive = psutil.wait_procs(_still_ours(processes), timeout=LEFTOVER_GRACE)
    names = []
    for proc in alive:
        try:
            names.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
        except psutil.Error:
            names.append(str(proc.pid))
        _kill(proc)
    return names


def _kill(proc: psutil.Process) -> None:
    try:
        proc.kill()  # psutil checks the pid still names the same process
    except psutil.NoSuchProcess:
        pass


# -- summarising -----------------------------------------------------------------------------------


def summarise(runs: dict[str, list[PeerRun]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Medians over repeats, per contender and metric: ``{"value", "text", "runs"}``."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for key, peer_runs in runs.items():
        steps = [run.lines for run in peer_runs]
        summary[key] = {metric.key: _summarise_metric(metric, steps) for metric in METRICS}
    return summary


def _summarise_metric(metric: Metric, steps: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    lines = [line for run in steps for line in run.values() if line.get("ok") and metric.key in line]
    if not lines:
        return {"value": None, "text": "failed", "runs": []}
    if metric.outcome is None:
        values = [line[metric.key] for line in lines]
        return _number(statistics.median(values), metric.unit, values)
    outcomes = [line[metric.outcome] for line in lines]
    # Recovery metrics pool the samples of every run: each run times several kills.
    samples = [sample for line in lines for sample in line[metric.key]]
    if metric.outcome == "crash_caller":
        # The error type the caller got (most runs agree), and how soon it got it.
        outcome = Counter(outcomes).most_common(1)[0][0]
        if not samples or outcome in ("hangs", "no error"):
            return {"value": None, "text": outcome, "runs": outcomes}
        value = statistics.median(samples)
        return {"value": value, "text": f"{outcome}, {_format(value, metric.unit)}", "runs": samples}
    failures = [outcome for outcome in outcomes if outcome != "recovers"]
    if failures:
        # A pool that ever breaks or hangs does not recover, however fast it did other times.
        text = Counter(failures).most_common(1)[0][0]
        if len(failures) < len(outcomes):
            text += f" in {len(failures)} of {len(outcomes)} runs"
        return {"value": None, "text": text, "runs": outcomes}
    return _number(statistics.median(samples), metric.unit, samples)


def _number(value: float, unit: str, runs: list[Any]) -> dict[str, Any]:
    return {"value": value, "text": _format(value, unit), "runs": runs}


def _format(value: float, unit: str) -> str:
    if unit == "tasks/s":
        if value >= 1e6:
            return f"{value / 1e6:.2f}M/s"
        return f"{value / 1e3:.1f}k/s"
    if unit == "x":
        return f"{value:.2f}x"
    if value >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.1f} {unit}"


def ratios(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Per peer and metric, how many times better procpool is (above 1: procpool ahead)."""
    ours = summary.get("procpool", {})
    out: dict[str, dict[str, float | None]] = {}
    for key, metrics in summary.items():
        if key == "procpool":
            continue
        out[key] = {}
        for metric in METRICS:
            mine, theirs = ours.get(metric.key, {}).get("value"), metrics[metric.key]["value"]
            if not mine or not theirs:
                out[key][metric.key] = None
            else:
                out[key][metric.key] = mine / theirs if metric.higher_is_better else theirs / mine
    return out


def targets(summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Issue 2's targets (against the best of the required peers), issue 3's recovery time and
    issue 13's one-submit-per-task figure (against the best of every peer that ran)."""
    required = [c.key for c in CONTENDERS if c.required and c.key in summary]
    every_peer = [key for key in summary if key != "procpool"]

    def check(
        name: str,
        metric: str,
        higher: bool,
        slack: float = 1.0,
        limit: float | None = None,
        peers: list[str] = required,
    ) -> dict[str, Any]:
        mine = summary["procpool"][metric]["value"]
        if limit is None:
            theirs = {k: summary[k][metric]["value"] for k in peers if summary[k][metric]["value"] is not None}
            best_key = (max if higher else min)(theirs, key=theirs.__getitem__) if theirs else None
            best = theirs.get(best_key) if best_key else None
        else:
            best_key, best = None, limit
        met = None
        if mine is not None and best is not None:
            met = mine >= best * slack if higher else mine <= best
        unit = next(m.unit for m in METRICS if m.key == metric)
        detail = f"procpool {_format(mine, unit)}" if mine is not None else "procpool not measured"
        if best is not None:
            detail += f" vs {BY_KEY[best_key].label if best_key else 'limit'} {_format(best, unit)}"
        return {
            "target": name,
            "metric": metric,
            "procpool": mine,
            "best_peer": best_key,
            "best": best,
            "met": met,
            "detail": detail,
        }

    return [
        check("one-submit-per-task throughput at least the best required peer's", "submit_tasks_per_s", True),
        check("round-trip latency p50 at most the best required peer's", "latency_p50_us", False),
        check("CPU-bound speed-up within 10% of the best required peer's", "cpu_speedup", True, slack=0.9),
        check("back to 3 workers within 1 s of an idle worker's SIGKILL (issue 3)", "kill_ms", False, limit=1000),
        check("back to 3 workers within 1 s of a crash mid-task (issue 3)", "crash_ms", False, limit=1000),
        check(
            "one-submit-per-task throughput at least 2x the best peer's (issue 13)",
            "submit_tasks_per_s",
            True,
            slack=2.0,
            peers=every_peer,
        ),
    ]


# -- rendering -------------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    """The results as an aligned Markdown table (readable as plain text too)."""
    keys = list(report["results"])
    sizes = report["config"]["sizes"]
    header = ["workload (median)", *(BY_KEY[k].label for k in keys)]
    rows = [header]
    for metric in METRICS:
        row = [metric.label.format(**sizes)]
        for key in keys:
            cell = report["results"][key][metric.key]["text"]
            ratio = report["ratios"].get(key, {}).get(metric.key)
            row.append(f"{cell} ({ratio:.2f}x)" if ratio else cell)
        rows.append(row)
    start_methods = ["start method", *(report["contenders"][k]["start_method"] or "?" for k in keys)]
    rows.append(start_methods)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The whole report as text: context, table, how to read it, targets, problems."""
    machine = report["machine"]
    cfg = report["config"]
    flags = "".join([" --quick" if cfg["quick"] else "", f" --scale {cfg['scale']:g}" if cfg["scale"] != 1 else ""])
    out = [
        f"procpool {report['contenders']['procpool']['version']} against its peers, 3 workers each; "
        f"medians of {cfg['repeat']} run(s){f' ({flags.strip()})' if flags else ''}.",
        f"Machine: {machine['cpu_model']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"{machine['platform']}, {machine['date']}, load average at start {machine['load_average']}.",
        "",
        table(report),
        "",
        "(Nx) = how many times better procpool is than that peer: peer / procpool for times,",
        "procpool / peer for rates and speed-ups; above 1, procpool is ahead.",
        "map: procpool sizes its chunks itself; multiprocessing.Pool uses its default chunksize,",
        "ProcessPoolExecutor, loky and pebble get that same default (n / 12); aiomultiprocess has none.",
        "",
        "Targets:",
    ]
    units = {m.key: m.unit for m in METRICS}
    for t in report["targets"]:
        verdict = {True: "met", False: "MISSED"}.get(t["met"]) or (
            "not measured" if t["procpool"] is None else "not checked (no required peer ran)"
        )
        unit = units[t["metric"]]
        mine = _format(t["procpool"], unit) if t["procpool"] is not None else "n/a"
        against = f" vs {BY_KEY[t['best_peer']].label} {_format(t['best'], unit)}" if t["best_peer"] else ""
        out.append(f"- {t['target']}: {verdict} (procpool {mine}{against})")
    if report["problems"]:
        out += ["", "Problems:", *(f"- {p}" for p in report["problems"])]
    return "\n".join(out)


# -- entry point -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown CPU"
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _version(contender: Contender) -> str:
    if contender.dist is None:
        return f"Python {platform.python_version()}"
    try:
        return importlib.metadata.version(contender.dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="compare.py", description="Benchmark procpool against its peers, in one run, and print the ratio table."
    )
    parser.add_argument("--quick", action="store_true", help="smaller workloads and 1 repeat (well under 2 minutes)")
    parser.add_argument(
        "--repeat", type=_positive_int, default=None, help="runs per contender; medians reported (default 3, --quick 1)"
    )
    parser.add_argument(
        "--scale", type=_positive_float, default=1.0, help="multiply every task count (e.g. 0.01 for a smoke test)"
    )
    parser.add_argument(
        "--peers",
        type=_peer_list,
        default=None,
        help=f"comma-separated subset of: {', '.join(c.key for c in CONTENDERS[1:])} (procpool always runs)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the full report as JSON")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table as Markdown")
    args = parser.parse_args(argv)
    for path in (args.json, args.markdown):
        if path is not None and not path.parent.is_dir():
            parser.error(f"cannot write {path}: {path.parent} is not a directory")
    return args


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _peer_list(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown peer(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(BY_KEY)}"
        )
    return [k for k in keys if k != "procpool"]


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print the table; return 0, or 1 if procpool failed or processes leaked."""
    args = parse_args(argv)
    w.compile_procpool()  # the cold start measures an installed procpool, as for the peers
    repeat = args.repeat or (1 if args.quick else 3)
    base = QUICK_SIZES if args.quick else FULL_SIZES
    sizes = {k: max(MIN_SIZES[k], round(v * args.scale)) for k, v in base.items()}
    limits = QUICK_LIMITS if args.quick else FULL_LIMITS
    deadlines = QUICK_DEADLINES if args.quick else FULL_DEADLINES
    wanted = args.peers if args.peers is not None else [c.key for c in CONTENDERS[1:]]
    problems: list[str] = []
    keys = ["procpool"]
    for key in wanted:
        if importlib.util.find_spec(BY_KEY[key].module) is None:
            problems.append(f"{key} is not installed: skipped")
        else:
            keys.append(key)
    config = {"sizes": sizes | {"cpu_ms": CPU_TASK_MS}, **limits}
    report: dict[str, Any] = {
        "machine": machine(),
        "config": {
            "quick": args.quick,
            "repeat": repeat,
            "scale": args.scale,
            "sizes": sizes,
            "cpu_task_ms": CPU_TASK_MS,
            **limits,
            "peers": keys[1:],
        },
    }
    runs: dict[str, list[PeerRun]] = {key: [] for key in keys}
    leftover: list[str] = []
    started = time.monotonic()
    try:
        for r in range(repeat):
            # Rotate the order, so no contender always runs first (or after the noisiest one).
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                t0 = time.monotonic()
                run = run_peer(key, config, deadlines)
                runs[key].append(run)
                problems += [f"run {r + 1}: {p}" for p in run.problems]
                leftover += run.leftover
                print(f"[run {r + 1}/{repeat}] {key}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if leftover:
        problems.append(f"processes left behind (killed): {leftover}")
    summary = summarise(runs)
    report |= {
        "contenders": {
            key: {
                "label": BY_KEY[key].label,
                "version": _version(BY_KEY[key]),
                "start_method": next(
                    (r.lines["cold"].get("start_method") for r in runs[key] if r.lines.get("cold", {}).get("ok")), None
                ),
            }
            for key in keys
        },
        "metrics": [attrs.asdict(m) for m in METRICS],
        "results": summary,
        "ratios": ratios(summary),
        "problems": problems,
        "leftover_processes": leftover,
        "seconds": round(time.monotonic() - started, 1),
        "raw": {key: [run.lines for run in runs[key]] for key in keys},
    }
    report["targets"] = targets(summary)
    # procpool.Executor from synchronous code against the same peers (issue 12).
    report["executor"] = executor_bench.run(sizes, repeat, peers=keys[1:])
    leftover += report["executor"]["leftover"]
    text = render(report) + "\n\n" + executor_bench.render(report["executor"])
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    procpool_failed = any(not line.get("ok") for run in runs["procpool"] for line in run.lines.values())
    return 1 if procpool_failed or leftover else 0


if __name__ == "__main__":
    sys.exit(main())
