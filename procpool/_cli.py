"""The ``procpool`` command: ``demo``, ``run``, ``bench`` and ``mcp``.

Built on click; rich draws the tables, progress bars and log lines (stderr), so stdout carries
only results (``--json`` summaries, JSON lines). Usage errors exit with code 2 and one line.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import json
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

try:
    import click
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the procpool command needs click and rich: pip install 'procpool[cli]'") from exc

import procpool
from procpool import POOL_SIZE, PoolManager, TaskTimeout, WorkerCrashed, WorkerPool
from procpool._progress import make_progress, stderr_console
from procpool.errors import task_error

__all__ = ("count_primes", "main")

log = logging.getLogger("procpool.cli")

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
# `procpool run` keeps this many items submitted ahead of the one it prints next.
RUN_WINDOW = 1000


# -- the demo's workload (module level, so workers can import it) ---------------------------------


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


# -- command-line plumbing ------------------------------------------------------------------------


class _Group(click.Group):
    """The top-level group: loads the optional ``mcp`` command only when it is asked for.

    The MCP SDK is an optional extra and slow to import, so ``procpool run`` should not pay for it.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "mcp"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "mcp" and cmd_name not in self.commands:
            return _mcp_command()
        return super().get_command(ctx, cmd_name)


def _mcp_command() -> click.Command:
    try:
        from procpool.mcp_server import mcp_command
    except ImportError as exc:
        reason = str(exc)

        @click.command("mcp", help="Serve the pool tools over MCP (needs: pip install 'procpool[mcp]').")
        def unavailable() -> None:
            raise click.ClickException(f"procpool mcp is not available: {reason} (pip install 'procpool[mcp]')")

        return unavailable
    return mcp_command


def _configure_logging(level: str) -> None:
    """Send log records to stderr: through the console progress bars share on a terminal (so
    records print above a live bar), as plain unwrapped lines otherwise (logs, pipes, CI)."""
    console = stderr_console()
    handler: logging.Handler
    if console.is_terminal:
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(procpool.__version__, prog_name="procpool")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
    help="Log records at this level and above go to stderr.",
)
def cli(log_level: str) -> None:
    """procpool: pools of exactly three worker processes that survive crashes, hangs and timeouts."""
    _configure_logging(log_level)


def main(argv: list[str] | None = None) -> None:
    """Run the ``procpool`` command line (the console script and ``python -m procpool``)."""
    try:
        code = cli.main(args=argv, prog_name="procpool", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        # One line, with the command it concerns and where to look; click's default is four.
        path = exc.ctx.command_path if exc.ctx is not None else "procpool"
        click.echo(f"{path}: error: {exc.format_message()} (see '{path} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


# -- procpool demo --------------------------------------------------------------------------------


def _worker_pids(pools: Iterable[WorkerPool]) -> set[int]:
    return {w.pid for pool in pools for w in pool.workers if w.pid is not None}


async def _wait_for_file(path: Path, deadline: float) -> bool:
    """Wait until a task has written ``path``; False if the deadline passes first."""
    end = time.monotonic() + deadline
    while not path.exists() or not path.read_text():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.005)
    return True


async def _wait_all_healthy(pools: list[WorkerPool], deadline: float) -> bool:
    """Wait until every pool reports three healthy workers; False if the deadline passes."""
    end = time.monotonic() + deadline
    while any(p.health != "healthy" for p in pools):
        if time.monotonic() > end:
            return False
        # A respawn completes through the pool's own events; this only samples the result.
        await asyncio.sleep(0.02)
    return True


async def _demo_parallel(tasks: int, pools: int, faults: bool, show: bool, scratch: Path) -> dict[str, Any]:
    """Run the prime-counting chunks on the pools; half-way, kill one worker and time out one task."""
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
        pool_list = [await manager.create_pool(f"demo-{i + 1}") for i in range(pools)]
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
    tasks: int, pools: int, faults: bool, run: dict[str, Any], serial_s: float, serial: list[int | None]
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
                    {k: w[k] for k in ("worker_id", "pid", "state", "healthy", "restarts", "tasks_processed", "rss_mb")}
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
    totals = Table(
        title=f"procpool demo: {s['pools']} pools x {POOL_SIZE} workers", show_header=False, title_justify="left"
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
                str(w["rss_mb"]),
            )
    console = Console()
    for table in (totals, pools, workers):
        console.print(table)


@cli.command(short_help="Show procpool at work, surviving a killed worker and a timeout.")
@click.option(
    "--tasks", type=click.IntRange(4, 10_000), default=300, show_default=True, help="How many chunks of work."
)
@click.option(
    "--pools", type=click.IntRange(1, 8), default=2, show_default=True, help="How many pools of three workers."
)
@click.option("--no-faults", is_flag=True, help="Do not kill a worker or time out a task half-way.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout, no progress bar.")
def demo(tasks: int, pools: int, no_faults: bool, as_json: bool) -> None:
    """Count primes on several pools, kill a worker and time out a task half-way, then report.

    Every task ends as done or as a typed error; the pools replace the dead workers, and the
    table compares the run with the same work done serially in this process.
    """
    show = not as_json
    faults = not no_faults
    with tempfile.TemporaryDirectory(prefix="procpool-demo-") as scratch:
        run = asyncio.run(_demo_parallel(tasks, pools, faults, show, Path(scratch)))
    serial_s, serial = _demo_serial(tasks, show, run["faulty_chunks"])
    summary = _demo_summary(tasks, pools, faults, run, serial_s, serial)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_demo_tables(summary)
    ok = summary["all_accounted_for"] and summary["results_match_serial"] and summary["recovered"]
    if not ok or summary["failed_unexpectedly"]:
        raise click.exceptions.Exit(1)


# -- procpool run ---------------------------------------------------------------------------------


def _load_function(ctx: click.Context, param: click.Parameter, value: str) -> Callable[..., Any]:
    """Import ``module:function`` for the parent and check that workers can receive it."""
    module_name, sep, attr = value.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(f"expected 'module:function', got {value!r}")
    # Like `python -m`, find modules in the current directory; workers inherit sys.path.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import module {module_name!r}: {exc}") from exc
    except SyntaxError as exc:
        # One line like every other bad input, not a traceback (issue 9).
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else f"line {exc.lineno}"
        raise click.BadParameter(f"cannot import module {module_name!r}: syntax error in {where}: {exc.msg}") from exc
    except Exception as exc:
        raise click.BadParameter(f"importing module {module_name!r} failed: {_first_line(exc)}") from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise click.BadParameter(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise click.BadParameter(f"{value} is not callable")
    try:
        pickle.dumps(obj)
    except Exception as exc:
        raise click.BadParameter(f"{value} cannot be sent to a worker (define it at module level): {exc}") from exc
    return obj


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _finite_seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    # click's FloatRange lets NaN and infinity through; the pool would refuse them with a traceback.
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number of seconds", ctx, param)
    return value


def _callers_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is this task being cancelled (Ctrl-C), rather than a task's own CancelledError."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    current = asyncio.current_task()
    return current is None or current.cancelling() > 0


def _parse_input(text: str, strings: bool) -> Any:
    if strings:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _error_record(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


async def _run_items(
    fn: Callable[..., Any], items: list[Any], star: bool, timeout: float | None, progress: bool, show_tb: bool
) -> int:
    """Submit items with a bounded window; print one JSON line per item in input order."""
    failed = 0
    label = getattr(fn, "__qualname__", "run")
    async with WorkerPool("run", task_timeout=timeout) as pool:
        window: collections.deque[tuple[int, Any, asyncio.Future[Any]]] = collections.deque()
        pending = iter(enumerate(items))
        with make_progress(progress or None, len(items), label) as reporter:
            try:
                while True:
                    for index, item in pending:
                        args = tuple(item) if star and isinstance(item, list) else (item,)
                        future = pool.submit(fn, *args)
                        future.add_done_callback(lambda _f: reporter.advance())
                        window.append((index, item, future))
                        if len(window) >= RUN_WINDOW:
                            break
                    if not window:
                        break
                    index, item, future = window.popleft()
                    record: dict[str, Any] = {"index": index, "input": item}
                    try:
                        record["result"] = await future
                    except BaseException as raised:
                        # A task's SystemExit or KeyboardInterrupt is that item's failure: it must
                        # neither exit with the task's code nor say "interrupted" (issue 9).
                        if _callers_cancellation(raised):
                            raise
                        exc = task_error(raised)
                        failed += 1
                        record["error"] = _error_record(exc)
                        log.error(
                            "item %d (%s) failed: %s: %s",
                            index,
                            json.dumps(item, default=repr),
                            type(exc).__name__,
                            exc,
                        )
                        if show_tb and exc.__cause__ is not None:
                            log.error("worker traceback of item %d:\n%s", index, exc.__cause__)
                    click.echo(json.dumps(record, default=repr))
            finally:
                for _, _, future in window:
                    future.cancel()
    return failed


@cli.command(short_help="Map a function over inputs on a pool; print JSON lines.")
@click.argument("function", metavar="MODULE:FUNCTION", callback=_load_function)
@click.argument("args", nargs=-1, metavar="[ARG]...")
@click.option("--input", "-i", "input_file", type=click.File("r"), help="Read one input per line ('-' for stdin).")
@click.option("--strings", is_flag=True, help="Pass inputs as strings; by default valid JSON is decoded.")
@click.option("--star", is_flag=True, help="Call function(*item) when an input is a JSON list.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    callback=_finite_seconds,
    help="Seconds each item may run.",
)
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Progress bar on an interactive stderr."
)
@click.option("--traceback", "show_tb", is_flag=True, help="Log the worker-side traceback of failed items.")
def run(
    function: Callable[..., Any],
    args: tuple[str, ...],
    input_file: Any,
    strings: bool,
    star: bool,
    timeout: float | None,
    progress: bool,
    show_tb: bool,
) -> None:
    """Call MODULE:FUNCTION on each input in a pool; print one JSON line per input, in order.

    Inputs are the ARGs, or the lines of --input; each is decoded as JSON when it is valid JSON
    and passed as a string otherwise. Each output line is {"index", "input", "result"} or
    {"index", "input", "error": {"type", "message"}}. Exits 1 if any item failed.
    """
    if args and input_file is not None:
        raise click.UsageError("give inputs as arguments or with --input, not both")
    texts = [line.rstrip("\r\n") for line in input_file if line.strip()] if input_file is not None else list(args)
    if not texts:
        raise click.UsageError("no inputs: pass ARGs or --input FILE")
    items = [_parse_input(t, strings) for t in texts]
    failed = asyncio.run(_run_items(function, items, star, timeout, progress, show_tb))
    if failed:
        log.error("%d of %d items failed", failed, len(items))
        raise click.exceptions.Exit(1)


# -- procpool bench -------------------------------------------------------------------------------


def benchmarks_dir() -> Path:
    """Where the benchmark suite lives: next to the package in a source checkout."""
    return Path(procpool.__file__).resolve().parent.parent / "benchmarks"


@cli.command(short_help="Benchmark procpool against its peers.", context_settings={"ignore_unknown_options": True})
@click.option("--quick", is_flag=True, help="A short run (under two minutes).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results as JSON here.")
@click.option(
    "--markdown", "markdown_path", type=click.Path(dir_okay=False), help="Also write the table as Markdown here."
)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED, metavar="[COMPARE OPTIONS]...")
def bench(quick: bool, json_path: str | None, markdown_path: str | None, extra: tuple[str, ...]) -> None:
    """Run benchmarks/compare.py: procpool against its peers, with the ratio table.

    Options not listed here go to compare.py unchanged (see: procpool bench --help-compare).
    Needs a source checkout; the suite is not part of the installed package.
    """
    script = benchmarks_dir() / "compare.py"
    if not script.is_file():
        raise click.ClickException(
            f"the benchmark suite is not here ({script} is missing): procpool bench runs from a source "
            "checkout of procpool (pip install -e .), not from an installed wheel"
        )
    argv = [sys.executable, str(script)]
    if quick:
        argv.append("--quick")
    if json_path:
        argv += ["--json", json_path]
    if markdown_path:
        argv += ["--markdown", markdown_path]
    argv += ["--help" if arg == "--help-compare" else arg for arg in extra]
    # subprocess.run kills and reaps the child if we are interrupted.
    code = subprocess.run(argv, check=False).returncode
    if code:
        raise click.exceptions.Exit(code if code > 0 else 1)
