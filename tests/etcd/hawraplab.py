"""Real ``hawrap run`` nodes on the etcd lab: three nodes, a VIP, a TCP service, mirrored trees,
and a client.

Topology: the etcd lab's (``etcdlab``: bridge, n1-n3 with an etcd member each on
203.0.113.0/24) plus a client namespace ``c`` (203.0.113.50) on the same bridge.  The VIP is
203.0.113.100; the service is tests/cluster/tcp_service.py (it answers its node's name); the
client-side checks are tests/cluster/probe.py (a TCP connection to the VIP every 20 ms) and
tests/cluster/sampler.py (every 50 ms: which MACs answer ARP for the VIP, does the service
answer on each node's own address).  Each node mirrors ``data/NODE`` as tree ``data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from etcdlab import ADDR, CLIENT_PORT, NODES, Lab
from netlab import VipWatch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLUSTER_TESTS = os.path.join(os.path.dirname(HERE), "cluster")
CLIENT = "203.0.113.50"
VIP = "203.0.113.100"
SERVICE_PORT = 8080
MIRROR_PORT = 8730
SAMPLE_PERIOD = 0.05


class HawrapLab(Lab):
    """The etcd lab with a client namespace on the bridge."""

    NAMESPACES = (*NODES, "c")

    def _build(self) -> None:
        super()._build()
        self.join_bridge("c", CLIENT)

    def mac(self, node: str) -> str:
        return self.run_in(node, "cat", "/sys/class/net/lan0/address").stdout.strip()

    def node_pids(self, node: str) -> list[int]:
        """The processes of ``node``: those in its namespace, without this test's own looks
        inside it (``ip addr show``, run by the samplers' threads): freezing one of those
        would stop a sampler, not the node."""
        spawned = {p.pid for p in self.procs}
        out = []
        for pid in self.pids(node):
            try:
                with open(f"/proc/{pid}/status") as f:
                    if f"PPid:\t{os.getpid()}\n" in f.read() and pid not in spawned:
                        continue
            except OSError:
                continue  # gone meanwhile
            out.append(pid)
        return out

    def vip_on(self, node: str) -> bool:
        r = self.run_in(node, "ip", "-o", "-4", "addr", "show", "dev", "lan0", check=False)
        return f"inet {VIP}/" in r.stdout


def tree(lab: Lab, node: str) -> str:
    return os.path.join(lab.workdir, "data", node)


def write_config(lab: Lab, ttl: int = 4, stop_budget: float = 0.5, state_dir: str | None = None,
                 require_mount: bool = False, reconcile_interval: float | None = None) -> str:  # fmt: skip
    work = lab.workdir
    secret, mirror_secret = os.path.join(work, "secret"), os.path.join(work, "mirror-secret")
    for path in (secret, mirror_secret):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
    for node in NODES:
        os.makedirs(tree(lab, node), exist_ok=True)
    pidfile = f"{work}/$HAWRAP_NODE.service.pid"
    server = (f"{sys.executable} -I -S {CLUSTER_TESTS}/tcp_service.py --port {SERVICE_PORT} --name $HAWRAP_NODE "
              f"--pidfile {pidfile}")  # fmt: skip
    endpoints = ", ".join(f'"http://{ADDR[n]}:{CLIENT_PORT}"' for n in NODES)
    nodes = "\n".join(
        f'[[node]]\nname = "{n}"\nlan_interface = "lan0"\naddress = {{ lan = "{ADDR[n]}" }}\n' for n in NODES
    )
    command = ", ".join(f'"{c}"' for c in (sys.executable, "-m", "mirror"))
    tree_state = f'state_dir = "{state_dir}"' if state_dir else ""
    notify = os.path.join(work, "notify.sh")
    with open(notify, "w") as f:
        f.write(f'#!/bin/sh\necho "$(date +%s.%N) $HAWRAP_NODE $HAWRAP_EVENT $HAWRAP_MESSAGE" >> {work}/notify.log\n')
    os.chmod(notify, 0o755)
    text = f"""
[cluster]
name = "lab"
backend = "etcd"
secret_file = "{secret}"
state_dir = "{work}/state/{{node}}"

[[link]]
name = "lan"
port = 694

{nodes}
[timing]
monitor_interval = 0.5

[etcd]
endpoints = [{endpoints}]
ttl = {ttl}
stop_budget = {stop_budget}
request_timeout = 0.3
initdead = {ttl}

[vip]
address = "{VIP}/24"

[[service]]
name = "tcp"
shell = true
start = 'setsid {server} >/dev/null 2>&1 < /dev/null &'
stop = 'test -f {pidfile} && kill $(cat {pidfile}); rm -f {pidfile}; exit 0'
monitor = 'test -f {pidfile} && grep -qs "^State:[[:space:]]*[RSD]" /proc/$(cat {pidfile})/status && exit 0 || exit 7'
timeout = 10

[mirror]
command = [{command}]
secret_file = "{mirror_secret}"
port = {MIRROR_PORT}
{f"reconcile_interval = {reconcile_interval}" if reconcile_interval is not None else ""}

[[mirror.tree]]
name = "data"
path = "{work}/data/{{node}}"
lock_file = "{work}/data/{{node}}.mirror.lock"
{tree_state}
{"require_mount = true" if require_mount else ""}

[notify]
command = ["{notify}"]
"""
    path = os.path.join(work, "hawrap.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


class Hawrap:
    """``hawrap run`` (with its supervisor) on each node."""

    def __init__(self, lab: HawrapLab, config: str):
        self.lab = lab
        self.config = config
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, node: str) -> None:
        argv = [sys.executable, "-m", "hawrap", "run", "--config", self.config, "--node", node, "-v"]
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.procs[node] = self.lab.spawn(node, argv, f"hawrap-{node}.log", env=env)

    def kill(self, node: str) -> float:
        """SIGKILL hawrap's whole process group (supervisor, node, mirror processes started in
        it): a crash of hawrap.  The VIP stays on the interface until its lifetime ends; the
        service, started in a session of its own, keeps running (killed here too, as a
        crashed machine's would be)."""
        proc = self.procs[node]
        t = time.monotonic()
        etcd = self.lab.etcd.get(node)
        for pid in self.lab.pids(node):
            if etcd is None or pid != etcd.pid:  # `ip netns exec` execs etcd: the same pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait(10)
        return t

    def leftovers(self, node: str) -> list[str]:
        """The processes running in ``node``'s namespace besides its etcd member (after
        hawrap stopped there: none), with their command lines."""
        etcd = self.lab.etcd.get(node)
        out = []
        for pid in self.lab.pids(node):
            if etcd is not None and pid == etcd.pid:
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    if f"PPid:\t{os.getpid()}\n" in f.read():
                        continue  # the lab's own look inside the namespace (``ip addr show``)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append(f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace").strip())
            except OSError:
                pass  # gone meanwhile
        return out

    def freeze(self, node: str, on: bool) -> None:
        """SIGSTOP / SIGCONT every process of the node, its etcd member included: a paused VM
        (its kernel, which answers ARP for the VIP it holds, keeps running)."""
        for pid in self.lab.node_pids(node):
            try:
                os.kill(pid, signal.SIGSTOP if on else signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self, node: str, timeout: float = 30) -> str:
        """SIGTERM to hawrap (supervisor and node process), SIGKILL to both after ``timeout``.
        Says how it ended: "stopped" is the only orderly way."""
        proc = self.procs.get(node)
        if proc is None:
            return "not started"
        if proc.poll() is not None:
            return f"had exited ({proc.returncode})"
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"killed: still running {timeout:g} s after SIGTERM"
        return "stopped"

    def kill_hawrap(self, node: str) -> None:
        """SIGKILL to hawrap's process group alone (supervisor and node process): the mirror
        processes, in sessions of their own, are not in it."""
        proc = self.procs[node]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def mirror_pids(self, node: str) -> list[int]:
        """The ``mirror`` processes running in ``node``'s namespace."""
        return [int(line.split(":", 1)[0]) for line in self.leftovers(node) if " -m mirror " in line]

    def cli(self, node: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.lab.run_in(node, "env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "hawrap", *args,
                               "--config", self.config, "--node", node, check=False, timeout=timeout)  # fmt: skip

    def status(self, node: str) -> dict | None:
        r = self.cli(node, "status", "--json", timeout=20)
        try:
            st = json.loads(r.stdout)
        except ValueError:
            return None
        return st if st.get("ok") else None

    def role(self, node: str) -> str | None:
        st = self.status(node)
        return st["role"] if st else None


@dataclass
class ProbeResult:
    start: float
    end: float
    answer: str | None


class Client:
    """Both client-side views, from the client's namespace: a TCP probe of the VIP every 20 ms
    (who answers), and the ARP/service sampler every 50 ms (who claims the VIP)."""

    def __init__(self, lab: HawrapLab):
        self.lab = lab
        self.macs = {lab.mac(n): n for n in NODES}
        self.probe_out = os.path.join(lab.workdir, "probe.jsonl")
        self.sampler_out = os.path.join(lab.workdir, "sampler.jsonl")
        self.probe = lab.spawn("c", [sys.executable, f"{CLUSTER_TESTS}/probe.py", "--target", f"{VIP}:{SERVICE_PORT}",
                                     "--interval", "0.02", "--timeout", "0.25", "--out", self.probe_out], "probe.log")  # fmt: skip
        argv = [sys.executable, f"{CLUSTER_TESTS}/sampler.py", "--vip", VIP, "--port", str(SERVICE_PORT),
                "--period", str(SAMPLE_PERIOD), "--out", self.sampler_out]  # fmt: skip
        for n in NODES:
            argv += ["--node", f"{n}={ADDR[n]}"]
        self.sampler = lab.spawn("c", argv, "sampler.log")
        self.vip = VipWatch(lab.vip_on, NODES, SAMPLE_PERIOD)  # the nodes' own view
        self.holding = self.vip.holding

    def stop(self) -> None:
        try:
            self.vip.stop()
        finally:
            for proc in (self.probe, self.sampler):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(10)

    @staticmethod
    def _lines(path: str) -> list[dict]:
        out = []
        try:
            with open(path) as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        except FileNotFoundError:
            pass
        return out

    def probes(self) -> list[ProbeResult]:
        return sorted((ProbeResult(d["start"], d["end"], d["answer"]) for d in self._lines(self.probe_out)),
                      key=lambda r: r.start)  # fmt: skip

    def rounds(self) -> list[dict]:
        return [r for r in self._lines(self.sampler_out) if "arp" in r]

    def answering(self, since: float) -> str | None:
        """The node that answered the newest probe started after ``since``."""
        for r in reversed(self.probes()):
            if r.start >= since and r.answer:
                return r.answer
        return None

    def first_answer_after(self, t: float, not_from: str | None = None) -> ProbeResult | None:
        for r in self.probes():
            if r.start >= t and r.answer and r.answer != not_from:
                return r
        return None

    def check(self, cut_off: frozenset[str] = frozenset()) -> dict:
        """Over the whole run: never two VIP holders as the client sees them (two MACs
        answering ARP in one round), never two nodes' interfaces holding it in one sample
        (``cut_off``: nodes cut from the LAN, whose address nobody can reach, are left out
        of that one), and the samplers never starved."""
        rounds = self.rounds()
        assert rounds and self.holding, "the samplers recorded nothing"
        two_arp = [(r["t"], r["arp"]) for r in rounds if len(r["arp"]) > 1]
        assert not two_arp, f"two nodes answered ARP for the VIP: {two_arp[:5]}"
        both = [(t, sorted(h)) for t, h in self.holding if len(h - cut_off) > 1]
        assert not both, f"the VIP was on two nodes' interfaces: {both[:5]}"
        times = [r["t"] for r in rounds]
        gap = max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)
        assert gap < 0.5, f"the ARP sampler starved: {gap:.2f} s between two rounds"
        return {"rounds": len(rounds), "samples": len(self.holding), "longest_gap": gap}


def write_files(root: str, prefix: str, n: int, size: int = 200) -> dict[str, str]:
    """``n`` files; returns their relative paths and digests (what the client was told is written)."""
    out = {}
    for i in range(n):
        sub = os.path.join(root, f"d{i % 5}")
        os.makedirs(sub, exist_ok=True)
        data = os.urandom(size + i * 13)
        with open(os.path.join(sub, f"{prefix}-{i}.bin"), "wb") as f:
            f.write(data)
        out[os.path.join(f"d{i % 5}", f"{prefix}-{i}.bin")] = hashlib.sha256(data).hexdigest()
    return out


def missing(root: str, files: dict[str, str]) -> list[str]:
    """Which of ``files`` are not in ``root`` with their content."""
    bad = []
    for rel, digest in files.items():
        try:
            with open(os.path.join(root, rel), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    bad.append(rel)
        except FileNotFoundError:
            bad.append(rel)
    return bad
