"""What runs inside a Dask worker for a [`DaskPool`][procpool.dask.DaskPool], and nothing else.

The parent pickles each call itself (so a bad argument fails in the caller, as with a local pool)
and this side pickles the outcome itself (so an unpicklable result or exception comes back as a
[`SerializationError`][procpool.errors.SerializationError] instead of a Dask serialization failure).
Dask only carries bytes. Like ``_child.serve`` it knows nothing of the pool's state.

This module must import on the workers: install procpool on them (``pip install procpool[dask]``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import signal
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from procpool.errors import SerializationError

__all__ = ("check_handler", "exit_worker", "run_call", "run_chunk", "run_handler")

# Handlers resolved in this worker process, by import path.
_handlers: dict[str, Callable[..., Any]] = {}


def _where() -> str:
    """This worker's address and pid, for error messages."""
    try:
        from distributed import get_worker

        return f"dask worker {get_worker().address} (pid {os.getpid()})"
    except ValueError:  # not inside a Dask worker (a unit test calling this module directly)
        return f"pid {os.getpid()}"


def encode_error(exc: BaseException) -> bytes:
    """``(type name, traceback text, pickled exception or None)``: the payload that
    ``procpool._messages.decode_error`` reads, pickled with cloudpickle; like the local workers'
    encoder, it survives an exception whose ``__str__`` or ``__reduce__`` raises (SystemExit too)."""
    try:
        tb = "".join(traceback.format_exception(exc))
    except BaseException as err:
        tb = f"{type(exc).__qualname__} (its traceback could not be formatted: {type(err).__qualname__})"
    try:
        exc_bytes: bytes | None = cloudpickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
    except BaseException:
        exc_bytes = None
    return pickle.dumps((type(exc).__qualname__, tb, exc_bytes), pickle.HIGHEST_PROTOCOL)


def _call(fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        # Dask runs tasks in a thread of its own, which has no event loop.
        result = asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def run_call(payload: bytes) -> tuple[bool, bytes]:
    """Run a pickled ``(fn, args, kwargs)``; return ``(True, pickled result)`` or ``(False, error)``."""
    try:
        try:
            fn, args, kwargs = pickle.loads(payload)
        except BaseException as exc:
            raise SerializationError(f"the task could not be unpickled on {_where()}: {exc!r}") from exc
        del payload
        result = _call(fn, args, kwargs)
    except BaseException as exc:  # a task's SystemExit must not end the worker's thread
        return False, encode_error(exc)
    try:
        return True, cloudpickle.dumps(result, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        error = SerializationError(
            f"the task's result ({type(result).__qualname__}) could not be pickled on {_where()}: {exc!r}"
        )
        return False, encode_error(error)


def run_handler(path: str, prompt: str, context: dict[str, Any]) -> Any:
    """Run the pool's prompt handler, imported by path once per worker process."""
    handler = _handlers.get(path)
    if handler is None:
        handler = _handlers[path] = _resolve(path)
    return handler(prompt, context)


def run_chunk(fn: Callable[[Any], Any], items: list[Any]) -> tuple[list[Any], bytes | None]:
    """Run ``fn`` over a map() chunk; stop at the first error and return it encoded."""
    out: list[Any] = []
    for item in items:
        try:
            out.append(_call(fn, (item,), {}))
        except BaseException as exc:
            return out, encode_error(exc)
    return out, None


def _resolve(path: str) -> Callable[..., Any]:
    import pkgutil

    try:
        handler = pkgutil.resolve_name(path)
    except Exception as exc:
        raise ImportError(f"{_where()} cannot import the handler {path!r}: {type(exc).__name__}: {exc}") from exc
    if not callable(handler):
        raise TypeError(f"{_where()}: the handler {path!r} is a {type(handler).__name__}, not a function")
    return handler


def check_handler(path: str) -> int:
    """Import the handler here, at pool start, so a worker that cannot is named at once; return the pid."""
    _handlers[path] = _resolve(path)
    return os.getpid()


async def exit_worker() -> None:
    """Kill this worker process and everything it started, at once; its nanny starts a fresh one.

    Called through ``Client.run(..., wait=False)``, which runs a coroutine function on the
    worker's event loop, not in the task's thread, and does not wait for an answer that a killed
    worker could never send.
    """
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    finally:
        os.kill(os.getpid(), signal.SIGKILL)
