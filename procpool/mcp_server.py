"""The MCP server's former single module, kept so existing imports work: the code is in ``procpool.mcp``.

``procpool.mcp.tools`` holds the tools' logic (no SDK import), ``procpool.mcp.server`` mounts
them on a server of either MCP SDK generation, ``procpool.mcp.transports`` serves them.
"""

from procpool.cli.mcp import mcp as mcp_command
from procpool.mcp.server import build_server, register_pool_tools
from procpool.mcp.tools import (
    BUILTIN_HANDLERS,
    COMMAND_HANDLER,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_POOLS,
    DEFAULT_MAX_PROMPT_BYTES,
    DEFAULT_MAX_TIMEOUT,
    MAX_ERROR_CHARS,
    SELECTORS,
    SHUTDOWN_GRACE,
    PoolTools,
    RequestRefused,
    ServerConfig,
    parse_handler,
    parse_http,
)
from procpool.mcp.transports import run, serve

__all__ = (
    "BUILTIN_HANDLERS",
    "COMMAND_HANDLER",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_POOLS",
    "DEFAULT_MAX_PROMPT_BYTES",
    "DEFAULT_MAX_TIMEOUT",
    "MAX_ERROR_CHARS",
    "SELECTORS",
    "SHUTDOWN_GRACE",
    "PoolTools",
    "RequestRefused",
    "ServerConfig",
    "build_server",
    "mcp_command",
    "parse_handler",
    "parse_http",
    "register_pool_tools",
    "run",
    "serve",
)

if __name__ == "__main__":
    mcp_command()
