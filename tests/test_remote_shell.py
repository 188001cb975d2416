"""The remote shell transport: the destination path reaches the remote shell quoted."""

from __future__ import annotations

import os
import sys

import pytest

from mirror.errors import EXIT_GUARD
from tests.helpers import is_root, mounted, run_mirror

# -- the remote shell transport --------------------------------------------------------------

_SSH_LIKE = """#!/bin/sh
# What ssh does with a remote command: drop the host, join the arguments with spaces and
# hand the line to the remote user's shell, in the remote user's home directory.
shift
cd '{home}' || exit 1
exec sh -c "$*"
"""


def _ssh_like_and_source(tmp_path):
    """The ssh stand-in, a one-file source, and this Python's mirror as the remote command."""
    rsh = tmp_path / "ssh-like"
    rsh.write_text(_SSH_LIKE.format(home=tmp_path))
    rsh.chmod(0o755)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    return rsh, src, f"{sys.executable} -m mirror"


def test_remote_path_reaches_the_remote_shell_quoted(tmp_path):
    rsh, src, remote = _ssh_like_and_source(tmp_path)
    for name in ("replica; touch CANARY", "with space"):
        proc = run_mirror("sync", "--rsh", str(rsh), "--remote-command", remote, str(src),
                          f"somehost:{tmp_path / name}")  # fmt: skip
        assert not (tmp_path / "CANARY").exists(), "the destination path was run as a shell command"
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / name / "f").read_bytes() == b"x"


def test_a_remote_shell_that_cannot_start_is_a_connect_error_naming_it(tmp_path):
    from mirror import sync
    from mirror.errors import ConnectError

    src = tmp_path / "src"
    src.mkdir()
    missing = str(tmp_path / "no-such-ssh")
    try:
        sync(str(src), f"somehost:{tmp_path / 'replica'}", rsh=missing)
    except ConnectError as exc:
        assert missing in str(exc) and "somehost" in str(exc), exc
    else:
        raise AssertionError("a sync through a remote shell that does not exist succeeded")
    proc = run_mirror("sync", "--rsh", missing, str(src), f"somehost:{tmp_path / 'replica'}")
    assert proc.returncode == 2, proc
    assert b"cannot start the remote shell" in proc.stderr and b"Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "replica").exists()


def test_the_daemon_runs_the_remote_shell_and_command_it_is_given(tmp_path):
    """``mirror daemon --rsh --remote-command`` (``rsh``, ``remote_command`` in a pair of its
    configuration), as ``mirror sync`` takes them: a remote mirror off the remote PATH, a
    remote shell with options of its own."""
    from tests.daemons import converged, live_daemon

    rsh, src, remote = _ssh_like_and_source(tmp_path)
    with live_daemon(src, f"somehost:{tmp_path / 'replica'}", "--rsh", str(rsh), "--remote-command", remote):
        converged(src, tmp_path / "replica")
    config = tmp_path / "daemon.toml"
    config.write_text(
        f'[[pair]]\nsource = "{src}"\ndestination = "somehost:{tmp_path / "second"}"\n'
        f'rsh = "{rsh}"\nremote_command = "{remote}"\n'
    )
    with live_daemon(src, None, "--config", str(config)):
        (src / "g").write_bytes(b"y")
        converged(src, tmp_path / "second")


@pytest.mark.skipif(not is_root(), reason="mounts a file system")
def test_a_remote_replica_that_must_be_a_mount_point_is_refused_while_nothing_is_mounted(tmp_path):
    """``--remote-option=--require-mount``: `mirror receive` makes nothing at its PATH while
    nothing is mounted there (not the tree, not a ``.mirror``), and the sender hears why (exit
    25, the receiver's reason); once its disk is mounted the sync goes through."""
    rsh, src, remote = _ssh_like_and_source(tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    args = ["sync", "--rsh", str(rsh), "--remote-command", remote, "--remote-option=--require-mount", str(src)]
    for replica in (disk, disk / "missing"):
        proc = run_mirror(*args, f"somehost:{replica}", check_codes=(EXIT_GUARD,))
        assert f"receiver: refused: the replica {replica} is not a mount point" in proc.stderr.decode(), proc.stderr
        assert os.listdir(disk) == []
    with mounted(disk):
        assert run_mirror(*args, f"somehost:{disk}").returncode == 0
        assert (disk / "f").read_bytes() == b"x"


@pytest.mark.skipif(not is_root(), reason="mounts a file system")
def test_a_remote_replica_whose_disk_did_not_come_up_is_refused_without_any_option(tmp_path):
    """No option given: the receiver says which mount point its replica lies under, the
    source remembers it, and once nothing is mounted there the sync is refused (exit 25)
    before its session starts: `mirror receive` makes nothing there.  Any disk mounted there
    is taken; ``--no-dst-require-mount`` writes into the directory as it is, and forgets."""
    rsh, src, remote = _ssh_like_and_source(tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    replica = disk / "replica"

    def sync(*extra, codes=(0,)):
        return run_mirror("sync", "--rsh", str(rsh), "--remote-command", remote, *extra, str(src),
                          f"somehost:{replica}", check_codes=codes)  # fmt: skip

    with mounted(disk):
        sync()
        assert (replica / "f").read_bytes() == b"x"
    for extra in ([], ["--delete"], ["--dry-run"]):
        err = sync(*extra, codes=(EXIT_GUARD,)).stderr.decode()
        assert f"nothing is mounted at {disk} on somehost, where the replica somehost:{replica} was" in err, err
        assert os.listdir(disk) == []
    with mounted(disk):  # another disk: taken
        sync()
        assert (replica / "f").read_bytes() == b"x"
    sync("--no-dst-require-mount")
    assert (replica / "f").read_bytes() == b"x"
    sync()  # forgotten
