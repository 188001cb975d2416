"""Typed surface of mirror._fast.delta (the same API as mirror/delta_py.py, its specification)."""

from collections.abc import Iterable, Iterator
from typing import BinaryIO, Final

COPY: Final[int]
LITERAL: Final[int]
MIN_BLOCK_SIZE: Final[int]
MIN_DEFAULT_BLOCK: Final[int]
MAX_BLOCK_SIZE: Final[int]
MAX_DEFAULT_BLOCKS: Final[int]
EDIT_SPACING: Final[int]
MIN_STRONG_LEN: Final[int]
MAX_STRONG_LEN: Final[int]
MAX_LITERAL: Final[int]
MAX_CANDIDATES: Final[int]
DIGEST_LEN: Final[int]
READ_CHUNK: Final[int]

# (COPY, first_block, block_count) or (LITERAL, data)
Op = tuple[int, int, int] | tuple[int, bytes]

def strong_len_for(size: int, block_size: int) -> int: ...
def default_block_size(size: int) -> int: ...
def weak_sum(data: bytes | bytearray | memoryview) -> int: ...
def strong_hash(data: bytes | bytearray | memoryview, seed: int, strong_len: int) -> bytes: ...

class Signature:
    block_size: int
    strong_len: int
    seed: int
    basis_size: int
    block_count: int
    weak: bytes  # 4 bytes per block, little-endian
    strong: bytes  # strong_len bytes per block
    def __init__(
        self, block_size: int, strong_len: int, seed: int, basis_size: int, weak: bytes, strong: bytes
    ) -> None: ...

def signature(
    basis: BinaryIO,
    *,
    block_size: int | None = None,
    strong_len: int | None = None,
    seed: int | None = None,
    size_hint: int | None = None,
) -> Signature: ...

class Delta(Iterator[Op]):
    sig: Signature
    block_size: int
    basis_size: int
    digest: bytes | None  # xxh3-128 of new, once exhausted
    new_size: int | None
    def __init__(self, sig: Signature | None, new: BinaryIO) -> None: ...
    def __iter__(self) -> Delta: ...
    def __next__(self) -> Op: ...

def delta(sig: Signature | None, new: BinaryIO) -> Delta: ...

class Patcher:
    block_size: int
    basis_size: int
    block_count: int
    max_size: int | None
    size: int
    def __init__(
        self,
        basis: BinaryIO | None,
        out: BinaryIO,
        block_size: int,
        basis_size: int,
        *,
        max_size: int | None = None,
    ) -> None: ...
    def apply(self, op: Op) -> None: ...
    def finish(self) -> tuple[bytes, int]: ...

def patch(
    basis: BinaryIO | None,
    ops: Iterable[Op],
    out: BinaryIO,
    *,
    block_size: int | None = None,
    basis_size: int | None = None,
    max_size: int | None = None,
) -> tuple[bytes, int]: ...
