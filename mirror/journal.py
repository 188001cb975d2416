"""The change journal: every change the watcher saw, durable before it counts as taken.

The live daemon appends a record per change (and fsyncs the batch) before it acts on it;
after a session has made the replica match, it appends a checkpoint.  A crash, a restart,
a mirroring lock or a lost connection therefore never loses a change: whatever was seen
and not checkpointed is replayed.  The file only grows until it is compacted (rewritten,
atomically, with just the pending records).

Record, little-endian::

    u32 length of body | u64 xxh3-64 of body | body = msgpack [seq, kind, path, other, time]

kinds: ``e`` an entry changed (``other``: 1 if its whole subtree must be rescanned),
``r`` a rename (``path`` -> ``other``), ``c`` checkpoint: every record up to ``seq`` is done
for the destination named in ``path`` (empty: the journal's only destination).  ``time``:
the wall-clock time the record was written, after the change it tells of (a checkpoint's:
when that session was done); records of older journals have none.  (An older hamirror
takes a record with a time for a torn one and cuts the file there: after a downgrade its
daemon's first whole-tree compare covers what those records named.)

One journal can serve several destinations (``mirror daemon`` fanning one tree out): each
has its own position (its last checkpoint), a record is dropped once every destination has
passed it, and a destination that falls so far behind that its records would exceed
``MAX_RETAINED`` is let go (``overrun``): it is reconciled by a full sync instead.
Reading stops at the first record that is short or fails its checksum (a write torn by a
crash, which was never fsynced, so never acknowledged) and the file is cut there.

A write or an fdatasync that fails leaves the file untrustworthy: a part of a record may be
in it, and after a failed fdatasync the kernel may have dropped records it then calls
written, so that a later fdatasync succeeds without them ("fsyncgate").  The records stay in
memory (this run still mirrors them) and the journal is written whole into a new file as
soon as it can be; until then nothing in it is called durable.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field

import msgpack
import xxhash

from .atomicfile import atomic_write
from .errors import display_path

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IQ")
MAX_RECORD = 1 << 20
COMPACT_BYTES = 16 << 20
# A destination whose unmirrored records pass this many (it has been away long) no longer
# holds them: it is reconciled by a full sync when it returns (see ``overrun``).
MAX_RETAINED = 1_000_000
# A journal that could not be written or made durable is written whole again at a sync at
# most this often: it may hold many records, and the disk may still be failing.
REWRITE_RETRY = 1.0

ENTRY, RENAME, CHECKPOINT = "e", "r", "c"


@dataclass
class Pending:
    """What is waiting to be mirrored: dirty entries (with the time first seen), subtrees to
    rescan, and renames in order."""

    entries: dict[bytes, float] = field(default_factory=dict)
    trees: set[bytes] = field(default_factory=set)
    renames: list[tuple[bytes, bytes]] = field(default_factory=list)
    seq: int = 0  # the last record these cover

    def __len__(self) -> int:
        return len(self.entries) + len(self.trees) + len(self.renames)

    def oldest(self) -> float | None:
        return min(self.entries.values(), default=None)


def _bodies(data: bytes):
    """``(fields, end)`` of each whole record of a journal file, in order, up to the first
    short one or one that fails its checksum.  ``time`` (the fifth field, the wall-clock time
    the change was recorded) is absent from the records of older journals."""
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, check = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if length > MAX_RECORD or end > len(data):
            return
        body = data[pos + _HEADER.size : end]
        if xxhash.xxh3_64_intdigest(body) != check:
            return
        try:
            fields = msgpack.unpackb(body)
        except (ValueError, msgpack.UnpackException, TypeError):
            return
        if not isinstance(fields, list) or len(fields) < 4:
            return
        yield fields, end
        pos = end


def _scan(data: bytes) -> tuple[list, dict[bytes, int], int, int]:
    """Decode a journal file: (change records in order, each destination's last checkpoint,
    the last sequence number, the length of the whole records: a torn tail is not counted)."""
    pos, last = 0, 0
    now = time.time()
    records: list[tuple[int, str, bytes, object, float]] = []
    done: dict[bytes, int] = {}
    for (seq, kind, path, other, *_), end in _bodies(data):
        last = max(last, seq)
        if kind == CHECKPOINT:
            done[path] = max(done.get(path, 0), seq)
        else:
            records.append((seq, kind, path, other, now))
        pos = end
    return records, done, last, pos


def recorded_times(path: bytes) -> tuple[dict[bytes, float], dict[bytes, float]]:
    """For each path a change record of the journal at ``path`` names (until the file is
    compacted), until when its changes were seen: the time of its latest record (written
    after the change it tells of), or of the first checkpoint past that record (a change
    made before a session took the record was not recorded again, and that session mirrored
    it; one made after would have a record of its own).  Two maps: every path named, and the
    directories named whole (a subtree to rescan, a rename's new name), whose records tell
    of everything below them.  Records without a time (older journals) count for nothing."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}, {}
    named: dict[bytes, float] = {}
    whole: dict[bytes, float] = {}
    latest: dict[tuple[bytes, bool], int] = {}  # (path, whole) -> the sequence of its latest record
    waiting: collections.deque[tuple[int, bytes, bool]] = collections.deque()  # records no checkpoint passed yet

    def seen(p: bytes, is_whole: bool, when: float) -> None:
        target = whole if is_whole else named
        target[p] = max(target.get(p, 0.0), when)

    for (seq, kind, name, other, *rest), _end in _bodies(data):
        when = float(rest[0]) if rest and isinstance(rest[0], float | int) else None
        if kind == CHECKPOINT:
            if when is not None:
                while waiting and waiting[0][0] <= seq:
                    done, p, is_whole = waiting.popleft()
                    if latest.get((p, is_whole)) == done:
                        seen(p, is_whole, when)
            continue
        if when is None:
            continue
        names = [(name, False), (other, False), (other, True)] if kind == RENAME else [(name, bool(other))]
        for p, is_whole in names:
            seen(p, is_whole, when)
            latest[(p, is_whole)] = seq
            waiting.append((seq, p, is_whole))
    return named, whole


def _merge(records, done: int) -> Pending:
    out = Pending(seq=records[-1][0] if records else done)
    entries = out.entries
    for _, kind, path, other, when in records:
        # An entry's time is the earliest of its records': a change kept for a retry is
        # journaled again after the events that came during its session.
        if kind == ENTRY:
            entries[path] = min(when, entries.get(path, when))
            if other:
                out.trees.add(path)
        elif kind == RENAME:
            out.renames.append((path, other))
            entries[path] = min(when, entries.get(path, when))
            entries[other] = min(when, entries.get(other, when))
    return out


def read_pending(path: bytes, *, had_by_none: bool = False, lacking: bytes | None = None) -> Pending:
    """What a journal holds that at least one of its destinations has not had (with
    ``had_by_none``: that none has had; and with ``lacking``, a cursor, what that
    destination has not had either), read without opening it for writing (a daemon may own
    it) and without cutting a torn tail."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Pending()
    records, done, _, _ = _scan(data)
    floor = (max if had_by_none else min)(done.values(), default=0)
    if lacking is not None:
        # a journal with one destination names none (b"")
        floor = min(floor, done.get(lacking, done.get(b"", 0) if set(done) == {b""} else 0))
    return _merge([r for r in records if r[0] > floor], floor)


def settle(path: bytes) -> int:
    """Mark every record of the journal at ``path`` done for each of its destinations, durably.
    Only with no daemon on it: its changes were kept aside or given up, and the tree is to
    become a copy of another's.  Returns the sequence settled, 0 if nothing was pending."""
    pending = read_pending(path)
    if not len(pending):
        return 0
    with open(path, "rb") as f:
        _, done, _, _ = _scan(f.read())
    cursors = tuple(done) or (b"",)
    journal = Journal(path, cursors)
    try:
        for cursor in cursors:
            journal.checkpoint(pending.seq, cursor)
        os.fsync(journal._fd)
    finally:
        journal.close()
    return pending.seq


class Journal:
    """One tree's journal file, for one or more destinations (``cursors``: their names, as
    bytes; the default is the single unnamed one); thread-safe."""

    def __init__(self, path: bytes, cursors: tuple[bytes, ...] = (b"",), max_retained: int = MAX_RETAINED):
        self.path = path
        self._lock = threading.Lock()
        self._seq = 0
        if not cursors or len(set(cursors)) != len(cursors):
            raise ValueError(f"journal {display_path(path)}: destinations must be distinct and at least one")
        self._cursors = tuple(cursors)
        self._max_retained = max_retained
        self._done_at: dict[bytes, int] = dict.fromkeys(cursors, 0)  # per destination: its last checkpoint
        self._overrun: set[bytes] = set()
        self._records: list[tuple[int, str, bytes, object, float]] = []  # pending for someone, in order
        self._fd = -1
        self._size = 0
        self.replayed = 0
        # path -> (its "other" flag, seq of its newest record), while not checkpointed
        self._pending_entries: dict[bytes, tuple[int, int]] = {}
        self._taken_at: dict[bytes, int] = dict.fromkeys(cursors, 0)  # the newest record each session took
        # per destination: what its replica recorded as applied, when below its checkpoint (the
        # records after it are kept, so a reconnection can replay them: ``hold``, ``rewind``)
        self._held: dict[bytes, int | None] = {}
        self._sync_lock = threading.Lock()
        self._synced = 0
        self._lost = False  # a write or an fdatasync failed: the file is untrustworthy until rewritten
        self._rewrite_tried = 0.0
        # Names this run of the journal (changes are journaled only while it is watched): a
        # replica's applied record carrying it was written by a session of this run, so its
        # sequence can be replayed from (see ``rewind``).
        self.token = os.urandom(8).hex()
        self._open()
        self._index()

    # -- reading ---------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        good = self._parse(data)
        if good < len(data):
            log.warning("journal %s: ignoring %d bytes of a torn record at the end (never acknowledged)",
                        display_path(self.path), len(data) - good)  # fmt: skip
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._fd, good)
        os.lseek(self._fd, good, os.SEEK_SET)
        self._size = good
        self.replayed = len(self._records)
        if len(self._cursors) > 1 and self._unrecorded:
            # every destination's position is in the file, a new one's too: a reader
            # (``read_pending``) then knows what each destination still lacks
            self._append(b"".join(self._encode(0, CHECKPOINT, c, None) for c in self._unrecorded))

    def _parse(self, data: bytes) -> int:
        records, done, self._seq, good = _scan(data)
        self._unrecorded = [c for c in self._cursors if c not in done]
        for cursor in self._done_at:  # a destination no longer configured holds nothing back
            self._done_at[cursor] = done.get(cursor, 0)
        floor = self._done
        self._records = [r for r in records if r[0] > floor]
        return good

    @property
    def _done(self) -> int:
        """Done for every destination: records up to here are dropped (unless held)."""
        return min(self._done_at.values())

    def _kept_from(self, cursor: bytes) -> int:
        held = self._held.get(cursor)
        return self._done_at[cursor] if held is None else min(held, self._done_at[cursor])

    @property
    def _floor(self) -> int:
        """Records up to here are dropped: every destination has them, and none holds them
        for a replay (``hold``)."""
        return min(self._kept_from(c) for c in self._cursors)

    def _index(self) -> None:
        self._pending_entries = {}
        for seq, kind, path, other, _ in self._records:
            if kind == ENTRY:
                flag = max(self._pending_entries.get(path, (0, 0))[0], other or 0)
                self._pending_entries[path] = (flag, seq)

    # -- writing ---------------------------------------------------------------------------

    def _encode(self, seq: int, kind: str, path: bytes, other, when: float | None = None) -> bytes:
        body = msgpack.packb([seq, kind, path, other] if when is None else [seq, kind, path, other, when],
                             use_bin_type=True)  # fmt: skip
        return _HEADER.pack(len(body), xxhash.xxh3_64_intdigest(body)) + body

    def append(self, changes: list[tuple], when: float | None = None, force: bool = False,
               sync: bool = True) -> int:
        """Record ``(kind, path, other)`` changes durably; returns the last sequence number.
        A change may carry a fourth item, when it was first seen (a change kept for a retry:
        its lag goes on from then, not from the retry); else ``when`` (default: now).

        An entry already pending (seen, not yet taken by a session) adds nothing durable and is
        not written again: a new file's created, modified and closed events cost one
        fdatasync, not three.  Once its record has been taken (``take``), the session may have
        read the entry already, so a new change to it is a new record: the checkpoint of the
        session's batch must not cover it.  ``force`` writes it anyway (to keep it past a
        checkpoint of older records).
        ``sync=False`` leaves the fdatasync to ``sync()``, so it can run while the change is
        being mirrored; a change is checkpointed only once it is durable (see ``checkpoint``).
        """
        if not changes:
            return self._seq
        when = time.time() if when is None else when
        with self._lock:
            out = bytearray()
            taken = max(self._taken_at.values())
            for kind, path, other, *seen in changes:
                known = self._pending_entries.get(path) if kind == ENTRY else None
                if known is not None and not force and known[1] > taken and known[0] >= (other or 0):
                    continue
                self._seq += 1
                if kind == ENTRY:
                    self._pending_entries[path] = (max(known[0] if known else 0, other or 0), self._seq)
                out += self._encode(self._seq, kind, path, other, when)
                self._records.append((self._seq, kind, path, other, seen[0] if seen else when))
            if not out:
                return self._seq
            self._append(out)
            seq = self._seq
        if sync:
            self.sync()
        return seq

    def sync(self) -> None:
        """Make every record written so far durable (one fdatasync covers them all).  A journal
        that cannot be is said once and written whole again when it can be (see the module
        docstring); nothing is raised: the changes are mirrored all the same."""
        with self._sync_lock:
            target = self._seq
            if target <= self._synced:
                return
            if not self._lost:
                try:
                    os.fdatasync(self._fd)
                except OSError as exc:
                    self._lose(f"cannot make it durable ({exc.strerror})")
                else:
                    self._synced = target
                    return
        self._rewrite()

    def _lose(self, why: str) -> None:
        """The file can no longer be trusted to hold every record: say so once."""
        if not self._lost:
            self._lost = True
            self._rewrite_tried = time.monotonic()
            log.warning("journal %s: %s: changes are mirrored, but not journaled durably until it is rewritten",
                        display_path(self.path), why)  # fmt: skip

    def _rewrite(self) -> None:
        """Write the journal whole into a new file, at most every REWRITE_RETRY seconds."""
        with self._lock:
            if not self._lost or time.monotonic() - self._rewrite_tried < REWRITE_RETRY:
                return
            self._rewrite_tried = time.monotonic()
            with contextlib.suppress(OSError):  # still failing: tried again later
                self._compact()

    def checkpoint(self, seq: int, cursor: bytes = b"") -> None:
        """Everything up to ``seq`` is mirrored to destination ``cursor``.  Not fsynced: losing
        it only replays more.

        The records it covers are made durable first: a change is never marked done before
        the record that it was seen is safely on disk (unless the journal cannot be made
        durable: it is rewritten whole, this checkpoint with it, once it can be)."""
        self.sync()
        with self._lock:
            if seq <= self._done_at[cursor]:
                return
            before = self._floor
            self._done_at[cursor] = seq
            record = self._encode(seq, CHECKPOINT, cursor, None, time.time())
            self._trim()
            if self._floor > before:
                self._index()
            self._append(record)
            if self._size > COMPACT_BYTES:
                try:
                    self._compact()
                except OSError as exc:  # a full disk: the journal stays as it is, only larger
                    log.warning("journal %s: cannot compact it: %s", display_path(self.path), exc.strerror)

    def _append(self, out: bytes) -> None:
        """Append records whole or not at all.  A part (a full disk) would hide every later
        record from the next reader, which stops at the first torn one, so it is cut off.
        Records that could not be written stay in memory: this run still mirrors them, and
        the journal is written whole again once it can be (``sync``)."""
        try:
            written = os.write(self._fd, out)
        except OSError as exc:
            written, error = 0, exc.strerror
        else:
            error = None if written == len(out) else os.strerror(errno.ENOSPC)
        if error is None:
            self._size += written
            return
        if written:
            with contextlib.suppress(OSError):  # else the part stays until the rewrite replaces the file
                os.ftruncate(self._fd, self._size)
                os.lseek(self._fd, self._size, os.SEEK_SET)
        self._lose(f"cannot write it ({error})")

    def _trim(self) -> None:
        """Drop what every destination has passed; let go of a destination that holds more than
        ``max_retained`` records on its own (it will be reconciled by a full sync)."""
        newest = self._seq
        while True:
            floor = self._floor
            if self._records and self._records[0][0] <= floor:
                self._records = [r for r in self._records if r[0] > floor]
            # only the slowest destination is let go, then what the others still need is
            # counted again: a destination within the bound is never let go with it
            if len(self._records) <= self._max_retained:
                return
            slowest = min(self._cursors, key=self._kept_from)
            if self._held.get(slowest) is not None and self._held[slowest] < self._done_at[slowest]:
                self._held[slowest] = None  # only kept for a replay: a reconnection resyncs in full
                continue
            if self._done_at[slowest] >= newest or len(self._cursors) < 2:
                return
            log.warning("journal %s: destination %s is %d records behind: it will be resynced in full",
                        display_path(self.path), slowest.decode(errors="replace"),
                        newest - self._done_at[slowest])  # fmt: skip
            self._overrun.add(slowest)
            self._done_at[slowest] = newest

    def overrun(self, cursor: bytes = b"") -> bool:
        """True once: ``cursor`` was let go (too far behind); its next session must be a full sync."""
        with self._lock:
            if cursor in self._overrun:
                self._overrun.discard(cursor)
                return True
            return False

    def _compact(self) -> None:
        # every destination's position first, then the records someone still needs; the
        # positions also keep the sequence numbers rising across the rewrite
        data = b"".join(self._encode(self._done_at[c], CHECKPOINT, c, None) for c in self._cursors
                        if self._done_at[c] or len(self._cursors) > 1)  # fmt: skip
        data += b"".join(self._encode(seq, kind, path, other, when) for seq, kind, path, other, when in self._records)
        if not data:
            data = self._encode(self._seq, CHECKPOINT, self._cursors[0], None)
        atomic_write(self.path, data, 0o600)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:  # appends would go on to the old file, no longer the journal
            self._lose(f"cannot open it again ({exc.strerror})")
            raise
        with self._sync_lock:
            os.close(self._fd)
            self._fd = fd
            self._synced = self._seq  # every record still needed is in the new file, fsynced
        self._size = len(data)
        if self._lost:
            self._lost = False
            log.warning("journal %s: rewritten whole: changes are journaled durably again", display_path(self.path))

    def compact(self) -> None:
        with self._lock:
            self._compact()

    def pending(self, up_to: int | None = None, cursor: bytes = b"") -> Pending:
        """The changes not yet checkpointed for ``cursor`` (up to sequence ``up_to``), merged."""
        with self._lock:
            done = self._done_at[cursor]
            records = [r for r in self._records if r[0] > done and (up_to is None or r[0] <= up_to)]
        return _merge(records, done)

    def take(self, cursor: bytes = b"") -> Pending:
        """The pending changes, handed to a session that will act on them: from now on a new
        change to one of these entries is journaled again (see ``append``)."""
        with self._lock:
            self._taken_at[cursor] = taken = self._seq
        return self.pending(up_to=taken, cursor=cursor)

    def rewind(self, seq: int, cursor: bytes = b"") -> bool:
        """Move ``cursor``'s position to ``seq`` (what its destination says it has applied),
        back or forth, so that its next batch replays every record after ``seq``.  False
        if the journal cannot: ``seq`` is past the newest record, or records after it were
        dropped (every destination had them, or this one was let go: ``overrun``)."""
        with self._lock:
            if seq > self._seq or seq < self._floor or cursor in self._overrun:
                return False
            if seq <= self._done_at[cursor]:
                self._done_at[cursor] = seq  # the records after it are all still held
                return True
        self.checkpoint(seq, cursor)
        return True

    def hold(self, seq: int | None, cursor: bytes = b"") -> None:
        """Keep the records after ``seq`` (what ``cursor``'s replica recorded as applied, below
        its checkpoint when a session deferred or failed a file) for a replay after a
        reconnection; None: keep nothing for it beyond its checkpoint.  Bounded like the
        rest: past ``max_retained`` the hold is dropped."""
        with self._lock:
            before = self._floor
            self._held[cursor] = seq
            if self._floor > before:
                self._trim()
                self._index()

    def position(self, cursor: bytes = b"") -> tuple[int, int]:
        """(the last sequence mirrored to ``cursor``, the newest sequence journaled)."""
        with self._lock:
            return self._done_at[cursor], self._seq

    def cursor(self, name: bytes) -> JournalCursor:
        return JournalCursor(self, name)

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class JournalCursor:
    """One destination's view of a shared journal: the ``Journal`` methods a pair uses, with
    its own position."""

    def __init__(self, journal: Journal, name: bytes):
        if name not in journal._done_at:
            raise ValueError(f"journal {display_path(journal.path)}: no destination {name!r}")
        self.journal, self.name = journal, name

    @property
    def replayed(self) -> int:
        return len(self.journal.pending(cursor=self.name))

    def append(self, changes, when=None, force: bool = False, sync: bool = True) -> int:
        return self.journal.append(changes, when, force=force, sync=sync)

    def sync(self) -> None:
        self.journal.sync()

    def checkpoint(self, seq: int) -> None:
        self.journal.checkpoint(seq, self.name)

    def pending(self, up_to: int | None = None) -> Pending:
        return self.journal.pending(up_to, self.name)

    def take(self) -> Pending:
        return self.journal.take(self.name)

    def position(self) -> tuple[int, int]:
        return self.journal.position(self.name)

    def rewind(self, seq: int) -> bool:
        return self.journal.rewind(seq, self.name)

    def hold(self, seq: int | None) -> None:
        self.journal.hold(seq, self.name)

    @property
    def token(self) -> str:
        return self.journal.token

    def overrun(self) -> bool:
        return self.journal.overrun(self.name)
