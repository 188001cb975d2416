"""One writer per replica: an exclusive ``flock`` on the replica's root directory, and one on
``<state dir>/writer.lock``, which records who holds it.

A receiver takes it before its first write and holds it for the rest of its connection.
The lock dies with the process holding it, so a crashed sync never blocks the next one.

A writer of this process whose sender's epoch is below the replica's is already fenced: it
can commit nothing more (``apply.SessionFence``) and no new session of it is admitted.  A
sender at the replica's epoch does not wait for its connection to time out (minutes in a
session), which would keep the new primary's changes from this replica meanwhile: the
fenced writer's connection is hung up on (``hang_up``) and the lock passed on.  Its sender
is a former primary, frozen or cut off in the middle of a session or idle between two.  A
sender's claim of a newer epoch alone hangs up on nobody: the replica must hold it first
(its node follows the new primary, or an earlier session recorded it).

The root's lock is the one that holds when the state dir is removed under a writer (a
clean-up script, a restore): the file it held locked is then unlinked, and a second writer
would make a new one and take it.  ``writer.lock`` alone is still honoured (an older
hamirror locks only it), and names the holder for the refusal message.  A file system
that cannot lock a directory (some network ones), or a root its writer cannot open for
reading, has the file's lock only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
import time

from .errors import MirrorError, display_path
from .statedir import ensure_state_dir

LOCK_NAME = b"writer.lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN)
# How long a newer sender waits for the stale writer it hung up on to let go (it drops
# what it had not yet renamed into place, or ends the batch it was renaming).
HANG_UP_WAIT = 10.0

log = logging.getLogger(__name__)
_held: dict[bytes, WriterLock] = {}  # writer.lock path -> this process's holder
_held_lock = threading.Lock()


class WriterLock:
    def __init__(self, state_dir: bytes, root: bytes, who: str):
        self.path = os.path.join(state_dir, LOCK_NAME)
        self.root = root
        self.who = who
        self.fd: int | None = None
        self.root_fd: int | None = None
        self.epoch: int | None = None  # the epoch of the sender whose sessions hold it
        self.hang_up = None  # ends the holder's connection (a newer sender takes its place)
        self._released = threading.Event()

    @classmethod
    def take(cls, state_dir: bytes, root: bytes, who: str, what: str, *, epoch: int | None = None,
             replica_epoch: int | None = None, hang_up=None) -> WriterLock:  # fmt: skip
        """The lock on the replica ``root`` whose state dir is ``state_dir`` (made if
        needed), or a clear refusal naming its holder.  A holder in this process fenced off
        (its sender's epoch below ``replica_epoch``, the replica's) is hung up on first.
        ``epoch`` and ``hang_up`` are this taker's: its sender's epoch, and what ends its
        connection."""
        lock = cls(ensure_state_dir(state_dir), os.fsencode(root), who)
        holder = lock.acquire()
        if holder is not None and replica_epoch is not None and _hang_up_fenced(lock.path, replica_epoch, who):
            holder = lock.acquire()
        if holder is not None:
            raise MirrorError(f"{what} is busy: another sync is writing to it ({holder})")
        lock.epoch, lock.hang_up = epoch, hang_up
        with _held_lock:
            _held[lock.path] = lock
        return lock

    def acquire(self) -> str | None:
        """Take the lock: None, or (when another process holds it) what its file says."""
        root_fd = _lock_directory(self.root)
        if root_fd == -1:
            return self._holder() or "unknown holder: its writer.lock was removed"
        fd: int | str | None = None
        try:
            fd = self._lock_file()
        finally:
            if not isinstance(fd, int) and root_fd is not None:
                os.close(root_fd)  # refused, or failed
        if isinstance(fd, str):
            return fd
        with contextlib.suppress(OSError):  # a full disk: the lock is held all the same, its holder unnamed
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} for {self.who} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        self.fd, self.root_fd = fd, root_fd
        return None

    def _lock_file(self) -> int | str:
        """``writer.lock`` open and locked, or what its holder wrote.  Locked only while it
        is still the file at its path: one unlinked between the open and the lock (its
        holder's state dir removed) is opened again."""
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY, 0o600)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise MirrorError(f"{display_path(self.path)}: not a regular file")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in _BUSY:
                        raise
                    holder = _holder_line(fd)
                    os.close(fd)
                    return holder or "unknown holder"
                if _same_file(fd, self.path):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise MirrorError(f"{display_path(self.path)}: removed again at every try to lock it")

    def _holder(self) -> str | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            return _holder_line(fd) or None
        except OSError:
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        with _held_lock:
            if _held.get(self.path) is self:
                del _held[self.path]
        for name in ("fd", "root_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        self._released.set()


def _hang_up_fenced(path: bytes, replica_epoch: int, who: str) -> bool:
    """Hang up on this process's holder of ``path`` if its sender's epoch is below
    ``replica_epoch``; whether it let go within ``HANG_UP_WAIT``."""
    with _held_lock:
        holder = _held.get(path)
    if holder is None or holder.hang_up is None or holder.epoch is None or holder.epoch >= replica_epoch:
        return False
    log.warning("%s: hung up on %s, a writer at epoch %d below the replica's %d, for %s", display_path(path),
                holder.who, holder.epoch, replica_epoch, who)  # fmt: skip
    with contextlib.suppress(OSError):
        holder.hang_up()
    return holder._released.wait(HANG_UP_WAIT)


def held_elsewhere(root: bytes) -> bool:
    """Whether a writer (another process, or another connection of this one) holds the
    replica ``root``'s lock; a probe that takes it for an instant, so only asked where a
    refusal hangs on it."""
    try:
        fd = _lock_directory(root)
    except OSError:
        return False
    if fd is None or fd == -1:
        return fd == -1
    os.close(fd)
    return False


def _lock_directory(path: bytes) -> int | None:
    """``path`` open and locked: its descriptor; -1 when another process holds it; None when
    its file system cannot lock a directory, or it cannot be opened for reading (a root
    this user may write in but not list)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _BUSY:
            return -1
        if exc.errno in (errno.ENOLCK, errno.EBADF, errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    return fd


def _holder_line(fd: int) -> str:
    """What the holder of an open ``writer.lock`` wrote in it (``acquire``)."""
    return os.pread(fd, 512, 0).decode("utf-8", "replace").strip()


def _same_file(fd: int, path: bytes) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
