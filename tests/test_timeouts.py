"""The sending side times out: a receiver that goes silent at any stage of the exchange (a
real socket server that stops answering, a real `mirror serve` stopped with SIGSTOP) ends
`mirror sync` with exit 30, a connection that cannot be made within --contimeout with exit
35, and the live daemon reports the replica unreachable and reconnects.  A receiver that is
merely slow (a long commit) says it is alive and is not cut off."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from mirror import protocol as P
from mirror.apply import ModuleConfig
from mirror.errors import EXIT_CONNECT_TIMEOUT, EXIT_TIMEOUT, ConnectTimeout, PeerTimeout
from mirror.receiver import Receiver, ReceiverSession
from mirror.transfer import sync
from tests.daemons import live_daemon
from tests.helpers import MIRROR, PollingThread, run_mirror, wait_until
from tests.peers import RawSession, in_process_server
from tests.servers import SECRET, mirror_server


class SilentReceiver(PollingThread):
    """A real TCP server speaking the real protocol up to ``stage``, then silent (it keeps
    the connection open and reads nothing more): ``hello`` (says nothing at all after the
    hello), ``auth`` (after the challenge), ``start`` (after the welcome), ``summary`` (after
    ``ready``).  It serves while the ``with`` block runs."""

    def __init__(self, stage: str):
        super().__init__(name="silent-receiver")
        self.stage = stage
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)  # to see ``stopping`` between connections
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._held: list[socket.socket] = []

    def url(self) -> str:
        return f"mirror://127.0.0.1:{self.port}/m"

    def sample(self):
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            return False
        self.connections += 1
        self._held.append(conn)
        try:
            self._talk(conn)
        except (OSError, P.ProtocolError):
            pass  # the sender gave up on a silent receiver: what the tests make it do

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        t = P.StreamTransport(conn.makefile("rb"), conn.makefile("wb"))
        hello = t.recv()
        if self.stage == "hello":
            return
        nonce = os.urandom(32)
        t.send([P.CHALLENGE, {"proto": P.PROTOCOL_VERSION, "nonce": nonce, "auth": True}])
        if self.stage == "auth":
            return
        t.recv()  # auth: not checked, this receiver only pretends
        proof = P.server_proof(SECRET, nonce, hello[1]["nonce"], "m")
        t.send([P.WELCOME, {"proof": proof, "epoch": 0, "read_only": False, "can_chown": False}])
        t.recv()  # start
        if self.stage == "start":
            return
        t.send([P.READY, {"epoch": 0, "root": [0o755, 0, 0, 0]}])

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            for conn in self._held:
                conn.close()
            self.sock.close()


def _tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("data")
    return src


@pytest.mark.parametrize("stage", ["hello", "auth", "start", "summary"])
def test_a_receiver_silent_at_each_stage_ends_the_sync(tmp_path, stage):
    src = _tree(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    secret.chmod(0o600)
    with SilentReceiver(stage) as receiver:
        started = time.monotonic()
        proc = run_mirror("sync", "--timeout", "1", "--secret-file", secret, src, receiver.url(),
                          check_codes=(EXIT_TIMEOUT,), timeout=60)  # fmt: skip
        waited = time.monotonic() - started
    assert b"timed out after 1 s (--timeout)" in proc.stderr, proc.stderr
    assert waited < 30  # ended by the timeout, not by the test's own limit


def test_the_library_raises_peer_timeout(tmp_path):
    src = _tree(tmp_path)
    with SilentReceiver("summary") as receiver, pytest.raises(PeerTimeout):
        sync(src, receiver.url(), secret=SECRET, timeout=0.5)


def test_a_stopped_server_ends_the_sync_in_the_middle_of_a_transfer(tmp_path):
    """SIGSTOP: the TCP connection stays up, nothing moves; with --bwlimit the transfer is
    still on its way when the server stops."""
    src, dst = tmp_path / "src", tmp_path / "replica"
    src.mkdir()
    dst.mkdir()
    # 16 s of transfer at the limit: far more than the socket buffers hold, so the server
    # stops in the middle however late a loaded machine delivers the SIGSTOP
    content = os.urandom(32 << 20)
    (src / "big").write_bytes(content)
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        proc = subprocess.Popen([*MIRROR, "sync", "--timeout", "2", "--bwlimit", "2M", "--secret-file",
                                 server.secret_file, str(src), server.url("m")], stderr=subprocess.PIPE)  # fmt: skip
        try:
            wait_until(lambda: os.path.isdir(dst / ".mirror" / "tmp") and os.listdir(dst / ".mirror" / "tmp"))
            server.proc.send_signal(signal.SIGSTOP)
            try:
                _, err = proc.communicate(timeout=60)
            finally:
                server.proc.send_signal(signal.SIGCONT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == EXIT_TIMEOUT and b"timed out" in err, err
    # the server, resumed, finds the stream cut short: nothing half-written reaches the name
    assert not (dst / "big").exists()


def test_no_connection_within_contimeout(tmp_path):
    """A listener whose accept queue is full drops new SYNs: the connection never completes."""
    src = _tree(tmp_path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # more than the backlog holds: the queue is full
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)
        proc = run_mirror("sync", "--contimeout", "1", src, f"mirror://127.0.0.1:{port}/m",
                          check_codes=(EXIT_CONNECT_TIMEOUT,), timeout=60)  # fmt: skip
        assert b"no answer within 1 s (--contimeout)" in proc.stderr, proc.stderr
        with pytest.raises(ConnectTimeout):
            sync(src, f"mirror://127.0.0.1:{port}/m", contimeout=0.5)
    finally:
        for s in fillers:
            s.close()
        listener.close()


class _SlowEnd(ReceiverSession):
    """A session whose end takes ``delay`` seconds more (a big commit, a huge deletion)."""

    delay = 3.0

    def run(self) -> dict:
        result = super().run()
        time.sleep(self.delay)  # the slow work itself, not a wait for a condition
        return result


class _SlowCommit(Receiver):
    session_class = _SlowEnd


def test_a_slow_receiver_says_it_is_alive_and_is_not_cut_off(tmp_path, monkeypatch):
    import mirror.server

    monkeypatch.setattr(mirror.server, "Receiver", _SlowCommit)
    src, dst = _tree(tmp_path), tmp_path / "replica"
    dst.mkdir()
    with in_process_server({"m": ModuleConfig("m", os.fsencode(dst), secret=SECRET)}) as server:
        result = sync(src, f"mirror://127.0.0.1:{server.port}/m", secret=SECRET, timeout=1)
    assert result.ok and (dst / "f").read_text() == "data"


def test_alive_comes_while_a_session_works_and_never_after_its_result(tmp_path):
    # Sampled over many sessions on one connection: while each one's end is slow the
    # receiver says alive, and the first frame after its result is the next session's
    # ready (an alive racing the result would come first).
    class QuickSlowEnd(_SlowEnd):
        delay = 0.3

    root = tmp_path / "module"
    root.mkdir()
    s = RawSession(root)
    s.receiver.session_class = QuickSlowEnd
    for _ in range(int(os.environ.get("HAMIRROR_TRIALS", "8"))):
        assert s.start(keepalive=0.05)[0] == P.READY, s.ready
        s.drain_summary()
        s.send([P.END, {"complete": True}])
        frames = []
        while not frames or frames[-1][0] not in (P.RESULT, P.ERROR):
            frames.append(s.next())
        assert frames[-1][0] == P.RESULT, frames
        assert {f[0] for f in frames[:-1]} == {P.ALIVE}, frames
        time.sleep(0.15)  # quiet between sessions for three keepalive intervals: nothing may come
    s.close()
    assert not s.errors, s.errors


def test_the_daemon_reports_a_silent_replica_unreachable_and_reconnects(tmp_path):
    src = _tree(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    secret.chmod(0o600)
    status_file = src / ".mirror" / "mirror-daemon.status.json"

    def status():
        try:
            return json.loads(status_file.read_text())["pairs"][0]
        except (FileNotFoundError, ValueError):
            return {}

    with SilentReceiver("summary") as receiver:
        with live_daemon(src, receiver.url(), "--secret-file", str(secret), "--timeout", "1"):
            pair = wait_until(lambda: status().get("state") == "unreachable" and status(), timeout=60)
            assert "timed out" in pair["last_error"]
            wait_until(lambda: receiver.connections >= 3, timeout=60)  # reconnects, with backoff
