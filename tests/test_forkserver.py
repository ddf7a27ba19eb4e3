"""Exit statuses and the fork server (issue 9, items 9 and 10): a worker's death is reported with
its real exit code, the monitor never mistakes a dead worker for a live one, and the fork
server's death costs no task. Real processes and real signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import tasks
from helpers import all_healthy, assert_gone, wait_until

from procpool import WorkerCrashed, WorkerPool, _processes

pytestmark = pytest.mark.anyio


def _server_pid() -> int:
    pid = _processes.fork_server_pid()
    assert pid is not None
    return pid


def _status_read_by_multiprocessing(worker, end) -> None:
    """End the worker's process with ``end()``; before the event loop sees the death, wait
    (blocking) for the fork server to write its exit status, then let multiprocessing's own
    cleanup collect it, as every Process.start() does."""
    sentinel = worker.process.sentinel
    end()
    assert multiprocessing.connection.wait([sentinel], timeout=30)
    multiprocessing.active_children()


def _running(pool: WorkerPool, n: int = 3) -> bool:
    return sum(bool(w.in_flight) and w.is_running(w.in_flight[0]) for w in pool.workers) >= n


def _gone(pid: int) -> bool:
    """Whether pid has exited (a zombie counts: it has exited, only its status is unread)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("kill_a_worker_too", [False, True], ids=["server-only", "server-and-worker"])
async def test_the_fork_servers_death_costs_no_task(tmp_path, kill_a_worker_too):
    """When the fork server dies, running tasks finish on their workers and the next replacement
    worker starts at once; only a worker that really dies costs its task."""
    gate = tmp_path / "gate"
    async with WorkerPool(start_method="forkserver") as pool:
        futures = [pool.submit(tasks.wait_for_file, str(gate), 60) for _ in range(3)]
        await wait_until(lambda: _running(pool))
        before = {w.pid for w in pool.workers}
        server = _server_pid()
        victim_pid = pool.workers[0].pid
        os.kill(server, signal.SIGKILL)
        if kill_a_worker_too:
            os.kill(victim_pid, signal.SIGKILL)
        await wait_until(lambda: _gone(server))
        # Every worker's status pipe has closed; let the pool see it before the tasks finish.
        await wait_until(lambda: _processes.fork_server_pid() != server)
        gate.touch()
        results = await asyncio.gather(*futures, return_exceptions=True)
        if kill_a_worker_too:
            crashed = [r for r in results if isinstance(r, WorkerCrashed)]
            assert [r.pid for r in crashed] == [victim_pid], results
            assert sorted(r for r in results if isinstance(r, int)) == sorted(before - {victim_pid})
            assert pool.statistics().tasks_crashed == 1
        else:
            assert all(isinstance(r, int) for r in results), results
            assert sorted(results) == sorted(before)
            assert {w.pid for w in pool.workers} == before
            assert pool.statistics().tasks_crashed == 0
            # A worker that dies after the server did is replaced, and costs only its task.
            fut = pool.submit(tasks.kill_self)
            with pytest.raises(WorkerCrashed):
                await fut
            assert pool.statistics().tasks_crashed == 1
        await all_healthy(pool)
        assert pool._supervisor._start_failures == 0
        assert pool.statistics().workers_restarted == 1
        assert await pool.apply(tasks.square, (7,)) == 49
        assert _server_pid() != server
        await wait_until(lambda: not psutil.pid_exists(server))  # reaped, not left a zombie


async def test_a_crash_the_monitor_sees_first_keeps_its_exit_code(tmp_path):
    """A worker the monitor finds a zombie before its death is reported still fails its task with its real exit code."""
    gate = tmp_path / "gate"
    async with WorkerPool(start_method="forkserver") as pool:
        future = pool.submit(tasks.wait_for_file_then_exit, str(gate), 3)
        await wait_until(lambda: _running(pool, 1))
        worker = next(w for w in pool.workers if w.in_flight)
        looks = 0
        check = pool._monitor.check

        def counting_check(w):
            nonlocal looks
            looks += w is worker
            check(w)

        pool._monitor.check = counting_check  # type: ignore[method-assign]
        # A stopped fork server cannot reap the worker: it stays a zombie, seen by the monitor.
        server = psutil.Process(_server_pid())
        server.suspend()
        try:
            gate.touch()
            await wait_until(lambda: psutil.Process(worker.pid).status() == psutil.STATUS_ZOMBIE)
            seen = looks
            await wait_until(lambda: looks >= seen + 3)
        finally:
            server.resume()
        with pytest.raises(WorkerCrashed) as info:
            await future
        assert info.value.exitcode == 3, str(info.value)
        assert pool.statistics().tasks_crashed == 1
        await all_healthy(pool)


async def test_reaping_a_dead_worker_never_blocks_the_loop(tmp_path):
    """When a worker's sentinel fires before it can be reaped, the loop keeps running and the death
    is reported with the real exit code once it comes."""
    async with WorkerPool(start_method="spawn") as pool:
        links = [os.readlink(f"/proc/self/fd/{w.process.sentinel}") for w in pool.workers]
        gaps: list[float] = []
        stop = False

        async def ticker() -> None:
            last = time.monotonic()
            while not stop:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.get_running_loop().create_task(ticker())
        try:
            with pytest.raises(WorkerCrashed) as info:
                await pool.apply(tasks.close_fd_linked_to, (links, 1.0, 5))
        finally:
            stop = True
            await ticking
        assert info.value.exitcode == 5, str(info.value)
        assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f} s"
        await all_healthy(pool)


async def test_a_death_whose_status_multiprocessing_already_read_keeps_its_exit_code():
    """A worker whose exit status multiprocessing's own cleanup read first still fails its task with that status."""
    async with WorkerPool(start_method="forkserver") as pool:
        future = pool.submit(tasks.slow_pid, 60)
        await wait_until(lambda: _running(pool, 1))
        worker = next(w for w in pool.workers if w.in_flight)
        _status_read_by_multiprocessing(worker, lambda: os.kill(worker.pid, signal.SIGKILL))
        with pytest.raises(WorkerCrashed) as info:
            await asyncio.wait_for(future, 30)
        assert info.value.exitcode == -signal.SIGKILL, str(info.value)
        await all_healthy(pool)


# -- procpool's own fork server (issue 13, cold start), and what its review found ----------------

HIGH_FDS = textwrap.dedent(
    """
    import asyncio, os, resource
    import procpool

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # a busy server's sockets

    async def main():
        async with procpool.WorkerPool() as pool:
            print(await pool.apply(abs, (-3,)))

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def test_a_parent_with_over_a_thousand_descriptors_open_starts_pools(tmp_path):
    """The fork server works when the descriptor it is handed is numbered above 1023 (no select())."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1200:
        pytest.skip("the hard descriptor limit is under 1200 here")
    script = tmp_path / "high_fds.py"
    script.write_text(HIGH_FDS)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr


async def test_a_managers_proxy_among_a_tasks_arguments_works_in_the_worker():
    """A worker has the parent's authkey, so a Manager's queue passed to a task connects; and
    multiprocessing there says the worker's name and the forkserver start method."""
    with multiprocessing.get_context("spawn").Manager() as manager:
        queue = manager.Queue()
        async with WorkerPool(start_method="forkserver") as pool:
            assert await asyncio.wait_for(pool.apply(tasks.put_on, (queue, 42)), 60) == 42
            method, name = await pool.apply(tasks.multiprocessing_facts)
            assert queue.get(timeout=10) == 42
            assert method == "forkserver"
            assert name.startswith("procpool-") and name[len("procpool-") :] in {w.worker_id for w in pool.workers}


# The fork is the point (its child only sleeps), threads or not.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_a_plain_fork_of_the_parent_during_a_start_does_not_stall_the_worker(monkeypatch):
    """A copy of the parent forked while a worker's start spec is being written (another thread's
    os.fork) does not keep the worker waiting: it reads its spec by size, not to end of file."""
    real_launch = _processes.ForkServer.launch
    siblings: list[int] = []

    def launch_then_someone_forks(self, fds):
        out = real_launch(self, fds)
        if not siblings:
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            siblings.append(pid)
        return out

    monkeypatch.setattr(_processes.ForkServer, "launch", launch_then_someone_forks)
    try:
        async with WorkerPool(start_method="forkserver") as pool:
            results = await asyncio.wait_for(asyncio.gather(*(pool.apply(abs, (-i,)) for i in range(30))), 20)
            assert results == list(range(30))
            await all_healthy(pool)
    finally:
        for pid in siblings:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


async def test_a_start_the_server_refuses_fails_with_its_reason_and_the_server_lives_on():
    """Initargs holding 40 pipe ends start fine (up to the kernel's 253 descriptors a message); a
    start over that fails at the call with a clear error, and the fork server is not taken for dead."""
    pipes = [multiprocessing.Pipe() for _ in range(20)]
    try:
        async with WorkerPool(initializer=tasks.keep_objects, initargs=(pipes,)) as pool:
            await all_healthy(pool)
        server = _server_pid()
        too_many = [multiprocessing.Pipe() for _ in range(130)]
        pipes += too_many
        with pytest.raises(OSError, match="could not start a worker: its start arguments hold 266 descriptors"):
            async with WorkerPool(initializer=tasks.keep_objects, initargs=(too_many,)):
                pass
        assert _server_pid() == server and not _gone(server)
    finally:
        for a, b in pipes:
            a.close()
            b.close()


async def test_a_worker_that_exits_255_is_not_taken_for_a_dead_fork_server(tmp_path):
    """A worker's own exit code 255, read first by multiprocessing's cleanup, is reported as such
    and the fork server that started it is kept."""
    go = tmp_path / "go"
    async with WorkerPool(start_method="forkserver") as pool:
        server = _server_pid()
        crash = pool.submit(tasks.wait_for_file_then_exit, str(go), 255)
        await wait_until(lambda: _running(pool, 1))
        worker = next(w for w in pool.workers if w.in_flight)
        _status_read_by_multiprocessing(worker, lambda: go.write_text("go"))
        with pytest.raises(WorkerCrashed) as info:
            await asyncio.wait_for(crash, 30)
        assert info.value.exitcode == 255, str(info.value)
        assert _server_pid() == server
        await all_healthy(pool)


async def test_a_worker_runs_multiprocessing_finalizers_and_atexit_as_its_children_do(tmp_path):
    """When a worker ends, multiprocessing's finalizers run, and atexit handlers too from Python
    3.13 (as in multiprocessing's own children)."""
    async with WorkerPool(start_method="forkserver") as pool:
        await pool.apply(tasks.register_exit_marks, (str(tmp_path),))
    await wait_until(lambda: (tmp_path / "finalizer").exists())
    assert (tmp_path / "atexit").exists() == (sys.version_info >= (3, 13))


MINUS_C = """
import asyncio, procpool
def main():
    return "the script's own"
async def run():
    async with procpool.WorkerPool() as pool:
        try:
            print(await pool.apply(main))
        except procpool.SerializationError as exc:
            print("SerializationError", exc)
asyncio.run(run())
"""


def test_a_function_of_a_python_c_parent_is_not_found_in_a_worker():
    """A ``python -c`` parent's functions cannot reach a worker: the task fails with
    SerializationError, and never runs a function of the fork server's own that has the same name."""
    out = subprocess.run([sys.executable, "-c", MINUS_C], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("SerializationError"), out.stdout


async def test_a_worker_that_looks_multiprocessing_up_first_still_gets_it_configured():
    """A task that looks multiprocessing up (importlib.util.find_spec) before importing it finds
    the parent's authkey, its worker's name and the forkserver start method all the same."""
    authkey = bytes(multiprocessing.current_process().authkey)
    async with WorkerPool(start_method="forkserver") as pool:
        method, name, same_key = await pool.apply(tasks.multiprocessing_facts_after_looking_it_up, (authkey,))
    assert (method, same_key) == ("forkserver", True)
    assert name.startswith("procpool-")


SITECUSTOMIZE_PARENT = textwrap.dedent(
    """
    import asyncio, json, multiprocessing
    import procpool, tasks

    async def main():
        authkey = bytes(multiprocessing.current_process().authkey)
        async with procpool.WorkerPool() as pool:
            print(json.dumps(await pool.apply(tasks.multiprocessing_facts_after_looking_it_up, (authkey,))))

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def test_workers_get_multiprocessing_configured_when_the_fork_server_already_had_it(tmp_path):
    """When the fork server imported multiprocessing itself (a sitecustomize, a .pth file), each
    worker still gets the parent's authkey, its own name and the forkserver start method."""
    (tmp_path / "sitecustomize.py").write_text("import multiprocessing.util\n")
    (tmp_path / "parent.py").write_text(SITECUSTOMIZE_PARENT)
    paths = [str(tmp_path), os.path.dirname(tasks.__file__), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    parent = [sys.executable, str(tmp_path / "parent.py")]
    out = subprocess.run(parent, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    method, name, same_key = json.loads(out.stdout.strip().splitlines()[-1])
    assert (method, same_key) == ("forkserver", True) and name.startswith("procpool-"), out.stdout


async def test_a_process_a_task_leaves_running_does_not_hold_its_worker_at_exit():
    """A non-daemon multiprocessing child a task leaves running does not keep its worker from
    exiting (multiprocessing would join it): shutdown is prompt, and the child is ended too."""
    pool = WorkerPool(start_method="forkserver")
    await pool.initialize()
    child = await pool.apply(tasks.leave_process, (120,))
    await asyncio.wait_for(pool.shutdown(timeout=math.inf), 60)
    assert_gone([child])


async def test_a_fork_server_that_stops_answering_is_replaced(monkeypatch):
    """A fork server that does not answer a start (stopped, wedged) is killed after
    LAUNCH_TIMEOUT and a new one starts the workers; the workers it had started work on."""
    monkeypatch.setattr(_processes, "LAUNCH_TIMEOUT", 1.0)
    async with WorkerPool(start_method="forkserver") as first:
        server = _server_pid()
        os.kill(server, signal.SIGSTOP)
        try:
            async with WorkerPool(start_method="forkserver") as second:
                assert _server_pid() not in (None, server)
                assert await second.apply(abs, (-5,)) == 5
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGCONT)
        await wait_until(lambda: _gone(server))
        assert await first.apply(abs, (-6,)) == 6
        await all_healthy(first)
