"""The delta engine: patch(basis, delta(signature(basis), new)) == new, and the engine run
over either kernel (compiled, or the pure twin) gives identical signatures, ops and digests."""

from __future__ import annotations

import io
import os
import random
import threading
import tracemalloc

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror import delta as D
from mirror import fastpath
from tests.conftest import implementations

FAST = fastpath.compiled("delta")
PURE = fastpath.pure("delta")
BOTH = implementations("delta")


def ops_summary(ops):
    return [op if op[0] == D.COPY else (op[0], len(op[1])) for op in ops]


def run_delta(kernel, sig, new: bytes):
    d = D.delta(sig, io.BytesIO(new), kernel=kernel)
    ops = list(d)
    return ops, d.digest, d.new_size


def rebuild(basis: bytes, ops, block_size: int, tmp_path) -> tuple[bytes, bytes, int]:
    path = tmp_path / "basis"
    path.write_bytes(basis)
    out = io.BytesIO()
    with open(path, "rb") as f:
        digest, size = D.patch(f, ops, out, block_size=block_size, basis_size=len(basis))
    return out.getvalue(), digest, size


def check_roundtrip(basis: bytes, new: bytes, block_size: int, seed: int, tmp_path) -> list:
    """Both kernels agree at every step, and the patch rebuilds ``new``."""
    sig_fast = D.signature(io.BytesIO(basis), block_size=block_size, seed=seed, kernel=FAST)
    sig_pure = D.signature(io.BytesIO(basis), block_size=block_size, seed=seed, kernel=PURE)
    assert sig_fast == sig_pure
    assert sig_fast.block_count == -(-len(basis) // block_size)
    ops_fast, digest_fast, size_fast = run_delta(FAST, sig_fast, new)
    ops_pure, digest_pure, size_pure = run_delta(PURE, sig_pure, new)
    assert ops_summary(ops_fast) == ops_summary(ops_pure)
    assert ops_fast == ops_pure
    assert digest_fast == digest_pure == xxhash.xxh3_128_digest(new)
    assert size_fast == size_pure == len(new)
    rebuilt, digest, size = rebuild(basis, ops_fast, block_size, tmp_path)
    assert rebuilt == new
    assert (digest, size) == (digest_fast, len(new))
    return ops_fast


# --------------------------------------------------------------------------- generators


def data_of(kind: str, size: int, rng: random.Random) -> bytes:
    if kind == "random":
        return rng.randbytes(size)
    if kind == "zero":
        return bytes(size)
    if kind == "periodic":
        period = rng.randbytes(rng.choice([1, 3, 16, 64, 100]))
        return (period * (size // len(period) + 1))[:size]
    # text-like: few distinct bytes, many weak-sum collisions
    return bytes(rng.choice(b"ab \n") for _ in range(size))


edit_strategy = st.tuples(
    st.sampled_from(["insert", "delete", "replace", "move", "repeat", "boundary"]),
    st.integers(0, 1 << 16),
    st.integers(1, 400),
    st.integers(0, 1 << 16),
)


def apply_edits(basis: bytes, edits, block_size: int, rng: random.Random) -> bytes:
    new = bytearray(basis)
    for kind, where, length, other in edits:
        at = where % (len(new) + 1)
        if kind == "insert":
            new[at:at] = rng.randbytes(length)
        elif kind == "delete":
            del new[at : at + length]
        elif kind == "replace":
            new[at : at + length] = rng.randbytes(min(length, 8))
        elif kind == "move":
            piece = bytes(new[at : at + length])
            del new[at : at + length]
            to = other % (len(new) + 1)
            new[to:to] = piece
        elif kind == "repeat":
            piece = bytes(new[at : at + length])
            to = other % (len(new) + 1)
            new[to:to] = piece * 2
        else:  # an edit exactly at a block boundary of the basis
            boundary = (at // block_size) * block_size
            new[boundary : boundary + 1] = bytes([(new[boundary] + 1) % 256]) if boundary < len(new) else b"x"
    return bytes(new)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["random", "random", "zero", "periodic", "text"]),
    size=st.integers(0, 3000),
    block_size=st.sampled_from([16, 17, 32, 64, 100, 512]),
    edits=st.lists(edit_strategy, max_size=6),
    seed=st.integers(0, (1 << 64) - 1),
    rng_seed=st.integers(0, 1 << 30),
)
def test_roundtrip_and_twins_agree(kind, size, block_size, edits, seed, rng_seed, tmp_path):
    rng = random.Random(rng_seed)
    basis = data_of(kind, size, rng)
    new = apply_edits(basis, edits, block_size, rng)
    check_roundtrip(basis, new, block_size, seed, tmp_path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(basis=st.binary(max_size=300), new=st.binary(max_size=300), block_size=st.sampled_from([16, 20, 64]))
def test_unrelated_and_tiny_files(basis, new, block_size, tmp_path):
    check_roundtrip(basis, new, block_size, 7, tmp_path)


def test_identical_file_is_one_copy(tmp_path):
    basis = random.Random(1).randbytes(10_000)
    ops = check_roundtrip(basis, basis, 64, 1, tmp_path)
    assert ops == [(D.COPY, 0, -(-10_000 // 64))]


def test_short_final_block_matches_only_at_the_end(tmp_path):
    basis = random.Random(2).randbytes(64 * 3 + 10)
    tail = basis[-10:]
    ops = check_roundtrip(basis, basis + b"more", 64, 1, tmp_path)
    assert ops[0] == (D.COPY, 0, 3)  # the short block is not matched mid-file
    ops = check_roundtrip(basis, b"prefix" + basis, 64, 1, tmp_path)
    assert ops[-1] == (D.COPY, 0, 4)
    check_roundtrip(basis, tail, 64, 1, tmp_path)


def test_edits_cost_about_one_block_each(tmp_path):
    rng = random.Random(3)
    basis = rng.randbytes(64 * 200)
    new = bytearray(basis)
    for block in (10, 50, 120):
        new[block * 64 + 5 : block * 64 + 8] = b"xyz"
    ops = check_roundtrip(basis, bytes(new), 64, 5, tmp_path)
    literal = sum(len(op[1]) for op in ops if op[0] == D.LITERAL)
    assert literal == 3 * 64
    assert [op[0] for op in ops].count(D.COPY) == 4


def test_moved_region_is_copied_not_sent(tmp_path):
    rng = random.Random(4)
    basis = rng.randbytes(64 * 100)
    new = basis[64 * 60 :] + basis[: 64 * 60]
    ops = check_roundtrip(basis, new, 64, 9, tmp_path)
    assert ops == [(D.COPY, 60, 40), (D.COPY, 0, 60)]


def test_literals_are_cut_into_pieces_from_their_start(tmp_path):
    rng = random.Random(5)
    basis = rng.randbytes(4096)
    literal = rng.randbytes(D.MAX_LITERAL * 2 + 1000)
    new = basis[:2048] + literal + basis[2048:]
    ops = check_roundtrip(basis, new, 512, 11, tmp_path)
    lengths = [len(op[1]) for op in ops if op[0] == D.LITERAL]
    assert lengths == [D.MAX_LITERAL, D.MAX_LITERAL, 1000]


def test_no_signature_means_all_literal():
    new = random.Random(6).randbytes(D.MAX_LITERAL * 2 + 5)
    for kernel in (FAST, PURE):
        d = D.delta(None, io.BytesIO(new), kernel=kernel)
        ops = list(d)
        assert [op[0] for op in ops] == [D.LITERAL] * 3
        assert b"".join(op[1] for op in ops) == new
        assert d.digest == xxhash.xxh3_128_digest(new)
        out = io.BytesIO()
        assert D.patch(None, ops, out) == (d.digest, len(new))
        assert out.getvalue() == new


class Trickle(io.RawIOBase):
    """A stream returning short reads of random sizes, like a pipe."""

    def __init__(self, data: bytes, seed: int, *, readinto: bool = True):
        self._data = memoryview(data)
        self._pos = 0
        self._rng = random.Random(seed)
        if not readinto:
            self.readinto = None  # force the read() path

    def readable(self):
        return True

    def read(self, size=-1):
        n = min(self._rng.randint(1, 5000), len(self._data) - self._pos, size if size >= 0 else 1 << 30)
        piece = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return piece

    def readinto(self, buffer):
        piece = self.read(len(buffer))
        buffer[: len(piece)] = piece
        return len(piece)


@pytest.mark.parametrize("kernel", BOTH)
@pytest.mark.parametrize("use_readinto", [True, False])
def test_short_reads_give_the_same_ops(kernel, use_readinto):
    rng = random.Random(8)
    basis = rng.randbytes(40_000)
    new = basis[:9000] + rng.randbytes(3000) + basis[9500:30000] + basis[:5000] + rng.randbytes(33)
    trickle = Trickle(basis, 1, readinto=use_readinto)
    sig = D.signature(trickle, block_size=100, strong_len=8, seed=3, kernel=kernel)
    assert sig == D.signature(io.BytesIO(basis), block_size=100, seed=3, kernel=kernel)
    expected = list(D.delta(sig, io.BytesIO(new), kernel=kernel))
    d = D.delta(sig, Trickle(new, 2, readinto=use_readinto), kernel=kernel)
    assert list(d) == expected
    assert d.digest == xxhash.xxh3_128_digest(new)


def test_signatures_interoperate_between_kernels(tmp_path):
    rng = random.Random(9)
    basis = rng.randbytes(5000)
    new = basis[:1000] + b"!" + basis[1000:]
    sig = D.signature(io.BytesIO(basis), block_size=64, seed=1, kernel=PURE)
    fast, pure = (list(D.delta(sig, io.BytesIO(new), kernel=k)) for k in (FAST, PURE))
    assert fast == pure


def test_seed_changes_strong_hashes_only():
    basis = random.Random(10).randbytes(1000)
    one = D.signature(io.BytesIO(basis), block_size=100, seed=1)
    two = D.signature(io.BytesIO(basis), block_size=100, seed=2)
    assert one.weak == two.weak and one.strong != two.strong
    fresh = {D.signature(io.BytesIO(basis), block_size=100).seed for _ in range(4)}
    assert len(fresh) == 4  # random per signature


def test_weak_sum_vector_and_scalar_paths_agree():
    rng = random.Random(11)
    for size in [0, 1, 31, 32, 33, 63, 64, 4095, 4096, 4097, D.MAX_BLOCK_SIZE]:
        for data in (rng.randbytes(size), b"\xff" * size, bytes(size)):
            assert FAST.weak_sum(data) == FAST._weak_sum_scalar(data) == PURE.weak_sum(data)


def test_strong_hash_is_seeded_xxh3_128():
    data = b"block of data"
    expected = xxhash.xxh3_128_digest(data, seed=42)
    assert FAST.strong_hash(data, 42) == PURE.strong_hash(data, 42) == expected
    assert D.strong_hash(data, 42, 9) == expected[:9]


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(max_size=2000),
    block_size=st.integers(1, 300),
    seed=st.integers(0, (1 << 64) - 1),
    strong_len=st.integers(1, 16),
)
def test_sign_blocks_kernels_agree(data, block_size, seed, strong_len):
    weak, strong = FAST.sign_blocks(data, block_size, seed, strong_len)
    assert (weak, strong) == PURE.sign_blocks(data, block_size, seed, strong_len)
    blocks = [data[i : i + block_size] for i in range(0, len(data), block_size)]
    assert weak == b"".join(PURE.weak_sum(b).to_bytes(4, "little") for b in blocks)
    assert strong == b"".join(xxhash.xxh3_128_digest(b, seed=seed)[:strong_len] for b in blocks)


@pytest.mark.parametrize("kernel", BOTH)
def test_matcher_refuses_sums_that_do_not_cover_the_signature(kernel):
    """The kernels trust the engine's Signature for policy, not for memory safety."""

    class Forged:
        block_size, strong_len, seed, basis_size, block_count = 64, 8, 1, 640, 10
        weak, strong = b"\0" * 36, b"\0" * 80

    with pytest.raises(ValueError):
        kernel.Matcher(Forged())
    Forged.weak, Forged.strong, Forged.block_count = b"\0" * 40, b"\0" * 80, 11
    with pytest.raises(ValueError):
        kernel.Matcher(Forged())
    Forged.block_count, Forged.strong_len = 10, 17
    with pytest.raises(ValueError):
        kernel.Matcher(Forged())


def test_parameter_rules_are_sensible():
    for size in [0, 1, 1000, 10**5, 1 << 20, 10 << 20, 1 << 30, 1 << 32, 1 << 36, 1 << 40]:
        block = D.default_block_size(size)
        assert D.MIN_DEFAULT_BLOCK <= block <= D.MAX_BLOCK_SIZE and block % 64 == 0
        blocks = max(1, -(-size // block))
        strong = D.strong_len_for(size, block)
        # N * C comparisons at 2^-(8 s) each stay below 2^-40 (or s is at its maximum).
        assert strong == D.MAX_STRONG_LEN or max(1, size) * blocks * 2.0 ** (-8 * strong) <= 2.0**-40
    assert D.default_block_size(1 << 30) == 4096
    assert D.default_block_size(1 << 40) == D.MAX_BLOCK_SIZE


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="block size"):
        D.signature(io.BytesIO(b"x"), block_size=8)
    with pytest.raises(ValueError, match="block size"):
        D.signature(io.BytesIO(b"x"), block_size=D.MAX_BLOCK_SIZE + 1)
    with pytest.raises(ValueError, match="strong hash length"):
        D.signature(io.BytesIO(b"x"), block_size=64, strong_len=17)
    with pytest.raises(ValueError, match="needs 2 blocks"):
        D.Signature(64, 8, 0, 100, b"\0" * 4, b"\0" * 8)


def test_patcher_checks_copy_ops_before_touching_the_basis(tmp_path):
    impl = D
    path = tmp_path / "basis"
    path.write_bytes(b"a" * 1000)

    class Watched(io.FileIO):
        seeks = 0

        def seek(self, *args):
            Watched.seeks += 1
            return super().seek(*args)

    with Watched(path, "rb") as basis:
        patcher = impl.Patcher(basis, io.BytesIO(), 100, 1000)
        before = Watched.seeks
        for bad in [(impl.COPY, 9, 2), (impl.COPY, 10, 1), (impl.COPY, -1, 1), (impl.COPY, 0, 0)]:
            with pytest.raises(ValueError):
                patcher.apply(bad)
        with pytest.raises(ValueError, match="unknown delta op"):
            patcher.apply((7, 1))
        with pytest.raises(ValueError, match="exceeds"):
            patcher.apply((impl.LITERAL, b"x" * (impl.MAX_LITERAL + 1)))
        assert Watched.seeks == before
        patcher.apply((impl.COPY, 9, 1))
        assert patcher.finish() == (xxhash.xxh3_128_digest(b"a" * 100), 100)
    with open(path, "rb") as basis, pytest.raises(ValueError, match="wrong or changed basis"):
        impl.Patcher(basis, io.BytesIO(), 100, 999)
    with pytest.raises(ValueError, match="needs a basis"):
        impl.Patcher(None, io.BytesIO(), 100, 1000)
    with open(path, "rb") as basis:
        patcher = impl.Patcher(basis, io.BytesIO(), 100, 1000, max_size=150)
        patcher.apply((impl.COPY, 0, 1))
        with pytest.raises(ValueError, match="more than the allowed"):
            patcher.apply((impl.COPY, 0, 1))


class Generated(io.RawIOBase):
    """``size`` bytes of deterministic data produced on the fly (never held whole)."""

    def __init__(self, size: int, seed: int):
        self._left = size
        self._rng = random.Random(seed)
        self._block = self._rng.randbytes(1 << 16)

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self._left, len(self._block))
        buffer[:n] = self._block[:n]
        self._block = self._block[n:] + self._block[:n]  # rotate: no long-range matches
        self._left -= n
        return n


def test_memory_is_bounded_by_the_signature_not_the_file():
    sig = D.signature(io.BytesIO(random.Random(12).randbytes(1 << 20)), block_size=4096, seed=1, kernel=FAST)
    tracemalloc.start()
    try:
        d = D.delta(sig, Generated(64 << 20, 13), kernel=FAST)
        pending = 0
        for op in d:
            pending = max(pending, len(op[1]) if op[0] == D.LITERAL else 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert d.new_size == 64 << 20
    assert pending <= D.MAX_LITERAL
    assert peak < 4 << 20, f"peak {peak} bytes while streaming 64 MiB"


def test_delta_runs_in_two_threads_at_once():
    """The loops release the GIL; two deltas in two threads give the same results as one."""
    rng = random.Random(14)
    basis = rng.randbytes(2 << 20)
    new = basis[:100_000] + rng.randbytes(5000) + basis[100_000:]
    sig = D.signature(io.BytesIO(basis), block_size=1024, seed=3, kernel=FAST)
    expected = list(D.delta(sig, io.BytesIO(new), kernel=FAST))
    results = []

    def work():
        results.append(list(D.delta(sig, io.BytesIO(new), kernel=FAST)))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [expected, expected]


def test_reused_buffers_hold_nothing_over(tmp_path):
    """The engine keeps the buffers of finished signatures, deltas and patches for the
    next ones (a sync sends thousands of small files).  Each reuse starts from the last one's
    bytes: the results must not depend on them."""
    rng = random.Random(16)
    noise = rng.randbytes(600_000)  # fills every buffer with bytes the next users never wrote
    basis = rng.randbytes(20_000)
    cases = [b"", b"x", basis[:4095], basis[:4097], basis[:9000] + b"edit" + basis[9000:], noise[:300]]
    for new in cases:
        check_roundtrip(noise, noise[::-1], 4096, 1, tmp_path)
        check_roundtrip(basis, new, 1024, 2, tmp_path)
        assert run_delta(FAST, None, new) == run_delta(PURE, None, new)
    # A few spare buffers of a few sizes, however many deltas ran, at however many block sizes.
    for block_size in range(64, 64 * 40, 64):
        check_roundtrip(basis, basis[:5000] + b"edit" + basis[5000:], block_size, 3, tmp_path)
    assert 0 < len(D._SPARE_BUFFERS) <= D._SPARE_SIZES
    assert all(len(spare) <= D._SPARE_PER_SIZE for spare in D._SPARE_BUFFERS.values())


def test_reads_real_files(tmp_path):
    rng = random.Random(15)
    basis = rng.randbytes(300_000)
    new = basis[:150_000] + b"edit" + basis[150_100:]
    (tmp_path / "b").write_bytes(basis)
    (tmp_path / "n").write_bytes(new)
    for kernel in (FAST, PURE):
        with open(tmp_path / "b", "rb") as f:
            sig = D.signature(f, seed=5, kernel=kernel)
        assert sig.block_size == D.default_block_size(len(basis))
        with open(tmp_path / "n", "rb", buffering=0) as f:
            d = D.delta(sig, f, kernel=kernel)
            ops = list(d)
        with open(tmp_path / "b", "rb") as f, open(tmp_path / "out", "wb") as out:
            assert D.patch(f, ops, out, block_size=sig.block_size, basis_size=len(basis)) == (
                d.digest,
                len(new),
            )
        assert (tmp_path / "out").read_bytes() == new
        os.unlink(tmp_path / "out")


def forged_signature(block_size: int, weak: int, strongs: list[bytes]):
    """A signature whose blocks all claim the same weak sum (as a hostile receiver could)."""
    count = len(strongs)
    return D.Signature(
        block_size,
        len(strongs[0]),
        5,
        block_size * count,
        weak.to_bytes(4, "little") * count,
        b"".join(strongs),
    )


@pytest.mark.parametrize("kernel", BOTH)
def test_candidates_per_window_are_capped(kernel):
    """Only the first MAX_CANDIDATES blocks with the window's weak sum are compared."""
    window = bytes(range(32))
    weak = kernel.weak_sum(window)
    real = kernel.strong_hash(window, 5)[:8]
    decoy = b"\xff" * 8
    for position, expect_match in ((10, True), (D.MAX_CANDIDATES, False), (80, False)):
        strongs = [decoy] * 100
        strongs[position] = real
        sig = forged_signature(32, weak, strongs)
        ops = list(D.delta(sig, io.BytesIO(window), kernel=kernel))
        assert ops == ([(D.COPY, position, 1)] if expect_match else [(D.LITERAL, window)])


@pytest.mark.timeout(60)
def test_hostile_signature_cannot_make_the_delta_quadratic():
    """65,536 blocks sharing the weak sum of a zero block, none matching: every position of a
    1 MiB zero file is a candidate for all of them; without the cap that is 7e10 compares."""
    block = 16
    weak = FAST.weak_sum(bytes(block))
    sig = forged_signature(block, weak, [i.to_bytes(8, "little") for i in range(1 << 16)])
    d = D.delta(sig, io.BytesIO(bytes(1 << 20)), kernel=FAST)
    assert sum(len(op[1]) for op in d if op[0] == D.LITERAL) == 1 << 20
