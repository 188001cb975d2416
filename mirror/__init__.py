"""hamirror's mirroring engine: scan, compare, delta-transfer and verify directory trees.

The public library API is re-exported here as it lands; see the README's "Library API".
"""

__version__ = "0.1.0"
