"""Task dependencies: a small DAG executor, not a workflow engine (issue 15).

A [`TaskGraph`][procpool.TaskGraph] names tasks; a task's arguments may hold the
[`Ref`][procpool.Ref] of another task, which stands for that task's result. ``run_graph``
refuses a cycle or a missing task before anything runs, then starts every task whose inputs
are ready, so independent tasks run at the same time (on one pool's three workers, or spread
over a manager's pools). Results stay in the parent: a task's inputs are pickled into its call
like any argument, to whichever worker runs it.

A task that fails fails its dependants, which never run: each gets a
[`DependencyFailed`][procpool.DependencyFailed] naming the root cause. Tasks that do not depend
on it still run to the end; then ``run_graph`` raises [`GraphFailed`][procpool.GraphFailed]
with every error and every result (or, with ``return_exceptions=True``, returns the errors in
place of the results).
"""

from __future__ import annotations

import asyncio
import graphlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from procpool.errors import DependencyFailed, GraphFailed

__all__ = ("Node", "Ref", "TaskGraph", "run_graph")


@attrs.frozen
class Ref:
    """Stands for the result of the task named ``name`` in a task's arguments."""

    name: str


@attrs.frozen
class Node:
    """One task of a graph: the call, what it needs, and how to submit it."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwds: dict[str, Any]
    # Tasks to wait for without taking their result.
    after: tuple[str, ...]
    priority: int
    retry: Any
    timeout: float | None
    # Tags the pool that runs it must carry (manager only).
    requires: frozenset[str]

    @property
    def needs(self) -> set[str]:
        """The names of the tasks it needs: those its arguments refer to, and ``after``."""
        found: set[str] = set(self.after)
        _walk((self.args, self.kwds), found)
        return found


def _walk(value: Any, found: set[str]) -> None:
    if isinstance(value, Ref):
        found.add(value.name)
    elif type(value) in (list, tuple, set, frozenset):
        for item in value:
            _walk(item, found)
    elif type(value) is dict:
        for item in value.values():
            _walk(item, found)


def _fill(value: Any, results: Mapping[str, Any]) -> Any:
    """``value`` with every Ref replaced by that task's result (in lists, tuples, sets and dicts too)."""
    if isinstance(value, Ref):
        return results[value.name]
    kind = type(value)
    if kind in (list, tuple, set, frozenset):
        return kind(_fill(item, results) for item in value)
    if kind is dict:
        return {key: _fill(item, results) for key, item in value.items()}
    return value


class TaskGraph:
    """A set of named tasks, some of which need others' results.

    Example::

        graph = TaskGraph()
        numbers = graph.add("numbers", range_list, (10,))
        graph.add("total", sum, (numbers,))
        results = await pool.run_graph(graph)      # {"numbers": [...], "total": 45}
    """

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}

    def add(
        self,
        name: str,
        fn: Callable[..., Any],
        args: Sequence[Any] = (),
        kwds: dict[str, Any] | None = None,
        *,
        after: Iterable[str | Ref] = (),
        priority: int = 0,
        retry: Any = None,
        timeout: float | None = None,
        requires: Iterable[str] = (),
    ) -> Ref:
        """Add the task ``name``: ``fn(*args, **kwds)``, once the tasks it refers to are done.

        Args:
            name: the task's name, unique in the graph; its result is under this key.
            fn: a module-level function (plain or ``async def``), so workers can import it.
            args: its positional arguments; a [`Ref`][procpool.Ref] among them (also inside a
                list, tuple, set or dict) is replaced by that task's result.
            kwds: its keyword arguments, with Refs replaced the same way.
            after: tasks (names or Refs) that must finish first although their result is not an input.
            priority: the task's priority in its pool (higher runs first).
            retry: its [`RetryPolicy`][procpool.RetryPolicy] (default: the pool's).
            timeout: its run-time limit in seconds (default: the pool's ``task_timeout``).
            requires: tags the pool that runs it must carry (when a manager runs the graph).

        Returns:
            The task's [`Ref`][procpool.Ref], to pass as an argument of the tasks that need its result.

        Raises:
            ValueError: the name is taken. TypeError: a bad argument.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"a task name must be a non-empty string, got {name!r}")
        if name in self._nodes:
            raise ValueError(f"the graph already has a task named {name!r}")
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"args must be a tuple or list, not {type(args).__name__}")
        if kwds is not None and not isinstance(kwds, dict):
            raise TypeError(f"kwds must be a dict or None, not {type(kwds).__name__}")
        after_names = tuple(a.name if isinstance(a, Ref) else a for a in after)
        if isinstance(requires, str):
            raise TypeError(f"requires must be a set of tags such as {{{requires!r}}}, not a string")
        node = Node(name, fn, tuple(args), dict(kwds or {}), after_names, priority, retry, timeout, frozenset(requires))
        self._nodes[name] = node
        return Ref(name)

    @classmethod
    def from_mapping(cls, tasks: Mapping[str, Any]) -> TaskGraph:
        """A graph from ``{name: (fn, arg, ...)}``; Refs among the arguments name other tasks."""
        graph = cls()
        for name, spec in tasks.items():
            if callable(spec):
                spec = (spec,)
            if not isinstance(spec, (tuple, list)) or not spec or not callable(spec[0]):
                raise TypeError(f"task {name!r} must be (fn, arg, ...), not {spec!r}")
            graph.add(name, spec[0], tuple(spec[1:]))
        return graph

    @property
    def nodes(self) -> Mapping[str, Node]:
        """The tasks, by name, in the order they were added."""
        return dict(self._nodes)

    def order(self) -> list[str]:
        """The task names in an order that runs every task after those it needs.

        Raises:
            ValueError: a task needs one the graph does not have, or the tasks form a cycle.
        """
        needs = {name: node.needs for name, node in self._nodes.items()}
        for name, wanted in needs.items():
            missing = sorted(wanted - self._nodes.keys())
            if missing:
                raise ValueError(f"task {name!r} needs {', '.join(map(repr, missing))}, which the graph does not have")
        try:
            return list(graphlib.TopologicalSorter(needs).static_order())
        except graphlib.CycleError as exc:
            cycle = " -> ".join(map(repr, reversed(exc.args[1])))
            raise ValueError(f"the task graph has a cycle: {cycle}; nothing was run") from None

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"<TaskGraph tasks={len(self._nodes)}>"


Runner = Callable[[Node, tuple[Any, ...], dict[str, Any]], Awaitable[Any]]


async def run_graph(graph: TaskGraph | Mapping[str, Any], runner: Runner, return_exceptions: bool) -> dict[str, Any]:
    """Run every task of ``graph`` through ``runner`` as soon as the tasks it needs are done."""
    if not isinstance(graph, TaskGraph):
        if not isinstance(graph, Mapping):
            raise TypeError(f"graph must be a TaskGraph or a dict of tasks, not {type(graph).__name__}")
        graph = TaskGraph.from_mapping(graph)
    graph.order()  # refuse a cycle or a missing task before anything runs
    nodes = graph.nodes
    needs = {name: node.needs for name, node in nodes.items()}
    sorter = graphlib.TopologicalSorter(needs)
    sorter.prepare()
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}
    running: dict[asyncio.Task[Any], str] = {}
    try:
        while sorter.is_active():
            for name in sorter.get_ready():
                failed = sorted(n for n in needs[name] if n in errors)
                if failed:
                    errors[name] = _dependency_failed(name, failed[0], errors[failed[0]])
                    sorter.done(name)
                    continue
                node = nodes[name]
                call = runner(node, _fill(node.args, results), _fill(node.kwds, results))
                running[asyncio.ensure_future(call)] = name
            if not running:
                continue  # only skipped tasks became ready: their dependants may be ready now
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                name = running.pop(task)
                if task.cancelled():
                    errors[name] = asyncio.CancelledError(f"task {name!r} was cancelled")
                elif task.exception() is not None:
                    errors[name] = task.exception()  # type: ignore[assignment]
                else:
                    results[name] = task.result()
                sorter.done(name)
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    if errors and not return_exceptions:
        raise GraphFailed(errors, results)
    return {name: results[name] if name in results else errors[name] for name in nodes}


def _dependency_failed(name: str, failed: str, error: BaseException) -> DependencyFailed:
    """The error of a task that did not run because the task ``failed`` (or its own root) failed."""
    if isinstance(error, DependencyFailed):
        root, cause = error.root, error.__cause__
    else:
        root, cause = failed, error
    carried = DependencyFailed(name, root, f"{type(cause).__name__}: {cause}")
    carried.__cause__ = cause
    return carried
