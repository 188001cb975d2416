"""A local sync's copy: a source file rewritten while it is copied is never committed as if
whole, and the replica's mirroring lock stops a long copy within a second."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest

from mirror.errors import LockedError
from mirror.lockfile import acquire
from mirror.transfer import sync
from tests.helpers import PollingThread, changing, data_runs, sparse_file, wait_until
from tests.servers import SECRET, mirror_server

SIZE = 8 << 20
# One page per write: a writer preempted inside one write() has set the file's ctime already
# and its data is half there, which no stat can tell (docs/ARCHITECTURE.md).
CHUNK = 4 << 10
TRIALS = int(os.environ.get("HAMIRROR_TRIALS", "12"))


def _uniform(data: bytes) -> bool:
    return data == data[:1] * len(data)


def _a_state_the_source_had(data: bytes) -> bool:
    """The writer rewrites front to back, a chunk at a time: the source only ever holds one
    version, or the next version up to a chunk boundary and the previous one after it.  A
    copy that raced the writer holds anything else (e.g. an older front than its back)."""
    front, back = data[0], data[-1]
    if front == back:
        return _uniform(data)
    boundary = data.index(bytes([back]))
    return (front == back % 255 + 1 and boundary % CHUNK == 0
            and data == bytes([front]) * boundary + bytes([back]) * (len(data) - boundary))  # fmt: skip


def _syncs_caught_changing(src, dst, name: bytes, **options) -> int:
    """Sync ``TRIALS`` times; in how many the copy of ``name`` was caught changing (copied
    here, sent to a server)."""
    refused = 0
    for _ in range(TRIALS):
        result = sync(src, dst, fsync=False, **options)
        refused += any("changed while it was being" in reason for path, reason in result.failed if path == name)
    return refused


def test_a_file_rewritten_while_copied_is_never_committed_torn(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    big = src / "big"
    big.write_bytes(b"\0" * SIZE)
    assert sync(src, dst).ok
    torn: list[bytes] = []

    def rewrite(n: int) -> None:
        # Each version is one byte value throughout, written over the old one in place, a
        # chunk at a time: a copy that catches it halfway holds two values.
        chunk = bytes([n % 255 + 1]) * CHUNK
        with open(big, "r+b") as f:
            for i in range(SIZE // CHUNK):
                f.write(chunk)
                f.flush()
                if i % 64 == 0:
                    time.sleep(0.0005)

    def read_replica():
        try:
            data = (dst / "big").read_bytes()
        except FileNotFoundError:
            return False
        if not _a_state_the_source_had(data):
            torn.append((data[:4], data[-4:]))

    with changing(rewrite), PollingThread(read_replica, interval=0.01, name="replica-reader"):
        refused = _syncs_caught_changing(src, dst, b"big")
    assert not torn, f"a torn copy was committed: {torn[:3]}"
    assert _a_state_the_source_had((dst / "big").read_bytes())
    # The check under test ran: copies were caught changing (and some went through whole).
    assert refused > 0, "no copy was caught changing: the fault did not reach the check"


@pytest.mark.parametrize("when", ["copying", "queued"])
def test_the_replica_lock_stops_a_local_copy_within_a_second(tmp_path, when):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(32 << 20))
    dst.mkdir()
    lock = tmp_path / "replica.lock"
    outcome: list = []

    # Copying: paced at 8 MB/s (4 s a file), so that the lock surely comes in the middle of a
    # file's copy, which must notice it, not after the batch was committed or between files.
    bwlimit = 8 << 20 if when == "copying" else None

    def run():
        try:
            outcome.append(sync(src, dst, dst_lock_file=lock, on_progress=progress, bwlimit=bwlimit))
        except LockedError as exc:
            outcome.append(exc)

    copied = threading.Event()

    def progress(_size):
        copied.set()
        if when == "queued":
            time.sleep(0.3)  # the lock comes while files wait for their batch's commit

    thread = threading.Thread(target=run)
    thread.start()
    if when == "copying":
        wait_until(lambda: os.path.isdir(dst / ".mirror" / "tmp") and os.listdir(dst / ".mirror" / "tmp"))
    else:
        assert copied.wait(30)
    acquire(os.fsencode(lock), reason="takeover")
    locked_at = time.monotonic()
    thread.join(timeout=30)
    stopped = time.monotonic() - locked_at
    assert outcome and isinstance(outcome[0], LockedError), outcome
    assert stopped <= 1.0, f"the copy went on for {stopped:.2f} s under the lock"
    assert sorted(os.listdir(dst)) == [".mirror"]  # nothing was committed under the lock
    assert os.listdir(dst / ".mirror" / "tmp") == []


def test_files_opened_ahead_of_their_copy_are_let_go_when_the_lock_ends_the_sync(tmp_path):
    # A local sync opens the next files before their turn (read-ahead): a sync the mirroring
    # lock stops half-way must close them, not leave them open with the error.
    src, dst, lock = tmp_path / "src", tmp_path / "dst", tmp_path / "lock"
    src.mkdir()
    for i in range(300):
        (src / f"f{i:03d}").write_bytes(b"%d" % i * 100)
    seen = []

    def take_lock_half_way(change):
        seen.append(change)
        if len(seen) == 150:
            acquire(os.fsencode(lock), reason="takeover")

    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(LockedError) as stopped:
        sync(src, dst, dst_lock_file=lock, on_change=take_lock_half_way)
    left = [os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - before
            if os.path.exists(f"/proc/self/fd/{fd}")]  # fmt: skip
    assert not [p for p in left if p.startswith(str(src))], left
    assert stopped.value is not None and len(seen) >= 150
    written = [name for name in os.listdir(dst) if name != ".mirror"]
    assert len(written) < 300


def test_a_copy_between_two_kinds_of_file_system_falls_back_and_stays_whole(tmp_path):
    # copy_file_range refuses a source on tmpfs and a replica on another file system
    # (EXDEV): the copy falls back, and every file, empty to several chunks, arrives whole.
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no tmpfs beside the test's directory")
    import shutil
    import tempfile

    src = tempfile.mkdtemp(prefix="hamirror-src-", dir=shm)
    try:
        sizes = {"empty": 0, "small": 100, "chunks": (9 << 20) + 7}
        for name, size in sizes.items():
            with open(os.path.join(src, name), "wb") as f:
                f.write(os.urandom(size))
        sparse_file(os.path.join(src, "holes"), 16 * MIB, [(MIB, 64 << 10), (9 * MIB, 64 << 10)])  # its runs sent one by one
        result = sync(src, tmp_path / "dst")
        assert result.ok and result.stats.files_sent == len(sizes) + 1
        for name in [*sizes, "holes"]:
            with open(os.path.join(src, name), "rb") as f:
                assert (tmp_path / "dst" / name).read_bytes() == f.read(), name
        assert data_runs(tmp_path / "dst" / "holes") == [(MIB, MIB + (64 << 10)), (9 * MIB, 9 * MIB + (64 << 10))]
    finally:
        shutil.rmtree(src)


def test_bwlimit_holds_a_local_copy_to_its_rate(tmp_path):
    # A local destination honours --bwlimit like a remote one: after a quarter second of
    # burst, no faster than the rate, and the replica whole at the end.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    rate, files, size = 1 << 20, 3, 512 << 10
    for i in range(files):
        (src / f"f{i}").write_bytes(os.urandom(size))
    started = time.monotonic()
    result = sync(str(src), str(dst), bwlimit=rate)
    elapsed = time.monotonic() - started
    assert result.ok and result.stats.literal_bytes == files * size
    assert elapsed >= (files * size - rate / 4) / rate * 0.95, elapsed
    for i in range(files):
        assert (dst / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()


MIB = 1 << 20
SPARSE_LAYOUTS = {
    "hole in the middle": (64 * MIB, [0, 40 * MIB], MIB),
    "hole at the start and the end": (64 * MIB, [16 * MIB], 256 << 10),
    "all hole": (64 * MIB, [], 0),
    "many small runs": (8 * MIB, list(range(0, 8 * MIB, 256 << 10)), 4096),
}


@pytest.mark.parametrize("layout", sorted(SPARSE_LAYOUTS))
def test_holes_in_a_source_file_stay_holes_in_the_replica(tmp_path, layout):
    """A file with holes (a VM image, a database file) takes on the replica the blocks it
    takes on the source, not its length written out as zeros (a replica disk the size of the
    source's would fill up); its content is the same byte for byte; so is an update of it."""
    size, data_at, run = SPARSE_LAYOUTS[layout]
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    sparse_file(src / "image", size, [(offset, run) for offset in data_at])
    (src / "plain").write_bytes(os.urandom(3 * MIB))  # no holes: copied as before
    if os.stat(src / "image").st_blocks * 512 >= size:
        pytest.skip("this file system keeps no holes")
    for rewrite in (False, True):
        if rewrite:  # an update: more data in one hole, the rest left as it was
            with open(src / "image", "r+b") as f:
                f.seek(size // 2)
                f.write(os.urandom(8192))
        result = sync(src, dst)
        assert result.ok and result.stats.files_sent >= 1, result.failed
        assert (dst / "image").read_bytes() == (src / "image").read_bytes()
        assert (dst / "plain").read_bytes() == (src / "plain").read_bytes()
        assert data_runs(dst / "image") == data_runs(src / "image")
        assert os.stat(dst / "image").st_blocks <= os.stat(src / "image").st_blocks + 8
        assert os.stat(dst / "image").st_size == size


DATA_RUN = 64 << 10  # the sparse file below: data runs this long, each followed by a hole as long


@pytest.mark.parametrize("to", ["a local replica", "a server"])
def test_a_sparse_file_rewritten_while_copied_is_never_committed_torn(tmp_path, to):
    """As above, for a file with holes, copied a data run at a time (sent to a server: each
    hole as its length): its data runs are rewritten in place, front to back, while holes
    stay holes.  A copy that caught a rewrite halfway is never committed; a committed one
    holds one state the source had, with zeros, as holes, where the source has its holes."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    big = src / "sparse"
    runs = range(0, SIZE, 2 * DATA_RUN)
    with open(big, "wb") as f:
        f.truncate(SIZE)
        for offset in runs:
            f.seek(offset)
            f.write(b"\1" * DATA_RUN)
    if os.stat(big).st_blocks * 512 >= SIZE:
        pytest.skip("this file system keeps no holes")
    with contextlib.ExitStack() as stack:
        target, options = str(dst), {}
        if to == "a server":
            target, options = stack.enter_context(mirror_server(tmp_path, {"m": str(dst)})).url("m"), {"secret": SECRET}
        _sparse_rewritten_while_copied(src, dst, target, options, big, runs)


def _sparse_rewritten_while_copied(src, dst, target, options, big, runs) -> None:
    assert sync(src, target, **options).ok
    torn: list = []

    def rewrite(n: int) -> None:
        chunk = bytes([n % 255 + 1]) * CHUNK
        with open(big, "r+b") as f:
            for i, offset in enumerate(runs):
                f.seek(offset)
                for _ in range(DATA_RUN // CHUNK):
                    f.write(chunk)
                    f.flush()
                if i % 8 == 0:
                    time.sleep(0.0005)

    def whole(data: bytes) -> bool:
        holes = b"".join(data[offset + DATA_RUN : offset + 2 * DATA_RUN] for offset in runs)
        written = b"".join(data[offset : offset + DATA_RUN] for offset in runs)
        return len(data) == SIZE and holes == bytes(len(holes)) and _a_state_the_source_had(written)

    def read_replica():
        try:
            data = (dst / "sparse").read_bytes()
        except FileNotFoundError:
            return
        if not whole(data):
            torn.append((data[:4], data[-DATA_RUN - 4 : -DATA_RUN]))

    with changing(rewrite), PollingThread(read_replica, interval=0.01, name="replica-reader"):
        refused = _syncs_caught_changing(src, target, b"sparse", **options)
    assert not torn, f"a torn copy was committed: {torn[:3]}"
    assert whole((dst / "sparse").read_bytes())
    assert os.stat(dst / "sparse").st_blocks * 512 <= SIZE // 2 + (1 << 20)  # its holes kept
    assert refused > 0, "no copy was caught changing: the fault did not reach the check"
