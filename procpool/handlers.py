"""Prompt handlers that ship with procpool.

A handler is a module-level function ``handler(prompt, context) -> result`` (or ``async def``),
named by its import path when a pool is created:

    WorkerPool(handler="procpool.handlers:command")

It runs inside a worker process; its return value must pickle.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from typing import Any

from procpool.errors import describe_exit

__all__ = ("CommandFailed", "command", "echo")

# How much of a failed command's stdout and stderr its error message quotes (the tail, where the
# reason usually is); the exception keeps all of both.
FAILED_OUTPUT_CHARS = 1000


class CommandFailed(subprocess.CalledProcessError):
    """The program run by [`command`][] exited with a non-zero code or was killed by a signal.

    A ``subprocess.CalledProcessError``, so ``returncode``, ``cmd``, ``stdout`` and ``stderr`` hold
    the whole story; the message quotes the tail of stderr and stdout on one line.
    """

    def __str__(self) -> str:
        def tail(text: str | None) -> str:
            text = text or ""
            return repr(text if len(text) <= FAILED_OUTPUT_CHARS else "..." + text[-FAILED_OUTPUT_CHARS:])

        cmd = self.cmd if isinstance(self.cmd, str) else shlex.join(self.cmd)
        return (
            f"command {cmd} ended with {describe_exit(self.returncode)}; "
            f"stderr: {tail(self.stderr)}; stdout: {tail(self.stdout)}"
        )


def echo(prompt: str, context: dict[str, Any]) -> dict[str, Any]:
    """Diagnostic handler: return the prompt and context with the worker's pid.

    Args:
        prompt: any string.
        context: any dict.
    """
    return {"prompt": prompt, "context": context, "pid": os.getpid()}


def command(prompt: str, context: dict[str, Any]) -> dict[str, Any]:
    """Run an external program with the prompt and return its exit code, stdout and stderr.

    Args:
        prompt: the command line (run by ``sh -c``), the last argument of ``argv``, or stdin.
        context: optional keys ``argv``, ``repo``, ``env``, ``prompt_as_stdin`` and ``check``.

    ``context`` keys:
        argv: the program and its arguments as a list (default: ``["sh", "-c"]``, so the
            prompt is a shell command line). The prompt is appended as the last argument,
            unless ``prompt_as_stdin`` is true, in which case it is written to stdin.
        repo: the working directory (default: the worker's).
        env: extra environment variables.
        prompt_as_stdin: pass the prompt on stdin instead of as an argument.
        check: when true (the default), a non-zero exit code fails the task with
            [`CommandFailed`][]; when false, it is returned in ``exit_code`` like any other.

    The program runs in the worker's process group, so a task timeout kills it with the worker.

    Raises:
        CommandFailed: the program exited with a non-zero code or was killed (unless ``check``
            is false), so a caller sees a failed task rather than a completed one.
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
    if proc.returncode and context.get("check", True):
        raise CommandFailed(proc.returncode, argv, proc.stdout, proc.stderr)
    return {
        "command": shlex.join(argv),
        "exit_code": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "duration": time.monotonic() - started,
    }
