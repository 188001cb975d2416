"""Small helpers shared by tests: run the real CLI, make world-readable temp dirs."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

MIRROR = [sys.executable, "-m", "mirror"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Root without the capabilities that bypass file permissions: permission bits apply to it.
WITHOUT_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def run_mirror(*args, prefix: list[str] | None = None, check_codes=(0, 1, 2, 3, 4, 5), input: bytes | None = None,
               timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m mirror ARGS`` for real; bytes arguments pass through unchanged."""
    proc = subprocess.run(
        (prefix or []) + MIRROR + [os.fsencode(a) if isinstance(a, str) else a for a in args],
        capture_output=True, input=input, timeout=timeout,
        env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode in check_codes, proc
    return proc




def process_state(pid: int, tid: int | None = None) -> str:
    """The state letter of process ``pid`` (or of its thread ``tid``): R, S, D (waiting in the
    kernel), T (stopped), Z...; "" once it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def is_root() -> bool:
    return os.geteuid() == 0


def wait_until(condition, timeout: float = 30.0, interval: float = 0.01):
    """Poll ``condition`` until it is true (returns its value) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


class PollingThread:
    """Calls ``sample()`` over and over in a thread of its own from ``start()`` (or the start
    of a ``with`` block) until ``stop()`` (or the block's end), a round every ``interval``
    seconds from the start of the last one (0: back to back).

    ``polls`` counts the rounds whose ``sample()`` returned anything but False (False: the
    round saw nothing, e.g. a file gone under the walk).  An exception in ``sample()`` ends
    the thread and is raised again in the test by ``stop()`` or ``wait_polls()``: a sampler
    that died quietly would leave its checks vacuous.  ``stopping`` is set once it is told
    to stop (a round that waits should wait on it)."""

    interval = 0.0

    def __init__(self, sample=None, *, interval: float | None = None, name: str | None = None):
        if sample is not None:
            self.sample = sample
        if interval is not None:
            self.interval = interval
        self.polls = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self._raised = False
        self._busy = False
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name or type(self).__name__, daemon=True)

    def sample(self) -> bool | None:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                began = time.monotonic()
                with self._progress:
                    self._busy = True
                seen = self.sample()
                with self._progress:
                    self._busy = False
                    if seen is not False:
                        self.polls += 1
                    self._progress.notify_all()
                if self.interval:
                    self.stopping.wait(max(0.0, began + self.interval - time.monotonic()))
        except BaseException as exc:
            exc.add_note(f"raised in the {self._thread.name} thread")
            self.error = exc
        finally:
            with self._progress:
                self._progress.notify_all()

    def _raise_error(self) -> None:
        if self.error is not None and not self._raised:
            self._raised = True
            raise self.error

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the thread and waits for it; raises the exception that ended it, if any (once:
        stopping again does nothing)."""
        self.stopping.set()
        if self._thread.ident is not None:
            self._thread.join()
        self._raise_error()

    def wait_polls(self, n: int = 1, timeout: float = 30.0) -> None:
        """Returns once ``n`` more rounds, each begun after this call, have completed."""
        deadline = time.monotonic() + timeout
        with self._progress:
            # a round under way began before the call: it does not count
            target = self.polls + n + self._busy
            while self.polls < target:
                self._raise_error()
                if not self._thread.is_alive():
                    raise AssertionError(f"{self._thread.name} is not running")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self._thread.name}: not {n} more polls within {timeout} s")
                self._progress.wait(left)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def changing(step) -> PollingThread:
    """Calls ``step(n)`` for n = 0, 1, 2, ... in a thread of its own while the ``with`` block
    runs (a tree changing under a scan)."""
    changer = PollingThread(lambda: step(changer.polls), name="changing")
    return changer


@contextmanager
def _mounted(argv: list[str], path):
    """``path`` mounted by ``argv`` (root only); unmounted at the end if still there."""
    path.mkdir(exist_ok=True)
    subprocess.run(argv, check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def mounted(path, fstype: str = "tmpfs", options: str = "size=32m"):
    """A real file system of ``fstype`` mounted at ``path`` (root only); unmounted at the end
    if still there."""
    return _mounted(["mount", "-t", fstype, *(["-o", options] if options else []), fstype, str(path)], path)


def loop_mounted(image, path):
    """The file system in ``image`` loop-mounted at ``path`` (root only); unmounted at the end."""
    return _mounted(["mount", "-o", "loop", str(image), str(path)], path)


def ext4_image(path, image, *mkfs_options: str, size: str = "64M"):
    """A fresh ext4 file system in ``image`` (``mkfs_options``: e.g. ``-I 128``, whose inodes
    keep whole seconds only), loop-mounted at ``path`` (root only); unmounted at the end."""
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", *mkfs_options, str(image)], check=True, capture_output=True)
    return loop_mounted(image, path)


def fill_file_system(directory) -> None:
    """Fill ``directory``'s file system to its last block with a file ``filler`` there, and
    prove it: not even a one-byte file can be written (run as root, with no reserve left
    for root, e.g. ext4 ``-m 0``)."""
    with open(os.path.join(directory, "filler"), "ab", buffering=0) as f:
        for size in (1 << 20, 4096):
            with contextlib.suppress(OSError):
                while f.write(b"\0" * size):
                    pass
        # ext4 holds blocks back for delayed writes until they are synced: fill those too
        while True:
            written = 0
            with contextlib.suppress(OSError):
                while f.write(b"\0"):
                    written += 1
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())
            if not written:
                break
    probe = os.path.join(directory, "probe")
    try:
        with open(probe, "wb", buffering=0) as f:
            f.write(b"x")
            os.fsync(f.fileno())
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    else:
        raise AssertionError(f"{directory} is not full")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)


def data_runs(path) -> list[tuple[int, int]]:
    """Where ``path`` holds data, as (start, end) runs, by SEEK_DATA/SEEK_HOLE."""
    runs, start = [], 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:
                start = os.lseek(fd, start, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after start
                return runs
            end = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, end))
            start = end
    finally:
        os.close(fd)


def sparse_file(path, size: int, runs: list[tuple[int, int]]) -> None:
    """A file of ``size`` bytes, holes but for random data at each (offset, length) of ``runs``."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in runs:
            f.seek(offset)
            f.write(os.urandom(length))


# The last commit that spoke mirror protocol version 4: the release before this one, which
# this one must still mirror to and from (docs/PROTOCOL.md, "Versions").
PREVIOUS_RELEASE = "7a0942b020fa04b8489b74d001378fa1d37de849"


def unpack_previous_release(where, *packages: str) -> str:
    """``packages`` of ``PREVIOUS_RELEASE`` unpacked into the directory ``where`` (from this
    clone's history, ``git archive``); the test is skipped if the history lacks it."""
    import pytest

    archive = subprocess.run(["git", "-C", REPO, "archive", PREVIOUS_RELEASE, *packages], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"this clone's history lacks {PREVIOUS_RELEASE[:12]}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return str(where)
