# cython: language_level=3
"""Rolling-checksum delta engine, compiled: signature, delta and patch.

The specification is the pure-Python twin ``mirror/delta_py.py``: its module docstring
states the API, the weak sum, the seeded strong hash, the matching rules that make both
implementations emit identical ops, the cost model behind ``default_block_size`` and the
rule of ``strong_len_for``.  This module implements the same names with the loops in C:

* ``signature``: Python reads the basis in chunks (``readinto`` a reused buffer) and one
  nogil call per chunk computes the weak sum and the seeded XXH3-128 of every block.
* ``Delta``: Python reads ``new`` into one reused buffer; a nogil state machine
  (``_Matcher.scan``) slides the window over it and records ops, carrying the rolling
  state across reads.  The buffer holds at most a pending literal piece, a window and a
  read chunk, so memory is bounded by the signature (its table), never by the file.
* The table: full blocks grouped into buckets by a multiplicative hash of their weak sum
  with a random odd multiplier (a hostile signature cannot pile its blocks into one
  bucket), ascending block order within a bucket.  In front of it a prefilter bitmap, 32
  bits per bucket with two bits set per block in one 64-bit word, so about 0.4% of the
  windows of unrelated data reach the buckets.
* Sliding over unmatched data rolls a batch of positions first and probes the prefilter
  for the batch afterwards (with prefetches), so the cache misses of the probes overlap
  instead of stalling the rolling chain one by one.
* ``Patcher``: copies basis ranges and literals to ``out`` through one reused buffer,
  hashing what it writes with the GIL released.

Nothing here imports the rest of ``mirror``; errors are ``ValueError`` with the same
messages as the twin's.
"""

cimport cython

import math
import os
import mmap
import stat

from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memmove

cdef extern from *:
    """
    #define XXH_INLINE_ALL
    #include <xxhash.h>
    """
    pass

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    #if defined(__x86_64__) && defined(__GNUC__)
    #include <immintrin.h>
    #endif

    /* rsync's weak sum of p[0..n): a = sum p[i], b = sum (n - i) p[i], as a | b << 16. */
    static inline uint32_t hm_weak_scalar(const uint8_t *p, size_t n) {
        uint32_t a = 0, b = 0;
        size_t i = 0;
        /* Four bytes per step: b gains 4a + 4x0 + 3x1 + 2x2 + x3, breaking the one-byte
           dependency chain of a += x; b += a. */
        for (; i + 4 <= n; i += 4) {
            b += 4 * a + 4 * (uint32_t)p[i] + 3 * (uint32_t)p[i + 1] + 2 * (uint32_t)p[i + 2] + p[i + 3];
            a += (uint32_t)p[i] + p[i + 1] + p[i + 2] + p[i + 3];
        }
        for (; i < n; i++) { a += p[i]; b += a; }
        return (a & 0xFFFF) | (b << 16);
    }

    #if defined(__x86_64__) && defined(__GNUC__)
    /* The same sum, 32 bytes per step (the adler32 trick).  Per chunk c of 32 bytes:
       b += 32 * a + sum (32 - i) c[i]; a += sum c[i].  Lanes wrap mod 2^32, which keeps
       the low 16 bits the result needs exact. */
    __attribute__((target("avx2")))
    static uint32_t hm_weak_avx2(const uint8_t *p, size_t n) {
        const __m256i weights = _mm256_setr_epi8(32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21,
            20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1);
        const __m256i ones = _mm256_set1_epi16(1);
        const __m256i zero = _mm256_setzero_si256();
        __m256i sum_a = zero, prefix = zero, weighted = zero;
        size_t i = 0;
        for (; i + 32 <= n; i += 32) {
            __m256i chunk = _mm256_loadu_si256((const __m256i *)(p + i));
            prefix = _mm256_add_epi32(prefix, sum_a);
            sum_a = _mm256_add_epi32(sum_a, _mm256_sad_epu8(chunk, zero));
            weighted = _mm256_add_epi32(weighted,
                _mm256_madd_epi16(_mm256_maddubs_epi16(chunk, weights), ones));
        }
        uint32_t lanes[8];
        uint32_t a = 0, b = 0;
        _mm256_storeu_si256((__m256i *)lanes, sum_a);
        for (int k = 0; k < 8; k++) a += lanes[k];
        _mm256_storeu_si256((__m256i *)lanes, prefix);
        for (int k = 0; k < 8; k++) b += 32 * lanes[k];
        _mm256_storeu_si256((__m256i *)lanes, weighted);
        for (int k = 0; k < 8; k++) b += lanes[k];
        for (; i < n; i++) { a += p[i]; b += a; }
        return (a & 0xFFFF) | (b << 16);
    }

    static int hm_have_avx2 = -1;
    static inline uint32_t hm_weak_block(const uint8_t *p, size_t n) {
        if (hm_have_avx2 < 0) hm_have_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
        return hm_have_avx2 ? hm_weak_avx2(p, n) : hm_weak_scalar(p, n);
    }
    #else
    static inline uint32_t hm_weak_block(const uint8_t *p, size_t n) { return hm_weak_scalar(p, n); }
    #endif
    """
    uint32_t hm_weak_block(const uint8_t* p, size_t n) nogil
    void __builtin_prefetch(const void* address) nogil
    uint32_t hm_weak_scalar(const uint8_t* p, size_t n) nogil

cdef extern from *:
    ctypedef struct XXH128_hash_t:
        uint64_t low64
        uint64_t high64
    ctypedef struct XXH128_canonical_t:
        unsigned char digest[16]
    ctypedef struct XXH3_state_t:
        pass
    XXH128_hash_t XXH3_128bits_withSeed(const void* data, size_t length, uint64_t seed) nogil
    void XXH128_canonicalFromHash(XXH128_canonical_t* dst, XXH128_hash_t h) nogil
    XXH3_state_t* XXH3_createState() nogil
    int XXH3_freeState(XXH3_state_t* state) nogil
    int XXH3_128bits_reset(XXH3_state_t* state) nogil
    int XXH3_128bits_update(XXH3_state_t* state, const void* data, size_t length) nogil
    XXH128_hash_t XXH3_128bits_digest(const XXH3_state_t* state) nogil


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
# Reads of 128 KiB keep the buffer in the L2 cache: measured 0.15 s per GiB from the page
# cache against 0.46 s with 1 MiB reads (the copy then misses the cache twice).
READ_CHUNK = 128 * 1024

# The same limits as C constants for the nogil code (a test checks they agree).
cdef enum:
    C_MAX_LITERAL = 262144
    C_MAX_CANDIDATES = 64
    # Ops one scan() call records before handing them to Python.
    OP_SLOTS = 256
    # A step of the matcher emits at most this many ops (end of file: run, pieces, run).
    OP_RESERVE = 16
    # Window positions rolled before their prefilter probes are made (see scan()).
    SLIDE_BATCH = 256
    # The prefilter bitmap has 2^this bits per bucket of the table (see _build_table).
    PREFILTER_BITS_PER_BUCKET_LOG2 = 5

if (C_MAX_LITERAL, C_MAX_CANDIDATES) != (MAX_LITERAL, MAX_CANDIDATES):
    raise ImportError("mirror._fast.delta: C limits disagree with the Python ones")


cdef enum ScanStatus:
    NEED_DATA = 0
    OPS_FULL = 1
    DONE = 2


# ---------------------------------------------------------------------------------------
# Parameters (plain Python: identical arithmetic to the twin's)

def strong_len_for(size, block_size):
    """Bytes of strong hash so that a false match in a file of ``size`` bytes stays < 2^-40."""
    _check_block_size(block_size)
    blocks = max(1, -(-size // block_size))
    bits = 40 + math.log2(max(1, size)) + math.log2(blocks)
    return max(MIN_STRONG_LEN, min(MAX_STRONG_LEN, math.ceil(bits / 8)))


def default_block_size(size):
    """Block size minimising signature + delta bytes under the twin's cost model."""
    if size < 0:
        raise ValueError(f"file size cannot be negative ({size})")
    edits = max(1.0, size / EDIT_SPACING)
    floor = max(MIN_DEFAULT_BLOCK, size / MAX_DEFAULT_BLOCKS)

    def rounded(block):
        return max(MIN_DEFAULT_BLOCK, min(MAX_BLOCK_SIZE, int(round(max(block, floor) / 64)) * 64))

    def cost(block):
        return -(-size // block) * (4 + strong_len_for(size, block)) + edits * block

    candidates = {rounded(math.sqrt(size * (4 + s) / edits)) for s in range(MIN_STRONG_LEN, MAX_STRONG_LEN + 1)}
    return min(sorted(candidates, reverse=True), key=cost)


def _weak_sum_scalar(data):
    """The weak sum by the portable C loop (tests compare it with the vector one)."""
    cdef const uint8_t[::1] view = memoryview(data).cast("B") if len(data) else None
    return hm_weak_scalar(&view[0] if len(data) else NULL, len(data))


def weak_sum(data):
    """rsync's weak checksum of ``data`` as one 32-bit value (``a | b << 16``)."""
    cdef const uint8_t[::1] view = memoryview(data).cast("B") if len(data) else None
    return hm_weak_block(&view[0] if len(data) else NULL, len(data))


def strong_hash(data, seed, strong_len):
    return _strong_py(data, seed)[:strong_len]


def _strong_py(data, uint64_t seed):
    cdef uint8_t digest[16]
    cdef const uint8_t[::1] view = memoryview(data).cast("B") if len(data) else None
    _strong(&view[0] if len(data) else NULL, len(data), seed, digest)
    return PyBytes_FromStringAndSize(<char*>digest, 16)


def _check_block_size(block_size):
    if not isinstance(block_size, int) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(
            f"block size {block_size!r} is outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE} bytes"
        )


def _check_strong_len(strong_len):
    if not isinstance(strong_len, int) or not 1 <= strong_len <= MAX_STRONG_LEN:
        raise ValueError(f"strong hash length {strong_len!r} is outside 1..{MAX_STRONG_LEN} bytes")


def _remaining_size(stream):
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


def _read_full_into(stream, view):
    """Fill ``view`` from ``stream``; fewer bytes only at end of stream."""
    cdef Py_ssize_t got = 0, want = len(view)
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


# ---------------------------------------------------------------------------------------
# Kernels

cdef inline uint32_t _weak_block(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    return hm_weak_block(p, <size_t>n)


cdef inline void _strong(const uint8_t* p, Py_ssize_t n, uint64_t seed, uint8_t* out16) noexcept nogil:
    cdef XXH128_canonical_t canon
    XXH128_canonicalFromHash(&canon, XXH3_128bits_withSeed(p, <size_t>n, seed))
    memcpy(out16, canon.digest, 16)


cdef inline uint64_t _bitmap_mask(uint64_t key) noexcept nogil:
    # Bits 20..31 of the product depend on every bit of a 32-bit weak sum's low part and
    # do not overlap the top bits that index the word (for tables up to 2^24 buckets).
    return ((<uint64_t>1) << ((key >> 20) & 63)) | ((<uint64_t>1) << ((key >> 26) & 63))


cdef inline void _store_le32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = v >> 24


cdef inline uint32_t _load_le32(const uint8_t* p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef void _sign_blocks(const uint8_t* data, Py_ssize_t length, Py_ssize_t block, uint64_t seed,
                       Py_ssize_t strong_len, uint8_t* weak_out, uint8_t* strong_out) noexcept nogil:
    cdef Py_ssize_t start = 0, n, k = 0
    cdef uint8_t digest[16]
    while start < length:
        n = block if length - start >= block else length - start
        _store_le32(weak_out + 4 * k, _weak_block(data + start, n))
        _strong(data + start, n, seed, digest)
        memcpy(strong_out + strong_len * k, digest, strong_len)
        start += n
        k += 1


# ---------------------------------------------------------------------------------------
# Signature

class Signature:
    """The receiver's description of its basis: per block a weak sum and a strong hash."""

    __slots__ = ("block_size", "strong_len", "seed", "basis_size", "block_count", "weak", "strong")

    def __init__(self, block_size, strong_len, seed, basis_size, weak, strong):
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

    def __eq__(self, other):
        if not hasattr(other, "weak") or not hasattr(other, "strong"):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __hash__(self):
        return hash((self.block_size, self.seed, self.basis_size, self.strong))

    def __repr__(self):
        return (
            f"Signature(block_size={self.block_size}, strong_len={self.strong_len}, "
            f"basis_size={self.basis_size}, block_count={self.block_count})"
        )


def signature(basis, *, block_size=None, strong_len=None, seed=None, size_hint=None):
    """The signature of the whole of ``basis`` (from its current position to its end)."""
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

    cdef Py_ssize_t block = block_size, sl = strong_len, chunk_size, got, nblocks
    cdef uint64_t c_seed = seed
    chunk_size = READ_CHUNK - READ_CHUNK % block
    buf = _aligned(chunk_size)
    view = memoryview(buf)
    cdef uint8_t[::1] mv = buf
    cdef const uint8_t* data = &mv[0]
    cdef uint8_t* weak_out
    cdef uint8_t* strong_out
    weak_parts = []
    strong_parts = []
    basis_size = 0
    try:
        while True:
            got = _read_full_into(basis, view)
            if got:
                nblocks = (got + block - 1) // block
                weak = bytearray(4 * nblocks)
                strong = bytearray(sl * nblocks)
                weak_out = <uint8_t*>PyByteArray_AS_STRING(weak)
                strong_out = <uint8_t*>PyByteArray_AS_STRING(strong)
                with nogil:
                    _sign_blocks(data, got, block, c_seed, sl, weak_out, strong_out)
                weak_parts.append(weak)
                strong_parts.append(strong)
                basis_size += got
            if got < chunk_size:
                break
    finally:
        view.release()
        _give_back(buf, chunk_size)
    return Signature(block_size, strong_len, seed, basis_size, b"".join(weak_parts), b"".join(strong_parts))


# Buffers given back by finished signatures, deltas and patches, for the next one: a sync
# sends thousands of small files, and mapping then unmapping two buffers for each costs more
# than the file (in a process with other threads running, every munmap interrupts them all
# to flush their TLBs).  A few per size, for the few sizes used last (the sizes vary with
# the block size: a long-lived daemon must not keep one set for each).  Only C-level dict
# and list operations touch it, which no other thread can interleave with.
_SPARE_BUFFERS = {}  # size -> [buffers]; the least recently used size first
_SPARE_PER_SIZE = 4
_SPARE_SIZES = 4


def _aligned(Py_ssize_t size):
    """A writable, page-aligned buffer (anonymous mmap) for reads to land in; its content is
    whatever the last user left (every user reads only what it wrote)."""
    size = max(size, 1)
    try:
        return _SPARE_BUFFERS[size].pop()
    except (KeyError, IndexError):
        return mmap.mmap(-1, size)


cdef void _give_back(object buf, Py_ssize_t size) noexcept:
    """Keep ``buf`` (from ``_aligned(size)``) for the next user: its last one is done with it."""
    if buf is None:
        return
    size = max(size, 1)
    try:
        spare = _SPARE_BUFFERS.pop(size, None)
        if spare is None:
            spare = []
            while len(_SPARE_BUFFERS) >= _SPARE_SIZES:
                del _SPARE_BUFFERS[next(iter(_SPARE_BUFFERS))]
        if len(spare) < _SPARE_PER_SIZE:
            spare.append(buf)
        _SPARE_BUFFERS[size] = spare  # now the most recently used size
    except Exception:
        pass  # at interpreter exit the module's globals may be gone: the buffer just goes


def _empty_signature():
    return Signature(default_block_size(0), MIN_STRONG_LEN, 0, 0, b"", b"")


# ---------------------------------------------------------------------------------------
# Delta

@cython.final
cdef class _Matcher:
    """The block table of a signature and the sliding-window state machine over ``new``."""

    # signature
    cdef Py_ssize_t block, strong_len, full_blocks, block_count, tail_len
    cdef uint64_t seed
    cdef const uint8_t* strong
    cdef object _strong_ref
    # table: entries sorted by bucket, ascending block order within a bucket
    cdef uint64_t mult
    cdef int bucket_shift, bitmap_shift
    cdef uint64_t* bitmap
    cdef uint32_t* bucket_start
    cdef uint32_t* entry_block
    cdef uint32_t* entry_weak
    # sliding state, as offsets into the caller's buffer
    cdef Py_ssize_t pos, lit, end
    cdef bint eof, weak_valid
    cdef uint32_t a, b
    cdef int64_t expected, run_first, run_count
    # ops recorded by scan(): kind, then (first, count) or (buffer offset, length)
    cdef int n_ops
    cdef uint8_t op_kind[OP_SLOTS]
    cdef int64_t op_x[OP_SLOTS]
    cdef int64_t op_y[OP_SLOTS]

    def __cinit__(self):
        self.bitmap = NULL
        self.bucket_start = NULL
        self.entry_block = NULL
        self.entry_weak = NULL

    def __init__(self, sig):
        cdef const uint8_t* weak = <const uint8_t*>PyBytes_AS_STRING(sig.weak)
        self.block = sig.block_size
        self.strong_len = sig.strong_len
        self.seed = sig.seed
        self.block_count = sig.block_count
        self.full_blocks = sig.basis_size // sig.block_size
        self.tail_len = sig.basis_size - self.full_blocks * self.block
        self._strong_ref = sig.strong
        self.strong = <const uint8_t*>PyBytes_AS_STRING(sig.strong)
        self.mult = int.from_bytes(os.urandom(8), "little") | 1
        self.expected = -1
        self.run_first = -1
        if self.full_blocks:
            self._build_table(weak)

    cdef int _build_table(self, const uint8_t* weak) except -1:
        cdef Py_ssize_t n = self.full_blocks, i
        cdef int bucket_bits = 2
        while (<Py_ssize_t>1 << bucket_bits) < n:
            bucket_bits += 1
        self.bucket_shift = 64 - bucket_bits
        # The prefilter: 32 bits per bucket, two of them set per block, both in one 64-bit
        # word (one cache line per probe).  About 0.4% of random windows pass, against 3%
        # with one bit per block; what passes costs cache misses in the bucket arrays
        # (measured: those dominated the nothing-in-common case).
        self.bitmap_shift = self.bucket_shift + PREFILTER_BITS_PER_BUCKET_LOG2 - 6
        cdef Py_ssize_t buckets = <Py_ssize_t>1 << bucket_bits
        cdef Py_ssize_t bitmap_words = <Py_ssize_t>1 << (64 - self.bitmap_shift)
        self.bitmap = <uint64_t*>calloc(bitmap_words, sizeof(uint64_t))
        self.bucket_start = <uint32_t*>calloc(buckets + 1, sizeof(uint32_t))
        self.entry_block = <uint32_t*>malloc(n * sizeof(uint32_t))
        self.entry_weak = <uint32_t*>malloc(n * sizeof(uint32_t))
        cdef uint32_t* cursor = <uint32_t*>malloc(buckets * sizeof(uint32_t))
        if not (self.bitmap and self.bucket_start and self.entry_block and self.entry_weak and cursor):
            free(cursor)
            raise MemoryError()
        cdef uint64_t key
        cdef uint32_t w
        with nogil:
            for i in range(n):
                key = self._key(_load_le32(weak + 4 * i))
                self.bitmap[key >> self.bitmap_shift] |= _bitmap_mask(key)
                self.bucket_start[(key >> self.bucket_shift) + 1] += 1
            for i in range(buckets):
                self.bucket_start[i + 1] += self.bucket_start[i]
                cursor[i] = self.bucket_start[i]
            # Blocks in ascending order, so each bucket lists its blocks in ascending order.
            for i in range(n):
                w = _load_le32(weak + 4 * i)
                key = self._key(w) >> self.bucket_shift
                self.entry_block[cursor[key]] = <uint32_t>i
                self.entry_weak[cursor[key]] = w
                cursor[key] += 1
        free(cursor)
        return 0

    def __dealloc__(self):
        free(self.bitmap)
        free(self.bucket_start)
        free(self.entry_block)
        free(self.entry_weak)

    cdef inline uint64_t _key(self, uint32_t w) noexcept nogil:
        # Multiply-shift with a random odd multiplier: the top bits pick the bucket and the
        # bitmap word, middle bits the two bitmap bits (see _bitmap_mask).
        return <uint64_t>w * self.mult

    cdef inline bint _may_have(self, uint64_t key) noexcept nogil:
        cdef uint64_t mask = _bitmap_mask(key)
        return (self.bitmap[key >> self.bitmap_shift] & mask) == mask

    cdef inline bint _has_weak(self, uint32_t w, uint64_t key) noexcept nogil:
        """Whether any block has weak sum ``w`` (``key`` is its hash)."""
        cdef uint32_t k = self.bucket_start[key >> self.bucket_shift]
        cdef uint32_t stop = self.bucket_start[(key >> self.bucket_shift) + 1]
        while k < stop:
            if self.entry_weak[k] == w:
                return True
            k += 1
        return False

    cdef inline bint _strong_equals(self, const uint8_t* digest, Py_ssize_t block_index) noexcept nogil:
        return memcmp(digest, self.strong + block_index * self.strong_len, self.strong_len) == 0

    cdef Py_ssize_t _lookup(self, uint32_t w, const uint8_t* window, uint8_t* digest,
                            bint* have_digest) noexcept nogil:
        cdef uint64_t key = self._key(w)
        if not self._may_have(key):
            return -1
        cdef uint32_t k = self.bucket_start[key >> self.bucket_shift]
        cdef uint32_t stop = self.bucket_start[(key >> self.bucket_shift) + 1]
        cdef int tried = 0
        while k < stop:
            if self.entry_weak[k] == w:
                if tried == C_MAX_CANDIDATES:
                    return -1
                tried += 1
                if not have_digest[0]:
                    _strong(window, self.block, self.seed, digest)
                    have_digest[0] = True
                if self._strong_equals(digest, self.entry_block[k]):
                    return self.entry_block[k]
            k += 1
        return -1

    cdef inline void _emit(self, uint8_t kind, int64_t x, int64_t y) noexcept nogil:
        self.op_kind[self.n_ops] = kind
        self.op_x[self.n_ops] = x
        self.op_y[self.n_ops] = y
        self.n_ops += 1

    cdef inline void _flush_run(self) noexcept nogil:
        if self.run_count:
            self._emit(0, self.run_first, self.run_count)
            self.run_count = 0

    cdef inline void _add_to_run(self, int64_t block_index) noexcept nogil:
        if self.run_count and self.run_first + self.run_count == block_index:
            self.run_count += 1
        else:
            self._flush_run()
            self.run_first = block_index
            self.run_count = 1

    cdef inline void _emit_literal(self, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
        """Literal bytes buf[start:stop), cut into pieces of MAX_LITERAL from ``start``."""
        cdef Py_ssize_t n
        if stop > start:
            self._flush_run()
        while start < stop:
            n = stop - start if stop - start < C_MAX_LITERAL else C_MAX_LITERAL
            self._emit(1, start, n)
            start += n

    cdef void _finish(self, const uint8_t* buf) noexcept nogil:
        """End of ``new``: match the basis's short final block against the last bytes."""
        cdef Py_ssize_t tail_at = self.end - self.tail_len
        cdef uint8_t digest[16]
        if self.tail_len and tail_at >= self.lit:
            _strong(buf + tail_at, self.tail_len, self.seed, digest)
            if self._strong_equals(digest, self.block_count - 1):
                self._emit_literal(self.lit, tail_at)
                self._add_to_run(self.block_count - 1)
                self.lit = self.end
        self._emit_literal(self.lit, self.end)
        self.lit = self.end
        self.pos = self.end
        self._flush_run()

    cdef ScanStatus scan(self, const uint8_t* buf) noexcept nogil:
        """Advance over buf[pos:end), recording ops, until more data, op slots or the end."""
        cdef Py_ssize_t block = self.block, pos = self.pos, end = self.end
        cdef Py_ssize_t match
        cdef uint32_t a = self.a, b = self.b, w
        cdef uint32_t shift_out = <uint32_t>block
        cdef uint8_t digest[16]
        cdef bint have_digest, slide_blocked
        cdef const uint8_t* window
        cdef ScanStatus status
        cdef uint32_t sum_a[SLIDE_BATCH]
        cdef uint32_t sum_b[SLIDE_BATCH]
        cdef uint64_t keys[SLIDE_BATCH]
        cdef Py_ssize_t n, i, stop, lit
        cdef const uint64_t* bitmap = self.bitmap
        cdef uint64_t mult = self.mult, key, mask
        cdef int bitmap_shift = self.bitmap_shift

        if self.full_blocks == 0:
            # Nothing to match: the same literal pieces the rolling loop would emit.
            while end - self.lit >= C_MAX_LITERAL + block:
                if self.n_ops > OP_SLOTS - OP_RESERVE:
                    return OPS_FULL
                self._emit(1, self.lit, C_MAX_LITERAL)
                self.lit += C_MAX_LITERAL
            if not self.eof:
                return NEED_DATA
            self._finish(buf)
            return DONE

        while True:
            if self.n_ops > OP_SLOTS - OP_RESERVE:
                status = OPS_FULL
                break
            if pos + block > end:
                if self.eof:
                    self.pos = pos
                    self._finish(buf)
                    status = DONE
                else:
                    status = NEED_DATA
                break
            window = buf + pos
            match = -1
            have_digest = False
            if not self.weak_valid and 0 <= self.expected < self.full_blocks:
                _strong(window, block, self.seed, digest)
                have_digest = True
                if self._strong_equals(digest, self.expected):
                    match = self.expected
            if match < 0:
                if not self.weak_valid:
                    w = _weak_block(window, block)
                    a = w & 0xFFFF
                    b = w >> 16
                    self.weak_valid = True
                match = self._lookup((a & 0xFFFF) | (b << 16), window, digest, &have_digest)
            if match >= 0:
                self._emit_literal(self.lit, pos)
                self._add_to_run(match)
                pos += block
                self.lit = pos
                self.expected = match + 1
                self.weak_valid = False
                continue
            self.expected = -1
            lit = self.lit
            # Slide byte by byte until a block has the window's weak sum, the pending literal
            # fills a piece, or the next byte is not in the buffer.  (When the buffer runs out
            # the current position is checked again after the refill: the lookup is
            # deterministic, so that only repeats work, never changes the ops.)
            slide_blocked = False
            while True:
                # Positions pos+1 .. end-block have their next window in the buffer.
                n = end - block - pos
                if n <= 0:
                    slide_blocked = True
                    break
                if n > SLIDE_BATCH:
                    n = SLIDE_BATCH
                # Two passes over a batch of positions: the first rolls the sums (a chain of
                # adds, nothing else), the second probes the bitmap.  The probes then do not
                # wait on each other, so their cache misses overlap; probing inside the
                # rolling loop measured 2-3x slower on a table larger than the L2 cache.
                for i in range(n):
                    a += <uint32_t>buf[pos + i + block] - <uint32_t>buf[pos + i]
                    b += a - shift_out * buf[pos + i]
                    sum_a[i] = a
                    sum_b[i] = b
                    keys[i] = <uint64_t>((a & 0xFFFF) | (b << 16)) * mult
                    __builtin_prefetch(&bitmap[keys[i] >> bitmap_shift])
                stop = -1
                for i in range(n):
                    if pos + 1 + i - lit == C_MAX_LITERAL:
                        stop = i
                        break
                    w = (sum_a[i] & 0xFFFF) | (sum_b[i] << 16)
                    key = keys[i]
                    mask = _bitmap_mask(key)
                    if (bitmap[key >> bitmap_shift] & mask) == mask and self._has_weak(w, key):
                        stop = i
                        break
                if stop < 0:
                    pos += n
                    continue
                pos += 1 + stop
                a = sum_a[stop]
                b = sum_b[stop]
                if pos - lit == C_MAX_LITERAL:
                    self._emit_literal(lit, pos)
                    self.lit = lit = pos
                break
            if slide_blocked:
                if self.eof:
                    self.pos = pos
                    self._finish(buf)
                    status = DONE
                else:
                    status = NEED_DATA
                break
        if status != DONE:
            self.pos = pos
        self.a = a
        self.b = b
        return status


cdef class Delta:
    """Iterator of ops turning the signature's basis into ``new``; see the twin's docstring."""

    cdef readonly object sig
    cdef readonly Py_ssize_t block_size
    cdef readonly object basis_size
    cdef public object digest
    cdef public object new_size
    cdef object _new
    cdef object _readinto
    cdef object _buf
    cdef object _view
    cdef uint8_t[::1] _mv
    cdef object _staging
    cdef object _staging_view
    cdef uint8_t[::1] _staging_mv
    cdef uint8_t* _data
    cdef Py_ssize_t _capacity
    cdef _Matcher _matcher
    cdef list _ops
    cdef Py_ssize_t _next_op
    cdef bint _done
    cdef XXH3_state_t* _hash
    cdef uint64_t _size

    def __cinit__(self):
        self._hash = NULL

    def __init__(self, sig, new):
        self.sig = sig if sig is not None else _empty_signature()
        self.block_size = self.sig.block_size
        self.basis_size = self.sig.basis_size
        self.digest = None
        self.new_size = None
        self._new = new
        self._readinto = getattr(new, "readinto", None)
        self._matcher = _Matcher(self.sig)
        # Pending literal (< one piece) + window + the byte after it + a read chunk.
        self._capacity = C_MAX_LITERAL + self.block_size + 1 + READ_CHUNK
        self._buf = _aligned(self._capacity)
        self._view = memoryview(self._buf)
        self._mv = self._buf
        self._data = &self._mv[0]
        # Reads land page-aligned (in the window when it happens to be, else here first):
        # the kernel copies into a misaligned buffer 2-3x slower.
        self._staging = _aligned(READ_CHUNK)
        self._staging_view = memoryview(self._staging)
        self._staging_mv = self._staging
        self._ops = []
        self._next_op = 0
        self._done = False
        self._size = 0
        self._hash = XXH3_createState()
        if self._hash == NULL:
            raise MemoryError()
        XXH3_128bits_reset(self._hash)

    def __dealloc__(self):
        if self._hash != NULL:
            XXH3_freeState(self._hash)
        _give_back(self._buf, self._capacity)
        _give_back(self._staging, READ_CHUNK)

    def __iter__(self):
        return self

    def __next__(self):
        while self._next_op >= len(self._ops):
            if self._done:
                raise StopIteration
            self._ops = []
            self._next_op = 0
            self._step()
        op = self._ops[self._next_op]
        self._next_op += 1
        return op

    cdef int _step(self) except -1:
        cdef _Matcher m = self._matcher
        cdef ScanStatus status
        cdef int i
        with nogil:
            status = m.scan(self._data)
        for i in range(m.n_ops):
            if m.op_kind[i] == 0:
                self._ops.append((COPY, m.op_x[i], m.op_y[i]))
            else:
                self._ops.append(
                    (LITERAL, PyBytes_FromStringAndSize(<char*>self._data + m.op_x[i], m.op_y[i]))
                )
        m.n_ops = 0
        if status == DONE:
            self._finish()
        elif status == NEED_DATA:
            self._refill()
        return 0

    cdef int _refill(self) except -1:
        cdef _Matcher m = self._matcher
        cdef Py_ssize_t keep = m.end - m.lit, got
        if m.lit:
            memmove(self._data, self._data + m.lit, keep)
            m.pos -= m.lit
            m.end = keep
            m.lit = 0
        if self._readinto is not None:
            if keep % 4096 == 0:
                got = self._readinto(self._view[keep:])
            else:
                got = self._readinto(self._staging_view[: min(READ_CHUNK, self._capacity - keep)])
                if got:
                    memcpy(self._data + keep, &self._staging_mv[0], got)
            if got is None:
                raise BlockingIOError("non-blocking stream is not supported")
        else:
            chunk = self._new.read(self._capacity - keep)
            got = len(chunk)
            memcpy(self._data + keep, PyBytes_AS_STRING(chunk), got)
        if got == 0:
            m.eof = True
            return 0
        with nogil:
            XXH3_128bits_update(self._hash, self._data + keep, got)
        m.end = keep + got
        self._size += got
        return 0

    cdef int _finish(self) except -1:
        cdef XXH128_canonical_t canon
        XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(self._hash))
        self.digest = PyBytes_FromStringAndSize(<char*>canon.digest, 16)
        self.new_size = self._size
        self._done = True
        self._view.release()
        self._staging_view.release()
        self._new = None
        self._readinto = None
        return 0


def delta(sig, new):
    """The ops that rebuild ``new`` from the basis ``sig`` describes (lazy: iterate them)."""
    return Delta(sig, new)


# ---------------------------------------------------------------------------------------
# Patch

cdef class Patcher:
    """Rebuilds a file op by op; checks each op against the basis before touching it."""

    cdef readonly object basis
    cdef readonly object out
    cdef readonly Py_ssize_t block_size
    cdef readonly object basis_size
    cdef readonly object block_count
    cdef readonly object max_size
    cdef readonly object size
    cdef object _basis_start
    cdef object _buf
    cdef object _view
    cdef XXH3_state_t* _hash
    cdef bint _finished

    def __cinit__(self):
        self._hash = NULL

    def __init__(self, basis, out, block_size, basis_size, *, max_size=None):
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
        self._finished = False
        self._hash = XXH3_createState()
        if self._hash == NULL:
            raise MemoryError()
        XXH3_128bits_reset(self._hash)

    def __dealloc__(self):
        if self._hash != NULL:
            XXH3_freeState(self._hash)
        _give_back(self._buf, READ_CHUNK)

    def _grow(self, length):
        if self.max_size is not None and self.size + length > self.max_size:
            raise ValueError(f"the delta rebuilds more than the allowed {self.max_size} bytes")
        self.size += length

    cdef int _hash_update(self, const uint8_t* data, Py_ssize_t length) except -1:
        with nogil:
            XXH3_128bits_update(self._hash, data, length)
        return 0

    def apply(self, op):
        if self._finished:
            raise ValueError("op applied after finish()")
        if not isinstance(op, (tuple, list)) or not op:
            raise ValueError(f"malformed delta op {op!r:.80}")
        kind = op[0]
        cdef const uint8_t[::1] view
        if kind == LITERAL and len(op) == 2:
            data = op[1]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError("literal op without bytes")
            if len(data) > MAX_LITERAL:
                raise ValueError(f"literal op of {len(data)} bytes exceeds the {MAX_LITERAL}-byte limit")
            self._grow(len(data))
            if len(data):
                view = memoryview(data).cast("B")
                self._hash_update(&view[0], view.shape[0])
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

    def _copy(self, start, end):
        if self._buf is None:
            self._buf = _aligned(READ_CHUNK)
            self._view = memoryview(self._buf)
        cdef uint8_t[::1] mv = self._buf
        cdef const uint8_t* data = &mv[0]
        cdef Py_ssize_t got
        self.basis.seek(self._basis_start + start)
        while start < end:
            got = _read_full_into(self.basis, self._view[: min(READ_CHUNK, end - start)])
            if got == 0:
                raise ValueError("the basis file shrank while the delta was applied")
            self._hash_update(data, got)
            self.out.write(self._view[:got])
            start += got

    def finish(self):
        """(xxh3-128 digest, size) of everything written."""
        cdef XXH128_canonical_t canon
        self._finished = True
        XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(self._hash))
        if self._view is not None:
            self._view.release()
            self._view = None
        return PyBytes_FromStringAndSize(<char*>canon.digest, 16), self.size


def patch(basis, ops, out, *, block_size=None, basis_size=None, max_size=None):
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
