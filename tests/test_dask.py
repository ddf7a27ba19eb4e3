"""DaskPool behaviour beyond the shared contract (tests/test_pool_contract.py): its own cluster's
lifecycle, a cluster started separately and reached by address, and the failures only a
cluster has (a task never re-run, a lost scheduler, a worker that cannot import the handler).
Everything runs on 127.0.0.1; every process a test starts is stopped by pid and checked gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import sched_tasks as st
import tasks
from helpers import assert_gone, wait_until

from procpool import POOL_SIZE, BrokenPool, PoisonTask, PoolClosed, PoolState, RetryPolicy, TaskTimeout, WorkerCrashed

distributed = pytest.importorskip("distributed")
from procpool.dask import DaskPool  # noqa: E402

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).resolve().parent
# A separately started cluster may take a while to import dask on a loaded machine.
CLUSTER_START_DEADLINE = 60.0
# The dask command line, run by this interpreter (its venv has distributed).
DASK = [sys.executable, "-m", "dask"]


def _pids(pool: DaskPool) -> list[int]:
    return [w.pid for w in pool.workers if w.pid is not None]


async def _healthy(pool: DaskPool) -> None:
    await wait_until(lambda: pool.health == "healthy" and len(_pids(pool)) == POOL_SIZE, timeout=60)


class Cluster:
    """A ``dask scheduler`` and a ``dask worker --nworkers 3 --nthreads 1``, started as subprocesses."""

    def __init__(self, address: str, scheduler: subprocess.Popen[bytes], worker: subprocess.Popen[bytes]) -> None:
        self.address = address
        self.scheduler = scheduler
        self.worker = worker


@contextlib.contextmanager
def separate_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Start a cluster the way an operator would (docs/scale-out.md), on 127.0.0.1; stop every process it made."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
        # As docs/scale-out.md tells operators: a task whose worker died is not run again.
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
    }
    scheduler_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "wb")  # noqa: SIM115 - closed in finally
    procs: list[subprocess.Popen[bytes]] = []
    seen: set[int] = set()
    try:
        common = {"env": env, "stdout": log, "stderr": subprocess.STDOUT, "cwd": tmp_path}
        scheduler = subprocess.Popen(
            [
                *DASK,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--dashboard-address",
                "127.0.0.1:0",
                "--scheduler-file",
                str(scheduler_file),
            ],
            **common,
        )
        procs.append(scheduler)
        deadline = time.monotonic() + CLUSTER_START_DEADLINE
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert scheduler.poll() is None, (tmp_path / "cluster.log").read_text()
            assert time.monotonic() < deadline, "the scheduler did not write its file in time"
            time.sleep(0.05)
        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen(
            [
                *DASK,
                "worker",
                address,
                "--nworkers",
                "3",
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--local-directory",
                str(tmp_path),
            ],
            **common,
        )
        procs.append(worker)
        yield Cluster(address, scheduler, worker)
    finally:
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                seen.update(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
            seen.add(proc.pid)
        # SIGKILL, by pid: a graceful stop of dask's worker command takes ~10 s, and nothing
        # here needs it. The nannies' worker processes are killed by pid as well.
        for pid in seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in procs:
            proc.wait()
        log.close()
        assert_gone(sorted(seen))


async def test_own_cluster_listens_on_loopback_and_is_closed_at_shutdown():
    """Without an address the pool starts three one-thread workers on 127.0.0.1 and closes that cluster at shutdown."""
    async with DaskPool("own") as pool:
        address = pool.scheduler_address
        assert address is not None and address.startswith("tcp://127.0.0.1:")
        assert all(w.address.startswith("tcp://127.0.0.1:") for w in pool.workers)
        pids = _pids(pool)
        assert len(set(pids)) == POOL_SIZE
        assert len({await pool.apply(tasks.slow_pid, (0.3,)) for _ in range(1)}) == 1
    assert pool.state is PoolState.CLOSED
    assert_gone(pids)
    host, port = address.removeprefix("tcp://").split(":")
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=5):
        pass


async def test_a_task_whose_worker_died_is_not_run_again(tmp_path):
    """A task that killed its worker fails with WorkerCrashed and ran exactly once: Dask did not retry it elsewhere."""
    import dask_tasks

    count = tmp_path / "runs"
    async with DaskPool("once") as pool:
        with pytest.raises(WorkerCrashed, match="was lost"):
            await pool.apply(dask_tasks.count_then_die, (str(count),))
        await _healthy(pool)
        # Every worker runs a task after the death, so a retry queued anywhere would have run by now.
        await asyncio.gather(*(pool.apply(tasks.slow_pid, (0.2,)) for _ in range(2 * POOL_SIZE)))
        assert count.read_text() == "ran\n"
        assert pool.get_status()["tasks_crashed"] == 1


async def test_handler_a_worker_cannot_import_names_the_worker(tmp_path, monkeypatch):
    """A handler the parent imports but the workers cannot makes initialize() raise BrokenPool naming the worker."""
    module = tmp_path / "vanishing_handler.py"
    module.write_text("def handle(prompt, context):\n    return prompt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pool = DaskPool("vanishing", handler="vanishing_handler:handle")  # checked here, in the parent
    monkeypatch.delitem(sys.modules, "vanishing_handler")
    module.unlink()
    try:
        with pytest.raises(BrokenPool, match=r"dask worker tcp://127\.0\.0\.1:\d+.*vanishing_handler"):
            await pool.initialize()
        assert pool.health == "broken"
    finally:
        await pool.shutdown()
    assert pool.state is PoolState.CLOSED


async def test_restarted_worker_that_cannot_import_the_handler_names_itself(tmp_path, monkeypatch):
    """A worker restarted after the handler's module vanished fails its prompt with an ImportError naming it."""
    module = tmp_path / "fleeting_handler.py"
    module.write_text("def handle(prompt, context):\n    return prompt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    async with DaskPool("fleeting", handler="fleeting_handler:handle") as pool:
        module.unlink()
        with pytest.raises(WorkerCrashed):
            await pool.apply(tasks.kill_self)
        await _healthy(pool)
        # One prompt per worker: the two that imported the handler at start still run it.
        results = await pool.execute_batch(["a", "b", "c"])
        failures = [r for r in results if isinstance(r, BaseException)]
        assert len([r for r in results if r in ("a", "b", "c")]) == POOL_SIZE - 1
        assert len(failures) == 1 and isinstance(failures[0], ImportError)
        assert re.search(r"dask worker tcp://127\.0\.0\.1:\d+ \(pid \d+\) cannot import the handler", str(failures[0]))
    monkeypatch.delitem(sys.modules, "fleeting_handler", raising=False)


async def test_unreachable_scheduler_is_a_broken_pool():
    """An address where no scheduler listens makes initialize() raise BrokenPool within its start_timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        pool = DaskPool("nowhere", address=f"tcp://127.0.0.1:{port}", start_timeout=3)
        started = time.monotonic()
        with pytest.raises(BrokenPool, match=f"127.0.0.1:{port}"):
            await pool.initialize()
        assert time.monotonic() - started < 30
    await pool.shutdown()


def test_bad_options_are_refused_at_construction():
    """Options that cannot work fail when the pool is made, with the option's name in the message."""
    with pytest.raises(ValueError, match="address"):
        DaskPool(address="127.0.0.1:8786")
    with pytest.raises(ValueError, match="workers"):
        DaskPool(address="tcp://127.0.0.1:8786", workers=["a", "b"])
    with pytest.raises(ValueError, match="address="):
        DaskPool(workers=["a", "b", "c"])
    with pytest.raises(ValueError, match="task_timeout"):
        DaskPool(task_timeout=-1)


async def test_pool_on_a_cluster_started_separately(tmp_path):
    """A pool reached by address takes three workers, recovers a killed one, and leaves the cluster running."""
    with separate_cluster(tmp_path) as cluster:
        async with DaskPool("remote", address=cluster.address, handler="tasks:prompt_handler") as pool:
            assert len({w.address for w in pool.workers}) == POOL_SIZE
            assert await pool.execute("hi", {"n": 1}) == "HI:1"
            with pytest.raises(WorkerCrashed):
                await pool.apply(tasks.kill_self)
            await _healthy(pool)
            assert sorted(await asyncio.gather(*(pool.apply(tasks.square, (i,)) for i in range(6)))) == [
                i * i for i in range(6)
            ]
        assert cluster.scheduler.poll() is None and cluster.worker.poll() is None
        client = await distributed.Client(cluster.address, asynchronous=True, set_as_default=False)
        try:
            await asyncio.wait_for(client.wait_for_workers(POOL_SIZE), 60)
        finally:
            await client.close()


async def test_losing_the_scheduler_fails_every_caller_with_broken_pool(tmp_path):
    """When the scheduler dies, running and queued callers get BrokenPool in bounded time; new work is refused."""
    with separate_cluster(tmp_path) as cluster:
        pool = DaskPool("orphaned", address=cluster.address)
        await pool.initialize()
        try:
            futures = [pool.submit(tasks.sleep_then, 60, i) for i in range(2 * POOL_SIZE)]
            await wait_until(lambda: all(w.get_status()["tasks_in_flight"] for w in pool.workers))
            cluster.scheduler.kill()
            outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
            assert all(isinstance(o, BrokenPool) for o in outcomes), outcomes
            assert f"lost the dask scheduler at {cluster.address}" in str(outcomes[0])
            assert pool.state is PoolState.BROKEN and pool.health == "broken"
            with pytest.raises(BrokenPool):
                await pool.apply(tasks.square, (2,))
        finally:
            await asyncio.wait_for(pool.shutdown(timeout=0), 30)


@pytest.mark.timeout(180)
async def test_a_higher_priority_task_queued_after_lower_ones_runs_first(tmp_path):
    """With all three Dask workers busy, queued tasks start highest priority first, FIFO within a priority."""
    async with DaskPool("dask-priorities") as pool:
        lock_a, lock_b, log = tmp_path / "a", tmp_path / "b", str(tmp_path / "log")
        with open(lock_a, "w") as a, open(lock_b, "w") as b:
            fcntl.flock(a, fcntl.LOCK_EX)
            fcntl.flock(b, fcntl.LOCK_EX)
            # One gate per worker; only the gate on lock b opens, so one worker runs everything
            # queued, one task at a time, in the order the pool hands them out.
            gates = [pool.submit(st.gate, str(lock_a)), pool.submit(st.gate, str(lock_a))]
            gates.append(pool.submit(st.gate, str(lock_b)))
            assert all(w.get_status()["tasks_in_flight"] == 1 for w in pool.workers)
            specs = [(0, "l0"), (0, "l1"), (5, "m0"), (0, "l2"), (10, "h0"), (-1, "n0"), (5, "m1")]
            futures = [pool.submit(st.record, log, name, priority=p) for p, name in specs]
            assert pool.statistics().queue_size == len(specs)
            fcntl.flock(b, fcntl.LOCK_UN)
            await asyncio.wait_for(asyncio.gather(*futures), 120)
            fcntl.flock(a, fcntl.LOCK_UN)
            await asyncio.wait_for(asyncio.gather(*gates), 120)
        started = [line.split()[1] for line in st.lines(log)]
        assert started == ["h0", "m0", "m1", "l0", "l1", "l2", "n0"]
        assert len({line.split()[0] for line in st.lines(log)}) == 1
        assert [(p.priority, p.queued) for p in pool.statistics().priorities] == [(10, 0), (5, 0), (0, 0), (-1, 0)]


@pytest.mark.timeout(240)
async def test_a_task_that_kills_its_dask_worker_is_retried_then_quarantined(tmp_path):
    """Under retry= a task whose Dask worker died runs again; one that kills N workers fails with PoisonTask."""
    async with DaskPool("dask-retry", retry=RetryPolicy(attempts=3, backoff=0.05)) as pool:
        # The pool's default policy: the first run kills its worker, the second completes.
        once = str(tmp_path / "once")
        assert await asyncio.wait_for(pool.apply(st.crash_until, (once, 2)), 120) == 2
        assert len({line.split()[0] for line in st.lines(once)}) == 2  # two runs, two workers
        assert pool.statistics().tasks_retried == 1
        # The task's own exception is not retried by that policy (it retries crashes only).
        own = str(tmp_path / "own")
        with pytest.raises(ValueError):
            await asyncio.wait_for(pool.apply(st.raise_value_error, (own,)), 120)
        assert len(st.lines(own)) == 1

        # A call's own policy: quarantined after killing two workers, with each attempt's evidence.
        poison = str(tmp_path / "poison")
        policy = RetryPolicy(attempts=5, backoff=0.05, quarantine_after=2)
        with pytest.raises(PoisonTask) as caught:
            await asyncio.wait_for(pool.apply(st.crash_until, (poison, 99), retry=policy), 120)
        pids = [int(line.split()[0]) for line in st.lines(poison)]
        assert [a.pid for a in caught.value.attempts] == pids and len(set(pids)) == 2
        assert all(a.killed_worker and "was lost" in a.error for a in caught.value.attempts)
        status = pool.get_status()
        assert status["tasks_quarantined"] == 1
        assert [a["pid"] for a in status["poison_tasks"][0]["attempts"]] == pids
        # The same call is refused at once: it never reaches a worker again.
        with pytest.raises(PoisonTask):
            await pool.apply(st.crash_until, (poison, 99), retry=policy)
        assert len(st.lines(poison)) == 2
        await _healthy(pool)


@pytest.mark.timeout(240)
async def test_a_dask_timeout_is_retried_when_asked_and_a_back_off_ends_at_shutdown(tmp_path):
    """With on=(TaskTimeout,) a timed-out task runs again until two kills quarantine it; shutdown ends a back-off."""
    pool = DaskPool("dask-retry-timeout")
    await pool.initialize()
    pids = set(_pids(pool))
    try:
        log = str(tmp_path / "log")
        policy = RetryPolicy(attempts=5, on=(TaskTimeout, WorkerCrashed), backoff=0, quarantine_after=2)
        with pytest.raises(PoisonTask) as caught:
            await asyncio.wait_for(pool.apply(st.sleep_logged, (log, 60), timeout=3, retry=policy), 120)
        assert [a.error.split(":")[0] for a in caught.value.attempts] == ["TaskTimeout", "TaskTimeout"]
        assert [a.pid for a in caught.value.attempts] == [int(pid) for pid in st.lines(log)]
        await _healthy(pool)
        pids.update(_pids(pool))
        crash = str(tmp_path / "crash")
        retried = pool.statistics().tasks_retried
        future = pool.submit(st.crash_until, crash, 3, retry=RetryPolicy(backoff=60))
        await wait_until(lambda: pool.statistics().tasks_retried == retried + 1, timeout=60)
    finally:
        pids.update(_pids(pool))
        await pool.shutdown(timeout=5)
    with pytest.raises(PoolClosed):
        await future
    assert len(st.lines(crash)) == 1
    assert_gone(sorted(pids))


@pytest.mark.timeout(180)
async def test_shutting_down_as_a_worker_dies_returns():
    """A pool shut down while its worker dies under a task shuts down, and the task fails with WorkerCrashed."""
    pool = DaskPool("dying-at-shutdown")
    await pool.initialize()
    pids = set(_pids(pool))
    future = pool.submit(tasks.kill_self)
    # The death, the nanny's restart and the shutdown overlap: the pool once waited forever here.
    await asyncio.wait_for(pool.shutdown(timeout=5), 60)
    assert pool.state is PoolState.CLOSED
    with pytest.raises(WorkerCrashed):
        await future
    assert_gone(sorted(pids))


async def _collect(results) -> list:
    """Every value of an async iterator, in order."""
    return [value async for value in results]


@pytest.mark.timeout(300)
async def test_dask_map_retries_per_item_so_only_the_item_that_kills_workers_is_quarantined(tmp_path):
    """A Dask map chunk whose worker died runs again one item per task: only its poison item is quarantined."""
    pool = DaskPool("dask-retry-map-crash", retry=RetryPolicy(attempts=3, backoff=0.01))
    await pool.initialize()
    pids = set(_pids(pool))
    try:
        log = str(tmp_path / "log")
        results: list[int] = []

        async def consume() -> None:
            async for value in pool.map(st.map_item, [(log, i, 15, "crash") for i in range(20)], chunksize=10):
                results.append(value)

        with pytest.raises(PoisonTask) as caught:
            await asyncio.wait_for(consume(), 240)
        assert results == [i * 10 for i in range(15)]  # every item before the poison one
        runs = [st.lines(log).count(str(i)) for i in range(20)]
        assert runs[:10] == [1] * 10  # the first chunk: once
        assert runs[10:15] == [2] * 5  # in the crashed chunk, then alone (their results died with the worker)
        assert runs[15] == 3  # the crashing item: its chunk's run and two runs alone
        assert all(r <= 1 for r in runs[16:])  # after it: never run twice (the map ends at the poison item)
        assert len(caught.value.attempts) == 3 and all(a.killed_worker for a in caught.value.attempts)
        stats = pool.statistics()
        assert (stats.tasks_quarantined, stats.tasks_retried) == (1, 2)  # three runs of the poison item: two retries
    finally:
        pids.update(_pids(pool))
        await asyncio.wait_for(pool.shutdown(timeout=5), 60)
    assert_gone(sorted(pids))


@pytest.mark.timeout(180)
async def test_dask_map_retries_an_item_s_own_exception_alone_and_keeps_the_items_before_it(tmp_path):
    """On a Dask pool an item whose exception the policy names runs again alone; its chunk's others run once."""
    async with DaskPool("dask-retry-map-own") as pool:
        log = str(tmp_path / "log")
        policy = RetryPolicy(attempts=2, on=ValueError, backoff=0)
        items = [(log, i, 4, "raise") for i in range(10)]
        values = await asyncio.wait_for(_collect(pool.map(st.map_item, items, chunksize=10, retry=policy)), 120)
        assert values == [i * 10 for i in range(10)]
        assert [st.lines(log).count(str(i)) for i in range(10)] == [1, 1, 1, 1, 2, 1, 1, 1, 1, 1]
        assert pool.statistics().tasks_retried == 1
