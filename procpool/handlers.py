"""Prompt handlers that ship with procpool.

A handler is a module-level function ``handler(prompt, context) -> result`` (or ``async def``),
named by its import path when a pool is created::

    WorkerPool(handler="procpool.handlers:command")

It runs inside a worker process; its return value must pickle.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from typing import Any

__all__ = ("command", "echo")


def echo(prompt: str, context: dict[str, Any]) -> dict[str, Any]:
    """Diagnostic handler: return the prompt and context with the worker's pid."""
    return {"prompt": prompt, "context": context, "pid": os.getpid()}


def command(prompt: str, context: dict[str, Any]) -> dict[str, Any]:
    """Run an external program with the prompt and return its exit code, stdout and stderr.

    ``context`` keys:
        argv: the program and its arguments as a list (default: ``["sh", "-c"]``, so the
            prompt is a shell command line). The prompt is appended as the last argument,
            unless ``prompt_as_stdin`` is true, in which case it is written to stdin.
        repo: the working directory (default: the worker's).
        env: extra environment variables.
        prompt_as_stdin: pass the prompt on stdin instead of as an argument.

    The program runs in the worker's process group, so a task timeout kills it with the worker.
    """
    argv = list(context.get("argv") or ["sh", "-c"])
    if not all(isinstance(a, str) for a in argv):
        raise TypeError(f"context['argv'] must be a list of strings, got {argv!r}")
    stdin_text = None
    if context.get("prompt_as_stdin"):
        stdin_text = prompt
    else:
        argv.append(prompt)
    cwd = context.get("repo")
    if cwd is not None and not os.path.isdir(cwd):
        raise FileNotFoundError(f"context['repo'] is not a directory: {cwd!r}")
    env = dict(os.environ, **{str(k): str(v) for k, v in (context.get("env") or {}).items()})
    started = time.monotonic()
    proc = subprocess.run(argv, input=stdin_text, capture_output=True, text=True, cwd=cwd, env=env, check=False)
    return {
        "command": shlex.join(argv),
        "exit_code": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "duration": time.monotonic() - started,
    }
