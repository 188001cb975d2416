"""A tree's listings, one per directory, depth first: the walk over the scan kernels.

``scan(root)`` opens every directory relative to its parent's descriptor, never following a
symlink below the root, and yields one ``Listing`` per directory, depth first, entries
sorted by name (the canonical order of ``mirror.entry``).  Listing a directory, hashing its
files and comparing two listings are the kernels' work (``mirror._fast.scan``, compiled, or
its twin ``mirror.scan_py``, bound once by ``mirror.fastpath``); what is decided once per
directory (which to open, which digests the last manifest may lend) is done here, in
Python.  ``background_scan(root)`` is the plain walk (no excludes, no digests) run ahead in
a thread of its own: the compiled kernel does all of it in C without taking the GIL.

The kernel's names that callers use (``Listing``, ``compare_listings``, ``Hasher``,
``pair_walks``, ``open_failure``) and the shared constants (``mirror.constants``) are
available here too.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from types import ModuleType

from . import fastpath
from .constants import *  # noqa: F403  (CMP_*, CH_*, kinds: what callers compare with)
from .entry import canonical_key, join, too_deep

_kernel = fastpath.kernel("scan")
Listing = _kernel.Listing
Hasher = _kernel.Hasher
compare_listings = _kernel.compare_listings
list_directory = _kernel.list_directory
pair_walks = _kernel.pair_walks
open_failure = _kernel.open_failure

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Previous:
    """Walks the previous manifest's listings alongside the scan (both in canonical order)."""

    def __init__(self, listings: Iterable | None):
        self._it = iter(listings) if listings is not None else iter(())
        self._head = next(self._it, None)

    def find(self, path: bytes):
        key = canonical_key(path)
        while self._head is not None and canonical_key(self._head.path) < key:
            self._head = next(self._it, None)
        if self._head is not None and self._head.path == path:
            return self._head
        return None


def scan(
    root: bytes,
    *,
    excluder=None,
    skip_at_root: bytes | None = None,
    checksum: bool = False,
    previous: Iterable | None = None,
    racy_ns: int = 0,
    start: bytes = b"",
    kernel: ModuleType | None = None,
) -> Iterator:
    """Yield a ``Listing`` per directory under ``root`` (``root`` itself first), depth first.

    ``excluder.excluded(relative_path, is_dir)`` leaves entries (and whole subtrees) out;
    ``skip_at_root`` names one entry of the root to leave out (the state dir).  With
    ``checksum`` every regular file gets its digest, reused from ``previous`` (the tree's
    last manifest's listings) where the kernel's ``Hasher`` allows.  ``start`` scans only the
    subtree at that relative path (its listings keep paths relative to ``root``); each of
    its components is opened without following a symlink.  Raises OSError only if ``root``
    (or ``start``) cannot be opened; everything below is reported in ``Listing.problems``.
    ``kernel`` is the scan kernel module to use (default: the one ``mirror.fastpath`` bound).
    """
    k = kernel if kernel is not None else _kernel
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if start:
        try:
            for name in start.split(b"/"):
                fd = os.open(name, _DIR_FLAGS, dir_fd=root_fd)
                os.close(root_fd)
                root_fd = fd
        except OSError:
            os.close(root_fd)
            raise
        skip_at_root = None
    prev = _Previous(previous) if checksum else None
    hasher = k.Hasher() if checksum else None

    def listed(fd: int, path: bytes, skip: bytes | None):
        listing = k.list_directory(fd, path, skip=skip, excluder=excluder)
        if hasher is not None and listing.complete:
            hasher.fill_digests(fd, listing, prev.find(path), racy_ns)
        return listing

    # One frame per open directory on the current branch: (fd, relative path, subdirectory
    # names still to visit, in reverse).  Open descriptors are bounded by the tree's depth.
    stack: list[tuple[int, bytes, list[bytes]]] = [(root_fd, start, [])]
    try:
        if start and too_deep(start):
            yield k.Listing(start, complete=False, problems=[k.open_failure(start, errno.ENAMETOOLONG)])
            return
        listing = listed(root_fd, start, skip_at_root)
        stack[-1] = (root_fd, start, listing.subdirs()[::-1])
        yield listing
        while stack:
            fd, dir_path, remaining = stack[-1]
            if not remaining:
                stack.pop()
                os.close(fd)
                continue
            name = remaining.pop()
            child_path = join(dir_path, name)
            try:
                if too_deep(child_path):
                    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
                child_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                yield k.Listing(child_path, complete=False, problems=[k.open_failure(child_path, exc.errno)])
                continue
            stack.append((child_fd, child_path, []))
            listing = listed(child_fd, child_path, None)
            stack[-1] = (child_fd, child_path, listing.subdirs()[::-1])
            yield listing
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def background_scan(root: bytes, *, skip_at_root: bytes | None = None, kernel: ModuleType | None = None):
    """Start walking ``root`` now, in the background: ``scan(root, skip_at_root=...)``'s
    listings, taken later in order by iterating the result; ``close()`` it when done."""
    k = kernel if kernel is not None else _kernel
    return k.background_scan(root, skip_at_root=skip_at_root)
