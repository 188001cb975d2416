"""Pure-Python twin of the scan kernels ``mirror._fast.scan``: their readable specification.

The compiled module must behave exactly like this one (same listings, entries, digests,
problems and comparison results); ``tests/test_scan_equivalence.py`` checks it with
hypothesis on generated trees.  See ``mirror.entry`` for the data model and the order, and
``mirror.scan`` for the walk that uses these kernels.

* ``list_directory(dir_fd, dir_path, skip=, excluder=)``: one directory's ``Listing``,
  entries sorted by name, each ``lstat``-ed (symlinks read); what could not be recorded is
  in ``Listing.problems``.
* ``Hasher().fill_digests(dir_fd, listing, previous, racy_ns)``: the xxh3-128 digest of
  every regular file of a listing, reusing the digest recorded in ``previous`` (the same
  directory in the tree's last manifest) while size, mtime_ns, ctime_ns and inode are
  unchanged and the file's mtime is older than ``racy_ns`` (a file modified within the
  timestamp granularity of the previous scan could have changed again without its mtime
  moving: it is hashed again).
* ``compare_listings(src, dst, flags)``: two listings of one directory merged by name.
* ``pair_walks(src_walk, dst_walk, flags)``: two background walks' listings paired by
  directory, the identical pairs compared and dropped (the compiled one never makes
  Listings for them).
* ``background_scan(root, skip_at_root=)``: ``mirror.scan.scan(root, skip_at_root=...)``'s
  listings, walked in a thread of its own started at once (the compiled one walks in C
  threads that never take the interpreter lock, more of them while the disk is read).
"""

from __future__ import annotations

import errno as errno_mod
import os
import queue
import stat
import struct
import threading
from bisect import bisect_left
from collections.abc import Iterator

import xxhash

from .constants import (
    BLOCK,
    CH_DIGEST,
    CH_GID,
    CH_KIND,
    CH_LINKED,
    CH_MODE,
    CH_MTIME,
    CH_NODIGEST,
    CH_RDEV,
    CH_SIZE,
    CH_TARGET,
    CH_UID,
    CHAR,
    CMP_CHECKSUM,
    CMP_DIR_TIMES,
    CMP_LINK_TIMES,
    CMP_OWNER,
    DIGEST_SIZE,
    DIR,
    FIFO,
    FILE,
    FLAG_DIGEST,
    HASH_CHUNK,
    MAX_NAME,
    MAX_TARGET,
    RECORD_SIZE,
    SOCKET,
    SYMLINK,
)
from .entry import KIND_OF_FMT, Entry, ScanProblem, entry_from_stat

# Listing.pack() record layout, little-endian (pinned by a golden test).
RECORD = struct.Struct("<qqqQQQIIIIIHBBII")
assert RECORD.size == RECORD_SIZE
_FINGERPRINT = struct.Struct("<H")
_FINGERPRINT_FIELDS = struct.Struct("<BIIIqqQI")


class Listing:
    """The entries of one directory, sorted by name.

    ``path`` is the directory's path relative to the scanned root (``b""`` for the root).
    ``complete`` is False when the directory could not be read: its entries are unknown.
    ``problems`` lists what could not be recorded (see ``ScanProblem``).
    """

    __slots__ = ("path", "complete", "problems", "hashed", "_entries", "_names")

    def __init__(self, path: bytes, entries: list | None = None, complete: bool = True, problems=None):
        self.path = path
        self.complete = complete
        self.hashed = 0  # files read and hashed by this scan (not taken from the cache)
        self.problems = list(problems or [])
        self._entries = list(entries or [])
        self._names = [e.name for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> Entry:
        if not -len(self._entries) <= i < len(self._entries):
            raise IndexError("listing index out of range")
        return self._entries[i]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries)

    def __repr__(self) -> str:
        return f"Listing({self.path!r}, {len(self)} entries, complete={self.complete})"

    def index(self, name: bytes) -> int:
        """Position of ``name`` in this listing, or -1."""
        i = bisect_left(self._names, name)
        return i if i < len(self._names) and self._names[i] == name else -1

    def subdirs(self) -> list[bytes]:
        """Names of the directories in this listing, in order."""
        return [e.name for e in self._entries if e.kind == DIR]

    def totals(self) -> tuple[list[int], int, int]:
        """``(count per kind (index = kind, 0 unused), bytes in regular files, digests held)``."""
        counts = [0] * 8
        file_bytes = digests = 0
        for e in self._entries:
            counts[e.kind] += 1
            if e.kind == FILE:
                file_bytes += e.size
            if e.digest is not None:
                digests += 1
        return counts, file_bytes, digests

    def fingerprint(self, flags: int) -> bytes:
        """xxh3-128 of exactly what ``compare_listings`` looks at under ``flags``.

        Two listings with equal fingerprints compare as unchanged, so a receiver can send
        16 bytes per directory instead of its listing (the sync protocol's summary).  Per
        entry, little-endian: u16 name length, name, u8 kind, u32 mode (0 for a symlink),
        u32 uid, u32 gid (0 unless CMP_OWNER), i64 size (files only), i64 mtime_ns (0 where
        it is not compared), u64 rdev (devices only), u32 target length, target, u8 has
        digest, 16 bytes digest (CMP_CHECKSUM and a file with a digest, else zeros).
        """
        h = xxhash.xxh3_128()
        for e in self._entries:
            kind = e.kind
            if kind == FILE or kind in (FIFO, SOCKET, CHAR, BLOCK):
                mtime = e.mtime_ns
            elif kind == DIR:
                mtime = e.mtime_ns if flags & CMP_DIR_TIMES else 0
            else:
                mtime = e.mtime_ns if flags & CMP_LINK_TIMES else 0
            owner = flags & CMP_OWNER
            digest = e.digest if (flags & CMP_CHECKSUM and kind == FILE and e.digest is not None) else None
            h.update(
                _FINGERPRINT.pack(len(e.name)) + e.name
                + _FINGERPRINT_FIELDS.pack(
                    kind, 0 if kind == SYMLINK else e.mode, e.uid if owner else 0, e.gid if owner else 0,
                    e.size if kind == FILE else 0, mtime, e.rdev if kind in (CHAR, BLOCK) else 0, len(e.target),
                )
                + e.target + (b"\1" + digest if digest is not None else bytes(1 + DIGEST_SIZE))
            )  # fmt: skip
        return h.digest()

    def has_links(self) -> bool:
        """True if a regular file here has other hard links (its group must be compared)."""
        return any(e.kind == FILE and e.nlink > 1 for e in self._entries)

    def pack(self) -> tuple[bytes, bytes, bytes]:
        """``(strings, records, digests)``: the compact form stored in manifests and sent on the wire.

        ``strings`` holds every name then symlink target, ``records`` one RECORD per entry,
        ``digests`` 16 bytes per entry (zeros where the entry has none) or ``b""`` if no entry
        has a digest.
        """
        strings = bytearray()
        records = bytearray()
        any_digest = any(e.digest is not None for e in self._entries)
        digests = bytearray()
        for e in self._entries:
            name_off = len(strings)
            strings += e.name
            target_off = len(strings)
            strings += e.target
            flags = FLAG_DIGEST if e.digest is not None else 0
            records += RECORD.pack(
                e.size, e.mtime_ns, e.ctime_ns, e.ino, e.dev, e.rdev,
                e.mode, e.uid, e.gid, e.nlink, name_off, len(e.name), e.kind, flags,
                target_off, len(e.target),
            )  # fmt: skip
            if any_digest:
                digests += e.digest if e.digest is not None else bytes(DIGEST_SIZE)
        return bytes(strings), bytes(records), bytes(digests)

    @classmethod
    def unpack(cls, path: bytes, strings: bytes, records: bytes, digests: bytes, max_entries: int) -> Listing:
        """Rebuild a listing from ``pack()`` output, validating everything (input may be hostile).

        Raises ValueError naming the first defect: a length that does not add up, a name that
        is not a single valid component, names out of order or repeated, an unknown kind.
        """
        if len(records) % RECORD_SIZE:
            raise ValueError(f"record block of {len(records)} bytes is not a multiple of {RECORD_SIZE}")
        count = len(records) // RECORD_SIZE
        if count > max_entries:
            raise ValueError(f"{count} entries exceed the limit of {max_entries}")
        if digests and len(digests) != count * DIGEST_SIZE:
            raise ValueError(f"digest block of {len(digests)} bytes does not match {count} entries")
        entries = []
        previous = None
        for i, fields in enumerate(RECORD.iter_unpack(records)):
            (size, mtime_ns, ctime_ns, ino, dev, rdev, mode, uid, gid, nlink,
             name_off, name_len, kind, flags, target_off, target_len) = fields  # fmt: skip
            if not FILE <= kind <= BLOCK:
                raise ValueError(f"entry {i}: unknown kind {kind}")
            if name_off + name_len > len(strings) or target_off + target_len > len(strings):
                raise ValueError(f"entry {i}: string offsets outside the string block")
            name = strings[name_off : name_off + name_len]
            if not (0 < len(name) <= MAX_NAME) or b"/" in name or b"\0" in name or name in (b".", b".."):
                raise ValueError(f"entry {i}: invalid name {name!r}")
            if previous is not None and name <= previous:
                raise ValueError(f"entry {i}: name {name!r} out of order or repeated")
            previous = name
            if target_len > MAX_TARGET or (target_len and kind != SYMLINK) or b"\0" in strings[target_off : target_off + target_len]:
                raise ValueError(f"entry {i}: invalid symlink target")
            if flags & ~FLAG_DIGEST or (flags & FLAG_DIGEST and (not digests or kind != FILE)):
                raise ValueError(f"entry {i}: invalid flags {flags}")
            if mode > 0o7777:
                raise ValueError(f"entry {i}: invalid mode {mode:o}")
            digest = digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] if flags & FLAG_DIGEST else None
            target = strings[target_off : target_off + target_len]
            entries.append(Entry(name, kind, mode, uid, gid, size, mtime_ns, ctime_ns, ino, dev, nlink, rdev, target, digest))
        return cls(path, entries)


def _problem(path: bytes, what: str, err: int) -> ScanProblem:
    return ScanProblem(path, err, f"{what}: {os.strerror(err)}")


def _join(dir_path: bytes, name: bytes) -> bytes:
    return dir_path + b"/" + name if dir_path else name


def _open_readonly_nofollow(name: bytes, dir_fd: int) -> int:
    """Open a regular file for reading without following a symlink, blocking on a FIFO or
    updating its access time.  O_NOATIME is refused unless we own the file: retry without."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(name, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, flags, dir_fd=dir_fd)


class Hasher:
    """Fills the digests of listings' regular files; one per scan (it keeps a read buffer)."""

    def __init__(self):
        self._buf = bytearray(HASH_CHUNK)

    def fill_digests(self, dir_fd: int, listing: Listing, previous: Listing | None, racy_ns: int) -> None:
        """Give every regular file of ``listing`` (the directory open at ``dir_fd``) its
        digest: ``previous``'s where the file is unchanged and not racy (see the module
        docstring), else the hash of its content.  A file that cannot be hashed, or changes
        while it is, keeps no digest and gets a problem; ``listing.hashed`` counts the reads."""
        entries = listing._entries
        for i, e in enumerate(entries):
            if e.kind != FILE:
                continue
            digest = _reusable_digest(e, previous, racy_ns)
            if digest is None:
                digest, err, what = self._hash_file(dir_fd, e)
                listing.hashed += 1
                if digest is None:
                    message = f"{what}: {os.strerror(err)}" if err else what
                    listing.problems.append(ScanProblem(_join(listing.path, e.name), err, message))
                    continue
            entries[i] = e._replace(digest=digest)

    def _hash_file(self, dir_fd: int, entry: Entry) -> tuple[bytes | None, int, str]:
        """xxh3-128 of the regular file ``entry`` names in ``dir_fd``, if it is still that
        file after reading it.  Returns ``(digest, 0, "")`` or ``(None, errno, what)``."""
        try:
            fd = _open_readonly_nofollow(entry.name, dir_fd)
        except OSError as exc:
            if exc.errno == errno_mod.ENOENT:
                return None, exc.errno, "vanished during scan"
            return None, exc.errno, "cannot open file"
        try:
            hasher = xxhash.xxh3_128()
            buf = self._buf
            view = memoryview(buf)
            try:
                while True:
                    n = os.readv(fd, [buf])
                    if not n:
                        break
                    hasher.update(view[:n])
                st = os.fstat(fd)
            except OSError as exc:
                return None, exc.errno, "cannot read file"
            finally:
                view.release()
            now = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if now != (entry.ino, entry.size, entry.mtime_ns, entry.ctime_ns):
                return None, 0, "changed while hashing"
            return hasher.digest(), 0, ""
        finally:
            os.close(fd)


def _reusable_digest(entry: Entry, old: Listing | None, racy_ns: int) -> bytes | None:
    if old is None:
        return None
    i = old.index(entry.name)
    if i < 0:
        return None
    o = old[i]
    if (
        o.digest is not None
        and o.kind == FILE
        and o.size == entry.size
        and o.mtime_ns == entry.mtime_ns
        and o.ctime_ns == entry.ctime_ns
        and o.ino == entry.ino
        and entry.mtime_ns < racy_ns
    ):
        return o.digest
    return None


def list_directory(dir_fd: int, dir_path: bytes, *, skip: bytes | None = None, excluder=None) -> Listing:
    """The listing of the directory open at ``dir_fd`` (``dir_path`` relative to the root).

    Entries are sorted by name and ``lstat``-ed; a symlink's target is read (at most
    MAX_TARGET bytes); kinds a listing cannot hold are left out.  ``skip`` names one entry
    to leave out (the state dir at a root); ``excluder.excluded(relative_path, is_dir)``
    leaves out more.  An entry that vanished or could not be read is a problem, not an
    entry; a directory that could not be read gives an incomplete, empty listing.
    """
    problems: list[ScanProblem] = []
    try:
        names = sorted(os.fsencode(n) for n in os.listdir(dir_fd))
    except OSError as exc:
        problem = _problem(dir_path, "cannot read directory", exc.errno)
        return Listing(dir_path, complete=False, problems=[problem])
    entries = []
    for name in names:
        if skip is not None and name == skip:
            continue
        path = _join(dir_path, name)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            what = "vanished during scan" if exc.errno == errno_mod.ENOENT else "cannot stat"
            problems.append(_problem(path, what, exc.errno))
            continue
        target = b""
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=dir_fd)[:MAX_TARGET]
            except OSError as exc:
                what = "vanished during scan" if exc.errno == errno_mod.ENOENT else "cannot read symlink"
                problems.append(_problem(path, what, exc.errno))
                continue
        if stat.S_IFMT(st.st_mode) not in KIND_OF_FMT:
            continue
        if excluder is not None and excluder.excluded(path, stat.S_ISDIR(st.st_mode)):
            continue
        entries.append(entry_from_stat(name, st, target))
    return Listing(dir_path, entries, True, problems)


def open_failure(path: bytes, err: int) -> ScanProblem:
    """The problem recorded for a directory that could not be opened to be listed."""
    if err == errno_mod.ENOENT:
        return _problem(path, "vanished during scan", err)
    if err in (errno_mod.ENOTDIR, errno_mod.ELOOP):  # replaced by a file or a symlink since it was listed
        return _problem(path, "changed during scan", err)
    if err == errno_mod.ENAMETOOLONG:  # the walk's own verdict (mirror.entry.too_deep)
        return _problem(path, "not listed: too deep to mirror (2,048 levels, or a path near 64 KiB)", err)
    return _problem(path, "cannot open directory", err)


# Listings background_scan may hold ahead of its consumer (the compiled twin counts entries).
_AHEAD_LISTINGS = 64
_WALK_DONE = object()


class BackgroundScan:
    """``mirror.scan.scan(root, skip_at_root=...)``'s listings, produced ahead by a thread.

    The walk starts when the object is made: a caller starts it early and takes the
    listings later, in order.  An error that ends the walk (``root`` cannot be opened) is
    raised in its place, after the listings before it.  ``close()`` stops the walk and
    waits for its thread (``TreeScan`` does, in a ``finally``).  Iterate once.  The compiled
    twin walks in C without ever taking the interpreter lock.
    """

    def __init__(self, root: bytes, *, skip_at_root: bytes | None = None):
        self.root = root
        self._ahead: queue.Queue = queue.Queue(maxsize=_AHEAD_LISTINGS)
        self._stopping = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(skip_at_root,), name="treescan", daemon=True)
        self._thread.start()

    def _run(self, skip_at_root: bytes | None) -> None:
        import sys

        from .scan import scan  # the walk, run over this module's kernels

        walk = scan(self.root, skip_at_root=skip_at_root, kernel=sys.modules[__name__])
        try:
            for listing in walk:
                if not self._hand_over(listing):
                    return
            self._hand_over(_WALK_DONE)
        except BaseException as exc:  # handed to the consumer, raised in its turn
            self._hand_over(exc)
        finally:
            walk.close()

    def _hand_over(self, item) -> bool:
        while not self._stopping.is_set():
            try:
                self._ahead.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> BackgroundScan:
        return self

    def __next__(self) -> Listing:
        if self._done:
            raise StopIteration
        item = self._ahead.get()
        if item is _WALK_DONE or isinstance(item, BaseException):
            self._done = True
            if item is _WALK_DONE:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        """Stop the walk and wait for its thread; a consumer waiting in another thread gets
        the end."""
        self._stopping.set()
        self._thread.join()
        self._done = True
        while True:  # what was listed and not taken is dropped
            try:
                self._ahead.get_nowait()
            except queue.Empty:
                break
        self._ahead.put(_WALK_DONE)


def background_scan(
    root: bytes, *, skip_at_root: bytes | None = None, walkers: int = 1, max_walkers: int = 8
) -> BackgroundScan:
    """Start scanning ``root`` now, in the background; see ``BackgroundScan``.  The compiled
    twin lists directories in ``walkers`` threads, growing to ``max_walkers`` while listings
    wait on the disk; this one walks in one thread (the counts are only checked)."""
    if not 1 <= walkers <= max_walkers <= 64:
        raise ValueError(f"a walk takes 1 to 64 walkers, not {walkers} growing to {max_walkers}")
    return BackgroundScan(root, skip_at_root=skip_at_root)


class PairedWalks:
    """Two background walks' listings paired by directory, less the identical pairs."""

    def __init__(self, src: BackgroundScan, dst: BackgroundScan, flags: int):
        self._src, self._dst = src, dst
        self._a = self._b = None
        self._a_end = self._b_end = False
        self._flags = flags
        self._totals = [[0] * 9, [0] * 9]

    def __iter__(self) -> PairedWalks:
        return self

    def __next__(self) -> tuple[Listing | None, Listing | None]:
        while True:
            if self._a is None and not self._a_end:
                self._a = next(self._src, None)
                self._a_end = self._a is None
            if self._b is None and not self._b_end:
                self._b = next(self._dst, None)
                self._b_end = self._b is None
            a, b = self._a, self._b
            if a is None and b is None:
                raise StopIteration
            if b is None or (a is not None and _key(a.path) < _key(b.path)):
                self._a = None
                return a, None
            if a is None or _key(b.path) < _key(a.path):
                self._b = None
                return None, b
            self._a = self._b = None
            if _same_directory(a, b, self._flags):
                for totals, listing in zip(self._totals, (a, b), strict=True):
                    counts, file_bytes, _ = listing.totals()
                    totals[0] += 1
                    for kind in range(1, 8):
                        totals[kind] += counts[kind]
                    totals[8] += file_bytes
                continue
            return a, b

    def skipped(self, side: int) -> tuple[int, list[int], int]:
        """``(directories, [entries per kind, index = kind], bytes in files)`` of the
        directories of ``side`` (0: src, 1: dst) left out so far."""
        totals = self._totals[side]
        return totals[0], [0] + totals[1:8], totals[8]


def _key(path: bytes) -> bytes:
    return path.replace(b"/", b"\0")


def _same_directory(a: Listing, b: Listing, flags: int) -> bool:
    return (
        a.complete and b.complete and not a.problems and not b.problems
        and len(a) == len(b) and not compare_listings(a, b, flags)
    )  # fmt: skip


def pair_walks(src: BackgroundScan, dst: BackgroundScan, flags: int) -> PairedWalks:
    """The listings of two background walks paired by directory in canonical order, as
    ``mirror.compare.align`` pairs them (``(src, None)``, ``(None, dst)``, ``(src, dst)``),
    except that a pair of directories both listed whole, without a problem, in which
    ``compare_listings(src, dst, flags)`` finds nothing (no change, no multiply-linked file)
    is left out; ``skipped(side)`` counts what was left out of each."""
    return PairedWalks(src, dst, flags)


def compare_entries(a: Entry, b: Entry, flags: int) -> int:
    """Change bits between source entry ``a`` and replica entry ``b`` (0: nothing to report)."""
    bits = 0
    if (a.kind == FILE and a.nlink > 1) or (b.kind == FILE and b.nlink > 1):
        bits |= CH_LINKED
    if a.kind != b.kind:
        return bits | CH_KIND
    kind = a.kind
    if kind != SYMLINK and a.mode != b.mode:
        bits |= CH_MODE
    if flags & CMP_OWNER:
        if a.uid != b.uid:
            bits |= CH_UID
        if a.gid != b.gid:
            bits |= CH_GID
    if kind == FILE:
        if a.size != b.size:
            bits |= CH_SIZE
        if a.mtime_ns != b.mtime_ns:
            bits |= CH_MTIME
        if flags & CMP_CHECKSUM and a.size == b.size:
            if a.digest is None or b.digest is None:
                bits |= CH_NODIGEST
            elif a.digest != b.digest:
                bits |= CH_DIGEST
    elif kind == DIR:
        if flags & CMP_DIR_TIMES and a.mtime_ns != b.mtime_ns:
            bits |= CH_MTIME
    elif kind == SYMLINK:
        if a.target != b.target:
            bits |= CH_TARGET
        if flags & CMP_LINK_TIMES and a.mtime_ns != b.mtime_ns:
            bits |= CH_MTIME
    else:
        if kind in (CHAR, BLOCK) and a.rdev != b.rdev:
            bits |= CH_RDEV
        if a.mtime_ns != b.mtime_ns:
            bits |= CH_MTIME
    return bits


def compare_listings(src: Listing, dst: Listing, flags: int) -> list[tuple[int, int, int]]:
    """Merge two listings of the same directory by name.

    Returns ``(i, j, bits)`` for every entry needing attention: ``j == -1`` only in ``src``,
    ``i == -1`` only in ``dst``, else both with their change bits (``CH_LINKED`` alone when
    nothing changed but a side is a multiply-linked file).  Entries that agree are omitted.
    """
    out = []
    i = j = 0
    n, m = len(src), len(dst)
    while i < n or j < m:
        if j >= m or (i < n and src[i].name < dst[j].name):
            out.append((i, -1, 0))
            i += 1
        elif i >= n or dst[j].name < src[i].name:
            out.append((-1, j, 0))
            j += 1
        else:
            bits = compare_entries(src[i], dst[j], flags)
            if bits:
                out.append((i, j, bits))
            i += 1
            j += 1
    return out


def bind_types(entry_type, problem_type) -> None:
    """Accepted for API parity with the compiled module; this twin imports them directly."""
