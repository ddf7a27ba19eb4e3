"""A DaskPool's link to its cluster: the client, three workers, and what happens to them.

It connects (or starts a ``LocalCluster``), takes three workers, checks the handler on each,
sends a task to a given worker, kills a worker, and follows each slot's worker through its
nanny's restarts. It never touches a task's future: it tells the pool through three callbacks
(a worker was lost, workers came back, the scheduler was lost). The pool's task book never
touches a worker: it asks the link to submit and to kill.

Slots are pinned to workers by address (``workers=[address], allow_other_workers=False``),
and followed across restarts by their nanny's address, which does not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any

import distributed

from procpool import POOL_SIZE, _dask_worker, _log
from procpool._dask_slots import DaskWorker, SlotState
from procpool.errors import BrokenPool

__all__ = ("ClusterLink",)

log = _log.get("dask")

# How often the supervisor pings the scheduler and re-finds the slots' workers, when no worker
# event wakes it earlier. Bounds how late a silent scheduler loss is noticed (plus PING_TIMEOUT).
SUPERVISE_INTERVAL = 1.0
# A scheduler that does not answer a ping this long is lost: the pool breaks.
PING_TIMEOUT = 10.0


class ClusterLink:
    """The client of one pool, its cluster (when the pool started it) and its three slots."""

    def __init__(
        self,
        pool_id: str,
        address: str | None,
        security: Any,
        wanted: tuple[str, ...] | None,
        *,
        on_worker_lost: Callable[[DaskWorker, str], None],
        on_workers_back: Callable[[], None],
        on_scheduler_lost: Callable[[str], None],
    ) -> None:
        self.pool_id = pool_id
        self.address = address
        self.security = security
        self.wanted = wanted
        self.on_worker_lost = on_worker_lost
        self.on_workers_back = on_workers_back
        self.on_scheduler_lost = on_scheduler_lost
        # Typed Any: distributed is only partly annotated, and its async client returns coroutines.
        self.client: Any = None
        # The LocalCluster this link started (None for a remote cluster, which it never closes).
        self.cluster: Any = None
        self.workers: list[DaskWorker] = []
        # Wakes the supervisor before its interval ends (a worker joined or left).
        self._wake = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        # Set by close(): the supervisor stops at its next turn.
        self._closing = False
        # Kills on their way to a worker, referenced until they are sent.
        self._kills: set[asyncio.Task[None]] = set()

    @property
    def scheduler_address(self) -> str | None:
        """The scheduler's address (the local cluster's, once started)."""
        if self.client is not None and self.client.scheduler is not None:
            return str(self.client.scheduler.address)
        return self.address

    def where(self) -> str:
        """The cluster, in words, for messages."""
        return f"the dask scheduler at {self.scheduler_address}" if self.address else "a local dask cluster"

    # -- start and stop --------------------------------------------------------------------------

    async def open(self, handler: str | None) -> None:
        """Connect, take three workers and check ``handler`` on each; BrokenPool when that fails."""
        if self.address is None:
            # One thread per worker process: a worker runs one task at a time, as a local one.
            # allowed_failures=0: a task whose worker died fails (KilledWorker) instead of being
            # re-run, so a task that may have had effects runs at most once, as locally. The
            # HTTP server (metrics; the dashboard is off) takes a free port on 127.0.0.1 only.
            self.cluster = await distributed.LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=POOL_SIZE,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                host="127.0.0.1",
                asynchronous=True,
                silence_logs=False,
                scheduler_kwargs={"allowed_failures": 0, "dashboard_address": "127.0.0.1:0"},
            )
            self.client = await distributed.Client(  # type: ignore[no-untyped-call]
                self.cluster, asynchronous=True, set_as_default=False
            )
        else:
            kwargs: dict[str, Any] = {"asynchronous": True, "set_as_default": False}
            if self.security is not None:
                kwargs["security"] = self.security
            client: Any = distributed.Client(self.address, **kwargs)  # type: ignore[no-untyped-call]
            self.client = client
            try:
                await client
            except (OSError, TimeoutError) as exc:
                raise BrokenPool(f"cannot reach it: {type(exc).__name__}: {exc}") from exc
            await client.wait_for_workers(POOL_SIZE)
        await self._take_workers(handler)

    async def _take_workers(self, handler: str | None) -> None:
        client = self.client
        assert client is not None
        info = (await client.scheduler.identity())["workers"]
        if self.wanted is not None:
            by_name = {str(w.get("name")): addr for addr, w in info.items()}
            missing = [w for w in self.wanted if w not in info and w not in by_name]
            if missing:
                raise BrokenPool(f"no worker named {', '.join(map(repr, missing))} among {sorted(info)}")
            chosen = [w if w in info else by_name[w] for w in self.wanted]
        else:
            chosen = sorted(info)[:POOL_SIZE]
        self.workers = [
            DaskWorker(f"{self.pool_id}-w{i}", info[addr].get("nanny"), addr) for i, addr in enumerate(chosen)
        ]
        if handler is not None:
            checks = await client.run(_dask_worker.check_handler, handler, workers=chosen, on_error="return")
        else:
            checks = await client.run(os.getpid, workers=chosen, on_error="return")
        for slot in self.workers:
            result = checks.get(slot.address)
            if isinstance(result, BaseException):
                what = f"{type(result).__name__}: {result}"
                raise BrokenPool(f"dask worker {slot.address} failed its start check: {what}")
            slot.pid = result
            slot.state = SlotState.READY

    def start_supervising(self) -> None:
        """Follow worker events and ping the scheduler from now on."""
        assert self.client is not None
        self.client.subscribe_topic("all", self._on_cluster_event)
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"procpool-dask-supervisor-{self.pool_id}"
        )

    async def close(self) -> None:
        """Send the kills under way, stop supervising, close the client, and the cluster if it is ours."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await asyncio.gather(*self._kills, return_exceptions=True)
        client, cluster = self.client, self.cluster
        self.cluster = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic("all")
            with contextlib.suppress(Exception):
                await client.close()
        if cluster is not None:
            # Closes the nannies, which stop their worker processes; no process is left.
            await cluster.close()

    # -- work and workers ------------------------------------------------------------------------

    def submit(self, slot: DaskWorker, payload: bytes, key: str) -> distributed.Future[Any]:
        """Run ``run_call(payload)`` on the slot's worker and nowhere else."""
        assert self.client is not None and slot.address is not None
        future: distributed.Future[Any] = self.client.submit(
            _dask_worker.run_call, payload, key=key, workers=[slot.address], allow_other_workers=False, pure=False
        )
        return future

    def kill(self, slot: DaskWorker, why: str) -> None:
        """Kill the slot's worker (and its children) through the scheduler; its nanny restarts it."""
        address = slot.address
        self.retire(slot)
        if address is None or self.client is None:
            return
        log.info("killing dask worker %s (%s): %s", address, slot.worker_id, why)
        job = asyncio.get_running_loop().create_task(self._kill(address), name=f"procpool-dask-kill-{address}")
        self._kills.add(job)
        job.add_done_callback(self._kills.discard)

    async def _kill(self, address: str) -> None:
        assert self.client is not None
        try:
            # A coroutine function runs on the worker's event loop, which answers while the
            # task's thread is busy; wait=False, as a killed worker never replies.
            await self.client.run(_dask_worker.exit_worker, workers=[address], wait=False)
        except Exception as exc:  # already gone, or the scheduler is: nothing left to stop
            log.info("could not kill dask worker %s: %r", address, exc)

    def retire(self, slot: DaskWorker) -> None:
        """The slot's worker is dead or being killed: wait for its nanny's next one."""
        if slot.address is not None:
            slot.retired.add(slot.address)
        slot.address = None
        slot.pid = None
        if slot.state != SlotState.LOST:
            slot.state = SlotState.STARTING
        self._wake.set()

    # -- the supervisor ----------------------------------------------------------------------------

    def _on_cluster_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """A worker joined or left: tell the pool now, and re-find the slots' workers."""
        _, message = event
        action = message.get("action")
        if action == "remove-worker":
            for slot in self.workers:
                if slot.address is not None and slot.address == message.get("worker"):
                    self.on_worker_lost(slot, f"it left the cluster ({message.get('stimulus_id', 'no reason given')})")
        if action in ("add-worker", "remove-worker"):
            self._wake.set()

    async def _supervise(self) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
        # comes as its awaitable completes (a worker event and close() in the same loop step),
        # and close() then waited for this loop forever. ``_closing`` ends it even so.
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SUPERVISE_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if not await self._sync():
                    return
            except Exception:
                log.exception("pool %s: supervising the dask workers failed", self.pool_id)

    async def _sync(self) -> bool:
        """Ping the scheduler and follow each slot's worker; False once the scheduler is lost."""
        client = self.client
        assert client is not None
        if client.status != "running":
            self.on_scheduler_lost(f"the connection closed (the client is {client.status!r})")
            return False
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                info = (await client.scheduler.identity())["workers"]
        except (OSError, TimeoutError, distributed.comm.core.CommClosedError) as exc:
            self.on_scheduler_lost(f"it did not answer a ping within {PING_TIMEOUT:g} s ({type(exc).__name__}: {exc})")
            return False
        for slot in self.workers:
            if slot.address is not None and slot.address not in info:
                self.on_worker_lost(slot, "it is no longer in the cluster")
        found: dict[str, DaskWorker] = {}
        for slot in self.workers:
            if slot.address is not None or slot.state == SlotState.LOST:
                continue
            if slot.nanny is None:
                slot.state = SlotState.LOST  # no nanny: nothing restarts it
                continue
            for addr, worker in info.items():
                if worker.get("nanny") == slot.nanny and addr not in slot.retired:
                    found[addr] = slot
        if found:
            pids = await client.run(os.getpid, workers=list(found), on_error="return")
            for addr, slot in found.items():
                pid = pids.get(addr)
                if slot.address is not None or isinstance(pid, BaseException) or pid is None:
                    continue  # it went again; the next sync looks once more
                slot.address, slot.pid, slot.state = addr, pid, SlotState.READY
                slot.restarts += 1
                log.info("pool %s: slot %s has worker %s (pid %s) again", self.pool_id, slot.worker_id, addr, pid)
            self.on_workers_back()
        return True
