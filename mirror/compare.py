"""Compare two trees (scans or manifests) and say exactly what differs, streaming.

Both sides arrive as listings in canonical order (see ``mirror.entry``), so they are merged
directory by directory; inside a directory the compiled ``compare_listings`` merges by
name and reports only the entries that need attention.  Memory is bounded by the directory
being compared plus the multiply-linked files seen so far.

A ``Difference`` says what would have to happen to the destination to make it equal the
source: ``added``, ``removed``, ``content`` (quick check: size or mtime differ; with
``checksum``: size or digest differ), ``metadata`` (mode, owner, group, mtime only),
``type`` (a file became a directory, ...), ``target`` (a symlink points elsewhere),
``hardlink`` (the path is not in the same hard-link group on both sides).

A directory that could not be read on either side makes the comparison incomplete below it:
its subtree is skipped on both sides and the problem is reported, never guessed at.  A
source entry that could not be looked at (its ``stat`` failed: a bad sector, a flaky mount)
is not gone: it is never reported removed, so a sync never deletes its replica copy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from . import fastpath
from .entry import Entry, Kind, ScanProblem, canonical_key, join

ADDED = "added"
REMOVED = "removed"
CONTENT = "content"
METADATA = "metadata"
TYPE = "type"
TARGET = "target"
HARDLINK = "hardlink"


class CompareOptions(NamedTuple):
    checksum: bool = False
    owner: bool = True  # compare uid/gid
    dir_times: bool = True
    link_times: bool = True

    def flags(self, scan) -> int:
        return (
            (scan.CMP_CHECKSUM if self.checksum else 0)
            | (scan.CMP_OWNER if self.owner else 0)
            | (scan.CMP_DIR_TIMES if self.dir_times else 0)
            | (scan.CMP_LINK_TIMES if self.link_times else 0)
        )


class Difference(NamedTuple):
    path: bytes
    change: str
    src: Entry | None = None
    dst: Entry | None = None
    fields: frozenset[str] = frozenset()  # which attributes differ: size, mtime, digest, mode, uid, gid, ...
    link_to: bytes | None = None  # hardlink: the path it is linked to on the source


class CompareSummary:
    """Counts of changes by kind, and the problems met on either side."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.problems: list[ScanProblem] = []

    @property
    def identical(self) -> bool:
        return not self.counts

    @property
    def complete(self) -> bool:
        return not self.problems

    def count(self, change: str) -> None:
        self.counts[change] = self.counts.get(change, 0) + 1


_FIELD_NAMES = None


def _field_names(scan) -> list[tuple[int, str]]:
    global _FIELD_NAMES
    if _FIELD_NAMES is None:
        _FIELD_NAMES = [
            (scan.CH_SIZE, "size"),
            (scan.CH_MTIME, "mtime"),
            (scan.CH_DIGEST, "digest"),
            (scan.CH_NODIGEST, "digest-unknown"),
            (scan.CH_MODE, "mode"),
            (scan.CH_UID, "uid"),
            (scan.CH_GID, "gid"),
            (scan.CH_TARGET, "target"),
            (scan.CH_RDEV, "rdev"),
        ]
    return _FIELD_NAMES


class _HardLinks:
    """Tracks the first path seen of every multiply-linked inode on each side.

    Both sides are visited in the same order, so when a path is reached the first path of its
    group ("leader") is already known on both sides: the path is in the same group on both
    sides exactly when its leaders agree.
    """

    def __init__(self):
        self.src: dict[tuple[int, int], bytes] = {}
        self.dst: dict[tuple[int, int], bytes] = {}

    @staticmethod
    def _leader(table: dict, entry: Entry | None, path: bytes) -> bytes | None:
        if entry is None:
            return None
        if entry.kind != Kind.FILE or entry.nlink < 2:
            return path
        return table.setdefault((entry.dev, entry.ino), path)

    def check(self, path: bytes, src: Entry | None, dst: Entry | None) -> bytes | None:
        """The source leader ``path`` must be linked to, if the groups differ (else None)."""
        s = self._leader(self.src, src, path)
        d = self._leader(self.dst, dst, path)
        if src is None or s is None:
            return None
        if dst is None:
            return s if s != path else None
        return s if s != d else None


def _classify(scan, bits: int, checksum: bool, kind: int) -> tuple[str, frozenset[str]]:
    if bits & scan.CH_KIND:
        return TYPE, frozenset({"kind"})
    fields = frozenset(name for bit, name in _field_names(scan) if bits & bit)
    if bits & scan.CH_TARGET:
        return TARGET, fields
    if bits & (scan.CH_SIZE | scan.CH_DIGEST | scan.CH_NODIGEST | scan.CH_RDEV):
        return CONTENT, fields
    if kind == Kind.FILE and bits & scan.CH_MTIME and not checksum:
        # Quick check (rsync's rule): a file whose mtime differs is taken to have new content.
        return CONTENT, fields
    return METADATA, fields


class _Side:
    """Lookahead over one side's listings."""

    def __init__(self, listings: Iterable):
        self._it = iter(listings)
        self.head = next(self._it, None)

    def advance(self):
        current = self.head
        self.head = next(self._it, None)
        return current


def align(src_listings: Iterable, dst_listings: Iterable) -> Iterator[tuple]:
    """Pair up two listing streams by directory: ``(src, dst)``, either None if absent."""
    src, dst = _Side(src_listings), _Side(dst_listings)
    while src.head is not None or dst.head is not None:
        s_key = canonical_key(src.head.path) if src.head is not None else None
        d_key = canonical_key(dst.head.path) if dst.head is not None else None
        if d_key is None or (s_key is not None and s_key < d_key):
            yield src.advance(), None
        elif s_key is None or d_key < s_key:
            yield None, dst.advance()
        else:
            yield src.advance(), dst.advance()


def compare_trees(
    src_listings: Iterable,
    dst_listings: Iterable,
    options: CompareOptions | None = None,
    summary: CompareSummary | None = None,
    src_root_entry: Entry | None = None,
    dst_root_entry: Entry | None = None,
) -> Iterator[Difference]:
    """Yield every ``Difference`` that would make the destination equal the source, in order.

    Problems (unreadable or vanished entries, on either side) go to ``summary.problems``.
    """
    scan = fastpath.choose("scan")
    options = options if options is not None else CompareOptions()
    summary = summary if summary is not None else CompareSummary()
    if src_root_entry is not None and dst_root_entry is not None:
        ((_, _, bits),) = scan.compare_listings(
            scan.Listing(b"", [src_root_entry]), scan.Listing(b"", [dst_root_entry]), options.flags(scan)
        ) or ((0, 0, 0),)
        bits &= ~scan.CH_LINKED
        if bits:
            change, fields = _classify(scan, bits, options.checksum, Kind.DIR)
            summary.count(change)
            yield Difference(b".", change, src_root_entry, dst_root_entry, fields)
    # Two whole-tree walks pair themselves, leaving out (in compiled code) the directories
    # that are the same on both sides; anything else is aligned here.
    pairing = getattr(src_listings, "pairs_with", None)
    pairs = pairing(dst_listings, options.flags(scan)) if pairing is not None else None
    if pairs is None:
        pairs = align(src_listings, dst_listings)
    yield from compare_pairs(pairs, options, summary)


def compare_pairs(
    pairs: Iterable[tuple], options: CompareOptions, summary: CompareSummary
) -> Iterator[Difference]:
    """The changes within aligned ``(src, dst)`` listing pairs (see ``align``), in order.

    A listing that is incomplete on either side makes its whole subtree unknown: it is
    skipped on both sides (its problems are in ``summary.problems``).  So is a source entry
    that is there but could not be looked at (a ``stat`` that failed, not one that found it
    gone): it is never reported removed, nor anything below it.
    """
    scan = fastpath.choose("scan")
    flags = options.flags(scan)
    links = _HardLinks()
    skip_prefix: bytes | None = None  # canonical key prefix of an incomplete subtree
    unseen: set[bytes] = set()  # source paths that exist but could not be looked at
    for a, b in pairs:
        path = (a if a is not None else b).path
        key = canonical_key(path)
        for listing in (a, b):
            if listing is not None:
                summary.problems.extend(listing.problems)
        if a is not None:
            unseen.update(p.path for p in a.problems if p.unreadable)
        if skip_prefix is not None and key.startswith(skip_prefix):
            continue
        skip_prefix = None
        if (a is not None and not a.complete) or (b is not None and not b.complete):
            skip_prefix = key + b"\0" if path else b""  # the root's subtree is everything
            continue
        if unseen and _below(path, unseen):
            continue
        if a is not None and b is not None:
            yield from _compare_pair(scan, a, b, flags, options, summary, links, unseen)
        elif a is not None:
            for entry in a:
                path = join(a.path, entry.name)
                link_to = links.check(path, entry, None)
                summary.count(ADDED)
                yield Difference(path, ADDED, entry, None, link_to=link_to)
        else:
            for entry in b:
                path = join(b.path, entry.name)
                links.check(path, None, entry)
                summary.count(REMOVED)
                yield Difference(path, REMOVED, None, entry)


def _below(path: bytes, paths: set[bytes]) -> bool:
    """Whether ``path`` is one of ``paths`` or inside one of them."""
    while path:
        if path in paths:
            return True
        path = path.rpartition(b"/")[0]
    return False


def _compare_pair(scan, a, b, flags, options, summary, links, unseen) -> Iterator[Difference]:
    for i, j, bits in scan.compare_listings(a, b, flags):
        s = a[i] if i >= 0 else None
        d = b[j] if j >= 0 else None
        path = join(a.path, (s or d).name)
        if d is None:
            summary.count(ADDED)
            yield Difference(path, ADDED, s, None, link_to=links.check(path, s, None))
            continue
        if s is None:
            if path in unseen:
                continue  # not gone: unreadable on the source, its problem says so
            links.check(path, None, d)
            summary.count(REMOVED)
            yield Difference(path, REMOVED, None, d)
            continue
        link_to = links.check(path, s, d) if bits & scan.CH_LINKED else None
        changed = bits & ~scan.CH_LINKED
        if changed:
            change, fields = _classify(scan, changed, options.checksum, s.kind)
            summary.count(change)
            yield Difference(path, change, s, d, fields, link_to)
        elif link_to is not None:
            summary.count(HARDLINK)
            yield Difference(path, HARDLINK, s, d, frozenset({"link"}), link_to)


def root_entry(root: bytes, problems: list | None = None) -> Entry | None:
    """The root directory itself as an Entry (named ``.``), to compare its mode/owner/mtime;
    None if it cannot be stat'ed (then a problem is added to ``problems``, if given)."""
    try:
        st = os.stat(root)
    except OSError as exc:
        if problems is not None:
            problems.append(ScanProblem(b"", exc.errno, f"cannot stat: {exc.strerror}"))
        return None
    return Entry(b".", Kind.DIR, st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_size,
                 st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, st.st_nlink, 0, b"", None)  # fmt: skip
