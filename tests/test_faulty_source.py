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

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.faultyfs import faulty_fs
from tests.helpers import run_mirror
from tests.snapshot import assert_mirrors, snapshot
from tests.test_full_disk import MODES, Target, Watcher, assert_state_whole, digests, no_traceback


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


# -- 1. a read error in the middle of a file -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_read_error_in_the_middle_of_a_file_fails_it_by_name_and_keeps_the_old_copy(tmp_path, mode):
    with faulty_source(tmp_path, mode) as (fs, replica, target):
        write_tree(fs.backing, b"old!")
        assert target.sync(fs.mount).returncode == 0
        old = digests(replica)
        write_tree(fs.backing, b"new!")
        fs.fault("big", "read_eio", at=2 << 20)  # half of it reads; then the disk fails
        with Watcher(replica, old, digests(fs.backing)) as watcher:
            proc = target.sync(fs.mount, "--delete")
        no_traceback(proc, target)
        assert fs.count("big", "read_eio") > 0
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


LENGTHS = {"short": ({"at": 100_000}, "read only 100000 of its 300000 bytes"),
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
        assert f"failed: big: {reason}" in err(proc), err(proc)
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
ROOT_FAULTS = {"readdir_eio": (1, "warning: .: cannot read directory: Input/output error"),
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
        assert f"warning: src: {os.fsdecode(path or b'.')}: " in err(proc), err(proc)
        assert b"deleting" not in proc.stdout, proc.stdout.decode(errors="replace")
