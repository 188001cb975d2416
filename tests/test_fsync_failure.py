"""A failing fsync, fdatasync or syncfs wherever hamirror makes something durable: the files a
sync commits on the replica, the directories their names are in, the live daemon's journal,
the state files (epoch, applied record, tree identity, mirroring lock).

The faults are real failures of a real ``mirror`` process's system calls:

- libfiu (``fiu-run -x``) makes libc's ``fsync`` and ``fdatasync`` fail with a chosen errno,
  from the start or switched on and off while the process runs (``fiu-ctrl``).  It does not
  wrap ``syncfs``, which commits a batch of ``safefs.SYNCFS_FROM`` files or more: the tests
  that mean per-file fsyncs keep their batches smaller.
- strace injects the errors libfiu cannot: a failing ``syncfs``, or the fsync of one
  directory only (``-P PATH``); its log shows each injected call.

Each test shows its fault fired: strace's log counts the injected calls, and libfiu's errno
(which nothing else on these tests' disks returns) is in the output it is checked against.

Whatever fails, the claims are those of a full disk (tests/test_full_disk.py): nothing is
committed as durable that is not, the error names the file, no temporary file is left, the
replica's state says no more than it has, and once the fault is gone the next sync (or the
running daemon) makes the replica equal.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
from contextlib import contextmanager

import pytest

from mirror.applied import read_applied
from mirror.commits import BATCH_FILES
from mirror.daemon import read_status
from mirror.epoch import read_epoch
from mirror.guard import load as load_identity
from mirror.journal import _scan as scan_journal
from mirror.safefs import SYNCFS_FROM
from tests.daemons import converged, live_daemon
from tests.helpers import run_mirror, wait_until
from tests.replica_checks import Watcher, assert_state_whole, digests
from tests.servers import mirror_server
from tests.snapshot import assert_mirrors

FIU_RUN = shutil.which("fiu-run")
needs_fiu = pytest.mark.skipif(FIU_RUN is None or shutil.which("fiu-ctrl") is None,
                               reason="needs libfiu's fiu-run and fiu-ctrl (Debian: fiu-utils; CI installs it)")  # fmt: skip


class Faults:
    """libfiu's failure points in processes started under ``prefix()``: enabled from the start,
    or switched on and off while they run."""

    def __init__(self, tmp_path):
        self.ctrl = str(tmp_path / "fiu-ctrl")  # the control FIFOs' prefix, the pid appended

    def prefix(self, *points: str, code: int = errno.EIO) -> list[str]:
        enable = [arg for point in points for arg in ("-c", f"enable name={point},failinfo={code}")]
        return [FIU_RUN, "-x", "-f", self.ctrl, *enable]

    def enable(self, pid: int, point: str, code: int = errno.EIO) -> None:
        self._ctrl(pid, f"enable name={point},failinfo={code}")

    def disable(self, pid: int, point: str) -> None:
        self._ctrl(pid, f"disable name={point}")

    def _ctrl(self, pid: int, command: str) -> None:
        subprocess.run(["fiu-ctrl", "-f", self.ctrl, "-c", command, str(pid)], check=True, timeout=30)


FSYNC, FDATASYNC = "posix/io/sync/fsync", "posix/io/sync/fdatasync"

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (CI installs it)")


def strace_failing(log, call: str, code: str = "EIO", path=None) -> list[str]:
    """A prefix that runs a command whose ``call`` (fsync, syncfs) fails with ``code``: every
    such call, or (``path``) those on that file or directory only.  The log marks each
    injected failure ``(INJECTED)``."""
    only = ["-P", str(path)] if path is not None else []
    return ["strace", "-f", "--seccomp-bpf", "-qq", "-o", str(log), *only, "-e", f"trace={call}",
            "-e", f"inject={call}:error={code}"]  # fmt: skip


def injected(log) -> int:
    return log.read_bytes().count(b"(INJECTED)")


# -- where the tests write -------------------------------------------------------------------------


@contextmanager
def destination(tmp_path, mode: str, replica, prefix: list[str] | None = None):
    """``(arguments, server)``: what a daemon or a sync is given for ``replica``, the directory
    (local, no server), or a `mirror serve` module of it (remote: its server run under
    ``prefix``) with the options that go with it."""
    if mode == "local":
        yield [str(replica)], None
        return
    (tmp_path / "srv").mkdir(exist_ok=True)
    with mirror_server(tmp_path / "srv", {"m": str(replica)}, prefix=prefix) as server:
        yield [server.url("m"), "--secret-file", server.secret_file], server
        # strace ends with its tracee only: the server is told first (fiu-run execs it: none).
        with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
            traced = [int(child) for child in f.read().split()]
        for child in traced:
            os.kill(child, signal.SIGTERM)
        if traced:
            server.proc.wait(timeout=30)


def server_log(tmp_path) -> str:
    log = tmp_path / "srv" / "server.log"
    return log.read_text(errors="replace") if log.exists() else ""


def write_files(root, contents: dict[str, bytes]) -> None:
    for path, data in contents.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)


def digests_of(contents: dict[str, bytes]) -> dict[bytes, str]:
    return {path.encode(): hashlib.sha256(data).hexdigest() for path, data in contents.items()}


def no_traceback(proc, tmp_path) -> None:
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert "Traceback" not in server_log(tmp_path), server_log(tmp_path)


def applied_seq(replica) -> int | None:
    record = read_applied(os.fsencode(replica / ".mirror"))
    return record.seq if record is not None else None


def sent(proc) -> set[str]:
    """The files a sync's ``-i`` output says it sent."""
    return {line.split(" ", 1)[1] for line in proc.stdout.decode().splitlines() if line.startswith(">f")}


MODES = ["local", "remote"]


# -- the files a sync commits ----------------------------------------------------------------------

OLD = {"d0/a": b"old a" * 100, "d0/b": b"old b", "d1/c": b"old c" * 50, "d1/gone": b"to be deleted"}
# Changed and new files: fewer than SYNCFS_FROM, so each is fsynced by itself (libfiu's fault).
NEW = {"d0/a": b"new a" * 120, "d1/c": b"new c", "d0/new": b"new file" * 10, "d2/new": b"in a new directory"}
assert len(NEW) < SYNCFS_FROM


@needs_fiu
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
@pytest.mark.parametrize("mode", MODES)
def test_files_whose_fsync_fails_are_failed_by_name_never_committed_and_written_again_next_time(tmp_path, mode, code):
    src, replica = tmp_path / "src", tmp_path / "replica"
    write_files(src, OLD)
    replica.mkdir()
    faults = Faults(tmp_path)
    # The server runs under fiu-run from the start, its fault switched on for one sync only.
    with destination(tmp_path, mode, replica, prefix=faults.prefix()) as (target, server):

        def sync(*options, prefix=None):
            return run_mirror("sync", "--delete", *options, src, *target, prefix=prefix)

        assert sync("--journal-seq", "1").returncode == 0
        old = digests(replica)
        write_files(src, NEW)
        os.unlink(src / "d1" / "gone")
        if server is not None:
            faults.enable(server.proc.pid, FSYNC, code)
        with Watcher(replica, old, digests(src)) as watcher:
            proc = sync("--journal-seq", "2", prefix=faults.prefix(FSYNC, code=code) if server is None else None)
        if server is not None:
            faults.disable(server.proc.pid, FSYNC)
        no_traceback(proc, tmp_path)
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 1, err  # partial: the files that failed are named
        name = errno.errorcode[code]
        for path in NEW:
            assert f"failed: {path}: {name}: fsync: {os.strerror(code)}" in err, err
        # None of them at its final name: the old content stays, the new files are not there.
        now = digests(replica)
        assert now[b"d0/a"] == old[b"d0/a"] and now[b"d1/c"] == old[b"d1/c"]
        assert b"d0/new" not in now and not (replica / "d2" / "new").exists()
        # Deletions still run (they need no fsync to be done, only to be durable: their
        # directory is named as one whose fsync failed).
        assert not (replica / "d1" / "gone").exists()
        assert "d1: cannot make the directory durable" in err, err
        assert_state_whole(replica)
        if mode == "remote":
            # A session with failed files records nothing: it did not even try.
            assert applied_seq(replica) == 1
            assert "cannot record the applied position" not in server_log(tmp_path)
        # Without the fault: every file that failed is written again (its temporary file is
        # gone, never fsynced a second time), and the replica is the source's.
        proc = sync("--journal-seq", "3", "-i")
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert set(NEW) <= sent(proc), proc.stdout
        assert_mirrors(src, replica)
        assert_state_whole(replica)
        if mode == "remote":
            assert applied_seq(replica) == 3


# A batch of SYNCFS_FROM files or more is made durable by one syncfs, unless the machine has
# much other data waiting to be written (safefs.fsync_all): pinned to none here, so that the
# test means syncfs whoever else runs on the machine.
_NO_OTHER_DIRTY_DATA = "import mirror.safefs\nmirror.safefs.dirty_bytes = lambda: 0\n"


@needs_strace
@pytest.mark.parametrize("mode", MODES)
def test_batches_whose_syncfs_fails_are_failed_file_by_file_and_written_again_next_time(tmp_path, mode):
    # Three batches: two handed over to the commit thread (one syncfs each, while the next
    # batch is written), the last one at the end of the session; none of them small enough
    # for fsyncs of its own.
    src, replica = tmp_path / "src", tmp_path / "replica"
    write_files(src, {"keep": b"kept"})
    replica.mkdir()
    new = {f"d{i % 3}/f{i:03d}": b"file %d" % i * (i % 50 + 1) for i in range(2 * BATCH_FILES + SYNCFS_FROM + 4)}
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NO_OTHER_DIRTY_DATA)
    log = tmp_path / "strace.log"
    faulty = ["env", f"PYTHONPATH={site}", *strace_failing(log, "syncfs")]
    with destination(tmp_path, mode, replica) as (target, _):
        assert run_mirror("sync", src, *target).returncode == 0
    write_files(src, new)
    old = digests(replica)
    with destination(tmp_path, mode, replica, prefix=faulty if mode == "remote" else None) as (target, _):
        with Watcher(replica, old, digests(src)) as watcher:
            proc = run_mirror("sync", src, *target, prefix=faulty if mode == "local" else None)
    no_traceback(proc, tmp_path)
    assert injected(log) == 3, log.read_text()  # each batch's syncfs, and it failed
    assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, err
    for path in new:  # which file lost data a syncfs does not say: all of them failed
        assert f"failed: {path}: EIO: syncfs: Input/output error" in err, err
    assert digests(replica) == old
    assert_state_whole(replica)
    with destination(tmp_path, mode, replica) as (target, _):
        proc = run_mirror("sync", "-i", src, *target)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert set(new) <= sent(proc)
    assert_mirrors(src, replica)


# -- the directories their names are in --------------------------------------------------------------


@needs_strace
@pytest.mark.parametrize("batches", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_a_directory_whose_fsync_fails_is_named_and_the_session_claims_no_success(tmp_path, mode, batches):
    # Only d1's fsync fails: its new files' data is durable and they are renamed into it,
    # but the renames may not survive a crash.  Three batches: the directories of the first
    # two are fsynced by the commit thread, while the next batch is written.
    src, replica = tmp_path / "src", tmp_path / "replica"
    write_files(src, OLD)
    replica.mkdir()
    log = tmp_path / "strace.log"
    faulty = strace_failing(log, "fsync", path=replica / "d1")
    with destination(tmp_path, mode, replica) as (target, _):
        assert run_mirror("sync", "--journal-seq", "1", src, *target).returncode == 0
    old = digests(replica)
    write_files(src, {"d1/c": b"changed c", "d0/new": b"new in d0"})
    write_files(src, {f"d1/new{i:03d}": b"new %d in d1" % i for i in range(1 if batches == 1 else 2 * BATCH_FILES + 1)})
    with destination(tmp_path, mode, replica, prefix=faulty if mode == "remote" else None) as (target, _):
        with Watcher(replica, old, digests(src)) as watcher:
            proc = run_mirror("sync", "--journal-seq", "2", src, *target, prefix=faulty if mode == "local" else None)
    no_traceback(proc, tmp_path)
    assert injected(log) >= 1, log.read_text()
    assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, err
    assert "failed: d1: cannot make the directory durable: EIO: fsync: Input/output error" in err, err
    # Only d1, once for each of its fsyncs (with three batches, the commit thread's too):
    # the files are whole and in place.
    assert err.count("failed: ") == err.count("failed: d1: ") == injected(log) >= min(batches, 2), err
    assert digests(replica) == digests(src)
    assert_state_whole(replica)
    if mode == "remote":
        assert applied_seq(replica) == 1
        assert "cannot record the applied position" not in server_log(tmp_path)
    with destination(tmp_path, mode, replica) as (target, _):
        proc = run_mirror("sync", "--journal-seq", "3", src, *target)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert_mirrors(src, replica)
    if mode == "remote":
        assert applied_seq(replica) == 3


# -- the live daemon ------------------------------------------------------------------------------------


@needs_fiu
@pytest.mark.parametrize("mode", MODES)
def test_a_daemon_whose_journal_cannot_be_made_durable_keeps_mirroring_says_so_once_and_rewrites_it(tmp_path, mode):
    # The journal's fdatasync is the daemon's only one (a local replica's files are fsynced):
    # it runs in the watcher's thread, right after the pairs are woken, and in the pair's
    # before each checkpoint.  The watcher's thread must not die of it: no change would be
    # seen again (a remote pair, whose replica records what it applied, runs no full sync
    # that would hide it).
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "first").write_bytes(b"first")
    dst.mkdir()
    faults = Faults(tmp_path)
    state = src / ".mirror"
    with destination(tmp_path, mode, dst) as (target, _), live_daemon(src, *target, prefix=faults.prefix()) as daemon:
        converged(src, dst)
        journal = next(state / name for name in os.listdir(state) if name.startswith("journal-"))
        before = os.stat(journal).st_ino
        faults.enable(daemon.proc.pid, FDATASYNC)
        for i in range(10):
            (src / "d" / f"while-failing-{i}").write_bytes(b"%d" % i)
        converged(src, dst, timeout=20)
        (src / "d" / "first").write_bytes(b"changed while failing")
        converged(src, dst, timeout=20)
        faults.disable(daemon.proc.pid, FDATASYNC)
        for i in range(10):
            (src / "d" / f"after-{i}").write_bytes(b"after %d" % i)
        converged(src, dst, timeout=20)
        os.unlink(src / "d" / "while-failing-0")
        (src / "later").write_bytes(b"still seen")
        converged(src, dst, timeout=20)
        log = daemon.log_text()
        assert "Traceback" not in log, log[-3000:]
        assert "Input/output error" in log  # the injected failure, as the kernel gives it
        # Said once; no reconnection, no full sync after the first: mirroring went on as usual.
        assert log.count("cannot make it durable") == 1, log[-3000:]
        assert "disconnected" not in log and log.count("full sync:") == 1, log[-3000:]
        # Written whole again at a change (at most every REWRITE_RETRY seconds), said once.
        more = iter(range(1000))
        wait_until(lambda: (src / f"more-{next(more)}").write_bytes(b"more") and "journaled durably again"
                   in daemon.log_text(), interval=0.1)  # fmt: skip
        converged(src, dst)
        assert daemon.log_text().count("journaled durably again") == 1, daemon.log_text()
        assert os.stat(journal).st_ino != before  # a new file, not the old one fsynced again
    data = journal.read_bytes()
    assert scan_journal(data)[3] == len(data), "a torn record"


@needs_fiu
def test_a_daemon_whose_replica_cannot_fsync_keeps_the_files_pending_and_they_arrive_once_it_can(tmp_path):
    # The live path of the files' fault: the receiver fails the files by name, the pair keeps
    # them journaled and retries them (with backoff), the replica records nothing past them.
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_files(src, OLD)
    dst.mkdir()
    faults = Faults(tmp_path)
    with destination(tmp_path, "remote", dst, prefix=faults.prefix()) as (target, server), \
            live_daemon(src, *target) as daemon:  # fmt: skip
        converged(src, dst)
        recorded = wait_until(lambda: read_applied(os.fsencode(dst / ".mirror")))
        faults.enable(server.proc.pid, FSYNC)
        with Watcher(dst, digests(dst), digests(src) | digests_of(NEW)) as watcher:
            write_files(src, NEW)

            def failed() -> set[str]:
                pairs = read_status(os.fsencode(src / ".mirror"))["pairs"]
                return {path for path, reason in pairs[0]["failed_files"] if "EIO: fsync: Input/output error" in reason}

            wait_until(lambda: failed() & set(NEW))
            assert failed() <= set(NEW) | {"./", "d0", "d1", "d2"}  # the files, and directories
            assert read_applied(os.fsencode(dst / ".mirror")).seq == recorded.seq
            assert not (dst / "d0" / "new").exists() and (dst / "d0" / "a").read_bytes() == OLD["d0/a"]
            faults.disable(server.proc.pid, FSYNC)
            converged(src, dst)
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        wait_until(lambda: read_applied(os.fsencode(dst / ".mirror")).seq > recorded.seq)
        assert "Traceback" not in daemon.log_text() + server_log(tmp_path)


# -- the state files: the epoch, the applied record, the tree identity, the mirroring lock ---------
#
# Each is written atomically: a temporary file fsynced, renamed over the old one (the lock:
# linked to its name), the directory fsynced.  Either fsync failing must leave the previous
# content (or none) in place and say which file could not be written.


def state_fault(how: str, tmp_path, state_dir) -> list[str]:
    """A prefix under which the state file's fsync fails (libfiu: every fsync of the process),
    or its directory's (strace: that directory's only, after the rename)."""
    if how == "file":
        return Faults(tmp_path).prefix(FSYNC)
    return strace_failing(tmp_path / "strace.log", "fsync", path=state_dir)


def assert_fired(how: str, tmp_path) -> None:
    if how == "directory":
        assert injected(tmp_path / "strace.log") >= 1


def temporaries(state_dir) -> list[str]:
    return [name for name in os.listdir(state_dir) if name.endswith(".tmp")]


STATE_FAULTS = [pytest.param("file", marks=needs_fiu), pytest.param("directory", marks=needs_strace)]


@pytest.mark.parametrize("how", STATE_FAULTS)
def test_an_epoch_bump_that_cannot_be_made_durable_fails_by_name_and_keeps_the_old_epoch(tmp_path, how):
    # A takeover: the new primary's epoch must be on disk before it acts as the primary.
    tree = tmp_path / "tree"
    tree.mkdir()
    state = tree / ".mirror"
    assert run_mirror("epoch", "bump", tree).stdout == b"1\n"
    proc = run_mirror("epoch", "bump", tree, prefix=state_fault(how, tmp_path, state))
    assert_fired(how, tmp_path)
    assert proc.returncode == 2 and proc.stdout == b"", proc
    assert f"{state}/epoch: Input/output error".encode() in proc.stderr, proc.stderr
    assert read_epoch(os.fsencode(state)) == 1
    assert temporaries(state) == []
    assert run_mirror("epoch", "bump", tree).stdout == b"2\n"


@pytest.mark.parametrize("how", STATE_FAULTS)
def test_an_applied_record_that_cannot_be_made_durable_stays_as_it_was(tmp_path, how):
    # A session with nothing to change: the record is all it writes.  The replica holds the
    # data; it only ranks lower until a record can be written (tests/test_full_disk.py too).
    src, replica = tmp_path / "src", tmp_path / "replica"
    write_files(src, OLD)
    replica.mkdir()
    with destination(tmp_path, "remote", replica) as (target, _):
        assert run_mirror("sync", "--journal-seq", "1", src, *target).returncode == 0
    with destination(tmp_path, "remote", replica, prefix=state_fault(how, tmp_path, replica / ".mirror")) as (target, _):
        proc = run_mirror("sync", "--journal-seq", "2", src, *target)
    assert_fired(how, tmp_path)
    no_traceback(proc, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"cannot record the applied position: {replica}/.mirror/applied: Input/output error" in server_log(tmp_path)
    assert applied_seq(replica) == 1
    assert_state_whole(replica)
    with destination(tmp_path, "remote", replica) as (target, _):
        assert run_mirror("sync", "--journal-seq", "3", src, *target).returncode == 0
    assert applied_seq(replica) == 3


@pytest.mark.parametrize("how", STATE_FAULTS)
def test_a_first_sync_whose_tree_identity_cannot_be_made_durable_is_refused_by_name(tmp_path, how):
    # The replica records which tree it mirrors before anything is written (the source guard);
    # an identity that may not survive a crash would let another tree's deletions in later.
    src, replica = tmp_path / "src", tmp_path / "replica"
    write_files(src, OLD)
    replica.mkdir()
    state = replica / ".mirror"
    # The source's identity is recorded by a first sync elsewhere: this one only reads it.
    assert run_mirror("sync", src, tmp_path / "elsewhere").returncode == 0
    proc = run_mirror("sync", "--delete", src, replica, prefix=state_fault(how, tmp_path, state))
    assert_fired(how, tmp_path)
    assert b"Traceback" not in proc.stderr
    assert proc.returncode == 2, proc.stderr
    # Every fsync failing, the state dir's own entry in the replica is the first that cannot
    # be made durable: it is named, as the identity is when only its directory fails.
    named = state if how == "file" else state / "tree-identity"
    assert f"{named}: Input/output error".encode() in proc.stderr, proc.stderr
    assert os.listdir(replica) == [".mirror"]  # refused before anything was written
    assert load_identity(os.fsencode(state)) is None
    assert temporaries(state) == []
    assert not (state / "tmp").exists() or os.listdir(state / "tmp") == []
    proc = run_mirror("sync", "--delete", src, replica)
    assert proc.returncode == 0, proc.stderr
    assert_mirrors(src, replica)
    assert_state_whole(replica)


@pytest.mark.parametrize("how", STATE_FAULTS)
def test_a_mirroring_lock_that_cannot_be_made_durable_is_not_taken_and_says_which(tmp_path, how):
    # The lock a takeover writes on the replica's node: an acquire that fails must not leave
    # a lock behind that its caller believes it does not hold.
    where = tmp_path / "locks"
    where.mkdir()
    lock = where / "mirror.lock"
    proc = run_mirror("lock", "acquire", lock, prefix=state_fault(how, tmp_path, where))
    assert_fired(how, tmp_path)
    assert proc.returncode == 2, proc
    assert f"cannot create the lock {lock}: Input/output error".encode() in proc.stderr, proc.stderr
    assert os.listdir(where) == []
    assert run_mirror("lock", "acquire", lock).returncode == 0
    if how == "directory":
        proc = run_mirror("lock", "release", lock, prefix=state_fault(how, tmp_path, where))
        assert proc.returncode == 2 and f"{lock}: Input/output error".encode() in proc.stderr, proc
