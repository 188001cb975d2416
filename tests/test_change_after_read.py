"""A source file changed right after it was read is mirrored by the next sync, however soon
the change came (``safefs.settled_stat``): on a file system with coarse times (ramfs, one
clock tick at a time; ext4 with 128-byte inodes, whole seconds) the file is let settle
before it is read (a tick, a second); on one with multigrain times
(tmpfs, ext4 on Linux 6.13 and later) the stat before the read is enough, and nothing waits.

Each trial rewrites a file just before the sync reads it and again just after, within
microseconds: with the same size, only its times can tell the next sync that it changed.
Without the settle on ramfs, the second rewrite keeps the first one's times and the replica
stays stale for good.  ramfs is no multigrain candidate (``safefs.MULTIGRAIN_CANDIDATES``);
it is made one here, so that what decides is the measurement of its times."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from mirror import safefs
from mirror.safefs import CLOCK_REALTIME_COARSE, SETTLE_NS, WHOLE_SECOND, fine_ctime_device, settled_stat
from mirror.transfer import sync
from tests.helpers import ext4_image, is_root, loop_mounted, mounted
from tests.servers import mirror_server

TRIALS = 12
SIZE = 4096
TICK_NS = int(time.clock_getres(CLOCK_REALTIME_COARSE) * 1e9)
RAMFS_MAGIC = 0x858458F6

needs_root = pytest.mark.skipif(not is_root(), reason="mounts a tmpfs, a ramfs and ext4 images")


def _version(n: int) -> bytes:
    return bytes([n % 251 + 1]) * SIZE


class _Rewriter:
    """``on_progress`` for a sync that copies ``a`` then ``target`` (in that order): once ``a``
    is passed on, ``target`` is rewritten (the version the sync then reads); once ``target``
    is, it is rewritten again.  Records the times of both rewrites."""

    def __init__(self, target, n: int, step: int):
        self.target, self.n, self.step = target, n, step
        self.calls = 0
        self.mtimes: list[int] = []

    def __call__(self, _size: int) -> None:
        self.calls += 1
        if self.calls == 1:
            _next_tick(step=self.step)  # the read and the second rewrite then fall within the first's step
        if self.calls <= 2:
            fd = os.open(self.target, os.O_WRONLY)
            try:
                os.pwrite(fd, _version(self.n + self.calls), 0)
                self.mtimes.append(os.fstat(fd).st_mtime_ns)
            finally:
                os.close(fd)


def _next_tick(after: int | None = None, step: int = TICK_NS) -> int:
    """Wait until the coarse clock (a file's times on ramfs) has passed the ``step`` (a tick,
    or the second of a file system that keeps whole seconds) holding ``after`` (default: now)."""
    start = time.clock_gettime_ns(CLOCK_REALTIME_COARSE) if after is None else after
    end = (start // step + 1) * step if step > TICK_NS else start + 1
    while (now := time.clock_gettime_ns(CLOCK_REALTIME_COARSE)) < end:
        pass
    return now


def _trials(src, replica, dest, trials: int, step: int, **options) -> list[_Rewriter]:
    """Each trial: ``a`` and ``f`` changed, one sync to ``dest`` with the rewrites, one more
    sync; the ``replica`` must hold what the source holds.  ``step``: the source's times."""
    (src / "a").write_bytes(b"0")
    (src / "f").write_bytes(_version(0))
    assert sync(src, dest, **options).ok
    done = []
    for trial in range(trials):
        n = 3 * trial + 1
        # The test's own change must show: it comes a step after the last rewrite.
        _next_tick(os.stat(src / "f").st_mtime_ns, step)
        (src / "a").write_bytes(str(n).encode())
        (src / "f").write_bytes(_version(n))  # what the scan sees: f is to be copied
        rewriter = _Rewriter(src / "f", n, step)
        result = sync(src, dest, on_progress=rewriter, **options)
        assert result.ok, result.failed
        assert rewriter.calls == 2, "both files were to be copied, a before f"
        assert sync(src, dest, **options).ok
        assert (replica / "f").read_bytes() == (src / "f").read_bytes(), (
            f"trial {trial}: the replica kept an older f than the source's (rewritten "
            f"{rewriter.mtimes[1] - rewriter.mtimes[0]} ns after the version read)"
        )
        done.append(rewriter)
    return done


def _file_system(tmp_path, fstype: str):
    if fstype == "ext4-128":  # 128-byte inodes: times in whole seconds
        return ext4_image(tmp_path / "fs", tmp_path / "fs.img", "-I", "128")
    return mounted(tmp_path / "fs", fstype, "size=32m" if fstype == "tmpfs" else "")


@needs_root
@pytest.mark.parametrize("fstype", ["ramfs", "tmpfs", "ext4-128"])
@pytest.mark.parametrize("where", ["local", "remote"])
def test_a_change_right_after_a_read_reaches_the_replica_on_the_next_sync(tmp_path, monkeypatch, fstype, where):
    # ramfs made a candidate: the measurement itself must find its times coarse.
    monkeypatch.setattr(safefs, "MULTIGRAIN_CANDIDATES", safefs.MULTIGRAIN_CANDIDATES | {RAMFS_MAGIC})
    trials, step = (3, WHOLE_SECOND) if fstype == "ext4-128" else (TRIALS, TICK_NS)
    # The replica on the same file system: writes to a multigrain one elsewhere would move
    # the coarse clock's times too (Linux keeps them no older than the finer times it gave).
    with _file_system(tmp_path, fstype) as fs:
        src, dst = fs / "src", fs / "dst"
        (src / ".mirror").mkdir(parents=True)  # where the source's file system is measured
        dst.mkdir()
        fine = fine_ctime_device(os.fsencode(src / ".mirror")) is not None
        if fstype != "tmpfs":
            assert not fine, f"{fstype} takes a file's times from the coarse clock"
        if where == "local":
            rewrites = _trials(src, dst, dst, trials, step)
        else:
            with mirror_server(tmp_path, {"m": str(dst)}) as server:
                rewrites = _trials(src, dst, server.url("m"), trials, step, secret_file=server.secret_file)
    if fine:
        # The fault reached the case it is about: a rewrite within one tick of the version
        # read, which only the finer time told apart (nothing waited).
        assert any(0 < r.mtimes[1] - r.mtimes[0] < TICK_NS for r in rewrites), [r.mtimes for r in rewrites]


@needs_root
def test_multigrain_times_are_measured_per_file_system(tmp_path, monkeypatch):
    """The measurement is of the file system the directory is on: a file elsewhere settles;
    a file system that is no candidate, or a directory that cannot take a file, tells nothing."""
    with mounted(tmp_path / "ram", "ramfs", "") as ram, mounted(tmp_path / "tmp") as tmp:
        assert fine_ctime_device(os.fsencode(ram)) is None
        monkeypatch.setattr(safefs, "MULTIGRAIN_CANDIDATES", safefs.MULTIGRAIN_CANDIDATES | {RAMFS_MAGIC})
        assert fine_ctime_device(os.fsencode(ram)) is None, "measured: ramfs's times are coarse"
        device = fine_ctime_device(os.fsencode(tmp))
        if device is None:
            pytest.skip("this kernel gives tmpfs no multigrain times (Linux < 6.13)")
        assert device == os.stat(tmp).st_dev
        monkeypatch.setattr(safefs, "MULTIGRAIN_CANDIDATES", set())
        assert fine_ctime_device(os.fsencode(tmp)) is None, "tmpfs measured though no candidate"
        (ram / "f").write_bytes(b"new")
        fd = os.open(ram / "f", os.O_RDONLY)
        try:
            st = settled_stat(fd, device)  # a file elsewhere than the measured system settles
        finally:
            os.close(fd)
        assert time.time_ns() - st.st_ctime_ns >= SETTLE_NS
        assert fine_ctime_device(os.fsencode(tmp_path / "missing")) is None
        subprocess.run(["mount", "-o", "remount,ro", str(tmp)], check=True)
        assert fine_ctime_device(os.fsencode(tmp)) is None


@needs_root
def test_a_ctime_ahead_of_the_clock_is_waited_for_one_settle_at_most(tmp_path):
    """A clock set back (NTP, a resumed VM) leaves files changed just before with times ahead
    of it: their settle must not wait for the clock to catch up (an hour here)."""
    with ext4_image(tmp_path / "fs", tmp_path / "fs.img") as fs:
        (fs / "f").write_bytes(b"changed before the clock was set back")
    ahead = int(time.time()) + 3600
    subprocess.run(["debugfs", "-w", "-R", f"set_inode_field /f ctime @{ahead}", str(tmp_path / "fs.img")],
                   check=True, capture_output=True)  # fmt: skip
    with loop_mounted(tmp_path / "fs.img", tmp_path / "fs") as fs:
        fd = os.open(fs / "f", os.O_RDONLY)
        assert os.fstat(fd).st_ctime_ns // WHOLE_SECOND == ahead
        done: list = []
        waiter = threading.Thread(target=lambda: done.append(settled_stat(fd)), daemon=True)
        waiter.start()
        waiter.join(timeout=60)  # liveness, not speed: the old rule slept the hour
        assert done and done[0] is not None, "the settle waited for the clock to reach the file's ctime"
        os.close(fd)
