"""Where a tree keeps its own state: digest cache (manifest), epoch, journal, identity.

By default that is ``<root>/.mirror/``; every scan of the tree leaves it out, so the state
of a tree is never mirrored as if it were content.  ``--state-dir`` moves it elsewhere (a
read-only tree, or a tree whose root must stay untouched).

Leaving a directory out of every scan would hide a user's own ``.mirror`` directory: it
would be neither mirrored nor reported, and ``mirror diff`` would call two trees identical.
So hamirror's state dir carries a marker file (``MARKER``), and a ``.mirror`` at a tree's
root is left out only when it is hamirror's: marked, or (a state dir made before the marker
existed) holding nothing but the names hamirror writes, in which case it is marked now.
Anything else is refused with an error naming it (``check_root``), by every command that
reads or writes a tree.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
from contextlib import contextmanager

from .atomicfile import make_dirs
from .errors import MirrorError, StateDirError, display_path, fs_path

STATE_DIR_NAME = b".mirror"
MARKER = b"HAMIRROR-STATE"
STATUS_FILE = b"mirror-daemon.status.json"  # the daemon's status, in its status dir (the state dir by default)
_MARKER_TEXT = (
    b"This directory is hamirror's state for the tree it lies in: digest cache, epoch, change\n"
    b"journal, tree identity, temporary files of files being received.  hamirror never mirrors\n"
    b"it.  Remove it only while no mirror command runs on this tree (it is rebuilt, but the\n"
    b"epoch and the tree identity that guard the replica are lost with it).\n"
)
# What hamirror writes in a state dir (a state dir holding only these is recognised as one).
_KNOWN = frozenset({
    MARKER, b"epoch", b"epoch.lock", b"writer.lock", b"tmp", b"mirror-daemon.status.json", b"tree-identity",
    b"applied", b"applied.lock", b".mirror-daemon.status.json.spare",
})  # fmt: skip
_KNOWN_PATTERN = re.compile(
    rb"\A(journal-[0-9a-f]{1,16}|replica-disk-[0-9a-f]{16}|digests-[0-9a-f]{1,16}\.manifest|\..{1,210}\.[0-9a-f]{12}\.tmp)\Z", re.DOTALL
)


def default_state_dir(root: bytes | str) -> bytes:
    return os.path.join(fs_path(root), STATE_DIR_NAME)


def resolve_state_dir(root: bytes | str, state_dir: bytes | str | None) -> bytes:
    """The state dir for ``root``: the explicit one if given, else ``<root>/.mirror``."""
    return fs_path(state_dir) if state_dir is not None else default_state_dir(root)


def state_dir_below(root: bytes, state_dir: bytes) -> bytes | None:
    """Where ``state_dir`` lies below ``root``: its path relative to it (``b"."``: the root
    itself), None if it lies apart.  Both are resolved (an lstat per component: callers on a
    live session's path keep the answer)."""
    inside = os.path.relpath(os.path.realpath(state_dir), os.path.realpath(root))
    return None if inside == b".." or inside.startswith(b"../") else inside


def ensure_state_dir(path: bytes) -> bytes:
    """Create the state dir if needed (with its marker).  Creating ``<root>/.mirror`` would bump
    the root's mtime and make the tree look modified to the next comparison, so the parent's
    times are put back."""
    path = fs_path(path)
    if os.path.islink(path):
        raise MirrorError(f"{display_path(path)}: the state dir is a symlink; refusing to follow it")
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    try:
        before = os.stat(parent)
    except OSError:
        before = None
    make_dirs(os.path.abspath(path), 0o700)
    _mark(path)
    if before is not None:
        try:
            os.utime(parent, ns=(before.st_atime_ns, before.st_mtime_ns))
        except OSError:
            pass  # not ours to change (another owner): the cost is one reported mtime difference
    return path


def read_state_file(path: bytes, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of a small state file, None if it does not exist.  It is never
    followed through a symlink nor waited on (a FIFO planted in its place); other errors are
    the caller's to name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


@contextmanager
def state_lock(state_dir: bytes | str, name: bytes):
    """Hold the advisory lock ``name`` in the state dir (made if needed): one writer of a
    state file at a time, so a read-check-write never goes back."""
    directory = ensure_state_dir(fs_path(state_dir))
    fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _mark(path: bytes) -> bool:
    try:
        fd = os.open(os.path.join(path, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)  # fmt: skip
    except FileExistsError:
        return True
    except OSError:
        return False  # a read-only tree: recognised all the same
    try:
        written = os.write(fd, _MARKER_TEXT)
    except OSError:
        written = 0
    finally:
        os.close(fd)
    if written != len(_MARKER_TEXT):
        # A full disk: no torn marker is left (the state dir is recognised by what it holds
        # meanwhile, and marked by the next command that can).
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(path, MARKER))
        return False
    return True


def is_known_name(name: bytes) -> bool:
    """Whether ``name`` is something hamirror writes in a state dir."""
    return name in _KNOWN or _KNOWN_PATTERN.match(name) is not None


def check_state_dir(path: bytes, what: str = "") -> None:
    """Raise ``StateDirError`` unless ``path`` (a directory inside a tree, which every scan
    leaves out) is absent or hamirror's own.  An unmarked one holding only hamirror's names
    is marked on the way."""
    path = fs_path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateDirError(
            f"{display_path(path)}: cannot check it is hamirror's state dir: {exc.strerror}"
        ) from None
    where = what or display_path(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(
            f"{where} is not hamirror's state dir but a {_kind(st.st_mode)}: hamirror keeps its state there and never "
            "mirrors it, so it would be left out silently; rename it (or move it elsewhere) to mirror this tree"
        )
    try:
        os.lstat(os.path.join(path, MARKER))
        return
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOTDIR:
            raise StateDirError(f"{where}: cannot check it is hamirror's state dir: {exc.strerror}") from None
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise StateDirError(f"{where}: cannot check it is hamirror's state dir: {exc.strerror}") from None
    foreign = sorted(n for n in names if not is_known_name(n))
    if foreign:
        shown = ", ".join(repr(display_path(n)) for n in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise StateDirError(
            f"{where} is not hamirror's state dir (it holds {shown}): hamirror keeps its state there and never "
            "mirrors it, so these files would be left out silently; rename it (or move it elsewhere) to mirror "
            "this tree"
        )
    _mark(path)  # hamirror's, from before the marker: recognised by what it holds


def check_root(root: bytes | str) -> None:
    """A tree's ``.mirror`` must be hamirror's state dir, or absent (see the module docstring)."""
    check_state_dir(default_state_dir(root))


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return "special file"
