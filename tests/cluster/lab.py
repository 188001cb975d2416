"""A two-node cluster in network namespaces, for the cluster tests and the S6 benchmark.

Topology (every address, bridge and route lives in namespaces created here; nothing is
added to the host's namespace; every packet is sent from inside a lab namespace):

    <p>-br   bridge br0 with the ping node 198.51.100.1 (the "router"), ports a-lan, b-lan, c-lan
    <p>-a    node a: lan0 198.51.100.11/24 (to the bridge), hb0 203.0.113.1/24 (to node b)
    <p>-b    node b: lan0 198.51.100.12/24,                    hb0 203.0.113.2/24
    <p>-c    client: lan0 198.51.100.50/24; probes the VIP 198.51.100.100 every 20 ms

LAN 198.51.100.0/24 and heartbeat link 203.0.113.0/24 are documentation ranges that never
route anywhere.  ``Lab.close()`` (also run at exit and on failure) kills every process in
the lab's namespaces and deletes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

if os.path.dirname(os.path.dirname(os.path.abspath(__file__))) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

# sh, wait_for and Toggler are re-exported: the cluster tests and S6 take them from here
from netlab import NetLab, Toggler, netns_unavailable, sh, wait_for  # noqa: E402, F401

HERE = os.path.dirname(os.path.abspath(__file__))
LAN_PREFIX = "198.51.100"
PING_NODE = f"{LAN_PREFIX}.1"
VIP = f"{LAN_PREFIX}.100"
CLIENT = f"{LAN_PREFIX}.50"
SERVICE_PORT = 8080
NODE_LAN = {"a": f"{LAN_PREFIX}.11", "b": f"{LAN_PREFIX}.12"}
NODE_HB = {"a": "203.0.113.1", "b": "203.0.113.2"}
HEARTBEAT_PORT = 694


def can_run() -> str | None:
    """None if namespaces can be made here, else why not (for pytest.skip)."""
    if shutil.which("ping") is None:
        return "ping is not installed (Debian: iputils-ping; see packaging/debian-packages.txt)"
    return netns_unavailable(f"hwprobe{os.getpid()}")


def require(*tools: str) -> None:
    """Skip the calling test, naming the tool, when one it needs is not installed."""
    import pytest

    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@dataclass
class ProbeResult:
    start: float  # monotonic, same clock as the test process
    end: float
    answer: str | None  # the node name that answered, None for a failure


class Lab(NetLab):
    def __init__(self, workdir: str, prefix: str | None = None):
        super().__init__(workdir, prefix or f"hw{secrets.token_hex(3)}", ("a", "b", "c"))

    # ------------------------------------------------------------ topology

    def _build(self) -> None:
        self.add_namespaces()
        self.add_bridge()
        sh("ip", "-n", self.ns["br"], "addr", "add", f"{PING_NODE}/24", "dev", "br0")
        for node, addr in (("a", NODE_LAN["a"]), ("b", NODE_LAN["b"]), ("c", CLIENT)):
            self.join_bridge(node, addr)
        self.add_link("hb0", NODE_HB)
        # the LAN answers before anything is started (no DAD on IPv4; bridge learning is instant)
        deadline = time.monotonic() + 10
        while (
            sh(
                "ip", "netns", "exec", self.ns["c"], "ping", "-c", "1", "-W", "1", PING_NODE, check=False
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("lab LAN does not come up")

    # ------------------------------------------------------------ failures

    def lan_port(self, node: str, forwarding: bool) -> None:
        """Block a node's bridge port (its carrier stays up: only the ping node tells)."""
        require("bridge")
        sh(
            "bridge",
            "-n",
            self.ns["br"],
            "link",
            "set",
            "dev",
            f"{node}-lan",
            "state",
            "3" if forwarding else "0",
        )

    def isolate_nodes(self, on: bool) -> None:
        """a and b cannot reach each other over the LAN; both still reach the ping node and the client."""
        require("bridge")
        for node in ("a", "b"):
            sh(
                "bridge",
                "-n",
                self.ns["br"],
                "link",
                "set",
                "dev",
                f"{node}-lan",
                "isolated",
                "on" if on else "off",
            )

    def power_off(self, node: str) -> None:
        """As if the machine lost power: its links go dark and all its processes die."""
        self.link(node, "lan0", False)
        self.link(node, "hb0", False)
        self.kill_all(node)
        self._reap()

    def power_on(self, node: str) -> None:
        """Boot again: addresses as configured at boot (a VIP held before the crash is gone)."""
        sh("ip", "-n", self.ns[node], "addr", "flush", "dev", "lan0")
        sh("ip", "-n", self.ns[node], "addr", "add", f"{NODE_LAN[node]}/24", "dev", "lan0")
        self.link(node, "lan0", True)
        self.link(node, "hb0", True)
        other = "b" if node == "a" else "a"
        if other in self.ns:
            self.link(other, "hb0", True)

    def mac(self, node: str, dev: str = "lan0") -> str:
        return self.run_in(node, "cat", f"/sys/class/net/{dev}/address").stdout.strip()

    def block_heartbeats(self, sender: str, on: bool) -> None:
        """Drop every heartbeat ``sender`` sends to its peer, on every link (one-way loss).

        A policy rule in the sender's namespace matches the UDP heartbeat port only, so the
        mirror traffic (TCP) on the same links still flows."""
        peer = "b" if sender == "a" else "a"
        for pref, addr in ((100, NODE_HB[peer]), (101, NODE_LAN[peer])):
            rule = [
                "rule",
                "del" if not on else "add",
                "to",
                addr,
                "ipproto",
                "udp",
                "dport",
                str(HEARTBEAT_PORT),
                "blackhole",
                "pref",
                str(pref),
            ]
            sh("ip", "-n", self.ns[sender], *rule, check=on)

    def block_ping_replies(self, node: str, on: bool) -> None:
        """The ping node's echo replies to ``node`` are lost (a rule in the bridge's namespace)."""
        pref = 110 if node == "a" else 111
        rule = [
            "rule",
            "add" if on else "del",
            "to",
            NODE_LAN[node],
            "ipproto",
            "icmp",
            "blackhole",
            "pref",
            str(pref),
        ]
        sh("ip", "-n", self.ns["br"], *rule, check=on)

    def block_mirror(self, on: bool, port: int = 8730) -> None:
        """Mirror traffic from a to b is lost (both ways on the mirror port; heartbeats flow)."""
        for node, peer, pref in (("a", "b", 120), ("b", "a", 121)):
            for direction in ("dport", "sport"):
                rule = [
                    "rule",
                    "add" if on else "del",
                    "to",
                    NODE_HB[peer],
                    "ipproto",
                    "tcp",
                    direction,
                    str(port),
                    "blackhole",
                    "pref",
                    str(pref),
                ]
                sh("ip", "-n", self.ns[node], *rule, check=on)

    def vip_on(self, node: str) -> bool:
        r = self.run_in(node, "ip", "-o", "-4", "addr", "show", "dev", "lan0", check=False)
        return f"inet {VIP}/" in r.stdout

    def _reap(self) -> None:
        for proc in self.procs:
            proc.poll()


# ---------------------------------------------------------------- hawrap in the lab


def service_commands(workdir: str) -> dict[str, str]:
    """Start/stop/monitor of the small TCP service (OCF exit codes); pid file per node."""
    pidfile = f"{workdir}/$HAWRAP_NODE.service.pid"
    broken = f"{workdir}/$HAWRAP_NODE.service.broken"  # a test makes the service unable to start
    server = f"{sys.executable} -I -S {HERE}/tcp_service.py --port {SERVICE_PORT} --name $HAWRAP_NODE --pidfile {pidfile}"
    return {
        # the server writes its pid file once it listens; monitor then says running
        "start": f"test -e {broken} && exit 1; setsid {server} >/dev/null 2>&1 < /dev/null &",
        "stop": f"test -f {pidfile} && kill $(cat {pidfile}); rm -f {pidfile}; exit 0",
        # a killed server is a zombie until whoever inherited it reaps it (here PID 1, slowly):
        # kill -0 would still find it, so its state is read instead
        "monitor": f'test -f {pidfile} && grep -qs "^State:[[:space:]]*[RSD]" /proc/$(cat {pidfile})/status && exit 0 || exit 7',
    }


def write_config(lab: Lab, initdead: float = 1.0, extra: str = "", timing: str = "") -> str:
    secret = os.path.join(lab.workdir, "secret")
    with open(secret, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(secret, 0o600)
    notify = os.path.join(lab.workdir, "notify.sh")
    with open(notify, "w") as f:
        f.write(
            f'#!/bin/sh\necho "$(date +%s.%N) $2 $3 $4 $HAWRAP_EVENT $HAWRAP_MESSAGE" >> {lab.workdir}/notify.log\n'
        )
    os.chmod(notify, 0o755)
    svc = service_commands(lab.workdir)
    text = f"""
[cluster]
name = "lab"
secret_file = "{secret}"
home = "a"
ping_nodes = ["{PING_NODE}"]
state_dir = "{lab.workdir}/state/{{node}}"

[[link]]
name = "hb"
port = {HEARTBEAT_PORT}

[[link]]
name = "lan"
port = {HEARTBEAT_PORT}

[[node]]
name = "a"
lan_interface = "lan0"
address = {{ hb = "{NODE_HB["a"]}", lan = "{NODE_LAN["a"]}" }}

[[node]]
name = "b"
lan_interface = "lan0"
address = {{ hb = "{NODE_HB["b"]}", lan = "{NODE_LAN["b"]}" }}

[timing]
initdead = {initdead}
monitor_interval = 0.5
{timing}

[vip]
address = "{VIP}/24"

[[service]]
name = "tcp"
shell = true
start = '{svc["start"]}'
stop = '{svc["stop"]}'
monitor = '{svc["monitor"]}'
timeout = 10

[notify]
command = ["{notify}"]
{extra}
"""
    path = os.path.join(lab.workdir, "hawrap.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


class Hawrap:
    """``hawrap`` on both lab nodes."""

    def __init__(self, lab: Lab, config: str):
        self.lab = lab
        self.config = config
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, node: str, env: dict | None = None) -> None:
        argv = [sys.executable, "-m", "hawrap", "run", "--config", self.config, "--node", node, "-v"]
        self.procs[node] = self.lab.spawn(node, argv, f"hawrap-{node}.log", env=env)

    def stop(self, node: str, timeout: float = 20) -> None:
        proc = self.procs.get(node)
        if proc is None or proc.poll() is not None:
            return
        # the supervisor runs under `ip netns exec`, which execs: proc is the supervisor
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def cli(self, node: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.lab.run_in(
            node,
            sys.executable,
            "-m",
            "hawrap",
            *args,
            "--config",
            self.config,
            "--node",
            node,
            check=False,
            timeout=timeout,
        )

    def status(self, node: str) -> dict | None:
        r = self.cli(node, "status", "--json", timeout=10)
        try:
            st = json.loads(r.stdout)
        except ValueError:
            return None
        return st if st.get("ok") else None

    def role(self, node: str) -> str | None:
        st = self.status(node)
        return st["role"] if st else None

    def pids(self, node: str) -> dict[str, int]:
        """The node's hawrap processes: supervisor, node process, heartbeat process."""
        out = {"supervisor": self.procs[node].pid}
        for pid in _children(out["supervisor"]):
            if "hawrap" in _cmdline(pid):
                out["node"] = pid
                for child in _children(pid):
                    if "hawrap.heartbeat" in _cmdline(child):
                        out["heartbeat"] = child
        return out

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.lab.workdir)):
            if name.endswith(".log"):
                with open(os.path.join(self.lab.workdir, name), errors="replace") as f:
                    out.append(f"==== {name}\n" + f.read()[-6000:])
        return "\n".join(out)


class Probe:
    """The client: a TCP connection to the VIP every ``interval``, each recorded."""

    def __init__(self, lab: Lab, interval: float = 0.02, timeout: float = 0.25, name: str = "probe"):
        self.lab = lab
        self.out = os.path.join(lab.workdir, f"{name}.jsonl")
        argv = [
            sys.executable,
            f"{HERE}/probe.py",
            "--target",
            f"{VIP}:{SERVICE_PORT}",
            "--interval",
            str(interval),
            "--timeout",
            str(timeout),
            "--out",
            self.out,
        ]
        self.proc = lab.spawn("c", argv, f"{name}.log")

    def stop(self) -> list[ProbeResult]:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        return self.results()

    def results(self) -> list[ProbeResult]:
        out = []
        try:
            with open(self.out) as f:
                for line in f:
                    try:
                        d = json.loads(line)
                    except ValueError:
                        continue  # a line being written
                    out.append(ProbeResult(d["start"], d["end"], d["answer"]))
        except FileNotFoundError:
            pass
        return sorted(out, key=lambda r: r.start)


def outages(results: list[ProbeResult], min_gap: float = 0.0) -> list[tuple[float, float]]:
    """(first failed probe start, first later successful probe end) for each run of failures."""
    spans, fail_start = [], None
    for r in results:
        if r.answer is None:
            if fail_start is None:
                fail_start = r.start
        elif fail_start is not None:
            if r.end - fail_start >= min_gap:
                spans.append((fail_start, r.end))
            fail_start = None
    return spans


def first_answer_after(results: list[ProbeResult], t: float, node: str) -> ProbeResult | None:
    for r in results:
        if r.start >= t and r.answer == node:
            return r
    return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- mirrored trees


MIRROR = [sys.executable, "-m", "mirror"]
MIRROR_PORT = 8730


def tree(lab: Lab, node: str) -> str:
    return os.path.join(lab.workdir, "data", node)


def mirror_section(lab: Lab, keys: str = "") -> str:
    """The [mirror] part of the configuration: one tree per node under the lab's workdir;
    ``keys``: more lines of the [mirror] table."""
    secret = os.path.join(lab.workdir, "mirror-secret")
    with open(secret, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(secret, 0o600)
    for node in ("a", "b"):
        os.makedirs(tree(lab, node), exist_ok=True)
    command = ", ".join(f'"{c}"' for c in MIRROR)
    return f"""
[mirror]
command = [{command}]
secret_file = "{secret}"
port = {MIRROR_PORT}
link = "hb"
alert_after = 2.0
{keys}
[[mirror.tree]]
name = "data"
path = "{lab.workdir}/data/{{node}}"
lock_file = "{lab.workdir}/data/{{node}}.mirror.lock"
"""


def snapshot(root: str) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".mirror"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
            except FileNotFoundError:
                pass  # replaced or deleted while we walked
    return out


def write_files(root: str, prefix: str, n: int, size: int = 100) -> None:
    for i in range(n):
        sub = os.path.join(root, f"d{i % 7}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"{prefix}-{i}.bin"), "wb") as f:
            f.write(os.urandom(size + i * 37))
