"""The hostile-peer cases of issue 16 over the wire: real msgpack frames, through the real
decoder, to a real `mirror serve`, from a peer that knows the secret and uses it badly."""

from __future__ import annotations

import os
import socket
import stat

import pytest
import xxhash

from mirror import protocol as P
from mirror.entry import Kind
from mirror.epoch import MAX_EPOCH, MAX_EPOCH_STEP, bump_epoch, read_epoch
from mirror.errors import ProtocolError
from tests.helpers import is_root
from tests.servers import SECRET, mirror_server

T = 1_000_000_000_000_000_000


class WireSession:
    """An authenticated connection to a real server, one raw session at a time."""

    def __init__(self, port: int, module: str = "m"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.t = P.StreamTransport(
            self.sock.makefile("rb"), self.sock.makefile("wb"), on_close=self.sock.close
        )
        nonce = os.urandom(32)
        self.t.send(
            [P.HELLO, {"proto": P.PROTOCOL_VERSION, "module": module, "subpath": b"", "nonce": nonce}]
        )
        challenge = self.t.recv()
        self.t.send([P.AUTH, {"proof": P.client_proof(SECRET, challenge[1]["nonce"], nonce, module)}])
        self.welcome = self.t.recv()
        assert self.welcome[0] == P.WELCOME, self.welcome

    def start(self, **opts) -> list:
        self.t.send([P.START, {"epoch": 0, "flags": 0, "no_fsync": True, **opts}])
        reply = self.recv()
        if reply[0] == P.READY:
            while self.recv()[0] != P.SUMMARY_END:
                pass
        return reply

    def recv(self) -> list:
        while True:
            message = self.t.recv()
            if message is None or message[0] != P.ALIVE:
                return message

    def end(self, *messages) -> tuple[list, list]:
        """Send ``messages`` and ``end``: (the ``failed`` replies, the ``result`` or ``error``)."""
        # One write: the server reads the whole batch before it answers, so a refusal that
        # closes the connection cannot race our own sends (a reset would lose its reply).
        for message in messages:
            self.t.send(list(message), flush=False)
        self.t.send([P.END, {}])
        failed = []
        while True:
            reply = self.recv()
            if reply is None or reply[0] in (P.RESULT, P.ERROR):
                return failed, reply
            if reply[0] == P.FAILED:
                failed.append(reply)

    def close(self):
        """Hang up and wait for the server to close its end: it has let go of the module's
        writer lock by then, so the next session may take it."""
        try:
            self.t.flush()
            self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv(1 << 16):
                pass
        except (OSError, ProtocolError):
            pass
        self.t.close()


@pytest.fixture
def server(tmp_path):
    replica = tmp_path / "replica"
    replica.mkdir()
    (replica / "keep").write_text("replica data")
    with mirror_server(tmp_path, {"m": str(replica)}) as s:
        s.replica = replica
        yield s


def _file(req: int, path: bytes, data: bytes, mode: int) -> list[list]:
    return [[P.FILE, req, path, [mode, 0, 0, T], "whole", 0, 0, False], [P.DATA, req, data],
            [P.FILE_END, req, xxhash.xxh3_128_digest(data), len(data)]]  # fmt: skip


@pytest.mark.skipif(not is_root(), reason="the server would fail to make a device as another user anyway")
def test_device_nodes_and_setuid_files_over_the_wire(server):
    s = WireSession(server.port)
    assert s.welcome[1]["can_chown"] is False
    assert s.start()[0] == P.READY
    failed, result = s.end([P.NODE, b"mem", Kind.CHAR, os.makedev(1, 1), [0o666, 0, 0, T]],
                           [P.NODE, b"sda", Kind.BLOCK, os.makedev(8, 0), [0o666, 0, 0, T]],
                           *_file(1, b"shell", b"#!/bin/sh\n", 0o4755))  # fmt: skip
    s.close()
    assert result[0] == P.RESULT and result[1]["failed_count"] == 2, result
    assert {m[2] for m in failed} == {b"mem", b"sda"}
    assert not os.path.lexists(server.replica / "mem") and not os.path.lexists(server.replica / "sda")
    assert stat.S_IMODE(os.lstat(server.replica / "shell").st_mode) == 0o755


def test_a_huge_epoch_over_the_wire_rises_by_a_bounded_step(server):
    state = os.fsencode(server.replica / ".mirror")
    bump_epoch(state)
    s = WireSession(server.port)
    ready = s.start(epoch=MAX_EPOCH)
    s.end()
    s.close()
    assert ready[0] == P.READY and ready[1]["epoch"] == 1 + MAX_EPOCH_STEP
    assert read_epoch(state) == 1 + MAX_EPOCH_STEP


@pytest.mark.parametrize("opts", [
    {"renames": [[b"keep", b"moved"]]},
    {"renames": [[b"keep", b"moved", ["f", 1, 1]]]},
    {"tree": "Z" * 32},
    {"deletions": {"max_delete": "all"}},
    {"keepalive": 0},
    {"keepalive": 10**9},
    {"excludes": [b"*.tmp"] * 1001},
    {"excludes": [b"x" * 1025]},
    {"excludes": ["*.tmp"]},
    {"flags": 16},
    {"epoch": "1"},
    {"seq": -1},
    {"base": "40"},
    {"journal": "j" * 65},
])  # fmt: skip
def test_malformed_session_options_over_the_wire_are_refused(server, opts):
    # From a newer sender: refused before anything is recorded, its epoch included.
    s = WireSession(server.port)
    reply = s.start(**{"epoch": 5, **opts})
    s.close()
    assert reply[0] == P.ERROR and reply[1] == "ProtocolError", reply
    assert (server.replica / "keep").read_text() == "replica data" and not (server.replica / "moved").exists()
    assert read_epoch(os.fsencode(server.replica / ".mirror")) == 0


_NOT_A_START = [[P.START, "all"], [P.START], [P.START, {}, {}], [P.MKDIR, b"d", [0o755, 0, 0, T]]]


@pytest.mark.parametrize("start", _NOT_A_START)
def test_a_session_that_does_not_open_with_a_start_map_is_refused(server, start):
    s = WireSession(server.port)
    s.t.send(start)
    reply = s.recv()
    s.close()
    assert reply[0] == P.ERROR and reply[1] == "ProtocolError", reply
    assert sorted(os.listdir(server.replica)) in ([".mirror", "keep"], ["keep"])


@pytest.mark.parametrize("opts", [{"delete": "false"}, {"delete": 1}, {"dry_run": "no"}, {"owner": []}])
def test_a_start_whose_switch_is_not_true_or_false_is_refused(server, opts):
    # "false" as a string is truthy: read leniently, it would turn deletions on.
    s = WireSession(server.port)
    reply = s.start(**opts)
    s.close()
    assert reply[0] == P.ERROR and reply[1] == "ProtocolError", reply
    assert "true or false" in reply[3], reply
    assert (server.replica / "keep").read_text() == "replica data"


def test_a_rename_over_the_wire_needs_the_right_content(server):
    data = b"replica data"
    mtime = os.stat(server.replica / "keep").st_mtime_ns
    wrong = ["f", len(data), mtime, xxhash.xxh3_128_digest(b"other content")]
    s = WireSession(server.port)
    assert s.start(renames=[[b"keep", b"moved", wrong]])[0] == P.READY
    s.end()
    s.close()
    assert (server.replica / "keep").read_bytes() == data and not (server.replica / "moved").exists()


def test_another_tree_over_the_wire_may_not_delete(server):
    first = WireSession(server.port)
    assert first.start(tree="a" * 32, delete=True)[0] == P.READY
    first.end()
    first.close()
    s = WireSession(server.port)
    reply = s.start(tree="b" * 32, delete=True)
    s.close()
    assert reply[0] == P.ERROR and reply[1] == "SourceGuardError" and reply[2] == 25, reply
    s = WireSession(server.port)
    assert s.start(tree="a" * 32, delete=True)[0] == P.READY
    _, result = s.end([P.DELETE, b"keep"])
    s.close()
    assert "every entry" in result[1]["deletions_refused"]
    assert (server.replica / "keep").read_text() == "replica data"


def test_a_dry_run_over_the_wire_writes_nothing(server):
    s = WireSession(server.port)
    assert s.start(dry_run=True)[0] == P.READY
    _, reply = s.end(*_file(1, b"planted", b"x", 0o644))
    s.close()
    assert reply[0] == P.ERROR and "dry run" in reply[3], reply
    assert not (server.replica / "planted").exists()
