"""A pool is bound to the event loop it started on: calls from elsewhere fail at once, before sending."""

from __future__ import annotations

import asyncio
import concurrent.futures

import attacks
import pytest
from helpers import assert_gone, pids_of

from procpool import WorkerPool


def test_submit_from_another_thread_fails_before_sending():
    """submit() from a thread without the pool's loop raises RuntimeError and sends nothing."""

    async def main() -> None:
        async with WorkerPool() as pool:
            with concurrent.futures.ThreadPoolExecutor(1) as threads:
                error = await asyncio.wrap_future(threads.submit(_try_submit, pool))
            assert isinstance(error, RuntimeError) and "thread with no running event loop" in str(error)
            assert pool.get_status()["tasks_submitted"] == 0
            assert await pool.apply(attacks.ident, (1,)) == 1

    asyncio.run(main())


def _try_submit(pool: WorkerPool) -> BaseException | None:
    try:
        pool.submit(attacks.ident, 1)
    except BaseException as exc:
        return exc
    return None


def test_a_pool_used_under_a_second_asyncio_run_fails_at_once_and_can_be_shut_down():
    """A pool left running by one asyncio.run() refuses work in the next and shutdown() there kills its workers."""

    async def start() -> WorkerPool:
        pool = WorkerPool()
        await pool.initialize()
        return pool

    pool = asyncio.run(start())
    pids = pids_of(pool)
    assert len(pids) == 3

    async def reuse() -> None:
        with pytest.raises(RuntimeError, match="another event loop"):
            await pool.apply(attacks.ident, (1,))
        with pytest.raises(RuntimeError, match="another event loop"):
            pool.submit(attacks.ident, 1)
        with pytest.raises(RuntimeError, match="another event loop"):
            await pool.map(attacks.ident, [1]).__anext__()
        assert pool.get_status()["tasks_submitted"] == 0
        await asyncio.wait_for(pool.shutdown(), 30)

    asyncio.run(reuse())
    assert pool.state.value == "closed"
    assert_gone(pids)


def test_shutdown_timeout_must_be_a_number():
    """shutdown(timeout=nan) is refused with ValueError instead of being accepted."""

    async def main() -> None:
        async with WorkerPool() as pool:
            with pytest.raises(ValueError, match="non-negative"):
                await pool.shutdown(timeout=float("nan"))

    asyncio.run(main())
