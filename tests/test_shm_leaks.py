"""Shared memory never outlives its worker: not after a task, a crash, a timeout kill, a
cancellation, a pool shutdown, nor the parent's SIGKILL (no mapping, no descriptor, nothing in
/dev/shm, no resource-tracker warning)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import data_tasks
import numpy as np
import psutil
import pytest
from helpers import all_healthy, assert_gone, pids_of, wait_until

from procpool import TaskTimeout, WorkerCrashed, WorkerPool

pytestmark = pytest.mark.anyio

ARENA = "procpool-arena"
BIG = np.ones(1 << 17)  # 1 MiB: out of band


def arenas(pid: int | str = "self") -> tuple[int, int]:
    """How many arena mappings and descriptors a process holds."""
    with open(f"/proc/{pid}/maps") as f:
        mapped = sum(ARENA in line for line in f)
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds += ARENA in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return mapped, fds


def shm_names() -> set[str]:
    """Named shared memory procpool or multiprocessing.shared_memory could have left (the
    machine's other programs' semaphores are not ours to judge)."""
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return {n for n in names if "procpool" in n or n.startswith(("psm_", "wnsm_"))}


async def test_each_worker_has_one_arena_and_a_task_leaves_nothing(pool):
    """Three workers map three arenas in the parent; tasks moving buffers add none."""
    before = arenas()
    assert before == (3, 3)
    for _ in range(5):
        await asyncio.gather(*(pool.apply(data_tasks.identity, (BIG,)) for _ in range(6)))
    assert arenas() == before
    for pid in pids_of(pool):
        assert arenas(pid) == (1, 1)


@pytest.mark.parametrize("how", ["crash", "timeout", "cancel"])
async def test_a_killed_worker_takes_its_arena_with_it(pool, how):
    """After a worker dies holding a large call (crash, timeout kill, cancellation), the parent
    has let go of its arena: still one per live worker."""
    pool._test_seen_pids.update(pids_of(pool))  # type: ignore[attr-defined]
    if how == "crash":
        with pytest.raises(WorkerCrashed):
            await pool.apply(data_tasks.kill_self_after_copy, (BIG,))
    elif how == "timeout":
        with pytest.raises(TaskTimeout):
            await pool.apply(data_tasks.sleep_with, (BIG, 60), timeout=0.3)
    else:
        future = pool.submit(data_tasks.sleep_with, BIG, 60)
        # Running, not only sent: cancelling a running task kills its worker, a queued one is dropped.
        await wait_until(lambda: any(w.in_flight and w.is_running(w.in_flight[0]) for w in pool.workers))
        future.cancel()
    await all_healthy(pool)
    pool._test_seen_pids.update(pids_of(pool))  # type: ignore[attr-defined]
    assert arenas() == (3, 3)
    assert await pool.apply(data_tasks.total, (BIG,)) == BIG.size


async def test_shutdown_releases_every_arena_and_descriptor():
    """After shutdown the parent maps no arena and holds exactly the descriptors it had before."""
    # The first pool of a process opens what the process keeps for good (the fork server's
    # socket, the lifeline, multiprocessing's heap that holds the workers' shared state and is
    # reused once a pool object is collected): open them first, so that what is measured is
    # one pool's own resources.
    warm = WorkerPool()
    await warm.initialize()
    await warm.shutdown()
    del warm
    gc.collect()
    fds_before = set(os.listdir("/proc/self/fd"))
    shm_before = shm_names()
    pool = WorkerPool()
    await pool.initialize()
    pids = pids_of(pool)
    await asyncio.gather(*(pool.apply(data_tasks.identity, (BIG,)) for _ in range(9)))
    await pool.shutdown()
    assert_gone(pids)
    assert arenas() == (0, 0)
    left = set(os.listdir("/proc/self/fd")) - fds_before
    assert not left, {fd: _target(fd) for fd in left}
    assert shm_names() <= shm_before


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


PARENT = textwrap.dedent(
    """
    import asyncio, json, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    import data_tasks
    from procpool import WorkerPool

    async def main():
        pool = WorkerPool()
        await pool.initialize()
        await asyncio.gather(*(pool.apply(data_tasks.identity, (np.ones(1 << 17),)) for _ in range(6)))
        print(json.dumps([w.pid for w in pool.workers]), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the test has looked
        if {clean!r}:
            await pool.shutdown()
            print("done", flush=True)
            return
        await asyncio.sleep(120)

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


@pytest.mark.parametrize("clean", [True, False], ids=["shutdown", "parent-sigkill"])
def test_the_parents_death_or_exit_leaves_no_shared_memory(tmp_path, clean):
    """A parent that exits or is SIGKILLed leaves no worker, no arena mapped anywhere, nothing in
    /dev/shm, and prints no resource-tracker warning."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=str(Path(__file__).parent), clean=clean))
    shm_before = shm_names()
    # stdin is a pipe the parent blocks on until the test has looked (an inherited stdin at EOF
    # let it shut down while the test was still reading its workers' /proc).
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        workers = json.loads(parent.stdout.readline())
        for pid in workers:
            assert arenas(pid) == (1, 1)
        if not clean:
            parent.send_signal(signal.SIGKILL)
        _, err = parent.communicate("go\n", timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert_gone(workers, timeout=30)
    for pid in workers:
        try:
            assert arenas(pid) == (0, 0)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass  # gone
    assert not psutil.pid_exists(parent.pid) or psutil.Process(parent.pid).status() == psutil.STATUS_ZOMBIE
    assert shm_names() <= shm_before
    assert "resource_tracker" not in err and "leaked" not in err, err
