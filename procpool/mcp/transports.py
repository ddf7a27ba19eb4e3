"""Serving the pool tools: stdio or streamable HTTP, signals, and the ``procpool mcp`` command.

``procpool mcp --handler echo`` serves the tools ``create_pool``, ``execute_on_pool``,
``execute_batch_on_pool``, ``route_to_pool``, ``list_pools``, ``get_pool_status``,
``check_pool_health``, ``delete_pool`` and ``get_pool_manager_status`` with the installed MCP
Python SDK, 1.x (>= 1.24) or 2.x (>= 2.3) (``pip install 'procpool[mcp]'``). See docs/mcp.md.

``mcp`` itself is imported only when a server is built, so ``procpool --help`` works with just
the ``cli`` extra installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from typing import Any

import click

from procpool.mcp.config import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_POOLS,
    DEFAULT_MAX_PROMPT_BYTES,
    DEFAULT_MAX_TIMEOUT,
    ServerConfig,
    parse_dask_address,
    parse_handler,
    parse_http,
)
from procpool.mcp.server import _build, _Lifespan
from procpool.mcp.tools import SHUTDOWN_GRACE

__all__ = ("mcp_command", "run", "serve")

log = logging.getLogger("procpool.mcp")


# -- serving ---------------------------------------------------------------------------------------


def _setup_logging(level: str | None) -> None:
    """Log to stderr (on stdio, stdout carries the protocol and nothing else), unless the
    ``procpool`` command already set logging up; then only apply an explicit level."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            stream=sys.stderr,
            level=(level or "WARNING").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    elif level is not None:
        root.setLevel(level.upper())


async def serve(config: ServerConfig) -> None:
    """Serve until the client disconnects (stdio) or the process is told to stop (HTTP).

    Every pool is shut down before it returns. On stdio, SIGTERM and SIGINT stop the pools and then
    end the process with that signal, as it would have without the handler.
    """
    lifespan = _Lifespan(config)
    server, glue = _build(config, lifespan)
    if config.http is not None:
        host, port = config.http
        log.info("serving MCP on http://%s:%d/mcp", host, port)
        # uvicorn handles SIGINT/SIGTERM itself: it stops serving, then the lifespan stops the pools.
        await glue.serve_http(server, host, port)
        return
    loop = asyncio.get_running_loop()
    stopping: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not stopping.done():
            stopping.set_result(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    serving: asyncio.Future[None] = asyncio.ensure_future(server.run_stdio_async())
    try:
        either: list[asyncio.Future[Any]] = [serving, stopping]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()
            return
        # Cancelling the session runs the lifespan's teardown. The session itself may never end:
        # its stdin reader is a thread that cancellation cannot interrupt. So wait for the pools
        # to be shut down, not for the session, then end the process with the signal.
        serving.cancel()
        if lifespan.entered:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(lifespan.stopped.wait(), SHUTDOWN_GRACE + 5)
        received = stopping.result()
        log.info("stopped by %s", received.name)
        signal.signal(received, signal.SIG_DFL)
        os.kill(os.getpid(), received)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(config: ServerConfig) -> None:
    """Serve ``config`` in this process until done (blocking); logs go to stderr."""
    _setup_logging(config.log_level)
    asyncio.run(serve(config))


def _parse_handler_flag(spec: str) -> tuple[str, str]:
    """parse_handler for ``--handler``: like ``python -m`` and ``procpool run``, find modules in
    the working directory (issue 9: ``procpool mcp`` could not import ``mypkg.agents:review``).
    The workers inherit sys.path."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return parse_handler(spec)


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    # click's FloatRange lets NaN through: every comparison with it is false.
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number of seconds", ctx, param)
    return value


def _click_value(parse: Any) -> Any:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            if isinstance(value, tuple):
                return tuple(parse(v) for v in value)
            return None if value is None else parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None

    return callback


@click.command("mcp")
@click.option(
    "--handler",
    "handlers",
    multiple=True,
    metavar="NAME=module:function",
    callback=_click_value(_parse_handler_flag),
    help="Allow a prompt handler under NAME (repeatable). A built-in by name alone: 'echo', or "
    "'command' (runs each prompt as a shell command: only for trusted clients).",
)
@click.option(
    "--http",
    metavar="HOST:PORT",
    callback=_click_value(parse_http),
    help="Serve streamable HTTP at http://HOST:PORT/mcp (loopback only) instead of stdio.",
)
@click.option(
    "--max-pools",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_POOLS,
    show_default=True,
    help="Most pools alive at once.",
)
@click.option(
    "--max-prompt-bytes",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_PROMPT_BYTES,
    show_default=True,
    help="Largest prompt (and context, as JSON), in UTF-8 bytes.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BATCH,
    show_default=True,
    help="Most prompts in one execute_batch_on_pool call.",
)
@click.option(
    "--max-timeout",
    type=click.FloatRange(min=0, min_open=True, max=1e9),
    default=DEFAULT_MAX_TIMEOUT,
    show_default=True,
    callback=_finite,
    help="Longest task timeout in seconds; also the default for every task.",
)
@click.option(
    "--allow-route-to-command",
    is_flag=True,
    help="Let route_to_pool choose pools of the shell 'command' handler. Off by default: a routed "
    "prompt would run as a shell command line.",
)
@click.option(
    "--dask-address",
    "dask_addresses",
    multiple=True,
    metavar="tcp://HOST:PORT",
    callback=_click_value(parse_dask_address),
    help="Allow pools on the Dask cluster whose scheduler is at this address (repeatable): an agent's "
    "create_pool(backend='dask') may pick one of these, never an address of its own. None by default.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=None,
    help="Log level (logs go to stderr). Default: procpool's --log-level, or warning.",
)
def mcp_command(
    handlers: tuple[tuple[str, str], ...],
    http: tuple[str, int] | None,
    max_pools: int,
    max_prompt_bytes: int,
    max_batch: int,
    max_timeout: float,
    allow_route_to_command: bool,
    dask_addresses: tuple[str, ...],
    log_level: str | None,
) -> None:
    """Serve procpool's pool tools over MCP (stdio by default).

    Agents create pools, run prompts and read status; they never send code. Example:

        procpool mcp --handler echo --handler review=mypkg.agents:review
    """
    allowed: dict[str, str] = {}
    for name, path in handlers:
        if name in allowed and allowed[name] != path:
            raise click.BadParameter(f"handler name {name!r} is given twice", param_hint="'--handler'")
        allowed[name] = path
    if not allowed:
        raise click.UsageError("allow at least one handler, e.g. --handler echo or --handler NAME=module:function")
    config = ServerConfig(
        allowed,
        http,
        max_pools,
        max_prompt_bytes,
        max_batch,
        max_timeout,
        log_level,
        allow_route_to_command=allow_route_to_command,
        dask_addresses=dask_addresses,
    )
    if http is not None:
        click.echo(f"procpool MCP server on http://{http[0]}:{http[1]}/mcp", err=True)
    try:
        run(config)
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # pragma: no cover - only when SIGINT lands before the handler is set
        pass


if __name__ == "__main__":
    mcp_command()
