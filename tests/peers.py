"""A scripted (hostile, or merely broken) sender for tests: it speaks the real messages to a
real ``Receiver`` on a real module directory, as real msgpack frames over a socket pair, so
every frame goes through the receiver's real decoder and its frame checks.
"""

from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager

from mirror import protocol as P
from mirror.apply import ModuleConfig
from mirror.errors import MirrorError, ProtocolError
from mirror.receiver import Receiver
from mirror.server import MirrorServer
from mirror.transfer import _hang_up

ATTRS = [0o644, 0, 0, 1_000_000_000_000_000_000]


def _transport(sock: socket.socket, peer: str) -> P.StreamTransport:
    return P.StreamTransport(sock.makefile("rb", buffering=1 << 16), sock.makefile("wb", buffering=1 << 16),
                             peer=peer, on_close=sock.close)  # fmt: skip


class RawSession:
    """One connection to a real Receiver, driven message by message."""

    def __init__(self, root, *, subpath: bytes = b"", lock_file: bytes | None = None, start: dict | None = None,
                 module_options: dict | None = None):  # fmt: skip
        mine, theirs = socket.socketpair()
        self._sockets = (mine, theirs)
        self.client = _transport(mine, "the receiver")
        server_end = _transport(theirs, "the review peer")
        module = ModuleConfig("", os.fsencode(root), lock_file=lock_file, **(module_options or {}))
        self.receiver = Receiver(server_end, {"": module}, peer="review",
                                 hang_up=lambda: theirs.shutdown(socket.SHUT_RDWR))  # as mirror serve's
        self.errors: list[BaseException] = []
        self.replies: list[list] = []
        self.thread = threading.Thread(target=self._serve, name="review-receiver", daemon=True)
        self.thread.start()
        self.ready = None
        self.refused = None  # the receiver's error, if it refused the handshake
        self.client.send(
            [
                P.HELLO,
                {"proto": P.PROTOCOL_VERSION, "module": "", "subpath": subpath, "nonce": os.urandom(32)},
            ]
        )
        if self._step(P.CHALLENGE):
            self.client.send([P.AUTH, {}])
            self._step(P.WELCOME)
        if start is not None:
            self.start(**start)

    def _step(self, kind: str) -> bool:
        message = self.next()
        if message is not None and message[0] == kind:
            return True
        assert message is None or message[0] == P.ERROR, message
        self.refused = message
        return False

    def _serve(self):
        try:
            self.receiver.serve()
        except BaseException as exc:  # recorded: the test decides what is acceptable
            self.errors.append(exc)

    def start(self, **opts) -> list:
        if self.refused is not None:
            self.ready = self.refused
            return self.ready
        self.client.send([P.START, {"epoch": 0, "flags": 0, "no_fsync": True, **opts}])
        self.ready = self.next()
        return self.ready

    def send(self, *messages) -> None:
        """Send frames; once the receiver has hung up (it refused something), the rest are
        dropped, as a real peer's would be: its last words are still there to read."""
        for message in messages:
            try:
                self.client.send(list(message))
            except ProtocolError:
                return

    def next(self) -> list | None:
        """The receiver's next reply; None once it has hung up (a reset too: it closed with
        our frames unread, as a receiver that refused them does)."""
        try:
            message = self.client.recv()
        except ProtocolError:
            return None
        if message is not None:
            self.replies.append(message)
        return message

    def expect(self, kind: str) -> list:
        message = self.next()
        assert message is not None and message[0] == kind, message
        return message

    def until(self, kind: str) -> list | None:
        """Read replies until ``kind`` (returned), an error (returned) or the end (None)."""
        while True:
            message = self.next()
            if message is None or message[0] in (kind, P.ERROR):
                return message

    def drain_summary(self) -> None:
        message = self.until(P.SUMMARY_END)
        assert message is not None and message[0] == P.SUMMARY_END, message

    def end(self) -> list | None:
        """Send ``end``; return the receiver's ``result`` (or its ``error``); then hang up."""
        self.send([P.END, {}])
        reply = self.until(P.RESULT)
        self.close()
        return reply

    def close(self) -> None:
        """Hang up (our sending side), read what the receiver still says, wait for it to stop."""
        try:
            self.client.flush()
            self._sockets[0].shutdown(socket.SHUT_WR)
        except (OSError, ProtocolError):
            pass  # it hung up first
        while self.next() is not None:
            pass
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the receiver did not stop after the peer hung up"
        self.client.close()
        for sock in self._sockets:
            sock.close()

    def error(self) -> list | None:
        return next((m for m in self.replies if m[0] == P.ERROR), None)


def temp_files(root) -> list:
    tmp = os.path.join(os.fsencode(root), b".mirror", b"tmp")
    return sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []


@contextmanager
def in_process_server(modules: dict):
    server = MirrorServer(("127.0.0.1", 0), modules)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="review-serve"
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def destination(where: str, dst, **module_options):
    """``dst`` as a sync's destination: ``"local"`` (the path itself) or ``"remote"`` (a
    module of a real server in this process, over loopback TCP)."""
    if where == "local":
        yield dst
        return
    with in_process_server({"m": ModuleConfig("m", os.fsencode(dst), **module_options)}) as server:
        yield f"mirror://127.0.0.1:{server.server_address[1]}/m"


@contextmanager
def socket_pair_receiver(session_class, dst, **module_options):
    """A receiver whose sessions are ``session_class`` on one end of a socket pair; yields the
    sender's transport."""
    a, b = socket.socketpair()
    receiver_end = P.StreamTransport(b.makefile("rb"), b.makefile("wb"), on_close=b.close)
    # the sender's end hangs up as a sync's connection to a server does (mirror/transfer.py)
    sender_end = P.StreamTransport(a.makefile("rb"), a.makefile("wb"), on_close=lambda: _hang_up(a, 10))
    receiver = Receiver(receiver_end, {"m": ModuleConfig("m", os.fsencode(dst), **module_options)})
    receiver.session_class = session_class

    def serve():
        try:
            receiver.serve()
        except (MirrorError, OSError):
            pass

    thread = threading.Thread(target=serve, name="review-receiver")
    thread.start()
    try:
        yield sender_end
    finally:
        sender_end.close()
        thread.join(timeout=30)
        assert not thread.is_alive()


def changed_pair(tmp_path, small_files: int = 0):
    """src/a differs from dst/a (same size, so it goes as a delta with a low threshold)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (dst / "a").write_bytes(b"o" * 1000)
    os.utime(dst / "a", ns=(10**18, 10**18))
    (src / "a").write_bytes(b"n" * 1000)
    for i in range(small_files):
        (src / f"b{i:04d}").write_bytes(b"small")
    return src, dst
