"""The replica writer: a session's operations carried out on the replica, safely.

The same writer serves a local sync (called directly by ``mirror.localsync``) and a remote
one (called by ``mirror.receiver`` with the records it decoded from the wire).  It owns
what keeps the replica whole, whoever asks:

- every path is confined to the tree (``safefs.ConfinedTree``): no symlink is followed,
  nothing outside is reached;
- new files arrive as temporary files, committed in batches (``mirror.commits``): data
  durable before its rename, renames durable before the session reports done;
- the mirroring lock: before every change, rename and deletion (at most every
  ``lockfile.LOCK_CHECK_SECONDS``) and before every batch is renamed into place, once its data
  is durable; if it appears, what is pending is discarded and the session ends with ``LockedError``;
- the epoch, at the same moments (``SessionFence``): once the replica holds an epoch above the
  sender's (a newer primary's session raised it, or its node followed a new leader), nothing
  more of the session is renamed into place, and it ends with ``StaleEpochError``;
- the module's privilege policy (devices, special files, set-id bits) by what the entry is
  on the replica, not what the sender calls it;
- the order of a session: one file at a time, nothing but reviewed deletions in a dry run,
  deletions and directory times once all content is in place;
- the deletion guard (``mirror.guard``): all the session's deletions, or none.

``ReplicaAdmission`` is a session's door (epoch, lock, read-only module, replica guard),
for a receiver and a local sync alike, into a module (``ModuleConfig``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from typing import NamedTuple

from .atomicfile import make_dirs
from .commits import Batches, DirSyncs
from .entry import KIND_OF_FMT, Kind
from .epoch import MAX_EPOCH_STEP, fencing_epoch, observe_epoch
from .errors import (
    MirrorError,
    ProtocolError,
    SourceGuardError,
    StaleEpochError,
    UnsafePathError,
    display_path,
    failure_reason,
    fs_path,
)
from .exclude import make_excluder
from .guard import ReplicaGuard, foreign_replica_problem, review_deletions
from .lockfile import LockWatch
from .privileges import Privileges
from .replicadisk import require_mounted
from .safefs import ConfinedTree
from .statedir import check_root, resolve_state_dir, state_dir_below

log = logging.getLogger(__name__)


class ModuleConfig(NamedTuple):
    """One tree a receiver serves (or a local sync writes to)."""

    name: str
    path: bytes
    secret: bytes | None = None
    lock_file: bytes | None = None
    read_only: bool = False
    state_dir: bytes | None = None
    # Device nodes, FIFOs and sockets, setuid/setgid bits, owners: none unless granted.
    privileges: Privileges = Privileges()
    # ``path`` is a mount point: while nothing is mounted there, every session is refused.
    require_mount: bool = False

    @property
    def resolved_state_dir(self) -> bytes:
        return resolve_state_dir(self.path, self.state_dir)


def remember_replica_disks(modules) -> None:
    """The disks the ``require_mount`` modules' trees are on as a server starts (or
    reloads), for ``ReplicaGuard.same_disk``: starting the server is what accepts a disk."""
    for module in modules:
        if module.require_mount:
            ReplicaGuard(fs_path(module.path), module.resolved_state_dir, mounted=True).remember_disk(first=True)


class ReplicaAdmission:
    """The way into one module's replica for a connection's sessions (a receiver's or a
    local sync's): ``admit`` each session, then ``open_tree``; a crashed writer's leftover
    temporary files are removed by the first session that writes.  Made when the connection
    begins: its sessions must find the replica's directory it found then (or, if there was
    none, the one its first session wrote to)."""

    def __init__(self, module, peer: str):
        self.module = module
        self.peer = peer
        self.began_on = directory_identity(module.path)
        self.state_dir = module.resolved_state_dir
        self.guard = ReplicaGuard(fs_path(module.path), self.state_dir, mounted=module.require_mount)
        self.guard.remember_disk(first=True)
        self._cleaned = False
        self._reserved: dict[bytes, bytes | None] = {}

    def admit(self, epoch: int, tree_id, *, deleting: bool, allow: bool, dry_run: bool, take_writer=None,
              source_root: set[bytes] | None = None, excludes=()) -> int:  # fmt: skip
        """Refuse a stale epoch, a locked or read-only module, a deleting sender from another
        tree, or one whose root (``source_root``: its names, if told) has none of the names
        a replica that is no replica yet holds (``excludes`` aside); ``take_writer()`` (the
        one-writer lock) runs before anything is recorded.  The replica's epoch, a newer
        sender's recorded."""
        if self.began_on is not None and directory_identity(self.module.path) != self.began_on:
            # What the connection's start said of the replica (what it has applied) would
            # be taken as true of another disk: a sender going on from it leaves the rest out.
            raise MirrorError(f"the replica {display_path(self.module.path)} is no longer the directory this "
                              "connection began with (another file system mounted in its place, or replaced): "
                              "nothing was written; connect again")  # fmt: skip
        if self.module.require_mount:
            require_mounted(self.module.path)
        self.guard.same_disk(allow)
        check_root(self.module.path)  # its .mirror is never content: it must be hamirror's
        mine = fencing_epoch(self.state_dir)
        if epoch < mine:
            raise StaleEpochError(f"refused: the sender's tree epoch {epoch} is older than this replica's {mine} "
                                  "(a stale former primary must not overwrite newer data)")  # fmt: skip
        LockWatch(self.module.lock_file, "on the receiver, session refused").check()
        if self.module.read_only and not dry_run:
            raise MirrorError(f"module {self.module.name!r} is read-only: only a dry run is allowed")
        if deleting and not allow and source_root is not None and not self.guard.knows_a_tree():
            excluder = make_excluder(excludes)
            if problem := foreign_replica_problem(source_root, f"the sender's source ({self.peer})",
                                                  fs_path(self.module.path), self.state_dir,
                                                  excluder.excluded if excluder is not None else None):  # fmt: skip
                raise SourceGuardError(problem)
        if self.began_on is None:  # a new replica: made once it is let in
            make_dirs(os.path.abspath(self.module.path))
        if take_writer is not None and not dry_run:
            take_writer()
        # A deleting sender from another tree (its source unmounted, say) changes nothing here.
        self.guard.admit(tree_id, deleting=deleting, allow=allow, dry_run=dry_run, peer=self.peer)
        self.guard.remember_disk()
        if dry_run or epoch <= mine:
            return mine
        # A newer sender's epoch is recorded at most MAX_EPOCH_STEP higher per session, so
        # that whoever holds the secret cannot fence the module for good with epoch 2^63-1.
        recorded = min(epoch, mine + MAX_EPOCH_STEP)
        now = observe_epoch(self.state_dir, recorded)  # said once it is recorded (a full disk fails it)
        where = self.module.name or display_path(self.module.path)
        log.warning("%s: epoch raised from %d to %d by %s%s", where, mine, recorded, self.peer,
                    f" (it shows {epoch}; at most +{MAX_EPOCH_STEP} per session)" if recorded < epoch else "")  # fmt: skip
        return now

    def open_tree(self, root: bytes, dry_run: bool) -> ConfinedTree:
        # Leftover temporary files (a crashed writer's) are removed once the writer lock is
        # ours; a dry run has no temporary files and touches nothing.
        temp_dir = None if dry_run else os.path.join(self.state_dir, b"tmp")
        tree = ConfinedTree(root, temp_dir=temp_dir, clean=not self._cleaned, reserved=self.reserved_in(root))
        self._cleaned = self._cleaned or not dry_run
        return tree

    def writer(self, tree: ConfinedTree, excluder, epoch: int, **options) -> ReplicaWriter:
        """A session's writer on ``tree``, for a sender at ``epoch``, under the module's
        privileges, lock file and epoch; the entries ``excluder`` excludes are spared by
        deletions."""
        began_on = directory_identity(self.module.path)
        self.began_on = self.began_on or began_on
        lock = SessionFence(self.module.lock_file, self.state_dir, epoch, self.peer, fs_path(self.module.path),
                            began_on)  # fmt: skip
        keep = excluder.excluded if excluder is not None else None
        return ReplicaWriter(tree, privileges=self.module.privileges, lock=lock, keep=keep, **options)

    def reserved_in(self, root: bytes) -> bytes | None:
        """The state dir's path relative to ``root`` if it lies inside it (never content);
        worked out once per connection: it resolves both paths (an lstat per component),
        which a live session's latency should not pay."""
        if root not in self._reserved:
            inside = state_dir_below(root, self.state_dir)
            self._reserved[root] = None if inside == b"." else inside
        return self._reserved[root]


class SessionFence(LockWatch):
    """What stops a session's writer: the mirroring lock, an epoch above the sender's, and
    another directory at the replica's path than the one the session began on.

    Admission refuses an older sender; this fences one admitted before the epoch rose.  A
    primary frozen in the middle of a session, and thawed after another node took over,
    would otherwise go on committing its files on a replica that already follows the new
    primary (until the session ended), and its journal would count them as received there.

    The session writes through descriptors of the tree it opened, but its state files
    (epoch, applied) by path: with another disk mounted at ``replica`` meanwhile, they would
    land on that disk (a blank one given an epoch, or the record of a session it holds
    nothing of).  The session stops instead, before any state file is read or written."""

    def __init__(self, lock_file: bytes | None, state_dir: bytes, epoch: int, peer: str, replica: bytes,
                 began_on: tuple[int, int] | None):  # fmt: skip
        super().__init__(lock_file, "appeared on the receiver")
        self.state_dir = state_dir
        self.epoch = epoch
        self.peer = peer
        self.replica = replica
        self._began_on = began_on  # the replica's directory (``directory_identity``) when admitted

    def check_replica(self) -> None:
        """Raise if ``replica`` is no longer the directory the session began on."""
        if directory_identity(self.replica) != self._began_on:
            raise MirrorError(f"stopped: the replica {display_path(self.replica)} is no longer the directory this "
                              "session wrote to (another file system mounted in its place?): nothing more is written "
                              "or recorded there; connect again")  # fmt: skip

    def look(self) -> None:
        super().look()
        self.check_replica()
        now = fencing_epoch(self.state_dir)
        if now > self.epoch:
            raise StaleEpochError(f"stopped: this replica's epoch rose to {now} during the session of {self.peer}, "
                                  f"whose tree epoch is {self.epoch} (a newer primary took over); what was not "
                                  "yet in place was dropped")  # fmt: skip


def directory_identity(path: bytes) -> tuple[int, int] | None:
    """Which directory ``path`` names now (device, inode); None if none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class ReplicaWriter:
    """Carries out one session's operations on ``tree`` (see the module docstring).

    ``failed(req, path, reason)`` hears of each entry that could not be written (the
    session goes on); ``keep(path, is_dir)`` names the excluded entries a deletion spares."""

    def __init__(self, tree, *, privileges, lock: LockWatch, owner: bool, sync_writes: bool, dry_run: bool,
                 policy, keep=None, failed=None):  # fmt: skip
        self.tree = tree
        self.privileges = privileges
        self.lock = lock
        self.owner = owner
        self.sync_writes = sync_writes
        self.dry_run = dry_run
        self.policy = policy
        self.keep = keep
        self._failed = failed
        self.files = 0
        self.bytes_written = 0
        self.deleted = 0
        self.failures: list = []
        self.in_flight = None  # the Commit of the file being written: one at a time
        self.batches = Batches(tree, sync_writes=sync_writes, failed=self.fail, committed=self._committed,
                               before_rename=self._locked_discard, between=lambda: lock.check(force=False))  # fmt: skip
        self._deletes: list[bytes] = []
        self._dir_attrs: list[tuple[bytes, list]] = []

    def fail(self, req, path: bytes, reason: str) -> None:
        self.failures.append([path, reason])
        if self._failed is not None:
            self._failed(req, path, reason)

    def _change(self, what: str, path: bytes | None, in_dry_run: bool = False) -> None:
        """Every change passes here: the order of a session, the lock, then its path (an
        unsafe one ends the session)."""
        if self.dry_run and not in_dry_run:
            raise ProtocolError(f"{what!r} in a dry run")
        if self.in_flight is not None:
            raise ProtocolError(f"{what!r} before the previous file ended")
        self.lock.check(force=False)
        if path is not None:
            self.tree.parts(path)

    @contextlib.contextmanager
    def _entry(self, path: bytes):
        """One entry's change: one that cannot be made is reported, and the session goes on."""
        try:
            yield
        except (OSError, UnsafePathError) as exc:
            self.fail(None, path, failure_reason(exc))

    def _refused(self, path: bytes, *kinds) -> bool:
        """An entry of a kind the module does not grant (each of ``kinds``): reported, not made."""
        refusal = next(filter(None, map(self.privileges.refusal, kinds)), None)
        if refusal:
            self.fail(None, path, refusal)
        return refusal is not None

    def _locked_discard(self) -> None:
        """Before files are renamed into place (once their data is durable: the wait for the
        disk may be long) or anything deleted: the mirroring lock, or an epoch above the
        sender's, discards them instead."""
        try:
            self.lock.check()
        except MirrorError:
            self.discard()
            raise

    # -- files -----------------------------------------------------------------------------

    def new_file(self, path: bytes):
        """``(commit, None)``: a temporary file for ``path``; ``(None, reason)`` when it
        cannot be made (an unsafe name raises: the session ends)."""
        self._change("file", path)
        try:
            self.in_flight = self.tree.new_file(path)
        except (OSError, UnsafePathError) as exc:
            return None, failure_reason(exc)
        return self.in_flight, None

    def commit_file(self, commit, attrs: list, size: int, req=None) -> None:
        """The file's content is complete and verified: give it its attributes and queue
        it for the batch's commit."""
        self.in_flight = None
        mode, uid, gid, mtime_ns = attrs
        try:
            commit.finish(self.privileges.file_mode(mode), uid, gid, mtime_ns, self.owner)
        except OSError as exc:
            commit.discard()
            self.fail(req, commit.path, failure_reason(exc))
            return
        if self.batches.add(commit, size):
            self.batches.hand_over()

    def drop_file(self, commit) -> None:
        self.in_flight = None
        if commit is not None:
            commit.discard()

    def _committed(self, size: int) -> None:
        self.files += 1
        self.bytes_written += size

    # -- other entries ---------------------------------------------------------------------

    def mkdir(self, path: bytes, attrs: list) -> None:
        self._change("mkdir", path)
        with self._entry(path):
            self.tree.make_dir(path, attrs[0])

    def special(self, path: bytes, kind: int, attrs: list, target: bytes = b"", rdev: int = 0) -> None:
        """A symlink (``target``), FIFO, socket or device node (``rdev``)."""
        self._change("symlink" if kind == Kind.SYMLINK else "node", path)
        if self._refused(path, kind):
            return
        if self.batches.holds(path):
            self.finish_files()  # it replaces a file (or a directory of files) still queued
        with self._entry(path):
            self.tree.make_special(path, kind, target=target, rdev=rdev)
            self.tree.set_attrs(path, kind, *attrs, owner=self.owner)
            self.files += 1

    def link(self, path: bytes, target: bytes) -> None:
        self._change("hardlink", path)
        if self.batches.holds(target) or self.batches.holds(path):
            self.finish_files()  # the file linked to, or the one replaced, is still queued
        with self._entry(path):
            linked = self.tree.lstat(target)
            # A second name for a node this module would not have made is refused.
            if not self._refused(path, KIND_OF_FMT.get(stat.S_IFMT(linked.st_mode)) if linked else None):
                self.tree.make_special(path, Kind.FILE, link_to=target)
                self.files += 1

    def set_attrs(self, path: bytes, kind: int, attrs: list) -> None:
        self._change("attrs", path or None)  # the tree's root comes as the empty path
        if kind == Kind.DIR:
            self._dir_attrs.append((path, attrs))  # once everything inside it has changed
            return
        with self._entry(path):
            # What is there decides, not what the sender calls it: no chmod of a device node
            # that is there (a world-writable /dev/sda) in a module without devices.
            there = self.tree.lstat(path)
            actual = KIND_OF_FMT.get(stat.S_IFMT(there.st_mode), kind) if there is not None else kind
            if self._refused(path, kind, actual):
                return
            if actual == Kind.FILE:
                attrs = [self.privileges.file_mode(attrs[0]), *attrs[1:]]
            self.tree.set_attrs(path, kind, *attrs, owner=self.owner)

    def delete(self, path: bytes) -> None:
        """Queued (a dry run's too, to be reviewed): the deletion guard reviews them all at ``finish``."""
        self._change("delete", path, in_dry_run=True)
        self._deletes.append(path)

    # -- the end ---------------------------------------------------------------------------

    def finish_files(self, dir_syncs: DirSyncs | None = None) -> None:
        """Commit the files queued so far (their directories to ``dir_syncs`` if given), the
        one being written dropped.  Alone, when a lock or a cancel stopped the sender: what
        is whole is kept; deletions and directory times wait for next time."""
        self.drop_file(self.in_flight)
        if not self.batches.empty:
            self.batches.drain(dir_syncs)

    def finish(self) -> str | None:
        """Commit what is queued, then the deletions (unless the guard refuses them: its
        reason is returned), then the directory times; every directory changed is fsynced
        once, after its last change."""
        if self.in_flight is not None:
            raise ProtocolError("'end' in the middle of a file")
        with contextlib.closing(DirSyncs(self.sync_writes, self.tree, self.fail)) as dir_syncs:
            self.finish_files(dir_syncs)
            if (self._deletes or self._dir_attrs) and not self.dry_run:
                self._locked_discard()
            refused = review_deletions(self.tree, self._deletes, self.policy, self.keep)
            for path in self._deletes if not (refused or self.dry_run) else ():
                self.lock.check(force=False)  # a lock made meanwhile (a takeover) stops those left
                with self._entry(path), contextlib.suppress(FileNotFoundError):
                    kept = self.tree.remove(path, keep=self.keep)
                    self.deleted += 1
                    if kept:  # excluded entries inside a deleted directory stay, like rsync
                        self.fail(None, path, f"cannot delete non-empty directory: {len(kept)} excluded "
                                              f"entries kept inside, e.g. {display_path(kept[0])}")  # fmt: skip
                dir_syncs.add(path.rpartition(b"/")[0])
            for path, attrs in self._dir_attrs:
                with self._entry(path):
                    self.tree.set_attrs(path, Kind.DIR, *attrs, owner=self.owner)
                dir_syncs.add(path)
            dir_syncs.sync()
        return refused

    def discard(self) -> None:
        """Drop everything not yet renamed into place (the session ends without it)."""
        self.batches.discard()
        self.drop_file(self.in_flight)

    def result(self, refused: str | None, epoch: int) -> dict:
        """The session's report; ``epoch``: the replica's after it (a sender behind it learns
        whether the replica holds its epoch yet: it is raised a bounded step per session)."""
        return {"files": self.files, "bytes": self.bytes_written, "deleted": self.deleted,
                "failed": self.failures[:1000], "failed_count": len(self.failures), "deletions_refused": refused,
                "epoch": epoch}  # fmt: skip
