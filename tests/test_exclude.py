"""Exclude patterns select exactly what rsync's --exclude selects (checked against real rsync)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from mirror import fastpath
from mirror.errors import UsageError
from mirror.exclude import Excluder, Pattern

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
