"""procpool: pools of exactly three worker processes, coordinated by asyncio.

A pool starts its workers on entry and stops them on exit::

    async with WorkerPool(handler="procpool.handlers:echo") as pool:
        print(await pool.apply(pow, (2, 10)))
        print(await pool.execute("hello"))

The public names are imported on first use (PEP 562): the fork server and every worker import
``procpool._child``, which runs this file, and must not pay for asyncio, psutil and the pool
machinery they never use. ``from procpool import WorkerPool`` and ``procpool.WorkerPool`` work as
with eager imports; type checkers and IDEs read the ``TYPE_CHECKING`` block below.
"""

import importlib as _importlib

# typing.TYPE_CHECKING without importing typing (the fork server imports this file; type
# checkers treat any TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from procpool._autoscale import AutoscaleDecision, AutoscaleMetrics, AutoscalePolicy, AutoscaleStatistics
    from procpool._child import heartbeat
    from procpool._config import PoolConfig
    from procpool._graph import Ref, TaskGraph
    from procpool._manager import PoolManager, PoolSnapshot, Selector, get_pool_manager, prefer_healthy
    from procpool._pool import POOL_SIZE, PoolState, WorkerPool
    from procpool._protocol import PoolLike
    from procpool._retry import RetryPolicy
    from procpool._shm import keep_freed_memory
    from procpool._stats import Health, PoolStatistics, PriorityStatistics, WorkerStatistics
    from procpool._task import TaskReport
    from procpool._worker import Worker, WorkerState
    from procpool.errors import (
        Attempt,
        BrokenPool,
        DependencyFailed,
        GraphFailed,
        MemoryLimitExceeded,
        NoPoolAvailable,
        PoisonTask,
        PoolClosed,
        PoolFull,
        PoolNotFound,
        ProcPoolError,
        RemoteTraceback,
        SerializationError,
        TaskExited,
        TaskTimeout,
        WorkerCrashed,
        WorkerStuck,
    )
    from procpool.executor import Executor
del TYPE_CHECKING

__version__ = "0.1.0"

__all__ = (
    "POOL_SIZE",
    "Attempt",
    "AutoscaleMetrics",
    "AutoscalePolicy",
    "AutoscaleStatistics",
    "BrokenPool",
    "AutoscaleDecision",
    "DependencyFailed",
    "Executor",
    "GraphFailed",
    "Health",
    "MemoryLimitExceeded",
    "NoPoolAvailable",
    "PoolClosed",
    "PoolConfig",
    "PoolFull",
    "PoolLike",
    "PoolManager",
    "PoolNotFound",
    "PoisonTask",
    "PoolSnapshot",
    "PoolState",
    "PoolStatistics",
    "PriorityStatistics",
    "ProcPoolError",
    "Ref",
    "RemoteTraceback",
    "RetryPolicy",
    "Selector",
    "SerializationError",
    "TaskGraph",
    "TaskReport",
    "TaskExited",
    "TaskTimeout",
    "Worker",
    "WorkerCrashed",
    "WorkerPool",
    "WorkerState",
    "WorkerStatistics",
    "WorkerStuck",
    "__version__",
    "get_pool_manager",
    "heartbeat",
    "keep_freed_memory",
    "prefer_healthy",
)

# Where each public name lives (the same imports as the TYPE_CHECKING block above).
_WHERE = {
    "procpool._autoscale": ("AutoscaleDecision", "AutoscaleMetrics", "AutoscalePolicy", "AutoscaleStatistics"),
    "procpool._child": ("heartbeat",),
    "procpool._config": ("PoolConfig",),
    "procpool._graph": ("Ref", "TaskGraph"),
    "procpool._manager": ("PoolManager", "PoolSnapshot", "Selector", "get_pool_manager", "prefer_healthy"),
    "procpool._pool": ("POOL_SIZE", "PoolState", "WorkerPool"),
    "procpool._protocol": ("PoolLike",),
    "procpool._retry": ("RetryPolicy",),
    "procpool._shm": ("keep_freed_memory",),
    "procpool._stats": ("Health", "PoolStatistics", "PriorityStatistics", "WorkerStatistics"),
    "procpool._task": ("TaskReport",),
    "procpool._worker": ("Worker", "WorkerState"),
    "procpool.errors": (
        "Attempt",
        "BrokenPool",
        "DependencyFailed",
        "GraphFailed",
        "MemoryLimitExceeded",
        "NoPoolAvailable",
        "PoisonTask",
        "PoolClosed",
        "PoolFull",
        "PoolNotFound",
        "ProcPoolError",
        "RemoteTraceback",
        "SerializationError",
        "TaskExited",
        "TaskTimeout",
        "WorkerCrashed",
        "WorkerStuck",
    ),
    "procpool.executor": ("Executor",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}


def __getattr__(name: str) -> "Any":
    """Import a public name's module on first use, then keep the name here."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
