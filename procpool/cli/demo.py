"""``procpool demo``: count primes on several pools, kill a worker and time out a task half-way, report.

Every task ends as done or as a typed error; the pools replace the dead workers, and the tables
compare the run with the same work done serially in this process. ``--dask`` runs the same demo
on pools of Dask workers (each pool on its own local cluster), through the same manager.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from procpool import POOL_SIZE, PoolLike, PoolManager, TaskTimeout, WorkerCrashed
from procpool._progress import make_progress, stderr_console
from procpool.errors import BrokenPool, PoolClosed

__all__ = ("count_primes", "demo")

# Numbers each demo task checks for primality: about 5-20 ms of pure Python per task, so the
# default 300 tasks keep two cores busy for a few seconds and the serial baseline stays short.
DEMO_SPAN = 6000
# Chunks each worker may have queued or running at once in the demo. Enough to keep every worker
# busy; few enough that the faults injected half-way start at once instead of behind the whole
# queue, where the timed-out task's wait was added to the end of the run and the speed-up read
# 1.1x instead of the pool's 1.9x (issue 9).
DEMO_WINDOW_PER_WORKER = 2
# The task the demo times out on purpose sleeps this long but may only run FAULT_TIMEOUT seconds:
# short against the second half of the run, so the other workers finish the work meanwhile.
FAULT_STALL = 60.0
FAULT_TIMEOUT = 0.25
# How long the demo waits for every pool to be back to three healthy workers after the faults.
RECOVERY_DEADLINE = 20.0


# -- the workload (module level, so workers can import it) ---------------------------------------


def count_primes(lo: int, hi: int, stall: float = 0.0, announce: str | None = None) -> int:
    """Count the primes in ``[lo, hi)`` by trial division (CPU-bound on purpose).

    For the demo's faults: ``announce`` names a file to write this worker's pid to first (so the
    demo knows whom to kill), and ``stall`` seconds of sleep make a task overrun its timeout.
    """
    if announce:
        Path(announce).write_text(str(os.getpid()))
    if stall:
        time.sleep(stall)
    found = 0
    for k in range(max(lo, 2), hi):
        if k % 2 == 0:
            found += k == 2
            continue
        d = 3
        while d * d <= k:
            if k % d == 0:
                break
            d += 2
        else:
            found += 1
    return found


# -- the demo --------------------------------------------------------------------------------------


def _worker_pids(pools: Iterable[PoolLike]) -> set[int]:
    return {w.pid for pool in pools for w in pool.workers if w.pid is not None}


async def _wait_for_file(path: Path, deadline: float) -> bool:
    """Wait until a task has written ``path``; False if the deadline passes first."""
    end = time.monotonic() + deadline
    while not path.exists() or not path.read_text():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.005)
    return True


async def _wait_all_healthy(pools: list[PoolLike], deadline: float) -> bool:
    """Wait until every pool reports three healthy workers; False if the deadline passes or one breaks."""
    try:
        async with asyncio.timeout(deadline):
            # Each wait wakes on the pool's own events (a respawned worker is ready), not on a timer.
            for pool in pools:
                await pool.wait_healthy()
    except (TimeoutError, BrokenPool, PoolClosed):
        return False
    return True


async def _demo_parallel(
    tasks: int, pools: int, faults: bool, show: bool, scratch: Path, backend: str = "local"
) -> dict[str, Any]:
    """Run the prime-counting chunks on the pools of ``backend``; half-way, kill one worker and time out one task."""
    manager = PoolManager()
    pids: set[int] = set()
    events: list[dict[str, Any]] = []
    console = stderr_console() if show else None
    # One outcome per chunk: ("done", pool_id, primes) or (kind, None, message).
    outcomes: list[tuple[str, str | None, Any] | None] = [None] * tasks
    # Two chunks wait for the half-way mark: one stalls past its timeout, one gets its worker killed.
    timed_chunk, killed_chunk = (tasks // 2, tasks // 2 + 1) if faults else (None, None)
    half_way = asyncio.Event()
    # Bounds the ordinary chunks in flight; the two faulty ones bypass it and start at once.
    window = asyncio.Semaphore(DEMO_WINDOW_PER_WORKER * POOL_SIZE * pools)
    finished = 0
    reporter = make_progress(show or None, tasks, "counting primes")

    def say(text: str) -> None:
        if console is not None:
            console.print(f"[bold yellow]half-way:[/] {text}")

    async def run_chunk(i: int, **faults: Any) -> None:
        nonlocal finished
        lo, hi = i * DEMO_SPAN, (i + 1) * DEMO_SPAN
        timeout = faults.pop("timeout", None)
        try:
            if faults:
                pool_id, primes = await manager.route_apply(count_primes, (lo, hi), faults, timeout=timeout)
            else:
                async with window:
                    pool_id, primes = await manager.route_apply(count_primes, (lo, hi), timeout=timeout)
            outcomes[i] = ("done", pool_id, primes)
        except TaskTimeout as exc:
            outcomes[i] = ("timed_out", None, str(exc))
        except WorkerCrashed as exc:
            outcomes[i] = ("crashed", None, str(exc))
        except Exception as exc:
            outcomes[i] = ("failed", None, f"{type(exc).__name__}: {exc}")
        finished += 1
        reporter.advance()
        if finished >= tasks // 2:
            half_way.set()

    async def time_out_one() -> None:
        assert timed_chunk is not None  # only scheduled with faults on
        await half_way.wait()
        say(f"chunk {timed_chunk} sleeps {FAULT_STALL:g} s but may run {FAULT_TIMEOUT:g} s")
        events.append({"fault": "timeout", "chunk": timed_chunk, "timeout": FAULT_TIMEOUT})
        await run_chunk(timed_chunk, stall=FAULT_STALL, timeout=FAULT_TIMEOUT)

    async def kill_one() -> None:
        assert killed_chunk is not None  # only scheduled with faults on
        await half_way.wait()
        announce = scratch / "victim.pid"
        # The chunk writes its worker's pid, then waits to be killed (no timeout of its own).
        victim = asyncio.ensure_future(run_chunk(killed_chunk, stall=FAULT_STALL, announce=str(announce)))
        if not await _wait_for_file(announce, RECOVERY_DEADLINE):
            victim.cancel()  # never started in time: do not wait out its stall
            events.append({"fault": "sigkill", "chunk": killed_chunk, "pid": None})
            await asyncio.gather(victim, return_exceptions=True)
            return
        pid = int(announce.read_text())
        pids.add(pid)
        say(f"SIGKILL to worker pid {pid}, which is running chunk {killed_chunk}")
        events.append({"fault": "sigkill", "chunk": killed_chunk, "pid": pid})
        os.kill(pid, signal.SIGKILL)
        await victim

    try:
        t0 = time.perf_counter()
        await manager.start()
        pool_list = [await manager.create_pool(f"demo-{i + 1}", backend=backend) for i in range(pools)]
        startup = time.perf_counter() - t0
        pids |= _worker_pids(pool_list)
        with reporter:
            t0 = time.perf_counter()
            jobs = [run_chunk(i) for i in range(tasks) if i not in (timed_chunk, killed_chunk)]
            if faults:
                jobs += [time_out_one(), kill_one()]
            await asyncio.gather(*jobs)
            elapsed = time.perf_counter() - t0
        recovered = await _wait_all_healthy(pool_list, RECOVERY_DEADLINE)
        statuses = [p.get_status() for p in pool_list]
        pids |= _worker_pids(pool_list)
    finally:
        await manager.stop()
    return {
        "startup": startup,
        "elapsed": elapsed,
        "outcomes": outcomes,
        "events": events,
        "recovered": recovered,
        "statuses": statuses,
        "pids": sorted(pids),
        "faulty_chunks": {c for c in (timed_chunk, killed_chunk) if c is not None},
    }


def _demo_serial(tasks: int, show: bool, skip: set[int]) -> tuple[float, list[int | None]]:
    """The same chunks, one after another in this process: the baseline for the speed-up.

    The chunks in ``skip`` (the faulty ones, which count nothing in the parallel run) are skipped
    here too, so both runs time the same work.
    """
    results: list[int | None] = []
    with make_progress(show or None, tasks, "serial baseline") as reporter:
        t0 = time.perf_counter()
        for i in range(tasks):
            results.append(None if i in skip else count_primes(i * DEMO_SPAN, (i + 1) * DEMO_SPAN))
            reporter.advance()
        return time.perf_counter() - t0, results


def _demo_summary(
    tasks: int,
    pools: int,
    faults: bool,
    run: dict[str, Any],
    serial_s: float,
    serial: list[int | None],
    backend: str = "local",
) -> dict[str, Any]:
    outcomes = run["outcomes"]
    kinds = collections.Counter(o[0] for o in outcomes if o is not None)
    done = kinds["done"]
    on_purpose = kinds["timed_out"] + kinds["crashed"] if faults else 0
    unexpected = tasks - done - on_purpose
    mismatched = [i for i, o in enumerate(outcomes) if o is not None and o[0] == "done" and o[2] != serial[i]]
    elapsed = run["elapsed"]
    return {
        "tasks": tasks,
        "pools": pools,
        "backend": backend,
        "workers_per_pool": POOL_SIZE,
        "cpu_count": os.cpu_count(),
        "done": done,
        "failed_on_purpose": on_purpose,
        "timed_out": kinds["timed_out"],
        "crashed": kinds["crashed"],
        "failed_unexpectedly": unexpected,
        "all_accounted_for": done + on_purpose == tasks,
        "errors": [{"chunk": i, "kind": o[0], "message": o[2]} for i, o in enumerate(outcomes) if o and o[0] != "done"],
        "results_match_serial": not mismatched,
        "primes_found": sum(o[2] for o in outcomes if o is not None and o[0] == "done"),
        "numbers_checked": tasks * DEMO_SPAN,
        "startup_s": round(run["startup"], 3),
        "parallel_s": round(elapsed, 3),
        "serial_s": round(serial_s, 3),
        "speedup": round(serial_s / elapsed, 2) if elapsed else None,
        "throughput_tasks_per_s": round(done / elapsed, 1) if elapsed else None,
        "restarts": sum(s["workers_restarted"] for s in run["statuses"]),
        "recovered": run["recovered"],
        "faults": run["events"],
        "pool_status": [
            {
                "pool_id": s["pool_id"],
                "health": s["health"],
                "tasks_completed": s["tasks_completed"],
                "tasks_failed": s["tasks_failed"],
                "tasks_timed_out": s["tasks_timed_out"],
                "tasks_crashed": s["tasks_crashed"],
                "workers_restarted": s["workers_restarted"],
                "latency_p50_ms": _ms(s["latency_p50"]),
                "latency_p99_ms": _ms(s["latency_p99"]),
                "workers": [
                    # A Dask worker reports no RSS (the client does not probe processes): None.
                    {
                        k: w.get(k)
                        for k in ("worker_id", "pid", "state", "healthy", "restarts", "tasks_processed", "rss_mb")
                    }
                    for w in s["workers"]
                ],
            }
            for s in run["statuses"]
        ],
        "worker_pids": run["pids"],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _print_demo_tables(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = summary
    red = "[bold red]{}[/]".format
    where = " on local Dask clusters" if s["backend"] == "dask" else ""
    totals = Table(
        title=f"procpool demo: {s['pools']} pools x {POOL_SIZE} workers{where}", show_header=False, title_justify="left"
    )
    totals.add_column(style="bold")
    totals.add_column()
    totals.add_row("tasks", f"{s['tasks']} (each counts the primes among {DEMO_SPAN} numbers)")
    totals.add_row("done", str(s["done"]))
    totals.add_row(
        "failed on purpose", f"{s['failed_on_purpose']} ({s['timed_out']} timed out, {s['crashed']} worker killed)"
    )
    totals.add_row(
        "failed otherwise",
        str(s["failed_unexpectedly"]) if not s["failed_unexpectedly"] else red(s["failed_unexpectedly"]),
    )
    accounted = f"{s['done'] + s['failed_on_purpose']} of {s['tasks']}"
    totals.add_row("accounted for", accounted if s["all_accounted_for"] else red(accounted))
    totals.add_row(
        "results", "same as the serial run" if s["results_match_serial"] else red("DIFFER from the serial run")
    )
    totals.add_row("parallel run", f"{s['parallel_s']:.2f} s, {s['throughput_tasks_per_s']} tasks/s")
    totals.add_row("serial run", f"{s['serial_s']:.2f} s (same work, one process)")
    totals.add_row("speed-up", f"{s['speedup']}x on {s['cpu_count']} CPUs")
    totals.add_row("worker restarts", str(s["restarts"]))
    totals.add_row("recovered", "every pool healthy" if s["recovered"] else red("NOT all pools healthy"))

    pools = Table(title="pools", title_justify="left")
    for column in ("pool", "health", "done", "failed", "restarts", "p50 ms", "p99 ms"):
        pools.add_column(column, justify="left" if column in ("pool", "health") else "right")
    for p in s["pool_status"]:
        pools.add_row(
            p["pool_id"],
            p["health"],
            str(p["tasks_completed"]),
            str(p["tasks_failed"]),
            str(p["workers_restarted"]),
            str(p["latency_p50_ms"]),
            str(p["latency_p99_ms"]),
        )

    workers = Table(title="workers", title_justify="left")
    for column in ("worker", "pid", "state", "healthy", "restarts", "tasks", "RSS MB"):
        workers.add_column(column, justify="left" if column in ("worker", "state", "healthy") else "right")
    for p in s["pool_status"]:
        for w in p["workers"]:
            workers.add_row(
                w["worker_id"],
                str(w["pid"]),
                w["state"],
                "yes" if w["healthy"] else red("no"),
                str(w["restarts"]),
                str(w["tasks_processed"]),
                "-" if w["rss_mb"] is None else str(w["rss_mb"]),
            )
    console = Console()
    for table in (totals, pools, workers):
        console.print(table)


@click.command(short_help="Show procpool at work, surviving a killed worker and a timeout.")
@click.option(
    "--tasks", type=click.IntRange(4, 10_000), default=300, show_default=True, help="How many chunks of work."
)
@click.option(
    "--pools", type=click.IntRange(1, 8), default=2, show_default=True, help="How many pools of three workers."
)
@click.option("--no-faults", is_flag=True, help="Do not kill a worker or time out a task half-way.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout, no progress bar.")
@click.option(
    "--dask",
    "use_dask",
    is_flag=True,
    help="Run the pools on Dask workers, each pool on its own local cluster (pip install 'procpool[dask]').",
)
def demo(tasks: int, pools: int, no_faults: bool, as_json: bool, use_dask: bool) -> None:
    """Count primes on several pools, kill a worker and time out a task half-way, then report.

    Every task ends as done or as a typed error; the pools replace the dead workers, and the
    table compares the run with the same work done serially in this process. With --dask the
    pools are three workers of a local Dask cluster each, behind the same manager.
    """
    show = not as_json
    faults = not no_faults
    backend = "dask" if use_dask else "local"
    if use_dask:
        # Dask's own INFO lines (workers joining, a nanny restarting the killed worker) would
        # interleave with the progress bar; the tables say what happened. Set before distributed
        # is imported, so its workers, which inherit the environment, read it too.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    with tempfile.TemporaryDirectory(prefix="procpool-demo-") as scratch:
        try:
            run = asyncio.run(_demo_parallel(tasks, pools, faults, show, Path(scratch), backend))
        except ImportError as exc:
            raise click.ClickException(str(exc)) from None
    serial_s, serial = _demo_serial(tasks, show, run["faulty_chunks"])
    summary = _demo_summary(tasks, pools, faults, run, serial_s, serial, backend)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_demo_tables(summary)
    ok = summary["all_accounted_for"] and summary["results_match_serial"] and summary["recovered"]
    if not ok or summary["failed_unexpectedly"]:
        raise click.exceptions.Exit(1)
