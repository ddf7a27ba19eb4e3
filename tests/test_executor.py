"""procpool.Executor: a concurrent.futures.Executor on real worker processes, used from any thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import tasks
from helpers import assert_gone

import procpool
from procpool import (
    BrokenPool,
    Executor,
    PoolClosed,
    RemoteTraceback,
    SerializationError,
    TaskExited,
    TaskTimeout,
    WorkerCrashed,
)
from procpool._executor_core import INITIAL_LIMIT

# Every wait in these tests is bounded by this: generous, so a loaded CI machine never fails
# a test that is merely slow, while a deadlock still fails rather than hangs.
DEADLINE = 30


class Tracked:
    """An executor whose worker pids are recorded, so the test can check that they all exit."""

    def __init__(self, **kwargs: object) -> None:
        self.executor = Executor(**kwargs)  # type: ignore[arg-type]
        self.pids: set[int] = set()

    def note(self) -> None:
        self.pids.update(self.executor._processes)

    def close(self) -> None:
        self.note()
        self.executor.shutdown(wait=True, cancel_futures=True)
        assert not self.executor._core.thread.is_alive()
        assert_gone(sorted(self.pids))


@pytest.fixture
def tracked():
    """A one-pool executor; shut down after the test, and none of its workers may survive."""
    t = Tracked(max_workers=3)
    try:
        yield t
    finally:
        t.close()


def warm(executor: Executor) -> set[int]:
    """Run tasks until all workers have answered; return their pids."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        executor.submit(tasks.square, 1).result(DEADLINE)
        pids = set(executor._processes)
        if len(pids) == executor._max_workers:
            return pids
    raise AssertionError("workers did not start")


def starmap_fail(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def pid_then_sleep(path: str, seconds: float) -> None:
    Path(path + ".tmp").write_text(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(seconds)


def raise_system_exit() -> None:
    raise SystemExit(3)


def failing_init() -> None:
    raise ValueError("error in initializer")


# -- the Executor API ----------------------------------------------------------------------------


def test_is_a_concurrent_futures_executor_exported_by_procpool(tracked):
    """procpool.Executor is a concurrent.futures.Executor and its futures are concurrent futures."""
    executor = tracked.executor
    assert procpool.Executor is Executor and isinstance(executor, concurrent.futures.Executor)
    future = executor.submit(tasks.add, 2, b=40)
    assert isinstance(future, concurrent.futures.Future) and future.result(DEADLINE) == 42
    assert executor.submit(tasks.async_double, 21).result(DEADLINE) == 42


def test_max_workers_rounds_up_to_whole_pools():
    """max_workers=4 gives two pools of three workers, all of them running tasks."""
    t = Tracked(max_workers=4)
    try:
        assert t.executor._max_workers == 6 and t.executor.pools == 2
        assert len(warm(t.executor)) == 6
    finally:
        t.close()


def test_max_tasks_per_child_replaces_each_worker_after_its_tasks():
    """max_tasks_per_child (ProcessPoolExecutor's name) recycles workers; forkserver stays the default."""
    t = Tracked(max_workers=3, max_tasks_per_child=1)
    try:
        executor = t.executor
        assert executor._mp_context.get_start_method() == "forkserver"
        pids = [executor.submit(tasks.pid).result(DEADLINE) for _ in range(6)]
        t.pids.update(pids)
        assert len(set(pids)) == 6
    finally:
        t.close()


def test_bad_arguments_raise_in_the_caller():
    """A bad max_workers, pool option or the fork start method raises at construction."""
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            Executor(bad)
    with pytest.raises(ValueError, match="fork"):
        Executor(3, mp_context=multiprocessing.get_context("fork"))
    with pytest.raises(ValueError, match="task_timeout"):
        Executor(3, task_timeout=-1)
    with pytest.raises(TypeError):
        Executor(3, no_such_option=1)


def test_map_is_ordered_for_every_chunksize_and_several_iterables(tracked):
    """map() yields fn(*args) in input order, whatever the chunk size."""
    executor = tracked.executor
    for chunksize in (1, 3, 7, 100):
        assert list(executor.map(tasks.add, range(20), range(20), chunksize=chunksize)) == [2 * i for i in range(20)]
    assert list(executor.map(tasks.square, [])) == []
    with pytest.raises(ValueError):
        executor.map(tasks.square, range(3), chunksize=0)


def test_map_yields_the_values_before_a_failing_item_then_its_error(tracked):
    """An error mid-chunk: the chunk's earlier values come first, then the item's own exception."""
    results = tracked.executor.map(starmap_fail, range(10), [6] * 10, chunksize=4)
    assert [next(results) for _ in range(6)] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="bad item 6") as info:
        next(results)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "starmap_fail" in str(info.value.__cause__)


def test_map_timeout_is_a_deadline_for_the_whole_iteration(tracked):
    """map(timeout=...) raises TimeoutError once the deadline passes, after the results in time."""
    results = []
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        for value in tracked.executor.map(tasks.sleep_then, [0, 0, 3], ["a", "b", "c"], timeout=1):
            results.append(value)
    assert results == ["a", "b"] and time.monotonic() - start < DEADLINE


def test_map_with_buffersize_reads_the_input_as_results_are_consumed(tracked):
    """map(buffersize=2) submits no more than two chunks ahead of the consumer."""
    consumed = []

    def numbers():
        for i in range(100):
            consumed.append(i)
            yield i

    results = tracked.executor.map(tasks.square, numbers(), buffersize=2)
    assert len(consumed) == 2
    assert next(results) == 0
    assert len(consumed) == 3
    assert list(results) == [i * i for i in range(1, 100)]


def test_errors_are_procpools_typed_errors_raised_by_result(tracked):
    """A task's own exception, an unpicklable call and SystemExit arrive typed through result()."""
    executor = tracked.executor
    with pytest.raises(tasks.CustomError, match="boom") as info:
        executor.submit(tasks.raise_custom, "boom").result(DEADLINE)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    with pytest.raises(SerializationError) as unpicklable:
        executor.submit(tasks.square, lambda: None).result(DEADLINE)
    assert isinstance(unpicklable.value, pickle.PicklingError)
    with pytest.raises(TaskExited):
        executor.submit(raise_system_exit).result(DEADLINE)
    for bad_result in (tasks.unpicklable_result, tasks.unloadable_result):
        with pytest.raises(SerializationError):
            executor.submit(bad_result).result(DEADLINE)
    with pytest.raises(SerializationError):
        executor.submit(tasks.square, tasks.Unloadable()).result(DEADLINE)
    assert executor.submit(tasks.square, 3).result(DEADLINE) == 9
    assert not executor._broken


def test_with_options_sets_a_per_task_timeout(tracked):
    """with_options(task_timeout=...) fails only that task with TaskTimeout; the executor goes on."""
    executor = tracked.executor
    slow = executor.with_options(task_timeout=0.5).submit(tasks.sleep_then, 60, "late")
    with pytest.raises(TaskTimeout):
        slow.result(DEADLINE)
    assert executor.submit(tasks.square, 4).result(DEADLINE) == 16
    timed = executor.with_options(task_timeout=DEADLINE)
    assert list(timed.map(tasks.square, range(5), chunksize=2)) == [0, 1, 4, 9, 16]


# -- crashes -------------------------------------------------------------------------------------


def test_a_killed_worker_fails_only_its_task(tracked):
    """A task that SIGKILLs its worker fails with WorkerCrashed; every other task succeeds."""
    executor = tracked.executor
    tracked.pids.update(warm(executor))
    others = [executor.submit(tasks.sleep_then, 0.05, i) for i in range(20)]
    crash = executor.submit(tasks.kill_self)
    more = [executor.submit(tasks.square, i) for i in range(20)]
    with pytest.raises(WorkerCrashed) as info:
        crash.result(DEADLINE)
    assert info.value.pid in tracked.pids
    assert [f.result(DEADLINE) for f in others] == list(range(20))
    assert [f.result(DEADLINE) for f in more] == [i * i for i in range(20)]
    assert not executor._broken
    tracked.pids.update(warm(executor))


def test_a_worker_killed_from_outside_fails_only_its_task(tracked, tmp_path):
    """SIGKILL of a worker mid-task from outside: that task gets WorkerCrashed, the executor goes on."""
    executor = tracked.executor
    tracked.pids.update(warm(executor))
    pidfile = tmp_path / "pid"
    running = executor.submit(pid_then_sleep, str(pidfile), 60)
    deadline = time.monotonic() + DEADLINE
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.005)
    os.kill(int(pidfile.read_text()), 9)
    with pytest.raises(WorkerCrashed):
        running.result(DEADLINE)
    assert executor.submit(tasks.square, 5).result(DEADLINE) == 25
    tracked.pids.update(warm(executor))


def test_a_failing_initializer_breaks_the_executor():
    """Workers that cannot start fail the futures with BrokenPool, a BrokenExecutor, and submit raises it."""
    t = Tracked(max_workers=3, initializer=failing_init)
    try:
        with pytest.raises(concurrent.futures.BrokenExecutor):
            t.executor.submit(tasks.square, 2).result(DEADLINE)
        assert t.executor._broken
        with pytest.raises(BrokenPool):
            t.executor.submit(tasks.square, 2)
    finally:
        t.close()


# -- threads and loops ---------------------------------------------------------------------------


def test_submits_from_eight_threads_at_once(tracked):
    """Eight threads submitting together each get every one of their results, correct."""
    executor = tracked.executor
    barrier = threading.Barrier(8)

    def worker(offset: int) -> list[int]:
        barrier.wait(DEADLINE)
        futures = [executor.submit(tasks.add, offset, i) for i in range(300)]
        return [f.result(DEADLINE) for f in futures]

    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        results = list(threads.map(worker, [1000 * k for k in range(8)]))
    for k, values in enumerate(results):
        assert values == [1000 * k + i for i in range(300)]


def test_shutdown_racing_submits_leaves_no_future_unresolved():
    """Submits racing shutdown() either raise PoolClosed or return a future that gets resolved."""
    t = Tracked(max_workers=3)
    executor = t.executor
    accepted: list[concurrent.futures.Future[int]] = []
    refused = []
    go = threading.Barrier(5)
    submitting = threading.Event()

    def submitter() -> None:
        go.wait(DEADLINE)
        for i in range(2000):
            try:
                accepted.append(executor.submit(tasks.square, i))
            except PoolClosed:
                refused.append(i)
                return
            if i == 10:
                submitting.set()

    threads = [threading.Thread(target=submitter) for _ in range(4)]
    for thread in threads:
        thread.start()
    go.wait(DEADLINE)
    assert submitting.wait(DEADLINE)
    t.note()
    executor.shutdown(wait=True, cancel_futures=True)
    for thread in threads:
        thread.join(DEADLINE)
    done, not_done = concurrent.futures.wait(accepted, timeout=DEADLINE)
    assert not not_done
    assert refused or len(accepted) == 8000
    for future in done:
        assert future.cancelled() or future.result() >= 0
    with pytest.raises(PoolClosed, match="after shutdown"):
        executor.submit(tasks.square, 1)
    t.close()


def test_cancel_futures_cancels_what_waits_and_finishes_what_runs():
    """shutdown(cancel_futures=True) cancels queued futures; the ones handed to workers complete."""
    t = Tracked(max_workers=3)
    executor = t.executor
    t.pids.update(warm(executor))
    futures = [executor.submit(tasks.sleep_then, 0.2, i) for i in range(40)]
    executor.shutdown(wait=True, cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    finished = [f for f in futures if not f.cancelled()]
    assert len(cancelled) >= len(futures) - INITIAL_LIMIT
    assert finished and all(f.result(0) == futures.index(f) for f in finished)
    t.close()


def test_a_cancelled_future_never_runs(tracked, tmp_path):
    """A future cancelled while it waits in the executor's queue is never run."""
    executor = tracked.executor
    blockers = [executor.submit(tasks.sleep_then, 0.3, i) for i in range(INITIAL_LIMIT)]
    marker = tmp_path / "ran"
    victim = executor.submit(tasks.count_and_return, str(marker), 1)
    assert victim.cancel()
    after = executor.submit(tasks.square, 3)
    assert after.result(DEADLINE) == 9 and all(f.result(DEADLINE) is not None for f in blockers)
    assert not marker.exists()


def test_run_in_executor_from_a_running_loop(tracked):
    """loop.run_in_executor(executor, fn, *args) works and never blocks the loop meanwhile."""
    executor = tracked.executor

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        results = await asyncio.gather(
            loop.run_in_executor(executor, tasks.sleep_then, 0.3, "slow"),
            *(loop.run_in_executor(executor, tasks.square, i) for i in range(10)),
        )
        ticking.cancel()
        assert ticks >= 5  # the loop kept running while the tasks ran
        return results

    assert asyncio.run(asyncio.wait_for(main(), DEADLINE)) == ["slow", *(i * i for i in range(10))]


def test_shutdown_from_a_done_callback_does_not_deadlock():
    """shutdown(wait=True) from a callback on the executor's own thread returns instead of hanging."""
    t = Tracked(max_workers=3)
    called = threading.Event()

    def stop(_: object) -> None:
        t.executor.shutdown(wait=True)
        called.set()

    t.executor.submit(tasks.square, 2).add_done_callback(stop)
    assert called.wait(DEADLINE)
    t.close()


def test_dropping_the_executor_stops_its_workers():
    """An executor nobody references any more shuts down: its thread and workers end."""
    executor = Executor(3)
    pids = warm(executor)
    thread = executor._core.thread
    del executor
    gc.collect()
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert_gone(sorted(pids))


@pytest.mark.parametrize("ending", ["exit", "shutdown(wait=False)"])
def test_interpreter_exit_with_work_pending_finishes_it_and_leaves_no_process(tmp_path, ending):
    """A script that exits with tasks pending runs them, refuses work from atexit, and leaves no worker."""
    script = tmp_path / "pending.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import atexit, json, sys
            sys.path.insert(0, {str(Path(tasks.__file__).parent)!r})
            import tasks
            from procpool import Executor, PoolClosed

            def submit_too_late():
                try:
                    executor.submit(tasks.square, 2)
                except PoolClosed as exc:
                    print("refused:", exc, flush=True)

            if __name__ == "__main__":
                # Only here: the fork server imports this module too, and must not run the hook.
                atexit.register(submit_too_late)
                executor = Executor(3)
                executor.submit(tasks.square, 2).result()
                futures = [executor.submit(tasks.sleep_then, 0.2, i) for i in range(12)]
                futures[-1].add_done_callback(lambda f: print("last", f.result(), flush=True))
                print(json.dumps(sorted(executor._processes)), flush=True)
                if {ending == "shutdown(wait=False)"}:
                    executor.shutdown(wait=False)
            """
        )
    )
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=DEADLINE)
    finally:
        if child.poll() is None:
            for proc in psutil.Process(child.pid).children(recursive=True):
                proc.kill()
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    lines = out.splitlines()
    pids = json.loads(lines[0])
    assert len(pids) == 3, out
    assert lines[1:] == ["last 11", "refused: cannot schedule new futures after interpreter shutdown"], out
    assert not err, err
    assert_gone(pids)
