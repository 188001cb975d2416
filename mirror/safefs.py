"""The receiver's only way to touch its tree: every operation confined to one root directory.

Paths arrive from the wire, so each is validated (relative, no empty, ``.`` or ``..``
component, no NUL, bounded length) and then resolved one component at a time from the
root's file descriptor with ``O_NOFOLLOW | O_DIRECTORY``: a symlink anywhere in the replica
is never followed, whatever it points at (rsync's CVE-2024-12087/12088 class).  The final
component is always acted on with ``*at()`` calls that do not follow it either: writing over
a symlink replaces the symlink, it never writes through it.

New content is written to a temporary file and renamed into place (``Commit``): a reader of
the replica sees the old version or the new one, never a part.  Temporary files live in the
tree's state dir (``.mirror/tmp/``, never scanned, removed at the start of each session) or,
when the target directory is on another filesystem, beside the target under a hidden name.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections import OrderedDict
from collections.abc import Iterator

from .entry import MAX_NAME, Kind
from .errors import UnsafePathError, display_path

MAX_PATH_BYTES = 64 * 1024
MAX_DEPTH = 4096
TEMP_PREFIX = b".hamirror."
TEMP_SUFFIX = b".tmp"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE = 64


def split_path(path: bytes) -> list[bytes]:
    """The components of a relative path from the wire, or UnsafePathError saying why not."""
    if not isinstance(path, bytes) or not path:
        raise UnsafePathError(f"refused path {path!r}: empty")
    if len(path) > MAX_PATH_BYTES:
        raise UnsafePathError(f"refused path of {len(path)} bytes: longer than {MAX_PATH_BYTES}")
    if b"\0" in path:
        raise UnsafePathError(f"refused path {display_path(path)!r}: contains NUL")
    if path.startswith(b"/"):
        raise UnsafePathError(f"refused path {display_path(path)!r}: absolute")
    parts = path.split(b"/")
    if len(parts) > MAX_DEPTH:
        raise UnsafePathError(f"refused path: deeper than {MAX_DEPTH} levels")
    for part in parts:
        if part in (b"", b".", b".."):
            raise UnsafePathError(f"refused path {display_path(path)!r}: '{display_path(part)}' component")
        if len(part) > MAX_NAME:
            raise UnsafePathError(f"refused path {display_path(path)!r}: a name longer than {MAX_NAME} bytes")
    return parts


def _temp_name() -> bytes:
    return TEMP_PREFIX + os.urandom(8).hex().encode() + TEMP_SUFFIX


class ConfinedTree:
    """A directory tree the receiver may change, and nothing outside it.

    Directory descriptors along recently used paths are cached; any removal or replacement
    of a directory drops the cached descriptors at and below it.
    """

    def __init__(self, root: bytes, temp_dir: bytes | None = None, clean: bool = True):
        self.root = root
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self.temp_dir_fd: int | None = None
        self._temp_dev = None
        if temp_dir is not None:
            os.makedirs(temp_dir, mode=0o700, exist_ok=True)
            self.temp_dir_fd = os.open(temp_dir, _DIR_FLAGS)
            self._temp_dev = os.fstat(self.temp_dir_fd).st_dev
            if clean:
                self.clean_temp_dir()

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()
        if self.temp_dir_fd is not None:
            os.close(self.temp_dir_fd)
            self.temp_dir_fd = None
        os.close(self.root_fd)

    def clean_temp_dir(self) -> int:
        """Remove temporary files a crashed session left behind; returns how many."""
        if self.temp_dir_fd is None:
            return 0
        removed = 0
        for name in os.listdir(self.temp_dir_fd):
            raw = os.fsencode(name)
            if raw.startswith(TEMP_PREFIX) and raw.endswith(TEMP_SUFFIX):
                try:
                    os.unlink(raw, dir_fd=self.temp_dir_fd)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    # -- resolving -----------------------------------------------------------------------

    def dir_fd(self, parts: list[bytes]) -> int:
        """Descriptor of the directory at ``parts`` (relative to the root), never via a symlink."""
        if not parts:
            return self.root_fd
        key = b"/".join(parts)
        fd = self._cache.get(key)
        if fd is not None:
            self._cache.move_to_end(key)
            return fd
        parent = self.dir_fd(parts[:-1])
        try:
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePathError(
                    f"{display_path(key)}: not a directory in the replica (a symlink is never followed)"
                ) from None
            raise OSError(exc.errno, exc.strerror, display_path(key)) from None
        self._cache[key] = fd
        if len(self._cache) > _FD_CACHE:
            _, old = self._cache.popitem(last=False)
            os.close(old)
        return fd

    def parent(self, path: bytes) -> tuple[int, bytes]:
        """``(descriptor of the parent directory, final name)`` for a validated wire path."""
        parts = split_path(path)
        return self.dir_fd(parts[:-1]), parts[-1]

    def forget(self, path: bytes) -> None:
        """Drop cached descriptors at and below ``path`` (it was removed or replaced)."""
        prefix = path + b"/"
        for key in [k for k in self._cache if k == path or k.startswith(prefix)]:
            os.close(self._cache.pop(key))

    def lstat(self, path: bytes) -> os.stat_result | None:
        dir_fd, name = self.parent(path)
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    # -- reading -------------------------------------------------------------------------

    def open_regular(self, path: bytes):
        """Open an existing regular file for reading (the basis of a delta), never a symlink."""
        dir_fd, name = self.parent(path)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePathError(f"{display_path(path)}: not a regular file in the replica")
        return os.fdopen(fd, "rb")

    # -- writing -------------------------------------------------------------------------

    def new_file(self, path: bytes) -> Commit:
        """A temporary file that ``Commit.commit()`` renames to ``path``."""
        dir_fd, name = self.parent(path)
        if self.temp_dir_fd is not None and os.fstat(dir_fd).st_dev == self._temp_dev:
            temp_fd = self.temp_dir_fd
        else:
            temp_fd = dir_fd  # another filesystem below the root: rename must stay on one device
        temp = _temp_name()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=temp_fd)  # fmt: skip
        return Commit(self, path, dir_fd, name, temp_fd, temp, fd)

    def make_dir(self, path: bytes, mode: int) -> None:
        dir_fd, name = self.parent(path)
        try:
            os.mkdir(name, mode & 0o7777 | 0o700, dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                return
            self._remove_entry(dir_fd, name, path, st)
            os.mkdir(name, mode & 0o7777 | 0o700, dir_fd=dir_fd)

    def make_special(self, path: bytes, kind: int, target: bytes = b"", rdev: int = 0, link_to: bytes | None = None):
        """Create a symlink, hard link, FIFO, socket or device node at ``path`` atomically:
        made under a temporary name beside it, then renamed over whatever was there."""
        dir_fd, name = self.parent(path)
        temp = _temp_name()
        if link_to is not None:
            src_dir, src_name = self.parent(link_to)
            os.link(src_name, temp, src_dir_fd=src_dir, dst_dir_fd=dir_fd, follow_symlinks=False)
        elif kind == Kind.SYMLINK:
            os.symlink(target, temp, dir_fd=dir_fd)
        elif kind in (Kind.FIFO, Kind.SOCKET):
            fmt = stat.S_IFIFO if kind == Kind.FIFO else stat.S_IFSOCK
            os.mknod(temp, 0o600 | fmt, dir_fd=dir_fd)
        elif kind in (Kind.CHAR, Kind.BLOCK):
            fmt = stat.S_IFCHR if kind == Kind.CHAR else stat.S_IFBLK
            os.mknod(temp, 0o600 | fmt, rdev, dir_fd=dir_fd)
        else:
            raise ValueError(f"make_special: kind {kind}")
        try:
            self._replace(dir_fd, temp, dir_fd, name, path)
        except BaseException:
            _unlink_quietly(dir_fd, temp)
            raise

    def _replace(self, src_dir: int, temp: bytes, dir_fd: int, name: bytes, path: bytes) -> None:
        """Rename ``temp`` over ``name``; a directory in the way is removed first (a type change)."""
        try:
            os.rename(temp, name, src_dir_fd=src_dir, dst_dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            self._remove_entry(dir_fd, name, path, st)
            os.rename(temp, name, src_dir_fd=src_dir, dst_dir_fd=dir_fd)

    def rename(self, old: bytes, new: bytes) -> bool:
        """Rename ``old`` to ``new`` inside the tree (both confined); False if ``old`` is gone.
        A directory in the way at ``new`` is left alone (the rename is then not done)."""
        old_dir, old_name = self.parent(old)
        new_dir, new_name = self.parent(new)
        try:
            os.rename(old_name, new_name, src_dir_fd=old_dir, dst_dir_fd=new_dir)
        except FileNotFoundError:
            return False
        self.forget(old)
        self.forget(new)
        return True

    def remove(self, path: bytes) -> bool:
        """Remove ``path`` (a whole subtree for a directory, never following symlinks)."""
        dir_fd, name = self.parent(path)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        self._remove_entry(dir_fd, name, path, st)
        return True

    def _remove_entry(self, dir_fd: int, name: bytes, path: bytes, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            self.forget(path)
            # shutil.rmtree with dir_fd works through descriptors and never follows a symlink.
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def set_attrs(self, path: bytes, kind: int, mode: int, uid: int, gid: int, mtime_ns: int,
                  owner: bool) -> None:  # fmt: skip
        """Owner (when ``owner``), permissions (not for symlinks) and mtime of ``path``."""
        if kind == Kind.DIR:
            fd = self.dir_fd(split_path(path) if path else [])
            if owner:
                os.chown(fd, uid, gid)
            os.chmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
            return
        dir_fd, name = self.parent(path)
        if owner:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if kind != Kind.SYMLINK:
            # Not a symlink (checked through a descriptor, so a swap cannot redirect chmod).
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_PATH, dir_fd=dir_fd)
            try:
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    raise UnsafePathError(f"{display_path(path)}: is a symlink in the replica")
                os.chmod(f"/proc/self/fd/{fd}", mode)
            finally:
                os.close(fd)
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    def temp_files(self) -> Iterator[bytes]:
        if self.temp_dir_fd is not None:
            for name in os.listdir(self.temp_dir_fd):
                yield os.fsencode(name)


class Commit:
    """A new file's content on its way into the tree: write, ``finish``, then ``commit`` or
    ``discard``.  It holds its own descriptor of the target directory, so the tree's
    descriptor cache can close its copy at any time."""

    def __init__(self, tree: ConfinedTree, path: bytes, dir_fd: int, name: bytes, temp_dir_fd: int,
                 temp: bytes, fd: int):  # fmt: skip
        self.tree = tree
        self.path = path
        self.dir_fd = os.dup(dir_fd)
        self.name = name
        self.temp_dir_fd = temp_dir_fd
        self.temp = temp
        self.file = os.fdopen(fd, "wb", buffering=0)
        self.done = False

    def finish(self, mode: int, uid: int, gid: int, mtime_ns: int, owner: bool) -> None:
        """Give the temporary file its final attributes (it stays open for ``fsync``)."""
        fd = self.file.fileno()
        if owner:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)  # after chown, which clears set-id bits
        os.utime(fd, ns=(mtime_ns, mtime_ns))

    def fsync(self) -> None:
        os.fsync(self.file.fileno())

    def commit(self) -> None:
        """Rename into place (over a file or symlink; a directory in the way is removed)."""
        try:
            self.file.close()
            self.tree._replace(self.temp_dir_fd, self.temp, self.dir_fd, self.name, self.path)
            self.done = True
        finally:
            if self.done:
                pass

    def release(self) -> None:
        """Close the directory descriptor (after the directory was fsynced, if it was)."""
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        if not self.done:
            _unlink_quietly(self.temp_dir_fd, self.temp)
            self.done = True
        self.release()


def _unlink_quietly(dir_fd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def fsync_all(fds: list[int]) -> None:
    """fsync many descriptors at once: issued in parallel, the filesystem folds them into few
    journal commits (one ``syncfs`` would also flush every other process's dirty data)."""
    if len(fds) <= 2:
        for fd in fds:
            os.fsync(fd)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(fds))) as pool:
        for _ in pool.map(os.fsync, fds):
            pass
