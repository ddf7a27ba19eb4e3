"""The floors of the payload sweep: echo through bare pipes, and through a memfd per worker.

Three worker processes, one task per worker in flight (blocking reads and writes cannot keep two
in flight without deadlocking once a payload outgrows the pipe), no pickling, no event loop.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import struct
from typing import Any

_HEAD = struct.Struct("!Q")


def _read_exact(fd: int, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if not k:
            raise EOFError
        got += k
    return buf


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _pipe_worker(call_r: int, result_w: int) -> None:
    while True:
        try:
            (n,) = _HEAD.unpack(_read_exact(call_r, _HEAD.size))
        except EOFError:
            return
        data = _read_exact(call_r, n)
        _write_all(result_w, _HEAD.pack(n))
        _write_all(result_w, data)


def _shm_worker(call_r: int, result_w: int, fd: int, size: int) -> None:
    view = memoryview(mmap.mmap(fd, 2 * size))
    while True:
        try:
            (n,) = _HEAD.unpack(_read_exact(call_r, _HEAD.size))
        except EOFError:
            return
        data = bytearray(view[:n])  # the worker's own copy, as a task gets
        view[size : size + n] = data
        _write_all(result_w, _HEAD.pack(n))


class Floor:
    """Three workers of one kind ("raw-pipe" or "raw-shm"), run(payload, tasks) -> seconds."""

    SEGMENT = 64 * 1024 * 1024

    def __init__(self, key: str, window: int) -> None:
        self.shm = key == "raw-shm"
        ctx = multiprocessing.get_context("fork")
        self.workers = []
        for _ in range(3):
            call_r, call_w = os.pipe()
            result_r, result_w = os.pipe()
            if self.shm:
                fd = os.memfd_create("raw-echo")
                os.ftruncate(fd, 2 * self.SEGMENT)
                view = memoryview(mmap.mmap(fd, 2 * self.SEGMENT))
                proc = ctx.Process(target=_shm_worker, args=(call_r, result_w, fd, self.SEGMENT))
            else:
                fd, view = -1, None
                proc = ctx.Process(target=_pipe_worker, args=(call_r, result_w))
            proc.start()
            os.close(call_r)
            os.close(result_w)
            if fd >= 0:
                os.close(fd)
            self.workers.append((proc, call_w, result_r, view))

    def run(self, arg: Any, n: int) -> float:
        import time

        data = memoryview(arg).cast("B")
        size = data.nbytes
        start = time.perf_counter()
        done = 0
        while done < n:
            batch = self.workers[: min(3, n - done)]
            for _, call_w, _, view in batch:
                if self.shm:
                    view[:size] = data
                    _write_all(call_w, _HEAD.pack(size))
                else:
                    _write_all(call_w, _HEAD.pack(size))
                    _write_all(call_w, data)
            for _, _, result_r, view in batch:
                (m,) = _HEAD.unpack(_read_exact(result_r, _HEAD.size))
                back = bytearray(view[self.SEGMENT : self.SEGMENT + m]) if self.shm else _read_exact(result_r, m)
                assert len(back) == size
            done += len(batch)
        return time.perf_counter() - start

    def close(self) -> None:
        for proc, call_w, result_r, _ in self.workers:
            os.close(call_w)
            os.close(result_r)
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
