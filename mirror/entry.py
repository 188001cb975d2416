"""What a scan records about one directory entry, and the order entries are visited in.

Both scan kernels (``mirror._fast.scan`` and its twin ``mirror.scan_py``) produce ``Entry``
tuples and ``ScanProblem`` records defined here, so their output compares equal.

Canonical order: a directory's entries are sorted by name bytes; directories are visited
depth first in that order.  For whole relative paths this is the order of
``canonical_key(path)`` (``/`` mapped to NUL, which sorts before every byte a name can hold),
which is what lets two scans, or a scan and a saved manifest, be merged in one pass with
memory bounded by the directory being looked at rather than by the tree.
"""

from __future__ import annotations

import errno
import os
import stat
from enum import IntEnum
from typing import NamedTuple

from . import constants
from .constants import DIGEST_SIZE, LISTED_DEPTH_MAX, LISTED_PATH_MAX, MAX_NAME, MAX_TARGET  # noqa: F401  (re-exported)


class Kind(IntEnum):
    FILE = constants.FILE
    DIR = constants.DIR
    SYMLINK = constants.SYMLINK
    FIFO = constants.FIFO
    SOCKET = constants.SOCKET
    CHAR = constants.CHAR
    BLOCK = constants.BLOCK


KIND_OF_FMT = {
    stat.S_IFREG: Kind.FILE,
    stat.S_IFDIR: Kind.DIR,
    stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFIFO: Kind.FIFO,
    stat.S_IFSOCK: Kind.SOCKET,
    stat.S_IFCHR: Kind.CHAR,
    stat.S_IFBLK: Kind.BLOCK,
}

# One letter per kind, as ``rsync -i`` and ``find -printf %y`` use them.
KIND_LETTER = {
    Kind.FILE: "f",
    Kind.DIR: "d",
    Kind.SYMLINK: "L",
    Kind.FIFO: "S",
    Kind.SOCKET: "S",
    Kind.CHAR: "D",
    Kind.BLOCK: "D",
}


class Entry(NamedTuple):
    """One directory entry.  ``mode`` holds the permission bits (``st_mode & 0o7777``).

    ``size`` is meaningful for files and symlinks (the target's length); ``target`` is the
    symlink's target (else ``b""``); ``rdev`` the device number of device nodes (else 0);
    ``digest`` the xxh3-128 of a regular file's content when known (else ``None``).
    """

    name: bytes
    kind: Kind
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    nlink: int
    rdev: int
    target: bytes
    digest: bytes | None


class ScanProblem(NamedTuple):
    """An entry the scan could not record fully: unreadable, vanished or changed under it.

    ``path`` is relative to the scanned root; ``errno`` is 0 for problems that are not a
    failed system call (a file that changed while it was hashed).
    """

    path: bytes
    errno: int
    message: str

    @property
    def unreadable(self) -> bool:
        """The entry is there but could not be read (EIO, ...): not one that vanished or
        changed under the scan, which the next look (or an inotify event) settles."""
        return self.errno not in (0, errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def join(dir_path: bytes, name: bytes) -> bytes:
    """Relative path of ``name`` inside the directory at relative path ``dir_path``."""
    return dir_path + b"/" + name if dir_path else name


def too_deep(path: bytes) -> bool:
    """Whether a scan leaves directory ``path`` unlisted (``constants.LISTED_*``): it is
    reported like one that cannot be opened (``ENAMETOOLONG``), incomplete, so nothing below
    it is deleted on the other side."""
    return len(path) > LISTED_PATH_MAX or path.count(b"/") >= LISTED_DEPTH_MAX


def canonical_key(path: bytes) -> bytes:
    """Sort key under which depth-first, name-sorted visiting order is plain byte order."""
    return path.replace(b"/", b"\0")


def entry_from_stat(name: bytes, st: os.stat_result, target: bytes) -> Entry:
    """The Entry for ``name`` from its lstat result (and symlink target); its kind must be
    one of ``KIND_OF_FMT``'s."""
    kind = KIND_OF_FMT[stat.S_IFMT(st.st_mode)]
    rdev = st.st_rdev if kind in (Kind.CHAR, Kind.BLOCK) else 0
    return Entry(
        name, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size,
        st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, st.st_nlink, rdev, target, None,
    )  # fmt: skip


def stat_attrs(st: os.stat_result) -> list:
    """An entry's attributes as a session carries them: ``[mode, uid, gid, mtime_ns]``."""
    return [stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns]


def entry_attrs(entry: Entry) -> list:
    return [entry.mode, entry.uid, entry.gid, entry.mtime_ns]
