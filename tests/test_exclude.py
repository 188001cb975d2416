"""Exclude patterns select exactly what rsync's --exclude selects (checked against real rsync),
and nothing below an excluded directory is looked at, whatever asks: a whole scan, a scoped
one (the live daemon's, on either end of its session), the daemon's watcher."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from mirror import fastpath
from mirror.errors import UsageError
from mirror.exclude import Excluder, Pattern
from mirror.transfer import Connection
from mirror.treescan import Scope, TreeScan
from tests.daemons import live_daemon, pair_status
from tests.helpers import run_mirror, wait_until
from tests.replica_checks import MODES, Target
from tests.servers import SECRET
from tests.snapshot import snapshot

TREE = [
    "a.tmp", "b.txt", "cache/", "cache/x.tmp", "cache/keep.txt", "src/", "src/cache/", "src/cache/y",
    "src/main.c", "src/lib/", "src/lib/util.c", "src/lib/deep/", "src/lib/deep/z.tmp", "logs/",
    "logs/a.gz", "logs/b.log", "var/", "var/logs/", "var/logs/c.gz", "core", "sub/", "sub/core/",
    "sub/core/f", "[x]", "star*", "q?", "dir.tmp/", "dir.tmp/inner",
]  # fmt: skip

PATTERNS = [
    "*.tmp", "cache", "/cache", "cache/", "src/cache", "logs/*.gz", "**/deep", "src/**", "/src/lib/",
    "core", "core/", "*.c", "s*/", "[a-b].*", "[!a-z]*", "\\[x]", "star\\*", "q?", "src/***", "lib/*",
    "/*.txt", "dir.tmp", "*/", "**",
]  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("exclude") / "t"
    for rel in TREE:
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(rel)
    return str(root)


def _ours(root: str, pattern: str) -> set[str]:
    scan = fastpath.choose("scan")
    out = set()
    for listing in scan.scan(os.fsencode(root), excluder=Excluder([pattern])):
        for e in listing:
            path = (listing.path + b"/" if listing.path else b"") + e.name
            out.add(path.decode() + ("/" if e.kind == 2 else ""))
    return out


def _rsyncs(root: str, pattern: str, tmp) -> set[str]:
    proc = subprocess.run(
        ["rsync", "-a", "-n", "--out-format=%n", f"--exclude={pattern}", root + "/", str(tmp) + "/"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {line for line in proc.stdout.splitlines() if line and line != "./"}


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_same_selection_as_rsync(tree, pattern, tmp_path):
    assert _ours(tree, pattern) == _rsyncs(tree, pattern, tmp_path / "dst")


def test_directory_only_and_anchoring():
    assert Pattern("build/").matches(b"x/build", True)
    assert not Pattern("build/").matches(b"x/build", False)
    assert Pattern("/top").matches(b"top", False) and not Pattern("/top").matches(b"a/top", False)
    assert Pattern("a/b").matches(b"x/a/b", False) and not Pattern("a/b").matches(b"xa/b", False)


def test_non_utf8_names_can_be_excluded():
    assert Pattern(b"\xff*").matches(b"dir/\xff\xfe", False)
    assert Excluder([os.fsdecode(b"\xff\xfe")]).excluded(b"\xff\xfe", False)


@pytest.mark.parametrize("bad", ["", "/"])
def test_empty_pattern_is_refused(bad):
    with pytest.raises(UsageError):
        Pattern(bad)


# -- below an excluded directory --------------------------------------------------------------


def _scoped(root: str, pattern: str, scope: Scope) -> set[str]:
    out = set()
    for listing in TreeScan(os.fsencode(root), excluder=Excluder([pattern]), scope=scope, background=False):
        assert listing.problems == [], listing.problems
        for e in listing:
            path = (listing.path + b"/" if listing.path else b"") + e.name
            out.add(path.decode() + ("/" if e.kind == 2 else ""))
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_scoped_scan_selects_what_the_whole_scan_does(tree, pattern):
    """Each entry and each subtree of the tree scanned on its own (as the live daemon scans
    what changed) lists only what the whole scan lists: nothing below a directory it leaves
    out, however deep, under the same rules (anchored or not, directories only)."""
    whole = _ours(tree, pattern)
    seen = set()
    for rel in TREE:
        path = rel.rstrip("/").encode()
        entry = _scoped(tree, pattern, Scope(entries=[path]))
        assert entry <= whole, (rel, entry - whole)
        seen |= entry
        if rel.endswith("/"):
            subtree = _scoped(tree, pattern, Scope(trees=[path]))
            assert subtree <= whole, (rel, subtree - whole)
            seen |= subtree
    assert seen == whole


@pytest.mark.parametrize("mode", MODES)
def test_a_scoped_session_below_an_excluded_directory_does_nothing_on_either_end(tmp_path, mode):
    """A scope naming what is below an excluded directory (a new directory there, its files)
    is passed over by the sender's scan and the receiver's alike: nothing is made on the
    replica, nothing fails."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    (src / "cache").mkdir(parents=True)
    replica.mkdir()
    (src / "top").write_text("top")
    target = Target(mode, replica, tmp_path)
    with target.running():
        dst = str(replica) if mode == "local" else target.server.url("m")
        secret = None if mode == "local" else SECRET
        with Connection(src, dst, delete=True, excludes=[b"cache/"], secret=secret) as conn:
            assert conn.session().ok
            (src / "cache" / "new" / "deeper").mkdir(parents=True)
            (src / "cache" / "new" / "f").write_text("f")
            (src / "cache" / "new" / "deeper" / "g").write_text("g")
            scope = Scope(entries=[b"cache/new", b"cache/new/f", b"cache/new/deeper", b"cache/new/deeper/g"],
                          trees=[b"cache/new", b"cache/new/deeper"])  # fmt: skip
            result = conn.session(scope)
            assert (result.failed, result.problems) == ([], []), (result.failed, result.problems)
            assert result.changes == [] and result.stats.files_seen == 0
    assert sorted(os.listdir(replica)) == [".mirror", "top"]



def _healthy(src) -> dict | None:
    """The daemon's pair once it mirrors live with nothing pending nor failed (exit 0)."""
    pair = pair_status(src)
    ok = pair.get("state") == "live" and pair["last_sync"] and pair["pending"] == 0 and pair["exit"] == 0
    return pair if ok and pair["failed_files"] == [] else None


def _outside(root, excluded: tuple[bytes, ...]) -> dict:
    """``root``'s snapshot without the excluded subtrees."""
    return {k: v for k, v in snapshot(root).items()
            if not any(k == x or k.startswith(x + b"/") for x in excluded)}  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_the_live_daemon_journals_mirrors_and_fails_nothing_below_an_excluded_directory(tmp_path, mode):
    """New directories below excluded ones (a directory-only pattern, an anchored one), deep
    ones, files in them, a rename there: none of it is journaled, scanned or failed (the
    daemon failed on such a directory on every retry, for good), and the pair stays healthy.
    What is moved out of an excluded directory arrives whole; what is moved in is gone."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a").write_text("a")
    (src / "cache").mkdir()
    (src / "cache" / "old").write_text("old")
    (src / "build" / "obj").mkdir(parents=True)
    replica.mkdir()
    excluded = (b"cache", b"build")
    target = Target(mode, replica, tmp_path)
    with target.running():
        if mode == "local":
            dst, extra = str(replica), ()
        else:
            dst, extra = target.server.url("m"), ("--secret-file", target.server.secret_file)
        with live_daemon(src, dst, *extra, "--exclude", "cache/", "--exclude", "/build",
                         log_path=tmp_path / "daemon.log") as d:  # fmt: skip
            start = wait_until(lambda: _healthy(src))
            (src / "cache" / "newdir" / "deep").mkdir(parents=True)
            for i in range(200):
                (src / "cache" / "newdir" / f"f{i}").write_text(f"f{i}")
            (src / "cache" / "newdir" / "deep" / "g").write_text("g")
            (src / "cache" / "old").write_text("rewritten")
            os.rename(src / "cache" / "newdir" / "f0", src / "cache" / "newdir" / "renamed")
            (src / "build" / "obj" / "sub").mkdir()
            (src / "build" / "obj" / "sub" / "x.o").write_bytes(b"o")
            (src / "docs" / "marker").write_text("after them")
            pair = wait_until(lambda: (replica / "docs" / "marker").exists() and _healthy(src), timeout=20)
            # Only the marker was journaled: the watcher passed over everything else.
            assert pair["journal_seq"] - start["journal_seq"] < 20, (start, pair)
            assert _outside(src, excluded) == _outside(replica, excluded)
            assert not (replica / "cache").exists() and not (replica / "build").exists()

            os.rename(src / "cache" / "newdir", src / "moved")  # out of the excluded directory
            os.rename(src / "docs" / "a", src / "cache" / "a")  # into it
            wait_until(lambda: _healthy(src) and _outside(src, excluded) == _outside(replica, excluded), timeout=20)
            assert (replica / "moved" / "deep" / "g").read_text() == "g" and len(os.listdir(replica / "moved")) == 201
            assert not (replica / "docs" / "a").exists()
            log = d.log_text()
            assert "Traceback" not in log and "cache/newdir" not in log and "build/obj" not in log, log


@pytest.mark.parametrize("mode", MODES)
def test_a_name_excluded_from_the_live_mirror_still_moves_its_directorys_times_there(tmp_path, mode):
    """An excluded name made, renamed or removed in a mirrored directory changes that
    directory's times, as `mirror sync` sets them; the daemon dropped the excluded name's
    event, so the replica kept the old times until something else changed there."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    (src / "d").mkdir(parents=True)
    (src / "d" / "keep").write_text("kept")
    replica.mkdir()

    def mirrored() -> bool:
        def without_tmp(root):
            return {k: v for k, v in snapshot(root).items() if not any(p.endswith(b".tmp") for p in k.split(b"/"))}

        return without_tmp(src) == without_tmp(replica)

    target = Target(mode, replica, tmp_path)
    with target.running(), live_daemon(src, *target.daemon_args(), "--exclude", "*.tmp",
                                       log_path=tmp_path / "daemon.log"):  # fmt: skip
        wait_until(mirrored, timeout=20)
        for change in (lambda: (src / "d" / "x.tmp").write_text("excluded"),
                       lambda: os.rename(src / "d" / "x.tmp", src / "d" / "y.tmp"),
                       lambda: os.unlink(src / "d" / "y.tmp"),
                       lambda: (src / "d" / "c.tmp").mkdir(),
                       lambda: (src / "d" / "c.tmp").rmdir()):  # fmt: skip
            change()
            wait_until(mirrored, timeout=20)
        assert not [n for n in os.listdir(replica / "d") if n.endswith(".tmp")]


@pytest.mark.parametrize("mode", MODES)
def test_more_excludes_than_a_receiver_takes_are_refused_up_front_for_every_destination(tmp_path, mode):
    """A receiver takes at most 1,000 patterns of at most 1,024 bytes in a session's start.
    A longer list (a generated --exclude-from) used to work locally and fail remotely after
    connecting, and a daemon with it failed every session for good: now every command refuses
    it before doing anything, naming the option, the file and line, or the key."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("x")
    many = tmp_path / "many-patterns"
    many.write_text("# generated\n" + "".join(f"build-{i}/\n" for i in range(1001)))
    long_line = tmp_path / "long-pattern"
    long_line.write_text("*.tmp\n\n" + "x" * 1025 + "\n")
    target = Target(mode, dst, tmp_path)
    with target.running():
        where, *options = target.daemon_args()
        for args, message in (
            (["--exclude-from", many], "--exclude/--exclude-from: 1001 exclude patterns (at most 1000)"),
            (["--exclude", "*.o", "--exclude-from", long_line], f"{long_line}: line 3: a pattern of 1025 bytes"),
        ):
            for command in (["sync", src, where, *options], ["daemon", src, where, *options]):
                proc = run_mirror(*command, *args, check_codes=range(256))
                assert proc.returncode == 2 and message in proc.stderr.decode(), (command, proc.stderr)
        assert not (dst / "f").exists()
        config = tmp_path / "daemon.toml"
        patterns = ", ".join(f'"p{i}"' for i in range(1001))
        config.write_text(f'[[pair]]\nsource = "{src}"\ndestination = "{dst}"\nexclude = [{patterns}]\n')
        proc = run_mirror("daemon", "--config", config, "--check", check_codes=range(256))
        assert proc.returncode == 2, proc
        assert f"{config}: 'pair[0].exclude': 1001 exclude patterns (at most 1000)" in proc.stderr.decode()
        many.write_text("".join(f"build-{i}/\n" for i in range(1000)))  # at the limit: taken
        assert run_mirror("sync", src, where, *options, "--exclude-from", many).returncode == 0
        assert (dst / "f").read_text() == "x"
