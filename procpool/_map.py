"""``pool.map``: results in input order, the input read lazily, a bounded window of chunks in flight.

The iterator is an object, not an async generator, so that leaving it early takes effect at once:
``break``, an exception or a cancellation inside ``async for`` drops the last reference to it,
and dropping it cancels the chunks it had submitted (an async generator would be finalized only
later, by the garbage collector's hooks). ``aclose()`` and ``async with`` do the same explicitly.

Retries (``retry=``) are per item, not per chunk. A chunk's results travel together when it
ends, so a chunk whose worker died took the results of its finished items with it, and which item
killed the worker is unknown. Such a chunk is not run again whole: its items run again one per
task (plain calls of ``fn(item)``, under the caller's policy, the chunk's failed run counted as
the first attempt of each). The item that kills workers is then the only one that keeps failing,
and is quarantined alone; the items before it run twice in all (once in the chunk, once alone),
the ones after it once. When an item raises an exception the policy retries, the items before it
are done and kept: that item runs again alone, and the items after it in a new chunk::

    chunk [a b c d] --crash (or timeout)--> a, b, c, d: one task each, with the chunk's attempt
    chunk [a b c d] --c raises, retried---> results of a, b kept; c alone; [d] as a new chunk
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Awaitable, Callable, Iterable, Sized
from typing import Any

from procpool import _child, _retry
from procpool._messages import decode_error, pickle_call
from procpool._progress import ProgressArg, make_progress
from procpool._task import Task
from procpool.errors import Attempt, task_error

__all__ = ("MapIterator",)

# map() without a chunksize sizes chunks to take about this long in a worker.
TARGET_CHUNK_SECONDS = 0.01
MAX_CHUNKSIZE = 8192
# Chunks in flight at once: enough to keep three workers busy while one result is consumed.
WINDOW = 7
# In the window, in place of a chunk's items: an item sent alone as a plain call, ``fn(item)``.
_SINGLE: Any = object()

# The pool's submission: (payload, timeout, retry policy) -> the queued task.
Enqueue = Callable[[bytes, float | None, _retry.RetryPolicy | None], Awaitable[Task]]


class MapIterator:
    """Async iterator over ``fn(item)`` for every item; see [`WorkerPool.map`][procpool.WorkerPool.map]."""

    def __init__(
        self,
        enqueue: Enqueue,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        timeout: float | None,
        progress: ProgressArg,
        label: str,
        retry: _retry.RetryPolicy | None = None,
        count_retry: Callable[[], None] | None = None,
        *,
        run_chunk: Callable[[Callable[[Any], Any], list[Any]], Any] = _child.run_chunk,
        pickle: Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], bytes] = pickle_call,
        target_seconds: float = TARGET_CHUNK_SECONDS,
    ) -> None:
        # run_chunk, pickle and target_seconds: a DaskPool's (its worker's chunk runner, cloudpickle,
        # longer chunks for its costlier round trip); a local pool's by default.
        self._enqueue = enqueue
        self._run_chunk = run_chunk
        self._pickle = pickle
        self._target_seconds = target_seconds
        # Per-item retries need a policy that allows a second run; with attempts=1 a chunk
        # simply fails (or is quarantined) as any task.
        self._retry = retry if retry is not None and retry.attempts > 1 else None
        self._chunk_retry = retry if self._retry is None else _retry.ChunkRetry.of(self._retry)
        self._count_retry = count_retry
        self._fn = fn
        self._items = iter(iterable)
        self._total = len(iterable) if isinstance(iterable, Sized) else None
        self._fixed_size = chunksize
        self._size = chunksize or 1
        self._timeout = timeout
        self._progress = progress
        self._label = label
        self._reporter: Any = None
        # Chunks submitted and not yet consumed, oldest first, with their item counts and, for
        # per-item retries, their items (_SINGLE for an item sent alone as a plain call).
        self._window: collections.deque[tuple[Task, int, Any]] = collections.deque()
        # Values of the oldest finished chunk still to be handed out.
        self._ready: collections.deque[Any] = collections.deque()
        self._error: BaseException | None = None
        self._exhausted = False
        self._closed = False

    def __aiter__(self) -> MapIterator:
        return self

    async def __anext__(self) -> Any:
        while not self._ready:
            if self._error is not None or self._closed:
                error, self._error = self._error, None
                self.close()
                if error is not None:
                    raise error
                raise StopAsyncIteration
            try:
                await self._next_chunk()
            except BaseException:
                self.close()
                raise
        return self._ready.popleft()

    async def _next_chunk(self) -> None:
        if self._reporter is None:
            self._reporter = make_progress(self._progress, self._total, self._label)
        while not self._exhausted and len(self._window) < WINDOW:
            chunk = list(itertools.islice(self._items, self._size))
            if not chunk:
                self._exhausted = True
                break
            self._window.append(await self._submit(chunk))
        if not self._window:
            self._closed = True
            return
        task, count, items = self._window[0]
        try:
            outcome = await task.future
        except _retry.RetryItems as again:  # the chunk's worker died: its items one per task
            self._window.popleft()
            await self._again(items, again.attempts, again.delay)
            return
        self._window.popleft()
        values, error = ([outcome], None) if items is _SINGLE else outcome
        if self._fixed_size is None and task.duration:
            self._size = max(1, min(MAX_CHUNKSIZE, int(self._target_seconds * count / task.duration)))
        self._reporter.advance(len(values))
        self._ready.extend(values)
        if error is not None:
            exc = task_error(decode_error(error))
            if isinstance(items, list) and self._retry is not None:  # per-item: the items before it are done
                attempts: list[Attempt] = []
                step = _retry.next_step(self._retry, attempts, task.pid, None, exc, f"an item of {self._label}")
                if isinstance(step, float):
                    if self._count_retry is not None:
                        self._count_retry()
                    failed = len(values)
                    await self._again(items[failed : failed + 1], attempts, step, items[failed + 1 :])
                    return
            self._error = exc

    async def _submit(self, items: list[Any], attempts: list[Attempt] | None = None) -> tuple[Task, int, Any]:
        """Submit a chunk, or with per-item retries an item alone as a plain call; its window entry."""
        if self._retry is not None and len(items) == 1:
            task = await self._enqueue(self._pickle(self._fn, (items[0],), {}), self._timeout, self._retry)
            if attempts:  # this run is a retry: the earlier attempts count towards its policy
                task.attempts = list(attempts)
            return task, 1, _SINGLE
        payload = self._pickle(self._run_chunk, (self._fn, items), {})
        task = await self._enqueue(payload, self._timeout, self._chunk_retry)
        return task, len(items), items if self._retry is not None else None

    async def _again(
        self, items: list[Any], attempts: list[Attempt], delay: float, rest: list[Any] | None = None
    ) -> None:
        """Run ``items`` again one per task after ``delay``, then ``rest`` as a chunk, at the window's front."""
        if delay > 0:
            await asyncio.sleep(delay)
        entries: list[tuple[Task, int, Any]] = []
        try:
            for item in items:
                entries.append(await self._submit([item], attempts))
            if rest:
                entries.append(await self._submit(rest))
        finally:
            if self._closed:  # closed meanwhile: these were never in the window
                for task, _, _ in entries:
                    task.future.cancel()
            else:
                self._window.extendleft(reversed(entries))

    def chunks(self) -> _Chunks:
        """Iterate over the results a chunk at a time (lists, in input order), not one by one.

        The same iteration, without an ``await`` per item: for many tiny items that is most of
        the cost of consuming them. ``async for chunk in pool.map(fn, items).chunks()``. Results
        the per-item iteration already took are not given again.
        """
        return _Chunks(self)

    async def _next_values(self) -> list[Any]:
        """The results not handed out yet of the oldest finished chunk; StopAsyncIteration at the end."""
        while not self._ready:
            if self._error is not None or self._closed:
                error, self._error = self._error, None
                self.close()
                if error is not None:
                    raise error
                raise StopAsyncIteration
            try:
                await self._next_chunk()
            except BaseException:
                self.close()
                raise
        values = list(self._ready)
        self._ready.clear()
        return values

    def close(self) -> None:
        """Stop: cancel every chunk submitted and not consumed (running ones are killed)."""
        self._closed = True
        window, self._window = self._window, collections.deque()
        for task, _, _ in window:
            loop = task.future.get_loop()
            if not loop.is_closed():
                task.future.cancel()
        if self._reporter is not None:
            self._reporter.close()
            self._reporter = None

    async def aclose(self) -> None:
        """Stop, as ``close()``; for ``contextlib.aclosing`` and async-generator habits."""
        self.close()

    async def __aenter__(self) -> MapIterator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed:
            self.close()


class _Chunks:
    """``MapIterator.chunks()``: the same iterator, a list of results per step."""

    __slots__ = ("_map",)

    def __init__(self, iterator: MapIterator) -> None:
        self._map = iterator

    def __aiter__(self) -> _Chunks:
        return self

    def __anext__(self) -> Awaitable[list[Any]]:
        return self._map._next_values()

    async def aclose(self) -> None:
        """Stop, as ``MapIterator.close()``."""
        self._map.close()

    async def __aenter__(self) -> _Chunks:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._map.close()
