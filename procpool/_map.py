"""``pool.map``: results in input order, the input read lazily, a bounded window of chunks in flight.

The iterator is an object, not an async generator, so that leaving it early takes effect at once:
``break``, an exception or a cancellation inside ``async for`` drops the last reference to it,
and dropping it cancels the chunks it had submitted (an async generator would be finalized only
later, by the garbage collector's hooks). ``aclose()`` and ``async with`` do the same explicitly.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Awaitable, Callable, Iterable, Sized
from typing import Any

from procpool import _child
from procpool._messages import decode_error, pickle_call
from procpool._progress import ProgressArg, make_progress
from procpool._task import Task
from procpool.errors import task_error

__all__ = ("MapIterator",)

# map() without a chunksize sizes chunks to take about this long in a worker.
TARGET_CHUNK_SECONDS = 0.01
MAX_CHUNKSIZE = 8192
# Chunks in flight at once: enough to keep three workers busy while one result is consumed.
WINDOW = 7


class MapIterator:
    """Async iterator over ``fn(item)`` for every item; see [`WorkerPool.map`][procpool.WorkerPool.map]."""

    def __init__(
        self,
        enqueue: Callable[[bytes, float | None], Awaitable[Task]],
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        timeout: float | None,
        progress: ProgressArg,
        label: str,
    ) -> None:
        self._enqueue = enqueue
        self._fn = fn
        self._items = iter(iterable)
        self._total = len(iterable) if isinstance(iterable, Sized) else None
        self._fixed_size = chunksize
        self._size = chunksize or 1
        self._timeout = timeout
        self._progress = progress
        self._label = label
        self._reporter: Any = None
        # Chunks submitted and not yet consumed, oldest first, with their item counts.
        self._window: collections.deque[tuple[Task, int]] = collections.deque()
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
            payload = pickle_call(_child.run_chunk, (self._fn, chunk), {})
            self._window.append((await self._enqueue(payload, self._timeout), len(chunk)))
        if not self._window:
            self._closed = True
            return
        task, count = self._window[0]
        values, error = await task.future
        self._window.popleft()
        if self._fixed_size is None and task.duration:
            self._size = max(1, min(MAX_CHUNKSIZE, int(TARGET_CHUNK_SECONDS * count / task.duration)))
        self._reporter.advance(len(values))
        self._ready.extend(values)
        if error is not None:
            self._error = task_error(decode_error(error))

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
        for task, _ in window:
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
