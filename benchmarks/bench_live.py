"""S4d: live mirroring latency, side by side with lsyncd.

Latency here is from a plain application write on the source (a new file opened, written,
closed: the clock starts when close() returns) to that file committed on the replica (renamed
into place).  Arrival is seen through inotify (IN_MOVED_TO / IN_CLOSE_WRITE with the file's
name) on the replica's directories, so the benchmark sleeps in poll() instead of burning one
of the two cores in a stat loop.  Two pacings:

- back to back: each write as soon as the previous one has arrived;
- paced: one write every ``--interval`` seconds (100 ms).

Tools, each in turn on the same source/replica pair (one running at a time):

- ``mirror-local``: ``mirror daemon SRC DST`` with DST a local directory;
- ``mirror-serve``: ``mirror daemon SRC mirror://127.0.0.1:P/m`` with a ``mirror serve``
  receiver on loopback;
- ``mirror-reconcile``: ``mirror-local`` comparing the whole tree every ``--reconcile-interval``
  seconds (1 by default: far more often than anyone would, to show what a compare costs the
  changes made meanwhile);
- ``lsyncd``: ``lsyncd -nodaemon CONF``, ``default.rsync`` at its fastest setting
  (``delay = 0``) to a local target.  Its rsync does not fsync; mirror fsyncs every commit
  (file data before the rename, the directory after it).

The tools alternate in rounds (the order rotates each round); each waits for its initial sync
to end and a probe write to arrive before it is measured, and between turns the benchmark's
files are removed from both trees (no tool running), so every turn starts on equal trees.
The writes go to ``--dirs`` directories of the corpus picked by a seeded draw, so lsyncd's
rsync lists a real corpus directory for every change.

    python -m benchmarks.bench_live --corpus /work/bench/c50000-6144M-s1/A --workdir /work/bench/live/c50000 \\
        [--rounds 5 --back-to-back 60 --paced 20] [--tools mirror-local,mirror-serve,lsyncd] \\
        [--json OUT.json] [--plot benchmarks/s4d_latency_50k.png]
    python -m benchmarks.bench_live --replot OUT.json --plot FILE.png   # figure from saved results

The source and replica (WORKDIR/src, WORKDIR/dst) are made with ``cp -a`` from --corpus when
they do not exist yet.  Nothing is installed: a missing peer is skipped with a message.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import json
import math
import os
import random
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from benchmarks.harness import have, mirror_command

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of NUL-padded name)

TOOLS = ("mirror-local", "mirror-serve", "lsyncd")  # the default run; also mirror-reconcile
PEER = "lsyncd"
TAG = "s4d"  # every file the benchmark writes starts with this (cleanup finds them by it)


# -- inotify (ctypes: three libc calls, no dependency) ------------------------------------------


class Inotify:
    """An inotify instance: ``add_watch(dir)``, then ``wait_for(wd, name, deadline)`` blocks in
    poll() until an event for ``name`` in that directory arrives."""

    _libc = None

    def __init__(self):
        if Inotify._libc is None:
            Inotify._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self._check(self._libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK), "inotify_init1")
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        self._seen: set[tuple[int, bytes]] = set()  # arrived before anyone waited for them

    @staticmethod
    def _check(result: int, what: str, path: str = "") -> int:
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}", path)
        return result

    def add_watch(self, path: str, mask: int = IN_MOVED_TO | IN_CLOSE_WRITE) -> int:
        return self._check(
            self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask), "inotify_add_watch", path
        )

    def _read(self) -> list[tuple[int, int, bytes]]:
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        events, pos = [], 0
        while pos < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            name = data[pos + _EVENT.size : pos + _EVENT.size + length].rstrip(b"\0")
            events.append((wd, mask, name))
            pos += _EVENT.size + length
        return events

    def wait_for(self, wd: int, name: bytes, deadline: float) -> float | None:
        """perf_counter() when the event for ``name`` in ``wd`` was read; None at ``deadline``."""
        if (wd, name) in self._seen:
            self._seen.discard((wd, name))
            return time.perf_counter()
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            if not self._poll.poll(max(1, math.ceil(left * 1000))):
                continue
            now = time.perf_counter()
            for ev_wd, mask, ev_name in self._read():
                if mask & IN_Q_OVERFLOW:
                    raise RuntimeError("the benchmark's own inotify queue overflowed")
                if ev_wd == wd and ev_name == name:
                    return now
                if ev_name.startswith(TAG.encode()):
                    self._seen.add((ev_wd, ev_name))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the measurement ----------------------------------------------------------------------------


@dataclass
class Samples:
    """Latencies (seconds) of one tool in one pacing; ``lost``: writes that never arrived."""

    latencies: list[float] = field(default_factory=list)
    per_round_p50: list[float] = field(default_factory=list)
    lost: int = 0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1): a value that was measured, not interpolated."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def measure_latencies(src: str, replica: str, dirs: list[str], count: int, *, interval: float = 0.0,
                      tag: str = TAG, seed: int = 0, sizes: tuple[int, int] = (1024, 16384),
                      timeout: float = 30.0) -> tuple[list[float], int]:  # fmt: skip
    """Write ``count`` new files into ``src/dirs[i % len(dirs)]`` and time each until it is
    renamed into place under ``replica``; ``interval`` 0 is back to back, else one write every
    ``interval`` seconds.  Returns (latencies in seconds, number of writes that never arrived
    within ``timeout``).  Every arrival is checked for its size."""
    rng = random.Random(seed)
    latencies: list[float] = []
    lost = 0
    with Inotify() as ino:
        wds = {d: ino.add_watch(os.path.join(replica, d)) for d in dict.fromkeys(dirs)}
        next_at = time.perf_counter()
        for i in range(count):
            if interval:
                wait = next_at - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                next_at = max(next_at + interval, time.perf_counter())
            where = dirs[i % len(dirs)]
            name = f"{tag}-{i:05d}.dat"
            data = rng.randbytes(rng.randrange(*sizes))
            with open(os.path.join(src, where, name), "wb") as f:  # a plain application write
                f.write(data)
            written = time.perf_counter()
            arrived = ino.wait_for(wds[where], name.encode(), written + timeout)
            if arrived is None:
                lost += 1
                continue
            latencies.append(arrived - written)
            got = os.stat(os.path.join(replica, where, name)).st_size
            if got != len(data):
                raise RuntimeError(f"{where}/{name} arrived with {got} bytes, {len(data)} were written")
    return latencies, lost


def remove_written(roots: list[str], dirs: list[str]) -> int:
    """Remove the benchmark's files (names starting with TAG) from ``dirs`` of every root."""
    removed = 0
    for root in roots:
        for d in dict.fromkeys(dirs):
            with os.scandir(os.path.join(root, d)) as it:
                for entry in it:
                    if entry.name.startswith(TAG) and entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
                        removed += 1
    return removed


def pick_dirs(root: str, count: int, seed: int = 4) -> list[str]:
    """``count`` corpus directories (relative), a seeded draw, sorted."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".mirror")
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            found.append(rel)
    if not found:
        return ["."]
    return sorted(random.Random(seed).sample(found, min(count, len(found))))


# -- the tools ----------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_until(
    check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: str | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)  # startup only, never on a measured path
    tail = ""
    if log and os.path.exists(log):
        with open(log, errors="replace") as f:
            tail = f.read()[-2000:]
    raise RuntimeError(f"{what} (exit status {proc.poll() if proc else None}); log tail:\n{tail}")


class Tool:
    """One live mirroring tool on one source/replica pair: start, wait_ready, stop."""

    name = "tool"

    def __init__(self, src: str, dst: str, workdir: str, env: dict | None = None):
        self.src, self.dst, self.workdir = src, dst, workdir
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(workdir, f"{self.name}.log")

    def start(self) -> None:
        raise NotImplementedError

    def wait_ready(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        with open(self.log, "ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env)


class MirrorDaemon(Tool):
    """``mirror daemon SRC DEST``; its state dir is kept outside the source tree so the
    benchmark's trees stay equal to the corpus."""

    name = "mirror-local"

    def __init__(self, src, dst, workdir, env=None, destination: str | None = None, extra=()):
        super().__init__(src, dst, workdir, env)
        self.destination = destination or dst
        self.state_dir = os.path.join(workdir, f"{self.name}-state")
        self.extra = list(extra)

    def start(self) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        status = os.path.join(self.state_dir, "mirror-daemon.status.json")
        if os.path.exists(status):
            os.unlink(status)
        self.proc = self._spawn([*mirror_command(), "daemon", self.src, self.destination,
                                 "--state-dir", self.state_dir, *self.extra])  # fmt: skip

    def _live(self) -> bool:
        try:
            with open(os.path.join(self.state_dir, "mirror-daemon.status.json"), "rb") as f:
                pairs = json.loads(f.read()).get("pairs", [])
        except (OSError, ValueError):
            return False
        return bool(pairs) and pairs[0].get("state") == "live" and pairs[0].get("last_sync") is not None

    def wait_ready(self, timeout: float) -> None:
        _wait_until(self._live, timeout, f"{self.name}: the first sync did not finish", self.proc, self.log)


class MirrorServeDaemon(MirrorDaemon):
    """``mirror daemon`` to a ``mirror serve`` receiver on loopback (started here, kept for
    the whole run: a receiver is a standing service)."""

    name = "mirror-serve"

    def __init__(self, src, dst, workdir, env=None, extra=()):
        super().__init__(src, dst, workdir, env, destination="", extra=extra)
        self.server: subprocess.Popen | None = None
        self.secret = os.path.join(workdir, "secret")

    def start(self) -> None:
        if self.server is None or self.server.poll() is not None:
            with open(self.secret, "w") as f:
                f.write("s4d-benchmark-secret\n")
            os.chmod(self.secret, 0o600)
            port_file = os.path.join(self.workdir, "serve.port")
            if os.path.exists(port_file):
                os.unlink(port_file)
            with open(os.path.join(self.workdir, "mirror-serve-receiver.log"), "ab") as log:
                self.server = subprocess.Popen(
                    [*mirror_command(), "serve", "--listen", "127.0.0.1:0", "--port-file", port_file,
                     "--module", f"m={self.dst}", "--secret-file", self.secret, "-q"],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env,
                )  # fmt: skip
            port = _wait_until(
                lambda: _read_text(port_file).strip(), 30, "mirror serve did not start", self.server
            )
            self.destination = f"mirror://127.0.0.1:{int(port)}/m"
        self.extra = (
            [*self.extra, "--secret-file", self.secret] if "--secret-file" not in self.extra else self.extra
        )
        super().start()

    def close(self) -> None:
        _stop(self.server)
        self.server = None


class Lsyncd(Tool):
    """lsyncd's ``default.rsync`` with ``delay = 0`` (its fastest) to a local target."""

    name = "lsyncd"

    def start(self) -> None:
        conf_dir = tempfile.mkdtemp(prefix="lsyncd-", dir=self.workdir)
        self.status = os.path.join(conf_dir, "status")
        if os.path.exists(self.log):
            os.unlink(self.log)  # readiness is read from this run's log
        conf = os.path.join(conf_dir, "s4d.lua")
        with open(conf, "w") as f:
            f.write(
                "settings {\n"
                f"  logfile = {_lua(self.log)},\n"
                f"  statusFile = {_lua(self.status)},\n"
                "  nodaemon = true,\n"
                "}\n"
                "sync {\n"
                "  default.rsync,\n"
                f"  source = {_lua(self.src)},\n"
                f"  target = {_lua(self.dst)},\n"
                "  delay = 0,\n"
                "  exclude = { '.mirror' },\n"  # the replica's state dir (mirror's receiver)
                "  rsync = { archive = true },\n"  # -a: modes, owners, times, as mirror keeps them
                "}\n"
            )
        self.proc = subprocess.Popen(["lsyncd", "-nodaemon", conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)  # fmt: skip

    def _started(self) -> bool:
        text = _read_text(self.log)
        return "Startup of" in text and "finished" in text.split("Startup of", 1)[1]

    def wait_ready(self, timeout: float) -> None:
        _wait_until(self._started, timeout, "lsyncd: its startup sync did not finish", self.proc, self.log)


def _lua(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# -- the run ------------------------------------------------------------------------------------


def prepare_pair(corpus: str, workdir: str) -> tuple[str, str]:
    """WORKDIR/src and WORKDIR/dst, made with ``cp -a`` from ``corpus`` if missing (without the
    corpus's state dir).  Real copies, not hard links: a file with several links is compared
    and sent as a hard link by mirror, which would measure something else."""
    pair = []
    for name in ("src", "dst"):
        path = os.path.join(workdir, name)
        if not os.path.isdir(path):
            print(f"# copying {corpus} -> {path} (cp -a)", file=sys.stderr)
            subprocess.run(["cp", "-a", corpus, path + ".part"], check=True)
            shutil.rmtree(os.path.join(path + ".part", ".mirror"), ignore_errors=True)
            os.rename(path + ".part", path)
        pair.append(path)
    return pair[0], pair[1]


class MirrorReconcilingDaemon(MirrorDaemon):
    """``mirror-local`` with ``--reconcile-interval``: its whole-tree compares run among the writes."""

    name = "mirror-reconcile"


def make_tool(name: str, src: str, dst: str, workdir: str, env: dict, reconcile_interval: float = 1.0) -> Tool:
    if name == "mirror-local":
        return MirrorDaemon(src, dst, workdir, env)
    if name == "mirror-reconcile":
        return MirrorReconcilingDaemon(src, dst, workdir, env, extra=("--reconcile-interval", f"{reconcile_interval:g}"))
    if name == "mirror-serve":
        return MirrorServeDaemon(src, dst, workdir, env)
    if name == "lsyncd":
        return Lsyncd(src, dst, workdir, env)
    raise SystemExit(f"unknown tool {name!r} (known: {', '.join(TOOLS)}, mirror-reconcile)")


def run(args) -> dict:
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    src, dst = prepare_pair(os.path.abspath(args.corpus), workdir) if args.corpus else (
        os.path.join(workdir, "src"), os.path.join(workdir, "dst"))  # fmt: skip
    names = [t for t in args.tools.split(",") if t]
    if "lsyncd" in names and not (have("lsyncd") and have("rsync")):
        names.remove("lsyncd")
    env = dict(os.environ, MIRROR_REQUIRE_FAST="1")
    env.pop("PYTHONPATH", None)
    tools = [make_tool(n, src, dst, workdir, env, args.reconcile_interval) for n in names]
    dirs = pick_dirs(src, args.dirs)
    remove_written([src, dst], dirs)
    modes = {"back-to-back": (args.back_to_back, 0.0), "paced": (args.paced, args.interval)}
    results = {t.name: {m: Samples() for m in modes} for t in tools}
    startup: dict[str, list[float]] = {t.name: [] for t in tools}
    try:
        for round_no in range(args.rounds):
            order = tools[round_no % len(tools) :] + tools[: round_no % len(tools)]
            for tool in order:
                started = time.perf_counter()
                tool.start()
                try:
                    tool.wait_ready(args.ready_timeout)
                    # A probe write proves the tool is following events, not still starting.
                    _, lost = measure_latencies(
                        src, dst, dirs, 3, tag=f"{TAG}probe-r{round_no}", timeout=args.ready_timeout
                    )
                    if lost:
                        raise RuntimeError(f"{tool.name}: probe writes did not arrive")
                    startup[tool.name].append(time.perf_counter() - started)
                    for mode, (count, interval) in modes.items():
                        if not count:
                            continue
                        lat, lost = measure_latencies(src, dst, dirs, count, interval=interval,
                                                      tag=f"{TAG}-r{round_no}-{mode}", seed=round_no,
                                                      timeout=args.timeout)  # fmt: skip
                        s = results[tool.name][mode]
                        s.latencies += lat
                        s.lost += lost
                        if lat:
                            s.per_round_p50.append(statistics.median(lat))
                        print(f"# round {round_no + 1} {tool.name:13s} {mode:12s} n={len(lat):4d} "
                              f"p50 {1000 * statistics.median(lat):7.2f} ms  p99 {1000 * percentile(lat, 0.99):7.2f} ms"
                              + (f"  LOST {lost}" if lost else ""), file=sys.stderr, flush=True)  # fmt: skip
                finally:
                    tool.stop()
                    remove_written([src, dst], dirs)
    finally:
        for tool in tools:
            tool.stop()
            if isinstance(tool, MirrorServeDaemon):
                tool.close()
    return {
        "corpus": args.corpus, "files_in_tree": count_files(src) if args.count_files else None, "dirs": dirs,
        "rounds": args.rounds, "interval": args.interval, "startup_seconds": startup,
        "results": {t: {m: s.__dict__ for m, s in by_mode.items()} for t, by_mode in results.items()},
    }  # fmt: skip


def count_files(root: str) -> int:
    total = 0
    for _, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".mirror"]
        total += len(names)
    return total


def report(data: dict) -> str:
    results = data["results"]
    lines = ["| tool | pacing | writes | lost | p50 ms | p99 ms | max ms | p50 per round ms | "
             "p50 ratio vs lsyncd | p99 ratio vs lsyncd |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]  # fmt: skip
    for tool, by_mode in results.items():
        for mode, s in by_mode.items():
            lat = s["latencies"]
            if not lat:
                continue
            p50, p99 = statistics.median(lat), percentile(lat, 0.99)
            ratio50 = ratio99 = "-"
            peer = results.get(PEER, {}).get(mode, {}).get("latencies")
            if peer and tool != PEER:
                ratio50 = f"{p50 / statistics.median(peer):.2f}"
                ratio99 = f"{p99 / percentile(peer, 0.99):.2f}"
            rounds = ", ".join(f"{1000 * v:.2f}" for v in s["per_round_p50"])
            lines.append(f"| {tool} | {mode} | {len(lat)} | {s['lost']} | {1000 * p50:.2f} | {1000 * p99:.2f} | "
                         f"{1000 * max(lat):.2f} | {rounds} | {ratio50} | {ratio99} |")  # fmt: skip
    return "\n".join(lines)


def plot(data: dict, path: str, title: str = "") -> None:
    """Both pacings side by side: each tool's latency CDF on a log time axis."""
    try:
        import matplotlib
    except ImportError:
        print("# no plot: matplotlib is not installed (pip install '.[bench]')", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, StrMethodFormatter

    modes = [
        m
        for m in ("back-to-back", "paced")
        if any(by.get(m, {}).get("latencies") for by in data["results"].values())
    ]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
    styles = {
        "mirror-local": ("tab:blue", "-"),
        "mirror-serve": ("tab:green", "--"),
        "lsyncd": ("tab:red", "-"),
    }
    for ax, mode in zip(axes[0], modes, strict=True):
        for tool, by_mode in data["results"].items():
            lat = sorted(1000 * v for v in by_mode.get(mode, {}).get("latencies", []))
            if not lat:
                continue
            y = [(i + 1) / len(lat) for i in range(len(lat))]
            color, style = styles.get(tool, (None, "-"))
            ax.step(lat, y, where="post", color=color, linestyle=style,
                    label=f"{tool} (p50 {statistics.median(lat):.1f}, p99 {percentile(lat, 0.99):.1f} ms)")  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("write closed on the source -> file renamed into place on the replica (ms)")
        ax.set_ylabel("fraction of writes")
        ax.set_title(
            f"{mode}" + (f", one write every {1000 * data['interval']:.0f} ms" if mode == "paced" else "")
        )
        ax.grid(True, alpha=0.3)
        ax.axhline(0.5, color="grey", linewidth=0.6)
        ax.axhline(0.99, color="grey", linewidth=0.6)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="the tree to copy (cp -a) into WORKDIR/src and WORKDIR/dst when missing")
    ap.add_argument("--workdir", help="holds src, dst, the tools' state, configs and logs")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--reconcile-interval", type=float, default=1.0,
                    help="mirror-reconcile: seconds between its whole-tree compares (default 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--back-to-back", type=int, default=60, help="back-to-back writes per tool per round")
    ap.add_argument("--paced", type=int, default=20, help="paced writes per tool per round")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between paced writes (default 0.1)")
    ap.add_argument("--dirs", type=int, default=16, help="corpus directories the writes go to")
    ap.add_argument("--timeout", type=float, default=30.0, help="a write not arrived by then counts as lost")
    ap.add_argument("--ready-timeout", type=float, default=900.0, help="limit for a tool's initial sync")
    ap.add_argument("--count-files", action="store_true", help="count the tree's files for the report")
    ap.add_argument("--json", help="save the raw latencies here")
    ap.add_argument("--plot", help="PNG of both latency distributions")
    ap.add_argument("--title", default="")
    ap.add_argument("--replot", metavar="JSON", help="only make --plot (and the table) from saved results")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            data = json.load(f)
    else:
        if not args.workdir:
            ap.error("--workdir is required")
        data = run(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(data, f)
    print(report(data))
    if args.plot:
        plot(data, args.plot, args.title)
        print(f"# plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.exit(errno.EPIPE)
