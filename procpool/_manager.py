"""PoolManager: several pools, local or Dask, behind one router, and the process-wide manager.

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
import weakref
from typing import Any

import attrs

from procpool import _log
from procpool._autoscale import AutoscalePolicy, Autoscaler
from procpool._backends import build_pool
from procpool._protocol import PoolLike
from procpool._routing import Routing
from procpool._selectors import (
    LeastLoaded,
    PoolSnapshot,
    RoundRobin,
    Selector,
    pick_random,
    prefer_healthy,
)
from procpool.errors import PoolClosed, PoolNotFound

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

log = _log.get("manager")


class _State(enum.Enum):
    INITIAL = "initial"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@attrs.frozen
class _Entry:
    pool: PoolLike
    order: int


def _check_shutdown_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    return float(timeout)


class PoolManager(Routing):
    """Several pools, created, routed to and shut down together.

    The pools may be local [`WorkerPool`][] s or [`DaskPool`][procpool.dask.DaskPool] s: the
    manager relies only on [`PoolLike`][procpool.PoolLike], so selectors see both kinds alike.
    Use it as ``async with PoolManager() as manager`` or call [`start`][] and [`stop`][].
    Routing picks a pool per task with a selector: ``"least_loaded"`` (default),
    ``"round_robin"``, ``"random"``, one added with
    [`register_selector`][procpool.PoolManager.register_selector], or any callable
    following the [`Selector`][] protocol. Every selector is offered only running pools that
    are healthy or degraded; the built-in ones prefer healthy pools.

    Must be used from one event loop, the one its pools run on.

    Args:
        autoscale: an [`AutoscalePolicy`][procpool.AutoscalePolicy]: the manager then keeps
            between ``min_pools`` and ``max_pools`` pools of its template, adding one under load
            and deleting idle ones (``manager.autoscaler`` reports its decisions).
    """

    def __init__(self, *, autoscale: AutoscalePolicy | None = None) -> None:
        # Adds and deletes pools of a template by load (issue 15); None: the caller manages pools.
        self.autoscaler = Autoscaler(self, autoscale) if autoscale is not None else None
        self._state = _State.INITIAL
        self._loop: asyncio.AbstractEventLoop | None = None
        # Routable pools, in registration order.
        self._pools: dict[str, _Entry] = {}
        # Pools being initialized by create_pool: not routable yet, but stop() must close them.
        self._starting: dict[str, PoolLike] = {}
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
        if self.autoscaler is not None:
            await self.autoscaler.start()

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
            if self.autoscaler is not None:
                self._shutdowns.add(self.autoscaler.stop())  # no pool is added or deleted from here on
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

    def _begin_shutdown(self, pool: PoolLike, timeout: float) -> asyncio.Task[None]:
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

    async def create_pool(
        self, pool_id: str | None = None, *, backend: str = "local", address: str | None = None, **pool_options: Any
    ) -> PoolLike:
        """Create a pool, start its three workers and register it for routing beside the others.

        Starts the manager if it was not started yet. Selectors see local and Dask pools alike.

        Args:
            pool_id: the pool's id; generated when omitted.
            backend: ``"local"`` for a [`WorkerPool`][] (default), ``"dask"`` for a
                [`DaskPool`][procpool.dask.DaskPool] (``pip install 'procpool[dask]'``).
            address: for ``backend="dask"``, the scheduler of a running cluster
                (``"tcp://host:port"``); None starts the pool's own local cluster.
            **pool_options: passed to the pool (``handler``, ``task_timeout``, ...; a local pool
                also takes ``initializer`` ..., a Dask pool ``security`` and ``workers``).

        Returns:
            The running pool.

        Raises:
            ValueError: a pool with this id exists (or is being created), an unknown backend,
                ``address`` without ``backend="dask"``, or a bad pool option.
            TypeError: a bad pool option (from the pool).
            ImportError: ``backend="dask"`` without ``distributed`` installed.
            BrokenPool: the workers could not start (or the scheduler could not be reached);
                nothing is registered or left running.
            PoolClosed: the manager is stopped (or stopped while the pool was starting).
        """
        self._check_open()
        if self._state is _State.INITIAL:
            await self.start()
        pool = build_pool(pool_id, backend, address, **pool_options)
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

    def get_pool(self, pool_id: str) -> PoolLike:
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
