"""Copies of what a node holds that its peer lacks, made before the peer's copy replaces
it: by ``hawrap resume --keep-local-changes``, and by an etcd member about to receive
after it led.

What is copied is what ``unsynced`` lists: every path the mirror daemon's journals hold
unmirrored (a directory journaled as a whole tree, or renamed, with everything below it;
one journaled as an entry by itself), and, when the node served while its peer's copy was
outdated, every entry of the tree whose inode changed (ctime) since then.  Entries older
than that which the peer never received (an initial sync cut short) are not known here.
A journaled path that no longer exists was removed here; the peer's copy of it comes back,
so it is only named.

The tree is read through a ``ConfinedTree``: no symlink in it is followed, and its state
dir is left out.  Copies keep content, permissions, times and (as root) owners; a symlink is
copied as a symlink; a device, FIFO or socket is named, not copied; hard links among kept
files become separate files.  They are written into a new directory of their own, and one
``syncfs`` makes them durable before the caller lets anything replace the originals.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass, field

from mirror.entry import Kind
from mirror.errors import UnsafePathError, display_path
from mirror.localsync import copy_range
from mirror.safefs import ConfinedTree, syncfs

from .kept import new_copy_dir
from .mirrorctl import fan_out_pair
from .unsynced import CTIME_SLACK, changed_since, journaled, listed, recent_changes, source_tree, walk


class SetAsideError(Exception):
    """A copy could not be made (named in the message); nothing may replace the originals.
    ``cause``: the message without the copy's own directory, the same at every attempt."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message)
        self.cause = cause or message


@dataclass
class Kept:
    """What one tree's copy holds, and what it could not."""

    tree: str
    dest: str
    files: int = 0
    symlinks: int = 0
    dirs: int = 0
    size: int = 0
    absent: list[bytes] = field(default_factory=list)  # listed, but removed here since
    special: list[bytes] = field(default_factory=list)  # devices, FIFOs, sockets: named only

    def describe(self) -> str:
        text = (
            f"  tree {self.tree}: {self.files} files ({self.size} bytes), {self.symlinks} symlinks, "
            f"{self.dirs} directories copied to {self.dest}"
        )
        if self.absent:
            text += f"\n  {len(self.absent)} listed paths no longer exist here (the resync brings the peer's back):"
            text += "".join(f"\n{line}" for line in listed([display_path(p) for p in self.absent]))
        if self.special:
            text += f"\n  {len(self.special)} special files not copied:"
            text += "".join(f"\n{line}" for line in listed([display_path(p) for p in self.special]))
        return text


def keep(name: str, root: str, state_dir: str, entries: set[bytes], subtrees: set[bytes],
         dest: str) -> Kept:  # fmt: skip
    """Copy ``entries`` (directories by themselves) and ``subtrees`` (with everything below)
    of the tree at ``root`` into ``dest``, a directory made here (it must not exist), and make
    the copies durable.  SetAsideError names what could not be copied."""
    kept = Kept(name, dest)
    try:
        os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
        os.mkdir(dest, 0o700)
    except OSError as exc:
        raise SetAsideError(f"cannot make {dest}: {exc.strerror}") from None
    src = source_tree(root, state_dir)
    out = ConfinedTree(os.fsencode(dest))
    dirs: dict[bytes, os.stat_result] = {}
    current = b""
    try:
        for path in sorted(entries | subtrees):
            if _below_any(path, subtrees):
                continue  # copied with the subtree it lies in (sorted: that one came first)
            current = path
            st = _lstat(src, path)
            if st is None:
                kept.absent.append(path)
                continue
            _make_parents(src, out, path, dirs)
            if stat.S_ISDIR(st.st_mode) and path in subtrees:
                for current, sub_st in [(path, st), *walk(src, path)]:
                    _copy_entry(src, out, current, sub_st, kept, dirs)
            else:
                _copy_entry(src, out, path, st, kept, dirs)
        # deepest first: making an entry in a directory changes its times
        for current in sorted(dirs, key=lambda p: p.count(b"/"), reverse=True):
            st = dirs[current]
            out.set_attrs(current, Kind.DIR, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                          _as_root())  # fmt: skip
        current = b""
        syncfs(out.root_fd)
    except (UnsafePathError, OSError) as exc:
        what = f"copying {display_path(current)}" if current else "making the copies durable"
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        failed = SetAsideError(f"tree {name}: {what} into {dest}: {why}", f"tree {name}: {what}: {why}")
    else:
        failed = None
    finally:
        out.close()
        src.close()
    if failed is not None:
        shutil.rmtree(dest, ignore_errors=True)  # no copy half made: the next attempt starts anew
        raise failed
    return kept


def _below_any(path: bytes, subtrees: set[bytes]) -> bool:
    parts = path.split(b"/")
    return any(b"/".join(parts[:i]) in subtrees for i in range(1, len(parts)))


def _as_root() -> bool:
    return os.geteuid() == 0


def _lstat(tree: ConfinedTree, path: bytes) -> os.stat_result | None:
    """The entry at ``path``, None if it is gone (or a component on the way no longer is a
    directory: what the journal named is not there)."""
    try:
        return tree.lstat(path)
    except (UnsafePathError, FileNotFoundError, NotADirectoryError):
        return None


def _make_parents(src: ConfinedTree, out: ConfinedTree, path: bytes, dirs: dict) -> None:
    parts = path.split(b"/")
    for i in range(1, len(parts)):
        parent = b"/".join(parts[:i])
        if parent not in dirs:
            dirs[parent] = src.lstat(parent)
            out.make_dir(parent, 0o700)


def _copy_entry(src: ConfinedTree, out: ConfinedTree, path: bytes, st: os.stat_result, kept: Kept,
                dirs: dict) -> None:  # fmt: skip
    owner = _as_root()
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        if path not in dirs:
            dirs[path] = st
            out.make_dir(path, 0o700)
            kept.dirs += 1
    elif stat.S_ISREG(st.st_mode):
        with src.open_regular(path, (st.st_dev, st.st_ino)) as f:
            commit = out.new_file(path)
            try:
                _copy_content(f.fileno(), commit.file.fileno(), st.st_size)
                commit.finish(mode, st.st_uid, st.st_gid, st.st_mtime_ns, owner)
                commit.commit()
            finally:
                commit.discard()
        kept.files += 1
        kept.size += st.st_size
    elif stat.S_ISLNK(st.st_mode):
        dir_fd, name = src.parent(path)
        target = os.readlink(name, dir_fd=dir_fd)
        out.make_special(path, Kind.SYMLINK, target)
        out.set_attrs(path, Kind.SYMLINK, mode, st.st_uid, st.st_gid, st.st_mtime_ns, owner)
        kept.symlinks += 1
    else:
        kept.special.append(path)


def _copy_content(src_fd: int, out_fd: int, size: int) -> None:
    """The file's ``size`` bytes into ``out_fd``, in the kernel (a reflink where the file
    system shares blocks); a write cut short by a full disk is continued until it fails."""
    copied = copy_range(src_fd, out_fd, (), None)
    if copied != size:
        raise OSError(errno.EIO, f"{copied} bytes read of its {size}: it changed while copied")


def check_dest(dest: str, trees) -> str | None:
    """Why ``dest`` cannot hold the copies (inside a tree, where the resync would delete
    it), or None.  Below a tree's own state dir is fine: nothing mirrors or deletes there."""
    real = os.path.realpath(dest)
    for tree in trees:
        root = os.path.realpath(tree.path)
        if os.path.commonpath([real, root]) != root:
            continue
        state = os.path.realpath(tree.state_dir)
        if os.path.commonpath([real, state]) == state and real != state:
            continue
        return f"{dest} is inside tree {tree.name} ({tree.path}): the resync would replace it"
    if os.path.exists(dest) and not os.path.isdir(dest):
        return f"{dest} exists and is not a directory"
    return None


def keep_unsynced(trees, since: float | None, base: str | None, stamp: str, *, had_by_none: bool = False,
                  lacking: str | None = None, synced_whole: float | None = None) -> list[Kept]:  # fmt: skip
    """Copy what each tree holds that the peer lacks (its journals, see ``journaled``; the
    files changed just before its daemon was killed, see ``recent_changes``; with ``since``,
    every entry changed from then on) into ``base/<tree>``, or without ``base`` into the
    tree's state dir, ``kept/<stamp>``.  ``lacking``: a node whose position in the journals
    counts too (the new leader: what it never had is kept, whoever else had it).
    ``synced_whole``: when a sync of every tree toward ``lacking`` began, the node's writers
    stopped (a hand-over's final sync): it has everything from before, so only what changed
    from then on is kept.  Trees with nothing to keep are left out."""
    out = []
    for tree in trees:
        if synced_whole is not None:
            entries, subtrees = set(changed_since(tree.path, tree.state_dir, synced_whole - CTIME_SLACK)), set()
        else:
            cursor = fan_out_pair(tree.name, lacking).encode() if lacking else None
            entries, subtrees = journaled(tree.state_dir, had_by_none=had_by_none, lacking=cursor)
            recent = recent_changes(tree, since)
            if recent is not None:
                entries |= recent[1]
        if since is not None:
            entries |= changed_since(tree.path, tree.state_dir, since - CTIME_SLACK).keys()
        if not entries and not subtrees:
            continue
        dest = os.path.join(base, tree.name) if base else new_copy_dir(tree.state_dir, stamp)
        out.append(keep(tree.name, tree.path, tree.state_dir, entries, subtrees, dest))
    return out
