"""Glue for the MCP Python SDK 2.x (>= 2.3): its ``MCPServer`` server class."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

__all__ = ("ToolError", "new_server", "serve_http")


def new_server(name: str, version: str, instructions: str, lifespan: Any, log_level: str) -> MCPServer[Any]:
    """A 2.x server."""
    return MCPServer(name, version=version, instructions=instructions, lifespan=lifespan, log_level=log_level)  # type: ignore[arg-type]


async def serve_http(server: MCPServer[Any], host: str, port: int) -> None:
    """Serve streamable HTTP at http://host:port/mcp until the process is told to stop."""
    await server.run_streamable_http_async(host=host, port=port)
