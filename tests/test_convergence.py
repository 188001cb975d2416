"""Trees that must converge (an independent walk says the replica equals the source after one
sync), including deep and long paths, excludes with --delete, hard links."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mirror.compare
import mirror.sourcesession
import mirror.treescan
from mirror import fastpath, safefs
from mirror.transfer import sync
from tests.helpers import is_root
from tests.peers import RawSession, destination, temp_files
from tests.snapshot import assert_mirrors
from tests.trees import chain


def _read_chain_leaf(root, depth: int, name: bytes = b"d") -> bytes | None:
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        for _ in range(depth):
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open(b"leaf", os.O_RDONLY, dir_fd=fd)
        with os.fdopen(leaf, "rb") as f:
            return f.read()
    except OSError:
        return None
    finally:
        os.close(fd)


def _remove(*paths) -> None:
    # coreutils rm walks any depth; shutil.rmtree (and pytest's cleanup) recurse in Python.
    subprocess.run(["rm", "-rf", "--", *map(str, paths)], check=True)


# -- directory times and --delete ----------------------------------------------------------


def test_deleting_restores_the_parent_directory_times(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(b"a")
    (src / "d" / "b").write_bytes(b"b")
    (src / "top").write_bytes(b"t")
    assert sync(src, dst).ok
    os.unlink(src / "d" / "b")
    os.unlink(src / "top")
    assert sync(src, dst).ok  # without --delete: the directories' times are copied, the files stay
    result = sync(src, dst, delete=True)
    assert result.ok
    assert_mirrors(src, dst)


def test_deleting_a_directory_keeps_the_excluded_files_in_it(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (dst / "old").mkdir(parents=True)
    (dst / "old" / "local.log").write_bytes(b"the replica's own log, excluded")
    (dst / "old" / "stale").write_bytes(b"stale")
    sync(src, dst, delete=True, excludes=[b"*.log"], allow_mass_delete=True)  # the source is empty
    assert (dst / "old" / "local.log").read_bytes() == b"the replica's own log, excluded"
    assert not (dst / "old" / "stale").exists()


# -- hard links ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "remote"])
def test_relinking_after_a_failed_leader_leaves_no_temporary_file(tmp_path, where):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "a").write_bytes(b"v1")
    os.link(src / "a", src / "b")
    assert sync(src, dst).ok
    (src / "a").write_bytes(b"version two")

    def leader_vanishes(change):  # the leader cannot be read any more when its turn comes
        if change.path == b"a":
            os.rename(src / "a", tmp_path / "a.moved")

    with destination(where, dst) as url:
        result = sync(src, url, on_change=leader_vanishes)
    assert temp_files(dst) == []
    assert [path for path, _ in result.failed] == [b"a"]
    assert sorted(os.listdir(dst)) == [".mirror", "a", "b"]


_names = st.sampled_from([b"a", b"b", b"d/c", b"d/e"])
_shape = st.one_of(st.none(), st.tuples(st.integers(0, 2), st.sampled_from([b"1", b"22", b"x" * 300])),
                   st.sampled_from(["dir", "symlink"]))  # fmt: skip
_tree = st.fixed_dictionaries({n: _shape for n in (b"a", b"b", b"d/c", b"d/e")})


def _build_links(root: bytes, spec: dict, dir_time: int) -> None:
    os.makedirs(os.path.join(root, b".mirror"))  # made first: creating it later moves the root's mtime
    os.mkdir(os.path.join(root, b"d"))
    leaders: dict[int, bytes] = {}
    for name, shape in spec.items():
        path = os.path.join(root, name)
        if shape is None:
            continue
        if shape == "dir":
            os.mkdir(path)
            with open(os.path.join(path, b"inner"), "wb") as f:
                f.write(b"i")
        elif shape == "symlink":
            os.symlink(b"target", path)
        elif shape[0] in leaders:
            os.link(leaders[shape[0]], path)
        else:
            with open(path, "wb") as f:
                f.write(shape[1] + b"%d" % shape[0])
            os.utime(path, ns=(10**18 + shape[0], 10**18 + shape[0]))
            leaders[shape[0]] = path
    for directory in (root, os.path.join(root, b"d")):
        os.utime(directory, ns=(dir_time, dir_time))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(_tree, _tree, st.booleans())
def test_hard_link_groups_and_type_changes_converge(tmp_path_factory, first, second, checksum):
    base = os.fsencode(tmp_path_factory.mktemp("links"))
    s1, s2, dst = (os.path.join(base, n) for n in (b"s1", b"s2", b"dst"))
    # The two versions' directories have different times, so the sender always sends them
    # (deletions in a directory whose times match are test_deleting_restores_the_parent_directory_times).
    _build_links(s1, first, 10**18 + 1)
    _build_links(s2, second, 10**18 + 2)
    for src in (s1, s2):  # two source trees, one replica: the source guard is told it is meant
        result = sync(src, dst, delete=True, checksum=checksum, fsync=False, allow_mass_delete=True)
        assert result.ok, (result.failed, result.problems)
        assert_mirrors(src, dst)
    again = sync(s2, dst, delete=True, checksum=checksum, fsync=False)
    assert again.ok
    assert_mirrors(s2, dst)
    assert sorted(os.listdir(dst)) == sorted(os.listdir(s2))


# -- deep trees and long paths -------------------------------------------------------------


def test_a_tree_deeper_than_the_recursion_limit_is_mirrored(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    try:
        chain(src, b"d", 1100)
        result = sync(src, dst, fsync=False)
        assert result.ok, (result.failed[:3], result.problems[:3])
        assert _read_chain_leaf(dst, 1100) == b"leaf"
    finally:
        _remove(src, dst)


def test_a_file_replaces_a_directory_deeper_than_the_recursion_limit(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (dst / "x").mkdir(parents=True)
    try:
        (src / "x").write_bytes(b"now a file")
        chain(dst / "x", b"d", 1200, leaf=None)
        result = None
        try:
            result = sync(src, dst, delete=True, fsync=False)
        finally:
            leftovers = temp_files(dst)
        assert result.ok, result.failed
        assert (dst / "x").read_bytes() == b"now a file"
        assert leftovers == []
    finally:
        _remove(src, dst)


def test_paths_longer_than_path_max_are_mirrored(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    chain(src, b"n" * 250, 20, leaf=b"deep content")  # a 5 KB relative path
    result = sync(src, dst, fsync=False)
    assert result.ok, [(len(p), why) for p, why in result.failed]
    assert _read_chain_leaf(dst, 20, name=b"n" * 250) == b"deep content"


@pytest.mark.skipif(not is_root(), reason="needs root for a bind mount")
def test_files_under_a_bind_mount_inside_the_replica_are_committed(tmp_path):
    src, dst, other = tmp_path / "src", tmp_path / "dst", tmp_path / "other"
    (src / "b").mkdir(parents=True)
    (dst / "b").mkdir(parents=True)
    other.mkdir()
    (src / "b" / "f").write_bytes(b"x")
    if subprocess.run(["mount", "--bind", str(other), str(dst / "b")]).returncode != 0:
        pytest.skip("cannot bind mount here")
    try:
        result = sync(src, dst, fsync=False)
        assert result.ok, result.failed
        assert (dst / "b" / "f").read_bytes() == b"x"
    finally:
        subprocess.run(["umount", str(dst / "b")], check=True)


@pytest.mark.skipif(not is_root(), reason="needs root to mount")
def test_many_directories_on_another_filesystem_inside_the_replica_are_committed(tmp_path):
    # A tmpfs below the replica's root: its files cannot be renamed from the state dir's
    # temp dir, so each is written beside its target.  More directories than the receiver
    # keeps descriptors for: the early ones are closed (and their numbers reused) before the
    # batch commits.  Every file must still land in its own directory, durably.
    src, dst = tmp_path / "src", tmp_path / "dst"
    count = safefs._FD_CACHE + 20
    for i in range(count):
        (src / "t" / f"d{i:03d}").mkdir(parents=True)
        (src / "t" / f"d{i:03d}" / "f").write_bytes(b"file %d" % i)
    (dst / "t").mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(dst / "t")]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = sync(src, dst)
        assert result.ok, result.failed
        for i in range(count):
            d = dst / "t" / f"d{i:03d}"
            assert sorted(os.listdir(d)) == ["f"]  # its own file, and no temporary file
            assert (d / "f").read_bytes() == b"file %d" % i
    finally:
        subprocess.run(["umount", "-l", str(dst / "t")], check=True)


# -- the state dir -------------------------------------------------------------------------


def test_a_subpath_checksum_sync_keeps_its_cache_out_of_the_content(tmp_path):
    root = tmp_path / "module"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"x")
    s = RawSession(root, subpath=b"a", start={"flags": fastpath.choose("scan").CMP_CHECKSUM})
    s.drain_summary()
    s.end()
    assert sorted(os.listdir(root / "a")) == ["f"]


@pytest.mark.parametrize("where", ["local", "remote"])
def test_first_checksum_sync_copies_the_real_root_time(tmp_path, monkeypatch, where):
    # Fault injection: the real steps of ensure_state_dir with the window between them held
    # open, and the root read inside that window by whichever driver this sync uses, so the
    # race that happens by chance happens every time.
    created = threading.Event()
    reads_in_window = []
    real_root_entry = mirror.compare.root_entry

    def ensure_state_dir_slowly(path):
        path = os.fsencode(path)
        if os.path.isdir(path):
            return path
        parent = os.path.dirname(os.path.abspath(path))
        before = os.stat(parent)
        os.makedirs(path, mode=0o700)
        created.set()
        time.sleep(0.2)
        os.utime(parent, ns=(before.st_atime_ns, before.st_mtime_ns))
        return path

    def root_entry_after_creation(root):
        reads_in_window.append(created.wait(1.0))
        return real_root_entry(root)

    monkeypatch.setattr(mirror.treescan, "ensure_state_dir", ensure_state_dir_slowly)
    monkeypatch.setattr(mirror.sourcesession, "root_entry", root_entry_after_creation)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_bytes(b"x")
    os.utime(src, ns=(10**18, 10**18))
    with destination(where, dst) as url:
        assert sync(src, url, checksum=True).ok
    assert reads_in_window and all(reads_in_window)  # the injection reached the driver's read
    assert os.stat(src).st_mtime_ns == 10**18
    assert os.stat(dst).st_mtime_ns == 10**18
