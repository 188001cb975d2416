"""A scripted (hostile, or merely broken) sender for tests: it speaks the real messages to a
real ``Receiver`` on a real module directory, as real msgpack frames over a socket pair, so
every frame goes through the receiver's real decoder and its frame checks.
"""

from __future__ import annotations

import os
import socket
import threading

from mirror import protocol as P
from mirror.errors import ProtocolError
from mirror.receiver import ModuleConfig, Receiver

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
        self.receiver = Receiver(server_end, {"": module}, peer="review")
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
