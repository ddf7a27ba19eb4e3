"""Parameter checks the commands share."""

from __future__ import annotations

import math
import os
import sys

import click

__all__ = ("finite_seconds", "import_from_working_directory")


def finite_seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Refuse NaN and infinity, which click's FloatRange lets through (every comparison with NaN is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number of seconds", ctx, param)
    return value


def import_from_working_directory() -> None:
    """Like ``python -m``, find modules in the current directory; workers inherit sys.path (issue 9)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
