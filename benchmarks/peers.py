"""One adapter per pool library, so every contender runs the same workloads the same way.

Each adapter drives its library through that library's natural API (the one its documentation
shows), with 3 workers and the library's default start method. Synchronous libraries block the
benchmark's event loop while they work, which costs them nothing: nothing else runs on it.

Waits that a broken peer could turn into a hang (``crash_result``, ``probe``) take a bound and
raise ``TimeoutError`` past it. Libraries are imported inside the adapters: workers started with
``spawn`` re-import the benchmark's main module, and should not pay for every peer's imports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import multiprocessing
import threading
from collections.abc import Callable
from typing import Any

import workloads as w

WORKERS = 3


def mp_default_chunksize(n: int) -> int:
    """``multiprocessing.Pool.map``'s default chunk size, used for every peer whose map takes one."""
    return max(1, math.ceil(n / (4 * WORKERS)))


async def _bounded(blocking: Callable[[], Any], bound: float) -> None:
    """Run a blocking shutdown in a daemon thread; TimeoutError if it has not returned in time.

    Not ``asyncio.to_thread``: ``asyncio.run`` joins its executor's threads, so a stuck one would
    hang the benchmark's exit.
    """
    future: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run() -> None:
        try:
            blocking()
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    await asyncio.wait_for(asyncio.wrap_future(future), bound)


class Peer:
    """A pool library behind a small async interface. Subclasses fill in the library calls."""

    key = ""
    pool: Any = None

    @property
    def is_open(self) -> bool:
        return self.pool is not None

    async def create(self) -> None:
        raise NotImplementedError

    async def close(self, bound: float) -> None:
        raise NotImplementedError

    def start_method(self) -> str:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        raise NotImplementedError

    def helper_pids(self) -> list[int]:
        """Processes the library keeps for the interpreter's lifetime rather than per pool."""
        return []

    async def one(self, x: int) -> int:
        """One task, submitted and awaited: a round trip."""
        raise NotImplementedError

    async def submit_many(self, n: int) -> list[int]:
        """``square(i)`` for ``i < n``, one submission per task, all in flight at once."""
        raise NotImplementedError

    async def map_many(self, n: int) -> list[int]:
        raise NotImplementedError

    async def cpu(self, tasks: int, iterations: int) -> list[int]:
        raise NotImplementedError

    def start_crash(self, done: Callable[[], None]) -> Any:
        """Submit a task that SIGKILLs its own worker; ``done()`` is called when its caller hears back."""
        raise NotImplementedError

    async def crash_result(self, handle: Any, bound: float) -> None:
        """What the crashed task's caller gets: its error raised, or TimeoutError past ``bound``."""
        raise NotImplementedError

    async def probe(self, bound: float) -> None:
        """One tiny task that must come back right within ``bound`` seconds."""
        raise NotImplementedError

    def replaced(self, before: set[int]) -> bool:
        """A dead worker's slot is filled again: 3 workers, not all of them from ``before``."""
        pids = set(self.worker_pids())
        return len(pids) == WORKERS and pids != before


class ProcPool(Peer):
    key = "procpool"

    async def create(self) -> None:
        from procpool import WorkerPool

        self.pool = WorkerPool("bench")
        await self.pool.initialize()

    async def close(self, bound: float) -> None:
        pool, self.pool = self.pool, None
        await pool.shutdown(timeout=bound)

    def start_method(self) -> str:
        return self.pool.config.start_method

    def worker_pids(self) -> list[int]:
        return [wk.pid for wk in self.pool.workers if wk.pid is not None]

    def replaced(self, before: set[int]) -> bool:
        # Ready after its handshake, not merely started: the stricter reading of "replaced".
        return set(self.worker_pids()) != before and self.pool.health == "healthy"

    async def one(self, x: int) -> int:
        return await self.pool.submit(w.square, x)

    async def submit_many(self, n: int) -> list[int]:
        return await asyncio.gather(*[self.pool.submit(w.square, i) for i in range(n)])

    async def map_many(self, n: int) -> list[int]:
        # A list per chunk, as multiprocessing.Pool.map hands over one list: an await per item
        # would cost more than the task itself (the per-item rate is in docs/benchmarks.md).
        out: list[int] = []
        async for chunk in self.pool.map(w.square, range(n)).chunks():
            out.extend(chunk)
        return out

    async def cpu(self, tasks: int, iterations: int) -> list[int]:
        return await asyncio.gather(*[self.pool.submit(w.burn, iterations) for _ in range(tasks)])

    def start_crash(self, done: Callable[[], None]) -> Any:
        future = self.pool.submit(w.suicide)
        future.add_done_callback(lambda _: done())
        return future

    async def crash_result(self, handle: Any, bound: float) -> None:
        await asyncio.wait_for(handle, bound)

    async def probe(self, bound: float) -> None:
        assert await asyncio.wait_for(self.pool.submit(w.square, 3), bound) == 9


class _ExecutorPeer(Peer):
    """A ``concurrent.futures.Executor``-shaped library: ``submit`` returns a concurrent future."""

    def _submit(self, fn: Any, *args: Any) -> Any:
        return self.pool.submit(fn, *args)

    async def close(self, bound: float) -> None:
        pool, self.pool = self.pool, None
        await _bounded(pool.shutdown, bound)

    def worker_pids(self) -> list[int]:
        return list(getattr(self.pool, "_processes", None) or ())

    async def one(self, x: int) -> int:
        return self._submit(w.square, x).result()

    async def submit_many(self, n: int) -> list[int]:
        futures = [self._submit(w.square, i) for i in range(n)]
        return [f.result() for f in futures]

    async def map_many(self, n: int) -> list[int]:
        return list(self.pool.map(w.square, range(n), chunksize=mp_default_chunksize(n)))

    async def cpu(self, tasks: int, iterations: int) -> list[int]:
        futures = [self._submit(w.burn, iterations) for _ in range(tasks)]
        return [f.result() for f in futures]

    def start_crash(self, done: Callable[[], None]) -> Any:
        future = self._submit(w.suicide)
        future.add_done_callback(lambda _: done())
        return future

    async def crash_result(self, handle: Any, bound: float) -> None:
        handle.result(timeout=bound)

    async def probe(self, bound: float) -> None:
        assert self._submit(w.square, 3).result(timeout=bound) == 9


class ProcessPoolExecutor(_ExecutorPeer):
    key = "futures"

    async def create(self) -> None:
        self.pool = concurrent.futures.ProcessPoolExecutor(WORKERS)

    def start_method(self) -> str:
        return self.pool._mp_context.get_start_method()


class Loky(_ExecutorPeer):
    key = "loky"

    async def create(self) -> None:
        import loky

        # A private executor rather than get_reusable_executor(), so the benchmark owns (and
        # shuts down) every process it starts.
        self.pool = loky.ProcessPoolExecutor(WORKERS)

    def start_method(self) -> str:
        return self.pool._context.get_start_method()


class Pebble(_ExecutorPeer):
    key = "pebble"

    async def create(self) -> None:
        import pebble

        self.pool = pebble.ProcessPool(max_workers=WORKERS)

    async def close(self, bound: float) -> None:
        pool, self.pool = self.pool, None
        pool.stop()
        await _bounded(pool.join, bound)

    def start_method(self) -> str:
        return multiprocessing.get_start_method()

    def worker_pids(self) -> list[int]:
        return list(self.pool._pool_manager.worker_manager.workers)

    def _submit(self, fn: Any, *args: Any) -> Any:
        return self.pool.schedule(fn, args=args)

    async def map_many(self, n: int) -> list[int]:
        return list(self.pool.map(w.square, range(n), chunksize=mp_default_chunksize(n)).result())


class MultiprocessingPool(Peer):
    key = "multiprocessing"

    async def create(self) -> None:
        self.pool = multiprocessing.Pool(WORKERS)

    async def close(self, bound: float) -> None:
        # terminate(), not close(): join() after close() waits forever for a task lost with
        # its worker, and every task the benchmark cares about has finished by now.
        pool, self.pool = self.pool, None

        def stop() -> None:
            pool.terminate()
            pool.join()

        # Even terminate() hangs when the killed worker held the task queue's lock.
        await _bounded(stop, bound)

    def start_method(self) -> str:
        return self.pool._ctx.get_start_method()

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.pool._pool if p.exitcode is None]

    async def one(self, x: int) -> int:
        return self.pool.apply(w.square, (x,))

    async def submit_many(self, n: int) -> list[int]:
        results = [self.pool.apply_async(w.square, (i,)) for i in range(n)]
        return [r.get() for r in results]

    async def map_many(self, n: int) -> list[int]:
        return self.pool.map(w.square, range(n))

    async def cpu(self, tasks: int, iterations: int) -> list[int]:
        results = [self.pool.apply_async(w.burn, (iterations,)) for _ in range(tasks)]
        return [r.get() for r in results]

    def start_crash(self, done: Callable[[], None]) -> Any:
        return self.pool.apply_async(w.suicide, callback=lambda _: done(), error_callback=lambda _: done())

    async def crash_result(self, handle: Any, bound: float) -> None:
        self._get(handle, bound)

    async def probe(self, bound: float) -> None:
        assert self._get(self.pool.apply_async(w.square, (3,)), bound) == 9

    @staticmethod
    def _get(result: Any, bound: float) -> Any:
        try:
            return result.get(timeout=bound)
        except multiprocessing.TimeoutError:
            raise TimeoutError from None


class AioMultiprocess(Peer):
    key = "aiomultiprocess"

    async def create(self) -> None:
        import aiomultiprocess

        self.pool = aiomultiprocess.Pool(WORKERS)

    async def close(self, bound: float) -> None:
        pool, self.pool = self.pool, None
        pool.terminate()
        await asyncio.wait_for(pool.join(), bound)

    def start_method(self) -> str:
        return self.pool.context.get_start_method()

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.pool.processes if p.pid is not None and p.exitcode is None]

    def helper_pids(self) -> list[int]:
        from aiomultiprocess import core

        # Its singleton Manager, started with the first pool and stopped at interpreter exit.
        process = getattr(core._manager, "_process", None)
        return [process.pid] if process is not None else []

    async def one(self, x: int) -> int:
        return await self.pool.apply(w.asquare, (x,))

    async def submit_many(self, n: int) -> list[int]:
        return await asyncio.gather(*[self.pool.apply(w.asquare, (i,)) for i in range(n)])

    async def map_many(self, n: int) -> list[int]:
        # aiomultiprocess's map has no chunksize: one queued task per item.
        return list(await self.pool.map(w.asquare, range(n)))

    async def cpu(self, tasks: int, iterations: int) -> list[int]:
        return await asyncio.gather(*[self.pool.apply(w.aburn, (iterations,)) for _ in range(tasks)])

    def start_crash(self, done: Callable[[], None]) -> Any:
        task = asyncio.ensure_future(self.pool.apply(w.asuicide))
        task.add_done_callback(lambda _: done())
        return task

    async def crash_result(self, handle: Any, bound: float) -> None:
        await asyncio.wait_for(handle, bound)

    async def probe(self, bound: float) -> None:
        assert await asyncio.wait_for(self.pool.apply(w.asquare, (3,)), bound) == 9


ADAPTERS: dict[str, type[Peer]] = {
    cls.key: cls for cls in (ProcPool, ProcessPoolExecutor, MultiprocessingPool, AioMultiprocess, Loky, Pebble)
}
