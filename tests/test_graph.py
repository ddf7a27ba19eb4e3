"""Task graphs: order, parallelism, failure propagation with the root cause, and cycle refusal."""

from __future__ import annotations

import asyncio

import pytest
import sched_tasks as st
from helpers import assert_gone, pids_of

from procpool import DependencyFailed, GraphFailed, PoolManager, Ref, TaskGraph, WorkerPool

pytestmark = pytest.mark.anyio


async def test_each_task_runs_after_the_tasks_it_needs_with_their_results_as_inputs(pool):
    """A task's Ref arguments become the results of the tasks it names, which finished before it started."""
    graph = TaskGraph()
    a = graph.add("a", st.add, (1, 2))
    b = graph.add("b", st.add, (a, 10))
    graph.add("c", st.add, (a, b))
    graph.add("d", sum, ([a, b, 100],))  # a Ref inside a list is filled in too
    assert await asyncio.wait_for(pool.run_graph(graph), 60) == {"a": 3, "b": 13, "c": 16, "d": 116}


async def test_independent_tasks_run_at_the_same_time(pool, tmp_path):
    """Tasks that do not need each other run concurrently on the pool's workers; their dependant waits for all."""
    log = str(tmp_path / "log")
    graph = TaskGraph()
    parts = [graph.add(f"p{i}", st.pid_after, (log, f"p{i}", 0.3)) for i in range(3)]
    graph.add("join", st.pid_after, (log, "join", 0), after=parts)
    results = await asyncio.wait_for(pool.run_graph(graph), 60)
    spans = [results[f"p{i}"] for i in range(3)]
    assert len({pid for _, pid, _, _ in spans}) == 3  # three workers
    assert max(start for *_, start, _ in spans) < min(end for *_, end in spans)  # all overlapped
    assert results["join"][2] >= max(end for *_, end in spans)


async def test_a_failed_task_fails_its_dependants_with_the_root_cause_and_the_rest_still_run(pool, tmp_path):
    """Dependants of a failure never run and name the root cause; independent tasks finish; GraphFailed holds both."""
    log = str(tmp_path / "log")
    graph = TaskGraph()
    bad = graph.add("bad", st.fail_with, ("disk full",))
    mid = graph.add("mid", st.record, (log, "mid"), after=[bad])
    graph.add("leaf", st.add, (mid, 1))
    graph.add("free", st.record, (log, "free"))
    with pytest.raises(GraphFailed) as caught:
        await asyncio.wait_for(pool.run_graph(graph), 60)
    failed = caught.value
    assert isinstance(failed.errors["bad"], RuntimeError)
    for name in ("mid", "leaf"):
        error = failed.errors[name]
        assert isinstance(error, DependencyFailed) and error.root == "bad"
        assert "disk full" in str(error) and error.__cause__ is failed.errors["bad"]
    assert failed.results == {"free": "free"} and list(failed.roots) == ["bad"]
    assert [line.split()[1] for line in st.lines(log)] == ["free"]  # the dependants never ran
    assert "'bad' failed with RuntimeError: disk full" in str(failed)
    results = await pool.run_graph(graph, return_exceptions=True)
    assert isinstance(results["leaf"], DependencyFailed) and results["free"] == "free"


async def test_a_cycle_or_a_missing_task_is_refused_before_anything_runs(pool, tmp_path):
    """A cyclic graph, or one that needs an unknown task, raises ValueError and runs nothing."""
    log = str(tmp_path / "log")
    graph = TaskGraph()
    graph.add("x", st.record, (log, "x"), after=["z"])
    graph.add("y", st.record, (log, "y"), after=["x"])
    graph.add("z", st.record, (log, "z"), after=["y"])
    graph.add("free", st.record, (log, "free"))
    with pytest.raises(ValueError, match="cycle"):
        await pool.run_graph(graph)
    missing = TaskGraph()
    missing.add("x", st.record, (log, "x"), after=["nowhere"])
    with pytest.raises(ValueError, match="nowhere"):
        await pool.run_graph(missing)
    assert st.lines(log) == [] and pool.statistics().tasks_submitted == 0


async def test_a_dict_of_calls_is_a_graph_too(pool):
    """run_graph takes {name: (fn, args...)} with Refs among the arguments."""
    assert await pool.run_graph({"a": (st.add, 2, 3), "b": (st.add, Ref("a"), 1)}) == {"a": 5, "b": 6}


async def test_a_manager_spreads_a_graph_s_independent_tasks_over_its_pools(tmp_path):
    """Run by a manager, ready tasks are routed as they become ready, so they spread across pools."""
    log = str(tmp_path / "log")
    pids: set[int] = set()
    async with PoolManager() as manager:
        pools: list[WorkerPool] = [await manager.create_pool(f"g{i}") for i in range(2)]
        for p in pools:
            pids.update(pids_of(p))
        graph = TaskGraph()
        parts = [graph.add(f"p{i}", st.pid_after, (log, f"p{i}", 0.2)) for i in range(6)]
        graph.add("total", len, (parts,))
        results = await asyncio.wait_for(manager.run_graph(graph), 60)
        assert results["total"] == 6
        ran_on = {results[f"p{i}"][1] for i in range(6)}
        assert len(ran_on) == 6  # six workers of two pools, one task each
        assert ran_on <= pids
    assert_gone(sorted(pids))
