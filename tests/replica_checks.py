"""What a replica shows while a sync that meets a fault runs, what its state dir holds after
it, and a ``Target`` that syncs to it locally or through a server (tests/test_full_disk.py,
tests/test_fsync_failure.py, tests/test_faulty_source.py)."""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

from mirror.applied import read_applied
from mirror.epoch import read_epoch
from mirror.guard import load as load_identity
from tests.helpers import PollingThread, run_mirror
from tests.servers import mirror_server


def digests(root: Path) -> dict[bytes, str]:
    """path -> sha256 of each regular file under ``root`` (its state dir left out)."""
    out = {}
    root_b = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root_b):
        if dirpath == root_b and b".mirror" in dirnames:
            dirnames.remove(b".mirror")
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as f:
                    out[os.path.relpath(full, root_b)] = hashlib.sha256(f.read()).hexdigest()
    return out


class Watcher(PollingThread):
    """Polls the replica in a thread of its own for as long as the block runs: every regular
    file at a final name must be whole, the replica's old version or the source's."""

    def __init__(self, replica: Path, *versions: dict[bytes, str]):
        super().__init__()
        self.replica = os.fsencode(replica)
        self.allowed: dict[bytes, set[str]] = {}
        for version in versions:
            for path, digest in version.items():
                self.allowed.setdefault(path, set()).add(digest)
        self.bad: list = []

    def sample(self):
        try:
            seen = digests(self.replica)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False  # a name renamed, deleted or replaced under the walk: the next poll sees it
        for path, digest in seen.items():
            if digest not in self.allowed.get(path, ()):
                self.bad.append((path, digest))


def assert_state_whole(replica: Path, *, expect_identity: bool = True) -> None:
    """The replica's state dir: every state file readable, no temporary file anywhere in it."""
    state = replica / ".mirror"
    read_epoch(os.fsencode(state))  # raises on a torn or empty file
    read_applied(os.fsencode(state))
    identity = load_identity(os.fsencode(state))
    if expect_identity:
        assert identity is not None
    left = [n for n in os.listdir(state) if n.endswith(".tmp")]
    assert left == [], f"temporary state files left behind: {left}"
    if (state / "tmp").exists():
        assert os.listdir(state / "tmp") == [], "received files' temporaries left behind"


class Target:
    """Where a sync writes: the directory itself (local), or a `mirror serve` module of it."""

    def __init__(self, mode: str, replica: Path, tmp_path: Path):
        self.mode, self.replica, self.tmp_path = mode, replica, tmp_path

    @contextmanager
    def running(self):
        if self.mode == "local":
            yield self
            return
        (self.tmp_path / "srv").mkdir(exist_ok=True)
        with mirror_server(self.tmp_path / "srv", {"m": str(self.replica)}) as server:
            self.server = server
            yield self

    def sync(self, src: Path, *extra: str):
        if self.mode == "local":
            return run_mirror("sync", *extra, src, self.replica)
        return run_mirror("sync", *extra, src, self.server.url("m"), "--secret-file", self.server.secret_file)

    def daemon_args(self) -> list[str]:
        """`mirror daemon`'s destination and options for this target."""
        if self.mode == "local":
            return [str(self.replica)]
        return [self.server.url("m"), "--secret-file", self.server.secret_file]

    def server_log(self) -> str:
        log = self.tmp_path / "srv" / "server.log"
        return log.read_text(errors="replace") if log.exists() else ""


def no_traceback(proc, target: Target) -> None:
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert "Traceback" not in target.server_log(), target.server_log()


MODES = ["local", "remote"]
