"""The scans a sync compares: the source tree's and, in local mode, the replica's own.

The sender starts them for each session.  ``mirror.sync`` to a local directory starts them
before it loads the rest of the transfer code, so the two walks are already under way while
the sender, the receiver and the wire protocol are imported (as ``mirror diff`` does).
"""

from __future__ import annotations

from .exclude import make_excluder
from .statedir import ensure_state_dir, resolve_state_dir
from .treescan import TreeScan


def source_scan(root: bytes, *, excludes=(), checksum=False, state_dir=None, dry_run=False, scope=None) -> TreeScan:
    if checksum and not dry_run:
        # Made now, not by the scan thread: creating it moves the root's mtime for a moment.
        ensure_state_dir(resolve_state_dir(root, state_dir))
    return TreeScan(root, excluder=make_excluder(excludes), checksum=checksum, state_dir=state_dir,
                    scope=scope, background=scope is None).start()  # fmt: skip


def stop_scans(scans) -> None:
    """Abandon the scans of ``scans`` (None entries, or None itself, are skipped)."""
    for scan in scans or ():
        if scan is not None:
            scan.stop()


def replica_scan(root: bytes, *, excludes=(), checksum=False, scope=None) -> TreeScan:
    """Local mode: the destination, scanned by the sender (the receiver then only writes).
    Its problems are named as a receiver's summary names them."""
    return TreeScan(root, excluder=make_excluder(excludes), checksum=checksum, scope=scope,
                    background=scope is None, problem_prefix="on the receiver: ").start()  # fmt: skip
