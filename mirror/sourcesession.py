"""One session from a source tree, whoever carries its operations out: what a local sync
(``mirror.localsync``) and a sender (``mirror.sender``) share.

``SourceSession`` asks the source guard first (a deleting session from a root that is not
the tree it was, an unmounted mount point, is refused before anything is compared), then
drives the planner in its order (``docs/ARCHITECTURE.md``).  ``open_file``, ``settled``
and ``changed_while_read`` are the one rule for reading a source file: the very file the
scan saw, never passed on as whole if it changed meanwhile.
"""

from __future__ import annotations

import os
import stat
import time

from .compare import CompareSummary, compare_pairs, root_entry
from .entry import Entry, entry_attrs, entry_from_stat
from .errors import UnsafePathError
from .exclude import make_excluder
from .lockfile import LockWatch
from .plan import Planner
from .records import SyncResult
from .renames import plan as plan_renames
from .safefs import ConfinedTree, fine_ctime_device, settled_stat
from .treescan import Scope, source_scan, stop_scans

CHANGED = "changed while it was being {}; sync again to pick it up"
# Another length read than the size, the times unchanged: rewritten within one timestamp
# tick, or a failing file system (a bad disk, a flaky mount).
CHANGED_OR_FAILED = "changed while it was being {}, or its file system failed; sync again to pick it up"


class SourceSession:
    """The source side of one session.  A subclass carries the operations out (``do``, and
    ``content_done`` once all new content is planned); ``passes_on``: what it does with a
    file's content, for the reason a changed one is not passed on ("sent", "copied")."""

    passes_on = ""

    def __init__(self, conn, *, delta_threshold: int):
        self.conn = conn  # a Sender or a LocalSync: root, o, source_guard, on_change, on_progress
        self.root = conn.root
        self.o = options = conn.o
        self.guard = conn.source_guard
        self.started = time.perf_counter()
        self.out = SyncResult(dry_run=options.dry_run)
        self.lock = LockWatch(options.lock_file, "present", cancel=options.cancel)
        self.src_tree: ConfinedTree | None = None
        self.scans: list = []
        self._fine_device: int | None = None  # safefs.fine_ctime_device, measured at the first read
        self._measured = False
        self.planner = Planner(delete=options.delete, dry_run=options.dry_run, delta_threshold=delta_threshold,
                               dir_entry=lambda path: self.entry_at(path, stat.S_ISDIR))  # fmt: skip

    def open(self, scope, renames):
        """``(tree id, renames planned, scope)``; the source tree opened and its scan started.
        The connection's ``scans`` (source, replica), of the whole tree started ahead, go to
        its first session, used only if it is a whole-tree one without renames; ``close()``
        stops them in any case."""
        o = self.o
        scans, self.conn.scans = self.conn.scans, None
        self.scans = list(scans or (None, None))
        if (scope is not None and not scope.everything) or renames:
            stop_scans(self.scans)  # they cover the whole tree, before any rename: not this session's
            self.scans = [None, None]
        tree_id = self.guard.tree_id(deleting=o.delete, allow=o.allow_mass_delete, dry_run=o.dry_run)
        self.src_tree = ConfinedTree(self.root)
        planned: list = []
        if renames and not o.dry_run:
            # Each rename carries what its new name must hold; a renamed directory's new
            # subtree is compared whole (what it holds on the replica may be older).
            planned, moved_dirs = plan_renames(renames, self.src_tree)
            if moved_dirs and scope is not None:
                scope = Scope(scope.entries, scope.trees | moved_dirs)
        if self.scans[0] is None:
            self.scans[0] = source_scan(self.root, o, scope)
        return tree_id, planned, scope

    def close(self) -> None:
        if self.src_tree is not None:
            self.src_tree.close()
        stop_scans(self.scans)

    def entry_at(self, path: bytes, is_kind) -> Entry | None:
        """The source's entry at ``path`` now if ``is_kind(mode)`` (e.g. ``stat.S_ISDIR``), else
        None: a directory no listing showed (a live session's partial listing), a file sent
        again."""
        try:
            st = self.src_tree.lstat(path) if path else os.stat(self.src_tree.root_fd)
        except (OSError, UnsafePathError):
            return None
        if st is None or not is_kind(st.st_mode):
            return None
        return entry_from_stat(os.path.basename(path), st, b"")

    def plan_root(self, replica_attrs, owner: bool) -> None:
        """The source root's entry to the planner; ``replica_attrs``: the replica root's
        ``[mode, uid, gid, mtime_ns]`` (its times are set last if they differ)."""
        entry = root_entry(self.root)
        differs = False
        if entry is not None and isinstance(replica_attrs, list) and len(replica_attrs) == 4:
            mine = entry_attrs(entry)
            if not owner:
                mine[1:3] = replica_attrs[1:3]
            differs = mine != replica_attrs
        self.planner.root(entry, differs)

    def _listed(self, pairs):
        """``pairs``, each source listing counted and shown to the planner; a directory only
        on the replica is left out (its parent's listing deletes it)."""
        for src, dst in pairs:
            if src is None:
                self.out.problems.extend(dst.problems)
                continue
            self.planner.listing(src)
            self.out.stats.files_seen += len(src)
            yield src, dst

    def drive(self, pairs, compare, renames) -> None:
        """Compare ``pairs`` and carry out the planner's operations, in its order."""
        planner, out, on_change = self.planner, self.out, self.conn.on_change
        for old, new, _ in renames:  # done on the replica first: both directories' times changed
            planner.renamed(old, new)
        summary = CompareSummary()
        for change in compare_pairs(self._listed(pairs), compare, summary):
            ops = planner.plan(change)
            if ops is None:
                continue
            if self.o.keep_changes:
                out.changes.append(change)
            if on_change is not None:
                on_change(change)
            for op in ops:
                self.do(op)
        self.content_done()  # links, deletions and directory times come after all new content
        for op in planner.links():
            self.lock.check()
            self.do(op)
        self.lock.check()
        for op in planner.closing():
            self.do(op)
        out.problems.extend(summary.problems)
        out.stats.other_changes = planner.other_changes
        out.unseen_links = planner.unseen_links()
        out.replaced = planner.replaced

    def content_done(self) -> None:
        """All new content handed to ``do``: carry it out before links and deletions."""

    def open_file(self, path: bytes, entry: Entry):
        """The file the scan saw at ``path``, open for reading; None if it cannot be (the
        reason goes to the failures).  One component at a time, never through a symlink,
        never opening a FIFO or a device, and only the very file the scan saw (a swap since
        then is refused)."""
        try:
            return self.src_tree.open_regular(path, expect=(entry.dev, entry.ino) if entry.ino else None)
        except (OSError, UnsafePathError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            self.out.failed.append((path, f"cannot open in the source: {reason}"))
            return None

    def settled(self, fd: int, path: bytes) -> os.stat_result | None:
        """The open source file's stat before it is read; None if it keeps changing or
        cannot be stat'ed (a failing file system, a file gone stale on a network mount)."""
        if not self._measured:  # in the state dir: nothing shows in the tree
            self._measured, self._fine_device = True, fine_ctime_device(self.guard.state_dir)
        try:
            before = settled_stat(fd, self._fine_device)
        except OSError as exc:
            self.out.failed.append((path, f"cannot stat in the source: {exc.strerror}"))
            return None
        if before is None:
            self.out.failed.append((path, CHANGED.format(self.passes_on)))
        return before

    def changed_while_read(self, fd: int, before: os.stat_result, length: int, path: bytes) -> bool:
        """Whether the file changed while read (then the reason goes to the failures): by
        its times, or (within one timestamp tick, where the times cannot tell) by reading
        another length than it had, e.g. truncated and rewritten, or cut short by its file
        system."""
        size = before.st_size
        if _identity(os.fstat(fd)) != _identity(before):
            reason = CHANGED.format(self.passes_on)
        elif length < size:
            reason = f"read only {length} of its {size} bytes: " + CHANGED_OR_FAILED.format(self.passes_on)
        elif length > size:
            reason = f"reads on past its size ({size} bytes): " + CHANGED_OR_FAILED.format(self.passes_on)
        else:
            return False
        self.out.failed.append((path, reason))
        return True

    def finish(self, replica_result: dict, failed) -> SyncResult:
        """The outcome, with the replica's report and the files it could not take."""
        excluder = make_excluder(self.o.excludes)
        if excluder is not None:
            # An excluded entry whose stat failed (its kind unknown: it may be excluded as a
            # directory) is no failure: the comparison has already kept it from deletion.
            self.out.problems = [p for p in self.out.problems
                                 if not (excluder.excluded(p.path, True) or excluder.excluded(p.path, False))]  # fmt: skip
        self.out.receiver = replica_result
        self.out.failed.extend(failed)
        self.out.stats.deleted = replica_result.get("deleted", 0)
        self.out.stats.seconds = time.perf_counter() - self.started
        return self.out


def _identity(st: os.stat_result) -> tuple:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns
