"""The data plane: large buffers through shared memory, both ways, intact and owned by the receiver;
the pipe path's framing and writes; the size limit and the inline fallback."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import mmap
import multiprocessing
import os
import queue
import resource

import data_tasks
import numpy as np
import pytest
from helpers import wait_until

from procpool import PoisonTask, RetryPolicy, SerializationError, WorkerPool, _child, _shm
from procpool import _messages as m
from procpool._channel import Channel
from procpool._retry import payload_digest

pytestmark = pytest.mark.anyio

BIG = 2 * _shm.THRESHOLD  # out of band
SMALL = _shm.THRESHOLD // 4  # in band


async def test_bytes_bytearray_and_memoryview_round_trip_both_ways(pool):
    """bytes, bytearray and memoryview arguments come back equal and of their own type, large or small."""
    for n in (0, SMALL, BIG, 3 * 1024 * 1024 + 5):
        data = os.urandom(n)
        back = await pool.apply(data_tasks.identity, (data,))
        assert type(back) is bytes and back == data
        back = await pool.apply(data_tasks.identity, (bytearray(data),))
        assert type(back) is bytearray and back == data
        back = await pool.apply(data_tasks.identity, (memoryview(data),))
        assert type(back) is memoryview and back.readonly and back == memoryview(data)
    grid = memoryview(bytearray(8 * BIG)).cast("d", (BIG // 16, 16))
    back = await pool.apply(data_tasks.identity, (grid,))
    assert back.format == "d" and back.shape == grid.shape and not back.readonly and back == grid


async def test_numpy_arrays_round_trip_writable_with_dtype_shape_and_order(pool):
    """numpy arrays of any size, dtype, shape and memory order come back equal and writable."""
    arrays = [
        np.arange(10, dtype=np.int16),
        np.arange(BIG, dtype=np.float64).reshape(-1, 8),
        np.asfortranarray(np.arange(BIG, dtype=np.int32).reshape(64, -1)),
        np.arange(4 * BIG, dtype=np.uint8)[::2],  # not contiguous: pickled in band
        np.zeros(0, dtype=np.complex128),
    ]
    for a in arrays:
        back = await pool.apply(data_tasks.identity, (a,))
        assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)
        assert back.flags.writeable
        back[...] = 0  # it is the caller's own memory
    # several buffers in one message, in keyword arguments and nested in the result
    a, b = np.ones(BIG), np.full(BIG, 2.0)
    x, y = await pool.apply(data_tasks.pair, (), {"a": a, "b": b})
    assert np.array_equal(x, a) and np.array_equal(y, b)


async def test_results_made_in_the_worker_travel_back_out_of_band(pool):
    """Large results built in the worker (bytes, arrays) arrive intact, many in a row."""
    for n in (BIG, 5 * BIG):
        assert await pool.apply(data_tasks.fill, (n, 3)) == bytes([3]) * n
        assert np.array_equal(await pool.apply(data_tasks.array, (n,)), np.arange(n))


async def test_the_receiver_owns_what_it_gets(pool):
    """What a worker keeps from one call is not changed by the shared memory the next calls reuse."""
    first = np.full(BIG, 1, dtype=np.uint8)
    results = []
    for _ in range(3):  # the same worker, whichever: every worker keeps its own
        await pool.apply(data_tasks.keep, (first,))
    for value in range(2, 12):
        results.append(await pool.apply(data_tasks.total, (np.full(BIG, value, dtype=np.uint8),)))
    assert results == [value * BIG for value in range(2, 12)]
    for _ in range(3):
        kept = await pool.apply(data_tasks.kept, ())
        assert np.array_equal(kept, first)


THP = os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled") and hasattr(mmap, "MADV_HUGEPAGE")


def test_a_large_copy_out_of_shared_memory_is_exact_at_any_alignment():
    """copy_out gives an exact bytes or bytearray of any view, at any offset, large or small."""
    source = mmap.mmap(-1, 3 * _shm.HUGE_COPY)
    source.write(os.urandom(3 * _shm.HUGE_COPY))
    view = memoryview(source)
    try:
        for start, size in ((0, _shm.HUGE_COPY), (1, _shm.HUGE_COPY - 1), (4095, 2 * _shm.HUGE_COPY + 7), (64, 100)):
            for sub in (view[start : start + size], view[start : start + size].toreadonly()):
                for kind in (bytes, bytearray):
                    copy = _shm.copy_out(sub, kind)
                    assert type(copy) is kind and copy == sub
                sub.release()
    finally:
        view.release()
        source.close()


@pytest.mark.skipif(not THP, reason="no transparent huge pages here")
async def test_large_results_land_in_memory_advised_for_huge_pages_but_not_in_a_worker(pool):
    """The parent's copy of a large result is advised for huge pages; a worker's (its malloc keeps memory) is not."""
    n = 4 * _shm.HUGE_COPY + 3
    for make in (bytes, bytearray, lambda data: np.frombuffer(data, dtype=np.uint8).copy()):
        value = make(os.urandom(n))
        assert not await pool.apply(data_tasks.argument_is_huge_page_advised, (value,))
        back = await pool.apply(data_tasks.identity, (value,))
        assert type(back) is type(value) and bytes(back) == bytes(value)
        assert data_tasks.huge_page_advised(data_tasks.address_of(back) + n // 2)


def _block_under(array):
    """The parent's landing block (an mmap) under ``array``, found through its buffers' owners."""
    seen = array
    while not isinstance(seen, mmap.mmap):
        seen = seen.obj if isinstance(seen, memoryview) else seen.base
    return seen


async def test_large_array_results_land_in_memory_the_parent_reuses_once_dropped(monkeypatch):
    """A stream of large numpy results, each dropped, faults no fresh pages into the parent."""
    # Giving idle blocks back has a test of its own; here a slow machine must not trigger it.
    monkeypatch.setattr(_shm.Landing, "trim", lambda self: None)
    n = 64 * 1024 * 1024
    async with WorkerPool("landing") as pool:
        for _ in range(2):  # every worker's channel has its blocks
            await asyncio.gather(*(pool.apply(data_tasks.filled, (n, 1)) for _ in range(6)))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for value in range(2, 8):
            array = await pool.apply(data_tasks.filled, (n, value))
            assert array[0] == value and array[-1] == value
            del array
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6
    # fresh memory for each: 16,384 small pages, or 32 huge ones and the small pages around them
    assert faults < 256


async def test_a_large_result_the_caller_keeps_in_any_form_is_never_overwritten(pool):
    """Large results kept as arrays, read-only arrays, views, memoryviews or their block keep their contents."""
    n = 2 * _shm.HUGE_COPY
    kept = []
    for value, keep in enumerate(
        (
            lambda a: a,
            lambda a: a[::2],
            lambda a: memoryview(a),
            lambda a: memoryview(a).toreadonly(),
            _block_under,
        ),
        start=1,
    ):
        array = await pool.apply(data_tasks.filled, (n, value, value == 4))
        assert isinstance(_block_under(array), mmap.mmap)
        kept.append((value, keep(array)))
        del array
        for other in range(100, 106):  # results dropped at once, from every worker
            await asyncio.gather(*(pool.apply(data_tasks.filled, (n, other)) for _ in range(3)))
    for value, held in kept:
        data = np.frombuffer(held, dtype=np.uint8) if not isinstance(held, np.ndarray) else held
        assert data.min() == value == data.max()


def test_a_landing_keeps_at_most_its_limit_and_copies_plainly_beyond():
    """Once the results kept fill LANDING_MAX, further ones are plain copies, and all stay intact."""
    source = mmap.mmap(-1, _shm.LANDING_MAX)
    view = memoryview(source)
    landing = _shm.Landing()
    kept = []
    try:
        for value in range(1, 12):
            view[: 16 * 1024 * 1024] = bytes([value]) * (16 * 1024 * 1024)
            kept.append((value, landing.copy(view[: 16 * 1024 * 1024])))
            assert sum(len(b) for b in landing.blocks) <= _shm.LANDING_MAX
        assert [type(k) for _, k in kept] == [memoryview] * 8 + [bytearray] * 3
        assert all(bytes(k) == bytes([value]) * (16 * 1024 * 1024) for value, k in kept)
        kept.clear()  # all free again: the next one reuses a block
        assert type(landing.copy(view[: 16 * 1024 * 1024])) is memoryview and len(landing.blocks) == 8
    finally:
        landing.close()
        view.release()
        source.close()


async def test_large_copies_neither_use_nor_change_what_others_set_on_ctypes_pythonapi(pool):
    """Large copies work whatever another library set on ctypes.pythonapi, and leave its settings alone."""
    shared = ctypes.pythonapi.PyBytes_AsString
    saved = shared.argtypes, shared.restype
    shared.argtypes, shared.restype = (ctypes.py_object,), ctypes.c_char_p
    try:
        data = os.urandom(2 * _shm.HUGE_COPY)
        assert await pool.apply(data_tasks.identity, (data,)) == data
        assert shared.restype is ctypes.c_char_p and shared(b"theirs") == b"theirs"
    finally:
        shared.argtypes, shared.restype = saved


def _forked_child_reads(array, conn):
    conn.recv()  # the parent has dropped its copy and taken more results meanwhile
    conn.send((int(array.min()), int(array.max())))
    array[:] = 42
    conn.send("written")


async def test_a_fork_of_the_parent_gets_its_own_copy_of_a_landed_array(pool):
    """A forked child's landed array stays its own: the parent's reuse and the child's writes do not cross."""
    n = 2 * _shm.HUGE_COPY
    array = await pool.apply(data_tasks.filled, (n, 1))
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(target=_forked_child_reads, args=(array, theirs))
    child.start()
    try:
        del array
        for value in range(2, 8):  # the block is free in the parent: these reuse it
            last = await pool.apply(data_tasks.filled, (n, value))
        ours.send("go")
        assert ours.recv() == (1, 1)
        assert ours.recv() == "written"
        assert int(last.min()) == 7 == int(last.max())
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0


async def test_a_large_buffer_that_is_not_numpys_arrives_as_a_bytearray(pool):
    """A large out-of-band buffer other than a numpy array's arrives as a bytearray, whatever its size."""
    for n in (BIG, 2 * _shm.HUGE_COPY):
        back = await pool.apply(data_tasks.pickle_buffer, (n,))
        assert type(back) is bytearray and back == b"\x05" * n
        back = await pool.apply(data_tasks.pickle_buffer_of_array, (n,))  # made of an array, by the task
        assert type(back) is bytearray and back == b"\x05" * n


async def test_a_result_that_fails_to_unpickle_leaves_no_landing_block_in_use(pool):
    """When a result fails to unpickle after its array landed, the error held does not keep the block."""
    gc.disable()  # the traceback's cycle must not need the collector
    try:
        with pytest.raises(SerializationError) as caught:
            await pool.apply(data_tasks.array_then_unloadable, (2 * _shm.HUGE_COPY,))
        landings = [w._channel._landing for w in pool.workers if w._channel is not None]
        assert sum(len(landing.blocks) for landing in landings) <= 1  # 0: already given back, unused
        assert all(len(landing._unused()) == len(landing.blocks) for landing in landings)
        assert caught.value is not None
    finally:
        gc.enable()


def test_a_numpy_result_that_came_inline_lands_too():
    """A large numpy result that went through the pipe (the result area was full) arrives intact."""
    n = 2 * _shm.HUGE_COPY
    limit = n + _shm.ALIGN
    fd = _shm.create(limit)
    assert fd is not None
    arena = _shm.Arena(fd, limit)
    landing = _shm.Landing()
    try:
        calls: queue.Queue = queue.Queue()
        results: queue.Queue = queue.Queue()
        for seq in (1, 2):
            calls.put(m.body(seq, m.CALL, m.pickle_call(data_tasks.filled, (n, seq), {})))
        calls.put(m.body(0, m.EXIT))
        state = [0] * m.STATE_SIZE  # RESULT_ACK never moves: nothing read yet
        _child.serve(calls, results, state, arena)
        first, second = results.get(), results.get()
        for seq, reply in ((1, first), (2, b"".join(bytes(p) for p in second))):
            body = bytearray(reply)[m.HEADER.size :]  # as the parent's reader hands a large body on
            array = m.loads(body, arena.view, landing)
            assert int(array.min()) == seq == int(array.max())
        assert not m.spans(memoryview(b"".join(bytes(p) for p in second))[m.HEADER.size :])
    finally:
        landing.close()
        arena.close()


def test_a_landing_gives_back_blocks_unused_since_its_last_trim_and_survives_a_closed_one():
    """trim() unmaps blocks idle across two trims, keeps those in use, and a block closed by hand is dropped."""
    source = mmap.mmap(-1, 64 * 1024 * 1024)
    view = memoryview(source)
    landing = _shm.Landing()
    try:
        kept = landing.copy(view[: 16 * 1024 * 1024])
        landing.copy(view[: 16 * 1024 * 1024])  # dropped at once
        assert len(landing.blocks) == 2
        landing.trim()  # the unused one is idle from now
        assert len(landing.blocks) == 2
        landing.trim()
        assert landing.blocks == [kept.obj]
        small = landing.copy(view[: _shm.HUGE_COPY])  # not in a block over twice its size
        assert len(small.obj) < 2 * _shm.HUGE_COPY + _shm.HUGE_PAGE
        block = small.obj
        small.release()
        del small
        block.close()
        del block
        assert type(landing.copy(view[: _shm.HUGE_COPY])) is memoryview
        assert all(not b.closed for b in landing.blocks)
        del kept
    finally:
        landing.close()
        view.release()
        source.close()


async def test_a_running_pool_gives_back_its_landing_blocks_soon_after_a_stream_ends(pool):
    """Once large results stop coming, the pool's monitor unmaps the parent's landing blocks."""

    def blocks() -> int:
        return sum(len(w._channel._landing.blocks) for w in pool.workers if w._channel is not None)

    for _ in range(2):
        await asyncio.gather(*(pool.apply(data_tasks.filled, (2 * _shm.HUGE_COPY, 1)) for _ in range(6)))
    assert blocks() > 0
    await wait_until(lambda: blocks() == 0)


async def test_large_arrays_outlive_the_pool_that_made_them():
    """Arrays that landed in a pool's blocks stay intact after the pool shuts down."""
    async with WorkerPool("landing") as pool:
        arrays = await asyncio.gather(*(pool.apply(data_tasks.filled, (2 * _shm.HUGE_COPY, v)) for v in range(1, 7)))
    assert [(a.min(), a.max()) for a in arrays] == [(v, v) for v in range(1, 7)]
    arrays[0][:] = 9  # still the caller's, writable
    assert arrays[0].max() == 9


async def test_many_large_calls_at_once_all_arrive(pool):
    """More large calls than the arenas hold at once (prefetched behind each other) all come back right."""
    await pool.apply(data_tasks.identity, (1,))
    arrays = [np.full(BIG // 8, i, dtype=np.int64) for i in range(60)]
    backs = await asyncio.gather(*(pool.apply(data_tasks.total, (a,)) for a in arrays))
    assert backs == [int(a.sum()) for a in arrays]


def test_large_buffers_are_left_out_of_band_and_small_ones_in_band():
    """Pickling keeps buffers of THRESHOLD bytes or more out of the pickle, and smaller ones in it."""
    big = m.pickle_call(data_tasks.identity, (np.zeros(_shm.THRESHOLD, dtype=np.uint8),), {})
    assert isinstance(big, m.OutOfBand) and big.nbytes == _shm.THRESHOLD and len(big) < 1024
    small = m.pickle_call(data_tasks.identity, (np.zeros(_shm.THRESHOLD - 1, dtype=np.uint8),), {})
    assert type(small) is bytes and len(small) > _shm.THRESHOLD - 1


async def test_a_call_with_buffers_out_of_band_is_pickled_once(pool):
    """A call to a plain function with an array out of band pickles its arguments once, its function apart."""
    counter = data_tasks.CountsItsPickling()
    array = np.arange(_shm.THRESHOLD, dtype=np.uint8)
    payload = m.pickle_call(data_tasks.identity, ((array, counter),), {})
    assert isinstance(payload, m.OutOfBand) and payload.function != m.NO_FUNCTION
    assert counter.pickled == 1
    back, _ = await pool.submit(data_tasks.identity, (array, counter))
    assert np.array_equal(back, array)


async def test_the_quarantine_tells_calls_apart_by_their_buffers_and_their_function():
    """A quarantined call with a large array refuses only itself, not its function on other data nor other functions."""
    policy = RetryPolicy(attempts=2, backoff=0, quarantine_after=2)
    poison = np.zeros(_shm.THRESHOLD, dtype=np.uint8)
    poison[0] = 1
    other = np.zeros(_shm.THRESHOLD, dtype=np.uint8)
    async with WorkerPool() as pool:
        with pytest.raises(PoisonTask):
            await asyncio.wait_for(pool.apply(data_tasks.kill_if_marked, (poison,), retry=policy), 60)
        assert await asyncio.wait_for(pool.apply(data_tasks.kill_if_marked, (other,), retry=policy), 60) == 0
        assert await asyncio.wait_for(pool.apply(data_tasks.total, (poison,), retry=policy), 60) == 1
        with pytest.raises(PoisonTask):  # the same call again is refused at once
            await pool.apply(data_tasks.kill_if_marked, (poison,), retry=policy)


async def test_a_large_pickle_goes_to_the_pipe_as_it_is(pool, monkeypatch):
    """A call whose pickle stays large in band is written as the caller's own bytes, after its headers."""
    written: list[list[object]] = []
    write = Channel.write
    monkeypatch.setattr(Channel, "write", lambda self, parts: (written.append(list(parts)), write(self, parts)))
    text = "x" * (2 * _shm.THRESHOLD)
    payload = m.pickle_call(data_tasks.identity, (text,), {})
    assert type(payload) is bytes and len(payload) > _shm.THRESHOLD
    assert await pool.submit(data_tasks.identity, text) == text
    assert any(len(part) == len(payload) and bytes(part) == payload for parts in written for part in parts)


def test_the_quarantine_tells_apart_the_same_bytes_split_into_other_buffers():
    """Two calls whose large arguments hold the same bytes, split at another place, are different calls."""
    blob = bytes(range(256)) * 1024
    first = m.pickle_call(data_tasks.pair, (blob[:70_000], blob[70_000:]), {})
    second = m.pickle_call(data_tasks.pair, (blob[:70_001], blob[70_001:]), {})
    assert isinstance(first, m.OutOfBand) and first == second  # the pickles alone are the same
    assert payload_digest(first) != payload_digest(second)


async def test_a_call_over_the_limit_fails_at_the_call_and_the_pool_goes_on(monkeypatch):
    """A call whose buffers exceed PROCPOOL_SHM_LIMIT_MB raises SerializationError at once, naming the knob."""
    monkeypatch.setenv(_shm.LIMIT_ENV, "1")
    async with WorkerPool() as pool:
        with pytest.raises(SerializationError, match="PROCPOOL_SHM_LIMIT_MB"):
            pool.submit(data_tasks.identity, np.zeros(2 * 1024 * 1024, dtype=np.uint8))
        with pytest.raises(SerializationError, match="PROCPOOL_SHM_LIMIT_MB"):
            await pool.apply(data_tasks.fill, (2 * 1024 * 1024,))  # the result is too large
        assert await pool.apply(data_tasks.fill, (900 * 1024,)) == bytes([7]) * 900 * 1024


async def test_zero_turns_shared_memory_off(monkeypatch):
    """With PROCPOOL_SHM_LIMIT_MB=0 large buffers travel in band, with no limit."""
    monkeypatch.setenv(_shm.LIMIT_ENV, "0")
    assert type(m.pickle_call(data_tasks.identity, (bytes(BIG),), {})) is bytes
    async with WorkerPool() as pool:
        a = np.arange(BIG)
        assert np.array_equal(await pool.apply(data_tasks.identity, (a,)), a)


def test_ring_frees_in_order_and_wraps():
    """The FIFO ring allocates after the newest region, wraps to the start, and refuses what does not fit."""
    ring = _shm.Ring(1024)
    assert ring.alloc(400, 1) == 0
    assert ring.alloc(400, 2) == 448  # sizes are rounded up to ALIGN
    assert ring.alloc(400, 3) is None  # 448 + 448 + 448 > 1024
    assert ring.free_through(1) == [(0, 448)]
    assert ring.alloc(300, 3) == 0  # wraps before the oldest region
    assert ring.alloc(200, 4) is None  # would run into the oldest region
    ring.free_through(3)
    assert not ring.live and ring.alloc(1024, 5) == 0


def test_ring_goes_back_to_the_start_as_soon_as_it_has_room():
    """A stream of messages stays at the start of the area, in pages already resident, instead of running on."""
    ring = _shm.Ring(1 << 20)
    assert ring.alloc(1000, 1) == 0
    assert ring.alloc(1000, 2) == 1024
    for tag in range(3, 50):  # one message in flight behind each new one, as with prefetch
        ring.free_through(tag - 2)
        assert ring.alloc(1000, tag) == (0 if tag % 2 else 1024)


async def test_a_worker_reuses_the_memory_of_a_freed_large_buffer(pool):
    """A worker's malloc keeps a freed 64 MiB block, so the next one like it takes no fresh pages."""
    if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
        pytest.skip("the worker's malloc is tuned only with glibc")
    faults, pages = await pool.apply(data_tasks.faults_of_a_second_buffer, (64 * 1024 * 1024,))
    assert faults < pages // 8, f"{faults} page faults for {pages} pages"


def test_a_result_goes_inline_when_the_result_area_is_full():
    """When the parent has not read earlier results, a large result goes inline instead of waiting."""
    limit = 3 * BIG
    fd = _shm.create(limit)
    assert fd is not None
    arena = _shm.Arena(fd, limit)
    try:
        calls: queue.Queue = queue.Queue()
        results: queue.Queue = queue.Queue()
        for seq in (1, 2):
            calls.put(m.body(seq, m.CALL, m.pickle_call(data_tasks.fill, (2 * BIG, seq), {})))
        calls.put(m.body(0, m.EXIT))
        state = [0] * m.STATE_SIZE  # RESULT_ACK never moves: nothing read yet
        _child.serve(calls, results, state, arena)
        first, second = results.get(), results.get()
        second = b"".join(bytes(p) for p in second)
        for seq, reply in ((1, first), (2, second)):
            got_seq, kind = m.HEADER.unpack_from(reply)
            assert (got_seq, kind) == (seq, m.OK_OOB)
            assert m.loads(memoryview(reply)[m.HEADER.size :], arena.view) == bytes([seq]) * 2 * BIG
        assert m.spans(memoryview(first)[m.HEADER.size :]) and not m.spans(memoryview(second)[m.HEADER.size :])
    finally:
        arena.close()


def test_frame_reader_reads_a_large_body_in_place():
    """A body larger than one read arrives whole, after small ones, through the descriptor reader."""
    r, w = os.pipe()
    try:
        big = os.urandom(m.READ_SIZE * 3)
        reader = m.FrameReader(r)
        got: list[bytes] = []
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        pending = m.frame(b"a") + m.frame(big) + m.frame(b"b")
        while len(got) < 3:
            if pending:
                try:
                    pending = pending[os.write(w, pending) :]
                except BlockingIOError:
                    pass
            try:
                got += [bytes(b) for b in reader.read()]
            except BlockingIOError:
                pass
        assert got == [b"a", big, b"b"]
    finally:
        os.close(r)
        os.close(w)


async def test_map_chunks_gives_the_same_results_in_order_a_list_at_a_time(pool):
    """pool.map(...).chunks() yields lists whose concatenation is the per-item results, in order."""
    got: list[int] = []
    sizes = []
    async for chunk in pool.map(data_tasks.square, range(5000)).chunks():
        assert isinstance(chunk, list) and chunk
        sizes.append(len(chunk))
        got.extend(chunk)
    assert got == [x * x for x in range(5000)]
    assert len(sizes) < 5000  # several results per step


async def test_map_chunks_raises_after_the_results_before_the_failing_item(pool):
    """A failing item ends the chunked iteration with its error, after every result before it."""
    got: list[int] = []
    with pytest.raises(ValueError, match="bad 7"):
        async for chunk in pool.map(data_tasks.fail_on_seven, range(20), chunksize=3).chunks():
            got.extend(chunk)
    assert got == list(range(7))


async def test_leaving_map_chunks_early_cancels_the_rest():
    """Breaking out of a chunked map cancels its chunks still queued or running."""
    async with WorkerPool() as pool:
        async for chunk in pool.map(data_tasks.sleep_with, [b""] + [b"x"] * 20, chunksize=1).chunks():
            assert chunk == [0]
            break
        assert pool.statistics().tasks_cancelled > 0
        assert not pool._tasks.pending
