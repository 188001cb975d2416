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
import functools
import os
import queue
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

from .constants import MAX_DEPTH, MAX_PATH_BYTES
from .entry import MAX_NAME, Kind
from .errors import UnsafePathError, display_path

TEMP_PREFIX = b".hamirror."
TEMP_SUFFIX = b".tmp"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE = 128  # directory descriptors kept open per tree
_FSYNC_THREADS = 8
# From this many descriptors on, one syncfs per filesystem replaces their fsyncs (see fsync_all),
# while the machine holds at most this much dirty data beyond the batch's own.
SYNCFS_FROM = 16
SYNCFS_OTHERS_MAX = 32 << 20
_REAPER_INLINE = 8  # replaced files a tree frees itself before it starts its reaper thread
_REAPER_BACKLOG = 1024  # replaced files held for the reaper at most; beyond, released inline


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

    ``reserved`` is the tree's own state dir when it lies inside the tree (``b".mirror"``):
    no wire path may name it or anything in it.  Directory descriptors along recently used
    paths are cached; a descriptor returned by ``dir_fd``/``parent`` is only valid until the
    next resolution (the cache may close it), so an operation on two paths duplicates the
    first.  Any removal or replacement of a directory drops the cached descriptors below it.
    """

    def __init__(self, root: bytes, temp_dir: bytes | None = None, clean: bool = True,
                 reserved: bytes | None = None):  # fmt: skip
        self.root = root
        self.reserved = reserved.split(b"/") if reserved else None
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        # The mount each cached directory descriptor is on (an open descriptor never changes
        # mount): read from /proc once per directory, not once per file written into it.
        self._mounts: dict[int, int] = {}
        self.temp_dir_fd: int | None = None
        self._temp_mount = None
        self._reaper = _Reaper()
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if temp_dir is not None:
                os.makedirs(temp_dir, mode=0o700, exist_ok=True)
                self.temp_dir_fd = os.open(temp_dir, _DIR_FLAGS)  # never through a symlink
                self._temp_mount = mount_id(self.temp_dir_fd)
                if clean:
                    self.clean_temp_dir()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._reaper.stop()
        self._mounts.clear()
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()
        if self.temp_dir_fd is not None:
            os.close(self.temp_dir_fd)
            self.temp_dir_fd = None
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

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

    def parts(self, path: bytes) -> list[bytes]:
        """A wire path's components, refused if unsafe or inside the reserved state dir."""
        parts = split_path(path)
        if self.reserved is not None and parts[: len(self.reserved)] == self.reserved:
            raise UnsafePathError(f"refused path {display_path(path)!r}: the receiver's state dir is not content")
        return parts

    def dir_fd(self, parts: list[bytes]) -> int:
        """Descriptor of the directory at ``parts`` (relative to the root), never via a symlink.

        Walked one component at a time from the longest cached prefix (iteratively: a tree
        may be thousands of levels deep).  Every directory opened on the way is cached too:
        the next file in a sibling directory starts from their common parent."""
        if not parts:
            return self.root_fd
        cache = self._cache
        key = b"/".join(parts)
        fd = cache.get(key)
        if fd is not None:
            cache.move_to_end(key)
            return fd
        start, current = 0, self.root_fd
        prefix = key
        for i in range(len(parts) - 1, 0, -1):
            prefix = prefix[: len(prefix) - len(parts[i]) - 1]
            cached = cache.get(prefix)
            if cached is not None:
                cache.move_to_end(prefix)
                start, current = i, cached
                break
        prefix = b"/".join(parts[:start])
        try:
            for i in range(start, len(parts)):
                current = os.open(parts[i], _DIR_FLAGS, dir_fd=current)
                prefix = prefix + b"/" + parts[i] if prefix else parts[i]
                cache[prefix] = current
                # At most _FD_CACHE stay open, however deep the path: the least recently
                # used goes, never the one just opened (the next step opens from it).
                while len(cache) > _FD_CACHE:
                    _, old = cache.popitem(last=False)
                    self._mounts.pop(old, None)
                    os.close(old)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePathError(
                    f"{display_path(key)}: not a directory in the replica (a symlink is never followed)"
                ) from None
            raise OSError(exc.errno, exc.strerror, display_path(key)) from None
        return current

    def parent(self, path: bytes) -> tuple[int, bytes]:
        """``(descriptor of the parent directory, final name)`` for a wire path."""
        parts = self.parts(path)
        return self.dir_fd(parts[:-1]), parts[-1]

    def forget(self, path: bytes) -> None:
        """Drop cached descriptors at and below ``path`` (it was removed or replaced)."""
        prefix = path + b"/"
        for key in [k for k in self._cache if k == path or k.startswith(prefix)]:
            fd = self._cache.pop(key)
            self._mounts.pop(fd, None)
            os.close(fd)

    def lstat(self, path: bytes) -> os.stat_result | None:
        dir_fd, name = self.parent(path)
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    # -- reading -------------------------------------------------------------------------

    def open_regular(self, path: bytes, expect: tuple[int, int] | None = None):
        """Open an existing regular file for reading, never a symlink, FIFO or device.

        The name is opened with ``O_PATH`` (no open side effect on a device or a FIFO), its
        type checked, and only then is the same inode opened for reading.  ``expect``:
        its ``(st_dev, st_ino)``, else "changed since the scan"."""
        dir_fd, name = self.parent(path)
        return open_regular_at(dir_fd, name, path, expect)

    # -- writing -------------------------------------------------------------------------

    def new_file(self, path: bytes) -> Commit:
        """A temporary file that ``Commit.commit()`` renames to ``path``."""
        dir_fd, name = self.parent(path)
        temp_fd = self._temp_dir_for(dir_fd)
        temp = _temp_name()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=temp_fd)  # fmt: skip
        return Commit(self, path, dir_fd, name, temp_fd, temp, fd)

    def _temp_dir_for(self, dir_fd: int) -> int:
        """Where a temporary entry for a name in ``dir_fd`` is made: the temp dir, whose
        leftovers a crashed session's successor removes, unless ``dir_fd`` is on another
        mount (rename must stay within one): then beside its target."""
        if self.temp_dir_fd is not None and self._mount_of(dir_fd) == self._temp_mount:
            return self.temp_dir_fd
        return dir_fd

    def _mount_of(self, dir_fd: int) -> int:
        """``mount_id`` of a descriptor from ``dir_fd()`` (valid while it stays cached)."""
        mount = self._mounts.get(dir_fd)
        if mount is None:
            mount = self._mounts[dir_fd] = mount_id(dir_fd)
        return mount

    def make_dir(self, path: bytes, mode: int) -> None:
        dir_fd, name = self.parent(path)
        try:
            os.mkdir(name, mode & 0o7777 | 0o700, dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                return
            dir_fd = os.dup(dir_fd)
            try:
                self._remove_entry(dir_fd, name, path, st)
                os.mkdir(name, mode & 0o7777 | 0o700, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)

    def make_special(self, path: bytes, kind: int, target: bytes = b"", rdev: int = 0, link_to: bytes | None = None):
        """Create a symlink, hard link, FIFO, socket or device node at ``path`` atomically:
        made under a temporary name beside it, then renamed over whatever was there."""
        parent, name = self.parent(path)
        dir_fd = os.dup(parent)  # resolving ``link_to`` below may close the cached one
        # In the temp dir when it can be: a temporary name beside the target, left by a
        # killed receiver, would be an entry of the replica that the source never had.
        temp_fd = self.temp_dir_fd if self._temp_dir_for(parent) != parent else dir_fd
        temp = _temp_name()
        try:
            if link_to is not None:
                src_dir, src_name = self.parent(link_to)
                os.link(src_name, temp, src_dir_fd=src_dir, dst_dir_fd=temp_fd, follow_symlinks=False)
            elif kind == Kind.SYMLINK:
                os.symlink(target, temp, dir_fd=temp_fd)
            elif kind in (Kind.FIFO, Kind.SOCKET):
                fmt = stat.S_IFIFO if kind == Kind.FIFO else stat.S_IFSOCK
                os.mknod(temp, 0o600 | fmt, dir_fd=temp_fd)
            elif kind in (Kind.CHAR, Kind.BLOCK):
                fmt = stat.S_IFCHR if kind == Kind.CHAR else stat.S_IFBLK
                os.mknod(temp, 0o600 | fmt, rdev, dir_fd=temp_fd)
            else:
                raise ValueError(f"make_special: kind {kind}")
            try:
                self._replace(temp_fd, temp, dir_fd, name, path)
            finally:
                # rename() of a hard link over a name of the same inode does nothing: the
                # temporary name would stay behind.
                _unlink_quietly(temp_fd, temp)
        finally:
            os.close(dir_fd)

    def _replace(self, src_dir: int, temp: bytes, dir_fd: int, name: bytes, path: bytes) -> None:
        """Rename ``temp`` over ``name``; a directory in the way is removed first (a type change).

        The file replaced is freed by the reaper's thread, not by the rename (see _Reaper)."""
        replaced = _hold(dir_fd, name)
        try:
            os.rename(temp, name, src_dir_fd=src_dir, dst_dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            self._remove_entry(dir_fd, name, path, st)
            os.rename(temp, name, src_dir_fd=src_dir, dst_dir_fd=dir_fd)
        finally:
            self._reaper.release(replaced)

    def rename(self, old: bytes, new: bytes) -> bool:
        """Rename ``old`` to ``new`` inside the tree (both confined); False if ``old`` is gone."""
        old_parent, old_name = self.parent(old)
        old_dir = os.dup(old_parent)  # resolving ``new`` may close the cached descriptor
        try:
            new_dir, new_name = self.parent(new)
            try:
                os.rename(old_name, new_name, src_dir_fd=old_dir, dst_dir_fd=new_dir)
            except FileNotFoundError:
                return False
        finally:
            os.close(old_dir)
        self.forget(old)
        self.forget(new)
        return True

    def remove(self, path: bytes, keep=None) -> list[bytes]:
        """Remove ``path`` (a whole subtree for a directory, never following symlinks).

        ``keep(relative_path, is_dir)``: entries to leave in place (excluded ones), with the
        directories holding them.  Returns what was kept; raises FileNotFoundError if
        ``path`` does not exist."""
        parent, name = self.parent(path)
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        dir_fd = os.dup(parent)
        try:
            return self._remove_entry(dir_fd, name, path, st, keep)
        finally:
            os.close(dir_fd)

    def _remove_entry(self, dir_fd: int, name: bytes, path: bytes, st: os.stat_result, keep=None) -> list[bytes]:
        if not stat.S_ISDIR(st.st_mode):
            removed = _hold(dir_fd, name) if stat.S_ISREG(st.st_mode) else None
            try:
                os.unlink(name, dir_fd=dir_fd)
            finally:
                self._reaper.release(removed)
            return []
        self.forget(path)
        return remove_tree(dir_fd, name, path, keep)

    def set_attrs(self, path: bytes, kind: int, mode: int, uid: int, gid: int, mtime_ns: int,
                  owner: bool) -> None:  # fmt: skip
        """Owner (when ``owner``), permissions (not for symlinks) and mtime of ``path``."""
        if kind == Kind.DIR:
            fd = self.dir_fd(self.parts(path) if path else [])
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
            fd = os.open(name, os.O_NOFOLLOW | os.O_CLOEXEC | os.O_PATH, dir_fd=dir_fd)
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


def open_regular_at(dir_fd: int, name: bytes, path: bytes, expect: tuple[int, int] | None = None):
    """``name`` in ``dir_fd`` opened for reading if it is a regular file (see ``open_regular``)."""
    handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(handle)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{display_path(path)}: not a regular file")
        if expect is not None and (st.st_dev, st.st_ino) != expect:
            raise UnsafePathError(f"{display_path(path)}: changed since the scan")
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(handle)
    return os.fdopen(fd, "rb", buffering=0)


def remove_tree(parent_fd: int, name: bytes, path: bytes, keep=None) -> list[bytes]:
    """Remove directory ``name`` (in ``parent_fd``) and all below it, through descriptors, never
    following a symlink, without recursion (any depth).  Entries for which
    ``keep(relative_path, is_dir)`` is true stay, and so do the directories above them."""
    kept: list[bytes] = []
    top = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    # Frames: [descriptor, relative path, names still to look at, something kept below]
    stack = [[top, path, [os.fsencode(n) for n in os.listdir(top)], False]]
    try:
        while stack:
            frame = stack[-1]
            fd, rel, names = frame[0], frame[1], frame[2]
            if names:
                child = names.pop()
                child_rel = rel + b"/" + child
                try:
                    st = os.stat(child, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                if keep is not None and keep(child_rel, is_dir):
                    kept.append(child_rel)
                    frame[3] = True
                    continue
                if is_dir:
                    child_fd = os.open(child, _DIR_FLAGS, dir_fd=fd)
                    stack.append([child_fd, child_rel, [os.fsencode(n) for n in os.listdir(child_fd)], False])
                else:
                    os.unlink(child, dir_fd=fd)
                continue
            stack.pop()
            os.close(fd)
            if frame[3]:
                if stack:
                    stack[-1][3] = True
                continue
            os.rmdir(rel.rpartition(b"/")[2] if stack else name, dir_fd=stack[-1][0] if stack else parent_fd)
    finally:
        for frame in stack:
            os.close(frame[0])
    return kept


def mount_id(fd: int) -> int:
    """The mount a descriptor is on (rename() works only within one mount, bind mounts of
    one filesystem included, which share their st_dev)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return os.fstat(fd).st_dev


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
        # A temporary file beside its target is reached through our own descriptor: the
        # tree's cached one may be closed (and its number reused) before the commit.
        self.temp_dir_fd = self.dir_fd if temp_dir_fd == dir_fd else temp_dir_fd
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

    def start_writeback(self) -> None:
        """Start writing the data to disk now, without waiting: the batch's fsync then finds it
        mostly written, and the disk works while the next files arrive.  (On Linux,
        POSIX_FADV_DONTNEED starts writeback of dirty pages, then drops only clean ones.)"""
        try:
            os.posix_fadvise(self.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # only an optimisation: the fsync before the rename is what guarantees

    def commit(self) -> None:
        """Rename into place (over a file or symlink; a directory in the way is removed)."""
        self.file.close()
        self.tree._replace(self.temp_dir_fd, self.temp, self.dir_fd, self.name, self.path)
        self.done = True

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


def _hold(dir_fd: int, name: bytes) -> int | None:
    """A reference to the file at ``name`` (``O_PATH``: nothing is opened for reading and a
    FIFO cannot block), or None if there is none."""
    try:
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None


class _Reaper:
    """Frees replaced and removed files in a thread of its own.

    Renaming over a file's last link frees its inode and blocks inside the rename: about
    100 us for a 100 KB file on ext4, nearly all of a rename's cost.  A tree holds a
    reference (``_hold``) across the rename or unlink, then hands it here; the last close,
    in this thread, does the freeing, beside the receiver's next work.  Nothing durable
    depends on it: a crash leaves the inode on the filesystem's orphan list, which the
    next mount frees.  ``stop`` waits until all is freed."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._released = 0
        self._thread: threading.Thread | None = None

    def release(self, fd: int | None) -> None:
        if fd is None:
            return
        self._released += 1
        # A live session's one or two files are not worth a thread; a bounded backlog
        # keeps descriptors from piling up if the reaper falls behind.
        if self._released <= _REAPER_INLINE or self._queue.qsize() >= _REAPER_BACKLOG:
            os.close(fd)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
            self._thread.start()
        self._queue.put(fd)

    def _run(self) -> None:
        while (fd := self._queue.get()) is not None:
            os.close(fd)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


def _unlink_quietly(dir_fd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def fsync_all(fds: list[int], nbytes: int = 0) -> dict[int, OSError]:
    """Make what the descriptors refer to durable (data and metadata, like fsync on each);
    ``nbytes``: how much data they hold, if known.  Returns those that could not be made
    durable, each with its error.  What they hold must be written again, never fsynced again:
    after a failed fsync the kernel may call the lost pages written, and a second fsync then
    succeeds without them.

    A few are fsynced in parallel, so the filesystem folds them into few journal commits.
    From ``SYNCFS_FROM`` on, one ``syncfs`` per filesystem does it instead: one writeback
    pass and one journal commit for the whole batch, where many small files' fsyncs cost a
    commit round each.  But syncfs writes back every dirty page of the file system, other
    processes' too: it is used only while the machine's dirty data beyond the batch's own is
    small (``SYNCFS_OTHERS_MAX``), so a busy server never waits for someone else's writes.
    syncfs reports writeback errors since Linux 5.8 (errors since the descriptor was opened),
    not whose: a failed syncfs fails every descriptor on its filesystem."""
    failed: dict[int, OSError] = {}
    if len(fds) >= SYNCFS_FROM and dirty_bytes() <= nbytes + SYNCFS_OTHERS_MAX:
        by_fs: dict[int, list[int]] = {}
        for fd in fds:
            by_fs.setdefault(os.fstat(fd).st_dev, []).append(fd)
        for same_fs in by_fs.values():
            try:
                syncfs(same_fs[0])
            except OSError as exc:
                failed.update(dict.fromkeys(same_fs, exc))
        return failed
    if len(fds) <= 2:
        for fd in fds:
            _fsync(fd, failed)
        return failed
    pending = iter(fds)  # a list iterator hands each item to exactly one thread

    def work() -> None:
        for fd in pending:
            _fsync(fd, failed)

    workers = [threading.Thread(target=work, name="fsync", daemon=True) for _ in range(min(_FSYNC_THREADS, len(fds)))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return failed


def _fsync(fd: int, failed: dict[int, OSError]) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        failed[fd] = OSError(exc.errno, f"fsync: {exc.strerror}")


def dirty_bytes() -> int:
    """The machine's page cache waiting to be written or being written (``/proc/meminfo``)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return 1 << 62  # unknown: assume the worst
    return sum(int(line.split()[1]) << 10 for line in lines if line.startswith((b"Dirty:", b"Writeback:")))


@functools.cache
def _libc():
    """The C library, for the calls Python has no binding for (loaded at the first one)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syncfs.argtypes = (ctypes.c_int,)
    libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return libc


def _libc_error(call: str) -> OSError:
    import ctypes

    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# The local file systems whose behaviour the engine relies on, by statfs magic: ext4, xfs,
# btrfs, tmpfs.  ``exchange`` is carried out as asked there (a FUSE file system may report a
# plain rename as a swap).
KNOWN_LOCAL_FILE_SYSTEMS = frozenset({0xEF53, 0x58465342, 0x9123683E, 0x01021994})


def exchange(a: bytes, b: bytes) -> None:
    """Swap the files named ``a`` and ``b`` in one step (``renameat2`` RENAME_EXCHANGE): each
    name shows the other's content at once, and no block is allocated.  OSError EINVAL where
    the file system cannot (NFS, vfat), ENOENT when either is missing."""
    if _libc().renameat2(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE) != 0:
        raise _libc_error("renameat2")


def syncfs(fd: int) -> None:
    """``syncfs(2)``: flush the whole filesystem holding ``fd`` (Python has no binding)."""
    if _libc().syncfs(fd) != 0:
        raise _libc_error("syncfs")


# A file's times come from the kernel's coarse clock, one tick (1-10 ms) at a time: two writes
# within one tick leave the same mtime and ctime, so a copy made in that tick cannot be told
# from a whole one by its times.  A file changed less than this long ago is let settle first,
# unless its file system gives a change right after a stat a finer time (Linux's multigrain
# timestamps): there any change after the stat before a read shows.  A file system that keeps
# whole seconds (ext4 with 128-byte inodes, ext3, HFS+) shows it in every ctime: there a file
# settles for a second.
SETTLE_NS = 10_000_000
WHOLE_SECOND = 1_000_000_000
SETTLE_TRIES = 3
PROBE_ROUNDS = 16
CLOCK_REALTIME_COARSE = 5  # Linux's clock id: the clock a file's times are taken from
# The file systems that may have multigrain times, by statfs magic: ext4, xfs, btrfs, tmpfs.
# Only local ones: a network file system's times are its server's, and its client may
# answer a stat from its cache, which tells the server nothing.
MULTIGRAIN_CANDIDATES = KNOWN_LOCAL_FILE_SYSTEMS


def fs_magic(fd: int) -> int:
    """``fstatfs(fd).f_type``: which kind of file system holds ``fd`` (Python has no binding)."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes; f_type comes first
    if _libc().fstatfs(fd, buf) != 0:
        raise _libc_error("fstatfs")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def fine_ctime_device(directory: bytes) -> int | None:
    """The device of ``directory``'s file system if there a change right after a stat always
    moves a file's ctime; None if not, or if it cannot be told (``directory`` not writable,
    a file system not in ``MULTIGRAIN_CANDIDATES``).
    Measured on an unnamed file (``O_TMPFILE``: nothing appears, nothing is left behind), in
    rounds of stat, one-byte write, stat: each round must be shorter than a quarter of the
    clock's tick (a slower one may straddle a tick and proves nothing)."""
    try:
        tick = int(time.clock_getres(CLOCK_REALTIME_COARSE) * 1e9)
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        if fs_magic(fd) not in MULTIGRAIN_CANDIDATES:
            return None
        fast = 0
        for _ in range(4 * PROBE_ROUNDS):
            start = time.monotonic_ns()
            before = os.fstat(fd).st_ctime_ns
            os.write(fd, b"\0")
            after = os.fstat(fd)
            if time.monotonic_ns() - start > tick // 4:
                continue
            if after.st_ctime_ns == before:
                return None
            fast += 1
            if fast == PROBE_ROUNDS:
                return after.st_dev
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


def settle_ns(st: os.stat_result, fine_device: int | None = None) -> int:
    """How long after its last change the file ``st`` is let settle before it is read: none on
    ``fine_device`` (``fine_ctime_device``), a second where its ctime is a whole second (a
    ns-grained one is so once in a billion: that file waits a second for nothing)."""
    if st.st_dev == fine_device:
        return 0
    return WHOLE_SECOND if st.st_ctime_ns % WHOLE_SECOND == 0 else SETTLE_NS


def settled_stat(fd: int, fine_device: int | None = None) -> os.stat_result | None:
    """``fstat(fd)`` once any change from now on moves the file's times (``settle_ns``); None
    if it kept changing (it is being written).  Times come from the coarse clock, so it is
    the clock that must have moved past them (the precise one runs up to a tick ahead)."""
    st = os.fstat(fd)
    changes = 0
    while True:
        grain = settle_ns(st, fine_device)
        now = time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
        wait = st.st_ctime_ns + grain - now
        if wait <= 0:
            return st
        # A ctime ahead of the clock (the clock was set back) is waited for a grain at most:
        # a change after that gets an earlier time, another one all the same.
        ahead = st.st_ctime_ns > now
        time.sleep(min(wait, grain) / 1e9)
        again = os.fstat(fd)
        if (again.st_ctime_ns, again.st_mtime_ns, again.st_size) != (st.st_ctime_ns, st.st_mtime_ns, st.st_size):
            changes += 1
            if changes >= SETTLE_TRIES:
                return None
        elif ahead:
            return again
        st = again
