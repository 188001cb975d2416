"""startup.reserve_descriptors: the descriptor table grown up front, nothing left open, nothing closed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import run_mirror
from tests.servers import mirror_server
from tests.snapshot import assert_mirrors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, prefix: list[str] | None = None) -> str:
    script = textwrap.dedent(
        """
        import os

        def fd_size():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("FDSize:"))

        def open_count():
            return len(os.listdir("/proc/self/fd"))
        """
    ) + textwrap.dedent(code)
    proc = subprocess.run((prefix or []) + [sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_reserve_grows_the_table_and_leaves_nothing_open():
    out = _run(
        """
        from mirror import startup
        before, count = fd_size(), open_count()
        startup.reserve_descriptors()
        print(before, fd_size(), open_count() - count)
        """
    )
    before, after, extra = map(int, out.split())
    assert before < 1024 <= after
    assert extra == 0


def test_reserve_never_closes_a_descriptor_in_use_at_the_top():
    out = _run(
        """
        from mirror import startup
        fd = os.open("/proc", os.O_RDONLY)  # not "/", which reserve itself opens
        os.dup2(fd, 1023)  # the very number reserve asks for
        startup.reserve_descriptors()
        print(os.fstat(1023).st_ino == os.fstat(fd).st_ino, fd_size())
        """
    )
    same, size = out.split()
    assert same == "True" and int(size) >= 1024


@pytest.mark.parametrize("limit", [50, 300])
def test_reserve_stays_within_a_lower_limit(limit):
    out = _run(
        """
        from mirror import startup
        count = open_count()
        startup.reserve_descriptors()
        print(fd_size(), open_count() - count)
        """,
        prefix=["prlimit", f"--nofile={limit}:{limit}", "--"],
    )
    size, extra = map(int, out.split())
    assert extra == 0
    assert size < 1024  # grown only as far as the limit lets a descriptor go


def test_a_server_raises_its_soft_open_file_limit_to_the_hard_one(tmp_path):
    (tmp_path / "m").mkdir()
    limited = ["prlimit", "--nofile=1024:4096", "--"]  # prlimit execs the server: same pid
    with mirror_server(tmp_path, {"m": str(tmp_path / "m")}, prefix=limited) as server:
        with open(f"/proc/{server.proc.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"]


def test_a_tree_deeper_than_the_soft_limit_allows_mirrors(tmp_path):
    # Each scan holds a descriptor per level of the directory it is in: two scans of a tree
    # 600 levels deep need more than the common soft limit of 1,024.  `mirror` raises its
    # soft limit to the hard one, as a program that needs descriptors should.
    src, dst = tmp_path / "src", tmp_path / "dst"
    deep = os.path.join(src, *["d"] * 600)
    os.makedirs(deep)
    with open(os.path.join(deep, "bottom"), "wb") as f:
        f.write(b"reached")
    limited = ["prlimit", "--nofile=1024:4096", "--"]
    proc = run_mirror("sync", src, dst, prefix=limited)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_mirror("diff", src, dst, prefix=limited)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_mirrors(src, dst)
