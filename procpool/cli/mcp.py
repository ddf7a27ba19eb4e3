"""``procpool mcp``: the command's flags, turned into the server's `ServerConfig`.

The group imports this module only when ``mcp`` is asked for. It imports the configuration
(``procpool.mcp.config``: allow-lists, limits, flag parsers; no MCP SDK); the server and its SDK
are imported inside the command, when it runs.
"""

from __future__ import annotations

from typing import Any

import click

from procpool.cli.params import finite_seconds, import_from_working_directory
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

__all__ = ("mcp",)


def _parse_handler_flag(spec: str) -> tuple[str, str]:
    """parse_handler for ``--handler``, finding modules in the working directory like ``procpool run``
    (issue 9: ``procpool mcp`` could not import ``mypkg.agents:review``)."""
    import_from_working_directory()
    return parse_handler(spec)


def _click_value(parse: Any) -> Any:
    """A click callback that parses each value with ``parse`` and reports its ValueError as a bad parameter."""

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
    callback=finite_seconds,
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
def mcp(
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

    Pools on a Dask cluster (pip install 'procpool[dask]') only at addresses allowed here:

        procpool mcp --handler echo --dask-address tcp://10.0.0.5:8786
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
        # The server, its transports and the MCP SDK: imported only now, when a server is to run.
        from procpool.mcp.transports import run

        run(config)
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # pragma: no cover - only when SIGINT lands before the handler is set
        pass
