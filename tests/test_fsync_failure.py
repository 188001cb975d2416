"""A failing fsync or fdatasync wherever hamirror makes something durable: the files a sync
commits on the replica, the directories their names are in, the replica's and the source's
state files, the live daemon's journal.

The faults are real failures of a real ``mirror`` process's system calls:

- libfiu (``fiu-run -x``) makes libc's ``fsync`` and ``fdatasync`` fail with a chosen errno,
  from the start or switched on and off while the process runs (``fiu-ctrl``).  It does not
  wrap ``syncfs``, which commits a batch of ``safefs.SYNCFS_FROM`` files or more: the tests
  that mean per-file fsyncs keep their batches smaller.
- strace injects the errors libfiu cannot: a failing ``syncfs``, or the fsync of one
  directory only (``-P PATH``); its log shows each injected call.

Whatever fails, the claims are those of a full disk (tests/test_full_disk.py): nothing is
committed as durable that is not, the error names the file, no temporary file is left, the
replica's state says no more than it has, and once the fault is gone the next sync (or the
running daemon) makes the replica equal.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from contextlib import contextmanager

import pytest

from mirror.journal import _scan as scan_journal
from tests.daemons import converged, live_daemon
from tests.helpers import wait_until
from tests.servers import mirror_server

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


# -- the live daemon's journal ---------------------------------------------------------------------


@contextmanager
def destination(tmp_path, mode: str, replica):
    """What a daemon or a sync is given for ``replica``: the directory (local), or a `mirror
    serve` module of it (remote), with the options that go with it."""
    if mode == "local":
        yield [str(replica)]
        return
    (tmp_path / "srv").mkdir(exist_ok=True)
    with mirror_server(tmp_path / "srv", {"m": str(replica)}) as server:
        yield [server.url("m"), "--secret-file", server.secret_file]


@needs_fiu
@pytest.mark.parametrize("mode", ["local", "remote"])
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
    with destination(tmp_path, mode, dst) as target, live_daemon(src, *target, prefix=faults.prefix()) as daemon:
        converged(src, dst)
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
    state = src / ".mirror"
    journals = [name for name in os.listdir(state) if name.startswith("journal-")]
    assert journals
    for name in journals:
        data = (state / name).read_bytes()
        assert scan_journal(data)[3] == len(data), f"{name}: a torn record"
