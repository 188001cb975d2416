"""What a sync is asked to do: the sender's options (``mirror.sync``'s keywords, checked).

Kept apart from ``mirror.sender`` so that a local sync can read them, and start its scans,
before the sender's code is loaded.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

DELTA_THRESHOLD = 256 << 10  # smaller files are sent whole: a signature round trip costs more
# Between two local trees there is no wire to save bytes on: a delta only reads the replica's
# copy twice more (its signature, then its blocks) before the whole file is written anyway.
# rsync's default is the same (--whole-file when both ends are local).
LOCAL_DELTA_THRESHOLD = 1 << 63  # no file is this large: every file goes whole
# A receiver silent this long (seconds) ends the sync (rsync's --timeout; it has none by
# default, but a mirror must not hang): a receiver at work says so every third of it.
DEFAULT_TIMEOUT = 120.0
DEFAULT_CONTIMEOUT = 30.0  # rsync's --contimeout


class SenderOptions(NamedTuple):
    """Immutable; a NamedTuple rather than a dataclass only because it loads faster."""

    delete: bool = False
    checksum: bool = False
    dry_run: bool = False
    excludes: tuple[bytes, ...] = ()
    lock_file: bytes | None = None
    state_dir: bytes | None = None
    epoch: int | None = None
    delta_threshold: int = DELTA_THRESHOLD
    fsync: bool = True
    secret: bytes | None = None
    cancel: threading.Event | None = None  # set: abandon the file in flight and end the session
    keep_changes: bool = True  # False: the result's ``changes`` stays empty (a big first sync's
    # would hold an entry for every file of the tree); ``on_change`` still sees each one
    max_delete: int | None = None  # a session deleting more entries deletes nothing (mirror.guard)
    keepalive: float | None = None  # ask the receiver to say "alive" after this long quiet (a network peer)
    allow_mass_delete: bool = False  # let the source and deletion guards through (and record the source anew)
