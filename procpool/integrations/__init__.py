"""Adapters that let orchestrators run procpool pools behind their own pool interfaces.

Each adapter lives in a module of its own and is imported explicitly, so procpool itself never
imports an orchestrator (nor an orchestrator's dependencies)::

    from procpool.integrations.mahavishnu import ProcPoolAdapter
"""
