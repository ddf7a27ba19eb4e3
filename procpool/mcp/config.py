"""How an MCP server is configured: the operator's allow-lists (handlers, Dask clusters) and limits.

[`ServerConfig`][procpool.mcp.config.ServerConfig] holds what ``procpool mcp``'s flags say (or
what a host passes to ``register_pool_tools``); the parsers here read one flag value each. No MCP
SDK import: the command line reads its flags with this module alone. The tools' logic, which
enforces all of it per call, is ``procpool.mcp.tools``.
"""

# No ``from __future__ import annotations``: ``Limits`` is nested in a tool's result type, and
# the SDKs read those with ``inspect.signature(eval_str=True)``.

import ipaddress
import math
import pkgutil
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

try:
    # pydantic (which the SDK uses to build output schemas) accepts only typing_extensions'
    # TypedDict on Python < 3.12 when TypedDicts nest. It is always there when mcp is installed.
    from typing_extensions import TypedDict
except ImportError:  # pragma: no cover - a cli-only install, which never builds a server
    from typing import TypedDict

__all__ = (
    "BUILTIN_HANDLERS",
    "COMMAND_HANDLER",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_POOLS",
    "DEFAULT_MAX_PROMPT_BYTES",
    "DEFAULT_MAX_TIMEOUT",
    "Limits",
    "ServerConfig",
    "parse_dask_address",
    "parse_handler",
    "parse_http",
)

# Built-in handlers an operator may allow by name alone (``--handler echo``). ``command`` runs a
# shell command line per prompt: allowing it hands the agent a shell, so it is never implied.
BUILTIN_HANDLERS: Mapping[str, str] = {
    "echo": "procpool.handlers:echo",
    "command": "procpool.handlers:command",
}
# The handler that runs prompts as shell commands; route_to_pool avoids its pools by default.
COMMAND_HANDLER = BUILTIN_HANDLERS["command"]
# Default limits. Pools: each is three processes, so 16 pools is 48 workers, plenty for one
# machine. A prompt of 1 MiB is far beyond any instruction text yet cheap to pickle to a worker;
# a batch may still carry up to 1,000 of them on stdio (over HTTP the SDK caps a request at
# 4 MiB). Timeout: one hour; every task gets one (it is also the default), so no tool call can
# wait forever.
DEFAULT_MAX_POOLS = 16
DEFAULT_MAX_PROMPT_BYTES = 1 << 20
DEFAULT_MAX_BATCH = 1000
DEFAULT_MAX_TIMEOUT = 3600.0
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}\Z")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Schemes of a Dask scheduler address the server may be allowed to reach (plain or TLS TCP).
_DASK_SCHEMES = ("tcp", "tls")


def parse_handler(spec: str) -> tuple[str, str]:
    """Read one ``--handler`` value: ``NAME=package.module:function`` or a built-in's name.

    The function is imported now, so a typo stops the server at start rather than on the
    agent's first ``create_pool``.

    Returns:
        ``(name, "package.module:function")``.

    Raises:
        ValueError: malformed, unknown built-in, or the function cannot be imported.
    """
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep:
        if name not in BUILTIN_HANDLERS:
            raise ValueError(
                f"{spec!r} is not a built-in handler (built-ins: {', '.join(sorted(BUILTIN_HANDLERS))}); "
                "allow your own as NAME=package.module:function"
            )
        return name, BUILTIN_HANDLERS[name]
    path = path.strip()
    if not _NAME.match(name):
        raise ValueError(f"handler name {name!r} must be a letter then up to 63 letters, digits, '_', '.' or '-'")
    if path.count(":") != 1 or not all(path.split(":")):
        raise ValueError(f"handler {name!r} must point at 'package.module:function', got {path!r}")
    try:
        fn = pkgutil.resolve_name(path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"handler {name}={path} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"handler {name}={path} is not callable")
    return name, path


def parse_http(spec: str) -> tuple[str, int]:
    """Read ``--http HOST:PORT``; HOST must be a loopback address (the server has no auth).

    Raises:
        ValueError: malformed, not loopback, or a port outside 1-65535.
    """
    host, sep, port_text = spec.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, such as 127.0.0.1:8765, got {spec!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"{host!r} is not a loopback address; the server has no authentication, so it listens "
                "only on 127.0.0.1, ::1 or localhost"
            )
    return host, port


def _positive(name: str, value: Any, integer: bool) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
        or not value > 0
        or math.isinf(value)
    ):
        raise ValueError(f"{name} must be a positive, finite {'integer' if integer else 'number'}, got {value!r}")


def parse_dask_address(spec: str) -> str:
    """Read one ``--dask-address`` value: a Dask scheduler as ``tcp://HOST:PORT`` or ``tls://HOST:PORT``.

    Only the address is checked here; whether a scheduler answers there is found when a pool
    is created on it (``BrokenPool`` then).

    Raises:
        ValueError: another scheme, no host, or a port outside 1-65535.
    """
    address = spec.strip()
    scheme, sep, rest = address.partition("://")
    host, colon, port_text = rest.rpartition(":")
    if not sep or scheme not in _DASK_SCHEMES or not colon or not host.strip("[]") or not port_text.isdigit():
        raise ValueError(f"a Dask scheduler address looks like tcp://HOST:PORT or tls://HOST:PORT, got {spec!r}")
    if not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port_text} in {spec!r}")
    return address


def _handler_dict(handlers: Mapping[str, str]) -> dict[str, str]:
    return dict(handlers)


def _dask_tuple(addresses: Iterable[str]) -> tuple[str, ...]:
    """The allowed addresses, checked, once each, in the order given (a lone string is one address)."""
    return tuple(
        dict.fromkeys(parse_dask_address(a) for a in ([addresses] if isinstance(addresses, str) else addresses))
    )


@attrs.frozen
class ServerConfig:
    """How the server was started: its handler and Dask-cluster allow-lists, limits and transport.

    Args:
        handlers: allowed handler names and their ``package.module:function`` paths (at least one).
        http: ``(host, port)`` to serve streamable HTTP on a loopback address; None for stdio.
        max_pools: most pools alive at once.
        max_prompt_bytes: largest prompt, and largest context as JSON, in UTF-8 bytes.
        max_batch: most prompts in one ``execute_batch_on_pool``.
        max_timeout: longest task timeout in seconds; also every task's default.
        log_level: the root logger's level; None keeps the level already set (``procpool
            --log-level``), or WARNING when logging is not configured yet. Logs go to stderr.
        allow_route_to_command: let ``route_to_pool`` choose pools of the shell ``command``
            handler (``procpool.handlers:command``, under any name). Off by default: an agent
            that routes a prompt could otherwise have it run as a shell command line.
            ``execute_on_pool`` on such a pool, by its id, is allowed either way.
        dask_addresses: the Dask schedulers (``tcp://HOST:PORT``) an agent may create pools on
            (``create_pool(backend="dask")``); empty (the default) allows none. The agent only
            ever picks one of these: it never names a cluster of its own.
    """

    handlers: Mapping[str, str] = attrs.field(converter=_handler_dict)
    http: tuple[str, int] | None = None
    max_pools: int = DEFAULT_MAX_POOLS
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    max_timeout: float = DEFAULT_MAX_TIMEOUT
    log_level: str | None = None
    allow_route_to_command: bool = attrs.field(default=False, kw_only=True)
    dask_addresses: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=_dask_tuple)

    def __attrs_post_init__(self) -> None:
        if not self.handlers:
            raise ValueError("allow at least one handler, e.g. --handler echo or --handler NAME=module:function")
        for name, path in self.handlers.items():
            parse_handler(f"{name}={path}")
        if self.http is not None:
            parse_http(f"{self.http[0]}:{self.http[1]}")
        _positive("max_pools", self.max_pools, integer=True)
        _positive("max_prompt_bytes", self.max_prompt_bytes, integer=True)
        _positive("max_batch", self.max_batch, integer=True)
        _positive("max_timeout", self.max_timeout, integer=False)
        if self.log_level is not None and self.log_level.upper() not in _LEVELS:
            raise ValueError(f"unknown log level {self.log_level!r}")
        if not isinstance(self.allow_route_to_command, bool):
            raise ValueError(f"allow_route_to_command must be True or False, got {self.allow_route_to_command!r}")

    def limits(self) -> "Limits":
        """The limits, as ``get_pool_manager_status`` reports them."""
        return {
            "max_pools": self.max_pools,
            "max_prompt_bytes": self.max_prompt_bytes,
            "max_batch": self.max_batch,
            "max_timeout": float(self.max_timeout),
        }


class Limits(TypedDict):
    """The limits the server enforces on every call."""

    max_pools: int
    max_prompt_bytes: int
    max_batch: int
    max_timeout: float
