"""A worker killed by a fatal signal leaves its stack as evidence: in WorkerCrashed, and in PoisonTask's attempts."""

from __future__ import annotations

import asyncio
import signal

import attacks
import pytest

from procpool import PoisonTask, RetryPolicy, WorkerCrashed, WorkerPool

pytestmark = pytest.mark.anyio


async def test_a_segfault_names_the_function_it_happened_in():
    """A task that dies of SIGSEGV fails with WorkerCrashed carrying the worker's stack at the crash."""
    async with WorkerPool() as pool:
        with pytest.raises(WorkerCrashed) as info:
            await asyncio.wait_for(pool.apply(attacks.segfault_in_c), 30)
        assert info.value.exitcode == -signal.SIGSEGV
        assert "stack of the crashed worker" in str(info.value)
        assert "segfault_in_c" in str(info.value)


async def test_a_quarantined_task_carries_each_attempts_stack():
    """A task quarantined after segfaulting its workers carries the crash stack of every attempt."""
    policy = RetryPolicy(attempts=5, backoff=0, quarantine_after=2)
    async with WorkerPool() as pool:
        with pytest.raises(PoisonTask) as info:
            await asyncio.wait_for(pool.apply(attacks.segfault_in_c, retry=policy), 60)
        attempts = info.value.attempts
        assert len(attempts) == 2
        assert all(a.stack is not None and "segfault_in_c" in a.stack for a in attempts)
