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
from libc.errno cimport EINTR, ELOOP, ENOENT, ENOTDIR, EPERM, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from posix.stdlib cimport posix_memalign
from libc.string cimport memcmp, memcpy, memset, strlen
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
    Py_ssize_t index      # entry (sorted position) the problem belongs to; -1: the directory
    int err
    int what
    char *name            # points into the names buffer (valid while the buffer lives)
    uint16_t name_len


cdef struct buf_t:
    char *data
    size_t len
    size_t cap


cdef int buf_reserve(buf_t *b, size_t extra) except -1 nogil:
    cdef size_t cap
    cdef char *p
    if b.len + extra <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 4096
    while cap < b.len + extra:
        cap *= 2
    p = <char *>realloc(b.data, cap)
    if p == NULL:
        with gil:
            raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef int buf_append(buf_t *b, const char *src, size_t n) except -1 nogil:
    buf_reserve(b, n)
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
                buf_append(&strings, name, len(name))
                r.target_off = strings.len
                r.target_len = len(target)
                buf_append(&strings, target, len(target))
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
    int dir_err          # errno if the directory itself could not be read, else 0
    buf_t names          # raw names from readdir (problems point into it)
    name_t *order


cdef void dirscan_free(dirscan_t *d) noexcept nogil:
    free(d.recs)
    free(d.strings.data)
    free(d.problems)
    free(d.names.data)
    free(d.order)


cdef int add_problem(dirscan_t *d, Py_ssize_t index, int err, int what,
                     char *name, uint16_t name_len) except -1 nogil:
    cdef problem_t *p
    if d.nproblems == d.problems_cap:
        d.problems_cap = d.problems_cap * 2 if d.problems_cap else 8
        p = <problem_t *>realloc(d.problems, d.problems_cap * sizeof(problem_t))
        if p == NULL:
            with gil:
                raise MemoryError()
        d.problems = p
    d.problems[d.nproblems].index = index
    d.problems[d.nproblems].err = err
    d.problems[d.nproblems].what = what
    d.problems[d.nproblems].name = name
    d.problems[d.nproblems].name_len = name_len
    d.nproblems += 1
    return 0


cdef int read_directory(int fd, const char *skip, size_t skip_len, dirscan_t *d) except -1 nogil:
    """readdir + sort + fstatat + readlinkat into ``d``.  The caller owns ``fd``."""
    cdef size_t nlen, count = 0, i, cap = 0
    cdef name_t *order
    cdef struct_stat st
    cdef rec_t *r
    cdef int kind
    cdef ssize_t tlen
    cdef char cname[MAX_NAME + 1]
    cdef char target[MAX_TARGET + 1]
    cdef size_t offset

    # getdents64 straight into a buffer: no DIR stream to set up, no duplicate descriptor.
    # The descriptor's offset moves, which is harmless: it is only used for *at() calls after.
    cdef char dents[65536]
    cdef ssize_t got, pos
    cdef linux_dirent64 *ent
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
            if count == cap:
                cap = cap * 2 if cap else 64
                order = <name_t *>realloc(d.order, cap * sizeof(name_t))
                if order == NULL:
                    with gil:
                        raise MemoryError()
                d.order = order
            # Kept as (offset, length): the names buffer may move while it grows.
            d.order[count].off = d.names.len
            d.order[count].len = <uint16_t>nlen
            buf_append(&d.names, ent.d_name, nlen)
            count += 1
    for i in range(count):
        d.order[i].ptr = d.names.data + d.order[i].off
    qsort(d.order, count, sizeof(name_t), compare_names)

    d.recs = <rec_t *>malloc((count if count else 1) * sizeof(rec_t))
    if d.recs == NULL:
        with gil:
            raise MemoryError()
    for i in range(count):
        # d.names is NUL-free; make each name a C string for the *at() calls.
        memcpy(cname, d.order[i].ptr, d.order[i].len)
        cname[d.order[i].len] = 0
        if fstatat(fd, cname, &st, AT_SYMLINK_NOFOLLOW) != 0:
            add_problem(d, i, errno, P_VANISHED if errno == ENOENT else P_STAT, d.order[i].ptr, d.order[i].len)
            continue
        kind = kind_of_mode(st.st_mode)
        if kind == 0:
            continue
        r = &d.recs[d.n]
        r.flags = 0
        r.target_len = 0
        offset = d.strings.len
        r.name_off = offset
        r.name_len = d.order[i].len
        if kind == SYMLINK:
            tlen = readlinkat(fd, cname, target, MAX_TARGET + 1)
            if tlen < 0:
                add_problem(d, i, errno, P_VANISHED if errno == ENOENT else P_READLINK,
                            d.order[i].ptr, d.order[i].len)
                continue
            if tlen > MAX_TARGET:
                tlen = MAX_TARGET
            buf_append(&d.strings, d.order[i].ptr, d.order[i].len)
            r.target_off = d.strings.len
            r.target_len = <uint32_t>tlen
            buf_append(&d.strings, target, tlen)
        else:
            buf_append(&d.strings, d.order[i].ptr, d.order[i].len)
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
        # Problems recorded for this sorted position refer to the record index from now on.
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
        name = PyBytes_FromStringAndSize(p.name, p.name_len)
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
                buf_append(&strings, d.strings.data + r.name_off, r.name_len + r.target_len)
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
    cdef const char *skip_p = NULL
    cdef size_t skip_len = 0
    memset(&d, 0, sizeof(d))
    if skip is not None:
        skip_p = <bytes>skip
        skip_len = len(skip)
    try:
        with nogil:
            read_directory(dir_fd, skip_p, skip_len, &d)
        return build_listing(dir_path, &d, excluder)
    finally:
        dirscan_free(&d)


def open_failure(bytes path, int err):
    """The problem recorded for a directory that could not be opened to be listed."""
    if err == ENOENT:
        what = "vanished during scan"
    elif err == ENOTDIR or err == ELOOP:  # replaced by a file or a symlink since it was listed
        what = "changed during scan"
    else:
        what = "cannot open directory"
    return _Problem(path, err, f"{what}: {os.strerror(err)}")


# -- background_scan: the whole walk in a thread that never takes the interpreter lock -------

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *, const void *)
    int pthread_mutex_destroy(pthread_mutex_t *)
    int pthread_mutex_lock(pthread_mutex_t *)
    int pthread_mutex_unlock(pthread_mutex_t *)
    int pthread_cond_init(pthread_cond_t *, const void *)
    int pthread_cond_destroy(pthread_cond_t *)
    int pthread_cond_wait(pthread_cond_t *, pthread_mutex_t *)
    int pthread_cond_broadcast(pthread_cond_t *)

# Entries the walk may list ahead of its consumer (~5 MiB of records); a directory larger
# than that is still handed over, alone.
DEF AHEAD_ENTRIES = 65536
# A waiting consumer is woken once this many entries (directories count one) are ready, not
# for each directory: a wake-up per directory costs two futex calls and two context switches,
# a quarter of the walk's own time on a tree of small directories.
DEF WAKE_ENTRIES = 2048

cdef struct walked_t:
    # One directory, listed by the walk and not yet taken by the consumer.
    walked_t *next
    char *path
    size_t path_len
    int open_err        # it could not be opened (the listing is incomplete); d is empty
    dirscan_t d

cdef struct frame_t:
    # One open directory on the walk's current branch.
    int fd
    size_t path_len     # its path is walk.path[:path_len]
    char *subdirs       # its subdirectories' names, NUL-terminated, in sorted order
    size_t cursor       # offset of the next one to visit
    size_t end


cdef int collect_subdirs(dirscan_t *d, frame_t *f) except -1 nogil:
    cdef Py_ssize_t i
    cdef size_t total = 0
    cdef rec_t *r
    for i in range(d.n):
        if d.recs[i].kind == DIR:
            total += d.recs[i].name_len + 1
    f.cursor = 0
    f.end = total
    if total == 0:
        return 0
    f.subdirs = <char *>malloc(total)
    if f.subdirs == NULL:
        with gil:
            raise MemoryError()
    total = 0
    for i in range(d.n):
        r = &d.recs[i]
        if r.kind == DIR:
            memcpy(f.subdirs + total, d.strings.data + r.name_off, r.name_len)
            total += r.name_len
            f.subdirs[total] = 0
            total += 1
    return 0


cdef class BackgroundScan:
    """``scan(root, skip_at_root=...)``'s listings, produced ahead by a thread of its own.

    The walk (open, list, stat, descend) runs entirely in C and never takes the interpreter
    lock, so it keeps going while the consumer's thread runs Python (a start-up's imports,
    the comparison, the writes).  Listings are built when taken.  At most
    ``AHEAD_ENTRIES`` entries wait in between; one file descriptor is held per level of
    the current branch, as ``scan`` does.  ``close()`` stops the walk; iterate once.
    """
    cdef readonly bytes root
    cdef object skip
    cdef pthread_mutex_t lock
    cdef pthread_cond_t changed     # the queue or the stop flag changed
    cdef walked_t *head
    cdef walked_t *tail
    cdef Py_ssize_t queued          # entries (plus one per directory) waiting
    cdef bint stopping
    cdef bint finished
    cdef bint taker_waiting         # the consumer waits for WAKE_ENTRIES (or the end)
    cdef bint walker_waiting        # the walk waits for room
    cdef int root_err
    cdef object error               # what ended the walk early (MemoryError), raised in order
    cdef object thread
    # The walk's own state, touched only by its thread.
    cdef frame_t *frames
    cdef Py_ssize_t depth
    cdef Py_ssize_t frames_cap
    cdef buf_t path

    def __cinit__(self):
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.changed, NULL)

    def __init__(self, bytes root, *, skip_at_root=None):
        import threading

        self.root = root
        self.skip = skip_at_root
        self.thread = threading.Thread(target=self._run, name="treescan", daemon=True)
        self.thread.start()

    def __dealloc__(self):
        self._drop_queued()
        free(self.frames)
        free(self.path.data)
        pthread_cond_destroy(&self.changed)
        pthread_mutex_destroy(&self.lock)

    def __iter__(self):
        return self

    def __next__(self):
        cdef walked_t *node
        cdef Listing listing
        with nogil:
            pthread_mutex_lock(&self.lock)
            while self.head == NULL and not self.finished:
                self.taker_waiting = True
                pthread_cond_wait(&self.changed, &self.lock)
            self.taker_waiting = False
            node = self.head
            if node != NULL:
                self.head = node.next
                if self.head == NULL:
                    self.tail = NULL
                self.queued -= node.d.n + 1
                if self.walker_waiting and self.queued <= AHEAD_ENTRIES // 2:
                    pthread_cond_broadcast(&self.changed)
            pthread_mutex_unlock(&self.lock)
        if node == NULL:
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            if self.root_err:
                err, self.root_err = self.root_err, 0
                raise OSError(err, os.strerror(err), self.root)
            raise StopIteration
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
            dirscan_free(&node.d)
            free(node.path)
            free(node)

    def close(self):
        """Stop the walk and wait for its thread; what it listed and nobody took is freed."""
        with nogil:
            pthread_mutex_lock(&self.lock)
            self.stopping = True
            pthread_cond_broadcast(&self.changed)
            pthread_mutex_unlock(&self.lock)
        if self.thread is not None:
            self.thread.join()
        self._drop_queued()

    cdef void _drop_queued(self) noexcept:
        cdef walked_t *node
        cdef walked_t *after
        with nogil:  # a consumer in another thread may be taking one at this moment
            pthread_mutex_lock(&self.lock)
            node = self.head
            self.head = self.tail = NULL
            self.queued = 0
            pthread_mutex_unlock(&self.lock)
        while node != NULL:
            after = node.next
            dirscan_free(&node.d)
            free(node.path)
            free(node)
            node = after

    def _run(self):
        cdef const char *croot = self.root
        cdef const char *skip_p = NULL
        cdef size_t skip_len = 0
        if self.skip is not None:
            skip_p = <bytes>self.skip
            skip_len = len(self.skip)
        try:
            with nogil:
                self._walk(croot, skip_p, skip_len)
        except BaseException as exc:  # MemoryError: handed to the consumer, after what was listed
            self.error = exc
        finally:
            with nogil:
                while self.depth > 0:
                    self._pop()
                pthread_mutex_lock(&self.lock)
                self.finished = True
                pthread_cond_broadcast(&self.changed)
                pthread_mutex_unlock(&self.lock)

    cdef int _walk(self, const char *croot, const char *skip_p, size_t skip_len) except -1 nogil:
        cdef int fd, err
        cdef frame_t *top
        cdef walked_t *node
        cdef char *name
        cdef size_t name_len
        fd = openat(AT_FDCWD, croot, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0:
            self.root_err = errno
            return 0
        if self._visit(fd, skip_p, skip_len) < 0:
            return -1
        while self.depth > 0 and not self._stop_requested():
            top = &self.frames[self.depth - 1]
            if top.cursor >= top.end:
                self._pop()
                continue
            name = top.subdirs + top.cursor
            name_len = strlen(name)
            top.cursor += name_len + 1
            self.path.len = top.path_len
            if top.path_len:
                buf_append(&self.path, "/", 1)
            buf_append(&self.path, name, name_len)
            fd = openat(top.fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if fd < 0:
                err = errno
                node = self._new_node(err)
                if node == NULL:
                    with gil:
                        raise MemoryError()
                self._hand_over(node)
                continue
            if self._visit(fd, NULL, 0) < 0:
                return -1
        return 0

    cdef bint _stop_requested(self) noexcept nogil:
        cdef bint stop
        pthread_mutex_lock(&self.lock)
        stop = self.stopping
        pthread_mutex_unlock(&self.lock)
        return stop

    cdef int _visit(self, int fd, const char *skip, size_t skip_len) except -1 nogil:
        """List the directory open at ``fd`` (its path in self.path), hand the listing over,
        and push it as the new top of the branch (the frame owns ``fd`` from here)."""
        cdef frame_t *f
        cdef walked_t *node
        if self.depth == self.frames_cap:
            f = <frame_t *>realloc(self.frames, (self.frames_cap * 2 + 16) * sizeof(frame_t))
            if f == NULL:
                close(fd)
                with gil:
                    raise MemoryError()
            self.frames = f
            self.frames_cap = self.frames_cap * 2 + 16
        f = &self.frames[self.depth]
        f.fd = fd
        f.path_len = self.path.len
        f.subdirs = NULL
        f.cursor = f.end = 0
        self.depth += 1
        node = self._new_node(0)
        if node == NULL:
            with gil:
                raise MemoryError()
        if read_directory(fd, skip, skip_len, &node.d) < 0 or collect_subdirs(&node.d, f) < 0:
            dirscan_free(&node.d)
            free(node.path)
            free(node)
            return -1
        self._hand_over(node)
        return 0

    cdef walked_t *_new_node(self, int open_err) noexcept nogil:
        cdef walked_t *node = <walked_t *>calloc(1, sizeof(walked_t))
        if node == NULL:
            return NULL
        node.path = <char *>malloc(self.path.len + 1)
        if node.path == NULL:
            free(node)
            return NULL
        memcpy(node.path, self.path.data, self.path.len)
        node.path_len = self.path.len
        node.open_err = open_err
        return node

    cdef void _pop(self) noexcept nogil:
        cdef frame_t *f = &self.frames[self.depth - 1]
        close(f.fd)
        free(f.subdirs)
        self.depth -= 1

    cdef void _hand_over(self, walked_t *node) noexcept nogil:
        """Queue ``node`` for the consumer, waiting while too much is queued (or drop it if
        the walk was stopped meanwhile)."""
        if node == NULL:
            return
        pthread_mutex_lock(&self.lock)
        while (not self.stopping and self.queued > 0
               and self.queued + node.d.n + 1 > AHEAD_ENTRIES):
            self.walker_waiting = True
            if self.taker_waiting:  # it waits for more than is queued: what is there must go
                pthread_cond_broadcast(&self.changed)
            pthread_cond_wait(&self.changed, &self.lock)
        self.walker_waiting = False
        if self.stopping:
            pthread_mutex_unlock(&self.lock)
            dirscan_free(&node.d)
            free(node.path)
            free(node)
            return
        if self.tail == NULL:
            self.head = node
        else:
            self.tail.next = node
        self.tail = node
        self.queued += node.d.n + 1
        if self.taker_waiting and self.queued >= WAKE_ENTRIES:
            pthread_cond_broadcast(&self.changed)
        pthread_mutex_unlock(&self.lock)


def background_scan(bytes root, *, skip_at_root=None):
    """Start scanning ``root`` now; see ``BackgroundScan`` and ``mirror.scan_py.background_scan``."""
    return BackgroundScan(root, skip_at_root=skip_at_root)


cdef inline uint32_t compare_recs(Listing sl, Py_ssize_t i, Listing dl, Py_ssize_t j, int flags) noexcept nogil:
    cdef rec_t *a = &sl.recs[i]
    cdef rec_t *b = &dl.recs[j]
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
            elif memcmp(sl.digests + i * DIGEST_SIZE, dl.digests + j * DIGEST_SIZE, DIGEST_SIZE) != 0:
                bits |= CH_DIGEST
    elif kind == DIR:
        if flags & CMP_DIR_TIMES and a.mtime_ns != b.mtime_ns:
            bits |= CH_MTIME
    elif kind == SYMLINK:
        if (a.target_len != b.target_len or memcmp(sl.strings + a.target_off, dl.strings + b.target_off,
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
