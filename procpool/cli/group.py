"""The ``procpool`` click group: logging to stderr, one-line usage errors, the lazy ``mcp`` command.

Built on click; rich draws the tables, progress bars and log lines (stderr), so stdout carries
only results (``--json`` summaries, JSON lines). Usage errors exit with code 2 and one line.
"""

from __future__ import annotations

import logging
import sys

import click

import procpool
from procpool._progress import stderr_console
from procpool.cli.bench import bench
from procpool.cli.demo import demo
from procpool.cli.run import run

__all__ = ("cli", "run_command_line")


class _Group(click.Group):
    """The top-level group: loads the optional ``mcp`` command only when it is asked for.

    The MCP server is an optional extra and slow to import, so ``procpool run`` should not pay for it.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "mcp"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "mcp" and cmd_name not in self.commands:
            return _mcp_command()
        return super().get_command(ctx, cmd_name)


def _mcp_command() -> click.Command:
    try:
        from procpool.cli.mcp import mcp
    except ImportError as exc:
        reason = str(exc)

        @click.command("mcp", help="Serve the pool tools over MCP (needs: pip install 'procpool[mcp]').")
        def unavailable() -> None:
            raise click.ClickException(f"procpool mcp is not available: {reason} (pip install 'procpool[mcp]')")

        return unavailable
    return mcp


def _configure_logging(level: str) -> None:
    """Send log records to stderr: through the console progress bars share on a terminal (so
    records print above a live bar), as plain unwrapped lines otherwise (logs, pipes, CI)."""
    console = stderr_console()
    handler: logging.Handler
    if console.is_terminal:
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(procpool.__version__, prog_name="procpool")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
    help="Log records at this level and above go to stderr.",
)
def cli(log_level: str) -> None:
    """procpool: pools of exactly three worker processes that survive crashes, hangs and timeouts."""
    _configure_logging(log_level)


cli.add_command(demo)
cli.add_command(run)
cli.add_command(bench)


def run_command_line(argv: list[str] | None = None) -> None:
    """Run the group on ``argv`` (default: sys.argv) and exit with its code; errors in one line."""
    try:
        code = cli.main(args=argv, prog_name="procpool", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        # One line, with the command it concerns and where to look; click's default is four.
        path = exc.ctx.command_path if exc.ctx is not None else "procpool"
        click.echo(f"{path}: error: {exc.format_message()} (see '{path} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
