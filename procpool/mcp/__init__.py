"""procpool's pool tools over MCP, in three layers (see docs/mcp.md):

    procpool.mcp.config       the operator's allow-lists (handlers, Dask addresses), limits, flag parsers
    procpool.mcp.tools        what each tool does, its checks per call; no MCP SDK import
    procpool.mcp.server       mounting the tools on a server (one error decorator); build_server;
                              glue per SDK generation in _sdk1 (mcp 1.x) and _sdk2 (mcp 2.x)
    procpool.mcp.transports   stdio and streamable HTTP, signals, the ``procpool mcp`` command

[`register_pool_tools`][procpool.mcp.server.register_pool_tools] mounts the nine tools on a
host's own server: the SDK's ``FastMCP`` (mcp 1.x), ``MCPServer`` (mcp 2.x), or the ``fastmcp``
package's ``FastMCP`` (3.x, 4.x).
"""

from procpool.mcp.config import BUILTIN_HANDLERS, ServerConfig, parse_dask_address, parse_handler, parse_http
from procpool.mcp.server import build_server, register_pool_tools
from procpool.mcp.tools import PoolTools, RequestRefused

__all__ = (
    "BUILTIN_HANDLERS",
    "PoolTools",
    "RequestRefused",
    "ServerConfig",
    "build_server",
    "parse_dask_address",
    "parse_handler",
    "parse_http",
    "register_pool_tools",
)
