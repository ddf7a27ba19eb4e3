"""CPython 3.13's executor tests, run against procpool.Executor through one executor mixin.

Each class pairs one of CPython's test mixins with ``ProcpoolMixin``, the way CPython's
``create_executor_tests`` pairs them with its own executors. The classes are named
``Procpool<CPython's class name>``; DIFFERENCES.md names cases by CPython's class name.
"""

from __future__ import annotations

import multiprocessing

from test.test_concurrent_futures import (
    test_as_completed,
    test_deadlock,
    test_init,
    test_process_pool,
    test_shutdown,
    test_wait,
    util,
)

import procpool


class ProcpoolMixin(util.ExecutorMixin):
    """Builds a procpool.Executor with CPython's worker count (5, so two pools of three)."""

    executor_type = procpool.Executor
    # procpool's default start method; with a ctx the tests pass mp_context=, which the
    # Executor accepts as ProcessPoolExecutor does ("fork" is refused).
    ctx = "forkserver"

    def get_context(self) -> multiprocessing.context.BaseContext:
        return multiprocessing.get_context(self.ctx)


class ProcpoolProcessPoolExecutorTest(ProcpoolMixin, test_process_pool.ProcessPoolExecutorTest, util.BaseTestCase):
    pass


class ProcpoolAsCompletedTests(ProcpoolMixin, test_as_completed.AsCompletedTests, util.BaseTestCase):
    pass


class ProcpoolWaitTests(ProcpoolMixin, test_wait.WaitTests, util.BaseTestCase):
    pass


class ProcpoolProcessPoolShutdownTest(ProcpoolMixin, test_shutdown.ProcessPoolShutdownTest, util.BaseTestCase):
    pass


class ProcpoolExecutorDeadlockTest(ProcpoolMixin, test_deadlock.ExecutorDeadlockTest, util.BaseTestCase):
    pass


class ProcpoolInitializerMixin(test_init.InitializerMixin, ProcpoolMixin, util.BaseTestCase):
    pass


class ProcpoolFailingInitializerMixin(test_init.FailingInitializerMixin, ProcpoolMixin, util.BaseTestCase):
    pass
