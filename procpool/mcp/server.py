"""Mount procpool's nine pool tools on an MCP server, of either SDK generation or fastmcp's.

[`register_pool_tools`][procpool.mcp.server.register_pool_tools] mounts them on a host's
existing server: the MCP Python SDK's ``FastMCP`` (mcp 1.x), its ``MCPServer`` (mcp 2.x), or the
``fastmcp`` package's ``FastMCP`` (3.x on mcp 1.x, 4.x on mcp 2.x). All three take tools through
``server.tool(annotations=...)``; they differ in their ``ToolError``, which the one error
decorator here picks per server. [`build_server`][procpool.mcp.server.build_server] builds
procpool's own server (``procpool mcp``) with the installed SDK generation.
"""

# No ``from __future__ import annotations`` here: the SDKs read the tools' annotations with
# ``inspect.signature(eval_str=True)``, which resolves strings against module globals only, and
# the tools' parameter types are local to _mount (they carry the server's limits).

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Annotated, Any

import procpool
from procpool import PoolLike, PoolManager, PoolState
from procpool.errors import task_error
from procpool.mcp.tools import (
    BACKENDS,
    MAX_PRIORITY,
    SELECTORS,
    SHUTDOWN_GRACE,
    BatchResult,
    ManagerStatus,
    PoolCreated,
    PoolDeleted,
    PoolList,
    PoolTools,
    RoutedResult,
    ServerConfig,
    TaskResult,
    _callers_cancellation,
    _one_line,
    parse_handler,
)

__all__ = ("build_server", "register_pool_tools", "sdk")

log = logging.getLogger("procpool.mcp")

INSTRUCTIONS = (
    "Pools of three worker processes that run a prompt handler chosen by the server's operator. "
    "Create a pool with one of the allowed handlers (see get_pool_manager_status), then execute, "
    "batch or route prompts; results come back with the task id, worker id, pool id and duration."
)


def sdk() -> Any:
    """The glue module of the installed MCP SDK generation (``_sdk2`` for 2.x, ``_sdk1`` for 1.x).

    Raises:
        ImportError: the ``mcp`` package is not installed (``pip install 'procpool[mcp]'``).
    """
    try:
        from procpool.mcp import _sdk2

        return _sdk2
    except ImportError:
        pass
    try:
        from procpool.mcp import _sdk1

        return _sdk1
    except ImportError as exc:
        raise ImportError(f"the MCP server needs the mcp package: pip install 'procpool[mcp]' ({exc})") from exc


def _tool_error_class(server: Any) -> type[Exception]:
    """The ToolError of the server's framework: a client sees its message; other errors are masked."""
    for cls in type(server).__mro__:
        module = cls.__module__ or ""
        if module == "fastmcp" or module.startswith("fastmcp."):
            from fastmcp.exceptions import ToolError as FastMCPToolError

            return FastMCPToolError
        if module.startswith("mcp.server.fastmcp"):
            from procpool.mcp._sdk1 import ToolError as SDK1ToolError

            return SDK1ToolError
        if module.startswith("mcp.server.mcpserver"):
            from procpool.mcp._sdk2 import ToolError as SDK2ToolError

            return SDK2ToolError
    raise TypeError(
        "register_pool_tools mounts on the MCP SDK's FastMCP (mcp 1.x) or MCPServer (mcp 2.x), or on the fastmcp "
        f"package's FastMCP; got {type(server).__name__}"
    )


def _errors_to(tool_error: type[Exception]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The one error decorator: any failure becomes a one-line ``tool_error`` (frameworks mask other types)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def tool(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except tool_error:
                raise
            except Exception as exc:
                log.debug("tool call failed", exc_info=True)
                raise tool_error(_one_line(exc)) from exc
            except BaseException as exc:
                # A task's SystemExit or KeyboardInterrupt that got this far must not stop the server.
                if _callers_cancellation(exc):
                    raise
                log.debug("tool call failed", exc_info=True)
                raise tool_error(_one_line(task_error(exc))) from exc

        return tool

    return decorate


def _mount(server: Any, config: ServerConfig, get_tools: Callable[[], PoolTools]) -> None:
    """Add the nine tools to ``server``; each call runs on ``get_tools()``."""
    from mcp.types import ToolAnnotations
    from pydantic import Field

    errors = _errors_to(_tool_error_class(server))

    def tool(annotations: Any) -> Callable[[Callable[..., Any]], Any]:
        def register(fn: Callable[..., Any]) -> Any:
            return server.tool(annotations=annotations)(errors(fn))

        return register

    # The tools' parameter types. Limits that PoolTools enforces are also advertised in the schema
    # (json_schema_extra, not pydantic constraints), so the client sees them and the error for
    # breaking one is PoolTools' one line, not a multi-line validation report.
    names = sorted(config.handlers)
    limits = config.limits()
    PoolId = Annotated[str, Field(description="The pool's id, as create_pool or list_pools return it.")]
    NewPoolId = Annotated[
        str | None,
        Field(description="An id for the new pool (1-64 letters, digits, '_', '.', '-'); generated when omitted."),
    ]
    HandlerName = Annotated[
        str | None,
        Field(
            description="Name of the handler the pool runs, one of the server's allowed handlers "
            f"({', '.join(names)}); may be omitted when only one is allowed.",
            json_schema_extra={"enum": [*names, None]},
        ),
    ]
    Backend = Annotated[
        str,
        Field(
            description="Where the pool's three workers run: local (processes of the server's host) or dask (workers "
            "of a Dask cluster the server's operator allowed; see address).",
            json_schema_extra={"enum": list(BACKENDS)},
        ),
    ]
    DaskAddress = Annotated[
        str | None,
        Field(
            description="For backend dask: the scheduler, one of the addresses the server's operator allowed "
            f"({', '.join(config.dask_addresses) or 'none'}); may be omitted when only one is allowed. Any other "
            "address is refused.",
            json_schema_extra={"enum": [*config.dask_addresses, None]},
        ),
    ]
    Prompt = Annotated[
        str,
        Field(
            description=f"The text given to the pool's handler: data, never code. At most {limits['max_prompt_bytes']} "
            "UTF-8 bytes.",
            json_schema_extra={"x-max-bytes": limits["max_prompt_bytes"]},
        ),
    ]
    Prompts = Annotated[
        list[str],
        Field(
            description=f"The prompts, 1 to {limits['max_batch']}, each at most {limits['max_prompt_bytes']} UTF-8 "
            "bytes; they run concurrently on the pool's three workers.",
            json_schema_extra={"minItems": 1, "maxItems": limits["max_batch"]},
        ),
    ]
    Ctx = Annotated[
        dict[str, Any] | None,
        Field(description="A JSON object passed to the handler with each prompt (default: {})."),
    ]
    Timeout = Annotated[
        float | None,
        Field(
            description=f"Seconds a task may run, more than 0 and at most {limits['max_timeout']:g}; past it the "
            f"worker is killed and replaced and the call fails. Default: {limits['max_timeout']:g}.",
            json_schema_extra={"exclusiveMinimum": 0, "maximum": limits["max_timeout"]},
        ),
    ]
    RouteHandler = Annotated[
        str | None,
        Field(
            description="Name of the handler whose pools may take the prompt, one of the server's allowed handlers "
            f"({', '.join(names)}); required when the pools run several handlers. Pools of the shell 'command' "
            "handler are never chosen unless the server was started with --allow-route-to-command.",
            json_schema_extra={"enum": [*names, None]},
        ),
    ]
    SelectorName = Annotated[
        str,
        Field(
            description="How to choose the pool: least_loaded (fewest tasks queued and running), round_robin or "
            "random. Broken and closing pools are skipped, healthy ones preferred.",
            json_schema_extra={"enum": list(SELECTORS)},
        ),
    ]
    Priority = Annotated[
        int,
        Field(
            description="Higher runs first in the pool's queue (default 0); tasks of one priority run in order. "
            "A task already handed to a worker is not overtaken.",
            json_schema_extra={"minimum": -MAX_PRIORITY, "maximum": MAX_PRIORITY},
        ),
    ]
    Tags = Annotated[
        list[str] | None,
        Field(description="Labels for the new local pool, such as llm or cpu, that route_to_pool can require."),
    ]
    Requires = Annotated[
        list[str] | None,
        Field(description="Route only to pools carrying every one of these tags (given to create_pool)."),
    ]
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    runs_work = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)

    @tool(ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False))
    async def create_pool(
        pool_id: NewPoolId = None,
        handler: HandlerName = None,
        backend: Backend = "local",
        address: DaskAddress = None,
        tags: Tags = None,
    ) -> PoolCreated:
        """Create and start a pool of three worker processes running an allowed handler, on the server's host or on an
        allowed Dask cluster."""
        return await get_tools().create_pool(pool_id, handler, backend, address, tags=tags)

    @tool(runs_work)
    async def execute_on_pool(
        pool_id: PoolId, prompt: Prompt, context: Ctx = None, timeout: Timeout = None, priority: Priority = 0
    ) -> TaskResult:
        """Run the pool's handler on one prompt; return its result with task id, worker id, pool id and duration."""
        return await get_tools().execute_on_pool(pool_id, prompt, context, timeout, priority=priority)

    @tool(runs_work)
    async def execute_batch_on_pool(
        pool_id: PoolId, prompts: Prompts, context: Ctx = None, timeout: Timeout = None
    ) -> BatchResult:
        """Run the pool's handler on every prompt; per-prompt results or errors, in input order."""
        return await get_tools().execute_batch_on_pool(pool_id, prompts, context, timeout)

    @tool(runs_work)
    async def route_to_pool(
        prompt: Prompt,
        handler: RouteHandler = None,
        context: Ctx = None,
        selector: SelectorName = "least_loaded",
        timeout: Timeout = None,
        priority: Priority = 0,
        requires: Requires = None,
    ) -> RoutedResult:
        """Run a prompt on the pool a selector picks among the pools of one handler (and, with requires, carrying
        those tags); return the result and which pool ran it. Name the handler when the pools run several."""
        return await get_tools().route_to_pool(
            prompt, context, selector, timeout, handler, priority=priority, requires=requires
        )

    @tool(read_only)
    async def list_pools() -> PoolList:
        """List the server's pools with their handler, state, health, load and task counts."""
        return await get_tools().list_pools()

    @tool(read_only)
    async def get_pool_status(pool_id: PoolId) -> dict[str, Any]:
        """A pool's full status: state, health, queue, task counts, latency percentiles and each worker."""
        return await get_tools().get_pool_status(pool_id)

    @tool(read_only)
    async def check_pool_health(pool_id: PoolId) -> dict[str, Any]:
        """A pool's health: healthy, degraded (with the reason), broken or not_running, and each worker's."""
        return await get_tools().check_pool_health(pool_id)

    @tool(ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False))
    async def delete_pool(pool_id: PoolId) -> PoolDeleted:
        """Shut a pool down (running tasks get a few seconds, then are killed) and stop its workers."""
        return await get_tools().delete_pool(pool_id)

    @tool(read_only)
    async def get_pool_manager_status() -> ManagerStatus:
        """Health of every pool, plus the handlers and limits this server allows."""
        return await get_tools().get_pool_manager_status()


def register_pool_tools(
    server: Any,
    manager: PoolManager | None = None,
    handlers: Mapping[str, str] | Iterable[str] = ("echo",),
    limits: Mapping[str, Any] | None = None,
    *,
    allow_route_to_command: bool = False,
    dask_addresses: Iterable[str] = (),
) -> PoolTools:
    """Mount the nine pool tools on a host's existing MCP server, with an allow-list and limits.

    Works on the MCP SDK's ``FastMCP`` (mcp 1.x), its ``MCPServer`` (mcp 2.x) and the ``fastmcp``
    package's ``FastMCP`` (3.x, 4.x), and on subclasses of them. The tools are the ones
    ``procpool mcp`` serves, with the same checks.

    Args:
        server: the host's server.
        manager: the [`PoolManager`][procpool.PoolManager] the tools create pools in (default:
            a new one, started by the first ``create_pool``). The host stops it:
            ``await tools.manager.stop()`` on the returned object.
        handlers: the handlers an agent may create pools of: ``{name: "package.module:function"}``,
            or ``--handler``-style strings (``"echo"``, ``"review=mypkg.agents:review"``).
            Default: the built-in ``echo`` only.
        limits: ``max_pools``, ``max_prompt_bytes``, ``max_batch``, ``max_timeout`` (the
            defaults of ``procpool mcp`` for those left out).
        allow_route_to_command: let ``route_to_pool`` pick pools of the shell ``command`` handler.
        dask_addresses: Dask schedulers (``"tcp://host:port"``) an agent may create pools on
            (``create_pool(backend="dask")``); none by default.

    Returns:
        The [`PoolTools`][procpool.mcp.tools.PoolTools] the tools run on (``.manager``, ``.config``).

    Raises:
        TypeError: ``server`` is none of the three kinds.
        ValueError: a handler cannot be imported, or a bad limit.
        ImportError: the ``mcp`` package is not installed.
    """
    allowed = dict(handlers) if isinstance(handlers, Mapping) else dict(parse_handler(spec) for spec in handlers)
    config = ServerConfig(
        allowed, **dict(limits or {}), allow_route_to_command=allow_route_to_command, dask_addresses=dask_addresses
    )
    tools = PoolTools(config, manager if manager is not None else PoolManager())
    _mount(server, config, lambda: tools)
    return tools


class _Lifespan:
    """The server's lifespan: one PoolManager, started with the server and stopped with it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.entered = False
        # The tools' state while the server runs (None before and after).
        self.tools: PoolTools | None = None
        # Set once every pool is shut down, even when the teardown itself was cancelled.
        self.stopped = asyncio.Event()

    def get_tools(self) -> PoolTools:
        if self.tools is None:
            raise RuntimeError("the server is not running")
        return self.tools

    @contextlib.asynccontextmanager
    async def __call__(self, _server: Any) -> AsyncIterator[PoolTools]:
        self.entered = True
        manager = PoolManager()
        await manager.start()
        log.info("pool manager started; allowed handlers: %s", ", ".join(sorted(self.config.handlers)))
        tools = self.tools = PoolTools(self.config, manager)
        try:
            yield tools
        finally:
            pools = tools.pools()
            # In a task of its own: a cancelled server (signal, client gone) still stops every worker.
            stopping = asyncio.ensure_future(manager.stop(SHUTDOWN_GRACE))
            stopping.add_done_callback(lambda _: self._done(pools))
            await asyncio.shield(stopping)

    def _done(self, pools: list[PoolLike]) -> None:
        closed = sum(pool.state is PoolState.CLOSED for pool in pools)
        log.info("pool manager stopped: %d of %d pools shut down", closed, len(pools))
        self.tools = None
        self.stopped.set()


def build_server(config: ServerConfig) -> Any:
    """Build procpool's own MCP server with the installed SDK generation (``MCPServer`` or ``FastMCP``).

    It starts one PoolManager when it starts and stops it when it stops: on stdio with its
    client's connection; on HTTP, with the process.

    Raises:
        ImportError: the ``mcp`` package is not installed (``pip install 'procpool[mcp]'``).
    """
    return _build(config, _Lifespan(config))[0]


def _build(config: ServerConfig, lifespan: _Lifespan) -> tuple[Any, Any]:
    glue = sdk()
    server = glue.new_server(
        "procpool", procpool.__version__, INSTRUCTIONS, lifespan, (config.log_level or "WARNING").upper()
    )
    _mount(server, config, lifespan.get_tools)
    return server, glue
