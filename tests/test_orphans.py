"""No orphans (issue 9, item 6) and no leftovers (item 12): whatever a task starts, and however
the parent dies, no process and no file outlives the pool. Real processes and real signals."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import tasks
from helpers import all_healthy, processes, wait_until

from procpool import TaskTimeout, WorkerPool

pytestmark = pytest.mark.anyio

TESTS = str(Path(__file__).parent)

PARENT = textwrap.dedent(
    """
    import asyncio, json, multiprocessing, os, subprocess, sys, time
    sys.path.insert(0, {tests!r})
    import tasks
    from procpool import WorkerPool

    def helper():
        time.sleep(120)

    async def main():
        pool = WorkerPool()
        await pool.initialize()
        mode, pidfile = {mode!r}, {pidfile!r}
        helper_pid = None
        if mode == "fork-process":
            proc = multiprocessing.get_context("fork").Process(target=helper)
            proc.start()
            helper_pid = proc.pid
        elif mode == "os-fork":
            helper_pid = os.fork()
            if helper_pid == 0:
                time.sleep(120)
                os._exit(0)
        elif mode == "new-session":
            pool.submit(tasks.spawn_new_session_and_wait, pidfile, 120)
        elif mode == "daemon":
            pool.submit(tasks.leave_daemon, pidfile, 120, 120)
        print(json.dumps({{"workers": [w.pid for w in pool.workers], "helper": helper_pid}}), flush=True)
        await asyncio.sleep(120)

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def _wait_gone(procs: list[psutil.Process], timeout: float = 15.0) -> list[psutil.Process]:
    """Wait for every process to exit (a zombie counts as gone); return those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.parametrize(
    ("mode", "sig"),
    [
        ("fork-process", signal.SIGKILL),
        ("os-fork", signal.SIGKILL),
        ("new-session", signal.SIGKILL),
        ("new-session", signal.SIGTERM),
        ("daemon", signal.SIGKILL),
        ("daemon", signal.SIGTERM),
    ],
)
def test_nothing_outlives_a_killed_parent(tmp_path, mode, sig):
    """Workers and everything their tasks started exit when the parent is killed, even while a
    fork of the parent lives on or a task's process left the worker's session."""
    pidfile = str(tmp_path / "grandchild")
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=TESTS, mode=mode, pidfile=pidfile))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    helper: list[psutil.Process] = []
    family: list[psutil.Process] = []
    try:
        info = json.loads(parent.stdout.readline())
        family = processes(info["workers"])
        helper = processes([info["helper"]] if info["helper"] else [])
        if mode in ("new-session", "daemon"):
            deadline = time.monotonic() + 30
            while not os.path.exists(pidfile):
                assert time.monotonic() < deadline, "the task did not start its process"
                time.sleep(0.02)
            family += processes([int(Path(pidfile).read_text())])
        assert len(family) == (4 if mode in ("new-session", "daemon") else 3)
        parent.send_signal(sig)
        parent.wait(30)
        alive = _wait_gone(family)
        assert not alive, f"left behind after the parent died by {sig.name}: {alive}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        _kill(family + helper)
        psutil.wait_procs(helper, timeout=10)


async def test_a_double_forked_daemon_dies_with_its_tasks_timeout(tmp_path):
    """A daemon that a task double-forked into a session of its own is killed with the task at its timeout."""
    pidfile = str(tmp_path / "daemon")
    daemon: list[psutil.Process] = []
    try:
        async with WorkerPool() as pool:
            with pytest.raises(TaskTimeout):
                await pool.apply(tasks.leave_daemon, (pidfile, 120, 120), timeout=3.0)
            daemon = processes([int(Path(pidfile).read_text())])
            alive = _wait_gone(daemon)
            assert not alive, f"the task's daemon outlived its timeout: {alive}"
            await all_healthy(pool)
    finally:
        _kill(daemon)


async def test_a_worker_adopts_and_reaps_the_orphans_its_tasks_leave(tmp_path):
    """An orphan a task leaves is adopted by its worker (so it stays findable) and reaped once it
    exits, while a child a task keeps to wait for later still reports its own exit code."""
    pidfile = str(tmp_path / "orphan")
    orphan: list[psutil.Process] = []
    try:
        async with WorkerPool() as pool:
            # Two workers wait at a gate, so every task below runs on the third, one at a time.
            gate = tmp_path / "gate"
            blockers = [pool.submit(tasks.wait_for_file, str(gate), 60) for _ in range(2)]
            await wait_until(lambda: sum(bool(w.in_flight) and w.is_running(w.in_flight[0]) for w in pool.workers) == 2)
            worker = next(w for w in pool.workers if not w.in_flight)
            await pool.apply(tasks.start_kept_child, (7,))
            pid = await pool.apply(tasks.leave_daemon, (pidfile, 1.0))
            orphan = processes([pid])
            assert orphan, "the orphan exited too early for the test"
            # Adopted once its parent (the daemon's first fork) has exited, a moment after it
            # wrote the pid file.
            await wait_until(lambda: orphan[0].ppid() == worker.pid, timeout=15)

            async def reaped() -> bool:
                await pool.apply(tasks.square, (2,))
                try:
                    return orphan[0].status() != psutil.STATUS_ZOMBIE and not orphan[0].is_running()
                except psutil.NoSuchProcess:
                    return True

            deadline = time.monotonic() + 15
            while not await reaped():
                assert time.monotonic() < deadline, "the exited orphan stayed a zombie of its worker"
            assert await pool.apply(tasks.wait_kept_child) == 7
            gate.touch()
            for blocker in blockers:
                await blocker
    finally:
        _kill(orphan)


def test_a_killed_parent_leaves_no_files_behind(tmp_path):
    """A parent killed by SIGKILL leaves no procpool directory or file in the temp directory."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=TESTS, mode="none", pidfile=""))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    family: list[psutil.Process] = []
    try:
        family = processes(json.loads(parent.stdout.readline())["workers"])
        parent.kill()
        parent.wait(30)
        assert not _wait_gone(family)
        import tempfile

        left = glob.glob(os.path.join(tempfile.gettempdir(), f"procpool-{parent.pid}-*"))
        assert not left, f"left behind: {left}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        _kill(family)
