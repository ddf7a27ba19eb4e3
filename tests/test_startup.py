"""Start-up cost, pinned without timing (issue 13, cold start): what the fork server and the
workers import, that the fork server imports the main module once, and that the lazy
``procpool/__init__.py`` still exports every public name."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import procpool
from procpool import _forkserver, _processes

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


def test_what_the_fork_server_preloads_imports_no_parent_machinery():
    """Importing what the fork server preloads (and the package itself) pulls in none of the pool's
    parent-side stack: no asyncio, ssl, psutil, attrs, manager, pool or process management."""
    assert _processes.FORK_SERVER_PRELOAD == ["procpool._forkserver"]
    assert _processes.FORK_SERVER_ENV == _forkserver.ENV
    for preload in ("procpool", *_processes.FORK_SERVER_PRELOAD):
        loaded = json.loads(
            _fresh(
                """
                import importlib, json, sys
                importlib.import_module(sys.argv[1])
                print(json.dumps(sorted(sys.modules)))
                """,
                preload,
            )
        )
        assert [m for m in PARENT_ONLY if m in loaded] == [], preload
    assert "procpool._child" in loaded


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
    if {fail_in_server!r} and __name__ == "__mp_main__" and multiprocessing.current_process().name == "MainProcess":
        raise RuntimeError("this main module fails in the fork server only")

    def probe():
        loaded = [m for m in {parent_only!r} if m in sys.modules and m not in ("asyncio", "ssl")]
        return os.getpid(), os.environ.get({env!r}), loaded

    async def main():
        probes = []
        for _ in range(2):
            async with procpool.WorkerPool() as pool:
                probes += await asyncio.gather(*[pool.apply(probe) for _ in range(6)])
        print(json.dumps({{"probes": probes, "env": os.environ.get({env!r})}}))

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def _run_script(tmp_path, fail_in_server):
    record = tmp_path / "runs.jsonl"
    script = tmp_path / "main_script.py"
    script.write_text(
        SCRIPT.format(
            record=str(record), fail_in_server=fail_in_server, parent_only=PARENT_ONLY, env=_processes.FORK_SERVER_ENV
        )
    )
    out = subprocess.run(
        [sys.executable, str(script), "an", "argument"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    return report, runs


def test_the_fork_server_runs_the_main_module_once_for_every_worker(tmp_path):
    """Six workers over two pools: the main module ran in the parent and once more, in the fork
    server (with the parent's argv), never in a worker; the workers import none of the
    parent-side machinery, and the variable that told the server about the main module is gone."""
    report, runs = _run_script(tmp_path, fail_in_server=False)
    assert report["env"] is None
    assert [name for name, _, _ in runs] == ["__main__", "__mp_main__"]
    assert all(argv == ["an", "argument"] for _, _, argv in runs)
    # (The main module imports asyncio, so the workers have it, and ssl with it.)
    for pid, env, loaded in report["probes"]:
        assert pid != runs[1][1] and env is None and loaded == [], (pid, env, loaded)
    assert len({pid for pid, _, _ in report["probes"]}) >= 2


def test_a_main_module_that_fails_in_the_fork_server_is_imported_by_each_worker(tmp_path):
    """If the main module raises in the fork server, the server lives on and each worker imports
    the main module itself, as multiprocessing does without a preload: the pools still work."""
    report, runs = _run_script(tmp_path, fail_in_server=True)
    names = [name for name, _, _ in runs]
    assert names[:2] == ["__main__", "__mp_main__"]
    # One run per worker process after the server's failed one (six workers, two pools).
    assert names.count("__mp_main__") == 1 + 6
    assert len(report["probes"]) == 2 * 6
