"""Progress reporting: silent, callback and rich-bar reporters chosen by make_progress."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import textwrap
import time

import pytest

from procpool._progress import Reporter, make_progress


def test_none_and_false_give_one_shared_silent_reporter(capsys):
    """progress=None/False returns the same do-nothing reporter, which writes nothing."""
    silent = make_progress(None, 10, "x")
    assert make_progress(False, None, "y") is silent
    assert type(silent) is Reporter
    with silent as reporter:
        reporter.advance()
        reporter.advance(5)
    silent.close()
    assert capsys.readouterr() == ("", "")


def test_callback_gets_running_done_and_total():
    """A callable progress is called with (done, total) after every advance, done accumulating."""
    calls = []
    with make_progress(lambda done, total: calls.append((done, total)), 6, "work") as reporter:
        reporter.advance()
        reporter.advance(2)
        reporter.advance(3)
    assert calls == [(1, 6), (3, 6), (6, 6)]


def test_callback_with_unknown_total_gets_none():
    """When the total is unknown the callback receives None as total."""
    calls = []
    reporter = make_progress(lambda done, total: calls.append((done, total)), None, "lazy")
    reporter.advance(4)
    reporter.close()
    assert calls == [(4, None)]


def test_callback_errors_reach_the_caller():
    """An exception raised by the callback propagates out of advance() instead of being swallowed."""

    def broken(done: int, total: int | None) -> None:
        raise RuntimeError("callback broke")

    reporter = make_progress(broken, 1, "x")
    with pytest.raises(RuntimeError, match="callback broke"):
        reporter.advance()


def test_true_off_a_terminal_is_silent(capsys):
    """progress=True with stderr not an interactive terminal (captured here) prints nothing."""
    with make_progress(True, 3, "quiet") as reporter:
        assert type(reporter) is Reporter
        reporter.advance(3)
    assert capsys.readouterr() == ("", "")


def test_true_on_a_terminal_draws_a_rich_bar_on_stderr():
    """progress=True with stderr on a real pseudo-terminal draws a bar with the label and count."""
    script = textwrap.dedent(
        """
        from procpool._progress import make_progress
        with make_progress(True, 5, "crunching") as reporter:
            for _ in range(5):
                reporter.advance()
        print("stdout stays clean")
        """
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR")
    }
    env["TERM"] = "xterm"
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env
        )
    finally:
        os.close(slave)
    try:
        terminal = _read_until_closed(master, deadline=time.monotonic() + 30)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert stdout == b"stdout stays clean\n"
    assert b"crunching" in terminal
    assert b"5/5" in terminal


def _read_until_closed(fd: int, deadline: float) -> bytes:
    """Read a pty master until the child side closes (EIO on Linux) or the deadline passes."""
    chunks = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def test_missing_rich_is_a_clear_import_error(monkeypatch):
    """progress=True without rich installed raises ImportError naming the extra to install."""
    for name in ("rich", "rich.console", "rich.progress"):
        monkeypatch.setitem(sys.modules, name, None)  # how Python marks a module as not importable
    with pytest.raises(ImportError, match=r"pip install 'procpool\[cli\]'"):
        make_progress(True, 1, "x")
    assert type(make_progress(None, 1, "x")) is Reporter  # the silent path needs no rich


@pytest.mark.parametrize(
    ("progress", "total", "description", "error"),
    [
        ("yes", 1, "x", TypeError),
        (1, 1, "x", TypeError),
        (None, 1.5, "x", TypeError),
        (None, True, "x", TypeError),
        (None, -1, "x", ValueError),
        (None, 1, 7, TypeError),
    ],
)
def test_bad_arguments_fail_at_the_call(progress, total, description, error):
    """Arguments of the wrong type or range raise TypeError/ValueError at once."""
    with pytest.raises(error):
        make_progress(progress, total, description)
