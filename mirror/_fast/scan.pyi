"""Typed surface of mirror._fast.scan (the same API as mirror/scan_py.py, its specification)."""

from collections.abc import Iterable, Iterator
from typing import Final

from mirror.entry import Entry, ScanProblem

RECORD_SIZE: Final[int]  # bytes per packed entry record
FLAG_DIGEST: Final[int]
FILE: Final[int]
DIR: Final[int]
SYMLINK: Final[int]
FIFO: Final[int]
SOCKET: Final[int]
CHAR: Final[int]
BLOCK: Final[int]

# compare_listings() flags
CMP_CHECKSUM: Final[int]
CMP_OWNER: Final[int]
CMP_DIR_TIMES: Final[int]
CMP_LINK_TIMES: Final[int]

# compare_listings() change bits
CH_KIND: Final[int]
CH_SIZE: Final[int]
CH_MTIME: Final[int]
CH_MODE: Final[int]
CH_UID: Final[int]
CH_GID: Final[int]
CH_TARGET: Final[int]
CH_RDEV: Final[int]
CH_DIGEST: Final[int]
CH_NODIGEST: Final[int]
CH_LINKED: Final[int]

class Listing:
    """The entries of one directory, sorted by name (``path`` relative to the scanned root)."""

    path: bytes
    complete: bool
    problems: list[ScanProblem]
    hashed: int
    def __init__(
        self, path: bytes, entries: list[Entry] | None = None, complete: bool = True, problems=None
    ) -> None: ...
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Entry: ...
    def __iter__(self) -> Iterator[Entry]: ...
    def index(self, name: bytes) -> int: ...
    def subdirs(self) -> list[bytes]: ...
    def totals(self) -> tuple[list[int], int, int]: ...
    def fingerprint(self, flags: int) -> bytes: ...
    def has_links(self) -> bool: ...
    def pack(self) -> tuple[bytes, bytes, bytes]: ...
    @classmethod
    def unpack(cls, path: bytes, strings: bytes, records: bytes, digests: bytes, max_entries: int) -> Listing: ...

def bind_types(entry_type: type, problem_type: type) -> None: ...
def scan(
    root: bytes,
    *,
    excluder=None,
    skip_at_root: bytes | None = None,
    checksum: bool = False,
    previous: Iterable[Listing] | None = None,
    racy_ns: int = 0,
    start: bytes = b"",
) -> Iterator[Listing]: ...
class BackgroundScan:
    """``scan(root, skip_at_root=...)``'s listings, produced ahead by a thread of its own."""

    root: bytes
    def __init__(self, root: bytes, *, skip_at_root: bytes | None = None) -> None: ...
    def __iter__(self) -> BackgroundScan: ...
    def __next__(self) -> Listing: ...
    def close(self) -> None: ...

def background_scan(root: bytes, *, skip_at_root: bytes | None = None) -> BackgroundScan: ...
def compare_listings(src: Listing, dst: Listing, flags: int) -> list[tuple[int, int, int]]: ...
def hash_file_at(dir_fd: int, name: bytes, entry: Entry) -> tuple[bytes | None, int, str]: ...
