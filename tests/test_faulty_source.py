"""A source file system that fails under a sync, as users meet it: a disk with bad sectors, a
flaky network mount.  The source is a FUSE pass-through (``tests/faultyfs.py``) that fails
reads, stats and directory listings with EIO, reads files shorter or longer than their size
says, or blocks a read (a hung mount), per path, while real ``mirror sync`` processes run
against it, locally and to a `mirror serve` on loopback.

Whatever fails, the claims are the replica's:

- a file that cannot be read whole is failed by name (exit 1); its old copy on the replica
  is untouched, never truncated nor partly new (a reader polls the replica throughout);
- what the sync cannot see on the source (a directory it cannot list or stat, the root
  itself) is never deleted from the replica, even with ``--delete``; the sync says so and
  exits non-zero, and once the fault is gone the next sync converges;
- no temporary file is left in the replica's ``.mirror/tmp``.

Each test asserts its fault fired (the file system counts the operations it failed).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemons import converged, live_daemon
from tests.faultyfs import faulty_fs
from tests.helpers import MIRROR, REPO, process_state, run_mirror, wait_until
from tests.replica_checks import MODES, Target, Watcher, assert_state_whole, digests, no_traceback
from tests.servers import mirror_server
from tests.snapshot import assert_mirrors, snapshot


@contextmanager
def faulty_source(tmp_path: Path, mode: str):
    """``(fs, replica, target)``: a faulty source file system, and a ``Target`` of ``mode``
    writing to the replica, running."""
    replica = tmp_path / "replica"
    replica.mkdir()
    target = Target(mode, replica, tmp_path)
    with faulty_fs(tmp_path) as fs, target.running():
        yield fs, replica, target


def write_tree(root: Path, tag: bytes) -> None:
    """A few directories of small files, and one big file (4 MiB: read in several pieces)."""
    for d in ("docs", "mail", "mail/cur"):
        (root / d).mkdir(parents=True, exist_ok=True)
        for i in range(5):
            (root / d / f"f{i}").write_bytes(tag + b" %s %d " % (d.encode(), i) * 200)
    (root / "big").write_bytes(tag * ((4 << 20) // len(tag)))


def err(proc) -> str:
    return proc.stderr.decode(errors="replace")


def mirrored_then_changed(fs, replica: Path, sync) -> dict[bytes, str]:
    """The source written and mirrored (``sync(src)`` must succeed), then written anew behind
    the replica's back; the replica's digests as mirrored."""
    write_tree(fs.backing, b"old!")
    assert sync(fs.mount).returncode == 0
    old = digests(replica)
    write_tree(fs.backing, b"new!")
    return old


# -- 1. a file that fails while it is read ------------------------------------------------------------


# Half of it reads, then the disk fails; none of it reads; it opens, then cannot be stat'ed.
READ_FAULTS = {"middle": ("read_eio", {"at": 2 << 20}), "start": ("read_eio", {"at": 0}), "fstat": ("fstat_eio", {})}


@pytest.mark.parametrize("where", READ_FAULTS)
@pytest.mark.parametrize("mode", MODES)
def test_a_file_that_fails_while_read_fails_by_name_and_keeps_the_old_copy(tmp_path, mode, where):
    with faulty_source(tmp_path, mode) as (fs, replica, target):
        old = mirrored_then_changed(fs, replica, target.sync)
        fault, args = READ_FAULTS[where]
        fs.fault("big", fault, **args)
        with Watcher(replica, old, digests(fs.backing)) as watcher:
            proc = target.sync(fs.mount, "--delete")
        no_traceback(proc, target)
        assert fs.count("big", fault) > 0
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        assert proc.returncode == 1, err(proc)
        assert "failed: big:" in err(proc) and "Input/output error" in err(proc), err(proc)
        now = digests(replica)
        assert now[b"big"] == old[b"big"]
        for path, digest in digests(fs.backing).items():  # the rest is mirrored
            if path != b"big":
                assert now[path] == digest, path
        assert_state_whole(replica)
        fs.clear()
        proc = target.sync(fs.mount, "--delete")
        assert proc.returncode == 0, err(proc)
        assert_mirrors(fs.backing, replica)


# -- 2. a file that reads shorter or longer than its size says --------------------------------------


# How much of a short file a copy reads depends on the kernel's page cache: "only N of".
LENGTHS = {"short": ({"at": 100_000}, "of its 300000 bytes: changed while it was being"),
           "long": ({"extra": 1000}, "reads on past its size (299000 bytes)")}


@pytest.mark.parametrize("fault", LENGTHS)
@pytest.mark.parametrize("mode", MODES)
def test_a_file_that_reads_another_length_than_its_size_is_never_committed(tmp_path, mode, fault):
    with faulty_source(tmp_path, mode) as (fs, replica, target):
        write_tree(fs.backing, b"old!")
        assert target.sync(fs.mount).returncode == 0
        old = digests(replica)
        (fs.backing / "big").write_bytes(b"new!" * (300_000 // 4))
        args, reason = LENGTHS[fault]
        fs.fault("big", fault, **args)
        with Watcher(replica, old) as watcher:  # no version of "big" but the old one, ever
            proc = target.sync(fs.mount)
        no_traceback(proc, target)
        assert fs.count("big", fault) > 0
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        assert proc.returncode == 1, err(proc)
        assert "failed: big: " in err(proc) and reason in err(proc), err(proc)
        assert digests(replica)[b"big"] == old[b"big"]
        assert_state_whole(replica)
        fs.clear()
        proc = target.sync(fs.mount)
        assert proc.returncode == 0, err(proc)
        assert_mirrors(fs.backing, replica)


# -- 3. what cannot be seen on the source is not deleted from the replica ---------------------------


UNREADABLE = [("mail", "readdir_eio"), ("mail", "opendir_eio"), ("mail", "getattr_eio"), ("mail/f2", "getattr_eio")]


@pytest.mark.parametrize(("path", "fault"), UNREADABLE, ids=[f"{p}-{f}" for p, f in UNREADABLE])
@pytest.mark.parametrize("mode", MODES)
def test_what_cannot_be_read_on_the_source_keeps_its_replica_copy_with_delete(tmp_path, mode, path, fault):
    with faulty_source(tmp_path, mode) as (fs, replica, target):
        write_tree(fs.backing, b"v1")
        assert target.sync(fs.mount).returncode == 0
        before = snapshot(replica)
        (fs.backing / "docs" / "f0").unlink()  # a real deletion elsewhere: it still goes
        fs.fault(path, fault)
        proc = target.sync(fs.mount, "--delete")
        no_traceback(proc, target)
        assert fs.count(path, fault) > 0
        assert proc.returncode == 1, err(proc)
        assert f"warning: {path}: " in err(proc) and "Input/output error" in err(proc), err(proc)
        after = snapshot(replica)
        lost = sorted(p for p in before if p.startswith(b"mail") and p not in after)
        assert lost == [], f"deleted from the replica although unreadable on the source: {lost}"
        assert b"docs/f0" not in after
        assert_state_whole(replica)
        fs.clear()
        proc = target.sync(fs.mount, "--delete")
        assert proc.returncode == 0, err(proc)
        assert_mirrors(fs.backing, replica)


# An unreadable root: listed, the sync goes on over nothing (exit 1); not opened or not
# stat'ed, it stops before the replica is touched (exit 2).  Either way it is named.
ROOT_FAULTS = {"readdir_eio": (1, "warning: ./: cannot read directory: Input/output error"),
               "opendir_eio": (2, "mnt: Input/output error"),
               "getattr_eio": (2, "mnt: Input/output error")}  # fmt: skip


@pytest.mark.parametrize("fault", ROOT_FAULTS)
@pytest.mark.parametrize("mode", MODES)
def test_a_source_root_that_cannot_be_read_deletes_nothing(tmp_path, mode, fault):
    with faulty_source(tmp_path, mode) as (fs, replica, target):
        write_tree(fs.backing, b"v1")
        assert target.sync(fs.mount).returncode == 0
        before = snapshot(replica)
        (fs.backing / "docs" / "f0").unlink()
        fs.fault(b"", fault)
        proc = target.sync(fs.mount, "--delete")
        no_traceback(proc, target)
        assert fs.count(b"", fault) > 0
        code, message = ROOT_FAULTS[fault]
        assert proc.returncode == code and message in err(proc), err(proc)
        assert snapshot(replica) == before
        assert_state_whole(replica)
        fs.clear()
        proc = target.sync(fs.mount, "--delete")
        assert proc.returncode == 0, err(proc)
        assert_mirrors(fs.backing, replica)


@pytest.mark.parametrize(("path", "fault"), [(b"", "readdir_eio"), (b"", "getattr_eio"), *UNREADABLE])
def test_diff_does_not_call_what_it_cannot_read_deleted_nor_identical(tmp_path, path, fault):
    with faulty_fs(tmp_path) as fs:
        write_tree(fs.backing, b"v1")
        shutil.copytree(fs.backing, tmp_path / "copy", symlinks=True)
        fs.fault(path, fault)
        proc = run_mirror("diff", fs.mount, tmp_path / "copy")
        assert fs.count(path, fault) > 0
        assert proc.returncode == 2, err(proc)  # incomplete: never "identical"
        assert f"warning: src: {os.fsdecode(path) or './'}: " in err(proc), err(proc)
        assert b"deleting" not in proc.stdout, proc.stdout.decode(errors="replace")


# -- 4. a hung source: a read that blocks -------------------------------------------------------------


def start_sync(src: Path, dst: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*MIRROR, "sync", *extra, str(src), dst], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def test_a_local_sync_hung_on_its_source_holds_the_replica_until_sigterm_ends_it(tmp_path):
    with faulty_source(tmp_path, "local") as (fs, replica, target):
        old = mirrored_then_changed(fs, replica, target.sync)
        fs.fault("big", "hang")
        with Watcher(replica, old, digests(fs.backing)) as watcher:
            hung = start_sync(fs.mount, str(replica), "--lock-file", str(tmp_path / "stop"))
            try:
                wait_until(lambda: fs.blocked() > 0 or hung.poll() is not None)
                assert hung.poll() is None
                # A second writer is refused while the hung one holds the replica.
                other = run_mirror("sync", fs.mount, replica, check_codes=range(256))
                assert other.returncode == 2 and "busy" in err(other), err(other)
                # The mirroring lock cannot reach a sync blocked in the kernel.
                (tmp_path / "stop").write_text("failover")
                with pytest.raises(subprocess.TimeoutExpired):
                    hung.wait(timeout=1)
                hung.terminate()  # SIGTERM, fatal for a process blocked on FUSE
                hung.wait(timeout=10)
            finally:
                if hung.poll() is None:
                    hung.kill()
                hung.wait()
                hung.stdout.close()
                hung.stderr.close()
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        assert digests(replica)[b"big"] == old[b"big"]
        fs.clear()
        fs.release()
        (tmp_path / "stop").unlink()
        proc = target.sync(fs.mount, "--delete")
        assert proc.returncode == 0, err(proc)
        assert_mirrors(fs.backing, replica)
        assert_state_whole(replica)  # the killed sync's temporary is gone


def test_a_sender_hung_on_its_source_loses_the_module_after_the_servers_timeout(tmp_path):
    replica = tmp_path / "replica"
    replica.mkdir()
    (tmp_path / "srv").mkdir()
    with faulty_fs(tmp_path) as fs, mirror_server(tmp_path / "srv", {"m": str(replica)}, "--timeout", "2") as server:
        url, secret = server.url("m"), ("--secret-file", server.secret_file)
        old = mirrored_then_changed(fs, replica, lambda src: run_mirror("sync", *secret, src, url))
        fs.fault("big", "hang")
        with Watcher(replica, old, digests(fs.backing)) as watcher:
            hung = start_sync(fs.mount, url, *secret)
            try:
                wait_until(lambda: fs.blocked() > 0 or hung.poll() is not None)
                assert hung.poll() is None
                # The server drops the silent session after its --timeout and frees the module
                # for the next sync.  That one leaves the hung file alone: the kernel holds
                # the pages being read locked, and any other reader of them would hang too,
                # beyond even SIGKILL.
                started = time.monotonic()
                proc = wait_until(lambda: _synced(fs.mount, url, *secret, "--exclude", "big"), timeout=20)
                assert proc.returncode == 0 and time.monotonic() - started < 10, err(proc)
                assert hung.poll() is None  # still blocked in the kernel, holding nothing
            finally:
                fs.release()
                try:
                    hung.wait(timeout=30)
                finally:
                    if hung.poll() is None:
                        hung.kill()
                        hung.wait()
                    hung_err = hung.stderr.read().decode(errors="replace")
                    hung.stdout.close()
                    hung.stderr.close()
        assert watcher.polls > 0 and watcher.bad == [], watcher.bad[:5]
        assert hung.returncode != 0 and "Traceback" not in hung_err, hung_err
        assert digests(replica)[b"big"] == old[b"big"]
        fs.clear()
        assert run_mirror("sync", *secret, fs.mount, url).returncode == 0
        assert_mirrors(fs.backing, replica)
        assert_state_whole(replica)


def _synced(src: Path, url: str, *extra: str):
    """A sync's result if it ran, None while the module is busy."""
    proc = run_mirror("sync", *extra, src, url, check_codes=range(256))
    return None if "busy" in err(proc) else proc


# -- 5. the source changing while the scan is on its way to a directory --------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_name_made_in_a_directory_the_scan_is_about_to_list_comes_with_the_directorys_times(tmp_path, mode):
    """A directory's times are read in its parent's listing, before its own listing: a name
    made in it between the two arrived with the directory's times from before it, and the
    name's own event (to a live daemon) then found nothing left to do, so the replica kept
    those older times for good.  The scan is held as it opens the directory while a file is
    made in it."""
    with faulty_source(tmp_path, mode) as (fs, replica, target):
        write_tree(fs.backing, b"v1")
        assert target.sync(fs.mount).returncode == 0
        (fs.backing / "top").write_bytes(b"new beside it: the root's listing is compared")
        fs.fault("mail", "hang")
        dst, *extra = target.daemon_args()
        sync = start_sync(fs.mount, dst, *extra)
        try:
            wait_until(lambda: fs.blocked() > 0 or sync.poll() is not None)
            assert sync.poll() is None, sync.communicate()
            (fs.backing / "mail" / "new").write_bytes(b"made while the scan was on its way")
            fs.release()
            _, errs = sync.communicate(timeout=60)
        finally:
            if sync.poll() is None:
                sync.kill()
                sync.communicate()
        assert fs.count("mail", "hang") == 1
        assert sync.returncode == 0, errs
        assert_mirrors(fs.backing, replica)


# -- the live daemon ----------------------------------------------------------------------------------


def daemon_status(src: Path) -> dict | None:
    """The daemon's one pair, once it has finished a session and mirrors live."""
    proc = run_mirror("status", src, "--json", check_codes=range(256))
    if not proc.stdout:
        return None
    pair = json.loads(proc.stdout)["pairs"][0]
    return {**pair, "exit": proc.returncode} if pair["last_sync"] and pair["state"] == "live" else None


def test_the_live_daemon_keeps_what_it_cannot_read_and_names_it_in_its_status(tmp_path):
    with faulty_source(tmp_path, "local") as (fs, replica, target):
        write_tree(fs.backing, b"v1")
        assert target.sync(fs.mount).returncode == 0
        before = snapshot(replica)
        fs.fault("mail", "getattr_eio")
        with live_daemon(fs.mount, replica, log_path=tmp_path / "daemon.log"):  # it deletes by default
            status = wait_until(lambda: daemon_status(fs.mount))
            assert fs.count("mail", "getattr_eio") > 0
            after = snapshot(replica)
            assert [p for p in before if p.startswith(b"mail") and p not in after] == []
            assert status["exit"] == 1, status  # not healthy: part of the tree is not mirrored
            assert ["mail", "cannot stat: Input/output error"] in status["failed_files"], status
            # A directory it could not watch (watchdog passed over it without a word) is
            # named, tried again and scanned whole once it can be: its changes arrive while
            # the same daemon runs, no restart.
            wait_until(lambda: "cannot be watched, e.g. " in (tmp_path / "daemon.log").read_text())
            assert f"{fs.mount}/mail: Input/output error" in (tmp_path / "daemon.log").read_text()
            fs.clear()
            (fs.mount / "mail" / "new").write_bytes(b"written once the disk is back")
            converged(fs.backing, replica)
            wait_until(lambda: "is watched again" in (tmp_path / "daemon.log").read_text())
            (fs.mount / "mail" / "newer").write_bytes(b"seen by its watch")
            converged(fs.backing, replica)


# What the source could not read once, with nothing changing afterwards: no event will come for
# it, so only the daemon's own retry brings the replica up to date once the disk is back.
TRANSIENT = {"file": ("docs/f1", "getattr_eio"), "listing": ("mail/cur", "readdir_eio"),
             "directory": ("mail/cur", "opendir_eio")}  # fmt: skip


@pytest.mark.parametrize("what", TRANSIENT)
def test_the_live_daemon_mirrors_what_it_could_not_read_once_the_fault_is_gone(tmp_path, what):
    path, fault = TRANSIENT[what]
    with faulty_source(tmp_path, "local") as (fs, replica, target):
        mirrored_then_changed(fs, replica, target.sync)  # the daemon's start-up sync finds the change
        fs.fault(path, fault)
        with live_daemon(fs.mount, replica) as d:
            status = wait_until(lambda: daemon_status(fs.mount))
            assert fs.count(path, fault) > 0
            assert status["exit"] == 1 and [p for p, _ in status["failed_files"]] == [path], status
            assert digests(replica)[b"docs/f0"] == digests(fs.backing)[b"docs/f0"]  # the rest is mirrored
            fs.clear()
            converged(fs.backing, replica, timeout=30)
            status = wait_until(lambda: (s := daemon_status(fs.mount)) and s["exit"] == 0 and s)
            assert status["failed_files"] == [], status
            # In the log too: once when it failed (not at each try), once when it was mirrored again.
            log = d.log_text()
            assert log.count(f"{path}: not mirrored: ") == 1 and f"{path}: mirrored again" in log, log[-3000:]


# -- the live daemon: a nested directory it cannot read, tried again in scoped sessions ------------
# What the daemon could not read is tried again in a scoped session, a directory as a subtree of its
# own.  A subtree whose root cannot be stat'ed, opened or listed is an unreadable problem there, as in
# a whole scan: named in the status, kept on the replica, tried again on the same connection, never
# an error that drops the connection and syncs the whole tree again on every retry.

NESTED_FAULTS = ["getattr_eio", "opendir_eio", "readdir_eio"]


@pytest.mark.parametrize("fault", NESTED_FAULTS)
@pytest.mark.parametrize("mode", MODES)
def test_the_live_daemon_retries_a_nested_directory_it_cannot_read_without_a_full_sync(tmp_path, mode, fault):
    with faulty_source(tmp_path, mode) as (fs, replica, target):
        old = mirrored_then_changed(fs, replica, target.sync)  # the daemon's start-up sync finds the change
        fs.fault("mail/cur", fault)
        with live_daemon(fs.mount, *target.daemon_args(), log_path=tmp_path / "daemon.log") as d:
            # The start-up sync, then two tries of mail/cur alone.
            status = wait_until(lambda: (s := daemon_status(fs.mount)) and s["sessions"] >= 3 and s, timeout=30)
            tried = fs.count("mail/cur", fault)
            assert tried >= 3, tried
            assert status["exit"] == 1 and [p for p, _ in status["failed_files"]] == ["mail/cur"], status
            assert (status["full_syncs"], status["journal_catch_ups"]) == (1, 0), status  # one connection
            now = digests(replica)
            for path, digest in digests(fs.backing).items():  # the rest is mirrored, mail/cur kept as it was
                assert now[path] == (old[path] if path.startswith(b"mail/cur/") else digest), path
            fs.clear()
            converged(fs.backing, replica, timeout=40)  # by the next try: nothing changed since
            status = wait_until(lambda: (s := daemon_status(fs.mount)) and s["exit"] == 0 and s, timeout=60)
            assert status["failed_files"] == [] and status["pending"] == 0, status
            assert (status["full_syncs"], status["journal_catch_ups"]) == (1, 0), status
            log = d.log_text()
            assert "disconnected" not in log and "Traceback" not in log, log
        assert "Traceback" not in target.server_log(), target.server_log()


@pytest.mark.parametrize("mode", MODES)
def test_a_change_in_a_directory_the_live_daemon_cannot_open_waits_for_it_on_the_same_connection(tmp_path, mode):
    """A file written in a directory that then fails to open: the scoped session's listing of
    the directory (the changed name alone) is an unreadable problem too."""
    with faulty_source(tmp_path, mode) as (fs, replica, target):
        write_tree(fs.backing, b"v1")
        with live_daemon(fs.mount, *target.daemon_args(), log_path=tmp_path / "daemon.log") as d:
            wait_until(lambda: (s := daemon_status(fs.mount)) and s["exit"] == 0)
            old = digests(replica)
            fs.fault("mail/cur", "opendir_eio")
            (fs.mount / "mail" / "cur" / "f1").write_bytes(b"v2")  # a lookup, not an opendir: it works
            status = wait_until(lambda: (s := daemon_status(fs.mount)) and s["failed_files"] and s, timeout=30)
            assert fs.count("mail/cur", "opendir_eio") > 0
            assert status["exit"] == 1 and [p for p, _ in status["failed_files"]] == ["mail/cur"], status
            assert digests(replica) == old
            fs.clear()
            converged(fs.backing, replica, timeout=40)  # by the next try: nothing changed since
            status = wait_until(lambda: (s := daemon_status(fs.mount)) and s["exit"] == 0 and s, timeout=60)
            assert (status["full_syncs"], status["journal_catch_ups"]) == (1, 0), status  # one connection
            log = d.log_text()
            assert "disconnected" not in log and "Traceback" not in log, log
        assert "Traceback" not in target.server_log(), target.server_log()


# -- an excluded entry that cannot be read ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_an_excluded_directory_that_cannot_be_stated_is_no_failure(tmp_path, mode):
    """``--exclude cache/`` and a ``cache`` whose stat fails: its kind unknown, it may be the
    excluded directory; it is not named, not failed (exit 0), and the replica's copy stays."""
    with faulty_source(tmp_path, mode) as (fs, replica, target):
        write_tree(fs.backing, b"v1")
        (fs.backing / "cache").mkdir()
        (fs.backing / "cache" / "blob").write_bytes(b"cached")
        assert target.sync(fs.mount).returncode == 0  # cache mirrored before it was excluded
        write_tree(fs.backing, b"v2")
        fs.fault("cache", "getattr_eio")
        proc = target.sync(fs.mount, "--delete", "--exclude", "cache/")
        assert fs.count("cache", "getattr_eio") > 0
        assert proc.returncode == 0 and b"cache" not in proc.stderr, proc.stderr
        assert (replica / "cache" / "blob").read_bytes() == b"cached"
        assert digests(replica)[b"docs/f0"] == digests(fs.backing)[b"docs/f0"]
        no_traceback(proc, target)


# -- the live daemon stopped while a read hangs --------------------------------------------------------


def test_a_live_daemon_held_by_a_hung_source_stops_within_systemds_timeout(tmp_path):
    """SIGTERM while a pair's session is held in the kernel by a read that never returns: the
    daemon waits for its pairs 10 s at most (not a minute each), says which it left behind,
    and exits with its status saying "stopped" (exit 6), before systemd's TimeoutStopSec (30 s)
    would kill it and leave it "dead"."""
    from mirror.daemon import STOP_SECONDS

    with faulty_source(tmp_path, "local") as (fs, replica, target):
        write_tree(fs.backing, b"v1")
        fs.fault("big", "hang")
        try:
            with live_daemon(fs.mount, replica, log_path=tmp_path / "daemon.log") as d:
                # Its first sync's copy of "big" waits in the kernel for the hung read (state D);
                # the read itself may be the kernel's read-ahead's.
                tasks = f"/proc/{d.proc.pid}/task"
                wait_until(lambda: fs.blocked() > 0 and "D" in [process_state(d.proc.pid, int(t)) for t in os.listdir(tasks)])
                started = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                d.proc.wait(timeout=25)
                assert time.monotonic() - started >= STOP_SECONDS - 1  # it did wait for the session
                assert "did not stop within" in d.log_text(), d.log_text()[-2000:]
        finally:
            fs.release()
        proc = run_mirror("status", fs.mount, check_codes=(6,))
        assert b"stopped" in proc.stdout, proc.stdout
        assert (replica / "big").exists() is False  # never committed in part


# -- a file that keeps failing, in a busy tree ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_file_that_keeps_failing_is_tried_at_its_own_pace_in_a_busy_tree(tmp_path, mode):
    """Every session of a busy tree carried the failed file along: a big file whose disk fails
    was read again (and, to a receiver, sent again) at each one, every few milliseconds.  Now it
    is tried after its own backoff (0.5 s, doubling), whatever else changes meanwhile."""
    with faulty_source(tmp_path, mode) as (fs, replica, target):
        mirrored_then_changed(fs, replica, target.sync)
        fs.fault("big", "read_eio", at=1 << 20)
        with live_daemon(fs.mount, *target.daemon_args(), log_path=tmp_path / "daemon.log") as d:
            first = wait_until(lambda: (s := daemon_status(fs.mount)) and s["failed_files"] and s)
            tried = fs.count("big", "read_eio")  # its first try's failed reads (or its first two's)
            started = time.monotonic()
            for i in range(60):  # 3 s of changes beside it on an idle machine, 60 sessions or so
                (fs.mount / "docs" / f"busy-{i}").write_bytes(b"%d" % i)
                wait_until(lambda i=i: (replica / "docs" / f"busy-{i}").exists())
            elapsed = time.monotonic() - started
            again = fs.count("big", "read_eio") - tried
            sessions = wait_until(lambda: daemon_status(fs.mount))["sessions"] - first["sessions"]
            # Tried again at about 0.5, 1.5, 3.5, 7.5 s ... after the first try, not once per
            # session: however long the changes took (a loaded machine), a few tries at most.
            tries = 2 + math.log2(1 + elapsed / 0.5)
            assert sessions >= 30 and 1 <= again <= tried * tries, (again, tried, elapsed, sessions)
            fs.clear()
            converged(fs.backing, replica, timeout=60)  # by its next try
            assert "Traceback" not in d.log_text()
