"""Task handlers and initializers for the adapter tests; workers import them by path."""

from __future__ import annotations

import os
from typing import Any

import attrs

from procpool.integrations.tasks import TaskContext


def record(task: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Return the task and the context exactly as the handler received them."""
    return {"task": task, "context": attrs.asdict(context), "context_type": type(context).__name__}


async def record_async(task: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """The same, as a coroutine function."""
    return record(task, context)


def fail(task: dict[str, Any], context: TaskContext) -> None:
    """Raise a ValueError carrying the task's message."""
    raise ValueError(task["message"])


def block_on_fifo(path: str) -> None:
    """Initializer: if the FIFO exists, wait until the test opens it for writing (a new worker held back)."""
    if os.path.exists(path):
        with open(path):
            pass
