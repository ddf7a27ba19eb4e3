"""Run the benchmark steps for ONE pool library in this process; print one JSON line per step.

compare.py starts this script once per library and repeat, gives every step a deadline and kills
the whole process tree if a library hangs. Usage (internal)::

    python benchmarks/measure.py '{"peer": "pebble", "steps": ["cold", "submit"], "sizes": {...}}'

Every line carries the worker processes seen so far as ``[pid, create_time]`` pairs, so the
parent can check that none outlives this process, even when it had to kill it.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import signal
import statistics
import sys
import threading
import time
import traceback
from typing import Any

import peers
import psutil
import workloads

# Above this, a peer's replacement is overdue: ask it for a task to tell "broken" from "hanging".
REPLACEMENT_PATIENCE = 0.5
# How often the recovery step looks for the replacement worker (its time resolution).
REPLACEMENT_POLL = 0.001


class Runner:
    """Runs the steps in order on one peer, keeping one pool open across the steady-state steps."""

    def __init__(self, peer: peers.Peer, config: dict[str, Any], out: Any) -> None:
        self.peer = peer
        self.sizes: dict[str, int] = config["sizes"]
        self.bound: float = config["bound"]
        self.latency_budget: float = config["latency_budget"]
        self.out = out
        # pid -> create_time of every process this benchmark made (workers and helpers).
        self.seen: dict[int, float] = {}
        # Trouble outside the measurements (a shutdown that hung), reported with the next line.
        self.notes: list[str] = []

    async def run(self, steps: list[str]) -> None:
        for step in steps:
            try:
                line = {"step": step, "ok": True, **await getattr(self, f"step_{step}")()}
            except Exception as exc:  # the parent reports it; the next step gets a fresh pool
                line = {"step": step, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
                await self.close_pool()
            self.emit(line)
        await self.close_pool()

    def finish(self) -> None:
        """Report the workers that outlived their pools' shutdown, then run the exit hooks.

        Checked before the hooks, which could hide a leak (procpool's kills the workers of
        pools nobody shut down). The hooks stop helpers a library keeps for the interpreter's
        lifetime (aiomultiprocess's manager); they run in a daemon thread with a bound, because
        a peer's hook can hang on a lock that a killed worker held. The caller then skips the
        real exit.
        """
        leftover = self.leftover_workers()
        hooks = threading.Thread(target=atexit._run_exitfuncs, daemon=True)
        hooks.start()
        hooks.join(self.bound)
        if hooks.is_alive():
            self.notes.append("the interpreter's exit hooks hang")
        self.emit({"step": "end", "leftover": leftover})

    def emit(self, line: dict[str, Any]) -> None:
        self.note_processes()
        line["processes"] = sorted(self.seen.items())
        line["notes"], self.notes = self.notes, []
        self.out.write(json.dumps(line) + "\n")
        self.out.flush()

    def note_processes(self) -> None:
        procs = psutil.Process().children(recursive=True)
        if self.peer.is_open:
            for pid in self.peer.worker_pids():
                try:
                    procs.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    pass
        for proc in procs:
            try:
                self.seen[proc.pid] = proc.create_time()
            except psutil.NoSuchProcess:
                pass

    def leftover_workers(self) -> list[int]:
        """Processes seen here that are still alive 5 s after every pool was shut down.

        Helpers that live as long as this interpreter (the forkserver, resource trackers, a
        library's own manager) are excluded; the parent checks that they exit with this process.
        """
        helpers = {p.pid for p in psutil.Process().children() if _is_helper(p)}
        helpers.update(self.peer.helper_pids())
        procs = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and pid not in helpers:
                    procs.append(proc)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        return sorted(p.pid for p in alive if _status(p) != psutil.STATUS_ZOMBIE)

    async def open_pool(self) -> None:
        """Make sure a warm pool is open: created, all workers up, one task done."""
        if not self.peer.is_open:
            await self.peer.create()
            await self.peer.probe(self.bound)
        deadline = time.monotonic() + self.bound
        while len(self.peer.worker_pids()) < peers.WORKERS and time.monotonic() < deadline:
            await self.peer.submit_many(30)
        self.note_processes()

    async def close_pool(self) -> None:
        """Shut the pool down; if that fails or hangs, kill its workers ourselves and say so."""
        if not self.peer.is_open:
            return
        self.note_processes()
        workers = self.peer.worker_pids()
        try:
            await self.peer.close(self.bound)
        except Exception as exc:
            self.peer.pool = None
            what = "hangs" if isinstance(exc, TimeoutError) else f"fails ({type(exc).__name__})"
            self.notes.append(f"shutdown {what}; its workers were killed")
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # -- steps -----------------------------------------------------------------------------------

    async def step_cold(self) -> dict[str, Any]:
        """Pool creation to first result, in a process where no pool ran before."""
        if self.peer.is_open:
            await self.close_pool()
        start = time.perf_counter()
        await self.peer.create()
        assert await self.peer.one(7) == 49
        elapsed = time.perf_counter() - start
        self.note_processes()
        return {"cold_start_ms": elapsed * 1e3, "start_method": self.peer.start_method()}

    async def step_submit(self) -> dict[str, Any]:
        await self.open_pool()
        n = self.sizes["submit"]
        await self.peer.submit_many(min(n, 500))
        start = time.perf_counter()
        results = await self.peer.submit_many(n)
        elapsed = time.perf_counter() - start
        _check_squares(results, n)
        return {"submit_tasks_per_s": n / elapsed, "tasks": n}

    async def step_map(self) -> dict[str, Any]:
        await self.open_pool()
        n = self.sizes["map"]
        await self.peer.map_many(min(n, 5000))
        start = time.perf_counter()
        results = await self.peer.map_many(n)
        elapsed = time.perf_counter() - start
        _check_squares(results, n)
        return {"map_tasks_per_s": n / elapsed, "tasks": n}

    async def step_latency(self) -> dict[str, Any]:
        await self.open_pool()
        for i in range(50):
            await self.peer.one(i)
        samples: list[float] = []
        stop = time.perf_counter() + self.latency_budget
        for i in range(self.sizes["latency"]):
            start = time.perf_counter()
            value = await self.peer.one(i)
            end = time.perf_counter()
            assert value == i * i
            samples.append(end - start)
            if end > stop:
                break
        return {
            "latency_p50_us": statistics.median(samples) * 1e6,
            "latency_p99_us": _percentile(samples, 99) * 1e6,
            "round_trips": len(samples),
        }

    async def step_cpu(self) -> dict[str, Any]:
        """Serial in-process time over pooled time, for CPU-bound tasks of ~50 ms each."""
        await self.open_pool()
        tasks = self.sizes["cpu"]
        iterations = workloads.calibrate_burn(self.sizes["cpu_ms"] / 1e3)
        await self.peer.cpu(peers.WORKERS, iterations // 10)
        expected = [workloads.burn(iterations)] * tasks
        serial, pooled = [], []
        # Best of two alternating rounds: on a shared machine a burst of someone else's load
        # only ever slows a round down, so the fastest round of each is the least disturbed.
        for _ in range(2):
            serial.append(_timed_serial(tasks, iterations))
            start = time.perf_counter()
            results = await self.peer.cpu(tasks, iterations)
            pooled.append(time.perf_counter() - start)
            assert list(results) == expected
        return {
            "cpu_speedup": min(serial) / min(pooled),
            "serial_s": serial,
            "pool_s": pooled,
            "tasks": tasks,
            "task_ms": min(serial) / tasks * 1e3,
        }

    async def step_kill(self) -> dict[str, Any]:
        """SIGKILL an idle worker (pid read from the pool), several times: how long until a
        replacement is in place and a task completes, or what goes wrong instead."""
        await self.open_pool()
        times: list[float] = []
        outcome = "recovers"
        try:
            for _ in range(self.sizes["kills"]):
                await self.peer.probe(self.bound)
                before = self.peer.worker_pids()
                start = time.perf_counter()
                os.kill(before[0], signal.SIGKILL)
                result = await self.await_recovery(set(before), start)
                if result != "ok":
                    outcome = result
                    break
                times.append((time.perf_counter() - start) * 1e3)
                self.note_processes()
        finally:
            # A pool that lost a worker may be broken: the next step gets a fresh one.
            await self.close_pool()
        return {"kill": outcome, "kill_ms": times, "kills_survived": len(times)}

    async def step_crash(self) -> dict[str, Any]:
        """A task SIGKILLs its own worker, several times: what its caller gets (and how soon),
        and how long until the pool has 3 workers again and runs a task."""
        await self.open_pool()
        times: list[float] = []
        caller_ms: list[float] = []
        caller = outcome = "?"
        try:
            for _ in range(self.sizes["kills"]):
                await self.peer.probe(self.bound)
                before = set(self.peer.worker_pids())
                answered: list[float] = []
                start = time.perf_counter()
                handle = self.peer.start_crash(functools.partial(_stamp, answered))
                result = await self.await_recovery(before, start)
                recovered = time.perf_counter() - start
                try:
                    await self.peer.crash_result(handle, self.bound)
                    caller = "no error"
                except TimeoutError:
                    caller = "hangs"
                except Exception as exc:
                    caller = type(exc).__name__
                    caller_ms.append((answered[0] - start) * 1e3)
                if result != "ok":
                    outcome = result
                    break
                outcome = "recovers"
                times.append(recovered * 1e3)
                self.note_processes()
                if caller == "hangs":
                    break  # one bounded hang is evidence enough
        finally:
            await self.close_pool()
        return {"crash_caller": caller, "crash_caller_ms": caller_ms, "crash": outcome, "crash_ms": times}

    async def await_recovery(self, before: set[int], start: float) -> str:
        """Wait until a dead worker's slot is filled, then run a task: ``ok`` or what went wrong."""
        asked = False
        while not self.peer.replaced(before):
            waited = time.perf_counter() - start
            if waited > REPLACEMENT_PATIENCE and not asked:
                # Overdue: a peer that is broken or hung will never replace it; find out which.
                asked = True
                outcome = await self.classify()
                if outcome != "ok":
                    return outcome
            if waited > self.bound:
                return "no replacement"
            await asyncio.sleep(REPLACEMENT_POLL)
        return await self.classify()

    async def classify(self) -> str:
        """Does the pool still run a task? ``ok``, ``breaks (Error)`` or ``hangs``."""
        try:
            await self.peer.probe(self.bound)
        except TimeoutError:
            return "hangs"
        except Exception as exc:
            return f"breaks ({type(exc).__name__})"
        return "ok"


def _stamp(times: list[float]) -> None:
    times.append(time.perf_counter())


def _timed_serial(tasks: int, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(tasks):
        workloads.burn(iterations)
    return time.perf_counter() - start


def _check_squares(results: Any, n: int) -> None:
    results = list(results)
    if len(results) != n or results[-1] != (n - 1) ** 2 or results[n // 2] != (n // 2) ** 2:
        raise AssertionError(f"wrong results: {len(results)} values for {n} tasks")


def _percentile(samples: list[float], pct: int) -> float:
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def _is_helper(proc: psutil.Process) -> bool:
    try:
        command = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "resource_tracker" in command or "forkserver" in command


def _status(proc: psutil.Process) -> str:
    try:
        return proc.status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_ZOMBIE


def main() -> None:
    config = json.loads(sys.argv[1])
    # Our JSON lines get a private copy of stdout; anything else printed here or in a worker
    # (peers' warnings, tracebacks) goes to stderr, which the parent keeps for error reports.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    peer = peers.ADAPTERS[config["peer"]]()
    runner = Runner(peer, config, out)
    code = 0
    try:
        asyncio.run(runner.run(config["steps"]))
        runner.finish()
    except BaseException:
        traceback.print_exc()
        code = 1
    out.flush()
    # Exit hooks have run (or hang) by now: skip the rest of interpreter shutdown.
    os._exit(code)


if __name__ == "__main__":
    main()
