"""Pools of three workers on a Dask cluster, beside local pools: ``pip install procpool[dask]``.

    from procpool.dask import DaskPool

    async with DaskPool(handler="procpool.handlers:echo") as pool:  # its own LocalCluster
        print(await pool.execute("hello"))

    async with DaskPool(address="tcp://scheduler:8786") as pool:  # three workers of a running cluster
        print(await pool.apply(pow, (2, 10)))

See docs/scale-out.md for when to go remote, the failure semantics and the cost per task.
"""

from procpool._dask import DaskPool
from procpool._dask_slots import DaskWorker

__all__ = ("DaskPool", "DaskWorker")
