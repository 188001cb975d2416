"""A full disk wherever a sync writes: the replica's data and state, locally and to a receiver,
and the source's state dir.

Small real file systems (tmpfs with ``size=``/``nr_inodes=``, an ext4 image on a loop device:
they run out differently) are filled to the last few KB or inodes before a sync.  Whatever
fails, the claims are the same:

- nothing half-written is ever visible at a final name (a reader thread polls the replica
  throughout the sync);
- the error names the file (or the state file) and the exit code is the documented one
  (README: 1 partial, 2 error);
- no temporary file is left in the replica's ``.mirror/tmp`` (nor a state file's temp);
- what the replica had stays intact, its state stays readable, and once space is freed the
  next sync is accepted and converges.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from mirror.applied import read_applied
from mirror.daemon import load_status
from mirror.epoch import read_epoch
from mirror.guard import load as load_identity
from mirror.journal import _scan as scan_journal
from tests.daemons import converged, live_daemon
from tests.helpers import run_mirror, wait_until
from tests.replica_checks import MODES, Target, Watcher, assert_state_whole, digests, no_traceback
from tests.servers import mirror_server
from tests.snapshot import assert_mirrors

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting small file systems needs root")


# -- small file systems ------------------------------------------------------------------------


@contextmanager
def small_fs(where: Path, kind: str, *, size_kb: int, inodes: int | None = None):
    """A fresh file system of ``kind`` ("tmpfs" or "ext4") mounted at ``where``; unmounted
    (and its loop device freed) however the block ends."""
    where.mkdir()
    if kind == "tmpfs":
        opts = f"size={size_kb}k" + (f",nr_inodes={inodes}" if inodes else "")
        cmd = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)]
    else:
        image = where.parent / (where.name + ".img")
        with open(image, "wb") as f:
            f.truncate(size_kb << 10)
        mkfs = ["mkfs.ext4", "-q", "-F", "-b", "1024", "-m", "0", "-E", "nodiscard,lazy_itable_init=0"]
        if inodes:
            mkfs += ["-N", str(inodes)]
        if shutil.which("mkfs.ext4") is None or subprocess.run([*mkfs, str(image)], capture_output=True).returncode:
            pytest.skip("cannot make an ext4 image here (mkfs.ext4)")
        cmd = ["mount", "-o", "loop", str(image), str(where)]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount {kind} here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["sync", "-f", str(where)], capture_output=True)
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def fill(mount: Path, leave: int = 0) -> Path:
    """Fill ``mount``'s space with one file, then give back about ``leave`` bytes; the file
    (outside the tree under test) is removed to free the space again."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 64 << 10, 4 << 10, 1 << 10):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    os.truncate(filler, max(0, size - leave))
    os.sync()
    return filler


def fill_inodes(mount: Path, leave: int = 0) -> Path:
    """Use up ``mount``'s inodes with empty files, but ``leave``."""
    filler = mount / "inode-filler"
    filler.mkdir()
    made = []
    for i in range(1 << 20):
        try:
            fd = os.open(filler / str(i), os.O_CREAT | os.O_WRONLY, 0o600)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            break
        os.close(fd)
        made.append(i)
    for i in made[len(made) - leave:] if leave else ():
        os.unlink(filler / str(i))
    return filler


def free(filler: Path) -> None:
    if filler.is_dir():
        shutil.rmtree(filler)
    else:
        filler.unlink()


def small_files(root: Path, count: int, size: int, dirs: int = 8, tag: bytes = b"") -> None:
    for i in range(count):
        d = root / f"d{i % dirs}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes((tag + b"%08d" % i) * (size // 8))


@contextmanager
def replica_on_small_fs(tmp_path: Path, mode: str, kind: str, **fs_options):
    """A replica on a small file system of ``kind`` and a ``Target`` of ``mode`` writing to it,
    running: ``(fs, replica, target)``."""
    with small_fs(tmp_path / "fs", kind, **fs_options) as fs:
        replica = fs / "replica"
        replica.mkdir()
        target = Target(mode, replica, tmp_path)
        with target.running():
            yield fs, replica, target




# -- 1. space runs out in the middle of many small files ------------------------------------------


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
@pytest.mark.parametrize("mode", MODES)
def test_space_running_out_among_many_small_files_fails_them_by_name_and_the_next_sync_converges(
    tmp_path, kind, mode
):
    src = tmp_path / "src"
    small_files(src, 60, 2000, tag=b"old")
    with replica_on_small_fs(tmp_path, mode, kind, size_kb=8192) as (fs, replica, target):
        assert target.sync(src).returncode == 0
        old = digests(replica)
        # 600 new files of 6 KB (3.6 MB) and every old one changed, into ~600 KB of room:
        # the batches (256 files) run out of space part of the way through.
        for i in range(60):
            (src / f"d{i % 8}" / f"f{i:05d}").write_bytes(b"new%05d" % i * 500)
        small_files(src / "more", 600, 6000, tag=b"more")
        filler = fill(fs, leave=600 << 10)
        with Watcher(replica, old, digests(src)) as watcher:
            proc = target.sync(src, "--delete")
        no_traceback(proc, target)
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        assert proc.returncode == 1, proc.stderr.decode(errors="replace")[-2000:]
        assert b"ENOSPC" in proc.stderr and b"more/d" in proc.stderr
        assert_state_whole(replica)
        # What the replica had is there, old or new, whole.
        now = digests(replica)
        for path in old:
            assert path in now
        free(filler)
        proc = target.sync(src, "--delete")
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
        assert_mirrors(src, replica)
        assert_state_whole(replica)


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
@pytest.mark.parametrize("mode", MODES)
def test_a_file_that_fits_only_in_part_is_failed_never_committed_short(tmp_path, kind, mode):
    # One page (tmpfs) or two blocks (ext4) left: the receiver's write of a file's data takes
    # a part and returns short.  Its digest, taken of what was sent, matches all the same: the
    # short count itself must fail the file, or a truncated file is committed.
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"old content" * 100)
    with replica_on_small_fs(tmp_path, mode, kind, size_kb=4096) as (fs, replica, target):
        assert target.sync(src).returncode == 0
        old = digests(replica)
        (src / "old").write_bytes(os.urandom(9000))
        (src / "new").write_bytes(os.urandom(9000))
        fill(fs, leave=4096 if kind == "tmpfs" else 2048)
        with Watcher(replica, old, digests(src)) as watcher:
            proc = target.sync(src)
        no_traceback(proc, target)
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        assert proc.returncode == 1, proc.stderr.decode(errors="replace")
        assert b"ENOSPC" in proc.stderr
        now = digests(replica)
        assert now.get(b"old") == old[b"old"]
        assert b"new" not in now, "a truncated file was committed"
        assert_state_whole(replica)


# -- 2. inodes run out while making directories, symlinks and files --------------------------------


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
@pytest.mark.parametrize("mode", MODES)
def test_inodes_running_out_among_directories_symlinks_and_files(tmp_path, mode, kind):
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_bytes(b"kept")
    with replica_on_small_fs(tmp_path, mode, kind, size_kb=8192, inodes=4000) as (fs, replica, target):
        assert target.sync(src).returncode == 0
        old = digests(replica)
        for i in range(120):
            d = src / f"dir{i:03d}"
            d.mkdir()
            (d / "file").write_bytes(b"file %d" % i)
            os.symlink(f"../dir{i:03d}/file", d / "link")
            (d / "sub").mkdir()
        filler = fill_inodes(fs, leave=150)
        with Watcher(replica, old, digests(src)) as watcher:
            proc = target.sync(src)
        no_traceback(proc, target)
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        assert proc.returncode == 1, proc.stderr.decode(errors="replace")[-2000:]
        assert b"ENOSPC" in proc.stderr and b"dir" in proc.stderr
        assert (replica / "keep").read_bytes() == b"kept"
        assert_state_whole(replica)
        free(filler)
        proc = target.sync(src)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
        assert_mirrors(src, replica)


# -- 3. space runs out exactly when the replica's state is written ----------------------------------


def few_files(src: Path, tag: bytes = b"v1") -> None:
    for i in range(12):
        d = src / f"d{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(tag + b" %d " % i * 300)


def state_of(replica: Path) -> bytes:
    return os.fsencode(replica / ".mirror")


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
@pytest.mark.parametrize("mode", MODES)
def test_a_full_disk_when_a_newer_epoch_is_recorded_refuses_the_session_by_name_and_keeps_the_old_epoch(
    tmp_path, mode, kind
):
    src = tmp_path / "src"
    few_files(src)
    size_kb = 1024 if kind == "tmpfs" else 4096
    with replica_on_small_fs(tmp_path, mode, kind, size_kb=size_kb) as (fs, replica, target):
        assert target.sync(src).returncode == 0
        old, old_epoch = digests(replica), read_epoch(state_of(replica))
        assert run_mirror("epoch", "bump", src).returncode == 0  # a takeover: the replica must record it
        few_files(src, b"v2")
        filler = fill(fs)
        with Watcher(replica, old, digests(src)) as watcher:
            proc = target.sync(src, "--delete")
        no_traceback(proc, target)
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        assert proc.returncode == 2, proc.stderr.decode(errors="replace")
        assert b".mirror/epoch: No space left on device" in proc.stderr
        assert b"epoch raised" not in proc.stderr and "epoch raised" not in target.server_log()
        assert read_epoch(state_of(replica)) == old_epoch
        assert digests(replica) == old  # refused before anything was written
        assert_state_whole(replica)
        free(filler)
        proc = target.sync(src, "--delete")
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert read_epoch(state_of(replica)) == old_epoch + 1
        assert_mirrors(src, replica)


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
@pytest.mark.parametrize("mode", MODES)
def test_a_first_sync_to_a_full_disk_names_the_state_it_cannot_write_and_leaves_no_torn_state(tmp_path, mode, kind):
    src = tmp_path / "src"
    few_files(src)
    with small_fs(tmp_path / "fs", kind, size_kb=1024 if kind == "tmpfs" else 4096) as fs:
        replica = fs / "replica"
        replica.mkdir()
        filler = fill(fs)
        target = Target(mode, replica, tmp_path)
        with target.running():
            proc = target.sync(src)
            no_traceback(proc, target)
            assert proc.returncode == 2, proc.stderr.decode(errors="replace")
            # The state dir, its marker, the writer lock, the tree identity: whichever could
            # not be written is named.
            assert b"/replica/.mirror" in proc.stderr and b"No space left on device" in proc.stderr
            assert set(os.listdir(replica)) <= {".mirror"}
            state = replica / ".mirror"
            if state.exists():
                marker = state / "HAMIRROR-STATE"
                assert not marker.exists() or b"hamirror's state" in marker.read_bytes()  # never an empty marker
                assert_state_whole(replica, expect_identity=False)
            free(filler)
            proc = target.sync(src)
            assert proc.returncode == 0, proc.stderr.decode(errors="replace")
            assert_mirrors(src, replica)
            assert b"hamirror's state" in (state / "HAMIRROR-STATE").read_bytes()
            assert_state_whole(replica)


@pytest.mark.parametrize("mode", MODES)
def test_a_digest_cache_that_cannot_be_written_costs_the_cache_not_the_sync(tmp_path, mode):
    src = tmp_path / "src"
    small_files(src, 1500, 16)  # a cache of some tens of KB
    with replica_on_small_fs(tmp_path, mode, "tmpfs", size_kb=16384) as (fs, replica, target):
        assert target.sync(src).returncode == 0
        filler = fill(fs)
        proc = target.sync(src, "--checksum")
        no_traceback(proc, target)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
        if mode == "local":
            assert b"cannot write the digest cache" in proc.stderr and b".manifest" in proc.stderr
        else:
            assert "cannot write the digest cache" in target.server_log()
        assert_state_whole(replica)
        assert not [n for n in os.listdir(replica / ".mirror") if n.endswith(".manifest")]
        assert_mirrors(src, replica)
        free(filler)
        assert target.sync(src, "--checksum").returncode == 0
        assert [n for n in os.listdir(replica / ".mirror") if n.endswith(".manifest")]


# -- 4. the replica's disk is full before the sync starts ------------------------------------------


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
@pytest.mark.parametrize("mode", MODES)
def test_a_sync_that_only_deletes_works_on_a_full_replica(tmp_path, mode, kind):
    src = tmp_path / "src"
    small_files(src, 80, 3000)
    with replica_on_small_fs(tmp_path, mode, kind, size_kb=4096) as (fs, replica, target):
        assert target.sync(src).returncode == 0
        for i in range(0, 80, 2):
            (src / f"d{i % 8}" / f"f{i:05d}").unlink()
        filler = fill(fs)
        with Watcher(replica, digests(replica)) as watcher:
            proc = target.sync(src, "--delete")
        no_traceback(proc, target)
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert_mirrors(src, replica)
        assert_state_whole(replica)
        free(filler)


@pytest.mark.parametrize("mode", MODES)
def test_on_a_full_replica_the_deletions_still_free_space_so_the_next_sync_converges_unaided(tmp_path, mode):
    src = tmp_path / "src"
    small_files(src, 80, 6000)
    with replica_on_small_fs(tmp_path, mode, "tmpfs", size_kb=4096) as (fs, replica, target):
        assert target.sync(src).returncode == 0
        old = digests(replica)
        for i in range(80):
            (src / f"d{i % 8}" / f"f{i:05d}").unlink()
        small_files(src / "new", 40, 6000, tag=b"new")
        fill(fs)  # never freed: the deletions make the room
        with Watcher(replica, old, digests(src)) as watcher:
            proc = target.sync(src, "--delete")
        no_traceback(proc, target)
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        assert proc.returncode == 1, proc.stderr.decode(errors="replace")
        assert b"new/d" in proc.stderr and b"ENOSPC" in proc.stderr
        assert_state_whole(replica)
        proc = target.sync(src, "--delete")
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert_mirrors(src, replica)


# -- 5. the source's state dir is full -------------------------------------------------------------


def assert_source_state_whole(state: Path) -> None:
    """The source's state: no temporary file, the tree identity absent or whole, every journal
    readable to its end (a reader stops at the first torn record: nothing may follow one)."""
    if not state.exists():
        return  # not even the directory could be made
    names = os.listdir(state)
    assert [n for n in names if n.endswith(".tmp")] == []
    load_identity(os.fsencode(state))
    marker = state / "HAMIRROR-STATE"
    assert not marker.exists() or b"hamirror's state" in marker.read_bytes()
    for name in names:
        if name.startswith("journal-"):
            data = (state / name).read_bytes()
            assert scan_journal(data)[3] == len(data), f"{name}: a torn record at {scan_journal(data)[3]} of {len(data)}"


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_a_local_sync_from_a_source_whose_state_dir_is_full_goes_on_and_records_its_identity_later(tmp_path, kind):
    dst = tmp_path / "dst"
    with small_fs(tmp_path / "fs", kind, size_kb=4096) as fs:
        src = fs / "src"
        small_files(src, 300, 100)  # a digest cache of some KB
        filler = fill(fs)
        proc = run_mirror("sync", "--checksum", "--delete", src, dst)
        assert b"Traceback" not in proc.stderr
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert b"cannot record the tree identity" in proc.stderr
        assert_mirrors(src, dst)
        assert_source_state_whole(src / ".mirror")
        assert load_identity(os.fsencode(src / ".mirror")) is None
        free(filler)
        (src / "d0" / "f00000").write_bytes(b"changed")
        proc = run_mirror("sync", "--checksum", "--delete", src, dst)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert_mirrors(src, dst)
        assert load_identity(os.fsencode(src / ".mirror")) is not None
        assert_source_state_whole(src / ".mirror")


def test_a_daemon_whose_state_dir_fills_up_keeps_mirroring_and_never_tears_its_journal(tmp_path):
    # The journal is appended to as changes are seen: on a full disk a write is refused, or
    # (tmpfs, ext4: the rest of a page or block) cut short.  The watcher's thread must not die
    # of it (no change would be seen again), nor a part of a record stay in the file (every
    # later record would be lost to the next reader).
    src, dst = tmp_path / "src", tmp_path / "dst"
    small_files(src, 20, 100)
    with small_fs(tmp_path / "fs", "tmpfs", size_kb=1024) as fs:
        state = fs / "state"
        with live_daemon(src, dst, "--state-dir", state) as daemon:
            converged(src, dst)
            journal = wait_until(lambda: [n for n in os.listdir(state) if n.startswith("journal-")])[0]
            (src / "first").write_bytes(b"first")
            converged(src, dst)
            filler = fill(fs)
            for i in range(100):  # records of ~200 bytes: the journal's last page fills, then none is left
                (src / f"while-full-{i:03d}-{'x' * 160}").write_bytes(b"%d" % i)
            with Watcher(dst, digests(src)):
                converged(src, dst)
            # The status (rewritten every 0.5 s, swapped with a spare) goes on changing on the full disk.
            written = load_status(state).pairs[0]["sessions"]
            (src / "last-while-full").write_bytes(b"x")
            wait_until(lambda: load_status(state).pairs[0]["sessions"] > written)
            free(filler)
            for i in range(10):
                (src / f"after-{i}").write_bytes(b"after %d" % i)
            converged(src, dst)
            assert "Traceback" not in daemon.log_text(), daemon.log_text()[-3000:]
            assert "cannot write it" in daemon.log_text()
            assert "cannot write the status file" not in daemon.log_text()
        assert_source_state_whole(state)
        data = (state / journal).read_bytes()
        assert data, "the journal is written again once there is room"


def test_a_status_file_that_cannot_be_written_is_said_once_per_stretch_of_failures(tmp_path):
    """Its directory refuses the swap (made immutable: a read-only /run would too): the
    failure is named once, not at every retry, and the status is written again once it can."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    small_files(src, 5, 100)
    with small_fs(tmp_path / "fs", "tmpfs", size_kb=1024) as fs:
        status = fs / "status"
        status.mkdir()
        with live_daemon(src, dst, "--status-dir", status) as daemon:
            converged(src, dst)
            subprocess.run(["chattr", "+i", str(status)], check=True)
            try:
                wait_until(lambda: "cannot write the status file" in daemon.log_text())
                before = daemon.log_text().count("cannot write the status file")
                (src / "while-refused").write_bytes(b"x")  # sessions and state changes: more writes
                converged(src, dst)
            finally:
                subprocess.run(["chattr", "-i", str(status)], check=True)
            wait_until(lambda: "the status file is written again" in daemon.log_text())
            log = daemon.log_text()
            assert "cannot write the status file: " + str(status) in log  # named, not a bytes repr
            assert before == 1 and log.count("cannot write the status file") == 1, log[-3000:]


def _journal_through_a_full_disk(fs) -> tuple[bytes, list[bytes]]:
    """A journal on ``fs`` given a record, then a batch while the disk is full (the journal's
    page has room for part of it: the write is refused or cut short), then one more once there
    is room; its path, and the batch's names."""
    from mirror.journal import ENTRY, Journal

    path = os.fsencode(fs / "journal-test")
    batch = [b"while-full-%04d-" % i + b"x" * 100 for i in range(60)]
    journal = Journal(path)
    try:
        journal.append([(ENTRY, b"before", 0)])
        filler = fill(fs)
        journal.append([(ENTRY, name, 0) for name in batch])
        free(filler)
        journal.append([(ENTRY, b"after", 0)])
    finally:
        journal.close()
    return path, batch


def test_a_journal_write_cut_short_by_a_full_disk_hides_no_later_record(tmp_path):
    from mirror.journal import read_pending

    with small_fs(tmp_path / "fs", "tmpfs", size_kb=1024) as fs:
        path, _batch = _journal_through_a_full_disk(fs)
        data = open(path, "rb").read()
        assert scan_journal(data)[3] == len(data), "a torn record was left in the journal"
        pending = read_pending(path)
        assert b"before" in pending.entries and b"after" in pending.entries


def test_journal_records_a_full_disk_refused_are_written_once_there_is_room(tmp_path, monkeypatch):
    # The records a full disk refused stay in memory; the journal must not call itself durable
    # again (a later append that fits, and its fdatasync) until they are in the file too.
    from mirror import journal as journal_module
    from mirror.journal import read_pending

    monkeypatch.setattr(journal_module, "REWRITE_RETRY", 0.0)  # rewritten at the first sync that can
    with small_fs(tmp_path / "fs", "tmpfs", size_kb=1024) as fs:
        path, refused = _journal_through_a_full_disk(fs)
        pending = read_pending(path)
        assert {b"before", b"after", *refused} <= set(pending.entries)


def test_a_receiver_that_cannot_record_what_it_applied_keeps_the_old_record_and_records_again_later(tmp_path):
    src = tmp_path / "src"
    small_files(src, 20, 100)
    with small_fs(tmp_path / "fs", "tmpfs", size_kb=1024) as fs:
        replica = fs / "replica"
        replica.mkdir()
        (tmp_path / "srv").mkdir()
        with mirror_server(tmp_path / "srv", {"m": str(replica)}) as server, \
                live_daemon(src, server.url("m"), "--secret-file", server.secret_file) as daemon:  # fmt: skip
            converged(src, replica)
            first = wait_until(lambda: read_applied(state_of(replica)))
            filler = fill(fs)
            # Only permissions change: the session needs no room but for the applied record's rewrite.
            os.chmod(src / "d0" / "f00000", 0o600)
            converged(src, replica)
            log = tmp_path / "srv" / "server.log"
            wait_until(lambda: "cannot record the applied position" in log.read_text(errors="replace"))
            assert ".mirror/applied: No space left on device" in log.read_text(errors="replace")
            assert read_applied(state_of(replica)) == first
            assert_state_whole(replica)
            free(filler)
            (src / "after").write_bytes(b"after")
            converged(src, replica)
            wait_until(lambda: read_applied(state_of(replica)).seq > first.seq)
            assert "Traceback" not in daemon.log_text() + log.read_text(errors="replace")
