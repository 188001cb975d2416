"""One writer per replica: an exclusive ``flock`` on ``<state dir>/writer.lock``.

A receiver takes it before its first write and holds it for the rest of its connection.
The lock dies with the process holding it, so a crashed sync never blocks the next one.
The file records who holds it, for the refusal message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time

from .errors import MirrorError, display_path
from .statedir import ensure_state_dir


class WriterLock:
    def __init__(self, state_dir: bytes, who: str):
        self.path = os.path.join(state_dir, b"writer.lock")
        self.who = who
        self.fd: int | None = None

    @classmethod
    def take(cls, state_dir: bytes, who: str, what: str) -> WriterLock:
        """The lock on ``state_dir`` (created if needed), or a clear refusal naming its holder."""
        lock = cls(ensure_state_dir(state_dir), who)
        holder = lock.acquire()
        if holder is not None:
            raise MirrorError(f"{what} is busy: another sync is writing to it ({holder})")
        return lock

    def acquire(self) -> str | None:
        """Take the lock: None, or (when another process holds it) what its file says."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY, 0o600)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MirrorError(f"{display_path(self.path)}: not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            return holder or "unknown holder"
        with contextlib.suppress(OSError):  # a full disk: the lock is held all the same, its holder unnamed
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} for {self.who} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
