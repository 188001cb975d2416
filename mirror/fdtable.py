"""The process's descriptor table, grown before the threads start.

Linux grows a process's table of open descriptors by doubling (64, 256, 512, 1024, ...).
While the process has more than one thread, each growth waits for an RCU grace period in
whichever thread opened the descriptor: 10-16 ms each on the machines we measure on.  A
sync holds up to some 1,200 descriptors at its peak (the directory caches of both trees, a
batch of files and their directories, up to 512 directories waiting for their fsync once
the limit is raised), so the table is grown to ``TABLE_SIZE`` entries first, while the process is still one thread (embedded
in a threaded program: one wait, once).  Nothing stays open; the limit is not changed.

Some runs need more than the common soft limit of 1,024 lets them have: a server's
concurrent sessions hold that many each, and a scan holds a descriptor per level of the
directory it is in, so two scans of a tree some 500 levels deep run out.  Every ``mirror``
command therefore raises its soft limit on open files to the hard one (at most
``RAISED_LIMIT``), as a program that needs descriptors is expected to (the soft limit is
low only for programs still using ``select()``, which ``mirror`` does not).  A library
caller keeps its own limits.
"""

from __future__ import annotations

import os

TABLE_SIZE = 2048
RAISED_LIMIT = 1 << 16  # the soft limit a command raises itself to, if its hard limit allows


def reserve(size: int = TABLE_SIZE) -> None:
    """Grow the descriptor table to hold ``size`` descriptors (fewer if the limit is lower)."""
    import fcntl

    try:
        top = min(size, os.sysconf("SC_OPEN_MAX")) - 1
    except (OSError, ValueError):
        return
    if top < 64:
        return
    try:
        probe = os.open("/", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        # The lowest free number at or above ``top``: never one in use (dup2 would close it).
        high = fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, top)
        os.close(high)
    except OSError:
        pass  # every number up to the limit in use, or none free above ``top``: nothing to do
    finally:
        os.close(probe)


def raise_limit(cap: int = RAISED_LIMIT) -> int:
    """Raise the soft limit on open files to the hard limit (at most ``cap``); the new soft
    limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass  # not permitted here: the sessions stay within the old limit or fail cleanly
    return soft
