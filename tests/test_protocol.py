"""Hostile and broken peers: the receiver closes that connection, keeps serving the others,
writes nothing outside its module, and never allocates what a frame header merely claims."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror import protocol as P
from mirror.errors import LimitExceeded, MirrorError, ProtocolError
from mirror.receiver import ModuleConfig, Receiver
from mirror.transfer import sync
from tests.helpers import wait_until
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
    t.send([P.FILE, 1, path, [0o644, 0, 0, 0], "whole", 0, 0])
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
    t.send([P.FILE, 1, b"d/f", [0o644, 0, 0, 0], "delta", 1024, len(before)])
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
              st.sampled_from(["whole", "delta", "x"]), st.integers(0, 4096), st.integers(0, 10_000)),
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
    client, server_end = P.LocalTransport.pair()
    receiver = Receiver(server_end, {"": ModuleConfig("", os.fsencode(root))})

    errors = []

    def serve():
        try:
            receiver.serve()
        except MirrorError as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    client.send([P.HELLO, {"proto": P.PROTOCOL_VERSION, "module": "", "nonce": b"n" * 32}])
    client.recv()
    client.send([P.AUTH, {}])
    client.recv()
    client.send([P.START, {"epoch": 0, "flags": 0, "no_fsync": True}])
    for m in messages:
        client.send(list(m))
    client.send([P.END, {}])
    client.close()
    # Drain whatever the receiver answers until it hangs up.
    while client.recv() is not None:
        pass
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert all(isinstance(e, MirrorError) for e in errors)
    assert (base / "outside").read_bytes() == b"keep"
    assert sorted(p.name for p in base.iterdir()) == ["module", "outside"]


def test_local_transport_holds_unflushed_messages_and_keeps_their_order():
    a, b = P.LocalTransport.pair()
    a.send(["one", 1], flush=False)
    a.send(["two", b"x" * 10], flush=False)
    # Like a stream's write buffer: nothing is handed over before a flush.
    assert b._inbox.empty()
    a.send(["three", 3])  # flush=True hands over all three, in order, as one batch
    assert b._inbox.qsize() == 1
    assert [b.recv(), b.recv(), b.recv()] == [["one", 1], ["two", b"x" * 10], ["three", 3]]
    assert a.bytes_sent == 3 * 16 + 10
    for i in range(P.LocalTransport.BATCH_MESSAGES):  # a full batch goes without a flush
        a.send(["n", i], flush=False)
    assert b._inbox.qsize() == 1
    assert [b.recv()[1] for _ in range(P.LocalTransport.BATCH_MESSAGES)] == list(range(P.LocalTransport.BATCH_MESSAGES))
    a.send(["last words"], flush=False)
    a.close()  # what was held still arrives, then the end of the stream
    assert b.recv() == ["last words"]
    assert b.recv() is None


def test_local_transport_send_fails_once_the_peer_has_stopped():
    a, b = P.LocalTransport.pair(depth=1)
    a.send(["fills the queue"])
    b.close()
    with pytest.raises(ProtocolError):
        a.send(["has nowhere to go"])


class _HandlingEnd:
    """The receiving end of a local pair, in a thread of its own, in ``handle_in_sender``."""

    def __init__(self, end, fail_on=None, interrupt_on=None):
        self.end = end
        self.seen: list[tuple[list, str]] = []  # (message, the thread that handled it)
        self.outcome = None
        self.fail_on, self.interrupt_on = fail_on, interrupt_on
        self.thread = threading.Thread(target=self._run, name="receiving-end")

    def handle(self, message) -> bool:
        self.seen.append((message, threading.current_thread().name))
        if message[0] == self.fail_on:
            raise ValueError("bad message")
        if message[0] == self.interrupt_on:
            raise KeyboardInterrupt
        return message[0] == "end"

    def take_over(self, sender) -> _HandlingEnd:
        """Start handling, and wait until ``sender``'s sends run the handler."""
        self.thread.start()
        wait_until(lambda: sender._handler is not None)
        return self

    def _run(self):
        try:
            self.outcome = self.end.handle_in_sender(self.handle)
        except ValueError as exc:
            self.outcome = exc


def test_local_transport_runs_the_receiving_ends_handler_in_the_senders_thread():
    a, b = P.LocalTransport.pair()
    a.send(["early", 1])  # handed over before the handler is there: handled first, in order
    a.send(["held", 2], flush=False)
    receiving = _HandlingEnd(b).take_over(a)
    a.send(["late", 3], flush=False)  # from now on, handled in the sending thread, at once
    assert receiving.seen[-1] == (["late", 3], threading.current_thread().name)
    a.send(["end"])
    receiving.thread.join(timeout=10)
    assert receiving.outcome == P.ENDED
    assert [m for m, _ in receiving.seen] == [["early", 1], ["held", 2], ["late", 3], ["end"]]
    assert [t for _, t in receiving.seen[:2]] == ["receiving-end"] * 2
    assert a._handler is None
    a.send(["next session"])  # queued again, as before
    assert b.recv() == ["next session"]


def test_local_transport_handler_errors_are_raised_in_the_receiving_thread():
    a, b = P.LocalTransport.pair()
    receiving = _HandlingEnd(b, fail_on="bad").take_over(a)
    a.send(["bad"])  # the sender is not the one that failed: it goes on
    receiving.thread.join(timeout=10)
    assert isinstance(receiving.outcome, ValueError)
    a.send(["after"])
    assert b.recv() == ["after"]


def test_local_transport_sender_closing_or_interrupted_ends_the_handling():
    a, b = P.LocalTransport.pair()
    receiving = _HandlingEnd(b).take_over(a)
    a.close()
    receiving.thread.join(timeout=10)
    assert receiving.outcome == P.CLOSED
    a, b = P.LocalTransport.pair()
    receiving = _HandlingEnd(b, interrupt_on="ctrl-c").take_over(a)
    with pytest.raises(KeyboardInterrupt):  # raised where it happened: in the sender's thread
        a.send(["ctrl-c"])
    receiving.thread.join(timeout=10)
    assert receiving.outcome == P.CLOSED


def test_local_transport_keeps_what_follows_the_end_for_the_next_session():
    a, b = P.LocalTransport.pair()
    a.send(["early"], flush=False)
    a.send(["end"], flush=False)
    a.send(["start of the next one"])  # all three handed over before the handler is there
    receiving = _HandlingEnd(b)
    receiving.thread.start()
    receiving.thread.join(timeout=10)
    assert receiving.outcome == P.ENDED
    assert [m for m, _ in receiving.seen] == [["early"], ["end"]]
    assert b.recv() == ["start of the next one"]


def test_local_transport_goes_back_to_batches_for_a_big_transfer():
    # Past DIRECT_BYTES the sender's reading and the receiver's writing overlap again, in two
    # threads: the rest of the session arrives through recv, in order.
    a, b = P.LocalTransport.pair()
    receiving = _HandlingEnd(b).take_over(a)
    chunk = bytes(1 << 20)
    count = P.LocalTransport.DIRECT_BYTES // len(chunk) + 2
    for i in range(count):
        a.send(["data", i, chunk], flush=False)
    a.send(["end"])
    receiving.thread.join(timeout=10)
    assert receiving.outcome == P.QUEUED
    handled = [m[1] for m, _ in receiving.seen]
    assert handled == list(range(len(handled))) and 0 < len(handled) < count
    rest = [b.recv() for _ in range(count - len(handled))]
    assert [m[1] for m in rest] == list(range(len(handled), count))
    assert b.recv() == ["end"]


def test_local_transport_handler_taken_over_while_the_sender_waits_on_a_full_queue():
    # The sender blocks, holding its send lock, until the receiving end makes room: taking
    # over its sends must not wait for that lock without making room.
    a, b = P.LocalTransport.pair(depth=1)
    a.send(["one"])  # the queue is full
    blocked = threading.Thread(target=a.send, args=(["two"],), daemon=True)
    blocked.start()
    wait_until(lambda: a._send_lock.locked())
    receiving = _HandlingEnd(b)
    receiving.thread.daemon = True
    receiving.thread.start()
    blocked.join(timeout=10)
    assert not blocked.is_alive(), "deadlock: the sender never got its message through"
    wait_until(lambda: a._handler is not None)
    a.send(["end"])
    receiving.thread.join(timeout=10)
    assert receiving.outcome == P.ENDED
    assert [m for m, _ in receiving.seen] == [["one"], ["two"], ["end"]]
