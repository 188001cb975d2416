"""Compiled kernels (Cython): the loops of ``mirror.scan`` and ``mirror.delta``.  Nothing here
imports the rest of ``mirror``.

Use the engine modules, which get these through ``mirror.fastpath.kernel(name)``: it binds
the pure-Python twin ``mirror/<name>_py.py`` instead (loudly) when the build is missing.
"""
