"""Guards against destroying a replica: the source guard and the deletion guard.

A source that failed to mount is an empty directory (or an old one, with whatever was left
under the mount point); mirrored with deletions, it empties the replica.  Two guards stand
in the way of a session that deletes (``sync --delete``, the live daemon):

**The source guard** (the whole session is refused, ``SourceGuardError``, exit 25).  Each
tree has an identity, recorded in its state dir (``tree-identity``): a random tree id, and
the filesystem it was found on (``statvfs`` ``f_fsid`` and the root's inode, and the
filesystem's UUID where the kernel tells it: xfs's ``f_fsid`` is its device number, which
changes when disks are found in another order at boot, while its UUID does not).

- A source records its identity at its first sync (a tree id derived from where it is, so
  two state dirs of one tree agree).  Later, a root on another filesystem, or another root
  directory (an unmounted mount point: a directory of the filesystem below), is not the
  tree that was mirrored.  When the state dir lies in the tree, an unmounted tree has lost
  it too: the directory below gets its own tree id, which the replica then refuses.
- A replica records the tree id of the first sender that writes to it, and refuses a
  deleting session from another tree.  When the replica becomes the source (a failover),
  it goes on as the same tree, so the old primary, its replica now, still recognises it.
- A directory no sync has mirrored into yet (no tree identity) that holds entries, none of
  which the source has at its root, is refused to a deleting session before anything is
  written there (``foreign_replica_problem``): a mistyped destination, whose every entry
  would go.
- A replica whose state dir is apart from the tree refuses every session while its root is
  not where it was recorded (unmounted): its records must not pass for its data.
- A replica that must be a mount point (``require_mount``) refuses, while its server runs,
  another disk mounted in place of the one it mirrored the tree onto (``same_disk``).

**The deletion guard** (deletions are refused, everything else goes on; the result says why,
exit 25).  The replica's writer reviews the session's deletions before it does any: a plan
that would delete every entry of a non-empty replica, or more than ``max_delete`` entries
(rsync's ``--max-delete``; a directory counts with everything in it), deletes nothing.

``allow_mass_delete`` (``--allow-mass-delete``) lets both through when the administrator
means it, and records the source's new identity.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from typing import NamedTuple

import xxhash

from .atomicfile import atomic_write
from .errors import SourceGuardError, UnsafePathError, display_path
from .statedir import read_state_file, state_dir_below

log = logging.getLogger(__name__)

IDENTITY_FILE = b"tree-identity"
_MAX_IDENTITY = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DeletionPolicy(NamedTuple):
    """What a deleting session may do: ``max_delete`` entries at most (None: no limit, only
    the empty-replica rule), or anything with ``allow_mass_delete``."""

    max_delete: int | None = None
    allow_mass_delete: bool = False

    def as_wire(self) -> dict:
        return {"max_delete": self.max_delete, "allow_mass_delete": self.allow_mass_delete}


def session_guard(opts: dict) -> tuple[str | None, DeletionPolicy]:
    """A ``start`` message's ``tree`` id and ``deletions`` policy, checked (the receiver's side)."""
    from . import protocol as P
    from .errors import ProtocolError

    tree_id = opts.get("tree")
    if tree_id is not None and (not isinstance(tree_id, str) or len(tree_id) != 32
                                or any(c not in "0123456789abcdef" for c in tree_id)):  # fmt: skip
        raise ProtocolError("bad tree id")
    value = opts.get("deletions")
    if value is None:
        return tree_id, DeletionPolicy()
    if not isinstance(value, dict):
        raise ProtocolError("bad deletion policy")
    limit = value.get("max_delete")
    policy = DeletionPolicy(None if limit is None else P.want_int(limit, "max_delete"),
                            bool(value.get("allow_mass_delete")))  # fmt: skip
    return tree_id, policy


class TreeIdentity(NamedTuple):
    tree_id: str
    fs: tuple[int, int] | None  # (f_fsid, root inode) where the tree was found
    uuid: str | None = None  # that filesystem's UUID (hex), where the kernel tells it


def fs_identity(root: bytes) -> tuple[int, int]:
    """The filesystem ``root`` is on, and which directory of it: (f_fsid, inode)."""
    return os.statvfs(root).f_fsid, os.stat(root).st_ino


_FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]}), Linux 6.5


def fs_uuid(root: bytes) -> str | None:
    """The UUID of the filesystem ``root`` is on (hex), None where the kernel or the
    filesystem has none to tell (or an all-zero one)."""
    import fcntl

    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        return None
    try:
        buf = bytearray(17)
        fcntl.ioctl(fd, _FS_IOC_GETFSUUID, buf, True)
    except OSError:
        return None
    finally:
        os.close(fd)
    uuid = bytes(buf[1 : 1 + min(buf[0], 16)])
    return uuid.hex() if uuid.strip(b"\0") else None


def where_found(root: bytes) -> tuple[tuple[int, int], str | None]:
    """``fs_identity`` and ``fs_uuid`` of ``root``: what a new identity records."""
    return fs_identity(root), fs_uuid(root)


def on_recorded_fs(identity: TreeIdentity, root: bytes) -> bool:
    """Whether ``root`` is the directory ``identity`` was found at: the same filesystem (by
    UUID where both tell one, else by ``f_fsid``) and the same root inode."""
    try:
        fsid, ino = fs_identity(root)
    except OSError:
        return False
    if identity.uuid is not None and (uuid := fs_uuid(root)) is not None:
        return (uuid, ino) == (identity.uuid, identity.fs[1])
    return (fsid, ino) == identity.fs


def mount_points() -> frozenset[bytes] | None:
    """The kernel's mount points, as its mount table writes them (space, tab, newline and
    backslash octal-escaped); None if the table cannot be read."""
    try:
        with open(b"/proc/self/mountinfo", "rb") as f:
            table = f.read()
    except OSError:
        return None
    return frozenset(line.split(b" ")[4] for line in table.splitlines() if line.count(b" ") >= 4)


def is_mount_point(path: bytes, table: frozenset[bytes] | None = None) -> bool:
    """Whether a filesystem is mounted at ``path`` (by the kernel's mount table, which also
    knows a bind mount of a directory of the same filesystem; ``os.path.ismount`` does not).
    ``table``: ``mount_points()``, read once for several paths."""
    real = os.path.realpath(path)
    table = table if table is not None else mount_points()
    if table is None:
        return os.path.ismount(real)
    escaped = real
    for char in (b"\\", b" ", b"\t", b"\n"):
        escaped = escaped.replace(char, b"\\%03o" % ord(char))
    return escaped in table


def new_tree_id(fs: tuple[int, int]) -> str:
    """The id of a tree that has none recorded, from where it is: the same tree gets the same
    id whatever state dir it is synced with (two daemons, a sync with ``--state-dir`` beside
    one without), while the directory under an unmounted mount point gets another."""
    return xxhash.xxh3_128_hexdigest(b"hamirror tree %d %d" % fs)


def load(state_dir: bytes) -> TreeIdentity | None:
    """The identity recorded in ``state_dir``, None if none; a damaged record is an error (it
    guards the replica: it must not silently become a new one)."""
    path = os.path.join(state_dir, IDENTITY_FILE)
    try:
        data = read_state_file(path, _MAX_IDENTITY + 1)
    except OSError as exc:
        raise SourceGuardError(
            f"{display_path(path)}: cannot read the tree identity: {exc.strerror}"
        ) from None
    if data is None:
        return None
    try:
        record = json.loads(data)
        tree_id = record["tree"]
        fs = record.get("fs")
        uuid = record.get("uuid")
        if (
            not isinstance(tree_id, str)
            or len(tree_id) != 32
            or any(c not in "0123456789abcdef" for c in tree_id)
        ):
            raise ValueError("bad tree id")
        if fs is not None and not (
            isinstance(fs, list) and len(fs) == 2 and all(isinstance(x, int) for x in fs)
        ):
            raise ValueError("bad filesystem identity")
        if uuid is not None and not (fs is not None and isinstance(uuid, str) and len(uuid) == 32
                                     and all(c in "0123456789abcdef" for c in uuid)):  # fmt: skip
            raise ValueError("bad filesystem uuid")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SourceGuardError(
            f"{display_path(path)}: damaged tree identity ({exc}); remove it only if you are sure this tree "
            "is the one its replica mirrors (the next sync then records it again)"
        ) from None
    return TreeIdentity(tree_id, tuple(fs) if fs is not None else None, uuid)


def save(state_dir: bytes, identity: TreeIdentity) -> None:
    from .statedir import ensure_state_dir

    ensure_state_dir(state_dir)
    record = {"tree": identity.tree_id, "fs": list(identity.fs) if identity.fs else None}
    if identity.uuid is not None:
        record["uuid"] = identity.uuid
    atomic_write(os.path.join(state_dir, IDENTITY_FILE), json.dumps(record).encode() + b"\n", 0o644)


class SourceGuard:
    """The sender's side: this source's tree id, and whether its root is still the tree it
    was (checked before every session: a ``stat``, a ``statvfs``, and the UUID where recorded)."""

    def __init__(self, root: bytes, state_dir: bytes):
        self.root = root
        self.state_dir = state_dir
        self._identity: TreeIdentity | None = None
        self._unrecorded = False  # said once that the identity cannot be recorded (a full disk)

    def tree_id(self, *, deleting: bool, allow: bool, dry_run: bool) -> str | None:
        """The tree id to show the replica; raises ``SourceGuardError`` when a deleting session
        would run from a root that is not the recorded tree.  None: no identity could be
        recorded (a state dir that cannot be written): the replica's own guard still holds."""
        cached = self._identity
        identity = cached or load(self.state_dir)
        if identity is None or identity.fs is None:
            # The first sync of this tree: record where it is.
            current, uuid = where_found(self.root)
            identity = TreeIdentity(identity.tree_id if identity else new_tree_id(current), current, uuid)
            if dry_run:
                return identity.tree_id
            if not self._record(identity):
                return None
        elif not on_recorded_fs(identity, self.root):
            if deleting and not allow:
                raise SourceGuardError(
                    f"refused: the source {display_path(self.root)} is not on the filesystem it was on when it was "
                    f"first mirrored (recorded in {display_path(os.path.join(self.state_dir, IDENTITY_FILE))}): "
                    "is it unmounted, or another filesystem mounted in its place? Nothing was sent or deleted. "
                    "If the tree really moved, sync once with --allow-mass-delete to record its new place"
                )
            if not allow or dry_run:
                # Only the administrator's override records a new place: a plain copy from the
                # directory under an unmounted mount point must not make it the tree.
                return identity.tree_id
            identity = TreeIdentity(identity.tree_id, *where_found(self.root))
            self._record(identity)
        elif cached is None and not dry_run:
            identity = _with_uuid(identity, self.root, self._record)
        self._identity = identity
        return identity.tree_id

    def _record(self, identity: TreeIdentity) -> bool:
        try:
            save(self.state_dir, identity)
            return True
        except OSError as exc:
            (log.debug if self._unrecorded else log.warning)(
                "%s: cannot record the tree identity (%s); the source guard relies on the replica's alone",
                display_path(self.state_dir), exc.strerror)  # fmt: skip
            self._unrecorded = True
            return False


# The identity each replica state dir held, as this process last read or recorded it: kept
# when the directory is removed under a running server (``ReplicaGuard._recorded``).
_replica_identities: dict[bytes, TreeIdentity] = {}
# The directory (``fs_identity``) each mounted replica (``require_mount``) held its tree on,
# as this process last admitted a session there: another disk mounted in its place is
# refused until the server starts again (``ReplicaGuard.same_disk``).
_replica_disks: dict[bytes, tuple[tuple[int, int], str]] = {}
_replica_identities_lock = threading.Lock()


class ReplicaGuard:
    """The receiver's side: the tree id this replica mirrors (recorded at its first writing
    session), checked against every deleting sender; and where the replica was then,
    checked before every session: with its state dir outside the tree, an unmounted replica
    keeps its records (the journal position it applied), which must not pass for its data.
    A state dir inside the tree goes wherever the tree goes: it is not checked."""

    def __init__(self, root: bytes, state_dir: bytes, mounted: bool = False):
        self.root = root
        self.state_dir = state_dir
        self.mounted = mounted  # ``require_mount``: its disk is the tree's, not any disk mounted there
        self._identity: TreeIdentity | None = None
        self._apart = state_dir_below(root, state_dir) is None

    def same_disk(self, allow: bool) -> None:
        """For a mounted replica, before anything is read or written there: refuse another
        disk mounted in place of the one this process admitted sessions of a tree onto (a
        blank one, or another tree's), unless ``allow``.  A blank disk under a running server
        would otherwise be filled in the moments before whoever watches the mount (hawrap)
        stops the server; the administrator accepts a new disk by starting the server again.
        The same tree mounted again (its ``tree-identity`` says so) is accepted."""
        if not self.mounted:
            return
        with _replica_identities_lock:
            seen = _replica_disks.get(self.root)
        if seen is None:
            return
        where, tree_id = seen
        try:
            now = fs_identity(self.root)
        except OSError:
            now = None
        if now == where:
            return
        identity = load(self.state_dir)
        if (identity is not None and identity.tree_id == tree_id) or allow:
            return
        holds = f"tree {identity.tree_id}" if identity is not None else "no tree (no tree-identity)"
        raise SourceGuardError(
            f"refused: the replica {display_path(self.root)} is another disk than the one this server mirrored "
            f"tree {tree_id} onto (require_mount); it holds {holds}. Nothing was written. If this disk is meant "
            "to be the replica now, start the server again (or sync once with --allow-mass-delete)"
        )

    def remember_disk(self, first: bool = False) -> None:
        """After an admitted session: the disk a mounted replica's tree is on, for ``same_disk``.
        ``first``: before any session (the server's start, a connection's), only if this
        process knows no disk there yet and one holding a tree is mounted: a server started
        again by its supervisor must not wait for its first session to know the tree's disk,
        which a blank one may have replaced meanwhile."""
        if not self.mounted:
            return
        if first:
            with _replica_identities_lock:
                if self.root in _replica_disks:
                    return
            if not is_mount_point(self.root):
                return
            try:
                identity = load(self.state_dir)
            except SourceGuardError:
                return  # a damaged identity: the first session says so
            if identity is not None and self._apart and not on_recorded_fs(identity, self.root):
                return  # not the tree's file system: ``admit`` refuses it
        else:
            identity = self._identity or load(self.state_dir)
        if identity is None:
            return
        try:
            where = fs_identity(self.root)
        except OSError:
            return
        with _replica_identities_lock:
            if not (first and self.root in _replica_disks):
                _replica_disks[self.root] = (where, identity.tree_id)

    def knows_a_tree(self) -> bool:
        """Whether this process has seen this replica mirror a tree (its record may have gone
        since, with its state dir: ``_recorded`` writes it back)."""
        with _replica_identities_lock:
            return self._identity is not None or self.state_dir in _replica_identities

    def admit(self, tree_id, *, deleting: bool, allow: bool, dry_run: bool, peer: str) -> None:
        cached = self._identity
        identity = cached or self._recorded(dry_run)
        moved = self._apart and identity is not None and identity.fs is not None and not on_recorded_fs(identity, self.root)
        if moved and not allow:
            raise SourceGuardError(
                f"refused: the replica {display_path(self.root)} is not on the filesystem it was on when it first "
                f"mirrored (recorded in {display_path(os.path.join(self.state_dir, IDENTITY_FILE))}): is it "
                "unmounted, or another filesystem mounted in its place? Nothing was written. If the replica really "
                "moved, sync once with --allow-mass-delete to record its new place"
            )
        if tree_id is None:
            return  # a source that could not record an identity: the deletion guard still holds
        other = identity is not None and identity.tree_id != tree_id
        if identity is not None and not other and not moved:
            if cached is None and self._apart and not dry_run:
                identity = _with_uuid(identity, self.root, self._record)
            self._identity = identity
            return
        if other and deleting and not allow:
            raise SourceGuardError(
                f"refused: this replica mirrors tree {identity.tree_id} (recorded in "
                f"{display_path(os.path.join(self.state_dir, IDENTITY_FILE))}), the sender's tree is {tree_id}: "
                "the sender's source lost its state (unmounted?) or is another tree. Nothing was written or "
                "deleted. If the sender is right, sync once with --allow-mass-delete"
            )
        if dry_run or (other and not deleting):
            return  # a plain copy from another tree does not make this replica its mirror
        identity = TreeIdentity(tree_id, *where_found(self.root))
        self._record(identity)
        if self._identity is not None or allow:
            log.warning("%s: this replica now mirrors tree %s (from %s)%s", display_path(self.root), tree_id, peer,
                        " on its new filesystem" if moved else "")  # fmt: skip
        self._identity = identity

    def _recorded(self, dry_run: bool) -> TreeIdentity | None:
        """The identity recorded in the state dir; when it is gone but this process saw one
        there (the file or its state dir removed under a running server) and the replica
        holds anything, that one, written back (not by a dry run): another tree's deleting
        sender must still be refused.  (A root's inode number does not tell a replica made
        anew: the one just freed is given again.)"""
        identity = load(self.state_dir)
        with _replica_identities_lock:
            if identity is not None:
                _replica_identities[self.state_dir] = identity
                return identity
            identity = _replica_identities.get(self.state_dir)
        if identity is not None and not self._holds_content():
            return None  # the replica made anew (empty): nothing of it to guard
        if identity is not None:
            path = display_path(os.path.join(self.state_dir, IDENTITY_FILE))
            log.warning("%s: gone (its state dir removed?); the tree %s this process saw there %s", path,
                        identity.tree_id, "is still this replica's" if dry_run else "written back")  # fmt: skip
            if not dry_run:
                save(self.state_dir, identity)
        return identity

    def _holds_content(self) -> bool:
        try:
            with os.scandir(self.root) as it:
                return any(self._apart or e.name != b".mirror" for e in it)
        except OSError:
            return True  # cannot tell: guarded

    def _record(self, identity: TreeIdentity) -> None:
        save(self.state_dir, identity)
        with _replica_identities_lock:
            _replica_identities[self.state_dir] = identity


def _with_uuid(identity: TreeIdentity, root: bytes, record) -> TreeIdentity:
    """An identity recorded without its filesystem's UUID (before UUIDs were kept, found on
    its recorded ``f_fsid``), recorded again with it where the kernel tells one."""
    if identity.uuid is not None or identity.fs is None or (uuid := fs_uuid(root)) is None:
        return identity
    identity = identity._replace(uuid=uuid)
    record(identity)
    return identity


# A new file system's own directory, not a sign of a replica nor of anything to keep.
_NEW_FS_NAMES = frozenset({b"lost+found"})


def foreign_replica_problem(source_names: set[bytes], source: str, replica: bytes, state_dir: bytes,
                            keep=None) -> str | None:  # fmt: skip
    """Why a deleting sync must not make the directory ``replica`` a mirror of the tree whose
    root holds ``source_names`` (``source``: that tree, as the message names it) (None: it
    may): no sync has mirrored into it (it has no ``state_dir``, and no writer holds it), it
    holds entries, and the source has none of their names at its root, so the sync would
    delete every one of them: a mistyped destination, or rsync's ``SRC`` (a directory copied *into*
    DST) meant where hamirror mirrors SRC's content, as ``rsync SRC/ DST``.  A copy made
    before (by rsync, say) shares names with the source and passes; a new file system's
    ``lost+found`` counts for nothing.  ``keep(name, is_dir)``: what the sync excludes."""
    if os.path.lexists(state_dir):
        return None  # hamirror keeps state for it: a replica (its identity, if any, is judged by the admission)
    theirs = root_names(replica, keep)
    if not theirs or theirs & source_names:
        return None
    from .writerlock import held_elsewhere

    if held_elsewhere(replica):
        return None  # a writer holds it (its state dir removed under it): the writer lock answers
    shown = ", ".join(display_path(name) for name in sorted(theirs)[:3]) + (", ..." if len(theirs) > 3 else "")
    return (f"refused: {display_path(replica)} is no replica yet (nothing was mirrored into it) and holds "
            f"{len(theirs)} entr{'y' if len(theirs) == 1 else 'ies'} ({shown}), none of which {source} has: this "
            "deleting sync would delete them all. Is it the right directory? (mirror sync makes DST itself the copy "
            "of SRC's content, as rsync SRC/ DST does.) Nothing was written. If they are to go, sync once with "
            "--allow-mass-delete")  # fmt: skip


def root_names(root: bytes, keep=None) -> set[bytes]:
    """The names at ``root`` that count for ``foreign_replica_problem``: not its state dir,
    not a new file system's ``lost+found``, not excluded (``keep``); empty if unreadable."""
    names = set()
    try:
        with os.scandir(root) as it:
            for entry in it:
                if entry.name in (b".mirror", *_NEW_FS_NAMES):
                    continue
                if keep is not None and keep(entry.name, entry.is_dir(follow_symlinks=False)):
                    continue
                names.add(entry.name)
    except OSError:
        return set()
    return names


def review_deletions(tree, deletes: list[bytes], policy: DeletionPolicy, keep=None) -> str | None:
    """Why the session's deletions must not be done (None: they may).  ``tree`` is the
    replica (a ``ConfinedTree``), ``deletes`` the paths to delete (a directory with its
    subtree), ``keep(path, is_dir)`` what the session excludes (never deleted)."""
    if not deletes or policy.allow_mass_delete:
        return None
    top = {p for p in deletes if b"/" not in p}
    if top:
        reserved = tree.reserved[0] if tree.reserved and len(tree.reserved) == 1 else None
        names = []
        for name in os.listdir(tree.root_fd):
            name = os.fsencode(name)
            if name == reserved:
                continue
            if keep is not None:
                try:
                    is_dir = stat.S_ISDIR(os.stat(name, dir_fd=tree.root_fd, follow_symlinks=False).st_mode)
                except FileNotFoundError:
                    continue
                if keep(name, is_dir):
                    continue
            names.append(name)
        if names and top.issuperset(names):
            return (f"refused to delete every entry of the replica ({len(names)} at its root): the source is empty "
                    "(unmounted?); nothing was deleted. If that is what you mean, sync with --allow-mass-delete")  # fmt: skip
    if policy.max_delete is not None:
        count = count_entries(tree, deletes, policy.max_delete + 1, keep)
        if count > policy.max_delete:
            return (f"refused to delete more than --max-delete {policy.max_delete} entries (this sync would delete "
                    "more, a directory counting with everything in it); nothing was deleted")  # fmt: skip
    return None


def count_entries(tree, paths: list[bytes], limit: int, keep=None) -> int:
    """How many entries deleting ``paths`` removes (each directory with everything below it),
    counted up to ``limit``.  Paths are resolved as every wire path is (``ConfinedTree``),
    and nothing below is followed through a symlink."""
    count = 0
    for path in paths:
        try:
            dir_fd, name = tree.parent(path)
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except (OSError, UnsafePathError):
            continue
        count += 1
        if count >= limit:
            return count
        if not stat.S_ISDIR(st.st_mode):
            continue
        try:
            top = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError:
            continue
        stack = [(top, path)]
        try:
            while stack:
                fd, rel = stack.pop()
                try:
                    for entry in os.scandir(fd):
                        child = rel + b"/" + os.fsencode(entry.name)
                        is_dir = entry.is_dir(follow_symlinks=False)
                        if keep is not None and keep(child, is_dir):
                            continue
                        count += 1
                        if count >= limit:
                            return count
                        if is_dir:
                            try:
                                stack.append((os.open(entry.name, _DIR_FLAGS, dir_fd=fd), child))
                            except OSError:
                                pass
                finally:
                    os.close(fd)
        finally:
            for fd, _ in stack:
                os.close(fd)
    return count
