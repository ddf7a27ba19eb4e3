"""The benchmark suite (benchmarks/compare.py) runs end to end at a tiny size, once, through
``procpool bench``. Timings are never asserted here: benchmarks measure, tests check behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import psutil
import pytest
from helpers import console_script

pytestmark = pytest.mark.slow


def marked(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``marker`` (inherited by every descendant)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PROCPOOL_BENCH_SMOKE") == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_bench_reports_every_metric_writes_json_and_markdown_and_leaves_no_process(tmp_path):
    """`procpool bench --suite peers --quick` at 1 % size against one peer reports every metric, ratio
    and target, writes its JSON and Markdown reports, prints the table and the targets' verdicts, and
    leaves no process behind."""
    report_path, table_path = tmp_path / "bench.json", tmp_path / "bench.md"
    marker = uuid.uuid4().hex
    # --json and --markdown are the command's own options; --scale, --repeat and --peers pass through.
    command = [
        *console_script(),
        "bench",
        "--suite",
        "peers",
        "--quick",
        "--json",
        str(report_path),
        "--markdown",
        str(table_path),
        "--scale",
        "0.01",
        "--repeat",
        "1",
        "--peers",
        "futures",
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PROCPOOL_BENCH_SMOKE": marker},
    )
    try:
        out, err = proc.communicate(timeout=50)
    finally:
        for leftover in marked(marker):  # only on failure: the script cleans up after itself
            leftover.kill()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"

    report = json.loads(report_path.read_text())
    assert report["config"]["quick"] is True
    assert {"machine", "config", "contenders", "results", "ratios", "targets", "problems"} <= report.keys()
    assert set(report["results"]) == {"procpool", "futures"}
    metrics = [m["key"] for m in report["metrics"]]
    assert set(report["results"]["procpool"]) == set(report["ratios"]["futures"]) == set(metrics)
    for key in ("cold_start_ms", "submit_tasks_per_s", "map_tasks_per_s", "latency_p50_us", "cpu_speedup", "kill_ms"):
        assert report["results"]["procpool"][key]["value"] > 0, key
    assert report["results"]["futures"]["kill_ms"]["text"].startswith("breaks")
    assert report["results"]["procpool"]["crash_caller_ms"]["text"].startswith("WorkerCrashed")
    assert len(report["targets"]) >= 3 and all("met" in t for t in report["targets"])
    assert report["leftover_processes"] == []
    assert "| procpool" in table_path.read_text() and "| procpool" in out  # the ratio table is printed too
    verdicts = [line for line in out.splitlines() if line.startswith("- [") and "] peers: " in line]
    assert len(verdicts) == len(report["targets"]) and "Targets: " in out

    _, alive = psutil.wait_procs(marked(marker), timeout=10)
    assert not alive, f"processes started by the benchmark outlived it: {alive}"


def test_bench_refuses_a_suites_options_for_several_suites():
    """Options meant for one suite's script, given with several suites, are refused before anything runs."""
    proc = subprocess.run(
        [*console_script(), "bench", "--suite", "peers", "--suite", "floors", "--scale", "0.01"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "need exactly one --suite" in proc.stderr
