"""Every option of a pool in one frozen record, each checked once, with errors in its own unit.

A bad option fails at ``WorkerPool(...)``, never on the first task: the handler is imported here
(and again by each worker), the initializer and its arguments must pickle, numbers must be
positive and finite.
"""

from __future__ import annotations

import math
import multiprocessing
import pkgutil
from collections.abc import Callable
from typing import Any

import attrs

from procpool._messages import pickle_call

__all__ = (
    "DEFAULT_MAX_PENDING",
    "DEFAULT_START_TIMEOUT",
    "DEFAULT_STUCK_AFTER",
    "MIN_STUCK_AFTER",
    "PoolConfig",
    "check_seconds",
    "handler_path",
    "resolve",
)

# Tasks waiting for a worker, per pool. Sync submit() raises PoolFull past it; the async entry
# points wait for room. Large enough for bulk submission, small enough to bound memory.
DEFAULT_MAX_PENDING = 100_000
# A worker holding one task this long without using CPU or sending a heartbeat is stuck.
DEFAULT_STUCK_AFTER = 300.0
# The shortest stuck_after: the monitor samples every stuck_after / 4 seconds, and sampling
# faster would cost the parent more CPU than it could ever save.
MIN_STUCK_AFTER = 0.1
# A worker not ready this long after its start (a hanging initializer or import) failed to start.
DEFAULT_START_TIMEOUT = 60.0


def check_seconds(value: Any, name: str = "timeout", unit: str = "seconds", minimum: float = 0.0) -> float | None:
    """``value`` as a positive, finite float (at least ``minimum``), or None; else a clear error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of {unit} or None, not {type(value).__name__}")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive, finite number of {unit}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum:g} {unit} (or None), got {value!r}")
    return float(value)


def resolve(path: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the callable."""
    obj = pkgutil.resolve_name(path)
    if not callable(obj):
        raise TypeError(f"{path} is not callable")
    return obj  # type: ignore[no-any-return]


def handler_path(handler: Any) -> str | None:
    """Check a prompt handler now and return the import path the workers load it by."""
    if handler is None:
        return None
    if isinstance(handler, str):
        if handler.count(":") != 1 or not all(handler.split(":")):
            raise ValueError(f"handler must look like 'package.module:function', got {handler!r}")
        try:
            resolve(handler)
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"handler {handler!r} cannot be loaded: {exc}") from exc
        return handler
    if callable(handler):
        path = f"{getattr(handler, '__module__', None)}:{getattr(handler, '__qualname__', None)}"
        try:
            found = resolve(path)
        except (ImportError, AttributeError, TypeError, ValueError):
            found = None
        if found is not handler:
            raise ValueError(
                f"handler {handler!r} must be a module-level function that workers can import "
                "(or pass its 'package.module:function' path)"
            )
        return path
    raise TypeError(f"handler must be a 'module:function' string or a function, not {type(handler).__name__}")


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _start_method(_: Any, __: Any, value: Any) -> None:
    if value not in ("forkserver", "spawn"):
        raise ValueError(
            f"start_method must be 'forkserver' or 'spawn', got {value!r} "
            "('fork' is unsafe in a process that runs threads and an event loop)"
        )
    if value not in multiprocessing.get_all_start_methods():
        raise ValueError(f"start_method {value!r} is not available on this platform")


def _positive_int(optional: bool) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            suffix = " or None" if optional else ""
            raise ValueError(f"{attribute.name} must be a positive integer{suffix}, got {value!r}")

    return check


def _seconds(unit: str = "seconds", minimum: float = 0.0) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        check_seconds(value, attribute.name, unit, minimum)

    return check


def _initializer(_: Any, __: Any, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError("initializer must be callable")


@attrs.frozen
class PoolConfig:
    """A pool's options, validated when built (see [`WorkerPool`][procpool.WorkerPool] for each)."""

    # The prompt handler's import path ("package.module:function"), or None.
    handler: str | None = attrs.field(default=None, converter=handler_path)
    task_timeout: float | None = attrs.field(default=None, validator=_seconds())
    initializer: Callable[..., Any] | None = attrs.field(default=None, validator=_initializer)
    initargs: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    start_method: str = attrs.field(factory=_default_start_method, validator=_start_method)
    max_pending: int = attrs.field(default=DEFAULT_MAX_PENDING, validator=_positive_int(optional=False))
    stuck_after: float | None = attrs.field(default=DEFAULT_STUCK_AFTER, validator=_seconds(minimum=MIN_STUCK_AFTER))
    replace_stuck: bool = attrs.field(default=True, converter=bool)
    max_tasks_per_worker: int | None = attrs.field(default=None, validator=_positive_int(optional=True))
    max_memory_mb: float | None = attrs.field(default=None, validator=_seconds("megabytes"))
    start_timeout: float | None = attrs.field(default=DEFAULT_START_TIMEOUT, validator=_seconds())

    def __attrs_post_init__(self) -> None:
        if self.initializer is not None:
            # Workers import it by name: fail here, not in every start. Its initargs travel as
            # process arguments, as multiprocessing passes them (a Queue or a Lock works).
            pickle_call(self.initializer, (), {})
