"""Typed surface of mirror._fast.delta (the same API as mirror/delta_py.py, its specification).

The engine that calls these kernels is mirror/delta.py."""

from typing import Final, Protocol

COMPILED_CONSTANTS: Final[dict[str, int]]  # mirror/constants.py as this module was built with it

# (COPY, first_block, block_count) or (LITERAL, data)
Op = tuple[int, int, int] | tuple[int, bytes]

class SignatureLike(Protocol):
    block_size: int
    strong_len: int
    seed: int
    basis_size: int
    block_count: int
    weak: bytes  # 4 bytes per block, little-endian
    strong: bytes  # strong_len bytes per block

def weak_sum(data: bytes | bytearray | memoryview) -> int: ...
def strong_hash(data: bytes | bytearray | memoryview, seed: int) -> bytes: ...
def sign_blocks(
    data: bytes | bytearray | memoryview, block_size: int, seed: int, strong_len: int
) -> tuple[bytes, bytes]: ...

class Matcher:
    def __init__(self, sig: SignatureLike) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> list[Op]: ...
    def finish(self) -> list[Op]: ...
