"""How a PoolManager routes a task to one of its pools: selectors, handler and tag filters, priorities.

The routing half of [`PoolManager`][procpool.PoolManager], kept apart so the manager module is
about the pools' lifecycle. Every entry point filters the candidates the same way (running and
routable; with a handler and of ``handler=`` for prompts; carrying every tag of ``requires=``),
runs the selector synchronously over frozen snapshots and submits in the same event-loop step.
``priority=`` and ``retry=`` go to the chosen pool's call unchanged (issue 15).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from procpool import _graph
from procpool._pool import PoolState
from procpool._protocol import PoolLike
from procpool._retry import RetryPolicy
from procpool._selectors import HEALTH_RANK, PoolSnapshot, Selector
from procpool.errors import NoPoolAvailable

__all__ = ("Routing", "check_requires", "pool_tags")


def _has_handler(pool: PoolLike) -> bool:
    """Whether the pool can run prompt tasks (``execute``)."""
    return pool.handler is not None


def _check_handler_arg(handler: Any) -> str | None:
    if handler is not None and not isinstance(handler, str):
        raise TypeError(f"handler must be a 'package.module:function' string or None, not {type(handler).__name__}")
    return handler


def pool_tags(pool: Any) -> frozenset[str]:
    """The tags a pool carries (none for a pool type without tags)."""
    return getattr(pool, "tags", frozenset())


def check_requires(requires: Any) -> frozenset[str]:
    """``requires=`` as a frozenset of tags (a lone string would be a set of its letters: refused)."""
    if requires is None:
        return frozenset()
    if isinstance(requires, str) or not all(isinstance(t, str) for t in requires):
        raise TypeError(f"requires must be a set of tags such as {{'llm'}}, not {requires!r}")
    return frozenset(requires)


class Routing:
    """The routing entry points of a [`PoolManager`][procpool.PoolManager]."""

    # Provided by PoolManager: routable pools in registration order, and the selectors by name.
    _pools: dict[str, Any]
    _selectors: dict[str, Selector]

    def _check_open(self) -> None:
        raise NotImplementedError

    def get_pool(self, pool_id: str) -> PoolLike:
        raise NotImplementedError

    @property
    def selectors(self) -> tuple[str, ...]:
        """Names of the selectors this manager knows."""
        return tuple(self._selectors)

    def register_selector(self, name: str, selector: Selector) -> None:
        """Make ``selector`` usable by name, as in ``route_task(..., selector=name)``.

        Args:
            name: the name to pass as ``selector=``; it must not be taken (the built-in names are).
            selector: a [`Selector`][]: called with the candidates (a sequence of
                [`PoolSnapshot`][]), returns a pool id or None.

        Raises:
            ValueError: the name is taken or empty.
            TypeError: ``selector`` is not callable.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a selector name must be a non-empty string, got {name!r}")
        if not callable(selector):
            raise TypeError(f"selector must be callable, not {type(selector).__name__}")
        if name in self._selectors:
            raise ValueError(f"a selector named {name!r} is already registered")
        self._selectors[name] = selector

    def _resolve_selector(self, selector: str | Selector) -> tuple[str, Selector]:
        if isinstance(selector, str):
            try:
                return selector, self._selectors[selector]
            except KeyError:
                known = ", ".join(repr(n) for n in self._selectors)
                raise ValueError(f"unknown selector {selector!r}; known selectors: {known}") from None
        if callable(selector):
            return getattr(selector, "__name__", repr(selector)), selector
        raise TypeError(f"selector must be a selector name or a callable, not {type(selector).__name__}")

    def _snapshot(self, entry: Any, health: str) -> PoolSnapshot:
        pool = entry.pool
        return PoolSnapshot(
            pool_id=pool.pool_id,
            order=entry.order,
            health=health,
            load=pool.load,
            recent_failures=pool.recent_failures,
            workers_healthy=pool.workers_healthy,
            tags=pool_tags(pool),
        )

    def choose_pool(
        self,
        selector: str | Selector = "least_loaded",
        *,
        needs_handler: bool = False,
        handler: str | None = None,
        requires: Iterable[str] | None = None,
    ) -> PoolLike:
        """The pool ``selector`` picks now, as routing would, for callers that submit themselves.

        Args:
            selector: a built-in selector's name (``"least_loaded"``, ``"round_robin"``,
                ``"random"``), one added with [`register_selector`][], or a [`Selector`][] callable.
            needs_handler: offer only pools that have a prompt handler, and refuse to choose
                between pools of different handlers unless ``handler`` says which (as
                [`route_task`][]).
            handler: offer only pools running this handler (``"package.module:function"``, as
                [`WorkerPool.handler`][procpool.WorkerPool.handler] reports it); implies ``needs_handler``.
            requires: offer only pools carrying every one of these tags.

        Raises:
            NoPoolAvailable: no routable pool (of that handler), or the selector declined them all.
            ValueError: unknown selector; the selector returned a pool it was not offered; or
                ``needs_handler`` without ``handler`` while pools of several handlers exist.
            TypeError: ``handler`` is not a string.
            PoolClosed: the manager is stopped.
        """
        return self._choose(selector, needs_handler=needs_handler, handler=handler, requires=requires)

    def handlers(self) -> tuple[str, ...]:
        """The distinct handlers of the registered pools, in registration order (no ``None``)."""
        return tuple(dict.fromkeys(e.pool.handler for e in self._pools.values() if e.pool.handler is not None))

    def _choose(
        self, selector: str | Selector, *, needs_handler: bool, handler: str | None = None, requires: Any = None
    ) -> PoolLike:
        """Run the selector over the routable pools and return the pool it picks."""
        self._check_open()
        handler = _check_handler_arg(handler)
        required = check_requires(requires)
        name, choose = self._resolve_selector(selector)
        if needs_handler and handler is None:
            # Every registered pool counts, routable now or not, so whether a call without
            # handler= is accepted does not depend on which pools happen to be healthy.
            known = self.handlers()
            if len(known) > 1:
                raise ValueError(
                    f"the pools run {len(known)} different handlers ({', '.join(known)}); pass handler= to "
                    "say which one the prompt is for"
                )
        candidates = []
        skipped = []
        for entry in self._pools.values():
            pool = entry.pool
            health = pool.health
            if pool.state is not PoolState.RUNNING or health not in HEALTH_RANK:
                skipped.append(f"{pool.pool_id} is {pool.state.value if health == 'not_running' else health}")
            elif (needs_handler or handler is not None) and not _has_handler(pool):
                skipped.append(f"{pool.pool_id} has no prompt handler")
            elif handler is not None and pool.handler != handler:
                skipped.append(f"{pool.pool_id} runs {pool.handler}")
            elif not required <= pool_tags(pool):
                skipped.append(f"{pool.pool_id} lacks tag {', '.join(sorted(required - pool_tags(pool)))}")
            else:
                candidates.append(self._snapshot(entry, health))
        if not candidates:
            why = "; ".join(skipped) if skipped else "the manager has no pools (create one with create_pool)"
            raise NoPoolAvailable(f"no pool can take the task: {why}")
        chosen = choose(tuple(candidates))
        if chosen is None:
            raise NoPoolAvailable(f"selector {name!r} declined all {len(candidates)} candidate pools")
        if chosen not in {c.pool_id for c in candidates}:
            raise ValueError(
                f"selector {name!r} returned {chosen!r}, which is not one of the candidate pools "
                f"({', '.join(c.pool_id for c in candidates)})"
            )
        chosen_pool: PoolLike = self._pools[chosen].pool
        return chosen_pool

    async def execute_on_pool(
        self,
        pool_id: str,
        prompt: str,
        context: dict[str, Any] | None = None,
        timeout: float | None = None,
        *,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> Any:
        """Run ``prompt`` on the named pool's handler; return what the handler returns.

        Args:
            pool_id: the pool to run it on.
            prompt: the string handed to the handler.
            context: the dict handed to the handler with it (default: empty).
            timeout: run-time limit in seconds (default: the pool's ``task_timeout``).
            priority: higher runs first in the pool (default 0). retry: a [`RetryPolicy`][procpool.RetryPolicy].

        Raises:
            PoolNotFound: no such pool.
            Exception: otherwise whatever [`WorkerPool.execute`][procpool.WorkerPool.execute] raises.
        """
        return await self.get_pool(pool_id).execute(prompt, context, timeout, priority=priority, retry=retry)

    async def route_task(
        self,
        prompt: str,
        context: dict[str, Any] | None = None,
        selector: str | Selector = "least_loaded",
        timeout: float | None = None,
        *,
        handler: str | None = None,
        requires: Iterable[str] | None = None,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> tuple[str, Any]:
        """Run ``prompt`` on the pool the selector picks among the pools that have a handler.

        A prompt is meant for one handler, so when the manager's pools run different handlers,
        ``handler`` must say which: routing never sends a prompt to a handler it was not meant for.

        Args:
            prompt: the string handed to the handler.
            context: the dict handed to the handler with it (default: empty).
            selector: a built-in selector's name (``"least_loaded"``, ``"round_robin"``,
                ``"random"``), one added with [`register_selector`][], or a [`Selector`][] callable.
            timeout: run-time limit in seconds (default: the chosen pool's ``task_timeout``).
            handler: route only to pools running this handler (``"package.module:function"``,
                as [`WorkerPool.handler`][procpool.WorkerPool.handler] reports it). Required when the registered pools
                run more than one handler.
            requires: route only to pools carrying every one of these tags (``{"llm"}``).
            priority: higher runs first in the chosen pool (default 0).
            retry: a [`RetryPolicy`][procpool.RetryPolicy] (default: the chosen pool's).

        Returns:
            ``(pool_id, result)``.

        Raises:
            NoPoolAvailable: no running pool with a handler (of ``handler``, when given), or the
                selector declined them all.
            ValueError: unknown selector (the message lists the known ones), or no ``handler``
                while the registered pools run several handlers (the message lists them).
            TypeError: ``handler`` is not a string.
            Exception: otherwise whatever [`WorkerPool.execute`][procpool.WorkerPool.execute] raises.
        """
        pool = self._choose(selector, needs_handler=True, handler=handler, requires=requires)
        return pool.pool_id, await pool.execute(prompt, context, timeout, priority=priority, retry=retry)

    async def route_apply(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any] = (),
        kwds: dict[str, Any] | None = None,
        selector: str | Selector = "least_loaded",
        timeout: float | None = None,
        *,
        requires: Iterable[str] | None = None,
        priority: int = 0,
        retry: RetryPolicy | None = None,
    ) -> tuple[str, Any]:
        """Run ``fn(*args, **kwds)`` on the pool the selector picks.

        Args:
            fn: a module-level function (plain or ``async def``), so workers can import it.
            args: its positional arguments.
            kwds: its keyword arguments.
            selector: a built-in selector's name (``"least_loaded"``, ``"round_robin"``,
                ``"random"``), one added with [`register_selector`][], or a [`Selector`][] callable.
            timeout: run-time limit in seconds (default: the chosen pool's ``task_timeout``).
            requires: route only to pools carrying every one of these tags.
            priority: higher runs first in the chosen pool (default 0).
            retry: a [`RetryPolicy`][procpool.RetryPolicy] (default: the chosen pool's).

        Returns:
            ``(pool_id, result)``.

        Raises:
            NoPoolAvailable: no running pool (of those tags), or the selector declined them all.
            ValueError: unknown selector (the message lists the known ones).
            Exception: otherwise whatever [`WorkerPool.apply`][procpool.WorkerPool.apply] raises.
        """
        pool = self._choose(selector, needs_handler=False, requires=requires)
        return pool.pool_id, await pool.apply(fn, args, kwds, timeout, priority=priority, retry=retry)

    def submit(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        selector: str | Selector = "least_loaded",
        requires: Iterable[str] | None = None,
        priority: int = 0,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> tuple[str, asyncio.Future[Any]]:
        """Submit ``fn(*args, **kwargs)`` to the pool the selector picks, without waiting.

        The keywords ``selector``, ``requires``, ``priority`` and ``retry`` belong to the manager;
        to pass arguments of those names to ``fn``, use [`route_apply`][] with ``kwds``. Must be
        called from the event loop.

        Args:
            fn: a module-level function (plain or ``async def``), so workers can import it.
            *args: its positional arguments.
            selector: a built-in selector's name (``"least_loaded"``, ``"round_robin"``,
                ``"random"``), one added with [`register_selector`][], or a [`Selector`][] callable.
            requires: route only to pools carrying every one of these tags.
            priority: higher runs first in the chosen pool (default 0).
            retry: a [`RetryPolicy`][procpool.RetryPolicy] (default: the chosen pool's).
            **kwargs: its keyword arguments.

        Returns:
            ``(pool_id, future)``: the future resolves to the result, as with
            [`WorkerPool.submit`][procpool.WorkerPool.submit].

        Raises:
            NoPoolAvailable: no running pool (or the selector declined them all).
            ValueError: unknown selector (the message lists the known ones).
            Exception: otherwise whatever [`WorkerPool.submit`][procpool.WorkerPool.submit] raises.
        """
        pool = self._choose(selector, needs_handler=False, requires=requires)
        return pool.pool_id, pool.submit(fn, *args, priority=priority, retry=retry, **kwargs)

    async def run_graph(
        self,
        graph: _graph.TaskGraph | Mapping[str, Any],
        *,
        selector: str | Selector = "least_loaded",
        return_exceptions: bool = False,
    ) -> dict[str, Any]:
        """Run a [`TaskGraph`][procpool.TaskGraph] across the pools: each task once the tasks it needs are done.

        Each task is routed when it becomes ready, like [`route_apply`][] (with its own
        ``requires``, ``priority`` and ``retry``), so independent tasks spread over the pools.

        Args:
            graph: the graph (or a dict ``{name: (fn, args...)}``).
            selector: how each task's pool is chosen (as in [`route_apply`][]).
            return_exceptions: put each failed task's error in the result instead of raising.

        Returns:
            ``{name: result}`` of every task.

        Raises:
            GraphFailed: a task failed; its dependants did not run ([`DependencyFailed`][procpool.DependencyFailed]).
            ValueError: the graph has a cycle or needs a task it does not have (nothing runs).
        """

        async def run(node: _graph.Node, args: tuple[Any, ...], kwds: dict[str, Any]) -> Any:
            pool = self._choose(selector, needs_handler=False, requires=node.requires)
            return await pool.apply(node.fn, args, kwds, node.timeout, priority=node.priority, retry=node.retry)

        return await _graph.run_graph(graph, run, return_exceptions)
