"""Hostile and broken peers: the receiver closes that connection, keeps serving the others,
writes nothing outside its module, and never allocates what a frame header merely claims."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror import protocol as P
from mirror.errors import LimitExceeded, MirrorError, ProtocolError
from mirror.transfer import sync
from tests.peers import RawSession
from tests.servers import SECRET, mirror_server
from tests.snapshot import assert_mirrors


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _raw(port: int, payload: bytes) -> bytes:
    """Send ``payload`` on a fresh connection; return what the server said before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _handshake(port: int, module: str = "m", secret: bytes = SECRET):
    """A raw writing session; retried while the previous client's session still holds the
    module (a sync returns at its result, before the server has let the writer lock go)."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        t = P.StreamTransport(sock.makefile("rb"), sock.makefile("wb"), on_close=sock.close)
        nonce = os.urandom(32)
        t.send([P.HELLO, {"proto": P.PROTOCOL_VERSION, "module": module, "subpath": b"", "nonce": nonce}])
        challenge = t.recv()
        t.send([P.AUTH, {"proof": P.client_proof(secret, challenge[1]["nonce"], nonce, module)}])
        assert t.recv()[0] == P.WELCOME
        t.send([P.START, {"epoch": 0, "flags": 0}])
        reply = t.recv()
        if reply[0] == P.ERROR and "busy" in reply[3] and time.monotonic() < deadline:
            t.close()
            time.sleep(0.01)
            continue
        assert reply[0] == P.READY, reply
        return t


@pytest.fixture
def served(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"content" * 1000)
    dst.mkdir()
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        yield server, src, dst, tmp_path


def _still_serves(server, src, dst):
    result = sync(src, server.url("m"), secret=SECRET)
    assert result.ok
    assert_mirrors(src, dst)


def test_garbage_truncated_and_oversized_frames(served):
    server, src, dst, _ = served
    rss_before = _rss_kib(server.proc.pid)
    _raw(server.port, os.urandom(5000))  # garbage
    _raw(server.port, struct.pack(">I", 1000) + b"x" * 10)  # truncated frame
    _raw(server.port, struct.pack(">I", 0xFFFFFFF0))  # a 4 GiB frame, announced
    _raw(server.port, P.encode([P.HELLO, {"proto": 99, "module": "m", "nonce": b"x" * 32}]))
    _raw(server.port, P.encode([P.HELLO, {"proto": P.PROTOCOL_VERSION, "module": "nope", "nonce": b"x" * 32}]))
    _raw(server.port, struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")  # never-used msgpack byte
    assert server.alive
    assert _rss_kib(server.proc.pid) - rss_before < 64 * 1024  # nothing near 4 GiB was allocated
    _still_serves(server, src, dst)


@pytest.mark.parametrize("path", [b"../escape", b"/etc/passwd", b"a/../../b", b"d/\0x", b"", b"d//f", b".", b"d/."])
def test_hostile_paths_close_the_connection(served, path):
    server, src, dst, tmp_path = served
    t = _handshake(server.port)
    t.send([P.FILE, 1, path, [0o644, 0, 0, 0], "whole", 0, 0, False])
    t.send([P.DATA, 1, b"evil"])
    t.send([P.FILE_END, 1, b"\0" * 16, 4])
    t.send([P.END, {}])
    replies = []
    try:
        while (m := t.recv()) is not None:
            replies.append(m)
    except ProtocolError:
        pass
    t.close()
    assert any(m[0] == P.ERROR and "refused path" in m[3] for m in replies), replies
    assert not (tmp_path / "escape").exists() and not (dst.parent / "b").exists()
    _still_serves(server, src, dst)


def test_copy_past_the_basis_is_refused(served):
    server, src, dst, _ = served
    sync(src, server.url("m"), secret=SECRET)
    before = (dst / "d" / "f").read_bytes()
    t = _handshake(server.port)
    t.send([P.FILE, 1, b"d/f", [0o644, 0, 0, 0], "delta", 1024, len(before), False])
    t.send([P.COPY, 1, 10_000, 5])
    replies = []
    try:
        while (m := t.recv()) is not None:
            replies.append(m)
    except ProtocolError:
        pass
    assert any(m[0] == P.ERROR and "blocks" in m[3] for m in replies), replies
    assert (dst / "d" / "f").read_bytes() == before
    assert os.listdir(dst / ".mirror" / "tmp") == []
    _still_serves(server, src, dst)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_frame_decoder_fuzz(data):
    try:
        P.decode(data)
    except ProtocolError:
        pass


class _Bytes:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def read(self, n):
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.builds(lambda n: struct.pack(">I", n), st.integers(0, 2**32 - 1))), max_size=6))
def test_stream_reader_fuzz(parts):
    t = P.StreamTransport(_Bytes(b"".join(parts)), None)
    try:
        while t.recv() is not None:
            pass
    except (ProtocolError, LimitExceeded):
        pass


_paths = st.one_of(st.sampled_from([b"a", b"d/f", b"../x", b"/abs", b"a/../b", b"", b"d"]), st.binary(max_size=8))
_values = st.one_of(st.integers(-5, 2**40), st.binary(max_size=16), st.none(), st.text(max_size=4), _paths)
_messages = st.one_of(
    st.tuples(st.sampled_from([P.FILE]), st.integers(0, 3), _paths, st.lists(st.integers(0, 4096), min_size=4, max_size=4),
              st.sampled_from(["whole", "delta", "x"]), st.integers(0, 4096), st.integers(0, 10_000),
              st.sampled_from([False, True, None, 2])),
    st.tuples(st.just(P.DATA), st.integers(0, 3), st.binary(max_size=64)),
    st.tuples(st.just(P.COPY), st.integers(0, 3), st.integers(-1, 50), st.integers(-1, 50)),
    st.tuples(st.just(P.FILE_END), st.integers(0, 3), st.binary(max_size=17), st.integers(0, 100)),
    st.tuples(st.sampled_from([P.MKDIR, P.DELETE, P.HARDLINK, P.SYMLINK, P.ATTRS, P.NODE, P.WANT, P.SIG, "bogus"]),
              _values, _values, _values),
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.lists(_messages, max_size=8))
def test_receiver_fuzz_never_escapes_or_crashes(tmp_path_factory, messages):
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "module"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"x" * 5000)
    (base / "outside").write_bytes(b"keep")
    os.symlink(base, root / "escape")
    session = RawSession(root, start={})  # real frames, through the real decoder
    session.send(*messages)
    session.end()
    errors = session.errors
    assert all(isinstance(e, MirrorError) for e in errors)
    assert (base / "outside").read_bytes() == b"keep"
    assert sorted(p.name for p in base.iterdir()) == ["module", "outside"]




def test_bwlimit_holds_the_rate_beyond_a_quarter_second_of_burst():
    # A slow limit must hold from the first quarter second on, whatever the frame limit.
    import io

    rate = 200_000
    transport = P.StreamTransport(io.BytesIO(), io.BytesIO(), bwlimit=rate)
    started = time.monotonic()
    for _ in range(10):
        transport.send([P.DATA, 1, b"x" * 20_000])
    elapsed = time.monotonic() - started
    assert elapsed >= (transport.bytes_sent - rate / 4) / rate * 0.95
