"""Delegate CPU-bound work and prompts to a pool of three worker processes, and survive a crash."""

import asyncio
import hashlib
import os

from procpool import WorkerCrashed, WorkerPool


def digest(n: int) -> str:
    """CPU-bound work: hash a few megabytes."""
    h = hashlib.sha256()
    for i in range(20_000):
        h.update(f"{n}:{i}".encode())
    return h.hexdigest()[:12]


def crash() -> None:
    os._exit(3)


async def main() -> None:
    async with WorkerPool("quickstart", handler="procpool.handlers:echo") as pool:
        print("workers:", [w.pid for w in pool.workers])
        print("apply:", await pool.apply(digest, (1,)))
        print("map:", [d async for d in pool.map(digest, range(6))])
        print("execute:", await pool.execute("hello", {"repo": "."}))
        try:
            await pool.apply(crash)
        except WorkerCrashed as exc:
            print("crash reported:", exc)
        print("after the crash:", (await pool.health_check())["status"], [w.pid for w in pool.workers])
        print("status:", {k: v for k, v in pool.get_status().items() if k.startswith("tasks_")})


if __name__ == "__main__":
    asyncio.run(main())
