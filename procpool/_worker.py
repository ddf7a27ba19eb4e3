"""Parent-side handle of one worker slot: spawn its process, talk to it, probe it, kill it.

A [`Worker`][] is one of a pool's three slots. It outlives the processes that fill it: when
its process dies, the pool calls `Worker.spawn` again and the slot gets a new pid and fresh
pipes (a process killed mid-write can leave a pipe holding half a message, so pipes are never
reused). All I/O is non-blocking on the event loop: the result pipe and the process sentinel are
registered with ``loop.add_reader``, so results and deaths wake the loop; nothing polls.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.reduction
import os
import pickle
import select
import signal
import sys
import tempfile
import termios
import time
from typing import TYPE_CHECKING, Any

import attrs
import psutil

from procpool import _child
from procpool import _messages as m
from procpool.errors import RemoteTraceback, SerializationError

if TYPE_CHECKING:
    from procpool._pool import Task, WorkerPool

log = logging.getLogger("procpool.worker")

# One read takes whatever the pipe holds, up to this much: many small results per syscall.
READ_SIZE = 1 << 18
# Collecting a dead worker's exit status: first retry after this many seconds (doubling up to
# 0.1 s); a process that closed its sentinel but lives on is killed after REAP_PATIENCE seconds.
REAP_FIRST_DELAY = 0.001
REAP_PATIENCE = 5.0
# A worker with this many failures in a row is unhealthy until a task succeeds again.
UNHEALTHY_AFTER_FAILURES = 3


_lifeline: Any = None
_lifeline_write_fd = -1


def lifeline() -> Any:
    """The read end of a pipe whose write end only this process holds, for workers to watch.

    It reads EOF when this process dies, however it dies. multiprocessing's own parent sentinel
    cannot serve: under forkserver every child also holds the server's liveness pipe, so the
    server and its children keep each other alive after the parent is gone. The write end is
    close-on-exec (os.pipe's default) and closed in any plain fork of this process (a fork-context
    multiprocessing.Process, os.fork), so no helper of the parent keeps the workers alive.
    """
    global _lifeline, _lifeline_write_fd
    if _lifeline is None:
        read_fd, _lifeline_write_fd = os.pipe()  # the write end stays open, unused, until we exit
        os.set_inheritable(_lifeline_write_fd, False)
        _lifeline = multiprocessing.connection.Connection(read_fd, writable=False)
    return _lifeline


def _drop_lifeline_in_child() -> None:
    """After a plain fork: let go of the parent's lifeline; a pool made here makes its own."""
    global _lifeline, _lifeline_write_fd
    if _lifeline_write_fd >= 0:
        try:
            os.close(_lifeline_write_fd)
        except OSError:
            pass
        _lifeline_write_fd = -1
    if _lifeline is not None:
        try:
            _lifeline.close()
        except OSError:
            pass
        _lifeline = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_lifeline_in_child)


def decode_error(payload: bytes) -> BaseException:
    """Rebuild a task's exception from an ERROR payload, the remote traceback as its cause."""
    name, tb, exc_bytes = pickle.loads(payload)
    exc: BaseException
    if exc_bytes is None:
        exc = SerializationError(f"the task raised {name}, which could not be pickled; see the cause")
    else:
        try:
            exc = pickle.loads(exc_bytes)
            if not isinstance(exc, BaseException):
                raise TypeError(f"it unpickled as {type(exc).__qualname__}")
        except BaseException as err:  # unpickling runs the sender's code: SystemExit included
            exc = SerializationError(
                f"the task raised {name}, which could not be unpickled in the parent ({err!r}); see the cause"
            )
    exc.__cause__ = RemoteTraceback(tb)
    return exc


@attrs.define(eq=False, repr=False)
class Worker:
    """One of a pool's worker slots and the process that currently fills it.

    Read-only for users: ``worker_id``, ``pid``, ``state``, ``restarts``, ``health_check()``,
    ``get_status()``.
    """

    pool: WorkerPool
    index: int
    worker_id: str
    # "starting" until Ready arrives, then "idle"/"busy"; "stopping" once a kill is under way;
    # "stuck" while the monitor holds evidence against it; "dead" between a death and a respawn.
    state: str = "dead"
    # How many times the slot's process was replaced.
    restarts: int = 0
    process: Any = None
    pid: int | None = None
    # Tasks written to this worker, oldest first: the head is running, the rest wait in the pipe.
    in_flight: collections.deque[Task] = attrs.Factory(collections.deque)
    # Shared with the child: running seq, last heartbeat, cancelled-before-start ring.
    shared: Any = None
    # Per-slot sequence numbers index the cancel ring; a window never exceeds the ring.
    _next_seq: int = 0
    _call_fd: int = -1
    _result_fd: int = -1
    # Keep the Connection objects alive: they own the file descriptors.
    _conns: tuple[Any, ...] = ()
    _frames: m.FrameReader = attrs.Factory(m.FrameReader)
    # Bytes the call pipe would not take yet; written when it drains.
    _out: bytearray = attrs.Factory(bytearray)
    _sentinel: int | None = None
    # A pidfd of the process (Linux), to tell its death from its fork server's.
    _pidfd: int | None = None
    # The fork server that started the process, and whether it has died since: its status pipe
    # (the sentinel) then reads EOF, so the process is watched through its pidfd instead.
    _server_pid: int | None = None
    _orphaned: bool = False
    _psutil: psutil.Process | None = None
    # Set when the parent kills the worker on purpose: the error the running task gets.
    kill_reason: BaseException | None = None
    # The seq of the task the worker was running when the kill was decided (0: none): only that
    # task gets kill_reason; tasks behind it are skipped by the child and run elsewhere.
    kill_seq: int = 0
    _killing: bool = False
    # Tasks the child skipped because the worker is being killed: requeued when it has exited.
    skipped: list[Task] = attrs.Factory(list)
    # Set once the sentinel fired: a late Ready must not make the dead worker take work.
    _exited: bool = False
    # Recycling: no more tasks for this process; it exits once it has run what it holds.
    retiring: bool = False
    # Tasks written to the current process (for max_tasks_per_worker).
    sent_count: int = 0
    # Stuck detection: the seq being watched, its CPU seconds at the last look, and the last
    # moment it showed progress (CPU used or a heartbeat).
    watch_seq: int = 0
    watch_cpu: float = 0.0
    progress_at: float = 0.0
    # The monitor judged the running task stuck (the state shows it unless the worker retires).
    stuck: bool = False
    task_cpu_start: float = 0.0
    # Why the current process failed to start, as a clause for BrokenPool's message.
    init_failure: str | None = None
    spawned_at: float = 0.0
    # An anonymous file (memfd) the child's faulthandler writes every thread's stack to on
    # SIGUSR1: the kernel frees it with the last descriptor, however the parent dies.
    _stack_fd: int | None = None
    # Statistics.
    tasks_processed: int = 0
    tasks_succeeded: int = 0
    tasks_failed: int = 0
    consecutive_failures: int = 0
    processing_time: float = 0.0
    last_activity: float | None = None
    head_started: float = 0.0

    # -- process lifecycle -------------------------------------------------------------------

    def spawn(self) -> None:
        """Start a fresh process in this slot with fresh pipes; Ready arrives later."""
        pool = self.pool
        ctx = pool._ctx
        loop = pool._loop
        call_r, call_w = ctx.Pipe(duplex=False)
        result_r, result_w = ctx.Pipe(duplex=False)
        if self.shared is None:
            self.shared = ctx.RawArray("q", _child.STATE_SIZE)
        else:
            for i in range(_child.STATE_SIZE):
                self.shared[i] = 0
        stack_fd = _anonymous_file()
        process = ctx.Process(
            target=_child.main,
            args=(
                call_r,
                result_w,
                self.shared,
                pool._handler_path,
                pool._initializer,
                pool._initargs,
                None if stack_fd is None else _PassFd(stack_fd),
                lifeline(),
            ),
            name=f"procpool-{self.worker_id}",
        )
        try:
            try:
                process.start()
            except (ConnectionRefusedError, FileNotFoundError):
                # The fork server died a moment ago; multiprocessing still trusts it until the
                # kernel has made it a zombie. Forget it, so that a new one starts now.
                if pool.start_method != "forkserver" or not _forget_fork_server(None, loop):
                    raise
                process.start()
        except BaseException:
            call_w.close()
            result_r.close()
            if stack_fd is not None:
                os.close(stack_fd)
            raise
        finally:
            call_r.close()
            result_w.close()
        self._pidfd = _open_pidfd(process.pid)
        self._stack_fd = stack_fd
        self._server_pid = _fork_server_pid() if pool.start_method == "forkserver" else None
        self._orphaned = False
        # Only a started process fills the slot: a failed start leaves it empty (process None),
        # so the pool can count the failure and try again.
        self.process = process
        self.pid = process.pid
        self.state = "starting"
        self.init_failure = None
        self.kill_reason = None
        self.kill_seq = 0
        self._killing = False
        self._exited = False
        self.retiring = False
        self.skipped = []
        self.sent_count = 0
        self.watch_seq = 0
        self.stuck = False
        self._next_seq = 0
        self._frames = m.FrameReader()
        self._out = bytearray()
        self.spawned_at = time.monotonic()
        self._psutil = None
        self._conns = (call_w, result_r)
        self._call_fd = call_w.fileno()
        self._result_fd = result_r.fileno()
        os.set_blocking(self._call_fd, False)
        os.set_blocking(self._result_fd, False)
        self._sentinel = self.process.sentinel
        loop.add_reader(self._result_fd, self._on_readable)
        loop.add_reader(self._sentinel, self._on_exit)
        log.debug("worker %s starting as pid %s", self.worker_id, self.pid)

    def _release(self) -> None:
        """Stop watching the dead process and close the parent's pipe ends."""
        loop = self.pool._loop
        if self._sentinel is not None:
            loop.remove_reader(self._sentinel)
            self._sentinel = None
        if self._result_fd >= 0:
            loop.remove_reader(self._result_fd)
            self._result_fd = -1
        if self._call_fd >= 0:
            loop.remove_writer(self._call_fd)
            self._call_fd = -1
        for conn in self._conns:
            conn.close()
        self._conns = ()
        self._out = bytearray()
        if self.process is not None:
            self.process.close()
            self.process = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._stack_fd is not None:
            os.close(self._stack_fd)
            self._stack_fd = None

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
        self._exited = True
        self._drain()
        loop = self.pool._loop
        if self._sentinel is not None:
            loop.remove_reader(self._sentinel)
            self._sentinel = None
        never_ready = self.state == "starting"
        self.state = "dead"  # no work for it while its exit status is collected
        self._reap(process, never_ready, time.monotonic(), REAP_FIRST_DELAY)

    def _reap(self, process: Any, never_ready: bool, since: float, delay: float) -> None:
        """Report the death with the real exit status, polling for it without blocking the loop.

        The sentinel fires when the child's end of a pipe closes, which under spawn is a moment
        before the process can be reaped: retry with a growing delay. A process that closed its
        descriptors but lives on is killed after REAP_PATIENCE seconds.
        """
        if process is not self.process:  # pragma: no cover - the slot was released meanwhile
            return
        exitcode = process.exitcode  # a non-blocking poll
        if self._orphaned:
            exitcode = None  # only the dead fork server could tell; multiprocessing says 255
        elif exitcode is None:
            waited = time.monotonic() - since
            if waited < REAP_PATIENCE + 1.0:
                if waited >= REAP_PATIENCE:
                    process.kill()
                self.pool._loop.call_later(delay, self._reap, process, never_ready, since, min(2 * delay, 0.1))
                return
        pid = self.pid
        # Processes its tasks started are orphans in its process group now: end them too. The
        # group id cannot be reused while any of them lives.
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        tasks = self.skipped + list(self.in_flight)
        self.skipped = []
        self.in_flight.clear()
        running = self.shared[_child.CURRENT]
        self._release()
        self.pool._worker_exited(self, pid, exitcode, tasks, running, never_ready)

    def _lost_fork_server(self) -> bool:
        """Whether the sentinel fired because the fork server died while the worker lives on.

        Under forkserver the sentinel is the server's status pipe, where the server writes the
        worker's exit status once it has reaped it. If the server dies, the pipe reads EOF and
        multiprocessing reports exit code 255, yet the worker runs on (re-parented): it keeps
        its tasks, and from now on its pidfd tells when it really dies (with an unknown status).
        The dead server is forgotten so that the next start launches a new one.
        """
        if self._server_pid is None or self._orphaned or self._sentinel is None:
            return False
        if not _at_eof(self._sentinel):
            return False  # the server wrote the exit status: a real death
        self._orphaned = True
        if _forget_fork_server(self._server_pid, self.pool._loop):
            log.warning("the fork server (pid %s) died; starting a new one for new workers", self._server_pid)
        if self._pidfd is None or _readable(self._pidfd):
            return False  # dead too (or no pidfd to watch it): report it, exit status unknown
        loop = self.pool._loop
        loop.remove_reader(self._sentinel)
        self._sentinel = self._pidfd
        loop.add_reader(self._pidfd, self._on_exit)
        log.info("worker %s (pid %s) outlived its fork server and keeps working", self.worker_id, self.pid)
        return True

    def kill(self, reason: BaseException | None, grace: float) -> None:
        """Stop the process and every process its tasks started: SIGTERM, then SIGKILL."""
        if self.process is None or self._killing or self._exited:
            return
        self._killing = True
        self.state = "stopping"
        self.kill_reason = reason
        self.kill_seq = self.shared[_child.CURRENT]
        for task in self.in_flight:
            if task.seq != self.kill_seq:
                self.cancel_unstarted(task)
        tree = self._descendants()
        self._signal_all(tree, signal.SIGTERM)
        if grace > 0:
            self.pool._loop.call_later(grace, self._signal_all_if_alive, tree, self.process)
        else:
            self._signal_all(tree, signal.SIGKILL)

    def kill_tree(self) -> None:
        """SIGKILL the process and every process its tasks started, with no verdict on a task."""
        self._signal_all(self._descendants(), signal.SIGKILL)

    def descendants_cpu(self) -> float:
        """CPU seconds of the processes the worker's tasks started: the live ones and the reaped."""
        total = 0.0
        proc = self.probe()
        if proc is None:
            return total
        try:
            times = proc.cpu_times()
            total += times.children_user + times.children_system
        except psutil.Error:
            return total
        for child in self._descendants():
            try:
                times = child.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system + times.children_user + times.children_system
        return total

    def _descendants(self) -> list[psutil.Process]:
        if self.pid is None:
            return []  # psutil.Process(None) would be this very process
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def _signal_all_if_alive(self, tree: list[psutil.Process], process: Any) -> None:
        if process is self.process:  # the slot has not been refilled yet
            # Again from the top: a task may have started processes during the grace period.
            self._signal_all(tree + self._descendants(), signal.SIGKILL)
        else:  # the worker is gone; finish off anything its task left behind
            for child in tree:
                _signal(child, signal.SIGKILL)

    def _signal_all(self, tree: list[psutil.Process], sig: int) -> None:
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
        for child in tree:
            _signal(child, sig)

    # -- messages ------------------------------------------------------------------------------

    def send(self, tasks: list[Task]) -> None:
        """Write tasks to the worker's call pipe in one syscall; they run in this order."""
        now = time.monotonic()
        if not self.in_flight:
            self.head_started = now
        chunks = []
        frame = m.frame
        body = m.body
        self.sent_count += len(tasks)
        for task in tasks:
            self._next_seq += 1
            task.seq = self._next_seq
            task.worker = self
            task.pid = self.pid
            task.state = "sent"
            self.in_flight.append(task)
            chunks.append(frame(body(task.seq, m.CALL, task.payload)))
        if self.state == "idle":
            self.state = "busy"
        head = self.in_flight[0]
        if head.timer is None and head.timeout is not None:
            self.pool._arm_timeout(self, head)
        self._write(b"".join(chunks))

    def send_exit(self) -> None:
        """Ask the child to leave its loop once it has run what it holds."""
        self._write(m.frame(m.body(0, m.EXIT)))

    def retire(self) -> None:
        """Take no more work; exit after the tasks already written (recycling)."""
        if self.retiring or self._killing or self.process is None:
            return
        self.retiring = True
        self.state = "stopping"
        self.send_exit()

    def _write(self, data: bytes) -> None:
        if self._call_fd < 0:
            return
        if self._out:
            self._out += data
            return
        try:
            n = os.write(self._call_fd, data)
        except BlockingIOError:
            n = 0
        except OSError:  # the child is gone; its sentinel reports the death
            return
        if n < len(data):
            self._out += data[n:]
            self.pool._loop.add_writer(self._call_fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            n = os.write(self._call_fd, self._out)
        except BlockingIOError:
            return
        except OSError:
            n = len(self._out)
        del self._out[:n]
        if not self._out:
            self.pool._loop.remove_writer(self._call_fd)

    def cancel_unstarted(self, task: Task) -> None:
        """Mark a task already written to the pipe so the child skips it."""
        self.shared[_child.CANCEL + task.seq % _child.CANCEL_RING] = task.seq

    def is_running(self, task: Task) -> bool:
        """Whether the child has started this task (it may be finishing it right now)."""
        return bool(self.shared[_child.CURRENT] == task.seq)

    def _drain(self) -> None:
        """Read every result the dead child managed to write."""
        while self._result_fd >= 0:
            try:
                data = os.read(self._result_fd, READ_SIZE)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self._handle_bodies(self._frames.feed(data))

    def _on_readable(self) -> None:
        try:
            data = os.read(self._result_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the child closed its end; its sentinel will report the exit
            self.pool._loop.remove_reader(self._result_fd)
            return
        self._handle_bodies(self._frames.feed(data))

    def _handle_bodies(self, bodies: list[bytes]) -> None:
        pool = self.pool
        unpack = m.HEADER.unpack_from
        size = m.HEADER.size
        loads = pickle.loads
        in_flight = self.in_flight
        for data in bodies:
            task = None
            try:
                _, kind = unpack(data)  # results arrive in the order the tasks were written
                if kind == m.OK:
                    task = in_flight.popleft()
                    err: BaseException
                    try:
                        value = loads(memoryview(data)[size:])
                    except BaseException as exc:  # unpickling runs the sender's code: SystemExit included
                        err = SerializationError(f"the task's result could not be unpickled in the parent: {exc!r}")
                        err.__cause__ = exc
                        self._finished(task, False, err)
                    else:
                        self._finished(task, True, value)
                elif kind == m.ERROR:
                    task = in_flight.popleft()
                    try:
                        err = decode_error(data[size:])
                    except Exception as exc:  # pragma: no cover - the envelope is str and bytes
                        err = SerializationError(f"the task's error could not be decoded: {exc!r}")
                    self._finished(task, False, err)
                elif kind == m.SKIPPED:
                    task = in_flight.popleft()
                    if self._killing and not task.future.done():
                        self.skipped.append(task)  # skipped only because the worker is being replaced
                    else:
                        self._finished(task, None, None)
                elif kind == m.READY:
                    if self._exited:
                        continue  # it died right after: a failed start, not a worker to use
                    self.state = "stopping" if self._killing or self.retiring else "idle"
                    pool._worker_ready(self)
                elif kind == m.INIT_FAILED:
                    traceback = data[size:].decode(errors="replace")
                    self.init_failure = f"its initializer or handler raised:\n{traceback}"
            except Exception as exc:  # a fault here costs this one task, never the results behind it
                log.exception("worker %s: handling a message failed", self.worker_id)
                if task is not None and not task.future.done():
                    failure = RuntimeError(f"procpool could not deliver the task's outcome: {exc!r}")
                    failure.__cause__ = exc
                    task.future.set_exception(failure)

    def _finished(self, task: Task, ok: bool | None, value: Any) -> None:
        now = time.monotonic()
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
        else:
            duration = None
        self.head_started = now
        if self.in_flight:
            head = self.in_flight[0]
            if head.timeout is not None and head.timer is None:
                self.pool._arm_timeout(self, head)
        elif self.state in ("busy", "stuck") and not self.retiring:
            self.state = "idle"
            self.stuck = False
        self.pool._task_finished(self, task, ok, value, duration)

    # -- health --------------------------------------------------------------------------------

    def probe(self) -> psutil.Process | None:
        """The psutil handle of the live process, or None."""
        if self.pid is None or self.process is None:
            return None
        if self._psutil is None:
            try:
                self._psutil = psutil.Process(self.pid)
            except psutil.Error:
                return None
        return self._psutil

    def sample(self) -> tuple[str, int, float] | None:
        """psutil status, RSS bytes and CPU seconds of the live process; None if it is gone."""
        proc = self.probe()
        if proc is None:
            return None
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                return proc.status(), proc.memory_info().rss, times.user + times.system
        except psutil.Error:
            return None

    def rss_mb(self) -> float | None:
        """The live process's resident memory in MB, or None."""
        proc = self.probe()
        try:
            return proc.memory_info().rss / 2**20 if proc is not None else None
        except psutil.Error:
            return None

    def resources(self) -> dict[str, Any]:
        """RSS in MB, CPU seconds and psutil status of the live process (None when unknown)."""
        if self.probe() is None:
            return {"rss_mb": None, "cpu_seconds": None, "process_status": None}
        sample = self.sample()
        if sample is None:
            return {"rss_mb": None, "cpu_seconds": None, "process_status": "gone"}
        status, rss, cpu = sample
        return {"rss_mb": round(rss / 2**20, 1), "cpu_seconds": round(cpu, 3), "process_status": status}

    def is_healthy(self) -> bool:
        """Alive, ready, not stuck, and fewer than three failures in a row."""
        return (
            (self.state in ("idle", "busy") or (self.retiring and not self._killing))
            and self.process is not None
            and self.consecutive_failures < UNHEALTHY_AFTER_FAILURES
        )

    async def health_check(self) -> bool:
        """Whether this worker is healthy (an idle worker is healthy however long it idles)."""
        return self.is_healthy()

    def get_status(self) -> dict[str, Any]:
        """A JSON-ready snapshot of this worker."""
        finished = self.tasks_succeeded + self.tasks_failed
        return {
            "worker_id": self.worker_id,
            "pid": self.pid,
            "state": self.state,
            "healthy": self.is_healthy(),
            "restarts": self.restarts,
            "tasks_in_flight": len(self.in_flight),
            "tasks_processed": self.tasks_processed,
            "tasks_succeeded": self.tasks_succeeded,
            "tasks_failed": self.tasks_failed,
            "consecutive_failures": self.consecutive_failures,
            "success_rate": self.tasks_succeeded / finished if finished else 1.0,
            "average_processing_time": self.processing_time / finished if finished else None,
            "last_activity": self.last_activity,
            **self.resources(),
        }

    def __repr__(self) -> str:
        return (
            f"<Worker {self.worker_id} pid={self.pid} state={self.state} "
            f"in_flight={len(self.in_flight)} restarts={self.restarts}>"
        )


def _anonymous_file() -> int | None:
    """A file with no name, freed by the kernel with its last descriptor: nothing is left on
    disk when the parent is killed. memfd where there is one, else an unlinked temporary file."""
    try:
        return os.memfd_create("procpool-stack")
    except (AttributeError, OSError):
        pass
    try:
        with tempfile.TemporaryFile() as f:
            return os.dup(f.fileno())
    except OSError:  # pragma: no cover - no writable temporary directory
        return None


class _PassFd:
    """An open file descriptor among a worker's Process arguments; the child receives an int
    naming the same open file (multiprocessing passes it like a Pipe's descriptors)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_received_fd, (multiprocessing.reduction.DupFd(self.fd),))


def _received_fd(dup: Any) -> int:
    return int(dup.detach())


def _open_pidfd(pid: int) -> int | None:
    """A file descriptor that reads ready when ``pid`` exits, whoever its parent is (Linux 5.3+)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _at_eof(fd: int) -> bool:
    """Whether a readable pipe is at end of file, without consuming what it holds."""
    try:
        pending = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return int.from_bytes(pending, sys.byteorder) == 0


def _fork_server_pid() -> int | None:
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    return getattr(server, "_forkserver_pid", None)


def _forget_fork_server(pid: int | None, loop: Any) -> bool:
    """Make multiprocessing start a new fork server on the next start.

    ``ensure_running()`` restarts a server only once ``waitpid`` shows it dead, and a server that
    has just closed its socket is not a zombie yet: a start in that moment fails with
    ConnectionRefusedError. Forget the server (``pid``, or whichever it is when None) as
    ``ensure_running()`` does for a dead one, and reap it from the loop without blocking.
    """
    server: Any = getattr(multiprocessing.forkserver, "_forkserver", None)
    lock = getattr(server, "_lock", None)
    if lock is None:  # pragma: no cover - another multiprocessing
        return False
    with lock:
        current = getattr(server, "_forkserver_pid", None)
        if current is None or (pid is not None and current != pid):
            return False
        alive_fd = server._forkserver_alive_fd
        server._forkserver_pid = server._forkserver_address = server._forkserver_alive_fd = None
    if alive_fd is not None:
        os.close(alive_fd)
    _reap_server(current, loop, 0.001, time.monotonic() + 60)
    return True


def _reap_server(pid: int, loop: Any, delay: float, deadline: float) -> None:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return
    if not done and time.monotonic() < deadline:
        loop.call_later(delay, _reap_server, pid, loop, min(delay * 2, 1.0), deadline)


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass
