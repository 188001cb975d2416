# cython: language_level=3
"""The delta kernels, compiled; ``mirror/delta_py.py`` is their twin and specification.

``mirror.delta`` (Python, written once) owns the signature object, the block-size and
strong-length rules, the reading of files and the patcher with its checks; it calls these
loops, which must give exactly the twin's results:

* ``weak_sum``, ``strong_hash``: rsync's weak sum and the seeded XXH3-128 of a block.
* ``sign_blocks``: both sums of every block of a chunk, in one nogil call.
* ``Matcher``: the sliding-window state machine over ``new``, fed chunk by chunk.  The
  table: full blocks grouped into buckets by a multiplicative hash of their weak sum with a
  random odd multiplier (a hostile signature cannot pile its blocks into one bucket),
  ascending block order within a bucket.  In front of it a prefilter bitmap, 32 bits per
  bucket with two bits set per block in one 64-bit word, so about 0.4% of the windows of
  unrelated data reach the buckets.  Sliding over unmatched data rolls a batch of positions
  first and probes the prefilter for the batch afterwards (with prefetches), so the cache
  misses of the probes overlap instead of stalling the rolling chain one by one.

Nothing here imports the rest of ``mirror``; the numbers shared with it come from
``mirror/constants.py`` (``constants.pxi``).
"""

cimport cython

import os

from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memmove

include "constants.pxi"

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


cdef enum:
    # Ops one scan() call records before handing them to Python.
    OP_SLOTS = 256
    # A step of the matcher emits at most this many ops (end of file: run, pieces, run).
    OP_RESERVE = 16
    # Window positions rolled before their prefilter probes are made (see scan()).
    SLIDE_BATCH = 256
    # The prefilter bitmap has 2^this bits per bucket of the table (see _build_table).
    PREFILTER_BITS_PER_BUCKET_LOG2 = 5


cdef enum ScanStatus:
    NEED_DATA = 0
    OPS_FULL = 1
    DONE = 2


def _weak_sum_scalar(data):
    """The weak sum by the portable C loop (tests compare it with the vector one)."""
    cdef const uint8_t[::1] view = memoryview(data).cast("B") if len(data) else None
    return hm_weak_scalar(&view[0] if len(data) else NULL, len(data))


def weak_sum(data):
    """rsync's weak checksum of ``data`` as one 32-bit value (``a | b << 16``)."""
    cdef const uint8_t[::1] view = memoryview(data).cast("B") if len(data) else None
    return hm_weak_block(&view[0] if len(data) else NULL, len(data))


def strong_hash(data, uint64_t seed):
    """The 16-byte seeded XXH3-128 of ``data`` (canonical byte order)."""
    cdef uint8_t digest[16]
    cdef const uint8_t[::1] view = memoryview(data).cast("B") if len(data) else None
    _strong(&view[0] if len(data) else NULL, len(data), seed, digest)
    return PyBytes_FromStringAndSize(<char*>digest, 16)


def sign_blocks(data, Py_ssize_t block_size, uint64_t seed, Py_ssize_t strong_len):
    """``(weak, strong)`` of every block of ``data`` (the last may be short): 4 bytes
    little-endian and ``strong_len`` bytes per block."""
    cdef const uint8_t[::1] view = memoryview(data).cast("B") if len(data) else None
    cdef Py_ssize_t length = len(data), nblocks
    if block_size < 1 or not 1 <= strong_len <= MAX_STRONG_LEN:
        raise ValueError(f"cannot sign blocks of {block_size} bytes with {strong_len}-byte strong hashes")
    nblocks = (length + block_size - 1) // block_size
    weak = bytearray(4 * nblocks)
    strong = bytearray(strong_len * nblocks)
    cdef uint8_t* weak_out = <uint8_t*>PyByteArray_AS_STRING(weak)
    cdef uint8_t* strong_out = <uint8_t*>PyByteArray_AS_STRING(strong)
    if length:
        with nogil:
            _sign_blocks(&view[0], length, block_size, seed, strong_len, weak_out, strong_out)
    return bytes(weak), bytes(strong)


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


@cython.final
cdef class _Window:
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
        cdef bytes weak_sums = sig.weak  # TypeError unless bytes: the pointers below need it
        cdef bytes strong_sums = sig.strong
        cdef const uint8_t* weak = <const uint8_t*>PyBytes_AS_STRING(weak_sums)
        self.block = sig.block_size
        self.strong_len = sig.strong_len
        self.seed = sig.seed
        self.block_count = sig.block_count
        self.full_blocks = sig.basis_size // sig.block_size
        self.tail_len = sig.basis_size - self.full_blocks * self.block
        self._strong_ref = strong_sums
        self.strong = <const uint8_t*>PyBytes_AS_STRING(strong_sums)
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
                if tried == MAX_CANDIDATES:
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
            n = stop - start if stop - start < MAX_LITERAL else MAX_LITERAL
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
            while end - self.lit >= MAX_LITERAL + block:
                if self.n_ops > OP_SLOTS - OP_RESERVE:
                    return OPS_FULL
                self._emit(1, self.lit, MAX_LITERAL)
                self.lit += MAX_LITERAL
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
                    if pos + 1 + i - lit == MAX_LITERAL:
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
                if pos - lit == MAX_LITERAL:
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


@cython.final
cdef class Matcher:
    """The ops that turn the basis ``sig`` describes into the bytes fed in; see the twin."""

    cdef _Window _w
    cdef uint8_t* _data
    cdef Py_ssize_t _capacity
    cdef bint _finished

    def __cinit__(self):
        self._data = NULL

    def __init__(self, sig):
        cdef Py_ssize_t block = sig.block_size, strong_len = sig.strong_len, count, full
        # The engine's Signature checked these; they are checked again here only where a
        # wrong value would make this code read outside its buffers.
        if block < 1 or not 1 <= strong_len <= MAX_STRONG_LEN or sig.basis_size < 0:
            raise ValueError("invalid signature parameters")
        count = -(-sig.basis_size // block)
        full = sig.basis_size // block
        if sig.block_count != count or len(sig.weak) < 4 * full or len(sig.strong) < strong_len * count:
            raise ValueError("signature sums do not cover its blocks")
        self._w = _Window(sig)
        # Pending literal (< one piece) + window + the byte after it + a fed chunk.
        self._capacity = MAX_LITERAL + block + 1 + DELTA_READ_CHUNK
        self._data = <uint8_t*>malloc(self._capacity)
        if self._data == NULL:
            raise MemoryError()
        self._finished = False

    def __dealloc__(self):
        free(self._data)

    def feed(self, data):
        """The ops decided by the bytes of ``new`` read so far, after ``data``."""
        cdef const uint8_t[::1] view
        cdef Py_ssize_t length = len(data), done = 0, take
        cdef _Window w = self._w
        cdef list ops = []
        if self._finished:
            raise ValueError("data fed after finish()")
        if length == 0:
            return ops
        view = memoryview(data).cast("B")
        while done < length:
            if w.lit:
                memmove(self._data, self._data + w.lit, w.end - w.lit)
                w.pos -= w.lit
                w.end -= w.lit
                w.lit = 0
            take = min(length - done, self._capacity - w.end)
            memcpy(self._data + w.end, &view[done], take)
            w.end += take
            done += take
            self._run(ops)
        return ops

    def finish(self):
        """The last ops, once the whole of ``new`` was fed."""
        cdef list ops = []
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        self._w.eof = True
        self._run(ops)
        return ops

    cdef int _run(self, list ops) except -1:
        cdef _Window w = self._w
        cdef ScanStatus status = OPS_FULL
        cdef int i
        while status == OPS_FULL:
            with nogil:
                status = w.scan(self._data)
            for i in range(w.n_ops):
                if w.op_kind[i] == 0:
                    ops.append((COPY, w.op_x[i], w.op_y[i]))
                else:
                    ops.append((LITERAL, PyBytes_FromStringAndSize(<char*>self._data + w.op_x[i], w.op_y[i])))
            w.n_ops = 0
        return 0
