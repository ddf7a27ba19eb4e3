"""The package's shape: imports point down (no cycle, none hidden under TYPE_CHECKING), modules stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "procpool"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, package: str, modules: dict[str, Path]) -> set[str]:
    """Every procpool module the file imports, wherever the import statement stands."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        out.update(name for name in names if name in modules)
    return out


def test_no_import_cycle_among_procpool_modules():
    """The procpool modules import each other without a cycle (TYPE_CHECKING imports included)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        # A package's __init__ re-exports its submodules: importing a submodule runs the
        # package's __init__ first, so that edge is how Python itself orders them.
        graph[name] = {m for m in _imports(path, package, modules) if m != name and not m.startswith(name + ".")}
        graph[name].discard("procpool")
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_core_modules_import_only_downwards():
    """The core's layers import only the layers below them."""
    layers = [
        {"procpool.errors"},
        {"procpool._messages"},
        {"procpool._child"},
        {"procpool._processes", "procpool._config", "procpool._stats", "procpool._task", "procpool._progress"},
        {"procpool._worker"},
        {"procpool._monitor"},
        {"procpool._dispatch", "procpool._map"},
        {"procpool._supervisor"},
        {"procpool._pool"},
    ]
    modules = _modules()
    rank = {name: i for i, layer in enumerate(layers) for name in layer}
    for name, level in rank.items():
        for imported in _imports(modules[name], "procpool", modules):
            if imported in rank and imported != name:
                assert rank[imported] < level, f"{name} imports {imported}, which is not below it"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_small(name):
    """No module of the package is over 600 lines."""
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_import_procpool_in_a_fresh_interpreter():
    """`import procpool` works in a fresh interpreter, with the core modules importable each on its own."""
    core = ["procpool.errors", "procpool._messages", "procpool._child", "procpool._worker", "procpool._pool"]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nimport procpool"
    for name in core:
        subprocess.run([sys.executable, "-c", code, name], check=True, timeout=60)
