"""Renames seen on the source, done on the replica only where they cannot expose wrong content.

The live daemon sees ``old -> new`` renames and asks the receiver to do them first, so a
renamed entry is moved instead of sent again.  But the replica's ``old`` is whatever was
mirrored there last: an editor's ``NAME.tmp`` caught empty, just created and not yet
written, is a complete mirror of that moment, and renaming it over ``NAME`` would show an
empty ``NAME``, a version the source never had there, until the content that follows in the
session (or, after a crash, in the next one) replaces it.

So each rename carries what ``new`` must be once the rename is done: the source's entry at
the end of the rename's chain (``a -> b`` then ``b -> c``: what ``c`` is now), for a file its
size, mtime and xxh3-128 digest.  The receiver renames only when its ``old`` is exactly that
(same kind; for a file same size and mtime, then same digest); otherwise it leaves ``old``
alone and the comparison that follows sends ``new`` like any other file, written to a
temporary file and verified before it replaces anything.  A renamed directory is moved with
what it holds, and its new subtree is compared whole in the same session.

Hashing costs a read of the file on each side; both are usually in the page cache (a
rename follows the write), and it is a fraction of sending the file again.
"""

from __future__ import annotations

import logging
import os
import stat

import xxhash

from .errors import ProtocolError, UnsafePathError, display_path
from .safefs import ConfinedTree

log = logging.getLogger(__name__)

MAX_RENAMES = 100_000
_READ = 1 << 20
# What a rename's new name must be: ["f", size, mtime_ns, digest] a regular file, ["l", target]
# a symlink, ["d"] a directory.  Other kinds are sent anew (nothing to save).
FILE, SYMLINK, DIR = "f", "l", "d"


def plan(renames, tree: ConfinedTree) -> tuple[list[list], set[bytes]]:
    """The sender's side: ``(old, new)`` pairs as wire items ``[old, new, expect]``, and the
    new paths of renamed directories (to compare whole).  A rename whose outcome cannot be
    described (the name is gone again, a FIFO, a file changing while hashed) is left out:
    its entries are compared and sent like any other."""
    renames = list(renames)
    items, trees = [], set()
    for i, (old, new) in enumerate(renames):
        final = new
        for later_old, later_new in renames[i + 1 :]:
            if later_old == final:
                final = later_new
        expect = _describe(tree, final)
        if expect is None:
            continue
        items.append([old, new, expect])
        if expect[0] == DIR:
            trees.add(new)
    return items, trees


def _describe(tree: ConfinedTree, path: bytes) -> list | None:
    try:
        st = tree.lstat(path)
    except (OSError, UnsafePathError):
        return None
    if st is None:
        return None
    if stat.S_ISDIR(st.st_mode):
        return [DIR]
    if stat.S_ISLNK(st.st_mode):
        dir_fd, name = tree.parent(path)
        try:
            return [SYMLINK, os.readlink(name, dir_fd=dir_fd)]
        except OSError:
            return None
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        with tree.open_regular(path, expect=(st.st_dev, st.st_ino)) as f:
            digest = _digest(f)
            after = os.fstat(f.fileno())
    except (OSError, UnsafePathError):
        return None
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
        return None  # changed while read: its content will be sent
    return [FILE, st.st_size, st.st_mtime_ns, digest]


def _digest(f) -> bytes:
    h = xxhash.xxh3_128()
    while chunk := f.read(_READ):
        h.update(chunk)
    return h.digest()


def parse(value) -> list[tuple[bytes, bytes, list]]:
    """The receiver's side: the ``renames`` of a ``start`` message, checked."""
    from . import protocol as P  # the wire's checks; a local sync never loads them

    if not isinstance(value, list) or len(value) > MAX_RENAMES:
        raise ProtocolError("bad renames")
    out = []
    for item in value:
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[2], list) or not item[2]:
            raise ProtocolError("bad rename")
        old, new = P.want_bytes(item[0], "path", 65536), P.want_bytes(item[1], "path", 65536)
        expect = item[2]
        kind = expect[0]
        if kind == FILE and len(expect) == 4:
            P.want_int(expect[1], "size")
            P.want_int(expect[2], "mtime", -(2**63), 2**63 - 1)
            P.want_bytes(expect[3], "digest", 16)
        elif kind == SYMLINK and len(expect) == 2:
            P.want_bytes(expect[1], "symlink target", 4095)
        elif not (kind == DIR and len(expect) == 1):
            raise ProtocolError("bad rename expectation")
        out.append((old, new, expect))
    return out


def holds(tree: ConfinedTree, path: bytes, expect: list) -> bool:
    """Whether the replica's ``path`` is exactly what ``expect`` describes (never following a
    symlink; a file is read only when its size and mtime already match)."""
    st = tree.lstat(path)
    if st is None:
        return False
    kind = expect[0]
    if kind == DIR:
        return stat.S_ISDIR(st.st_mode)
    if kind == SYMLINK:
        if not stat.S_ISLNK(st.st_mode):
            return False
        dir_fd, name = tree.parent(path)
        return os.readlink(name, dir_fd=dir_fd) == expect[1]
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (expect[1], expect[2]):
        return False
    with tree.open_regular(path, expect=(st.st_dev, st.st_ino)) as f:
        return _digest(f) == expect[3]


def apply(tree: ConfinedTree, renames: list[tuple[bytes, bytes, list]]) -> int:
    """Do the renames whose old entry holds what the new name must; returns how many."""
    done = 0
    for old, new, expect in renames:
        tree.parts(old)  # refused outright if unsafe: the session ends
        tree.parts(new)
        try:
            if not holds(tree, old, expect):
                log.debug("rename %s -> %s not done: the replica's copy is not the content %s must have",
                          display_path(old), display_path(new), display_path(new))  # fmt: skip
                continue
            if tree.rename(old, new):
                done += 1
        except (OSError, UnsafePathError) as exc:
            log.info("rename %s -> %s not done here: %s", display_path(old), display_path(new), exc)
    return done
