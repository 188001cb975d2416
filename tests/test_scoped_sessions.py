"""Scoped sessions (what the live daemon runs): only the named entries and subtrees are
scanned and compared, renames are renames on the replica, and one connection serves many."""

from __future__ import annotations

import os

from mirror.transfer import Connection
from mirror.treescan import Scope
from tests.servers import SECRET, mirror_server
from tests.snapshot import assert_mirrors


def _tree(root):
    (root / "big" / "deep").mkdir(parents=True)
    for i in range(50):
        (root / "big" / f"f{i:02d}").write_bytes(b"x" * i)
    (root / "big" / "deep" / "d").write_text("deep")
    (root / "top").write_text("top")


def test_entry_scope_sees_only_named_entries(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _tree(src)
    with Connection(src, dst, delete=True) as conn:
        assert conn.session().ok
        (src / "big" / "f01").write_text("changed")
        (src / "big" / "f02").write_text("changed too, but not in scope")
        (src / "big" / "new").write_text("new")
        os.unlink(src / "big" / "f03")
        result = conn.session(Scope(entries=[b"big/f01", b"big/new", b"big/f03"]))
        assert result.ok
        assert sorted((c.path, c.change) for c in result.changes) == [
            (b"big/f01", "content"), (b"big/f03", "removed"), (b"big/new", "added")]  # fmt: skip
        assert (dst / "big" / "f02").read_bytes() == b"x" * 2  # out of scope: untouched
        assert result.stats.files_seen == 2  # two entries listed, not the directory's 50
        assert conn.session(Scope(entries=[b"big/f02"])).ok
        assert_mirrors(src, dst)


def test_tree_scope_and_new_directories(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _tree(src)
    with Connection(src, dst, delete=True) as conn:
        conn.session()
        (src / "big" / "newdir" / "sub").mkdir(parents=True)
        (src / "big" / "newdir" / "sub" / "x").write_text("x")
        result = conn.session(Scope(entries=[b"big/newdir"], trees=[b"big/newdir"]))
        assert result.ok and (dst / "big" / "newdir" / "sub" / "x").read_text() == "x"
        assert_mirrors(src, dst)


def test_renames_are_renames_on_the_replica(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _tree(src)
    (src / "large").write_bytes(os.urandom(2 << 20))
    with Connection(src, dst, delete=True) as conn:
        conn.session()
        ino = os.stat(dst / "large").st_ino
        os.rename(src / "large", src / "big" / "moved")
        os.rename(src / "big" / "deep", src / "deeper")
        scope = Scope(entries=[b"large", b"big/moved", b"big/deep", b"deeper"])
        result = conn.session(scope, renames=[(b"large", b"big/moved"), (b"big/deep", b"deeper")])
        assert result.ok
        assert result.stats.files_sent == 0 and result.stats.literal_bytes == 0
        assert os.stat(dst / "big" / "moved").st_ino == ino  # the same file, renamed
        assert_mirrors(src, dst)


def test_many_sessions_on_one_server_connection(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    _tree(src)
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        with Connection(src, server.url("m"), delete=True, secret=SECRET) as conn:
            assert conn.session().ok
            for i in range(20):
                (src / f"live{i}").write_text(str(i))
                result = conn.session(Scope(entries=[f"live{i}".encode()]))
                assert result.ok and [c.path for c in result.changes] == [f"live{i}".encode()]
    assert_mirrors(src, dst)
