"""A real three-member etcd cluster in network namespaces, one hamirror member beside each.

Topology (every address, bridge and route lives in namespaces made here; nothing is added
to the host's namespace):

    <p>-br   bridge br0, ports n1-lan, n2-lan, n3-lan
    <p>-n1   lan0 203.0.113.11/24: etcd member e1 (client :2379 on lan0 and loopback, peer :2380)
    <p>-n2   lan0 203.0.113.12/24: etcd member e2
    <p>-n3   lan0 203.0.113.13/24: etcd member e3

A member process (``member.py``) runs ``hawrap.leadership`` in a node's namespace and lists
every etcd endpoint, its own first.  Faults: an etcd member or a member process killed
(SIGKILL), a node cut from the others by an ``ip rule`` blackhole, by its link going down,
or silently by its bridge port blocking.  Data dirs live under the test's tmp dir;
``Lab.close()`` (also at exit) kills everything in the namespaces and deletes them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))  # tests/: the shared namespace helpers

from helpers import PollingThread  # noqa: E402

# sh and wait_for are re-exported: the etcd tests and benchmarks take them from here
from netlab import NetLab, netns_unavailable, sh, wait_for  # noqa: E402, F401

NODES = ("n1", "n2", "n3")
ADDR = {"n1": "203.0.113.11", "n2": "203.0.113.12", "n3": "203.0.113.13"}
LAN = "203.0.113.0/24"
CLIENT_PORT, PEER_PORT = 2379, 2380


def can_run() -> str | None:
    """None if the lab can be built here, else why not (for pytest.skip)."""
    if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
        return "etcd is not installed (Debian: etcd-server, etcd-client)"
    try:
        import etcd3gw  # noqa: F401
    except ImportError:
        return "etcd3gw is not installed (pip install 'hamirror[etcd]')"
    return netns_unavailable(f"h19probe{os.getpid()}")


def endpoints_for(node: str) -> list[str]:
    """Every member's client URL, the node's own first (as a real deployment lists them)."""
    return [f"http://{ADDR[node]}:{CLIENT_PORT}"] + [
        f"http://{ADDR[n]}:{CLIENT_PORT}" for n in NODES if n != node
    ]


class Lab(NetLab):
    NAMESPACES = NODES  # besides the bridge's

    def __init__(self, workdir: str, prefix: str | None = None):
        self.etcd: dict[str, subprocess.Popen] = {}
        super().__init__(workdir, prefix or f"h19{secrets.token_hex(3)}", self.NAMESPACES)

    # ------------------------------------------------------------ topology

    def _build(self) -> None:
        self.add_namespaces()
        self.add_bridge()
        for node in NODES:
            self.join_bridge(node, ADDR[node])
        for node in NODES:
            self.start_etcd(node, new=True)
        if not wait_for(lambda: all(self.etcd_healthy(n) for n in NODES), 30, 0.2):
            raise RuntimeError(f"the etcd cluster did not come up\n{self.logs()}")

    # ------------------------------------------------------------ etcd

    def start_etcd(self, node: str, new: bool = False) -> None:
        name = f"e{node[1:]}"
        cluster = ",".join(f"e{n[1:]}=http://{ADDR[n]}:{PEER_PORT}" for n in NODES)
        argv = [
            "etcd", "--name", name, "--data-dir", os.path.join(self.workdir, f"etcd-{name}"),
            "--listen-client-urls", f"http://{ADDR[node]}:{CLIENT_PORT},http://127.0.0.1:{CLIENT_PORT}",
            "--advertise-client-urls", f"http://{ADDR[node]}:{CLIENT_PORT}",
            "--listen-peer-urls", f"http://{ADDR[node]}:{PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://{ADDR[node]}:{PEER_PORT}",
            "--initial-cluster", cluster, "--initial-cluster-token", self.p,
            "--initial-cluster-state", "new" if new else "existing",
            "--heartbeat-interval", "100", "--election-timeout", "1000", "--pre-vote",
            "--logger", "zap", "--log-level", "warn",
        ]  # fmt: skip
        self.etcd[node] = self.spawn(node, argv, f"etcd-{name}.log")

    def kill_etcd(self, node: str) -> None:
        proc = self.etcd[node]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def etcdctl(self, node: str, *args: str, timeout: float = 10) -> subprocess.CompletedProcess:
        env_args = [
            "env",
            "ETCDCTL_API=3",
            "etcdctl",
            "--endpoints",
            f"http://127.0.0.1:{CLIENT_PORT}",
            "--command-timeout=2s",
        ]
        return self.run_in(node, *env_args, *args, check=False, timeout=timeout)

    def etcd_healthy(self, node: str) -> bool:
        return self.etcdctl(node, "endpoint", "health").returncode == 0

    def etcd_leader(self) -> str | None:
        """The node whose etcd member leads the raft group, by its own status."""
        for node in NODES:
            r = self.etcdctl(node, "endpoint", "status", "-w", "json")
            try:
                st = json.loads(r.stdout)[0]["Status"]
            except (ValueError, LookupError, TypeError):
                continue
            if st["leader"] == st["header"]["member_id"]:
                return node
        return None

    # ------------------------------------------------------------ faults

    def partition(self, node: str, how: str) -> None:
        """Cut ``node`` (its etcd member and its hamirror member) from the other two."""
        if how == "blackhole":
            sh("ip", "-n", self.ns[node], "rule", "add", "to", LAN, "blackhole")
        elif how == "link-down":
            sh("ip", "-n", self.ns[node], "link", "set", "lan0", "down")
        elif how == "bridge-block":  # silent: packets vanish, connections time out
            sh("bridge", "-n", self.ns["br"], "link", "set", "dev", f"{node}-lan", "state", "0")
        else:
            raise ValueError(how)

    def heal(self, node: str, how: str) -> None:
        if how == "blackhole":
            sh("ip", "-n", self.ns[node], "rule", "del", "to", LAN, "blackhole")
        elif how == "link-down":
            sh("ip", "-n", self.ns[node], "link", "set", "lan0", "up")
            sh("ip", "-n", self.ns[node], "addr", "replace", f"{ADDR[node]}/24", "dev", "lan0")
        elif how == "bridge-block":
            sh("bridge", "-n", self.ns["br"], "link", "set", "dev", f"{node}-lan", "state", "3")


# ---------------------------------------------------------------- hamirror members in the lab


@dataclass
class Event:
    t: float  # CLOCK_MONOTONIC: one clock for every process on the machine
    node: str
    event: str
    epoch: int | None = None
    reason: str = ""
    target: str = ""  # prepare_handover's


class Members:
    """A ``member.py`` process per node, each writing its events to ``events-NODE.jsonl``."""

    def __init__(
        self,
        lab: Lab,
        ttl: int = 2,
        stop_budget: float = 0.5,
        stop_delay: float = 0.1,
        prefix: str = "/hamirror/lab",
        handover_timeout: float = 30.0,
        local_only: bool = False,
    ):
        self.lab = lab
        self.ttl, self.stop_budget, self.stop_delay, self.prefix = ttl, stop_budget, stop_delay, prefix
        self.handover_timeout = handover_timeout
        self.local_only = local_only  # each member lists only the etcd member beside it
        self.procs: dict[str, subprocess.Popen] = {}
        self.killed_at: dict[str, list[float]] = {}

    def path(self, what: str, node: str) -> str:
        return os.path.join(self.lab.workdir, f"{what}-{node}")

    def set_position(self, node: str, epoch: int, seq: int) -> None:
        tmp = self.path("position", node) + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{epoch} {seq}\n")
        os.replace(tmp, self.path("position", node))

    def set_standby(self, node: str, on: bool) -> None:
        from mirror import lockfile

        if on:
            lockfile.acquire(self.path("standby.lock", node), reason="test")
        else:
            lockfile.release(self.path("standby.lock", node))

    def endpoints(self, node: str) -> list[str]:
        return endpoints_for(node)[:1] if self.local_only else endpoints_for(node)

    def pause(self, node: str, on: bool) -> None:
        """SIGSTOP / SIGCONT the member process (a frozen VM, a long GC pause)."""
        os.killpg(self.procs[node].pid, signal.SIGSTOP if on else signal.SIGCONT)

    def start(self, node: str) -> None:
        argv = [
            sys.executable, os.path.join(HERE, "member.py"), "--name", node, "--prefix", self.prefix,
            "--ttl", str(self.ttl), "--stop-budget", str(self.stop_budget), "--stop-delay", str(self.stop_delay),
            "--request-timeout", "0.3", "--handover-timeout", str(self.handover_timeout), "--workdir", self.lab.workdir, *sum((["--expect", n] for n in NODES), []), *sum((["--endpoint", e] for e in self.endpoints(node)), []),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.procs[node] = self.lab.spawn(node, argv, f"member-{node}.log", env=env)

    def kill(self, node: str) -> float:
        """SIGKILL the member process (a crash): it serves no more from this instant."""
        proc = self.procs[node]
        t = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.killed_at.setdefault(node, []).append(t)
        try:
            os.unlink(self.path("serving", node))  # a dead process serves nothing
        except FileNotFoundError:
            pass
        return t

    def record(self, node: str) -> dict | None:
        """The member's published record, as etcd holds it (read from inside node's namespace)."""
        r = self.lab.etcdctl(node, "get", f"{self.prefix}/members/{node}", "--print-value-only")
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def resign(self, node: str) -> None:
        os.killpg(self.procs[node].pid, signal.SIGUSR1)

    def failover(self, via: str, to: str, timeout: float = 30.0) -> dict:
        """The administrator's ``failover --to``, run on node ``via``."""
        argv = [sys.executable, os.path.join(HERE, "member.py"), "failover", "--to", to, "--prefix", self.prefix,
                "--timeout", str(timeout), *sum((["--endpoint", e] for e in endpoints_for(via)), [])]  # fmt: skip
        r = self.lab.run_in(via, "env", f"PYTHONPATH={ROOT}", *argv, check=False, timeout=timeout + 30)
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise AssertionError(f"failover command failed: {r.stdout} {r.stderr}") from None

    def stop(self, node: str) -> None:
        proc = self.procs.get(node)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)

    def events(self, node: str | None = None) -> list[Event]:
        out = []
        for n in [node] if node else NODES:
            try:
                with open(self.path("events", n) + ".jsonl") as f:
                    for line in f:
                        try:
                            d = json.loads(line)
                        except ValueError:
                            continue  # a line being written
                        out.append(Event(d["t"], n, d["event"], d.get("epoch"), d.get("reason", ""), d.get("target", "")))
            except FileNotFoundError:
                pass
        return sorted(out, key=lambda e: e.t)

    def wins(self) -> list[Event]:
        return [e for e in self.events() if e.event == "elected"]

    def leader(self) -> str | None:
        """The node serving now, from the events (the last elected not followed by a stop)."""
        serving = self.serving_intervals(open_until=None)
        live = [node for node, start, end in serving if end is None]
        return live[0] if len(live) == 1 else None

    def wait_leader(self, timeout: float = 20.0, not_in: tuple[str, ...] = ()) -> str:
        leader = wait_for(lambda: (lambda x: x if x and x not in not_in else None)(self.leader()), timeout)
        assert leader, f"no leader within {timeout} s (excluding {not_in})\n{self.lab.logs()}"
        return leader

    def serving_intervals(self, open_until: float | None) -> list[tuple[str, float, float | None]]:
        """(node, from, until) per stretch of serving: from ``elected`` (or ``handover_aborted``,
        which takes serving up again), until ``stopped``/``demoted``/``prepare_handover`` (a
        hand-over stops serving before the key moves) was recorded, or the process was killed;
        None (or ``open_until``) while it serves."""
        out = []
        for node in NODES:
            items = [(e.t, e.event) for e in self.events(node)] + [
                (k, "killed") for k in self.killed_at.get(node, [])
            ]
            start = None
            for t, event in sorted(items):
                if event in ("elected", "handover_aborted") and start is None:
                    start = t
                elif event in ("stopped", "demoted", "prepare_handover", "killed") and start is not None:
                    out.append((node, start, t))
                    start = None
            if start is not None:
                out.append((node, start, open_until))
        return out


def overlaps(intervals: list[tuple[str, float, float | None]]) -> list[tuple]:
    """Pairs of terms of different nodes that overlap in time (must be none)."""
    bad = []
    far = float("inf")
    for i, (n1, s1, e1) in enumerate(intervals):
        for n2, s2, e2 in intervals[i + 1 :]:
            if n1 != n2 and s1 < (e2 if e2 is not None else far) and s2 < (e1 if e1 is not None else far):
                bad.append(((n1, s1, e1), (n2, s2, e2)))
    return bad


class Sampler(PollingThread):
    """Who serves, sampled every ``interval`` from the members' marker files (a second view,
    beside the events' exact times): ``max_serving`` must stay at most 1."""

    def __init__(self, members: Members, interval: float = 0.02):
        super().__init__(interval=interval, name="serving-sampler")
        self.members = members
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self.start()

    def sample(self) -> None:
        serving = tuple(n for n in NODES if os.path.exists(self.members.path("serving", n)))
        self.samples.append((time.monotonic(), serving))

    @property
    def max_serving(self) -> int:
        return max((len(s) for _, s in self.samples), default=0)

    def longest_gap(self) -> float:
        times = [t for t, _ in self.samples]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)
