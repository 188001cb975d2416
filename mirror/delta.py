"""Rolling-checksum deltas (rsync's algorithm): signatures, deltas and patches.

This module is written once, in Python: the signature object, the rules that pick a block
size and a strong-hash length, the reading of files and the patcher with its checks.  The
loops are the kernels' (``mirror._fast.delta``, compiled, or its twin ``mirror.delta_py``,
bound once by ``mirror.fastpath``); read the twin's docstring for the weak sum, the seeded
strong hash and the matching rules.

API
---
``signature(basis, *, block_size=None, strong_len=None, seed=None, size_hint=None) -> Signature``
    Reads the binary stream ``basis`` to its end (``size_hint``, default the file's size,
    only feeds the default block size and strong length).  ``Signature`` carries ``block_size,
    strong_len, seed, basis_size, block_count`` and the packed sums ``weak`` (4 bytes per
    block, little-endian) and ``strong`` (``strong_len`` bytes per block).  It is
    serialised by ``mirror.deltafmt``.
``delta(sig, new) -> Delta``
    An iterator of ops over the binary stream ``new``, read in chunks: memory is bounded by
    the signature, never by the file.  Ops are tuples ``(COPY, first_block, block_count)``
    and ``(LITERAL, data)``.  After exhaustion ``Delta.digest`` is the 16-byte xxh3-128 of
    ``new`` and ``Delta.new_size`` its length.  ``sig=None`` means "no basis": every byte is
    literal (one code path for new files).
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
``strong_hash(data, seed, strong_len)``: the rules below and the kernels' sums.
Invalid ops and arguments raise ``ValueError`` with a message an administrator can act
on; ``mirror.deltafmt`` turns them into ``FormatError`` for streams.  ``signature`` and
``delta`` take ``kernel=`` to run over a given kernel module (the tests run both).

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

import errno
import math
import mmap
import os
import stat
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import BinaryIO

import xxhash

from . import fastpath
from .constants import (
    COPY,
    DELTA_READ_CHUNK,
    DIGEST_SIZE,
    HOLE,
    LITERAL,
    MAX_CANDIDATES,  # noqa: F401  (a limit of the kernels, for callers)
    MAX_LITERAL,
    MAX_STRONG_LEN,
)

_kernel = fastpath.kernel("delta")

MIN_BLOCK_SIZE = 16
MIN_DEFAULT_BLOCK = 512
MAX_BLOCK_SIZE = 128 * 1024
MAX_DEFAULT_BLOCKS = 1 << 22
EDIT_SPACING = 1 << 20
MIN_STRONG_LEN = 6
DIGEST_LEN = DIGEST_SIZE
READ_CHUNK = DELTA_READ_CHUNK


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
    return _kernel.weak_sum(data)


def strong_hash(data, seed: int, strong_len: int) -> bytes:
    """The first ``strong_len`` bytes of the seeded XXH3-128 of ``data``."""
    return _kernel.strong_hash(data, seed)[:strong_len]


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
        if not isinstance(other, Signature):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __hash__(self) -> int:
        return hash((self.block_size, self.seed, self.basis_size, self.strong))

    def __repr__(self) -> str:
        return (
            f"Signature(block_size={self.block_size}, strong_len={self.strong_len}, "
            f"basis_size={self.basis_size}, block_count={self.block_count})"
        )


# Buffers given back by finished signatures, deltas and patches, for the next one: a sync
# sends thousands of small files, and mapping then unmapping a buffer for each costs more
# than the file (in a process with other threads running, every munmap interrupts them all
# to flush their TLBs).  A few per size, for the few sizes used last (the sizes vary with
# the block size: a long-lived daemon must not keep one set for each).  Only C-level dict
# and list operations touch it, which no other thread can interleave with.
_SPARE_BUFFERS: dict[int, list] = {}  # size -> [buffers]; the least recently used size first
_SPARE_PER_SIZE = 4
_SPARE_SIZES = 4


def _aligned(size: int) -> mmap.mmap:
    """A writable, page-aligned buffer (anonymous mmap) for reads to land in: the kernel
    copies into a misaligned buffer 2-3x slower.  Its content is whatever the last user
    left (every user reads only what it wrote)."""
    size = max(size, 1)
    try:
        return _SPARE_BUFFERS[size].pop()
    except (KeyError, IndexError):
        return mmap.mmap(-1, size)


def _give_back(buf: mmap.mmap | None, size: int) -> None:
    """Keep ``buf`` (from ``_aligned(size)``) for the next user: its last one is done with it."""
    if buf is None:
        return
    size = max(size, 1)
    spare = _SPARE_BUFFERS.pop(size, None)
    if spare is None:
        spare = []
        while len(_SPARE_BUFFERS) >= _SPARE_SIZES:
            del _SPARE_BUFFERS[next(iter(_SPARE_BUFFERS))]
    if len(spare) < _SPARE_PER_SIZE:
        spare.append(buf)
    _SPARE_BUFFERS[size] = spare  # now the most recently used size


def _write_all(stream: BinaryIO, data) -> None:
    """Write all of ``data``.  An unbuffered file (the receiver's) may take only a part when
    its disk fills; the rest is written, or its error (ENOSPC) raised: a short write ignored
    would commit a truncated file whose digest, taken of what was sent, still matches."""
    written = stream.write(data)
    if written is None or written >= len(data):
        return
    with memoryview(data) as view:
        while written < len(view):
            n = stream.write(view[written:])
            if not n:
                raise OSError(errno.EIO, "a write wrote nothing")
            written += n


def _read_into(stream: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``stream``; fewer bytes only at end of stream (pipes return short
    reads)."""
    got, want = 0, len(view)
    readinto = getattr(stream, "readinto", None)
    while got < want:
        if readinto is not None:
            n = readinto(view[got:])
            if n is None:
                raise BlockingIOError("non-blocking stream is not supported")
        else:
            data = stream.read(want - got)
            n = len(data)
            view[got : got + n] = data
        if n == 0:
            break
        got += n
    return got


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


def signature(
    basis: BinaryIO,
    *,
    block_size: int | None = None,
    strong_len: int | None = None,
    seed: int | None = None,
    size_hint: int | None = None,
    kernel: ModuleType | None = None,
) -> Signature:
    """The signature of the whole of ``basis`` (read from its current position to its end).

    ``size_hint`` (default: the size of the file behind ``basis`` if it has one) only feeds
    the default block size and strong length; a pipe without a hint gets the 1 MiB rule.
    """
    k = kernel if kernel is not None else _kernel
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
    if not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"signature seed {seed!r} is not a 64-bit unsigned integer")
    chunk_size = READ_CHUNK - READ_CHUNK % block_size  # whole blocks per read
    buf = _aligned(chunk_size)
    view = memoryview(buf)
    weak_parts, strong_parts = [], []
    basis_size = 0
    try:
        while True:
            got = _read_into(basis, view[:chunk_size])
            if got:
                weak, strong = k.sign_blocks(view[:got], block_size, seed, strong_len)
                weak_parts.append(weak)
                strong_parts.append(strong)
                basis_size += got
            if got < chunk_size:
                break
    finally:
        view.release()
        _give_back(buf, chunk_size)
    return Signature(block_size, strong_len, seed, basis_size, b"".join(weak_parts), b"".join(strong_parts))


def _empty_signature() -> Signature:
    return Signature(default_block_size(0), MIN_STRONG_LEN, 0, 0, b"", b"")


class Delta:
    """Iterator of ops turning the signature's basis into ``new``; see the module docstring."""

    def __init__(self, sig: Signature | None, new: BinaryIO, *, kernel: ModuleType | None = None,
                 holes: bool = False):  # fmt: skip
        k = kernel if kernel is not None else _kernel
        # A whole file (no basis) that has holes: each is one op, its length, never read.
        self._data_end: int | None = 0 if holes and sig is None else None
        self.sig = sig if sig is not None else _empty_signature()
        self.block_size = self.sig.block_size
        self.basis_size = self.sig.basis_size
        self.digest: bytes | None = None
        self.new_size: int | None = None
        self._new = new
        self._readinto = getattr(new, "readinto", None)
        self._matcher = k.Matcher(self.sig)
        self._hash = xxhash.xxh3_128()
        self._size = 0
        self._ops: list = []
        self._next = 0
        self._buf = None
        self._view = None

    def __iter__(self) -> Iterator[tuple]:
        return self

    def __next__(self) -> tuple:
        while self._next >= len(self._ops):
            if self._new is None:
                raise StopIteration
            self._ops = self._step()
            self._next = 0
        op = self._ops[self._next]
        self._next += 1
        return op

    def _step(self) -> list:
        """The ops of the next chunk of ``new`` (or the last ones, at its end)."""
        if self._data_end is not None and self._size >= self._data_end:
            hole = self._next_hole()
            if hole:
                return [(HOLE, hole)]
        want = READ_CHUNK if self._data_end is None else min(READ_CHUNK, self._data_end - self._size)
        if self._readinto is not None:
            if self._buf is None:
                self._buf = _aligned(READ_CHUNK)
                self._view = memoryview(self._buf)
            with self._view[:want] as view:
                got = self._readinto(view)
            if got is None:
                raise BlockingIOError("non-blocking stream is not supported")
            data = self._view[:got]
        else:
            data = self._new.read(want)
            got = len(data)
        if got:
            self._hash.update(data)  # xxhash lets go of the GIL for large buffers
            self._size += got
            if self._data_end is not None:
                return [(LITERAL, bytes(data[start : start + MAX_LITERAL])) for start in range(0, got, MAX_LITERAL)]
            return self._matcher.feed(data)
        ops = self._matcher.finish()
        self.digest = self._hash.digest()
        self.new_size = self._size
        self._new = self._readinto = None
        if self._view is not None:
            self._view.release()
            _give_back(self._buf, READ_CHUNK)
            self._buf = self._view = None
        return ops

    def _next_hole(self) -> int:
        """At the end of a data run: the length of the hole that follows (0 at the end of the
        file), ``new`` moved past it, and where the data after it ends (``SEEK_DATA``,
        ``SEEK_HOLE``).  A file system without a hole map has its file sent as data."""
        fd, at = self._new.fileno(), self._size
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) and at == 0:
                self._data_end = None
                return 0
            if exc.errno != errno.ENXIO:
                raise
            data = self._data_end = max(at, os.lseek(fd, 0, os.SEEK_END))  # no data after ``at``: a hole to the end
        else:
            self._data_end = os.lseek(fd, data, os.SEEK_HOLE)
        self._new.seek(data)
        hole = data - at
        if hole:
            self._hash.update(hole_digest_input(hole))
            self._size = data
        return hole


def hole_digest_input(length: int) -> bytes:
    """What a hole of ``length`` bytes adds to a file's digest, in place of its zeros: both
    ends hash a hole by its length, so a hole costs neither of them its length in hashing
    (a hostile sender's one small frame naming a hole of a terabyte costs nothing)."""
    return b"\0hamirror-hole\0" + length.to_bytes(8, "big")


def delta(sig: Signature | None, new: BinaryIO, *, kernel: ModuleType | None = None, holes: bool = False) -> Delta:
    """The ops that rebuild ``new`` from the basis ``sig`` describes (lazy: iterate them).
    ``holes``: ``new`` (a file, no basis) may have holes: each is a ``(HOLE, length)`` op,
    hashed by its length (``hole_digest_input``), and the data is sent as it is, unmatched."""
    return Delta(sig, new, kernel=kernel, holes=holes)


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
        self._buf = None

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
            _write_all(self.out, data)
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
        elif kind == HOLE and len(op) == 2:
            length, skip = op[1], getattr(self.out, "skip", None)
            if not isinstance(length, int) or length < 1:
                raise ValueError(f"hole op of invalid length {length!r}")
            if skip is None:
                raise ValueError("a hole in a file not written with holes")
            self._grow(length)
            self._digest.update(hole_digest_input(length))
            skip(length)
        else:
            raise ValueError(f"unknown delta op {op!r:.80}")

    def _copy(self, start: int, end: int) -> None:
        assert self.basis is not None
        if self._buf is None:
            self._buf = _aligned(READ_CHUNK)
        self.basis.seek(self._basis_start + start)
        with memoryview(self._buf) as view:
            while start < end:
                got = _read_into(self.basis, view[: min(READ_CHUNK, end - start)])
                if not got:
                    raise ValueError("the basis file shrank while the delta was applied")
                self._digest.update(view[:got])
                _write_all(self.out, view[:got])
                start += got

    def finish(self) -> tuple[bytes, int]:
        """(xxh3-128 digest, size) of everything written."""
        self._finished = True
        _give_back(self._buf, READ_CHUNK)
        self._buf = None
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
