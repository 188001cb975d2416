"""A source file system that fails under a sync, as a disk with bad sectors or a flaky network
mount does: a FUSE pass-through of a real directory, with faults switched on and off per
path while it is mounted.

``faulty_fs(tmp_path)`` mounts one (``FaultyFS``: ``backing``, the real directory, and
``mount``, where the faults are) for the block, in a process of its own, and unmounts it
however the block ends.  Faults, by relative path (``b""`` is the root):

- ``read_eio``, ``at``: a read reaching byte ``at`` of the file fails with EIO;
- ``short``, ``at``: the file reads as if it ended at byte ``at`` (its size says more);
- ``long``, ``extra``: the file says it is ``extra`` bytes shorter than it reads (counted:
  the stats that said so);
- ``getattr_eio``: stat fails with EIO (also the lookup of the name from its directory);
- ``fstat_eio``: once the file is opened, its stats fail with EIO (``fstat`` of the open
  file; before, its name stats, with a ctime of now, so that a reader waiting for it to
  settle stats it again, past the kernel's cache of its attributes);
- ``opendir_eio``, ``readdir_eio``: opening or listing the directory fails with EIO;
- ``hang``: a read of the file, or the opening of the directory, blocks until ``release()``
  (a hung mount; or a scan held at a chosen point while the test changes the backing tree).

Each fault counts the operations it failed (``count(path, kind)``): a test asserts its
fault fired, so a fault that today's code never meets cannot pass for a fault handled.
Run as ``python tests/faultyfs.py BACKING MOUNT SOCKET``: the control is a Unix socket
taking one JSON request per line.

It is mounted with the kernel's attribute and name caches off (every stat reaches it) and
without ``kernel_cache`` (each open reads the file anew).  The test dependency is mfusepy
(README lists why) over libfuse 3 (``packaging/debian-packages.txt``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

FAULTS = ("read_eio", "short", "long", "getattr_eio", "fstat_eio", "opendir_eio", "readdir_eio", "hang")


# -- the client a test uses ---------------------------------------------------------------------


def fuse_unavailable() -> str | None:
    """Why no FUSE file system can be mounted here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc.strerror}"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "not root and no fusermount3"
    return None


def binding_missing() -> str | None:
    """Why mfusepy cannot load libfuse 3 here, or None: both come with README's test
    command (the ``test`` extra, packaging/debian-packages.txt), so a test fails on it."""
    probe = subprocess.run([sys.executable, "-c", "import mfusepy"], capture_output=True, env=_env())
    if probe.returncode != 0:
        lines = probe.stderr.decode(errors="replace").strip().splitlines()
        return f"mfusepy cannot load libfuse 3: {lines[-1] if lines else probe.returncode}"
    return None


def _env() -> dict:
    return {**os.environ, "FUSE_LIBRARY_NAME": "fuse3"}  # libfuse 2 is an older ABI; take 3


class FaultyFS:
    def __init__(self, backing: Path, mount: Path, control: Path, proc: subprocess.Popen, log: Path):
        self.backing, self.mount, self._control, self.proc, self._log = backing, mount, control, proc, log

    def _ask(self, request: dict):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self._control))
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = sock.makefile("rb").readline()
        if not reply:
            raise RuntimeError(f"faultyfs gave no answer to {request}: {self.log()}")
        return json.loads(reply)

    def fault(self, path: bytes | str, kind: str, **args) -> None:
        assert kind in FAULTS, kind
        self._ask({"set": os.fsencode(path).hex(), "kind": kind, "args": args})

    def clear(self, path: bytes | str | None = None) -> None:
        """Faults off (of ``path``, or all); their counts stay."""
        self._ask({"clear": None if path is None else os.fsencode(path).hex()})

    def count(self, path: bytes | str, kind: str) -> int:
        return self._ask({"count": os.fsencode(path).hex(), "kind": kind})

    def blocked(self) -> int:
        """Reads and directory opens blocked by ``hang`` now."""
        return self._ask({"blocked": True})

    def release(self) -> None:
        """Let every hung read go on (and ``hang`` faults no longer block)."""
        self._ask({"release": True})

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""


@contextlib.contextmanager
def faulty_fs(tmp_path: Path):
    """A ``FaultyFS`` over ``tmp_path/backing``, mounted at ``tmp_path/mnt``; skips the test
    only when this machine cannot mount FUSE at all."""
    import pytest

    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(f"FUSE is unavailable: {reason}")
    missing = binding_missing()
    if missing is not None:
        pytest.fail(f"{missing} (install with README's test command)")
    backing, mount, control, log = (tmp_path / n for n in ("backing", "mnt", "faultyfs.sock", "faultyfs.log"))
    backing.mkdir()
    mount.mkdir()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, __file__, str(backing), str(mount), str(control)],
                                stdout=out, stderr=out, env=_env())  # fmt: skip
    fs = FaultyFS(backing, mount, control, proc, log)
    try:
        deadline = time.monotonic() + 30
        while not (_mounted(mount) and control.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                refused = [line for line in fs.log().splitlines() if _REFUSED in line or "No such device" in line]
                if refused:  # a container without the right to mount, a kernel without FUSE
                    pytest.skip(f"FUSE is unavailable: {refused[-1].strip()}")
                raise RuntimeError(f"faultyfs did not mount: {fs.log()}")
            time.sleep(0.01)
        yield fs
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                fs.clear()  # a failing root would fail the unmount's own look at it
                fs.release()
        _unmount(mount)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            _unmount(mount)  # the kernel's side of a file system whose process is gone


_REFUSED = os.strerror(errno.EPERM)


def _mounted(mount: Path) -> bool:
    """From the mount table: a stat of the mount point may fail (that is the point here)."""
    where = os.fsencode(mount).replace(b"\\", b"\\134").replace(b" ", b"\\040")
    with open("/proc/self/mounts", "rb") as f:
        return any(line.split(b" ")[1] == where for line in f)


def _unmount(mount: Path) -> None:
    for cmd in (["fusermount3", "-u", "-q", str(mount)], ["umount", str(mount)], ["umount", "-l", str(mount)]):
        if not _mounted(mount):
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(cmd, capture_output=True, timeout=10)


# -- the file system ------------------------------------------------------------------------------


def serve(backing: str, mount: str, control: str) -> None:
    import mfusepy as fuse

    faults: dict[tuple[bytes, str], dict] = {}
    counts: dict[tuple[bytes, str], int] = {}
    lock = threading.Lock()
    released = threading.Event()
    blocked = [0]

    def rel(path: str | None) -> bytes:
        return os.fsencode(path or "/").strip(b"/")

    def fault(path: bytes, kind: str) -> dict | None:
        with lock:
            return faults.get((path, kind))

    def fired(path: bytes, kind: str) -> None:
        with lock:
            counts[(path, kind)] = counts.get((path, kind), 0) + 1

    def eio(path: bytes, kind: str) -> None:
        if fault(path, kind) is not None:
            fired(path, kind)
            raise fuse.FuseOSError(errno.EIO)

    def hang(path: bytes) -> None:
        if fault(path, "hang") is not None and not released.is_set():
            fired(path, "hang")
            with lock:
                blocked[0] += 1
            released.wait(600)
            with lock:
                blocked[0] -= 1

    class Faulty(fuse.Operations):
        use_ns = True

        def __init__(self):
            self.root = os.fsencode(os.path.realpath(backing))
            self.paths: dict[int, bytes] = {}  # open file -> its relative path (read may get no path)
            self.open_once: set[bytes] = set()  # files opened for reading since their fstat_eio was set

        def real(self, path: str) -> bytes:
            r = rel(path)
            return os.path.join(self.root, r) if r else self.root

        def init_with_config(self, conn_info, config_3):
            if config_3 is not None:  # every stat and lookup reaches us: faults are not cached away
                config_3.attr_timeout = config_3.entry_timeout = config_3.negative_timeout = 0
                config_3.use_ino = 1

        def getattr(self, path, fi=None):
            r = rel(path)
            eio(r, "getattr_eio")
            if r in self.open_once and fault(r, "fstat_eio") is not None:
                fired(r, "fstat_eio")
                raise fuse.FuseOSError(errno.EIO)
            st = os.fstat(fi.fh) if fi is not None else os.lstat(self.real(path))
            attrs = {k: getattr(st, k) for k in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size",
                                                  "st_rdev", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")}
            for name in ("atime", "mtime", "ctime"):
                attrs[f"st_{name}"] = attrs.pop(f"st_{name}_ns")
            if fault(r, "fstat_eio") is not None:
                # Just changed, it says: a reader waits for it to settle and stats it again
                # through the open file, past the kernel's cache of its attributes.
                attrs["st_ctime"] = time.time_ns()
            long = fault(r, "long")
            if long is not None and attrs["st_size"]:
                fired(r, "long")
                attrs["st_size"] = max(0, attrs["st_size"] - long["extra"])
            return attrs

        def readlink(self, path):
            return os.fsdecode(os.readlink(self.real(path)))

        def opendir(self, path):
            r = rel(path)
            eio(r, "opendir_eio")
            hang(r)
            return 0

        def readdir(self, path, fh):
            eio(rel(path), "readdir_eio")
            with os.scandir(self.real(path)) as entries:  # an inode of 0 would hide the name (use_ino)
                names = [(os.fsdecode(e.name), {"st_ino": e.inode(), "st_mode": e.stat(follow_symlinks=False).st_mode},
                          0) for e in entries]  # fmt: skip
            return [".", ".."] + names

        def statfs(self, path):
            sv = os.statvfs(self.real(path))
            return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                 "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

        def _opened(self, path, fi, fd):
            r = rel(path)
            self.paths[fd] = r
            if fault(r, "fstat_eio") is not None:
                self.open_once.add(r)
            fi.fh = fd
            # Past the size it says, only a direct read reaches us: the page cache stops at it.
            fi.direct_io = fault(r, "long") is not None
            return 0

        def open(self, path, fi):
            return self._opened(path, fi, os.open(self.real(path), fi.flags & ~os.O_NOFOLLOW))

        def create(self, path, mode, fi):
            return self._opened(path, fi, os.open(self.real(path), fi.flags | os.O_CREAT, mode))

        def read(self, path, size, offset, fi):
            fh = fi.fh
            r = self.paths.get(fh, rel(path))
            hang(r)
            bad = fault(r, "read_eio")
            if bad is not None and offset + size > bad["at"]:
                fired(r, "read_eio")
                raise fuse.FuseOSError(errno.EIO)
            data = os.pread(fh, size, offset)
            short = fault(r, "short")
            if short is not None and offset + len(data) > short["at"]:
                fired(r, "short")
                data = data[: max(0, short["at"] - offset)]
            return data

        def write(self, path, data, offset, fi):
            return os.pwrite(fi.fh, data, offset)

        def truncate(self, path, length, fi=None):
            if fi is not None:
                os.ftruncate(fi.fh, length)
            else:
                os.truncate(self.real(path), length)

        def flush(self, path, fi):
            return 0

        def fsync(self, path, datasync, fi):
            (os.fdatasync if datasync else os.fsync)(fi.fh)

        def release(self, path, fi):
            self.paths.pop(fi.fh, None)
            os.close(fi.fh)

        def mkdir(self, path, mode):
            os.mkdir(self.real(path), mode)

        def rmdir(self, path):
            os.rmdir(self.real(path))

        def unlink(self, path):
            os.unlink(self.real(path))

        def rename(self, old, new):
            os.rename(self.real(old), self.real(new))

        def symlink(self, target, source):
            os.symlink(os.fsencode(source), self.real(target))

        def link(self, target, source):
            os.link(self.real(source), self.real(target))

        def chmod(self, path, mode):
            os.chmod(self.real(path), mode)

        def chown(self, path, uid, gid):
            os.chown(self.real(path), uid, gid, follow_symlinks=False)

        def utimens(self, path, times=None):
            os.utime(self.real(path), ns=times, follow_symlinks=False)

    def control_loop(server: socket.socket) -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                request = json.loads(conn.makefile("rb").readline())
                reply = None
                with lock:
                    if "set" in request:
                        faults[(bytes.fromhex(request["set"]), request["kind"])] = request["args"]
                        if request["kind"] == "hang":
                            released.clear()
                    elif "clear" in request:
                        path = request["clear"]
                        for key in [k for k in faults if path is None or k[0] == bytes.fromhex(path)]:
                            del faults[key]
                            ops.open_once.discard(key[0])
                    elif "count" in request:
                        reply = counts.get((bytes.fromhex(request["count"]), request["kind"]), 0)
                    elif "blocked" in request:
                        reply = blocked[0]
                if "release" in request:
                    released.set()
                conn.sendall(json.dumps(reply).encode() + b"\n")

    ops = Faulty()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(control + ".new")
    server.listen(16)
    threading.Thread(target=control_loop, args=(server,), daemon=True).start()
    os.rename(control + ".new", control)  # ready when it has its name
    fuse.FUSE(ops, mount, foreground=True, fsname="faultyfs", raw_fi=True)


if __name__ == "__main__":
    serve(*sys.argv[1:4])
