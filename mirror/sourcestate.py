"""A running daemon's hold on its source's state dir: the epoch, the tree identity and the
journal it keeps there are put back if the directory is removed (or replaced by an empty
one) while the daemon runs.

What is put back is what the daemon read there a moment before.  Without it the next
session would present epoch 0, which every replica holding a later one refuses (the pair
fenced, with a message blaming a stale former primary), and the journal would be a file
nobody can open again.  Nothing is put back where the state
dir's parent is no longer the directory it was (an unmounted source: the pair halts on
that, and writing into the empty mount point would be wrong).
"""

from __future__ import annotations

import logging
import os
import threading

from .epoch import EpochError, observe_epoch, read_epoch
from .errors import MirrorError, display_path
from .guard import TreeIdentity, fs_identity, load, save
from .statedir import ensure_state_dir

log = logging.getLogger(__name__)


class StateDirKeeper:
    """Remembers a state dir's epoch and tree identity as it finds them, and makes the
    directory again with them (and the journal written whole) when it is gone."""

    def __init__(self, state_dir: bytes, journal):
        self.state_dir = state_dir
        self.journal = journal
        self._lock = threading.Lock()
        self._parent = fs_identity(os.path.dirname(os.path.abspath(state_dir)))
        self._dir = self._dir_identity()
        self.epoch = 0
        self.tree: TreeIdentity | None = None
        self._remember()

    def _dir_identity(self) -> tuple[int, int] | None:
        try:
            st = os.lstat(self.state_dir)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _remember(self) -> None:
        try:
            self.epoch = max(self.epoch, read_epoch(self.state_dir))
            self.tree = load(self.state_dir) or self.tree
        except (EpochError, MirrorError):
            pass  # damaged: what was read before stands; the session reading it says so

    def check(self) -> bool:
        """Whether the state dir had to be made again (now done); else what it holds now is
        remembered."""
        with self._lock:
            current = self._dir_identity()
            if current is not None and current == self._dir:
                self._remember()
                return False
            try:
                if fs_identity(os.path.dirname(os.path.abspath(self.state_dir))) != self._parent:
                    return False
            except OSError:
                return False
            try:
                self._restore()
            except (OSError, MirrorError) as exc:
                log.error("%s: the state dir was removed while the daemon ran, and cannot be made again: %s",
                          display_path(self.state_dir), getattr(exc, "strerror", None) or exc)  # fmt: skip
                return False
            self._dir = self._dir_identity()
            return True

    def _restore(self) -> None:
        ensure_state_dir(self.state_dir)
        if self.epoch:
            observe_epoch(self.state_dir, self.epoch)  # never lowers one written meanwhile
        if self.tree is not None and load(self.state_dir) is None:
            save(self.state_dir, self.tree)
        self.journal.compact()
        log.warning("%s: the state dir was removed while the daemon ran: made again with what the daemon "
                    "held (epoch %d, the tree's identity, the journal)", display_path(self.state_dir),
                    self.epoch)  # fmt: skip
