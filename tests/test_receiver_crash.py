"""The receiving end killed (SIGKILL) or frozen (SIGSTOP) while it commits.

A nemesis mutates the source with every kind of change the replica writer makes (new and
rewritten files, some large enough to go as deltas, deletions of files and of whole
directories, type changes, hard-link groups gaining and losing members, renames, directory
times, many symlinks), starts a sync and kills the receiver at a random moment in the
middle of it.  A reader polls the replica throughout: every entry at a name must be
something the source had at that name (a file's content hashed whole, a symlink's
target), never a part, a temporary name, or another name's content.  After each kill the
sender ends with a clear error, a restarted receiver takes the next sync (the writer lock
died with the killed one), and that sync converges and leaves no temporary file.

``HAMIRROR_RECEIVER_CRASH_TRIALS`` sets the number of killed `mirror serve` sessions (4 by
default); run 50 or more before touching the replica writer, commits or safefs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import random
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.helpers import MIRROR, REPO, PollingThread, process_state, wait_until
from tests.servers import REMOTE_MIRROR, fake_rsh, mirror_server
from tests.snapshot import assert_mirrors, snapshot

TRIALS = int(os.environ.get("HAMIRROR_RECEIVER_CRASH_TRIALS", "4"))
BIG = 320 << 10  # over the sender's delta threshold (records.DELTA_THRESHOLD): rewritten as deltas
SYMLINKS = 3000  # retargeted every trial: many short make_special windows for a kill to land in
TEMP_PREFIX = b".hamirror."
# strace holds a receiver's system calls: a disk that stalls, a receiver slow at the wrong moment.
needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")


def _versioned(logical: str, version: int, body: bytes) -> bytes:
    return b"%s v%d %d\n" % (logical.encode(), version, len(body)) + body


class Source:
    """The source tree and what it ever held at each name, when a sync started: a file's
    content hash, a symlink's target, or 'a directory'."""

    def __init__(self, root: str, rng: random.Random):
        self.root = root
        self.rng = rng
        self.history: dict[bytes, set] = {}
        self.version = 0
        self.links = 0
        for top in ("f", "big", "d", "t", "h", "s"):
            os.makedirs(os.path.join(root, top))
        for i in range(SYMLINKS // 100):
            os.makedirs(os.path.join(root, "s", str(i)))
        for i in range(8):
            self._write(f"big/b{i}", rng.randbytes(BIG + rng.randrange(4096)))

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _write(self, rel: str, body: bytes) -> None:
        """Saved editor-style: written beside, renamed over (the source is still at sync time)."""
        tmp = self.path(rel) + ".saving"
        with open(tmp, "wb") as f:
            f.write(_versioned(rel, self.version, body))
        os.rename(tmp, self.path(rel))

    def _names(self, top: str) -> list[str]:
        return sorted(os.listdir(self.path(top)))

    def mutate(self, bulk: int) -> list[tuple[bytes, bytes]]:
        """One trial's changes; ``bulk`` new bytes of whole files (the session's length).
        Returns the renames made, as the live daemon would report them."""
        self.version += 1
        rng, v = self.rng, self.version
        renames = []
        # New and rewritten small files, some deleted, some renamed.
        for i in rng.sample(range(60), 20):
            self._write(f"f/a{i}", rng.randbytes(rng.choice((0, 10, 3000, 40_000))))
        for name in rng.sample(self._names("f"), 4):
            if rng.random() < 0.5:
                os.unlink(self.path(f"f/{name}"))
            else:
                new = f"f/r{v}_{name}"
                os.rename(self.path(f"f/{name}"), self.path(new))
                renames.append((f"f/{name}".encode(), new.encode()))
        # Large files: a few blocks changed (a delta), and fresh ones carrying the bulk.
        for name in rng.sample(self._names("big"), 3):
            with open(self.path(f"big/{name}"), "rb") as f:
                body = bytearray(f.read().partition(b"\n")[2])
            at = rng.randrange(len(body) - 5000)
            body[at : at + 5000] = rng.randbytes(5000)
            self._write(f"big/{name}", bytes(body))
        for name in self._names("big"):
            if name.startswith("n"):
                os.unlink(self.path(f"big/{name}"))
        for i in range(bulk // BIG):
            self._write(f"big/n{v}_{i}", rng.randbytes(BIG))
        # Whole directories made, deleted and renamed.
        for name in self._names("d"):
            if rng.random() < 0.4:
                _rmtree(self.path(f"d/{name}"))
            elif rng.random() < 0.3:
                new = f"d/m{v}_{name}"
                os.rename(self.path(f"d/{name}"), self.path(new))
                renames.append((f"d/{name}".encode(), new.encode()))
        for j in range(2):
            os.makedirs(self.path(f"d/x{v}_{j}/sub"))
            for k in range(5):
                self._write(f"d/x{v}_{j}/sub/g{k}", rng.randbytes(rng.randrange(2000)))
        # Type changes: file -> directory -> symlink -> file.
        for i in range(6):
            rel = self.path(f"t/e{i}")
            st = os.lstat(rel) if os.path.lexists(rel) else None
            if st is None or stat.S_ISLNK(st.st_mode):
                if st is not None:
                    os.unlink(rel)
                self._write(f"t/e{i}", rng.randbytes(100))
            elif stat.S_ISREG(st.st_mode):
                os.unlink(rel)
                os.makedirs(rel + "/in")
                self._write(f"t/e{i}/in/x", rng.randbytes(100))
            else:
                _rmtree(rel)
                os.symlink(f"target-{v}", rel)
        # Hard-link groups gaining and losing members.
        for g in range(4):
            members = [n for n in self._names("h") if n.startswith(f"g{g}_")]
            if not members:
                self._write(f"h/g{g}_0", rng.randbytes(rng.randrange(5000)))
                members = [f"g{g}_0"]
            for _ in range(rng.randrange(3)):
                self.links += 1
                os.link(self.path(f"h/{members[0]}"), self.path(f"h/g{g}_{self.links}"))
            for name in rng.sample(members, min(len(members) - 1, rng.randrange(3))):
                os.unlink(self.path(f"h/{name}"))
        # Symlinks retargeted: many short replacements.
        for i in range(SYMLINKS):
            rel = self.path(f"s/{i % (SYMLINKS // 100)}/l{i}")
            if os.path.lexists(rel):
                os.unlink(rel)
            os.symlink(f"to-{i}-{v}", rel)
        # Directory times, last: nothing below changes after them.
        for top in ("f", "big", "d", "t", "h"):
            t = 1_600_000_000 + v * 1000 + rng.randrange(1000)
            os.utime(self.path(top), (t, t))
        self.record()
        return renames

    def record(self) -> None:
        """Add what the source holds now to the history (it does not change while a sync runs)."""
        root = os.fsencode(self.root)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                self.history.setdefault(os.path.relpath(full, root), set()).add(_signature(full))


def _signature(full: bytes):
    """What a name holds: ('d',), ('l', target) or ('f', content hash); None if it changed
    kind under us or is gone."""
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:  # ELOOP: a symlink
        try:
            return ("l", os.readlink(full))
        except OSError:
            return None
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            return ("d",)
        h = hashlib.sha1()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return ("f", h.hexdigest())
    finally:
        os.close(fd)


def _rmtree(path: str) -> None:
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            full = os.path.join(dirpath, name)
            os.unlink(full) if os.path.islink(full) else os.rmdir(full)
    os.rmdir(path)


class Reader(PollingThread):
    """Walks the replica over and over; records every entry at a name that is not something
    the source had there (``history``)."""

    def __init__(self, root: str, history: dict):
        super().__init__(name="replica-reader")
        self.root = os.fsencode(root)
        self.history = history
        self.bad: list[tuple] = []
        self.reads = 0

    def sample(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == self.root and b".mirror" in dirnames:
                dirnames.remove(b".mirror")
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root)
                got = _signature(full)
                if got is None:
                    continue
                self.reads += 1
                if got not in self.history.get(rel, ()):
                    self.bad.append((rel, got))


def _temp_names(root) -> list[bytes]:
    """Temporary entries in the replica outside its state dir."""
    root = os.fsencode(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root and b".mirror" in dirnames:
            dirnames.remove(b".mirror")
        out += [os.path.join(dirpath, n) for n in dirnames + filenames if n.startswith(TEMP_PREFIX)]
    return out


def _committing(dst) -> bool:
    tmp = os.path.join(dst, ".mirror", "tmp")
    return os.path.isdir(tmp) and bool(os.listdir(tmp))


# A sender that hands the receiver the renames it made, as the live daemon does (mirror.renames),
# and exits with the CLI's code for what ended it.
_RENAMING_SENDER = """
import sys
from mirror.errors import MirrorError
from mirror.transfer import Connection
src, url, secret, bwlimit, *pairs = sys.argv[1:]
renames = [(pairs[i].encode(), pairs[i + 1].encode()) for i in range(0, len(pairs), 2)]
try:
    with Connection(src, url, secret_file=secret, bwlimit=int(bwlimit), delete=True).open(whole_tree=True) as c:
        result = c.session(renames=renames)
except MirrorError as exc:
    print(f"sender: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
sys.exit(result.exit_code)
"""


def _start_sync(src: Source, server, renames, trial: int) -> subprocess.Popen:
    bwlimit = 1 << 20
    if trial % 2:
        pairs = [p.decode() for pair in renames for p in pair]
        argv = [sys.executable, "-c", _RENAMING_SENDER, src.root, server.url("m"), server.secret_file, str(bwlimit),
                *pairs]  # fmt: skip
    else:
        argv = [*MIRROR, "sync", "--delete", "--bwlimit", str(bwlimit // 1024), "--secret-file", server.secret_file,
                src.root, server.url("m")]  # fmt: skip
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _sync(src: str, dst: str, *args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([*MIRROR, "sync", "--delete", *args, src, dst], cwd=REPO, capture_output=True,
                          timeout=120)  # fmt: skip
    if check is not None:
        assert proc.returncode == check, proc
    return proc


def _assert_clean_error(proc: subprocess.Popen, codes=(2,), says=(b"connection", b"receiver")) -> bytes:
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.returncode in codes, (proc.returncode, err)
    assert b"Traceback" not in err and any(word in err for word in says), err
    return err


def test_receiver_killed_mid_session_never_exposes_a_foreign_entry_and_the_next_sync_converges(tmp_path):
    rng = random.Random(int(os.environ.get("HAMIRROR_RECEIVER_CRASH_SEED", "27")))
    src = Source(str(tmp_path / "src"), rng)
    dst = tmp_path / "dst"
    dst.mkdir()
    src.record()
    with Reader(str(dst), src.history) as reader:
        with mirror_server(tmp_path, {"m": str(dst)}) as server:
            _sync(src.root, server.url("m"), "--secret-file", server.secret_file)
        for trial in range(TRIALS):
            renames = src.mutate(bulk=rng.randrange(3, 6) * BIG)
            with mirror_server(tmp_path, {"m": str(dst)}) as server:
                proc = _start_sync(src, server, renames, trial)
                wait_until(lambda: _committing(dst) or proc.poll() is not None)  # noqa: B023
                time.sleep(rng.uniform(0, 0.5))
                assert proc.poll() is None, "the sync ended before its receiver could be killed"
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait()
                proc.wait(timeout=60)
                _assert_clean_error(proc)
            assert not _temp_names(dst), f"trial {trial}: the killed receiver left {_temp_names(dst)}"
            # A new server (the lock died with the old one) takes the next sync, which converges.
            with mirror_server(tmp_path, {"m": str(dst)}) as server:
                _sync(src.root, server.url("m"), "--secret-file", server.secret_file)
            assert_mirrors(src.root, dst)
            assert os.listdir(dst / ".mirror" / "tmp") == []
            assert not reader.bad, f"trial {trial}: the reader saw {reader.bad[:5]}"
    assert not reader.bad, reader.bad[:5]
    assert reader.reads > 1000


def test_killed_receiver_leaves_no_temporary_name_in_the_replica(tmp_path):
    """A symlink or hard link is made under a temporary name, then renamed over its target.
    Made beside the target, that name was an entry of the replica the source never had:
    listed by any reader meanwhile, and left there by a killed receiver (without --delete,
    for good).  Made in the state dir's tmp/, it is never seen, and the next session
    removes it."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    n, dirs = 8_000, 20
    for d in range(dirs):
        os.makedirs(src / f"s{d}")
    dst.mkdir()

    def retarget(v: int) -> None:
        for i in range(n):
            link = src / f"s{i % dirs}" / f"l{i}"
            if v:
                link.unlink()
            os.symlink(f"t{i}-{v}", link)

    def begun(v: int) -> bool:  # some links of this version are in the replica already
        for i in range(0, n, 499):
            try:
                if os.readlink(dst / f"s{i % dirs}" / f"l{i}").endswith(f"-{v}"):
                    return True
            except FileNotFoundError:
                pass
        return False

    seen: list[bytes] = []
    retarget(0)
    rng = random.Random(5)
    with PollingThread(lambda: seen.extend(_temp_names(dst)), name="replica-lister"):
        for v in range(3):
            with mirror_server(tmp_path, {"m": str(dst)}) as server:
                secret = ("--secret-file", server.secret_file)
                argv = [*MIRROR, "sync", "--no-fsync", *secret, str(src), server.url("m")]
                if v == 0:
                    subprocess.run(argv, cwd=REPO, check=True)
                else:
                    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    wait_until(lambda: begun(v) or proc.poll() is not None, interval=0.001)  # noqa: B023
                    time.sleep(rng.uniform(0, 0.1))
                    assert proc.poll() is None, "the sync ended before its receiver could be killed"
                    server.proc.send_signal(signal.SIGKILL)
                    server.proc.wait()
                    proc.wait(timeout=60)
                    _assert_clean_error(proc)
                    assert not _temp_names(dst), f"kill {v}: the replica holds {_temp_names(dst)[:3]}"
            retarget(v + 1)
        with mirror_server(tmp_path, {"m": str(dst)}) as server:
            _sync(str(src), server.url("m"), "--secret-file", server.secret_file)
    assert not seen, f"a reader of the replica listed {seen[:3]}"
    assert_mirrors(src, dst)
    assert os.listdir(dst / ".mirror" / "tmp") == []


# fsync, fdatasync, syncfs: the numbers /proc/PID/task/TID/syscall shows, per machine
_SYNC_CALLS = {"x86_64": {74, 75, 306}, "aarch64": {82, 83, 267}}


@needs_strace
def test_mirroring_lock_made_while_the_receiver_waits_for_the_disk_stops_the_batch_it_waited_for(tmp_path):
    """A receiver renames a full batch once the disk has its data: a slow fsync (here every
    fsync and syncfs held 2 s by strace, a disk that stalls or a receiver frozen there) is a
    wait between the mirroring lock's check and the renames.  A lock made meanwhile (a
    takeover: this node becomes the primary) must stop them: the lock is checked again
    once the wait is over.  It was checked only before it, and a whole batch went in under
    the lock."""
    from mirror.commits import BATCH_FILES
    from mirror.lockfile import acquire

    src, dst, lock = tmp_path / "src", tmp_path / "dst", tmp_path / "mirror.lock"
    src.mkdir()
    dst.mkdir()
    old = 1_000_000_000
    for i in range(2 * BATCH_FILES + 50):
        (src / f"f{i:04d}").write_bytes(b"%d\n" % i)
        os.utime(src / f"f{i:04d}", (old, old))
    stall = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync,syncfs",
             "-e", "inject=fsync,syncfs:delay_enter=2000000"]  # fmt: skip
    tmp = dst / ".mirror" / "tmp"
    # Other tests' dirty data would make a batch fsync its files one by one (safefs.fsync_all),
    # each held 2 s, instead of one syncfs.
    os.sync()

    def second_batch_verified() -> bool:
        # Both batches written and given their times: the second one's lock check is done,
        # and the receiver waits for the first one's fsync (held by strace) to rename it.
        try:
            names = os.listdir(tmp)
            return len(names) >= 2 * BATCH_FILES and all(os.stat(tmp / n).st_mtime == old for n in names)
        except FileNotFoundError:
            return False

    syncs = _SYNC_CALLS.get(platform.machine())

    def held_at_a_sync(tracer: int) -> bool:
        # A thread of the receiver held by strace in an fsync or syncfs (a tracing stop in one
        # of those calls; strace stops its tracee at other calls too, briefly).  Without it, on
        # a loaded machine the first batch may be durable already, its renames under way when
        # the lock is made (the lock is then honoured within its one-second bound, not at once).
        with open(f"/proc/{tracer}/task/{tracer}/children") as f:
            receivers = [int(pid) for pid in f.read().split()]
        for pid in receivers:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    if process_state(pid, int(tid)) != "t":
                        continue
                    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                        call = f.read().split()[0]
                    if syncs is None or (call.isdigit() and int(call) in syncs):
                        return True
        return False

    with mirror_server(tmp_path, {"m": str(dst)}, "--lock-file", str(lock), prefix=stall) as server:
        proc = subprocess.Popen([*MIRROR, "sync", "--secret-file", server.secret_file, str(src), server.url("m")],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        wait_until(lambda: (second_batch_verified() and held_at_a_sync(server.proc.pid)) or proc.poll() is not None,
                   interval=0.002)  # fmt: skip
        assert proc.poll() is None and not [n for n in os.listdir(dst) if n.startswith("f")]
        acquire(os.fsencode(lock), reason="takeover")
        wait_until(lambda: proc.poll() is not None, timeout=60)
        err = _assert_clean_error(proc, codes=(3,), says=(b"lock",))
        # strace itself is stopped by its tracee's exit only: the server is told first.
        with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
            for child in f.read().split():
                os.kill(int(child), signal.SIGTERM)
        server.proc.wait(timeout=30)
    mirrored = [n for n in os.listdir(dst) if n.startswith("f")]
    assert not mirrored, f"{len(mirrored)} files went in under the mirroring lock ({err!r})"


def _writer_lock_free(dst) -> bool:
    """Whether no receiver holds the replica's writer lock (mirror.writerlock), asked without
    keeping it."""
    fd = os.open(os.path.join(dst, ".mirror", "writer.lock"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except FileNotFoundError:
            continue
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def test_frozen_receiver_keeps_the_module_until_it_wakes_and_writes_nothing_after_it_lets_go(tmp_path):
    """A `mirror serve` frozen (SIGSTOP) in the middle of a commit: its sender gives up
    (--timeout, exit 30).  A new sync into the same tree by another way (`mirror receive`
    over a remote shell) is refused at once, naming the frozen holder, and writes nothing:
    the frozen one still holds the module's writer lock, with its verified files and
    their renames pending.  Woken (SIGCONT), it finds its sender gone, drops or finishes
    what it held and lets go; the next sync converges, and nothing changes after it."""
    rng = random.Random(41)
    src = Source(str(tmp_path / "src"), rng)
    dst = tmp_path / "dst"
    dst.mkdir()
    src.record()
    rsh = ("--rsh", fake_rsh(tmp_path), "--remote-command", REMOTE_MIRROR)
    with Reader(str(dst), src.history) as reader:
        with mirror_server(tmp_path, {"m": str(dst)}) as server:
            secret = ("--secret-file", server.secret_file)
            _sync(src.root, server.url("m"), *secret)
            src.mutate(bulk=5 * BIG)
            argv = [*MIRROR, "sync", "--delete", "--timeout", "2", "--bwlimit", "1024", *secret, src.root,
                    server.url("m")]  # fmt: skip
            proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wait_until(lambda: _committing(dst) or proc.poll() is not None)
            time.sleep(rng.uniform(0, 0.4))
            assert proc.poll() is None, "the sync ended before its receiver could be frozen"
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                proc.wait(timeout=60)
                _assert_clean_error(proc, codes=(30,), says=(b"--timeout",))
                frozen = snapshot(dst)
                src.mutate(bulk=BIG)
                refused = _sync(src.root, f"somehost:{dst}", *rsh, check=2)
                assert b"busy" in refused.stderr and f"pid {server.proc.pid} ".encode() in refused.stderr, refused
                assert snapshot(dst) == frozen, "the refused sync wrote into the replica"
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            wait_until(lambda: _writer_lock_free(dst))
            _sync(src.root, f"somehost:{dst}", *rsh)
            assert_mirrors(src.root, dst)
            assert os.listdir(dst / ".mirror" / "tmp") == []
            # The woken server serves on, and had nothing left to write.
            _sync(src.root, server.url("m"), *secret)
            assert_mirrors(src.root, dst)
            assert reader.reads > 100
    assert not reader.bad, reader.bad[:5]


def test_remote_shell_receiver_killed_mid_session(tmp_path):
    """`mirror receive` started over a remote shell, killed (SIGKILL) mid-session: the
    sender ends with a clear error, and the next sync through the shell converges."""
    rng = random.Random(43)
    src = Source(str(tmp_path / "src"), rng)
    dst = tmp_path / "dst"
    dst.mkdir()
    src.record()
    rsh = ("--rsh", fake_rsh(tmp_path), "--remote-command", REMOTE_MIRROR)
    remote = f"somehost:{dst}"
    with Reader(str(dst), src.history) as reader:
        _sync(src.root, remote, *rsh)
        for trial in range(2):
            src.mutate(bulk=rng.randrange(3, 6) * BIG)
            argv = [*MIRROR, "sync", "--delete", "--bwlimit", "1024", *rsh, src.root, remote]
            proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wait_until(lambda: _committing(dst) or proc.poll() is not None)  # noqa: B023
            time.sleep(rng.uniform(0, 0.4))
            assert proc.poll() is None, "the sync ended before its receiver could be killed"
            receivers = [p for p in _descendants(proc.pid) if b"receive" in _cmdline(p)]
            assert receivers, "no receiver under the remote shell"
            for pid in receivers:
                os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=60)
            _assert_clean_error(proc)
            assert not _temp_names(dst), _temp_names(dst)
            _sync(src.root, remote, *rsh)
            assert_mirrors(src.root, dst)
            assert os.listdir(dst / ".mirror" / "tmp") == []
            assert not reader.bad, f"trial {trial}: the reader saw {reader.bad[:5]}"
    assert not reader.bad, reader.bad[:5]


@needs_strace
def test_mirroring_lock_made_during_deletions_stops_those_left(tmp_path):
    """A session's deletions come last, all in a row: a receiver slow there (every unlink
    held 0.1 s by strace, or a receiver frozen and woken after a takeover) went on deleting
    in a tree whose mirroring lock had appeared, where the new primary's service may have
    written since.  The lock stops what is left within its check interval."""
    from mirror.lockfile import acquire

    src, dst, lock = tmp_path / "src", tmp_path / "dst", tmp_path / "mirror.lock"
    src.mkdir()
    dst.mkdir()
    count = 40
    for i in range(count):
        (src / f"f{i:02d}").write_bytes(b"x")
    slow = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=unlinkat", "-e", "inject=unlinkat:delay_enter=100000"]

    def left() -> int:
        return len([n for n in os.listdir(dst) if n.startswith("f")])

    with mirror_server(tmp_path, {"m": str(dst)}, "--lock-file", str(lock), prefix=slow) as server:
        secret = ("--secret-file", server.secret_file)
        _sync(str(src), server.url("m"), *secret)
        for i in range(count):
            (src / f"f{i:02d}").unlink()
        argv = [*MIRROR, "sync", "--delete", "--allow-mass-delete", *secret, str(src), server.url("m")]
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: left() < count - 2 or proc.poll() is not None, interval=0.002)
        acquire(os.fsencode(lock), reason="takeover")
        at_lock = left()
        wait_until(lambda: proc.poll() is not None, timeout=60)
        _assert_clean_error(proc, codes=(3,), says=(b"lock",))
        with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
            for child in f.read().split():
                os.kill(int(child), signal.SIGTERM)
        server.proc.wait(timeout=30)
    # One deletion may be under way when the lock appears, one more before its check is due.
    assert left() >= at_lock - 3, f"{at_lock - left()} of {at_lock} entries deleted under the mirroring lock"


@needs_strace
def test_mirroring_lock_made_while_a_batch_is_renamed_stops_the_rest_of_it(tmp_path):
    """A batch's renames (up to 256 files) in a row: a receiver slow there (every rename held
    20 ms by strace, or a receiver frozen among them and woken after a takeover) renamed
    the rest of the batch into a tree whose mirroring lock had appeared.  The lock stops
    them within its check interval; the files not renamed are dropped."""
    from mirror.commits import BATCH_FILES
    from mirror.lockfile import acquire

    src, dst, lock = tmp_path / "src", tmp_path / "dst", tmp_path / "mirror.lock"
    src.mkdir()
    dst.mkdir()
    for i in range(BATCH_FILES // 2):
        (src / f"f{i:03d}").write_bytes(b"%d\n" % i)
    slow = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=rename,renameat,renameat2",
            "-e", "inject=rename,renameat,renameat2:delay_enter=20000"]  # fmt: skip

    def mirrored() -> int:
        return len([n for n in os.listdir(dst) if n.startswith("f")])

    with mirror_server(tmp_path, {"m": str(dst)}, "--lock-file", str(lock), prefix=slow) as server:
        argv = [*MIRROR, "sync", "--secret-file", server.secret_file, str(src), server.url("m")]
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: mirrored() > 2 or proc.poll() is not None, interval=0.002)
        acquire(os.fsencode(lock), reason="takeover")
        at_lock = mirrored()
        wait_until(lambda: proc.poll() is not None, timeout=60)
        _assert_clean_error(proc, codes=(3,), says=(b"lock",))
        with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
            for child in f.read().split():
                os.kill(int(child), signal.SIGTERM)
        server.proc.wait(timeout=30)
    # 0.1 s between checks: at most a few more renames of 20 ms each.
    assert mirrored() <= at_lock + 8, f"{mirrored() - at_lock} files renamed in under the mirroring lock"
    assert os.listdir(dst / ".mirror" / "tmp") == []
