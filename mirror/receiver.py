"""The receiving end of a sync: the security boundary between the wire and the replica.

``Receiver`` serves one connection: handshake (protocol version, shared-secret challenge in
both directions, module), then sessions (``start`` ... ``end``) until the peer hangs up;
it holds only the connection's state (module, writer lock, replica guard).

A ``ReceiverSession`` serves one session: it scans the replica and streams a per-directory
summary, answers requests for listings and block signatures, and turns every frame the
sender sends into a checked record (``protocol.checked``: every length, integer and kind
bounded) that it hands to the replica writer (``mirror.apply``), the same writer a local
sync calls directly.  New content goes to a temporary file and is verified against the
sender's whole-file xxh3-128 here, every delta op against its basis, before the writer
may commit it; a mismatch is reported, never committed.  A session that committed
everything records what it covers of the sender's journal (``mirror.applied``); the
handshake and every result report that record.

The class is embeddable: give it a transport (``mirror.protocol``) and a module table.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading

from . import fastpath
from . import protocol as P
from .applied import Applied, read_applied, record_applied
from .apply import ModuleConfig, ReplicaAdmission
from .constants import COPY, HOLE, LITERAL
from .entry import Kind, stat_attrs
from .epoch import read_epoch
from .errors import (
    MirrorError,
    PeerTimeout,
    ProtocolError,
    UnsafePathError,
    display_path,
    failure_reason,
    fs_path,
)
from .exclude import make_excluder
from .guard import session_guard
from .holes import HoleWriter
from .renames import apply as apply_renames
from .renames import parse as parse_renames
from .replicadisk import mount_point_above
from .safefs import ConfinedTree
from .treescan import Scope, TreeScan
from .writerlock import WriterLock

log = logging.getLogger(__name__)

SUMMARY_BATCH = 256  # directories per summary message
LISTING_PART = 32768  # entries per listing message (a larger directory is sent in parts)
# A file's frames, between its 'file' and its end (the sender's pairing thread may also
# send its requests for listings meanwhile).
_CONTENT = frozenset({P.DATA, P.COPY, P.HOLE, P.FILE_END, P.FILE_ABORT})
_OPS = {P.DATA: LITERAL, P.COPY: COPY, P.HOLE: HOLE}  # a content frame's delta op


@contextlib.contextmanager
def _keeping_alive(transport, interval: float | None):
    """Says ``alive`` to the sender whenever a session has sent nothing for ``interval``
    seconds (a long commit, deletions of a big tree, the signature of a big file), so that
    the sender's timeout catches only a receiver that is stopped, hung or gone.  Stopped
    before the session's result: nothing follows it."""
    if interval is None:
        yield
        return
    stopped = threading.Event()

    def run() -> None:
        seen = transport.bytes_sent
        while not stopped.wait(interval):
            if transport.bytes_sent == seen:
                try:
                    transport.send([P.ALIVE])
                except (MirrorError, OSError):
                    return
            seen = transport.bytes_sent

    thread = threading.Thread(target=run, name="receiver-keepalive", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()  # a send under way has ended


class Receiver:
    """Serve one connection (see the module docstring); each session is a ``session_class``."""

    def __init__(self, transport, modules: dict[str, ModuleConfig], *, peer: str = "local",
                 writer: WriterLock | None = None, timeouts=None, admit=None, hang_up=None):  # fmt: skip
        self.t = transport
        # Called once the peer has proved it knows the secret (a server counts it among its
        # authenticated connections, or refuses it: too many); until then frames are small.
        self._admit = admit
        self.modules = modules
        self.peer = peer
        self.can_chown = False  # set by the handshake, like the module
        self.module: ModuleConfig | None = None
        self.sessions = 0  # served on this connection (the server's log says how many)
        self.subpath = b""  # set by the handshake
        self.version = P.PROTOCOL_VERSION  # the protocol version spoken with this sender, agreed at the hello
        # The one-writer lock, taken at the first session that writes (or already held by
        # an embedding caller that scanned the replica before connecting: see transfer.py).
        self._writer = writer
        self._hang_up = hang_up  # ends this connection, once fenced, for a sender at the replica's epoch
        # (set_timeout, seconds): how long the peer may stay silent in a session; none between
        # sessions (a live daemon's connection idles), none at all for in-process transports.
        self._set_timeout, self._session_timeout = timeouts if timeouts else (lambda seconds: None, None)
        self.replica: ReplicaAdmission | None = None  # set by the handshake
        self._idle_limit: float | None = None  # between sessions, for a sender that says it is there

    # -- connection ------------------------------------------------------------------------

    def serve(self) -> None:
        """Handshake, then sessions until the peer closes.  Errors are sent, then raised."""
        try:
            self._handshake()
            while True:
                self._set_timeout(self._idle_limit)
                try:
                    message = self.t.recv()
                except PeerTimeout:
                    if self._idle_limit is None:
                        raise
                    raise PeerTimeout(f"{self.peer} said nothing for {self._idle_limit:g} s between sessions "
                                      f"(it said it would every {self._idle_limit / P.IDLE_MISSED:g} s): "
                                      "taken for gone") from None  # fmt: skip
                if message is None:
                    return
                if message[0] == P.IDLE:
                    continue
                if self.modules.get(self.module.name) != self.module:
                    # The server reloaded its modules since the handshake and this one changed
                    # or went: no session may run on the old settings.
                    raise MirrorError(f"module {self.module.name!r} was reconfigured; reconnect")
                self._set_timeout(self._session_timeout)
                self._session(message)
                self.sessions += 1
        except Exception as exc:
            error = exc
            if isinstance(exc, OSError):  # a set-up or disk error that ends the session
                where = f"{display_path(exc.filename)}: " if exc.filename else ""  # the sender says "receiver: "
                error = MirrorError(f"{where}{exc.strerror or exc}")
            elif not isinstance(exc, MirrorError):
                log.exception("receiver for %s: internal error", self.peer)
                error = ProtocolError(f"receiver internal error: {type(exc).__name__}: {exc}")
            _send_error(self.t, type(error).__name__, error.exit_code, str(error))  # the sender hears why
            if error is exc:
                raise
            raise error from exc
        finally:
            if self._writer is not None:  # first: the next writer may be waiting for it
                self._writer.release()
                self._writer = None
            self.t.close()

    def _handshake(self) -> None:
        self.t.max_frame = P.PREAUTH_MAX_FRAME
        info = P.checked_greeting(self.t.recv(), P.HELLO)
        self.version = P.agreed_version(info, self.peer)
        name, client_nonce = info["module"], info["nonce"]
        module = self.modules.get(name)
        if module is None:
            raise ProtocolError(f"unknown module {name!r}")
        self.module = module
        self.replica = ReplicaAdmission(module, self.peer)
        self.can_chown = os.geteuid() == 0 and module.privileges.owners
        # Checked as a path of the tree (never into the state dir) when a session opens it.
        self.subpath = info["subpath"]
        if info["idle"] is not None:
            self._idle_limit = info["idle"] * P.IDLE_MISSED
        server_nonce = os.urandom(P.NONCE_SIZE)
        secret = self.module.secret
        self.t.send([P.CHALLENGE, {"proto": self.version, "nonce": server_nonce, "auth": secret is not None}])
        auth = P.checked_greeting(self.t.recv(), P.AUTH)
        proof = b""
        if secret is not None:
            P.verify(P.client_proof(secret, server_nonce, client_nonce, name), auth["proof"], self.peer)
            proof = P.server_proof(secret, server_nonce, client_nonce, name)
        if self._admit is not None:
            self._admit()
        self.t.max_frame = P.MAX_FRAME
        state_dir = self.module.resolved_state_dir
        # What this replica has applied, for the whole module only (a subpath is part of it):
        # true of the directory the tree is now, which each session's admission checks is still there.
        applied = read_applied(state_dir) if not self.subpath else None
        self.t.send([P.WELCOME, {
            "proof": proof, "epoch": read_epoch(state_dir), "applied": applied.as_wire() if applied else None,
            "read_only": self.module.read_only, "can_chown": self.can_chown, "software": P.SOFTWARE, "idle": True,
            "disk": mount_point_above(fs_path(self.module.path)),  # the sender remembers it (mirror.replicadisk)
        }])  # fmt: skip

    def _take_writer(self, epoch: int) -> None:
        if self._writer is None:
            # Held for the rest of the connection: the live daemon's sessions follow one
            # another on one connection, and it stays the module's one writer meanwhile.
            self._writer = WriterLock.take(self.module.resolved_state_dir, fs_path(self.module.path), self.peer,
                                           f"module {self.module.name!r}", epoch=epoch, hang_up=self._hang_up,
                                           replica_epoch=read_epoch(self.module.resolved_state_dir))  # fmt: skip
        else:
            self._writer.epoch = epoch  # this connection's later sessions

    # -- session ---------------------------------------------------------------------------

    def _session(self, start: list) -> None:
        opts = P.checked_start(start, scope=(None, Scope.from_wire), renames=([], parse_renames))
        dry_run = opts["dry_run"]
        tree_id, policy = session_guard(opts)
        # The sender's root names, against a replica that is no replica yet (a module's whole tree only).
        roots = set(opts["roots"]) if opts["roots"] is not None and not self.subpath else None
        mine = self.replica.admit(opts["epoch"], tree_id, deleting=opts["delete"], allow=policy.allow_mass_delete,
                                   dry_run=dry_run, take_writer=lambda: self._take_writer(opts["epoch"]),
                                   source_root=roots, excludes=opts["excludes"])  # fmt: skip
        root = fs_path(self.module.path)
        if self.subpath:
            root = self._ensure_subpath(root, dry_run)
        try:
            tree = self.replica.open_tree(root, dry_run)
        except OSError as exc:
            raise MirrorError(f"receiver cannot open its tree: {exc}") from None
        with contextlib.closing(tree), _keeping_alive(self.t, opts["keepalive"]):
            result = self.session_class(self, tree, opts, policy, mine).run()
        self.t.send([P.RESULT, result])

    def _ensure_subpath(self, root: bytes, dry_run: bool) -> bytes:
        """The subpath's directory below ``root``, never through a symlink: made where it is
        missing (each one fsynced in its parent), unless in a dry run (where it must be there)."""
        with contextlib.closing(ConfinedTree(root, reserved=self.replica.reserved_in(root))) as tree:
            parts = tree.parts(self.subpath)
            for i in range(1, len(parts) + 1) if not dry_run else ():
                if tree.lstat(b"/".join(parts[:i])) is None:
                    tree.make_dir(b"/".join(parts[:i]), 0o755)
                    os.fsync(tree.dir_fd(parts[: i - 1]))
            tree.dir_fd(parts)
        return os.path.join(root, self.subpath)


class ReceiverSession:
    """One session (``start`` ... ``end``) on a connection (see the module docstring)."""

    signature_part = P.SIGNATURE_PART

    def __init__(self, receiver: Receiver, tree: ConfinedTree, opts: dict, policy, epoch: int):
        self.t = receiver.t
        self.peer = receiver.peer
        self.version = receiver.version
        self.tree = tree
        self.opts = opts
        self.epoch = epoch
        self.flags = opts["flags"]
        self.scan, self.delta = fastpath.choose("scan"), fastpath.choose("delta")
        self.excluder = make_excluder(opts["excludes"])
        self.scope = opts["scope"]
        for path in (self.scope.entries | self.scope.trees) if self.scope is not None else ():
            if path:
                tree.parts(path)
        self.state_dir = receiver.module.resolved_state_dir
        writer = self.writer = receiver.replica.writer(
            tree, self.excluder, opts["epoch"], owner=opts["owner"] and receiver.can_chown,
            sync_writes=not opts["no_fsync"], dry_run=opts["dry_run"], policy=policy,
            failed=lambda req, path, reason: self.t.send([P.FAILED, req, path, reason]))  # fmt: skip
        self.listings: dict[bytes, object] = {}
        self.reports_applied = not receiver.subpath  # the record is the whole module's
        self._scan_problems = False
        self._summary_error: BaseException | None = None
        # Each frame's fields, checked (protocol.checked), to the method that handles them.
        self.handlers = {
            P.WANT: self._send_listings,
            P.SIG: self._on_sig,
            P.FILE: self._on_file,
            P.MKDIR: writer.mkdir,
            P.SYMLINK: lambda path, target, attrs: writer.special(path, Kind.SYMLINK, attrs, target=target),
            P.NODE: lambda path, kind, rdev, attrs: writer.special(path, kind, attrs, rdev=rdev),
            P.HARDLINK: writer.link,
            P.ATTRS: writer.set_attrs,
            P.DELETE: writer.delete,
            P.PING: lambda token: self.t.send([P.PONG, token]),
        }

    def run(self) -> dict:
        """The session, up to its ``end``; its result (the receiver sends it)."""
        # The live daemon saw these renames on the source: done here first, where the
        # replica's old entry holds what the new name must (mirror.renames).
        if not self.opts["dry_run"]:
            apply_renames(self.tree, self.opts["renames"])
        tree_scan = TreeScan(self.tree.root, excluder=self.excluder, checksum=bool(self.flags & self.scan.CMP_CHECKSUM),
                             state_dir=self.state_dir, use_cache=True, scope=self.scope,
                             background=self.scope is None)  # fmt: skip
        # A whole tree is summarised by a thread while requests are served; a scoped (live)
        # session's few listings are sent at once, before the first request can come, and
        # follow the summary unasked.
        summarizer = threading.Thread(target=self._send_summary, args=(tree_scan,), name="summary")
        root_attrs = stat_attrs(os.stat(self.tree.root_fd))
        self.t.send([P.READY, {"epoch": self.epoch, "root": root_attrs}], flush=self.scope is None)
        try:
            if self.scope is None:
                summarizer.start()
            else:
                self._send_summary(tree_scan)
            while True:
                kind, fields = self._next()
                if kind == P.END:
                    complete = isinstance(fields[0], dict) and fields[0].get("complete") is True
                    break
                if kind not in self.handlers:  # a file's content: _on_file reads it
                    raise ProtocolError(f"{kind!r}: file data for a file that was not started")
                self.handlers[kind](*fields)
            refused = self.writer.finish()
        except BaseException:
            self.writer.discard()
            raise
        finally:  # before its outcome is read
            if summarizer.ident is not None:
                summarizer.join()
        if self._summary_error is not None:
            raise self._summary_error
        if refused:
            log.warning("%s: %s", self.peer, refused)
        result = self.writer.result(refused, self.epoch)
        clean = complete and not refused and not result["failed_count"] and not self._scan_problems
        result["applied"] = self._record_applied(clean)
        return result

    def _next(self) -> tuple[str, list]:
        """The sender's next frame: its kind and its checked fields."""
        message = self.t.recv()
        if message is None:
            raise ProtocolError("sender closed the connection in the middle of a session")
        if self.version != P.PROTOCOL_VERSION:  # a sender of the version before
            message = P.from_version(message, self.version)
        return message[0], P.checked(message)

    def _record_applied(self, clean: bool) -> list | None:
        """After a ``clean`` session (every change committed, nothing left out on either side),
        record what it covers of the sender's journal, by the rules of docs/PROTOCOL.md ("What
        a replica has applied"); the record now (None if there is none, or for a subpath)."""
        if not self.reports_applied:
            return None
        current = read_applied(self.state_dir)
        o = self.opts
        # Not after a dry run, a scoped session without a base, or an epoch taken only in part.
        if clean and not o["dry_run"] and o["epoch"] == self.epoch and (self.scope is None or o["base"] is not None):  # fmt: skip
            value, base = Applied(self.epoch, o["seq"], o["journal"]), o["base"]
            # Never over a gap: a session that continues from ``base`` needs a record that reaches it.
            joined = base is None or (current is not None and current.epoch == value.epoch
                                      and current.journal == value.journal and current.seq >= base)  # fmt: skip
            if joined:
                self.writer.lock.check_replica()  # the record goes by path: to the disk the session wrote to
                try:
                    current = record_applied(self.state_dir, value)
                except OSError as exc:
                    log.warning("%s: cannot record the applied position: %s: %s", self.peer,
                                display_path(exc.filename or self.state_dir), exc.strerror)  # fmt: skip
            else:
                log.info("%s: session from journal sequence %d not recorded: this replica has %s", self.peer, base,
                         f"{current.seq} of {current.journal or 'a plain sync'}" if current else "no record")  # fmt: skip
        return current.as_wire() if current is not None else None

    # -- what the sender asks for ----------------------------------------------------------

    def _send_summary(self, tree_scan: TreeScan) -> None:
        """The summary, a fingerprint per directory; for a scoped (live) session also every
        listing right after its summary item: they are small, and it saves a round trip."""
        eager = self.scope is not None
        try:
            listings = iter(tree_scan)
            while batch := list(itertools.islice(listings, SUMMARY_BATCH)):
                # Known before the sender sees them in the summary and asks for them.
                self.listings.update((listing.path, listing) for listing in batch)
                items = [[listing.path, listing.fingerprint(self.flags),
                          (P.HAS_LINKS if listing.has_links() else 0) | (0 if listing.complete else P.INCOMPLETE)]
                         for listing in batch]  # fmt: skip
                self.t.send([P.SUMMARY, items], flush=not eager)
                if eager:
                    self._send_listings([listing.path for listing in batch])
            problems = [[p.path, p.errno, p.message] for p in tree_scan.problems]
            self._scan_problems = bool(problems)  # a subtree left alone: the session covers less
            self.t.send([P.SUMMARY_END, {"dirs": tree_scan.stats.dirs, "problems": problems[:1000]}])
        except BaseException as exc:  # reported by the session, after the main loop ends
            self._summary_error = exc
            _send_error(self.t, type(exc).__name__, 2, f"receiver scan failed: {exc}")

    def _send_listings(self, paths: list) -> None:
        for path in paths:
            listing = self.listings.get(path)
            if listing is None:
                raise ProtocolError(f"'want' for a directory the summary did not list: {display_path(path)}")
            parts = [listing]
            if len(listing) > LISTING_PART:
                entries = list(listing)
                parts = [self.scan.Listing(path, entries[i : i + LISTING_PART]) for i in range(0, len(entries), LISTING_PART)]  # fmt: skip
            for i, part in enumerate(parts, 1):
                self.t.send([P.LISTING, path, *part.pack(), listing.complete, i == len(parts)], flush=False)
        self.t.flush()

    def _on_sig(self, requests: list) -> None:
        for req, path in requests:
            try:
                with self.tree.open_regular(path) as basis:
                    sig = self.delta.signature(basis)
            except (OSError, UnsafePathError) as exc:
                self.t.send([P.SIG_FAILED, req, failure_reason(exc)], flush=False)
                continue
            from . import deltafmt  # msgpack: only a session with deltas loads it

            data = deltafmt.signature_to_bytes(sig)
            # A big file's signature spans several frames; the sender joins them in order.
            part = self.signature_part
            for start in range(0, max(len(data), 1), part):
                self.t.send([P.SIGNATURE, req, data[start : start + part], start + part >= len(data)], flush=False)
        self.t.flush()

    # -- file content: verified here, written by the writer ---------------------------------

    def _on_file(self, req: int, path: bytes, attrs: list, mode: str, block_size: int, basis_size: int,
                 holes: bool) -> None:  # fmt: skip
        """A file, its frames read here up to its end, even when it cannot be written: only
        its content and the sender's requests for listings may come meanwhile.  A patcher
        rebuilds it (against its basis for a delta) and hashes what it writes; the writer
        commits it only if that is what the sender's digest says.  ``holes``: the source
        file has holes, which it keeps here (its blocks of zeros are left unwritten)."""
        delta = self.delta
        if mode == "whole":  # no basis: every byte comes as data
            block_size, basis_size = delta.MIN_BLOCK_SIZE, 0
        elif not block_size:
            raise ProtocolError("bad block size: expected an integer in [1, 1073741824]")
        commit, failed = self.writer.new_file(path)
        with contextlib.ExitStack() as basis_open:
            if commit is not None:
                try:
                    basis = basis_open.enter_context(self.tree.open_regular(path)) if mode == "delta" else None
                    out = HoleWriter(commit.file.fileno()) if holes else commit.file
                    patcher = delta.Patcher(basis, out, block_size, basis_size)
                except (OSError, UnsafePathError) as exc:
                    failed = "basis-gone: " + failure_reason(exc)
                except ValueError as exc:
                    failed = f"basis-changed: {exc}"
            while True:
                kind, fields = self._next()
                if kind == P.WANT:
                    self._send_listings(*fields)
                    continue
                if kind not in _CONTENT:  # one file at a time, its frames uninterrupted
                    raise ProtocolError(f"{kind!r} in the middle of a file")
                if fields[0] != req:
                    raise ProtocolError("file data for a file that was not started")
                if kind in (P.FILE_END, P.FILE_ABORT):
                    break
                if failed:
                    continue
                try:
                    patcher.apply((_OPS[kind], *fields[1:]))
                except ValueError as exc:
                    raise ProtocolError(f"{display_path(path)}: {exc}") from None
                except OSError as exc:
                    failed = failure_reason(exc)
        if kind == P.FILE_ABORT:  # the source file changed while it was read, or a lock appeared
            self.writer.drop_file(commit)
        elif failed or patcher.finish() != tuple(fields[1:]):
            self.writer.drop_file(commit)
            self.writer.fail(req, path, failed or "mismatch: content does not match the sender's digest")
        elif holes and (failed := _set_length(out)):
            self.writer.drop_file(commit)
            self.writer.fail(req, path, failed)
        else:
            self.writer.commit_file(commit, attrs, fields[2], req)


def _set_length(out: HoleWriter) -> str | None:
    """Give a file written with holes its length; why it could not be, else None."""
    try:
        out.finish()
    except OSError as exc:
        return failure_reason(exc)
    return None


def _send_error(transport, name: str, exit_code: int, text: str) -> None:
    """The ``error`` frame, if the connection still takes it (the error is raised anyway)."""
    with contextlib.suppress(MirrorError, OSError):
        transport.send([P.ERROR, name, exit_code, text])


Receiver.session_class = ReceiverSession
