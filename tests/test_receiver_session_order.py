"""A receiver against a sender that breaks the session's order: every abuse ends the session
cleanly, with nothing half-written and the module free for the next writer."""

from __future__ import annotations

import pytest

from mirror import protocol as P
from mirror.errors import MirrorError
from tests.peers import ATTRS, RawSession, temp_files


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


_BETWEEN_FILES = {
    P.FILE: [P.FILE, 2, b"other", ATTRS, "whole", 0, 0, False],
    P.MKDIR: [P.MKDIR, b"d", ATTRS],
    P.SYMLINK: [P.SYMLINK, b"l", b"target", ATTRS],
    P.NODE: [P.NODE, b"n", 4, 0, ATTRS],  # a FIFO
    P.HARDLINK: [P.HARDLINK, b"h", b"keep"],
    P.ATTRS: [P.ATTRS, b"keep", 1, ATTRS],
    P.DELETE: [P.DELETE, b"keep"],
    P.SIG: [P.SIG, [[7, b"keep"]]],
    P.PING: [P.PING, 1],
    P.END: [P.END, {}],
}


@pytest.mark.parametrize("kind", sorted(_BETWEEN_FILES))
@pytest.mark.parametrize("first", [b"new", b"keep/under-a-file"])  # made, or failed to be made
def test_anything_but_content_in_the_middle_of_a_file_is_refused(tmp_path, kind, first):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, first, ATTRS, "whole", 0, 0, False], [P.DATA, 1, b"half"], _BETWEEN_FILES[kind])
    _assert_clean_refusal(s, root, f"{kind!r} in the middle of a file")
    assert not (root / "new").exists()


def test_repeated_start_inside_a_session_is_refused(tmp_path):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, b"keep", ATTRS, "whole", 0, 0, False], [P.START, {"epoch": 0}])
    _assert_clean_refusal(s, root, "unexpected message 'start'")


@pytest.mark.parametrize("path", [b"new", b"keep/under-a-file"])  # made, or failed to be made
def test_a_delta_with_no_block_size_is_refused(tmp_path, path):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, path, ATTRS, "delta", 0, 11, False], [P.DATA, 1, b"x"], [P.FILE_END, 1, b"\0" * 16, 1])
    _assert_clean_refusal(s, root, "bad block size")


def test_data_for_another_request_is_refused(tmp_path):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, b"keep", ATTRS, "whole", 0, 0, False], [P.DATA, 2, b"x"])
    _assert_clean_refusal(s, root, "not started")


@pytest.mark.parametrize("frame", [[P.DATA, 1, b"x"], [P.COPY, 1, 0, 1], [P.FILE_END, 1, b"\0" * 16, 0],
                                   [P.FILE_ABORT, 1, "changed"]])  # fmt: skip
def test_file_content_with_no_file_started_is_refused(tmp_path, frame):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send(frame)
    _assert_clean_refusal(s, root, "not started")


def test_file_end_with_wrong_digest_is_reported_never_committed(tmp_path):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, b"keep", ATTRS, "whole", 0, 0, False], [P.DATA, 1, b"new content"],
           [P.FILE_END, 1, b"\0" * 16, 11])  # fmt: skip
    result = s.end()
    assert result[0] == P.RESULT and result[1]["failed_count"] == 1, s.replies
    assert any(m[0] == P.FAILED and m[3].startswith("mismatch") for m in s.replies)
    assert (root / "keep").read_bytes() == b"old content"
    assert temp_files(root) == []


def test_peer_vanishing_mid_file_leaves_no_temp_and_frees_the_module(tmp_path):
    root = _module(tmp_path)
    s = RawSession(root, start={})
    s.send([P.FILE, 1, b"keep", ATTRS, "whole", 0, 0, False], [P.DATA, 1, b"x" * 1000])
    s.close()
    assert s.errors and all(isinstance(e, MirrorError) for e in s.errors)
    assert temp_files(root) == []
    assert (root / "keep").read_bytes() == b"old content"
    after = RawSession(root, start={})
    assert after.ready[0] == P.READY
    after.drain_summary()
    after.end()
