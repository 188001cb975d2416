"""Where a tree keeps its own state: digest cache (manifest), epoch, journal.

By default that is ``<root>/.mirror/``; every scan of the tree leaves it out, so the state
of a tree is never mirrored as if it were content.  ``--state-dir`` moves it elsewhere (a
read-only tree, or a tree whose root must stay untouched).
"""

from __future__ import annotations

import os

from .errors import MirrorError, display_path, fs_path

STATE_DIR_NAME = b".mirror"


def default_state_dir(root: bytes | str) -> bytes:
    return os.path.join(fs_path(root), STATE_DIR_NAME)


def resolve_state_dir(root: bytes | str, state_dir: bytes | str | None) -> bytes:
    """The state dir for ``root``: the explicit one if given, else ``<root>/.mirror``."""
    return fs_path(state_dir) if state_dir is not None else default_state_dir(root)


def ensure_state_dir(path: bytes) -> bytes:
    """Create the state dir if needed.  Creating ``<root>/.mirror`` would bump the root's mtime
    and make the tree look modified to the next comparison, so the parent's times are put back."""
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
    os.makedirs(path, mode=0o700, exist_ok=True)
    if before is not None:
        try:
            os.utime(parent, ns=(before.st_atime_ns, before.st_mtime_ns))
        except OSError:
            pass  # not ours to change (another owner): the cost is one reported mtime difference
    return path
