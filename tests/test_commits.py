"""Received files are committed durably in batches, the next batch written while the last
one is fsynced (mirror.commits): what is renamed into place is always on disk first."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import subprocess
import sys

import pytest
import xxhash

from mirror import protocol as P
from mirror.commits import BATCH_FILES as BATCH
from mirror.commits import DIR_SYNCS_HELD_RAISED
from mirror.safefs import syncfs
from tests.helpers import REPO, run_mirror
from tests.peers import ATTRS, RawSession, temp_files
from tests.snapshot import assert_mirrors

_CREATED = re.compile(rb'^openat\(.*"(\.hamirror\.[0-9a-f]+\.tmp)", [A-Z_|]*O_CREAT')
_FSYNC = re.compile(rb"^(fsync|syncfs)\(\d+<([^>]*)>")
# copy_file_range's source offset: NULL, or (a run at its own offset) "[0 => 4096]"
_WRITTEN = re.compile(rb"^(?:write\(|pwrite64\(|copy_file_range\(\d+<[^>]*>, (?:NULL|\[[^]]*\]), )\d+<([^>]*)>")
_RENAMED = re.compile(rb'^renameat2?\(\d+<[^>]*>, "([^"]*)", \d+<([^>]*)>, "[^"]*"\) = 0')


def strace_calls(log: bytes):
    """``strace -f`` output as (line it started on, line it returned on, the whole call),
    an interrupted call (``<unfinished ...>`` ... ``<... resumed>``) joined into one."""
    started = {}
    for i, line in enumerate(log.splitlines()):
        pid, _, call = line.partition(b" ")
        call = call.strip()
        if call.startswith(b"<... "):
            first, head = started.pop(pid)
            yield first, i, head + call.partition(b"resumed>")[2]
        elif call.endswith(b"<unfinished ...>"):
            started[pid] = (i, call[: -len(b"<unfinished ...>")].rstrip())
        else:
            yield i, i, call


def _commit_events(log: bytes):
    """From ``strace -f -y`` output of openat, the writes, fsync, syncfs and renameat: for
    each temporary file the line where it was created, where its data was last written and
    where it was renamed; where each fsync finished (by the path its descriptor had); and
    each syncfs as (started, finished)."""
    created, written, renamed, fsynced, syncfs, dir_fsyncs = {}, {}, {}, {}, [], {}
    for first, last, call in strace_calls(log):
        if (m := _FSYNC.match(call)) is not None:
            if m.group(1) == b"syncfs":
                syncfs.append((first, last))
            else:
                fsynced.setdefault(m.group(2), last)
                dir_fsyncs.setdefault(m.group(2), []).append(first)
        elif (m := _WRITTEN.match(call)) is not None:
            written[m.group(1)] = last
        elif (m := _CREATED.match(call)) is not None:
            created[m.group(1)] = first
        elif (m := _RENAMED.match(call)) is not None:
            renamed[m.group(1)] = (first, m.group(2))
    return created, written, renamed, fsynced, syncfs, dir_fsyncs


def durable_between(after: int, before: int, path: bytes, fsynced: dict, syncfs: list) -> bool:
    """Whether ``path`` was made durable by a call that began after line ``after`` and
    returned before line ``before``: its own fsync, or a syncfs of the filesystem."""
    done = fsynced.get(path)
    return (done is not None and after < done < before) or any(after < s and e < before for s, e in syncfs)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (CI installs it)")
def test_each_file_is_on_disk_before_it_is_renamed_while_the_next_batch_is_written(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(300):  # 900 files: three full batches and a last partial one
            (src / f"d{d}" / f"f{i:03d}").write_bytes(b"%d %d\n" % (d, i) * (i + 1))
    log = tmp_path / "strace.log"
    traced = ["strace", "-f", "-qq", "-y", "-s", "256", "-o", str(log), "-e",
              "trace=openat,write,pwrite64,copy_file_range,fsync,syncfs,renameat,renameat2,fadvise64"]  # fmt: skip
    proc = run_mirror("sync", src, dst, prefix=traced)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_mirrors(src, dst)
    created, written, renamed, fsynced, syncfs, dir_fsyncs = _commit_events(log.read_bytes())
    assert len(renamed) == 900 and set(renamed) <= set(created)
    temp_dir = os.fsencode(dst / ".mirror" / "tmp")
    for temp, (line, _) in renamed.items():
        path = temp_dir + b"/" + temp
        assert path in written, temp
        assert durable_between(written[path], line, path, fsynced, syncfs), (temp, written[path], line)
    last_rename = {}
    for line, directory in renamed.values():
        last_rename[directory] = max(line, last_rename.get(directory, 0))
    for directory, line in last_rename.items():
        assert durable_between(line, 1 << 62, directory, {d: max(v) for d, v in dir_fsyncs.items()}, syncfs), directory
    # The overlap (when the open-file limit can be raised for it): the first batch is renamed
    # only once the second is written.
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] >= 8 * DIR_SYNCS_HELD_RAISED:
        creations = sorted(created.values())
        first_rename = min(line for line, _ in renamed.values())
        assert creations[2 * BATCH - 1] < first_rename
    # Once a batch is full (a big transfer), every file's writeback starts when it is verified.
    assert log.read_bytes().count(b"POSIX_FADV_DONTNEED") == 900 - BATCH


_LOCK_MID_SYNC = """
import os, sys
from mirror.errors import LockedError
from mirror.lockfile import acquire
from mirror.transfer import sync
src, dst, lock = sys.argv[1:4]
seen = 0
def take_lock(change):
    global seen
    seen += 1
    if seen == 700:  # two batches handed over: one renamed, one being fsynced
        acquire(os.fsencode(lock), reason="takeover on the replica's node")
try:
    sync(src, dst, dst_lock_file=lock, on_change=take_lock)
except LockedError:
    sys.exit(3)
"""


def test_a_lock_mid_sync_leaves_whole_files_and_no_temporary_one(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    content = {f"f{i:04d}": os.urandom(100 + i) for i in range(1000)}
    for name, data in content.items():
        (src / name).write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", _LOCK_MID_SYNC, str(src), str(dst), str(tmp_path / "lock")],
                          cwd=REPO, capture_output=True, timeout=120)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    written = [name for name in os.listdir(dst) if name != ".mirror"]
    assert BATCH <= len(written) < len(content)
    for name in written:
        assert (dst / name).read_bytes() == content[name], name
    assert temp_files(dst) == []


def _whole_file(req: int, path: bytes, data: bytes) -> list:
    return [[P.FILE, req, path, ATTRS, "whole", 0, 0, False], [P.DATA, req, data],
            [P.FILE_END, req, xxhash.xxh3_128(data).digest(), len(data)]]  # fmt: skip


def _session(root):
    s = RawSession(root, start={"no_fsync": False})
    s.drain_summary()
    return s


def test_a_symlink_replacing_a_queued_file_wins(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    s = _session(root)
    s.send(*_whole_file(1, b"a", b"queued content"), [P.SYMLINK, b"a", b"target", ATTRS])
    assert s.end()[0] == P.RESULT
    assert os.readlink(root / "a") == "target"


def test_a_symlink_replacing_a_directory_of_queued_files_wins(tmp_path):
    root = tmp_path / "module"
    (root / "d").mkdir(parents=True)
    s = _session(root)
    s.send(*_whole_file(1, b"d/x", b"queued"), [P.SYMLINK, b"d", b"elsewhere", ATTRS])
    result = s.end()  # d/x is committed first: not renamed into a directory already gone
    assert result[0] == P.RESULT and result[1]["failed"] == [], result
    assert os.readlink(root / "d") == "elsewhere"


def test_a_hard_link_to_a_queued_file_links_the_new_content(tmp_path):
    root = tmp_path / "module"
    root.mkdir()
    s = _session(root)
    s.send(*_whole_file(1, b"a", b"new content"), [P.HARDLINK, b"b", b"a"])
    result = s.end()
    assert result[0] == P.RESULT and result[1]["failed"] == [], result
    assert (root / "b").read_bytes() == b"new content"
    assert os.stat(root / "a").st_ino == os.stat(root / "b").st_ino


def test_a_failed_syncfs_is_an_error_with_its_reason():
    with pytest.raises(OSError) as failed:
        syncfs(-1)
    assert failed.value.errno == errno.EBADF and "syncfs" in str(failed.value)


_BUSY_MACHINE = """
import os, sys
from mirror.safefs import SYNCFS_OTHERS_MAX, dirty_bytes, fsync_all
work = sys.argv[1]
with open(os.path.join(work, "someone-else"), "wb") as f:  # written, never fsynced
    for _ in range(4 * SYNCFS_OTHERS_MAX >> 20):
        f.write(os.urandom(1 << 20))
assert dirty_bytes() > 2 * SYNCFS_OTHERS_MAX, dirty_bytes()
fds = []
for i in range(40):
    fd = os.open(os.path.join(work, f"f{i}"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"ours %d" % i)
    fds.append(fd)
fsync_all(fds, nbytes=400)
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (CI installs it)")
def test_a_batch_is_fsynced_file_by_file_while_the_machine_has_much_else_to_write(tmp_path):
    # syncfs would make the batch wait for someone else's 128 MiB: each file is fsynced instead.
    log = tmp_path / "strace.log"
    proc = subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=fsync,syncfs",
                           sys.executable, "-c", _BUSY_MACHINE, str(tmp_path)],
                          cwd=REPO, capture_output=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = [line.split(None, 1)[1] for line in log.read_bytes().splitlines() if b"resumed>" not in line]
    assert sum(call.startswith(b"fsync(") for call in calls) == 40
    assert not any(call.startswith(b"syncfs(") for call in calls)
