"""Compiled hot paths (Cython).  Nothing here imports the rest of ``mirror``.

Use ``mirror.fastpath.choose(name)`` rather than importing these modules directly: it falls
back to the pure-Python twin ``mirror/<name>_py.py`` (loudly) when the build is missing.
"""
