"""`mirror serve` serves its primary under attack: unauthenticated connections have an
overall handshake deadline, read only small frames, and cannot take the slots of
authenticated ones.  Real `mirror serve` processes, real sockets; the attacker does not
know the secret."""

from __future__ import annotations

import os
import socket
import struct
import time

from benchmarks.bench_flood import Flood, peak_rss_kib
from mirror import protocol as P
from mirror.transfer import sync
from tests.helpers import wait_until
from tests.servers import SECRET, mirror_server
from tests.snapshot import assert_mirrors


def _tree(root, files: int = 200) -> None:
    for i in range(files):
        d = root / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(1000 + i))


def _closed_by_server(sock: socket.socket, within: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), None if it did not within."""
    started = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - started < within:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def test_a_legitimate_sync_completes_under_a_flood(tmp_path, capsys):
    """200 silent and 200 byte-dribbling connections held open (reopened when dropped)
    while the primary syncs.  Its time and the server's peak RSS are reported, not
    asserted (benchmarks/bench_flood.py measures them)."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    _tree(src)
    replica.mkdir()
    with mirror_server(tmp_path, {"m": str(replica)}) as server:
        started = time.perf_counter()
        assert sync(src, server.url("m"), secret=SECRET, fsync=False).ok
        quiet = time.perf_counter() - started
        (src / "d0" / "after-the-flood-began").write_text("new")
        flood = Flood(server.port, silent=200, dribble=200).start()
        try:
            wait_until(lambda: flood.opened >= 400, timeout=30)
            started = time.perf_counter()
            result = sync(src, server.url("m"), secret=SECRET, fsync=False)
            flooded = time.perf_counter() - started
            assert result.ok, result.failed
            assert flood.dropped > 0  # the server did push attackers out
            peak = peak_rss_kib(server.proc.pid)
        finally:
            flood.stop()
        assert server.alive
    assert_mirrors(src, replica)
    with capsys.disabled():
        print(f"\n  flood: sync {quiet:.3f} s quiet, {flooded:.3f} s under 400 attacking connections "
              f"({flood.opened} opened, {flood.dropped} dropped); server peak RSS {peak / 1024:.1f} MiB")  # fmt: skip


def test_a_dribbling_handshake_is_cut_at_its_deadline(tmp_path):
    """One byte every 0.3 s restarts no timer: the whole handshake gets the deadline
    (here 2 s, --timeout being shorter than the default 10 s)."""
    replica = tmp_path / "replica"
    replica.mkdir()
    with mirror_server(tmp_path, {"m": str(replica)}, "--timeout", "2") as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        try:
            frame = struct.pack(">I", 2000) + b"\x92" + b"x" * 1999
            started = time.monotonic()
            closed = None
            for byte in frame:
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    closed = time.monotonic() - started
                    break
                closed = _closed_by_server(sock, 0.3)
                if closed is not None:
                    closed = time.monotonic() - started
                    break
            assert closed is not None and closed < 8, closed
            assert closed >= 1.5  # the deadline, not an earlier refusal
        finally:
            sock.close()


def test_an_oversized_frame_before_authentication_is_refused_unread(tmp_path):
    """A header announcing more than the pre-authentication limit (8 KiB) ends the
    connection at once: the server never waits for, nor allocates, the body."""
    replica = tmp_path / "replica"
    replica.mkdir()
    with mirror_server(tmp_path, {"m": str(replica)}) as server:
        for announced in (P.PREAUTH_MAX_FRAME + 1, P.MAX_FRAME):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(struct.pack(">I", announced))
                # Well within the 10 s handshake deadline: refused, not waited for.
                assert _closed_by_server(sock, 5) is not None


def test_a_long_subpath_still_fits_the_first_frame(tmp_path):
    src, replica = tmp_path / "src", tmp_path / "replica"
    _tree(src, 3)
    replica.mkdir()
    sub = "/".join(["s" * 200] * 19)  # 3.8 KB of subpath in the hello
    with mirror_server(tmp_path, {"m": str(replica)}) as server:
        assert sync(src, server.url("m") + "/" + sub, secret=SECRET, fsync=False).ok
    assert_mirrors(src, os.path.join(replica, sub))


def test_handshakes_cannot_take_the_session_slots(tmp_path):
    """More unauthenticated connections than there are slots of either kind: a sync still
    gets in, and it can hold a session while they keep coming."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    _tree(src, 20)
    replica.mkdir()
    with mirror_server(tmp_path, {"m": str(replica)}) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(150)]
        try:
            assert sync(src, server.url("m"), secret=SECRET, fsync=False).ok
        finally:
            for sock in idle:
                sock.close()
    assert_mirrors(src, replica)
