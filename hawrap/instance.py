"""One hawrap per node: an exclusive lock in the node's state dir.

A second ``hawrap run`` by mistake would otherwise begin with the supervisor's cleanup and
drop the VIP the running instance holds.  The lock is an ``flock`` on
``<state dir>/hawrap.pid`` (released by the kernel when the holder dies, however it dies);
the file says which pid holds it.
"""

from __future__ import annotations

import fcntl
import os

from .errors import HawrapError

LOCK_NAME = "hawrap.pid"


class AlreadyRunning(HawrapError):
    """Another hawrap instance runs for this node."""


def acquire(state_dir: str) -> int:
    """Take the instance lock; return its fd (keep it open).  AlreadyRunning if held."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"hawrap already runs for this node (pid {holder}, lock {path})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def held(state_dir: str) -> bool:
    """True if some process holds the instance lock (without taking it)."""
    try:
        fd = acquire(state_dir)
    except AlreadyRunning:
        return True
    os.close(fd)
    return False
