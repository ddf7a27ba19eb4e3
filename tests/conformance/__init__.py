"""CPython 3.13's own executor tests run against procpool.Executor (a package, so its conftest is
``conformance.conftest`` and never shadows tests/conftest.py)."""
