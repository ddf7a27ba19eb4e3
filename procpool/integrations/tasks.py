"""Task handlers: a whole task dict in, with a context that names the pool, worker and task.

Orchestrators hand their pools task dicts with keys of their own (``prompt``, ``command``,
``model``, ``system``, ``max_tokens`` ...). A *task handler* receives the whole dict and a
[`TaskContext`][]::

    def my_handler(task: dict, context: TaskContext) -> Any: ...

It is a module-level function (plain or ``async def``) named by its import path, e.g.
``"mypackage.handlers:run"``, and runs in a worker process; its return value must pickle.
[`echo_task`][] is the default: it runs nothing and returns what it was given.

A [`WorkerPool`][] runs prompt handlers ``(prompt, context)``; the adapters run task handlers
on it through [`run_task`][], the pool's prompt handler, which receives the task, the task
handler's path and the ids in its ``context`` and builds the [`TaskContext`][] in the worker.
"""

from __future__ import annotations

import multiprocessing
import os
import pkgutil
from collections.abc import Callable
from typing import Any

import attrs

from procpool import _child

__all__ = (
    "DEFAULT_TASK_HANDLER",
    "RUN_TASK",
    "TaskContext",
    "check_handler",
    "current_worker_id",
    "echo_task",
    "run_task",
)

# The default task handler, and the prompt handler the adapters give their WorkerPool.
DEFAULT_TASK_HANDLER = "procpool.integrations.tasks:echo_task"
RUN_TASK = "procpool.integrations.tasks:run_task"
# A worker process is named f"procpool-{worker_id}" by its pool.
_PROCESS_PREFIX = "procpool-"

# Task handlers resolved in this worker, by path: imported once, not once per task.
_resolved: dict[str, Callable[..., Any]] = {}


@attrs.frozen
class TaskContext:
    """Where a task runs, handed to a task handler with the task.

    Attributes:
        pool_id: the pool running the task.
        worker_id: the worker slot running it (``"<pool_id>-w0"`` .. ``-w2``), the same id the
            result reports.
        task_id: the task's id (the task's ``task_id`` key, or one the adapter made up).
        pid: the worker process's pid.
    """

    pool_id: str
    worker_id: str | None
    task_id: str
    pid: int


def current_worker_id() -> str | None:
    """The id of the worker slot this process is, or None outside a procpool worker."""
    # procpool's fork server names its workers there (it does not import multiprocessing in them).
    name = _child.process_name or multiprocessing.current_process().name
    return name[len(_PROCESS_PREFIX) :] if name.startswith(_PROCESS_PREFIX) else None


def check_handler(handler: str | Callable[..., Any]) -> str:
    """Check that a task handler can be imported now (not at the first task); return its path.

    Args:
        handler: ``"package.module:function"``, or a module-level function.

    Raises:
        ValueError: the path is malformed, cannot be imported, or names something not callable;
            or the function is not importable by its module and name (a lambda, a nested function).
        TypeError: ``handler`` is neither a string nor a function.
    """
    if callable(handler) and not isinstance(handler, str):
        path = f"{getattr(handler, '__module__', None)}:{getattr(handler, '__qualname__', None)}"
        try:
            found = pkgutil.resolve_name(path)
        except (ImportError, AttributeError, ValueError):
            found = None
        if found is not handler:
            raise ValueError(f"task handler {handler!r} must be a module-level function workers can import")
        return path
    if not isinstance(handler, str):
        raise TypeError(f"a task handler is a 'module:function' string or a function, not {type(handler).__name__}")
    if handler.count(":") != 1 or not all(handler.split(":")):
        raise ValueError(f"a task handler must look like 'package.module:function', got {handler!r}")
    try:
        found = pkgutil.resolve_name(handler)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"task handler {handler!r} cannot be loaded: {exc}") from exc
    if not callable(found):
        raise ValueError(f"task handler {handler!r} is not callable")
    return handler


def run_task(prompt: str, call: dict[str, Any]) -> Any:
    """The prompt handler that runs a task handler in a worker.

    Args:
        prompt: unused (the task carries its own keys).
        call: ``{"handler": path, "task": dict, "pool_id": str, "task_id": str}``.
    """
    path = call["handler"]
    handler = _resolved.get(path)
    if handler is None:
        handler = _resolved[path] = pkgutil.resolve_name(path)
    context = TaskContext(call["pool_id"], current_worker_id(), call["task_id"], os.getpid())
    # A coroutine is run to completion by the worker, so async task handlers work too.
    return handler(call["task"], context)


def echo_task(task: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """The default task handler: run nothing; return the task and where it ran.

    Args:
        task: any task dict.
        context: where it runs.

    Returns:
        ``{"prompt", "task", "pool_id", "worker_id", "task_id", "pid"}``.
    """
    return {
        "prompt": task.get("prompt"),
        "task": task,
        "pool_id": context.pool_id,
        "worker_id": context.worker_id,
        "task_id": context.task_id,
        "pid": context.pid,
    }
