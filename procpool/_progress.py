"""Progress reporting for long runs (``map``, ``execute_batch``, the command line).

`make_progress` turns the ``progress=`` argument into a `Reporter`:

* ``None`` or ``False``: a reporter that does nothing (one shared instance; it sits on hot paths).
* ``True``: a rich progress bar on stderr, only when stderr is an interactive terminal, so logs,
  pipes and CI output stay clean. rich is optional (``pip install 'procpool[cli]'``).
* a callable: ``callback(done, total)`` after every advance, for programmatic progress.

The library never prints otherwise; everything else goes through ``logging``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ("ProgressArg", "Reporter", "make_progress", "stderr_console")

ProgressArg = bool | Callable[[int, int | None], None] | None

_stderr_console: Any = None


def _rich() -> Any:
    try:
        import rich.console
        import rich.progress
    except ImportError as exc:
        raise ImportError("progress bars need the 'rich' package: pip install 'procpool[cli]'") from exc
    return rich


def stderr_console() -> Any:
    """The one rich Console on stderr that progress bars and the command line's logs share.

    Sharing it lets log records print above a live bar instead of tearing it.

    Raises:
        ImportError: rich is not installed.
    """
    global _stderr_console
    if _stderr_console is None:
        _stderr_console = _rich().console.Console(stderr=True)
    return _stderr_console


class Reporter:
    """Receives progress; this base class ignores it. Use as a context manager or call close()."""

    __slots__ = ()

    def advance(self, n: int = 1) -> None:
        """Record ``n`` more units done."""

    def close(self) -> None:
        """Finish reporting (idempotent)."""

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


_SILENT = Reporter()


class _CallbackReporter(Reporter):
    """Calls ``callback(done, total)`` after each advance; the callback's exceptions propagate."""

    __slots__ = ("callback", "done", "total")

    def __init__(self, callback: Callable[[int, int | None], None], total: int | None) -> None:
        self.callback = callback
        self.total = total
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.callback(self.done, self.total)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.done}/{self.total}>"


class _BarReporter(Reporter):
    """A rich progress bar on the shared stderr console."""

    __slots__ = ("_bar", "_task", "done", "total")

    def __init__(self, total: int | None, description: str) -> None:
        p = _rich().progress
        self.total = total
        self.done = 0
        self._bar = p.Progress(
            p.TextColumn("[progress.description]{task.description}"),
            p.BarColumn(),
            p.MofNCompleteColumn(),
            p.TaskProgressColumn(),
            p.TimeElapsedColumn(),
            p.TimeRemainingColumn(),
            console=stderr_console(),
        )
        self._task = self._bar.add_task(description, total=total)
        self._bar.start()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(self._task, completed=self.done)

    def close(self) -> None:
        # Progress.stop() is idempotent; the last refresh shows the final count.
        self._bar.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.done}/{self.total}>"


def make_progress(progress: ProgressArg, total: int | None, description: str) -> Reporter:
    """Make a reporter for a run of ``total`` units (None when unknown).

    Args:
        progress: ``None``/``False`` (silent), ``True`` (a bar on an interactive stderr) or a
            callable taking ``(done, total)``.
        total: how many units the run has, or None when unknown (a lazy iterable).
        description: the label shown next to the bar.

    Returns:
        A `Reporter`; ``advance(n)`` after each unit, ``close()`` (or ``with``) at the end.

    Raises:
        TypeError: ``progress`` is neither a bool, None nor callable; ``description`` is not a str.
        ValueError: ``total`` is negative.
        ImportError: ``progress=True`` and rich is not installed.
    """
    if total is not None and (isinstance(total, bool) or not isinstance(total, int)):
        raise TypeError(f"total must be an int or None, not {type(total).__name__}")
    if total is not None and total < 0:
        raise ValueError(f"total must not be negative, got {total}")
    if not isinstance(description, str):
        raise TypeError(f"description must be a str, not {type(description).__name__}")
    if progress is None or progress is False:
        return _SILENT
    if progress is True:
        # Check for rich even off a terminal, so a missing extra shows up in CI, not in production.
        _rich()
        if not stderr_console().is_interactive:
            return _SILENT
        return _BarReporter(total, description)
    if callable(progress):
        return _CallbackReporter(progress, total)
    raise TypeError(
        f"progress must be True, False, None or a callable taking (done, total), not {type(progress).__name__}"
    )
