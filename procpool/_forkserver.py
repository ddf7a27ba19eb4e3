"""What multiprocessing's fork server imports once, before it forks any worker (forkserver only).

The fork server is a fresh interpreter and every worker is forked from it, so a module it has
imported costs a worker nothing. It imports ``procpool._child`` (whose imports are kept small:
``procpool/__init__.py`` imports the public names lazily, so no asyncio, psutil or pool machinery
comes with it) and then the parent's main module, as multiprocessing imports it in a worker (as
``__mp_main__``, with the parent's ``sys.path`` and ``sys.argv``). A worker then finds its main
module already there and does not run it again.

multiprocessing's own ``"__main__"`` preload does nothing on Python 3.11 to 3.13.7 (it looks for
a key that ``spawn.get_preparation_data`` no longer sets: python/cpython#126631), so procpool does
it here, the same way on every version. The parent passes what is needed in the environment
variable ``ENV`` (read and removed here, so no worker inherits it). A main module that fails to
import here (any exception, SystemExit included) is left alone: each worker then imports it
itself and reports the failure as it always has.
"""

from __future__ import annotations

# popen_forkserver, sharedctypes and procpool._child are imported for their side effect: once
# here instead of in every worker. They are what unpickling a worker's start arguments imports
# (the descriptors of its pipes; its shared state array, with heap and ctypes) and its code.
import json
import multiprocessing.popen_forkserver
import multiprocessing.sharedctypes  # noqa: F401
import os
import sys
from multiprocessing import process, spawn

import procpool._child  # noqa: F401

__all__ = ("ENV", "preload_main")

# Set by the parent (procpool._processes.start_fork_server) only while it starts the server.
ENV = "_PROCPOOL_FORKSERVER_MAIN"


def preload_main() -> bool:
    """Import the parent's main module here; True if it is now imported as a worker needs it."""
    raw = os.environ.pop(ENV, None)
    if raw is None:
        return False
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    # Only the server of the process that set it: another process that inherited the variable
    # by accident (a subprocess started in that instant) must not import this one's main module.
    if not isinstance(data, dict) or data.get("ppid") != os.getppid():
        return False
    main_path, main_name = data.get("main_path"), data.get("main_name")
    if not main_path and not main_name:
        return False
    sys.path[:] = data.get("sys_path", sys.path)
    sys.argv[:] = data.get("argv", sys.argv)
    current = process.current_process()
    # As in a worker: a main module that starts processes outside 'if __name__ == "__main__":'
    # gets multiprocessing's RuntimeError instead of starting them.
    current._inheriting = True  # type: ignore[attr-defined]
    try:
        if main_path:
            spawn.import_main_path(main_path)
        else:
            spawn._fixup_main_from_name(main_name)  # type: ignore[attr-defined]
    except BaseException:  # every worker imports it itself then, and reports what fails
        return False
    finally:
        del current._inheriting  # type: ignore[attr-defined]
        # Output the main module wrote but did not flush would be copied into every worker.
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
    return True


preload_main()
