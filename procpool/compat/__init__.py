"""Drop-in replacements for other projects' pool APIs, one module per project, imported explicitly::

    from procpool.compat.session_buddy import PoolManager
"""
