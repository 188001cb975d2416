"""The wire protocol: messages, their framing on a byte stream, and the handshake proofs.

A message is a msgpack array whose first element names it (``["file", ...]``).  On a byte
stream each message is one frame: a 4-byte big-endian length, then the msgpack body.  The
length is checked against ``MAX_FRAME`` before anything is allocated, and the body is
decoded with limits on every string, array and map, so a hostile peer costs at most one
frame of memory before it is cut off.  ``docs/PROTOCOL.md`` describes the exchange.

In local mode the same messages travel through in-process queues (``LocalTransport``):
one planner and one writer, whichever side of a network they run on.
"""

from __future__ import annotations

import collections
import queue
import select
import struct
import threading
import time
from typing import BinaryIO

from .errors import AuthError, LimitExceeded, PeerTimeout, ProtocolError

PROTOCOL_VERSION = 2
SOFTWARE = "hamirror/0.1"
MAX_FRAME = 8 << 20  # a listing part, a signature or a literal chunk fits well below this
# Before the peer has proved it knows the secret, nothing larger is read: a hello with a
# 4 KiB subpath fits; an anonymous connection costs a few KiB, not a frame's 8 MiB.
PREAUTH_MAX_FRAME = 8 << 10
MAX_CHUNK = 256 << 10  # literal data per "data" message
NONCE_SIZE = 32
# Summary flags per directory
HAS_LINKS = 1  # holds a multiply-linked file: its listing is always exchanged
INCOMPLETE = 2  # the receiver could not read it: leave its subtree alone
_HEADER = struct.Struct(">I")

# Messages sent by the client (the side with the source tree)
HELLO, AUTH, START, WANT, SIG, FILE, DATA, COPY, FILE_END, FILE_ABORT = (
    "hello", "auth", "start", "want", "sig", "file", "data", "copy", "file_end", "file_abort",
)  # fmt: skip
MKDIR, SYMLINK, HARDLINK, NODE, ATTRS, DELETE, PING, END = (
    "mkdir", "symlink", "hardlink", "node", "attrs", "delete", "ping", "end",
)  # fmt: skip
# Messages sent by the server (the receiver)
CHALLENGE, WELCOME, READY, SUMMARY, SUMMARY_END, LISTING, SIGNATURE, SIG_FAILED, FAILED, PONG, RESULT, ERROR = (
    "challenge", "welcome", "ready", "summary", "summary_end", "listing", "signature", "sig_failed",
    "failed", "pong", "result", "error",
)  # fmt: skip
ALIVE = "alive"  # the receiver is still at work (sent during a session when it has been quiet)


# msgpack is imported by the first frame: a local sync passes messages as objects and never
# loads it (nor the datetime module it pulls in).


def encode(message: list | tuple) -> bytes:
    import msgpack

    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise LimitExceeded(f"message {message[0]!r} of {len(body)} bytes exceeds the frame limit")
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> list:
    import msgpack

    try:
        message = msgpack.unpackb(
            body, raw=False, use_list=True, strict_map_key=True,
            max_bin_len=MAX_FRAME, max_str_len=1 << 16, max_array_len=1 << 20, max_map_len=64,
        )  # fmt: skip
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise ProtocolError(f"malformed frame: {exc}") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ProtocolError("malformed frame: not a message")
    return message


class StreamTransport:
    """Messages over a pair of binary streams (a socket's files, or a child's stdio).

    A socket's timeout (``settimeout``, its owner's) bounds each wait for the peer; a
    stream that has none (a pipe) is given ``read_timeout``: each read waits at most that
    long for the peer to send something.  Either ends in ``PeerTimeout``.  ``max_frame``
    bounds the next frames (smaller before the peer has authenticated)."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO, *, bwlimit: int | None = None, on_close=None,
                 read_timeout: float | None = None, peer: str = "the peer", timeout_hint: str = ""):  # fmt: skip
        self.rfile = rfile
        self.wfile = wfile
        self._send_lock = threading.Lock()
        self._limiter = RateLimiter(bwlimit) if bwlimit else None
        self._on_close = on_close
        self._read_timeout = read_timeout
        self.peer = peer
        self.timeout_hint = timeout_hint  # e.g. " (--timeout 120)": what set it, for the message
        self.max_frame = MAX_FRAME
        self.bytes_sent = 0
        self.bytes_received = 0
        self._deadline: float | None = None
        self._settimeout = None

    def set_deadline(self, when: float | None, settimeout=None) -> None:
        """Until ``when`` (``time.monotonic()``), no read waits past it, however slowly the
        peer sends (each raw read gets only the time left, which a plain socket timeout,
        restarted by every byte, would not); ``settimeout`` is the socket's.  None: off."""
        self._deadline = when
        if settimeout is not None:
            self._settimeout = settimeout

    def _timed_out(self, waiting: str) -> PeerTimeout:
        return PeerTimeout(f"{self.peer} did not answer while {waiting}: it timed out{self.timeout_hint}; "
                           "it is stopped, hung or unreachable")  # fmt: skip

    def send(self, message: list | tuple, flush: bool = True) -> None:
        frame = encode(message)
        if self._limiter is not None:
            self._limiter.take(len(frame))
        with self._send_lock:
            try:
                self.wfile.write(frame)
                if flush:
                    self.wfile.flush()
            except TimeoutError:
                raise self._timed_out("we sent (it stopped reading)") from None
            except (BrokenPipeError, ConnectionError, ValueError) as exc:
                raise ProtocolError(f"connection lost while sending: {exc}") from None
            self.bytes_sent += len(frame)

    def flush(self) -> None:
        with self._send_lock:
            try:
                self.wfile.flush()
            except TimeoutError:
                raise self._timed_out("we sent (it stopped reading)") from None
            except (BrokenPipeError, ConnectionError, ValueError) as exc:
                raise ProtocolError(f"connection lost while sending: {exc}") from None

    def recv(self) -> list | None:
        """The next message, or None at a clean end of stream (between frames)."""
        header = self._read_exact(_HEADER.size, at_boundary=True)
        if header is None:
            return None
        (length,) = _HEADER.unpack(header)
        if length > self.max_frame:
            raise LimitExceeded(f"peer sent a frame of {length} bytes (limit {self.max_frame})")
        body = self._read_exact(length, at_boundary=False)
        self.bytes_received += _HEADER.size + length
        return decode(body)

    def _read_exact(self, n: int, at_boundary: bool) -> bytes | None:
        chunks = []
        got = 0
        while got < n:
            try:
                if self._deadline is not None:
                    left = self._deadline - time.monotonic()
                    if left <= 0:
                        raise PeerTimeout(f"{self.peer} did not finish its handshake in time")
                    self._settimeout(left)
                    chunk = self.rfile.read1(n - got)  # one raw read: the time left is checked again
                else:
                    if self._read_timeout is not None:
                        ready, _, _ = select.select([self.rfile], [], [], self._read_timeout)
                        if not ready:
                            raise TimeoutError
                    chunk = self.rfile.read(n - got)
            except TimeoutError:
                if self._deadline is not None:
                    raise PeerTimeout(f"{self.peer} did not finish its handshake in time") from None
                raise self._timed_out("we waited for it") from None
            except (ConnectionError, ValueError, OSError) as exc:
                raise ProtocolError(f"connection lost while receiving: {exc}") from None
            if not chunk:
                if at_boundary and got == 0:
                    return None
                raise ProtocolError("connection closed in the middle of a frame (truncated)")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        for f in (self.wfile, self.rfile):
            try:
                f.close()
            except (OSError, ValueError):
                pass
        if self._on_close is not None:
            self._on_close()


_END_OF_STREAM = object()  # what LocalTransport.close() leaves in the other end's inbox


class LocalTransport:
    """One end of an in-process pair: the same messages, no encoding, no sockets.

    Like a stream's write buffer, messages sent with ``flush=False`` are held and handed
    over together at the next flush (or once ``BATCH_MESSAGES`` or ``BATCH_BYTES`` are held):
    one queue hand-off, one wake-up of the other thread, per batch instead of per message.
    Or none at all: a receiver in a session has its handler run by the sending thread itself
    (``handle_in_sender``), so a local sync's sender and receiver stop taking the
    interpreter's lock from each other at every system call.  Until the session has sent
    ``DIRECT_BYTES``: a big transfer goes back to batches, so that the sender's reading and
    the receiver's writing and fsyncs overlap in two threads again.

    ``close()`` says this end will send nothing more (the other end's ``recv`` returns None
    once it has read everything before it) and will not read on: the other end's ``send``
    then fails instead of waiting forever on a full queue (a receiver that stopped on an
    error must not leave its sender blocked)."""

    BATCH_MESSAGES = 512
    BATCH_BYTES = 1 << 20
    # S4's 235 changes carry 2.9 MB; S3 (6 GB) ran about 10% slower in one thread.
    DIRECT_BYTES = 8 << 20

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, mine: threading.Event, peers: threading.Event):
        self._inbox = inbox
        self._outbox = outbox
        self._closed = mine
        self._peer_closed = peers
        self.bytes_sent = 0
        self.bytes_received = 0
        self._peer_done = False
        self._held: list = []  # sent, not yet handed over
        self._held_bytes = 0
        self._send_lock = threading.Lock()  # two threads of one end may send (a summary, replies)
        self._arrived: collections.deque = collections.deque()  # handed over, not yet received
        self._peer: LocalTransport | None = None
        self._handler = None  # set by the other end's handle_in_sender: sends run it here
        self._handled: _Handled | None = None
        self._handled_bytes = 0

    @classmethod
    def pair(cls, depth: int = 32) -> tuple[LocalTransport, LocalTransport]:
        """Two connected ends; at most ``depth`` batches wait in each direction."""
        a_to_b: queue.Queue = queue.Queue(maxsize=depth)
        b_to_a: queue.Queue = queue.Queue(maxsize=depth)
        a_closed, b_closed = threading.Event(), threading.Event()
        a, b = cls(b_to_a, a_to_b, a_closed, b_closed), cls(a_to_b, b_to_a, b_closed, a_closed)
        a._peer, b._peer = b, a
        return a, b

    def send(self, message: list | tuple, flush: bool = True) -> None:
        # No encoding here; count what the frame would carry, for the transfer statistics.
        size = 16 + sum(len(x) for x in message if isinstance(x, bytes))
        with self._send_lock:
            self.bytes_sent += size
            if self._handler is not None:
                self._handled_bytes += size
                if self._handled_bytes <= self.DIRECT_BYTES:
                    self._run_handler(list(message))
                    return
                self._stop_handling(QUEUED)  # a big transfer: batches again, from this message on
            self._held.append(list(message))
            self._held_bytes += size
            if flush or len(self._held) >= self.BATCH_MESSAGES or self._held_bytes >= self.BATCH_BYTES:
                self._hand_over()

    def handle_in_sender(self, handler) -> str:
        """Have the other end's sends run ``handler(message)`` in the sending thread, in order.
        Called by the receiving end, which waits meanwhile: an in-process peer's messages then
        cost no hand-over to another thread and back.  Returns ``ENDED`` once the handler
        returned True (the session's end), ``CLOSED`` if the other end closed first, or
        ``QUEUED`` when the other end went back to handing over batches (``DIRECT_BYTES``):
        ``recv`` the rest.  A handler's exception is raised here.

        What the other end sent before is handled first, here, under its send lock."""
        peer = self._peer
        done = _Handled()
        # A sender blocked on our full queue holds its send lock: make room while waiting.
        while not peer._send_lock.acquire(timeout=0.01):
            self._take_arrived()
        try:
            peer._handler, peer._handled, peer._handled_bytes = handler, done, 0
            self._take_arrived()
            waiting = list(self._arrived)
            self._arrived.clear()
            waiting.extend(peer._held)
            peer._held, peer._held_bytes = [], 0
            for i, message in enumerate(waiting):
                if peer._handler is None:  # ended: what follows is for later
                    self._arrived.extend(waiting[i:])
                    break
                peer._run_handler(message)
            if peer._handler is not None and (self._peer_done or peer._closed.is_set()):
                peer._stop_handling(CLOSED)
        finally:
            peer._send_lock.release()
        done.wait()
        if done.error is not None:
            raise done.error
        return done.outcome

    def _take_arrived(self) -> None:
        """Move every batch already handed over to ``_arrived``, without waiting."""
        while not self._peer_done:
            try:
                batch = self._inbox.get_nowait()
            except queue.Empty:
                return
            if batch is _END_OF_STREAM:
                self._peer_done = True
            else:
                self._arrived.extend(batch)

    def _run_handler(self, message: list) -> None:
        """Under ``_send_lock``: the other end's handler, on one message this end sent."""
        try:
            if self._handler(message):
                self._stop_handling(ENDED)
        except Exception as exc:  # the receiving end's error: raised in its own thread
            self._stop_handling(CLOSED, exc)
        except BaseException:  # this thread is interrupted: the session ends unfinished
            self._stop_handling(CLOSED)
            raise

    def _stop_handling(self, outcome: str, error: BaseException | None = None) -> None:
        """Under ``_send_lock``: sends queue again; the other end's ``handle_in_sender`` returns."""
        self._handler = None
        self._handled.finish(outcome, error)

    def flush(self) -> None:
        with self._send_lock:
            self._hand_over()

    def _hand_over(self) -> None:
        if not self._held:
            return
        batch, self._held, self._held_bytes = self._held, [], 0
        while True:
            try:
                self._outbox.put(batch, timeout=0.1)
                return
            except queue.Full:
                if self._peer_closed.is_set():
                    raise ProtocolError("the other side has stopped") from None

    def recv(self) -> list | None:
        if self._arrived:
            return self._arrived.popleft()
        while not self._peer_done:
            try:
                batch = self._inbox.get(timeout=0.05 if self._peer_closed.is_set() else 0.2)
            except queue.Empty:
                if self._peer_closed.is_set():
                    return None
                continue
            if batch is _END_OF_STREAM:
                self._peer_done = True
                break
            self._arrived.extend(batch)
            return self._arrived.popleft()
        return None

    def close(self) -> None:
        self._closed.set()
        with self._send_lock:
            if self._handler is not None:  # the other end waits in handle_in_sender
                self._stop_handling(CLOSED)
        batch, self._held = self._held, []
        try:
            if batch:
                self._outbox.put_nowait(batch)
            # Wakes the other end at once (it would otherwise notice the close at its next poll).
            self._outbox.put_nowait(_END_OF_STREAM)
        except queue.Full:
            pass


# How a ``handle_in_sender`` ended.
ENDED, CLOSED, QUEUED = "ended", "closed", "queued"


class _Handled:
    """How a ``handle_in_sender`` ended: one of the outcomes above, and an error if any."""

    def __init__(self):
        self._event = threading.Event()
        self.outcome = CLOSED
        self.error: BaseException | None = None

    def finish(self, outcome: str, error: BaseException | None = None) -> None:
        self.outcome, self.error = outcome, error
        self._event.set()

    def wait(self) -> None:
        self._event.wait()


class RateLimiter:
    """Token bucket for ``--bwlimit`` (bytes per second), with a quarter second of burst."""

    def __init__(self, rate: int):
        self.rate = rate
        self.capacity = max(rate / 4, MAX_CHUNK + 1024)
        self.tokens = self.capacity
        self.last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


def _proof(secret: bytes, role: bytes, first: bytes, second: bytes, module: str) -> bytes:
    import hashlib  # here: a local sync (no secret) never loads OpenSSL
    import hmac

    return hmac.new(secret, b"hamirror-v1 " + role + b"\0" + first + second + module.encode(), hashlib.sha256).digest()


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, module: str) -> bytes:
    """What the client shows: it knows the secret, for this challenge and this module."""
    return _proof(secret, b"client", server_nonce, client_nonce, module)


def server_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, module: str) -> bytes:
    """What the server shows back, so the client knows it is talking to the real receiver."""
    return _proof(secret, b"server", client_nonce, server_nonce, module)


def verify(expected: bytes, got, who: str) -> None:
    import hmac

    if not isinstance(got, bytes) or not hmac.compare_digest(expected, got):
        raise AuthError(f"authentication failed: {who} does not know the shared secret")


# -- field checks for decoded messages --------------------------------------------------------


def want_bytes(value, what: str, max_len: int = MAX_FRAME) -> bytes:
    if not isinstance(value, bytes) or len(value) > max_len:
        raise ProtocolError(f"bad {what}: expected bytes of at most {max_len}")
    return value


def want_int(value, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"bad {what}: expected an integer in [{lo}, {hi}]")
    return value


def want_len(message: list, n: int) -> list:
    if len(message) != n:
        raise ProtocolError(f"malformed {message[0]!r} message ({len(message)} fields, expected {n})")
    return message


def load_secret(path: str) -> bytes:
    """A shared secret from a file: its first line, which must not be empty."""
    with open(path, "rb") as f:
        secret = f.read(4096).split(b"\n", 1)[0].strip()
    if len(secret) < 8:
        raise AuthError(f"{path}: the shared secret must be at least 8 bytes on its first line")
    return secret
