"""Manifest format: pinned bytes, exact round trip, and a clear error for every damaged file."""

from __future__ import annotations

import os

import pytest

from mirror import fastpath
from mirror.entry import Entry, Kind
from mirror.errors import ManifestError
from mirror.manifest import ManifestHeader, ManifestReader, write_manifest

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "manifest-v1.bin")


def golden_listings(scan):
    e = Entry
    root = scan.Listing(b"", [
        e(b"dir", Kind.DIR, 0o755, 0, 0, 4096, 1_700_000_000_000_000_001, 1_700_000_000_000_000_002, 11, 2049, 2, 0, b"", None),
        e(b"file", Kind.FILE, 0o644, 1000, 1000, 5, 1_600_000_000_123_456_789, 1_600_000_000_987_654_321, 12, 2049, 1, 0, b"",
          bytes(range(16))),
        e(b"link", Kind.SYMLINK, 0o777, 0, 0, 4, 3, 4, 13, 2049, 1, 0, b"file", None),
        e(b"null", Kind.CHAR, 0o666, 0, 0, 0, 5, 6, 14, 5, 1, os.makedev(1, 3), b"", None),
    ])  # fmt: skip
    sub = scan.Listing(b"dir", [e(b"\xff\n", Kind.FIFO, 0o600, 7, 8, 0, 9, 10, 15, 2049, 1, 0, b"", None)])
    return [root, sub]


HEADER = ManifestHeader(root=b"/srv/golden", scanned_at_ns=1_700_000_000_000_000_000, checksum=True)


@pytest.mark.parametrize("scan", ["fast", "pure"])
def test_golden_bytes(scan, tmp_path):
    module = fastpath.compiled("scan") if scan == "fast" else fastpath.pure("scan")
    out = tmp_path / "m"
    write_manifest(str(out), HEADER, golden_listings(module))
    if os.environ.get("MIRROR_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "wb") as f:
            f.write(out.read_bytes())
    with open(GOLDEN, "rb") as f:
        assert out.read_bytes() == f.read(), "manifest format changed: bump VERSION and pin new bytes"


def test_golden_reads_back():
    reader = ManifestReader(GOLDEN)
    assert reader.header == HEADER
    got = [(lst.path, list(lst)) for lst in reader]
    want = [(lst.path, list(lst)) for lst in golden_listings(fastpath.pure("scan"))]
    assert got == want


def _damaged(tmp_path, data: bytes):
    path = tmp_path / "damaged"
    path.write_bytes(data)
    return str(path)


def _read_all(path):
    reader = ManifestReader(path)
    return [list(lst) for lst in reader]


def test_every_truncation_is_an_error_naming_the_file(tmp_path):
    data = open(GOLDEN, "rb").read()
    for cut in range(len(data)):
        path = _damaged(tmp_path, data[:cut])
        with pytest.raises(ManifestError, match="damaged"):
            _read_all(path)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_flipped_byte_is_an_error(tmp_path, mask):
    data = bytearray(open(GOLDEN, "rb").read())
    for i in range(len(data)):
        data[i] ^= mask
        path = _damaged(tmp_path, bytes(data))
        data[i] ^= mask
        with pytest.raises(ManifestError, match="damaged"):
            _read_all(path)


def test_trailing_garbage_is_an_error(tmp_path):
    path = _damaged(tmp_path, open(GOLDEN, "rb").read() + b"\x00")
    with pytest.raises(ManifestError, match="after the end"):
        _read_all(path)


def test_wrong_version_says_so(tmp_path):
    import msgpack

    data = b"HAMIRMAN" + msgpack.packb({"version": 99, "root": b"/", "scanned_at_ns": 0, "checksum": False})
    with pytest.raises(ManifestError, match="version 99 is not supported"):
        _read_all(_damaged(tmp_path, data))


def test_not_a_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not a hamirror manifest"):
        _read_all(_damaged(tmp_path, b"hello world"))


def test_cli_reports_damaged_manifest(tmp_path):
    from tests.helpers import run_mirror

    data = open(GOLDEN, "rb").read()
    path = _damaged(tmp_path, data[: len(data) // 2])
    (tmp_path / "d").mkdir()
    proc = run_mirror("diff", path, str(tmp_path / "d"))
    assert proc.returncode == 2
    assert b"damaged: truncated manifest" in proc.stderr and b"Traceback" not in proc.stderr
