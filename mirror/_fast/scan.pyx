# cython: language_level=3
"""The scan kernels, compiled; ``mirror/scan_py.py`` is their twin and specification.

``list_directory`` lists one directory with the GIL released: ``getdents64`` on a descriptor
the caller opened, names sorted, every entry ``fstatat(AT_SYMLINK_NOFOLLOW)``-ed and symlinks
read, all into C arrays.  A ``Listing`` keeps those arrays (80-byte records plus one string
block) rather than a Python object per entry, so two trees can be scanned and compared with
no per-entry allocation; ``Entry`` tuples are built only when somebody indexes a listing.
``Hasher.fill_digests`` hashes a listing's files (xxh3-128) through the directory's
descriptor, GIL released; ``compare_listings`` merges two listings of one directory;
``background_scan`` walks a whole tree in a C thread that never takes the GIL.  The walk
that calls the first two for excludes, digests and subtrees is ``mirror.scan``'s, in Python.
The numbers shared with Python come from ``mirror/constants.py`` (``constants.pxi``).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport E2BIG, EAGAIN, EINTR, ELOOP, ENAMETOOLONG, ENOENT, ENOMEM, ENOSYS, ENOTDIR, EPERM, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from posix.stdlib cimport posix_memalign
from libc.string cimport memcmp, memcpy, memset, strchr, strlen
from posix.stat cimport fstat, fstatat, struct_stat
from posix.unistd cimport close, read

import os

cdef extern from "<fcntl.h>" nogil:
    int openat(int, const char *, int, ...)
    enum:
        O_RDONLY
        O_DIRECTORY
        O_NOFOLLOW
        O_CLOEXEC
        O_NONBLOCK
        O_NOATIME
        AT_SYMLINK_NOFOLLOW
        AT_FDCWD

cdef extern from "<sys/stat.h>" nogil:
    enum:
        S_IFMT
        S_IFREG
        S_IFDIR
        S_IFLNK
        S_IFIFO
        S_IFSOCK
        S_IFCHR
        S_IFBLK

cdef extern from "<unistd.h>" nogil:
    ssize_t readlinkat(int, const char *, char *, size_t)

cdef extern from *:
    """
    #include <dirent.h>
    #include <stdint.h>
    struct mirror_dirent64 {
        uint64_t d_ino;
        int64_t d_off;
        unsigned short d_reclen;
        unsigned char d_type;
        char d_name[];
    };
    """
    cdef struct linux_dirent64 "mirror_dirent64":
        unsigned short d_reclen
        char d_name[1]
    ssize_t getdents64(int fd, void *buf, size_t n) nogil

cdef extern from *:
    """
    #define XXH_INLINE_ALL
    #include <xxhash.h>
    #include <stdint.h>
    /* One manifest record; the layout is the on-disk format (little-endian hosts only). */
    typedef struct {
        int64_t size, mtime_ns, ctime_ns;
        uint64_t ino, dev, rdev;
        uint32_t mode, uid, gid, nlink, name_off;
        uint16_t name_len;
        uint8_t kind, flags;
        uint32_t target_off, target_len;
    } mirror_rec_t;
    _Static_assert(sizeof(mirror_rec_t) == 80, "record layout is the manifest format");
    """
    ctypedef struct XXH3_state_t:
        pass
    ctypedef struct XXH128_hash_t:
        pass
    ctypedef struct XXH128_canonical_t:
        unsigned char digest[16]
    XXH3_state_t *XXH3_createState() nogil
    int XXH3_freeState(XXH3_state_t *) nogil
    int XXH3_128bits_reset(XXH3_state_t *) nogil
    int XXH3_128bits_update(XXH3_state_t *, const void *, size_t) nogil
    XXH128_hash_t XXH3_128bits_digest(XXH3_state_t *) nogil
    void XXH128_canonicalFromHash(XXH128_canonical_t *, XXH128_hash_t) nogil

    ctypedef struct rec_t "mirror_rec_t":
        int64_t size
        int64_t mtime_ns
        int64_t ctime_ns
        uint64_t ino
        uint64_t dev
        uint64_t rdev
        uint32_t mode
        uint32_t uid
        uint32_t gid
        uint32_t nlink
        uint32_t name_off
        uint16_t name_len
        uint8_t kind
        uint8_t flags
        uint32_t target_off
        uint32_t target_len

import sys as _sys

if _sys.byteorder != "little":
    raise ImportError("mirror._fast.scan stores records in host order and supports little-endian hosts only")

include "constants.pxi"

# Problem kinds recorded in C while the GIL is released, turned into text afterwards.
cdef enum:
    P_STAT = 1
    P_VANISHED = 2
    P_READLINK = 3
    P_OPEN_FILE = 4
    P_READ_FILE = 5
    P_CHANGED_HASHING = 6
    P_READ_DIR = 7

_PROBLEM_TEXT = {
    P_STAT: "cannot stat",
    P_VANISHED: "vanished during scan",
    P_READLINK: "cannot read symlink",
    P_OPEN_FILE: "cannot open file",
    P_READ_FILE: "cannot read file",
    P_CHANGED_HASHING: "changed while hashing",
    P_READ_DIR: "cannot read directory",
}

def _plain_tuple(*fields):
    return fields


_Entry = _plain_tuple
_Problem = _plain_tuple


def bind_types(entry_type, problem_type):
    """Use ``mirror.entry.Entry``/``ScanProblem`` for results (called by ``mirror.fastpath``)."""
    global _Entry, _Problem
    _Entry = entry_type
    _Problem = problem_type


cdef inline int kind_of_mode(uint32_t mode) noexcept nogil:
    cdef uint32_t fmt = mode & S_IFMT
    if fmt == S_IFREG:
        return FILE
    if fmt == S_IFDIR:
        return DIR
    if fmt == S_IFLNK:
        return SYMLINK
    if fmt == S_IFIFO:
        return FIFO
    if fmt == S_IFSOCK:
        return SOCKET
    if fmt == S_IFCHR:
        return CHAR
    if fmt == S_IFBLK:
        return BLOCK
    return 0


cdef struct problem_t:
    int err
    int what
    size_t name_off       # the entry's name, in the listing's problem_names
    uint16_t name_len


cdef struct buf_t:
    char *data
    size_t len
    size_t cap


# The nogil helpers report running out of memory by returning -1 (errno ENOMEM) rather than
# raising: the walk's threads never hold the interpreter lock, so the caller that has it
# raises MemoryError.

cdef int buf_reserve(buf_t *b, size_t extra) noexcept nogil:
    cdef size_t cap
    cdef char *p
    if b.len + extra <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 4096
    while cap < b.len + extra:
        cap *= 2
    p = <char *>realloc(b.data, cap)
    if p == NULL:
        return -1
    b.data = p
    b.cap = cap
    return 0


cdef int buf_append(buf_t *b, const char *src, size_t n) noexcept nogil:
    if buf_reserve(b, n) < 0:
        return -1
    memcpy(b.data + b.len, src, n)
    b.len += n
    return 0


cdef struct name_t:
    size_t off
    uint16_t len
    char *ptr


cdef int compare_names(const void *a, const void *b) noexcept nogil:
    cdef const name_t *x = <const name_t *>a
    cdef const name_t *y = <const name_t *>b
    cdef size_t n = x.len if x.len < y.len else y.len
    cdef int c = memcmp(x.ptr, y.ptr, n)
    if c:
        return c
    return <int>x.len - <int>y.len


cdef inline void put_u16(unsigned char *p, uint64_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF


cdef inline void put_u32(unsigned char *p, uint64_t v) noexcept nogil:
    cdef int k
    for k in range(4):
        p[k] = (v >> (8 * k)) & 0xFF


cdef inline void put_u64(unsigned char *p, uint64_t v) noexcept nogil:
    cdef int k
    for k in range(8):
        p[k] = (v >> (8 * k)) & 0xFF


cdef inline int name_cmp(const char *a, size_t alen, const char *b, size_t blen) noexcept nogil:
    cdef size_t n = alen if alen < blen else blen
    cdef int c = memcmp(a, b, n)
    if c:
        return c
    return (alen > blen) - (alen < blen)


cdef class Listing:
    """The entries of one directory, sorted by name; see ``mirror.scan_py.Listing``."""

    cdef readonly bytes path
    cdef readonly bint complete
    cdef readonly list problems
    cdef readonly Py_ssize_t hashed
    cdef rec_t *recs
    cdef Py_ssize_t n
    cdef char *strings
    cdef size_t strings_len
    cdef unsigned char *digests

    def __cinit__(self):
        self.hashed = 0
        self.recs = NULL
        self.strings = NULL
        self.digests = NULL
        self.n = 0
        self.strings_len = 0

    def __init__(self, bytes path, entries=None, bint complete=True, problems=None):
        self.path = path
        self.complete = complete
        self.problems = list(problems or [])
        if entries:
            self._fill_from_entries(list(entries))

    def __dealloc__(self):
        free(self.recs)
        free(self.strings)
        free(self.digests)

    cdef int _fill_from_entries(self, list entries) except -1:
        cdef Py_ssize_t i, n = len(entries)
        cdef buf_t strings
        cdef rec_t *r
        cdef bytes name, target
        strings.data = NULL
        strings.len = strings.cap = 0
        self.recs = <rec_t *>malloc(max(n, 1) * sizeof(rec_t))
        if self.recs == NULL:
            raise MemoryError()
        memset(self.recs, 0, max(n, 1) * sizeof(rec_t))
        try:
            for i in range(n):
                e = entries[i]
                r = &self.recs[i]
                name = e[0]
                target = e[12]
                r.name_off = strings.len
                r.name_len = len(name)
                r.target_off = strings.len + len(name)
                r.target_len = len(target)
                if buf_append(&strings, name, len(name)) < 0 or buf_append(&strings, target, len(target)) < 0:
                    raise MemoryError()
                r.kind = e[1]
                r.mode = e[2]
                r.uid = e[3]
                r.gid = e[4]
                r.size = e[5]
                r.mtime_ns = e[6]
                r.ctime_ns = e[7]
                r.ino = e[8]
                r.dev = e[9]
                r.nlink = e[10]
                r.rdev = e[11]
                if e[13] is not None:
                    self._set_digest(i, e[13], n)
            self.n = n
        finally:
            self.strings = strings.data
            self.strings_len = strings.len
        return 0

    cdef int _set_digest(self, Py_ssize_t i, bytes digest, Py_ssize_t n) except -1:
        if len(digest) != DIGEST_SIZE:
            raise ValueError("a digest is 16 bytes")
        if self.digests == NULL:
            self.digests = <unsigned char *>malloc(max(n, 1) * DIGEST_SIZE)
            if self.digests == NULL:
                raise MemoryError()
            memset(self.digests, 0, max(n, 1) * DIGEST_SIZE)
        memcpy(self.digests + i * DIGEST_SIZE, PyBytes_AS_STRING(digest), DIGEST_SIZE)
        self.recs[i].flags |= FLAG_DIGEST
        return 0

    def __len__(self):
        return self.n

    def __getitem__(self, Py_ssize_t i):
        if i < 0:
            i += self.n
        if i < 0 or i >= self.n:
            raise IndexError("listing index out of range")
        return self._entry(i)

    def __iter__(self):
        cdef Py_ssize_t i
        for i in range(self.n):
            yield self._entry(i)

    def __repr__(self):
        return f"Listing({self.path!r}, {self.n} entries, complete={self.complete})"

    cdef object _entry(self, Py_ssize_t i):
        cdef rec_t *r = &self.recs[i]
        digest = None
        if r.flags & FLAG_DIGEST:
            digest = PyBytes_FromStringAndSize(<char *>self.digests + i * DIGEST_SIZE, DIGEST_SIZE)
        return _Entry(
            PyBytes_FromStringAndSize(self.strings + r.name_off, r.name_len),
            r.kind, r.mode, r.uid, r.gid, r.size, r.mtime_ns, r.ctime_ns, r.ino, r.dev,
            r.nlink, r.rdev,
            PyBytes_FromStringAndSize(self.strings + r.target_off, r.target_len),
            digest,
        )

    cdef Py_ssize_t _find(self, const char *name, size_t name_len) noexcept nogil:
        cdef Py_ssize_t lo = 0, hi = self.n, mid
        cdef int c
        while lo < hi:
            mid = (lo + hi) // 2
            c = name_cmp(self.strings + self.recs[mid].name_off, self.recs[mid].name_len, name, name_len)
            if c < 0:
                lo = mid + 1
            elif c > 0:
                hi = mid
            else:
                return mid
        return -1

    def index(self, bytes name):
        """Position of ``name`` in this listing, or -1."""
        return self._find(name, len(name))

    def subdirs(self):
        """Names of the directories in this listing, in order."""
        cdef Py_ssize_t i
        cdef rec_t *r
        out = []
        for i in range(self.n):
            r = &self.recs[i]
            if r.kind == DIR:
                out.append(PyBytes_FromStringAndSize(self.strings + r.name_off, r.name_len))
        return out

    def totals(self):
        """``(count per kind, bytes in regular files, digests held)``; see the twin."""
        cdef Py_ssize_t i
        cdef long long counts[8]
        cdef long long file_bytes = 0, digests = 0
        cdef rec_t *r
        memset(counts, 0, sizeof(counts))
        for i in range(self.n):
            r = &self.recs[i]
            counts[r.kind] += 1
            if r.kind == FILE:
                file_bytes += r.size
            if r.flags & FLAG_DIGEST:
                digests += 1
        return [counts[k] for k in range(8)], file_bytes, digests

    def fingerprint(self, int flags):
        """xxh3-128 of what ``compare_listings`` compares; see ``mirror.scan_py.Listing.fingerprint``."""
        cdef XXH3_state_t *state = XXH3_createState()
        cdef XXH128_canonical_t canon
        cdef Py_ssize_t i
        cdef rec_t *r
        cdef unsigned char buf[64]
        cdef unsigned char zeros[17]
        cdef int kind
        cdef int64_t mtime
        if state == NULL:
            raise MemoryError()
        memset(zeros, 0, sizeof(zeros))
        with nogil:
            XXH3_128bits_reset(state)
            for i in range(self.n):
                r = &self.recs[i]
                kind = r.kind
                if kind == FILE or kind == FIFO or kind == SOCKET or kind == CHAR or kind == BLOCK:
                    mtime = r.mtime_ns
                elif kind == DIR:
                    mtime = r.mtime_ns if flags & CMP_DIR_TIMES else 0
                else:
                    mtime = r.mtime_ns if flags & CMP_LINK_TIMES else 0
                put_u16(buf, r.name_len)
                XXH3_128bits_update(state, buf, 2)
                XXH3_128bits_update(state, self.strings + r.name_off, r.name_len)
                buf[0] = <unsigned char>kind
                put_u32(buf + 1, 0 if kind == SYMLINK else r.mode)
                put_u32(buf + 5, r.uid if flags & CMP_OWNER else 0)
                put_u32(buf + 9, r.gid if flags & CMP_OWNER else 0)
                put_u64(buf + 13, <uint64_t>r.size if kind == FILE else 0)
                put_u64(buf + 21, <uint64_t>mtime)
                put_u64(buf + 29, r.rdev if (kind == CHAR or kind == BLOCK) else 0)
                put_u32(buf + 37, r.target_len)
                XXH3_128bits_update(state, buf, 41)
                XXH3_128bits_update(state, self.strings + r.target_off, r.target_len)
                if flags & CMP_CHECKSUM and kind == FILE and r.flags & FLAG_DIGEST:
                    buf[0] = 1
                    XXH3_128bits_update(state, buf, 1)
                    XXH3_128bits_update(state, self.digests + i * DIGEST_SIZE, DIGEST_SIZE)
                else:
                    XXH3_128bits_update(state, zeros, 17)
            XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(state))
        XXH3_freeState(state)
        return PyBytes_FromStringAndSize(<char *>canon.digest, DIGEST_SIZE)

    def has_links(self):
        """True if a regular file here has other hard links; see the twin."""
        cdef Py_ssize_t i
        for i in range(self.n):
            if self.recs[i].kind == FILE and self.recs[i].nlink > 1:
                return True
        return False

    def pack(self):
        """``(strings, records, digests)``; see ``mirror.scan_py.Listing.pack``."""
        cdef Py_ssize_t i
        cdef bint any_digest = False
        for i in range(self.n):
            if self.recs[i].flags & FLAG_DIGEST:
                any_digest = True
                break
        return (
            PyBytes_FromStringAndSize(self.strings, self.strings_len),
            PyBytes_FromStringAndSize(<char *>self.recs, self.n * RECORD_SIZE),
            PyBytes_FromStringAndSize(<char *>self.digests, self.n * DIGEST_SIZE) if any_digest else b"",
        )

    @classmethod
    def unpack(cls, bytes path, bytes strings, bytes records, bytes digests, Py_ssize_t max_entries):
        """Rebuild and validate a listing from ``pack()`` output; ValueError on any defect."""
        cdef Py_ssize_t i, count
        cdef Listing listing
        cdef rec_t *r
        cdef const char *s = PyBytes_AS_STRING(strings)
        cdef size_t slen = PyBytes_GET_SIZE(strings)
        cdef const char *name
        cdef const char *prev = NULL
        cdef size_t prev_len = 0
        if len(records) % RECORD_SIZE:
            raise ValueError(f"record block of {len(records)} bytes is not a multiple of {RECORD_SIZE}")
        count = len(records) // RECORD_SIZE
        if count > max_entries:
            raise ValueError(f"{count} entries exceed the limit of {max_entries}")
        if len(digests) and len(digests) != count * DIGEST_SIZE:
            raise ValueError(f"digest block of {len(digests)} bytes does not match {count} entries")
        listing = Listing.__new__(Listing)
        listing.path = path
        listing.complete = True
        listing.problems = []
        listing.recs = <rec_t *>malloc(max(count, 1) * RECORD_SIZE)
        listing.strings = <char *>malloc(max(slen, 1))
        if listing.recs == NULL or listing.strings == NULL:
            raise MemoryError()
        memcpy(listing.recs, PyBytes_AS_STRING(records), count * RECORD_SIZE)
        memcpy(listing.strings, s, slen)
        listing.strings_len = slen
        listing.n = count
        if len(digests):
            listing.digests = <unsigned char *>malloc(count * DIGEST_SIZE)
            if listing.digests == NULL:
                raise MemoryError()
            memcpy(listing.digests, PyBytes_AS_STRING(digests), count * DIGEST_SIZE)
        for i in range(count):
            r = &listing.recs[i]
            if r.kind < FILE or r.kind > BLOCK:
                raise ValueError(f"entry {i}: unknown kind {r.kind}")
            if <size_t>r.name_off + r.name_len > slen or <size_t>r.target_off + r.target_len > slen:
                raise ValueError(f"entry {i}: string offsets outside the string block")
            name = s + r.name_off
            if (r.name_len == 0 or memchr_any(name, r.name_len)
                    or (r.name_len == 1 and name[0] == b'.')
                    or (r.name_len == 2 and name[0] == b'.' and name[1] == b'.')):
                raise ValueError(f"entry {i}: invalid name {strings[r.name_off:r.name_off + r.name_len]!r}")
            if prev != NULL and name_cmp(name, r.name_len, prev, prev_len) <= 0:
                raise ValueError(
                    f"entry {i}: name {strings[r.name_off:r.name_off + r.name_len]!r} out of order or repeated")
            prev = name
            prev_len = r.name_len
            if (r.target_len > MAX_TARGET or (r.target_len and r.kind != SYMLINK)
                    or memchr_nul(s + r.target_off, r.target_len)):
                raise ValueError(f"entry {i}: invalid symlink target")
            if r.flags & ~FLAG_DIGEST or (r.flags & FLAG_DIGEST and (not len(digests) or r.kind != FILE)):
                raise ValueError(f"entry {i}: invalid flags {r.flags}")
            if r.mode > 0o7777:
                raise ValueError(f"entry {i}: invalid mode {r.mode:o}")
        return listing


cdef inline bint memchr_any(const char *p, size_t n) noexcept nogil:
    """True if ``p[:n]`` holds a ``/`` or a NUL (not allowed in a single name)."""
    cdef size_t i
    for i in range(n):
        if p[i] == b'/' or p[i] == 0:
            return True
    return False


cdef inline bint memchr_nul(const char *p, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        if p[i] == 0:
            return True
    return False


cdef struct dirscan_t:
    # Output of listing one directory with the GIL released.
    rec_t *recs
    Py_ssize_t n
    buf_t strings
    problem_t *problems
    Py_ssize_t nproblems
    Py_ssize_t problems_cap
    buf_t problem_names
    int dir_err          # errno if the directory itself could not be read, else 0


cdef struct scratch_t:
    # A lister's working space, reused from one directory to the next.
    buf_t names          # the names getdents64 returned
    name_t *order        # (offset, length) of each, sorted
    size_t order_cap


cdef void dirscan_free(dirscan_t *d) noexcept nogil:
    free(d.recs)
    free(d.strings.data)
    free(d.problems)
    free(d.problem_names.data)
    memset(d, 0, sizeof(dirscan_t))


cdef void scratch_free(scratch_t *w) noexcept nogil:
    free(w.names.data)
    free(w.order)
    memset(w, 0, sizeof(scratch_t))


cdef int add_problem(dirscan_t *d, int err, int what, const char *name, uint16_t name_len) noexcept nogil:
    cdef problem_t *p
    if d.nproblems == d.problems_cap:
        p = <problem_t *>realloc(d.problems, (d.problems_cap * 2 if d.problems_cap else 8) * sizeof(problem_t))
        if p == NULL:
            return -1
        d.problems = p
        d.problems_cap = d.problems_cap * 2 if d.problems_cap else 8
    p = &d.problems[d.nproblems]
    p.err = err
    p.what = what
    p.name_off = d.problem_names.len
    p.name_len = name_len
    if buf_append(&d.problem_names, name, name_len) < 0:
        return -1
    d.nproblems += 1
    return 0


cdef int read_directory(int fd, const char *skip, size_t skip_len, dirscan_t *d, scratch_t *w) noexcept nogil:
    """getdents64 + sort + fstatat + readlinkat into ``d``; 0, or -1 out of memory.  The
    caller owns ``fd``."""
    cdef size_t nlen, count = 0, i
    cdef name_t *order
    cdef struct_stat st
    cdef rec_t *r
    cdef int kind
    cdef ssize_t tlen
    cdef char cname[MAX_NAME + 1]
    cdef char target[MAX_TARGET + 1]
    cdef const char *name

    # getdents64 straight into a buffer: no DIR stream to set up, no duplicate descriptor.
    # The descriptor's offset moves, which is harmless: it is only used for *at() calls after.
    cdef char dents[65536]
    cdef ssize_t got, pos
    cdef linux_dirent64 *ent
    w.names.len = 0
    while True:
        got = getdents64(fd, dents, sizeof(dents))
        if got < 0:
            if errno == EINTR:
                continue
            d.dir_err = errno
            return 0
        if got == 0:
            break
        pos = 0
        while pos < got:
            ent = <linux_dirent64 *>(dents + pos)
            pos += ent.d_reclen
            nlen = strlen(ent.d_name)
            if (nlen == 1 and ent.d_name[0] == b'.') or (nlen == 2 and ent.d_name[0] == b'.' and ent.d_name[1] == b'.'):
                continue
            if skip != NULL and nlen == skip_len and memcmp(ent.d_name, skip, nlen) == 0:
                continue
            if count == w.order_cap:
                order = <name_t *>realloc(w.order, (w.order_cap * 2 if w.order_cap else 256) * sizeof(name_t))
                if order == NULL:
                    return -1
                w.order = order
                w.order_cap = w.order_cap * 2 if w.order_cap else 256
            # Kept as (offset, length): the names buffer may move while it grows.
            w.order[count].off = w.names.len
            w.order[count].len = <uint16_t>nlen
            if buf_append(&w.names, ent.d_name, nlen) < 0:
                return -1
            count += 1
    for i in range(count):
        w.order[i].ptr = w.names.data + w.order[i].off
    qsort(w.order, count, sizeof(name_t), compare_names)

    d.recs = <rec_t *>malloc((count if count else 1) * sizeof(rec_t))
    if d.recs == NULL or buf_reserve(&d.strings, w.names.len) < 0:
        return -1
    for i in range(count):
        # The names are NUL-free; make each a C string for the *at() calls.
        name = w.order[i].ptr
        nlen = w.order[i].len
        memcpy(cname, name, nlen)
        cname[nlen] = 0
        if fstatat(fd, cname, &st, AT_SYMLINK_NOFOLLOW) != 0:
            if add_problem(d, errno, P_VANISHED if errno == ENOENT else P_STAT, name, nlen) < 0:
                return -1
            continue
        kind = kind_of_mode(st.st_mode)
        if kind == 0:
            continue
        r = &d.recs[d.n]
        r.flags = 0
        r.target_len = 0
        r.name_off = d.strings.len
        r.name_len = nlen
        if kind == SYMLINK:
            tlen = readlinkat(fd, cname, target, MAX_TARGET + 1)
            if tlen < 0:
                if add_problem(d, errno, P_VANISHED if errno == ENOENT else P_READLINK, name, nlen) < 0:
                    return -1
                continue
            if tlen > MAX_TARGET:
                tlen = MAX_TARGET
            if buf_append(&d.strings, name, nlen) < 0 or buf_append(&d.strings, target, tlen) < 0:
                return -1
            r.target_off = r.name_off + nlen
            r.target_len = <uint32_t>tlen
        else:
            if buf_append(&d.strings, name, nlen) < 0:
                return -1
            r.target_off = d.strings.len
        r.kind = <uint8_t>kind
        r.mode = st.st_mode & 0o7777
        r.uid = st.st_uid
        r.gid = st.st_gid
        r.size = st.st_size
        r.mtime_ns = <int64_t>st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec
        r.ctime_ns = <int64_t>st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec
        r.ino = st.st_ino
        r.dev = st.st_dev
        r.nlink = <uint32_t>st.st_nlink
        r.rdev = st.st_rdev if (kind == CHAR or kind == BLOCK) else 0
        d.n += 1
    return 0


cdef int open_file_noatime(int dir_fd, const char *name) noexcept nogil:
    # O_NONBLOCK: a file replaced by a FIFO since the stat must not block the scan.
    cdef int flags = O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC
    cdef int fd = openat(dir_fd, name, flags | O_NOATIME)
    if fd < 0 and errno == EPERM:
        fd = openat(dir_fd, name, flags)
    return fd


cdef int hash_file(int dir_fd, const char *name, rec_t *r, unsigned char *out,
                   XXH3_state_t *state, char *buf, int *what) noexcept nogil:
    """Hash ``name``; 0 on success, else an errno (or -1 with ``what`` set for a changed file)."""
    cdef int fd = open_file_noatime(dir_fd, name)
    cdef ssize_t got
    cdef struct_stat st
    cdef XXH128_canonical_t canon
    cdef int err
    if fd < 0:
        err = errno
        what[0] = P_VANISHED if err == ENOENT else P_OPEN_FILE
        return err
    XXH3_128bits_reset(state)
    while True:
        got = read(fd, buf, HASH_CHUNK)
        if got < 0:
            if errno == EINTR:
                continue
            err = errno
            close(fd)
            what[0] = P_READ_FILE
            return err
        if got == 0:
            break
        XXH3_128bits_update(state, buf, got)
    if fstat(fd, &st) != 0:
        err = errno
        close(fd)
        what[0] = P_READ_FILE
        return err
    close(fd)
    if (st.st_ino != r.ino or st.st_size != r.size
            or <int64_t>st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec != r.mtime_ns
            or <int64_t>st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec != r.ctime_ns):
        what[0] = P_CHANGED_HASHING
        return -1
    XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(state))
    memcpy(out, canon.digest, DIGEST_SIZE)
    return 0


cdef class Hasher:
    """Fills the digests of a listing's regular files; see ``mirror.scan_py.Hasher``.

    One per scan: it keeps an xxh3 state and a read buffer for every file it hashes."""
    cdef XXH3_state_t *state
    cdef char *buf

    def __cinit__(self):
        self.state = XXH3_createState()
        # Page-aligned: the kernel copies into a misaligned buffer 2-3x slower (measured here:
        # 1.4 s against 3.3-4.0 s to read 6.4 GB from the page cache).
        if posix_memalign(<void **>&self.buf, 4096, HASH_CHUNK) != 0:
            self.buf = NULL
        if self.state == NULL or self.buf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.state != NULL:
            XXH3_freeState(self.state)
        free(self.buf)

    def fill_digests(self, int dir_fd, Listing listing, Listing previous, int64_t racy_ns):
        """Give every regular file of ``listing`` (the directory open at ``dir_fd``) its digest."""
        cdef Py_ssize_t i
        cdef rec_t *r
        cdef int err, what
        cdef char cname[MAX_NAME + 1]
        if listing.n == 0:
            return
        if listing.digests == NULL:
            listing.digests = <unsigned char *>calloc(listing.n, DIGEST_SIZE)
            if listing.digests == NULL:
                raise MemoryError()
        if previous is not None:
            with nogil:
                adopt_digests(listing, previous, racy_ns)
        for i in range(listing.n):
            r = &listing.recs[i]
            if r.kind != FILE or r.flags & FLAG_DIGEST:
                continue
            memcpy(cname, listing.strings + r.name_off, r.name_len)
            cname[r.name_len] = 0
            with nogil:
                err = hash_file(dir_fd, cname, r, listing.digests + i * DIGEST_SIZE, self.state, self.buf, &what)
            listing.hashed += 1
            if err == 0:
                r.flags |= FLAG_DIGEST
                continue
            name = PyBytes_FromStringAndSize(cname, r.name_len)
            path = listing.path + b"/" + name if listing.path else name
            if err < 0:
                listing.problems.append(_Problem(path, 0, _PROBLEM_TEXT[what]))
            else:
                listing.problems.append(_Problem(path, err, f"{_PROBLEM_TEXT[what]}: {os.strerror(err)}"))


cdef int adopt_digests(Listing cur, Listing old, int64_t racy_ns) noexcept nogil:
    """Copy digests from ``old`` (same directory, last manifest) where the file is unchanged."""
    cdef Py_ssize_t i = 0, j = 0
    cdef rec_t *a
    cdef rec_t *b
    cdef int c
    if old.digests == NULL:
        return 0
    while i < cur.n and j < old.n:
        a = &cur.recs[i]
        b = &old.recs[j]
        c = name_cmp(cur.strings + a.name_off, a.name_len, old.strings + b.name_off, b.name_len)
        if c < 0:
            i += 1
        elif c > 0:
            j += 1
        else:
            if (a.kind == FILE and b.kind == FILE and b.flags & FLAG_DIGEST
                    and a.size == b.size and a.mtime_ns == b.mtime_ns and a.ctime_ns == b.ctime_ns
                    and a.ino == b.ino and a.mtime_ns < racy_ns):
                memcpy(cur.digests + i * DIGEST_SIZE, old.digests + j * DIGEST_SIZE, DIGEST_SIZE)
                a.flags |= FLAG_DIGEST
            i += 1
            j += 1
    return 0


cdef Listing build_listing(bytes dir_path, dirscan_t *d, excluder):
    """Turn a C directory scan into a Listing, applying the excluder and naming the problems."""
    cdef Listing listing = Listing.__new__(Listing)
    cdef Py_ssize_t i, k, kept = 0
    cdef rec_t *r
    cdef problem_t *p
    cdef buf_t strings
    listing.path = dir_path
    listing.complete = d.dir_err == 0
    listing.problems = []
    if d.dir_err:
        listing.problems.append(_Problem(dir_path, d.dir_err, f"cannot read directory: {os.strerror(d.dir_err)}"))
        return listing
    for k in range(d.nproblems):
        p = &d.problems[k]
        name = PyBytes_FromStringAndSize(d.problem_names.data + p.name_off, p.name_len)
        listing.problems.append(_Problem(
            dir_path + b"/" + name if dir_path else name, p.err, f"{_PROBLEM_TEXT[p.what]}: {os.strerror(p.err)}"))
    if excluder is not None and d.n:
        strings.data = NULL
        strings.len = strings.cap = 0
        try:
            for i in range(d.n):
                r = &d.recs[i]
                name = PyBytes_FromStringAndSize(d.strings.data + r.name_off, r.name_len)
                if excluder.excluded(dir_path + b"/" + name if dir_path else name, r.kind == DIR):
                    continue
                d.recs[kept] = d.recs[i]
                r = &d.recs[kept]
                if buf_append(&strings, d.strings.data + r.name_off, r.name_len + r.target_len) < 0:
                    raise MemoryError()
                r.name_off = strings.len - r.name_len - r.target_len
                r.target_off = r.name_off + r.name_len
                kept += 1
        except BaseException:
            free(strings.data)
            raise
        free(d.strings.data)
        d.strings = strings
        d.n = kept
    listing.recs = d.recs
    listing.n = d.n
    listing.strings = d.strings.data
    listing.strings_len = d.strings.len
    d.recs = NULL
    d.strings.data = NULL
    return listing


def list_directory(int dir_fd, bytes dir_path, *, skip=None, excluder=None):
    """The listing of the directory open at ``dir_fd``; see ``mirror.scan_py.list_directory``."""
    cdef dirscan_t d
    cdef scratch_t w
    cdef const char *skip_p = NULL
    cdef size_t skip_len = 0
    cdef int rc
    memset(&d, 0, sizeof(d))
    memset(&w, 0, sizeof(w))
    if skip is not None:
        skip_p = <bytes>skip
        skip_len = len(skip)
    try:
        with nogil:
            rc = read_directory(dir_fd, skip_p, skip_len, &d, &w)
        if rc < 0:
            raise MemoryError()
        return build_listing(dir_path, &d, excluder)
    finally:
        dirscan_free(&d)
        scratch_free(&w)


def open_failure(bytes path, int err):
    """The problem recorded for a directory that could not be opened to be listed."""
    if err == ENOENT:
        what = "vanished during scan"
    elif err == ENOTDIR or err == ELOOP:  # replaced by a file or a symlink since it was listed
        what = "changed during scan"
    elif err == ENAMETOOLONG:  # the walk's own verdict (too_deep)
        what = "not listed: too deep to mirror (2,048 levels, or a path near 64 KiB)"
    else:
        what = "cannot open directory"
    return _Problem(path, err, f"{what}: {os.strerror(err)}")


# -- background_scan: the whole walk in threads that never take the interpreter lock ---------

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef unsigned long pthread_t
    int pthread_mutex_init(pthread_mutex_t *, const void *)
    int pthread_mutex_destroy(pthread_mutex_t *)
    int pthread_mutex_lock(pthread_mutex_t *)
    int pthread_mutex_unlock(pthread_mutex_t *)
    int pthread_cond_init(pthread_cond_t *, const void *)
    int pthread_cond_destroy(pthread_cond_t *)
    int pthread_cond_wait(pthread_cond_t *, pthread_mutex_t *)
    int pthread_cond_signal(pthread_cond_t *)
    int pthread_cond_broadcast(pthread_cond_t *)
    int pthread_create(pthread_t *, const void *, void *(*)(void *) noexcept nogil, void *)
    int pthread_join(pthread_t, void **)
    int pthread_setname_np(pthread_t, const char *)
    pthread_t pthread_self()

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int sigfillset(sigset_t *)
    int pthread_sigmask(int, const sigset_t *, sigset_t *)
    enum:
        SIG_SETMASK

cdef extern from "<limits.h>" nogil:
    enum:
        PATH_MAX

cdef extern from "<sys/resource.h>" nogil:
    cdef struct rusage:
        long ru_inblock
    int RUSAGE_THREAD
    int getrusage(int, rusage *)

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <string.h>
    #include <sys/syscall.h>
    #if defined(SYS_openat2) && defined(__has_include)
    #if __has_include(<linux/openat2.h>)
    #include <linux/openat2.h>
    #define MIRROR_HAVE_OPENAT2 1
    #endif
    #endif
    /* The directory at relative path `path` below `dirfd`, no component a symlink. */
    static int mirror_openat2_below(int dirfd, const char *path) {
    #ifdef MIRROR_HAVE_OPENAT2
        struct open_how how;
        memset(&how, 0, sizeof how);
        how.flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
        how.resolve = RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH;
        return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    #else
        errno = ENOSYS;
        return -1;
    #endif
    }
    """
    int mirror_openat2_below(int dirfd, const char *path) nogil

cdef enum:
    # Entries the walk may list ahead of its consumer (~5 MiB of records); a directory
    # larger than that is still handed over, alone.
    AHEAD_ENTRIES = 65536
    # A waiting consumer is woken once this many entries (directories count one) are ready,
    # not for each directory: a wake-up per directory costs two futex calls and two context
    # switches, a quarter of the walk's own time on a tree of small directories.
    WAKE_ENTRIES = 2048
    MAX_WALKERS = 64
    # Threads listing directories for one walk.  With a warm cache a tree's walk is bound
    # by its system calls and two walks (source and replica) already fill two CPUs: one
    # walker each, extra ones only cost memory (an arena and a stack each).  With a cold
    # cache each listing waits on the disk, which serves several requests at once (two
    # 52,000-entry trees here: 1.14 s with one walker each, 0.59 s with eight).  So a walk
    # starts with one walker and adds one, up to this many, each time a listing had to read
    # from the disk.
    DEFAULT_MAX_WALKERS = 8

cdef enum:
    N_WAITING = 0     # known (its parent was listed), not yet taken by a walker
    N_LISTING = 1
    N_LISTED = 2

cdef struct wnode_t:
    # One directory of the walk, in canonical order: a node's subdirectories are linked in
    # right after it when it is listed, so the list is always the depth-first order of
    # what is known.
    wnode_t *next
    char *path           # relative to the root, NUL-terminated ("" for the root)
    size_t path_len
    int state
    int open_err         # it could not be opened (the listing is incomplete); d is empty
    dirscan_t d

cdef struct walk_t:
    pthread_mutex_t lock
    pthread_cond_t work          # walkers wait here: for a directory to list, or for room
    pthread_cond_t ready         # the consumer waits here
    wnode_t *head                # the first node the consumer has not taken
    wnode_t *pick                # the first node no walker took (all before it were)
    Py_ssize_t queued            # entries (+1 per directory) taken by walkers, not by the consumer
    int listing                  # nodes being listed
    int waiting_for_work         # walkers waiting for a node or for room
    bint consumer_waiting
    bint stopping
    int error                    # ENOMEM: the walk stopped early
    int root_fd
    char *skip                   # the root's entry to leave out, or NULL
    size_t skip_len
    bint no_openat2              # openat2 is refused here: open one component at a time
    pthread_t threads[MAX_WALKERS]
    int nthreads                 # walkers started
    int max_threads


cdef int canonical_cmp(const char *a, size_t alen, const char *b, size_t blen) noexcept nogil:
    """Compare two relative paths in canonical (depth-first, name-sorted) order: '/' sorts
    before every byte a name can hold."""
    cdef size_t i, n = alen if alen < blen else blen
    cdef unsigned char x, y
    for i in range(n):
        x = <unsigned char>a[i]
        y = <unsigned char>b[i]
        if x != y:
            if x == b'/':
                return -1
            if y == b'/':
                return 1
            return -1 if x < y else 1
    return (alen > blen) - (alen < blen)


cdef int open_below(walk_t *w, const char *path) noexcept nogil:
    """The directory at ``path`` (relative, non-empty) below the root, never through a
    symlink: its descriptor, or -errno."""
    cdef int fd, next_fd, err
    cdef const char *start
    cdef const char *slash
    cdef char part[MAX_NAME + 1]
    cdef size_t n
    # A path the kernel would refuse whole (PATH_MAX) is opened one component at a time.
    if not w.no_openat2 and strlen(path) < PATH_MAX:
        fd = mirror_openat2_below(w.root_fd, path)
        if fd >= 0:
            return fd
        err = errno
        if err != ENOSYS and err != EPERM and err != E2BIG:
            return -err
        w.no_openat2 = True  # an old kernel or a filter; harmless if two walkers both see it
    fd = w.root_fd
    start = path
    while True:
        slash = strchr(start, b'/')
        n = <size_t>(slash - start) if slash != NULL else strlen(start)
        if n > MAX_NAME:
            n = MAX_NAME
        memcpy(part, start, n)
        part[n] = 0
        next_fd = openat(fd, part, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        err = errno
        if fd != w.root_fd:
            close(fd)
        if next_fd < 0:
            return -err
        fd = next_fd
        if slash == NULL:
            return fd
        start = slash + 1


cdef wnode_t *new_node(const char *parent, size_t parent_len, const char *name, size_t name_len) noexcept nogil:
    cdef wnode_t *node = <wnode_t *>calloc(1, sizeof(wnode_t))
    cdef size_t at = 0
    if node == NULL:
        return NULL
    node.path = <char *>malloc(parent_len + name_len + 2)
    if node.path == NULL:
        free(node)
        return NULL
    if parent_len:
        memcpy(node.path, parent, parent_len)
        node.path[parent_len] = b'/'
        at = parent_len + 1
    memcpy(node.path + at, name, name_len)
    node.path_len = at + name_len
    node.path[node.path_len] = 0
    return node


cdef bint too_deep(const char *path, size_t path_len) noexcept nogil:
    """``mirror.entry.too_deep``: a directory the walk leaves unlisted (a name in it could
    pass the path length or depth a receiver takes)."""
    cdef size_t i, slashes = 0
    if path_len > LISTED_PATH_MAX:
        return True
    if path_len < 2 * LISTED_DEPTH_MAX - 1:  # too short to hold that many slashes
        return False
    for i in range(path_len):
        slashes += path[i] == b'/'
    return slashes >= LISTED_DEPTH_MAX


cdef void free_node(wnode_t *node) noexcept nogil:
    dirscan_free(&node.d)
    free(node.path)
    free(node)


cdef int list_node(walk_t *w, wnode_t *node, scratch_t *scratch, wnode_t **first, wnode_t **last) noexcept nogil:
    """List ``node`` and make nodes of its subdirectories (``first``..``last``, linked, in
    order); 0, or -1 out of memory."""
    cdef int fd, rc
    cdef Py_ssize_t i
    cdef rec_t *r
    cdef wnode_t *child
    first[0] = last[0] = NULL
    if node.path_len == 0:
        # The root: listed through the walk's own descriptor (only *at() calls use it after,
        # so the offset getdents64 leaves does not matter).
        rc = read_directory(w.root_fd, w.skip, w.skip_len, &node.d, scratch)
    elif too_deep(node.path, node.path_len):
        node.open_err = ENAMETOOLONG
        return 0
    else:
        fd = open_below(w, node.path)
        if fd < 0:
            node.open_err = -fd
            return 0
        rc = read_directory(fd, NULL, 0, &node.d, scratch)
        close(fd)
    if rc < 0:
        return -1
    for i in range(node.d.n):
        r = &node.d.recs[i]
        if r.kind != DIR:
            continue
        child = new_node(node.path, node.path_len, node.d.strings.data + r.name_off, r.name_len)
        if child == NULL:
            while first[0] != NULL:
                child = first[0].next
                free_node(first[0])
                first[0] = child
            return -1
        if last[0] == NULL:
            first[0] = child
        else:
            last[0].next = child
        last[0] = child
    return 0


cdef inline bint consumer_may_go(walk_t *w) noexcept nogil:
    """What a waiting consumer waits for: the next directory, with more behind it."""
    if w.head == NULL or w.stopping or w.error:
        return True
    if w.head.state != N_LISTED:
        return False
    return w.queued >= WAKE_ENTRIES or (w.pick == NULL and w.listing == 0)


cdef int start_walker(walk_t *w) noexcept nogil:
    """Start one more walker (the caller holds the lock, or no walker runs yet).  It starts
    with every signal blocked: signals are for the program's own threads (Python runs its
    handlers in the main one), and a walker's system calls are not to be interrupted."""
    cdef sigset_t all_signals, before
    cdef int rc
    if w.nthreads >= w.max_threads or w.stopping:
        return -1
    sigfillset(&all_signals)
    pthread_sigmask(SIG_SETMASK, &all_signals, &before)
    rc = pthread_create(&w.threads[w.nthreads], NULL, walker, w)
    pthread_sigmask(SIG_SETMASK, &before, NULL)
    if rc != 0:
        w.max_threads = w.nthreads  # the system says no: do with what runs
        return -1
    w.nthreads += 1
    return 0


cdef long blocks_read() noexcept nogil:
    """Blocks this thread read from the disk so far (0 without I/O accounting)."""
    cdef rusage usage
    if getrusage(RUSAGE_THREAD, &usage) != 0:
        return 0
    return usage.ru_inblock


cdef void *walker(void *arg) noexcept nogil:
    """One walker thread: take the first directory nobody took, list it, link its
    subdirectories in after it; until every directory is listed or the walk stops."""
    cdef walk_t *w = <walk_t *>arg
    cdef scratch_t scratch
    cdef wnode_t *node
    cdef wnode_t *first
    cdef wnode_t *last
    cdef wnode_t *after
    cdef int rc
    cdef long read_before = 0
    cdef bint waited_on_disk
    memset(&scratch, 0, sizeof(scratch))
    pthread_setname_np(pthread_self(), "treescan")
    pthread_mutex_lock(&w.lock)
    while not w.stopping:
        node = w.pick
        if node == NULL:
            if w.listing == 0:
                break  # nothing is being listed, so nothing more will be found
            w.waiting_for_work += 1
            pthread_cond_wait(&w.work, &w.lock)
            w.waiting_for_work -= 1
            continue
        if node != w.head and w.queued >= AHEAD_ENTRIES:
            # No room: what is ready must go first (the directory the consumer waits for is
            # always taken, however much is queued).
            if w.consumer_waiting:
                pthread_cond_signal(&w.ready)
            w.waiting_for_work += 1
            pthread_cond_wait(&w.work, &w.lock)
            w.waiting_for_work -= 1
            continue
        node.state = N_LISTING
        w.listing += 1
        w.queued += 1
        after = node.next
        while after != NULL and after.state != N_WAITING:
            after = after.next
        w.pick = after
        waited_on_disk = False
        pthread_mutex_unlock(&w.lock)

        if w.nthreads < w.max_threads:
            read_before = blocks_read()
        rc = list_node(w, node, &scratch, &first, &last)
        if w.nthreads < w.max_threads:
            waited_on_disk = blocks_read() != read_before

        pthread_mutex_lock(&w.lock)
        w.listing -= 1
        if rc < 0:
            w.error = ENOMEM
            w.stopping = True
            break
        if first != NULL:
            last.next = node.next
            node.next = first
            # The children come before every node not taken yet, unless a node taken
            # earlier (hence before this one) left some of its own children waiting.
            if w.pick == NULL or canonical_cmp(first.path, first.path_len, w.pick.path, w.pick.path_len) < 0:
                w.pick = first
            if w.waiting_for_work:
                pthread_cond_broadcast(&w.work)
        node.state = N_LISTED
        w.queued += node.d.n
        if waited_on_disk and w.pick != NULL and not w.waiting_for_work:
            start_walker(w)
        if w.pick == NULL and w.listing == 0 and w.waiting_for_work:
            pthread_cond_broadcast(&w.work)  # the walk is over: let the others leave
        if w.consumer_waiting and consumer_may_go(w):
            pthread_cond_signal(&w.ready)
    if w.consumer_waiting:
        pthread_cond_signal(&w.ready)
    if w.stopping:
        pthread_cond_broadcast(&w.work)
    pthread_mutex_unlock(&w.lock)
    scratch_free(&scratch)
    return NULL


cdef class BackgroundScan:
    """``mirror.scan.scan(root, skip_at_root=...)``'s listings, produced ahead by threads.

    The walk (open, list, stat) runs entirely in C, in ``threads`` threads that never take
    the interpreter lock, so it keeps going while the consumer's thread runs Python (a
    start-up's imports, the comparison, the writes), and the walkers wait on the disk
    together when the cache is cold.  Each walker takes the first directory in canonical
    order that nobody took, opens it from the root (``openat2`` with
    ``RESOLVE_NO_SYMLINKS``, else one ``O_NOFOLLOW`` component at a time), lists it and links
    its subdirectories in after it; the consumer takes the directories in that order, so the
    listings come out exactly as ``scan``'s.  At most ``AHEAD_ENTRIES`` entries wait in
    between, and a walker holds one directory descriptor at a time (the walk one more, the
    root's).  ``close()`` stops the walk and joins its threads; iterate once.
    """
    cdef readonly bytes root
    cdef walk_t w
    cdef int root_err

    def __cinit__(self):
        memset(&self.w, 0, sizeof(walk_t))
        self.w.root_fd = -1
        pthread_mutex_init(&self.w.lock, NULL)
        pthread_cond_init(&self.w.work, NULL)
        pthread_cond_init(&self.w.ready, NULL)

    def __init__(self, bytes root, *, skip_at_root=None, int walkers=1, int max_walkers=DEFAULT_MAX_WALKERS,
                 bint _no_openat2=False):
        cdef const char *croot = root
        cdef wnode_t *node
        cdef int fd, err = 0
        self.root = root
        if not 1 <= walkers <= max_walkers <= MAX_WALKERS:
            raise ValueError(f"a walk takes 1 to {MAX_WALKERS} walkers, not {walkers} growing to {max_walkers}")
        if skip_at_root is not None:
            self.w.skip = <char *>malloc(len(skip_at_root) + 1)
            if self.w.skip == NULL:
                raise MemoryError()
            memcpy(self.w.skip, <const char *><bytes>skip_at_root, len(skip_at_root))
            self.w.skip_len = len(skip_at_root)
        with nogil:
            fd = openat(AT_FDCWD, croot, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if fd < 0:
                err = errno
        if fd < 0:
            self.root_err = err  # raised by the first next(), as a walk ending at once
            return
        self.w.root_fd = fd
        node = new_node(NULL, 0, NULL, 0)
        if node == NULL:
            raise MemoryError()
        self.w.head = self.w.pick = node
        self.w.max_threads = max_walkers
        self.w.no_openat2 = _no_openat2  # tests: the way kernels without openat2 are walked
        with nogil:
            pthread_mutex_lock(&self.w.lock)
            while self.w.nthreads < walkers and start_walker(&self.w) == 0:
                pass
            pthread_mutex_unlock(&self.w.lock)
        if self.w.nthreads == 0:
            raise OSError(EAGAIN, "cannot start a thread to walk " + os.fsdecode(root))

    def __dealloc__(self):
        self._stop()
        self._drop_queued()
        if self.w.root_fd >= 0:
            close(self.w.root_fd)
        free(self.w.skip)
        pthread_cond_destroy(&self.w.ready)
        pthread_cond_destroy(&self.w.work)
        pthread_mutex_destroy(&self.w.lock)

    def __iter__(self):
        return self

    def __next__(self):
        cdef wnode_t *node = self._take()
        if node == NULL:
            raise StopIteration
        return listing_of(node)

    cdef wnode_t *_take(self) except? NULL:
        """The next directory, now the caller's (NULL at the end of the walk)."""
        cdef wnode_t *node = NULL
        cdef int error = 0
        with nogil:
            pthread_mutex_lock(&self.w.lock)
            # The next directory, if it is listed, goes at once; else this thread sleeps
            # until a batch is ready behind it, not just that one.
            if self.w.head != NULL and self.w.head.state != N_LISTED:
                while not consumer_may_go(&self.w):
                    if self.w.head.state == N_WAITING and self.w.waiting_for_work:
                        # Walkers that stopped for room (directories listed further on fill
                        # it) must take this one: it is what everything waits for.
                        pthread_cond_broadcast(&self.w.work)
                    self.w.consumer_waiting = True
                    pthread_cond_wait(&self.w.ready, &self.w.lock)
                self.w.consumer_waiting = False
            node = self.w.head
            if self.w.stopping or node == NULL or node.state != N_LISTED:
                node = NULL
                error = self.w.error
                self.w.error = 0
            else:
                self.w.head = node.next
                self.w.queued -= node.d.n + 1
                if self.w.waiting_for_work and (self.w.queued <= AHEAD_ENTRIES // 2 or (
                        self.w.head != NULL and self.w.head.state == N_WAITING)):
                    pthread_cond_broadcast(&self.w.work)
            pthread_mutex_unlock(&self.w.lock)
        if node == NULL:
            if error:
                raise MemoryError()
            if self.root_err:
                err, self.root_err = self.root_err, 0
                raise OSError(err, os.strerror(err), self.root)
        return node

    cdef void _stop(self) noexcept:
        cdef int i, n
        with nogil:
            pthread_mutex_lock(&self.w.lock)
            self.w.stopping = True  # no walker is started after this
            n = self.w.nthreads
            pthread_cond_broadcast(&self.w.work)
            pthread_cond_broadcast(&self.w.ready)
            pthread_mutex_unlock(&self.w.lock)
            for i in range(n):
                pthread_join(self.w.threads[i], NULL)
            self.w.nthreads = 0

    @property
    def walkers(self):
        """Walker threads started so far."""
        return self.w.nthreads

    def close(self):
        """Stop the walk and join its threads; what it listed and nobody took is freed.  A
        consumer waiting in another thread gets the end."""
        self._stop()
        self._drop_queued()
        if self.w.root_fd >= 0:
            close(self.w.root_fd)
            self.w.root_fd = -1

    cdef void _drop_queued(self) noexcept:
        cdef wnode_t *node
        cdef wnode_t *after
        with nogil:  # a consumer in another thread may be looking at the list
            pthread_mutex_lock(&self.w.lock)
            node = self.w.head
            self.w.head = self.w.pick = NULL
            self.w.queued = 0
            pthread_mutex_unlock(&self.w.lock)
        while node != NULL:
            after = node.next
            free_node(node)
            node = after


cdef Listing listing_of(wnode_t *node):
    """The Listing of a node taken from a walk; the node is freed."""
    cdef Listing listing
    try:
        path = PyBytes_FromStringAndSize(node.path, node.path_len)
        if node.open_err:
            listing = Listing.__new__(Listing)
            listing.path = path
            listing.complete = False
            listing.problems = [open_failure(path, node.open_err)]
            return listing
        return build_listing(path, &node.d, None)
    finally:
        free_node(node)


cdef bint same_directory(wnode_t *a, wnode_t *b, int flags) noexcept nogil:
    """Both listed whole, without a problem, and ``compare_listings`` would find nothing to
    say (no change bits, no multiply-linked file: its hard-link group is followed in Python)."""
    cdef Py_ssize_t i
    cdef rec_t *x
    cdef rec_t *y
    if (a.open_err or b.open_err or a.d.dir_err or b.d.dir_err or a.d.nproblems or b.d.nproblems
            or a.d.n != b.d.n):
        return False
    for i in range(a.d.n):
        x = &a.d.recs[i]
        y = &b.d.recs[i]
        if (x.name_len != y.name_len
                or memcmp(a.d.strings.data + x.name_off, b.d.strings.data + y.name_off, x.name_len) != 0
                or compare_records(x, a.d.strings.data, NULL, y, b.d.strings.data, NULL, flags) != 0):
            return False
    return True


cdef void add_totals(long long *totals, wnode_t *node) noexcept nogil:
    """Count a node into ``totals``: [directories, entries of kind 1..7, bytes in files]."""
    cdef Py_ssize_t i
    totals[0] += 1
    for i in range(node.d.n):
        totals[node.d.recs[i].kind] += 1
        if node.d.recs[i].kind == FILE:
            totals[8] += node.d.recs[i].size


cdef class PairedWalks:
    """Two background walks' listings aligned by directory, as ``mirror.compare.align`` pairs
    them, less the pairs of identical directories; see ``mirror.scan_py.pair_walks``."""
    cdef BackgroundScan src
    cdef BackgroundScan dst
    cdef wnode_t *a
    cdef wnode_t *b
    cdef bint a_end
    cdef bint b_end
    cdef int flags
    cdef long long totals[2][9]

    def __cinit__(self):
        self.a = self.b = NULL
        memset(self.totals, 0, sizeof(self.totals))

    def __init__(self, BackgroundScan src, BackgroundScan dst, int flags):
        self.src = src
        self.dst = dst
        self.flags = flags

    def __dealloc__(self):
        if self.a != NULL:
            free_node(self.a)
        if self.b != NULL:
            free_node(self.b)

    def __iter__(self):
        return self

    def __next__(self):
        cdef wnode_t *a
        cdef wnode_t *b
        cdef int c
        while True:
            if self.a == NULL and not self.a_end:
                self.a = self.src._take()
                self.a_end = self.a == NULL
            if self.b == NULL and not self.b_end:
                self.b = self.dst._take()
                self.b_end = self.b == NULL
            a, b = self.a, self.b
            if a == NULL and b == NULL:
                raise StopIteration
            if b == NULL:
                c = -1
            elif a == NULL:
                c = 1
            else:
                c = canonical_cmp(a.path, a.path_len, b.path, b.path_len)
            if c < 0:
                self.a = NULL
                return listing_of(a), None
            if c > 0:
                self.b = NULL
                return None, listing_of(b)
            self.a = self.b = NULL
            if same_directory(a, b, self.flags):
                add_totals(self.totals[0], a)
                add_totals(self.totals[1], b)
                free_node(a)
                free_node(b)
                continue
            try:
                left = listing_of(a)
            finally:
                right = listing_of(b)
            return left, right

    def skipped(self, int side):
        """``(directories, [entries per kind, index = kind], bytes in files)`` of the
        directories of ``side`` (0: src, 1: dst) left out so far."""
        cdef long long *t = self.totals[side]
        return t[0], [0] + [t[k] for k in range(1, 8)], t[8]


def pair_walks(BackgroundScan src, BackgroundScan dst, int flags):
    """``src`` and ``dst``'s listings paired by directory, identical pairs left out; see the twin."""
    return PairedWalks(src, dst, flags)


def background_scan(bytes root, *, skip_at_root=None, int walkers=1, int max_walkers=DEFAULT_MAX_WALKERS,
                    bint _no_openat2=False):
    """Start scanning ``root`` now; see ``BackgroundScan`` and ``mirror.scan_py.background_scan``."""
    return BackgroundScan(root, skip_at_root=skip_at_root, walkers=walkers, max_walkers=max_walkers,
                          _no_openat2=_no_openat2)


cdef inline uint32_t compare_recs(Listing sl, Py_ssize_t i, Listing dl, Py_ssize_t j, int flags) noexcept nogil:
    return compare_records(&sl.recs[i], sl.strings, sl.digests + i * DIGEST_SIZE if sl.digests != NULL else NULL,
                           &dl.recs[j], dl.strings, dl.digests + j * DIGEST_SIZE if dl.digests != NULL else NULL,
                           flags)


cdef inline uint32_t compare_records(const rec_t *a, const char *a_strings, const unsigned char *a_digest,
                                     const rec_t *b, const char *b_strings, const unsigned char *b_digest,
                                     int flags) noexcept nogil:
    """``compare_listings``' change bits for one pair of records (digests may be NULL)."""
    cdef uint32_t bits = 0
    cdef int kind = a.kind
    if (a.kind == FILE and a.nlink > 1) or (b.kind == FILE and b.nlink > 1):
        bits |= CH_LINKED
    if a.kind != b.kind:
        return bits | CH_KIND
    if kind != SYMLINK and a.mode != b.mode:
        bits |= CH_MODE
    if flags & CMP_OWNER:
        if a.uid != b.uid:
            bits |= CH_UID
        if a.gid != b.gid:
            bits |= CH_GID
    if kind == FILE:
        if a.size != b.size:
            bits |= CH_SIZE
        if a.mtime_ns != b.mtime_ns:
            bits |= CH_MTIME
        if flags & CMP_CHECKSUM and a.size == b.size:
            if not (a.flags & FLAG_DIGEST) or not (b.flags & FLAG_DIGEST):
                bits |= CH_NODIGEST
            elif memcmp(a_digest, b_digest, DIGEST_SIZE) != 0:
                bits |= CH_DIGEST
    elif kind == DIR:
        if flags & CMP_DIR_TIMES and a.mtime_ns != b.mtime_ns:
            bits |= CH_MTIME
    elif kind == SYMLINK:
        if (a.target_len != b.target_len or memcmp(a_strings + a.target_off, b_strings + b.target_off,
                                                   a.target_len) != 0):
            bits |= CH_TARGET
        if flags & CMP_LINK_TIMES and a.mtime_ns != b.mtime_ns:
            bits |= CH_MTIME
    else:
        if (kind == CHAR or kind == BLOCK) and a.rdev != b.rdev:
            bits |= CH_RDEV
        if a.mtime_ns != b.mtime_ns:
            bits |= CH_MTIME
    return bits


def compare_listings(Listing src, Listing dst, int flags):
    """Merge two listings of one directory by name; see ``mirror.scan_py.compare_listings``."""
    cdef Py_ssize_t i = 0, j = 0, n = src.n, m = dst.n
    cdef int c
    cdef uint32_t bits
    cdef rec_t *a
    cdef rec_t *b
    out = []
    while i < n or j < m:
        if j >= m:
            c = -1
        elif i >= n:
            c = 1
        else:
            a = &src.recs[i]
            b = &dst.recs[j]
            c = name_cmp(src.strings + a.name_off, a.name_len, dst.strings + b.name_off, b.name_len)
        if c < 0:
            out.append((i, -1, 0))
            i += 1
        elif c > 0:
            out.append((-1, j, 0))
            j += 1
        else:
            bits = compare_recs(src, i, dst, j, flags)
            if bits:
                out.append((i, j, bits))
            i += 1
            j += 1
    return out
