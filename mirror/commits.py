"""Received files into the tree durably, in batches, with the disk's waits off the receiver.

A new file's data must be on disk before its name points at it (fsync, then rename), and
its rename on disk before the session reports done (fsync of its directory).  Files are
committed in batches: one round of parallel fsyncs lets the filesystem fold them into a few
journal commits.

Each of those fsyncs is a wait for the disk.  With ``overlap``, a full batch's files are
fsynced by a worker thread while the receiver writes the next batch; the batch is renamed
into place by the receiver's own thread (the only one that uses the tree's descriptor
cache) once the next batch is full, and the directories those renames changed are fsynced
by the worker together with that next batch's files:

    batch k:  written ─► worker: fsync files ─► renamed ─► worker: fsync its directories
                         (while k+1 is written)            (while k+2 is written)

Nothing is renamed before its data is durable, and ``drain`` leaves nothing in flight.  A
file whose fsync fails is never renamed: it is failed by name and its temporary file
removed, so the next session writes it again (fsyncing it again could succeed without its
data, see ``safefs.fsync_all``); a directory whose fsync fails is failed by name too.
Without ``overlap`` (no fsyncs asked for, or an open-file limit too low to hold a
descriptor for each directory of a batch) a full batch is committed at once, in the
receiver's thread.
"""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Callable

from .errors import UnsafePathError, failure_reason
from .safefs import Commit, ConfinedTree, fsync_all

BATCH_FILES = 256
BATCH_BYTES = 256 << 20
# A file at least this large has its writeback started as soon as it is verified (see
# Commit.start_writeback): big files keep the disk busy while the next ones arrive.  Once a
# session has filled a batch, every file's does (a big transfer: its worker's fsyncs then
# find the data on its way; S3 19.8 -> 18.0 s).  A small session's files are left to the
# batch's fsync, which writes them together.
EARLY_WRITEBACK_BYTES = 256 << 10
# Directory descriptors held for their fsync at the end of a session; more are opened again
# then.  With a batch's files (two descriptors each) and both trees' caches, the smaller
# stays well within the common soft limit of 1,024 open files; every `mirror` command
# raises its limit (mirror.startup), which leaves room for the larger, and for overlapping
# batches (up to five descriptors per file of a batch).
DIR_SYNCS_HELD = 128
DIR_SYNCS_HELD_RAISED = 512


def held_at_most() -> int:
    """How many directory descriptors a ``DirSyncs`` holds under this process's limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = soft == resource.RLIM_INFINITY or soft >= 8 * DIR_SYNCS_HELD_RAISED
    return DIR_SYNCS_HELD_RAISED if raised else DIR_SYNCS_HELD


class Batches:
    """The verified files of a session on their way in (see the module docstring).

    ``failed(None, path, reason)`` is told of a file that could not be made durable or
    renamed into place (and of a directory that could not be made durable),
    ``committed(size)`` of each one that was: both in the caller's thread, never the
    worker's (the transport and the statistics are the caller's).  ``before_rename()`` runs
    once the data is durable, right before each round of renames (after the wait for the
    disk, however long), ``between()`` before each rename (it must be cheap): either may
    raise to stop them (the caller then calls ``discard``)."""

    def __init__(self, tree: ConfinedTree, *, sync_writes: bool, failed: Callable, committed: Callable,
                 before_rename: Callable = lambda: None, between: Callable = lambda: None):  # fmt: skip
        self.tree = tree
        self.sync_writes = sync_writes
        self._before_rename = before_rename
        self._between = between
        # The worker fsyncs a batch's directories through a DirSyncs that holds them all
        # (one per file at most), so it never opens one through the tree's cache, which
        # only the caller's thread may use.
        self.overlap = sync_writes and held_at_most() >= BATCH_FILES
        self._failed = failed
        self._committed = committed
        self._filling: list[tuple[Commit, int]] = []  # verified, written, not yet fsynced
        self._filling_bytes = 0
        self._fsyncing: list[tuple[Commit, int]] = []  # the worker fsyncs their files
        self._worker: _Job | None = None
        self._big = False  # a batch was filled: write every file back early
        self._paths: dict[bytes, int] = {}  # target -> how many queued files land there

    def add(self, commit: Commit, size: int) -> bool:
        """Queue a verified file; True when its batch is full (call ``hand_over``)."""
        if self.sync_writes and (self._big or size >= EARLY_WRITEBACK_BYTES):
            commit.start_writeback()
        self._filling.append((commit, size))
        self._filling_bytes += size
        self._paths[commit.path] = self._paths.get(commit.path, 0) + 1
        return len(self._filling) >= BATCH_FILES or self._filling_bytes >= BATCH_BYTES

    @property
    def empty(self) -> bool:
        return not (self._filling or self._fsyncing or self._worker)

    def holds(self, path: bytes) -> bool:
        """Whether a file not yet renamed would land at ``path`` or below it."""
        if not self._paths:
            return False
        if path in self._paths:
            return True
        below = path + b"/"
        return any(p.startswith(below) for p in self._paths)

    def hand_over(self) -> None:
        """The batch being filled is full: fsync it in the background (``overlap``), or
        commit it now."""
        self._big = True
        if not self.overlap:
            self.drain()
            return
        self._wait()  # the batch the worker had is durable (less what failed), the one before renamed durably
        self._before_rename()
        said_later: list = []  # the worker's failures, said in this thread once it is done
        directories = DirSyncs(True, self.tree, lambda *failure: said_later.append(failure))
        try:
            self._rename_into(self._fsyncing, directories)
        except BaseException:
            directories.close()
            raise
        self._fsyncing, self._filling, self._filling_bytes = self._filling, [], 0
        self._worker = _Job([commit.file.fileno() for commit, _ in self._fsyncing], sum(size for _, size in self._fsyncing),
                            directories, said_later)  # fmt: skip

    def drain(self, dir_syncs: DirSyncs | None = None) -> None:
        """Commit everything queued now: data durable, renamed, renames durable.

        With ``dir_syncs`` the directories are handed to it instead of fsynced here: the
        caller changes more in them first (the end of a session), then fsyncs each once."""
        self._wait()
        if self.sync_writes and self._filling:  # if it raises they stay queued, for discard() to drop
            failed = fsync_all([commit.file.fileno() for commit, _ in self._filling], self._filling_bytes)
            self._filling = self._durable(self._filling, failed)
        self._before_rename()
        own = dir_syncs is None
        if own:
            dir_syncs = DirSyncs(self.sync_writes, self.tree, self._failed)
        try:
            self._rename_into(self._fsyncing, dir_syncs)
            self._fsyncing = []
            if self._filling:
                filling, self._filling, self._filling_bytes = self._filling, [], 0
                self._rename_into(filling, dir_syncs)
            if own:
                dir_syncs.sync()
        finally:
            if own:
                dir_syncs.close()

    def discard(self) -> None:
        """Drop everything not yet renamed (an error or the mirroring lock ended the
        session): no temporary file is left behind."""
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        for commit, _ in self._fsyncing + self._filling:
            commit.discard()
        self._fsyncing, self._filling, self._filling_bytes = [], [], 0
        self._paths.clear()

    def _wait(self) -> None:
        """Wait for the worker; the files it could not make durable are failed and dropped,
        anything else it raised is raised here (``discard`` cleans up)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.join()
            for failure in worker.said_later:
                self._failed(*failure)
            if worker.error is not None:
                raise worker.error
            self._fsyncing = self._durable(self._fsyncing, worker.failed)

    def _durable(self, batch: list[tuple[Commit, int]], failed: dict) -> list[tuple[Commit, int]]:
        """``batch`` less the files whose fsync failed (``failed``: by descriptor): those are
        said, and dropped with their temporary files."""
        if not failed:
            return batch
        durable = []
        for commit, size in batch:
            error = failed.get(commit.file.fileno())
            if error is None:
                durable.append((commit, size))
                continue
            self._unqueue(commit.path)
            commit.discard()
            self._failed(None, commit.path, failure_reason(error))
        return durable

    def _rename_into(self, batch: list[tuple[Commit, int]], dir_syncs: DirSyncs) -> None:
        """Rename a batch whose data is durable into place; the directories it changed go
        to ``dir_syncs`` (which holds descriptors of its own)."""
        renamed = self._rename(batch)
        try:
            for commit in renamed:
                dir_syncs.add(commit.path.rpartition(b"/")[0], commit.dir_fd)
        finally:
            self._release(renamed)

    def _rename(self, batch: list[tuple[Commit, int]]) -> list[Commit]:
        """Rename a batch whose data is durable into place; the commits renamed."""
        renamed: list[Commit] = []
        try:
            for commit, size in batch:
                self._between()
                self._unqueue(commit.path)
                try:
                    commit.commit()
                except (OSError, UnsafePathError) as exc:
                    commit.discard()
                    self._failed(None, commit.path, failure_reason(exc))
                    continue
                renamed.append(commit)
                self._committed(size)
        except BaseException:
            for commit, _ in batch:
                if not commit.done:
                    commit.discard()
            self._release(renamed)
            raise
        return renamed

    def _unqueue(self, path: bytes) -> None:
        left = self._paths.pop(path) - 1
        if left:
            self._paths[path] = left

    @staticmethod
    def _release(commits: list[Commit]) -> None:
        for commit in commits:
            commit.release()


class _Job:
    """In a thread of its own: fsync a batch's files, then the directories the batch before
    it was renamed into.  After ``join``: ``failed``, the files that could not be made
    durable (by descriptor), ``said_later``, the directories' failures (``DirSyncs``'s
    ``fail`` collects them there), and ``error``, anything raised."""

    def __init__(self, files: list[int], nbytes: int, directories: DirSyncs, said_later: list):
        self.error: BaseException | None = None
        self.failed: dict = {}
        self.said_later = said_later
        self._files = files
        self._nbytes = nbytes
        self._directories = directories
        self._thread = threading.Thread(target=self._run, name="commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.failed = fsync_all(self._files, self._nbytes)
            self._directories.sync()
        except BaseException as exc:
            self.error = exc
        finally:
            self._directories.close()

    def join(self) -> None:
        self._thread.join()


class DirSyncs:
    """The directories a session changed, each to be fsynced once, when all its changes are
    done (fsyncing one as it is changed would fsync it again after its next change).

    A descriptor is kept for each (duplicated while the change's own is at hand), but at most
    ``held_at_most()``: a session that changes thousands of directories must not run out of
    descriptors.  Those beyond are opened again by ``sync``, and fsynced in groups as large.
    A directory that cannot be opened or fsynced is said (``fail``): its changes may not
    survive a crash."""

    def __init__(self, enabled: bool, tree: ConfinedTree, fail):
        self.enabled = enabled
        self.tree = tree
        self.fail = fail  # fail(None, path, reason): a directory that cannot be opened or fsynced is said
        self.limit = held_at_most()
        self._held: dict[tuple[int, int], tuple[int, bytes]] = {}  # (st_dev, st_ino) -> (our descriptor, path)
        self._paths: dict[bytes, bool] = {}  # every directory added: held, or to open again

    def add(self, path: bytes, fd: int | None = None) -> None:
        """``path`` changed; ``fd``, its descriptor if at hand (else it is looked up)."""
        if not self.enabled or path in self._paths:
            return
        room = len(self._held) < self.limit
        self._paths[path] = room
        if room:
            self._hold(self._held, path, fd)

    def sync(self) -> None:
        """fsync them all."""
        self._fsync_and_close(self._held)
        later: dict[tuple[int, int], tuple[int, bytes]] = {}
        try:
            for path, held in self._paths.items():
                if not held:
                    self._hold(later, path, None)
                    if len(later) >= self.limit:
                        self._fsync_and_close(later)
            self._fsync_and_close(later)
        finally:
            for fd, _ in later.values():
                os.close(fd)

    def close(self) -> None:
        """Let go of what is still held (after an error: not fsynced)."""
        for fd, _ in self._held.values():
            os.close(fd)
        self._held.clear()
        self._paths.clear()

    def _hold(self, held: dict, path: bytes, fd: int | None) -> None:
        if fd is None:
            try:
                fd = self.tree.dir_fd(self.tree.parts(path) if path else [])
            except (FileNotFoundError, NotADirectoryError, UnsafePathError):
                return  # removed meanwhile: nothing left to make durable
            except OSError as exc:  # e.g. no permission to open it: said, not skipped
                self.fail(None, path, f"cannot fsync the directory: {failure_reason(exc)}")
                return
        key = _identity(fd)
        if key not in held:
            held[key] = (os.dup(fd), path)  # the tree's cache may close its own before the fsync

    def _fsync_and_close(self, held: dict) -> None:
        directories = list(held.values())
        held.clear()
        try:
            failed = fsync_all([fd for fd, _ in directories])
        finally:
            for fd, _ in directories:
                os.close(fd)
        for fd, path in directories:
            if fd in failed:
                self.fail(None, path, f"cannot make the directory durable: {failure_reason(failed[fd])}")


def _identity(fd: int) -> tuple[int, int]:
    """A directory's identity, to fsync each once: its inode number alone is not (another
    mount below the root has its own inode numbers)."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
