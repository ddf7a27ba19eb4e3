"""The chaos test: hundreds of concurrent tasks mixing every failure the pool must survive."""

from __future__ import annotations

import asyncio
import collections
import random

import psutil
import pytest
import tasks
from helpers import all_healthy

from procpool import (
    MemoryLimitExceeded,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    WorkerPool,
    WorkerStuck,
)

pytestmark = pytest.mark.anyio

MIX = {
    "ok": 200,
    "raise": 30,
    "exit": 10,
    "sigkill": 10,
    "segfault": 5,
    "timeout": 10,
    "stuck": 5,
    "memory": 5,
    "unpicklable": 10,
    "cancel": 15,
}
EXPECTED = {
    "raise": ValueError,
    "exit": WorkerCrashed,
    "sigkill": WorkerCrashed,
    "segfault": WorkerCrashed,
    "timeout": TaskTimeout,
    "stuck": WorkerStuck,
    "memory": MemoryLimitExceeded,
    "unpicklable": SerializationError,
    "cancel": asyncio.CancelledError,
}


def descendants() -> dict[int, str]:
    """Processes this test process started, except multiprocessing's reusable helpers."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        if "forkserver import main" in cmdline or "resource_tracker import main" in cmdline:
            continue
        found[proc.pid] = cmdline
    return found


@pytest.mark.timeout(120)
async def test_chaos(tmp_path):
    """Every one of 300 mixed tasks ends exactly once with its expected outcome, and the pool recovers."""
    runs = str(tmp_path / "runs")
    kinds = [kind for kind, n in MIX.items() for _ in range(n)]
    random.Random(1234).shuffle(kinds)
    assert len(kinds) >= 300
    before = set(descendants())
    pool = WorkerPool(stuck_after=1.5, max_memory_mb=200)
    await pool.initialize()
    futures = []
    for i, kind in enumerate(kinds):
        timeout = 0.3 if kind == "timeout" else None
        futures.append(asyncio.ensure_future(pool.apply(tasks.chaos, (kind, runs, i), timeout=timeout)))
    await asyncio.sleep(0)
    for fut, kind in zip(futures, kinds, strict=True):
        if kind == "cancel":
            fut.cancel()
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 100)

    for i, (kind, outcome) in enumerate(zip(kinds, outcomes, strict=True)):
        if kind == "ok":
            assert outcome == i
        else:
            expected = EXPECTED[kind]
            assert isinstance(outcome, expected), (i, kind, outcome)
            if expected is WorkerCrashed:  # a plain crash, not one of the monitor's verdicts
                assert type(outcome) is WorkerCrashed, (i, kind, outcome)
    with open(runs) as f:
        ran = collections.Counter(int(line) for line in f)
    assert max(ran.values()) == 1, "a task ran twice"
    for i, kind in enumerate(kinds):
        if kind != "cancel":
            assert ran[i] == 1, (i, kind)

    await all_healthy(pool)
    assert len({w.pid for w in pool.workers}) == 3
    await pool.shutdown()
    left = {pid: cmd for pid, cmd in descendants().items() if pid not in before}
    assert not left, f"processes left behind: {left}"
