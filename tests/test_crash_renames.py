"""kill -9 the live daemon at random moments while files are saved by rename, maildir-style
(tmp/ -> new/ -> cur/) and editor-style (NAME.tmp -> NAME): a reader polling the replica
never sees, at a final name, anything but one complete version the source had there, and
every trial converges after a restart.

Each version carries its logical name, its version number and a checksum of its body, so a
reader can tell a complete version from a torn, empty or foreign one (another name's
content, or a temporary file's that was not complete yet).

``HAMIRROR_CRASH_TRIALS`` sets the number of trials (15 by default, about 30 s; a third as
many again go to a ``mirror serve`` receiver).  Run 200 or more before touching renames, the
journal or commits.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import xxhash

from tests.daemons import converged, live_daemon
from tests.helpers import PollingThread
from tests.servers import mirror_server

TRIALS = int(os.environ.get("HAMIRROR_CRASH_TRIALS", "15"))
EDITOR_NAMES = 60
SIZES = (0, 10, 700, 5000, 40_000, 200_000)


def version_bytes(logical: str, version: int, rng: random.Random) -> bytes:
    """A complete version of ``logical``: a header naming it, then a body whose checksum the
    header holds.  Sizes vary from a few bytes to 200 KB."""
    size = rng.choice(SIZES) + rng.randrange(50)
    body = rng.randbytes(size)
    return (
        b"%s v%d %d %s\n" % (logical.encode(), version, size, xxhash.xxh3_64_hexdigest(body).encode()) + body
    )


def parse_version(data: bytes) -> tuple[str, int] | None:
    """(logical name, version) of a complete version; None for anything else."""
    header, sep, body = data.partition(b"\n")
    if not sep:
        return None
    try:
        logical, version, size, digest = header.split(b" ")
        if not version.startswith(b"v") or int(size) != len(body):
            return None
        if xxhash.xxh3_64_hexdigest(body).encode() != digest:
            return None
        return logical.decode(), int(version[1:])
    except ValueError:
        return None


def logical_name(rel: str) -> str | None:
    """What a final name must hold: ``ed/NAME`` holds NAME's versions, ``new/ID`` and
    ``cur/ID:2,S`` hold message ID.  None: not a final name (temporary files)."""
    top, _, name = rel.partition("/")
    if top == "ed" and not name.endswith(".tmp"):
        return name
    if top == "new":
        return name
    if top == "cur":
        return name.partition(":")[0]
    return None


class Writer(PollingThread):
    """Saves editor-style (write NAME.tmp, rename over NAME) and delivers mail maildir-style
    (write tmp/ID, rename to new/ID, later to cur/ID:2,S, sometimes delete)."""

    def __init__(self, src, rng: random.Random):
        super().__init__(name="crash-writer")
        self.src = src
        self.rng = rng
        self.versions: dict[str, int] = {}
        self.messages = 0
        self.new: list[str] = []
        self.cur: list[str] = []

    def sample(self):
        rng = self.rng
        op = rng.random()
        if op < 0.5:
            name = f"n{rng.randrange(EDITOR_NAMES)}"
            v = self.versions[name] = self.versions.get(name, 0) + 1
            tmp = os.path.join(self.src, "ed", name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(version_bytes(name, v, rng))
            os.rename(tmp, os.path.join(self.src, "ed", name))
        elif op < 0.75:
            self.messages += 1
            mid = f"m{self.messages}.{rng.randrange(1 << 30)}"
            tmp = os.path.join(self.src, "tmp", mid)
            with open(tmp, "wb") as f:
                f.write(version_bytes(mid, 1, rng))
            os.rename(tmp, os.path.join(self.src, "new", mid))
            self.new.append(mid)
        elif op < 0.93 and self.new:
            mid = self.new.pop(rng.randrange(len(self.new)))
            os.rename(os.path.join(self.src, "new", mid), os.path.join(self.src, "cur", mid + ":2,S"))
            self.cur.append(mid)
        elif self.cur:
            mid = self.cur.pop(rng.randrange(len(self.cur)))
            os.unlink(os.path.join(self.src, "cur", mid + ":2,S"))


class Reader(PollingThread):
    """Reads every final name of the replica over and over; records anything that is not a
    complete version of that name."""

    def __init__(self, root):
        super().__init__(name="crash-reader")
        self.root = root
        self.bad: list[tuple] = []
        self.reads = 0

    def sample(self) -> None:
        for top in ("ed", "new", "cur"):
            try:
                names = os.listdir(os.path.join(self.root, top))
            except FileNotFoundError:
                continue
            for name in names:
                rel = f"{top}/{name}"
                want = logical_name(rel)
                if want is None:
                    continue
                try:
                    with open(os.path.join(self.root, rel), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue
                self.reads += 1
                got = parse_version(data)
                if got is None or got[0] != want:
                    self.bad.append((rel, len(data), data[:40]))


def _seed_tree(src, rng: random.Random) -> None:
    for top in ("ed", "tmp", "new", "cur"):
        os.makedirs(os.path.join(src, top))
    for i in range(0, EDITOR_NAMES, 3):
        with open(os.path.join(src, "ed", f"n{i}"), "wb") as f:
            f.write(version_bytes(f"n{i}", 0, rng))


def crash_trial(tmp_path, seed: int, destination=None, dst=None, extra=()) -> dict:
    """One trial: a daemon mirrors while the writer works, is killed with SIGKILL at a random
    moment, restarted while the writer goes on; then the writer stops and the replica must
    converge.  The reader polls throughout."""
    rng = random.Random(seed)
    base = tmp_path / f"t{seed}"
    src, dst = base / "src", dst or base / "dst"
    os.makedirs(src)
    _seed_tree(str(src), rng)
    writer = Writer(str(src), random.Random(seed * 7919))
    log = str(base / "daemon.log")
    with Reader(str(dst)) as reader:
        try:
            with live_daemon(src, destination or dst, *extra, log_path=log) as d:
                converged(src, dst)
                writer.start()
                time.sleep(rng.uniform(0.05, 1.2))
                d.proc.send_signal(signal.SIGKILL)
                d.proc.wait()
            time.sleep(rng.uniform(0, 0.3))  # the writer goes on while nothing mirrors
            with live_daemon(src, destination or dst, *extra, log_path=log):
                time.sleep(rng.uniform(0.05, 0.5))
                writer.stop()
                converged(src, dst, timeout=120)
        finally:
            writer.stop()
    assert not reader.bad, f"seed {seed}: the reader saw {reader.bad[:5]} (log: {log})"
    return {"reads": reader.reads}


@pytest.mark.parametrize("trial", range(TRIALS))
def test_renames_under_kill_9_never_expose_foreign_content(tmp_path, trial):
    crash_trial(tmp_path, 1000 + trial)


@pytest.mark.parametrize("trial", range(max(1, TRIALS // 3)))
def test_renames_under_kill_9_never_expose_foreign_content_over_the_wire(tmp_path, trial):
    """The receiver is a `mirror serve` that outlives the killed daemon: its session ends in
    the middle, and the restarted daemon's replay meets what it committed."""
    dst = tmp_path / f"replica{trial}"
    dst.mkdir()
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        crash_trial(tmp_path, 5000 + trial, destination=server.url("m"), dst=dst,
                    extra=("--secret-file", server.secret_file))  # fmt: skip
