"""Signature and delta streams: golden vectors pin the formats; hostile streams are refused
quickly, with bounded memory, before anything is allocated for them or read from a basis.

Regenerate the golden files (only for an intended format change, with a version bump):
``MIRROR_REGEN_GOLDEN=1 python -m pytest tests/test_delta_format.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import time
import tracemalloc
from pathlib import Path

import msgpack
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror import delta as D
from mirror import deltafmt
from mirror.errors import FormatError, IntegrityError, LimitExceeded
from tests.conftest import implementations

GOLDEN = Path(__file__).parent / "golden"
BOTH = implementations("delta")

# The golden pair: a basis with repeated and unique regions, and a new version with an
# insertion, a deletion, a moved block and a changed tail.
GOLDEN_BASIS = bytes(range(256)) * 3 + b"unique middle part of the basis" * 5 + bytes(100)
GOLDEN_NEW = (
    GOLDEN_BASIS[:300]
    + b"INSERTED"
    + GOLDEN_BASIS[300:500]
    + GOLDEN_BASIS[600:900]
    + GOLDEN_BASIS[:64]
    + b"end"
)
GOLDEN_SEED = 0x0123456789ABCDEF
GOLDEN_BLOCK = 64


def golden(name: str, data: bytes) -> bytes:
    path = GOLDEN / name
    if os.environ.get("MIRROR_REGEN_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    return path.read_bytes()


def golden_signature(kernel=None):
    return D.signature(io.BytesIO(GOLDEN_BASIS), block_size=GOLDEN_BLOCK, seed=GOLDEN_SEED, kernel=kernel)


def delta_bytes(sig, new: bytes, kernel=None) -> bytes:
    out = io.BytesIO()
    deltafmt.write_delta(D.delta(sig, io.BytesIO(new), kernel=kernel), out)
    return out.getvalue()


@pytest.mark.parametrize("kernel", BOTH)
def test_signature_format_is_pinned(kernel):
    data = deltafmt.signature_to_bytes(golden_signature(kernel))
    assert data == golden("signature-v1.bin", data)
    assert data.startswith(b"HMIRSIG\n")
    sig = deltafmt.signature_from_bytes(golden("signature-v1.bin", data))
    assert sig == golden_signature(kernel)


@pytest.mark.parametrize("kernel", BOTH)
def test_delta_format_is_pinned(kernel, tmp_path):
    data = delta_bytes(golden_signature(kernel), GOLDEN_NEW, kernel)
    assert data == golden("delta-v1.bin", data)
    (tmp_path / "basis").write_bytes(GOLDEN_BASIS)
    out = io.BytesIO()
    with open(tmp_path / "basis", "rb") as basis:
        digest, size = deltafmt.patch_stream(basis, io.BytesIO(data), out)
    assert out.getvalue() == GOLDEN_NEW
    assert (digest, size) == (xxhash.xxh3_128_digest(GOLDEN_NEW), len(GOLDEN_NEW))


def test_golden_delta_reads_as_documented():
    reader = deltafmt.read_delta(io.BytesIO((GOLDEN / "delta-v1.bin").read_bytes()))
    assert (reader.block_size, reader.basis_size) == (GOLDEN_BLOCK, len(GOLDEN_BASIS))
    ops = list(reader)
    assert ops[0] == (deltafmt.COPY, 0, 4)
    assert any(op[0] == deltafmt.LITERAL and b"INSERTED" in op[1] for op in ops)
    assert reader.new_size == len(GOLDEN_NEW)
    assert reader.digest == xxhash.xxh3_128_digest(GOLDEN_NEW)


def test_large_signature_round_trips_in_batches():
    basis = os.urandom(deltafmt.BATCH_BLOCKS * 16 + 5)
    sig = D.signature(io.BytesIO(basis), block_size=16)
    data = deltafmt.signature_to_bytes(sig)
    assert deltafmt.signature_from_bytes(data) == sig
    with pytest.raises(LimitExceeded, match="limit is 1000"):
        deltafmt.signature_from_bytes(data, max_blocks=1000)


# --------------------------------------------------------------------------- hostile input


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def sig_header(**fields) -> bytes:
    header = {
        "version": 1,
        "block_size": 64,
        "strong_len": 8,
        "seed": 1,
        "basis_size": 640,
        "block_count": 10,
    }
    header.update(fields)
    return b"HMIRSIG\n" + pack(header)


def delta_header(**fields) -> bytes:
    header = {"version": 1, "block_size": 64, "basis_size": 640}
    header.update(fields)
    return b"HMIRDLT\n" + pack(header)


def bounded(call, limit_bytes: int = 2 << 20):
    """Run ``call`` expecting an error; assert it was quick and allocated little."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises((FormatError, IntegrityError)) as info:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 2.0
    assert peak < limit_bytes, f"refusing hostile input allocated {peak} bytes"
    return info.value


HOSTILE_SIGNATURES = {
    "empty": (b"", "truncated"),
    "wrong magic": (b"RS\x016" + b"\0" * 20, "not a hamirror signature"),
    "a delta": (delta_header(), "this is a delta"),
    "future version": (sig_header(version=2), "version 2 is not supported"),
    "huge block count": (sig_header(basis_size=64 << 40, block_count=1 << 40), "limit"),
    "inconsistent count": (sig_header(block_count=11), "inconsistent"),
    "zero block size": (sig_header(block_size=0), "inconsistent"),
    "strong too long": (sig_header(strong_len=64), "strong hash length"),
    "negative size": (sig_header(basis_size=-1), "non-negative"),
    "header not a map": (b"HMIRSIG\n" + pack([1, 2]), "not a map"),
    "extra header key": (sig_header(extra=1), "keys"),
    "truncated blocks": (sig_header() + pack([b"\0" * 20, b"\0" * 40]), "truncated"),
    "batch too big": (sig_header() + pack([b"\0" * 44, b"\0" * 88]), "does not fit"),
    "batch mismatched": (sig_header() + pack([b"\0" * 40, b"\0" * 79]), "does not fit"),
    "declared 4 GiB bin": (sig_header() + b"\x92\xc6\xff\xff\xff\xff" + b"\0" * 100, "truncated|oversized"),
    "huge array": (sig_header() + b"\xdd\xff\xff\xff\xff", "oversized"),
    "trailing bytes": (sig_header() + pack([b"\0" * 40, b"\0" * 80]) + b"x", "trailing"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_SIGNATURES))
def test_hostile_signature_is_refused(name):
    data, message = HOSTILE_SIGNATURES[name]
    error = bounded(lambda: deltafmt.read_signature(io.BytesIO(data)))
    assert re.search(message, str(error)), str(error)


def test_endless_oversized_item_hits_the_buffer_limit():
    class Endless(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            buffer[:] = b"\0" * len(buffer)
            return len(buffer)

    stream = io.BufferedReader(Endless())
    data = sig_header() + b"\x92\xc6\x7f\xff\xff\xff"
    chained = io.BufferedReader(io.BytesIO(data))

    class Chain(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            piece = chained.read(len(buffer)) or stream.read(len(buffer))
            buffer[: len(piece)] = piece
            return len(piece)

    error = bounded(lambda: deltafmt.read_signature(Chain()), limit_bytes=8 << 20)
    assert isinstance(error, LimitExceeded)


def end_record(data: bytes = b"") -> bytes:
    return pack([2, len(data), xxhash.xxh3_128_digest(data)])


HOSTILE_DELTAS = {
    "wrong magic": (b"HMIRDLX\n", "not a hamirror delta"),
    "a signature": (sig_header(), "this is a signature"),
    "future version": (delta_header(version=9), "version 9"),
    "zero block size": (delta_header(block_size=0), "block size of 0"),
    "no end record": (delta_header() + pack([1, b"abc"]), "truncated"),
    "copy past the end": (delta_header() + pack([0, 9, 2]) + end_record(), "only 10 blocks"),
    "copy from nothing": (delta_header(basis_size=0) + pack([0, 0, 1]) + end_record(), "only 0 blocks"),
    "negative copy": (delta_header() + pack([0, -1, 1]) + end_record(), "invalid block range"),
    "empty copy": (delta_header() + pack([0, 1, 0]) + end_record(), "invalid block range"),
    "empty literal": (delta_header() + pack([1, b""]) + end_record(), "does not carry bytes"),
    "unknown op": (delta_header() + pack([5, 1]) + end_record(), "unknown kind"),
    "declared 4 GiB literal": (
        delta_header() + b"\x92\x01\xc6\xff\xff\xff\xff" + b"x" * 1000,
        "truncated|oversized",
    ),
    "short digest": (delta_header() + pack([2, 0, b"\0" * 8]), "end record"),
    "trailing bytes": (delta_header() + end_record() + b"\0", "trailing"),
    "wrong digest": (delta_header(basis_size=0) + pack([1, b"abc"]) + end_record(b"abd"), "digest"),
    "wrong size": (delta_header(basis_size=0) + pack([1, b"abc"]) + pack([2, 4, b"\0" * 16]), "promises 4"),
    "wrong basis size": (delta_header(basis_size=641) + end_record(), "wrong or changed basis"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_DELTAS))
def test_hostile_delta_is_refused(name, tmp_path):
    data, message = HOSTILE_DELTAS[name]
    empty_basis = name in ("copy from nothing", "wrong digest", "wrong size")
    (tmp_path / "basis").write_bytes(b"" if empty_basis else b"b" * 640)
    out = io.BytesIO()
    with open(tmp_path / "basis", "rb") as basis:
        error = bounded(lambda: deltafmt.patch_stream(basis, io.BytesIO(data), out))
    assert re.search(message, str(error)), str(error)


def test_every_truncation_of_a_valid_stream_is_refused(tmp_path):
    sig_data = deltafmt.signature_to_bytes(golden_signature())
    for cut in range(len(sig_data)):
        with pytest.raises(FormatError):
            deltafmt.signature_from_bytes(sig_data[:cut])
    data = delta_bytes(golden_signature(), GOLDEN_NEW)
    (tmp_path / "basis").write_bytes(GOLDEN_BASIS)
    with open(tmp_path / "basis", "rb") as basis:
        for cut in range(len(data)):
            with pytest.raises(FormatError):
                deltafmt.patch_stream(basis, io.BytesIO(data[:cut]), io.BytesIO())


def test_flipped_literal_byte_fails_verification(tmp_path):
    data = bytearray(delta_bytes(golden_signature(), GOLDEN_NEW))
    at = data.index(b"INSERTED")
    data[at] ^= 1
    (tmp_path / "basis").write_bytes(GOLDEN_BASIS)
    with open(tmp_path / "basis", "rb") as basis, pytest.raises(IntegrityError, match="digest"):
        deltafmt.patch_stream(basis, io.BytesIO(bytes(data)), io.BytesIO())


def test_copy_header_fields_are_little_endian_weak_sums():
    sig = golden_signature()
    first = struct.unpack_from("<I", sig.weak, 0)[0]
    assert first == D.weak_sum(GOLDEN_BASIS[:GOLDEN_BLOCK])


def test_a_header_with_str_and_bytes_keys_is_a_format_error(tmp_path):
    # Found by the fuzz test below: naming the keys sorted them, and str and bytes keys
    # do not compare.
    header = {"version": deltafmt.VERSION, "block_size": 512, "basis_size": 0, b"basis_size": 0}
    basis = tmp_path / "basis"
    basis.write_bytes(b"")
    with basis.open("rb") as f, pytest.raises(FormatError, match="header has keys"):
        deltafmt.patch_stream(f, io.BytesIO(deltafmt.DELTA_MAGIC + msgpack.packb(header)), io.BytesIO())


# Fuzzing: valid streams with random bytes overwritten, inserted or cut, and plain noise.  A
# reader either returns a well-formed result or raises one of the library's errors; it never
# crashes otherwise, hangs or allocates for what the stream merely declares.
_mutations = st.lists(
    st.tuples(st.sampled_from(["set", "insert", "cut"]), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=9)),
    min_size=1, max_size=4,
)  # fmt: skip


def _mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, at, piece in mutations:
        at %= len(out) + 1
        if kind == "set":
            out[at : at + len(piece)] = piece
        elif kind == "insert":
            out[at:at] = piece
        else:
            del out[at : at + len(piece)]
    return bytes(out)


@contextlib.contextmanager
def _refused_or_accepted(limit_bytes: int):
    """A fuzzed stream is either read or refused with the library's own error, and reading or
    refusing it allocates less than ``limit_bytes``."""
    tracemalloc.start()
    try:
        yield
    except (FormatError, IntegrityError):
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < limit_bytes


_fuzzed = st.one_of(st.binary(max_size=200), _mutations.map(lambda m: ("mutate", m)))


@settings(max_examples=200, deadline=None)
@given(_fuzzed)
def test_signature_reader_fuzz(case):
    valid = deltafmt.signature_to_bytes(golden_signature())
    data = _mutate(valid, case[1]) if isinstance(case, tuple) else case
    with _refused_or_accepted(2 << 20):
        deltafmt.signature_from_bytes(data)


@settings(max_examples=200, deadline=None)
@given(_fuzzed)
def test_delta_reader_fuzz(tmp_path_factory, case):
    valid = delta_bytes(golden_signature(), GOLDEN_NEW)
    data = _mutate(valid, case[1]) if isinstance(case, tuple) else case
    basis_path = tmp_path_factory.getbasetemp() / "fuzz-basis"
    if not basis_path.exists():
        basis_path.write_bytes(GOLDEN_BASIS)
    out = io.BytesIO()
    with _refused_or_accepted(4 << 20), open(basis_path, "rb") as basis:
        deltafmt.patch_stream(basis, io.BytesIO(data), out)
        # Accepted: then it must be a stream that verifies, i.e. the real new file.
        assert out.getvalue() == GOLDEN_NEW
