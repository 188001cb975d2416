"""Scan one tree in the background, with its digest cache, and hand over its listings in order.

``TreeScan(root, ...)`` runs the scanner in a thread of its own and passes listings
through a bounded queue: memory stays bounded by the queue, not the tree.  A plain scan
(the whole tree, no digests, no excludes) is the scanner's own ``background_scan``: the
compiled one walks in C without ever taking the interpreter lock, so two trees are scanned
at once on two cores while the sync's Python runs beside them.  The ``mirror`` command
starts the source's walk before it has even loaded (``mirror.startup``); a plain scan of
that root adopts it.

With ``checksum=True`` the tree's last manifest in its state dir is read alongside the scan
so unchanged files keep their digests (see ``mirror.scan``), and a new manifest is
written as the scan goes and committed atomically once the whole tree has been seen.  A
missing, stale or damaged cache only costs hashing time: it is reported and rebuilt.

``root`` may also be a saved manifest (``mirror scan --save``): its listings are replayed.

Two plain scans can be taken together (``pairs_with``): their walks are paired by directory
in compiled code, which compares identical directories and drops them without ever making
Python objects for them; only the pairs that differ (or need a closer look) come out.

``scope`` limits the scan to what a live session needs (``Scope``): single entries, listed
on their own (a *partial* listing of their directory: only those names, one ``lstat``
each, however large the directory), and whole subtrees (a new directory, a rescan after
an inotify overflow).  Both ends of a session scan the same scope, so their listings
still align.  As in a whole scan, nothing below an excluded directory is listed, and a
directory that cannot be opened is an incomplete listing with its problem, not an error.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Iterator

from . import fastpath, startup
from .constants import MAX_TARGET
from .entry import KIND_OF_FMT, Kind, ScanProblem, canonical_key, entry_from_stat, too_deep
from .errors import ManifestError, MirrorError, UsageError, display_path, fs_path
from .statedir import (
    STATE_DIR_NAME,
    check_root,
    check_state_dir,
    ensure_state_dir,
    resolve_state_dir,
    state_dir_below,
)

log = logging.getLogger(__name__)

# A file whose mtime is this close to (or after) the start of the scan that cached its digest
# is hashed again: it may have changed within one timestamp tick of being hashed (git's
# "racy clean" problem).  2 s covers the coarsest common granularity (FAT, SMB).
RACY_MARGIN_NS = 2_000_000_000
_BATCH_ENTRIES = 2048
_HOLD_ENTRIES = 256 * 1024  # listings held back while the digest cache may stay as it is
_QUEUE_BATCHES = 8
_DONE = object()


class ScanStats:
    """What a scan saw: entries by kind, bytes, digests, problems, time, digest-cache state."""

    def __init__(self):
        self.dirs = 0
        self.counts = [0] * 8  # index: Kind
        self.file_bytes = 0
        self.digests = 0
        self.hashed = 0  # files read and hashed by this scan (the rest came from the digest cache)
        self.problems = 0
        self.seconds = 0.0
        self.cache = "off"  # off | cold | warm | rebuilt

    def add(self, listing) -> None:
        counts, file_bytes, digests = listing.totals()
        self.dirs += 1
        for k, c in enumerate(counts):
            self.counts[k] += c
        self.file_bytes += file_bytes
        self.digests += digests
        self.hashed += getattr(listing, "hashed", 0)
        self.problems += len(listing.problems)

    def add_unlisted(self, dirs: int, counts: list[int], file_bytes: int) -> None:
        """Count directories that were compared without becoming listings (``pairs_with``)."""
        self.dirs += dirs
        for k, c in enumerate(counts):
            self.counts[k] += c
        self.file_bytes += file_bytes

    @property
    def entries(self) -> int:
        return sum(self.counts)

    def by_kind(self) -> dict[str, int]:
        return {kind.name.lower(): self.counts[kind] for kind in Kind}


class Scope:
    """What a scoped scan covers: entries (by path) and subtrees (by directory path).

    ``units()`` gives the work in canonical order, without overlaps: a partial listing per
    directory holding dirty entries (names sorted), and a full scan per subtree; entries
    inside a subtree, and partial listings of a directory that is itself scanned, drop out.
    """

    def __init__(self, entries=(), trees=()):
        self.entries = set(entries)
        self.trees = set(trees)

    @property
    def everything(self) -> bool:
        return b"" in self.trees

    def as_wire(self) -> list:
        return [sorted(self.entries), sorted(self.trees)]

    @classmethod
    def from_wire(cls, value) -> Scope:
        from .errors import ProtocolError
        from .safefs import split_path

        if not isinstance(value, list) or len(value) != 2 or not all(isinstance(x, list) for x in value):
            raise ProtocolError("bad scope")
        if len(value[0]) + len(value[1]) > 1_000_000:
            raise ProtocolError("scope too large")
        for path in value[0] + value[1]:
            if not isinstance(path, bytes):
                raise ProtocolError("bad scope path")
            if path:
                split_path(path)
        if b"" in value[0]:
            raise ProtocolError("bad scope entry")
        return cls(value[0], value[1])

    def units(self) -> list[tuple[bytes, bool, list[bytes]]]:
        """``(path, is_tree, names)`` in canonical order (names only for partial listings)."""
        trees = sorted(self.trees, key=canonical_key)
        kept: list[bytes] = []
        for t in trees:  # drop subtrees inside other subtrees
            if not any(_within(t, k) for k in kept):
                kept.append(t)
        by_parent: dict[bytes, list[bytes]] = {}
        for path in self.entries:
            parent, _, name = path.rpartition(b"/")
            if any(_within(parent, k) for k in kept):
                continue  # its directory is scanned whole
            by_parent.setdefault(parent, []).append(name)
        units = [(t, True, []) for t in kept] + [(p, False, sorted(n)) for p, n in by_parent.items()]
        units.sort(key=lambda u: canonical_key(u[0]))
        return units


def _within(path: bytes, tree: bytes) -> bool:
    return tree == b"" or path == tree or path.startswith(tree + b"/")


class TreeScan:
    """One tree's listings in canonical order; iterate once.  See the module docstring."""

    def __init__(
        self,
        root: bytes | str,
        *,
        excluder=None,
        checksum: bool = False,
        state_dir: bytes | str | None = None,
        use_cache: bool = True,
        background: bool = True,
        scope: Scope | None = None,
        problem_prefix: str = "",
    ):
        self.root = fs_path(root)
        # Put before each problem's message (e.g. "on the receiver: " for a local replica's
        # scan, whose problems are reported beside the source's).
        self.problem_prefix = problem_prefix
        self.scope = None if scope is None or scope.everything else scope
        self.excluder = excluder
        self.checksum = checksum
        self.state_dir = resolve_state_dir(self.root, state_dir)
        self.use_cache = use_cache and checksum
        self.background = background
        self.stats = ScanStats()
        self.problems: list[ScanProblem] = []
        self.is_manifest = os.path.isfile(self.root) and _manifest().is_manifest_file(self.root)
        if not self.is_manifest:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise UsageError(f"{display_path(self.root)} is neither a directory nor a manifest (mirror scan)")
            # Every scan leaves the state dir out: refuse rather than hide a user's .mirror.
            check_root(self.root)
            inside = _state_dir_inside(self.root, self.state_dir)
            if inside is not None:
                check_state_dir(self.state_dir, f"the state dir {display_path(self.state_dir)} inside the tree")
        self.manifest_header = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._walk = None  # the scanner's own background walk, when it can do the whole job
        self._paired_with = False  # its listings are taken through pairs_with()

    # -- producer ---------------------------------------------------------------------------

    def _previous_listings(self, path: bytes) -> Iterator:
        """The cached manifest's listings; a damaged cache ends the stream with a warning."""
        try:
            reader = _manifest().ManifestReader(path)
        except FileNotFoundError:
            self.stats.cache = "cold"
            return
        except (OSError, ManifestError) as exc:
            log.warning("digest cache %s unusable, rebuilding it: %s", display_path(path), exc)
            self.stats.cache = "rebuilt"
            return
        if reader.header.root != os.path.realpath(self.root) or not reader.header.checksum:
            reader.close()
            self.stats.cache = "cold"
            return
        self._racy_ns = reader.header.scanned_at_ns - RACY_MARGIN_NS
        self.stats.cache = "warm"
        try:
            yield from reader
        except ManifestError as exc:
            log.warning("digest cache damaged, rebuilding it: %s", exc)
            self.stats.cache = "rebuilt"

    def _open_cache_writer(self, path: bytes, started_ns: int):
        manifest = _manifest()
        try:
            ensure_state_dir(self.state_dir)
            header = manifest.ManifestHeader(root=os.path.realpath(self.root), scanned_at_ns=started_ns, checksum=True)
            # The cache is rebuilt from the tree if lost, so skipping its fsync is safe.
            return manifest.ManifestWriter(path, header, durable=False)
        except OSError as exc:
            log.warning("cannot write the digest cache in %s (%s); continuing without it",
                        display_path(self.state_dir), exc.strerror)
            return None

    def _skip_rules(self):
        """The state dir is never part of the tree: ``.mirror`` at the root is skipped natively;
        a state dir elsewhere inside the tree is excluded by path."""
        excluder = self.excluder
        inside = _state_dir_inside(self.root, self.state_dir)
        if inside is not None:
            from .exclude import Excluder

            extra = Excluder([b"/" + inside + b"/***"])
            if excluder is not None:
                extra.patterns = list(excluder.patterns) + extra.patterns
            excluder = extra
        return excluder

    def _produce(self) -> Iterator:
        started = time.perf_counter()
        if self.is_manifest:
            reader = _manifest().ManifestReader(self.root)
            self.manifest_header = reader.header
            for listing in reader:
                self.stats.add(listing)
                yield listing
            self.stats.seconds = time.perf_counter() - started
            return
        scanner = fastpath.choose("scan")
        if self.scope is not None:
            yield from self._produce_scoped(scanner)
            self.stats.seconds = time.perf_counter() - started
            return
        started_ns = time.time_ns()
        cache_path = None
        previous = None
        self._racy_ns = 0
        if self.checksum:
            cache_path = os.path.join(self.state_dir, _manifest().cache_file_name(self.root))
            if self.use_cache:
                previous = self._previous_listings(cache_path)
                # Prime the generator so the header (and racy_ns) is read before scanning.
                first = next(previous, None)
                previous = _chain_first(first, previous)
        cache = _CacheUpdate(self, cache_path, started_ns) if cache_path is not None else None
        try:
            for listing in scanner.scan(
                self.root,
                excluder=self._skip_rules(),
                skip_at_root=STATE_DIR_NAME,
                checksum=self.checksum,
                previous=previous,
                racy_ns=self._racy_ns,
            ):
                if cache is not None:
                    cache.add(listing)
                self._account(listing)
                yield listing
        except BaseException:
            if cache is not None:
                cache.abort()
            raise
        if cache is not None:
            cache.finish()
        self.stats.seconds = time.perf_counter() - started

    def _produce_scoped(self, scanner) -> Iterator:
        from .exclude import excluded_dir

        excluder = self._skip_rules()
        seen: dict[bytes, bool] = {}
        for path, is_tree, names in self.scope.units():
            if excluder is not None and excluded_dir(excluder.excluded, path, seen):
                continue  # a whole scan never goes there: neither does this one
            if is_tree:
                try:
                    listings = scanner.scan(self.root, excluder=excluder, skip_at_root=STATE_DIR_NAME, start=path)
                    for listing in listings:
                        self._account(listing)
                        yield listing
                except OSError as exc:  # only ever raised before the first listing
                    if exc.errno in _GONE:
                        continue  # gone, or no longer a directory: its own entry says so
                    listing = self._unreadable(scanner, path, exc.errno)
                    self._account(listing)
                    yield listing
                continue
            listing = self._partial_listing(scanner, path, names, excluder)
            if listing is not None:
                self._account(listing)
                yield listing

    def _account(self, listing) -> None:
        if self.problem_prefix and listing.problems:
            # Relabelled here, before anyone else sees the listing.
            listing.problems[:] = [ScanProblem(p.path, p.errno, self.problem_prefix + p.message)
                                   for p in listing.problems]  # fmt: skip
        self.stats.add(listing)
        self.problems.extend(listing.problems)

    def _unreadable(self, scanner, path: bytes, err: int):
        """The listing of directory ``path``, there but not to be opened (a failing disk), as a
        whole scan has it: incomplete, so its subtree is compared on neither side and deleted
        nowhere, with an unreadable problem, named once (the parent's listing names it already
        if it could not stat it)."""
        said = any(p.path == path and p.unreadable for p in self.problems)
        return scanner.Listing(path, complete=False, problems=[] if said else [scanner.open_failure(path, err)])

    def _partial_listing(self, scanner, dir_path: bytes, names: list[bytes], excluder):
        """A listing of ``dir_path`` holding only ``names`` (those that exist), one lstat each."""
        if dir_path and too_deep(dir_path):  # as a whole scan has it: not listed
            return self._unreadable(scanner, dir_path, errno.ENAMETOOLONG)
        try:
            fd = _open_below(self.root, dir_path)
        except OSError as exc:
            return self._unreadable(scanner, dir_path, exc.errno)
        if fd is None:
            return None
        entries, problems = [], []
        try:
            for name in names:
                if not dir_path and name == STATE_DIR_NAME:
                    continue
                path = dir_path + b"/" + name if dir_path else name
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    target = os.readlink(name, dir_fd=fd)[:MAX_TARGET] if stat.S_ISLNK(st.st_mode) else b""
                except FileNotFoundError:
                    continue  # deleted: the comparison sees it missing here
                except OSError as exc:
                    problems.append(ScanProblem(path, exc.errno, f"cannot stat: {exc.strerror}"))
                    continue
                if stat.S_IFMT(st.st_mode) not in KIND_OF_FMT:
                    continue
                if excluder is not None and excluder.excluded(path, stat.S_ISDIR(st.st_mode)):
                    continue
                entries.append(entry_from_stat(name, st, target))
        finally:
            os.close(fd)
        return scanner.Listing(dir_path, entries, True, problems)

    # -- consumer ---------------------------------------------------------------------------

    def start(self) -> TreeScan:
        """Start scanning now (in the background), before the listings are asked for."""
        if not self.background or self._thread is not None or self._walk is not None:
            return self
        if self.checksum and not self.is_manifest and self.scope is None:
            # The digest cache's state dir is made here, not in the scan's thread: making
            # <root>/.mirror moves the root's mtime until it is put back, and the caller may
            # stat the root (its entry in a comparison) as soon as this returns.
            with contextlib.suppress(OSError, MirrorError):  # the scan's cache writer reports it
                ensure_state_dir(self.state_dir)
        early = startup.take_walk(self.root)  # started before the program loaded
        if self._plain():
            # The whole walk in the scanner's own thread: the compiled one never takes the
            # interpreter lock, so it runs at full speed beside the sync's Python.
            scanner = fastpath.choose("scan")  # also binds the result types an early walk uses
            self._walk = early or scanner.background_scan(self.root, skip_at_root=STATE_DIR_NAME)
            return self
        if early is not None:
            early.close()  # not the scan wanted (digests, excludes): stop it using a CPU
        self._channel: queue.Queue = queue.Queue(maxsize=_QUEUE_BATCHES)
        self._thread = threading.Thread(target=self._run, args=(self._channel,), name="treescan", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Abandon the scan (its listings are not wanted); returns once its thread is gone."""
        self._stop.set()
        if self._walk is not None:
            self._walk.close()
        if self._thread is not None:
            self._thread.join()

    def __iter__(self) -> Iterator:
        if not self.background:
            yield from self._produce()
            return
        self.start()
        if self._walk is not None:
            yield from self._take_walk()
            return
        channel = self._channel
        try:
            while True:
                batch = channel.get()
                if batch is _DONE:
                    return
                if isinstance(batch, BaseException):
                    raise batch
                yield from batch
        finally:
            self.stop()

    def _plain(self) -> bool:
        """A whole tree, no digests, nothing excluded but the state dir at the root: what
        ``background_scan`` does on its own."""
        return not self.is_manifest and self.scope is None and not self.checksum and self._skip_rules() is None

    def pairs_with(self, other, flags: int) -> Iterator | None:
        """This tree's and ``other``'s listings paired by directory, as ``compare.align``
        pairs them, except that pairs of identical directories (under the compare ``flags``)
        are left out: the scan kernel compares those without making listings of them.  For
        two plain whole-tree walks not yet taken; else None (pair them with ``align``)."""
        if not isinstance(other, TreeScan):
            return None
        self.start()
        other.start()
        if self._walk is None or other._walk is None or self._walk is other._walk or self._paired_with:
            return None
        self._paired_with = other._paired_with = True  # the walks are the pairing's to take
        return self._paired(other, (self._walk, other._walk), flags)

    def _paired(self, other: TreeScan, walks: tuple, flags: int) -> Iterator:
        started = time.perf_counter()
        pairs = fastpath.choose("scan").pair_walks(walks[0], walks[1], flags)
        try:
            for a, b in pairs:
                if a is not None:
                    self._account(a)
                if b is not None:
                    other._account(b)
                yield a, b
            self.stats.add_unlisted(*pairs.skipped(0))
            other.stats.add_unlisted(*pairs.skipped(1))
        finally:
            for walk in walks:
                walk.close()
        self.stats.seconds = other.stats.seconds = time.perf_counter() - started

    def _take_walk(self) -> Iterator:
        started = time.perf_counter()
        try:
            for listing in self._walk:
                self._account(listing)
                yield listing
        finally:
            self._walk.close()
        self.stats.seconds = time.perf_counter() - started

    def _run(self, channel: queue.Queue) -> None:
        batch: list = []
        size = 0
        try:
            producer = self._produce()
            try:
                for listing in producer:
                    batch.append(listing)
                    size += len(listing) + 1
                    if size >= _BATCH_ENTRIES:
                        if not self._put(channel, batch):
                            return
                        batch, size = [], 0
            finally:
                producer.close()
            if batch and not self._put(channel, batch):
                return
            self._put(channel, _DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(channel, exc)

    def _put(self, channel: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                channel.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class _CacheUpdate:
    """Writes a tree's new digest cache as its scan goes, unless it would equal the old one.

    While every digest so far came from the warm cache (nothing hashed), the listings are held
    back instead of written: if the whole scan ends that way, the old cache is as good as a new
    one (reuse checks each file's size, times and inode) and is kept, which spares a second
    ``--checksum`` run of an unchanged tree the cost of rewriting it.  Memory for the held-back
    listings is bounded by ``_HOLD_ENTRIES``; beyond it they are written out as usual.
    """

    def __init__(self, scan: TreeScan, path: bytes, started_ns: int):
        self.scan = scan
        self.path = path
        self.started_ns = started_ns
        self.writer = None
        self.held: list | None = [] if scan.stats.cache == "warm" else None
        self.held_entries = 0
        if self.held is None:
            self._open()

    def _open(self) -> None:
        self.writer = self.scan._open_cache_writer(self.path, self.started_ns)
        held, self.held = self.held or [], None
        for listing in held:
            self._write("add", listing)

    def _write(self, step: str, *args) -> None:
        """The writer's ``step``; a cache that cannot be written (a full disk) is given up,
        never the scan: a lost cache only costs hashing time."""
        if self.writer is None:
            return
        try:
            getattr(self.writer, step)(*args)
        except OSError as exc:
            log.warning("cannot write the digest cache %s (%s); continuing without it",
                        display_path(self.path), exc.strerror)  # fmt: skip
            self.abort()

    def add(self, listing) -> None:
        if self.held is not None:
            self.held.append(listing)
            self.held_entries += len(listing) + 1
            if listing.hashed or self.held_entries > _HOLD_ENTRIES:
                self._open()
        else:
            self._write("add", listing)

    def finish(self) -> None:
        unchanged = self.scan.stats.hashed == 0 and self.scan.stats.cache == "warm"
        if self.held is not None and not unchanged:
            self._open()  # e.g. the old cache turned out damaged half-way
        if unchanged:
            self.abort()
        else:
            self._write("commit")
            self.writer = None

    def abort(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.abort()  # its temporary file is removed even if the close fails


@functools.lru_cache(maxsize=64)
def _state_dir_inside(root: bytes, state_dir: bytes) -> bytes | None:
    """The state dir's path inside ``root`` when it is elsewhere than ``.mirror`` (cached: a
    live session asks every time, and realpath costs an lstat per component)."""
    inside = state_dir_below(root, state_dir)
    return None if inside == STATE_DIR_NAME else inside


# A directory the scope names that is no longer one to scan: its own entry says what it is now.
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def _open_below(root: bytes, rel: bytes) -> int | None:
    """Descriptor of directory ``rel`` under ``root``, never through a symlink; None if gone."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in rel.split(b"/") if rel else ():
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as exc:
        os.close(fd)
        if exc.errno in _GONE:
            return None
        raise
    return fd


def _manifest():
    """The manifest module, imported only when a cache or a saved manifest is involved (it
    pulls in msgpack; a plain diff starts faster without it)."""
    from . import manifest

    return manifest


def _chain_first(first, rest):
    if first is not None:
        yield first
        yield from rest


# -- the scans a sync starts ------------------------------------------------------------


def source_scan(root: bytes, options, scope=None):
    """The source tree, scanned as a sync's ``options`` (``records.SenderOptions``) say."""
    from .exclude import make_excluder

    return TreeScan(root, excluder=make_excluder(options.excludes), checksum=options.checksum,
                    state_dir=options.state_dir, scope=scope, background=scope is None).start()  # fmt: skip


def replica_scan(root: bytes, options, scope=None):
    """A local replica, scanned by the sync itself; its problems are named as a receiver's."""
    from .exclude import make_excluder

    return TreeScan(root, excluder=make_excluder(options.excludes), checksum=options.checksum, scope=scope,
                    background=scope is None, problem_prefix="on the receiver: ").start()  # fmt: skip


def stop_scans(scans) -> None:
    """Abandon the scans of ``scans`` (None entries, or None itself, are skipped)."""
    for scan in scans or ():
        if scan is not None:
            scan.stop()
