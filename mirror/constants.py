"""The numbers the compiled kernels and the Python code must agree on, defined once.

``setup.py`` turns every upper-case integer here into ``mirror/_fast/constants.pxi`` (a
C enum plus ``COMPILED_CONSTANTS``, the values the build saw) for the ``.pyx`` files;
Python imports this module.  ``tests/test_constants.py`` checks that the compiled modules
were built from these values.  Only integer literals and arithmetic on them belong here:
the build reads the file without importing the package.
"""

# Entry kinds (``mirror.entry.Kind``); packed records store them in one byte.
FILE = 1
DIR = 2
SYMLINK = 3
FIFO = 4
SOCKET = 5
CHAR = 6
BLOCK = 7

MAX_NAME = 255  # NAME_MAX on Linux
MAX_TARGET = 4095  # PATH_MAX - 1: the longest symlink target the kernel stores
MAX_ENTRIES_PER_DIR = 4_000_000  # the most a directory read from a manifest or a peer may hold
DIGEST_SIZE = 16  # xxh3-128
# The longest relative path, and the most components, a receiver takes (``safefs``).  A
# scan does not list a directory where a name could pass the length, nor one deeper than
# LISTED_DEPTH_MAX components: a chain of directories a user made that deep is left out with
# a problem, not the whole sync failed.  No real tree is that deep, and the compiled walk
# opens each directory from the root, one component at a time past PATH_MAX: its cost grows
# with the square of the depth there.
MAX_PATH_BYTES = 64 * 1024
MAX_DEPTH = 4096
LISTED_PATH_MAX = MAX_PATH_BYTES - MAX_NAME - 1
LISTED_DEPTH_MAX = 2047

# Packed listing records (``Listing.pack``): 80 bytes each; bit 0 of ``flags`` says the
# entry carries a digest.
RECORD_SIZE = 80
FLAG_DIGEST = 1

# compare_listings() flags
CMP_CHECKSUM = 1  # regular files of equal size: compare digests instead of mtime for content
CMP_OWNER = 2  # report uid/gid differences
CMP_DIR_TIMES = 4  # report directory mtime differences
CMP_LINK_TIMES = 8  # report symlink mtime differences

# compare_listings() change bits
CH_KIND = 1
CH_SIZE = 2
CH_MTIME = 4
CH_MODE = 8
CH_UID = 16
CH_GID = 32
CH_TARGET = 64
CH_RDEV = 128
CH_DIGEST = 256  # digests differ (checksum mode)
CH_NODIGEST = 512  # checksum mode, but a side has no digest (it could not be hashed)
CH_LINKED = 1024  # not a change: either side is a regular file with nlink > 1 (hard-link groups)

# Reads while hashing a whole file: the chunk stays in L2 between read() and hashing
# (4x faster than 1 MiB reads here).
HASH_CHUNK = 256 * 1024

# Delta ops (and their tags in the delta stream format): copy a run of basis blocks, or
# literal bytes; on the wire only, a hole of the new file (its length of zeros, not read).
COPY = 0
LITERAL = 1
HOLE = 3

# Delta kernel.  A literal op carries at most MAX_LITERAL bytes; at most MAX_CANDIDATES
# blocks sharing a window's weak sum are compared by strong hash (bounds the work a hostile
# signature can cause); strong hashes are at most MAX_STRONG_LEN bytes of the seeded
# xxh3-128; ``new`` and the basis are read DELTA_READ_CHUNK bytes at a time (128 KiB keeps
# the buffer in L2: 0.15 s per GiB from the page cache against 0.46 s with 1 MiB reads).
MAX_LITERAL = 256 * 1024
MAX_CANDIDATES = 64
MAX_STRONG_LEN = 16
DELTA_READ_CHUNK = 128 * 1024


def all_constants() -> dict[str, int]:
    """Every constant above by name (what the build writes into the compiled modules)."""
    return {name: value for name, value in globals().items() if name.isupper() and isinstance(value, int)}
