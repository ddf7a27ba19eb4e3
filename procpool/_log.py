"""procpool's loggers. A library logs, it does not print: without the application's own logging
set-up, procpool stays silent (a NullHandler on the "procpool" logger).

Parent-side modules take their logger from here, so that importing the package itself (as the
fork server and every worker do) does not import logging.
"""

from __future__ import annotations

import logging

__all__ = ("get",)

logging.getLogger("procpool").addHandler(logging.NullHandler())


def get(name: str) -> logging.Logger:
    """The logger ``procpool.<name>``."""
    return logging.getLogger(f"procpool.{name}")
