"""Review of issue 4: a scripted sender talking to a real ``Receiver``, and the protocol
state-machine abuses it handles correctly.

``RawSession`` is the hostile (or merely broken) peer used by the other ``test_review_*``
files: it speaks the real messages to a real ``Receiver`` on a real module directory, over
the in-process transport (the receiver checks the same fields either way; framing is
exercised against ``mirror serve`` in ``test_review_server.py``).
"""

from __future__ import annotations

import os
import threading

from mirror import protocol as P
from mirror.errors import MirrorError
from mirror.receiver import ModuleConfig, Receiver

ATTRS = [0o644, 0, 0, 1_000_000_000_000_000_000]


class RawSession:
    """One connection to a real Receiver, driven message by message."""

    def __init__(self, root, *, subpath: bytes = b"", lock_file: bytes | None = None, start: dict | None = None,
                 module_options: dict | None = None):  # fmt: skip
        self.client, server_end = P.LocalTransport.pair()
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
        for message in messages:
            self.client.send(list(message))

    def next(self) -> list | None:
        message = self.client.recv()
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
        self.client.close()
        while self.next() is not None:
            pass
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the receiver did not stop after the peer hung up"

    def error(self) -> list | None:
        return next((m for m in self.replies if m[0] == P.ERROR), None)


def temp_files(root) -> list:
    tmp = os.path.join(os.fsencode(root), b".mirror", b"tmp")
    return sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []


def _module(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    (root / "keep").write_bytes(b"old content")
    return root


def _assert_clean_refusal(session: RawSession, root, words: str) -> None:
    session.close()
    error = session.error()
    assert error is not None and error[1] == "ProtocolError" and words in error[3], session.replies
    assert temp_files(root) == []
    assert (root / "keep").read_bytes() == b"old content"
    # The writer lock went with the session: the next writer gets in.
    after = RawSession(root, start={})
    assert after.ready[0] == P.READY, after.ready
    after.drain_summary()
    assert after.end()[0] == P.RESULT


def test_second_file_before_file_end_is_refused(tmp_path):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, b"keep", ATTRS, "whole", 0, 0], [P.DATA, 1, b"half"],
           [P.FILE, 2, b"other", ATTRS, "whole", 0, 0])  # fmt: skip
    _assert_clean_refusal(s, root, "before the previous file ended")


def test_end_in_the_middle_of_a_file_is_refused(tmp_path):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, b"keep", ATTRS, "whole", 0, 0], [P.DATA, 1, b"half"], [P.END, {}])
    _assert_clean_refusal(s, root, "in the middle of a file")


def test_repeated_start_inside_a_session_is_refused(tmp_path):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, b"keep", ATTRS, "whole", 0, 0], [P.START, {"epoch": 0}])
    _assert_clean_refusal(s, root, "unexpected message 'start'")


def test_data_for_another_request_is_refused(tmp_path):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, b"keep", ATTRS, "whole", 0, 0], [P.DATA, 2, b"x"])
    _assert_clean_refusal(s, root, "not started")


def test_file_end_with_wrong_digest_is_reported_never_committed(tmp_path):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, b"keep", ATTRS, "whole", 0, 0], [P.DATA, 1, b"new content"],
           [P.FILE_END, 1, b"\0" * 16, 11])  # fmt: skip
    result = s.end()
    assert result[0] == P.RESULT and result[1]["failed_count"] == 1, s.replies
    assert any(m[0] == P.FAILED and m[3].startswith("mismatch") for m in s.replies)
    assert (root / "keep").read_bytes() == b"old content"
    assert temp_files(root) == []


def test_peer_vanishing_mid_file_leaves_no_temp_and_frees_the_module(tmp_path):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, b"keep", ATTRS, "whole", 0, 0], [P.DATA, 1, b"x" * 1000])
    s.close()
    assert s.errors and all(isinstance(e, MirrorError) for e in s.errors)
    assert temp_files(root) == []
    assert (root / "keep").read_bytes() == b"old content"
    after = RawSession(root, start={})
    assert after.ready[0] == P.READY
    after.drain_summary()
    after.end()
