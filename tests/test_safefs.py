"""ConfinedTree's directory-descriptor cache: bounded however deep the path, and never a way
through a directory the tree itself removed and something else replaced."""

from __future__ import annotations

import os
import resource
import threading

import pytest

from mirror import safefs
from mirror.errors import UnsafePathError
from mirror.safefs import ConfinedTree


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_path_deeper_than_the_cache_keeps_the_cache_bounded(tmp_path):
    root = os.fsencode(tmp_path / "root")
    os.mkdir(root)
    depth = safefs._FD_CACHE * 3
    parts = [b"d%d" % i for i in range(depth)]
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for part in parts:  # made one level at a time: a path this long is beyond PATH_MAX
        os.mkdir(part, dir_fd=fd)
        child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    with open(os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"deep")
    os.close(fd)
    before = _open_fds()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for the cache, the root and the file, not for one descriptor per level of the path.
    resource.setrlimit(resource.RLIMIT_NOFILE, (before + safefs._FD_CACHE + 8, hard))
    tree = ConfinedTree(root)
    try:
        with tree.open_regular(b"/".join(parts + [b"leaf"])) as f:
            assert f.read() == b"deep"
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert _open_fds() - before <= safefs._FD_CACHE + 1  # the cache and the root
        # Every directory on the way was cached: a sibling path walks from its parent.
        assert len(tree._cache) == safefs._FD_CACHE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        tree.close()
    assert _open_fds() == before


def test_a_directory_the_tree_removed_and_an_outsider_replaced_by_a_symlink_is_never_entered(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (outside / "c").mkdir(parents=True)
    tree = ConfinedTree(os.fsencode(root))
    try:
        tree.dir_fd([b"a", b"b", b"c"])  # caches a, a/b and a/b/c
        tree.remove(b"a/b")
        os.symlink(outside, root / "a" / "b")
        with pytest.raises(UnsafePathError):
            tree.dir_fd([b"a", b"b", b"c"])
        with pytest.raises(UnsafePathError):
            tree.new_file(b"a/b/c/planted")
    finally:
        tree.close()
    assert os.listdir(outside / "c") == []


def test_a_temporary_file_beside_its_target_commits_after_the_cache_closed_that_directory(tmp_path):
    # No temp dir (as for a target on another mount below the root): the temporary file is
    # made beside its target.  The cache then closes the target directory's descriptor, and
    # its number goes to another directory: the commit must still rename in the right place.
    root = tmp_path / "root"
    for i in range(safefs._FD_CACHE + 8):
        (root / f"d{i:03d}").mkdir(parents=True)
    tree = ConfinedTree(os.fsencode(root))
    try:
        commit = tree.new_file(b"d000/file")
        commit.file.write(b"new content")
        for i in range(1, safefs._FD_CACHE + 8):  # evicts d000, and reuses descriptor numbers
            tree.dir_fd([b"d%03d" % i])
        commit.finish(0o644, os.getuid(), os.getgid(), 1_000_000_000, owner=False)
        commit.commit()
        commit.release()
    finally:
        tree.close()
    assert (root / "d000" / "file").read_bytes() == b"new content"
    assert sorted(p.name for p in (root / "d000").iterdir()) == ["file"]  # no temporary file left
    assert not any((root / f"d{i:03d}" / "file").exists() for i in range(1, safefs._FD_CACHE + 8))


def _held_deleted_files(root) -> list[str]:
    """Files under ``root`` this process still holds open although they are gone."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)) and target.endswith(" (deleted)"):
            held.append(target)
    return held


def test_replaced_and_removed_files_are_freed_by_the_time_the_tree_closes(tmp_path):
    """Replaced files are let go of by the reaper's thread (see safefs._Reaper): all of them
    once the tree is closed, however many were replaced."""
    for i in range(40):
        (tmp_path / f"f{i}").write_bytes(b"old" * 1000)
    tree = ConfinedTree(os.fsencode(tmp_path))
    for i in range(30):
        commit = tree.new_file(b"f%d" % i)
        commit.file.write(b"new")
        commit.finish(0o644, 0, 0, 10**18, owner=False)
        commit.commit()
        commit.release()
    for i in range(30, 40):
        tree.remove(b"f%d" % i)
    assert tree._reaper._thread is not None  # more than a live session's few: it was used
    tree.close()
    assert _held_deleted_files(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name == "reaper"]
    assert sorted(os.listdir(tmp_path)) == sorted(f"f{i}" for i in range(30))
    assert all((tmp_path / f"f{i}").read_bytes() == b"new" for i in range(30))


def test_a_few_replaced_files_need_no_reaper_thread(tmp_path):
    (tmp_path / "f").write_bytes(b"old")
    tree = ConfinedTree(os.fsencode(tmp_path))
    try:
        commit = tree.new_file(b"f")
        commit.file.write(b"new")
        commit.commit()
        commit.release()
        assert tree._reaper._thread is None and _held_deleted_files(tmp_path) == []
    finally:
        tree.close()
