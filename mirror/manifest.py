"""Manifests: a tree's scan saved to disk (the digest cache, ``mirror scan --save``).

Format, version 1 (pinned by ``tests/golden/manifest-v1.bin``)::

    b"HAMIRMAN"                                   8-byte magic
    msgpack map   {"version": 1, "root": bytes, "scanned_at_ns": int, "checksum": bool}
    msgpack array ["L", path, strings, records, digests, check]
                  ... one per directory, in canonical (scan) order
    msgpack array ["E", directory_count, entry_count, header_hash]

``header_hash`` is the xxh3-64 of the packed header; ``check`` the xxh3-64, seeded with it,
of the lengths and bytes of path, strings, records and digests.  A damaged byte anywhere is
caught before the damaged listing is used.

``strings``/``records``/``digests`` are ``Listing.pack()`` output: 80-byte little-endian
records (see ``mirror.scan_py.RECORD``).  The file is written atomically.  Reading streams
one directory at a time, checks every length against a limit before the data is kept and
every listing against its checksum, and refuses a file without its end record: a
truncated, corrupted or foreign manifest raises ``ManifestError`` naming the file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import msgpack
import xxhash

from . import constants as K
from . import fastpath
from .atomicfile import AtomicFile
from .entry import canonical_key
from .errors import ManifestError, display_path, fs_path

MAGIC = b"HAMIRMAN"
VERSION = 1

# Limits checked before anything read is kept (the file may be hostile or damaged).
MAX_ENTRIES_PER_DIR = K.MAX_ENTRIES_PER_DIR
MAX_STRINGS = MAX_ENTRIES_PER_DIR * 300
MAX_PATH = 64 * 1024


@dataclass(frozen=True)
class ManifestHeader:
    root: bytes
    scanned_at_ns: int
    checksum: bool
    version: int = VERSION


def _listing_checksum(seed: int, path: bytes, strings: bytes, records: bytes, digests: bytes) -> int:
    h = xxhash.xxh3_64(seed=seed)
    for part in (path, strings, records, digests):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.intdigest()


def _pack_header(packer: msgpack.Packer, header: ManifestHeader) -> bytes:
    return packer.pack(
        {
            "version": header.version,
            "root": header.root,
            "scanned_at_ns": header.scanned_at_ns,
            "checksum": header.checksum,
        }
    )


class ManifestWriter:
    """Streams listings into a manifest; the file appears only when ``commit()`` is called."""

    def __init__(self, path: bytes | str, header: ManifestHeader, *, durable: bool = True):
        self.path = fs_path(path)
        self._atomic = AtomicFile(self.path, 0o600, durable=durable)
        self._file: BinaryIO = self._atomic.__enter__()
        self._packer = msgpack.Packer(use_bin_type=True)
        self._dirs = 0
        self._entries = 0
        packed = _pack_header(self._packer, header)
        self._seed = xxhash.xxh3_64_intdigest(packed)
        self._file.write(MAGIC)
        self._file.write(packed)

    def add(self, listing) -> None:
        strings, records, digests = listing.pack()
        check = _listing_checksum(self._seed, listing.path, strings, records, digests)
        self._file.write(self._packer.pack(["L", listing.path, strings, records, digests, check]))
        self._dirs += 1
        self._entries += len(listing)

    def commit(self) -> None:
        self._file.write(self._packer.pack(["E", self._dirs, self._entries, self._seed]))
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self._atomic.discard()


def write_manifest(path: bytes | str, header: ManifestHeader, listings: Iterable) -> None:
    writer = ManifestWriter(path, header)
    try:
        for listing in listings:
            writer.add(listing)
    except BaseException:
        writer.abort()
        raise
    writer.commit()


class ManifestReader:
    """Iterate a manifest's listings (as the chosen scan implementation's ``Listing``)."""

    def __init__(self, path: bytes | str):
        self.path = fs_path(path)
        self._name = display_path(self.path)
        self._file = open(self.path, "rb")
        try:
            magic = self._file.read(len(MAGIC))
            if magic != MAGIC:
                raise ManifestError(f"{self._name}: not a hamirror manifest (bad magic)")
            self._unpacker = msgpack.Unpacker(
                self._file,
                raw=False,
                strict_map_key=True,
                max_buffer_size=MAX_STRINGS + 16 * MAX_ENTRIES_PER_DIR + 81 * MAX_ENTRIES_PER_DIR,
                max_bin_len=max(MAX_STRINGS, 80 * MAX_ENTRIES_PER_DIR),
                max_str_len=64,
                max_array_len=8,
                max_map_len=16,
            )
            self.header = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _next(self, what: str):
        try:
            return self._unpacker.unpack()
        except msgpack.OutOfData:
            raise ManifestError(f"{self._name}: truncated manifest (no {what})") from None
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            raise ManifestError(f"{self._name}: corrupted manifest ({what}: {exc})") from None

    def _read_header(self) -> ManifestHeader:
        header = self._next("header")
        if not isinstance(header, dict) or not isinstance(header.get("version"), int):
            raise ManifestError(f"{self._name}: corrupted manifest header")
        if header["version"] != VERSION:
            raise ManifestError(
                f"{self._name}: manifest version {header['version']} is not supported "
                f"(this hamirror reads version {VERSION}); rescan to rebuild it"
            )
        root, at, checksum = header.get("root"), header.get("scanned_at_ns"), header.get("checksum")
        if not isinstance(root, bytes) or not isinstance(at, int) or not isinstance(checksum, bool):
            raise ManifestError(f"{self._name}: corrupted manifest header")
        parsed = ManifestHeader(root=root, scanned_at_ns=at, checksum=checksum)
        # The header's hash seeds every listing's check: a damaged header fails the first one.
        self._seed = xxhash.xxh3_64_intdigest(_pack_header(msgpack.Packer(use_bin_type=True), parsed))
        return parsed

    def __iter__(self) -> Iterator:
        Listing = fastpath.choose("scan").Listing
        dirs = entries = 0
        last_key = None
        try:
            while True:
                record = self._next("end record")
                if not isinstance(record, list) or not record or record[0] not in ("L", "E"):
                    raise ManifestError(f"{self._name}: corrupted manifest (unexpected record)")
                if record[0] == "E":
                    if record[1:] != [dirs, entries, self._seed]:
                        raise ManifestError(f"{self._name}: corrupted manifest (end record does not match)")
                    if len(MAGIC) + self._unpacker.tell() != os.fstat(self._file.fileno()).st_size:
                        raise ManifestError(f"{self._name}: corrupted manifest (data after the end record)")
                    return
                if len(record) != 6 or not all(isinstance(x, bytes) for x in record[1:5]):
                    raise ManifestError(f"{self._name}: corrupted manifest (bad directory record)")
                _, path, strings, records, digests, check = record
                if len(path) > MAX_PATH or _listing_checksum(self._seed, path, strings, records, digests) != check:
                    raise ManifestError(f"{self._name}: corrupted manifest (checksum mismatch in {path!r})")
                key = canonical_key(path)
                if last_key is not None and key <= last_key:
                    raise ManifestError(f"{self._name}: corrupted manifest (directories out of order)")
                last_key = key
                try:
                    listing = Listing.unpack(path, strings, records, digests, MAX_ENTRIES_PER_DIR)
                except ValueError as exc:
                    raise ManifestError(f"{self._name}: corrupted manifest in {path!r}: {exc}") from None
                dirs += 1
                entries += len(listing)
                yield listing
        finally:
            self.close()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ManifestReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_manifest_file(path: bytes | str) -> bool:
    """True if ``path`` is a regular file starting with the manifest magic."""
    try:
        with open(fs_path(path), "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except (IsADirectoryError, FileNotFoundError, NotADirectoryError, PermissionError):
        return False


def now_ns() -> int:
    return time.time_ns()


def cache_file_name(root: bytes) -> bytes:
    """Name of a tree's digest-cache manifest inside a state dir (keyed by its real path, so
    one state dir can serve several trees)."""
    real = os.path.realpath(fs_path(root))
    return b"digests-" + xxhash.xxh3_64_hexdigest(real).encode() + b".manifest"
