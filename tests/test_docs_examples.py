"""Every fenced ``python`` block in README.md and docs/*.md runs as written.

Each block is written to a file in a temporary directory of its own and run there as a script
with this interpreter, as a reader would paste and run it. It must exit with status 0 and print
something. A ``print(...)`` line whose trailing comment is a Python literal (``# 49``,
``# [0, 1, 4, 9, 16]``) or a single word (``# healthy``) shows output the block must print.
Other comments are prose (``# the handler's result``) and are not checked.

A block that cannot run on its own on purpose (a module other code imports, code that needs a
program that is not installed) is marked with ``<!-- fragment -->`` on the last non-blank line
before its fence (invisible on GitHub and in the MkDocs site). Fragments are few and named in
``FRAGMENTS`` below; they must still compile.

No process an example starts may outlive it: each example carries a marker in its environment,
and every process that has the marker after the example ended is waited for, then killed, and
the test fails.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT_MARK = "<!-- fragment -->"

# The blocks marked as fragments on purpose, by file and first line of code, and why.
FRAGMENTS = {
    # Registers the adapter inside a running Mahavishnu (Python 3.13 and its many dependencies).
    ("docs/embedding.md", "from mahavishnu.mcp.tools.pool_tools import register_pool_tools"),
    # A module of task handlers that workers import, not a script.
    ("docs/embedding.md", "# mypkg/tasks.py"),
    # Runs inside a session-buddy server (Python 3.13 and its many dependencies).
    ("docs/embedding.md", "from procpool.compat import session_buddy as compat"),
    # The module the MCP server imports a handler from, not a script.
    ("docs/mcp.md", "# mypkg/agents.py"),
    # Mounts the tools on a server the reader already runs.
    ("docs/mcp.md", "from procpool.mcp import register_pool_tools"),
}

# Seconds an example may run: each finishes in about a second, but the machine may be loaded.
EXAMPLE_TIMEOUT = 60.0
# Seconds the workers of an example get to exit after it did (they exit within 2 s when their
# parent dies, see docs/reliability.md).
LEFTOVER_GRACE = 5.0

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


class Block:
    """One fenced python block: where it is, its code and whether it is a marked fragment."""

    def __init__(self, path: Path, line: int, code: str, fragment: bool) -> None:
        self.path = path
        self.line = line
        self.code = code
        self.fragment = fragment

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def key(self) -> tuple[str, str]:
        first = next(line for line in self.code.splitlines() if line.strip())
        return (str(self.path.relative_to(ROOT)), first.strip())


def python_blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file whose info string starts with ``python``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        end = i + 1
        while end < len(lines) and not re.match(rf"^[ \t]*{fence[0]}{{{len(fence)},}}[ \t]*$", lines[end]):
            end += 1
        language = (match["info"].split() or [""])[0].strip("{}.")
        if language in ("python", "py"):
            previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
            code = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
            blocks.append(Block(path, i + 1, code, previous == FRAGMENT_MARK))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in python_blocks(path)]
RUNNABLE = [block for block in ALL_BLOCKS if not block.fragment]
MARKED_FRAGMENTS = [block for block in ALL_BLOCKS if block.fragment]


def expected_outputs(code: str) -> list[str]:
    """The expected output shown on print lines, e.g. ``49`` for ``print(x)  # 49``."""
    expected = []
    for line in code.splitlines():
        if "print(" not in line or "#" not in line:
            continue
        comment = line.rsplit("#", 1)[1].strip()
        if re.fullmatch(r"[\w.-]+", comment):
            expected.append(comment)
            continue
        try:
            value = ast.literal_eval(comment)
        except (ValueError, SyntaxError):
            continue
        expected.append(str(value))
    return expected


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PROCPOOL_DOCS_EXAMPLE") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _reap(marker: str) -> list[str]:
    """Wait for the processes left with ``marker`` to exit; kill and describe those that do not."""
    _, alive = psutil.wait_procs(_marked(marker), timeout=LEFTOVER_GRACE)
    left = []
    for proc in alive:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            left.append(f"pid {proc.pid} {proc.cmdline()}")
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return left


def run_example(block: Block, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the block as a script in ``tmp_path``; kill what it started if it overruns."""
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    marker = uuid.uuid4().hex
    env = dict(os.environ, PROCPOOL_DOCS_EXAMPLE=marker, PYTHONUNBUFFERED="1")
    # Examples that start the procpool command find the one installed with this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=EXAMPLE_TIMEOUT)
    except subprocess.TimeoutExpired:
        for child in _marked(marker):
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{block.name} ran longer than {EXAMPLE_TIMEOUT} s\nstdout:\n{stdout}\nstderr:\n{stderr}")
    finally:
        left = _reap(marker)
    assert not left, f"{block.name} left processes behind: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.timeout(EXAMPLE_TIMEOUT + 3 * LEFTOVER_GRACE)
@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_example_runs(block: Block, tmp_path: Path) -> None:
    """The example exits with status 0, prints something and prints the output its comments show."""
    result = run_example(block, tmp_path)
    report = f"{block.name}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    assert result.stdout.strip(), f"{block.name} printed nothing\n{report}"
    for text in expected_outputs(block.code):
        assert text in result.stdout, f"{block.name} should print {text!r}\n{report}"


@pytest.mark.parametrize("block", MARKED_FRAGMENTS, ids=[block.name for block in MARKED_FRAGMENTS])
def test_fragment_compiles(block: Block) -> None:
    """A block marked as a fragment is still valid Python (top-level await allowed)."""
    compile(block.code, block.name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


def test_fragments_are_the_named_few() -> None:
    """The blocks marked as fragments are exactly the ones FRAGMENTS names and explains."""
    assert {block.key for block in MARKED_FRAGMENTS} == FRAGMENTS


def test_every_doc_file_is_searched() -> None:
    """The extractor finds the README's example, so a broken parser cannot pass by finding nothing."""
    assert any(block.path.name == "README.md" for block in RUNNABLE)
    assert len(RUNNABLE) >= 20


def test_no_sphinx_roles_in_docstrings() -> None:
    """Docstrings cross-reference with mkdocstrings' [`name`][path] syntax, never Sphinx roles."""
    role = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const):`")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "procpool").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if role.search(line)
    ]
    assert not found, f"Sphinx roles render as literal text in the API reference: {found}"
