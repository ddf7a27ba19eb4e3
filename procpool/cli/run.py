"""``procpool run``: call a user's MODULE:FUNCTION on each input in a pool; JSON lines out, in order."""

from __future__ import annotations

import asyncio
import collections
import importlib
import json
import logging
import pickle
from collections.abc import Callable
from typing import Any

import click

from procpool import WorkerPool
from procpool._progress import make_progress
from procpool.cli.params import finite_seconds, import_from_working_directory
from procpool.errors import task_error

__all__ = ("run",)

log = logging.getLogger("procpool.cli")

# `procpool run` keeps this many items submitted ahead of the one it prints next.
RUN_WINDOW = 1000


def _load_function(ctx: click.Context, param: click.Parameter, value: str) -> Callable[..., Any]:
    """Import ``module:function`` for the parent and check that workers can receive it."""
    module_name, sep, attr = value.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(f"expected 'module:function', got {value!r}")
    import_from_working_directory()
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
    function: Callable[..., Any] = obj
    return function


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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


@click.command(short_help="Map a function over inputs on a pool; print JSON lines.")
@click.argument("function", metavar="MODULE:FUNCTION", callback=_load_function)
@click.argument("args", nargs=-1, metavar="[ARG]...")
@click.option("--input", "-i", "input_file", type=click.File("r"), help="Read one input per line ('-' for stdin).")
@click.option("--strings", is_flag=True, help="Pass inputs as strings; by default valid JSON is decoded.")
@click.option("--star", is_flag=True, help="Call function(*item) when an input is a JSON list.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    callback=finite_seconds,
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
