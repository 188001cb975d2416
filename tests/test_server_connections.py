"""`mirror serve` under bad, idle and concurrent clients, and sessions that share a module (a
dry run next to a writer, a read-only replica)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import time

import pytest
import xxhash

from mirror import protocol as P
from mirror.errors import MirrorError
from mirror.transfer import sync
from mirror.writerlock import WriterLock
from tests.helpers import is_root, wait_until
from tests.peers import ATTRS, RawSession, temp_files
from tests.servers import SECRET, mirror_server
from tests.snapshot import assert_mirrors


class _Busy(Exception):
    pass


def _tcp_session(port: int, start: bool = True):
    """A raw client on a real `mirror serve`: handshake (and a writer session if ``start``)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return _tcp_session_once(port, start)
        except _Busy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # the previous raw client's session is still being torn down


def _tcp_session_once(port: int, start: bool):
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    t = P.StreamTransport(sock.makefile("rb"), sock.makefile("wb"), on_close=sock.close)
    nonce = os.urandom(32)
    t.send([P.HELLO, {"proto": P.PROTOCOL_VERSION, "module": "m", "subpath": b"", "nonce": nonce}])
    challenge = t.recv()
    t.send([P.AUTH, {"proof": P.client_proof(SECRET, challenge[1]["nonce"], nonce, "m")}])
    assert t.recv()[0] == P.WELCOME
    if start:
        t.send([P.START, {"epoch": 0, "flags": 0, "no_fsync": True}])
        reply = t.recv()
        if reply[0] == P.ERROR and "busy" in reply[3]:
            t.close()
            raise _Busy()
        assert reply[0] == P.READY, reply
    return t


def _sync_eventually(src, server, seconds: float = 15):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return sync(src, server.url("m"), secret=SECRET, fsync=False)
        except MirrorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.fixture
def trees(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"content" * 100)
    dst.mkdir()
    return src, dst


# -- idle and silent clients -----------------------------------------------------------------


def test_idle_connections_do_not_lock_out_the_real_sender(tmp_path, trees):
    src, dst = trees
    with mirror_server(tmp_path, {"m": str(dst)}, "--timeout", "1") as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(64)]
        try:
            result = _sync_eventually(src, server)
        finally:
            for sock in idle:
                sock.close()
        assert result.ok
    assert_mirrors(src, dst)


def test_a_silent_writer_does_not_hold_the_module_forever(tmp_path, trees):
    src, dst = trees
    with mirror_server(tmp_path, {"m": str(dst)}, "--timeout", "1") as server:
        silent = _tcp_session(server.port)  # holds the writer lock, then says nothing more
        try:
            result = _sync_eventually(src, server)
        finally:
            silent.close()
        assert result.ok
    assert_mirrors(src, dst)


def _between_sessions(port: int, idle: float) -> P.StreamTransport:
    """A raw sender that says it sends ``idle`` frames every ``idle`` s, has run one session
    (the module's writer lock is its own) and is now between sessions."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    t = P.StreamTransport(sock.makefile("rb"), sock.makefile("wb"), on_close=sock.close)
    nonce = os.urandom(32)
    t.send([P.HELLO, {"proto": P.PROTOCOL_VERSION, "module": "m", "nonce": nonce, "idle": idle}])
    challenge = t.recv()
    t.send([P.AUTH, {"proof": P.client_proof(SECRET, challenge[1]["nonce"], nonce, "m")}])
    welcome = t.recv()
    assert welcome[0] == P.WELCOME and welcome[1]["idle"] is True, welcome
    t.send([P.START, {"epoch": 0, "flags": 0, "no_fsync": True}])
    assert t.recv()[0] == P.READY
    t.send([P.END, {}])
    while (reply := t.recv())[0] != P.RESULT:
        assert reply[0] != P.ERROR, reply
    return t


def test_a_sender_that_stops_saying_it_is_there_lets_the_module_go_between_sessions(tmp_path, trees):
    """Between sessions a connection may idle for ever (no --timeout), but not a sender that
    said it would send ``idle`` frames and stopped: it vanished with its network, and the
    module's writer lock goes with its connection, after IDLE_MISSED of its intervals."""
    src, dst = trees
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        talking = _between_sessions(server.port, idle=0.2)
        try:
            deadline = time.monotonic() + 2.0  # 10 intervals, 2.5 limits
            while time.monotonic() < deadline:
                talking.send([P.IDLE])
                time.sleep(0.1)
            with pytest.raises(MirrorError, match="busy"):  # still its writer: it said it is there
                sync(src, server.url("m"), secret=SECRET, fsync=False)
        finally:
            talking.close()
        silent = _between_sessions(server.port, idle=0.2)
        try:
            gone = silent.recv()  # told why, then closed
            assert gone[0] == P.ERROR and "said nothing for 0.8 s between sessions" in gone[3], gone
            assert _sync_eventually(src, server, seconds=5).ok
        finally:
            silent.close()
    assert_mirrors(src, dst)


def test_a_writer_that_stops_reading_frees_the_module_within_the_server_timeout(tmp_path):
    """A client that asks for much and reads nothing (a stopped sender, or its side of the
    link lost): the first send that times out ends the connection, and the writer lock goes
    with it, instead of each thread still sending (the keepalive, the error frame) waiting
    out a --timeout of its own."""
    dst = tmp_path / "dst"
    dst.mkdir()
    for i in range(1000):
        (dst / f"a-file-with-a-longish-name-{i:04d}").touch()
    with mirror_server(tmp_path, {"m": str(dst)}, "--timeout", "3") as server:
        t = _tcp_session(server.port)
        try:
            while t.recv()[0] != P.SUMMARY_END:
                pass
            t.send([P.WANT, [b""] * P.MAX_REQUESTS])  # megabytes of listings, never read
            asked = time.monotonic()

            def free() -> bool:
                try:
                    WriterLock.take(os.fsencode(dst / ".mirror"), os.fsencode(dst), "the test", "the replica").release()
                except MirrorError:
                    return False
                return True

            wait_until(free, timeout=60, interval=0.05)
            took = time.monotonic() - asked
        finally:
            t.close()
    # One --timeout for the blocked send (the server's buffers filled at once), not three.
    assert took < 2 * 3 - 0.5, f"the module stayed busy {took:.1f} s"


# -- sessions sharing a module ---------------------------------------------------------------


def _file_messages(req: int, path: bytes, data: bytes, *, end: bool = True) -> list:
    messages = [[P.FILE, req, path, ATTRS, "whole", 0, 0, False], [P.DATA, req, data]]
    if end:
        messages.append([P.FILE_END, req, xxhash.xxh3_128(data).digest(), len(data)])
    return messages


def test_a_dry_run_does_not_break_a_concurrent_writer(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    writer = RawSession(root, start={})
    writer.drain_summary()
    writer.send(*_file_messages(1, b"done", b"verified, waiting for its commit"))
    writer.send(*_file_messages(2, b"half", b"first half ", end=False))
    wait_until(lambda: len(temp_files(root)) == 2)
    dry = RawSession(root, start={"dry_run": True})  # e.g. a monitoring check: mirror sync -n
    dry.drain_summary()
    dry.end()
    writer.send([P.DATA, 2, b"second half"],
                [P.FILE_END, 2, xxhash.xxh3_128(b"first half second half").digest(), 22])  # fmt: skip
    result = writer.end()
    assert result[0] == P.RESULT and result[1]["failed"] == [], result
    assert (root / "done").read_bytes() == b"verified, waiting for its commit"
    assert (root / "half").read_bytes() == b"first half second half"


@pytest.mark.skipif(not is_root(), reason="needs root to mount a read-only tmpfs")
def test_a_dry_run_of_a_read_only_replica(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        (root / "f").write_bytes(b"x")
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        s = RawSession(root, module_options={"read_only": True}, start={"dry_run": True})
        ready = s.ready
        if ready is not None and ready[0] == P.READY:
            s.drain_summary()
            s.end()
        else:
            s.close()
        assert ready is not None and ready[0] == P.READY, (ready, s.errors)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)


def test_a_broken_state_dir_is_reported_to_the_sender(tmp_path):
    root = tmp_path / "module"
    (root / ".mirror").mkdir(parents=True)
    (root / ".mirror" / "tmp").write_bytes(b"not a directory")
    s = RawSession(root)
    reply = s.start()
    s.close()
    assert reply is not None and reply[0] == P.ERROR and ".mirror/tmp" in reply[3], (reply, s.errors)


def test_failed_sessions_leak_no_descriptor(tmp_path, trees):
    src, dst = trees
    (dst / ".mirror").mkdir()
    (dst / ".mirror" / "tmp").write_bytes(b"not a directory")
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        pid = server.proc.pid

        def failing_sync():
            with pytest.raises(MirrorError):
                sync(src, server.url("m"), secret=SECRET)

        failing_sync()
        baseline = _fds(pid)
        for _ in range(10):
            failing_sync()
        deadline = time.monotonic() + 3
        while _fds(pid) > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _fds(pid) <= baseline, f"{_fds(pid) - baseline} descriptors leaked by 10 failed sessions"


# -- hostile connections ---------------------------------------------------------------------


def _raw(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError, OSError) as exc:
            # The server may refuse before it has read it all (an oversized header before
            # authentication): its close resets the connection.
            if not isinstance(exc, (ConnectionResetError, BrokenPipeError)) and exc.errno != errno.ENOTCONN:
                raise


def test_bad_connections_leave_no_descriptor_or_thread_behind(tmp_path, trees):
    src, dst = trees
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        pid = server.proc.pid
        assert sync(src, server.url("m"), secret=SECRET).ok
        fds, threads = _fds(pid), _threads(pid)
        for i in range(6):
            _raw(server.port, os.urandom(3000))
            _raw(server.port, struct.pack(">I", 0xFFFFFFF0))
            _raw(server.port, struct.pack(">I", 100) + b"x" * 10)
            t = _tcp_session(server.port)  # vanishes mid-file
            t.send([P.FILE, 1, b"d/f", ATTRS, "whole", 0, 0, False])
            t.send([P.DATA, 1, b"x" * 5000])
            t.close()
            t = _tcp_session(server.port)  # a second file before the first ended
            t.send([P.FILE, 1, b"a", ATTRS, "whole", 0, 0, False])
            t.send([P.FILE, 2, b"b", ATTRS, "whole", 0, 0, False])
            t.close()
            t = _tcp_session(server.port)  # a hostile path
            t.send([P.DELETE, b"../" * i + b"etc"])
            t.close()
            t = _tcp_session(server.port, start=False)  # authenticated, then gone
            t.close()
        wait_until(lambda: _fds(pid) <= fds and _threads(pid) <= threads, timeout=10)
        assert server.alive
        result = _sync_eventually(src, server)
        assert result.ok
    assert_mirrors(src, dst)
    assert os.listdir(dst / ".mirror" / "tmp") == []
