"""Start-up: what the ``mirror`` command does before, and right after, its code loads.

Three tricks, each worth milliseconds on a small sync, kept in one place:

1. **An early walk.**  A local ``mirror sync`` or ``mirror diff`` spends its first tens of
   milliseconds importing (argparse, logging, the transfer code) on one CPU while the other
   idles.  ``main`` reads no more of the command line than which argument is the source,
   and starts that tree's walk (the compiled scanner's ``background_scan``, which runs
   without the interpreter lock) before the CLI loads.  ``TreeScan`` adopts it (``take``)
   for the plain whole-tree scan of the same root; anything not taken is closed
   (``discard``).  Only a source is walked early: a local replica is scanned under its
   writer lock, which is taken later.

2. **The descriptor table, grown before the threads start.**  Linux grows a process's
   table of open descriptors by doubling; while the process has more than one thread,
   each growth waits for an RCU grace period (10-16 ms each) in whichever thread opened
   the descriptor.  A sync holds up to some 1,200 descriptors at its peak (both trees'
   directory caches, a batch of files and their directories, up to 512 directories
   waiting for their fsync), so ``reserve_descriptors`` grows the table to ``TABLE_SIZE``
   while the process is still one thread.  Nothing stays open; the limit is not changed.
   Every ``mirror`` command also raises its soft limit on open files to the hard one (at
   most ``RAISED_LIMIT``: ``raise_limit``): a server's concurrent sessions, or two scans of
   a tree some 500 levels deep, need more than the common 1,024.  A library caller keeps
   its own limits.

3. **A quick exit.**  Once the output is flushed and no other thread is left to finish,
   the process leaves without the interpreter's teardown (freeing every module costs about
   7 ms).
"""

from __future__ import annotations

import os
import sys
import threading

# The options of these commands that take a value, as their argparse definitions say
# (tests/test_startup.py checks this table against them).
VALUE_OPTIONS = {
    "sync": frozenset(
        {
            "--secret-file",
            "--bwlimit",
            "--rsh",
            "--remote-command",
            "--lock-file",
            "--dst-lock-file",
            "--state-dir",
            "--exclude",
            "--exclude-from",
            "--max-delete",
            "--journal-seq",
            "-M",
            "--remote-option",
            "--timeout",
            "--contimeout",
        }
    ),  # fmt: skip
    "diff": frozenset({"--state-dir", "--exclude", "--exclude-from"}),
}


def source_argument(argv: list[str]) -> str | None:
    """The SRC of ``mirror sync|diff [options] SRC DST``, or None if anything is unclear.

    Both commands take exactly two positional arguments, so a misread option (an
    abbreviation of one that takes a value) shows as a third and nothing is guessed."""
    if not argv or argv[0] not in VALUE_OPTIONS:
        return None
    value_options = VALUE_OPTIONS[argv[0]]
    positionals = []
    args = iter(argv[1:])
    for arg in args:
        if arg == "--":
            return None
        if arg.startswith("-") and arg != "-":
            if arg in value_options:
                next(args, None)
            continue
        positionals.append(arg)
    return positionals[0] if len(positionals) == 2 else None


def main() -> None:
    argv = sys.argv[1:]
    source = source_argument(argv)
    if source is not None:
        root = os.fsencode(source)
        if os.path.isdir(root):
            # What the CLI does first for every command, done before the walk's thread
            # exists: growing the descriptor table of a threaded process waits for an RCU
            # grace period.
            raise_limit()
            reserve_descriptors()
            start_walk(root)
    try:
        from .cli import main as cli_main

        code = cli_main(argv)
    finally:
        discard_walks()
    _exit(code)


def _exit(code: int | None) -> None:
    code = code or 0
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)  # the interpreter waits for them, as it always does
    try:
        if "logging" in sys.modules:
            sys.modules["logging"].shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        sys.exit(code)  # e.g. a closed pipe: the ordinary exit reports it
    os._exit(code)


# -- 1. the early walk ------------------------------------------------------------

_walks: dict[bytes, object] = {}


def start_walk(root: bytes) -> None:
    """Start walking ``root`` (a directory) in the background, if the compiled scanner is
    there: the pure twin's walk needs the interpreter lock, and would only slow the start."""
    from .fastpath import env_flag

    if root in _walks or env_flag("MIRROR_FORCE_PURE"):
        return
    try:
        from ._fast.scan import background_scan
    except ImportError:
        return
    from .statedir import STATE_DIR_NAME

    _walks[root] = background_scan(root, skip_at_root=STATE_DIR_NAME)


def take_walk(root: bytes):
    """The walk started for ``root``, now the caller's to iterate and close; else None."""
    return _walks.pop(root, None)


def discard_walks() -> None:
    """Close the walks nobody took."""
    while _walks:
        _, walk = _walks.popitem()
        walk.close()


# -- 2. the descriptor table ------------------------------------------------------


TABLE_SIZE = 2048
RAISED_LIMIT = 1 << 16  # the soft limit a command raises itself to, if its hard limit allows


def reserve_descriptors(size: int = TABLE_SIZE) -> None:
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
