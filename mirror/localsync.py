"""A sync between two local trees: scan both, compare, plan, write; no protocol.

Both trees are walked at once (``TreeScan.pairs_with`` drops identical directories in
compiled code); the planner's operations go straight to the replica writer
(``mirror.apply``), which keeps every invariant a receiver keeps.  A file is copied by the
kernel, read once and never hashed; one that changes while it is copied is never committed
(``docs/ARCHITECTURE.md``, "The local invariant").  The next
files (up to ``READ_AHEAD_*``) are opened and asked from the disk (``POSIX_FADV_WILLNEED``)
before their turn, so a cold source is read while earlier files are copied.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os

from . import fastpath
from .apply import LockWatch, ReplicaAdmission, ReplicaWriter
from .compare import CompareOptions, align
from .entry import Entry, entry_attrs, stat_attrs
from .errors import Cancelled, LockedError, MirrorError, failure_reason
from .exclude import make_excluder
from .guard import DeletionPolicy, SourceGuard
from .plan import ATTRS, DELETE, DELTA, LINK, MKDIR, SPECIAL, SYMLINK, WHOLE
from .ratelimit import RateLimiter
from .records import SyncResult
from .renames import apply as apply_renames
from .sourcesession import SourceSession
from .statedir import resolve_state_dir
from .treescan import replica_scan

COPY_CHUNK = 4 << 20  # bytes copied between two looks at the locks (a slow disk still looks within 1 s)
# Files opened and asked from the disk (WILLNEED) before their turn to be copied: a cold source
# is read while earlier files are copied, not one wait per file.  At most this many files, this
# many bytes of each, this many bytes in all.
READ_AHEAD_FILES = 32
READ_AHEAD_PER_FILE = 8 << 20
READ_AHEAD_BYTES = 64 << 20
_NO_COPY_RANGE = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


class LocalSync:
    """Sessions from the source tree ``src`` to the local replica ``module.path``: the
    connection's state (guards, first-session clean-up) lives here; each ``session()``
    plans and writes one pass (a ``LocalSession``)."""

    def __init__(self, src: bytes, module, options, *, scans=None, on_change=None, on_progress=None, bwlimit=None):
        self.root = src
        self.module = module
        self.o = options
        self.scans = scans  # (source, replica) scans started by the caller for the first session
        self.on_change = on_change
        self.on_progress = on_progress
        self.source_guard = SourceGuard(src, resolve_state_dir(src, options.state_dir))
        self.replica = ReplicaAdmission(module, "local")
        self.limiter = RateLimiter(bwlimit) if bwlimit else None  # --bwlimit: bytes per second copied

    def session(self, epoch: int, scope=None, renames=()) -> SyncResult:
        return LocalSession(self).run(epoch, scope, renames)


class LocalSession(SourceSession):
    """One local session: pairs in, operations carried out on the replica writer."""

    passes_on = "copied"

    def __init__(self, sync: LocalSync):
        super().__init__(sync, delta_threshold=1 << 63)
        self.writer: ReplicaWriter | None = None
        self.ahead: collections.deque = collections.deque()  # (path, open source file, bytes asked)
        self.ahead_bytes = 0

    def run(self, epoch: int, scope, renames) -> SyncResult:
        o, sync, replica = self.o, self.conn, self.conn.replica
        dst_tree = writer = None
        try:
            tree_id, planned, scope = self.open(scope, renames)
            held = replica.admit(epoch, tree_id, deleting=o.delete, allow=o.allow_mass_delete, dry_run=o.dry_run)
            dst_tree = replica.open_tree(sync.module.path, o.dry_run)
            apply_renames(dst_tree, planned)  # first, as a receiver does
            src_scan, dst_scan = self.scans
            if dst_scan is None:
                dst_scan = self.scans[1] = replica_scan(sync.module.path, o, scope)
            owner = os.geteuid() == 0
            policy = DeletionPolicy(o.max_delete, o.allow_mass_delete)
            writer = self.writer = replica.writer(dst_tree, make_excluder(o.excludes), epoch, owner=owner,
                                                  sync_writes=o.fsync, dry_run=o.dry_run, policy=policy)  # fmt: skip
            self.plan_root(stat_attrs(os.stat(dst_tree.root_fd)), owner)  # as a receiver's ready says
            self.lock.check()
            compare = CompareOptions(checksum=o.checksum, owner=owner)
            pairs = src_scan.pairs_with(dst_scan, compare.flags(fastpath.choose("scan")))
            self.drive(pairs if pairs is not None else align(src_scan, dst_scan), compare, planned)
            result = writer.result(writer.finish(), held)
        except BaseException as exc:
            if writer is not None and isinstance(exc, (LockedError, Cancelled)):
                with contextlib.suppress(MirrorError):
                    writer.finish_files()  # what is whole and verified is kept
            elif writer is not None:
                writer.discard()
            raise
        finally:
            if dst_tree is not None:
                dst_tree.close()
            self.close()
        return self.finish(result, [tuple(f) for f in writer.failures])

    def do(self, op) -> None:
        writer, entry = self.writer, op.entry
        if op.kind in (WHOLE, DELTA):
            self._queue_copy(op.path, entry)
        elif op.kind == MKDIR:
            writer.mkdir(op.path, entry_attrs(entry))
        elif op.kind in (SYMLINK, SPECIAL):
            writer.special(op.path, entry.kind, entry_attrs(entry), target=entry.target, rdev=entry.rdev)
        elif op.kind == LINK:
            writer.link(op.path, op.link_to)
        elif op.kind == ATTRS:
            writer.set_attrs(op.path, entry.kind, entry_attrs(entry))
        elif op.kind == DELETE:
            writer.delete(op.path)

    def content_done(self) -> None:
        self._copy_ahead(0, 0)

    def _queue_copy(self, path: bytes, entry: Entry) -> None:
        """Open the file now and ask the disk for its start; copy it once the files before it
        are copied and the window is full (``READ_AHEAD_*``)."""
        self.lock.check()
        f = self.open_file(path, entry)
        if f is None:
            return
        asked = min(entry.size, READ_AHEAD_PER_FILE)
        if asked:
            os.posix_fadvise(f.fileno(), 0, asked, os.POSIX_FADV_WILLNEED)
        self.ahead.append((path, f, asked))
        self.ahead_bytes += asked
        self._copy_ahead(READ_AHEAD_FILES, READ_AHEAD_BYTES)

    def _copy_ahead(self, files: int, size: int) -> None:
        """Copy the oldest queued files until at most ``files`` and ``size`` bytes are left."""
        while self.ahead and (len(self.ahead) > files or self.ahead_bytes > size):
            path, f, asked = self.ahead.popleft()
            self.ahead_bytes -= asked
            self._copy(path, f)

    def close(self) -> None:
        for _path, f, _asked in self.ahead:  # still queued: the session ended early
            f.close()
        super().close()

    def _copy(self, path: bytes, f) -> None:
        """One open file, copied whole by the kernel; abandoned if it changes while copied."""
        with f:
            self.lock.check()
            fd = f.fileno()
            before = self.settled(fd, path)
            if before is None:
                return
            commit, reason = self.writer.new_file(path)
            if commit is None:
                self.writer.fail(None, path, reason)
                return
            whole = False  # until copied and found unchanged: else the copy is dropped
            try:
                copied = copy_range(fd, commit.file.fileno(), (self.lock, self.writer.lock), self.conn.limiter,
                                    sparse=before.st_blocks * 512 < before.st_size)  # fmt: skip
                # The kernel's copy stops at the size it knows: a file that reads on past it
                # (its file system says the wrong size) is no more whole than a short one.
                read_on = len(os.pread(fd, 1, copied))
                whole = not self.changed_while_read(fd, before, copied + read_on, path)
            except OSError as exc:
                self.writer.fail(None, path, f"cannot copy: {failure_reason(exc)}")
            finally:
                if not whole:
                    self.writer.drop_file(commit)
            if not whole:
                return
            self.writer.commit_file(commit, stat_attrs(before), copied)
        stats = self.out.stats
        stats.files_sent += 1
        stats.literal_bytes += copied
        stats.size_of_sent_files += copied
        if self.conn.on_progress is not None:
            self.conn.on_progress(copied)


def copy_range(src_fd: int, dst_fd: int, locks: tuple[LockWatch, ...], limiter: RateLimiter | None, *,
               sparse: bool = False) -> int:  # fmt: skip
    """Copy ``src_fd`` whole to the new file ``dst_fd`` in the kernel; the length copied.
    ``copy_file_range`` where the file systems allow it, else ``sendfile`` (e.g. across
    two kinds of file system).  Under a ``limiter``, in chunks of at most its burst.

    ``sparse``: the source holds fewer blocks than its size, so it may have holes (a VM
    image, a database file): only its data is copied, each run at its own offset, and the
    holes stay holes (``SEEK_DATA``/``SEEK_HOLE``).  A plain copy writes them out as zeros:
    the replica would need the file's whole length of disk, where the source needs its data's."""
    chunk = COPY_CHUNK if limiter is None else min(COPY_CHUNK, max(4096, int(limiter.rate * limiter.BURST)))
    if not sparse:
        return _copy_run(src_fd, dst_fd, 0, None, chunk, locks, limiter)
    start = 0
    while True:
        try:
            start = os.lseek(src_fd, start, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after ``start``: a hole up to the end
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) and start == 0:  # no hole map here
                return _copy_run(src_fd, dst_fd, 0, None, chunk, locks, limiter)
            raise
        end = os.lseek(src_fd, start, os.SEEK_HOLE)
        start += _copy_run(src_fd, dst_fd, start, end, chunk, locks, limiter)
        if start < end:  # the file ended sooner: it changed, which its check after the copy tells
            return start
    length = os.lseek(src_fd, 0, os.SEEK_END)
    os.ftruncate(dst_fd, length)  # a hole at the end is a length, not a block
    return length


def _copy_run(src_fd: int, dst_fd: int, start: int, end: int | None, chunk: int, locks: tuple[LockWatch, ...],
              limiter: RateLimiter | None) -> int:  # fmt: skip
    """Copy ``src_fd[start:end]`` (``end`` None: to the end of the file) to the same offset of
    ``dst_fd``; the number of bytes copied (fewer if the file ends first)."""
    copied = 0
    copy = os.copy_file_range
    while end is None or start + copied < end:
        want = chunk if end is None else min(chunk, end - start - copied)
        try:
            n = copy(src_fd, dst_fd, want, start + copied, start + copied)
        except OSError as exc:
            if copy is _sendfile or exc.errno not in _NO_COPY_RANGE or copied:
                raise
            copy = _sendfile
            continue
        if n == 0:
            break
        copied += n
        if limiter is not None:
            limiter.take(n)
        for lock in locks:
            lock.check(force=False)
    return copied


def _sendfile(src_fd: int, dst_fd: int, count: int, src_offset: int, dst_offset: int) -> int:
    os.lseek(dst_fd, dst_offset, os.SEEK_SET)
    return os.sendfile(dst_fd, src_fd, src_offset, count)
