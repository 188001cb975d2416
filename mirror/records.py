"""What a sync is asked (``SenderOptions``) and what it answers (``SyncResult``, with its
``TransferStats``): the records a local sync, a remote sender and the caller share.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from .errors import EXIT_DIFFERENT, EXIT_GUARD, EXIT_OK

DELTA_THRESHOLD = 256 << 10  # smaller files are sent whole: a signature round trip costs more
# A receiver silent this long (seconds) ends the sync (rsync's --timeout; it has none by
# default, but a mirror must not hang): a receiver at work says so every third of it.
DEFAULT_TIMEOUT = 120.0
DEFAULT_CONTIMEOUT = 30.0  # rsync's --contimeout


class SenderOptions(NamedTuple):
    """What a sync is asked to do (``mirror.sync``'s keywords, checked).  Immutable; a
    NamedTuple rather than a dataclass only because it loads faster."""

    delete: bool = False
    checksum: bool = False
    dry_run: bool = False
    excludes: tuple[bytes, ...] = ()
    lock_file: bytes | None = None
    state_dir: bytes | None = None
    delta_threshold: int = DELTA_THRESHOLD  # a receiver's; a local sync always copies whole files
    fsync: bool = True
    secret: bytes | None = None
    cancel: threading.Event | None = None  # set: abandon the file in flight and end the session
    keep_changes: bool = True  # False: the result's ``changes`` stays empty (a big first sync's
    # would hold an entry for every file of the tree); ``on_change`` still sees each one
    max_delete: int | None = None  # a session deleting more entries deletes nothing (mirror.guard)
    keepalive: float | None = None  # ask the receiver to say "alive" after this long quiet (a network peer)
    allow_mass_delete: bool = False  # let the source and deletion guards through (and record the source anew)


class TransferStats:
    """What one session moved.  (A plain class: importing dataclasses costs start-up time.)
    ``files_sent``: regular files whose content was sent (whole or delta); ``other_changes``:
    directories, symlinks, nodes, links, attributes."""

    __slots__ = ("files_seen", "files_sent", "files_delta", "other_changes", "deleted", "literal_bytes",
                 "matched_bytes", "size_of_sent_files", "wire_sent", "wire_received", "seconds")  # fmt: skip

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def __repr__(self) -> str:
        return "TransferStats(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__) + ")"  # fmt: skip

    @property
    def speedup(self) -> float:
        """Size of the files brought up to date, per byte that crossed the wire (rsync's figure)."""
        return self.size_of_sent_files / self.wire_sent if self.wire_sent else 0.0


class SyncResult:
    """What a sync did: its changes, failures, scan problems, transfer figures and the
    replica's report.  ``exit_code``: 0 done, 1 partial (see ``failed``/``problems``), 25
    deletions refused (see ``deletions_refused``)."""

    def __init__(self, dry_run: bool = False):
        self.changes: list = []
        self.failed: list[tuple[bytes, str]] = []
        self.problems: list = []
        self.stats = TransferStats()
        self.receiver: dict = {}
        self.dry_run = dry_run
        self.unseen_links = 0  # see ``plan.Planner.unseen_links``
        self.replaced: list[bytes] = []  # see ``plan.Planner.replaced``

    @property
    def deletions_refused(self) -> str | None:
        """Why the replica's deletion guard did not delete (mirror.guard); None: it did, or none were asked."""
        return self.receiver.get("deletions_refused") or None

    def __repr__(self) -> str:
        return (f"SyncResult(exit_code={self.exit_code}, changes={len(self.changes)}, failed={len(self.failed)}, "
                f"problems={len(self.problems)}, dry_run={self.dry_run})")  # fmt: skip

    @property
    def exit_code(self) -> int:
        if self.deletions_refused:
            return EXIT_GUARD
        return EXIT_DIFFERENT if (self.failed or self.problems) else EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK
