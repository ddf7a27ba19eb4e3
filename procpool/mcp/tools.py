"""The pool tools' logic, with no MCP SDK import: the checks per call, the allow-lists, the results.

[`PoolTools`][procpool.mcp.tools.PoolTools] does what each of the nine tools does, on one
[`PoolManager`][procpool.PoolManager]; [`ServerConfig`][procpool.mcp.config.ServerConfig]
(``procpool.mcp.config``, re-exported here) holds the allow-lists and the limits.
``procpool.mcp.server`` mounts the tools on an MCP server of either SDK generation;
``procpool.mcp.transports`` serves them (``procpool mcp``).

Safety model: an agent sends data, never code. Which functions a pool may run is fixed by whoever
starts the server (``--handler NAME=module:function``, or a built-in by name); ``create_pool``
picks one of those by NAME. Every request is held to limits (pools, prompt bytes, batch size,
timeout), and every task runs under a timeout, so no call waits forever. Failures come back as
one-line tool errors; the server keeps running, even when a task raises ``SystemExit`` or
``KeyboardInterrupt`` (that is the task's failure, not the server's). ``route_to_pool`` sends a
prompt only to pools of the handler it names (required once the pools run several handlers), and
never to a pool of the shell ``command`` handler unless the operator allowed it
(``--allow-route-to-command``): an agent that routes must not land in a shell by rotation.
A pool on a Dask cluster (``create_pool(backend="dask")``) goes only to a scheduler the operator
listed (``--dask-address``): an agent picks among those, it never names an address of its own,
since a Dask scheduler runs whatever code its clients send (issue 14).
"""

# No ``from __future__ import annotations``: the SDKs read the tools' result types (these
# TypedDicts) with ``inspect.signature(eval_str=True)``.

import asyncio
import json
import logging
import math
import re
import time
from typing import Any, Literal

from procpool import PoolLike, PoolManager, TaskReport
from procpool.errors import task_error
from procpool.mcp.config import (
    BUILTIN_HANDLERS,
    COMMAND_HANDLER,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_POOLS,
    DEFAULT_MAX_PROMPT_BYTES,
    DEFAULT_MAX_TIMEOUT,
    Limits,
    ServerConfig,
    parse_dask_address,
    parse_handler,
    parse_http,
)

try:
    # pydantic (which the SDK uses to build output schemas) accepts only typing_extensions'
    # TypedDict on Python < 3.12 when TypedDicts nest. It is always there when mcp is installed.
    from typing_extensions import TypedDict
except ImportError:  # pragma: no cover - a cli-only install, which never builds a server
    from typing import TypedDict

__all__ = (
    "BACKENDS",
    "BUILTIN_HANDLERS",
    "COMMAND_HANDLER",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_POOLS",
    "DEFAULT_MAX_PROMPT_BYTES",
    "DEFAULT_MAX_TIMEOUT",
    "SELECTORS",
    "SHUTDOWN_GRACE",
    "PoolTools",
    "RequestRefused",
    "ServerConfig",
    "parse_dask_address",
    "parse_handler",
    "parse_http",
)

log = logging.getLogger("procpool.mcp")

# How long delete_pool and server shutdown let running tasks finish before killing them.
SHUTDOWN_GRACE = 5.0
# Longest error text sent back to a client; a remote traceback can be pages long.
MAX_ERROR_CHARS = 500

_POOL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# A tag (create_pool's tags, route_to_pool's requires), and how many a request may name.
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
MAX_TAGS = 16


# Priorities an agent may ask for (higher runs first).
MAX_PRIORITY = 1000
SELECTORS = ("least_loaded", "round_robin", "random")
# The pool kinds create_pool offers: three processes of the server's host, or three workers of a
# Dask cluster the operator allowed.
BACKENDS = ("local", "dask")


class RequestRefused(ValueError):
    """A tool call broke a limit or an allow-list (handlers, Dask addresses); nothing was run."""


# -- results: the tools' output schemas ------------------------------------------------------------


class WorkerRef(TypedDict):
    """One worker process of a pool."""

    worker_id: str
    pid: int | None


class PoolCreated(TypedDict):
    """A pool the server created; its three workers are running (on the Dask cluster at ``address``
    for a ``dask`` pool, whose pids are on that cluster's hosts)."""

    pool_id: str
    handler: str
    backend: str
    address: str | None
    state: str
    tags: list[str]
    workers: list[WorkerRef]


class TaskResult(TypedDict):
    """A prompt's result, and which pool, task and worker produced it in how many seconds."""

    pool_id: str
    task_id: int
    worker_id: str | None
    worker_pid: int | None
    duration: float
    result: Any


class RoutedResult(TaskResult):
    """A routed prompt's result; ``pool_id`` is the pool the selector chose, ``handler`` its handler."""

    selector: str
    handler: str


class BatchItem(TypedDict):
    """One prompt of a batch: its result, or the one-line error it failed with."""

    index: int
    status: Literal["completed", "failed"]
    task_id: int
    worker_id: str | None
    worker_pid: int | None
    duration: float
    result: Any
    error: str | None


class BatchResult(TypedDict):
    """Every prompt of a batch, in input order; one failure does not stop the others."""

    pool_id: str
    total: int
    completed: int
    failed: int
    results: list[BatchItem]


class PoolSummary(TypedDict):
    """One pool in ``list_pools``; ``load`` is tasks queued plus tasks held by workers."""

    pool_id: str
    handler: str
    backend: str
    state: str
    health: str
    load: int
    tasks_completed: int
    tasks_failed: int


class PoolList(TypedDict):
    """The server's pools."""

    count: int
    max_pools: int
    pools: list[PoolSummary]


class PoolDeleted(TypedDict):
    """A pool that was shut down; ``worker_pids`` are the processes that were stopped (none for a
    ``dask`` pool: its workers belong to the cluster, which keeps them)."""

    pool_id: str
    deleted: bool
    worker_pids: list[int]


class ManagerStatus(TypedDict):
    """Health of every pool, the allowed handlers and Dask addresses, and the limits.

    ``status`` is healthy (every pool healthy), degraded (some pool can take work, not all are
    healthy) or unhealthy (no pool can take work, or there is none).
    """

    status: str
    pools_total: int
    pools_healthy: int
    pools_degraded: int
    pool_details: list[dict[str, Any]]
    handlers: dict[str, str]
    dask_addresses: list[str]
    limits: Limits


# -- routing --------------------------------------------------------------------------------------


def _choose_pool(manager: PoolManager, selector: str, handler: str, requires: list[str] | None = None) -> PoolLike:
    """The pool ``selector`` picks among the pools of ``handler``, as ``PoolManager.route_task`` would.

    route_task returns only the handler's value, and the tool must report the task's id, worker
    and duration, so the tool picks the pool here and runs ``execute_detailed`` on it itself.
    """
    return manager.choose_pool(selector, handler=handler, requires=requires)


def _callers_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is this task being cancelled, rather than a task's own CancelledError."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    current = asyncio.current_task()
    return current is None or current.cancelling() > 0


async def _execute(
    pool: PoolLike, prompt: str, context: dict[str, Any] | None, timeout: float | None, priority: int = 0
) -> TaskReport:
    """``pool.execute_detailed``, with a task's SystemExit, KeyboardInterrupt or the like as its failure.

    Such an exception, re-raised here and let out of this coroutine, would end the server's event
    loop (issue 9: an MCP handler calling ``sys.exit(3)`` killed the server and every pool). The
    core carries them as TaskExited now or soon; this keeps the server safe either way.
    """
    started = time.monotonic()
    try:
        options: dict[str, Any] = {"priority": priority} if priority else {}
        return await pool.execute_detailed(prompt, context, timeout, **options)
    except Exception:
        raise
    except BaseException as exc:
        if _callers_cancellation(exc):
            raise
        log.debug("task on pool %s raised %s", pool.pool_id, type(exc).__name__, exc_info=True)
        # The pool did not say which task or worker it was: -1 and None say so.
        return TaskReport(
            task_id=-1,
            pool_id=pool.pool_id,
            worker_id=None,
            pid=None,
            status="failed",
            result=None,
            error=task_error(exc),
            duration=time.monotonic() - started,
        )


def _json_ready(value: Any) -> Any:
    """Check that a handler's result can travel as JSON (MCP carries nothing else)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"the handler returned a {type(value).__name__} that is not JSON data ({exc}); "
            "handlers served over MCP must return JSON-compatible values"
        ) from None
    return value


def _one_line(exc: BaseException) -> str:
    """A short, single-line description of an error for a client to read."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not isinstance(exc, RequestRefused):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


# -- the tools' logic ------------------------------------------------------------------------------


class PoolTools:
    """What each MCP tool does, on one PoolManager, with the server's allow-list and limits.

    Plain dicts out; ``RequestRefused``/``ValueError``/``TypeError`` for bad requests and procpool's
    own errors otherwise. The MCP layer turns every exception into a one-line tool error.
    """

    def __init__(self, config: ServerConfig, manager: PoolManager) -> None:
        self.config = config
        self.manager = manager
        # Handler name of each pool this server created (the pool itself knows only the path).
        self._handler_names: dict[str, str] = {}
        # The Dask scheduler of each pool this server created on a cluster (local pools: absent).
        self._dask_addresses: dict[str, str] = {}
        # Makes "count the pools, then create one" atomic, so concurrent calls respect max_pools.
        self._create_lock = asyncio.Lock()

    # -- checks ------------------------------------------------------------------------------

    def _pick_handler(self, handler: str | None) -> str:
        allowed = self.config.handlers
        if handler is None:
            if len(allowed) == 1:
                return next(iter(allowed))
            raise RequestRefused(f"name a handler; allowed: {', '.join(sorted(allowed))}")
        if handler not in allowed:
            raise RequestRefused(f"handler {handler!r} is not allowed here; allowed: {', '.join(sorted(allowed))}")
        return handler

    def _pick_address(self, backend: str, address: str | None) -> str | None:
        """The Dask scheduler a new pool goes to (None for a local pool): only one the operator listed."""
        if backend not in BACKENDS:
            raise RequestRefused(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        allowed = self.config.dask_addresses
        if backend == "local":
            if address is not None:
                raise RequestRefused("address is for backend 'dask'; a local pool runs on the server's host")
            return None
        if not allowed:
            raise RequestRefused(
                "this server allows no Dask cluster; its operator can allow one with --dask-address tcp://HOST:PORT"
            )
        if address is None:
            if len(allowed) == 1:
                return allowed[0]
            raise RequestRefused(f"name a Dask address; allowed: {', '.join(allowed)}")
        if address not in allowed:
            # Never reached, not even to check it: a scheduler runs whatever its clients send.
            raise RequestRefused(
                f"Dask address {address!r} is not allowed here; allowed: {', '.join(allowed)} (--dask-address)"
            )
        return address

    def _check_prompt(self, prompt: str, what: str = "prompt") -> None:
        size = len(prompt.encode("utf-8", "surrogatepass"))
        if size > self.config.max_prompt_bytes:
            raise RequestRefused(
                f"{what} is {size} bytes; the limit is {self.config.max_prompt_bytes} (--max-prompt-bytes)"
            )

    def _check_context(self, context: dict[str, Any] | None) -> None:
        if context is None:
            return
        try:
            text = json.dumps(context, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise RequestRefused(f"context must be a JSON object: {exc}") from None
        self._check_prompt(text, "context (as JSON)")

    def _check_priority(self, priority: int) -> int:
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_PRIORITY:
            raise RequestRefused(f"priority must be an integer from -{MAX_PRIORITY} to {MAX_PRIORITY}: {priority!r}")
        return priority

    def _check_tags(self, tags: list[str] | None, what: str) -> list[str] | None:
        if tags is not None and not (
            isinstance(tags, list) and len(tags) <= MAX_TAGS and all(isinstance(t, str) and _TAG.match(t) for t in tags)
        ):
            raise RequestRefused(f"{what} must be a list of at most {MAX_TAGS} tags of 1-32 letters, digits, _ . -")
        return tags

    def _check_timeout(self, timeout: float | None) -> float | None:
        if timeout is None:
            return None
        limit = self.config.max_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
            raise RequestRefused(
                f"timeout must be a finite number of seconds, more than 0 and at most {limit:g} (--max-timeout), "
                f"got {timeout!r}"
            )
        if not 0 < timeout <= limit:
            raise RequestRefused(
                f"timeout must be more than 0 and at most {limit:g} seconds (--max-timeout), got {timeout!r}"
            )
        return float(timeout)

    def _route_handler(self, handler: str | None) -> str:
        """The handler path route_to_pool may send a prompt to: the one named, or the only one
        among the server's pools (pools of the shell ``command`` handler count only if allowed)."""
        allowed = self.config.handlers
        shell_ok = self.config.allow_route_to_command
        if handler is not None:
            if handler not in allowed:
                raise RequestRefused(f"handler {handler!r} is not allowed here; allowed: {', '.join(sorted(allowed))}")
            if allowed[handler] == COMMAND_HANDLER and not shell_ok:
                raise RequestRefused(
                    f"route_to_pool does not send prompts to {handler!r} pools, which run them as shell commands; "
                    "this server was started without --allow-route-to-command (execute_on_pool with the pool's id "
                    "still works)"
                )
            return allowed[handler]
        names = set(self._handler_names.values())
        routable = {n for n in names if shell_ok or allowed[n] != COMMAND_HANDLER}
        paths = {allowed[n] for n in routable}
        if len(paths) > 1:
            raise RequestRefused(
                f"name a handler: the pools run several ({', '.join(sorted(routable))}), and a prompt is meant for one"
            )
        if not paths:
            if names:
                raise RequestRefused(
                    "no pool route_to_pool may use: the only pools run shell commands (handler "
                    f"{', '.join(sorted(names))}) and this server was started without --allow-route-to-command"
                )
            raise RequestRefused("there is no pool to route to; create one with create_pool")
        return paths.pop()

    def _pool(self, pool_id: str) -> PoolLike:
        return self.manager.get_pool(pool_id)

    def pools(self) -> list[PoolLike]:
        """The pools this server created and has not deleted."""
        return [self.manager.get_pool(pool_id) for pool_id in self._handler_names]

    def _result(self, report: TaskReport) -> TaskResult:
        if report.error is not None:
            raise report.error
        return {
            "pool_id": report.pool_id,
            "task_id": report.task_id,
            "worker_id": report.worker_id,
            "worker_pid": report.pid,
            "duration": report.duration,
            "result": _json_ready(report.result),
        }

    # -- tools ---------------------------------------------------------------------------------

    async def create_pool(
        self,
        pool_id: str | None = None,
        handler: str | None = None,
        backend: str = "local",
        address: str | None = None,
        tags: list[str] | None = None,
    ) -> PoolCreated:
        name = self._pick_handler(handler)
        address = self._pick_address(backend, address)
        tags = self._check_tags(tags, "tags")
        if tags and backend != "local":
            raise RequestRefused("tags are for local pools; a Dask pool carries none")
        if pool_id is not None and not _POOL_ID.match(pool_id):
            raise RequestRefused(
                f"pool_id {pool_id!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        async with self._create_lock:
            count = len(self._handler_names)
            if count >= self.config.max_pools:
                raise RequestRefused(
                    f"this server already has {count} pools, its limit (--max-pools); delete one first"
                )
            where = {"backend": "dask", "address": address} if address is not None else {"tags": tags or ()}
            pool = await self.manager.create_pool(
                pool_id, handler=self.config.handlers[name], task_timeout=self.config.max_timeout, **where
            )
            self._handler_names[pool.pool_id] = name
            if address is not None:
                self._dask_addresses[pool.pool_id] = address
        log.info("created pool %s with handler %s on %s", pool.pool_id, name, address or "this host")
        return {
            "pool_id": pool.pool_id,
            "handler": name,
            "backend": backend,
            "address": address,
            "state": pool.state.value,
            "tags": sorted(tags or ()),
            "workers": [{"worker_id": w.worker_id, "pid": w.pid} for w in pool.workers],
        }

    async def execute_on_pool(
        self,
        pool_id: str,
        prompt: str,
        context: dict[str, Any] | None = None,
        timeout: float | None = None,
        priority: int = 0,
    ) -> TaskResult:
        self._check_prompt(prompt)
        self._check_context(context)
        timeout = self._check_timeout(timeout)
        priority = self._check_priority(priority)
        pool = self._pool(pool_id)
        return self._result(await _execute(pool, prompt, context, timeout, priority))

    async def execute_batch_on_pool(
        self, pool_id: str, prompts: list[str], context: dict[str, Any] | None = None, timeout: float | None = None
    ) -> BatchResult:
        if not prompts:
            raise RequestRefused("prompts must hold at least one prompt")
        if len(prompts) > self.config.max_batch:
            raise RequestRefused(
                f"the batch has {len(prompts)} prompts; the limit is {self.config.max_batch} (--max-batch)"
            )
        for i, prompt in enumerate(prompts):
            self._check_prompt(prompt, f"prompts[{i}]")
        self._check_context(context)
        timeout = self._check_timeout(timeout)
        pool = self._pool(pool_id)
        reports = await asyncio.gather(*(_execute(pool, p, context, timeout) for p in prompts))
        items: list[BatchItem] = []
        for i, report in enumerate(reports):
            value, error = None, report.error
            if error is None:
                try:
                    value = _json_ready(report.result)
                except TypeError as exc:
                    error = exc
            items.append(
                {
                    "index": i,
                    "status": "failed" if error else "completed",
                    "task_id": report.task_id,
                    "worker_id": report.worker_id,
                    "worker_pid": report.pid,
                    "duration": report.duration,
                    "result": value,
                    "error": None if error is None else _one_line(error),
                }
            )
        failed = sum(item["error"] is not None for item in items)
        return {
            "pool_id": pool.pool_id,
            "total": len(items),
            "completed": len(items) - failed,
            "failed": failed,
            "results": items,
        }

    async def route_to_pool(
        self,
        prompt: str,
        context: dict[str, Any] | None = None,
        selector: str = "least_loaded",
        timeout: float | None = None,
        handler: str | None = None,
        priority: int = 0,
        requires: list[str] | None = None,
    ) -> RoutedResult:
        self._check_prompt(prompt)
        self._check_context(context)
        timeout = self._check_timeout(timeout)
        priority = self._check_priority(priority)
        requires = self._check_tags(requires, "requires")
        pool = _choose_pool(self.manager, selector, self._route_handler(handler), requires)
        result = self._result(await _execute(pool, prompt, context, timeout, priority))
        return {**result, "selector": selector, "handler": self._handler_names.get(pool.pool_id, "")}

    async def list_pools(self) -> PoolList:
        pools: list[PoolSummary] = []
        for status in await self.manager.list_pools():
            pools.append(
                {
                    "pool_id": status["pool_id"],
                    "handler": self._handler_names.get(status["pool_id"], status.get("handler") or ""),
                    "backend": status.get("backend", "local"),
                    "state": status["state"],
                    "health": status["health"],
                    "load": status["queue_size"] + status["tasks_in_flight"],
                    "tasks_completed": status["tasks_completed"],
                    "tasks_failed": status["tasks_failed"],
                }
            )
        return {"count": len(pools), "max_pools": self.config.max_pools, "pools": pools}

    async def get_pool_status(self, pool_id: str) -> dict[str, Any]:
        pool = self._pool(pool_id)
        return {**pool.get_status(), "handler_name": self._handler_names.get(pool.pool_id)}

    async def check_pool_health(self, pool_id: str) -> dict[str, Any]:
        return await self._pool(pool_id).health_check()

    async def delete_pool(self, pool_id: str) -> PoolDeleted:
        pool = self._pool(pool_id)
        on_cluster = pool.pool_id in self._dask_addresses
        # A Dask pool's workers are the cluster's: its shutdown stops its tasks, not them.
        pids = [] if on_cluster else [w.pid for w in pool.workers if w.pid is not None]
        await self.manager.delete_pool(pool.pool_id, timeout=SHUTDOWN_GRACE)
        self._handler_names.pop(pool.pool_id, None)
        self._dask_addresses.pop(pool.pool_id, None)
        log.info("deleted pool %s", pool.pool_id)
        return {"pool_id": pool.pool_id, "deleted": True, "worker_pids": pids}

    async def get_pool_manager_status(self) -> ManagerStatus:
        health = await self.manager.get_health_status()
        return {
            "status": health["status"],
            "pools_total": health["pools_total"],
            "pools_healthy": health["pools_healthy"],
            "pools_degraded": health["pools_degraded"],
            "pool_details": list(health["pool_details"]),
            "handlers": dict(self.config.handlers),
            "dask_addresses": list(self.config.dask_addresses),
            "limits": self.config.limits(),
        }
