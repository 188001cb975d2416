"""No reader of the replica ever sees a torn file, even when the sender is killed mid-transfer."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time

from mirror.transfer import sync
from tests.helpers import MIRROR, PollingThread, wait_until
from tests.snapshot import assert_mirrors

FILES = 24
SIZE = 256 * 1024


def _content(i: int, version: int) -> bytes:
    seed = hashlib.sha256(b"%d-%d" % (i, version)).digest()
    return (seed * (SIZE // len(seed) + 1))[: SIZE + version * 7]


def _write_version(root, version: int) -> None:
    for i in range(FILES):
        (root / f"f{i:02d}").write_bytes(_content(i, version))


class _Reader(PollingThread):
    """Reads every replica file over and over; records any content that is no valid version."""

    def __init__(self, root, versions):
        super().__init__(name="replica-reader")
        self.root = root
        self.valid = {i: {_content(i, v) for v in versions} for i in range(FILES)}
        self.torn: list[str] = []
        self.reads = 0

    def sample(self) -> None:
        for i in range(FILES):
            try:
                data = (self.root / f"f{i:02d}").read_bytes()
            except FileNotFoundError:
                continue
            self.reads += 1
            if data not in self.valid[i]:
                self.torn.append(f"f{i:02d}: {len(data)} bytes")


def test_killed_sender_leaves_no_torn_file_and_next_sync_completes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _write_version(src, 1)
    assert sync(src, dst).ok
    rng = random.Random(7)
    with _Reader(dst, versions=(1, 2, 3, 4)) as reader:
        for version in (2, 3, 4):
            _write_version(src, version)
            proc = subprocess.Popen([*MIRROR, "sync", str(src), str(dst), "--bwlimit", "1M"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            # Kill it at a random moment once it has begun writing.
            wait_until(lambda: os.path.isdir(dst / ".mirror" / "tmp") and os.listdir(dst / ".mirror" / "tmp"))
            time.sleep(rng.uniform(0, 1.5))
            # --bwlimit makes the copy last seconds: the kill lands in the middle of it.
            assert proc.poll() is None, "the sync ended before it could be killed"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert not reader.torn, reader.torn
        result = sync(src, dst)
        assert result.ok
        assert_mirrors(src, dst)
        assert os.listdir(dst / ".mirror" / "tmp") == []
    assert not reader.torn, reader.torn
    assert reader.reads > FILES
