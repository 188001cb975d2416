"""A file with holes keeps them on a remote replica: the receiver's ``HoleWriter`` leaves
aligned blocks of zeros unwritten, whatever order and sizes the content arrives in, for a
file sent whole and for a delta against the replica's own (sparse) copy; a file without
holes keeps its blocks of zeros written."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror.holes import BLOCK, HoleWriter
from tests.helpers import data_runs, run_mirror, sparse_file
from tests.servers import TRUSTING, mirror_server

MIB = 1 << 20


def _has_data(fd: int, offset: int) -> bool:
    """Whether the block at ``offset`` holds data (is not a hole)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) == offset
    except OSError:  # ENXIO: only holes from there on
        return False


def _holes_kept_here(directory) -> bool:
    probe = os.path.join(directory, "probe")
    with open(probe, "wb") as f:
        f.truncate(MIB)
    kept = os.stat(probe).st_blocks * 512 < MIB
    os.unlink(probe)
    return kept


# A file's content as segments: a run of zero blocks, or of random bytes (any length).
_segments = st.lists(
    st.one_of(st.integers(1, 6).map(lambda n: bytes(n * BLOCK)), st.binary(min_size=1, max_size=3 * BLOCK)),
    min_size=1, max_size=12,
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(segments=_segments, cuts=st.lists(st.integers(1, 5 * BLOCK), min_size=1, max_size=20))
def test_the_hole_writer_leaves_every_whole_block_of_zeros_a_hole(tmp_path_factory, segments, cuts):
    """Written in pieces of any size: the file reads back exactly; every block that holds a
    byte other than zero is data; every block of zeros that one write covered whole is a
    hole (one cut by a write's edge may be written: it cannot be told from a partial one)."""
    directory = tmp_path_factory.mktemp("holes")
    if not _holes_kept_here(directory):
        pytest.skip("this file system keeps no holes")
    content = b"".join(segments)
    path = directory / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer, pos, edges, i = HoleWriter(fd), 0, {0}, 0
        while pos < len(content):
            n = cuts[i % len(cuts)]
            assert writer.write(memoryview(content)[pos : pos + n] if i % 2 else content[pos : pos + n]) == len(
                content[pos : pos + n]
            )
            pos += n
            edges.add(min(pos, len(content)))
            i += 1
        writer.finish()
        assert os.fstat(fd).st_size == len(content)
        for offset in range(0, len(content), BLOCK):
            block = content[offset : offset + BLOCK]
            cut = any(offset < edge < offset + BLOCK for edge in edges)
            if block.strip(b"\0"):
                assert _has_data(fd, offset), offset
            elif len(block) == BLOCK and not cut:
                assert not _has_data(fd, offset), offset
    finally:
        os.close(fd)
    assert path.read_bytes() == content


def _sync(src, server, *options) -> dict:
    proc = run_mirror("sync", "--json", *options, src, server.url("m"), "--secret-file", server.secret_file)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_file_with_holes_keeps_them_on_a_remote_replica_sent_whole_and_as_a_delta(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "replica"
    src.mkdir()
    dst.mkdir()
    if not _holes_kept_here(tmp_path):
        pytest.skip("this file system keeps no holes")
    size = 64 * MIB
    sparse_file(src / "image", size, [(0, MIB), (20 * MIB, 256 << 10), (40 * MIB, 2 * MIB)])
    (src / "zeros").write_bytes(bytes(4 * MIB))  # written zeros, no holes: written zeros there too
    with mirror_server(tmp_path, {"m": str(dst)}, *TRUSTING) as server:
        out = _sync(src, server)
        assert out["stats"]["files_sent"] == 2
        assert (dst / "image").read_bytes() == (src / "image").read_bytes()
        assert data_runs(dst / "image") == data_runs(src / "image")
        assert os.stat(dst / "image").st_blocks <= os.stat(src / "image").st_blocks + 8
        assert (dst / "zeros").read_bytes() == bytes(4 * MIB)
        assert os.stat(dst / "zeros").st_blocks * 512 >= 4 * MIB  # kept as the source keeps it

        # An update inside a data run: a delta against the replica's copy, whose holes the
        # patcher reads as zeros and must not write out.
        with open(src / "image", "r+b") as f:
            f.seek(20 * MIB + 4096)
            f.write(os.urandom(8192))
        out = _sync(src, server)
        assert out["stats"]["files_delta"] == 1 and out["stats"]["wire_sent"] < 4 * MIB
        assert (dst / "image").read_bytes() == (src / "image").read_bytes()
        assert data_runs(dst / "image") == data_runs(src / "image")
        assert os.stat(dst / "image").st_blocks <= os.stat(src / "image").st_blocks + 8
