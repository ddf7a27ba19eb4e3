"""``procpool bench``: run the benchmark suites in benchmarks/ from a source checkout, and say
which performance targets are met.

Each suite is a script that measures procpool and its peers (or the raw floors) side by side in
one run and writes a JSON report whose ``targets`` list holds ``{"target", "met", "detail"}``.
This command runs the chosen suites one after the other, streams what they print, and ends with
every target of every suite, met or not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

import procpool

__all__ = ("SUITES", "bench", "benchmarks_dir")

# name -> (script in benchmarks/, what it measures)
SUITES: dict[str, tuple[str, str]] = {
    "peers": ("compare.py", "throughput, latency, map, CPU speed-up and recovery against the peers"),
    "payload": ("payload.py", "bytes and numpy arrays of 1 KiB to 64 MiB, in and back, against the peers"),
    "floors": ("floors.py", "latency, map and cold start against the raw floors"),
    "scheduling": ("scheduling.py", "priorities under a burst, and what priorities and retries cost per task"),
}


def benchmarks_dir() -> Path:
    """Where the benchmark suite lives: next to the package in a source checkout."""
    return Path(procpool.__file__).resolve().parent.parent / "benchmarks"


@click.command(short_help="Benchmark procpool against its peers.", context_settings={"ignore_unknown_options": True})
@click.option(
    "--suite",
    "suites",
    multiple=True,
    type=click.Choice([*SUITES, "all"]),
    help="Which suite to run (repeatable; default: all of them). "
    + "; ".join(f"{name}: {what}" for name, (_, what) in SUITES.items())
    + ".",
)
@click.option("--quick", is_flag=True, help="Smaller sizes and one repeat (about a minute per suite).")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the results as JSON here (with several suites: one object, a key per suite).",
)
@click.option(
    "--markdown",
    "markdown_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write what the suites printed, and the targets, as Markdown here.",
)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED, metavar="[SUITE OPTIONS]...")
def bench(
    suites: tuple[str, ...], quick: bool, json_path: Path | None, markdown_path: Path | None, extra: tuple[str, ...]
) -> None:
    """Run the benchmark suites in benchmarks/ and report every performance target, met or not.

    Options not listed here go to the suite's script unchanged, so they need exactly one --suite
    (see its options: procpool bench --suite NAME --help-suite). Needs a source checkout; the
    suites are not part of the installed package.
    """
    names = list(SUITES) if not suites or "all" in suites else list(dict.fromkeys(suites))
    if extra and len(names) != 1:
        raise click.UsageError(f"options for a suite's script ({' '.join(extra)}) need exactly one --suite")
    here = benchmarks_dir()
    for name in names:
        if not (here / SUITES[name][0]).is_file():
            raise click.ClickException(
                f"the benchmark suite is not here ({here / SUITES[name][0]} is missing): procpool bench runs "
                "from a source checkout of procpool (pip install -e .), not from an installed wheel"
            )
    if "--help-suite" in extra:
        code = subprocess.run([sys.executable, str(here / SUITES[names[0]][0]), "--help"], check=False).returncode
        raise click.exceptions.Exit(code)
    reports: dict[str, Any] = {}
    printed: dict[str, str] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="procpool-bench-") as tmp:
        for name in names:
            report_path = Path(tmp) / f"{name}.json"
            argv = [sys.executable, str(here / SUITES[name][0]), "--json", str(report_path)]
            if quick:
                argv.append("--quick")
            if name == "peers" and markdown_path and len(names) == 1:
                argv += ["--markdown", str(markdown_path)]
            argv += list(extra)
            click.echo(f"== {name}: {SUITES[name][1]}", err=True)
            code, printed[name] = _run(argv)
            if code:
                failed.append(f"{name} (exit {code})")
            if report_path.is_file():
                reports[name] = json.loads(report_path.read_text())
    summary = _targets(reports)
    click.echo("\n" + summary)
    if json_path:
        document = reports[names[0]] if len(names) == 1 and names[0] in reports else reports
        json_path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    if markdown_path and names != ["peers"]:
        body = "\n\n".join(f"## {name}\n\n```\n{text.rstrip()}\n```" for name, text in printed.items())
        markdown_path.write_text(body + "\n\n" + summary + "\n")
    if failed:
        click.echo(f"failed: {', '.join(failed)}", err=True)
        raise click.exceptions.Exit(1)


def _run(argv: list[str]) -> tuple[int, str]:
    """Run one suite, echoing its output as it comes; return its exit code and what it printed."""
    lines: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        try:
            for line in child.stdout:
                click.echo(line, nl=False)
                lines.append(line)
        except BaseException:  # interrupted: do not leave the suite running
            child.kill()
            raise
    return child.returncode, "".join(lines)


def _targets(reports: dict[str, Any]) -> str:
    """Every suite's targets as one list, met or not."""
    rows = []
    for name, report in reports.items():
        rows += [(name, t) for t in report.get("targets", [])]
        # compare.py also measures procpool.Executor from synchronous code (issue 12).
        rows += [(f"{name} (Executor)", t) for t in report.get("executor", {}).get("targets", [])]
    met = sum(t.get("met") is True for _, t in rows)
    out = [f"Targets: {met} of {len(rows)} met"]
    for name, t in rows:
        verdict = {True: "met", False: "NOT met"}.get(t.get("met"), "not measured")
        detail = f": {t['detail']}" if t.get("detail") else (f": {t['ratio']:.2f}x" if t.get("ratio") else "")
        out.append(f"- [{verdict}] {name}: {t['target']}{detail}")
    return "\n".join(out)
