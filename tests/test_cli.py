"""The procpool command line, run as the real console script in a subprocess."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import attr
import attrs
import psutil
import pytest
from helpers import assert_gone, console_script

from procpool.cli.bench import benchmarks_dir

# Every command is bounded; a hang fails the test instead of blocking the suite.
DEADLINE = 120


def procpool(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script and wait for it (subprocess.run kills it on timeout)."""
    return subprocess.run(
        [*console_script(), *args], capture_output=True, text=True, timeout=DEADLINE, cwd=cwd, env=env, check=False
    )


@pytest.fixture
def user_module(tmp_path: Path) -> dict[str, str]:
    """A temporary module of the user's functions, importable through PYTHONPATH."""
    (tmp_path / "usertasks.py").write_text(
        textwrap.dedent(
            """
            import os
            import sys

            def double(x):
                return 2 * x

            def inverse(x):
                return 1 / x

            def add(a, b):
                return a + b

            def whoami(_):
                return os.getpid()

            def leave(x):
                if x == "interrupt":
                    raise KeyboardInterrupt
                if isinstance(x, int):
                    sys.exit(x)
                return x
            """
        )
    )
    (tmp_path / "brokentasks.py").write_text("def f(:\n    return 1\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.slow
def test_demo_json_accounts_for_every_task_and_restarts_killed_workers():
    """demo --tasks 40 --json exits 0, every task is done or failed on purpose, workers restarted, none left."""
    proc = procpool("demo", "--tasks", "40", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # stdout holds the JSON summary and nothing else
    assert summary["tasks"] == 40
    assert summary["done"] + summary["failed_on_purpose"] == 40
    assert summary["all_accounted_for"] is True
    assert summary["failed_unexpectedly"] == 0
    assert summary["timed_out"] == 1 and summary["crashed"] == 1
    assert summary["restarts"] >= 1
    assert summary["recovered"] is True
    assert summary["results_match_serial"] is True
    assert len(summary["pool_status"]) == 2
    assert all(len(p["workers"]) == 3 for p in summary["pool_status"])
    killed = [f["pid"] for f in summary["faults"] if f["fault"] == "sigkill"]
    assert killed and set(killed) <= set(summary["worker_pids"])
    assert_gone(summary["worker_pids"])


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``PROCPOOL_TEST_MARK=marker`` (inherited from the command)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PROCPOOL_TEST_MARK") == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.mark.slow
def test_demo_on_dask_prints_the_tables_with_a_worker_killed_half_way():
    """demo --dask prints the same tables, a killed worker and a timed-out task included, and leaves no process."""
    pytest.importorskip("distributed")
    marker = uuid.uuid4().hex
    proc = procpool("demo", "--dask", "--tasks", "24", "--pools", "1", env={**os.environ, "PROCPOOL_TEST_MARK": marker})
    # Every process the demo started (the Dask workers inherit its environment) is gone soon after.
    deadline = time.monotonic() + 10
    while (left := _marked(marker)) and time.monotonic() < deadline:
        psutil.wait_procs(left, timeout=0.5)
    for leftover in left:
        leftover.kill()
    assert not left, f"processes left behind: {left}"
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "procpool demo: 1 pools x 3 workers on local Dask clusters" in out
    assert "failed on purpose │ 2 (1 timed out, 1 worker killed)" in out
    assert "failed otherwise │ 0" in out and "accounted for │ 24 of 24" in out
    assert "same as the serial run" in out and "every pool healthy" in out
    assert "SIGKILL to worker pid" in proc.stderr
    assert len([line for line in proc.stdout.splitlines() if "demo-1-w" in line]) == 3


def test_run_maps_a_user_function_and_prints_json_lines_in_order(user_module):
    """run MODULE:FUNCTION ARG... prints one JSON line per input, in input order, JSON-decoding inputs."""
    proc = procpool("run", "usertasks:double", "1", "2", "3", "[4]", "hello", env=user_module)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["result"] for line in lines] == [2, 4, 6, [4, 4], "hellohello"]
    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4]


def test_run_reports_each_failed_item_and_exits_non_zero(user_module):
    """An item that raises gets an error line with its type and message; the others succeed; exit code 1."""
    proc = procpool("run", "usertasks:inverse", "4", "0", "2", env=user_module)
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["result"] == 0.25 and lines[2]["result"] == 0.5
    assert lines[1]["error"] == {"type": "ZeroDivisionError", "message": "division by zero"}
    assert "item 1" in proc.stderr and "1 of 3 items failed" in proc.stderr


def test_run_reports_a_task_calling_sys_exit_or_raising_keyboardinterrupt_as_that_item_failing(user_module):
    """An item whose task calls sys.exit(3) or raises KeyboardInterrupt is a TaskExited error line; run exits 1."""
    proc = procpool("run", "usertasks:leave", "3", "interrupt", "fine", env=user_module)
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert lines[0]["error"]["type"] == "TaskExited" and "SystemExit(3)" in lines[0]["error"]["message"]
    assert lines[1]["error"]["type"] == "TaskExited" and "KeyboardInterrupt" in lines[1]["error"]["message"]
    assert lines[2]["result"] == "fine"
    assert "interrupted" not in proc.stderr and "2 of 3 items failed" in proc.stderr


def test_run_reads_inputs_from_a_file_and_unpacks_with_star(user_module, tmp_path):
    """--input reads one input per line (blank lines skipped) and --star calls function(*item)."""
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('[1, 2]\n\n["a", "b"]\n')
    proc = procpool("run", "--star", "--input", str(inputs), "usertasks:add", env=user_module)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["result"] for line in proc.stdout.splitlines()] == [3, "ab"]


def test_run_leaves_no_worker_behind(user_module):
    """The workers that ran the items have exited once run returns."""
    proc = procpool("run", "usertasks:whoami", *map(str, range(9)), env=user_module)
    assert proc.returncode == 0, proc.stderr
    pids = {json.loads(line)["result"] for line in proc.stdout.splitlines()}
    assert len(pids) >= 1
    assert_gone(sorted(pids))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("demo", "--tasks", "2"), "--tasks"),
        (("demo", "--pools", "x"), "--pools"),
        (("demo", "--bogus"), "--bogus"),
        (("run", "no_such_module_xyz:f", "1"), "cannot import module 'no_such_module_xyz'"),
        (("run", "usertasks", "1"), "expected 'module:function'"),
        (("run", "usertasks:missing", "1"), "has no attribute 'missing'"),
        (("run", "usertasks:double"), "no inputs"),
        (("run", "usertasks:double", "--timeout", "0", "1"), "--timeout"),
        (("run", "usertasks:double", "--timeout", "nan", "1"), "nan is not a finite number of seconds"),
        (("run", "usertasks:double", "--timeout", "inf", "1"), "inf is not a finite number of seconds"),
        (("run", "brokentasks:f", "1"), "cannot import module 'brokentasks': syntax error in "),
        (("nosuchcommand",), "No such command"),
        (("mcp",), "allow at least one handler"),
        (("mcp", "--handler", "shell"), "'shell' is not a built-in handler"),
        (("mcp", "--handler", "echo", "--http", "10.0.0.1:80"), "not a loopback address"),
        (("mcp", "--handler", "echo", "--max-timeout", "nan"), "nan is not a finite number of seconds"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, user_module):
    """A bad argument exits with code 2 and a single stderr line naming the problem, and no traceback."""
    proc = procpool(*args, env=user_module)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("command", [(), ("demo",), ("run",), ("bench",), ("mcp",)])
def test_every_subcommand_has_help(command):
    """--help works on the group and on every subcommand, including the MCP server's."""
    proc = procpool(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: procpool")


def test_python_dash_m_runs_the_same_command():
    """python -m procpool is the same command line as the console script."""
    proc = subprocess.run(
        [sys.executable, "-m", "procpool", "--version"], capture_output=True, text=True, timeout=DEADLINE, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("procpool, version ")


ROOT = Path(__file__).resolve().parent.parent


def base_install(venv: Path) -> Path:
    """A virtual environment with procpool and only its core dependencies (attrs, psutil); returns its console script.

    The environment is real but offline: the core packages are linked from this interpreter's,
    procpool is found through a .pth file (as an editable install finds it), and the console
    script is the one setup.cfg declares, written the way pip writes it.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=DEADLINE)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
            timeout=DEADLINE,
        ).stdout.strip()
    )
    for package in (attr, attrs, psutil):
        source = Path(package.__file__).parent
        (site / source.name).symlink_to(source, target_is_directory=True)
    (site / "procpool.pth").write_text(f"{ROOT}\n")
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    (name, target), *_ = (
        line.split("=") for line in setup["options.entry_points"]["console_scripts"].split("\n") if line
    )
    module, function = target.strip().split(":")
    script = venv / "bin" / name.strip()
    script.write_text(
        f"#!{python}\nimport sys\nfrom {module} import {function}\n"
        f"if __name__ == '__main__':\n    sys.exit({function}())\n"
    )
    script.chmod(0o755)
    return script


def test_the_console_script_on_a_base_install_names_the_extra_in_one_line(tmp_path):
    """On a base install, `procpool` and `python -m procpool` print one line naming the cli extra and exit 2."""
    script = base_install(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    python = str(script.with_name("python"))
    probe = subprocess.run(
        [python, "-c", "import procpool, click"], capture_output=True, text=True, env=env, timeout=DEADLINE, check=False
    )
    assert "No module named 'click'" in probe.stderr, probe.stderr  # procpool imports; click is not there
    for command in ([str(script), "demo"], [python, "-m", "procpool", "--help"]):
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=DEADLINE, check=False
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "pip install 'procpool[cli]'" in proc.stderr and proc.stdout == ""


def test_bench_without_a_source_checkout_says_so(tmp_path):
    """bench in an installed copy of procpool (no benchmarks/ beside it) exits 1 with a clear message."""
    shutil.copytree(
        benchmarks_dir().parent / "procpool", tmp_path / "procpool", ignore=shutil.ignore_patterns("__pycache__")
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "procpool", "bench", "--quick"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert "source checkout" in proc.stderr and str(tmp_path / "benchmarks") in proc.stderr
