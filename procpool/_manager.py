"""PoolManager: several WorkerPools behind one router, and the process-wide manager.

Routing::

    route_task / route_apply / submit
        -> candidates: one frozen PoolSnapshot per RUNNING pool that is healthy or degraded
           (broken, starting, closing and closed pools are never offered; prompt tasks also
           skip pools without a handler, and with ``handler=`` pools of other handlers), in
           registration order. A prompt task without ``handler=`` is refused when the pools
           run different handlers: a prompt means something only to the handler it was
           written for (issue 9: routing rotated a prompt onto a shell-command pool)
        -> selector(candidates) -> pool_id        (sync: nothing can change in between)
        -> that pool's execute / apply / submit, in the same event-loop step, so the task
           already counts in the pool's ``load`` when the next routing decision is made

Lifecycle::

    INITIAL --start()--> RUNNING --stop()--> STOPPING --every pool shut down--> STOPPED

Invariants:
    * A pool id is in at most one of ``_pools`` (routable), ``_starting`` (being initialized);
      ``delete_pool`` takes it out of ``_pools`` before its shutdown begins.
    * Every pool the manager started is shut down by a task in ``_shutdowns`` or by ``stop()``;
      ``stop()`` returns only when all of them are closed, so no worker process outlives it.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from procpool._pool import PoolState, WorkerPool
from procpool._selectors import (
    HEALTH_RANK,
    LeastLoaded,
    PoolSnapshot,
    RoundRobin,
    Selector,
    pick_random,
    prefer_healthy,
)
from procpool.errors import NoPoolAvailable, PoolClosed, PoolNotFound

__all__ = (
    "LeastLoaded",
    "PoolManager",
    "PoolSnapshot",
    "RoundRobin",
    "Selector",
    "get_pool_manager",
    "pick_random",
    "prefer_healthy",
)

log = logging.getLogger("procpool.manager")


class _State(enum.Enum):
    INITIAL = "initial"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@attrs.frozen
class _Entry:
    pool: WorkerPool
    order: int


def _check_shutdown_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    return float(timeout)


def _has_handler(pool: WorkerPool) -> bool:
    """Whether the pool can run prompt tasks (``execute``)."""
    return pool.handler is not None


def _check_handler_arg(handler: Any) -> str | None:
    if handler is not None and not isinstance(handler, str):
        raise TypeError(f"handler must be a 'package.module:function' string or None, not {type(handler).__name__}")
    return handler


class PoolManager:
    """Several [`WorkerPool`][] s, created, routed to and shut down together.

    Use it as ``async with PoolManager() as manager`` or call [`start`][] and [`stop`][].
    Routing picks a pool per task with a selector: ``"least_loaded"`` (default),
    ``"round_robin"``, ``"random"``, one added with [`register_selector`][], or any callable
    following the [`Selector`][] protocol. Every selector is offered only running pools that
    are healthy or degraded; the built-in ones prefer healthy pools.

    Must be used from one event loop, the one its pools run on.
    """

    def __init__(self) -> None:
        self._state = _State.INITIAL
        self._loop: asyncio.AbstractEventLoop | None = None
        # Routable pools, in registration order.
        self._pools: dict[str, _Entry] = {}
        # Pools being initialized by create_pool: not routable yet, but stop() must close them.
        self._starting: dict[str, WorkerPool] = {}
        # Pool shutdowns under way (delete_pool, failed create_pool, stop).
        self._shutdowns: set[asyncio.Task[None]] = set()
        self._orders = itertools.count()
        self._selectors: dict[str, Selector] = {
            "least_loaded": LeastLoaded(),
            "round_robin": RoundRobin(),
            "random": pick_random,
        }
        # The task that finishes stop(): every stop() call waits for this one.
        self._stopping: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between [`start`][] and [`stop`][]."""
        return self._state is _State.RUNNING

    async def start(self) -> None:
        """Make the manager ready to create pools. Idempotent.

        Raises:
            PoolClosed: the manager was stopped; a stopped manager does not restart (create a
                new one, as [`get_pool_manager`][] does).
        """
        if self._state is _State.RUNNING:
            return
        if self._state is not _State.INITIAL:
            raise PoolClosed("this PoolManager is stopped and cannot restart; create a new one")
        self._loop = asyncio.get_running_loop()
        self._state = _State.RUNNING
        log.debug("pool manager started")

    async def stop(self, timeout: float = 5.0) -> None:
        """Shut every pool down concurrently and stop the manager; no worker process is left.

        Each pool gets ``timeout`` seconds to finish its running tasks (see
        [`WorkerPool.shutdown`][]). Pools being deleted are waited for too. Calling it again
        waits for the first call to finish.

        Args:
            timeout: seconds each pool's running tasks get to finish before their workers are killed
                (default 5).
        """
        timeout = _check_shutdown_timeout(timeout)
        if self._state in (_State.INITIAL, _State.STOPPED):
            self._state = _State.STOPPED
            return
        if self._stopping is None:
            self._state = _State.STOPPING
            pools = [entry.pool for entry in self._pools.values()] + list(self._starting.values())
            self._pools.clear()
            for pool in pools:
                self._begin_shutdown(pool, timeout)
            # A task of its own, so that a cancelled caller neither aborts the shutdowns nor
            # leaves a later stop() waiting for a finish nobody would announce.
            self._stopping = asyncio.get_running_loop().create_task(self._finish_stop(len(pools)))
        await asyncio.shield(self._stopping)

    async def _finish_stop(self, count: int) -> None:
        """Wait for every shutdown under way, including those that start meanwhile."""
        while pending := [task for task in self._shutdowns if not task.done()]:
            await asyncio.wait(pending)
        self._state = _State.STOPPED
        log.info("pool manager stopped (%d pools shut down)", count)

    async def __aenter__(self) -> PoolManager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _check_open(self) -> None:
        if self._state in (_State.STOPPING, _State.STOPPED):
            raise PoolClosed(f"this PoolManager is {self._state.value}")

    def _begin_shutdown(self, pool: WorkerPool, timeout: float) -> asyncio.Task[None]:
        """Shut a pool down in a task of its own, so that no caller's cancellation aborts it."""
        task = asyncio.get_running_loop().create_task(pool.shutdown(timeout), name=f"procpool-shutdown-{pool.pool_id}")
        self._shutdowns.add(task)
        task.add_done_callback(self._shutdown_done)
        return task

    def _shutdown_done(self, task: asyncio.Task[None]) -> None:
        self._shutdowns.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("shutting down %s failed", task.get_name(), exc_info=task.exception())

    # -- pools -----------------------------------------------------------------------------------

    async def create_pool(self, pool_id: str | None = None, **pool_options: Any) -> WorkerPool:
        """Create a [`WorkerPool`][], start its three workers and register it for routing.

        Starts the manager if it was not started yet.

        Args:
            pool_id: the pool's id; generated when omitted.
            **pool_options: passed to [`WorkerPool`][] (``handler``, ``task_timeout``,
                ``initializer`` ...).

        Returns:
            The running pool.

        Raises:
            ValueError: a pool with this id exists (or is being created), or a bad pool option.
            TypeError: a bad pool option (from [`WorkerPool`][]).
            BrokenPool: the workers could not start; nothing is registered or left running.
            PoolClosed: the manager is stopped (or stopped while the pool was starting).
        """
        self._check_open()
        if self._state is _State.INITIAL:
            await self.start()
        pool = WorkerPool(pool_id, **pool_options)
        if pool.pool_id in self._pools or pool.pool_id in self._starting:
            raise ValueError(f"a pool with id {pool.pool_id!r} already exists in this manager")
        self._starting[pool.pool_id] = pool
        try:
            await pool.initialize()
            self._check_open()  # stop() may have run while the workers started
        except BaseException:
            await asyncio.shield(self._begin_shutdown(pool, 0))
            raise
        finally:
            del self._starting[pool.pool_id]
        self._pools[pool.pool_id] = _Entry(pool, next(self._orders))
        log.info("pool %s added to the manager", pool.pool_id)
        return pool

    def get_pool(self, pool_id: str) -> WorkerPool:
        """The registered pool with this id.

        Args:
            pool_id: the id the pool was created with.

        Raises:
            PoolNotFound: no such pool (also a ``KeyError``).
        """
        try:
            return self._pools[pool_id].pool
        except KeyError:
            known = ", ".join(repr(k) for k in self._pools) or "none"
            raise PoolNotFound(f"no pool {pool_id!r} in this manager (pools: {known})") from None
        except TypeError:
            raise TypeError(f"pool_id must be a string, not {type(pool_id).__name__}") from None

    async def delete_pool(self, pool_id: str, timeout: float = 5.0) -> None:
        """Take a pool out of routing at once, then shut it down; other pools keep serving.

        Tasks still waiting in it fail with [`PoolClosed`][]; running ones get ``timeout``
        seconds to finish (see [`WorkerPool.shutdown`][]). Returns when its workers are gone.
        If the caller is cancelled, the shutdown still completes (and [`stop`][] waits for it).

        Args:
            pool_id: the id the pool was created with.
            timeout: seconds its running tasks get to finish before its workers are killed (default
                5).

        Raises:
            PoolNotFound: no such pool.
        """
        timeout = _check_shutdown_timeout(timeout)
        pool = self.get_pool(pool_id)
        del self._pools[pool_id]
        log.info("pool %s removed from the manager; shutting it down", pool_id)
        await asyncio.shield(self._begin_shutdown(pool, timeout))

    async def list_pools(self) -> list[dict[str, Any]]:
        """Status dicts ([`WorkerPool.get_status`][]) of the registered pools, oldest first."""
        return [entry.pool.get_status() for entry in self._pools.values()]

    async def get_health_status(self) -> dict[str, Any]:
        """Health of every registered pool, without waiting on any worker.

        Returns:
            ``{"status", "pools_total", "pools_healthy", "pools_degraded", "pool_details"}``:
            ``status`` is ``healthy`` (every pool healthy), ``degraded`` (some pool can take
            work, not all are healthy) or ``unhealthy`` (no pool can take work);
            ``pool_details`` holds each pool's [`WorkerPool.health_check`][].
        """
        details = list(await asyncio.gather(*(e.pool.health_check() for e in self._pools.values())))
        healthy = sum(d["status"] == "healthy" for d in details)
        degraded = sum(d["status"] == "degraded" for d in details)
        if details and healthy == len(details):
            status = "healthy"
        elif healthy or degraded:
            status = "degraded"
        else:
            status = "unhealthy"
        return {
            "status": status,
            "pools_total": len(details),
            "pools_healthy": healthy,
            "pools_degraded": degraded,
            "pool_details": details,
        }

    # -- selectors and routing -------------------------------------------------------------------

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

    def _snapshot(self, entry: _Entry, health: str) -> PoolSnapshot:
        pool = entry.pool
        return PoolSnapshot(
            pool_id=pool.pool_id,
            order=entry.order,
            health=health,
            load=pool.load,
            recent_failures=pool.recent_failures,
            workers_healthy=pool.workers_healthy,
        )

    def choose_pool(
        self, selector: str | Selector = "least_loaded", *, needs_handler: bool = False, handler: str | None = None
    ) -> WorkerPool:
        """The pool ``selector`` picks now, as routing would, for callers that submit themselves.

        Args:
            selector: a built-in selector's name (``"least_loaded"``, ``"round_robin"``,
                ``"random"``), one added with [`register_selector`][], or a [`Selector`][] callable.
            needs_handler: offer only pools that have a prompt handler, and refuse to choose
                between pools of different handlers unless ``handler`` says which (as
                [`route_task`][]).
            handler: offer only pools running this handler (``"package.module:function"``, as
                [`WorkerPool.handler`][] reports it); implies ``needs_handler``.

        Raises:
            NoPoolAvailable: no routable pool (of that handler), or the selector declined them all.
            ValueError: unknown selector; the selector returned a pool it was not offered; or
                ``needs_handler`` without ``handler`` while pools of several handlers exist.
            TypeError: ``handler`` is not a string.
            PoolClosed: the manager is stopped.
        """
        return self._choose(selector, needs_handler=needs_handler, handler=handler)

    def handlers(self) -> tuple[str, ...]:
        """The distinct handlers of the registered pools, in registration order (no ``None``)."""
        return tuple(dict.fromkeys(e.pool.handler for e in self._pools.values() if e.pool.handler is not None))

    def _choose(self, selector: str | Selector, *, needs_handler: bool, handler: str | None = None) -> WorkerPool:
        """Run the selector over the routable pools and return the pool it picks."""
        self._check_open()
        handler = _check_handler_arg(handler)
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
        return self._pools[chosen].pool

    async def execute_on_pool(
        self, pool_id: str, prompt: str, context: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run ``prompt`` on the named pool's handler; return what the handler returns.

        Args:
            pool_id: the pool to run it on.
            prompt: the string handed to the handler.
            context: the dict handed to the handler with it (default: empty).
            timeout: run-time limit in seconds (default: the pool's ``task_timeout``).

        Raises:
            PoolNotFound: no such pool.
            Exception: otherwise whatever [`WorkerPool.execute`][] raises.
        """
        return await self.get_pool(pool_id).execute(prompt, context, timeout)

    async def route_task(
        self,
        prompt: str,
        context: dict[str, Any] | None = None,
        selector: str | Selector = "least_loaded",
        timeout: float | None = None,
        *,
        handler: str | None = None,
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
                as [`WorkerPool.handler`][] reports it). Required when the registered pools
                run more than one handler.

        Returns:
            ``(pool_id, result)``.

        Raises:
            NoPoolAvailable: no running pool with a handler (of ``handler``, when given), or the
                selector declined them all.
            ValueError: unknown selector (the message lists the known ones), or no ``handler``
                while the registered pools run several handlers (the message lists them).
            TypeError: ``handler`` is not a string.
            Exception: otherwise whatever [`WorkerPool.execute`][] raises.
        """
        pool = self._choose(selector, needs_handler=True, handler=handler)
        return pool.pool_id, await pool.execute(prompt, context, timeout)

    async def route_apply(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any] = (),
        kwds: dict[str, Any] | None = None,
        selector: str | Selector = "least_loaded",
        timeout: float | None = None,
    ) -> tuple[str, Any]:
        """Run ``fn(*args, **kwds)`` on the pool the selector picks.

        Args:
            fn: a module-level function (plain or ``async def``), so workers can import it.
            args: its positional arguments.
            kwds: its keyword arguments.
            selector: a built-in selector's name (``"least_loaded"``, ``"round_robin"``,
                ``"random"``), one added with [`register_selector`][], or a [`Selector`][] callable.
            timeout: run-time limit in seconds (default: the chosen pool's ``task_timeout``).

        Returns:
            ``(pool_id, result)``.

        Raises:
            NoPoolAvailable: no running pool (or the selector declined them all).
            ValueError: unknown selector (the message lists the known ones).
            Exception: otherwise whatever [`WorkerPool.apply`][] raises.
        """
        pool = self._choose(selector, needs_handler=False)
        return pool.pool_id, await pool.apply(fn, args, kwds, timeout)

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, selector: str | Selector = "least_loaded", **kwargs: Any
    ) -> tuple[str, asyncio.Future[Any]]:
        """Submit ``fn(*args, **kwargs)`` to the pool the selector picks, without waiting.

        The keyword ``selector`` belongs to the manager; to pass an argument of that name to
        ``fn``, use [`route_apply`][] with ``kwds``. Must be called from the event loop.

        Args:
            fn: a module-level function (plain or ``async def``), so workers can import it.
            *args: its positional arguments.
            selector: a built-in selector's name (``"least_loaded"``, ``"round_robin"``,
                ``"random"``), one added with [`register_selector`][], or a [`Selector`][] callable.
            **kwargs: its keyword arguments.

        Returns:
            ``(pool_id, future)``: the future resolves to the result, as with
            [`WorkerPool.submit`][].

        Raises:
            NoPoolAvailable: no running pool (or the selector declined them all).
            ValueError: unknown selector (the message lists the known ones).
            Exception: otherwise whatever [`WorkerPool.submit`][] raises.
        """
        pool = self._choose(selector, needs_handler=False)
        return pool.pool_id, pool.submit(fn, *args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"<PoolManager {self._state.value} pools={len(self._pools)} "
            f"starting={len(self._starting)} shutting_down={len(self._shutdowns)}>"
        )


# -- the process-wide manager ----------------------------------------------------------------------

_manager: PoolManager | None = None
# asyncio.Lock binds to the loop it first waits in; a later loop (a new asyncio.run, the next
# test) gets a lock of its own instead of a RuntimeError.
_lock: tuple[weakref.ref[asyncio.AbstractEventLoop], asyncio.Lock] | None = None


def _lock_for(loop: asyncio.AbstractEventLoop) -> asyncio.Lock:
    global _lock
    if _lock is None or _lock[0]() is not loop:
        _lock = (weakref.ref(loop), asyncio.Lock())
    return _lock[1]


def _usable(manager: PoolManager | None, loop: asyncio.AbstractEventLoop) -> bool:
    return manager is not None and manager.running and manager._loop is loop


async def get_pool_manager() -> PoolManager:
    """The process-wide [`PoolManager`][], created and started on first use.

    Concurrent first calls get the same manager. After its [`stop`][PoolManager.stop], the next
    call creates a fresh, running one. A manager left running on an event loop that has since
    closed is replaced (its pools cannot be reached any more; a warning names them).

    Raises:
        RuntimeError: the running manager belongs to another event loop that is still open.
    """
    global _manager
    loop = asyncio.get_running_loop()
    if _usable(_manager, loop):
        assert _manager is not None
        return _manager
    async with _lock_for(loop):
        old = _manager
        if _usable(old, loop):
            assert old is not None
            return old
        if old is not None and old.running:
            assert old._loop is not None
            if not old._loop.is_closed():
                raise RuntimeError(
                    "the process-wide PoolManager runs on another event loop that is still open; "
                    "stop it there (await manager.stop()) or use a PoolManager of your own"
                )
            log.warning(
                "replacing the process-wide PoolManager of a closed event loop; it was never stopped "
                "and its pools %s are left to the exit handler",
                list(old._pools),
            )
        manager = PoolManager()
        await manager.start()
        _manager = manager
        return manager
