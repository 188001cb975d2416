"""The mirroring lock: while its file exists, nothing is mirrored toward the other node.

The lock is a plain file so that an administrator (or the failover wrapper) can create,
inspect and remove it with ordinary tools.  Its content says who took it, when and why, as
readable JSON.  Its *existence* is what counts: a file that cannot be read or parsed still
locks (fail safe), and ``status`` says what is wrong with it.

``is_locked`` is on the hot path (checked before every batch and before every file commit),
so it is a single ``lstat``.
"""

from __future__ import annotations

import errno
import os
import time
from typing import NamedTuple

from .atomicfile import fsync_directory, temp_name_for
from .errors import LockedError, MirrorError, display_path, fs_path, os_error_message

#: A lock file larger than this is not parsed (it still locks).
MAX_LOCK_FILE_SIZE = 64 * 1024


class LockInfo(NamedTuple):
    """What a lock file says.  ``problem`` is set (and the owner fields may be None) when
    the file exists but cannot be read or parsed: it still counts as a lock."""

    path: bytes
    host: str | None
    pid: int | None
    time: float | None
    reason: str
    created: bool = False  # True only in the answer of the ``acquire`` that created it
    problem: str | None = None

    def describe(self) -> str:
        """One line for humans: who holds the lock, since when and why."""
        where = display_path(self.path)
        if self.problem:
            return f"{where}: locked (unreadable lock file: {self.problem})"
        since = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(self.time)) if self.time else "?"
        text = f"{where}: locked by {self.host} pid {self.pid} since {since}"
        return text + (f": {self.reason}" if self.reason else "")

    def as_dict(self) -> dict:
        return {
            "path": display_path(self.path),
            "locked": True,
            "host": self.host,
            "pid": self.pid,
            "time": self.time,
            "reason": self.reason,
            "created": self.created,
            "problem": self.problem,
        }


def is_locked(path: bytes | str) -> bool:
    """True if the lock file exists.  Any doubt (permission denied, I/O error) means locked."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def status(path: bytes | str) -> LockInfo | None:
    """The lock's content, or None when there is no lock."""
    path = fs_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return _garbled(path, "it is a symbolic link")
        if not is_locked(path):
            return None
        return _garbled(path, exc.strerror or str(exc))
    try:
        data = os.read(fd, MAX_LOCK_FILE_SIZE + 1)
    except OSError as exc:
        return _garbled(path, exc.strerror or str(exc))
    finally:
        os.close(fd)
    if len(data) > MAX_LOCK_FILE_SIZE:
        return _garbled(path, f"larger than {MAX_LOCK_FILE_SIZE} bytes")
    return _parse(path, data)


def acquire(path: bytes | str, reason: str = "", owner: tuple[str, int] | None = None) -> LockInfo:
    """Create the lock (atomically, complete with its content) or report the existing one.

    Idempotent: if the lock already exists it is left alone and its holder is returned
    (``created`` False).  ``owner`` is ``(host, pid)``; by default this host and process.
    """
    path = fs_path(path)
    host, pid = owner if owner is not None else (os.uname().nodename, os.getpid())
    now = time.time()
    import json  # here, not at the top: a sync that only checks for the lock never needs it

    content = json.dumps(
        {"locked_by": {"host": host, "pid": pid}, "time": now, "reason": reason}, indent=2
    ).encode() + b"\n"
    directory, name = os.path.split(path)
    directory = directory or b"."
    temp = os.path.join(directory, temp_name_for(name))
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise MirrorError(f"cannot create the lock {os_error_message(exc, path)}") from exc
    try:
        try:
            os.write(fd, content)
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise MirrorError(f"cannot create the lock {os_error_message(exc, path)}") from exc
            return _acquire_empty(path, host, pid, now, reason)
        finally:
            os.close(fd)
        # link() fails with EEXIST if the lock exists: creation is exclusive and a reader
        # never sees an empty or half-written lock file.
        try:
            os.link(temp, path)
        except FileExistsError:
            info = status(path)
            if info is None:  # released between our link() and status(): take it now
                return acquire(path, reason, (host, pid))
            return info
        except OSError as exc:
            raise MirrorError(f"cannot create the lock {os_error_message(exc, path)}") from exc
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
    try:
        fsync_directory(directory)
    except OSError as exc:  # not taken, as the error says: a crash could lose it
        os.unlink(path)
        raise MirrorError(f"cannot create the lock {os_error_message(exc, path)}") from exc
    return LockInfo(path=path, host=host, pid=pid, time=now, reason=reason, created=True)


def _acquire_empty(path: bytes, host: str, pid: int, now: float, reason: str) -> LockInfo:
    """On a file system with no block left for its content, the lock is taken as an empty
    file (an inode only): its existence is what locks, and a takeover must not fail for want
    of a line saying who took it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return status(path) or acquire(path, reason, (host, pid))
    except OSError as exc:
        raise MirrorError(f"cannot create the lock {os_error_message(exc, path)}") from exc
    os.close(fd)
    try:
        fsync_directory(os.path.dirname(path) or b".")
    except OSError as exc:  # not taken, as the error says: a crash could lose it
        os.unlink(path)
        raise MirrorError(f"cannot create the lock {os_error_message(exc, path)}") from exc
    return LockInfo(path=path, host=host, pid=pid, time=now, reason=reason, created=True,
                    problem="taken empty: its file system is full")  # fmt: skip


def release(path: bytes | str) -> bool:
    """Remove the lock.  True if a lock was removed, False if there was none."""
    path = fs_path(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except IsADirectoryError as exc:
        raise MirrorError(f"cannot release the lock: {display_path(path)} is a directory") from exc
    except OSError as exc:
        raise MirrorError(f"cannot release the lock {os_error_message(exc, path)}") from exc
    try:
        fsync_directory(os.path.dirname(path) or b".")
    except OSError as exc:
        raise MirrorError(f"released the lock, but a crash could bring it back: {os_error_message(exc, path)}") from exc
    return True


def _garbled(path: bytes, problem: str) -> LockInfo:
    return LockInfo(path=path, host=None, pid=None, time=None, reason="", problem=problem)


def _parse(path: bytes, data: bytes) -> LockInfo:
    if not data.strip():
        return _garbled(path, "the file is empty")
    import json

    try:
        doc = json.loads(data)
        owner = doc["locked_by"]
        host, pid, when = owner["host"], owner["pid"], doc["time"]
        reason = doc.get("reason", "")
        if not (
            isinstance(host, str)
            and isinstance(pid, int)
            and isinstance(when, int | float)
            and isinstance(reason, str)
        ):
            raise TypeError("unexpected field types")
    except (ValueError, KeyError, TypeError) as exc:
        return _garbled(path, f"not a lock record ({exc.__class__.__name__}: {exc})")
    return LockInfo(path=path, host=host, pid=pid, time=float(when), reason=reason)


# How often a session looks at the lock at most, unless forced (a single lstat).
LOCK_CHECK_SECONDS = 0.1


class LockWatch:
    """One mirroring lock file (and a cancel event), looked at every ``interval`` seconds at
    most unless forced: the one check every driver of a session (the sender, a local sync,
    the replica writer) makes before a change and during a long file."""

    def __init__(self, lock_file: bytes | None, where: str, *, interval: float = LOCK_CHECK_SECONDS, cancel=None):
        self.lock_file = lock_file
        self.where = where
        self.interval = interval
        self.cancel = cancel
        self._last = 0.0

    def check(self, force: bool = True) -> None:
        if self.cancel is not None and self.cancel.is_set():
            from .errors import Cancelled

            raise Cancelled("stopping: the file in flight was abandoned, finished files were kept")
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self.look()

    def look(self) -> None:
        """The check itself, whatever the interval (a subclass looks at more)."""
        if self.lock_file and is_locked(self.lock_file):
            info = status(self.lock_file)
            raise LockedError(
                f"mirroring lock {self.where}: {info.describe() if info else display_path(self.lock_file)}"
            )
