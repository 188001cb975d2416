"""A session admitted before the replica's epoch rose commits nothing once it has.

Admission refuses a sender older than the replica.  These tests raise the replica's epoch
while a session is under way, as a node that follows a new primary does, and check that
the session that was admitted earlier (a former primary frozen, then thawed) commits no
file and deletes nothing after that, ends with StaleEpochError, and leaves the module free
for the newer primary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import xxhash

from mirror import protocol as P
from mirror.epoch import bump_epoch, read_epoch
from mirror.errors import EXIT_STALE_EPOCH
from tests.helpers import wait_until
from tests.peers import ATTRS, RawSession, temp_files
from tests.servers import mirror_server


def _file(req: int, path: bytes, data: bytes) -> list:
    return [[P.FILE, req, path, ATTRS, "whole", 0, 0, False], [P.DATA, req, data],
            [P.FILE_END, req, xxhash.xxh3_128_digest(data), len(data)]]  # fmt: skip


def _names(root) -> set[str]:
    return {name for name in os.listdir(root) if name != ".mirror"}


@pytest.mark.parametrize("fsync", [False, True], ids=["no-fsync", "fsync"])
def test_a_session_commits_nothing_after_the_replica_s_epoch_rises_past_its_sender_s(tmp_path, fsync):
    root = tmp_path / "module"
    root.mkdir()
    (root / "keep").write_bytes(b"the newer primary's")
    state_dir = os.fsencode(root / ".mirror")
    bump_epoch(state_dir, to=5)
    s = RawSession(root, start={"epoch": 5, "no_fsync": not fsync, "delete": True})
    assert s.ready[0] == P.READY, s.ready
    s.drain_summary()
    # Two batches and more: the first is committed while the session goes on (with fsync,
    # a batch is renamed into place once the next one is full).
    before = [b"before-%03d" % i for i in range(560)]
    for req, path in enumerate(before, 1):
        s.send(*_file(req, path, path * 10))
    s.send([P.PING, 1])
    assert s.until(P.PONG)[0] == P.PONG, s.replies
    wait_until(lambda: len(_names(root)) >= 256)  # the first batch committed
    bump_epoch(state_dir, to=6)  # a node that follows the new primary raised it
    raised = _names(root)
    after = [b"after-%03d" % i for i in range(300)]
    for req, path in enumerate(after, 1000):
        s.send(*_file(req, path, path * 10))
    s.send([P.DELETE, b"keep"])
    reply = s.end()
    assert reply is not None and reply[0] == P.ERROR and reply[1] == "StaleEpochError", s.replies
    assert "epoch rose to 6" in reply[3], reply
    # Of what the session sent once the epoch rose, nothing is in place: the queued files
    # were dropped (no temporary file left) and the deletion not made.
    assert _names(root) <= raised | {p.decode() for p in before}
    assert not any(name.startswith("after-") for name in _names(root))
    assert (root / "keep").read_bytes() == b"the newer primary's"
    assert temp_files(root) == []
    assert read_epoch(state_dir) == 6
    # The former primary is refused from now on; the newer one gets in (the writer lock went).
    stale = RawSession(root, start={"epoch": 5})
    assert stale.ready[0] == P.ERROR and stale.ready[1] == "StaleEpochError", stale.ready
    stale.close()
    newer = RawSession(root, start={"epoch": 6})
    assert newer.ready[0] == P.READY, newer.ready
    newer.drain_summary()
    assert newer.end()[0] == P.RESULT


def test_a_sync_frozen_mid_transfer_and_thawed_after_a_takeover_commits_nothing_more(tmp_path):
    """The user's view: `mirror sync` to a `mirror serve` replica, frozen (SIGSTOP) in the
    middle of its transfer; the replica's epoch rises meanwhile; thawed, the sync exits 4
    and a reader polling the replica sees no new file from it after the rise."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3000):
        (src / f"f{i:04d}").write_bytes(os.urandom(16 << 10))
    bump_epoch(os.fsencode(src / ".mirror"), to=3)
    dst = tmp_path / "replica"
    dst.mkdir()
    replica_state = os.fsencode(dst / ".mirror")
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        sync = subprocess.Popen([sys.executable, "-m", "mirror", "sync", str(src), server.url("m"),
                                 "--secret-file", server.secret_file],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            wait_until(lambda: len(_names(dst)) >= 256 or sync.poll() is not None, timeout=60)
            os.kill(sync.pid, signal.SIGSTOP)
            assert sync.poll() is None, "the sync finished before it could be frozen"
            bump_epoch(replica_state, to=4)
            raised_at = time.monotonic()
            seen: dict[str, float] = {name: 0.0 for name in _names(dst)}
            stop = threading.Event()

            def poll_replica() -> None:
                while not stop.is_set():
                    now = time.monotonic()
                    for name in _names(dst):
                        seen.setdefault(name, now)
                    stop.wait(0.01)

            reader = threading.Thread(target=poll_replica)
            reader.start()
            try:
                os.kill(sync.pid, signal.SIGCONT)
                _, err = sync.communicate(timeout=120)
            finally:
                stop.set()
                reader.join()
        finally:
            if sync.poll() is None:
                os.kill(sync.pid, signal.SIGCONT)
                sync.kill()
                sync.wait()
        assert sync.returncode == EXIT_STALE_EPOCH, err
        assert b"epoch rose to 4" in err, err
        late = sorted(name for name, when in seen.items() if when > raised_at + 1.0)
        assert late == [], f"{len(late)} files committed more than 1 s after the epoch rose, e.g. {late[:3]}"
        assert len(_names(dst)) < 3000
        assert temp_files(dst) == []
        # The sender of the newer epoch gets in and finishes the replica.
        bump_epoch(os.fsencode(src / ".mirror"), to=4)
        done = subprocess.run([sys.executable, "-m", "mirror", "sync", str(src), server.url("m"),
                               "--secret-file", server.secret_file], capture_output=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert _names(dst) == _names(src)


def test_a_writer_fenced_off_is_hung_up_on_for_a_sender_at_the_replica_s_epoch(tmp_path):
    """A former primary frozen in the middle of a file holds the module's writer lock.  Once
    the replica holds a newer epoch (its node follows the new primary), the new primary's
    session does not wait for that connection to time out (10 minutes in a session): the
    fenced writer is hung up on, its file dropped, and the newer one gets in at once.  A
    sender that only claims a newer epoch the replica does not hold finds the module busy."""
    root = tmp_path / "module"
    root.mkdir()
    (root / "keep").write_bytes(b"before")
    stale = RawSession(root, start={"epoch": 5})
    assert stale.ready[0] == P.READY, stale.ready
    stale.drain_summary()
    # Admitted, it holds the writer lock; it stops in the middle of a file.
    stale.send([P.FILE, 1, b"keep", ATTRS, "whole", 0, 0, False], [P.DATA, 1, b"half of the stale primary's"])
    claim = RawSession(root, start={"epoch": 6})
    assert claim.ready[0] == P.ERROR and "busy" in claim.ready[3], claim.ready
    claim.close()
    bump_epoch(os.fsencode(root / ".mirror"), to=6)  # the replica's node follows the new primary
    newer = RawSession(root, start={"epoch": 6})
    assert newer.ready[0] == P.READY, newer.ready
    newer.drain_summary()
    newer.send(*_file(1, b"keep", b"the newer primary's"))
    reply = newer.end()
    assert reply[0] == P.RESULT and reply[1]["files"] == 1, newer.replies
    # The stale writer's connection is gone, its file never committed.
    assert stale.next() is None
    stale.close()
    assert stale.errors, "the stale writer's receiver ended without an error"
    assert (root / "keep").read_bytes() == b"the newer primary's"
    assert temp_files(root) == []
    assert read_epoch(os.fsencode(root / ".mirror")) == 6


def test_a_new_primary_s_sync_gets_in_while_a_former_primary_s_sync_is_frozen_mid_transfer(tmp_path):
    """`mirror serve`: a sync frozen (SIGSTOP) in the middle of its transfer holds the
    module; once the replica holds a newer epoch, a sync from another tree at that epoch is
    not refused as busy: the server hangs up on the frozen one, and the newer one makes the
    replica its copy.  Thawed, the former one changes
    nothing (its connection is gone; a new one is refused for its epoch)."""
    old, new = tmp_path / "old", tmp_path / "new"
    for root, count in ((old, 3000), (new, 50)):
        root.mkdir()
        for i in range(count):
            (root / f"{root.name}-{i:04d}").write_bytes(os.urandom(16 << 10))
    bump_epoch(os.fsencode(old / ".mirror"), to=3)
    bump_epoch(os.fsencode(new / ".mirror"), to=4)
    dst = tmp_path / "replica"
    dst.mkdir()
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        secret = ["--secret-file", server.secret_file]
        frozen = subprocess.Popen([sys.executable, "-m", "mirror", "sync", str(old), server.url("m"), *secret],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            wait_until(lambda: len(_names(dst)) >= 256 or frozen.poll() is not None, timeout=60)
            os.kill(frozen.pid, signal.SIGSTOP)
            assert frozen.poll() is None, "the sync finished before it could be frozen"
            bump_epoch(os.fsencode(dst / ".mirror"), to=4)  # the replica's node follows the new primary
            # (another tree than the replica's: its guard wants --allow-mass-delete)
            newer = subprocess.run([sys.executable, "-m", "mirror", "sync", "--delete", "--allow-mass-delete", str(new),
                                    server.url("m"), *secret], capture_output=True, timeout=120)  # fmt: skip
            assert newer.returncode == 0, newer.stderr
            assert _names(dst) == _names(new)
            os.kill(frozen.pid, signal.SIGCONT)
            _, err = frozen.communicate(timeout=120)
        finally:
            if frozen.poll() is None:
                os.kill(frozen.pid, signal.SIGCONT)
                frozen.kill()
                frozen.wait()
        assert frozen.returncode != 0, err
        assert _names(dst) == _names(new)
        assert temp_files(dst) == []
        again = subprocess.run([sys.executable, "-m", "mirror", "sync", str(old), server.url("m"), *secret],
                               capture_output=True)  # fmt: skip
        assert again.returncode == EXIT_STALE_EPOCH, again.stderr
        assert _names(dst) == _names(new)
    # Hung up on while it waited for its frozen sender, or stopped by the epoch while it
    # still worked through what the sender had sent before the freeze.
    log = (tmp_path / "server.log").read_bytes()
    assert b"hung up on" in log or b"epoch rose to 4 during the session" in log, log


_LOCAL_SYNC_FENCED_AS_IT_STOPS = """
import os, sys
from mirror.epoch import bump_epoch
from mirror.errors import LockedError
from mirror.lockfile import acquire
from mirror.transfer import sync
src, dst, lock = sys.argv[1:4]
changes = []
def fence_and_lock(change):  # reported before the change is carried out
    changes.append(change)
    if len(changes) == 300:  # a batch committed, the next one queued
        bump_epoch(os.path.join(os.fsencode(dst), b".mirror"), to=9)
        acquire(os.fsencode(lock), reason="takeover")
try:
    sync(src, dst, on_change=fence_and_lock, fsync=False, lock_file=lock)
except LockedError:
    sys.exit(3)
"""


def test_a_local_sync_stopped_by_its_lock_as_the_replica_s_epoch_rises_keeps_no_temporary_file(tmp_path):
    """A local sync stopped by its mirroring lock keeps the files already whole, committing
    them; if the replica's epoch rose meanwhile they are dropped instead, and none of their
    temporary files stays behind."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(450):
        (src / f"f{i:04d}").write_bytes(b"x")
    proc = subprocess.run([sys.executable, "-c", _LOCAL_SYNC_FENCED_AS_IT_STOPS, str(src), str(dst),
                           str(tmp_path / "lock")], capture_output=True, timeout=60)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert len(_names(dst)) == 256  # the first batch, committed before the rise
    assert os.listdir(dst / ".mirror" / "tmp") == []
