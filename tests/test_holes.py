"""A file with holes keeps them on a remote replica: the receiver's ``HoleWriter`` leaves
aligned blocks of zeros unwritten, whatever order and sizes the content arrives in, for a
file sent whole (its holes as their lengths, in ``hole`` frames) and for a delta against the
replica's own (sparse) copy; a file without holes keeps its blocks of zeros written.  A
hostile sender's ``hole`` frames cost the receiver nothing and break nothing."""

from __future__ import annotations

import json
import os

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror import delta
from mirror import protocol as P
from mirror.constants import HOLE, LITERAL
from mirror.delta import hole_digest_input
from mirror.holes import BLOCK, HoleWriter
from tests.helpers import data_runs, run_mirror, sparse_file
from tests.peers import ATTRS, RawSession
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


@settings(max_examples=40, deadline=None)
@given(layout=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=10),
       tail=st.integers(0, BLOCK - 1), tail_is_data=st.booleans())  # fmt: skip
def test_a_file_sent_whole_with_its_holes_is_rebuilt_exactly(tmp_path_factory, layout, tail, tail_is_data):
    """The sender's ops for a file with holes (``delta(None, f, holes=True)``): its data runs
    as literals, each hole as one op of its length, never read; the patcher rebuilds the
    file through a ``HoleWriter`` with the same content, the same data runs and the digest
    the sender computed."""
    directory = tmp_path_factory.mktemp("sent")
    if not _holes_kept_here(directory):
        pytest.skip("this file system keeps no holes")
    src, dst = directory / "src", directory / "dst"
    size = 0
    with open(src, "wb") as f:
        for is_data, blocks in [*layout, (tail_is_data, 0)]:
            length = blocks * BLOCK or tail
            if is_data and length:
                f.seek(size)
                f.write(os.urandom(length - 1) + b"\1")  # never a block of zeros
            size += length
        f.truncate(size)
    runs = data_runs(src)
    with open(src, "rb") as f:
        sent = delta.delta(None, f, holes=True)
        ops = list(sent)
    assert sum(op[1] for op in ops if op[0] == HOLE) == size - sum(end - start for start, end in runs)
    assert sum(len(op[1]) for op in ops if op[0] == LITERAL) == sum(end - start for start, end in runs)
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        out = HoleWriter(fd)
        patcher = delta.Patcher(None, out, delta.MIN_BLOCK_SIZE, 0)
        for op in ops:
            patcher.apply(op)
        assert patcher.finish() == (sent.digest, sent.new_size) and sent.new_size == size
        out.finish()
    finally:
        os.close(fd)
    assert dst.read_bytes() == src.read_bytes()
    assert data_runs(dst) == runs


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
        # Sent whole, the image's holes went as their lengths: its 3.25 MiB of data and the
        # other file's 4 MiB of written zeros crossed the wire, not the image's 64 MiB.
        assert out["stats"]["wire_sent"] < 8 * MIB, out["stats"]
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


def _digest(*parts) -> bytes:
    """A file's digest as its sender computes it: data as itself, a hole (an int) by its length."""
    h = xxhash.xxh3_128()
    for part in parts:
        h.update(hole_digest_input(part) if isinstance(part, int) else part)
    return h.digest()


def test_a_hostile_senders_hole_frames_cost_the_receiver_nothing_and_break_nothing(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    huge = (1 << 50) + 3  # a petabyte: hashed as zeros, hours of a CPU; past ext4's largest file
    s = RawSession(root, start={})
    s._sockets[0].settimeout(120)  # a receiver that hashed the hole would keep the test waiting far longer
    s.drain_summary()
    s.send([P.FILE, 1, b"sparse", ATTRS, "whole", 0, 0, True], [P.DATA, 1, b"head"], [P.HOLE, 1, 1 << 20],
           [P.DATA, 1, b"tail"], [P.FILE_END, 1, _digest(b"head", 1 << 20, b"tail"), (1 << 20) + 8],
           [P.FILE, 2, b"huge", ATTRS, "whole", 0, 0, True], [P.DATA, 2, b"x"], [P.HOLE, 2, huge - 1],
           [P.FILE_END, 2, _digest(b"x", huge - 1), huge],
           [P.FILE, 3, b"liar", ATTRS, "whole", 0, 0, True], [P.HOLE, 3, 4096],
           [P.FILE_END, 3, _digest(bytes(4096)), 4096])  # fmt: skip
    result = s.end()
    assert result is not None and result[0] == P.RESULT and not s.errors, s.replies
    assert (root / "sparse").read_bytes() == b"head" + bytes(1 << 20) + b"tail"
    if _holes_kept_here(tmp_path):
        assert data_runs(root / "sparse") == [(0, BLOCK), (1 << 20, (1 << 20) + 8)]
    failed = {m[2]: m[3] for m in s.replies if m[0] == P.FAILED}
    # The petabyte: committed as a hole of its length where the file system allows it, else
    # failed by name (EFBIG), the session going on either way.
    if b"huge" in failed:
        assert "too large" in failed[b"huge"] and not (root / "huge").exists(), failed
    else:
        assert os.stat(root / "huge").st_size == huge and os.stat(root / "huge").st_blocks <= 16
    # A digest of the zeros for a hole is not the hole's: the file is refused, not committed.
    assert b"liar" in failed and "mismatch" in failed[b"liar"] and not (root / "liar").exists()


@pytest.mark.parametrize(
    "frames, error",
    [
        # a hole in a file its sender did not say has holes
        ([[P.FILE, 1, b"f", ATTRS, "whole", 0, 0, False], [P.HOLE, 1, 4096]], "a hole in a file not written with holes"),
        ([[P.FILE, 1, b"f", ATTRS, "whole", 0, 0, True], [P.HOLE, 1, 0]], "hole length"),
        ([[P.FILE, 1, b"f", ATTRS, "whole", 0, 0, True], [P.HOLE, 1, -5]], "hole length"),
        ([[P.FILE, 1, b"f", ATTRS, "whole", 0, 0, True], [P.HOLE, 1, "big"]], "hole length"),
        ([[P.HOLE, 1, 4096]], "for a file that was not started"),  # outside a file
        ([[P.FILE, 1, b"f", ATTRS, "whole", 0, 0, True], [P.HOLE, 2, 4096]], "not started"),
    ],
)
def test_a_malformed_hole_frame_ends_the_session_with_a_protocol_error(tmp_path, frames, error):
    root = tmp_path / "module"
    root.mkdir()
    s = RawSession(root, start={})
    s.drain_summary()
    s.send(*frames)
    s.end()
    refused = s.error()
    assert refused is not None and refused[1] == "ProtocolError" and error in refused[3], s.replies
    assert sorted(os.listdir(root)) == [".mirror"] and not os.listdir(root / ".mirror" / "tmp")
