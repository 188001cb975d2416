"""``mirror demo``: a live two-node mirror on one machine, start to finish.

1. generate a small tree (the "primary");
2. start a receiver on loopback (``mirror serve``, with a shared secret) for the "standby";
3. start the live daemon: the first sync copies the tree, then it follows inotify;
4. make a few edits (new file, append, rename, delete, new directory, a big file with a
   small change) and time each one from the write to its arrival on the standby;
5. compare both trees with ``mirror diff --checksum`` and show the transfer figures;
6. stop everything and remove the trees.

Everything here is the real thing (sockets, threads, inotify, fsync), in one process.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .apply import ModuleConfig
from .compare import CompareOptions, CompareSummary, compare_trees, root_entry
from .daemon import DaemonConfig, LivePair, PairConfig
from .itemize import item_lines
from .server import MirrorServer
from .treescan import TreeScan


@dataclass
class Edit:
    what: str
    latency_ms: float | None  # None: did not arrive in time


@dataclass
class DemoResult:
    workdir: str
    files: int
    initial_sync_seconds: float = 0.0
    edits: list[Edit] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    status: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(e.latency_ms is not None for e in self.edits) and not self.differences


def make_tree(root: str, files: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    dirs = [""]
    for i in range(max(1, files // 10)):
        parent = rng.choice(dirs)
        dirs.append(os.path.join(parent, f"dir{i:02d}"))
        os.makedirs(os.path.join(root, dirs[-1]))
    for i in range(files):
        path = os.path.join(root, rng.choice(dirs), f"file{i:03d}.txt")
        with open(path, "wb") as f:
            f.write(rng.randbytes(rng.randrange(10, 20000)))
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.write(rng.randbytes(4 << 20))
    os.symlink("file000.txt", os.path.join(root, "latest"))


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> float | None:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if check():
            return (time.perf_counter() - start) * 1000
        time.sleep(0.0002)
    return None


def _same(a: str, b: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with open(a, "rb") as fa, open(b, "rb") as fb:
                return fa.read() == fb.read()
        except OSError:
            return False

    return check


def _gone(path: str) -> Callable[[], bool]:
    return lambda: not os.path.lexists(path)


def run_demo(workdir: str | None = None, files: int = 200, say: Callable[[str], None] = lambda _: None) -> DemoResult:
    base = workdir or tempfile.mkdtemp(prefix="mirror-demo-")
    primary, standby = os.path.join(base, "primary"), os.path.join(base, "standby")
    os.makedirs(primary)
    os.makedirs(standby)
    make_tree(primary, files)
    secret = os.path.join(base, "secret")
    with open(secret, "w") as f:
        f.write(os.urandom(16).hex() + "\n")
    os.chmod(secret, 0o600)
    result = DemoResult(workdir=base, files=files)

    module = ModuleConfig("standby", os.fsencode(standby), secret=open(secret, "rb").read().strip())
    server = MirrorServer(("127.0.0.1", 0), {"standby": module})
    import threading

    server_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    server_thread.start()
    url = f"mirror://127.0.0.1:{server.port}/standby"
    say(f"receiver: mirror serve on 127.0.0.1:{server.port}, module 'standby' -> {standby}")
    pair = LivePair(
        PairConfig(name="demo", source=os.fsencode(primary), destination=url, secret_file=secret),
        DaemonConfig(pairs=(), status_dir=os.fsencode(os.path.join(base, "status"))),
    )
    try:
        start = time.perf_counter()
        pair.start()
        if _wait_for(lambda: pair.status.state == "live" and pair.status.sessions >= 1, timeout=120) is None:
            raise RuntimeError(f"the first sync did not finish: {pair.status.state} {pair.status.last_error}")
        result.initial_sync_seconds = time.perf_counter() - start
        say(f"daemon: first sync of {files + 2} files done in {result.initial_sync_seconds:.2f} s; now live (inotify)")

        def edit(what: str, action: Callable[[], None], arrived: Callable[[], bool]) -> None:
            action()
            latency = _wait_for(arrived)
            result.edits.append(Edit(what, latency))
            shown = f"{latency:7.1f} ms" if latency is not None else "  did not arrive"
            say(f"  {shown}  {what}")

        p, s = (lambda *x: os.path.join(primary, *x)), (lambda *x: os.path.join(standby, *x))
        say("edits on the primary, each timed until it is committed (fsynced) on the standby:")
        edit("create notes.txt", lambda: _write(p("notes.txt"), b"hello, standby\n"), _same(p("notes.txt"), s("notes.txt")))
        edit("append to notes.txt", lambda: _append(p("notes.txt"), b"a second line\n"), _same(p("notes.txt"), s("notes.txt")))
        edit("rename notes.txt -> dir00/notes.txt", lambda: os.rename(p("notes.txt"), p("dir00", "notes.txt")),
             _same(p("dir00", "notes.txt"), s("dir00", "notes.txt")))  # fmt: skip
        edit("delete file001.txt", lambda: _unlink_anywhere(primary, "file001.txt"), _gone_anywhere(standby, "file001.txt"))
        edit("mkdir reports/2026 with a file", lambda: _mktree(p("reports", "2026", "q4.txt")),
             _same(p("reports", "2026", "q4.txt"), s("reports", "2026", "q4.txt")))  # fmt: skip
        edit("change 11 bytes in the middle of big.bin (4 MiB)", lambda: _patch(p("big.bin"), 2 << 20, b"small edit!"),
             _same(p("big.bin"), s("big.bin")))  # fmt: skip
        time.sleep(0.2)
        say("checking: mirror diff --checksum primary standby")
        summary = CompareSummary()
        a, b = TreeScan(primary, checksum=True, use_cache=False), TreeScan(standby, checksum=True, use_cache=False)
        for change in compare_trees(a, b, CompareOptions(checksum=True), summary, root_entry(a.root), root_entry(b.root)):
            result.differences.extend(item_lines(change))
        result.status = pair.snapshot()
    finally:
        pair.stop()
        server.shutdown()
        server.server_close()
        server_thread.join(timeout=10)
    return result


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _mktree(path: str) -> None:
    os.makedirs(os.path.dirname(path))
    _write(path, b"quarterly report\n")


def _find(root: str, name: str) -> str | None:
    for dirpath, _, names in os.walk(root):
        if name in names:
            return os.path.join(dirpath, name)
    return None


def _unlink_anywhere(root: str, name: str) -> None:
    path = _find(root, name)
    if path:
        os.unlink(path)


def _gone_anywhere(root: str, name: str) -> Callable[[], bool]:
    return lambda: _find(root, name) is None


def cleanup(result: DemoResult) -> None:
    shutil.rmtree(result.workdir, ignore_errors=True)
