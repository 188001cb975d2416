"""A `mirror serve` under a connection flood: does the primary still get through, and what
does the flood cost the server?

The attacker reaches the port but does not know the secret.  It holds ``--silent``
connections that say nothing and ``--dribble`` connections that send one byte of a
plausible frame every ``--dribble-interval`` seconds; a connection the server drops is
opened again after ``--reconnect`` seconds, so the attacker keeps trying to hold them all.
One thread drives every attacking socket (selectors), so the attacker costs little CPU.

Meanwhile a legitimate `mirror sync` of a small tree runs ``--runs`` times, with and without
the flood (alternately); reported: each one's time (median), and the server's peak RSS
(``VmHWM``) before and under the flood.  Nothing is asserted here (see
``tests/test_server_flood.py`` for what must hold).

    python -m benchmarks.bench_flood [--silent 200 --dribble 200 --runs 5 --files 300]
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.harness import MIRROR

SECRET = b"flood-benchmark-secret-0123456789"


class Flood:
    """``silent`` + ``dribble`` unauthenticated connections to ``port``, kept open (reopened
    ``reconnect`` s after the server drops one) until ``stop()``."""

    def __init__(self, port: int, silent: int, dribble: int, *, dribble_interval: float = 0.5,
                 reconnect: float = 1.0):  # fmt: skip
        self.port = port
        self.dribble_interval = dribble_interval
        self.reconnect = reconnect
        self.kinds = ["silent"] * silent + ["dribble"] * dribble
        self.opened = 0
        self.dropped = 0
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()

    def open_now(self) -> int:
        return len(self._sel.get_map())

    def _open(self, index: int) -> None:
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self._retry[index] = time.monotonic() + self.reconnect
            return
        self.opened += 1
        # A dribbler's frame: a length within the pre-authentication limit, then its bytes
        # one at a time.
        payload = struct.pack(">I", 4000) + b"\x92" + b"x" * 3999 if self.kinds[index] == "dribble" else b""
        self._sel.register(s, selectors.EVENT_READ, [index, payload, time.monotonic()])

    def _run(self) -> None:
        self._retry = {i: 0.0 for i in range(len(self.kinds))}
        while not self._stop.is_set():
            now = time.monotonic()
            for index, when in list(self._retry.items()):
                if when <= now:
                    del self._retry[index]
                    self._open(index)
            for key, _ in self._sel.select(timeout=0.05):
                try:
                    data = key.fileobj.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:  # dropped by the server
                    self._drop(key)
            now = time.monotonic()
            for key in list(self._sel.get_map().values()):
                state = key.data
                if state[1] and now - state[2] >= self.dribble_interval:
                    state[2] = now
                    try:
                        key.fileobj.send(state[1][:1])
                        state[1] = state[1][1:]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        self._drop(key)

    def _drop(self, key) -> None:
        self.dropped += 1
        self._sel.unregister(key.fileobj)
        key.fileobj.close()
        self._retry[key.data[0]] = time.monotonic() + self.reconnect


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start_server(workdir: str, replica: str) -> tuple[subprocess.Popen, int, str]:
    secret = os.path.join(workdir, "secret")
    with open(secret, "wb") as f:
        f.write(SECRET + b"\n")
    os.chmod(secret, 0o600)
    port_file = os.path.join(workdir, "port")
    proc = subprocess.Popen([*MIRROR, "serve", "--listen", "127.0.0.1:0", "--port-file", port_file, "--module",
                             f"m={replica}", "--secret-file", secret], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(workdir, "serve.log"), "ab"))  # fmt: skip
    deadline = time.monotonic() + 30
    while not (os.path.exists(port_file) and open(port_file).read().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("mirror serve did not start")
        time.sleep(0.02)
    return proc, int(open(port_file).read()), secret


def make_tree(root: str, files: int) -> None:
    for i in range(files):
        d = os.path.join(root, f"d{i % 10}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(os.urandom(2000 + i))


def timed_sync(src: str, port: int, secret: str, replica: str) -> float:
    """A first sync of ``src`` into an emptied replica, as a child process; its seconds."""
    for name in os.listdir(replica):
        if name != ".mirror":
            subprocess.run(["rm", "-rf", os.path.join(replica, name)], check=True)
    started = time.perf_counter()
    proc = subprocess.run([*MIRROR, "sync", "--delete", "--allow-mass-delete", "--secret-file", secret, src,
                           f"mirror://127.0.0.1:{port}/m"], capture_output=True)  # fmt: skip
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"the legitimate sync failed: {proc.stderr.decode(errors='replace')}")
    return seconds


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as workdir:
        src, replica = os.path.join(workdir, "src"), os.path.join(workdir, "replica")
        os.makedirs(replica)
        make_tree(src, args.files)
        proc, port, secret = start_server(workdir, replica)
        try:
            timed_sync(src, port, secret, replica)  # warm-up
            quiet, flooded = [], []
            rss_before = rss_kib(proc.pid)
            peak_before = peak_rss_kib(proc.pid)
            flood_peak, flood_rss, held = 0, 0, []
            for _ in range(args.runs):
                quiet.append(timed_sync(src, port, secret, replica))
                flood = Flood(port, args.silent, args.dribble, dribble_interval=args.dribble_interval,
                              reconnect=args.reconnect).start()  # fmt: skip
                try:
                    time.sleep(args.settle)
                    held.append(flood.open_now())
                    flooded.append(timed_sync(src, port, secret, replica))
                    flood_rss = max(flood_rss, rss_kib(proc.pid))
                    flood_peak = max(flood_peak, peak_rss_kib(proc.pid))
                finally:
                    flood.stop()
        finally:
            proc.terminate()
            proc.wait()
    return {
        "files": args.files, "silent": args.silent, "dribble": args.dribble, "runs": args.runs,
        "sync_seconds_quiet": quiet, "sync_seconds_flood": flooded,
        "median_quiet": statistics.median(quiet), "median_flood": statistics.median(flooded),
        "attacking_connections_held": held, "server_rss_kib_before": rss_before,
        "server_peak_rss_kib_before": peak_before, "server_rss_kib_under_flood": flood_rss,
        "server_peak_rss_kib_under_flood": flood_peak,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--silent", type=int, default=200)
    parser.add_argument("--dribble", type=int, default=200)
    parser.add_argument("--dribble-interval", type=float, default=0.5)
    parser.add_argument("--reconnect", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of flood before the sync starts")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--files", type=int, default=300)
    args = parser.parse_args(argv)
    r = run(args)
    print(f"legitimate sync of {r['files']} files: median {r['median_quiet']:.3f} s quiet, "
          f"{r['median_flood']:.3f} s under {r['silent']} silent + {r['dribble']} dribbling connections "
          f"(ratio {r['median_flood'] / r['median_quiet']:.2f}; runs {r['runs']})")  # fmt: skip
    print(f"attacking connections open when each flooded sync started: {r['attacking_connections_held']}")
    print(f"server RSS: {r['server_rss_kib_before'] / 1024:.1f} MiB before, peak "
          f"{r['server_peak_rss_kib_under_flood'] / 1024:.1f} MiB under the flood")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
