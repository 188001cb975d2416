"""Walks started before the program has loaded, for ``TreeScan`` to adopt.

A local ``mirror sync`` or ``mirror diff`` spends its first tens of milliseconds importing
(argparse, logging, the transfer code) on one CPU while the other idles.  The compiled
scanner's ``background_scan`` walks without the interpreter lock, so ``mirror.launch``
starts the source tree's walk first, here, and the walk uses that idle CPU.

``TreeScan`` takes the walk only for the plain whole-tree scan of the same root, the scan
it would have started itself; anything not taken is closed by ``discard``.  Only a source
is walked early: a local replica is scanned under its writer lock, which is taken later.
"""

from __future__ import annotations

_walks: dict[bytes, object] = {}


def start(root: bytes) -> None:
    """Start walking ``root`` (a directory) in the background, if the compiled scanner is
    there: the pure twin's walk needs the interpreter lock, and would only slow the start."""
    from .fastpath import env_flag

    if root in _walks or env_flag("MIRROR_FORCE_PURE"):
        return
    try:
        from ._fast.scan import background_scan
    except ImportError:
        return
    from .statedir import STATE_DIR_NAME

    _walks[root] = background_scan(root, skip_at_root=STATE_DIR_NAME)


def take(root: bytes):
    """The walk started for ``root``, now the caller's to iterate and close; else None."""
    return _walks.pop(root, None)


def discard() -> None:
    """Close the walks nobody took."""
    while _walks:
        _, walk = _walks.popitem()
        walk.close()
