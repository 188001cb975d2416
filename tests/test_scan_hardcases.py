"""The hard cases of issue 2 round-trip through scan -> manifest -> diff, with both scanners."""

from __future__ import annotations

import os
import socket
import stat
import subprocess

import pytest

from mirror import fastpath
from mirror.entry import Kind
from mirror.manifest import ManifestHeader, ManifestReader, write_manifest
from mirror.scan import scan as walk
from tests.conftest import implementations
from tests.helpers import WITHOUT_DAC, changing, is_root, run_mirror

HARD_NAMES = [b"\xff\xfe-not-utf8", b"new\nline", b"with space", b"back\\slash", b"n" * 255, b"caf\xc3\xa9", b"-rf"]


def make_hard_tree(root: bytes) -> None:
    os.makedirs(root, exist_ok=True)
    for i, name in enumerate(HARD_NAMES):
        with open(os.path.join(root, name), "wb") as f:
            f.write(name * (i + 1))
    deep = root
    for _ in range(200):
        deep = os.path.join(deep, b"d")
    os.makedirs(deep)
    with open(os.path.join(deep, b"bottom"), "wb") as f:
        f.write(b"200 levels down")
    os.symlink(b"no/such/target", os.path.join(root, b"dangling"))
    os.symlink(b"../../etc/passwd", os.path.join(root, b"escaping"))
    with open(os.path.join(root, b"linked-a"), "wb") as f:
        f.write(b"one inode")
    os.link(os.path.join(root, b"linked-a"), os.path.join(root, b"linked-b"))
    os.mkfifo(os.path.join(root, b"fifo"))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(root, b"sock"))
    sock.close()
    if is_root():
        os.mknod(os.path.join(root, b"chardev"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkdir(os.path.join(root, b"empty-dir"))


@pytest.fixture
def hard_tree(tmp_path):
    root = os.path.join(os.fsencode(tmp_path), b"src")
    make_hard_tree(root)
    return root


@pytest.mark.parametrize("kernel", implementations("scan"))
def test_hard_cases_are_all_recorded(kernel, hard_tree):
    entries = {}
    for listing in walk(hard_tree, checksum=True, kernel=kernel):  # checksum: FIFOs must not be opened
        assert listing.complete and not listing.problems
        for e in listing:
            entries[(listing.path + b"/" if listing.path else b"") + e.name] = e
    for name in HARD_NAMES:
        assert entries[name].kind == Kind.FILE and entries[name].digest is not None
    assert entries[b"/".join([b"d"] * 200) + b"/bottom"].size == len(b"200 levels down")
    assert entries[b"dangling"].kind == Kind.SYMLINK and entries[b"dangling"].target == b"no/such/target"
    assert entries[b"fifo"].kind == Kind.FIFO and entries[b"fifo"].digest is None
    assert entries[b"sock"].kind == Kind.SOCKET
    assert entries[b"empty-dir"].kind == Kind.DIR
    assert entries[b"linked-a"].ino == entries[b"linked-b"].ino and entries[b"linked-a"].nlink == 2
    if is_root():
        assert entries[b"chardev"].kind == Kind.CHAR and entries[b"chardev"].rdev == os.makedev(1, 3)


def _copy(src: bytes, dst: bytes) -> None:
    subprocess.run(["cp", "-a", os.fsdecode(src), os.fsdecode(dst)], check=True)


def test_roundtrip_scan_manifest_diff(hard_tree, tmp_path):
    replica = os.path.join(os.fsencode(tmp_path), b"dst")
    _copy(hard_tree, replica)
    saved = os.path.join(os.fsencode(tmp_path), b"src.manifest")
    proc = run_mirror("scan", hard_tree, "--save", saved, "--checksum")
    assert proc.returncode == 0, proc.stderr
    # A directory, its manifest and its exact copy are all identical to each other.
    for a, b in [(hard_tree, replica), (saved, replica), (hard_tree, saved)]:
        proc = run_mirror("diff", a, b)
        assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr
    # Change one hard-named file: exactly that one is reported, with its name escaped losslessly.
    with open(os.path.join(replica, b"new\nline"), "ab") as f:
        f.write(b"!")
    proc = run_mirror("diff", hard_tree, replica)
    assert proc.returncode == 1
    assert proc.stdout.decode().splitlines() == [">f.st...... new\\x0aline"]
    proc = run_mirror("diff", saved, replica, "--json")
    import json

    changes = json.loads(proc.stdout)["changes"]
    assert [c["path"] for c in changes] == ["new\\x0aline"]


def test_manifest_roundtrip_keeps_every_field(hard_tree, tmp_path):
    scan = fastpath.choose("scan")
    listings = list(scan.scan(hard_tree, checksum=True))
    path = os.path.join(os.fsencode(tmp_path), b"m")
    write_manifest(path, ManifestHeader(root=hard_tree, scanned_at_ns=1, checksum=True), listings)
    again = list(ManifestReader(path))
    assert [(x.path, list(x)) for x in again] == [(x.path, list(x)) for x in listings]


def test_hard_link_groups_are_compared(tmp_path):
    base = os.fsencode(tmp_path)
    a, b = os.path.join(base, b"a"), os.path.join(base, b"b")
    for root in (a, b):
        os.mkdir(root)
        for name in (b"x", b"y"):
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"same")
            os.utime(os.path.join(root, name), ns=(10**18, 10**18))
        os.utime(root, ns=(10**18, 10**18))
    os.unlink(os.path.join(a, b"y"))
    os.link(os.path.join(a, b"x"), os.path.join(a, b"y"))  # y is x on the source only
    os.utime(a, ns=(10**18, 10**18))
    proc = run_mirror("diff", a, b)
    assert proc.returncode == 1
    assert proc.stdout.decode().splitlines() == ["hf......... y => x"]


def test_unreadable_directory_is_reported_and_incomplete(tmp_path):
    base = os.fsencode(tmp_path)
    a, b = os.path.join(base, b"a"), os.path.join(base, b"b")
    os.makedirs(os.path.join(a, b"secret"))
    with open(os.path.join(a, b"secret", b"f"), "w") as f:
        f.write("x")
    with open(os.path.join(a, b"open"), "w") as f:
        f.write("y")
    _copy(a, b)
    os.chmod(os.path.join(a, b"secret"), 0)
    prefix = WITHOUT_DAC if is_root() else None
    try:
        proc = run_mirror("diff", a, b, prefix=prefix)
        assert proc.returncode == 2, proc
        assert b"src: secret: cannot open directory: Permission denied" in proc.stderr
        assert b"comparison is incomplete" in proc.stderr
        # What could be compared still is: the unreadable subtree is skipped on both sides.
        assert proc.stdout.decode().splitlines() == [".d...p..... secret/"]
        proc = run_mirror("scan", a, prefix=prefix)
        assert proc.returncode == 2 and b"secret: cannot open directory" in proc.stderr
    finally:
        os.chmod(os.path.join(a, b"secret"), 0o755)


@pytest.mark.parametrize("kernel", implementations("scan"))
def test_file_changed_while_hashing_is_reported(kernel, tmp_path):
    """The excluder runs after a file is stat()ed and before it is hashed: changing the file
    there is exactly the race a live tree produces."""
    root = os.fsencode(tmp_path)
    for name in (b"a", b"b"):
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"before")

    class Meddler:
        def excluded(self, path, is_dir):
            if path == b"a":
                with open(os.path.join(root, b"a"), "ab") as f:
                    f.write(b" and after")
            return False

    listing = next(iter(walk(root, excluder=Meddler(), checksum=True, kernel=kernel)))
    assert [(p.path, p.message) for p in listing.problems] == [(b"a", "changed while hashing")]
    assert listing[0].digest is None and listing[1].digest is not None


def test_tree_changing_during_scan_never_crashes(tmp_path):
    """A writer creates and deletes files while the tree is diffed over and over: every run
    ends with a verdict, and any entry it could not pin down is named (exit 2), never skipped."""
    root = os.path.join(os.fsencode(tmp_path), b"live")
    os.mkdir(root)
    for i in range(20):
        os.makedirs(os.path.join(root, b"d%d" % i))

    def churn(n):
        d = os.path.join(root, b"d%d" % (n % 20))
        p = os.path.join(d, b"f%d" % (n % 50))
        try:
            with open(p, "wb") as f:
                f.write(b"x" * (n % 5000))
            if n % 3 == 0:
                os.unlink(p)
        except FileNotFoundError:
            pass

    verdicts = set()
    with changing(churn):
        for _ in range(15):
            proc = run_mirror("diff", "--checksum", "--no-cache", root, root)
            verdicts.add(proc.returncode)
            assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
            if proc.returncode == 2:
                assert b"could not be compared" in proc.stderr
    assert verdicts <= {0, 1, 2}
