"""The planner (rsync's generator): compared pairs in, typed operations out.

``Planner.plan(change)`` turns each ``compare.Difference`` into the operations that make
the replica's entry equal the source's, at once, as the comparison streams.  What must wait
is held back and handed out, in order, by the two closing calls:

1. content first: files (whole, or a delta against the replica's copy when both are at
   least ``delta_threshold`` bytes), directories, symlinks, special files, attributes;
   the first name of a multiply-linked file (its *leader*) gets the content;
2. ``links()``: the other names of linked files, once every leader is in place;
3. ``closing()``: deletions, after all new content (a file moved elsewhere in the tree
   arrives before its old name goes), then the times of every directory the session
   changed, last (each write inside a directory moves its mtime).

A dry run plans deletions only (the replica's deletion guard reviews them) and nothing
else.  Every ordering rule of a session is here; the writer (``mirror.apply``) carries the
operations out in the order given, locally or after a trip over the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .compare import ADDED, CONTENT, HARDLINK, METADATA, REMOVED, TARGET, TYPE, Difference
from .entry import Entry, Kind, canonical_key, join

WHOLE, DELTA, MKDIR, SYMLINK, SPECIAL, LINK, ATTRS, DELETE = (
    "whole", "delta", "mkdir", "symlink", "special", "link", "attrs", "delete",
)  # fmt: skip
_NEW_CONTENT = frozenset({ADDED, TYPE, HARDLINK, CONTENT, TARGET})


class Op(NamedTuple):
    """One operation on the replica: ``kind`` (one of the constants above), the path, the
    source's entry (its kind and attributes; None for a deletion), and for ``link`` the
    path linked to, for ``delta`` the replica's entry (the basis)."""

    kind: str
    path: bytes
    entry: Entry | None = None
    link_to: bytes | None = None
    basis: Entry | None = None


class Planner:
    """Plans one session.  ``dir_entry(path)``: the source's directory at ``path`` as it is
    now, or None (not a directory now).  It stands in for a listing of its parent that was not
    seen (a live session's partial listing), and gives the times set last: a directory's
    entry in its parent's listing predates its own listing, so a name made in it between the
    two would arrive with the times from before it, and that name's own event would later
    find nothing to change."""

    def __init__(self, *, delete: bool, dry_run: bool, delta_threshold: int,
                 dir_entry: Callable[[bytes], Entry | None] | None = None):  # fmt: skip
        self.delete = delete
        self.dry_run = dry_run
        self.delta_threshold = delta_threshold
        self._dir_entry = dir_entry
        self.other_changes = 0  # directories, symlinks, nodes, links, attributes planned
        self._dirs: dict[bytes, Entry] = {}  # source directories seen in listings
        self._touched: dict[bytes, Entry] = {}  # directories whose times are set last
        self._leaders: dict[tuple[int, int], bytes] = {}
        # Of each multiply-linked file given content or a name: (its names planned, its nlink).
        self._names: dict[tuple[int, int], tuple[int, int]] = {}
        self._links: list[Op] = []
        self._deletes: list[Op] = []
        self._gone: set[bytes] = set()  # directories deleted with their subtrees
        # Names whose replica entry was a file with other names, or a directory, that the
        # source has no more or holds something else at: a file changed through one (or below
        # one) before it went may have had other names, which changed too, unseen (the live
        # daemon, which knows what was changed, then compares the whole tree).
        self.replaced: list[bytes] = []

    def listing(self, listing) -> None:
        """A source listing about to be compared: its subdirectories' entries are what a
        change inside them restores at the end."""
        for name in listing.subdirs():
            self._dirs[join(listing.path, name)] = listing[listing.index(name)]

    def root(self, entry: Entry | None, differs: bool) -> None:
        """The source root's own entry; ``differs``: the replica's root attributes differ."""
        if entry is not None:
            self._dirs[b""] = entry
            if differs and not self.dry_run:
                self._touched[b""] = entry

    def renamed(self, old: bytes, new: bytes) -> None:
        """A rename done on the replica before the comparison: both parents changed."""
        if not self.dry_run:
            self._touch_parent(old)
            self._touch_parent(new)

    def plan(self, change: Difference) -> list[Op] | None:
        """The operations to do now for ``change`` (later ones are held back); None when
        the change is left alone (a removal without ``delete``)."""
        dst = change.dst
        if dst is not None and change.change in (REMOVED, CONTENT, TYPE) and (
            dst.kind == Kind.DIR or dst.kind == Kind.FILE and dst.nlink > 1
        ):
            self.replaced.append(change.path)
        if change.change == REMOVED:
            if not self.delete:
                return None
            if change.dst.kind == Kind.DIR:
                self._gone.add(change.path)
            if change.path.rpartition(b"/")[0] in self._gone:
                return []  # goes with its directory, and is counted with it by the deletion guard
            self._deletes.append(Op(DELETE, change.path))
            if not self.dry_run:
                self._touch_parent(change.path)
            return []
        if self.dry_run:
            return []
        self._touch_parent(change.path)
        src, path, link_to = change.src, change.path, change.link_to
        if src.kind == Kind.FILE and src.nlink > 1 and change.change != METADATA:
            key = (src.dev, src.ino)
            self._names[key] = (self._names.get(key, (0, 0))[0] + 1, src.nlink)
            if link_to is None:
                # A second name of a file whose content changed: linked to the first name
                # again (which gets the new content) rather than sent twice.
                leader = self._leaders.setdefault(key, path)
                link_to = leader if leader != path else None
        if link_to is not None and link_to != path:
            self._links.append(Op(LINK, path, src, link_to))
            self.other_changes += 1
            return []
        if change.change in _NEW_CONTENT:
            return [self._create(change)]
        if src.kind == Kind.FILE and change.dst is not None and change.dst.nlink != src.nlink:
            # The replica's file shares its inode with another name (maybe outside the tree):
            # a chmod in place would change that one too; a new copy breaks the link.
            return [Op(WHOLE, path, src)]
        self.other_changes += 1
        if src.kind == Kind.DIR:
            self._touched[path] = src
            return []
        return [Op(ATTRS, path, src)]

    def _create(self, change: Difference) -> Op:
        src, dst, path = change.src, change.dst, change.path
        if src.kind == Kind.FILE:
            threshold = self.delta_threshold
            if (change.change == CONTENT and dst is not None and dst.kind == Kind.FILE and dst.size >= threshold
                    and src.size >= threshold):  # fmt: skip
                return Op(DELTA, path, src, basis=dst)
            return Op(WHOLE, path, src)
        self.other_changes += 1
        if src.kind == Kind.DIR:
            self._touched[path] = src
            return Op(MKDIR, path, src)
        return Op(SYMLINK if src.kind == Kind.SYMLINK else SPECIAL, path, src)

    def unseen_links(self) -> int:
        """Files given new content or a new name whose other names this session did not plan
        (a scoped session sees only its own entries): their other names on the replica are
        still the old file, until a whole-tree compare links them."""
        return sum(1 for planned, nlink in self._names.values() if planned < nlink)

    def links(self) -> list[Op]:
        """Second names of linked files: after every file's content is planned."""
        return self._links

    def closing(self) -> list[Op]:
        """Deletions, then the times of every directory changed, deepest first."""
        deepest_first = sorted(self._touched, key=canonical_key, reverse=True)
        return self._deletes + [Op(ATTRS, path, self._now(path)) for path in deepest_first]

    def _now(self, path: bytes) -> Entry:
        """Directory ``path``'s entry read again, after its listing (see the class docstring);
        the one planned with if it is no longer a directory (its own event follows)."""
        entry = self._dir_entry(path) if self._dir_entry is not None else None
        return entry if entry is not None else self._touched[path]

    def _touch_parent(self, path: bytes) -> None:
        """A write in a directory moves its mtime on the replica: set it back last."""
        parent = path.rpartition(b"/")[0]
        if parent in self._touched:
            return
        entry = self._dirs.get(parent)
        if entry is None and self._dir_entry is not None:
            entry = self._dir_entry(parent)
        if entry is not None:
            self._touched[parent] = entry
