"""The receiving end of a sync: the security boundary between the wire and the replica.

``Receiver`` serves one connection: handshake (protocol version, shared-secret challenge in
both directions, module), then sessions (``start`` ... ``end``) until the peer hangs up.
In a session it scans its tree and streams a per-directory summary, answers requests for
listings and block signatures, and writes what the sender sends:

- every path is confined to the module (``mirror.safefs``), every length was bounded by
  the frame decoder, every delta op is checked against its basis before it is applied;
- new content goes to a temporary file, is verified against the sender's whole-file
  xxh3-128, and only then renamed into place (a mismatch is reported, never committed);
- commits are grouped (``mirror.commits``): a batch's files are fsynced together, while the
  next batch is written, then renamed, and their directories fsynced: a reader sees old or
  new files, and a crash loses no file the session reported as written;
- deletions and directory attributes are applied last, after the new content is in place;
- the mirroring lock file is checked before every commit: if it appears, pending files are
  discarded and the session ends with ``locked``; a sender with an older epoch is refused.

The class is embeddable: give it a transport (``mirror.protocol``) and a module table.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from typing import NamedTuple

import xxhash

from . import fastpath
from . import protocol as P
from .commits import Batches, DirSyncs
from .entry import KIND_OF_FMT, Kind
from .epoch import MAX_EPOCH_STEP, observe_epoch, read_epoch
from .errors import (
    LockedError,
    MirrorError,
    ProtocolError,
    StaleEpochError,
    UnsafePathError,
    display_path,
    failure_reason,
    fs_path,
)
from .exclude import make_excluder
from .guard import ReplicaGuard, review_deletions, session_guard
from .lockfile import is_locked, status
from .privileges import Privileges
from .renames import apply as apply_renames
from .renames import parse as parse_renames
from .safefs import ConfinedTree, split_path
from .statedir import check_root, resolve_state_dir
from .treescan import Scope, TreeScan
from .writerlock import WriterLock

log = logging.getLogger(__name__)

SUMMARY_BATCH = 256  # directories per summary message
LISTING_PART = 32768  # entries per listing message (a larger directory is sent in parts)
MAX_WANT = 4096
MAX_EXCLUDES = 1000
MAX_PATTERN = 1024
LOCK_CHECK_SECONDS = 0.25
_MUTATING = frozenset({P.FILE, P.MKDIR, P.SYMLINK, P.NODE, P.HARDLINK, P.ATTRS, P.DELETE})
SIGNATURE_PART = 4 << 20
HAS_LINKS, INCOMPLETE = P.HAS_LINKS, P.INCOMPLETE


class ModuleConfig(NamedTuple):
    """One tree a receiver serves."""

    name: str
    path: bytes
    secret: bytes | None = None
    lock_file: bytes | None = None
    read_only: bool = False
    state_dir: bytes | None = None
    # Device nodes, FIFOs and sockets, setuid/setgid bits, owners: none unless granted.
    privileges: Privileges = Privileges()

    @property
    def resolved_state_dir(self) -> bytes:
        return resolve_state_dir(self.path, self.state_dir)

    def reserved_in(self, root: bytes) -> bytes | None:
        """The state dir's path relative to ``root`` if it lies inside it (never content)."""
        inside = os.path.relpath(os.path.realpath(self.resolved_state_dir), os.path.realpath(root))
        return None if inside == b"." or inside.startswith(b"..") else inside


# Plain classes rather than dataclasses: importing ``dataclasses`` (and ``inspect`` with it)
# would cost every sync more start-up time than the rest of the receiver.


class _Incoming:
    """The file being received."""

    __slots__ = ("req", "path", "attrs", "commit", "patcher", "hasher", "basis", "size", "failed")

    def __init__(self, req: int, path: bytes, attrs: list, commit, failed: str | None = None):
        self.req = req
        self.path = path
        self.attrs = attrs
        self.commit = commit
        self.patcher = None
        self.hasher = None
        self.basis = None
        self.size = 0
        self.failed = failed


class _Keepalive:
    """Says ``alive`` to the sender whenever a session has sent nothing for ``interval``
    seconds (a long commit, deletions of a big tree, the signature of a big file), so that
    the sender's timeout catches only a receiver that is stopped, hung or gone.  One thread
    per connection, started by the first session that asks; quiet between sessions (the
    sender does not read then)."""

    def __init__(self, transport):
        self.t = transport
        self._lock = threading.Lock()
        self._active = False
        self._interval = 1.0
        self._seen = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, interval: float) -> None:
        with self._lock:
            self._interval, self._active, self._seen = interval, True, self.t.bytes_sent
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="receiver-keepalive", daemon=True)
            self._thread.start()

    def end(self) -> None:
        """The session is over (its result goes next): nothing more until the next one."""
        with self._lock:
            self._active = False

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            with self._lock:
                if not self._active:
                    continue
                if self.t.bytes_sent == self._seen:
                    try:
                        self.t.send([P.ALIVE])
                    except (MirrorError, OSError):
                        return
                self._seen = self.t.bytes_sent


class SessionStats:
    __slots__ = ("files", "bytes_written", "deleted", "failed")

    def __init__(self):
        self.files = 0
        self.bytes_written = 0
        self.deleted = 0
        self.failed: list = []


class Receiver:
    """Serve one connection (see the module docstring)."""

    def __init__(self, transport, modules: dict[str, ModuleConfig], *, peer: str = "local",
                 writer: WriterLock | None = None, timeouts=None, admit=None):  # fmt: skip
        self.t = transport
        # Called once the peer has proved it knows the secret (a server counts it among its
        # authenticated connections, or refuses it: too many); until then frames are small.
        self._admit = admit
        self.modules = modules
        self.peer = peer
        self.can_chown = os.geteuid() == 0
        self.module: ModuleConfig | None = None
        self.sessions = 0
        # The one-writer lock, taken at the first session that writes (or already held by
        # an embedding caller that scanned the replica before connecting: see transfer.py).
        self._writer = writer
        # (set_timeout, seconds): how long the peer may stay silent in a session; none between
        # sessions (a live daemon's connection idles), none at all for in-process transports.
        self._set_timeout, self._session_timeout = timeouts if timeouts else (None, None)
        self._cleaned = False
        self._guard: ReplicaGuard | None = None
        self._keepalive: _Keepalive | None = None
        self._last_lock_check = 0.0
        self._reserved: dict[bytes, bytes | None] = {}  # root -> the state dir inside it, if any

    # -- connection ------------------------------------------------------------------------

    def serve(self) -> None:
        """Handshake, then sessions until the peer closes.  Errors are sent, then raised."""
        try:
            self._handshake()
            while True:
                self._timeout(None)
                message = self.t.recv()
                if message is None:
                    return
                if message[0] != P.START:
                    raise ProtocolError(f"expected 'start', got {message[0]!r}")
                if self.modules.get(self.module.name) != self.module:
                    # The server reloaded its modules since the handshake and this one changed
                    # or went: no session may run on the old settings.
                    raise MirrorError(f"module {self.module.name!r} was reconfigured; reconnect")
                self._timeout(self._session_timeout)
                self._session(message)
                self.sessions += 1
        except MirrorError as exc:
            self._send_error(exc)
            raise
        except OSError as exc:
            # A set-up or disk error that ends the session: the sender hears why.
            error = MirrorError(f"receiver: {exc}")
            self._send_error(error)
            raise error from exc
        except Exception as exc:
            log.exception("receiver for %s: internal error", self.peer)
            error = ProtocolError(f"receiver internal error: {type(exc).__name__}: {exc}")
            self._send_error(error)
            raise error from exc
        finally:
            if self._writer is not None:  # first: the next writer may be waiting for it
                self._writer.release()
                self._writer = None
            if self._keepalive is not None:
                self._keepalive.stop()
            self.t.close()

    def _timeout(self, seconds: float | None) -> None:
        if self._set_timeout is not None:
            self._set_timeout(seconds)

    def _send_error(self, exc: MirrorError) -> None:
        try:
            self.t.send([P.ERROR, type(exc).__name__, exc.exit_code, str(exc)])
        except (MirrorError, OSError):
            pass

    def _handshake(self) -> None:
        if hasattr(self.t, "max_frame"):
            self.t.max_frame = P.PREAUTH_MAX_FRAME
        hello = self.t.recv()
        if hello is None:
            raise ProtocolError("peer closed the connection before saying hello")
        if hello[0] != P.HELLO or len(hello) != 2 or not isinstance(hello[1], dict):
            raise ProtocolError("expected 'hello'")
        info = hello[1]
        if info.get("proto") != P.PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {info.get('proto')!r} is not supported (this receiver speaks "
                                f"version {P.PROTOCOL_VERSION})")  # fmt: skip
        name = info.get("module")
        module = self.modules.get(name) if isinstance(name, str) else None
        if module is None:
            raise ProtocolError(f"unknown module {name!r}")
        client_nonce = P.want_bytes(info.get("nonce"), "nonce", P.NONCE_SIZE)
        self.module = module
        self.can_chown = self.can_chown and self.module.privileges.owners
        self.subpath = P.want_bytes(info.get("subpath", b""), "subpath", 4096)
        if self.subpath:
            reserved = self._reserved_in(fs_path(self.module.path))
            if reserved is not None and split_path(self.subpath)[: reserved.count(b"/") + 1] == reserved.split(b"/"):
                raise UnsafePathError("refused subpath: the receiver's state dir is not content")
        server_nonce = os.urandom(P.NONCE_SIZE)
        secret = self.module.secret
        self.t.send([P.CHALLENGE, {"proto": P.PROTOCOL_VERSION, "nonce": server_nonce, "auth": secret is not None}])
        auth = self.t.recv()
        if auth is None or auth[0] != P.AUTH or len(auth) != 2 or not isinstance(auth[1], dict):
            raise ProtocolError("expected 'auth'")
        proof = b""
        if secret is not None:
            P.verify(P.client_proof(secret, server_nonce, client_nonce, name), auth[1].get("proof"), self.peer)
            proof = P.server_proof(secret, server_nonce, client_nonce, name)
        if self._admit is not None:
            self._admit()
        if hasattr(self.t, "max_frame"):
            self.t.max_frame = P.MAX_FRAME
        self.t.send([P.WELCOME, {
            "proof": proof, "epoch": read_epoch(self.module.resolved_state_dir),
            "read_only": self.module.read_only, "can_chown": self.can_chown, "software": P.SOFTWARE,
        }])  # fmt: skip

    def _reserved_in(self, root: bytes) -> bytes | None:
        """``module.reserved_in(root)``, worked out once per connection: it resolves both
        paths (an lstat per component), which a live session's latency should not pay."""
        if root not in self._reserved:
            self._reserved[root] = self.module.reserved_in(root)
        return self._reserved[root]

    # -- session ---------------------------------------------------------------------------

    def _session(self, start: list) -> None:
        P.want_len(start, 2)
        opts = start[1] if isinstance(start[1], dict) else {}
        module = self.module
        assert module is not None
        state_dir = module.resolved_state_dir
        check_root(module.path)  # its .mirror is never content: it must be hamirror's, not hidden user files
        dry_run = bool(opts.get("dry_run"))
        epoch = P.want_int(opts.get("epoch", 0), "epoch")
        mine = read_epoch(state_dir)
        if epoch < mine:
            raise StaleEpochError(
                f"refused: the sender's tree epoch {epoch} is older than this replica's {mine} "
                "(a stale former primary must not overwrite newer data)"
            )
        if module.lock_file and is_locked(module.lock_file):
            info = status(module.lock_file)
            raise LockedError(f"refused: mirroring lock on the receiver: {info.describe() if info else 'locked'}")
        if module.read_only and not dry_run:
            raise MirrorError(f"module {module.name!r} is read-only: only a dry run is allowed")
        tree_id, self.policy = session_guard(opts)
        keepalive = _keepalive_interval(opts.get("keepalive"))
        if not dry_run and self._writer is None:
            # Held for the rest of the connection: the live daemon's sessions follow one
            # another on one connection, and it stays the module's one writer meanwhile.
            self._writer = WriterLock.take(state_dir, self.peer, f"module {module.name!r}")
        if self._guard is None:
            self._guard = ReplicaGuard(fs_path(module.path), state_dir)
        # A deleting sender from another tree (its source unmounted, say) changes nothing here.
        self._guard.admit(tree_id, deleting=bool(opts.get("delete")), allow=self.policy.allow_mass_delete,
                          dry_run=dry_run, peer=self.peer)  # fmt: skip
        self._epoch_now = mine
        if epoch > mine and not dry_run:
            # A bounded step per session: whoever holds the secret cannot fence this module
            # for good by showing epoch 2^63-1 (see MAX_EPOCH_STEP).
            recorded = min(epoch, mine + MAX_EPOCH_STEP)
            self._epoch_now = observe_epoch(state_dir, recorded)
            log.warning("%s: epoch raised from %d to %d by %s%s", module.name or display_path(module.path), mine,
                        recorded, self.peer, f" (it shows {epoch}; at most +{MAX_EPOCH_STEP} per session)"
                        if recorded < epoch else "")  # fmt: skip
        self.dry_run = dry_run
        if keepalive is not None:
            if self._keepalive is None:
                self._keepalive = _Keepalive(self.t)
            self._keepalive.begin(keepalive)
        try:
            self._run_session(opts, state_dir, dry_run)
        finally:
            if self._keepalive is not None:
                self._keepalive.end()

    def _run_session(self, opts: dict, state_dir: bytes, dry_run: bool) -> None:
        root = fs_path(self.module.path)
        if self.subpath:
            root = self._ensure_subpath(root, dry_run)
        scan = fastpath.choose("scan")
        self.flags = P.want_int(opts.get("flags", 0), "flags", 0, 15)
        self.owner = bool(opts.get("owner")) and self.can_chown
        self.sync_writes = not opts.get("no_fsync", False)
        excludes = opts.get("excludes", [])
        if not isinstance(excludes, list) or not all(isinstance(p, bytes) for p in excludes):
            raise ProtocolError("bad excludes")
        if len(excludes) > MAX_EXCLUDES or any(len(p) > MAX_PATTERN for p in excludes):
            raise ProtocolError(f"too many or too long exclude patterns (at most {MAX_EXCLUDES} of {MAX_PATTERN} bytes)")
        self.excluder = make_excluder(excludes)
        self.listings: dict[bytes, object] = {}
        scope = Scope.from_wire(opts["scope"]) if opts.get("scope") is not None else None
        self.eager = scope is not None  # listings follow the summary unasked (see _send_summary)
        # Leftover temporary files (a crashed writer's) are removed once the writer lock is
        # ours; a dry run has no temporary files and touches nothing.
        clean = not dry_run and not self._cleaned
        try:
            self.tree = ConfinedTree(root, temp_dir=None if dry_run else os.path.join(state_dir, b"tmp"),
                                     clean=clean, reserved=self._reserved_in(root))  # fmt: skip
        except OSError as exc:
            raise MirrorError(f"receiver cannot open its tree: {exc}") from None
        self._cleaned = self._cleaned or clean
        try:
            if scope is not None:
                for path in scope.entries | scope.trees:
                    if path:
                        self.tree.parts(path)
            if not dry_run:
                self._apply_renames(opts.get("renames", []))
        except BaseException:
            self.tree.close()
            raise
        self.batches = Batches(self.tree, sync_writes=self.sync_writes, failed=self._fail, committed=self._committed)
        self.deletes: list[bytes] = []
        self.dir_attrs: list[tuple] = []
        self.stats = SessionStats()
        self.incoming: _Incoming | None = None
        # Without a summary (local mode: the sender, in this process, scans this tree itself
        # and compares directly) this side only writes.
        summarize = opts.get("summary", True) is not False
        tree_scan = None
        if summarize:
            tree_scan = TreeScan(root, excluder=self.excluder, checksum=bool(self.flags & scan.CMP_CHECKSUM),
                                 state_dir=state_dir, use_cache=True, scope=scope, background=scope is None)  # fmt: skip
        summary_error: list[BaseException] = []
        # A whole tree is summarised by a thread while requests are served; a scoped (live)
        # session's few listings are sent at once, before the first request can come.
        summarizer = None
        if summarize and scope is None:
            summarizer = threading.Thread(target=self._send_summary, args=(tree_scan, summary_error), name="summary")
        root_st = os.stat(self.tree.root_fd)
        root_attrs = [root_st.st_mode & 0o7777, root_st.st_uid, root_st.st_gid, root_st.st_mtime_ns]
        # A scoped session's summary follows at once from this thread: it goes out with it.
        self.t.send([P.READY, {"epoch": self._epoch_now, "root": root_attrs}], flush=summarizer is not None or not summarize)
        try:
            if summarizer is not None:
                summarizer.start()
            elif summarize:
                self._send_summary(tree_scan, summary_error)
            self._handle_until_end(summarizer)
        except BaseException:
            self._discard_all()
            raise
        finally:
            if summarizer is not None and summarizer.ident is not None:
                summarizer.join()
            self.tree.close()
        if summary_error:
            raise summary_error[0]

    def _apply_renames(self, wire) -> None:
        """The live daemon saw these renames on the source: do them here too, so the renamed
        entries compare equal instead of being sent again, but only where the replica's old
        entry is exactly what the new name must hold (``mirror.renames``).  The others are
        left alone: the comparison that follows sends what is needed."""
        apply_renames(self.tree, parse_renames(wire))

    def _ensure_subpath(self, root: bytes, dry_run: bool) -> bytes:
        tree = ConfinedTree(root, reserved=self._reserved_in(root))
        try:
            parts = tree.parts(self.subpath)
            for i in range(1, len(parts) + 1):
                if not dry_run:
                    tree.make_dir(b"/".join(parts[:i]), 0o755)
                else:
                    tree.dir_fd(parts[:i])
        finally:
            tree.close()
        return os.path.join(root, self.subpath)

    def _send_summary(self, tree_scan: TreeScan, error: list) -> None:
        """The summary, a fingerprint per directory; for a scoped (live) session also every
        listing right after its summary item: they are small, and it saves a round trip."""
        try:
            batch, listings = [], []
            for listing in tree_scan:
                self.listings[listing.path] = listing
                flags = (HAS_LINKS if listing.has_links() else 0) | (0 if listing.complete else INCOMPLETE)
                batch.append([listing.path, listing.fingerprint(self.flags), flags])
                listings.append(listing)
                if len(batch) >= SUMMARY_BATCH:
                    self._send_summary_batch(batch, listings)
                    batch, listings = [], []
            if batch:
                self._send_summary_batch(batch, listings)
            problems = [[p.path, p.errno, p.message] for p in tree_scan.problems]
            self.t.send([P.SUMMARY_END, {"dirs": tree_scan.stats.dirs, "problems": problems[:1000]}])
        except BaseException as exc:  # reported by the session, after the main loop ends
            error.append(exc)
            try:
                self.t.send([P.ERROR, type(exc).__name__, 2, f"receiver scan failed: {exc}"])
            except (MirrorError, OSError):
                pass

    def _send_summary_batch(self, batch: list, listings: list) -> None:
        self.t.send([P.SUMMARY, batch], flush=not self.eager)
        if self.eager:
            self._send_listings([listing.path for listing in listings])

    def _handle_until_end(self, summarizer: threading.Thread | None) -> None:
        self._handlers = {
            P.WANT: self._on_want, P.SIG: self._on_sig, P.FILE: self._on_file, P.DATA: self._on_data,
            P.COPY: self._on_copy, P.FILE_END: self._on_file_end, P.FILE_ABORT: self._on_file_abort,
            P.MKDIR: self._on_mkdir, P.SYMLINK: self._on_special, P.NODE: self._on_special,
            P.HARDLINK: self._on_hardlink, P.ATTRS: self._on_attrs, P.DELETE: self._on_delete,
            P.PING: self._on_ping,
        }  # fmt: skip
        self._summarizer = summarizer
        handle_in_sender = getattr(self.t, "handle_in_sender", None)
        if handle_in_sender is not None and summarizer is None:
            # An in-process sender (local mode) runs this session's messages itself, as it
            # sends them: no hand-over to this thread and back for every batch.  A big
            # transfer comes back here (QUEUED), so that reading and writing overlap again.
            outcome = handle_in_sender(self._handle)
            if outcome == P.ENDED:
                return
            if outcome == P.CLOSED:
                raise ProtocolError("sender closed the connection in the middle of a session")
        while True:
            message = self.t.recv()
            if message is None:
                raise ProtocolError("sender closed the connection in the middle of a session")
            if self._handle(message):
                return

    def _handle(self, message: list) -> bool:
        """Act on one message of a session; True once ``end`` has been handled."""
        kind = message[0]
        if kind == P.END:
            if self._summarizer is not None:
                self._summarizer.join()
            self._finish_session()
            return True
        if kind in _MUTATING:
            if self.dry_run and kind != P.DELETE:
                # A dry run (all a read-only module accepts) changes nothing: its deletions
                # are only reviewed by the deletion guard.
                raise ProtocolError(f"{kind!r} in a dry run")
            self._check_lock()
        handler = self._handlers.get(kind)
        if handler is None:
            raise ProtocolError(f"unexpected message {kind!r}")
        handler(message)
        return False

    # -- requests --------------------------------------------------------------------------

    def _on_want(self, message: list) -> None:
        P.want_len(message, 2)
        paths = message[1]
        if not isinstance(paths, list) or len(paths) > MAX_WANT:
            raise ProtocolError("bad 'want' list")
        self._send_listings(paths)

    def _send_listings(self, paths: list) -> None:
        scan = fastpath.choose("scan")
        for path in paths:
            listing = self.listings.get(P.want_bytes(path, "path", 65536))
            if listing is None:
                raise ProtocolError(f"'want' for a directory the summary did not list: {display_path(path)}")
            if len(listing) <= LISTING_PART:
                self.t.send([P.LISTING, listing.path, *listing.pack(), listing.complete, True], flush=False)
                continue
            entries = list(listing)
            for start in range(0, len(entries), LISTING_PART):
                part = scan.Listing(listing.path, entries[start : start + LISTING_PART])
                last = start + LISTING_PART >= len(entries)
                self.t.send([P.LISTING, listing.path, *part.pack(), listing.complete, last], flush=False)
        self.t.flush()

    def _on_sig(self, message: list) -> None:
        P.want_len(message, 2)
        requests = message[1]
        if not isinstance(requests, list) or len(requests) > MAX_WANT:
            raise ProtocolError("bad 'sig' list")
        delta = fastpath.choose("delta")
        for item in requests:
            if not isinstance(item, list) or len(item) != 2:
                raise ProtocolError("bad 'sig' request")
            req = P.want_int(item[0], "request id")
            path = P.want_bytes(item[1], "path", 65536)
            try:
                with self.tree.open_regular(path) as basis:
                    sig = delta.signature(basis)
            except (OSError, UnsafePathError) as exc:
                self.t.send([P.SIG_FAILED, req, failure_reason(exc)], flush=False)
                continue
            from . import deltafmt  # msgpack: only a session with deltas loads it

            data = deltafmt.signature_to_bytes(sig)
            # A big file's signature spans several frames; the sender joins them in order.
            for start in range(0, max(len(data), 1), SIGNATURE_PART):
                last = start + SIGNATURE_PART >= len(data)
                self.t.send([P.SIGNATURE, req, data[start : start + SIGNATURE_PART], last], flush=False)
        self.t.flush()

    def _on_ping(self, message: list) -> None:
        P.want_len(message, 2)
        self.t.send([P.PONG, message[1]])

    # -- file content ----------------------------------------------------------------------

    def _on_file(self, message: list) -> None:
        P.want_len(message, 7)
        _, req, path, attrs, mode, block_size, basis_size = message
        req = P.want_int(req, "request id")
        path = P.want_bytes(path, "path", 65536)
        attrs = _attrs(attrs)
        if self.incoming is not None:
            raise ProtocolError("'file' before the previous file ended")
        self.tree.parts(path)
        try:
            commit = self.tree.new_file(path)
        except (OSError, UnsafePathError) as exc:
            self.incoming = _Incoming(req, path, attrs, None, failed=failure_reason(exc))
            return
        incoming = _Incoming(req, path, attrs, commit)
        self.incoming = incoming
        if mode == "delta":
            block_size = P.want_int(block_size, "block size", 1, 1 << 30)
            basis_size = P.want_int(basis_size, "basis size")
            try:
                basis = self.tree.open_regular(path)
            except (OSError, UnsafePathError) as exc:
                incoming.failed = "basis-gone: " + failure_reason(exc)
                return
            try:
                incoming.patcher = fastpath.choose("delta").Patcher(basis, commit.file, block_size, basis_size)
            except ValueError as exc:
                basis.close()
                incoming.failed = f"basis-changed: {exc}"
                return
            incoming.basis = basis
        elif mode == "whole":
            incoming.hasher = xxhash.xxh3_128()
        else:
            raise ProtocolError(f"unknown file mode {mode!r}")

    def _current(self, req) -> _Incoming:
        incoming = self.incoming
        if incoming is None or req != incoming.req:
            raise ProtocolError("file data for a file that was not started")
        return incoming

    def _on_data(self, message: list) -> None:
        P.want_len(message, 3)
        incoming = self._current(message[1])
        data = P.want_bytes(message[2], "data", P.MAX_CHUNK)
        if incoming.failed:
            return
        try:
            if incoming.patcher is not None:
                incoming.patcher.apply((1, data))
            else:
                incoming.hasher.update(data)
                incoming.commit.file.write(data)
            incoming.size += len(data)
        except ValueError as exc:
            raise ProtocolError(f"{display_path(incoming.path)}: {exc}") from None
        except OSError as exc:
            incoming.failed = failure_reason(exc)

    def _on_copy(self, message: list) -> None:
        P.want_len(message, 4)
        incoming = self._current(message[1])
        if incoming.failed:
            return
        if incoming.patcher is None:
            raise ProtocolError("'copy' for a file sent whole")
        first = P.want_int(message[2], "block index")
        count = P.want_int(message[3], "block count", 1)
        try:
            incoming.patcher.apply((0, first, count))
        except ValueError as exc:
            raise ProtocolError(f"{display_path(incoming.path)}: {exc}") from None
        except OSError as exc:
            incoming.failed = failure_reason(exc)

    def _on_file_abort(self, message: list) -> None:
        P.want_len(message, 3)
        incoming = self._current(message[1])
        self._drop_incoming(incoming)

    def _drop_incoming(self, incoming: _Incoming) -> None:
        if incoming.commit is not None:
            incoming.commit.discard()
        basis = getattr(incoming, "basis", None)
        if basis is not None:
            basis.close()
        self.incoming = None

    def _on_file_end(self, message: list) -> None:
        P.want_len(message, 4)
        incoming = self._current(message[1])
        digest = P.want_bytes(message[2], "digest", 16)
        size = P.want_int(message[3], "size")
        failed = incoming.failed
        if not failed:
            try:
                if incoming.patcher is not None:
                    got, got_size = incoming.patcher.finish()
                else:
                    got, got_size = incoming.hasher.digest(), incoming.size
                if (got, got_size) != (digest, size):
                    failed = "mismatch: content does not match the sender's digest"
                else:
                    mode, uid, gid, mtime_ns = incoming.attrs
                    incoming.commit.finish(self.module.privileges.file_mode(mode), uid, gid, mtime_ns, self.owner)
            except ValueError as exc:
                failed = f"mismatch: {exc}"
            except OSError as exc:
                failed = failure_reason(exc)
        basis = getattr(incoming, "basis", None)
        if basis is not None:
            basis.close()
        if failed:
            incoming.commit and incoming.commit.discard()
            self.incoming = None
            self._fail(incoming.req, incoming.path, failed)
            return
        self.incoming = None
        if self.batches.add(incoming.commit, size):
            self._refuse_if_locked()
            self.batches.hand_over()

    def _check_lock(self) -> None:
        """The receiver's mirroring lock stops every change, not only file commits (checked
        at most every quarter second: a single lstat)."""
        lock = self.module.lock_file
        now = time.monotonic()
        if not lock or now - self._last_lock_check < LOCK_CHECK_SECONDS:
            return
        self._last_lock_check = now
        if is_locked(lock):
            self._discard_all()
            info = status(lock)
            raise LockedError(f"mirroring lock appeared on the receiver: {info.describe() if info else 'locked'}")

    def _fail(self, req: int | None, path: bytes, reason: str) -> None:
        self.stats.failed.append([path, reason])
        self.t.send([P.FAILED, req, path, reason])

    def _flush(self, dir_syncs: DirSyncs | None = None) -> None:
        """Commit every file received so far: data durable, renamed, renames durable (or,
        with ``dir_syncs``, the directories handed to it: see ``Batches.drain``)."""
        if self.batches.empty:
            return
        self._refuse_if_locked()
        self.batches.drain(dir_syncs)

    def _refuse_if_locked(self) -> None:
        """Before files are renamed into place: the mirroring lock discards them instead."""
        lock = self.module.lock_file
        if lock and is_locked(lock):
            self._discard_all()
            info = status(lock)
            raise LockedError(f"mirroring lock appeared on the receiver: {info.describe() if info else 'locked'}")

    def _committed(self, size: int) -> None:
        self.stats.files += 1
        self.stats.bytes_written += size

    def _discard_all(self) -> None:
        self.batches.discard()
        if self.incoming is not None:
            self._drop_incoming(self.incoming)

    # -- other entries ---------------------------------------------------------------------

    def _on_mkdir(self, message: list) -> None:
        P.want_len(message, 3)
        path = P.want_bytes(message[1], "path", 65536)
        attrs = _attrs(message[2])
        try:
            self.tree.make_dir(path, attrs[0])
            self.dir_attrs.append((path, attrs))
        except (OSError, UnsafePathError) as exc:
            self._fail(None, path, failure_reason(exc))

    def _on_special(self, message: list) -> None:
        if message[0] == P.SYMLINK:
            P.want_len(message, 4)
            path, target, attrs = message[1], P.want_bytes(message[2], "target", 4095), _attrs(message[3])
            kind, rdev = Kind.SYMLINK, 0
            if not target or b"\0" in target:
                raise ProtocolError("bad symlink target")
        else:
            P.want_len(message, 5)
            path, kind, rdev, attrs = message[1], message[2], message[3], _attrs(message[4])
            target = b""
            if kind not in (Kind.FIFO, Kind.SOCKET, Kind.CHAR, Kind.BLOCK):
                raise ProtocolError(f"bad node kind {kind!r}")
            rdev = P.want_int(rdev, "rdev")
        path = P.want_bytes(path, "path", 65536)
        refusal = self.module.privileges.refusal(kind)
        if refusal:
            self._fail(None, path, refusal)
            return
        if self.batches.holds(path):
            self._flush()  # the entry replaces a file (or a directory of files) still queued
        try:
            self.tree.make_special(path, kind, target=target, rdev=rdev)
            self.tree.set_attrs(path, kind, *attrs, owner=self.owner)
            self.stats.files += 1
        except (OSError, UnsafePathError) as exc:
            self._fail(None, path, failure_reason(exc))

    def _on_hardlink(self, message: list) -> None:
        P.want_len(message, 3)
        path = P.want_bytes(message[1], "path", 65536)
        target = P.want_bytes(message[2], "link target", 65536)
        if self.batches.holds(target) or self.batches.holds(path):
            self._flush()  # the file linked to, or the one replaced, is still queued
        try:
            linked = self.tree.lstat(target)
            refusal = self.module.privileges.refusal(KIND_OF_FMT.get(stat.S_IFMT(linked.st_mode))) if linked else None
            if refusal:  # a second name for a node this module would not have made
                self._fail(None, path, refusal)
                return
            self.tree.make_special(path, Kind.FILE, link_to=target)
            self.stats.files += 1
        except (OSError, UnsafePathError) as exc:
            self._fail(None, path, failure_reason(exc))

    def _on_attrs(self, message: list) -> None:
        P.want_len(message, 4)
        path = P.want_bytes(message[1], "path", 65536)
        kind = message[2]
        attrs = _attrs(message[3])
        if kind == Kind.DIR:
            self.dir_attrs.append((path, attrs))  # after everything inside it has changed
            return
        if kind not in (Kind.FILE, Kind.SYMLINK, Kind.FIFO, Kind.SOCKET, Kind.CHAR, Kind.BLOCK):
            raise ProtocolError(f"bad kind {kind!r}")
        privileges = self.module.privileges
        try:
            # What is there decides, not what the sender calls it: no chmod of a device node
            # that is there (a world-writable /dev/sda) in a module without devices.
            there = self.tree.lstat(path)
            actual = KIND_OF_FMT.get(stat.S_IFMT(there.st_mode), kind) if there is not None else kind
            refusal = privileges.refusal(kind) or privileges.refusal(actual)
            if refusal:
                self._fail(None, path, refusal)
                return
            if actual == Kind.FILE:
                attrs[0] = privileges.file_mode(attrs[0])
            self.tree.set_attrs(path, kind, *attrs, owner=self.owner)
        except (OSError, UnsafePathError) as exc:
            self._fail(None, path, failure_reason(exc))

    def _on_delete(self, message: list) -> None:
        P.want_len(message, 2)
        path = P.want_bytes(message[1], "path", 65536)
        self.tree.parts(path)
        self.deletes.append(path)

    def _finish_session(self) -> None:
        if self.incoming is not None:
            raise ProtocolError("'end' in the middle of a file")
        # Every directory this session changes is fsynced once, after its last change: its
        # new entries (the renames of the last batch), its deletions, its times.
        dir_syncs = DirSyncs(self.sync_writes, self.tree, self._fail)
        try:
            self._flush(dir_syncs=dir_syncs)
            lock = self.module.lock_file
            if (self.deletes or self.dir_attrs) and lock and is_locked(lock) and not self.dry_run:
                info = status(lock)
                raise LockedError(f"mirroring lock appeared on the receiver: {info.describe() if info else 'locked'}")
            keep = self.excluder.excluded if self.excluder is not None else None
            refused = review_deletions(self.tree, self.deletes, self.policy, keep) if self.deletes else None
            if refused:
                log.warning("%s: %s", self.peer, refused)
            for path in self.deletes if not (refused or self.dry_run) else ():
                try:
                    kept = self.tree.remove(path, keep=keep)
                    self.stats.deleted += 1
                    if kept:  # excluded entries inside a deleted directory stay, like rsync
                        self._fail(None, path, f"cannot delete non-empty directory: {len(kept)} excluded "
                                               f"entries kept inside, e.g. {display_path(kept[0])}")  # fmt: skip
                except FileNotFoundError:
                    pass
                except (OSError, UnsafePathError) as exc:
                    self._fail(None, path, failure_reason(exc))
                dir_syncs.add(path.rpartition(b"/")[0])
            for path, attrs in reversed(self.dir_attrs):
                try:
                    self.tree.set_attrs(path, Kind.DIR, *attrs, owner=self.owner)
                except (OSError, UnsafePathError) as exc:
                    self._fail(None, path, failure_reason(exc))
                dir_syncs.add(path)
            dir_syncs.sync()
        finally:
            dir_syncs.close()
        if self._keepalive is not None:
            self._keepalive.end()  # nothing may follow the result
        self.t.send([P.RESULT, {
            "files": self.stats.files, "bytes": self.stats.bytes_written, "deleted": self.stats.deleted,
            "failed": self.stats.failed[:1000], "failed_count": len(self.stats.failed), "deletions_refused": refused,
        }])  # fmt: skip


def _keepalive_interval(value) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.05 <= value <= 3600:
        raise ProtocolError("bad keepalive: expected seconds in [0.05, 3600]")
    return float(value)


def _attrs(value) -> list:
    if not isinstance(value, list) or len(value) != 4:
        raise ProtocolError("bad attributes")
    mode = P.want_int(value[0], "mode", 0, 0o7777)
    uid = P.want_int(value[1], "uid", 0, 2**32 - 1)
    gid = P.want_int(value[2], "gid", 0, 2**32 - 1)
    mtime = P.want_int(value[3], "mtime", -(2**63), 2**63 - 1)
    return [mode, uid, gid, mtime]
