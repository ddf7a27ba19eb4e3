"""Serving the pool tools: stdio or streamable HTTP, and the signals that end a server.

The ``procpool mcp`` command (procpool/cli/mcp.py) serves the tools ``create_pool``, ``execute_on_pool``,
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
import os
import signal
import sys
from typing import Any

from procpool.mcp.config import (
    ServerConfig,
)
from procpool.mcp.server import _build, _Lifespan
from procpool.mcp.tools import SHUTDOWN_GRACE

__all__ = ("run", "serve")

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
