"""What `mirror diff` reports, on real trees, and how the digest cache behaves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from mirror import fastpath
from mirror.compare import CompareOptions, CompareSummary, compare_trees
from mirror.treescan import TreeScan
from tests.helpers import run_mirror

T0 = 1_600_000_000 * 10**9


def write(path, data: bytes, mtime_ns: int = T0, mode: int = 0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write(str(a / "same"), b"same")
    write(str(a / "grow"), b"12")
    write(str(a / "touched"), b"t")
    write(str(a / "chmod"), b"c")
    write(str(a / "sub" / "deep"), b"d")
    write(str(a / "gone-from-src"), b"x")
    os.symlink("same", a / "link")
    os.utime(a / "link", ns=(T0, T0), follow_symlinks=False)
    (a / "becomes-dir").write_bytes(b"f")
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    os.unlink(a / "gone-from-src")
    write(str(a / "grow"), b"123")
    os.utime(a / "touched", ns=(T0 + 1, T0 + 1))
    os.chmod(a / "chmod", 0o600)
    os.unlink(a / "link")
    os.symlink("grow", a / "link")
    os.utime(a / "link", ns=(T0, T0), follow_symlinks=False)
    os.unlink(a / "becomes-dir")
    (a / "becomes-dir").mkdir()
    write(str(a / "sub" / "new"), b"n")
    for d in (a, a / "sub", a / "becomes-dir", b, b / "sub"):
        os.utime(d, ns=(T0, T0))
    return str(a), str(b)


def test_itemized_lines(pair):
    a, b = pair
    proc = run_mirror("diff", a, b)
    assert proc.returncode == 1
    assert proc.stdout.decode().splitlines() == [
        "*deleting   becomes-dir",
        "cd+++++++++ becomes-dir/",
        ".f...p..... chmod",
        "*deleting   gone-from-src",
        ">f.s....... grow",
        "cLc........ link -> grow",
        ">f..t...... touched",
        ">f+++++++++ sub/new",
    ]


def test_json_counts(pair):
    a, b = pair
    out = json.loads(run_mirror("diff", "--json", a, b).stdout)
    assert out["counts"] == {"type": 1, "metadata": 1, "removed": 1, "content": 2, "target": 1, "added": 1}
    assert out["identical"] is False and out["complete"] is True


def test_identical_copy_exits_zero(pair, tmp_path):
    a, _ = pair
    c = str(tmp_path / "c")
    subprocess.run(["cp", "-a", a, c], check=True)
    for extra in ([], ["--checksum"], ["--checksum"]):  # the second --checksum run uses the cache
        proc = run_mirror("diff", *extra, a, c)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")


def test_a_checksum_scan_has_its_state_dir_once_started(pair):
    """Making the digest cache's state dir moves the root's mtime until it is put back, and
    `mirror diff` stats the roots as soon as their scans are started: the dir is made before
    `start` returns, never in the scan's thread (which made `diff --checksum` of identical
    trees report the root's time now and then)."""
    a, _ = pair
    scan = TreeScan(a, checksum=True).start()
    try:
        assert os.path.isdir(os.path.join(a, ".mirror"))
        assert os.stat(a).st_mtime_ns == T0
    finally:
        scan.stop()


def test_checksum_finds_same_size_same_mtime_changes(pair, tmp_path):
    a, _ = pair
    c = str(tmp_path / "c")
    subprocess.run(["cp", "-a", a, c], check=True)
    write(os.path.join(c, "same"), b"SAME")  # same size, same mtime, other bytes
    assert run_mirror("diff", a, c).returncode == 0  # the quick check cannot see it
    proc = run_mirror("diff", "--checksum", a, c)
    assert proc.returncode == 1 and proc.stdout == b">fc........ same\n"


def _scan_stats(root, **kw):
    tree = TreeScan(root, checksum=True, background=False, **kw)
    for _ in tree:
        pass
    return tree.stats


def test_digest_cache_is_reused_while_files_are_unchanged(tmp_path):
    root = str(tmp_path / "t")
    for i in range(20):
        write(os.path.join(root, f"f{i}"), b"x" * i, mtime_ns=T0)
    assert _scan_stats(root).hashed == 20  # cold
    stats = _scan_stats(root)
    assert (stats.hashed, stats.digests, stats.cache) == (0, 20, "warm")
    write(os.path.join(root, "f3"), b"changed", mtime_ns=T0)  # new size
    assert _scan_stats(root).hashed == 1


@pytest.mark.parametrize("hold", [1 << 20, 3])  # listings held back, or written out past the limit
def test_unchanged_cache_is_kept_and_a_changed_one_rewritten(tmp_path, monkeypatch, hold):
    import mirror.treescan as treescan

    monkeypatch.setattr(treescan, "_HOLD_ENTRIES", hold)
    root = str(tmp_path / "t")
    for d in range(4):
        for i in range(5):
            write(os.path.join(root, f"d{d}", f"f{i}"), b"x" * i, mtime_ns=T0)
    _scan_stats(root)
    cache_dir = os.path.join(root, ".mirror")
    (name,) = [n for n in os.listdir(cache_dir) if n.startswith("digests-")]
    before = os.stat(os.path.join(cache_dir, name))
    assert _scan_stats(root).hashed == 0
    after = os.stat(os.path.join(cache_dir, name))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # kept as it was
    write(os.path.join(root, "d3", "new"), b"new file", mtime_ns=T0)  # in the last directory scanned
    assert _scan_stats(root).hashed == 1
    assert os.stat(os.path.join(cache_dir, name)).st_ino != before.st_ino  # rewritten
    stats = _scan_stats(root)
    assert (stats.hashed, stats.digests, stats.cache) == (0, 21, "warm")  # with every digest


def test_same_size_same_mtime_rewrite_is_caught_by_ctime(tmp_path):
    root = str(tmp_path / "t")
    write(os.path.join(root, "f"), b"aaaa", mtime_ns=T0)
    _scan_stats(root)
    write(os.path.join(root, "f"), b"bbbb", mtime_ns=T0)  # mtime put back; ctime moves
    assert _scan_stats(root).hashed == 1


def test_racy_files_are_hashed_again(tmp_path):
    """A file modified within the timestamp granularity of the scan that cached it might
    change again without its mtime moving: its cached digest is not trusted."""
    root = str(tmp_path / "t")
    now = time.time_ns()
    write(os.path.join(root, "old"), b"o", mtime_ns=T0)
    write(os.path.join(root, "fresh"), b"f", mtime_ns=now)
    _scan_stats(root)
    stats = _scan_stats(root)
    assert stats.hashed == 1  # "fresh" again, "old" from the cache


def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    root = str(tmp_path / "t")
    write(os.path.join(root, "f"), b"x")
    _scan_stats(root)
    cache_dir = os.path.join(root, ".mirror")
    (name,) = [n for n in os.listdir(cache_dir) if n.startswith("digests-")]
    path = os.path.join(cache_dir, name)
    data = bytearray(open(path, "rb").read())
    data[-20] ^= 0xFF
    open(path, "wb").write(bytes(data))
    stats = _scan_stats(root)
    assert stats.cache == "rebuilt" and stats.hashed == 1
    assert "digest cache" in caplog.text
    assert _scan_stats(root).cache == "warm"


def test_state_dir_is_never_part_of_the_tree(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write(os.path.join(a, "f"), b"x")
    subprocess.run(["cp", "-a", a, b], check=True)
    run_mirror("diff", "--checksum", a, b)
    assert os.path.isdir(os.path.join(a, ".mirror"))
    before = os.stat(b)
    shutil.rmtree(os.path.join(b, ".mirror"))
    os.utime(b, ns=(before.st_atime_ns, before.st_mtime_ns))
    # One side has a state dir, the other not: still identical, root mtime included.
    proc = run_mirror("diff", a, b)
    assert (proc.returncode, proc.stdout) == (0, b"")
    # An explicit --state-dir inside the tree is excluded too.
    state = os.path.join(a, "var-state")
    proc = run_mirror("diff", "--checksum", "--state-dir", state, a, b, "--no-dir-times")
    assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr


def test_streaming_compare_with_excludes(pair):
    a, b = pair
    from mirror.exclude import Excluder

    summary = CompareSummary()
    ex = Excluder(["becomes-dir", "*.tmp", "/sub/"])
    changes = list(compare_trees(TreeScan(a, excluder=ex), TreeScan(b, excluder=ex), CompareOptions(), summary))
    assert sorted(c.path for c in changes) == [b"chmod", b"gone-from-src", b"grow", b"link", b"touched"]


def test_missing_tree_is_an_error(tmp_path):
    proc = run_mirror("diff", str(tmp_path / "nope"), str(tmp_path))
    assert proc.returncode == 2 and b"No such file or directory" in proc.stderr
    (tmp_path / "file").write_bytes(b"neither a tree nor a manifest\n")
    for args in ((tmp_path / "file", tmp_path), (tmp_path, tmp_path / "file")):
        proc = run_mirror("diff", *map(str, args))
        assert proc.returncode == 2, proc
        assert f"{tmp_path}/file is neither a directory nor a manifest".encode() in proc.stderr, proc.stderr


def _tree_with_links(root):
    for d in range(30):
        for f in range(10):
            write(os.path.join(root, f"d{d:02d}", f"f{f}"), b"x" * (d + f), T0 + f)
    os.link(os.path.join(root, "d03", "f1"), os.path.join(root, "d03", "linked"))
    os.symlink("f1", os.path.join(root, "d04", "sym"))
    for d in range(30):
        os.utime(os.path.join(root, f"d{d:02d}"), ns=(T0, T0))


def test_whole_tree_walks_pair_themselves_with_the_same_result(tmp_path):
    """``mirror diff`` of two plain walks leaves identical directories to the scan kernel;
    the changes, their order and both trees' counts are those of the listing-by-listing
    comparison, hard-link groups included."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _tree_with_links(a)
    subprocess.run(["cp", "-a", a, b], check=True)
    write(os.path.join(b, "d07", "f3"), b"changed", T0)
    os.unlink(os.path.join(b, "d12", "f0"))
    write(os.path.join(a, "d20", "new", "n"), b"n")
    os.utime(os.path.join(a, "d20"), ns=(T0, T0))

    def run(paired: bool):
        sides = [TreeScan(a), TreeScan(b)]
        src, dst = sides if paired else [list(side) for side in sides]
        summary = CompareSummary()
        changes = list(compare_trees(src, dst, CompareOptions(), summary))
        return changes, summary.counts, [(s.stats.dirs, s.stats.counts, s.stats.file_bytes) for s in sides]

    assert run(True) == run(False)
    src, dst = TreeScan(a), TreeScan(b)
    pairs = list(src.pairs_with(dst, CompareOptions().flags(fastpath.choose("scan"))))
    # d03 (a hard link), d07, d12, d20 and d20/new, and the root (its d20 changed): the
    # 25 other directories were compared without becoming listings.
    assert sorted((x or y).path for x, y in pairs) == [b"", b"d03", b"d07", b"d12", b"d20", b"d20/new"]
    assert src.stats.dirs == dst.stats.dirs + 1 == 32
