"""Start-up cost, pinned without timing (issue 13, cold start): what the fork server and the
workers import, that a worker imports the main module only when a task needs it, and that the
lazy ``procpool/__init__.py`` still exports every public name."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import procpool

# Parent-side machinery the fork server and the workers never need.
PARENT_ONLY = (
    "asyncio",
    "ssl",
    "psutil",
    "attrs",
    "procpool._manager",
    "procpool._pool",
    "procpool._supervisor",
    "procpool._worker",
    "procpool._processes",
    "procpool.executor",
)


def _fresh(code: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


# Modules the fork server must not import: each costs milliseconds at every cold start (the
# server imports procpool._forkserver before it can fork the first worker).
HEAVY = ("typing", "logging", "concurrent.futures", "re", "inspect", "multiprocessing", "pickle", "traceback")


def test_the_fork_server_imports_only_what_a_worker_runs():
    """What the fork server imports (procpool._forkserver, with the package and the worker's
    code) pulls in none of the pool's parent-side stack and none of the heavier standard modules
    a worker does not need to start (beyond what the interpreter itself loaded)."""
    code = "import importlib, json, sys\nimportlib.import_module(sys.argv[1])\nprint(json.dumps(sorted(sys.modules)))"
    baseline = set(json.loads(_fresh(code, "os")))
    loaded = set(json.loads(_fresh(code, "procpool._forkserver"))) - baseline
    assert "procpool._child" in loaded
    assert [m for m in (*PARENT_ONLY, *HEAVY) if m in loaded] == []


def test_importing_worker_pool_leaves_psutil_to_first_use():
    """A main module that imports WorkerPool is imported by the fork server too: that import does
    not pull in psutil, which only the parent uses, when it first looks at a process."""
    code = "import json, sys\nfrom procpool import WorkerPool\nprint(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(_fresh(code))
    assert "procpool._pool" in loaded and "psutil" not in loaded


def test_every_public_name_imports_from_a_fresh_interpreter():
    """`from procpool import X` works for every X in __all__, dir() lists them all, and an
    unknown name still raises AttributeError / ImportError."""
    out = _fresh(
        """
        import pickle, procpool
        for name in procpool.__all__:
            exec(f"from procpool import {name}")
            assert getattr(procpool, name) is not None, name
        assert set(procpool.__all__) <= set(dir(procpool))
        assert procpool.WorkerPool.__module__ == "procpool._pool"
        try:
            procpool.NoSuchName
        except AttributeError:
            pass
        else:
            raise AssertionError("procpool.NoSuchName")
        try:
            from procpool import NoSuchName  # noqa: F401
        except ImportError:
            pass
        else:
            raise AssertionError("from procpool import NoSuchName")
        error = pickle.loads(pickle.dumps(procpool.WorkerCrashed(7, -9, "detail")))
        assert type(error) is procpool.errors.WorkerCrashed and (error.pid, error.exitcode) == (7, -9)
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_the_lazy_names_are_the_real_objects():
    """A lazily imported name is the object its module defines, and errors still pickle."""
    from procpool import _pool, errors

    assert procpool.WorkerPool is _pool.WorkerPool
    assert procpool.BrokenPool is errors.BrokenPool
    error = pickle.loads(pickle.dumps(procpool.TaskTimeout(1.5, 42)))
    assert type(error) is errors.TaskTimeout and isinstance(error, TimeoutError)
    assert (error.timeout, error.pid) == (1.5, 42)


SCRIPT = textwrap.dedent(
    """
    import asyncio, json, multiprocessing, os, sys
    import procpool

    with open({record!r}, "a") as f:
        f.write(json.dumps([__name__, os.getpid(), sys.argv[1:]]) + "\\n")
    if {fail_in_worker!r} and __name__ == "__mp_main__":
        raise RuntimeError("this main module fails in a worker")

    def probe():
        loaded = [m for m in {parent_only!r} if m in sys.modules and m not in ("asyncio", "ssl")]
        return os.getpid(), loaded

    async def main():
        report = {{"plain": [], "probes": [], "errors": []}}
        for _ in range(2):
            async with procpool.WorkerPool() as pool:
                report["plain"] += await asyncio.gather(*[pool.apply(os.getpid) for _ in range(6)])
                for outcome in await asyncio.gather(*[pool.apply(probe) for _ in range(6)], return_exceptions=True):
                    if isinstance(outcome, BaseException):
                        report["errors"].append(f"{{type(outcome).__name__}}: {{outcome}}")
                    else:
                        report["probes"].append(outcome)
                report["after"] = await pool.apply(os.getpid)
        print(json.dumps(report))

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def _run_script(tmp_path, fail_in_worker):
    record = tmp_path / "runs.jsonl"
    script = tmp_path / "main_script.py"
    script.write_text(SCRIPT.format(record=str(record), fail_in_worker=fail_in_worker, parent_only=PARENT_ONLY))
    out = subprocess.run(
        [sys.executable, str(script), "an", "argument"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    return report, runs


def test_a_worker_imports_the_main_module_only_when_a_task_needs_it(tmp_path):
    """Tasks that need nothing from the main module never run it in a worker nor in the fork
    server; a worker that gets a task defined there imports it once (as ``__mp_main__``, with
    the parent's argv), and still none of the parent-side machinery."""
    report, runs = _run_script(tmp_path, fail_in_worker=False)
    parent = runs[0]
    assert parent[0] == "__main__"
    in_workers = runs[1:]
    assert {name for name, _, _ in in_workers} == {"__mp_main__"}
    assert all(argv == ["an", "argument"] for _, _, argv in runs)
    probed = {pid for pid, _ in report["probes"]}
    # Once per worker that ran a probe, and only in those: the plain tasks imported nothing.
    assert sorted(pid for _, pid, _ in in_workers) == sorted(probed)
    assert report["errors"] == [] and len(report["probes"]) == 12
    for pid, loaded in report["probes"]:
        assert loaded == [], (pid, loaded)


def test_a_main_module_that_fails_in_a_worker_fails_only_the_tasks_that_need_it(tmp_path):
    """If the main module raises when a worker imports it, each task defined there fails with a
    SerializationError naming the error, and the same pools go on running every other task."""
    report, _ = _run_script(tmp_path, fail_in_worker=True)
    assert report["probes"] == [] and len(report["errors"]) == 12
    assert all(e.startswith("SerializationError") and "fails in a worker" in e for e in report["errors"])
    assert len(report["plain"]) == 12 and isinstance(report["after"], int)


UNGUARDED = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import procpool

    def probe():
        return os.getpid()

    async def main():
        async with procpool.WorkerPool() as pool:
            try:
                await pool.apply(probe)
            except procpool.SerializationError as exc:
                return {"error": str(exc), "after": await pool.apply(os.getpid)}
            return {"error": None}

    print(json.dumps(asyncio.run(main())))
    """
)


def test_a_script_without_the_main_guard_fails_its_task_instead_of_starting_pools_in_workers(tmp_path):
    """A script that starts its pool outside 'if __name__ == "__main__":' gets a clear error for
    a task defined in it (multiprocessing's bootstrapping-phase error) instead of workers that
    start pools of their own, and the pool goes on running other tasks."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["error"] is not None and "bootstrapping phase" in report["error"], report
    assert isinstance(report["after"], int)
