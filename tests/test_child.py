"""The worker loop and the wire format, driven in-process with plain queues and a real Pipe."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import queue
import sys
import types
import weakref

import tasks

from procpool import _child
from procpool import _messages as m
from procpool._messages import decode_error
from procpool.errors import SerializationError


def call(seq: int, fn, *args) -> bytes:
    return m.body(seq, m.CALL, m.NO_FUNCTION + pickle.dumps((fn, args, {})))


def run(*bodies: bytes, state=None) -> list[tuple[int, int, bytes]]:
    calls: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    for b in (*bodies, m.body(0, m.EXIT)):
        calls.put(b)
    state = state if state is not None else [0] * m.STATE_SIZE
    _child.serve(calls, results, state)
    out = []
    while not results.empty():
        data = results.get()
        seq, kind = m.HEADER.unpack_from(data)
        out.append((seq, kind, data[m.HEADER.size :]))
    return out


def test_serve_runs_calls_in_order_and_stops_on_exit():
    """The loop answers each call in order with its pickled result and returns on EXIT."""
    replies = run(call(1, tasks.square, 3), call(2, tasks.add, 1, 2))
    assert [(s, k) for s, k, _ in replies] == [(1, m.OK), (2, m.OK)]
    assert [pickle.loads(p) for _, _, p in replies] == [9, 3]


def test_serve_reports_errors_with_their_traceback_and_keeps_going():
    """A raising call becomes an ERROR reply that rebuilds the exception with its traceback."""
    replies = run(call(1, tasks.raise_custom, "x"), call(2, tasks.square, 2))
    assert replies[0][1] == m.ERROR and replies[1][1] == m.OK
    err = decode_error(replies[0][2])
    assert isinstance(err, tasks.CustomError) and "raise_custom" in str(err.__cause__)


def test_serve_skips_calls_cancelled_before_they_start():
    """A seq marked in the cancel ring is answered SKIPPED and not run."""
    state = [0] * m.STATE_SIZE
    state[m.CANCEL + 1] = 1
    replies = run(call(1, tasks.square, 3), call(2, tasks.square, 4), state=state)
    assert [(s, k) for s, k, _ in replies] == [(1, m.SKIPPED), (2, m.OK)]


def test_serve_turns_an_unpicklable_result_into_an_error():
    """A result that cannot pickle is reported as SerializationError instead of killing the loop."""
    replies = run(call(1, tasks.unpicklable_result), call(2, tasks.square, 5))
    assert isinstance(decode_error(replies[0][2]), SerializationError)
    assert pickle.loads(replies[1][2]) == 25


def test_frames_match_multiprocessing_connections_wire_format():
    """Frames the parent writes read back with Connection.recv_bytes, and the reader parses send_bytes."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    try:
        bodies = [b"x" * n for n in (0, 1, 40_000)]  # all fit in the pipe buffer: one thread
        for body in bodies:
            writer.send_bytes(body)
        frames = m.FrameReader()
        got: list[bytes] = []
        os.set_blocking(reader.fileno(), False)
        while len(got) < len(bodies):
            try:
                got += frames.feed(os.read(reader.fileno(), 1 << 16))
            except BlockingIOError:
                pass
        assert got == bodies
        os.set_blocking(reader.fileno(), True)
        os.write(writer.fileno(), m.frame(b"hello") + m.frame(b""))
        assert reader.recv_bytes() == b"hello" and reader.recv_bytes() == b""
    finally:
        reader.close()
        writer.close()


def _function_of(payload: bytes, functions: dict[bytes, object]) -> object:
    return m.load_function(memoryview(payload), 0, functions)[0]


def test_a_plain_function_goes_as_a_reference_that_each_side_resolves_once():
    """A call to a plain function names it apart from its pickle; the worker imports each one once, then reuses it."""
    payload = m.pickle_call(tasks.square, (3,), {})
    assert payload[:2] != m.NO_FUNCTION
    functions: dict[bytes, object] = {}
    assert _function_of(payload, functions) is tasks.square
    (key,) = functions
    functions[key] = tasks.add  # what the worker remembers is used, not unpickled again
    assert _function_of(m.pickle_call(tasks.square, (4,), {}), functions) is tasks.add
    replies = run(m.body(1, m.CALL, payload), m.body(2, m.CALL, m.pickle_call(tasks.square, (4,), {})))
    assert [pickle.loads(r[2]) for r in replies] == [9, 16]


def test_a_bound_builtin_method_is_pickled_with_its_object_every_call():
    """A bound builtin method (``a_dict.get``) is not a reference: each call sends its object as it is then."""
    d = {"k": 1}
    first = m.pickle_call(d.get, ("k",), {})
    d["k"] = 2
    second = m.pickle_call(d.get, ("k",), {})
    assert first[:2] == second[:2] == m.NO_FUNCTION
    assert [pickle.loads(r[2]) for r in run(m.body(1, m.CALL, first), m.body(2, m.CALL, second))] == [1, 2]


def test_each_side_forgets_its_references_past_the_bound(monkeypatch):
    """The caller's and the worker's memory of function references are bounded by MAX_REFS."""
    monkeypatch.setattr(m, "_refs", {})
    monkeypatch.setattr(m, "MAX_REFS", 2)
    functions: dict[bytes, object] = {}
    for fn in (tasks.square, tasks.add, tasks.pid):
        assert _function_of(m.pickle_call(fn, (), {}), functions) is fn
        assert len(m._refs) <= 2 and len(functions) <= 2


def test_the_caller_does_not_keep_a_function_alive(monkeypatch):
    """A function the caller has sent is freed with its module: the caller's memory of it is weak."""
    module = types.ModuleType("procpool_test_ephemeral")
    exec("def f(x):\n    return x\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    m.pickle_call(module.f, (1,), {})
    gone = weakref.ref(module.f)
    key = id(module.f)
    assert key in m._refs
    del sys.modules[module.__name__], module
    gc.collect()
    assert gone() is None and key not in m._refs


def test_the_reader_returns_whole_bodies_however_the_pipe_splits_them():
    """A read that ends inside a frame keeps its start, even when the rest looks like a frame of its own."""
    r, w = os.pipe()
    try:
        frames = m.FrameReader(r)
        os.write(w, m.frame(b"one"))
        (one,) = frames.read()
        assert type(one) is memoryview and one == b"one"  # a view: slicing it copies nothing
        # The second half of this body starts with 4 bytes that read as the length of the rest.
        tail = b"y" * 20
        body = b"head" + (len(tail)).to_bytes(4, "big") + tail
        framed = m.frame(b"two") + m.frame(body)
        cut = len(m.frame(b"two")) + 4 + 4
        os.write(w, framed[:cut])
        assert [bytes(b) for b in frames.read()] == [b"two"]
        os.write(w, framed[cut:])
        assert [bytes(b) for b in frames.read()] == [body]
    finally:
        os.close(r)
        os.close(w)
