"""Retries (opt-in, per pool and per call) and the quarantine of tasks that keep killing their workers."""

from __future__ import annotations

import asyncio
import signal

import pytest
import sched_tasks as st
from helpers import assert_gone, pids_of, wait_until

from procpool import PoisonTask, PoolClosed, RetryPolicy, TaskTimeout, WorkerCrashed, WorkerPool

pytestmark = pytest.mark.anyio


class Pools:
    """Pools started by a test, shut down at its end with every process they ever had checked gone."""

    def __init__(self) -> None:
        self.pools: list[WorkerPool] = []
        self.pids: set[int] = set()

    async def start(self, name: str, **options: object) -> WorkerPool:
        pool = WorkerPool(name, **options)  # type: ignore[arg-type]
        self.pools.append(pool)
        await pool.initialize()
        self.pids.update(pids_of(pool))
        return pool

    async def close(self) -> None:
        for pool in self.pools:
            self.pids.update(pids_of(pool))
            await pool.shutdown(timeout=5)
        assert_gone(sorted(self.pids))


@pytest.fixture
async def pools():
    p = Pools()
    try:
        yield p
    finally:
        await p.close()


async def test_a_crash_is_retried_after_the_back_off_until_the_task_completes(pools, tmp_path):
    """A task whose worker dies is run again, after a doubling back-off, and its result returned."""
    pool = await pools.start("retry-crash", retry=RetryPolicy(attempts=3, backoff=0.2))
    log = str(tmp_path / "log")
    assert await asyncio.wait_for(pool.apply(st.crash_until, (log, 3)), 60) == 3
    runs = [line.split() for line in st.lines(log)]
    assert len(runs) == 3  # run exactly three times: two crashes, one success
    assert len({pid for pid, _ in runs}) == 3  # each crash cost its worker
    starts = [float(t) for _, t in runs]
    assert starts[1] - starts[0] >= 0.2 and starts[2] - starts[1] >= 0.4
    stats = pool.statistics()
    assert (stats.tasks_retried, stats.tasks_completed, stats.tasks_failed) == (2, 1, 0)


async def test_without_a_retry_policy_a_crashed_task_is_never_run_again(pools, tmp_path):
    """procpool never re-runs a task on its own: without retry= a crash fails the task after one run."""
    pool = await pools.start("retry-none")
    log = str(tmp_path / "log")
    with pytest.raises(WorkerCrashed):
        await asyncio.wait_for(pool.apply(st.crash_until, (log, 2)), 60)
    assert len(st.lines(log)) == 1
    assert pool.statistics().tasks_retried == 0


async def test_the_task_s_own_exception_is_retried_only_when_asked(pools, tmp_path):
    """The default policy leaves the task's own exception alone; on=(ValueError,) retries it."""
    pool = await pools.start("retry-own")
    default, asked = str(tmp_path / "default"), str(tmp_path / "asked")
    with pytest.raises(ValueError):
        await pool.apply(st.raise_value_error, (default,), retry=RetryPolicy(backoff=0))
    assert len(st.lines(default)) == 1
    with pytest.raises(ValueError):
        await pool.apply(st.raise_value_error, (asked,), retry=RetryPolicy(attempts=3, on=ValueError, backoff=0))
    assert len(st.lines(asked)) == 3
    assert {p.pid for p in pool.workers} == set(pids_of(pool))  # nobody died


async def test_a_task_that_kills_every_worker_is_quarantined_with_each_attempt_s_evidence(pools, tmp_path):
    """After killing N workers a task fails with PoisonTask (pids, signals), is listed, and is not run again."""
    pool = await pools.start("retry-poison")
    log = str(tmp_path / "log")
    policy = RetryPolicy(attempts=3, backoff=0.01)
    with pytest.raises(PoisonTask) as caught:
        await asyncio.wait_for(pool.apply(st.crash_until, (log, 99), retry=policy), 60)
    attempts = caught.value.attempts
    pids = [int(line.split()[0]) for line in st.lines(log)]
    assert [a.number for a in attempts] == [1, 2, 3]
    assert [a.pid for a in attempts] == pids and len(set(pids)) == 3
    assert all(a.exitcode == -signal.SIGKILL and a.killed_worker for a in attempts)
    assert "SIGKILL" in str(caught.value) and "quarantined" in str(caught.value)
    status = pool.get_status()
    assert status["tasks_quarantined"] == 1
    assert [a["pid"] for a in status["poison_tasks"][0]["attempts"]] == pids
    # The same call with a retry policy is refused at once; it never reaches a worker again.
    with pytest.raises(PoisonTask):
        await pool.apply(st.crash_until, (log, 99), retry=policy)
    assert len(st.lines(log)) == 3
    assert await pool.apply(st.add, (1, 2), retry=policy) == 3  # other calls run


async def test_timeouts_are_retried_when_asked_and_count_as_kills(pools, tmp_path):
    """With on=(TaskTimeout,), a task that times out runs again; two kills quarantine it."""
    pool = await pools.start("retry-timeout")
    log = str(tmp_path / "log")
    policy = RetryPolicy(attempts=5, on=(TaskTimeout, WorkerCrashed), backoff=0, quarantine_after=2)
    with pytest.raises(PoisonTask) as caught:
        await asyncio.wait_for(pool.apply(st.sleep_logged, (log, 30), timeout=0.3, retry=policy), 60)
    assert [a.error.split(":")[0] for a in caught.value.attempts] == ["TaskTimeout", "TaskTimeout"]
    assert len(st.lines(log)) == 2
    assert all(a.exitcode is not None and a.exitcode < 0 for a in caught.value.attempts)  # the kill's signal
    with pytest.raises(TaskTimeout):  # not asked: the timeout is final
        await asyncio.wait_for(pool.apply(st.sleep_logged, (log, 31), timeout=0.3, retry=RetryPolicy()), 60)
    assert len(st.lines(log)) == 3


async def test_a_task_waiting_out_its_back_off_fails_with_pool_closed_at_shutdown(pools, tmp_path):
    """Shutting down during a retry's back-off fails the task with PoolClosed instead of stranding it."""
    pool = await pools.start("retry-close")
    log = str(tmp_path / "log")
    future = pool.submit(st.crash_until, log, 3, retry=RetryPolicy(backoff=60))
    await wait_until(lambda: pool.statistics().tasks_retried == 1)
    await pool.shutdown(timeout=5)
    with pytest.raises(PoolClosed):
        await future
    assert len(st.lines(log)) == 1


async def test_a_cancelled_task_is_not_retried(pools, tmp_path):
    """Cancelling a task while it waits for its retry drops it: it never runs again."""
    pool = await pools.start("retry-cancel")
    log = str(tmp_path / "log")
    future = pool.submit(st.crash_until, log, 3, retry=RetryPolicy(backoff=0.5))
    await wait_until(lambda: pool.statistics().tasks_retried == 1)
    future.cancel()
    # Nothing is left that could run it: not queued, not waiting for its back-off, no timer.
    assert not pool._tasks.delayed and pool.statistics().queue_size == 0
    assert await pool.apply(st.add, (2, 2)) == 4
    assert len(st.lines(log)) == 1


async def test_map_retries_per_item_so_only_the_item_that_kills_workers_is_quarantined(pools, tmp_path):
    """A map chunk whose worker died runs again one item per task: only its poison item is quarantined."""
    pool = await pools.start("retry-map-crash", retry=RetryPolicy(attempts=3, backoff=0.01))
    log = str(tmp_path / "log")
    results = []
    with pytest.raises(PoisonTask) as caught:
        async for value in pool.map(st.map_item, [(log, i, 15, "crash") for i in range(20)], chunksize=10):
            results.append(value)
    assert results == [i * 10 for i in range(15)]  # every item before the poison one
    runs = [st.lines(log).count(str(i)) for i in range(20)]
    assert runs[:10] == [1] * 10  # the first chunk: once
    assert runs[10:15] == [2] * 5  # in the crashed chunk, then alone (their results died with the worker)
    assert runs[15] == 3  # the crashing item: its chunk's run and two runs alone
    assert all(r <= 1 for r in runs[16:])  # after it: never run twice (the map ends at the poison item)
    assert len(caught.value.attempts) == 3 and all(a.killed_worker for a in caught.value.attempts)
    stats = pool.statistics()
    assert (stats.tasks_quarantined, stats.tasks_retried) == (1, 2)  # three runs of the poison item: two retries


async def test_map_retries_an_item_s_own_exception_alone_and_keeps_the_items_before_it(pools, tmp_path):
    """An item whose exception the policy names runs again alone; the other items of its chunk run once."""
    pool = await pools.start("retry-map-own")
    log = str(tmp_path / "log")
    policy = RetryPolicy(attempts=2, on=ValueError, backoff=0)
    items = [(log, i, 4, "raise") for i in range(10)]
    assert [v async for v in pool.map(st.map_item, items, chunksize=10, retry=policy)] == [i * 10 for i in range(10)]
    assert [st.lines(log).count(str(i)) for i in range(10)] == [1, 1, 1, 1, 2, 1, 1, 1, 1, 1]
    assert pool.statistics().tasks_retried == 1


def test_retry_policy_checks_its_options():
    """RetryPolicy refuses nonsense at construction and computes a capped doubling back-off."""
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(TypeError):
        RetryPolicy(on="WorkerCrashed")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RetryPolicy(backoff=-1)
    policy = RetryPolicy(backoff=0.5, max_backoff=1.5)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 1.5]
    assert RetryPolicy(backoff=lambda n: n * 10).delay(2) == 20
