"""The monitor: psutil looks at a pool's workers, and the verdicts drawn from them.

Results and deaths never wait for it: they wake the event loop directly (``_worker.py``). The
monitor only watches what a process cannot report itself: that it is stopped, that it grew past
``max_memory_mb``, or that its running task makes no progress (no CPU used by the worker or the
processes it started, no ``heartbeat()``) for ``stuck_after`` seconds. Each verdict ends in a
kill with a typed error that carries the evidence, or (``replace_stuck=False``) in a STUCK state.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Sequence

import attrs

from procpool import _log
from procpool import _processes as proc
from procpool._config import PoolConfig
from procpool._stats import Counters
from procpool._task import Task, TaskState
from procpool._worker import Worker, WorkerState
from procpool.errors import MemoryLimitExceeded, WorkerCrashed, WorkerStuck

__all__ = ("KILL_GRACE", "Monitor")

log = _log.get("monitor")

# How often the monitor samples the workers with psutil (capped by stuck_after / 4).
MONITOR_INTERVAL = 0.5
# CPU seconds a task must use between two looks to count as progress (one clock tick).
CPU_PROGRESS = 0.01
# Between asking a stuck worker for its stack (SIGUSR1 -> faulthandler) and killing it.
STACK_DUMP_GRACE = 0.25
# SIGTERM, then SIGKILL this long after, when a worker is stopped on purpose.
KILL_GRACE = 0.2


@attrs.define
class _Watch:
    """What the monitor remembers of one slot's running task between two looks."""

    # The seq of the task watched (0: none), its CPU seconds at the watch's start and at the last
    # look (the worker's and its descendants'), and the last moment it showed progress.
    seq: int = 0
    cpu_start: float = 0.0
    cpu: float = 0.0
    progress_at: float = 0.0
    # The stuck verdict is out for this task.
    stuck: bool = False


class Monitor:
    """Samples a pool's workers every ``interval`` seconds and acts on what it sees."""

    def __init__(
        self, workers: Sequence[Worker], config: PoolConfig, counters: Counters, on_change: Callable[[], None]
    ) -> None:
        self._workers = workers
        # Called after a verdict changed a worker's state (for the pool's wait_healthy()).
        self._on_change = on_change
        self._config = config
        self._counters = counters
        self._watches = [_Watch() for _ in workers]
        # Stack captures under way before a stuck worker's kill; cancelled by close().
        self._replacing: set[asyncio.Task[None]] = set()
        interval = MONITOR_INTERVAL
        if config.stuck_after is not None:
            interval = min(interval, config.stuck_after / 4)
        self.interval = interval

    async def run(self) -> None:
        """Look at every worker, forever (the pool cancels this task when it closes); give back
        the memory of large results that no result has used since the last look."""
        while True:
            await asyncio.sleep(self.interval)
            for worker in self._workers:
                try:
                    self.check(worker)
                    worker.trim_buffers()
                except Exception:  # pragma: no cover - the monitor must outlive any surprise
                    log.exception("monitor failed on worker %s", worker.worker_id)

    def close(self) -> None:
        """Cancel the stack captures under way."""
        for task in self._replacing:
            task.cancel()

    def over_memory(self, worker: Worker) -> float | None:
        """The worker's RSS in MB if it is over max_memory_mb, else None."""
        limit = self._config.max_memory_mb
        probe = worker.probe()
        if limit is None or probe is None:
            return None
        import psutil  # imported on first use (see procpool._processes)

        try:
            rss_mb = probe.memory_info().rss / 2**20
        except psutil.Error:
            return None
        return rss_mb if rss_mb > limit else None

    def check(self, worker: Worker) -> None:
        """One look at one worker, and the verdict it leads to."""
        if worker.process is None or worker.state in (WorkerState.STARTING, WorkerState.STOPPING, WorkerState.DEAD):
            return
        probe = worker.probe()
        sample = proc.sample(probe) if probe is not None else None
        if probe is None or sample is None:  # vanished: its sentinel reports the exit
            return
        status, rss, cpu = sample
        pid = worker.pid
        import psutil  # imported on first use (see procpool._processes)

        if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return  # it has exited: its sentinel reports the death, with the real exit status
        if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
            log.warning("worker %s (pid %s) is %s; replacing it", worker.worker_id, pid, status)
            worker.kill(WorkerCrashed(pid, None, f"the worker process was found {status} by the monitor"), KILL_GRACE)
            return
        watch = self._watches[worker.index]
        head = worker.in_flight[0] if worker.in_flight else None
        if head is None or not worker.is_running(head):
            watch.seq = 0
            return
        config = self._config
        rss_mb = rss / 2**20
        if config.max_memory_mb is not None and rss_mb > config.max_memory_mb:
            log.warning(
                "worker %s (pid %s) RSS %.0f MB over max_memory_mb=%g; replacing it",
                worker.worker_id,
                pid,
                rss_mb,
                config.max_memory_mb,
            )
            limit = f"max_memory_mb={config.max_memory_mb:g}"
            detail = f"RSS {rss_mb:.0f} MB seen while running task {head.id}, over {limit}"
            worker.kill(MemoryLimitExceeded(pid, None, detail), KILL_GRACE)
            return
        # A task waiting on processes it started (a build, a compressor) progresses through them.
        cpu += proc.tree_cpu(probe)
        now = time.monotonic()
        beat = worker.running_since()
        if watch.seq != head.seq:
            # The child stamps the task's start.
            self._watches[worker.index] = _Watch(head.seq, cpu, cpu, beat or now)
            if worker.state is WorkerState.STUCK:
                worker.mark_stuck(False)
                self._on_change()
            return
        if cpu - watch.cpu >= CPU_PROGRESS:
            watch.progress_at = now
            watch.cpu = cpu
        watch.progress_at = max(watch.progress_at, beat)
        idle_for = now - watch.progress_at
        if config.stuck_after is None or idle_for < config.stuck_after:
            if watch.stuck:
                watch.stuck = False
                worker.mark_stuck(False)
                self._on_change()
            return
        if watch.stuck:
            return
        watch.stuck = True
        worker.mark_stuck(True)  # a retiring worker stays RETIRING: it must not take work
        self._counters.workers_stuck += 1
        evidence = (
            f"task {head.id} made no progress for {idle_for:.1f} s (stuck_after={config.stuck_after:g}); "
            f"CPU {cpu - watch.cpu_start:.2f} s used by the task, process status {status!r}"
        )
        log.warning("worker %s (pid %s) is stuck: %s", worker.worker_id, pid, evidence)
        if config.replace_stuck:
            replacing = asyncio.get_running_loop().create_task(self._replace_stuck(worker, head, evidence))
            self._replacing.add(replacing)
            replacing.add_done_callback(self._replacing.discard)

    async def _replace_stuck(self, worker: Worker, task: Task, evidence: str) -> None:
        """Capture the stuck task's Python stack, then kill and replace its worker."""
        process, pid = worker.process, worker.pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGUSR1)  # faulthandler in the child writes every thread's stack
            except ProcessLookupError:
                pass
            await asyncio.sleep(STACK_DUMP_GRACE)
        if worker.process is not process or task.state is not TaskState.SENT:
            return  # it finished or died meanwhile
        stack = worker.read_stack()
        detail = evidence + (f"\nstack of the stuck worker:\n{stack}" if stack else "")
        worker.kill(WorkerStuck(pid, None, detail), KILL_GRACE)
