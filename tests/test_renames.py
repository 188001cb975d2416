"""Renames are done on the replica only when its old entry holds what the new name must
(``mirror.renames``): never an incomplete temporary copy over a final name."""

from __future__ import annotations

import os

import pytest
import xxhash

from mirror import protocol as P
from mirror.renames import plan
from mirror.safefs import ConfinedTree
from mirror.transfer import Connection
from mirror.treescan import Scope
from tests.peers import RawSession
from tests.snapshot import assert_mirrors


def _expect_file(data: bytes, mtime_ns: int) -> list:
    return ["f", len(data), mtime_ns, xxhash.xxh3_128_digest(data)]


def test_an_incomplete_temporary_copy_is_never_renamed_over_a_final_name(tmp_path):
    """The replica caught ``n.tmp`` empty (created, not yet written); the source then wrote
    it and renamed it over ``n``.  The rename must not show the empty copy at ``n``."""
    root = tmp_path / "module"
    root.mkdir()
    (root / "n").write_bytes(b"version 1")
    (root / "n.tmp").write_bytes(b"")
    mtime = os.stat(root / "n.tmp").st_mtime_ns
    s = RawSession(root, start={"renames": [[b"n.tmp", b"n", _expect_file(b"version 2", mtime)]]})
    assert s.ready[0] == P.READY, s.ready
    # The renames are done before 'ready': the final name still holds a complete version.
    assert (root / "n").read_bytes() == b"version 1"
    assert (root / "n.tmp").exists()
    s.drain_summary()
    assert s.end()[0] == P.RESULT


@pytest.mark.parametrize("what", ["size", "mtime", "digest", "kind"])
def test_a_rename_is_refused_unless_every_field_matches(tmp_path, what):
    root = tmp_path / "module"
    root.mkdir()
    data = b"complete content"
    (root / "old").write_bytes(data)
    mtime = os.stat(root / "old").st_mtime_ns
    expect = _expect_file(data, mtime)
    if what == "size":
        expect[1] += 1
    elif what == "mtime":
        expect[2] += 1
    elif what == "digest":
        expect[3] = xxhash.xxh3_128_digest(b"complete CONTENT")  # same size, same mtime
    else:
        expect = ["d"]
    s = RawSession(root, start={"renames": [[b"old", b"new", expect]]})
    assert s.ready[0] == P.READY, s.ready
    assert (root / "old").read_bytes() == data and not (root / "new").exists()
    s.drain_summary()
    s.end()


def test_a_matching_rename_is_done(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    (root / "old").write_bytes(b"same")
    (root / "link").symlink_to("target")
    (root / "dir").mkdir()
    mtime = os.stat(root / "old").st_mtime_ns
    renames = [[b"old", b"new", _expect_file(b"same", mtime)], [b"link", b"link2", ["l", b"target"]],
               [b"dir", b"dir2", ["d"]]]  # fmt: skip
    s = RawSession(root, start={"renames": renames})
    assert s.ready[0] == P.READY, s.ready
    assert (root / "new").read_bytes() == b"same"
    assert os.readlink(root / "link2") == "target"
    assert (root / "dir2").is_dir()
    s.drain_summary()
    s.end()


@pytest.mark.parametrize("renames", [
    [[b"a", b"b"]],  # no expectation (the first protocol's form)
    [[b"a", b"b", []]],
    [[b"a", b"b", ["f", 1, 2]]],
    [[b"a", b"b", ["f", -1, 2, b"x" * 16]]],
    [[b"a", b"b", ["f", 1, 2, b"x" * 17]]],
    [[b"a", b"b", ["l", "not bytes"]]],
    [[b"a", b"b", ["x"]]],
    [[b"a", b"../b", ["d"]]],
    "not a list",
])  # fmt: skip
def test_malformed_renames_end_the_session_with_nothing_moved(tmp_path, renames):
    root = tmp_path / "module"
    root.mkdir()
    (root / "a").write_bytes(b"A")
    s = RawSession(root, start={"renames": renames})
    assert s.ready[0] == P.ERROR, s.ready
    s.close()
    assert (root / "a").read_bytes() == b"A" and not (root / "b").exists()


def test_plan_follows_a_chain_of_renames(tmp_path):
    """a -> b, then b -> c: the first rename must leave at b what c holds now."""
    (tmp_path / "c").write_bytes(b"mail")
    (tmp_path / "d").mkdir()
    tree = ConfinedTree(os.fsencode(tmp_path))
    try:
        items, trees = plan([(b"a", b"b"), (b"b", b"c"), (b"x", b"gone"), (b"y", b"d")], tree)
    finally:
        tree.close()
    mtime = os.stat(tmp_path / "c").st_mtime_ns
    assert items == [[b"a", b"b", _expect_file(b"mail", mtime)], [b"b", b"c", _expect_file(b"mail", mtime)],
                     [b"y", b"d", ["d"]]]  # fmt: skip
    assert trees == {b"d"}


def test_a_renamed_directory_is_compared_whole(tmp_path):
    """A file changed in a directory that was then renamed, before the change was mirrored:
    the renamed directory's subtree is compared whole, so the change is not left behind."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "folder").mkdir(parents=True)
    (src / "folder" / "msg").write_bytes(b"first")
    with Connection(src, dst, delete=True) as conn:
        assert conn.session().ok
        (src / "folder" / "msg").write_bytes(b"second, longer")
        os.rename(src / "folder", src / "renamed")
        scope = Scope(entries=[b"folder/msg", b"folder", b"renamed"])
        result = conn.session(scope, renames=[(b"folder", b"renamed")])
        assert result.ok, result.failed
    assert (dst / "renamed" / "msg").read_bytes() == b"second, longer"
    assert_mirrors(src, dst)
