"""A sync between two local trees: scan both, compare, plan, write; no protocol.

Both trees are walked at once (``TreeScan.pairs_with`` drops identical directories in
compiled code), the differences go through the planner (``mirror.plan``) and its operations
straight to the replica writer (``mirror.apply``), which keeps every invariant a receiver
keeps: confined paths, atomic and durable commits, the mirroring lock, the guards.

A file is copied by the kernel (``copy_file_range``), read once and never hashed: there is
no wire to verify across.  The next files (up to ``READ_AHEAD_*``) are opened and asked from
the disk (``POSIX_FADV_WILLNEED``) before their turn, so a cold source is read while earlier
files are copied; they are copied in the planner's order, all before links, deletions and
directory times.  What end-to-end verification catches remotely, a source file
that changes while it is copied, is caught here by its size, mtime and ctime before and
after the copy, and by the number of bytes copied: such a file is never committed as if it
were whole (it is reported; the next sync picks it up).  The mirroring locks (the source's
and the replica's) are looked at before every file and every ``LOCK_CHECK_SECONDS`` of a
long copy.
"""

from __future__ import annotations

import collections
import os
import stat
import time

from .apply import LockWatch, ReplicaWriter, admit, record_epoch
from .compare import CompareOptions, CompareSummary, align, compare_pairs, root_entry
from .entry import Entry
from .errors import Cancelled, LockedError, MirrorError, UnsafePathError, failure_reason
from .exclude import make_excluder
from .guard import DeletionPolicy, ReplicaGuard, SourceGuard
from .plan import ATTRS, DELETE, DELTA, LINK, MKDIR, SPECIAL, SYMLINK, WHOLE, Planner, source_dir_entry
from .safefs import ConfinedTree, settled_stat
from .statedir import check_root, resolve_state_dir
from .treescan import Scope

COPY_CHUNK = 4 << 20  # bytes copied between two looks at the locks (a slow disk still looks within 1 s)
# Files opened and asked from the disk (WILLNEED) before their turn to be copied: a cold source
# is read while earlier files are copied, not one wait per file.  At most this many files, this
# many bytes of each, this many bytes in all.
READ_AHEAD_FILES = 32
READ_AHEAD_PER_FILE = 8 << 20
READ_AHEAD_BYTES = 64 << 20


class LocalSync:
    """Sessions from the source tree ``src`` to the local replica ``module.path``: the
    connection's state (guards, first-session clean-up) lives here; each ``session()``
    plans and writes one pass."""

    def __init__(self, src: bytes, module, options, *, scans=None, on_change=None, on_progress=None):
        self.src = src
        self.module = module
        self.o = options
        self.scans = scans  # (source, replica) scans started by the caller for the first session
        self.on_change = on_change
        self.on_progress = on_progress
        self.state_dir = resolve_state_dir(module.path, None)
        self._source_guard = SourceGuard(src, resolve_state_dir(src, options.state_dir))
        self._replica_guard = ReplicaGuard(module.path, self.state_dir)
        self._cleaned = False
        self._source_lock = LockWatch(options.lock_file, "present", cancel=options.cancel)
        self._reserved = module.reserved_in(module.path)

    def session(self, epoch: int, scope=None, renames=()):
        from .records import SendOutcome
        from .treescan import replica_scan, source_scan, stop_scans

        started = time.perf_counter()
        out = SendOutcome()
        scans, self.scans = self.scans, None
        if scans is not None and ((scope is not None and not scope.everything) or renames):
            stop_scans(scans)  # they cover the whole tree, before any rename: not this session's
            scans = None
        o = self.o
        src_tree = dst_tree = writer = None
        try:
            tree_id = self._source_guard.tree_id(
                deleting=o.delete, allow=o.allow_mass_delete, dry_run=o.dry_run
            )
            src_tree = ConfinedTree(self.src)
            planned = []
            if renames and not o.dry_run:
                from .renames import plan as plan_renames

                planned, moved_dirs = plan_renames(renames, src_tree)
                if moved_dirs and scope is not None:
                    scope = Scope(scope.entries, scope.trees | moved_dirs)
            if scans is None:
                scans = (source_scan(self.src, excludes=o.excludes, checksum=o.checksum, state_dir=o.state_dir,
                                     dry_run=o.dry_run, scope=scope), None)  # fmt: skip
            root = self.module.path
            check_root(root)
            mine = admit(self.module, self.state_dir, epoch=epoch, dry_run=o.dry_run)
            self._replica_guard.admit(tree_id, deleting=o.delete, allow=o.allow_mass_delete, dry_run=o.dry_run,
                                      peer="local")  # fmt: skip
            if not o.dry_run:
                record_epoch(self.module, self.state_dir, epoch, mine, "local")
            clean = not o.dry_run and not self._cleaned
            dst_tree = ConfinedTree(root, temp_dir=None if o.dry_run else os.path.join(self.state_dir, b"tmp"),
                                    clean=clean, reserved=self._reserved)  # fmt: skip
            self._cleaned = self._cleaned or clean
            if planned:
                from .renames import apply as apply_renames

                apply_renames(dst_tree, [tuple(item) for item in planned])
            if scans[1] is None:
                scans = (scans[0], replica_scan(root, excludes=o.excludes, checksum=o.checksum, scope=scope))
            owner = os.geteuid() == 0
            compare = CompareOptions(checksum=o.checksum, owner=owner)
            keep = make_excluder(o.excludes)
            writer = ReplicaWriter(dst_tree, privileges=self.module.privileges,
                                   lock=LockWatch(self.module.lock_file, "appeared on the receiver"), owner=owner,
                                   sync_writes=o.fsync, dry_run=o.dry_run,
                                   policy=DeletionPolicy(o.max_delete, o.allow_mass_delete),
                                   keep=keep.excluded if keep is not None else None)  # fmt: skip
            run = _Run(self, out, src_tree, writer)
            try:
                run.plan(scans, compare, planned, owner)
            finally:
                run.close()
            out.receiver = writer.result(writer.finish())
        except (LockedError, Cancelled):
            if writer is not None:
                try:
                    writer.finish_files()  # what is whole and verified is kept
                except MirrorError:
                    pass
            raise
        except BaseException:
            if writer is not None:
                writer.discard()
            raise
        finally:
            for tree in (src_tree, dst_tree):
                if tree is not None:
                    tree.close()
            stop_scans(scans)
        out.failed.extend(tuple(f) for f in writer.failures)
        out.stats.deleted = out.receiver["deleted"]
        out.stats.seconds = time.perf_counter() - started
        return out


class _Run:
    """One session's walk: pairs in, operations carried out."""

    def __init__(self, sync: LocalSync, out, src_tree: ConfinedTree, writer: ReplicaWriter):
        self.sync, self.out, self.src_tree, self.writer = sync, out, src_tree, writer
        self.lock = sync._source_lock
        self.planner = Planner(delete=sync.o.delete, dry_run=sync.o.dry_run, delta_threshold=1 << 63,
                               dir_entry=self._dir_entry)  # fmt: skip
        self.ahead: collections.deque = collections.deque()  # (path, entry, open source file, bytes asked)
        self.ahead_bytes = 0

    def plan(self, scans, compare: CompareOptions, renames, owner: bool) -> None:
        from . import fastpath

        src_scan, dst_scan = scans
        flags = compare.flags(fastpath.choose("scan"))
        planner, out = self.planner, self.out
        src_root, dst_root = root_entry(self.sync.src), root_entry(self.sync.module.path)
        differs = src_root is not None and dst_root is not None and (
            (src_root.mode, src_root.mtime_ns) != (dst_root.mode, dst_root.mtime_ns)
            or (owner and (src_root.uid, src_root.gid) != (dst_root.uid, dst_root.gid)))  # fmt: skip
        planner.root(src_root, differs)
        for old, new, _ in renames:
            planner.renamed(old, new)
        self.lock.check()
        summary = CompareSummary()
        pairs = src_scan.pairs_with(dst_scan, flags)
        for change in compare_pairs(self._listed(pairs if pairs is not None else align(src_scan, dst_scan)),
                                    compare, summary):  # fmt: skip
            ops = planner.plan(change)
            if ops is None:
                continue
            if self.sync.o.keep_changes:
                out.changes.append(change)
            if self.sync.on_change is not None:
                self.sync.on_change(change)
            for op in ops:
                self._do(op)
        self._copy_ahead(0, 0)  # links, deletions and directory times come after all new content
        for op in planner.links():
            self._do(op)
        self.lock.check()
        for op in planner.closing():
            self._do(op)
        out.problems.extend(summary.problems)
        out.stats.other_changes = planner.other_changes

    def _listed(self, pairs):
        stats = self.out.stats
        for src, dst in pairs:
            if src is None:  # only on the replica: its parent's listing deletes it
                self.out.problems.extend(dst.problems)
                continue
            self.planner.listing(src)
            stats.files_seen += len(src)
            yield src, dst

    def _do(self, op) -> None:
        writer, entry = self.writer, op.entry
        if op.kind in (WHOLE, DELTA):
            self._queue_copy(op.path, entry)
        elif op.kind == MKDIR:
            writer.mkdir(op.path, _attrs(entry))
        elif op.kind in (SYMLINK, SPECIAL):
            writer.special(op.path, entry.kind, _attrs(entry), target=entry.target, rdev=entry.rdev)
        elif op.kind == LINK:
            self.lock.check()
            writer.link(op.path, op.link_to)
        elif op.kind == ATTRS:
            writer.set_attrs(op.path, entry.kind, _attrs(entry))
        elif op.kind == DELETE:
            writer.delete(op.path)

    def _queue_copy(self, path: bytes, entry: Entry) -> None:
        """Open the file now and ask the disk for its start; copy it once the files before it
        are copied and the window is full (``READ_AHEAD_*``)."""
        self.lock.check()
        try:
            # One component at a time, never through a symlink, never opening a FIFO or a
            # device, and only the very file the scan saw (a swap since then is refused).
            f = self.src_tree.open_regular(path, expect=(entry.dev, entry.ino) if entry.ino else None)
        except (OSError, UnsafePathError) as exc:
            self.out.failed.append(
                (path, f"cannot open on the sender: {getattr(exc, 'strerror', None) or exc}")
            )
            return
        asked = min(entry.size, READ_AHEAD_PER_FILE)
        if asked:
            os.posix_fadvise(f.fileno(), 0, asked, os.POSIX_FADV_WILLNEED)
        self.ahead.append((path, entry, f, asked))
        self.ahead_bytes += asked
        self._copy_ahead(READ_AHEAD_FILES, READ_AHEAD_BYTES)

    def _copy_ahead(self, files: int, size: int) -> None:
        """Copy the oldest queued files until at most ``files`` and ``size`` bytes are left."""
        while self.ahead and (len(self.ahead) > files or self.ahead_bytes > size):
            path, entry, f, asked = self.ahead.popleft()
            self.ahead_bytes -= asked
            self._copy(path, f)

    def close(self) -> None:
        """Let go of the files still queued (the session ended early)."""
        while self.ahead:
            self.ahead.popleft()[2].close()
        self.ahead_bytes = 0

    def _copy(self, path: bytes, f) -> None:
        """One open file, copied whole by the kernel; abandoned if it changes while copied."""
        with f:
            self.lock.check()
            fd = f.fileno()
            before = settled_stat(fd)
            if before is None:
                self.out.failed.append((path, "changed while it was being copied; sync again to pick it up"))
                return
            commit, reason = self.writer.new_file(path)
            if commit is None:
                self.writer.fail(None, path, reason)
                return
            try:
                copied = _copy_range(fd, commit.file.fileno(), (self.lock, self.writer.lock))
                after = os.fstat(fd)
            except OSError as exc:
                self.writer.drop_file(commit)
                self.writer.fail(None, path, f"cannot copy: {failure_reason(exc)}")
                return
            except BaseException:
                self.writer.drop_file(commit)
                raise
            # Changed while read: by its times, or (within one timestamp tick, where the times
            # cannot tell) by reading another length than it had, e.g. truncated and rewritten.
            if (after.st_size, after.st_mtime_ns, after.st_ctime_ns, copied) != (
                before.st_size,
                before.st_mtime_ns,
                before.st_ctime_ns,
                before.st_size,
            ):
                self.writer.drop_file(commit)
                self.out.failed.append((path, "changed while it was being copied; sync again to pick it up"))
                return
            attrs = [stat.S_IMODE(before.st_mode), before.st_uid, before.st_gid, before.st_mtime_ns]
            self.writer.commit_file(commit, attrs, copied)
        stats = self.out.stats
        stats.files_sent += 1
        stats.literal_bytes += copied
        stats.size_of_sent_files += copied
        if self.sync.on_progress is not None:
            self.sync.on_progress(copied)

    def _dir_entry(self, path: bytes) -> Entry | None:
        return source_dir_entry(self.src_tree, path)


def _copy_range(src_fd: int, dst_fd: int, locks: tuple[LockWatch, ...]) -> int:
    """Copy ``src_fd`` from its start to ``dst_fd`` in the kernel; the number of bytes."""
    copied = 0
    fallback = False
    while True:
        if not fallback:
            try:
                n = os.copy_file_range(src_fd, dst_fd, COPY_CHUNK)
            except OSError as exc:
                if exc.errno not in (18, 22, 38, 95) or copied:  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                    raise
                fallback = True
                continue
        else:
            data = os.read(src_fd, 1 << 20)
            n = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst_fd, view) :]
        if n == 0:
            return copied
        copied += n
        for lock in locks:
            lock.check(force=False)


def _attrs(entry: Entry) -> list:
    return [entry.mode, entry.uid, entry.gid, entry.mtime_ns]
