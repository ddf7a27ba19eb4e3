"""The supervisor: a pool's lifecycle and its three slots, kept filled.

Lifecycle (``PoolState``)::

    INITIAL --start()--> STARTING --3 workers Ready--> RUNNING --close()--> CLOSING --> CLOSED
                             |                            |
                             +--workers keep failing to start (crash loop)--> BROKEN --close()--> CLOSED

Like pebble's worker manager, the supervisor starts, replaces and stops worker processes and
never resolves a task on its own account: what a slot reports (Ready, a result, an exit) it
turns into calls on the [`Dispatcher`][procpool._dispatch.Dispatcher], which owns the tasks.

Invariants:
    * ``len(self.workers) == POOL_SIZE`` always; a slot is refilled whenever its process dies,
      until the pool is CLOSING, CLOSED or BROKEN.
    * When a worker dies only the task it was running fails; the others go back to the front of
      the queue. A task is never re-run after it may have had effects, unless its caller said
      it may be (``retry=RetryPolicy(...)``, decided in ``Dispatcher.fail``).
    * Every timer and background task the supervisor starts is referenced, and cancelled when
      the pool closes or breaks.
"""

from __future__ import annotations

import asyncio
import atexit
import enum
import itertools
import math
import multiprocessing
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

from procpool import _log
from procpool import _processes as proc
from procpool._config import PoolConfig
from procpool._dispatch import Dispatcher
from procpool._monitor import KILL_GRACE, Monitor
from procpool._stats import Counters, Health
from procpool._task import Task
from procpool._worker import Worker, WorkerEvents, WorkerExit, WorkerState
from procpool.errors import BrokenPool, PoolClosed, WorkerCrashed, describe_exit

__all__ = ("POOL_SIZE", "PoolState", "Supervisor")

log = _log.get("pool")

POOL_SIZE = 3
# Workers that die before Ready this many times in a row make the pool BROKEN.
MAX_START_FAILURES = 3
# Respawn delays after failed starts: 0.1 s, 0.2 s, 0.4 s ... (no retry storm).
START_BACKOFF = 0.1
# A recycled worker that has not exited this long after its last task (a non-daemon thread, a
# slow exit hook) is killed, so its slot is refilled.
RETIRE_GRACE = 5.0


class PoolState(enum.Enum):
    """Where a pool is in its life."""

    # Created; nothing started (the first initialize(), apply() or 'async with' starts it).
    INITIAL = "initial"
    # Workers are starting; tasks are queued until all three are ready.
    STARTING = "starting"
    # All three slots are filled and supervised; work flows.
    RUNNING = "running"
    # shutdown() began: no new work; queued tasks failed; running ones finish or are killed.
    CLOSING = "closing"
    # Every worker has exited.
    CLOSED = "closed"
    # Workers kept failing to start; every task fails with BrokenPool until shutdown().
    BROKEN = "broken"


_live_pools: weakref.WeakSet[Supervisor] = weakref.WeakSet()


@atexit.register
def _kill_leftover_workers() -> None:
    """At interpreter exit, kill the workers of pools nobody shut down.

    Registered after multiprocessing's own exit hook, so it runs first; otherwise that hook
    would wait forever on our non-daemon workers.
    """
    for supervisor in list(_live_pools):
        for worker in supervisor.workers:
            if worker.process is not None and worker.pid is not None:
                proc.kill_group(worker.pid)
                worker.process.join(1.0)


class Supervisor:
    """One pool's lifecycle, its three slots and their replacement policy."""

    def __init__(self, pool_id: str, config: PoolConfig, counters: Counters) -> None:
        self.pool_id = pool_id
        self.config = config
        self._counters = counters
        events = WorkerEvents(on_ready=self._on_ready, on_result=self._on_result, on_exit=self._on_exit)
        self.workers: list[Worker] = [Worker(i, f"{pool_id}-w{i}", events) for i in range(POOL_SIZE)]
        self.tasks = Dispatcher(pool_id, config, self.workers, counters, self.recycle)
        self.monitor = Monitor(self.workers, config, counters, self.notify_health)
        self.state = PoolState.INITIAL
        self.loop: asyncio.AbstractEventLoop | None = None
        self._launch: proc.Launch | None = None
        # Resolved when all three workers are ready (or the pool breaks), and when the last
        # worker has exited during shutdown.
        self._started: asyncio.Future[None] | None = None
        self._all_exited: asyncio.Future[None] | None = None
        self._closed_event: asyncio.Event | None = None
        # Callers of wait_healthy(), woken whenever a worker's or the pool's state changes.
        self._health_waiters: set[asyncio.Future[None]] = set()
        # The monitor's task and the supervisor's timers (start and retire deadlines, respawn backoff).
        self._monitor_task: asyncio.Task[None] | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self.broken_cause: str | None = None
        self._start_failures = 0
        self.started_at: float | None = None

    async def start(self) -> None:
        """Start the three workers (once); return when all are ready."""
        if self.state is not PoolState.INITIAL and asyncio.get_running_loop() is not self.loop:
            raise self.wrong_loop()
        if self.state is PoolState.RUNNING:
            return
        if self.state in (PoolState.CLOSING, PoolState.CLOSED):
            raise PoolClosed(f"pool {self.pool_id!r} is shut down")
        if self.state is PoolState.BROKEN:
            raise BrokenPool(self.broken_cause)
        if self.state is PoolState.INITIAL:
            loop = self.loop = asyncio.get_running_loop()
            ctx = multiprocessing.get_context(self.config.start_method)
            config = self.config
            self._launch = proc.Launch(ctx, loop, config.handler, config.initializer, config.initargs)
            self.tasks.bind(loop)
            self._started = loop.create_future()
            self._closed_event = asyncio.Event()
            self.state = PoolState.STARTING
            _live_pools.add(self)
            self._monitor_task = loop.create_task(self.monitor.run(), name=f"procpool-monitor-{self.pool_id}")
            try:
                if config.start_method == "forkserver":
                    # First, so that the fork server (a fresh interpreter, importing the workers'
                    # code once) starts while the slots set up.
                    proc.start_fork_server()
                for worker in self.workers:
                    self._spawn(worker)
            except BaseException:
                await self.close(timeout=0)
                raise
        assert self._started is not None
        try:
            await asyncio.shield(self._started)
        except asyncio.CancelledError:
            if self.state is PoolState.STARTING:
                await asyncio.shield(self.close(timeout=0))
            raise

    async def close(self, timeout: float) -> None:
        """Refuse new work, let running tasks finish until ``timeout``, then stop the workers."""
        if self.state is PoolState.INITIAL:
            self.state = PoolState.CLOSED
            return
        assert self.loop is not None and self._started is not None and self._closed_event is not None
        if asyncio.get_running_loop() is not self.loop:
            if self.state is PoolState.CLOSED:
                return
            if self.loop.is_closed():
                await self._abandon()
                return
            raise self.wrong_loop()
        if self.state in (PoolState.CLOSING, PoolState.CLOSED):
            await self._closed_event.wait()
            return
        self.state = PoolState.CLOSING
        self.tasks.open = False
        if not self._started.done():
            self._started.set_exception(PoolClosed(f"pool {self.pool_id!r} was shut down while starting"))
            self._started.exception()  # mark retrieved
        self.tasks.wake_all()  # callers waiting for room see the pool is closing
        self.tasks.fail_waiting(PoolClosed(f"pool {self.pool_id!r} shut down before the task ran"))
        live = [w for w in self.workers if w.process is not None]
        self._all_exited = self.loop.create_future()
        # The pool is CLOSED when its last worker has exited, whether or not anyone still waits.
        self._all_exited.add_done_callback(self._closed)
        if not live:
            self._all_exited.set_result(None)
        for worker in live:
            for task in itertools.islice(worker.in_flight, 1, None):
                worker.cancel_unstarted(task)
            worker.send_exit()
        try:
            await asyncio.wait_for(asyncio.shield(self._all_exited), None if math.isinf(timeout) else timeout)
        except TimeoutError:
            self._kill_all(f"the task was killed after {timeout:g} s")
            await asyncio.shield(self._all_exited)
        except asyncio.CancelledError:
            # The caller stopped waiting: stop now rather than leave workers running unwatched.
            self._kill_all("the shutdown was cancelled, so running tasks were killed")
            raise

    async def _abandon(self) -> None:
        """Stop a pool whose event loop has closed: kill its workers and reap them in a thread.

        Its futures belong to the dead loop, so nobody can be waiting on them any more.
        """
        self.state = PoolState.CLOSED
        _live_pools.discard(self)
        processes = []
        for worker in self.workers:
            if worker.process is not None and worker.pid is not None:
                proc.kill_group(worker.pid)
                processes.append(worker.process)
        await asyncio.to_thread(lambda: [p.join(10) for p in processes])
        for worker in self.workers:
            worker.close_files()
            worker.state = WorkerState.DEAD
        log.warning("pool %s was shut down after its event loop had closed; its workers were killed", self.pool_id)

    def _kill_all(self, why: str) -> None:
        reason = PoolClosed(f"pool {self.pool_id!r} shut down; {why}")
        for worker in self.workers:
            worker.kill(reason, KILL_GRACE)

    def _closed(self, _: asyncio.Future[None]) -> None:
        self.state = PoolState.CLOSED
        _live_pools.discard(self)
        self._stop_background()
        assert self._closed_event is not None
        self._closed_event.set()
        self.notify_health()
        log.info("pool %s shut down", self.pool_id)

    def _stop_background(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        self.monitor.close()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def check_open(self) -> None:
        state = self.state
        if state is PoolState.RUNNING or state is PoolState.STARTING:
            if asyncio._get_running_loop() is not self.loop:
                raise self.wrong_loop()
            return
        if state is PoolState.INITIAL:
            raise RuntimeError(f"pool {self.pool_id!r} is not started: await pool.initialize() or use 'async with'")
        if state is PoolState.BROKEN:
            raise BrokenPool(self.broken_cause)
        raise PoolClosed(f"pool {self.pool_id!r} is shut down")

    def wrong_loop(self) -> RuntimeError:
        """The error for a call made outside the pool's event loop (checked before anything is sent)."""
        if asyncio._get_running_loop() is None:
            where = "from a thread with no running event loop"
        else:
            where = "from another event loop (was the pool started under another asyncio.run()?)"
        return RuntimeError(
            f"pool {self.pool_id!r} was called {where}; its methods must be called from the thread running "
            "the event loop it was started on (from other threads use asyncio.run_coroutine_threadsafe "
            "with that loop, or procpool.Executor for synchronous code)"
        )

    def _later(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` after ``delay`` seconds unless the pool closes first."""
        assert self.loop is not None

        def run() -> None:
            self._timers.discard(handle)
            callback(*args)

        handle = self.loop.call_later(delay, run)
        self._timers.add(handle)

    def _on_ready(self, worker: Worker) -> None:
        self._start_failures = 0
        if worker.restarts:
            log.info("worker %s replaced: pid %s ready (restart %d)", worker.worker_id, worker.pid, worker.restarts)
        else:
            log.info("worker %s ready (pid %s)", worker.worker_id, worker.pid)
        if self.state is PoolState.STARTING and all(
            w.state in (WorkerState.IDLE, WorkerState.BUSY) for w in self.workers
        ):
            self.state = PoolState.RUNNING
            self.tasks.open = True
            self.started_at = time.time()
            assert self._started is not None
            if not self._started.done():
                self._started.set_result(None)
            log.info("pool %s running with %d workers", self.pool_id, POOL_SIZE)
        if self.state is PoolState.CLOSING:
            worker.send_exit()
        self.tasks.dispatch()
        self.notify_health()

    def _on_result(self, worker: Worker, task: Task, ok: bool | None, value: Any, duration: float | None) -> None:
        tasks = self.tasks
        tasks.arm_head(worker)  # the next task in the slot runs now
        if ok is not None:
            tasks.finished(task, ok, value, duration)
            if self.config.max_memory_mb is not None and worker.state is not WorkerState.RETIRING:
                rss_mb = self.monitor.over_memory(worker)
                if rss_mb is not None:
                    self.recycle(
                        worker, f"its RSS is {rss_mb:.0f} MB, over max_memory_mb={self.config.max_memory_mb:g}"
                    )
        elif not task.future.done():
            # The child skipped it: its worker is being killed (it runs elsewhere) or the pool closes.
            if self.state in (PoolState.STARTING, PoolState.RUNNING):
                tasks.requeue([task])
            else:
                tasks.resolve(task, False, PoolClosed(f"pool {self.pool_id!r} shut down before the task ran"))
        else:
            tasks.resolve(task, False, None)  # cancelled by its caller: only mark it done
        if worker.state is WorkerState.RETIRING and not worker.in_flight:
            self._later(RETIRE_GRACE, self._retire_overdue, worker, worker.process)
        tasks.schedule()
        if self._health_waiters:
            self.notify_health()

    def _on_exit(self, worker: Worker, ended: WorkerExit) -> None:
        closing = self.state in (PoolState.CLOSING, PoolState.CLOSED, PoolState.BROKEN)
        requeue = []
        for task in ended.tasks:
            if task.timer is not None:  # a requeued task's clock restarts on its next worker
                task.timer.cancel()
                task.timer = None
            if task.future.done():
                self.tasks.resolve(task, False, None)
            elif task.seq == ended.running:
                # Retried here if the caller's retry policy says so (issue 15), else failed.
                self.tasks.fail(task, self._crash_error(worker, ended, task), ended.exitcode)
            elif closing:
                self.tasks.resolve(task, False, PoolClosed(f"pool {self.pool_id!r} shut down before the task ran"))
            else:
                requeue.append(task)
        if requeue:
            self.tasks.requeue(requeue)
        self.notify_health()
        if closing:
            log.debug("worker %s (pid %s) exited: %s", worker.worker_id, ended.pid, describe_exit(ended.exitcode))
            exited = self._all_exited
            if exited is not None and not exited.done() and all(w.process is None for w in self.workers):
                exited.set_result(None)
            return
        if ended.never_ready:
            self._start_failed(worker, ended.pid, ended.exitcode, None, ended.init_failure)
            return
        if ended.retired and ended.exitcode == 0:
            log.info("worker %s (pid %s) recycled", worker.worker_id, ended.pid)
        elif ended.kill_reason is None:
            log.warning(
                "worker %s (pid %s) died: %s; replacing it", worker.worker_id, ended.pid, describe_exit(ended.exitcode)
            )
        else:
            log.info(
                "worker %s (pid %s) stopped (%s); replacing it",
                worker.worker_id,
                ended.pid,
                describe_exit(ended.exitcode),
            )
        self._respawn(worker)

    def _crash_error(self, worker: Worker, ended: WorkerExit, task: Task) -> BaseException:
        """The error of the task a worker was running when it died."""
        # The kill's reason belongs to the task the kill was decided for; any other running
        # task died with the worker.
        reason = ended.kill_reason if task.seq == ended.kill_seq else None
        if isinstance(reason, WorkerCrashed) and reason.exitcode is None:
            reason = type(reason)(reason.pid, ended.exitcode, reason.detail)  # now we know how it ended
        if reason is not None:
            return reason
        detail = f"task {task.id} on worker {worker.worker_id}"
        if ended.kill_reason is not None:
            detail += f", killed while the worker was being replaced ({ended.kill_reason})"
        if ended.crash_stack:
            detail += f"\nstack of the crashed worker:\n{ended.crash_stack}"
        self._counters.tasks_crashed += 1
        return WorkerCrashed(ended.pid, ended.exitcode, detail)

    # -- internals: supervision --------------------------------------------------------------------

    def _spawn(self, worker: Worker) -> None:
        """Start a process in the slot, with a deadline for becoming ready."""
        assert self._launch is not None
        worker.spawn(self._launch)
        if self.config.start_timeout is not None:
            self._later(self.config.start_timeout, self._start_overdue, worker, worker.process)

    def _start_overdue(self, worker: Worker, process: Any) -> None:
        """A worker still not ready at start_timeout failed to start: kill it, the exit counts."""
        if worker.process is not process or worker.state is not WorkerState.STARTING:
            return
        why = (
            f"it was not ready within start_timeout={self.config.start_timeout:g} s "
            "(a handler import or initializer that does not return?)"
        )
        log.warning("worker %s (pid %s): %s; killing it", worker.worker_id, worker.pid, why)
        worker.fail_start(why)

    def _respawn(self, worker: Worker) -> None:
        """Refill a slot; a process that cannot even be created counts as a failed start."""
        self._counters.workers_restarted += 1
        try:
            self._spawn(worker)
        except Exception as exc:
            log.exception("could not start a process for worker %s", worker.worker_id)
            self._start_failed(worker, None, None, f"starting the process raised {exc!r}")

    def _start_failed(
        self, worker: Worker, pid: int | None, exitcode: int | None, why: str | None, init_failure: str | None = None
    ) -> None:
        self._start_failures += 1
        cause = f"worker {worker.worker_id} (pid {pid}) failed to start: {why or describe_exit(exitcode)}"
        if init_failure:
            cause += f"; {init_failure}"
        elif exitcode is not None and self.config.start_method != "spawn":
            cause += " (see the worker's traceback above in stderr)"
        elif exitcode is not None and getattr(sys.modules.get("__main__"), "__file__", None):
            # Under spawn every worker imports the main module as it starts.
            cause += (
                "; workers import the main module, so a script must start its pools only under "
                "'if __name__ == \"__main__\":' (see the worker's traceback above in stderr)"
            )
        log.error("%s (%d in a row)", cause, self._start_failures)
        if self._start_failures >= MAX_START_FAILURES:
            self._break(cause)
            return
        self._later(START_BACKOFF * 2 ** (self._start_failures - 1), self._respawn_if_open, worker)

    def _respawn_if_open(self, worker: Worker) -> None:
        if self.state in (PoolState.STARTING, PoolState.RUNNING) and worker.process is None:
            self._respawn(worker)

    def _break(self, cause: str) -> None:
        """Too many failed starts: fail everything with BrokenPool and stop the survivors."""
        self.state = PoolState.BROKEN
        self.tasks.open = False
        self.broken_cause = f"pool {self.pool_id!r} is broken: {cause}"
        log.error(self.broken_cause)
        error = BrokenPool(self.broken_cause)
        assert self._started is not None
        if not self._started.done():
            self._started.set_exception(error)
        self.tasks.fail_all(error)
        for worker in self.workers:
            worker.kill(error, 0)
        self.tasks.wake_all()
        self._stop_background()
        self.notify_health()

    def recycle(self, worker: Worker, why: str) -> None:
        """Replace a worker gracefully: it runs what it holds, exits, and a fresh one follows."""
        if not worker.retire():
            return
        log.info("recycling worker %s (pid %s): %s", worker.worker_id, worker.pid, why)
        self._counters.workers_recycled += 1
        if not worker.in_flight:
            self._later(RETIRE_GRACE, self._retire_overdue, worker, worker.process)

    def _retire_overdue(self, worker: Worker, process: Any) -> None:
        """A recycled worker that ran its last task but has not exited is killed."""
        if worker.process is not process or process is None or worker.state is not WorkerState.RETIRING:
            return
        log.warning(
            "worker %s (pid %s) did not exit within %g s of its last task (a non-daemon thread?); killing it",
            worker.worker_id,
            worker.pid,
            RETIRE_GRACE,
        )
        worker.kill(None, 0)

    def judge_health(self) -> tuple[Health, str | None, int]:
        healthy = sum(w.is_healthy() for w in self.workers)
        state = self.state
        if state is PoolState.BROKEN:
            return Health.BROKEN, self.broken_cause, healthy
        if state is not PoolState.RUNNING:
            return Health.NOT_RUNNING, f"pool is {state.value}", healthy
        if healthy == POOL_SIZE:
            return Health.HEALTHY, None, healthy
        sick = [
            f"{w.worker_id} is {w.state.value}"
            if w.state not in (WorkerState.IDLE, WorkerState.BUSY)
            else f"{w.worker_id} failed {w.consecutive_failures} tasks in a row"
            for w in self.workers
            if not w.is_healthy()
        ]
        return Health.DEGRADED, "; ".join(sick), healthy

    def notify_health(self) -> None:
        for waiter in self._health_waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_healthy(self) -> None:
        """Wait until RUNNING with all three workers healthy."""
        while True:
            self.check_open()
            if self.judge_health()[0] is Health.HEALTHY:
                return
            assert self.loop is not None
            waiter = self.loop.create_future()
            self._health_waiters.add(waiter)
            try:
                await waiter
            finally:
                self._health_waiters.discard(waiter)
