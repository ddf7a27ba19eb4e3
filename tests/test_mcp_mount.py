"""register_pool_tools on every kind of MCP server, and `procpool mcp` over stdio, under either MCP SDK generation.

These use only client APIs that mcp 1.x and 2.x share, so CI runs them in a venv of each (.ci/run):
the SDK's own server class (FastMCP on 1.x, MCPServer on 2.x) and the fastmcp package's FastMCP
(3.x beside mcp 1.x, 4.x beside mcp 2.x), each called through a real in-process client.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from helpers import assert_gone

from procpool import PoolManager
from procpool.mcp import register_pool_tools

mcp = pytest.importorskip("mcp", reason="the mcp extra is not installed")

pytestmark = pytest.mark.anyio

MCP_MAJOR = int(importlib.metadata.version("mcp").split(".")[0])
TOOLS = {
    "create_pool",
    "execute_on_pool",
    "execute_batch_on_pool",
    "route_to_pool",
    "list_pools",
    "get_pool_status",
    "check_pool_health",
    "delete_pool",
    "get_pool_manager_status",
}

# What a test calls: (tool, arguments) -> (is_error, structured result or None, first text).
Call = Callable[[str, dict[str, Any]], Awaitable[tuple[bool, Any, str]]]


def _unpack(result: Any) -> tuple[bool, Any, str]:
    """An SDK's or fastmcp's tool result as (is_error, structured content, first text)."""
    is_error = getattr(result, "is_error", None)
    if is_error is None:
        is_error = result.isError
    structured = getattr(result, "structured_content", None)
    if structured is None:
        structured = getattr(result, "structuredContent", None)
    text = result.content[0].text if result.content else ""
    return bool(is_error), structured, text


def _sdk_server() -> Any:
    """The installed SDK generation's own server class, as a host would create it."""
    if MCP_MAJOR >= 2:
        from mcp.server import MCPServer

        return MCPServer("host")
    from mcp.server.fastmcp import FastMCP

    return FastMCP("host")


@contextlib.asynccontextmanager
async def _sdk_client(server: Any) -> AsyncIterator[Call]:
    if MCP_MAJOR >= 2:
        from mcp import Client

        async with Client(server) as client:

            async def call(tool: str, args: dict[str, Any]) -> tuple[bool, Any, str]:
                return _unpack(await client.call_tool(tool, args))

            call.tools = {t.name for t in (await client.list_tools()).tools}  # type: ignore[attr-defined]
            yield call
        return
    from mcp.shared.memory import create_connected_server_and_client_session

    async with create_connected_server_and_client_session(server._mcp_server) as session:

        async def call(tool: str, args: dict[str, Any]) -> tuple[bool, Any, str]:
            return _unpack(await session.call_tool(tool, args))

        call.tools = {t.name for t in (await session.list_tools()).tools}  # type: ignore[attr-defined]
        yield call


@contextlib.asynccontextmanager
async def _fastmcp_client(server: Any) -> AsyncIterator[Call]:
    import fastmcp

    async with fastmcp.Client(server) as client:

        async def call(tool: str, args: dict[str, Any]) -> tuple[bool, Any, str]:
            return _unpack(await client.call_tool(tool, args, raise_on_error=False))

        call.tools = {t.name for t in await client.list_tools()}  # type: ignore[attr-defined]
        yield call


def _fastmcp_server() -> Any:
    fastmcp = pytest.importorskip("fastmcp", reason="the fastmcp package is not installed")
    return fastmcp.FastMCP("host")


KINDS = {
    "sdk": (_sdk_server, _sdk_client),
    "fastmcp": (_fastmcp_server, _fastmcp_client),
}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_the_tools_mount_on_a_hosts_server(kind):
    """The nine tools mount on the host's server and run real pools, with the allow-list and limits enforced."""
    make_server, connect = KINDS[kind]
    server = make_server()
    manager = PoolManager()
    tools = register_pool_tools(server, manager, handlers=["echo"], limits={"max_pools": 1, "max_batch": 2})
    pids: list[int] = []
    try:
        async with connect(server) as call:
            assert call.tools >= TOOLS  # type: ignore[attr-defined]
            error, created, _ = await call("create_pool", {"pool_id": "p"})
            assert not error and created["handler"] == "echo", created
            pids = [w.pid for w in manager.get_pool("p").workers]
            error, result, _ = await call("execute_on_pool", {"pool_id": "p", "prompt": "hi", "context": {"k": 1}})
            assert not error and result["result"]["prompt"] == "hi" and result["result"]["pid"] in pids, result
            assert result["worker_id"].startswith("p-w")
            error, _, text = await call("create_pool", {"pool_id": "q"})
            assert error and "--max-pools" in text and "\n" not in text
            error, _, text = await call("create_pool", {"handler": "command"})
            assert error and "command" in text
            error, _, text = await call("execute_batch_on_pool", {"pool_id": "p", "prompts": ["a", "b", "c"]})
            assert error and "\n" not in text
            error, status, _ = await call("get_pool_manager_status", {})
            assert not error and status["handlers"] == {"echo": "procpool.handlers:echo"}, status
            error, deleted, _ = await call("delete_pool", {"pool_id": "p"})
            assert not error and deleted["deleted"] is True
    finally:
        await tools.manager.stop()
    assert_gone(pids)


def test_a_server_of_another_kind_is_refused():
    """register_pool_tools names the three server kinds it mounts on when given something else."""
    with pytest.raises(TypeError, match="FastMCP"):
        register_pool_tools(object())


async def test_procpool_mcp_serves_over_stdio():
    """`python -m procpool mcp` answers the SDK's stdio client: tools listed, a pool created and run, then gone."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(command=sys.executable, args=["-m", "procpool", "mcp", "--handler", "echo"])
    async with stdio_client(params) as streams, ClientSession(*streams) as session:
        await session.initialize()
        assert {t.name for t in (await session.list_tools()).tools} >= TOOLS
        error, created, _ = _unpack(await session.call_tool("create_pool", {"pool_id": "s"}))
        assert not error, created
        error, result, _ = _unpack(await session.call_tool("execute_on_pool", {"pool_id": "s", "prompt": "over stdio"}))
        assert not error and result["result"]["prompt"] == "over stdio", result
        error, status, _ = _unpack(await session.call_tool("get_pool_status", {"pool_id": "s"}))
        pids = [w["pid"] for w in status["workers"]]
    assert_gone(pids)  # the server stopped its pools when the client went away
