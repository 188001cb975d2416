"""The handshake's frames (and a session's ``ready`` and ``result``) are checked at both ends like every
session frame: a malformed one ends the connection with an error naming the peer and the
field, never a traceback, and the honest end stays usable.

The hostile receiver here is a scripted server on loopback that proves the secret (it is
an authenticated peer, not an impostor) and then sends one bad frame; the sender is the
real ``mirror sync`` command.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading

import pytest

from mirror import protocol as P
from tests.servers import SECRET, mirror_server

_ATTRS = [0o755, 0, 0, 0]


class ScriptedReceiver:
    """Accepts one connection, shakes hands honestly up to its frame ``replaces`` (the kind
    of ``bad`` unless said), sends ``bad`` in its place, then reads until the sender hangs up."""

    def __init__(self, bad: list, replaces: str | None = None):
        self.bad = bad
        self.replaces = replaces or bad[0]
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, name="scripted-receiver")
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.settimeout(30)
        t = P.StreamTransport(conn.makefile("rb"), conn.makefile("wb"), on_close=conn.close)
        try:
            hello = t.recv()
            nonce = os.urandom(P.NONCE_SIZE)
            proof = P.server_proof(SECRET, nonce, hello[1]["nonce"], "m")
            honest = [
                [P.CHALLENGE, {"proto": P.PROTOCOL_VERSION, "nonce": nonce, "auth": True}],
                [P.WELCOME, {"proof": proof, "epoch": 0, "read_only": False, "can_chown": False}],
                [P.READY, {"epoch": 0, "root": _ATTRS}],
            ]
            for frame in honest:
                if frame[0] == self.replaces:
                    t.send(self.bad)
                    break
                t.send(frame)
                if frame[0] != P.READY:
                    t.recv()  # auth, start: not checked, this receiver only plays its part
            else:  # a session with nothing on this side, and ``bad`` as its result
                t.send([P.SUMMARY_END, {"problems": []}])
                while (message := t.recv()) is not None and message[0] != P.END:
                    pass
                t.send(self.bad)
            while t.recv() is not None:
                pass
        except (OSError, P.ProtocolError):
            pass
        finally:
            t.close()

    def close(self) -> None:
        self.thread.join(timeout=60)
        self.sock.close()
        assert not self.thread.is_alive()


def _source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"payload")
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    secret.chmod(0o600)
    return src, secret


def _sync(src, url: str, secret) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        "-m",
        "mirror",
        "sync",
        str(src),
        url,
        "--secret-file",
        str(secret),
        "--timeout",
        "30",
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _challenge(**fields):
    return [P.CHALLENGE, {"proto": P.PROTOCOL_VERSION, "nonce": b"n" * P.NONCE_SIZE, "auth": True, **fields}]


def _welcome(**fields):
    return [P.WELCOME, {"proof": b"p" * 32, "epoch": 0, "read_only": False, "can_chown": False, **fields}]


@pytest.mark.parametrize(
    "bad, field",
    [
        (_challenge(nonce=None), "nonce"),
        (_challenge(nonce=5), "nonce"),
        (_challenge(nonce=b"n" * 33), "nonce"),
        (_challenge(auth="yes"), "auth"),
        ([P.CHALLENGE, "not a map"], "challenge"),
        ([P.CHALLENGE, {}, {}], "'challenge'"),
        (_welcome(epoch="zz"), "epoch"),
        (_welcome(epoch=-1), "epoch"),
        (_challenge(proto=None), "protocol version"),
        (_challenge(proto="5"), "protocol version"),
        (_challenge(proto=P.OLDEST_VERSION - 1), f"speaks protocol version {P.OLDEST_VERSION - 1}"),
        (_challenge(proto=P.PROTOCOL_VERSION + 1), f"speaks protocol version {P.PROTOCOL_VERSION + 1}"),
        (_welcome(can_chown="x"), "can_chown"),
        (_welcome(read_only=1), "read_only"),
        (_welcome(proof=b"p" * 65), "proof"),
        (_welcome(applied=[0, 0]), "applied"),
        (_welcome(applied=[0, 0, 7]), "journal"),
        (_welcome(idle="yes"), "idle"),
        (_welcome(disk="/mnt"), "disk"),
        (_welcome(disk=b"mnt"), "disk"),
        (_welcome(disk=b"/mnt\0/x"), "disk"),
        (_welcome(disk=b"/" * 4097), "disk"),
        ([P.READY, 7], "ready"),
        ([P.READY, {"epoch": 0, "root": "x"}], "attributes"),
        ([P.READY, {"epoch": 0, "root": [0o755, 0, 0]}], "attributes"),
        ([P.READY, {"epoch": "0", "root": _ATTRS}], "epoch"),
    ],
)
def test_a_receiver_sending_a_malformed_handshake_frame_ends_the_sync_with_a_named_error(
    tmp_path, bad, field
):
    src, secret = _source(tmp_path)
    receiver = ScriptedReceiver(bad)
    try:
        port = receiver.sock.getsockname()[1]
        proc = _sync(src, f"mirror://127.0.0.1:{port}/m", secret)
    finally:
        receiver.close()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"the receiver at 127.0.0.1:{port}" in proc.stderr and field in proc.stderr, proc.stderr
    # the source keeps its content (its .mirror holds the source guard's record of the tree)
    assert sorted(os.listdir(src)) in (["f"], [".mirror", "f"]) and (src / "f").read_bytes() == b"payload"


@pytest.mark.parametrize("replaces", [P.CHALLENGE, P.WELCOME, P.READY])
def test_a_frame_of_another_kind_in_place_of_a_handshake_frame_is_named(tmp_path, replaces):
    src, secret = _source(tmp_path)
    receiver = ScriptedReceiver([P.PONG, 0], replaces=replaces)
    try:
        proc = _sync(src, f"mirror://127.0.0.1:{receiver.sock.getsockname()[1]}/m", secret)
    finally:
        receiver.close()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"expected {replaces!r}, got 'pong'" in proc.stderr, proc.stderr


def _raw_hello(port: int, hello: dict) -> list | None:
    """Send one ``hello`` to a real server; its answer (an ``error`` frame, or None)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        t = P.StreamTransport(sock.makefile("rb"), sock.makefile("wb"))
        t.send([P.HELLO, hello])
        return t.recv()


@pytest.mark.parametrize(
    "hello, field",
    [
        ({"module": "m"}, "nonce"),
        ({"module": "m", "nonce": "text"}, "nonce"),
        ({"module": "m", "nonce": b"n" * 33}, "nonce"),
        ({"module": 5, "nonce": b"n" * 32}, "module"),
        ({"nonce": b"n" * 32}, "module"),
        ({"module": "m", "nonce": b"n" * 32, "subpath": b"s" * 4097}, "subpath"),
        ({"module": "m", "nonce": b"n" * 32, "subpath": "text"}, "subpath"),
        ({"module": "m", "nonce": b"n" * 32, "idle": "often"}, "idle"),
        ({"module": "m", "nonce": b"n" * 32, "idle": 0.001}, "idle"),  # a limit of 4 ms would drop every sender
        ({"module": "m", "nonce": b"n" * 32, "proto": None}, "protocol version"),
        ({"module": "m", "nonce": b"n" * 32, "proto": 4.5}, "protocol version"),
        ({"module": "m", "nonce": b"n" * 32, "upto": "6"}, "protocol version"),
        # versions this receiver does not speak: an older sender's, a newer sender's, none at all
        ({"module": "m", "nonce": b"n" * 32, "proto": 3}, "speaks protocol version 3; this receiver speaks 4 to 5"),
        ({"module": "m", "nonce": b"n" * 32, "proto": 6, "upto": 7}, "speaks protocol version 6 to 7"),
        ({"module": "m", "nonce": b"n" * 32, "proto": 5, "upto": 4}, "speaks protocol version 5 to 4"),
    ],
)
def test_a_malformed_hello_is_refused_by_name_and_the_server_goes_on(tmp_path, hello, field):
    src, _secret = _source(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        answer = _raw_hello(server.port, {"proto": P.PROTOCOL_VERSION, **hello})
        assert answer is not None and answer[0] == P.ERROR and answer[1] == "ProtocolError", answer
        assert field in answer[3], answer
        proc = _sync(src, server.url("m"), tmp_path / "secret")
        assert proc.returncode == 0, proc.stderr
    assert (dst / "f").read_bytes() == b"payload"


@pytest.mark.parametrize(
    "result, field",
    [
        ({"deleted": "x"}, "deleted"),
        ({"deleted": -1}, "deleted"),
        ({"files": "a"}, "files"),
        ({"failed_count": 2.5}, "failed_count"),
        ({"failed": "x"}, "failed"),
        ({"failed": [[b"p"]]}, "failure"),
        ({"deletions_refused": 5}, "deletions_refused"),
        ({"applied": "zz"}, "applied"),
        ({"applied": [1, 2]}, "applied"),
        ({"applied": [1, -2, ""]}, "seq"),
    ],
)
def test_a_malformed_result_ends_the_sync_with_a_named_error_not_a_wrong_report(tmp_path, result, field):
    src, secret = _source(tmp_path)
    receiver = ScriptedReceiver([P.RESULT, {"files": 1, "bytes": 7, "deleted": 0, **result}])
    try:
        proc = _sync(src, f"mirror://127.0.0.1:{receiver.sock.getsockname()[1]}/m", secret)
    finally:
        receiver.close()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"error: the receiver at [^:]+:[0-9]+: bad ", proc.stderr) and field in proc.stderr, (
        proc.stderr
    )
