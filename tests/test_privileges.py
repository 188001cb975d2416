"""A holder of the secret cannot plant privileged objects in a module that does not grant
them (``mirror.privileges``), nor fence a module for good with a huge epoch.  Real msgpack
frames through the real decoder where it matters (``mirror serve``), the in-process
transport elsewhere (the receiver checks the same fields either way)."""

from __future__ import annotations

import os
import stat

import pytest
import xxhash

from mirror import protocol as P
from mirror.entry import Kind
from mirror.epoch import MAX_EPOCH, MAX_EPOCH_STEP, bump_epoch, read_epoch
from mirror.errors import StaleEpochError
from mirror.privileges import Privileges
from mirror.transfer import sync
from tests.helpers import is_root, run_mirror
from tests.peers import RawSession
from tests.servers import SECRET, mirror_server

needs_root = pytest.mark.skipif(not is_root(), reason="device nodes and owners need root")
DEV_MEM = os.makedev(1, 1)
DEV_SDA = os.makedev(8, 0)
T = 1_000_000_000_000_000_000


def _file(req: int, path: bytes, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> list[list]:
    return [[P.FILE, req, path, [mode, uid, gid, T], "whole", 0, 0, False], [P.DATA, req, data],
            [P.FILE_END, req, xxhash.xxh3_128_digest(data), len(data)]]  # fmt: skip


def _session(root, privileges: Privileges | None = None, **start) -> RawSession:
    options = {"privileges": privileges} if privileges is not None else None
    s = RawSession(root, start=start, module_options=options)
    assert s.ready[0] == P.READY, s.ready
    s.drain_summary()
    return s


def _failures(s: RawSession) -> dict[bytes, str]:
    return {m[2]: m[3] for m in s.replies if m[0] == P.FAILED}


@pytest.mark.parametrize("kind, rdev, words", [
    (Kind.CHAR, DEV_MEM, "device nodes"),  # /dev/mem's numbers
    (Kind.BLOCK, DEV_SDA, "device nodes"),  # /dev/sda's
    (Kind.FIFO, 0, "FIFOs or sockets"),
    (Kind.SOCKET, 0, "FIFOs or sockets"),
])  # fmt: skip
def test_nodes_are_refused_and_the_rest_goes_on(tmp_path, kind, rdev, words):
    root = tmp_path / "module"
    root.mkdir()
    s = _session(root)
    s.send([P.NODE, b"planted", kind, rdev, [0o666, 0, 0, T]], *_file(1, b"ordinary", b"content", 0o644))
    result = s.end()
    assert result[0] == P.RESULT and result[1]["failed_count"] == 1, s.replies
    assert words in _failures(s)[b"planted"]
    assert not os.path.lexists(root / "planted")
    assert (root / "ordinary").read_bytes() == b"content"


@needs_root
def test_a_module_that_allows_devices_gets_them(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    s = _session(root, Privileges(devices=True, specials=True))
    s.send(
        [P.NODE, b"mem", Kind.CHAR, DEV_MEM, [0o600, 0, 0, T]],
        [P.NODE, b"fifo", Kind.FIFO, 0, [0o644, 0, 0, T]],
    )
    assert s.end()[1]["failed_count"] == 0, s.replies
    st = os.lstat(root / "mem")
    assert (
        stat.S_ISCHR(st.st_mode) and st.st_rdev == DEV_MEM and stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)
    )


@needs_root
def test_an_existing_device_node_is_not_made_world_writable(tmp_path):
    """A node the administrator made in the replica: no chmod of it, under any claimed kind,
    and no second name for it either."""
    root = tmp_path / "module"
    root.mkdir()
    os.mknod(root / "disk", 0o600 | stat.S_IFBLK, DEV_SDA)
    s = _session(root)
    s.send([P.ATTRS, b"disk", Kind.FILE, [0o666, 0, 0, T]], [P.ATTRS, b"disk", Kind.BLOCK, [0o666, 0, 0, T]],
           [P.HARDLINK, b"another-name", b"disk"])  # fmt: skip
    s.end()
    assert "device nodes" in _failures(s)[b"disk"] and "device nodes" in _failures(s)[b"another-name"]
    assert stat.S_IMODE(os.lstat(root / "disk").st_mode) == 0o600
    assert not os.path.lexists(root / "another-name")


def test_setid_bits_are_removed_from_files(tmp_path):
    root = tmp_path / "module"
    (root / "shared").mkdir(parents=True)
    (root / "old").write_bytes(b"x")
    s = _session(root)
    s.send(*_file(1, b"suid-root-shell", b"#!/bin/sh\n", 0o6755), [P.ATTRS, b"old", Kind.FILE, [0o4777, 0, 0, T]],
           [P.ATTRS, b"shared", Kind.DIR, [0o2775, 0, 0, T]])  # fmt: skip
    assert s.end()[1]["failed_count"] == 0, s.replies
    assert stat.S_IMODE(os.lstat(root / "suid-root-shell").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(root / "old").st_mode) == 0o777
    assert stat.S_IMODE(os.lstat(root / "shared").st_mode) == 0o2775  # a directory keeps setgid


def test_a_module_that_allows_setid_keeps_it(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    s = _session(root, Privileges(setid=True))
    s.send(*_file(1, b"prog", b"x", 0o4755))
    s.end()
    assert stat.S_IMODE(os.lstat(root / "prog").st_mode) == 0o4755


@needs_root
@pytest.mark.parametrize("owners", [False, True])
def test_owners_are_kept_only_where_the_module_allows(tmp_path, owners):
    root = tmp_path / "module"
    root.mkdir()
    s = _session(root, Privileges(owners=owners), owner=True)  # the sender asks for owners
    welcome = next(m for m in s.replies if m[0] == P.WELCOME)
    assert welcome[1]["can_chown"] is owners
    s.send(*_file(1, b"mail", b"for user 1234", 0o600, uid=1234, gid=1234))
    s.end()
    st = os.lstat(root / "mail")
    assert (st.st_uid, st.st_gid) == ((1234, 1234) if owners else (0, 0))


def test_sync_to_a_server_reports_refused_nodes_and_mirrors_the_rest(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "replica"
    src.mkdir()
    dst.mkdir()
    os.mkfifo(src / "pipe")
    (src / "prog").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "prog", 0o4755)
    (src / "plain").write_bytes(b"plain")
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        proc = run_mirror("sync", src, server.url("m"), "--secret-file", server.secret_file, check_codes=(1,))
        assert b"pipe: refused: this module does not accept FIFOs" in proc.stderr, proc.stderr
    assert not os.path.lexists(dst / "pipe") and (dst / "plain").read_bytes() == b"plain"
    assert stat.S_IMODE(os.lstat(dst / "prog").st_mode) == 0o755


def test_serve_flags_and_config_keys_grant_privileges(tmp_path):
    from mirror.config import load_serve_config

    (tmp_path / "secret").write_text("a-long-enough-secret\n")
    (tmp_path / "secret").chmod(0o600)
    (tmp_path / "serve.toml").write_text(
        f'secret_file = "{tmp_path}/secret"\n[modules.m]\npath = "{tmp_path}"\nallow_devices = true\nkeep_owners = true\n'
    )
    module = load_serve_config(str(tmp_path / "serve.toml")).modules["m"]
    assert module.privileges == Privileges(devices=True, owners=True)
    (tmp_path / "serve.toml").write_text(
        f'secret_file = "{tmp_path}/secret"\n[modules.m]\npath = "{tmp_path}"\n'
    )
    assert load_serve_config(str(tmp_path / "serve.toml")).modules["m"].privileges == Privileges()


# -- the epoch ------------------------------------------------------------------------------------


def test_a_huge_epoch_rises_a_bounded_step_per_session(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    state = os.fsencode(root / ".mirror")
    for _ in range(5):
        bump_epoch(state)
    for session in (1, 2):
        s = RawSession(root, start={"epoch": MAX_EPOCH})
        assert s.ready[0] == P.READY and s.ready[1]["epoch"] == 5 + session * MAX_EPOCH_STEP, s.ready
        s.drain_summary()
        s.end()
    assert read_epoch(state) == 5 + 2 * MAX_EPOCH_STEP


def test_the_real_primary_takes_a_raised_module_back(tmp_path):
    """Whoever raised the replica's epoch, the primary bumps its own past it and is accepted."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    src.mkdir()
    replica.mkdir()
    (src / "f").write_text("data")
    src_state = os.fsencode(src / ".mirror")
    bump_epoch(src_state)
    with mirror_server(tmp_path, {"m": str(replica)}) as server:
        assert sync(src, server.url("m"), secret=SECRET).ok
        hostile = RawSession(replica, start={"epoch": MAX_EPOCH})  # the secret's holder, in process
        hostile.drain_summary()
        hostile.end()
        with pytest.raises(StaleEpochError):
            sync(src, server.url("m"), secret=SECRET)
        run_mirror(
            "epoch",
            "bump",
            src,
            "--to",
            str(read_epoch(os.fsencode(replica / ".mirror")) + 1),
            check_codes=(0,),
        )
        assert sync(src, server.url("m"), secret=SECRET).ok
    assert read_epoch(os.fsencode(replica / ".mirror")) == read_epoch(src_state) < 100


def test_epoch_bump_to_only_rises(tmp_path):
    tree = tmp_path / "t"
    tree.mkdir()
    run_mirror("epoch", "bump", tree, "--to", "40", check_codes=(0,))
    proc = run_mirror("epoch", "bump", tree, "--to", "39", check_codes=(2,))
    assert b"only rises" in proc.stderr
    assert read_epoch(os.fsencode(tree / ".mirror")) == 40
