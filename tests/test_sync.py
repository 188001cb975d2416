"""`mirror sync`: local mode, a real `mirror serve` on loopback, and a remote shell; every
result checked by an independent walk of both trees (tests/snapshot.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading

import pytest

from mirror.epoch import bump_epoch
from mirror.errors import EXIT_GUARD, AuthError, LockedError, MirrorError, StaleEpochError
from mirror.lockfile import acquire
from mirror.safefs import SYNCFS_FROM
from mirror.transfer import parse_destination, sync
from mirror.writerlock import WriterLock
from tests.helpers import MIRROR, is_root, run_mirror, wait_until
from tests.servers import REMOTE_MIRROR, TRUSTING, fake_rsh, mirror_server
from tests.snapshot import assert_mirrors, snapshot
from tests.test_scan_hardcases import make_hard_tree


@pytest.fixture
def hard_src(tmp_path):
    root = os.path.join(os.fsencode(tmp_path), b"src")
    make_hard_tree(root)
    # Something big enough to go as a delta next time.
    with open(os.path.join(root, b"big.bin"), "wb") as f:
        f.write(os.urandom(3 << 20))
    return root


def _modify(root: bytes) -> None:
    with open(os.path.join(root, b"big.bin"), "r+b") as f:
        f.seek(1 << 20)
        f.write(b"a small edit in the middle")
    with open(os.path.join(root, b"new\nline"), "ab") as f:
        f.write(b"more")
    os.unlink(os.path.join(root, b"with space"))
    os.chmod(os.path.join(root, b"-rf"), 0o600)
    os.unlink(os.path.join(root, b"dangling"))
    os.symlink(b"elsewhere", os.path.join(root, b"dangling"))
    os.mkdir(os.path.join(root, b"fresh dir"))
    with open(os.path.join(root, b"fresh dir", b"\xfe"), "wb") as f:
        f.write(b"new file in a new dir")


def test_local_sync_mirrors_hard_cases_exactly(hard_src, tmp_path):
    dst = os.path.join(os.fsencode(tmp_path), b"dst")
    result = sync(hard_src, dst)
    assert result.ok, (result.failed, result.problems)
    assert_mirrors(hard_src, dst)
    _modify(hard_src)
    result = sync(hard_src, dst, delete=True)
    assert result.ok, (result.failed, result.problems)
    assert_mirrors(hard_src, dst)
    again = sync(hard_src, dst, delete=True)
    assert again.ok and again.changes == [] and again.stats.files_sent == 0


def test_local_mode_copies_whole_files(hard_src, tmp_path):
    # As rsync does between two local trees: a delta would only read the replica's copy twice.
    # (Deltas are tested against a real server: test_sync_through_real_server.)
    dst = tmp_path / "dst"
    assert sync(hard_src, dst).ok
    _modify(hard_src)
    proc = run_mirror("sync", "--delete", "--json", hard_src, dst)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)["stats"]
    assert stats["files_delta"] == 0 and stats["matched_bytes"] == 0
    assert stats["literal_bytes"] >= 3 << 20  # big.bin, whole
    assert_mirrors(hard_src, dst)
    with open(os.path.join(hard_src, b"big.bin"), "r+b") as f:
        f.write(b"another edit")
    stats = sync(hard_src, dst, delta_threshold=1024).stats  # a receiver's option: no delta here
    assert stats.files_delta == 0 and stats.literal_bytes >= 3 << 20
    assert_mirrors(hard_src, dst)


def test_a_local_sync_of_big_files_linked_and_replaced(tmp_path):
    # Files larger than a copy chunk, a hard link to one and a symlink, then half of them
    # rewritten and the others' small neighbours deleted.
    from mirror.localsync import COPY_CHUNK

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    chunk = COPY_CHUNK + 4096
    count = 6
    for i in range(count):
        (src / f"big{i:02d}").write_bytes(os.urandom(chunk))
        (src / f"small{i:02d}").write_bytes(b"%d" % i)
    os.link(src / "big00", src / "zz-linked")
    os.symlink("big01", src / "zz-symlink")
    result = sync(src, dst)
    assert result.ok and result.stats.files_sent == 2 * count
    assert_mirrors(src, dst)
    for i in range(0, count, 2):
        (src / f"big{i:02d}").write_bytes(os.urandom(chunk))
        (src / f"small{i:02d}").unlink()
    result = sync(src, dst, delete=True)
    assert result.ok
    assert_mirrors(src, dst)


def test_sync_through_real_server(hard_src, tmp_path):
    dst = tmp_path / "replica"
    dst.mkdir()
    with mirror_server(tmp_path, {"m": str(dst)}, *TRUSTING) as server:
        proc = run_mirror("sync", hard_src, server.url("m"), "--secret-file", server.secret_file, "--stats")
        assert proc.returncode == 0, proc.stderr
        assert_mirrors(hard_src, dst)
        _modify(hard_src)
        proc = run_mirror("sync", "--delete", "--json", hard_src, server.url("m"), "--secret-file", server.secret_file)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["stats"]["files_delta"] == 1 and out["stats"]["wire_sent"] < 300_000
        assert len(out["changes"]) >= out["stats"]["files_sent"] > 0  # --json keeps every change
        assert_mirrors(hard_src, dst)


def test_sync_into_subpath_of_module(hard_src, tmp_path):
    dst = tmp_path / "replica"
    dst.mkdir()
    with mirror_server(tmp_path, {"m": str(dst)}, *TRUSTING) as server:
        proc = run_mirror("sync", hard_src, server.url("m") + "/a/b", "--secret-file", server.secret_file)
        assert proc.returncode == 0, proc.stderr
    assert_mirrors(hard_src, dst / "a" / "b")


def test_sync_over_remote_shell(hard_src, tmp_path):
    dst = tmp_path / "over-ssh"
    proc = run_mirror("sync", "--rsh", fake_rsh(tmp_path), "--remote-command", REMOTE_MIRROR, hard_src,
                      *[f"--remote-option={o}" for o in TRUSTING], f"somehost:{dst}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_mirrors(hard_src, dst)


def test_wrong_secret_is_refused_and_nothing_written(hard_src, tmp_path):
    dst = tmp_path / "replica"
    dst.mkdir()
    bad = tmp_path / "bad-secret"
    bad.write_text("not-the-shared-secret\n")
    bad.chmod(0o600)
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        proc = run_mirror("sync", hard_src, server.url("m"), "--secret-file", str(bad))
        assert proc.returncode == 5 and b"authentication failed" in proc.stderr
        proc = run_mirror("sync", hard_src, server.url("m"))
        assert proc.returncode == 5 and b"requires a shared secret" in proc.stderr
        assert server.alive
    assert os.listdir(dst) == []


def test_a_refused_remote_sync_leaves_no_scan_running(hard_src, tmp_path):
    # sync() starts the source's scan before it connects: a connection that cannot be made,
    # or a receiver that refuses us, must stop it.
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(MirrorError, match="cannot connect"):
        sync(hard_src, f"mirror://127.0.0.1:{port}/m")
    assert not [t for t in threading.enumerate() if t.name == "treescan"]
    dst = tmp_path / "replica"
    dst.mkdir()
    with mirror_server(tmp_path, {"m": str(dst)}, *TRUSTING) as server:
        with pytest.raises(AuthError, match="authentication failed"):
            sync(hard_src, server.url("m"), secret=b"not-the-secret")
        assert not [t for t in threading.enumerate() if t.name == "treescan"]
        assert sync(hard_src, server.url("m"), secret_file=server.secret_file).ok
    assert_mirrors(hard_src, dst)



def _corrupt_epoch(root: bytes) -> None:
    os.makedirs(os.path.join(root, b".mirror"), exist_ok=True)
    with open(os.path.join(root, b".mirror", b"epoch"), "w") as f:
        f.write("not a number")


def test_a_remote_sync_that_fails_before_its_session_stops_the_scan(hard_src, tmp_path, monkeypatch):
    # The source's scan starts before the connection: a sync that ends before its session
    # takes the scan (here: the source's epoch cannot be read) must stop it.  A queue of one
    # listing keeps an unconsumed scan's thread waiting.
    import mirror.treescan as treescan

    monkeypatch.setattr(treescan, "_QUEUE_BATCHES", 1)
    monkeypatch.setattr(treescan, "_BATCH_ENTRIES", 1)
    _corrupt_epoch(hard_src)
    dst = tmp_path / "replica"
    dst.mkdir()
    with mirror_server(tmp_path, {"m": str(dst)}, *TRUSTING) as server:
        with pytest.raises(MirrorError, match="corrupt epoch file"):
            sync(hard_src, server.url("m"), secret_file=server.secret_file, excludes=[b"nothing-matches"])
        assert not [t for t in threading.enumerate() if t.name == "treescan"]


def test_local_sync_that_fails_after_taking_the_replica_lets_it_go(hard_src, tmp_path, monkeypatch):
    import mirror.treescan as treescan

    monkeypatch.setattr(treescan, "_QUEUE_BATCHES", 1)
    monkeypatch.setattr(treescan, "_BATCH_ENTRIES", 1)
    _corrupt_epoch(hard_src)
    dst = os.path.join(os.fsencode(tmp_path), b"dst")
    with pytest.raises(MirrorError, match="corrupt epoch file"):
        sync(hard_src, dst, excludes=[b"nothing-matches"])
    assert not [t for t in threading.enumerate() if t.name == "treescan"]
    WriterLock.take(os.path.join(dst, b".mirror"), dst, "the next sync", "the replica").release()


def test_a_remote_shell_whose_command_fails_leaves_no_scan_or_child(hard_src, tmp_path, monkeypatch):
    import mirror.treescan as treescan

    monkeypatch.setattr(treescan, "_QUEUE_BATCHES", 1)
    monkeypatch.setattr(treescan, "_BATCH_ENTRIES", 1)
    for rsh in ("false", str(tmp_path / "no-such-shell")):
        with pytest.raises((MirrorError, OSError)):
            sync(hard_src, f"somehost:{tmp_path / 'dst'}", rsh=rsh, excludes=[b"nothing-matches"])
        assert not [t for t in threading.enumerate() if t.name == "treescan"]
        assert not _children_of_this_process()


def _children_of_this_process() -> list[int]:
    pid = os.getpid()
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_dry_run_lists_changes_and_writes_nothing(hard_src, tmp_path):
    dst = tmp_path / "replica"
    sync(hard_src, dst)
    _modify(hard_src)
    before = snapshot(dst)
    proc = run_mirror("sync", "-n", "--delete", hard_src, str(dst))
    assert proc.returncode == 0, proc.stderr
    assert snapshot(dst) == before
    diff = run_mirror("diff", hard_src, str(dst))
    # The same itemized lines as `mirror diff` (the root's own times aside).
    assert sorted(proc.stdout.splitlines()) == sorted(x for x in diff.stdout.splitlines() if not x.endswith(b" ./"))


def test_symlink_in_replica_is_replaced_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("do not touch")
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "victim").write_text("payload")
    (src / "file").write_text("payload")
    dst.mkdir()
    os.symlink(outside, dst / "dir")  # a directory in the replica is a symlink out of the tree
    os.symlink(outside / "victim", dst / "file")  # and a file is a symlink to a file outside
    result = sync(src, dst)
    assert result.ok, result.failed
    assert (outside / "victim").read_text() == "do not touch"
    assert not os.path.islink(dst / "dir") and not os.path.islink(dst / "file")
    assert_mirrors(src, dst)


def test_delete_never_reaches_outside(tmp_path):
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "precious").write_text("x")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    os.symlink(outside / "keep", dst / "link-to-outside")
    (dst / "stale").mkdir()
    os.symlink(outside, dst / "stale" / "escape")
    result = sync(src, dst, delete=True, allow_mass_delete=True)  # the source is empty: meant here
    assert result.ok
    assert (outside / "keep" / "precious").read_text() == "x"
    assert os.listdir(dst) == [b".mirror"] or os.listdir(dst) == [".mirror"] or os.listdir(dst) == []


def test_excluded_files_are_neither_sent_nor_deleted(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a.log").write_text("log")
    (src / "keep").write_text("k")
    dst.mkdir()
    (dst / "local.log").write_text("replica's own")
    result = sync(src, dst, delete=True, excludes=[b"*.log"])
    assert result.ok
    assert sorted(os.listdir(dst)) == [".mirror", "keep", "local.log"]


def test_mirroring_lock_stops_sender_and_receiver(hard_src, tmp_path):
    dst = tmp_path / "replica"
    lock = tmp_path / "mirror.lock"
    acquire(os.fsencode(lock), reason="failover in progress")
    with pytest.raises(LockedError, match="failover in progress"):
        sync(hard_src, dst, lock_file=lock)
    proc = run_mirror("sync", hard_src, str(dst), "--lock-file", str(lock))
    assert proc.returncode == 3
    with pytest.raises(LockedError):
        sync(hard_src, dst, dst_lock_file=lock)
    assert not os.path.exists(dst) or os.listdir(dst) in ([], [".mirror"])


def test_stale_epoch_is_fenced(hard_src, tmp_path):
    dst = tmp_path / "replica"
    sync(hard_src, dst)
    bump_epoch(os.path.join(dst, ".mirror"))  # the replica's side took over since
    _modify(hard_src)
    before = snapshot(dst)
    with pytest.raises(StaleEpochError):
        sync(hard_src, dst, delete=True)
    # Its scans were started before the refusal (local mode starts them first): none is left running.
    assert not [t for t in threading.enumerate() if t.name == "treescan"]
    proc = run_mirror("sync", hard_src, str(dst))
    assert proc.returncode == 4 and b"older" in proc.stderr
    assert snapshot(dst) == before
    bump_epoch(os.path.join(hard_src, b".mirror"))
    bump_epoch(os.path.join(hard_src, b".mirror"))
    assert sync(hard_src, dst, delete=True).ok  # a newer epoch is accepted and recorded


def test_a_server_whose_replica_state_dir_is_removed_still_fences_the_epoch_it_has_seen(tmp_path):
    """The replica's state dir removed while `mirror serve` runs (a clean-up script): its
    epoch file goes with it, and the next sender would be measured against epoch 0.  The
    server remembers the highest epoch each module has shown: a former primary at an older
    epoch is still refused (nothing written), and the epoch is written back."""
    from mirror.epoch import read_epoch

    new, old, dst = tmp_path / "new", tmp_path / "old", tmp_path / "dst"
    for d in (new, old, dst):
        d.mkdir()
    (new / "f").write_text("the newest data")
    (old / "f").write_text("a former primary's older data")
    bump_epoch(os.fsencode(new / ".mirror"), to=3)
    bump_epoch(os.fsencode(old / ".mirror"), to=2)
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        secret = ["--secret-file", server.secret_file]
        assert run_mirror("sync", str(new), server.url("m"), *secret).returncode == 0
        shutil.rmtree(dst / ".mirror")
        proc = run_mirror("sync", str(old), server.url("m"), *secret)
        assert proc.returncode == 4 and b"older than this replica's 3" in proc.stderr, proc.stderr
        assert (dst / "f").read_text() == "the newest data"
        assert read_epoch(os.fsencode(dst / ".mirror")) == 3
        (new / "f").write_text("newer still")
        assert run_mirror("sync", str(new), server.url("m"), *secret).returncode == 0
        assert (dst / "f").read_text() == "newer still"
    assert "written back" in (tmp_path / "server.log").read_text()


def test_a_server_whose_replica_state_dir_is_removed_still_knows_the_tree_it_mirrors(tmp_path):
    """The same clean-up takes the replica's record of the tree it mirrors: the next
    deleting sender of another tree (a source whose mount did not come up, another
    primary's tree) would be let in, and would delete what it does not have.  The server
    remembers the tree each module mirrors: it is still refused, and the record written
    back.  A replica directory made anew is a new replica."""
    from mirror.guard import load

    mine, another, dst = tmp_path / "mine", tmp_path / "another", tmp_path / "dst"
    for d in (mine, another, dst):
        d.mkdir()
    for i in range(5):
        (mine / f"f{i}").write_text("the tree this replica mirrors")
    (another / "g").write_text("another tree")
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        secret = ["--secret-file", server.secret_file]
        assert run_mirror("sync", "--delete", str(mine), server.url("m"), *secret).returncode == 0
        recorded = load(os.fsencode(dst / ".mirror")).tree_id
        shutil.rmtree(dst / ".mirror")
        proc = run_mirror("sync", "--delete", str(another), server.url("m"), *secret, check_codes=(EXIT_GUARD,))
        assert proc.returncode == EXIT_GUARD and b"this replica mirrors tree" in proc.stderr, proc.stderr
        assert sorted(os.listdir(dst)) == [".mirror"] + [f"f{i}" for i in range(5)]
        assert load(os.fsencode(dst / ".mirror")).tree_id == recorded
        (mine / "f0").write_text("newer")
        assert run_mirror("sync", "--delete", str(mine), server.url("m"), *secret).returncode == 0
        assert (dst / "f0").read_text() == "newer"
        shutil.rmtree(dst)  # the replica made anew, for another tree: nothing to guard
        dst.mkdir()
        assert run_mirror("sync", "--delete", str(another), server.url("m"), *secret).returncode == 0
        assert load(os.fsencode(dst / ".mirror")).tree_id != recorded
    assert "written back" in (tmp_path / "server.log").read_text()


def test_one_writer_per_module(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(200_000))
    dst.mkdir()
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        slow = subprocess.Popen(
            [*MIRROR, "sync", str(src), server.url("m"), "--secret-file", server.secret_file, "--bwlimit", "400K"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            # Wait until the slow writer is writing (its first temporary file exists).
            wait_until(lambda: os.path.isdir(dst / ".mirror" / "tmp") and os.listdir(dst / ".mirror" / "tmp"))
            assert slow.poll() is None
            proc = run_mirror("sync", str(src), server.url("m"), "--secret-file", server.secret_file)
            assert proc.returncode == 2 and b"is busy: another sync is writing to it" in proc.stderr, proc
        finally:
            slow.kill()  # mid-transfer
            slow.wait()
        # The killed writer left no temporary file, and the next sync completes.
        proc = run_mirror("sync", str(src), server.url("m"), "--secret-file", server.secret_file)
        assert proc.returncode == 0, proc.stderr
    assert_mirrors(src, dst)
    assert os.listdir(dst / ".mirror" / "tmp") == []


def test_local_sync_refuses_and_writes_nothing_while_another_writer_holds_the_replica(hard_src, tmp_path):
    dst = os.path.join(os.fsencode(tmp_path), b"dst")
    os.mkdir(dst)
    other = WriterLock.take(os.path.join(dst, b".mirror"), dst, "another sync", "the replica")
    try:
        before = snapshot(dst)
        with pytest.raises(MirrorError, match="is busy: another sync is writing to it"):
            sync(hard_src, dst, delete=True)
        assert snapshot(dst) == before
        assert not [t for t in threading.enumerate() if t.name == "treescan"]
    finally:
        other.release()
    assert sync(hard_src, dst, delete=True).ok
    assert_mirrors(hard_src, dst)


@pytest.mark.skipif(not is_root(), reason="needs root to mount a small tmpfs")
def test_full_disk_is_reported_with_path_and_leaves_no_temp(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "small"
    src.mkdir()
    dst.mkdir()
    (src / "fits").write_bytes(b"x" * 1000)
    (src / "too-big").write_bytes(os.urandom(3 << 20))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(dst)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        proc = run_mirror("sync", str(src), str(dst))
        assert proc.returncode == 1
        assert b"too-big" in proc.stderr and b"ENOSPC" in proc.stderr
        assert (dst / "fits").read_bytes() == b"x" * 1000
        assert not (dst / "too-big").exists()
        assert os.listdir(dst / ".mirror" / "tmp") == []
    finally:
        subprocess.run(["umount", str(dst)], check=True)


def test_a_sync_that_changes_more_directories_than_the_descriptor_limit(tmp_path):
    # `ulimit -n 1024` is a common default (and cannot be raised past its hard limit here).
    # The receiver keeps a descriptor of each directory it changed, for that directory's
    # fsync: it must not keep them all at once, nor skip a directory it could not hold.
    src, dst = tmp_path / "src", tmp_path / "dst"
    for i in range(1500):
        (src / f"d{i:04d}").mkdir(parents=True)
        (src / f"d{i:04d}" / "f").write_bytes(b"%d" % i)
    limited = ["prlimit", "--nofile=1024:1024", "--"]
    proc = run_mirror("sync", src, dst, prefix=limited)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_mirrors(src, dst)
    for i in range(1500):  # every directory changes again: new files, deletions, new times
        (src / f"d{i:04d}" / "f").unlink()
        (src / f"d{i:04d}" / "g").write_bytes(b"g%d" % i)
    proc = run_mirror("sync", "--delete", src, dst, prefix=limited)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_mirrors(src, dst)


_TRACED = "fsync,syncfs,renameat,renameat2,unlinkat,utimensat,mkdirat"
_FIRST_FD = re.compile(rb'^(\w+)\(\d+<([^>]*)>(?:, (NULL|"[^"]*"))?')
_RENAME_TARGET = re.compile(rb'^renameat2?\(\d+<[^>]*>, "[^"]*", \d+<([^>]*)>')


def _directory_changes_and_fsyncs(log: bytes):
    """From ``strace -f -y`` output: [(line, "change"|"fsync"|"syncfs", path)] in the order
    the calls were made (a change counts when it returned, an fsync or syncfs when it started)."""
    events, started = [], {}
    for i, line in enumerate(log.splitlines()):
        pid, _, call = line.partition(b" ")
        call = call.strip()
        if call.startswith(b"<... "):
            call = started.pop(pid)  # a change that returned counts from here, an fsync did
            if call.startswith((b"fsync(", b"syncfs(")):
                continue
        elif call.endswith(b"<unfinished ...>"):
            started[pid] = call
            if not call.startswith((b"fsync(", b"syncfs(")):
                continue
        m = _FIRST_FD.match(call)
        if m is None:
            continue
        name, fd_path, arg = m.groups()
        if name in (b"fsync", b"syncfs"):
            events.append((i, name.decode(), fd_path))
        elif name in (b"renameat", b"renameat2"):
            events.append((i, "change", _RENAME_TARGET.match(call).group(1)))
        elif name == b"utimensat" and arg == b"NULL":
            events.append((i, "change", fd_path))  # the directory's own times
        elif name in (b"unlinkat", b"mkdirat", b"utimensat"):
            events.append((i, "change", fd_path))
    return events


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (CI installs it)")
@pytest.mark.parametrize("count", [SYNCFS_FROM // 2, 200])
def test_each_changed_directory_is_made_durable_after_its_last_change(tmp_path, count):
    # Invariant 1 ends with "fsync the directory": after the rename, and after anything else
    # the session changes in it (deletions, its restored times), or that change may not
    # survive a crash.  A few directories are fsynced, each once; many (200: more than the
    # receiver holds descriptors for at a time) by a syncfs of their file system, or by an
    # fsync each while the machine has much else to write (mirror.safefs.fsync_all).
    src, dst = tmp_path / "src", tmp_path / "dst"
    for i in range(count):
        (src / f"d{i:03d}").mkdir(parents=True)
        (src / f"d{i:03d}" / "f").write_bytes(b"old")
        (src / f"d{i:03d}" / "g").write_bytes(b"gone soon")
    assert run_mirror("sync", src, dst).returncode == 0
    for i in range(count):
        (src / f"d{i:03d}" / "f").write_bytes(b"new content %d" % i)
        if i % 2:
            (src / f"d{i:03d}" / "g").unlink()
    log = tmp_path / "strace.log"
    traced = ["strace", "-f", "-qq", "-y", "-s", "256", "-o", str(log), "-e", f"trace={_TRACED}"]
    proc = run_mirror("sync", "--delete", src, dst, prefix=traced)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_mirrors(src, dst)
    events = _directory_changes_and_fsyncs(log.read_bytes())
    directories = {os.fsencode(dst / f"d{i:03d}") for i in range(count)}
    last_change, fsyncs = {}, {}
    syncfs = [line for line, what, _ in events if what == "syncfs"]
    for line, what, path in events:
        if path in directories:
            if what == "change":
                last_change[path] = line
            elif what == "fsync":
                fsyncs.setdefault(path, []).append(line)
    assert set(last_change) == directories  # every one changed: a new f, its times, half lost g
    for path in directories:
        assert len(fsyncs.get(path, [])) <= 1, (path, fsyncs.get(path))  # never twice
        after = [line for line in fsyncs.get(path, []) + syncfs if line > last_change[path]]
        assert after, path
    if count < SYNCFS_FROM:
        assert not syncfs  # a few directories: their own fsyncs, never the whole file system's


_MKDIR = re.compile(rb'^mkdir(?:at)?\((?:AT_FDCWD(?:<[^>]*>)?, |\d+<([^>]*)>, )?"([^"]*)", \d+\) = 0')
_FSYNC = re.compile(rb"^fsync\(\d+<([^>]*)>")


def _assert_made_durably(log, directories) -> None:
    """From ``strace -f -y`` output: each of ``directories`` was made, and its parent fsynced after."""
    made, fsynced = {}, {}
    for i, line in enumerate(log.read_bytes().splitlines()):
        call = line.partition(b" ")[2].strip()
        if m := _MKDIR.match(call):
            made[os.path.join(m.group(1) or b"", m.group(2))] = i
        elif m := _FSYNC.match(call):
            fsynced.setdefault(m.group(1), []).append(i)
    for path in map(os.fsencode, directories):
        assert path in made, (path, made)
        parent = os.path.dirname(path)
        assert any(i > made[path] for i in fsynced.get(parent, [])), (path, fsynced.get(parent))


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (CI installs it)")
def test_each_directory_a_sync_makes_is_durable_in_its_parent(tmp_path):
    # A crash must not take away a directory a sync has since written into: the replica
    # made by --mkpath (with the parents it makes) and its state dir are each fsynced in
    # their parent after they are made.
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"content")
    dst = tmp_path / "new" / "deeper" / "replica"
    log = tmp_path / "strace.log"
    traced = ["strace", "-f", "-qq", "-y", "-s", "512", "-o", str(log), "-e", "trace=mkdir,mkdirat,fsync"]
    proc = run_mirror("sync", "--mkpath", src, dst, prefix=traced)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_mirrors(src, dst)
    _assert_made_durably(log, [tmp_path / "new", dst.parent, dst, dst / ".mirror"])


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (CI installs it)")
def test_each_directory_a_subpath_session_makes_is_durable_in_its_parent(tmp_path):
    # The same for the directories a receiver makes for a mirror://HOST/MODULE/SUBPATH.
    src, module = tmp_path / "src", tmp_path / "module"
    src.mkdir()
    module.mkdir()
    (src / "f").write_bytes(b"content")
    log = tmp_path / "strace.log"
    with mirror_server(tmp_path, {"m": str(module)}) as server:
        # Attached to the running server (strace as its prefix would outlive it, detached).
        threads = os.listdir(f"/proc/{server.proc.pid}/task")
        tracer = subprocess.Popen(["strace", "-f", "-y", "-s", "512", "-o", str(log), "-e", "trace=mkdir,mkdirat,fsync",
                                   *(f"-p{tid}" for tid in threads)], stderr=subprocess.PIPE)  # fmt: skip
        try:
            for _ in threads:
                assert b"attached" in tracer.stderr.readline()
            proc = run_mirror("sync", src, server.url("m") + "/a/b", "--secret-file", server.secret_file)
        finally:
            tracer.send_signal(signal.SIGINT)  # detaches
            tracer.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_mirrors(src, module / "a" / "b")
    _assert_made_durably(log, [module / "a", module / "a" / "b"])


def test_parse_destination():
    assert parse_destination("mirror://h:99/mod/a/b").subpath == b"a/b"
    assert parse_destination("mirror://h/mod").port == 8730
    assert parse_destination("host:/srv").kind == "rsh"
    assert parse_destination("./local:dir").kind == "local"
    assert parse_destination("/abs/path").kind == "local"


def test_library_api(tmp_path):
    import mirror
    import mirror.transfer  # noqa: F401  (a submodule import must not shadow the function)

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_text("x")
    result = mirror.sync(src, dst, delete=True)
    assert isinstance(result, mirror.SyncResult) and result.exit_code == 0
    assert [c.path for c in result.changes] == [b"f"]
    assert issubclass(mirror.LockedError, mirror.MirrorError)


def test_a_sync_can_leave_its_changes_out_of_the_result(hard_src, tmp_path):
    # A first sync of a big tree changes every entry: the daemon and the CLI (without
    # --json) do not keep them all; on_change still sees each one.
    seen = []
    result = sync(hard_src, tmp_path / "dst", keep_changes=False, on_change=seen.append)
    assert result.ok and result.changes == []
    assert result.stats.files_sent > 0 and len(seen) >= result.stats.files_sent
    assert_mirrors(hard_src, tmp_path / "dst")
    kept = sync(hard_src, tmp_path / "dst2")
    assert sorted(c.path for c in kept.changes) == sorted(c.path for c in seen)


def test_progress_and_stats_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    proc = run_mirror("sync", "--progress", "--stats", str(src), str(tmp_path / "dst"))
    assert proc.returncode == 0, proc.stderr
    assert b"files: 1 seen, 1 sent" in proc.stdout and b"speedup" in proc.stdout


@pytest.mark.skipif(not is_root(), reason="needs root to drop DAC capabilities for one command")
def test_local_sync_reports_each_unreadable_directory_once_naming_its_side(tmp_path):
    from tests.helpers import WITHOUT_DAC

    src, dst = tmp_path / "src", tmp_path / "dst"
    for root in (src, dst):
        (root / "secret").mkdir(parents=True)
        (root / "secret" / "f").write_text("x")
    (src / "open").write_text("y")
    st = os.stat(src / "secret")
    os.utime(dst / "secret", ns=(st.st_atime_ns, st.st_mtime_ns))  # nothing to change on it
    try:
        for root in (src, dst):
            os.chmod(root / "secret", 0)
        proc = run_mirror("sync", "--delete", str(src), str(dst), prefix=WITHOUT_DAC)
        warnings = [line for line in proc.stderr.decode().splitlines() if "secret" in line]
        assert proc.returncode == 1, proc
        assert warnings == [
            "mirror sync: warning: secret: cannot open directory: Permission denied",
            "mirror sync: warning: secret: on the receiver: cannot open directory: Permission denied",
        ]
        assert (dst / "open").read_text() == "y"  # the rest is mirrored
    finally:
        for root in (src, dst):
            os.chmod(root / "secret", 0o755)
