"""A session's errors seen from both ends: a receiver's flood of signature bytes is bounded on
the sender, a receiver's error in the middle of a session is reported as itself, a receiver
that stops never hangs a sync, and its mirroring lock stops every change within a second."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest

from mirror import protocol as P
from mirror.errors import LimitExceeded, LockedError, MirrorError, ProtocolError
from mirror.lockfile import acquire, release
from mirror.receiver import ReceiverSession
from mirror.sender import Sender, SenderOptions
from tests.helpers import REPO
from tests.peers import RawSession, changed_pair, socket_pair_receiver

# -- bounded input on the sender -------------------------------------------------------------


class _FloodingSession(ReceiverSession):
    """Answers a signature request with an endless signature (parts with last=False)."""

    PARTS = 16
    frame = P.encode([P.SIGNATURE, 1, bytes(4 << 20), False])  # made before memory is traced

    def _on_sig(self, requests):
        req = requests[0][0]
        frame = self.frame if req == 1 else P.encode([P.SIGNATURE, req, bytes(4 << 20), False])
        try:
            for _ in range(self.PARTS):
                self.t.wfile.write(frame)
            self.t.send([P.SIGNATURE, req, b"not a signature", True])
        except (OSError, MirrorError):
            pass
        raise ProtocolError("flood sent")


def test_sender_bounds_the_signature_it_accepts(tmp_path):
    src, dst = changed_pair(tmp_path)
    with socket_pair_receiver(_FloodingSession, dst) as transport:
        tracemalloc.start()
        try:
            sender = Sender(
                os.fsencode(src), transport, SenderOptions(delta_threshold=1, fsync=False), module="m"
            )
            with pytest.raises(MirrorError):
                sender.run(sender.handshake(), 0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    # The basis is 1000 bytes: its signature is a few dozen bytes, not 64 MiB.
    assert peak < 32 << 20, f"the sender held {peak >> 20} MiB of signature"


# -- errors in the middle of a session -------------------------------------------------------


class _LockAppearsOnSig(ReceiverSession):
    """Reports an error when asked for signatures and keeps reading, as the receiver's own
    summary thread does when its scan fails (a real lock race does the same, 1 run in 5)."""

    def _on_sig(self, requests):
        self.t.send([P.ERROR, "LockedError", 3, "mirroring lock appeared on the receiver"])


def test_receiver_error_while_signatures_are_in_flight_is_reported_as_itself(tmp_path):
    src, dst = changed_pair(tmp_path, small_files=20)

    def wait_for_the_reader_to_see_the_error(change):
        if change.path != b"a":
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(
                t.name == "sender-reader" and t.is_alive() for t in threading.enumerate()
            ):
                time.sleep(0.005)

    with socket_pair_receiver(_LockAppearsOnSig, dst) as transport:
        sender = Sender(os.fsencode(src), transport, SenderOptions(delta_threshold=1, fsync=False), module="m",
                        on_change=wait_for_the_reader_to_see_the_error)  # fmt: skip
        with pytest.raises(LockedError):
            sender.run(sender.handshake(), 0)


_LOCAL_SYNC_WITH_LOCK = """
import os, sys
from mirror.errors import LockedError
from mirror.lockfile import acquire, release
from mirror.transfer import sync
src, dst, lock, which = sys.argv[1:5]
def take_lock(change):  # reported before the change is carried out
    if not os.path.exists(lock):
        acquire(os.fsencode(lock), reason="takeover")
try:
    sync(src, dst, on_change=take_lock, fsync=False, **{which: lock})
except LockedError:
    sys.exit(3)
"""


@pytest.mark.parametrize("which", ["dst_lock_file", "lock_file"])
def test_local_sync_stops_when_a_mirroring_lock_appears(tmp_path, which):
    # The lock appears as the first change is planned: a local sync (the writer called
    # directly, no receiver thread) stops with exit 3, in bounded time, and nothing of the
    # 450 files reaches the replica.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(450):  # more than a commit batch (256 files)
        (src / f"f{i:04d}").write_bytes(b"x")
    try:
        proc = subprocess.run([sys.executable, "-c", _LOCAL_SYNC_WITH_LOCK, str(src), str(dst),
                               str(tmp_path / "lock"), which], cwd=REPO, capture_output=True, timeout=30)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("local sync hung after the mirroring lock appeared")
    assert proc.returncode == 3, proc.stderr
    assert sorted(os.listdir(dst)) == [".mirror"]
    assert os.listdir(dst / ".mirror" / "tmp") == []


@pytest.mark.parametrize("kind", sorted(P._SESSION_FRAMES))
@pytest.mark.parametrize("extra", [-1, 1])
def test_a_frame_with_the_wrong_number_of_fields_is_refused_as_malformed(tmp_path, kind, extra):
    # The frame table's field count is what refuses it: an IndexError or a failed unpacking
    # further in would also end the session, but as the receiver's "internal error".
    root = tmp_path / "module"
    root.mkdir()
    fields = len(P._SESSION_FRAMES[kind]) + extra
    s = RawSession(root, start={})
    s.drain_summary()
    s.send([kind, *[0] * fields])
    s.close()
    assert all(isinstance(e, MirrorError) for e in s.errors), s.errors
    error = s.error()
    assert error is not None and error[1] == "ProtocolError", s.replies
    assert error[3].startswith(f"malformed {kind!r} message"), error


def test_receiver_lock_stops_every_change_within_a_second(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    lock = os.fsencode(tmp_path / "mirror.lock")
    s = RawSession(root, lock_file=lock, start={})
    s.drain_summary()
    acquire(lock, reason="takeover")
    locked_at = time.monotonic()
    stopped_at = None
    i = 0
    while time.monotonic() - locked_at < 2.0:
        s.send([P.SYMLINK, b"l%d" % i, b"target", [0o777, 0, 0, 0]], [P.MKDIR, b"d%d" % i, [0o755, 0, 0, 0]],
               [P.PING, i])  # fmt: skip
        reply = s.until(P.PONG)
        if reply is None or reply[0] == P.ERROR:
            stopped_at = time.monotonic()
            break
        i += 1
    s.close()
    assert stopped_at is not None and stopped_at - locked_at <= 1.2, f"{i} changes applied under the lock"
    assert s.error()[1] == "LockedError"


def test_receiver_lock_stops_a_dry_run_s_deletions_too(tmp_path):
    # A dry run sends its deletions to be reviewed: each is a change like any other, and
    # a lock that appears meanwhile ends the session.
    root = tmp_path / "module"
    root.mkdir()
    (root / "keep").write_bytes(b"old")
    lock = os.fsencode(tmp_path / "mirror.lock")
    s = RawSession(root, lock_file=lock, start={"dry_run": True, "delete": True})
    s.drain_summary()
    acquire(lock, reason="takeover")
    locked_at = time.monotonic()
    while time.monotonic() - locked_at < 2.0:
        s.send([P.DELETE, b"keep"], [P.PING, 0])
        reply = s.until(P.PONG)
        if reply is None or reply[0] == P.ERROR:
            break
    s.close()
    assert s.error() is not None and s.error()[1] == "LockedError", s.replies
    assert (root / "keep").read_bytes() == b"old"


# -- what the receiver answers is checked like what it is sent -------------------------------

_BAD_REPLIES = {
    "failed, short": [P.FAILED, 1],
    "failed, path not bytes": [P.FAILED, 1, 7, "reason"],
    "failed, reason not text": [P.FAILED, 1, b"f", b"reason"],
    "sig_failed, short": [P.SIG_FAILED, 1],
    "pong, long": [P.PONG, 1, 2],
    "result, not a map": [P.RESULT, "all done"],
    "a kind no receiver sends": ["bogus", 1],
}


@pytest.mark.parametrize("reply", list(_BAD_REPLIES))
def test_a_malformed_reply_from_the_receiver_is_a_protocol_error_not_a_crash(tmp_path, reply):
    # A hostile (authenticated) receiver answers a file with a malformed frame: the sender
    # ends with a clear protocol error, never an IndexError or AttributeError at the session's end.
    frame = _BAD_REPLIES[reply]

    class _BadReply(ReceiverSession):
        def _on_file(self, *fields):
            self.t.send(frame)
            super()._on_file(*fields)

    src, dst = changed_pair(tmp_path)
    with socket_pair_receiver(_BadReply, dst) as transport:
        sender = Sender(os.fsencode(src), transport, SenderOptions(fsync=False), module="m")
        with pytest.raises(ProtocolError, match="bad |malformed|unexpected message 'bogus'"):
            sender.run(sender.handshake(), 0)


# The pairing's replies: the summary, its end, a directory's listing, a signature.  Each
# case replaces the first frame of its kind that the real receiver sends.
_BAD_PAIRING = {
    "summary, not a list": [P.SUMMARY, {"a": 1}],
    "summary item, short": [P.SUMMARY, [[b""]]],
    "summary item, path not bytes": [P.SUMMARY, [["", b"f" * 16, 0]]],
    "summary item, flags not an integer": [P.SUMMARY, [[b"", b"f" * 16, "links"]]],
    "summary items out of order": [P.SUMMARY, [[b"d", b"f" * 16, 0], [b"", b"f" * 16, 0]]],
    "summary item repeated": [P.SUMMARY, [[b"", b"f" * 16, 0], [b"", b"f" * 16, 0]]],
    "summary end, not a map": [P.SUMMARY_END, [1, 2]],
    "summary end, problem not a triple": [P.SUMMARY_END, {"problems": [[b"x", 5]]}],
    "summary end, problem text not text": [P.SUMMARY_END, {"problems": [[b"x", 5, 7]]}],
    "listing, short": [P.LISTING, b""],
    "listing, records not bytes": [P.LISTING, b"", b"", 7, b"", True, True],
    "listing, last not a boolean": [P.LISTING, b"", b"", b"", b"", True, "yes"],
    "signature, request not an integer": [P.SIGNATURE, [1], b"", True],
}


class _Replacing:
    """The receiver's transport, but the first frame of ``kind`` is replaced by ``frame``."""

    def __init__(self, t, kind: str, frame: list):
        self.t, self.kind, self.frame = t, kind, frame

    def send(self, message, flush: bool = True) -> None:
        if self.kind is not None and message[0] == self.kind:
            message, self.kind = self.frame, None
        self.t.send(message, flush)

    def __getattr__(self, name):
        return getattr(self.t, name)


@pytest.mark.parametrize("reply", [*_BAD_PAIRING, "error, name not text"])
def test_a_malformed_pairing_reply_is_a_protocol_error_not_a_crash(tmp_path, reply):
    # A hostile receiver's summary, listing or signature of the wrong shape ends the session
    # with a protocol error naming the frame (before: a hang, a TypeError, or nothing at all);
    # its error frame of the wrong shape is still its error.
    kind, frame = P.SIGNATURE, [P.ERROR, ["OSError"], 2, "no basis"]
    error, match = MirrorError, "receiver: no basis"
    if reply in _BAD_PAIRING:
        frame = _BAD_PAIRING[reply]
        kind, error, match = frame[0], ProtocolError, "bad |malformed"

    class _BadPairing(ReceiverSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.t = _Replacing(self.t, kind, frame)

    src, dst = changed_pair(tmp_path)
    for tree in (src, dst):  # a directory the receiver lists too: the pairing asks for it
        (tree / "d").mkdir()
    (src / "d" / "f").write_bytes(b"new")
    with socket_pair_receiver(_BadPairing, dst) as transport:
        options = SenderOptions(delta_threshold=1, fsync=False)
        sender = Sender(os.fsencode(src), transport, options, module="m")
        with pytest.raises(error, match=match):
            sender.run(sender.handshake(), 0)


def test_a_session_that_fails_on_the_sender_ends_while_the_receiver_waits_in_silence(tmp_path, monkeypatch):
    # The sender fails in the middle of the pairing (a fault injected in the comparison) while
    # its reader thread waits for the receiver, which waits for the sender: hanging up must
    # wake that read rather than wait for it (closing the buffered reader first waited forever).
    from mirror import sender as sender_mod

    def broken(self, path):
        raise RuntimeError("injected: the comparison failed")

    monkeypatch.setattr(sender_mod.SendSession, "_receive_listing", broken)
    src, dst = changed_pair(tmp_path)
    outcome: list = []

    def run():
        with socket_pair_receiver(ReceiverSession, dst) as transport:
            sender = Sender(os.fsencode(src), transport, SenderOptions(fsync=False), module="m")
            try:
                sender.run(sender.handshake(), 0)
            except RuntimeError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=run, name="failing-sender", daemon=True)
    thread.start()
    thread.join(timeout=30)  # a hang detector, not a speed bound
    assert not thread.is_alive(), "the failed session hung on its own hang-up"
    assert outcome and "injected" in str(outcome[0])


# -- a delta whose basis changed on the receiver is sent again whole ---------------------------


class _BasisChangesAfterSig(ReceiverSession):
    """Another writer grows each basis on the replica right after its signature was sent:
    the delta then no longer fits its basis (``basis-changed``)."""

    grown: list = []

    def _on_sig(self, requests):
        super()._on_sig(requests)
        for _req, path in requests:
            with open(os.path.join(self.tree.root, path), "ab") as f:
                f.write(b"appended by another writer")
            self.grown.append(path)


def test_a_delta_whose_basis_changed_is_sent_again_whole(tmp_path):
    src, dst = changed_pair(tmp_path, small_files=3)
    for i in range(3):  # more deltas: each is retried once, whole, and nothing else is resent
        (dst / f"c{i}").write_bytes(b"o" * 3000)
        (src / f"c{i}").write_bytes(b"n" * 3000)
    _BasisChangesAfterSig.grown = []
    with socket_pair_receiver(_BasisChangesAfterSig, dst) as transport:
        sender = Sender(
            os.fsencode(src), transport, SenderOptions(delta_threshold=1, fsync=False), module="m"
        )
        result = sender.run(sender.handshake(), 0)
    assert sorted(_BasisChangesAfterSig.grown) == [b"a", b"c0", b"c1", b"c2"]
    assert result.failed == []
    for name in ["a", "c0", "c1", "c2", "b0000", "b0001", "b0002"]:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    # 4 deltas that failed on the receiver, then the same 4 whole; 3 new small files
    assert (result.stats.files_delta, result.stats.files_sent) == (4, 11)


class _SignsTwice(ReceiverSession):
    """Answers each signature request, then answers it again: with the same signature, or
    with a failure for a request never made."""

    again: str = "signature"

    def _on_sig(self, requests):
        super()._on_sig(requests)
        for req, _path in requests:
            if self.again == "signature":
                super()._on_sig([[req, _path]])
            else:
                self.t.send([P.SIG_FAILED, req + 1000, "no basis"])


@pytest.mark.parametrize("again", ["signature", "sig_failed"])
def test_a_signature_answered_twice_or_never_asked_is_a_protocol_error_not_a_crash(tmp_path, again):
    # A hostile receiver answers a request twice, or one never made: a clear protocol error,
    # never a KeyError from the sender's table of requests in flight.
    src, dst = changed_pair(tmp_path)
    for i in range(3):  # deltas still waiting for their signatures when the extra one comes
        (dst / f"c{i}").write_bytes(b"o" * 3000)
        (src / f"c{i}").write_bytes(b"n" * 3000)
    _SignsTwice.again = again
    with socket_pair_receiver(_SignsTwice, dst) as transport:
        sender = Sender(
            os.fsencode(src), transport, SenderOptions(delta_threshold=1, fsync=False), module="m"
        )
        with pytest.raises(ProtocolError, match="nobody asked for"):
            sender.run(sender.handshake(), 0)


# -- a session that ends early never hangs, and what it ends with names the receiver ----------


def _run_in_thread(target, what: str) -> list:
    """``target()``'s outcome (its value or exception), run in a thread; fails if it hangs."""
    outcome: list = []

    def run():
        try:
            outcome.append(target())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, name="review-sender", daemon=True)
    thread.start()
    thread.join(timeout=60)  # a hang detector, not a speed bound
    assert not thread.is_alive(), f"the sync hung: {what}"
    return outcome


def test_a_signature_in_more_parts_than_its_size_needs_ends_the_session(tmp_path, monkeypatch):
    # A hostile receiver splits the basis's real signature into one-byte parts: each part
    # costs the sender a frame's worth of memory, so parts are bounded by what the largest
    # signature the basis allows needs (one part here), not only their bytes.
    monkeypatch.setattr(ReceiverSession, "signature_part", 1)
    src, dst = changed_pair(tmp_path)
    with socket_pair_receiver(ReceiverSession, dst) as transport:
        transport.peer = "the receiver at review"  # as mirror.transfer names it
        sender = Sender(
            os.fsencode(src), transport, SenderOptions(delta_threshold=1, fsync=False), module="m"
        )
        with pytest.raises(
            ProtocolError, match="^the receiver at review: a signature in more parts than its size needs"
        ):
            sender.run(sender.handshake(), 0)


class _InterleavingSession(ReceiverSession):
    """Starts the first file's signature, then finishes it under the second file's request."""

    started = None

    def _on_sig(self, requests):
        from mirror import deltafmt, fastpath

        for req, path in requests:
            with self.tree.open_regular(path) as basis:
                data = deltafmt.signature_to_bytes(fastpath.choose("delta").signature(basis))
            if self.started is None:
                self.started = data
                self.t.send([P.SIGNATURE, req, data[: len(data) // 2], False])
            else:
                self.t.send([P.SIGNATURE, req, self.started[len(self.started) // 2 :], True])


def test_a_signatures_parts_interleaved_with_anothers_end_the_session(tmp_path, monkeypatch):
    # Joined, they would make a whole signature of the first file pass for the second's, and
    # the first request would wait for an answer forever.
    monkeypatch.setattr(P, "SIGNATURE_PART", 64)  # small parts: two of them within the count allowed
    src, dst = changed_pair(tmp_path)
    (dst / "b").write_bytes(b"p" * 1000)
    (src / "b").write_bytes(b"q" * 1000)
    with socket_pair_receiver(_InterleavingSession, dst) as transport:
        transport.peer = "the receiver at review"
        sender = Sender(os.fsencode(src), transport, SenderOptions(delta_threshold=1, fsync=False), module="m")
        outcome = _run_in_thread(lambda: sender.run(sender.handshake(), 0), "interleaved signature parts")
    assert isinstance(outcome[0], ProtocolError), outcome
    assert str(outcome[0]).startswith("the receiver at review: a signature's parts interleaved"), outcome


class _ResultFirst(ReceiverSession):
    """Sends its ``result`` where the summary should be, then waits for the sender."""

    def _send_summary(self, tree_scan):
        self.t.send([P.RESULT, {}])


def test_a_result_before_the_sessions_end_is_a_protocol_error_not_a_hang(tmp_path):
    src, dst = changed_pair(tmp_path)

    def sync():
        with socket_pair_receiver(_ResultFirst, dst) as transport:
            transport.peer = "the receiver at review"
            sender = Sender(os.fsencode(src), transport, SenderOptions(fsync=False), module="m")
            sender.run(sender.handshake(), 0)

    (outcome,) = _run_in_thread(sync, "a result came before the end")
    assert isinstance(outcome, ProtocolError), outcome
    assert str(outcome) == "the receiver at review: a result before the session's end"


def _handing_over(thread_name: str) -> bool:
    """Whether the thread ``thread_name`` waits to put an item in a full queue."""
    for thread in threading.enumerate():
        frame = sys._current_frames().get(thread.ident) if thread.name == thread_name else None
        while frame is not None:
            if frame.f_code.co_name == "put" and frame.f_code.co_filename.endswith("queue.py"):
                return True
            frame = frame.f_back
    return False


def test_a_session_stopped_by_the_lock_while_pairing_ahead_ends_and_the_next_one_works(tmp_path):
    # The lock stops the session at its first file, while the pairing thread has more than
    # its queue holds (1,024 pairs) still to hand over: it must stop too, and send nothing
    # into the next session.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "a").write_bytes(b"first in the root's listing")
    for i in range(1100):
        (src / f"d{i:04d}").mkdir()
    lock = os.fsencode(tmp_path / "mirror.lock")

    def take_lock(change):  # once the pairing thread waits for room in its queue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _handing_over("sender-pairs"):
            time.sleep(0.005)
        if not os.path.exists(lock):
            acquire(lock, reason="takeover")

    def two_sessions():
        with socket_pair_receiver(ReceiverSession, dst) as transport:
            options = SenderOptions(fsync=False, lock_file=lock)
            sender = Sender(os.fsencode(src), transport, options, module="m", on_change=take_lock)
            welcome = sender.handshake()
            with pytest.raises(LockedError):
                sender.run(welcome, 0)
            gc.collect()  # the stopped session's pairing, if anything still held it
            pairing = [t for t in threading.enumerate() if t.name == "sender-pairs"]
            assert not pairing, "the pairing thread outlived its session"
            release(lock)
            sender.on_change = None
            return sender.run(welcome, 0)

    (result,) = _run_in_thread(two_sessions, "stopped by the lock while pairing ahead")
    assert not isinstance(result, BaseException), result
    assert result.ok, result.failed
    assert sorted(os.listdir(dst)) == sorted(os.listdir(src))  # each has its .mirror


class _EndlessListing(ReceiverSession):
    """Answers a ``want`` with the directory's listing in parts that never end."""

    def _send_listings(self, paths):
        listing = self.listings[paths[0]]
        for _ in range(10_000):  # far more than the sender may hold, short of forever
            self.t.send([P.LISTING, paths[0], *listing.pack(), True, False])


def test_a_listing_in_parts_without_end_is_cut_off_at_the_directory_limit(tmp_path, monkeypatch):
    # Each part is a frame the sender keeps until the last: a receiver that never sends the
    # last would hold the sender's memory without bound.
    from mirror import constants

    monkeypatch.setattr(constants, "MAX_ENTRIES_PER_DIR", 100)
    src, dst = changed_pair(tmp_path)
    for i in range(20):
        (dst / f"old{i:02d}").write_bytes(b"x")
    with socket_pair_receiver(_EndlessListing, dst) as transport:
        transport.peer = "the receiver at review"
        sender = Sender(os.fsencode(src), transport, SenderOptions(fsync=False), module="m")
        outcome = _run_in_thread(lambda: sender.run(sender.handshake(), 0), "a listing without end")
    assert isinstance(outcome[0], LimitExceeded), outcome
    assert str(outcome[0]) == "the receiver at review: listing of . over 100 entries", outcome
