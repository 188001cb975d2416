"""Pure-Python twin of the delta kernels ``mirror._fast.delta``: their readable specification.

``mirror.delta`` (the engine, written once) calls these; the compiled module must give the
same sums and the same ops for the same input and seed (``tests/test_delta.py`` proves it
with hypothesis).  The algorithm is rsync's: the receiver cuts its old file (the *basis*)
into blocks and sends a *signature*, per block a weak rolling sum and a strong hash; the
sender slides a window of one block over its new file, and where the weak sum of the window
names a block and the strong hashes agree, it sends "copy that block" instead of the bytes.

Kernels
-------
``weak_sum(data) -> int``, ``strong_hash(data, seed) -> bytes``
    The two sums below of one block.
``sign_blocks(data, block_size, seed, strong_len) -> (weak, strong)``
    Both sums of every block of ``data`` (the last may be short): ``weak`` 4 bytes
    little-endian per block, ``strong`` the first ``strong_len`` bytes of the strong hash.
``Matcher(sig)``, ``.feed(data) -> ops``, ``.finish() -> ops``
    The matching loop over ``new``, fed in chunks of any size: each call returns the ops
    the bytes so far decide (a pending literal and the current window stay inside), and
    ``finish()`` the rest.  Ops are ``(COPY, first_block, block_count)`` (a run of
    consecutive basis blocks, merged) and ``(LITERAL, data)``.  ``sig`` is read for
    ``block_size, strong_len, seed, basis_size, block_count, weak, strong``.

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
* With no full block in the basis nothing can match while sliding: literal pieces leave
  as soon as a full window lies beyond them, as the sliding loop would emit them.
"""

from __future__ import annotations

import xxhash

from .constants import COPY, LITERAL, MAX_CANDIDATES, MAX_LITERAL, MAX_STRONG_LEN


def weak_sum(data) -> int:
    """rsync's weak checksum of ``data`` as one 32-bit value (``a | b << 16``)."""
    n = len(data)
    a = sum(data)
    b = sum((n - i) * x for i, x in enumerate(data))
    return (a & 0xFFFF) | ((b & 0xFFFF) << 16)


def strong_hash(data, seed: int) -> bytes:
    """The 16-byte seeded XXH3-128 of ``data`` (canonical byte order)."""
    return xxhash.xxh3_128_digest(data, seed=seed)


def sign_blocks(data, block_size: int, seed: int, strong_len: int) -> tuple[bytes, bytes]:
    """``(weak, strong)`` of every block of ``data``; see the module docstring."""
    if block_size < 1 or not 1 <= strong_len <= MAX_STRONG_LEN:
        raise ValueError(f"cannot sign blocks of {block_size} bytes with {strong_len}-byte strong hashes")
    weak = bytearray()
    strong = bytearray()
    for start in range(0, len(data), block_size):
        block = data[start : start + block_size]
        weak += weak_sum(block).to_bytes(4, "little")
        strong += strong_hash(block, seed)[:strong_len]
    return bytes(weak), bytes(strong)


def _literal_pieces(data: bytes, ops: list) -> None:
    for start in range(0, len(data), MAX_LITERAL):
        ops.append((LITERAL, data[start : start + MAX_LITERAL]))


class Matcher:
    """The ops that turn the basis ``sig`` describes into the bytes fed in."""

    def __init__(self, sig):
        if sig.block_size < 1 or not 1 <= sig.strong_len <= MAX_STRONG_LEN or sig.basis_size < 0:
            raise ValueError("invalid signature parameters")
        block = sig.block_size
        self._block = block
        self._seed = sig.seed
        self._strong_len = sig.strong_len
        self._strong = sig.strong
        self._block_count = -(-sig.basis_size // block)
        self._full_blocks = sig.basis_size // block
        if (
            sig.block_count != self._block_count
            or len(sig.weak) < 4 * self._full_blocks
            or len(sig.strong) < sig.strong_len * self._block_count
        ):
            raise ValueError("signature sums do not cover its blocks")
        self._tail_len = sig.basis_size - self._full_blocks * block  # the short final block, or 0
        # Weak sum -> the full blocks with that sum, ascending.
        self._by_weak: dict[int, list[int]] = {}
        for index in range(self._full_blocks):
            weak = int.from_bytes(sig.weak[4 * index : 4 * index + 4], "little")
            self._by_weak.setdefault(weak, []).append(index)
        # Bytes of ``new`` not yet emitted: the pending literal window[:pos], then the
        # current window of ``block`` bytes starting at ``pos`` (once enough was fed).
        self._window = bytearray()
        self._pos = 0
        self._run_first, self._run_count = -1, 0  # pending copy run
        self._expected = -1  # block after the last match: tried first
        self._weak_a = self._weak_b = 0
        self._weak_valid = False  # the sums are those of the window at pos
        self._finished = False

    def _strong_of(self, block: int) -> bytes:
        return self._strong[block * self._strong_len : (block + 1) * self._strong_len]

    def _window_strong(self) -> bytes:
        return strong_hash(self._window[self._pos : self._pos + self._block], self._seed)[: self._strong_len]

    def _flush_run(self, ops: list) -> None:
        if self._run_count:
            ops.append((COPY, self._run_first, self._run_count))
            self._run_count = 0

    def _add_to_run(self, block: int, ops: list) -> None:
        if self._run_count and self._run_first + self._run_count == block:
            self._run_count += 1
        else:
            self._flush_run(ops)
            self._run_first, self._run_count = block, 1

    def _emit_literal(self, data: bytes, ops: list) -> None:
        if data:
            self._flush_run(ops)
            _literal_pieces(data, ops)

    def feed(self, data) -> list:
        """The ops decided by the bytes of ``new`` fed so far, after ``data``."""
        if self._finished:
            raise ValueError("data fed after finish()")
        self._window += data
        ops: list = []
        self._slide(ops, eof=False)
        return ops

    def finish(self) -> list:
        """The last ops, once the whole of ``new`` was fed."""
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        ops: list = []
        self._slide(ops, eof=True)
        self._match_tail(ops)
        return ops

    def _slide(self, ops: list, eof: bool) -> None:
        block, window = self._block, self._window
        if not self._full_blocks:
            # Nothing the window could match: the pieces the sliding loop would emit.
            while len(window) >= MAX_LITERAL + block:
                ops.append((LITERAL, bytes(window[:MAX_LITERAL])))
                del window[:MAX_LITERAL]
            return
        while len(window) >= self._pos + block:
            pos = self._pos
            match = -1
            window_strong = None
            if not self._weak_valid and 0 <= self._expected < self._full_blocks:
                window_strong = self._window_strong()
                if window_strong == self._strong_of(self._expected):
                    match = self._expected
            if match < 0:
                if not self._weak_valid:
                    current = window[pos : pos + block]
                    self._weak_a = sum(current) & 0xFFFF
                    self._weak_b = sum((block - i) * x for i, x in enumerate(current)) & 0xFFFF
                    self._weak_valid = True
                candidates = self._by_weak.get(self._weak_a | self._weak_b << 16, ())
                for index in candidates[:MAX_CANDIDATES]:
                    if window_strong is None:
                        window_strong = self._window_strong()
                    if window_strong == self._strong_of(index):
                        match = index
                        break
            if match >= 0:
                self._emit_literal(bytes(window[:pos]), ops)
                self._add_to_run(match, ops)
                del window[: pos + block]
                self._pos = 0
                self._expected = match + 1
                self._weak_valid = False
                continue
            # No match: slide the window one byte, once that byte is here.  (When it is not,
            # this position's lookup is made again after the next feed: the same result.)
            self._expected = -1
            if len(window) < pos + block + 1:
                return
            out_byte, in_byte = window[pos], window[pos + block]
            self._weak_a = (self._weak_a - out_byte + in_byte) & 0xFFFF
            self._weak_b = (self._weak_b - block * out_byte + self._weak_a) & 0xFFFF
            self._pos = pos = pos + 1
            if pos == MAX_LITERAL:
                self._emit_literal(bytes(window[:pos]), ops)
                del window[:pos]
                self._pos = 0

    def _match_tail(self, ops: list) -> None:
        """End of ``new``: at most a block remains after the pending literal; the basis's
        short final block may match its last bytes."""
        rest = bytes(self._window)
        self._window = bytearray()
        tail_len = self._tail_len
        tail_at = len(rest) - tail_len
        last = self._block_count - 1
        if (
            tail_len
            and tail_at >= 0
            and strong_hash(rest[tail_at:], self._seed)[: self._strong_len] == self._strong_of(last)
        ):
            self._emit_literal(rest[:tail_at], ops)
            self._add_to_run(last, ops)
            rest = b""
        self._emit_literal(rest, ops)
        self._flush_run(ops)
