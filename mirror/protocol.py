"""The wire protocol: messages, their framing on a byte stream, and the handshake proofs.

A message is a msgpack array whose first element names it (``["file", ...]``).  On a byte
stream each message is one frame: a 4-byte big-endian length, then the msgpack body.  The
length is checked against ``MAX_FRAME`` before anything is allocated, and the body is
decoded with limits on every string, array and map, so a hostile peer costs at most one
frame of memory before it is cut off.  ``docs/PROTOCOL.md`` describes the exchange.

``checked(message)`` turns each frame a receiver accepts in a session into a checked
record, through one table (``_SESSION_FRAMES``): a frame of unknown kind, the wrong number
of fields, or a field of the wrong type or out of its bounds ends the session.
"""

from __future__ import annotations

import contextlib
import select
import struct
import threading
import time
from typing import BinaryIO

from . import constants as K
from .applied import MAX_TOKEN  # the journal token a replica records
from .errors import AuthError, ConnectionLost, LimitExceeded, PeerTimeout, ProtocolError
from .exclude import MAX_PATTERN_BYTES, MAX_PATTERNS
from .ratelimit import RateLimiter

PROTOCOL_VERSION = 5
# The oldest version this end still speaks: the two nodes of a cluster upgraded one at a time
# keep mirroring to each other, whichever runs the release before (docs/PROTOCOL.md, "Versions").
OLDEST_VERSION = 4
SOFTWARE = "hamirror/0.1"
MAX_FRAME = 8 << 20  # a listing part, a signature or a literal chunk fits well below this
# Before the peer has proved it knows the secret, nothing larger is read: a hello with a
# 4 KiB subpath fits; an anonymous connection costs a few KiB, not a frame's 8 MiB.
PREAUTH_MAX_FRAME = 8 << 10
MAX_CHUNK = 256 << 10  # literal data per "data" message
SIGNATURE_PART = 4 << 20  # a signature's bytes per "signature" message (a big one spans several)
NONCE_SIZE = 32
# Summary flags per directory
HAS_LINKS = 1  # holds a multiply-linked file: its listing is always exchanged
INCOMPLETE = 2  # the receiver could not read it: leave its subtree alone
_HEADER = struct.Struct(">I")

# Messages sent by the client (the side with the source tree)
HELLO, AUTH, START, WANT, SIG, FILE, DATA, COPY, HOLE, FILE_END, FILE_ABORT = (
    "hello", "auth", "start", "want", "sig", "file", "data", "copy", "hole", "file_end", "file_abort",
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
IDLE = "idle"  # between sessions: the sender is still there, with nothing to send
# A sender that says so in its hello sends ``idle`` this often between sessions; a receiver
# that heard nothing for IDLE_MISSED of them ends the connection (its writer lock with it):
# a sender that vanished with the network (no FIN, no reset) leaves no receiver holding the
# replica for the hours a remote shell's TCP keepalive may take.
IDLE_INTERVAL = 5.0
IDLE_MISSED = 4


# msgpack is imported by the first frame: a local sync never loads it (nor the datetime
# module it pulls in).


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


def keepalive(sock, idle: int = 60, interval: int = 10, count: int = 6) -> None:
    """TCP keepalive: a peer that vanished (power loss, half-open connection) is noticed."""
    import socket

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class StreamTransport:
    """Messages over a pair of binary streams (a socket's files, or a child's stdio).

    A socket's timeout (``settimeout``, its owner's) bounds each wait for the peer; a
    stream that has none (a pipe) is given ``read_timeout``: each read waits at most that
    long for the peer to send something.  Either ends in ``PeerTimeout``.  ``max_frame``
    bounds the next frames (smaller before the peer has authenticated).  ``on_abort`` (a
    socket's shutdown) ends the connection at the first timeout, so that a thread reading or
    writing meanwhile stops at once with that same ``PeerTimeout`` and ``close`` has nothing
    left to wait for; ``abort_when_silent`` false: only when the peer stops reading (a peer
    that went silent may still read why it is dropped)."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO, *, bwlimit: int | None = None, on_close=None,
                 read_timeout: float | None = None, peer: str = "the peer", timeout_hint: str = "",
                 on_abort=None, abort_when_silent: bool = True):  # fmt: skip
        self.rfile = rfile
        self.wfile = wfile
        self._send_lock = threading.Lock()
        self._limiter = RateLimiter(bwlimit) if bwlimit else None
        self._on_close = on_close
        self._on_abort = on_abort
        self._abort_when_silent = abort_when_silent
        self.timed_out: PeerTimeout | None = None
        self._read_timeout = read_timeout
        self.peer = peer
        self.timeout_hint = timeout_hint  # e.g. " (--timeout 120)": what set it, for the message
        self.max_frame = MAX_FRAME
        self.bytes_sent = 0
        self.bytes_received = 0
        self._deadline: float | None = None
        self._settimeout = None

    def set_read_timeout(self, seconds: float | None) -> None:
        """A pipe's ``read_timeout`` from now on (None: reads wait for ever).  Its reader must
        be unbuffered: a wait for the pipe would not see bytes already in a buffer."""
        self._read_timeout = seconds

    def set_deadline(self, when: float | None, settimeout=None) -> None:
        """Until ``when`` (``time.monotonic()``), no read waits past it, however slowly the
        peer sends (each raw read gets only the time left, which a plain socket timeout,
        restarted by every byte, would not); ``settimeout`` is the socket's.  None: off."""
        self._deadline = when
        if settimeout is not None:
            self._settimeout = settimeout

    def _timed_out(self, waiting: str, silent: bool) -> PeerTimeout:
        if self.timed_out is None:
            self.timed_out = PeerTimeout(f"{self.peer} did not answer while {waiting}: it timed out{self.timeout_hint}; "
                                         "it is stopped, hung or unreachable")  # fmt: skip
        if self._on_abort is not None and (self._abort_when_silent or not silent):
            with contextlib.suppress(OSError):
                self._on_abort()
        return self.timed_out

    def send(self, message: list | tuple, flush: bool = True) -> None:
        frame = encode(message)
        if self._limiter is not None:
            self._limiter.take(len(frame))
        self._write(frame, flush)

    def flush(self) -> None:
        self._write(b"", True)

    def _write(self, frame: bytes, flush: bool) -> None:
        with self._send_lock:
            try:
                self.wfile.write(frame)
                if flush:
                    self.wfile.flush()
            except TimeoutError:
                raise self._timed_out("we sent (it stopped reading)", silent=False) from None
            except (BrokenPipeError, ConnectionError, ValueError) as exc:
                raise self.timed_out or ConnectionLost(f"connection lost while sending: {exc}") from None
            self.bytes_sent += len(frame)

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
                        raise TimeoutError
                    self._settimeout(left)
                    chunk = self.rfile.read1(n - got)  # one raw read: the time left is checked again
                else:
                    timeout = self._read_timeout
                    if timeout is not None and not select.select([self.rfile], [], [], timeout)[0]:
                        raise TimeoutError
                    chunk = self.rfile.read(n - got)
            except TimeoutError:
                if self._deadline is not None:
                    raise PeerTimeout(f"{self.peer} did not finish its handshake in time") from None
                raise self._timed_out("we waited for it", silent=True) from None
            except (ConnectionError, ValueError, OSError) as exc:
                raise self.timed_out or ProtocolError(f"connection lost while receiving: {exc}") from None
            if not chunk and self.timed_out is not None:  # aborted by another thread's timeout
                raise self.timed_out
            if not chunk:
                if at_boundary and got == 0:
                    return None
                raise ProtocolError("connection closed in the middle of a frame (truncated)")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def hung_up(self) -> bool:
        """Between sessions, when the peer owes nothing: whether the connection has ended
        (closed, reset, given up by TCP keepalive) or the peer sent something unasked.  A
        poll of the read side that does not wait."""
        try:
            poller = select.poll()
            poller.register(self.rfile.fileno(), select.POLLIN)
        except (OSError, ValueError):
            return True
        return bool(poller.poll(0))

    def close(self) -> None:
        """Close our side.  ``on_close`` (a socket's hang-up) comes before the read side is
        closed: it ends a read blocked in another thread, which closing the buffered reader
        would otherwise wait for."""
        with contextlib.suppress(OSError, ValueError):
            self.wfile.close()
        if self._on_close is not None:
            self._on_close()
        with contextlib.suppress(OSError, ValueError):
            self.rfile.close()


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
# Each check takes a decoded value and returns it (converted where said), or raises
# ProtocolError naming the field; the tables below are built from a few of them.  A decoded
# value is of msgpack's exact types (``type(v) is int`` also keeps a bool out).

MAX_PATH = 65536
MAX_REQUESTS = 4096  # paths per 'want', requests per 'sig'
# At most this many names of its root a sender tells a receiver (``start``'s ``roots``, for
# ``guard.foreign_replica_problem``); a root with more is not told, and not checked.
ROOT_NAMES_MAX = 256
_INT64 = 2**63 - 1


def want_bytes(value, what: str, max_len: int = MAX_FRAME) -> bytes:
    return _bytes(what, max_len)(value)


def want_int(value, what: str, lo: int = 0, hi: int = _INT64) -> int:
    return _int(what, lo, hi)(value)


def _check(what: str, expected: str, ok):
    """A check that passes a value on as it is when ``ok(value)``, else names ``what``."""

    def check(value):
        if ok(value):
            return value
        raise ProtocolError(f"bad {what}: expected {expected}")

    return check


def _bytes(what: str, max_len: int = MAX_FRAME):
    return _check(what, f"bytes of at most {max_len}", lambda v: type(v) is bytes and len(v) <= max_len)


def _text(what: str, max_len: int = MAX_FRAME):
    return _check(what, f"a string of at most {max_len}", lambda v: type(v) is str and len(v) <= max_len)


def _int(what: str, lo: int = 0, hi: int = _INT64, kinds: tuple = (int,)):
    expected = f"{'an integer' if kinds == (int,) else 'a number'} in [{lo}, {hi}]"
    return _check(what, expected, lambda v: type(v) in kinds and lo <= v <= hi)


def _one_of(what: str, *allowed):
    return _check(what, f"one of {allowed}", lambda v: type(v) is not bool and v in allowed)


def _flag(what: str):
    return _check(what, "true or false", lambda v: type(v) is bool)


def _tuple(what: str, *checks):
    """A list of exactly these fields."""

    def fields(value) -> list:
        if type(value) is not list or len(value) != len(checks):
            raise ProtocolError(f"bad {what}")
        return [check(item) for check, item in zip(checks, value, strict=False)]  # the length is checked

    return fields


def _list(what: str, check, max_len: int = MAX_REQUESTS):
    def items(value) -> list:
        if type(value) is not list or len(value) > max_len:
            raise ProtocolError(f"bad {what!r} list: expected at most {max_len} items")
        return [check(item) for item in value]

    return items


REQUIRED = object()  # a ``_map`` field's default: it must be there


def _map(what: str, **fields):
    """A map whose named ``fields`` (``(default, check)``; nil is the default, unless the
    default is ``REQUIRED``) are checked; other keys pass unchecked."""

    def checked_map(value) -> dict:
        if type(value) is not dict:
            raise ProtocolError(f"bad {what}: expected a map")
        out = dict(value)
        for key, (default, check) in fields.items():
            given = value.get(key)
            out[key] = default if given is None and default is not REQUIRED else check(given)
        return out

    return checked_map


def _any(value):
    return value


_path = _bytes("path", MAX_PATH)
_req = _int("request id")
_attrs = _tuple("attributes", _int("mode", 0, 0o7777), _int("uid", 0, 2**32 - 1), _int("gid", 0, 2**32 - 1),
                _int("mtime", -(2**63), _INT64))  # fmt: skip
_target = _check("symlink target", f"1 to {K.MAX_TARGET} bytes, no NUL",
                 lambda v: type(v) is bytes and 0 < len(v) <= K.MAX_TARGET and b"\0" not in v)  # fmt: skip


# Every frame a sender may send within a session: its fields and how each is checked.
_SESSION_FRAMES = {
    WANT: (_list("want", _path),),
    SIG: (_list("sig", _tuple("'sig' request", _req, _path)),),
    FILE: (_req, _path, _attrs, _one_of("file mode", "whole", "delta"), _int("block size", 0, 1 << 30),
           _int("basis size"), _flag("holes")),  # fmt: skip
    DATA: (_req, _bytes("data", MAX_CHUNK)),
    COPY: (_req, _int("block index"), _int("block count", 1)),
    HOLE: (_req, _int("hole length", 1)),
    FILE_END: (_req, _bytes("digest", 16), _int("size")),
    FILE_ABORT: (_req, _any),
    MKDIR: (_path, _attrs),
    SYMLINK: (_path, _target, _attrs),
    NODE: (_path, _one_of("node kind", K.FIFO, K.SOCKET, K.CHAR, K.BLOCK), _int("rdev"), _attrs),
    HARDLINK: (_path, _bytes("link target", MAX_PATH)),
    ATTRS: (_path, _one_of("kind", *range(K.FILE, K.BLOCK + 1)), _attrs),
    DELETE: (_path,),
    PING: (_any,),
    END: (_any,),
}

# The fields a version added at the end of a session frame, and what a frame of an earlier
# version means by leaving it out: (version, frame, value), oldest first.
_ADDED_FIELDS = ((5, FILE, False),)  # holes: a version 4 receiver writes the zeros
HOLES_SINCE = 5  # the version that keeps holes: the 'file' frame's flag and the 'hole' frame


def in_version(message: list, version: int) -> list:
    """A session frame as a peer speaking ``version`` takes it: without the fields added since."""
    for added, kind, _ in reversed(_ADDED_FIELDS):
        if version < added and message[0] == kind:
            message = message[:-1]
    return message


def from_version(message: list, version: int) -> list:
    """A session frame of a peer speaking ``version``, with the fields added since at the
    value its frame means (``checked`` then holds it to the current frame's shape)."""
    for added, kind, value in _ADDED_FIELDS:
        if version < added and message[0] == kind:
            message = [*message, value]
    return message


def hello_versions() -> dict:
    """A hello's versions: ``proto``, the oldest this sender speaks (a receiver of that version
    compares it with its own), and ``upto``, the newest."""
    return {"proto": OLDEST_VERSION, "upto": PROTOCOL_VERSION}


def agreed_version(hello: dict, peer: str) -> int:
    """The version a receiver speaks with the sender of ``hello`` (checked): the newest both
    speak.  A sender of version 4 names only its own, in ``proto``."""
    oldest = hello["proto"]
    newest = oldest if hello["upto"] is None else hello["upto"]
    version = min(newest, PROTOCOL_VERSION)
    if version < max(oldest, OLDEST_VERSION):
        said = str(oldest) if newest == oldest else f"{oldest} to {newest}"
        raise ProtocolError(f"{peer} speaks protocol version {said}; this receiver speaks {OLDEST_VERSION} to "
                            f"{PROTOCOL_VERSION}: upgrade the older of the two")  # fmt: skip
    return version


def challenged_version(challenge: dict, peer: str) -> int:
    """The version the receiver's ``challenge`` agreed to (checked): one this sender speaks."""
    version = challenge["proto"]
    if not OLDEST_VERSION <= version <= PROTOCOL_VERSION:
        raise ProtocolError(f"{peer} speaks protocol version {version}; this sender speaks {OLDEST_VERSION} "
                            f"to {PROTOCOL_VERSION}: upgrade the older of the two")  # fmt: skip
    return version


# A session's ``start`` options (docs/PROTOCOL.md); ``scope``, ``renames``, ``tree`` and
# ``deletions`` are checked by the modules that use them (treescan, renames, guard).
_START_OPTIONS = {
    "epoch": (0, _int("epoch")),
    "flags": (0, _int("flags", 0, 15)),
    **{name: (False, _flag(name)) for name in ("dry_run", "delete", "owner", "no_fsync")},
    "keepalive": (None, _int("keepalive", 0.05, 3600, (int, float))),
    "excludes": ([], _list("excludes", _bytes("exclude pattern", MAX_PATTERN_BYTES), MAX_PATTERNS)),
    "seq": (0, _int("seq")),
    "base": (None, _int("base")),
    "journal": ("", _text("journal", MAX_TOKEN)),
    "roots": (None, _list("roots", _bytes("root name", K.MAX_NAME), ROOT_NAMES_MAX)),
}

_applied = (None, _tuple("applied", _int("epoch"), _int("seq"), _text("journal", MAX_TOKEN)))
_summary_item = _tuple("summary item", _path, _bytes("fingerprint", 16), _int("summary flags", 0, 255))
_problem = _tuple("scan problem", _path, _int("errno", 0, 4095), _text("scan problem"))

# Every frame a receiver may answer within a session (but ``error``, which ends it).
REPLY_FRAMES = {
    SUMMARY: (_list("summary", _summary_item),),
    SUMMARY_END: (_map("summary end", problems=([], _list("problems", _problem))),),
    LISTING: (_path, _bytes("names"), _bytes("records"), _bytes("digests"), _flag("complete"), _flag("last")),
    SIGNATURE: (_req, _bytes("signature part"), _flag("last")),
    SIG_FAILED: (_req, _text("reason")),
    FAILED: (lambda v: None if v is None else _req(v), _path, _text("reason")),  # None: not a file's
    PONG: (_any,),
    RESULT: (_map("result", files=(0, _int("files")), bytes=(0, _int("bytes")), deleted=(0, _int("deleted")),
                  failed=([], _list("failed", _tuple("failure", _path, _text("reason")), 1000)),
                  failed_count=(0, _int("failed_count")), deletions_refused=(None, _text("deletions_refused")),
                  applied=_applied, epoch=(None, _int("epoch"))),),  # fmt: skip
    ALIVE: (),
}


# The handshake's frames and a session's ``ready``, each one map (docs/PROTOCOL.md): the
# fields either end relies on.
_nonce = (REQUIRED, _bytes("nonce", NONCE_SIZE))
_version = _int("protocol version", 1, 1 << 16)
_proof_field = (b"", _bytes("proof", 64))
_GREETINGS = {
    HELLO: (_map("hello", proto=(REQUIRED, _version), upto=(None, _version), module=(REQUIRED, _text("module", 1024)),
                 subpath=(b"", _bytes("subpath", 4096)), nonce=_nonce,
                 idle=(None, _int("idle", 0.05, 3600, (int, float)))),),  # fmt: skip
    CHALLENGE: (_map("challenge", proto=(REQUIRED, _version), nonce=_nonce, auth=(False, _flag("auth"))),),
    AUTH: (_map("auth", proof=_proof_field),),
    WELCOME: (_map("welcome", proof=_proof_field, epoch=(0, _int("epoch")), read_only=(False, _flag("read_only")),
                   can_chown=(False, _flag("can_chown")), applied=_applied, idle=(False, _flag("idle")),
                   disk=(None, _check("disk", "an absolute path", lambda v: type(v) is bytes and v[:1] == b"/"
                                      and len(v) <= K.MAX_TARGET + 1 and b"\0" not in v))),),  # fmt: skip
    READY: (_map("ready", epoch=(0, _int("epoch")), root=(None, _attrs)),),
}


def checked_greeting(message: list | None, kind: str) -> dict:
    """``message``, which must be a ``kind`` frame (see ``_GREETINGS``): its map, checked."""
    if message is None or message[0] != kind:
        got = "the end of the connection" if message is None else repr(message[0])
        raise ProtocolError(f"expected {kind!r}, got {got}")
    return checked(message, _GREETINGS)[0]


def checked_start(message: list, **more) -> dict:
    """A ``start`` frame's options, checked (``more``: the caller's, ``key=(default, check)``),
    with the defaults of those it leaves out."""
    return checked(message, {START: (_map("start options", **_START_OPTIONS, **more),)})[0]


def checked(message: list, frames: dict = _SESSION_FRAMES) -> list:
    """A session frame's fields (after its kind), each checked (see ``_SESSION_FRAMES``)."""
    fields = frames.get(message[0])
    if fields is None:
        raise ProtocolError(f"unexpected message {message[0]!r}")
    if len(message) != len(fields) + 1:
        raise ProtocolError(f"malformed {message[0]!r} message ({len(message)} fields, expected {len(fields) + 1})")
    return [check(value) for check, value in zip(fields, message[1:], strict=False)]  # the length is checked
