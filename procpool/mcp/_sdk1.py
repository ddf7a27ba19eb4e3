"""Glue for the MCP Python SDK 1.x (>= 1.24): its ``FastMCP`` server class."""

from __future__ import annotations

from typing import Any

from mcp.server.fastmcp import FastMCP
from mcp.server.fastmcp.exceptions import ToolError

__all__ = ("ToolError", "new_server", "serve_http")


def new_server(name: str, version: str, instructions: str, lifespan: Any, log_level: str) -> FastMCP:
    """A 1.x server (it has no version field; the version is in the instructions' first line)."""
    del version
    return FastMCP(name, instructions=instructions, lifespan=lifespan, log_level=log_level)  # type: ignore[arg-type]


async def serve_http(server: FastMCP, host: str, port: int) -> None:
    """Serve streamable HTTP at http://host:port/mcp until the process is told to stop."""
    server.settings.host = host
    server.settings.port = port
    await server.run_streamable_http_async()
