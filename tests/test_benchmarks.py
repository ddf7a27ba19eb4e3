"""The benchmark suite (benchmarks/compare.py) runs end to end at a tiny size. Timings are never
asserted here: benchmarks measure, tests check behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.anyio

COMPARE = Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py"


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


def test_compare_reports_every_metric_and_leaves_no_process(tmp_path):
    """A tiny run against one peer reports every metric, ratio and target, and leaves no process behind."""
    report_path, table_path = tmp_path / "bench.json", tmp_path / "bench.md"
    marker = uuid.uuid4().hex
    command = [
        sys.executable,
        str(COMPARE),
        "--quick",
        "--scale",
        "0.01",
        "--repeat",
        "1",
        "--peers",
        "futures",
        "--json",
        str(report_path),
        "--markdown",
        str(table_path),
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
    assert "| procpool" in table_path.read_text() and "| procpool" in out

    _, alive = psutil.wait_procs(marked(marker), timeout=10)
    assert not alive, f"processes started by the benchmark outlived it: {alive}"
