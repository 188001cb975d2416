"""A node of the release before (protocol version 4) and this one mirror to each other, both
ways, as the two nodes of a cluster do while it is upgraded one node at a time: this sender
to a receiver of the release before, and a sender of the release before to this receiver.

The release before is this repository's own last commit of version 4, taken from its
history (``git archive``) and run as pure Python, through the same remote-shell transport a
user's ``ssh`` gives.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mirror import protocol as P
from tests.helpers import REPO, run_mirror, sparse_file, unpack_previous_release

_RSH = """#!/bin/sh
# What ssh does with a remote command: drop the host, hand the rest to a shell.
shift
exec sh -c "$*"
"""


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory):
    """The release before's ``mirror`` package, unpacked in a directory of its own."""
    where = unpack_previous_release(tmp_path_factory.mktemp("previous-release"), "mirror")
    version = subprocess.run([sys.executable, "-c", "import mirror.protocol as P; print(P.PROTOCOL_VERSION)"],
                             cwd=where, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert int(version) == P.OLDEST_VERSION == P.PROTOCOL_VERSION - 1
    return where


def _command(cwd) -> str:
    """``python -m mirror`` of the package in ``cwd``, as a remote shell runs it (the release
    before as pure Python: it is not compiled here)."""
    if str(cwd) == REPO:
        return f"cd '{cwd}' && '{sys.executable}' -m mirror"
    return f"cd '{cwd}' && env -u MIRROR_REQUIRE_FAST MIRROR_FORCE_PURE=1 '{sys.executable}' -m mirror"


def _tree(root) -> None:
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "small").write_bytes(b"small\n")
    (root / "big").write_bytes(os.urandom(1 << 20))  # updated below as a delta
    (root / "gone").write_bytes(b"deleted below\n")
    os.symlink("d/e/small", root / "link")
    sparse_file(root / "image", 8 << 20, [(0, 4096), (5 << 20, 70_000)])


def _change(root) -> None:
    with open(root / "big", "r+b") as f:
        f.seek(300_000)
        f.write(b"changed in the middle")
    with open(root / "image", "r+b") as f:
        f.seek(5 << 20)
        f.write(os.urandom(4096))
    (root / "gone").unlink()
    (root / "d" / "new").write_bytes(b"new\n")


def _identical(src, dst) -> None:
    proc = run_mirror("diff", "--checksum", "--no-cache", str(src), str(dst))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b""), proc


@pytest.mark.parametrize("sender_is", ["this release", "the release before"])
def test_a_sender_and_a_receiver_a_release_apart_mirror_to_each_other(tmp_path, previous_release, sender_is):
    rsh = tmp_path / "rsh-like"
    rsh.write_text(_RSH)
    rsh.chmod(0o755)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _tree(src)
    sender, receiver = (REPO, previous_release) if sender_is == "this release" else (previous_release, REPO)
    env = dict(os.environ)
    if sender == previous_release:
        env.pop("MIRROR_REQUIRE_FAST", None)
        env["MIRROR_FORCE_PURE"] = "1"
    for step in ("whole", "update"):
        if step == "update":
            _change(src)
        argv = [sys.executable, "-m", "mirror", "sync", "--delete", "--rsh", str(rsh),
                "--remote-command", _command(receiver), str(src), f"otherhost:{dst}"]  # fmt: skip
        proc = subprocess.run(argv, cwd=sender, env=env, capture_output=True, timeout=300)
        assert proc.returncode == 0 and b"Traceback" not in proc.stderr, (step, proc.stderr.decode())
        _identical(src, dst)
