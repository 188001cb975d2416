"""``mirror daemon``: live mirroring of one or more trees, change by change.

Per pair (source tree -> destination), a ``LivePair`` thread:

1. opens the pair's change journal and starts watching the tree (before anything else, so
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
SIGTERM abandons the file in flight cleanly; SIGHUP reloads the configuration.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import xxhash

from .atomicfile import atomic_write
from .errors import (
    Cancelled,
    ConnectError,
    LockedError,
    MirrorError,
    PeerTimeout,
    SourceGuardError,
    StaleEpochError,
    display_path,
    fs_path,
)
from .exclude import make_excluder
from .guard import fs_identity
from .journal import ENTRY, RENAME, Journal, Pending
from .lockfile import is_locked
from .statedir import check_root, ensure_state_dir, resolve_state_dir
from .transfer import DEFAULT_CONTIMEOUT, DEFAULT_TIMEOUT, Connection
from .treescan import Scope
from .watch import CLOSED, RESCAN, TREE, Watcher
from .watch import ENTRY as W_ENTRY
from .watch import RENAME as W_RENAME

log = logging.getLogger(__name__)

STATUS_FILE = b"mirror-daemon.status.json"
_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# A halted pair (its source is not the tree it mirrors, or its deletions were refused) tries
# a full sync again after these many seconds: a source mounted again resumes by itself.
_HALT_BACKOFF = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SOURCE_CHECK_SECONDS = 1.0  # how often an idle pair checks its source is still the same filesystem


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

    @property
    def tree_state_dir(self) -> bytes:
        return resolve_state_dir(self.source, self.state_dir)

    @property
    def journal_path(self) -> bytes:
        tag = xxhash.xxh3_64_hexdigest(self.destination.encode("utf-8", "surrogateescape"))
        return os.path.join(self.tree_state_dir, b"journal-" + tag.encode())


@dataclass(frozen=True)
class DaemonConfig:
    pairs: tuple[PairConfig, ...]
    status_dir: bytes
    coalesce: float = 0.0005
    open_file_delay: float = 1.0
    metrics: tuple[str, int] | None = None
    reconcile_interval: float | None = None  # a full sync this often (None: only when needed)


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


class LivePair:
    """One source tree mirrored live to one destination (see the module docstring)."""

    def __init__(self, config: PairConfig, daemon: DaemonConfig, metrics=None):
        self.config = config
        self.daemon = daemon
        self.metrics = metrics
        self.status = PairStatus(config.name, display_path(config.source), config.destination)
        check_root(config.source)
        ensure_state_dir(config.tree_state_dir)
        self.journal = Journal(config.journal_path)
        excluder = make_excluder(config.excludes)
        self.watcher = Watcher(config.source, self._on_changes, excluder.excluded if excluder else None)
        self._cond = threading.Condition()
        self._open_files: dict[bytes, float] = {}
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._need_full = True
        self._latencies: deque[float] = deque(maxlen=2000)
        self._last_session_end = 0.0
        self._connection: Connection | None = None
        self._thread = threading.Thread(target=self._run, name=f"pair-{config.name}", daemon=True)
        self.fenced = False
        self._excluder = excluder
        self._source_fs: tuple[int, int] | None = None  # where the source was at the last full sync
        self._last_source_check = 0.0
        self._halts = 0
        self._watch_stale = False  # the source's filesystem went away under the watches
        if self.journal.replayed:
            log.info("%s: %d changes from the journal to replay", config.name, self.journal.replayed)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.watcher.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=60)
        self.watcher.stop()
        self._disconnect()
        self.journal.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != self.status.state:
            log.info("%s: %s%s", self.config.name, state, f" ({error})" if error else "")
            self.status.state = state
            self.status.since = time.time()
        if error is not None:
            self.status.last_error = error
        if self.metrics is not None:
            self.metrics.state(self.config.name, state)

    # -- changes from the watcher -----------------------------------------------------------

    def _on_changes(self, changes) -> None:
        """Runs in the watchdog thread: journal (durably) first, then wake the pair."""
        records = []
        now = time.monotonic()
        wake = False  # a file still being written does not wake the pair: its close will
        for c in changes:
            wake = wake or not (c.kind == W_ENTRY and c.open)
            if c.kind == W_ENTRY:
                records.append((ENTRY, c.path, 0))
                if c.open:
                    self._open_files.setdefault(c.path, now)
            elif c.kind == CLOSED:
                records.append((ENTRY, c.path, 0))
                self._open_files.pop(c.path, None)
            elif c.kind == TREE:
                records.append((ENTRY, c.path, 1))
            elif c.kind == W_RENAME:
                records.append((RENAME, c.path, c.other))
                if c.path in self._open_files:
                    self._open_files[c.other] = self._open_files.pop(c.path)
            elif c.kind == RESCAN:
                log.warning("%s: change events were lost (inotify overflow or watch limit): rescanning",
                            self.config.name)  # fmt: skip
                records.append((ENTRY, c.path, 1))
                if not c.path:
                    self._need_full = True
        # Written at once, made durable right after the pair is woken: the fdatasync runs
        # while the change is being mirrored, and the change is checkpointed only after both.
        self.journal.append(records, sync=False)
        if wake:
            with self._cond:
                self._cond.notify_all()
        self.journal.sync()

    # -- the pair's loop --------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        last_full = 0.0
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
                self._connect()
                full = self._need_full
                reconcile_due = self.daemon.reconcile_interval and time.monotonic() - last_full > self.daemon.reconcile_interval
                failed = self._session(batch, full=full or bool(reconcile_due))
                if full or reconcile_due:
                    last_full = time.monotonic()
                    self._resumed()
                failures = 0
                if failed:
                    # Files that failed stay journaled; do not spin on them.
                    self._failed_rounds = getattr(self, "_failed_rounds", 0) + 1
                    self._wait(min(30.0, 0.5 * 2 ** min(self._failed_rounds, 6)))
                else:
                    self._failed_rounds = 0
            except StaleEpochError as exc:
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

    def _wait(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait(timeout=seconds)

    # -- the guards (mirror.guard) ------------------------------------------------------------

    def _check_source(self) -> None:
        """An unmounted source reports no event at all: its watches just die.  So an idle pair
        checks, every SOURCE_CHECK_SECONDS, that its root is still where the last full sync
        found it (a ``stat`` and a ``statvfs``)."""
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
        its filesystem going away, watch the tree again (the old watches died with it)."""
        self._source_fs = fs_identity(self.config.source)
        self._last_source_check = time.monotonic()
        if self._halts:
            log.warning("%s: the guards pass again: mirroring resumes", self.config.name)
            self._halts = 0
        if self._watch_stale:
            self._watch_stale = False
            self.watcher.stop()
            self.watcher = Watcher(self.config.source, self._on_changes,
                                   self._excluder.excluded if self._excluder else None)  # fmt: skip
            self.watcher.start()
            self._need_full = True  # what changed before the new watches were in place

    def _next_batch(self) -> Pending | None:
        """Wait for changes (and a short coalescing window); None to go round the loop again."""
        if self._need_full or getattr(self, "_after_lock", False):
            return self.journal.take()
        with self._cond:
            pending = self.journal.pending()
            if not len(pending):
                self._cond.wait(timeout=self._open_file_timeout())
                return None
        if self.daemon.coalesce and time.monotonic() - self._last_session_end < 0.05:
            # Busy (a session ended a moment ago): wait a little to take the burst in one session.
            # After a quiet spell a change is sent at once.
            time.sleep(self.daemon.coalesce)
        pending = self.journal.take()
        return pending if len(pending) else None

    def _open_file_timeout(self) -> float:
        if not self._open_files:
            return 1.0
        oldest = min(self._open_files.values())
        return max(0.01, self.daemon.open_file_delay - (time.monotonic() - oldest))

    def _connect(self) -> None:
        if self._connection is not None:
            return
        self._set_state("connecting")
        c = self.config
        self._connection = Connection(
            c.source, c.destination, delete=c.delete, excludes=c.excludes, secret_file=c.secret_file,
            lock_file=c.lock_file, state_dir=c.state_dir, cancel=self._cancel, keep_changes=False,
            max_delete=c.max_delete, allow_mass_delete=c.allow_mass_delete, timeout=c.timeout,
            contimeout=c.contimeout,
        ).open()  # fmt: skip
        self._need_full = True  # whatever happened while we were apart: reconcile

    def _disconnect(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except (MirrorError, OSError):
                pass
            self._connection = None

    def _session(self, batch: Pending, full: bool) -> bool:
        """Mirror ``batch`` (or everything): then checkpoint it, keeping what must wait."""
        now = time.monotonic()
        waiting = {p for p, t in self._open_files.items() if now - t < self.daemon.open_file_delay}
        for p in list(self._open_files):
            if p not in waiting:
                self._open_files[p] = now  # mirrored now; if still open, again after the delay
        entries = {p: t for p, t in batch.entries.items() if p not in waiting}
        after_lock = getattr(self, "_after_lock", False)
        if full and after_lock and len(batch):
            # Catch up from the journal first (proportional to the changes), reconcile after.
            full = False
            self._need_full = True
        if full:
            scope = None
            self._set_state("syncing")
        else:
            if not entries and not batch.trees and not batch.renames:
                self._checkpoint(batch, waiting)
                return False
            scope = Scope(entries=[p for p in entries if p], trees=batch.trees)
            self._set_state("catching up" if after_lock else "live")
        started = time.monotonic()
        try:
            result = self._connection.session(scope=scope, renames=batch.renames)
        finally:
            self._last_session_end = time.monotonic()
        done = time.time()
        self._after_lock = False
        if full:
            self._need_full = False
        retry = {path for path, _ in result.failed}
        self._checkpoint(batch, waiting | retry)
        st = self.status
        st.sessions += 1
        st.last_sync = done
        st.last_session_seconds = time.monotonic() - started
        st.files_sent += result.stats.files_sent
        st.bytes_sent += result.stats.wire_sent
        st.failures += len(result.failed)
        for path, when in entries.items():
            if path not in retry:
                self._latencies.append(done - when)
        if self.metrics is not None:
            self.metrics.session(self.config.name, result, [done - w for p, w in entries.items() if p not in retry])
        if result.failed:
            st.last_error = f"{len(result.failed)} files failed, e.g. {display_path(result.failed[0][0])}: {result.failed[0][1]}"
        if result.deletions_refused:
            raise _Halted(result.deletions_refused)  # the rest of the batch is mirrored, no deletion
        self._set_state("live")
        return bool(result.failed)

    def _checkpoint(self, batch: Pending, keep: set[bytes]) -> None:
        """Mark ``batch`` done, re-journaling what it could not finish (so a crash keeps it)."""
        if keep:
            self.journal.append([(ENTRY, p, 0) for p in sorted(keep) if p in batch.entries or p in self._open_files],
                                force=True)  # fmt: skip
        self.journal.checkpoint(batch.seq)

    # -- status -------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        pending = self.journal.pending()
        st = self.status
        st.pending = len(pending)
        oldest = pending.oldest()
        st.lag_seconds = round(time.time() - oldest, 3) if oldest is not None else 0.0
        st.lag_bytes = self._pending_bytes(pending)
        if self._latencies:
            ordered = sorted(self._latencies)
            st.latency_p50_ms = round(ordered[len(ordered) // 2] * 1000, 3)
            st.latency_p99_ms = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3)
        if self.metrics is not None:
            self.metrics.lag(self.config.name, st.pending, st.lag_seconds, st.lag_bytes)
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


class Daemon:
    """All pairs of a configuration, the status file, metrics, reload."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.metrics = Metrics(config.metrics) if config.metrics else None
        self.pairs: dict[str, LivePair] = {}
        self._stop = threading.Event()

    def start(self) -> None:
        ensure_state_dir(self.config.status_dir)
        for pair_config in self.config.pairs:
            self._start_pair(pair_config)
        self._status_thread = threading.Thread(target=self._write_status_loop, name="status", daemon=True)
        self._status_thread.start()

    def _start_pair(self, pair_config: PairConfig) -> None:
        pair = LivePair(pair_config, self.config, self.metrics)
        pair.start()
        self.pairs[pair_config.name] = pair

    def reload(self, config: DaemonConfig) -> None:
        """SIGHUP: stop removed or changed pairs, start new ones, keep the others running."""
        old = {p.name: p for p in self.config.pairs}
        new = {p.name: p for p in config.pairs}
        for name, pair in list(self.pairs.items()):
            if new.get(name) != old.get(name):
                pair.stop()
                del self.pairs[name]
        self.config = config
        for name, pair_config in new.items():
            if name not in self.pairs:
                self._start_pair(pair_config)
        log.info("configuration reloaded: %s", ", ".join(sorted(new)))

    def stop(self) -> None:
        self._stop.set()
        for pair in self.pairs.values():
            pair.stop()
        self.write_status()

    @property
    def all_fenced(self) -> bool:
        return bool(self.pairs) and all(p.fenced for p in self.pairs.values())

    def write_status(self) -> None:
        status = {
            "pid": os.getpid(),
            "updated": time.time(),
            "pairs": [pair.snapshot() for pair in self.pairs.values()],
        }
        atomic_write(os.path.join(self.config.status_dir, STATUS_FILE), json.dumps(status, indent=1).encode(),
                     0o644, durable=False)  # fmt: skip

    def _write_status_loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.write_status()
            except OSError as exc:
                log.warning("cannot write the status file: %s", exc)


def read_status(status_dir: bytes | str) -> dict:
    with open(os.path.join(fs_path(status_dir), STATUS_FILE), "rb") as f:
        return json.loads(f.read())


class Metrics:
    """Prometheus metrics (``--metrics ADDR:PORT``), served by prometheus-client."""

    STATES = ("starting", "connecting", "syncing", "live", "catching up", "locked", "disconnected", "unreachable",
              "halted", "fenced")

    def __init__(self, listen: tuple[str, int]):
        import prometheus_client as pc

        self.registry = pc.CollectorRegistry()
        labels = ["pair"]
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
        self.state_gauge = pc.Gauge("mirror_pair_state", "1 for the pair's current state", ["pair", "state"], registry=self.registry)
        self.server, self.thread = pc.start_http_server(listen[1], addr=listen[0], registry=self.registry)

    def state(self, pair: str, state: str) -> None:
        for s in self.STATES:
            self.state_gauge.labels(pair, s).set(1 if s == state else 0)

    def session(self, pair: str, result, latencies: list[float]) -> None:
        self.sessions.labels(pair).inc()
        self.files.labels(pair).inc(result.stats.files_sent)
        self.bytes.labels(pair).inc(result.stats.wire_sent)
        self.failures.labels(pair).inc(len(result.failed))
        for value in latencies:
            self.latency.labels(pair).observe(value)

    def lag(self, pair: str, pending: int, seconds: float, size: int) -> None:
        self.pending.labels(pair).set(pending)
        self.lag_seconds.labels(pair).set(seconds)
        self.lag_bytes.labels(pair).set(size)
