"""``mirror daemon``: live mirroring of one or more trees, change by change.

Per pair (source tree -> destination), a ``LivePair`` thread.  The pairs that mirror the
same tree to several destinations (a fan-out) share one ``SourceFeed``: one watcher and one
journal, in which each destination has its own position, so a slow or absent destination
never holds the others back; the journal keeps a record until every destination has it.

1. opens the change journal and starts watching the tree (before anything else, so
   no change can slip between the first scan and the first event);
2. syncs the whole tree once (an unchanged replica costs one scan on each side);
3. then, for every batch of changes the watcher reports (journaled and fsynced first),
   runs a *scoped* session on one persistent connection: only the changed entries are
   looked at, renames are done as renames, new directories are scanned whole.

Files still open for writing wait for their close, but never longer than
``open_file_delay`` (an always-open database file is mirrored anyway).  While a mirroring
lock exists (here, or on the receiver) nothing is sent and changes keep being journaled;
when it goes, the journal is caught up first (time proportional to the changes), then the
whole tree is reconciled.  A lost connection is retried with backoff; an older epoch than
the receiver's (``StaleEpochError``) stops the pair for good: a fenced node must not retry.

Each session tells the receiver what it covers of the journal (``_claim``), and the receiver
records it once the session committed everything (``mirror.applied``, docs/PROTOCOL.md).
On reconnection the receiver reports that record: if it is of this journal run, at the
tree's epoch, and the journal still holds every change after it, only those are replayed
(a scoped session); otherwise the whole tree is synced (``_replay_refused`` says why).
SIGTERM abandons the file in flight cleanly; SIGHUP reloads the configuration.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import xxhash

from .applied import Applied
from .atomicfile import write_swapped
from .errors import (
    Cancelled,
    ConnectError,
    ConnectionLost,
    LockedError,
    MirrorError,
    PeerTimeout,
    SourceGuardError,
    StaleEpochError,
    display_path,
    fs_path,
    os_error_message,
)
from .exclude import make_excluder
from .guard import fs_identity
from .journal import ENTRY, MAX_RETAINED, RENAME, Journal, Pending
from .lockfile import is_locked
from .protocol import MAX_FRAME
from .secretfile import read_secret_file
from .sourcestate import StateDirKeeper
from .statedir import STATUS_FILE, check_root, ensure_state_dir, resolve_state_dir
from .transfer import DEFAULT_CONTIMEOUT, DEFAULT_TIMEOUT, Connection
from .treescan import Scope
from .watch import CLOSED, RESCAN, TREE, Watcher
from .watch import ENTRY as W_ENTRY
from .watch import RENAME as W_RENAME

log = logging.getLogger(__name__)

_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# A halted pair (its source is not the tree it mirrors, or its deletions were refused) tries
# a full sync again after these many seconds: a source mounted again resumes by itself.
_HALT_BACKOFF = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# How long a stop waits for the pairs' sessions to end, all together: well within systemd's
# TimeoutStopSec (30 s in packaging/systemd/mirror-daemon.service), so the status says "stopped".
STOP_SECONDS = 10.0
RETRY_MAX_SECONDS = 30.0  # a file that keeps failing is tried at least this often
SOURCE_CHECK_SECONDS = 1.0  # how often an idle pair checks its source is still the same filesystem
# A scoped session that gave a linked file new content (or a name) without seeing its other
# names is followed by a whole-tree compare, which links them again: at most this often.
LINKS_RESYNC_SECONDS = 10.0
STATUS_INTERVAL = 0.5  # the status file is rewritten at least this often
STATUS_MIN_INTERVAL = 0.1  # and after a session, within this (at most this often)
# States an operator must see (logged as warnings); halted and fenced log an error of their own.
ALERT_STATES = ("disconnected", "unreachable", "locked", "catching up", "error")
FALLING_BEHIND_SECONDS = 10.0  # the oldest change not mirrored for this long: a warning
# A scoped session names its paths and renames in its ``start`` frame.  Past these, a batch
# (a destination back after a mass delivery, a restore, a mass rename) would never fit the
# frame or the receiver's limits: the whole tree is compared instead, cheaper by then anyway.
SESSION_PATHS_MAX = 100_000
SESSION_BYTES_MAX = MAX_FRAME // 2


class _Halted(Exception):
    """The pair must not go on mirroring (``reason``) until a full sync passes the guards."""


@dataclass(frozen=True)
class PairConfig:
    name: str
    source: bytes
    destination: str
    secret_file: str | None = None
    lock_file: bytes | None = None
    state_dir: bytes | None = None
    excludes: tuple[bytes, ...] = ()
    delete: bool = True
    max_delete: int | None = None  # a session that would delete more deletes nothing: the pair halts
    allow_mass_delete: bool = False  # let the source and deletion guards through (mirror.guard)
    timeout: float | None = DEFAULT_TIMEOUT  # a receiver silent this long is unreachable (0/None: never)
    contimeout: float | None = DEFAULT_CONTIMEOUT
    rsh: str = "ssh -T"  # HOST:PATH: the remote shell, and the mirror command it runs over there
    remote_command: str = "mirror"
    dst_require_mount: bool | None = None  # the replica's disk rule (replicadisk): the pair halts while unmounted
    index: int = field(default=0, compare=False)  # its [[pair]]'s place in the file, for messages naming its keys

    @property
    def tree_state_dir(self) -> bytes:
        return resolve_state_dir(self.source, self.state_dir)

    @property
    def journal_path(self) -> bytes:
        tag = xxhash.xxh3_64_hexdigest(self.destination.encode("utf-8", "surrogateescape"))
        return os.path.join(self.tree_state_dir, b"journal-" + tag.encode())

    @property
    def feed_key(self) -> tuple:
        """Pairs with equal keys watch the same tree the same way: they share a feed."""
        return (os.path.realpath(self.source), self.tree_state_dir, self.excludes)

    @property
    def cursor(self) -> bytes:
        return self.name.encode("utf-8", "surrogateescape")


class SourceFeed:
    """One source tree's watcher and change journal, shared by the pairs that mirror it (one
    per destination).  A change is journaled once, durably, and every pair is woken; each
    pair checkpoints its own position (``Journal`` cursors)."""

    def __init__(self, pairs: list[PairConfig], max_retained: int = MAX_RETAINED):
        first = pairs[0]
        check_root(first.source)
        ensure_state_dir(first.tree_state_dir)
        self.source = first.source
        if len(pairs) == 1:
            # one destination: the journal it has always had, its position unnamed
            self.cursors = {first.name: b""}
            path = first.journal_path
        else:
            self.cursors = {p.name: p.cursor for p in pairs}
            tag = xxhash.xxh3_64_hexdigest(b"fan-out\0" + os.path.realpath(first.source))
            path = os.path.join(first.tree_state_dir, b"journal-" + tag.encode())
        self.journal = Journal(path, tuple(self.cursors.values()), max_retained=max_retained)
        self.state = StateDirKeeper(first.tree_state_dir, self.journal)
        self._excluder = make_excluder(first.excludes)
        self._pairs: list[LivePair] = []
        self._lock = threading.Lock()
        self.watcher = self._new_watcher()

    def _new_watcher(self) -> Watcher:
        return Watcher(self.source, self._on_changes, self._excluder.excluded if self._excluder else None)

    def cursor(self, pair: PairConfig):
        return self.journal.cursor(self.cursors[pair.name])

    def subscribe(self, pair: LivePair) -> None:
        with self._lock:
            self._pairs.append(pair)

    def start(self) -> None:
        self.watcher.start()

    def rewatch(self) -> None:
        """The old watches died with the filesystem they were on: watch the tree again."""
        with self._lock:
            self.watcher.stop()
            self.watcher = self._new_watcher()
            self.watcher.start()
            pairs = list(self._pairs)
        for pair in pairs:
            pair._need_full = True  # what changed before the new watches were in place

    def stop(self) -> None:
        self.watcher.stop()
        self.journal.close()

    def _on_changes(self, changes) -> None:
        """Runs in the watchdog thread: journal (durably) first, then wake the pairs."""
        records = []
        for c in changes:
            if c.kind in (W_ENTRY, CLOSED):
                records.append((ENTRY, c.path, 0))
            elif c.kind == TREE:
                records.append((ENTRY, c.path, 1))
            elif c.kind == W_RENAME:
                records.append((RENAME, c.path, c.other))
            elif c.kind == RESCAN:
                log.warning("%s: change events were lost (inotify overflow or watch limit): rescanning",
                            display_path(self.source))  # fmt: skip
                records.append((ENTRY, c.path, 1))
        with self._lock:
            pairs = list(self._pairs)
        wake = [pair for pair in pairs if pair._saw(changes)]
        # Written at once, made durable right after the pairs are woken: the fdatasync runs
        # while the change is being mirrored, and the change is checkpointed only after both.
        self.journal.append(records, sync=False)
        for pair in wake:
            with pair._cond:
                pair._cond.notify_all()
        self.journal.sync()


@dataclass(frozen=True)
class DaemonConfig:
    pairs: tuple[PairConfig, ...]
    status_dir: bytes
    coalesce: float = 0.0005
    open_file_delay: float = 1.0
    metrics: tuple[str, int] | None = None
    reconcile_interval: float | None = None  # a full sync this often (None: only when needed)
    # A destination away while the others take more than this many changes is let go: a
    # full sync when it returns, instead of a replay of the journal (``Journal.max_retained``).
    journal_retain: int = MAX_RETAINED


@dataclass
class PairStatus:
    name: str
    source: str
    destination: str
    state: str = "starting"
    since: float = field(default_factory=time.time)
    last_sync: float | None = None
    last_session_seconds: float | None = None
    pending: int = 0
    lag_seconds: float = 0.0
    lag_bytes: int = 0
    last_error: str | None = None
    sessions: int = 0
    files_sent: int = 0
    bytes_sent: int = 0
    failures: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    last_success: float | None = None  # end of the last session in which no file failed
    failed_files: list = field(default_factory=list)  # [[path, reason], ...] of the last session, at most 20
    # Source directories that cannot be watched (their changes arrive only when they are
    # tried again and rescanned): how many, [[path, reason], ...] of at most 20, and when
    # the next try is due (Unix time; None: none unwatched).
    unwatched_count: int = 0
    unwatched_dirs: list = field(default_factory=list)
    rewatch_at: float | None = None
    progress: dict | None = None  # during a full sync or catch-up: entries and bytes done (of total, if known)
    mirrored_seq: int = 0  # this destination's position in the tree's journal
    journal_seq: int = 0  # the newest change journaled
    # What the replica's receiver says it has applied: {"epoch", "seq", "journal"} (None:
    # not known yet, or nothing recorded), and how far behind the newest change that is.
    applied: dict | None = None
    lag_entries: int | None = None
    # How the last (re)connection caught up: {"how": "journal" or "full", "reason", "from",
    # "changes", "at"}; and how many of each so far.
    catch_up: dict | None = None
    journal_catch_ups: int = 0
    full_syncs: int = 0
    # Entries a scheduled whole-tree compare (``reconcile_interval``) found different though
    # no change was seen in the source (the replica changed behind the daemon's back, or an
    # event was lost): how many so far, and at most 20 paths of the last compare that found any.
    unseen_repaired: int = 0
    last_unseen: list = field(default_factory=list)
    # When the last whole-tree compare ended with nothing left out (Unix time): the replica
    # was then found whole, whatever no event told; and the interval of the scheduled ones.
    last_compare: float | None = None
    reconcile_interval: float | None = None
    # The epoch this pair sent at when the replica refused it as older (it then stops for
    # good; hawrap starts the daemon again once the tree's epoch is above it: see
    # ``MirrorControl.restart_fenced``).
    fenced_epoch: int | None = None


class LivePair:
    """One source tree mirrored live to one destination (see the module docstring)."""

    def __init__(self, config: PairConfig, daemon: DaemonConfig, metrics=None, feed: SourceFeed | None = None,
                 on_state=None):  # fmt: skip
        """``feed``: shared with the other pairs of the same tree (None: one of its own).
        ``on_state()``: called after every change of state (the daemon writes its status)."""
        self.config = config
        self.daemon = daemon
        self.metrics = metrics
        self.on_state = on_state
        self.status = PairStatus(config.name, display_path(config.source), config.destination,
                                 reconcile_interval=daemon.reconcile_interval)  # fmt: skip
        self._labels = (config.name, config.destination)  # the metrics' pair and destination
        self._own_feed = feed is None
        self.feed = SourceFeed([config], daemon.journal_retain) if feed is None else feed
        self.journal = self.feed.cursor(config)
        self._cond = threading.Condition()
        self._open_files: dict[bytes, float] = {}
        self._missed: dict[bytes, str] = {}  # what the last session could not mirror, and why (logged once)
        self._retry: dict[bytes, tuple[float, int]] = {}  # failed path -> (when it is due again, failures)
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._need_full = True
        self._latencies: deque[float] = deque(maxlen=2000)
        self._last_session_end = 0.0
        self._connection: Connection | None = None
        self._thread = threading.Thread(target=self._run, name=f"pair-{config.name}", daemon=True)
        self.fenced = False
        self._source_fs: tuple[int, int] | None = None  # where the source was at the last full sync
        self._last_source_check = 0.0
        self._halts = 0
        self._watch_stale = False  # the source's filesystem went away under the watches
        self._behind = False  # warned that the pair falls behind
        # The oldest pending change's journaled time, and when (time.monotonic()) it was first
        # seen oldest, less its age then: what its age is measured from from then on.
        self._oldest: tuple[float, float] | None = None
        # What the replica has applied (its receiver's record), and what keeps a scoped
        # session from claiming it covers the journal up to its batch: paths deferred or
        # failed since the record (``_outstanding``), a subtree left unread (``_gap``).
        self._replica: Applied | None = None
        self._outstanding: set[bytes] = set()
        self._gap = False
        # A full sync due then (monotonic time, ``_full_at``): the last one could not be
        # recorded, the replica taking only part of our epoch (``MAX_EPOCH_STEP`` a session),
        # or a session missed a linked file's other names.
        self._full_due_at: float | None = None
        # Why one is due, if one is: "follow-up" (``_full_due_at``) or "schedule"
        # (``reconcile_interval``, alone: what it finds was told by no event, while a linked
        # file's follow-up finds the other names it is for).
        self._recheck_due: str | None = None
        self._differences: list[bytes] | None = None  # what a scheduled one changes, while it runs
        self._last_full = time.monotonic()  # the end of the last full sync (or the start)
        self._epoch_resyncs = 0
        self._links_resync_at = -LINKS_RESYNC_SECONDS  # the last one asked (LINKS_RESYNC_SECONDS)
        # The watcher saw a file with other names change since the last full sync began: its
        # other names changed too, though no event names them.
        self._links_changed = False
        # Files changed in place (content or attributes) since a session covered them: (a
        # number per change, so that one during the session that covers a path is not
        # forgotten with it; whether the name was gone when the watcher read it).  One of
        # them at a name whose replica file had other names, and that the source has no more
        # (or holds another file at), or gone then and below a directory the source has no
        # more, may have been changed through that name before it went
        # (``plan.Planner.replaced``): its other names changed too.
        self._written: dict[bytes, tuple[int, bool]] = {}
        self._writes = itertools.count()
        self._written_lock = threading.Lock()  # the watcher's thread writes it too
        self._let_go = False  # the journal let this destination go: its next sync is a full one
        self.feed.subscribe(self)
        if self.journal.replayed:
            log.info("%s: %d changes from the journal to replay", config.name, self.journal.replayed)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._own_feed:
            self.feed.start()
        self._thread.start()

    def stop(self, deadline: float | None = None) -> None:
        """End the pair: its session abandons the file in flight; waited for until ``deadline``
        (``time.monotonic()``; by default STOP_SECONDS from now)."""
        self.request_stop()
        self.finish_stop(time.monotonic() + STOP_SECONDS if deadline is None else deadline)

    def request_stop(self) -> None:
        self._stop.set()
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()

    def finish_stop(self, deadline: float) -> None:
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            # Held in the kernel (a hung source or disk): the process leaves it behind when it
            # exits; the replica keeps every file whole, and the next start cleans up.
            log.error("%s: did not stop within %g s (%s; a hung source or disk?): left behind", self.config.name,
                      STOP_SECONDS, self.status.state)  # fmt: skip
        self._disconnect()
        if self._own_feed:
            self.feed.stop()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _set_state(self, state: str, error: str | None = None) -> None:
        changed = state != self.status.state
        if changed:
            # Entering an alert state, and leaving one for live, is what an operator must see.
            alert = state in ALERT_STATES or (state == "live" and self.status.state in ALERT_STATES + ("halted",))
            log.log(logging.WARNING if alert else logging.INFO, "%s: %s%s", self.config.name, state,
                    f" ({error})" if error else "")  # fmt: skip
            self.status.state = state
            self.status.since = time.time()
        if error is not None:
            self.status.last_error = error
        if self.metrics is not None:
            self.metrics.state(self._labels, state)
        if changed:
            self._report(force=True)

    def _report(self, force: bool = False) -> None:
        """Tell the daemon to write its status: at once on a change of state (``force``),
        soon after a session (what is pending changed)."""
        if self.on_state is not None:
            self.on_state(force)

    # -- changes from the watcher -----------------------------------------------------------

    def _saw(self, changes) -> bool:
        """From the feed (the watchdog thread): note the files still open; True if the pair
        must wake (a file still being written does not wake it: its close will)."""
        now = time.monotonic()
        wake = False
        for c in changes:
            wake = wake or not (c.kind == W_ENTRY and c.open)
            if c.kind == W_ENTRY:
                if c.open:
                    self._open_files.setdefault(c.path, now)
                if c.linked:
                    self._links_changed = True
                if c.written:
                    with self._written_lock:
                        self._written[c.path] = (next(self._writes), c.gone)
            elif c.kind == CLOSED:
                self._open_files.pop(c.path, None)
            elif c.kind == W_RENAME:
                if c.path in self._open_files:
                    self._open_files[c.other] = self._open_files.pop(c.path)
            elif c.kind == RESCAN and not c.path:
                self._need_full = True
        return wake

    # -- the pair's loop --------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if self.config.lock_file and is_locked(self.config.lock_file):
                    self._set_state("locked")
                    self._after_lock = True
                    self._wait(0.1)
                    continue
                self._check_source()
                batch = self._next_batch()
                if batch is None:
                    continue
                if self._connect():
                    batch = self.journal.take()  # from the replica's own position on
                full = self._need_full or self._recheck_due is not None
                # A compare of a replica kept up to date (nothing else calls for it) leaves the
                # pair live: hawrap counts a standby up to date only while its pair is.
                recheck = not self._need_full and self.status.state == "live"
                failed = self._session(batch, full=full, recheck=recheck)
                if full:
                    self._resumed()
                failures = 0
                if failed:
                    # Files that failed stay journaled; do not spin on them.
                    self._failed_rounds = getattr(self, "_failed_rounds", 0) + 1
                    self._wait(min(30.0, 0.5 * 2 ** min(self._failed_rounds, 6)))
                else:
                    self._failed_rounds = 0
            except StaleEpochError as exc:
                if self.feed.state.check():
                    continue  # it read epoch 0 from a state dir removed under it, now made again
                self.status.fenced_epoch = exc.sent_epoch
                self._set_state("fenced", str(exc))
                self.fenced = True
                log.error("%s: %s; this pair stops (a fenced node must not mirror)", self.config.name, exc)
                return
            except Cancelled:
                return
            except (SourceGuardError, _Halted) as exc:
                self._halt(str(exc))
            except (ConnectError, PeerTimeout) as exc:
                failures += 1
                delay = _BACKOFF[min(failures - 1, len(_BACKOFF) - 1)]
                self._set_state("unreachable", str(exc))
                log.warning("%s: the replica is unreachable: %s; trying again in %g s", self.config.name, exc, delay)
                self._disconnect()
                self._wait(delay)
            except LockedError as exc:
                self._set_state("locked", str(exc))
                self._after_lock = True
                self._disconnect()
                self._wait(1.0 if "receiver" in str(exc) else 0.1)
            except (MirrorError, OSError) as exc:
                failures += 1
                self._set_state("disconnected", str(exc))
                self._disconnect()
                self._wait(_BACKOFF[min(failures - 1, len(_BACKOFF) - 1)])
            except Exception as exc:
                # A bug must not end the pair's thread: the status would go on saying what it
                # said last ("live") while nothing is mirrored.  Said, then tried again whole.
                failures += 1
                log.exception("%s: internal error; the pair starts again with a full sync", self.config.name)
                self._set_state("error", f"internal error: {type(exc).__name__}: {exc}")
                self._disconnect()
                self._need_full = True
                self._wait(_BACKOFF[min(failures - 1, len(_BACKOFF) - 1)])

    def _wait(self, seconds: float) -> None:
        """Until ``seconds`` pass or a change or stop wakes the pair; an open connection is
        kept alive meanwhile (the receiver ends one silent for long, see ``Sender.idle``)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            with self._cond:
                woken = self._cond.wait(timeout=min(left, 1.0))
            if self._connection is not None:
                self._connection.idle()
            if woken or self._stop.is_set():
                return

    # -- the guards (mirror.guard) ------------------------------------------------------------

    def _check_source(self) -> None:
        """An unmounted source reports no event at all: its watches just die.  So an idle pair
        checks, every SOURCE_CHECK_SECONDS, that its root is still where the last full sync
        found it (a ``stat`` and a ``statvfs``), and that its state dir is still there
        (``sourcestate``)."""
        now = time.monotonic()
        if self._source_fs is None or now - self._last_source_check < SOURCE_CHECK_SECONDS:
            return
        self._last_source_check = now
        reason = "unmounted, or another one mounted in its place?"
        try:
            current = fs_identity(self.config.source)
        except OSError as exc:
            current, reason = None, exc.strerror
        if current != self._source_fs:
            self._watch_stale = True
            raise _Halted(f"the source {display_path(self.config.source)} is no longer the filesystem it was "
                          f"({reason})")  # fmt: skip
        self.feed.state.check()

    def _halt(self, reason: str) -> None:
        """Stop mirroring this pair (nothing more is sent, the replica's writer lock is let go
        for the administrator), say why, and try a full sync again later."""
        self._halts += 1
        delay = _HALT_BACKOFF[min(self._halts - 1, len(_HALT_BACKOFF) - 1)]
        self._set_state("halted", reason)
        log.error("%s: halted, nothing is mirrored: %s (a full sync is tried again in %g s; changes are journaled "
                  "meanwhile)", self.config.name, reason, delay)  # fmt: skip
        self._disconnect()
        self._need_full = True
        self._source_fs = None
        self._wait(delay)

    def _resumed(self) -> None:
        """A full sync passed the guards: remember where the source is; after a halt caused by
        its filesystem going away, watch the tree again (the old watches died with it); the
        tree's identity, recorded by the first one, is remembered at once."""
        self._source_fs = fs_identity(self.config.source)
        self._last_source_check = time.monotonic()
        self.feed.state.check()
        if self._halts:
            log.warning("%s: the guards pass again: mirroring resumes", self.config.name)
            self._halts = 0
        if self._watch_stale:
            self._watch_stale = False
            self.feed.rewatch()

    def _next_batch(self) -> Pending | None:
        """Wait for changes (and a short coalescing window); None to go round the loop again."""
        now = time.monotonic()
        if self._full_due_at is not None and now >= self._full_due_at:
            self._full_due_at = None
            self._recheck_due = "follow-up"
        if self.daemon.reconcile_interval and now - self._last_full >= self.daemon.reconcile_interval:
            self._recheck_due = self._recheck_due or "schedule"
        if self.journal.overrun():
            self._need_full = True  # too far behind: the journal let this destination go
            self._let_go = True
        if self._need_full or self._recheck_due or getattr(self, "_after_lock", False):
            return self.journal.take()
        with self._cond:
            idle = not len(self.journal.pending())
            if idle:
                if self._connection is None:
                    # Lost while idle: connected again at once, so that "live" stays true (the
                    # replica's record then says what it lacks, if it changed meanwhile).
                    return self.journal.take()
                self._cond.wait(timeout=self._idle_timeout(time.monotonic(), set()))
        if idle:  # outside the lock: the watcher must never wait for the network
            if self._connection.hung_up():
                raise ConnectionLost(f"{self.config.destination}: the receiver ended the connection while idle")
            self._connection.idle()
            return None
        if self.daemon.coalesce and time.monotonic() - self._last_session_end < 0.05:
            # Busy (a session ended a moment ago): wait a little to take the burst in one session.
            # After a quiet spell a change is sent at once.
            time.sleep(self.daemon.coalesce)
        pending = self.journal.take()
        return pending if len(pending) else None

    def _full_at(self, when: float) -> None:
        """A full sync due at ``when`` (monotonic time), unless one is due sooner."""
        self._full_due_at = when if self._full_due_at is None else min(self._full_due_at, when)

    def _not_due(self, batch: Pending, now: float) -> set[bytes]:
        """The paths of ``batch`` that failed before and are not due to be tried again (but
        for a rename's, which goes with it)."""
        if not self._retry:
            return set()
        renamed = {path for rename in batch.renames for path in rename}
        return {p for p in batch.entries.keys() | batch.trees if self._retry.get(p, (0.0, 0))[0] > now} - renamed

    def _schedule_retries(self, failed: set[bytes], tried) -> None:
        """Each path that failed again is tried next after a backoff of its own (0.5 s, doubling
        up to RETRY_MAX_SECONDS): a busy tree's sessions would otherwise read it, and send it,
        again each time.  ``tried``: the paths the session covered (None: all of them)."""
        now = time.monotonic()
        if tried is None:
            self._retry = {p: self._retry[p] for p in failed if p in self._retry}
        else:
            for path in tried - failed:
                self._retry.pop(path, None)
        for path in failed:
            rounds = self._retry.get(path, (0.0, 0))[1]
            self._retry[path] = (now + min(RETRY_MAX_SECONDS, 0.5 * 2**rounds), rounds + 1)

    def _idle_timeout(self, now: float, deferred: set[bytes]) -> float:
        """How long a pair with nothing to do now may wait: until a file open for writing is
        due anyway, or one of the failed ``deferred`` is due again."""
        due = [self._retry[p][0] for p in deferred]
        if self._open_files:
            due.append(min(self._open_files.values()) + self.daemon.open_file_delay)
        return max(0.01, min(due) - now) if due else 1.0

    def _connect(self) -> bool:
        """Connect if not connected; True if the new connection catches up from the journal
        (the pair's position was moved to the replica's), False otherwise."""
        if self._connection is not None:
            return False
        self._set_state("connecting")
        c = self.config
        self._connection = Connection(
            c.source, c.destination, delete=c.delete, excludes=c.excludes,
            secret=read_secret_file(c.secret_file) if c.secret_file else None,
            lock_file=c.lock_file, state_dir=c.state_dir, cancel=self._cancel, keep_changes=False,
            max_delete=c.max_delete, allow_mass_delete=c.allow_mass_delete, timeout=c.timeout,
            contimeout=c.contimeout, rsh=c.rsh, remote_command=c.remote_command, dst_require_mount=c.dst_require_mount,
            on_change=self._progress_entry,
            on_progress=self._progress_bytes,
        ).open()  # fmt: skip
        self._replica = _applied(self._connection.welcome.get("applied"))
        self._outstanding.clear()
        reason = self._replay_refused()
        if reason is None and self.journal.rewind(self._replica.seq):
            changes = len(self.journal.pending())
            self._caught_up("journal", f"the replica has sequence {self._replica.seq} of this journal",
                            self._replica.seq, changes)  # fmt: skip
            return True
        # whatever happened while we were apart: reconcile the whole tree
        self._caught_up("full", reason or "the journal no longer holds what the replica lacks", None, None)
        self._need_full = True
        return False

    def _replay_refused(self) -> str | None:
        """Why the journal cannot bring the replica up to date (None: it can)."""
        rec = self._replica
        if self._let_go:
            return f"more than {self.daemon.journal_retain} changes behind: the journal let this destination go"
        if self._need_full:
            return "a full sync is due (first sync, lost events, or a halt)"
        if getattr(self, "_after_lock", False):
            return "after a mirroring lock the whole tree is reconciled"
        if self._connection.local is not None:
            return "a local replica keeps no record of what it applied"
        if rec is None:
            return "the replica has no record of what it applied"
        if rec.journal != self.journal.token:
            return "the replica's record is not of this journal"
        from .epoch import read_epoch

        epoch = read_epoch(self.config.tree_state_dir)
        if rec.epoch != epoch:
            return f"the replica's record is of epoch {rec.epoch}, this tree is at {epoch}"
        return None

    def _caught_up(self, how: str, reason: str, start: int | None, changes: int | None) -> None:
        st = self.status
        st.catch_up = {"how": how, "reason": reason, "from": start, "changes": changes, "at": time.time()}
        if how == "journal":
            st.journal_catch_ups += 1
            log.info("%s: catching up from the journal: %d changes after sequence %d", self.config.name,
                     changes, start)  # fmt: skip
        else:
            st.full_syncs += 1
            log.info("%s: full sync: %s", self.config.name, reason)

    def _progress_entry(self, change) -> None:
        if self._differences is not None:
            self._differences.append(change.path)
        progress = self.status.progress
        if progress is not None:
            progress["entries"] += 1

    def _progress_bytes(self, count: int) -> None:
        progress = self.status.progress
        if progress is not None:
            progress["bytes"] += count

    def _disconnect(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except (MirrorError, OSError):
                pass
            self._connection = None

    def _session(self, batch: Pending, full: bool, recheck: bool = False) -> bool:
        """Mirror ``batch`` (or everything): then checkpoint it, keeping what must wait.
        ``recheck``: a full sync of a live pair that nothing but a schedule calls for."""
        now = time.monotonic()
        after_lock = getattr(self, "_after_lock", False)
        if full and after_lock and len(batch):
            # Catch up from the journal first (proportional to the changes), reconcile after.
            full = False
            self._need_full = True
        if not full and not _fits_a_session(batch):
            self._caught_up("full", f"{len(batch)} changes are more than one session names", None, None)
            full = True
        waiting = {p for p, t in self._open_files.items() if now - t < self.daemon.open_file_delay}
        for p in list(self._open_files):
            if p not in waiting:
                self._open_files[p] = now  # mirrored now; if still open, again after the delay
        deferred = set() if full else self._not_due(batch, now)
        entries = {p: t for p, t in batch.entries.items() if p not in waiting and p not in deferred}
        trees = batch.trees - deferred
        if full:
            scope = None
            self._links_changed = False  # this sync compares every name
            with self._written_lock:
                self._written.clear()
            self._set_state("live" if recheck else "syncing")
        else:
            if not entries and not trees and not batch.renames:
                if self.status.state == "connecting":
                    self._set_state("live")  # connected again with nothing to send
                self._checkpoint(batch, waiting | deferred, trees=batch.trees & deferred)
                # Only files still open, or failed ones not due again: wait for the first of
                # them (a change or a close wakes the pair sooner), not round the loop.
                self._wait(self._idle_timeout(now, deferred))
                return False
            scope = Scope(entries=_with_directories(entries), trees=trees)
            self._set_state("catching up" if after_lock else "live")
        started = time.monotonic()
        if full or after_lock:
            self.status.progress = {"entries": 0, "bytes": 0, "entries_total": None if full else len(batch)}
        claim = self._claim(batch, full, waiting | deferred, entries)
        with self._written_lock:
            written = {p: n for p, n in self._written.items() if p in entries}
        # A whole-tree compare needs no rename to be right: too many are left to it.
        renames = batch.renames if scope is not None or _fits_a_session(Pending(renames=batch.renames)) else []
        self._differences = [] if recheck and self._recheck_due == "schedule" and not self._links_changed else None
        began = time.time()
        try:
            result = self._connection.session(scope=scope, renames=renames, journal=claim)
        finally:
            self._last_session_end = time.monotonic()
            self.status.progress = None
        done = time.time()
        self._after_lock = False
        if self._differences is not None:
            failed = {path for path, _ in result.failed} | {p.path for p in result.problems}
            self._report_unseen([p for p in self._differences if p not in failed], batch, began)
            self._differences = None
        if full:
            self._need_full, self._recheck_due = False, None
            self._let_go = False
            self._last_full = time.monotonic()
        when, due = max(time.monotonic(), self._links_resync_at + LINKS_RESYNC_SECONDS), self._full_due_at
        with self._written_lock:
            for path, n in written.items():
                if self._written.get(path) == n:  # not written again meanwhile
                    del self._written[path]
        written_through = _written_through(written, result.replaced)
        if not full and (result.unseen_links or self._links_changed or written_through) and (due is None or due > when):
            # Their other names on the replica still hold the old file.  A full sync due by
            # then starts after every change seen so far: it covers them too.
            self._links_resync_at = when
            self._full_at(when)
            log.info("%s: a file with other names (hard links) changed, and not all of them were in the "
                     "session: a whole-tree compare follows", self.config.name)  # fmt: skip
        retry = {path for path, _ in result.failed}
        # What either side could not read (a failing disk) is not mirrored: tried again like a
        # failed file, a directory whole, since no event may ever come for it.
        unread = {p.path for p in result.problems if p.unreadable}
        kept = waiting | deferred | retry | unread
        self._checkpoint(batch, kept, trees=unread | (batch.trees & deferred))
        self._note_applied(result, claim, batch, full, kept, entries)
        self._schedule_retries(retry | unread, None if full else entries.keys() | trees)
        st = self.status
        st.sessions += 1
        st.last_sync = done
        st.last_session_seconds = time.monotonic() - started
        st.files_sent += result.stats.files_sent
        st.bytes_sent += result.stats.wire_sent
        st.failures += len(result.failed)
        latencies = [done - when for path, when in entries.items() if path not in kept]
        self._latencies.extend(latencies)
        if self.metrics is not None:
            self.metrics.session(self._labels, result, latencies)
        # What could not be read (a failing disk) is not mirrored either: named alike.  What
        # vanished or changed under the scan is not: its own event follows.
        missed = [*result.failed, *((p.path, p.message) for p in result.problems if p.unreadable)]
        st.failed_files = [[display_path(path) or "./", reason] for path, reason in missed[:20]]
        if not missed:
            st.last_success = done
            if full and not result.problems and not result.deletions_refused:
                st.last_compare = done
        if missed:
            st.last_error = f"{len(missed)} files failed, e.g. {display_path(missed[0][0]) or './'}: {missed[0][1]}"
        self._log_missed(missed)
        if result.deletions_refused:
            raise _Halted(result.deletions_refused)  # the rest of the batch is mirrored, no deletion
        self._set_state("live")
        self._report()
        return bool(missed)

    def _report_unseen(self, differences: list[bytes], batch: Pending, began: float) -> None:
        """What a scheduled whole-tree compare changed on the replica (not what it failed to:
        a file it cannot read, a device node the receiver refuses, differs at every compare)
        that no change seen in the source accounts for (the batch it carried, those journaled
        meanwhile, the directories holding them, and what changed in the source since just
        before the compare began, its event perhaps still on its way): said, since a replica
        written to behind the daemon's back may mean a service running on the standby."""
        if not differences:
            return
        later = self.journal.pending()
        told = set(batch.entries) | set(later.entries)
        trees = batch.trees | later.trees
        for old, new in batch.renames + later.renames:
            trees |= {old, new}
        holding = {b""}
        for path in told | trees:
            while path:
                path = os.path.dirname(path)
                holding.add(path)
        unseen = [p for p in differences if p not in told and p not in holding
                  and not any(p == t or p.startswith(t + b"/") for t in trees)
                  and not self._changed_in_source_since(p, began - 1.0)]  # fmt: skip
        if not unseen:
            return
        st = self.status
        st.unseen_repaired += len(unseen)
        st.last_unseen = [display_path(p) for p in unseen[:20]]
        if self.metrics is not None:
            self.metrics.unseen.labels(*self._labels).inc(len(unseen))
        log.warning("%s: a scheduled whole-tree compare found %d entries of the replica different with no change "
                    "seen in the source (changed on the replica behind the daemon's back, or an event was lost), "
                    "e.g. %s: made like the source again", self.config.name, len(unseen),
                    ", ".join(st.last_unseen[:5]))  # fmt: skip

    def _changed_in_source_since(self, path: bytes, when: float) -> bool:
        """Whether the source's ``path`` (or, gone, its directory) changed at ``when`` or later."""
        while True:
            try:
                return os.lstat(os.path.join(self.config.source, path)).st_ctime >= when
            except OSError:
                if not path:
                    return True  # the source itself is gone: nothing to tell
                path = os.path.dirname(path)

    def _log_missed(self, missed: list) -> None:
        """Each file that newly fails (or could not be read) is logged, with why, and each one
        mirrored again after failing; not again at every retry of the same failure."""
        now = {path: reason for path, reason in missed}
        for path, reason in now.items():
            if self._missed.get(path) != reason:
                log.warning("%s: %s: not mirrored: %s (tried again)", self.config.name, display_path(path) or "./",
                            reason)  # fmt: skip
        for path in self._missed.keys() - now.keys():
            log.info("%s: %s: mirrored again", self.config.name, display_path(path) or "./")
        self._missed = now

    def _checkpoint(self, batch: Pending, keep: set[bytes], trees: set[bytes] = frozenset()) -> None:
        """Mark ``batch`` done, re-journaling what it could not finish (so a crash keeps it):
        a file still open, a file that failed (in a subtree compared whole too); those of
        ``trees`` are to be compared whole."""
        if keep:
            first_seen = [(ENTRY, p, int(p in trees), _first_seen(batch, p)) for p in sorted(keep)]
            self.journal.append(first_seen, force=True)
        self.journal.checkpoint(batch.seq)

    def _claim(self, batch: Pending, full: bool, waiting: set[bytes], entries: dict) -> dict | None:
        """What the session covers of the journal (``start``'s ``seq``, ``base`` and
        ``journal``), for the receiver to record once it completes; None: nothing.

        A full sync covers every record up to its batch.  A scoped one continues from the
        replica's record: it covers up to its batch only if every change since that record
        is in it or was mirrored by a session that completed (nothing deferred or failed
        since is left out, no subtree went unread), and it defers no file of its own."""
        token = self.journal.token
        if full:
            return {"seq": batch.seq, "base": None, "journal": token}
        rec = self._replica
        if waiting or rec is None or rec.journal != token:
            return None
        start = self.journal.position()[0]
        if start > rec.seq:  # the gap between the record and this batch holds only retried paths
            if self._gap or any(not _within(p, entries, batch.trees) for p in self._outstanding):
                return None
        return {"seq": batch.seq, "base": rec.seq, "journal": token}

    def _note_applied(self, result, claim: dict | None, batch: Pending, full: bool, kept: set[bytes],
                      entries: dict) -> None:  # fmt: skip
        """The receiver's record after a session, and what still keeps the next from claiming."""
        rec = _applied(result.receiver.get("applied"))
        if rec is not None or "applied" in result.receiver:
            self._replica = rec
            # what the replica lacks since its record stays in the journal for a replay
            self.journal.hold(rec.seq if rec is not None and rec.journal == self.journal.token else None)
        if claim is not None and rec is not None and (rec.seq, rec.journal) == (claim["seq"], claim["journal"]):
            self._outstanding = set(kept)  # recorded: everything up to the batch is there
            self._gap = False
            self._epoch_resyncs = 0
            return
        clean = not result.failed and not result.problems and not result.deletions_refused
        if full and clean and claim is not None:
            from .epoch import read_epoch

            held = result.receiver.get("epoch")  # the replica's after the session
            if held is None and rec is not None:
                held = rec.epoch  # a receiver too old to say: its record's
            if held is None or held < read_epoch(self.config.tree_state_dir):
                # the replica raised its epoch by at most MAX_EPOCH_STEP: sync again (soon,
                # then less often) until it holds ours
                self._epoch_resyncs += 1
                self._full_at(time.monotonic() + min(60.0, 0.5 * 2**self._epoch_resyncs))
        if full and not result.failed and not result.problems:
            self._outstanding.clear()
        else:
            self._outstanding -= {p for p in self._outstanding if _within(p, entries, batch.trees)}
        self._outstanding |= kept
        self._gap = self._gap or bool(result.problems) or bool(result.deletions_refused)

    # -- status -------------------------------------------------------------------------------

    def _lag(self, oldest: float | None) -> float:
        """The age of the oldest change not mirrored.  Its time is the wall clock's (the time a
        record is kept with; a journal read at start-up dates its records then), but once seen
        the age runs on the monotonic clock: a wall
        clock stepped back (NTP, a clock set wrong at boot) must not make a stuck replica look
        caught up for as long as the step, nor one stepped forward make it look behind."""
        if oldest is None:
            self._oldest = None
            return 0.0
        now = time.monotonic()
        if self._oldest is None or self._oldest[0] != oldest:
            self._oldest = (oldest, now - max(0.0, time.time() - oldest))
        return now - self._oldest[1]

    def snapshot(self) -> dict:
        pending = self.journal.pending()
        st = self.status
        st.pending = len(pending)
        st.lag_seconds = round(self._lag(pending.oldest()), 3)
        st.lag_bytes = self._pending_bytes(pending)
        behind = st.lag_seconds > FALLING_BEHIND_SECONDS
        if behind != self._behind:
            self._behind = behind
            if behind:
                log.warning("%s: falling behind: %d changes pending, the oldest for %.0f s", self.config.name,
                            st.pending, st.lag_seconds)  # fmt: skip
            else:
                log.info("%s: caught up", self.config.name)
        st.mirrored_seq, st.journal_seq = self.journal.position()
        rec = self._replica
        st.applied = rec._asdict() if rec is not None else None
        st.lag_entries = max(0, st.journal_seq - rec.seq) if rec is not None and rec.journal == self.journal.token else None
        watcher = self.feed.watcher
        unwatched = watcher.unwatched()
        st.unwatched_count = len(unwatched)
        st.unwatched_dirs = [[display_path(path) or "./", why] for path, why in sorted(unwatched.items())[:20]]
        st.rewatch_at = watcher.retry_at if unwatched else None
        if self._latencies:
            ordered = sorted(self._latencies)
            st.latency_p50_ms = round(ordered[len(ordered) // 2] * 1000, 3)
            st.latency_p99_ms = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3)
        if self.metrics is not None:
            self.metrics.lag(self._labels, st.pending, st.lag_seconds, st.lag_bytes)
            self.metrics.applied(self._labels, rec, st.lag_entries, st.journal_catch_ups, st.full_syncs)
            self.metrics.unwatched(self._labels, st.unwatched_count)
        return st.__dict__.copy()

    def _pending_bytes(self, pending: Pending) -> int:
        total = 0
        for i, path in enumerate(pending.entries):
            if i >= 10_000:
                break
            try:
                st = os.lstat(os.path.join(self.config.source, path))
            except OSError:
                continue
            if not os.path.isdir(os.path.join(self.config.source, path)):
                total += st.st_size
        return total


def _applied(value) -> Applied | None:
    """A receiver's ``applied`` field (``[epoch, seq, journal]``), None if absent or malformed."""
    if not isinstance(value, list) or len(value) != 3:
        return None
    epoch, seq, journal = value
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, seq))
    return Applied(epoch, seq, journal) if ints and isinstance(journal, str) else None


def _within(path: bytes, entries, trees) -> bool:
    """Whether a scoped session over ``entries`` and subtrees ``trees`` looks at ``path``."""
    if path in entries or path in trees or b"" in trees:
        return True
    parts = path.split(b"/")
    return any(b"/".join(parts[:i]) in trees for i in range(1, len(parts)))


def _with_directories(entries) -> list[bytes]:
    """``entries`` and the directories holding them: a name made or removed in a directory
    moved its times, which only the directory's own entry (in its parent's listing) shows; a
    name made and gone before the session looks (maildir's ``tmp/``, an editor's swap file)
    leaves nothing else there to compare.  The root's times are compared at every session."""
    names = {p for p in entries if p}
    return sorted(names | {p.rpartition(b"/")[0] for p in names} - {b""})


def _written_through(written: dict[bytes, tuple[int, bool]], replaced: list[bytes]) -> bool:
    """Whether a file changed in place (``LivePair._written``) may have had other names that
    changed with it unseen: changed through a name ``replaced``, or gone when read, below a
    directory ``replaced``."""
    if not replaced or not written:
        return False
    replaced = set(replaced)
    for path, (_, gone) in written.items():
        if path in replaced:
            return True
        while gone and b"/" in path:
            path = path.rpartition(b"/")[0]
            if path in replaced:
                return True
    return False


def _fits_a_session(batch: Pending) -> bool:
    """Whether a scoped session's ``start`` can name ``batch`` within the frame and the
    receiver's limits: each entry with its directory, each renamed directory's new path
    in the scope too, and a renamed file's expectation a few dozen bytes."""
    paths = 2 * len(batch.entries) + len(batch.trees) + 2 * len(batch.renames)
    if paths > SESSION_PATHS_MAX:
        return False
    size = sum(2 * len(p) + 10 for p in batch.entries) + sum(len(p) + 5 for p in batch.trees)
    size += sum(2 * (len(old) + len(new)) + 64 for old, new in batch.renames)
    return size <= SESSION_BYTES_MAX


def _first_seen(batch: Pending, path: bytes) -> float:
    """When ``path``'s change was first seen: its own entry's time, else (a file found in a
    subtree compared whole) its nearest directory's, else the batch's oldest."""
    parts = path.split(b"/")
    for i in range(len(parts), -1, -1):
        seen = batch.entries.get(b"/".join(parts[:i]))
        if seen is not None:
            return seen
    return batch.oldest() or time.time()


def _groups(pairs: tuple[PairConfig, ...]) -> dict[tuple, tuple[PairConfig, ...]]:
    """The pairs by the tree they watch (a fan-out shares one feed), in configuration order."""
    out: dict[tuple, list[PairConfig]] = {}
    for pair in pairs:
        out.setdefault(pair.feed_key, []).append(pair)
    return {key: tuple(group) for key, group in out.items()}


class Daemon:
    """All pairs of a configuration, the status file, metrics, reload."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.metrics = Metrics(config.metrics) if config.metrics else None
        self.pairs: dict[str, LivePair] = {}
        self._feeds: dict[tuple, tuple[SourceFeed, tuple[PairConfig, ...]]] = {}
        self._stop = threading.Event()
        self._status_lock = threading.Lock()
        self._status_unwritten = False  # a status write failed (a full disk), none succeeded since
        self._dirty = threading.Event()

    def start(self) -> None:
        ensure_state_dir(self.config.status_dir)
        for key, group in _groups(self.config.pairs).items():
            self._start_group(key, group)
        self._status_thread = threading.Thread(target=self._write_status_loop, name="status", daemon=True)
        self._status_thread.start()

    def _start_group(self, key: tuple, group: tuple[PairConfig, ...]) -> None:
        feed = SourceFeed(list(group), self.config.journal_retain)
        pairs = [LivePair(pc, self.config, self.metrics, feed, self._state_changed) for pc in group]
        for pair in pairs:  # listed before they run: a status written on their first change shows them all
            self.pairs[pair.config.name] = pair
        self._feeds[key] = (feed, group)
        feed.start()
        for pair in pairs:
            pair.start()

    def _stop_group(self, key: tuple) -> None:
        feed, group = self._feeds.pop(key)
        self._stop_pairs([self.pairs.pop(pc.name) for pc in group])
        feed.stop()

    @staticmethod
    def _stop_pairs(pairs: list[LivePair]) -> None:
        """Stop ``pairs`` at once, then wait for them against one deadline (not one each)."""
        for pair in pairs:
            pair.request_stop()
        deadline = time.monotonic() + STOP_SECONDS
        for pair in pairs:
            pair.finish_stop(deadline)

    def reload(self, config: DaemonConfig) -> None:
        """SIGHUP: stop the trees whose pairs were removed or changed, start new ones, keep
        the others running (a tree's pairs share a feed: they restart together)."""
        new = _groups(config.pairs)
        for key, (_, group) in list(self._feeds.items()):
            if new.get(key) != group:
                self._stop_group(key)
        self.config = config
        for key, group in new.items():
            if key not in self._feeds:
                self._start_group(key, group)
        log.info("configuration reloaded: %s", ", ".join(sorted(p.name for p in config.pairs)))

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        self._stop_pairs([self.pairs[pc.name] for _, group in self._feeds.values() for pc in group])
        for feed, _group in self._feeds.values():
            feed.stop()
        self._feeds.clear()
        for pair in self.pairs.values():
            pair.status.state = "stopped"  # never "live" once the daemon is gone
        status_thread = getattr(self, "_status_thread", None)
        if status_thread is not None:
            status_thread.join(timeout=5)  # its last "running" write must not come after ours
        self.write_status(stopped=True)

    @property
    def all_fenced(self) -> bool:
        return bool(self.pairs) and all(p.fenced for p in self.pairs.values())

    def status(self, stopped: bool = False) -> dict:
        """What ``mirror status`` shows: every pair (one per destination) with its state,
        position in the journal and lag."""
        return {
            "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "state": "stopped" if stopped else "running",
            "updated": time.time(),
            "monotonic": time.monotonic(),  # this boot's: what a reader on this machine measures age with
            "pairs": [pair.snapshot() for pair in list(self.pairs.values())],
        }

    def write_status(self, stopped: bool = False) -> None:
        with self._status_lock:
            data = json.dumps(self.status(stopped), indent=1).encode()
            # swapped, not replaced: a full disk must not freeze what hawrap reads of the replica
            write_swapped(os.path.join(self.config.status_dir, STATUS_FILE), data, 0o644)

    def _state_changed(self, urgent: bool) -> None:
        """A pair changed state (``urgent``: the status file says so now, not at the next
        periodic write: a reader such as hawrap decides on it), or ran a session (written
        within STATUS_MIN_INTERVAL)."""
        if not urgent:
            self._dirty.set()
            return
        self._try_write_status()

    def _try_write_status(self) -> None:
        """``write_status``, its failure said once until a write succeeds again (it is retried
        every STATUS_MIN_INTERVAL: a full disk would fill the log too)."""
        try:
            self.write_status()
        except OSError as exc:
            if not self._status_unwritten:
                log.warning("cannot write the status file: %s", os_error_message(exc))
            self._status_unwritten = True
            return
        if self._status_unwritten:
            log.warning("the status file is written again")
            self._status_unwritten = False

    def _write_status_loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(STATUS_INTERVAL)
            self._dirty.clear()
            if self._stop.is_set():
                return
            self._try_write_status()
            self._stop.wait(STATUS_MIN_INTERVAL)


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), to tell it from a later process given the
    same pid; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The command name (field 2) may hold spaces and parentheses: count from its end.
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def read_status(status_dir: bytes | str) -> dict:
    """The daemon's status; read again if it came torn (a read that began before two
    rewrites and whose reader was not told apart, see ``atomicfile.write_swapped``)."""
    path = os.path.join(fs_path(status_dir), STATUS_FILE)
    for attempt in (1, 2, 3):
        with open(path, "rb") as f:
            data = f.read()
        try:
            return json.loads(data)
        except ValueError:
            if attempt == 3:
                raise


def journal_head(status_dir: bytes | str) -> int:
    """The newest journal sequence a daemon's status in ``status_dir`` shows (the highest
    over its pairs: a tree's pairs share one journal); 0 if there is no status.  A primary's
    own position (hawrap): what a replica with all its data has applied."""
    try:
        status = load_status(status_dir)
    except (OSError, ValueError):
        return 0
    heads = [p.get("journal_seq") for p in status.pairs]
    return max([h for h in heads if isinstance(h, int) and not isinstance(h, bool) and h >= 0], default=0)


@dataclass(frozen=True)
class DaemonStatus:
    """The daemon's status file, for programs (hawrap): rewritten at once on every change of
    a pair's state, within STATUS_MIN_INTERVAL of a session, and at least every
    STATUS_INTERVAL while the daemon runs."""

    pid: int
    updated: float  # time.time() of the write: a wall clock may step, so a reader judges
    # freshness by ``monotonic``, or by seeing it change (hawrap.mirrorctl.StatusWatch)
    pairs: tuple[dict, ...]  # one per destination: PairStatus's fields
    monotonic: float | None = None  # time.monotonic() of the write (this boot's clock); None: an older daemon

    def pair(self, name: str) -> dict | None:
        return next((p for p in self.pairs if p.get("name") == name), None)


def load_status(status_dir: bytes | str) -> DaemonStatus:
    """The status a daemon wrote in ``status_dir``; OSError if there is none, ValueError
    (naming the file) if it is not a daemon's status."""
    path = os.path.join(fs_path(status_dir), STATUS_FILE)
    with open(path, "rb") as f:
        data = f.read(1 << 24)
    try:
        raw = json.loads(data)
        pairs = raw["pairs"]
        if not isinstance(pairs, list) or not all(isinstance(p, dict) for p in pairs):
            raise ValueError("pairs")
        mono = raw.get("monotonic")
        mono = float(mono) if isinstance(mono, int | float) and not isinstance(mono, bool) else None
        return DaemonStatus(int(raw.get("pid", 0)), float(raw["updated"]), tuple(pairs), mono)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{display_path(path)}: not a mirror daemon status ({exc})") from None


class Metrics:
    """Prometheus metrics (``--metrics ADDR:PORT``), served by prometheus-client."""

    STATES = ("starting", "connecting", "syncing", "live", "catching up", "locked", "disconnected", "unreachable",
              "halted", "fenced", "error")

    def __init__(self, listen: tuple[str, int]):
        import prometheus_client as pc

        from . import __version__

        pc.disable_created_metrics()  # a *_created series per counter is noise to every dashboard
        self.registry = pc.CollectorRegistry()
        labels = ["pair", "destination"]
        pc.Info("mirror_build", "The running hamirror", registry=self.registry).info({"version": __version__})
        self.last_success = pc.Gauge("mirror_last_success_timestamp_seconds",
                                     "When the last session without a failed file ended (Unix time)", labels,
                                     registry=self.registry)  # fmt: skip
        self.pending = pc.Gauge("mirror_pending_changes", "Changes seen and not yet mirrored", labels, registry=self.registry)
        self.lag_seconds = pc.Gauge("mirror_lag_seconds", "Age of the oldest change not yet mirrored", labels,
                                    registry=self.registry)  # fmt: skip
        self.lag_bytes = pc.Gauge("mirror_lag_bytes", "Size of the files waiting to be mirrored", labels, registry=self.registry)
        self.sessions = pc.Counter("mirror_sessions", "Sessions run", labels, registry=self.registry)
        self.files = pc.Counter("mirror_files_sent", "Files whose content was sent", labels, registry=self.registry)
        self.bytes = pc.Counter("mirror_wire_bytes_sent", "Bytes sent on the wire", labels, registry=self.registry)
        self.failures = pc.Counter("mirror_file_failures", "Files that could not be mirrored", labels, registry=self.registry)
        self.latency = pc.Histogram("mirror_change_latency_seconds", "From the change seen to it committed on the replica",
                                    labels, registry=self.registry,
                                    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))  # fmt: skip
        self.state_gauge = pc.Gauge("mirror_pair_state", "1 for the pair's current state", [*labels, "state"],
                                    registry=self.registry)  # fmt: skip
        self.applied_epoch = pc.Gauge("mirror_applied_epoch", "The epoch of what the destination has applied",
                                      labels, registry=self.registry)  # fmt: skip
        self.applied_seq = pc.Gauge("mirror_applied_seq", "The journal sequence the destination has applied",
                                    labels, registry=self.registry)  # fmt: skip
        self.lag_entries = pc.Gauge("mirror_lag_entries", "Journal entries the destination has not applied "
                                    "(-1: unknown)", labels, registry=self.registry)  # fmt: skip
        self.catch_ups = pc.Gauge("mirror_catch_ups", "How (re)connections caught up so far, by journal replay or "
                                  "full sync", [*labels, "how"], registry=self.registry)  # fmt: skip
        self.unwatched_dirs = pc.Gauge("mirror_unwatched_directories", "Source directories that cannot be watched: "
                                       "their changes arrive by a rescan, up to a minute late", labels,
                                       registry=self.registry)  # fmt: skip
        self.unseen = pc.Counter("mirror_unseen_repaired", "Entries scheduled whole-tree compares found different on "
                                 "the replica with no change seen in the source (changed behind the daemon's back)",
                                 labels, registry=self.registry)  # fmt: skip
        self.server, self.thread = pc.start_http_server(listen[1], addr=listen[0], registry=self.registry)

    # ``labels``: (pair, destination)

    def state(self, labels: tuple[str, str], state: str) -> None:
        for s in self.STATES:  # label values in snake_case, as Prometheus expects
            self.state_gauge.labels(*labels, s.replace(" ", "_")).set(1 if s == state else 0)

    def session(self, labels: tuple[str, str], result, latencies: list[float]) -> None:
        self.sessions.labels(*labels).inc()
        self.files.labels(*labels).inc(result.stats.files_sent)
        self.bytes.labels(*labels).inc(result.stats.wire_sent)
        self.failures.labels(*labels).inc(len(result.failed))
        if not result.failed:
            self.last_success.labels(*labels).set_to_current_time()
        for value in latencies:
            self.latency.labels(*labels).observe(value)

    def lag(self, labels: tuple[str, str], pending: int, seconds: float, size: int) -> None:
        self.pending.labels(*labels).set(pending)
        self.lag_seconds.labels(*labels).set(seconds)
        self.lag_bytes.labels(*labels).set(size)

    def applied(self, labels: tuple[str, str], rec: Applied | None, lag_entries: int | None, replays: int,
                full: int) -> None:  # fmt: skip
        self.applied_epoch.labels(*labels).set(rec.epoch if rec is not None else 0)
        self.applied_seq.labels(*labels).set(rec.seq if rec is not None else 0)
        self.lag_entries.labels(*labels).set(lag_entries if lag_entries is not None else -1)
        self.catch_ups.labels(*labels, "journal").set(replays)
        self.catch_ups.labels(*labels, "full").set(full)

    def unwatched(self, labels: tuple[str, str], count: int) -> None:
        self.unwatched_dirs.labels(*labels).set(count)
