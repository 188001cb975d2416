"""Stream forms of signatures and deltas: versioned msgpack after an 8-byte magic.

Both forms are read from untrusted places (a file an admin passes, a peer on the wire), so
every reader checks each length, count and block index against a limit *before* it
allocates or seeks, and says what is wrong in words.  The forms are pinned by golden files
in ``tests/golden/``: an optimisation that changes a byte fails those tests.

Signature stream (``write_signature`` / ``read_signature``; ``signature_to_bytes`` /
``signature_from_bytes`` for a frame)::

    b"HMIRSIG\\n"
    {"version": 1, "block_size": int, "strong_len": int, "seed": int,
     "basis_size": int, "block_count": int}                       msgpack map
    [weak: bin, strong: bin]  ...                                  batches of <= 65536 blocks
                                                                   (4 bytes LE + strong_len
                                                                   bytes per block), in order

Delta stream (``write_delta`` / ``read_delta``)::

    b"HMIRDLT\\n"
    {"version": 1, "block_size": int, "basis_size": int}           msgpack map
    [0, first_block, block_count]                                  copy a run of basis blocks
    [1, data: bin]                                                 literal, 1..MAX_LITERAL bytes
    ...
    [2, new_size, digest: bin(16)]                                 end: size and xxh3-128

A stream must end right after its last item; trailing bytes are an error (a concatenation
or a corrupted length).  ``patch_stream`` applies a delta stream and verifies the whole-file
digest; it is what ``mirror patch`` calls.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO

import msgpack

from .constants import COPY, DIGEST_SIZE, LITERAL, MAX_LITERAL, MAX_STRONG_LEN
from .delta import Patcher, Signature
from .errors import FormatError, IntegrityError, LimitExceeded

SIGNATURE_MAGIC = b"HMIRSIG\n"
DELTA_MAGIC = b"HMIRDLT\n"
VERSION = 1

END = 2  # the end record's tag, after the op tags COPY and LITERAL
BATCH_BLOCKS = 65536
# 2^24 blocks: a 64 GiB basis at 4 KiB blocks, 2 TiB at 128 KiB; about 330 MiB of signature.
DEFAULT_MAX_BLOCKS = 1 << 24

_SIGNATURE_KEYS = ("version", "block_size", "strong_len", "seed", "basis_size", "block_count")
_DELTA_KEYS = ("version", "block_size", "basis_size")


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True, autoreset=True)


def _check_magic(stream: BinaryIO, magic: bytes, what: str) -> None:
    head = stream.read(len(magic))
    if head != magic:
        other = SIGNATURE_MAGIC if magic == DELTA_MAGIC else DELTA_MAGIC
        if head == other:
            raise FormatError(f"this is a {'signature' if what == 'delta' else 'delta'}, not a {what}")
        if len(head) < len(magic) and magic.startswith(head):
            raise FormatError(f"{what} stream is truncated (it ends inside its header)")
        raise FormatError(f"not a hamirror {what} (bad magic {head[:8]!r})")


def _next(unpacker: msgpack.Unpacker, what: str, item: str):
    try:
        return unpacker.unpack()
    except msgpack.OutOfData:
        raise FormatError(f"{what} stream is truncated (it ends before {item})") from None
    except msgpack.BufferFull:
        raise LimitExceeded(f"{what} stream holds an item larger than any valid one") from None
    except ValueError as exc:  # msgpack's limit checks, and malformed data
        message = str(exc)
        if "exceeds max" in message:
            raise LimitExceeded(f"{what} stream declares an oversized item ({message})") from None
        raise FormatError(f"{what} stream is corrupt ({message})") from None
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise FormatError(f"{what} stream is corrupt ({exc})") from None


def _expect_end(unpacker: msgpack.Unpacker, what: str) -> None:
    if unpacker.read_bytes(1):
        raise FormatError(f"{what} stream has trailing bytes after its end")


def _header(unpacker: msgpack.Unpacker, what: str, keys: tuple[str, ...]) -> dict:
    header = _next(unpacker, what, "its header")
    if not isinstance(header, dict):
        raise FormatError(f"{what} header is not a map")
    version = header.get("version")
    if version != VERSION:
        raise FormatError(
            f"{what} format version {version!r} is not supported (this hamirror reads version {VERSION})"
        )
    if set(header) != set(keys):
        # Keys may be str and bytes at once: sorted by their repr, which always compares.
        found = ", ".join(sorted(map(repr, header)))
        raise FormatError(f"{what} header has keys [{found}], expected {sorted(keys)}")
    for key in keys:
        value = header[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FormatError(f"{what} header field {key!r} is not a non-negative integer: {value!r:.40}")
    return header


# ----------------------------------------------------------------------------- signatures


def write_signature(sig, out: BinaryIO) -> int:
    """Write ``sig`` as a signature stream; returns the number of bytes written."""
    pack = _packer().pack
    parts = [
        SIGNATURE_MAGIC,
        pack(
            {
                "version": VERSION,
                "block_size": sig.block_size,
                "strong_len": sig.strong_len,
                "seed": sig.seed,
                "basis_size": sig.basis_size,
                "block_count": sig.block_count,
            }
        ),
    ]
    written = 0
    for part in parts:
        out.write(part)
        written += len(part)
    weak, strong = memoryview(sig.weak), memoryview(sig.strong)
    for first in range(0, sig.block_count, BATCH_BLOCKS):
        last = min(first + BATCH_BLOCKS, sig.block_count)
        item = pack([weak[4 * first : 4 * last], strong[sig.strong_len * first : sig.strong_len * last]])
        out.write(item)
        written += len(item)
    return written


def read_signature(stream: BinaryIO, *, max_blocks: int = DEFAULT_MAX_BLOCKS) -> Signature:
    """Read a whole signature stream into a ``mirror.delta.Signature``."""
    what = "signature"
    _check_magic(stream, SIGNATURE_MAGIC, what)
    unpacker = msgpack.Unpacker(
        stream,
        read_size=64 * 1024,
        max_buffer_size=BATCH_BLOCKS * (4 + MAX_STRONG_LEN) + 4096,
        max_bin_len=BATCH_BLOCKS * MAX_STRONG_LEN,
        max_str_len=32,
        max_array_len=16,
        max_map_len=16,
        max_ext_len=0,
        raw=False,
        strict_map_key=True,
        use_list=False,
    )
    header = _header(unpacker, what, _SIGNATURE_KEYS)
    block_size, strong_len = header["block_size"], header["strong_len"]
    basis_size, block_count = header["basis_size"], header["block_count"]
    if block_count > max_blocks:
        raise LimitExceeded(f"signature declares {block_count} blocks; the limit is {max_blocks}")
    if not 1 <= strong_len <= MAX_STRONG_LEN:
        raise FormatError(f"signature strong hash length {strong_len} is outside 1..{MAX_STRONG_LEN}")
    if block_size == 0 or -(-basis_size // block_size) != block_count:
        raise FormatError(
            f"signature header is inconsistent: {block_count} blocks of {block_size} bytes "
            f"cannot describe a {basis_size}-byte basis"
        )
    if header["seed"] >= 1 << 64:
        raise FormatError("signature seed does not fit in 64 bits")
    weak, strong = bytearray(), bytearray()
    remaining = block_count
    while remaining:
        batch = _next(unpacker, what, f"its last {remaining} blocks")
        if not (isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(b, bytes) for b in batch)):
            raise FormatError("signature block batch is not [weak bytes, strong bytes]")
        batch_weak, batch_strong = batch
        count = len(batch_weak) // 4
        if (
            count == 0
            or count > remaining
            or len(batch_weak) != 4 * count
            or len(batch_strong) != strong_len * count
        ):
            raise FormatError(
                f"signature block batch of {len(batch_weak)} + {len(batch_strong)} bytes does not "
                f"fit {remaining} remaining blocks with {strong_len}-byte strong hashes"
            )
        weak += batch_weak
        strong += batch_strong
        remaining -= count
    _expect_end(unpacker, what)
    try:
        return Signature(block_size, strong_len, header["seed"], basis_size, bytes(weak), bytes(strong))
    except ValueError as exc:
        raise FormatError(f"invalid signature: {exc}") from None


def signature_to_bytes(sig) -> bytes:
    """The signature stream as one ``bytes`` (to send in a frame)."""
    buffer = io.BytesIO()
    write_signature(sig, buffer)
    return buffer.getvalue()


def signature_from_bytes(data: bytes, *, max_blocks: int = DEFAULT_MAX_BLOCKS) -> Signature:
    return read_signature(io.BytesIO(data), max_blocks=max_blocks)


# ----------------------------------------------------------------------------- deltas


def write_delta(delta, out: BinaryIO) -> tuple[bytes, int]:
    """Write the ops of ``delta`` (a ``Delta``, iterated here) as a delta stream.

    Returns ``(digest, new_size)`` from the delta's end record.
    """
    pack = _packer().pack
    out.write(DELTA_MAGIC)
    out.write(pack({"version": VERSION, "block_size": delta.block_size, "basis_size": delta.basis_size}))
    for op in delta:
        out.write(pack(op))
    if delta.digest is None or delta.new_size is None:
        raise ValueError("the delta was not run to its end")
    out.write(pack((END, delta.new_size, delta.digest)))
    return delta.digest, delta.new_size


class DeltaReader:
    """Iterator over the ops of a delta stream, each checked before it is handed on.

    ``block_size`` and ``basis_size`` come from the header; ``digest`` and ``new_size`` are
    set once the end record has been read (after the iteration ends).
    """

    def __init__(self, stream: BinaryIO):
        self.what = "delta"
        _check_magic(stream, DELTA_MAGIC, self.what)
        # Reads of a whole literal piece at a time: fewer calls and buffer shifts per op.
        self._unpacker = msgpack.Unpacker(
            stream,
            read_size=MAX_LITERAL + 4096,
            max_buffer_size=2 * (MAX_LITERAL + 4096),
            max_bin_len=MAX_LITERAL,
            max_str_len=32,
            max_array_len=3,
            max_map_len=8,
            max_ext_len=0,
            raw=False,
            strict_map_key=True,
            use_list=False,
        )
        header = _header(self._unpacker, self.what, _DELTA_KEYS)
        self.block_size = header["block_size"]
        self.basis_size = header["basis_size"]
        if self.block_size == 0:
            raise FormatError("delta header has a block size of 0")
        self.block_count = -(-self.basis_size // self.block_size)
        self.digest: bytes | None = None
        self.new_size: int | None = None
        self._ops = self._read_ops()

    def __iter__(self) -> Iterator[tuple]:
        return self

    def __next__(self) -> tuple:
        return next(self._ops)

    def _read_ops(self) -> Iterator[tuple]:
        what = self.what
        while True:
            op = _next(self._unpacker, what, "its end record")
            if not isinstance(op, tuple) or not op or not isinstance(op[0], int):
                raise FormatError(f"delta op is not [kind, ...]: {op!r:.60}")
            kind = op[0]
            if kind == COPY and len(op) == 3:
                first, count = op[1], op[2]
                if not (isinstance(first, int) and isinstance(count, int)) or first < 0 or count < 1:
                    raise FormatError(f"delta copy op has an invalid block range: {op!r:.60}")
                if first + count > self.block_count:
                    raise FormatError(
                        f"delta copies blocks {first}..{first + count - 1} but the basis has only "
                        f"{self.block_count} blocks"
                    )
                yield (COPY, first, count)
            elif kind == LITERAL and len(op) == 2:
                data = op[1]
                if not isinstance(data, bytes) or not data:
                    raise FormatError("delta literal op does not carry bytes")
                yield (LITERAL, data)
            elif kind == END and len(op) == 3:
                size, digest = op[1], op[2]
                if (
                    not isinstance(size, int)
                    or size < 0
                    or not isinstance(digest, bytes)
                    or len(digest) != DIGEST_SIZE
                ):
                    raise FormatError("delta end record is malformed")
                _expect_end(self._unpacker, what)
                self.new_size, self.digest = size, digest
                return
            else:
                raise FormatError(f"delta op of unknown kind: {op!r:.60}")


def read_delta(stream: BinaryIO) -> DeltaReader:
    return DeltaReader(stream)


def patch_stream(
    basis: BinaryIO | None,
    stream: BinaryIO,
    out: BinaryIO,
    *,
    max_size: int | None = None,
) -> tuple[bytes, int]:
    """Apply the delta stream ``stream`` to ``basis`` into ``out`` and verify the result.

    Raises ``FormatError`` for a malformed or hostile stream (nothing is read from the
    basis for an op that fails its checks) and ``IntegrityError`` when the rebuilt file does
    not have the digest and size the delta promises.
    """
    reader = DeltaReader(stream)
    try:
        patcher = Patcher(basis, out, reader.block_size, reader.basis_size, max_size=max_size)
        for op in reader:
            patcher.apply(op)
    except ValueError as exc:
        raise FormatError(f"cannot apply the delta: {exc}") from None
    digest, size = patcher.finish()
    if size != reader.new_size:
        raise IntegrityError(
            f"the rebuilt file is {size} bytes but the delta promises {reader.new_size}: "
            "wrong basis or corrupt delta"
        )
    if digest != reader.digest:
        raise IntegrityError(
            "the rebuilt file does not match the digest carried in the delta: wrong basis or corrupt delta"
        )
    return digest, size
