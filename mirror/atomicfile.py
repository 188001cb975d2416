"""Replace a file atomically: a reader sees the old content or the new, never a mix.

The new content goes to a temporary file in the same directory, is fsynced, renamed over
the target, and the directory is fsynced so the rename itself survives a crash.  If
anything fails, the temporary file is removed and the target is untouched; if it is the
directory's fsync, the rename is undone (the previous content, held by a second name
meanwhile, is put back): the caller is told the write failed, so the file must not show it.

A small state record (an epoch, a node's role) must be written on a full file system too,
where no new file can get a block: ``write_record`` then rewrites the old record in place,
within its first sector, a write that disks make whole or not at all (PostgreSQL keeps its
control file under 512 bytes for the same reason).  A file rewritten often and read by
others (the daemon's status) is written over a spare beside it that is then swapped with it
(``write_swapped``): it too changes on a full file system.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
import time
from typing import BinaryIO

from .errors import fs_path


def temp_name_for(name: bytes) -> bytes:
    """A hidden, unpredictable sibling name for ``name`` (a basename)."""
    return b"." + name[:200] + b"." + os.urandom(6).hex().encode() + b".tmp"


def fsync_directory(path: bytes) -> None:
    fd = os.open(path or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: bytes, mode: int = 0o777) -> None:
    """``os.makedirs(path, mode, exist_ok=True)``, each directory it makes durable: its
    parent is fsynced once it is there, so a crash cannot take away a directory that a sync
    has since called written (a new replica, its state dir)."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent in (path, b""):
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made meanwhile by someone else, who makes it durable
        try:
            fsync_directory(os.path.dirname(directory))
        except OSError as exc:  # named after the directory that may not survive a crash
            raise OSError(exc.errno, exc.strerror, directory) from None


class AtomicFile:
    """Context manager yielding a binary file; on clean exit it replaces ``path``.

    ``durable=False`` skips the fsyncs (for scratch output where a crash may lose the file
    but must still never leave it torn).
    """

    def __init__(self, path: bytes | str, mode: int = 0o644, *, durable: bool = True):
        self.path = fs_path(path)
        self.mode = mode
        self.durable = durable
        directory, name = os.path.split(self.path)
        self._directory = directory or b"."
        self._temp = os.path.join(self._directory, temp_name_for(name))
        self._file: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        try:
            fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode)
        except OSError as exc:
            raise self._named(exc) from None
        self._file = os.fdopen(fd, "wb")
        return self._file

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None
        try:
            if exc_type is None:
                self._file.flush()
                if self.durable:
                    os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.chmod(self._temp, self.mode)
                if self.durable:
                    self._replace_durably()
                else:
                    os.rename(self._temp, self.path)
        except OSError as exc:
            self.discard()
            raise self._named(exc) from None
        except BaseException:
            self.discard()
            raise
        if exc_type is not None:
            self.discard()

    def _replace_durably(self) -> None:
        """Rename the temporary file over the target and fsync the directory; if that fsync
        fails, put the previous content back (or remove the new file, if there was none)."""
        previous = os.path.join(self._directory, temp_name_for(os.path.basename(self.path)))
        try:
            os.link(self.path, previous)
            existed = kept = True
        except FileNotFoundError:
            existed = kept = False
        except OSError:  # no hard links here (e.g. vfat): if the fsync fails, the new content stays
            existed, kept = True, False
        try:
            os.rename(self._temp, self.path)
            try:
                fsync_directory(self._directory)
            except OSError:
                if kept:
                    os.rename(previous, self.path)
                    kept = False
                elif not existed:
                    os.unlink(self.path)
                raise
        finally:
            if kept:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(previous)

    def _named(self, exc: OSError) -> OSError:
        """The error named after the file being replaced (a write's or an fsync's names none,
        and the temporary file's name means nothing to the user): ``epoch: No space left``."""
        return OSError(exc.errno, exc.strerror, self.path)

    def discard(self) -> None:
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass


def atomic_write(path: bytes | str, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    with AtomicFile(path, mode, durable=durable) as f:
        f.write(data)


SECTOR = 512  # the largest write a disk makes whole or not at all


def write_record(path: bytes | str, data: bytes, mode: int = 0o644, *, filler: bytes | None = None) -> None:
    """``atomic_write`` for a small state record that must not be lost to a full file system:
    when no new file can be made (ENOSPC, EDQUOT), a record of at most ``SECTOR`` bytes is
    written over the old one's first sector and fdatasynced.  A shorter record is padded with
    ``filler`` to the old one's length (None: the format allows none, so it is not written in
    place).  Anything else fails as ``atomic_write`` does."""
    try:
        atomic_write(path, data, mode)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not _rewrite_in_place(fs_path(path), data, filler):
            raise


def _rewrite_in_place(path: bytes, data: bytes, filler: bytes | None) -> bool:
    """Whether ``data`` could replace ``path``'s content without a new block; raises if the
    write itself fails."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        # An empty file has no block to write into; past one sector the write could be torn.
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or max(st.st_size, len(data)) > SECTOR:
            return False
        if len(data) < st.st_size:
            if filler is None:
                return False
            data += filler * (st.st_size - len(data))
        try:
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(errno.EIO, "short write")
            os.fdatasync(fd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None
        return True
    finally:
        os.close(fd)


def write_swapped(path: bytes | str, data: bytes, mode: int = 0o644) -> None:
    """Replace a file rewritten often for readers (a status) so that, once it has been
    written twice, no write needs a new block: ``data`` goes over a spare file beside it
    (``.NAME.spare``), which is then swapped with it in one step (``safefs.exchange``).  A
    reader opening the file sees the old content or the new, as after a rename.  The content
    is padded with blanks to the spare's length (JSON readers skip them); a spare too short
    for it grows by half again.  Not durable: a crash may leave either content.  Only on the
    local file systems known to swap as asked (``safefs.KNOWN_LOCAL_FILE_SYSTEMS``: a FUSE file
    system may carry the swap out as a plain rename and still report it done); elsewhere,
    ``atomic_write``.

    The spare is the file as it was before the last swap: a slow reader may still hold it
    open.  It is not written over then (the reader would see the next content arrive under
    it): after a moment's wait it is set aside, left to that reader, and a new spare made
    (which needs a block).  Telling that it is held takes a lease, which only a process that
    ignores SIGIO may do (the lease's break signals its holder); otherwise it is not told."""
    from .safefs import KNOWN_LOCAL_FILE_SYSTEMS, exchange, fs_magic

    path = fs_path(path)
    directory, name = os.path.split(path)
    try:
        dir_fd = os.open(directory or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            swaps = fs_magic(dir_fd) in KNOWN_LOCAL_FILE_SYSTEMS
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    if not swaps:
        return atomic_write(path, data, mode, durable=False)
    spare = os.path.join(directory, b"." + name + b".spare")
    try:
        fd = _open_spare(spare, mode)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    try:
        size = os.fstat(fd).st_size
        if len(data) > size:
            size = len(data) + len(data) // 2
        padded = data + b" " * (size - len(data))
        if os.pwrite(fd, padded, 0) != size:
            raise OSError(errno.EIO, "short write")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(fd)
    try:
        exchange(spare, path)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(exc.errno, exc.strerror, path) from None
        os.rename(spare, path)  # the first write, or no swapping after all: no spare is kept


# How long a write waits for a reader to let go of the spare before setting it aside.
SPARE_HELD_WAIT_SECONDS = 0.1


def _open_spare(spare: bytes, mode: int) -> int:
    """The spare, open for writing, held by no reader (see ``write_swapped``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(spare, flags, mode)
    deadline = time.monotonic() + SPARE_HELD_WAIT_SECONDS
    while _held_elsewhere(fd):
        if time.monotonic() > deadline:
            os.close(fd)
            os.unlink(spare)  # the reader keeps its copy, which nothing writes again
            return os.open(spare, flags | os.O_EXCL, mode)
        time.sleep(0.002)
    return fd


def _held_elsewhere(fd: int) -> bool:
    """Whether another open file holds ``fd``'s file: a write lease, taken and let go at
    once, is refused then.  False when it cannot be told (SIGIO not ignored, leases off)."""
    if signal.getsignal(signal.SIGIO) is not signal.SIG_IGN:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError as exc:
        return exc.errno == errno.EAGAIN
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False
