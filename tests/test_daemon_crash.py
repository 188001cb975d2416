"""kill -9 the daemon at random moments during a burst of changes: after a restart the
replica converges to exactly the source, and a reader polling it never sees a torn file.

The CI runs a few trials; `pytest -m slow` runs many."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time

import pytest

from tests.daemons import converged, live_daemon
from tests.helpers import PollingThread

CHANGES = 1000


def _content(i: int, version: int) -> bytes:
    """Self-describing content: a header naming the version, then bytes derived from it.
    Renames move contents between names, so validity must not depend on the name."""
    header = b"%d/%d\n" % (i, version)
    seed = hashlib.sha256(header).digest()
    return header + seed * (1 + (i * 37 + version * 11) % 300)


def _valid(name: str, data: bytes) -> bool:
    """A complete version, or empty: the writer truncates before it writes, and that empty
    state really exists on the source for a moment (a mirror may copy it; never a part)."""
    if not data:
        return True
    header, sep, _ = data.partition(b"\n")
    if not sep:
        return False
    try:
        i, version = (int(x) for x in header.split(b"/"))
    except ValueError:
        return False
    return data == _content(i, version)


class _Reader(PollingThread):
    def __init__(self, root):
        super().__init__(name="replica-reader")
        self.root = root
        self.torn: list[str] = []
        self.reads = 0

    def sample(self):
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return False
        for name in names:
            if not name.startswith("f"):
                continue
            try:
                with open(os.path.join(self.root, name), "rb") as f:
                    data = f.read()
            except (FileNotFoundError, IsADirectoryError):
                continue
            self.reads += 1
            if not _valid(name, data):
                self.torn.append((name, len(data), data[:24]))


def _burst(src, rng: random.Random, versions: dict) -> None:
    """CHANGES changes: writes (in place and by rename), deletions, renames."""
    for _ in range(CHANGES):
        i = rng.randrange(200)
        path = src / f"f{i}"
        op = rng.random()
        if op < 0.6:
            versions[i] = versions.get(i, 0) + 1
            path.write_bytes(_content(i, versions[i] % 64))
        elif op < 0.75:
            versions[i] = versions.get(i, 0) + 1
            tmp = src / f"tmp.{i}"
            tmp.write_bytes(_content(i, versions[i] % 64))
            os.rename(tmp, path)
        elif op < 0.9:
            path.unlink(missing_ok=True)
        else:
            j = rng.randrange(200)
            if path.exists():
                os.rename(path, src / f"f{j}")
                versions[j] = versions.get(i, 0)


def _trial(tmp_path, seed: int) -> None:
    rng = random.Random(seed)
    src, dst = tmp_path / f"src{seed}", tmp_path / f"dst{seed}"
    src.mkdir()
    versions: dict[int, int] = {}
    for i in range(0, 200, 2):
        (src / f"f{i}").write_bytes(_content(i, 0))
    with _Reader(dst) as reader:
        with live_daemon(src, dst, log_path=str(tmp_path / f"d{seed}.log")) as d:
            converged(src, dst)
            writer = threading.Thread(target=_burst, args=(src, rng, versions))
            writer.start()
            time.sleep(rng.uniform(0.05, 1.5))
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
            writer.join()
        with live_daemon(src, dst, log_path=str(tmp_path / f"d{seed}.log")):
            converged(src, dst, timeout=120)
    assert not reader.torn, reader.torn[:10]
    assert not list((dst / ".mirror" / "tmp").iterdir())


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_during_burst_converges(tmp_path, seed):
    _trial(tmp_path, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 40))
def test_kill_9_during_burst_converges_many(tmp_path, seed):
    _trial(tmp_path, seed)
