"""The sending end of a sync: scan, plan, and stream changes to a receiver, pipelined.

Three objects, one job each (``docs/ARCHITECTURE.md``): ``Sender``, the connection;
``SendSession``, one session (a ``sourcesession.SourceSession``); ``FileEncoder``, the
planner's operations as frames.  The exchange is ``docs/PROTOCOL.md``'s.

Nothing waits for a round trip per file: file data flows while listings and signatures are
on their way.  If the mirroring lock appears, the file in flight is abandoned, the session
ends cleanly and the sync stops with ``LockedError``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import threading
import time
from collections import namedtuple

from . import constants as K
from . import fastpath
from . import protocol as P
from .compare import CompareOptions, align
from .entry import ScanProblem, canonical_key, entry_attrs, stat_attrs
from .errors import (
    AuthError,
    Cancelled,
    ConnectionLost,
    LimitExceeded,
    LockedError,
    MirrorError,
    PeerTimeout,
    ProtocolError,
    SourceGuardError,
    StaleEpochError,
    display_path,
)
from .exclude import make_excluder
from .guard import DeletionPolicy, SourceGuard, root_names
from .plan import ATTRS, DELETE, DELTA, LINK, MKDIR, SPECIAL, SYMLINK, WHOLE, Op
from .records import SenderOptions, SyncResult
from .sourcesession import SourceSession
from .statedir import resolve_state_dir
from .treescan import TreeScan

log = logging.getLogger(__name__)

MAX_SIGS_IN_FLIGHT = 64
PAIRS_AHEAD = 1024  # pairs the pairing thread holds ready: their source listings are in memory
# What is buffered goes out at least this often while the trees are compared: the receiver
# verifies and commits files while the scans go on, rather than all at the end.
FLUSH_SECONDS = 0.005
_ERRORS = {exc.__name__: exc for exc in (StaleEpochError, LockedError, AuthError, SourceGuardError)}
# An entry's operation as its frame (docs/PROTOCOL.md).
_ENTRY_FRAMES = {
    MKDIR: lambda op: [P.MKDIR, op.path, entry_attrs(op.entry)],
    SYMLINK: lambda op: [P.SYMLINK, op.path, op.entry.target, entry_attrs(op.entry)],
    SPECIAL: lambda op: [P.NODE, op.path, int(op.entry.kind), op.entry.rdev, entry_attrs(op.entry)],
    LINK: lambda op: [P.HARDLINK, op.path, op.link_to],
    ATTRS: lambda op: [P.ATTRS, op.path, int(op.entry.kind), entry_attrs(op.entry)],
    DELETE: lambda op: [P.DELETE, op.path],
}
_SummaryItem = namedtuple("_SummaryItem", "path fingerprint flags")  # a directory of the receiver's summary
__all__ = ["FileEncoder", "SendSession", "Sender", "SenderOptions"]


class _Reader(threading.Thread):
    """Reads the receiver's messages and sorts them into queues; an error wakes every waiter."""

    def __init__(self, transport):
        super().__init__(name="sender-reader", daemon=True)
        self.t = transport
        self.queues = [queue.Queue() for _ in range(5)]  # each woken by an error
        self.summary, self.listings, self.signatures, self.pongs, self.results = self.queues
        self.failed: list = []
        self.error: BaseException | None = None
        self.ended = False  # the session's end is sent: its result may come
        self._sig_parts: list[bytes] = []  # the signature coming in, and its request
        self._sig_req = 0
        # request -> (path, the largest signature its basis can have)
        self.sig_requests: dict[int, tuple[bytes, int]] = {}
        # Each reply's checked fields (protocol.REPLY_FRAMES) to where they go.
        self._handlers = {
            P.SUMMARY: lambda items: [self.summary.put(item) for item in items],
            P.SUMMARY_END: self.summary.put,  # a map, where the items are lists
            P.LISTING: lambda *fields: self.listings.put(fields),
            P.SIGNATURE: self._signature_part,
            P.SIG_FAILED: lambda req, reason: self._signature(req, None),
            P.FAILED: lambda _req, path, reason: self.failed.append((path, reason)),
            P.PONG: self.pongs.put,
            P.RESULT: self._result,
        }

    def run(self) -> None:
        try:
            kind = None
            while kind != P.RESULT:
                message = receive(self.t)
                kind = message[0]
                try:
                    fields = P.checked(message, P.REPLY_FRAMES)  # an unknown kind too, before its handler
                    self._handlers[kind](*fields)
                except ProtocolError as exc:
                    raise ProtocolError(f"{self.t.peer}: {exc}") from None
        except BaseException as exc:
            self.error = exc
            for q in self.queues:
                q.put(exc)

    def _result(self, result: dict) -> None:
        if not self.ended:  # the sender still waits for something else: it would wait forever
            raise ProtocolError("a result before the session's end")
        self.results.put(result)

    def end(self, fields: dict) -> dict:
        """Send the session's ``end``; the receiver's result."""
        self.ended = True
        self.t.send([P.END, fields])
        return self.get(self.results)

    def _asked(self, req: int, answered: bool = False) -> tuple[bytes, int]:
        """``req``'s path and largest signature; ``answered``: no longer in flight."""
        asked = self.sig_requests.pop(req, None) if answered else self.sig_requests.get(req)
        if asked is None:
            raise ProtocolError("a signature nobody asked for (or answered twice)")
        return asked

    def _signature_part(self, req: int, part: bytes, last: bool) -> None:
        _path, limit = self._asked(req)
        if self._sig_parts and req != self._sig_req:  # one file's parts would pass for another's
            raise ProtocolError("a signature's parts interleaved with another's")
        self._sig_req = req
        self._sig_parts.append(part)
        if sum(map(len, self._sig_parts)) > limit:
            raise LimitExceeded(f"signature larger than its basis allows ({limit} bytes)")
        # Each part is a frame held until the last: as many as the largest signature needs.
        if len(self._sig_parts) > -(-limit // P.SIGNATURE_PART):
            raise ProtocolError("a signature in more parts than its size needs")
        if last:
            sig_bytes, self._sig_parts = b"".join(self._sig_parts), []
            self._signature(req, sig_bytes)

    def _signature(self, req: int, sig_bytes: bytes | None) -> None:
        """The answer to ``req``, decoded: its signature (None: the receiver has no basis now)."""
        path, _limit = self._asked(req, answered=True)
        sig = None
        if sig_bytes is not None:
            from . import deltafmt  # msgpack: only a session with deltas loads it

            try:
                sig = deltafmt.signature_from_bytes(sig_bytes)
            except MirrorError as exc:
                raise ProtocolError(f"bad signature for {display_path(path)}: {exc}") from None
        self.signatures.put((req, sig))

    def get(self, q: queue.Queue, block: bool = True):
        """The next item of ``q`` (None if ``block`` is false and there is none yet)."""
        try:
            item = q.get(block)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            q.put(item)  # keep waking later waiters too
            raise item
        return item


def receive(transport, kind: str | None = None):
    """The receiver's next message (``alive``, sent while it works, skipped); its ``error``
    raised as the matching local exception.  With ``kind``, it must be a ``kind`` frame:
    its map, checked (``protocol.checked_greeting``)."""
    while (message := transport.recv()) is not None and message[0] == P.ALIVE:
        pass
    if message is None:
        raise ProtocolError("the receiver closed the connection")
    if message[0] == P.ERROR:
        name = message[1] if len(message) > 1 and isinstance(message[1], str) else "MirrorError"
        exc_type = _ERRORS.get(name, MirrorError)
        exc = exc_type(f"receiver: {message[3] if len(message) > 3 else 'receiver error'}")
        if exc_type is MirrorError and len(message) > 2 and isinstance(message[2], int):
            exc.exit_code = message[2]
        raise exc
    try:
        return message if kind is None else P.checked_greeting(message, kind)
    except ProtocolError as exc:
        raise ProtocolError(f"{getattr(transport, 'peer', 'the receiver')}: {exc}") from None


class Sender:
    """A connection to one receiver: ``handshake()``, then ``run()`` per session (a
    ``SendSession``), each returning a ``SyncResult``."""

    def __init__(self, src_root: bytes, transport, options: SenderOptions, *, module: str = "",
                 subpath: bytes = b"", on_change=None, on_progress=None,
                 source_scan: TreeScan | None = None, idle_frames: bool = False):  # fmt: skip
        self.root = src_root
        self.t = transport
        self.o = options
        self.module = module
        self.subpath = subpath
        self.on_change = on_change
        self.on_progress = on_progress
        self.source_guard = SourceGuard(src_root, resolve_state_dir(src_root, options.state_dir))
        self.scans = (source_scan, None)  # the first session's, started by the caller
        # Over a pipe only (a remote shell): on a socket, data in flight would keep TCP's
        # keepalive, which finds a vanished receiver within seconds, from ever probing.
        self._announce_idle = idle_frames
        self._idle_frames, self._idle_sent = False, 0.0
        self.version = P.PROTOCOL_VERSION  # the protocol version spoken with this receiver, agreed at the hello

    def handshake(self) -> dict:
        nonce = os.urandom(P.NONCE_SIZE)
        self.t.send([P.HELLO, {**P.hello_versions(), "module": self.module, "subpath": self.subpath,
                               "nonce": nonce, "software": P.SOFTWARE,
                               **({"idle": P.IDLE_INTERVAL} if self._announce_idle else {})}])  # fmt: skip
        info = receive(self.t, P.CHALLENGE)
        self.version = P.challenged_version(info, getattr(self.t, "peer", "the receiver"))
        secret = self.o.secret
        if info.get("auth") and secret is None:
            raise AuthError("the receiver requires a shared secret (--secret-file)")
        if secret is not None and not info.get("auth"):
            # A receiver that does not ask for the secret cannot prove it knows it either:
            # it may be an impostor collecting the tree.
            raise AuthError("the receiver did not ask for the shared secret: refusing to send to it")
        proof = P.client_proof(secret, info["nonce"], nonce, self.module) if info.get("auth") else b""
        self.t.send([P.AUTH, {"proof": proof}])
        welcome = receive(self.t, P.WELCOME)
        if info.get("auth"):
            expected = P.server_proof(secret, info["nonce"], nonce, self.module)
            P.verify(expected, welcome["proof"], "the receiver")
        self._idle_frames = self._announce_idle and welcome["idle"]  # an older receiver takes none
        return welcome

    def idle(self) -> None:
        """Between sessions: tell the receiver we are still here, every ``IDLE_INTERVAL``."""
        now = time.monotonic()
        if self._idle_frames and now - self._idle_sent >= P.IDLE_INTERVAL:
            self.t.send([P.IDLE])
            self._idle_sent = now

    def run(self, welcome: dict, epoch: int, scope=None, renames=(), journal: dict | None = None) -> SyncResult:
        """One session: make the receiver's tree (or the part in ``scope``) equal ours.

        ``scope`` (a ``treescan.Scope``) limits both scans, for the live daemon; ``renames``
        (old, new) pairs are done on the receiver first.  ``journal``: the ``seq``, ``base``
        and ``journal`` fields of ``start`` (what the session covers of the source's
        journal, docs/PROTOCOL.md).  The connection stays usable for the next session.
        """
        return SendSession(self, welcome, scope).run(epoch, renames, journal)

    @contextlib.contextmanager
    def reading(self):
        """A thread reading the receiver's messages (a ``_Reader``) while the block sends;
        whatever ends it, the reader is gone afterwards and the error is the most telling."""
        reader = _Reader(self.t)
        reader.start()
        try:
            yield reader
        except (LockedError, Cancelled):
            # Stopped by a lock: let the receiver commit what it verified, then end.
            with contextlib.suppress(MirrorError, OSError):
                reader.end({})
            raise
        except BaseException as exc:
            self.t.close()  # the session is lost: wake the reader now rather than in 5 s
            reader.join(timeout=5)
            lost = isinstance(exc, (ConnectionLost, PeerTimeout))
            if lost and isinstance(reader.error, MirrorError) and reader.error is not exc:
                # We failed to send because the receiver stopped: its own reason says more
                # (a LockedError, exit 3, rather than "connection lost").
                raise reader.error from exc
            raise
        finally:
            reader.join(timeout=5)


class SendSession(SourceSession):
    """One session (``start`` ... ``end``) on a ``Sender``'s connection: scan, pair with the
    receiver's summary, compare, plan; the operations go to a ``FileEncoder``."""

    passes_on = "sent"

    def __init__(self, conn: Sender, welcome: dict, scope):
        super().__init__(conn, delta_threshold=conn.o.delta_threshold)
        self.t = conn.t
        self.scope = scope
        self.scoped = scope is not None and not scope.everything
        self.owner = bool(welcome.get("can_chown")) and os.geteuid() == 0
        self.compare = CompareOptions(checksum=self.o.checksum, owner=self.owner)
        self.kernel = fastpath.choose("scan")
        self.flags = self.compare.flags(self.kernel)
        self.encoder: FileEncoder | None = None
        self.reader: _Reader | None = None
        self._last_flush = 0.0

    def run(self, epoch: int, renames, journal: dict | None = None) -> SyncResult:
        sent_before, received_before = self.t.bytes_sent, self.t.bytes_received
        o = self.o
        try:
            tree_id, planned, scope = self.open(self.scope, renames)
            self.lock.check()
            self.t.send([P.START, {
                "epoch": epoch, "delete": o.delete, "checksum": o.checksum, "dry_run": o.dry_run,
                "flags": self.flags, "owner": self.owner, "excludes": list(o.excludes), "no_fsync": not o.fsync,
                "scope": scope.as_wire() if self.scoped else None,
                "renames": planned, "tree": tree_id, "keepalive": o.keepalive,
                "deletions": DeletionPolicy(o.max_delete, o.allow_mass_delete).as_wire(),
                "roots": self._root_names(planned), **(journal or {}),
            }])  # fmt: skip
            self.plan_root(receive(self.t, P.READY)["root"], self.owner)
            with self.conn.reading() as reader:  # from the summary to the receiver's result
                self.reader = reader
                self.encoder = FileEncoder(self, reader)
                with contextlib.closing(self._pairs(self.scans[0])) as pairs:
                    self.drive(pairs, self.compare, planned)
                # complete: nothing was left out on this side, so the receiver may record the
                # session's journal sequence as applied (mirror.applied)
                result = reader.end({"complete": not self.out.failed and not self.out.problems})
        finally:
            self.close()
        stats = self.out.stats
        stats.wire_sent = self.t.bytes_sent - sent_before
        stats.wire_received = self.t.bytes_received - received_before
        return self.finish(result, self.reader.failed)

    def _root_names(self, renames) -> list[bytes] | None:
        """For a deleting whole-tree session, the names at the source's root (at most
        ``ROOT_NAMES_MAX``): a receiver whose replica is no replica yet refuses a session that
        would delete everything it holds (``guard.foreign_replica_problem``)."""
        o = self.o
        if not o.delete or o.allow_mass_delete or self.scoped or renames:
            return None
        excluder = make_excluder(o.excludes)
        names = root_names(self.root, excluder.excluded if excluder is not None else None)
        return sorted(names) if len(names) <= P.ROOT_NAMES_MAX else None

    def do(self, op: Op) -> None:
        self.encoder.send(op)

    # -- pairing our listings with the receiver's ------------------------------------------

    def _pairs(self, tree: TreeScan):
        """``(src, dst)`` listing pairs in canonical order, dst fetched only where it differs.
        A thread pairs ahead (``_match``): it asks for listings, so the answers are usually
        here by the time the comparison reaches them.  Closed, however the session ends,
        the thread is gone before anything else is sent."""
        ahead: queue.Queue = queue.Queue(maxsize=PAIRS_AHEAD)
        stop = threading.Event()

        def walk():
            try:
                for item in self._match(tree):
                    ahead.put(item)
                    if stop.is_set():
                        return
                    if ahead.qsize() == 1:
                        self.t.flush()  # the consumer may be waiting on what is buffered
                self.t.flush()
                ahead.put(None)
            except BaseException as exc:
                ahead.put(exc)

        walker = threading.Thread(target=walk, name="sender-pairs", daemon=True)
        walker.start()
        try:
            while True:
                try:
                    item = ahead.get(timeout=FLUSH_SECONDS)
                except queue.Empty:
                    self.t.flush()  # whatever is buffered may be what the receiver waits for
                    item = ahead.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                src, dst = item
                if isinstance(dst, bytes):  # the path of the receiver's listing on its way
                    self.t.flush()
                    dst = self._receive_listing(dst)
                now = time.monotonic()
                if now - self._last_flush >= FLUSH_SECONDS:
                    self._last_flush = now
                    self.t.flush()
                yield src, dst
        finally:
            # Stopped, the thread puts one more item at most: room is made for it, and a
            # wait for the summary is woken.
            stop.set()
            self.reader.summary.put(Cancelled("the session ended"))
            with contextlib.suppress(queue.Empty):
                while True:
                    ahead.get_nowait()
            walker.join()

    def _summary(self):
        """The receiver's summary items, each directory once and in canonical order (the
        pairing walks both sides in that order); its end's problems go to the session's."""
        last = None
        while True:
            item = self.reader.get(self.reader.summary)
            if isinstance(item, dict):  # the summary's end
                for path, errno_, message in item["problems"]:
                    self.out.problems.append(ScanProblem(path, errno_, "on the receiver: " + message))
                return
            key = canonical_key(item[0])
            if last is not None and key <= last:
                raise ProtocolError(f"bad summary: {display_path(item[0])} out of order or repeated")
            last = key
            yield _SummaryItem(*item)

    def _match(self, tree: TreeScan):
        """Our listings against the receiver's summary: ``(src, dst)`` where dst is a listing,
        None (absent there) or the path of the receiver's listing on its way (src None: it
        is taken and dropped, in order)."""
        for s, d in align(tree, self._summary()):
            if d is None:
                yield s, None
            elif self.scoped:  # the receiver sends every listing unasked
                yield s, d.path
            elif s is None:
                continue  # deleted with its parent, whose listing shows it
            elif d.flags & P.INCOMPLETE:
                yield s, self.kernel.Listing(d.path, complete=False)
            elif d.fingerprint == s.fingerprint(self.flags) and not (d.flags & P.HAS_LINKS or s.has_links()):
                yield s, s  # unchanged: compares equal to itself
            else:
                self.t.send([P.WANT, [d.path]], flush=False)
                yield s, d.path

    def _receive_listing(self, path: bytes):
        """The receiver's listing of ``path``, the next one to arrive (in parts if large)."""
        parts, count, last = [], 0, False
        while not last:
            got_path, strings, records, digests, complete, last = self.reader.get(self.reader.listings)
            if got_path != path:
                raise ProtocolError("listing arrived out of order")
            try:
                parts.append(self.kernel.Listing.unpack(path, strings, records, digests, 1 << 20))
            except ValueError as exc:
                raise ProtocolError(f"bad listing for {display_path(path)}: {exc}") from None
            count += len(parts[-1])
            if count > K.MAX_ENTRIES_PER_DIR:  # parts without end would hold the sender's memory
                raise LimitExceeded(f"{self.t.peer}: listing of {display_path(path or b'.')} over "
                                    f"{K.MAX_ENTRIES_PER_DIR} entries")  # fmt: skip
        if not complete:
            return self.kernel.Listing(path, complete=False)
        if len(parts) == 1:
            return parts[0]
        entries = [e for part in parts for e in part]
        if any(a.name >= b.name for a, b in zip(entries, entries[1:], strict=False)):
            raise ProtocolError(f"listing parts of {display_path(path)} out of order")
        return self.kernel.Listing(path, entries)

    # -- a delta whose basis changed meanwhile, sent again whole ----------------------------

    def content_done(self) -> None:
        """Every delta sent; those whose basis changed on the receiver meanwhile are sent
        again whole, before the hard links to them."""
        self.encoder.serve_signatures(block=True)
        if not self.out.stats.files_delta:
            # Only a delta can fail for a reason a second try fixes (its basis changed); any
            # other failure comes with the result.  No barrier, no round trip.
            return
        reader = self.reader
        self.t.send([P.PING, 0])
        reader.get(reader.pongs)  # the receiver has processed everything sent: its failures are in
        mismatched = [path for path, reason in reader.failed if reason.startswith(("mismatch", "basis-"))]
        retry = dict.fromkeys(mismatched)
        reader.failed = [f for f in reader.failed if f[0] not in retry]
        for path in retry:
            entry = self.entry_at(path, stat.S_ISREG)
            if entry is not None:
                log.info("%s: sent again whole after a failed verification", display_path(path))
                self.encoder.stream_file(Op(WHOLE, path, entry), None)


class FileEncoder:
    """The planner's operations as frames: an entry is one frame; a file is streamed whole,
    or, for a delta, once the receiver's signature of its copy has arrived (requested at
    once, the next files sent meanwhile).  Counts what it sent in ``stats``; a file it
    could not send goes to ``failed`` (the session goes on)."""

    def __init__(self, session: SendSession, reader: _Reader):
        self.session = session  # the source file read by its rule
        self.t, self.lock = session.t, session.lock
        self.stats, self.failed = session.out.stats, session.out.failed
        self.on_progress = session.conn.on_progress
        self.reader = reader
        self.delta = fastpath.choose("delta")
        self.version = session.conn.version
        self._req = 0
        self._deferred: dict[int, Op] = {}

    def send(self, op: Op) -> None:
        """One planned operation, encoded as its frame (a delta waits for its signature); then
        the deltas whose signatures are in."""
        if op.kind == WHOLE:
            self.stream_file(op, None)
        elif op.kind == DELTA:
            self._request_signature(op)
        else:
            self.t.send(_ENTRY_FRAMES[op.kind](op), flush=False)
        self.serve_signatures(block=False)

    def _request_signature(self, op: Op) -> None:
        self._req += 1
        self._deferred[self._req] = op
        # The receiver's default blocks are at least 512 bytes, 4 + 16 bytes each at most.
        self.reader.sig_requests[self._req] = (op.path, 4096 + (op.basis.size // 512 + 2) * 24)
        self.t.send([P.SIG, [[self._req, op.path]]])  # asked at once: the next files go meanwhile
        if len(self._deferred) >= MAX_SIGS_IN_FLIGHT:
            self.serve_signatures(block=True, until=MAX_SIGS_IN_FLIGHT // 2)

    def serve_signatures(self, block: bool, until: int = 0) -> None:
        """Send the delta-encoded files whose signatures have arrived (all of them if ``block``)."""
        while len(self._deferred) > until:
            if block:
                self.t.flush()
            item = self.reader.get(self.reader.signatures, block)
            if item is None:
                return
            req, sig = item  # sig None: the receiver has no basis now (sent whole)
            self.stream_file(self._deferred.pop(req), sig)

    def stream_file(self, op: Op, sig) -> None:
        """Send one file, whole (``sig`` None) or as a delta; abandon it if it changes under us."""
        self.lock.check()
        path = op.path
        f = self.session.open_file(path, op.entry)
        if f is None:
            return
        with f:
            fd = f.fileno()
            before = self.session.settled(fd, path)
            if before is None:
                return
            self._req += 1
            req = self._req
            stats = self.stats
            how = ["delta", sig.block_size, sig.basis_size] if sig is not None else ["whole", 0, 0]
            # Fewer blocks than its length: the receiver keeps its holes (and its blocks of zeros)
            # as holes; sent whole, a hole goes as its length.
            holes = self.version >= P.HOLES_SINCE and before.st_blocks * 512 < before.st_size
            self.t.send(P.in_version([P.FILE, req, path, stat_attrs(before), *how, holes], self.version), flush=False)
            block = sig.block_size if sig is not None else 1
            ops = self.delta.delta(sig, f, holes=holes)
            try:
                for op_ in ops:
                    if op_[0] == K.LITERAL:
                        self.t.send([P.DATA, req, bytes(op_[1])], flush=False)
                        stats.literal_bytes += len(op_[1])
                    elif op_[0] == K.HOLE:
                        self.t.send([P.HOLE, req, op_[1]], flush=False)
                    else:
                        self.t.send([P.COPY, req, op_[1], op_[2]], flush=False)
                        stats.matched_bytes += min(op_[2] * block, sig.basis_size - op_[1] * block)
                    self.lock.check(force=False)
                changed = self.session.changed_while_read(fd, before, ops.new_size, path)
            except (LockedError, Cancelled, OSError) as exc:
                self.t.send([P.FILE_ABORT, req, "read error" if isinstance(exc, OSError) else "stopped"])
                if not isinstance(exc, OSError):
                    raise
                self.failed.append((path, f"read error on the sender: {exc.strerror}"))
                return
            if changed:
                self.t.send([P.FILE_ABORT, req, "changed while sending"])
                return
            self.t.send([P.FILE_END, req, ops.digest, ops.new_size], flush=False)
            stats.files_sent += 1
            stats.files_delta += sig is not None
            stats.size_of_sent_files += ops.new_size
            if self.on_progress is not None:
                self.on_progress(ops.new_size)
