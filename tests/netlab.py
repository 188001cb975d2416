"""Network namespaces for the lab tests (tests/cluster/, tests/etcd/) and the benchmarks that
reuse their labs: namespaces around one bridge (its own namespace, ``<prefix>-br``), each node
joined to it by a veth pair, processes started and killed inside them, and everything
removed on ``close()`` (also at exit, for a test run that is interrupted).

Nothing is ever added to the host's namespace: both ends of every veth are created directly
inside their namespaces.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import subprocess
import time

from helpers import PollingThread


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def wait_for(predicate, timeout: float, step: float = 0.05):
    """``predicate()``'s first true value, polled every ``step``; None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(step)


class Toggler(PollingThread):
    """A fault switched on and off at random (Jepsen's nemesis in miniature): on for
    U(*on) seconds, off for U(*off), until ``stop()``, which leaves it off.  ``spans`` are
    the (start, end) monotonic times it was on."""

    def __init__(self, apply, rng: random.Random, on: tuple[float, float], off: tuple[float, float]):
        super().__init__(name="toggler")
        self.apply, self.rng, self.on, self.off = apply, rng, on, off
        self.spans: list[tuple[float, float]] = []
        self.start()

    def sample(self):
        if self.stopping.wait(self.rng.uniform(*self.off)):
            return False
        self.apply(True)
        began = time.monotonic()
        self.stopping.wait(self.rng.uniform(*self.on))
        self.apply(False)
        self.spans.append((began, time.monotonic()))

    def duty(self) -> float:
        if not self.spans:
            return 0.0
        return sum(b - a for a, b in self.spans) / (self.spans[-1][1] - self.spans[0][0] + 1e-9)


class VipWatch(PollingThread):
    """Which of ``nodes`` have the VIP on their interface (``vip_on(node)``), every ``period``
    seconds: ``holding`` lists (time, frozenset of those nodes)."""

    def __init__(self, vip_on, nodes: tuple[str, ...], period: float):
        super().__init__(interval=period, name="vip-watch")
        self.vip_on, self.nodes = vip_on, nodes
        self.holding: list[tuple[float, frozenset[str]]] = []
        self.start()

    def sample(self) -> None:
        t = time.monotonic()
        self.holding.append((t, frozenset(n for n in self.nodes if self.vip_on(n))))


def netns_unavailable(probe: str) -> str | None:
    """None if network namespaces can be made here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "ip is not installed (Debian: iproute2; see packaging/debian-packages.txt)"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns is unavailable here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetLab:
    """Namespaces ``<prefix>-br`` and ``<prefix>-NODE`` for each of ``nodes``; ``_build``
    (in the subclass) lays out the links with the helpers below."""

    def __init__(self, workdir: str, prefix: str, nodes: tuple[str, ...]):
        self.workdir = workdir
        self.p = prefix
        self.ns = {k: f"{prefix}-{k}" for k in ("br", *nodes)}
        self.procs: list[subprocess.Popen] = []
        self.closed = False
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ topology

    def add_namespaces(self) -> None:
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def add_bridge(self) -> None:
        """``br0``, no STP and no forwarding delay: a port forwards as soon as it is up."""
        br = self.ns["br"]
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        sh("ip", "-n", br, "link", "set", "br0", "up")

    def join_bridge(self, node: str, address: str, prefix_len: int = 24) -> None:
        """``lan0`` in the node's namespace, its peer ``NODE-lan`` a port of ``br0``."""
        sh("ip", "link", "add", "lan0", "netns", self.ns[node], "type", "veth", "peer", "name", f"{node}-lan",
           "netns", self.ns["br"])  # fmt: skip
        sh("ip", "-n", self.ns["br"], "link", "set", f"{node}-lan", "master", "br0", "up")
        sh("ip", "-n", self.ns[node], "addr", "add", f"{address}/{prefix_len}", "dev", "lan0")
        sh("ip", "-n", self.ns[node], "link", "set", "lan0", "up")

    def add_link(self, dev: str, addresses: dict[str, str], prefix_len: int = 24) -> None:
        """A direct link ``dev`` between the two nodes named in ``addresses`` (a crossover cable)."""
        (a, addr_a), (b, addr_b) = addresses.items()
        sh(
            "ip",
            "link",
            "add",
            dev,
            "netns",
            self.ns[a],
            "type",
            "veth",
            "peer",
            "name",
            dev,
            "netns",
            self.ns[b],
        )
        for node, addr in ((a, addr_a), (b, addr_b)):
            sh("ip", "-n", self.ns[node], "addr", "add", f"{addr}/{prefix_len}", "dev", dev)
            sh("ip", "-n", self.ns[node], "link", "set", dev, "up")

    # ------------------------------------------------------------ failures

    def link(self, node: str, dev: str, up: bool) -> None:
        """``dev`` in the node's namespace down (its carrier, and its peer's, goes) or up."""
        sh("ip", "-n", self.ns[node], "link", "set", dev, "up" if up else "down")

    def drop_to(self, node: str, address: str, on: bool, pref: int = 200) -> None:
        """Every packet ``node`` sends to ``address`` is lost, TCP's acknowledgements included,
        while the other direction flows (one-way loss): a blackhole policy rule in the node's
        namespace, which no socket there is told about."""
        sh("ip", "-n", self.ns[node], "rule", "add" if on else "del", "to", address, "blackhole", "pref", str(pref),
           check=on)  # fmt: skip

    # ------------------------------------------------------------ processes

    def run_in(
        self, node: str, *argv: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns[node], *argv, check=check, timeout=timeout)

    def spawn(self, node: str, argv: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        """``argv`` in the node's namespace, in a session of its own, output appended to ``log``
        in the work dir.  ``ip netns exec`` execs it: the returned process is ``argv`` itself."""
        out = open(os.path.join(self.workdir, log), "ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[node], *argv],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )  # fmt: skip
        out.close()
        self.procs.append(proc)
        return proc

    def pids(self, node: str) -> list[int]:
        return [int(p) for p in sh("ip", "netns", "pids", self.ns[node], check=False).stdout.split()]

    def kill_all(self, node: str) -> None:
        """SIGKILL every process in the node's namespace, until none is left."""
        for _ in range(50):
            pids = self.pids(node)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        raise RuntimeError(f"processes in {self.ns[node]} survive SIGKILL: {self.pids(node)}")

    def logs(self, tail: int = 4000) -> str:
        out = []
        for name in sorted(os.listdir(self.workdir)):
            if name.endswith(".log"):
                with open(os.path.join(self.workdir, name), errors="replace") as f:
                    out.append(f"==== {name}\n" + f.read()[-tail:])
        return "\n".join(out)

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """Every process started here (its whole group), then anything else left in the
        namespaces, gets SIGKILL; the namespaces are deleted."""
        if self.closed:
            return
        self.closed = True
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for node in self.ns:
            try:
                self.kill_all(node)
            except Exception:
                pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except Exception:
                pass
        for ns in self.ns.values():
            sh("ip", "netns", "del", ns, check=False)
        atexit.unregister(self.close)
