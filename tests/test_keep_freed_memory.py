"""procpool.keep_freed_memory(): the parent's opt-in to keep freed memory for the next large result.

Calling it changes malloc for the rest of the process, so every test that calls it with a valid
value does so in a fresh interpreter of its own; the pytest process keeps glibc's defaults.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import procpool

GLIBC = sys.platform.startswith("linux") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
needs_glibc = pytest.mark.skipif(not GLIBC, reason="keep_freed_memory() takes effect with glibc's malloc only")

# Runs a pool, then copies a 64 MiB buffer into a new bytes object and frees it, ten times, and
# prints the minor page faults per copy. A 64 MiB block is over glibc's largest adaptive mmap
# threshold (32 MiB): by default each copy lands in a fresh mapping, faulted in page by page.
FAULTS = """
import asyncio, json, resource, sys
import procpool

def echo(value):
    return value

async def use_a_pool():
    async with procpool.WorkerPool() as pool:
        assert await pool.apply(echo, (b"x" * (4 << 20),)) == b"x" * (4 << 20)

if __name__ == "__main__":
    took = procpool.keep_freed_memory() if sys.argv[1] == "keep" else None
    asyncio.run(use_a_pool())
    source = memoryview(bytearray(b"\\x01") * (64 << 20))
    data = bytes(source)  # the first copy touches new memory either way: not counted
    del data
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        data = bytes(source)
        assert data[-1] == 1
        del data
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    print(json.dumps({"took_effect": took, "faults_per_copy": faults}))
"""

# Streams large results back after the opt-in, keeping some alive while others are freed (so
# new results land in memory that earlier ones used), and checks every one against its source.
ECHO = """
import asyncio, json, os
import procpool

def echo(value):
    return value

async def main():
    try:
        import numpy as np
    except ImportError:
        np = None
    async with procpool.WorkerPool() as pool:
        for size in (1 << 20, 3 << 20, 5 << 20 | 17):
            sources = [os.urandom(size) for _ in range(4)]
            kept = []
            for round_ in range(3):
                results = await asyncio.gather(*(pool.apply(echo, (s,)) for s in sources))
                assert all(type(r) is bytes and r == s for r, s in zip(results, sources))
                kept.append(results[round_])
            assert all(k == s for k, s in zip(kept, sources))
            if np is not None:
                arrays = [np.frombuffer(s[: size // 8 * 8], dtype=np.float64).copy() for s in sources]
                arrays.append(np.arange(size // 64 * 8, dtype=np.int64).reshape(-1, 8)[:, ::2])  # not contiguous
                kept = []
                for _ in range(3):
                    back = await asyncio.gather(*(pool.apply(echo, (a,)) for a in arrays))
                    for b, a in zip(back, arrays):
                        assert b.dtype == a.dtype and b.shape == a.shape and b.flags.writeable
                        assert np.array_equal(b, a, equal_nan=True)
                    kept.append(back[0])
                    back[1][...] = 0  # a result is the caller's own memory: writing it touches nothing else
                assert all(np.array_equal(k, arrays[0], equal_nan=True) for k in kept)
    return np is not None

if __name__ == "__main__":
    took = procpool.keep_freed_memory(64)
    print(json.dumps({"took_effect": took, "numpy": asyncio.run(main())}))
"""


def _run(tmp_path: Path, script: str, *args: str) -> str:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    out = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.timeout(240)
@needs_glibc
def test_it_cuts_the_page_faults_of_reallocating_a_large_buffer(tmp_path):
    """Copying 64 MiB into new bytes repeatedly faults under 1/4 as many pages after the call as after a pool alone."""
    without = json.loads(_run(tmp_path, FAULTS, "default"))
    keep = json.loads(_run(tmp_path, FAULTS, "keep"))
    assert keep["took_effect"] is True
    # Without it, each copy faults in about 16,384 pages (4 KiB each); with it, next to none.
    assert keep["faults_per_copy"] < without["faults_per_copy"] / 4, (keep, without)


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, ValueError), (0, ValueError), (2048, ValueError), (1.5, TypeError), (True, TypeError), ("256", TypeError)],
)
def test_a_bad_argument_raises_at_the_call(value, error):
    """A negative, zero, too large, non-integer or bool argument raises ValueError or TypeError naming the value."""
    with pytest.raises(error, match=r"keep_freed_memory\(\).*" + re.escape(repr(value))):
        procpool.keep_freed_memory(value)


@pytest.mark.timeout(180)
def test_large_results_stay_correct_after_the_call(tmp_path):
    """After the call, a pool's results of a few MiB (bytes, numpy arrays) equal what was sent, held or dropped."""
    out = json.loads(_run(tmp_path, ECHO))
    assert out["took_effect"] is GLIBC
    try:
        import numpy  # noqa: F401
    except ImportError:
        assert out["numpy"] is False
    else:
        assert out["numpy"] is True
