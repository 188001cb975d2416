"""Rolling-checksum delta engine, pure-Python twin: the readable specification.

``mirror/_fast/delta.pyx`` implements exactly this, fast; both give identical signatures,
identical ops and identical digests for the same input and seed (the test suite proves it).
Use ``mirror.fastpath.choose("delta")`` rather than importing either module directly.

The algorithm is rsync's.  The receiver cuts its old file (the *basis*) into blocks and
sends a *signature*: per block a weak rolling sum and a strong hash.  The sender slides a
window of one block over its new file; where the weak sum of the window names a block and
the strong hashes agree, it sends "copy that block" instead of the bytes.

API (the same names in both modules)
------------------------------------
``signature(basis, *, block_size=None, strong_len=None, seed=None, size_hint=None) -> Signature``
    Reads the binary stream ``basis`` to its end (``size_hint``, default the file's size,
    only feeds the default block size and strong length).  ``Signature`` carries ``block_size,
    strong_len, seed, basis_size, block_count`` and the packed sums ``weak`` (4 bytes per
    block, little-endian) and ``strong`` (``strong_len`` bytes per block).  It is
    serialised by ``mirror.deltafmt``.
``delta(sig, new) -> Delta``
    An iterator of ops over the binary stream ``new``, read in chunks: memory is bounded by
    the signature, never by the file.  Ops are tuples ``(COPY, first_block, block_count)``
    (a run of consecutive basis blocks, merged) and ``(LITERAL, data)``.  After exhaustion
    ``Delta.digest`` is the 16-byte xxh3-128 of ``new`` and ``Delta.new_size`` its length.
    ``sig=None`` means "no basis": every byte is literal (one code path for new files).
``patch(basis, ops, out, *, block_size=None, basis_size=None, max_size=None) -> (digest, size)``
    Applies ops to produce the new file on ``out``; returns the xxh3-128 digest and size of
    what it wrote (compare them with ``Delta.digest``/``new_size``).  ``block_size`` and
    ``basis_size`` default to the attributes of the same name on ``ops`` (a ``Delta`` or a
    ``deltafmt`` reader has them).
``Patcher(basis, out, block_size, basis_size, *, max_size=None)``
    The incremental form for a receiver fed op by op: ``.apply(op)``, ``.finish() ->
    (digest, size)``.  Every copy op is checked against the basis (block range, and the
    basis file really being ``basis_size`` bytes) before anything is read or written;
    ``max_size`` bounds the output (copy ops amplify: pass the size the manifest expects).
``default_block_size(size)``, ``strong_len_for(size, block_size)``, ``weak_sum(data)``,
``strong_hash(data, seed, strong_len)``: the rules and primitives below.
Invalid ops and arguments raise ``ValueError`` with a message an administrator can act
on; ``mirror.deltafmt`` turns them into ``FormatError`` for streams.

Weak sum
--------
rsync's: for a window x[0..n), ``a = sum x[i]`` and ``b = sum (n - i) * x[i]``, both mod
2^16, ``weak = a | b << 16``.  Rolling one byte costs three adds and a shift:
``a += in - out; b += a - n * out``.

Strong hash
-----------
XXH3-128 of the block with the signature's 64-bit ``seed``, canonical (big-endian) bytes,
truncated to ``strong_len``.  The seed is random per signature, so a crafted file cannot
plan collisions for a basis it does not know the seed of (librsync's CVE-2014-8242 was an
unseeded hash).

Matching rules (what makes both implementations produce the same ops)
---------------------------------------------------------------------
* Only full blocks of ``block_size`` bytes are matched by the sliding window.  The basis's
  short final block (when ``basis_size`` is not a multiple of ``block_size``) can only match
  the last bytes of ``new``, checked once at the end.
* Right after a match of block k, the window is first compared with block k + 1 by strong
  hash alone: on near-identical files the loop then steps block by block and never rolls.
* Otherwise the candidates are the blocks whose weak sum equals the window's, in ascending
  block order; at most ``MAX_CANDIDATES`` of them are compared by strong hash (this bounds
  the work a hostile signature can cause); the first that agrees wins.
* Consecutive matches of consecutive blocks are merged into one copy op.
* A run of literal bytes is cut into pieces of ``MAX_LITERAL`` bytes from its start.

Default block size: the cost model
----------------------------------
Bytes on the wire for a file of N bytes, blocks of B bytes, s-byte strong hashes and E
edited places: ``T(B) = (N / B) * (4 + s)  +  E * B`` (signature + about one spoiled block
of literals per edit; the edited bytes themselves do not depend on B).  T is smallest at
``B* = sqrt(N * (4 + s) / E)``.  rsync takes E as a constant (B ~ sqrt(N)), so a 1 GiB file
gets 32 KiB blocks and every small edit costs 32 KiB.  We assume instead that edits scale
with the data, one per ``EDIT_SPACING`` (1 MiB) and at least one per file:
``E = max(1, N / EDIT_SPACING)``.  Then B* = sqrt(min(N, EDIT_SPACING) * (4 + s)), about
4 KiB for every file over 1 MiB.  The result is rounded to a multiple of 64 and clamped to
[``MIN_DEFAULT_BLOCK``, ``MAX_BLOCK_SIZE``]; for huge files B is raised so the signature
stays at most ``MAX_DEFAULT_BLOCKS`` blocks (memory and table size), trading bytes for
bounded memory.  ``block_size=`` overrides the rule (any size in
[``MIN_BLOCK_SIZE``, ``MAX_BLOCK_SIZE``]).

Strong-hash length
------------------
A false match needs a strong-hash collision.  Per window position at most every block is a
candidate (the weak sum is not counted on: it is easy to forge), so a file of N bytes
against C blocks makes at most N * C comparisons, each false with probability 2^-(8 s).
Keeping N * C * 2^-(8 s) below 2^-40 gives
``s = ceil((40 + log2 N + log2 C) / 8)``, clamped to [``MIN_STRONG_LEN``, 16]: 11 bytes for
1 GiB in 4 KiB blocks.
"""

from __future__ import annotations

import math
import os
import stat
import sys
from array import array
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import xxhash

COPY = 0
LITERAL = 1

MIN_BLOCK_SIZE = 16
MIN_DEFAULT_BLOCK = 512
MAX_BLOCK_SIZE = 128 * 1024
MAX_DEFAULT_BLOCKS = 1 << 22
EDIT_SPACING = 1 << 20
MIN_STRONG_LEN = 6
MAX_STRONG_LEN = 16
MAX_LITERAL = 256 * 1024
MAX_CANDIDATES = 64
DIGEST_LEN = 16

# How much of ``new``/``basis`` is read per call (the ops do not depend on it).
READ_CHUNK = 128 * 1024


def strong_len_for(size: int, block_size: int) -> int:
    """Bytes of strong hash so that a false match in a file of ``size`` bytes stays < 2^-40."""
    _check_block_size(block_size)
    blocks = max(1, -(-size // block_size))
    bits = 40 + math.log2(max(1, size)) + math.log2(blocks)
    return max(MIN_STRONG_LEN, min(MAX_STRONG_LEN, math.ceil(bits / 8)))


def default_block_size(size: int) -> int:
    """Block size minimising signature + delta bytes under the model in the module docstring."""
    if size < 0:
        raise ValueError(f"file size cannot be negative ({size})")
    edits = max(1.0, size / EDIT_SPACING)
    floor = max(MIN_DEFAULT_BLOCK, size / MAX_DEFAULT_BLOCKS)

    def rounded(block: float) -> int:
        return max(MIN_DEFAULT_BLOCK, min(MAX_BLOCK_SIZE, int(round(max(block, floor) / 64)) * 64))

    def cost(block: int) -> float:
        return -(-size // block) * (4 + strong_len_for(size, block)) + edits * block

    # s depends on B (through log2 C), so try the optimum for every possible s and keep the
    # cheapest; ties go to the larger block (fewer blocks, less work).
    candidates = {
        rounded(math.sqrt(size * (4 + s) / edits)) for s in range(MIN_STRONG_LEN, MAX_STRONG_LEN + 1)
    }
    return min(sorted(candidates, reverse=True), key=cost)


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block size {block_size!r} is outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE} bytes")


def _check_strong_len(strong_len: int) -> None:
    if not isinstance(strong_len, int) or not 1 <= strong_len <= MAX_STRONG_LEN:
        raise ValueError(f"strong hash length {strong_len!r} is outside 1..{MAX_STRONG_LEN} bytes")


def weak_sum(data) -> int:
    """rsync's weak checksum of ``data`` as one 32-bit value (``a | b << 16``)."""
    n = len(data)
    a = sum(data)
    b = sum((n - i) * x for i, x in enumerate(data))
    return (a & 0xFFFF) | ((b & 0xFFFF) << 16)


def strong_hash(data, seed: int, strong_len: int) -> bytes:
    return xxhash.xxh3_128_digest(data, seed=seed)[:strong_len]


class Signature:
    """The receiver's description of its basis: per block a weak sum and a strong hash."""

    __slots__ = ("block_size", "strong_len", "seed", "basis_size", "block_count", "weak", "strong")

    def __init__(
        self, block_size: int, strong_len: int, seed: int, basis_size: int, weak: bytes, strong: bytes
    ):
        _check_block_size(block_size)
        _check_strong_len(strong_len)
        if not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise ValueError(f"signature seed {seed!r} is not a 64-bit unsigned integer")
        if not isinstance(basis_size, int) or not 0 <= basis_size < 1 << 63:
            raise ValueError(f"basis size {basis_size!r} is not a valid file size")
        block_count = -(-basis_size // block_size)
        if len(weak) != 4 * block_count or len(strong) != strong_len * block_count:
            raise ValueError(
                f"signature of a {basis_size}-byte basis in {block_size}-byte blocks needs "
                f"{block_count} blocks, but carries {len(weak)} bytes of weak sums and "
                f"{len(strong)} bytes of strong hashes"
            )
        self.block_size = block_size
        self.strong_len = strong_len
        self.seed = seed
        self.basis_size = basis_size
        self.block_count = block_count
        self.weak = bytes(weak)
        self.strong = bytes(strong)

    def __eq__(self, other: object) -> bool:
        if not hasattr(other, "weak") or not hasattr(other, "strong"):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __hash__(self) -> int:
        return hash((self.block_size, self.seed, self.basis_size, self.strong))

    def __repr__(self) -> str:
        return (
            f"Signature(block_size={self.block_size}, strong_len={self.strong_len}, "
            f"basis_size={self.basis_size}, block_count={self.block_count})"
        )


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes; fewer only at end of stream (pipes return short reads)."""
    parts = []
    while size > 0:
        piece = stream.read(size)
        if not piece:
            break
        parts.append(piece)
        size -= len(piece)
    return b"".join(parts)


def signature(
    basis: BinaryIO,
    *,
    block_size: int | None = None,
    strong_len: int | None = None,
    seed: int | None = None,
    size_hint: int | None = None,
) -> Signature:
    """The signature of the whole of ``basis`` (read from its current position to its end).

    ``size_hint`` (default: the size of the file behind ``basis`` if it has one) only feeds
    the default block size and strong length; a pipe without a hint gets the 1 MiB rule.
    """
    if size_hint is None:
        size_hint = _remaining_size(basis)
    if block_size is None:
        block_size = default_block_size(size_hint if size_hint is not None else EDIT_SPACING)
    _check_block_size(block_size)
    if strong_len is None:
        strong_len = strong_len_for(size_hint if size_hint is not None else 1 << 40, block_size)
    _check_strong_len(strong_len)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    weak = array("I")
    strong = bytearray()
    basis_size = 0
    chunk_size = READ_CHUNK - READ_CHUNK % block_size
    while True:
        chunk = _read_full(basis, chunk_size)
        basis_size += len(chunk)
        for start in range(0, len(chunk), block_size):
            block = chunk[start : start + block_size]
            weak.append(weak_sum(block))
            strong += strong_hash(block, seed, strong_len)
        if len(chunk) < chunk_size:
            break
    if sys.byteorder == "big":
        weak.byteswap()
    return Signature(block_size, strong_len, seed, basis_size, weak.tobytes(), bytes(strong))


def _remaining_size(stream: BinaryIO) -> int | None:
    """Bytes from the current position to the end, for regular files; None for pipes."""
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        return None
    try:
        if not stream.seekable():
            return None
        here = stream.tell()
        end = stream.seek(0, 2)
        stream.seek(here)
        return end - here
    except (AttributeError, OSError, ValueError):
        return None


def _empty_signature() -> Signature:
    return Signature(default_block_size(0), MIN_STRONG_LEN, 0, 0, b"", b"")


class _Table:
    """Weak sum -> blocks with that sum (ascending), for the full-size blocks of a signature."""

    def __init__(self, sig: Signature):
        weak = array("I", sig.weak)
        if sys.byteorder == "big":
            weak.byteswap()
        self.full_blocks = sig.basis_size // sig.block_size
        self.by_weak: dict[int, list[int]] = {}
        for index in range(self.full_blocks):
            self.by_weak.setdefault(weak[index], []).append(index)
        self.strong_len = sig.strong_len
        self.strong = sig.strong

    def strong_of(self, block: int) -> bytes:
        return self.strong[block * self.strong_len : (block + 1) * self.strong_len]


class Delta:
    """Iterator of ops turning the signature's basis into ``new``; see the module docstring."""

    def __init__(self, sig: Signature | None, new: BinaryIO):
        self.sig = sig if sig is not None else _empty_signature()
        self.block_size = self.sig.block_size
        self.basis_size = self.sig.basis_size
        self.digest: bytes | None = None
        self.new_size: int | None = None
        self._ops = _delta_ops(self.sig, new, self)

    def __iter__(self) -> Iterator[tuple]:
        return self

    def __next__(self) -> tuple:
        return next(self._ops)


def delta(sig: Signature | None, new: BinaryIO) -> Delta:
    """The ops that rebuild ``new`` from the basis ``sig`` describes (lazy: iterate them)."""
    return Delta(sig, new)


def _literal_pieces(data: bytes) -> Iterator[tuple]:
    for start in range(0, len(data), MAX_LITERAL):
        yield (LITERAL, data[start : start + MAX_LITERAL])


def _delta_ops(sig: Signature, new: BinaryIO, result: Delta) -> Iterator[tuple]:
    """The matching loop: a generator over ``new`` keeping at most a literal piece and a block."""
    block = sig.block_size
    seed, strong_len = sig.seed, sig.strong_len
    table = _Table(sig)
    full_blocks = table.full_blocks
    tail_len = sig.basis_size - full_blocks * block  # the basis's short final block, or 0
    digest = xxhash.xxh3_128()

    # ``window`` holds the not yet emitted bytes of ``new``: pending literal bytes, then the
    # current window of ``block`` bytes starting at ``pos``.  (The compiled version keeps
    # them in one reused buffer; here a bytearray trimmed as literals are emitted.)
    window = bytearray()
    pos = 0  # window start, as an index into ``window``; window[:pos] is pending literal
    new_size = 0
    eof = False
    run_first, run_count = -1, 0  # pending copy run
    expected = -1  # block after the last match: tried first
    weak_a = weak_b = 0
    weak_valid = False

    def fill(need: int) -> bool:
        nonlocal eof, new_size
        while len(window) < need and not eof:
            chunk = new.read(READ_CHUNK)
            if not chunk:
                eof = True
                break
            digest.update(chunk)
            new_size += len(chunk)
            window.extend(chunk)
        return len(window) >= need

    if full_blocks == 0:
        # Nothing the window could match: skip the rolling, emit the same pieces it would
        # (a piece leaves once a full window lies beyond it).
        while fill(MAX_LITERAL + block):
            yield (LITERAL, bytes(window[:MAX_LITERAL]))
            del window[:MAX_LITERAL]
    while full_blocks and fill(pos + block):
        match = -1
        window_strong = None
        if not weak_valid and 0 <= expected < full_blocks:
            window_strong = strong_hash(window[pos : pos + block], seed, strong_len)
            if window_strong == table.strong_of(expected):
                match = expected
        if match < 0:
            if not weak_valid:
                current = window[pos : pos + block]
                weak_a = sum(current) & 0xFFFF
                weak_b = sum((block - i) * x for i, x in enumerate(current)) & 0xFFFF
                weak_valid = True
            candidates = table.by_weak.get(weak_a | weak_b << 16, ())
            for index in candidates[:MAX_CANDIDATES]:
                if window_strong is None:
                    window_strong = strong_hash(window[pos : pos + block], seed, strong_len)
                if window_strong == table.strong_of(index):
                    match = index
                    break
        if match >= 0:
            if pos:
                if run_count:
                    yield (COPY, run_first, run_count)
                    run_count = 0
                yield from _literal_pieces(bytes(window[:pos]))
            if run_count and run_first + run_count == match:
                run_count += 1
            else:
                if run_count:
                    yield (COPY, run_first, run_count)
                run_first, run_count = match, 1
            del window[: pos + block]
            pos = 0
            expected = match + 1
            weak_valid = False
            continue
        # No match: slide the window one byte, if there is a byte to slide in.
        expected = -1
        if not fill(pos + block + 1):
            break
        out_byte, in_byte = window[pos], window[pos + block]
        weak_a = (weak_a - out_byte + in_byte) & 0xFFFF
        weak_b = (weak_b - block * out_byte + weak_a) & 0xFFFF
        pos += 1
        if pos == MAX_LITERAL:
            if run_count:
                yield (COPY, run_first, run_count)
                run_count = 0
            yield (LITERAL, bytes(window[:pos]))
            del window[:pos]
            pos = 0

    # End of ``new`` (``eof`` is set): at most a block remains after the pending literal.
    rest = bytes(window)
    tail_at = len(rest) - tail_len
    if (
        tail_len
        and tail_at >= 0
        and strong_hash(rest[tail_at:], seed, strong_len) == table.strong_of(sig.block_count - 1)
    ):
        if tail_at:
            if run_count:
                yield (COPY, run_first, run_count)
                run_count = 0
            yield from _literal_pieces(rest[:tail_at])
        if run_count and run_first + run_count == sig.block_count - 1:
            run_count += 1
        else:
            if run_count:
                yield (COPY, run_first, run_count)
            run_first, run_count = sig.block_count - 1, 1
        rest = b""
    if rest:
        if run_count:
            yield (COPY, run_first, run_count)
            run_count = 0
        yield from _literal_pieces(rest)
    if run_count:
        yield (COPY, run_first, run_count)
    result.digest = digest.digest()
    result.new_size = new_size


class Patcher:
    """Rebuilds a file op by op; checks each op against the basis before touching it."""

    def __init__(
        self,
        basis: BinaryIO | None,
        out: BinaryIO,
        block_size: int,
        basis_size: int,
        *,
        max_size: int | None = None,
    ):
        _check_block_size(block_size)
        if basis is None:
            if basis_size:
                raise ValueError(f"the delta needs a basis of {basis_size} bytes, but none was given")
        else:
            actual = _remaining_size(basis)
            if actual is None:
                raise ValueError("the basis must be a seekable regular file")
            if actual != basis_size:
                raise ValueError(
                    f"the basis is {actual} bytes but the delta was made against a basis of "
                    f"{basis_size} bytes: wrong or changed basis file"
                )
            self._basis_start = basis.tell()
        self.basis = basis
        self.out = out
        self.block_size = block_size
        self.basis_size = basis_size
        self.block_count = -(-basis_size // block_size)
        self.max_size = max_size
        self.size = 0
        self._digest = xxhash.xxh3_128()
        self._finished = False

    def _grow(self, length: int) -> None:
        if self.max_size is not None and self.size + length > self.max_size:
            raise ValueError(f"the delta rebuilds more than the allowed {self.max_size} bytes")
        self.size += length

    def apply(self, op: tuple) -> None:
        if self._finished:
            raise ValueError("op applied after finish()")
        if not isinstance(op, tuple | list) or not op:
            raise ValueError(f"malformed delta op {op!r:.80}")
        kind = op[0]
        if kind == LITERAL and len(op) == 2:
            data = op[1]
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ValueError("literal op without bytes")
            if len(data) > MAX_LITERAL:
                raise ValueError(f"literal op of {len(data)} bytes exceeds the {MAX_LITERAL}-byte limit")
            self._grow(len(data))
            self._digest.update(data)
            self.out.write(data)
        elif kind == COPY and len(op) == 3:
            first, count = op[1], op[2]
            if not (isinstance(first, int) and isinstance(count, int)) or first < 0 or count < 1:
                raise ValueError(f"copy op with invalid block range {first!r}+{count!r}")
            if first + count > self.block_count:
                raise ValueError(
                    f"copy op asks for blocks {first}..{first + count - 1} but the basis has "
                    f"{self.block_count} blocks"
                )
            start = first * self.block_size
            end = min((first + count) * self.block_size, self.basis_size)
            self._grow(end - start)
            self._copy(start, end)
        else:
            raise ValueError(f"unknown delta op {op!r:.80}")

    def _copy(self, start: int, end: int) -> None:
        assert self.basis is not None
        self.basis.seek(self._basis_start + start)
        while start < end:
            data = self.basis.read(min(READ_CHUNK, end - start))
            if not data:
                raise ValueError("the basis file shrank while the delta was applied")
            self._digest.update(data)
            self.out.write(data)
            start += len(data)

    def finish(self) -> tuple[bytes, int]:
        """(xxh3-128 digest, size) of everything written."""
        self._finished = True
        return self._digest.digest(), self.size


def patch(
    basis: BinaryIO | None,
    ops: Iterable[tuple],
    out: BinaryIO,
    *,
    block_size: int | None = None,
    basis_size: int | None = None,
    max_size: int | None = None,
) -> tuple[bytes, int]:
    """Write the file ``ops`` describe to ``out``; returns (digest, size) of what was written."""
    if block_size is None:
        block_size = getattr(ops, "block_size", None) or default_block_size(0)
    if basis_size is None:
        basis_size = getattr(ops, "basis_size", None)
        if basis_size is None:
            basis_size = 0 if basis is None else _remaining_size(basis)
            if basis_size is None:
                raise ValueError("the basis must be a seekable regular file")
    patcher = Patcher(basis, out, block_size, basis_size, max_size=max_size)
    for op in ops:
        patcher.apply(op)
    return patcher.finish()
