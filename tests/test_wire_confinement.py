"""Confinement of the receiver to its module (and of the sender to its source tree): attacks
from the wire on the state dir, links, symlinks and special files, and hostile names."""

from __future__ import annotations

import os
import threading
import time

import pytest
import xxhash

from mirror import protocol as P
from mirror.entry import Kind
from mirror.epoch import bump_epoch, read_epoch
from mirror.privileges import Privileges
from mirror.transfer import sync
from tests.peers import ATTRS, RawSession, destination
from tests.snapshot import assert_mirrors


def _whole_file(req: int, path: bytes, data: bytes) -> list:
    return [[P.FILE, req, path, ATTRS, "whole", 0, 0, False], [P.DATA, req, data],
            [P.FILE_END, req, xxhash.xxh3_128(data).digest(), len(data)]]  # fmt: skip


# -- the state dir (.mirror) is reachable from the wire -----------------------------------


def test_wire_cannot_plant_a_symlink_at_the_writer_lock(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    victim = tmp_path / "victim"  # stands for /etc/passwd
    victim.write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    s = RawSession(root, start={})
    s.drain_summary()
    s.send([P.SYMLINK, b".mirror/writer.lock", os.fsencode(victim), [0o777, 0, 0, 0]])
    s.end()
    assert s.error() is not None and s.error()[1] == "UnsafePathError", s.replies
    # Refused as a name, not only defused when the lock is next opened (without following).
    assert not os.path.islink(root / ".mirror" / "writer.lock")
    RawSession(root, start={}).close()  # any later session: takes the writer lock
    assert victim.read_bytes() == b"root:x:0:0::/root:/bin/sh\n"


@pytest.mark.parametrize("how", ["rewrite", "delete"])
def test_wire_cannot_touch_the_epoch_file(tmp_path, how):
    root = tmp_path / "module"
    root.mkdir()
    state = os.fsencode(root / ".mirror")
    for _ in range(5):
        bump_epoch(state)
    s = RawSession(root, start={"epoch": 5})
    s.drain_summary()
    if how == "rewrite":
        s.send(*_whole_file(1, b".mirror/epoch", b"0\n"))
    else:
        s.send([P.DELETE, b".mirror/epoch"])
    s.end()
    assert read_epoch(state) == 5


def test_subpath_cannot_be_the_state_dir(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    state = os.fsencode(root / ".mirror")
    for _ in range(3):
        bump_epoch(state)
    s = RawSession(root, subpath=b".mirror")
    ready = s.start(epoch=3, delete=True)
    if ready is not None and ready[0] == P.READY:  # what the sender of an empty tree does next
        s.drain_summary()
        for path in (b"epoch", b"epoch.lock", b"tmp"):
            s.send([P.DELETE, path])
        s.end()
    else:
        s.close()
    assert read_epoch(state) == 3
    assert ready is None or ready[0] == P.ERROR, ready  # refused, at the handshake or at 'start'


def test_renames_cannot_move_the_state_dir(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    state = os.fsencode(root / ".mirror")
    for _ in range(4):
        bump_epoch(state)
    s = RawSession(root, start={"epoch": 4, "renames": [[b".mirror", b"stolen-state", ["d"]]]})
    if s.ready is not None and s.ready[0] == P.READY:
        s.drain_summary()
        s.end()
    else:
        s.close()
    assert read_epoch(state) == 4
    assert not (root / "stolen-state").exists()


def test_subpath_through_a_symlink_is_refused_in_a_dry_run(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    s = RawSession(root, subpath=b"link/sub")
    reply = s.start(dry_run=True)
    s.close()
    assert reply[0] == P.ERROR and reply[1] == "UnsafePathError", reply
    assert os.listdir(tmp_path / "outside") == []


# -- hard links, symlinks and special files in the replica ---------------------------------


@pytest.mark.parametrize("where", ["local", "remote"])
def test_metadata_change_never_reaches_a_hard_link_outside(tmp_path, where):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    victim = tmp_path / "victim"  # e.g. a local user's own program, hard linked into the replica
    victim.write_bytes(b"#!/bin/sh\n")
    os.chmod(victim, 0o755)
    os.utime(victim, ns=(10**18, 10**18))
    os.link(victim, dst / "tool")
    (src / "tool").write_bytes(b"#!/bin/ok\n")  # same size and mtime: only the mode differs
    os.chmod(src / "tool", 0o4755)
    os.utime(src / "tool", ns=(10**18, 10**18))
    with destination(where, dst, privileges=Privileges.everything()) as url:
        result = sync(src, url)
    assert result.ok
    assert os.stat(victim).st_mode & 0o7777 == 0o755  # never made setuid through the link
    assert_mirrors(src, dst)


def test_hardlink_to_a_deep_target_lands_at_its_own_path(tmp_path):
    root = tmp_path / "module"
    (root / "a").mkdir(parents=True)
    parts = [b"deep"] + [b"d"] * 69
    level = os.fsencode(root)
    for part in parts:
        level = os.path.join(level, part)
        os.makedirs(os.path.join(level, b"x", b"precious"))
        with open(os.path.join(level, b"x", b"precious", b"data"), "wb") as f:
            f.write(b"keep")
    with open(os.path.join(level, b"target"), "wb") as f:
        f.write(b"T")
    s = RawSession(root, start={})
    s.drain_summary()
    s.send([P.HARDLINK, b"a/x", b"/".join(parts) + b"/target"])
    s.end()
    level = os.fsencode(root)
    damaged = []
    for depth, part in enumerate(parts):
        level = os.path.join(level, part)
        if not os.path.isfile(os.path.join(level, b"x", b"precious", b"data")):
            damaged.append(depth)
    assert damaged == []
    assert os.path.samefile(root / "a" / "x", os.path.join(level, b"target"))


def test_rename_to_a_deep_path_moves_the_named_entry(tmp_path):
    root = tmp_path / "module"
    (root / "a").mkdir(parents=True)
    (root / "a" / "moved").write_bytes(b"M")
    parts = [b"deep"] + [b"d"] * 69
    level = os.fsencode(root)
    for part in parts:
        level = os.path.join(level, part)
        os.mkdir(level)
        with open(os.path.join(level, b"moved"), "wb") as f:
            f.write(b"innocent bystander")
    expect = ["f", 1, os.stat(root / "a" / "moved").st_mtime_ns, xxhash.xxh3_128_digest(b"M")]
    s = RawSession(root, start={"renames": [[b"a/moved", b"/".join(parts) + b"/new", expect]]})
    s.drain_summary()
    s.end()
    level = os.fsencode(root)
    lost = []
    for depth, part in enumerate(parts):
        level = os.path.join(level, part)
        if not os.path.exists(os.path.join(level, b"moved")):
            lost.append(depth)
    assert lost == []
    with open(os.path.join(level, b"new"), "rb") as f:
        assert f.read() == b"M"


def _waiting_for_a_reader(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked opening a FIFO for writing (no reader has opened it)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/wchan") as f:
            return f.read() == "wait_for_partner"
    except FileNotFoundError:  # the thread is gone: its open returned
        return False


def test_signature_request_never_opens_a_fifo(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    fifo = root / "pipe"
    os.mkfifo(fifo)

    def writer():  # blocks until somebody opens the FIFO for reading
        os.close(os.open(fifo, os.O_WRONLY))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not _waiting_for_a_reader(thread):
        assert time.monotonic() < deadline, "the writer never blocked in its open"
        time.sleep(0.005)
    s = RawSession(root, start={})
    s.drain_summary()
    s.send([P.SIG, [[1, b"pipe"]]])
    reply = s.until(P.SIG_FAILED)
    s.end()
    # Read from the kernel, not from the thread's own report: that one can come late.
    was_opened = not _waiting_for_a_reader(thread)
    if not was_opened:  # release the writer thread
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    thread.join(timeout=10)
    assert reply[0] == P.SIG_FAILED
    assert not was_opened, "the receiver opened a FIFO (for a device node that open can have side effects)"


@pytest.mark.parametrize("where", ["local", "remote"])
def test_sender_never_reads_through_a_directory_swapped_for_a_symlink(tmp_path, where):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "secret").write_bytes(b"decoy")
    private = tmp_path / "private"  # e.g. /root/.ssh
    private.mkdir()
    (private / "secret").write_bytes(b"TOP SECRET")

    def swap(change):  # a local user racing the sender between its scan and its read
        if change.path == b"d/secret":
            os.rename(src / "d", tmp_path / "d.old")
            os.symlink(private, src / "d")

    with destination(where, dst) as url:
        result = sync(src, url, on_change=swap)
    assert not (dst / "d" / "secret").exists() or (dst / "d" / "secret").read_bytes() != b"TOP SECRET"
    assert not result.ok  # the vanished file is reported


def test_hardlink_target_through_a_symlinked_directory_is_refused(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_bytes(b"secret")
    os.symlink(outside, root / "escape")
    s = RawSession(root, start={})
    s.drain_summary()
    s.send([P.HARDLINK, b"stolen", b"escape/shadow"], [P.HARDLINK, b"stolen2", os.fsencode(outside / "shadow")])
    s.end()
    assert not (root / "stolen").exists()
    assert os.stat(outside / "shadow").st_nlink == 1
    assert sum(m[0] == P.FAILED for m in s.replies) == 2, s.replies


def test_delete_and_attrs_through_a_symlinked_directory_are_refused(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"x")
    os.chmod(outside / "precious", 0o600)
    os.symlink(outside, root / "escape")
    os.symlink(outside / "precious", root / "file-link")
    outside_mode = os.stat(outside).st_mode
    s = RawSession(root, start={})
    s.drain_summary()
    s.send([P.DELETE, b"escape/precious"],
           [P.ATTRS, b"escape/precious", int(Kind.FILE), [0o777, 0, 0, 0]],
           [P.ATTRS, b"file-link", int(Kind.FILE), [0o777, 0, 0, 0]],
           [P.ATTRS, b"escape", int(Kind.DIR), [0o777, 0, 0, 0]])  # fmt: skip
    s.end()
    assert (outside / "precious").read_bytes() == b"x"
    assert os.stat(outside / "precious").st_mode & 0o777 == 0o600
    assert os.stat(outside).st_mode == outside_mode
    assert sum(m[0] == P.FAILED for m in s.replies) == 4, s.replies


def test_file_over_a_symlink_to_outside_replaces_the_symlink(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    os.symlink(outside, root / "f")
    s = RawSession(root, start={})
    s.drain_summary()
    s.send(*_whole_file(1, b"f", b"payload"))
    result = s.end()
    assert result[0] == P.RESULT and result[1]["failed_count"] == 0
    assert outside.read_bytes() == b"keep"
    assert not os.path.islink(root / "f") and (root / "f").read_bytes() == b"payload"


@pytest.mark.parametrize("path", [b"x" * 256, b"a/" * 4097 + b"b", b"a" * (65 * 1024), b"a/./b", b"a\0b", b"/x"])
def test_unacceptable_names_end_the_session_with_nothing_written(tmp_path, path):
    root = tmp_path / "module"
    root.mkdir()
    s = RawSession(root, start={})
    s.drain_summary()
    s.send(*_whole_file(1, path, b"evil"))
    s.end()
    error = s.error()
    assert error is not None and error[1] in ("UnsafePathError", "ProtocolError"), s.replies
    assert sorted(os.listdir(root)) == [".mirror"]
    assert os.listdir(root / ".mirror" / "tmp") == []


@pytest.mark.parametrize("path", [b"../escape", b"/escape", b"a/./b", b"", b".mirror/tmp/d"])
def test_an_unacceptable_directory_name_ends_the_session(tmp_path, path):
    # As for every other entry: a mkdir the receiver may not make is the sender's error.
    root = tmp_path / "module"
    root.mkdir()
    s = RawSession(root, start={})
    s.drain_summary()
    s.send([P.MKDIR, path, ATTRS])
    s.end()
    error = s.error()
    assert error is not None and error[1] in ("UnsafePathError", "ProtocolError"), s.replies
    assert sorted(os.listdir(root)) == [".mirror"] and sorted(os.listdir(tmp_path)) == ["module"]


def test_names_with_newlines_and_invalid_utf8_cross_unchanged(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    s = RawSession(root, start={})
    s.drain_summary()
    names = [b"new\nline", b"\xff\xfe", b"x" * 255, b"-rf", b" lead"]
    for req, name in enumerate(names, 1):
        s.send(*_whole_file(req, name, name))
    result = s.end()
    assert result[1]["failed_count"] == 0
    for name in names:
        with open(os.path.join(os.fsencode(root), name), "rb") as f:
            assert f.read() == name
