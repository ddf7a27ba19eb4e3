"""procpool: pools of exactly three worker processes, coordinated by asyncio.

A pool starts its workers on entry and stops them on exit::

    async with WorkerPool(handler="procpool.handlers:echo") as pool:
        print(await pool.apply(pow, (2, 10)))
        print(await pool.execute("hello"))
"""

import logging as _logging

from procpool._autoscale import AutoscaleDecision, AutoscaleMetrics, AutoscalePolicy, AutoscaleStatistics
from procpool._child import heartbeat
from procpool._config import PoolConfig
from procpool._graph import Ref, TaskGraph
from procpool._manager import PoolManager, PoolSnapshot, Selector, get_pool_manager, prefer_healthy
from procpool._pool import POOL_SIZE, PoolState, WorkerPool
from procpool._protocol import PoolLike
from procpool._retry import RetryPolicy
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

__version__ = "0.1.0"

# A library logs, it does not print: without the application's own logging set-up, stay silent.
_logging.getLogger("procpool").addHandler(_logging.NullHandler())

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
    "prefer_healthy",
)
