"""One worker slot: spawn its process, talk to it through its pipes, kill it; report to the pool.

A [`Worker`][procpool.Worker] is one of a pool's three slots. It outlives the processes that
fill it: when its process dies, the pool calls ``spawn`` again and the slot gets a new pid and
fresh pipes (a process killed mid-write can leave a pipe holding half a message, so pipes are
never reused). All I/O is non-blocking on the event loop: the result pipe and the process
sentinel are registered with ``loop.add_reader``, so results and deaths wake the loop; nothing
polls. The slot reports to its pool only through three callbacks (``WorkerEvents``); the pool
never writes a slot's fields.

States (``WorkerState``)::

    DEAD --spawn--> STARTING --Ready--> IDLE <--send / last result--> BUSY <--monitor--> STUCK
                       |                  |                              |                 |
                       |                  +------------retire------------+-----------------+--> RETIRING
                       +-- any live state --kill--> STOPPING            (exits after what it holds)
    any live state --sentinel (the process exited)--> DEAD

Invariants:
    * Only IDLE and BUSY slots take new work; ``in_flight`` is empty in IDLE.
    * ``kill`` happens once per process (STOPPING and DEAD refuse it); the exit is reported once.
    * A Ready read after the process died (from its last bytes) does not make the slot usable.
"""

from __future__ import annotations

import collections
import enum
import os
import pickle
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from procpool import _log
from procpool import _messages as m
from procpool import _processes as proc
from procpool._channel import Channel
from procpool._stats import WorkerStatistics, worker_dict
from procpool._task import Task, TaskState
from procpool.errors import SerializationError

if TYPE_CHECKING:
    import psutil  # imported on first use (see procpool._processes)

__all__ = ("Worker", "WorkerEvents", "WorkerExit", "WorkerState")

log = _log.get("worker")

# Collecting a dead worker's exit status: first retry after this many seconds (doubling up to
# 0.1 s); a process that closed its sentinel but lives on is killed after REAP_PATIENCE seconds.
REAP_FIRST_DELAY = 0.001
REAP_PATIENCE = 5.0
# Signals faulthandler reports from inside the dying process (with its stack).
_FATAL_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT, signal.SIGILL})
# A worker with this many failures in a row is unhealthy until a task succeeds again.
UNHEALTHY_AFTER_FAILURES = 3


class WorkerState(enum.StrEnum):
    """Where a worker slot is in its life (compares equal to its string value)."""

    # No process: before the first start, between a death and the respawn, after shutdown.
    DEAD = "dead"
    # The process is starting (importing the handler, running the initializer); no Ready yet.
    STARTING = "starting"
    # Ready, holding no task.
    IDLE = "idle"
    # Ready, holding tasks: the head of in_flight runs, the rest wait in the call pipe.
    BUSY = "busy"
    # The monitor found the running task without progress; takes no work until it moves on.
    STUCK = "stuck"
    # Being recycled: takes no work, runs what it holds, then exits.
    RETIRING = "retiring"
    # Being killed (SIGTERM, then SIGKILL); its exit is awaited.
    STOPPING = "stopping"


@attrs.frozen
class WorkerExit:
    """How a worker's process ended and what it held, for the pool to settle."""

    pid: int | None
    # Exit code, negative for a signal; None when it could not be known.
    exitcode: int | None
    # Tasks still in the slot: the one it ran (seq == running) and those behind it.
    tasks: list[Task]
    # Seq of the task the process was running when it died (0: none).
    running: int
    # It died before Ready (a failed start); it was recycling (a clean exit is expected then).
    never_ready: bool
    retired: bool
    # Set when the parent killed it on purpose: the error the task it ran for (kill_seq) gets.
    kill_reason: BaseException | None
    kill_seq: int
    # Why the start failed, as a clause for BrokenPool's message.
    init_failure: str | None
    # What faulthandler wrote when a fatal signal (SIGSEGV...) killed it, else "".
    crash_stack: str = ""


@attrs.frozen
class WorkerEvents:
    """How a slot reports to its pool."""

    # The process sent Ready: it takes work, unless it is being stopped.
    on_ready: Callable[[Worker], None]
    # A task left the slot: ok True (value is its result), False (value is its error), or None
    # (skipped: the child did not run it); duration is its run time (None when skipped).
    on_result: Callable[[Worker, Task, bool | None, Any, float | None], None]
    # The process exited.
    on_exit: Callable[[Worker, WorkerExit], None]


@attrs.define(eq=False, repr=False)
class Worker:
    """One of a pool's worker slots and the process that currently fills it.

    Read-only for users: ``worker_id``, ``pid``, ``state``, ``restarts``, ``statistics()``,
    ``health_check()``, ``get_status()``.
    """

    index: int
    worker_id: str
    events: WorkerEvents
    state: WorkerState = WorkerState.DEAD
    # How many times the slot's process was replaced.
    restarts: int = 0
    process: Any = None
    pid: int | None = None
    # Tasks written to this process, oldest first: the head runs, the rest wait in the pipe.
    in_flight: collections.deque[Task] = attrs.Factory(collections.deque)
    # Shared with the child: running seq, last heartbeat, cancelled-before-start ring.
    shared: Any = None
    # Tasks written to the current process (for max_tasks_per_worker).
    sent_count: int = 0
    head_started: float = 0.0  # when the head task started (for its duration)
    tasks_processed: int = 0
    tasks_succeeded: int = 0
    tasks_failed: int = 0
    consecutive_failures: int = 0
    processing_time: float = 0.0
    last_activity: float | None = None
    _loop: Any = None
    # Per-process sequence numbers index the cancel ring; a window never exceeds the ring.
    _next_seq: int = 0
    _call_fd: int = -1
    _result_fd: int = -1
    # The Connection objects own the pipes' file descriptors.
    _conns: tuple[Any, ...] = ()
    # Writes, reads and shared memory of the current process.
    _channel: Channel | None = None
    _sentinel: int | None = None
    # A pidfd of the process (Linux); the fork server that started it, and whether that server
    # has died since: its status pipe (the sentinel) then reads EOF, so the pidfd is watched.
    _pidfd: int | None = None
    _server_pid: int | None = None
    _orphaned: bool = False
    _psutil: psutil.Process | None = None
    # Set when the parent kills the process on purpose: the error the task it ran (kill_seq) gets.
    _kill_reason: BaseException | None = None
    _kill_seq: int = 0
    # Why the current process failed to start, as a clause for BrokenPool's message.
    _init_failure: str | None = None
    # An anonymous file (memfd) the child's faulthandler writes every thread's stack to on
    # SIGUSR1: the kernel frees it with the last descriptor, however the parent dies.
    _stack_fd: int | None = None
    _spawned: bool = False  # once spawned, every new process is a restart

    # -- process lifecycle -----------------------------------------------------------------------

    def spawn(self, launch: proc.Launch) -> None:
        """Start a fresh process in this slot with fresh pipes; Ready arrives later."""
        loop = self._loop = launch.loop
        state_fd, self.shared = proc.new_state()  # fresh for each process: all 0
        try:
            process, call_w, result_r, stack_fd, arena_fd = proc.start_worker(
                launch, state_fd, f"procpool-{self.worker_id}"
            )
        finally:
            os.close(state_fd)
        self.restarts += self._spawned
        self._spawned = True
        self._pidfd = proc.open_pidfd(process.pid)
        self._stack_fd = stack_fd
        self._server_pid = getattr(process._popen, "server_pid", None)  # None under spawn
        self._orphaned = False
        # Only a started process fills the slot: a failed start leaves it empty (process None),
        # so the pool can count the failure and try again.
        self.process = process
        self.pid = process.pid
        self.state = WorkerState.STARTING
        self._init_failure = None
        self._kill_reason = None
        self._kill_seq = 0
        self.sent_count = 0
        self._next_seq = 0
        self._psutil = None
        self._conns = (call_w, result_r)
        self._call_fd = call_w.fileno()
        self._result_fd = result_r.fileno()
        self._channel = Channel(loop, self._call_fd, self._result_fd, arena_fd, launch.shm_limit, self.shared)
        self._sentinel = process.sentinel
        loop.add_reader(self._result_fd, self._on_readable)
        loop.add_reader(self._sentinel, self._on_exit)
        log.debug("worker %s starting as pid %s", self.worker_id, self.pid)

    def _release(self) -> None:
        """Stop watching the dead process and close the parent's ends of its pipes and files."""
        loop = self._loop
        if self._sentinel is not None:
            loop.remove_reader(self._sentinel)
            self._sentinel = None
        if self._result_fd >= 0:
            loop.remove_reader(self._result_fd)
            self._result_fd = -1
        if self._call_fd >= 0:
            loop.remove_writer(self._call_fd)
            self._call_fd = -1
        self.close_files()

    def trim_buffers(self) -> None:
        """Give back the parent's memory for large results that no result has used lately."""
        if self._channel is not None:
            self._channel.trim()

    def close_files(self) -> None:
        """Close the descriptors the slot holds for its process (its loop may be gone)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if isinstance(self.shared, memoryview):
            # Its last values stay readable; the mapping (and the descriptor mmap keeps) goes.
            self.shared = self.shared.tolist()
        for conn in self._conns:
            conn.close()
        self._conns = ()
        if self.process is not None:
            self.process.close()
            self.process = None
        for fd in (self._pidfd, self._stack_fd):
            if fd is not None:
                os.close(fd)
        self._pidfd = self._stack_fd = None

    def read_stack(self) -> str:
        """What the child's faulthandler wrote on SIGUSR1 (every thread's stack), or ''."""
        if self._stack_fd is None:
            return ""
        try:
            return os.pread(self._stack_fd, 1 << 20, 0).decode(errors="replace").strip()
        except OSError:
            return ""

    def _on_exit(self) -> None:
        """The process sentinel fired: collect its last results, then report the death."""
        process = self.process
        if self._lost_fork_server():
            return
        never_ready = self.state is WorkerState.STARTING
        retired = self.state is WorkerState.RETIRING
        # DEAD first: a Ready among its last bytes is a failed start, not a worker to use, and a
        # dead slot takes no work while its exit status is collected.
        self.state = WorkerState.DEAD
        self._drain()
        if self._sentinel is not None:
            self._loop.remove_reader(self._sentinel)
            self._sentinel = None
        self._reap(process, never_ready, retired, time.monotonic(), REAP_FIRST_DELAY)

    def _reap(self, process: Any, never_ready: bool, retired: bool, since: float, delay: float) -> None:
        """Report the death with the real exit status, polled for without blocking the loop (the
        sentinel can fire a moment before the process can be reaped; one that closed its pipes but
        lives on is killed after REAP_PATIENCE seconds)."""
        if process is not self.process:  # pragma: no cover - the slot was released meanwhile
            return
        exitcode = process.exitcode  # a non-blocking poll
        if self._orphaned:
            exitcode = None  # only the dead fork server could tell (the Popen says 255)
        elif exitcode is None:
            waited = time.monotonic() - since
            if waited < REAP_PATIENCE + 1.0:
                if waited >= REAP_PATIENCE:
                    process.kill()
                self._loop.call_later(delay, self._reap, process, never_ready, retired, since, min(2 * delay, 0.1))
                return
        pid = self.pid
        # Processes its tasks started are orphans in its process group now: end them too. The
        # group id cannot be reused while any of them lives.
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        ended = WorkerExit(
            pid=pid,
            exitcode=exitcode,
            tasks=list(self.in_flight),
            running=self.shared[m.CURRENT],
            never_ready=never_ready,
            retired=retired,
            kill_reason=self._kill_reason,
            kill_seq=self._kill_seq,
            init_failure=self._init_failure,
            crash_stack=self.read_stack() if exitcode is not None and -exitcode in _FATAL_SIGNALS else "",
        )
        self.in_flight.clear()
        self._release()
        self.events.on_exit(self, ended)

    def _lost_fork_server(self) -> bool:
        """Whether the sentinel fired because the fork server died while the worker lives on.

        Under forkserver the sentinel is the server's status pipe: if the server dies it reads EOF
        (the Popen says exit code 255 and ``server_lost``), yet the worker runs on, keeping its
        tasks; its pidfd then tells when it really dies. The dead server is forgotten, so a new
        one starts.
        """
        if self._server_pid is None or self._orphaned or self._sentinel is None:
            return False
        if not proc.at_eof(self._sentinel):
            return False  # the server wrote the exit status: a real death
        # multiprocessing itself reads the status of dead children at every Process.start()
        # (its _cleanup()), so the pipe can be at EOF after a real death whose status it holds.
        popen = getattr(self.process, "_popen", None)
        if getattr(popen, "returncode", None) is not None and not getattr(popen, "server_lost", False):
            return False
        self._orphaned = True
        if proc.forget_fork_server(self._server_pid, self._loop):
            log.warning("the fork server (pid %s) died; starting a new one for new workers", self._server_pid)
        if self._pidfd is None or proc.readable(self._pidfd):
            return False  # dead too (or no pidfd to watch it): report it, exit status unknown
        self._loop.remove_reader(self._sentinel)
        self._sentinel = self._pidfd
        self._loop.add_reader(self._pidfd, self._on_exit)
        log.info("worker %s (pid %s) outlived its fork server and keeps working", self.worker_id, self.pid)
        return True

    def kill(self, reason: BaseException | None, grace: float, seq: int | None = None) -> bool:
        """Stop the process and every process its tasks started: SIGTERM, then SIGKILL.

        ``reason`` is the error the task running now gets; tasks behind it are skipped by the
        child (or left in the slot) and go back to the pool. With ``seq``, the kill is for that
        task only: if its reply is already written, nothing is killed. False if nothing was.
        """
        if self.process is None or self.state in (WorkerState.STOPPING, WorkerState.DEAD):
            return False
        # The snapshot of the task's processes first: it takes a while, and the task may finish
        # meanwhile. From reading the running task to the signal, only shared-memory writes.
        tree = proc.descendants(self.pid)
        if seq is not None and self.shared[m.REPLIED] >= seq:
            return False
        self.state = WorkerState.STOPPING
        self._kill_reason = reason
        self._kill_seq = self.shared[m.CURRENT]
        for task in self.in_flight:
            if task.seq != self._kill_seq:
                self.cancel_unstarted(task)
        self._signal_tree(tree, signal.SIGTERM)
        if grace > 0:
            self._loop.call_later(grace, self._finish_kill, tree, self.process)
        else:
            self._signal_tree(tree, signal.SIGKILL)
        return True

    def fail_start(self, why: str) -> None:
        """Kill a process that is still starting; its exit counts as a failed start, for ``why``."""
        if self.state is not WorkerState.STARTING:
            return
        self._init_failure = why
        self._signal_tree(proc.descendants(self.pid), signal.SIGKILL)

    def _finish_kill(self, tree: list[psutil.Process], process: Any) -> None:
        if process is self.process:  # the slot has not been refilled yet
            # Again from the top: a task may have started processes during the grace period.
            self._signal_tree(tree + proc.descendants(self.pid), signal.SIGKILL)
        else:  # the worker is gone; finish off anything its task left behind
            proc.signal_all(tree, signal.SIGKILL)

    def _signal_tree(self, tree: list[psutil.Process], sig: int) -> None:
        # The worker leads its own process group: one killpg reaches it and the processes its
        # tasks started; the psutil snapshot catches any that moved to a group of their own.
        if self.pid is not None:
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                if self.process is not None and self.process.exitcode is None:
                    try:
                        os.kill(self.pid, sig)
                    except ProcessLookupError:
                        pass
        proc.signal_all(tree, sig)

    # -- messages --------------------------------------------------------------------------------

    def send(self, tasks: list[Task]) -> None:
        """Write tasks to the worker's call pipe in one syscall; they run in this order."""
        if not self.in_flight:
            self.head_started = time.monotonic()
        calls = []
        self.sent_count += len(tasks)
        for task in tasks:
            self._next_seq += 1
            task.seq = self._next_seq
            task.slot = self.index
            task.worker_id = self.worker_id
            task.pid = self.pid
            task.state = TaskState.SENT
            self.in_flight.append(task)
            calls.append((task.seq, task.payload))
        if self.state is WorkerState.IDLE:
            self.state = WorkerState.BUSY
        if self._channel is not None:
            self._channel.send(calls)

    def send_exit(self) -> None:
        """Ask the child to leave its loop once it has run what it holds."""
        if self._channel is not None:
            self._channel.write([m.frame(m.body(0, m.EXIT))])

    def retire(self) -> bool:
        """Take no more work; exit after the tasks already written (recycling). False if it can't."""
        if self.process is None or self.state not in (WorkerState.IDLE, WorkerState.BUSY, WorkerState.STUCK):
            return False
        self.state = WorkerState.RETIRING
        self.send_exit()
        return True

    def mark_stuck(self, stuck: bool) -> None:
        """The monitor's verdict on the running task: a stuck slot takes no work until it moves on."""
        if stuck and self.state is WorkerState.BUSY:
            self.state = WorkerState.STUCK
        elif not stuck and self.state is WorkerState.STUCK:
            self.state = WorkerState.BUSY

    def cancel_unstarted(self, task: Task) -> None:
        """Mark a task already written to the pipe so the child skips it."""
        self.shared[m.CANCEL + task.seq % m.CANCEL_RING] = task.seq

    def is_running(self, task: Task) -> bool:
        """Whether the child has started this task (it may be finishing it right now)."""
        return bool(self.shared[m.CURRENT] == task.seq)

    def running_since(self) -> float:
        """time.monotonic() of the running task's start or its last heartbeat (0: none)."""
        return float(self.shared[m.BEAT]) / 1e9

    def _drain(self) -> None:
        """Read every result the dead child managed to write."""
        while self._result_fd >= 0 and self._channel is not None:
            try:
                bodies = self._channel.read()
            except (EOFError, OSError):
                return
            self._handle_bodies(bodies)

    def _on_readable(self) -> None:
        if self._channel is None:
            return
        try:
            bodies = self._channel.read()
        except BlockingIOError:
            return
        except (EOFError, OSError):  # the child closed its end; its sentinel will report the exit
            self._loop.remove_reader(self._result_fd)
            return
        self._handle_bodies(bodies)

    def _handle_bodies(self, bodies: list[Any]) -> None:
        channel = self._channel
        if channel is None:
            return
        unpack = m.HEADER.unpack_from
        size = m.HEADER.size
        loads = pickle.loads
        in_flight = self.in_flight
        for data in bodies:
            task = None
            try:
                _, kind = unpack(data)  # results arrive in the order the tasks were written
                if kind == m.OK or kind == m.OK_OOB:
                    task = in_flight.popleft()
                    try:
                        value = loads(data[size:]) if kind == m.OK else channel.load_result(task.seq, data[size:])
                    except BaseException as exc:  # unpickling runs the sender's code: SystemExit included
                        err = SerializationError(f"the task's result could not be unpickled in the parent: {exc!r}")
                        err.__cause__ = exc
                        self._finished(task, False, err)
                    else:
                        self._finished(task, True, value)
                elif kind == m.ERROR:
                    task = in_flight.popleft()
                    self._finished(task, False, m.decode_error(data[size:]))
                elif kind == m.SKIPPED:
                    task = in_flight.popleft()
                    self._finished(task, None, None)
                elif kind == m.READY:
                    if self.state is not WorkerState.DEAD:
                        if self.state is WorkerState.STARTING:
                            self.state = WorkerState.IDLE
                        self.events.on_ready(self)
                elif kind == m.INIT_FAILED:
                    traceback = bytes(data[size:]).decode(errors="replace")
                    self._init_failure = f"its initializer or handler raised:\n{traceback}"
            except Exception as exc:  # a fault here costs this one task, never the results behind it
                log.exception("worker %s: handling a message failed", self.worker_id)
                if task is not None and not task.future.done():
                    failure = RuntimeError(f"procpool could not deliver the task's outcome: {exc!r}")
                    failure.__cause__ = exc
                    task.future.set_exception(failure)

    def _finished(self, task: Task, ok: bool | None, value: Any) -> None:
        if self._channel is not None:
            self._channel.call_done(task.seq)  # the child is done with the call's shared memory
        now = time.monotonic()
        duration: float | None = None
        if ok is not None:
            duration = now - self.head_started
            self.tasks_processed += 1
            self.processing_time += duration
            self.last_activity = time.time()
            if ok:
                self.tasks_succeeded += 1
                self.consecutive_failures = 0
            else:
                self.tasks_failed += 1
                self.consecutive_failures += 1
        self.head_started = now
        if self.state in (WorkerState.BUSY, WorkerState.STUCK):
            self.state = WorkerState.BUSY if self.in_flight else WorkerState.IDLE
        self.events.on_result(self, task, ok, value, duration)

    # -- health ----------------------------------------------------------------------------------

    def probe(self) -> psutil.Process | None:
        """The psutil handle of the live process, or None."""
        if self.pid is None or self.process is None:
            return None
        if self._psutil is None:
            import psutil

            try:
                self._psutil = psutil.Process(self.pid)
            except psutil.Error:
                return None
        return self._psutil

    def resources(self) -> dict[str, Any]:
        """RSS in MB, CPU seconds and psutil status of the live process (None when unknown)."""
        return proc.resources(self.probe())

    def is_healthy(self) -> bool:
        """Alive, ready, not stuck, and fewer than three failures in a row."""
        return (
            self.state in (WorkerState.IDLE, WorkerState.BUSY, WorkerState.RETIRING)
            and self.process is not None
            and self.consecutive_failures < UNHEALTHY_AFTER_FAILURES
        )

    def statistics(self) -> WorkerStatistics:
        """A frozen snapshot of this slot."""
        return WorkerStatistics(
            worker_id=self.worker_id,
            pid=self.pid,
            state=self.state.value,
            healthy=self.is_healthy(),
            restarts=self.restarts,
            tasks_in_flight=len(self.in_flight),
            tasks_processed=self.tasks_processed,
            tasks_succeeded=self.tasks_succeeded,
            tasks_failed=self.tasks_failed,
            consecutive_failures=self.consecutive_failures,
            processing_time=self.processing_time,
            last_activity=self.last_activity,
        )

    async def health_check(self) -> bool:
        """Whether this worker is healthy (an idle worker is healthy however long it idles)."""
        return self.is_healthy()

    def get_status(self) -> dict[str, Any]:
        """A JSON-ready snapshot of this worker, with psutil's figures for its process."""
        return worker_dict(self.statistics(), self.resources())

    def __repr__(self) -> str:
        return (
            f"<Worker {self.worker_id} pid={self.pid} state={self.state.value} "
            f"in_flight={len(self.in_flight)} restarts={self.restarts}>"
        )
