"""The pool's supervision of its workers: start deadlines, recycling deadlines, progress, verdicts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import attacks
import pytest
import tasks
from helpers import assert_gone, pids_of, wait_until

import procpool._supervisor
from procpool import BrokenPool, WorkerCrashed, WorkerPool, WorkerStuck

pytestmark = pytest.mark.anyio


async def test_a_hanging_initializer_breaks_the_pool_after_start_timeout():
    """Workers whose initializer never returns count as failed starts after start_timeout: BrokenPool, no hang."""
    pool = WorkerPool(initializer=attacks.hang_forever, start_timeout=0.5)
    seen: set[int] = set()

    async def start() -> None:
        task = asyncio.ensure_future(pool.initialize())
        while not task.done():
            seen.update(pids_of(pool))
            await asyncio.sleep(0.01)
        await task

    with pytest.raises(BrokenPool, match=r"start_timeout=0\.5"):
        await asyncio.wait_for(start(), 30)
    with pytest.raises(BrokenPool):
        await asyncio.wait_for(pool.apply(attacks.ident, (1,)), 30)
    await pool.shutdown()
    assert_gone(sorted(seen))


async def test_start_timeout_is_checked():
    """start_timeout must be a positive number of seconds or None."""
    with pytest.raises(ValueError, match="start_timeout"):
        WorkerPool(start_timeout=0)


async def test_a_recycled_worker_left_with_a_non_daemon_thread_is_killed_and_refilled(monkeypatch):
    """A worker that cannot exit after recycling (a stray non-daemon thread) is killed and its slot refilled."""
    monkeypatch.setattr(procpool._supervisor, "RETIRE_GRACE", 0.5)
    async with WorkerPool(max_tasks_per_worker=1) as pool:
        old = await asyncio.wait_for(pool.apply(attacks.leave_thread, (120,)), 30)
        await wait_until(lambda: old not in pids_of(pool) and all(w.state == "idle" for w in pool.workers))
        assert pool.get_status()["workers_healthy"] == 3
        assert_gone([old])


async def test_a_task_waiting_on_a_busy_child_process_is_not_stuck():
    """A task blocked on a child process that uses CPU makes progress and is not judged stuck."""
    async with WorkerPool(stuck_after=1.0) as pool:
        await asyncio.wait_for(pool.apply(attacks.child_burns_cpu, (3.0,)), 60)
        assert pool.get_status()["workers_stuck"] == 0


async def test_a_task_waiting_on_an_idle_child_is_still_stuck():
    """A task blocked on a child that uses no CPU is still judged stuck (the descendants' CPU is what counts)."""
    async with WorkerPool(stuck_after=0.5) as pool:
        with pytest.raises(WorkerStuck):
            await asyncio.wait_for(pool.apply(attacks.child_sleeps, (60,)), 60)


def test_stuck_after_has_a_floor():
    """stuck_after below 0.1 s is refused instead of spinning the monitor."""
    with pytest.raises(ValueError, match=r"at least 0\.1"):
        WorkerPool(stuck_after=1e-6)


def test_max_memory_mb_errors_speak_of_megabytes():
    """A bad max_memory_mb is reported in megabytes, not seconds."""
    with pytest.raises(ValueError, match="megabytes"):
        WorkerPool(max_memory_mb=-1)
    with pytest.raises(TypeError, match="megabytes"):
        WorkerPool(max_memory_mb="big")


async def test_a_stopped_worker_reports_how_it_ended():
    """A worker found stopped by the monitor fails its task with the real exit status (SIGKILL), not 'still running'."""
    async with WorkerPool() as pool:
        future = pool.submit(tasks.slow_pid, 60)
        await wait_until(lambda: any(w.in_flight and w.is_running(w.in_flight[0]) for w in pool.workers))
        worker = next(w for w in pool.workers if w.in_flight)
        os.kill(worker.pid, signal.SIGSTOP)
        with pytest.raises(WorkerCrashed) as info:
            await asyncio.wait_for(future, 30)
        assert info.value.exitcode == -signal.SIGKILL
        assert "signal SIGKILL" in str(info.value) and "stopped" in str(info.value)


def test_a_script_without_the_main_guard_is_told_what_to_do(tmp_path):
    """Under spawn (where each worker imports the main module as it starts), a script that starts
    a pool without the __main__ guard gets BrokenPool naming the guard."""
    script = tmp_path / "noguard.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            from procpool import WorkerPool

            async def main():
                async with WorkerPool(start_method="spawn") as pool:
                    print(await pool.apply(abs, (-3,)))

            asyncio.run(main())
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert "BrokenPool" in proc.stderr
    assert 'if __name__ == "__main__":' in proc.stderr.splitlines()[-1]
