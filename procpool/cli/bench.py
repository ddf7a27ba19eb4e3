"""``procpool bench``: run benchmarks/compare.py (procpool against its peers) from a source checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

import procpool

__all__ = ("bench", "benchmarks_dir")


def benchmarks_dir() -> Path:
    """Where the benchmark suite lives: next to the package in a source checkout."""
    return Path(procpool.__file__).resolve().parent.parent / "benchmarks"


@click.command(short_help="Benchmark procpool against its peers.", context_settings={"ignore_unknown_options": True})
@click.option("--quick", is_flag=True, help="A short run (under two minutes).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results as JSON here.")
@click.option(
    "--markdown", "markdown_path", type=click.Path(dir_okay=False), help="Also write the table as Markdown here."
)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED, metavar="[COMPARE OPTIONS]...")
def bench(quick: bool, json_path: str | None, markdown_path: str | None, extra: tuple[str, ...]) -> None:
    """Run benchmarks/compare.py: procpool against its peers, with the ratio table.

    Options not listed here go to compare.py unchanged (see: procpool bench --help-compare).
    Needs a source checkout; the suite is not part of the installed package.
    """
    script = benchmarks_dir() / "compare.py"
    if not script.is_file():
        raise click.ClickException(
            f"the benchmark suite is not here ({script} is missing): procpool bench runs from a source "
            "checkout of procpool (pip install -e .), not from an installed wheel"
        )
    argv = [sys.executable, str(script)]
    if quick:
        argv.append("--quick")
    if json_path:
        argv += ["--json", json_path]
    if markdown_path:
        argv += ["--markdown", markdown_path]
    argv += ["--help" if arg == "--help-compare" else arg for arg in extra]
    # subprocess.run kills and reaps the child if we are interrupted.
    code = subprocess.run(argv, check=False).returncode
    if code:
        raise click.exceptions.Exit(code if code > 0 else 1)
