"""``hawrap demo``: two nodes on loopback, no root, in a few seconds.

Both nodes run as real ``hawrap run`` processes (supervisor, node, heartbeat process) with
two heartbeat links over loopback, a dummy virtual IP (a marker file) and a tiny service.
The demo kills the primary with SIGKILL, times the takeover, restarts the dead node (it
comes back in standby: it missed a takeover), resumes it, fails back, and cleans up.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from . import control
from .config import load

SERVICE = {
    "start": "touch \"$HAWRAP_STATE_DIR/service.running\"",
    "stop": "rm -f \"$HAWRAP_STATE_DIR/service.running\"",
    "monitor": "test -f \"$HAWRAP_STATE_DIR/service.running\" && exit 0 || exit 7",
}


def free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_demo_config(workdir: str, addresses=("127.0.0.2", "127.0.0.3"), initdead: float = 1.0, extra: str = "") -> str:
    """A two-node loopback configuration in ``workdir``; returns its path."""
    secret = os.path.join(workdir, "secret")
    with open(secret, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    os.chmod(secret, 0o600)
    hb_port, lan_port = free_udp_port(addresses[0]), free_udp_port(addresses[1])
    a, b = addresses
    text = f"""# written by hawrap demo
[cluster]
name = "demo"
secret_file = "secret"
home = "alpha"
state_dir = "{workdir}/{{node}}"

[[link]]
name = "hb"
port = {hb_port}

[[link]]
name = "lan"
port = {lan_port}

[[node]]
name = "alpha"
lan_interface = "lo"
address = {{ hb = "{a}", lan = "{a}" }}

[[node]]
name = "beta"
lan_interface = "lo"
address = {{ hb = "{b}", lan = "{b}" }}

[timing]
initdead = {initdead}
monitor_interval = 0.5

[vip]
address = "198.51.100.200/24"
kind = "dummy"

[[service]]
name = "demo-service"
shell = true
start = '{SERVICE["start"]}'
stop = '{SERVICE["stop"]}'
monitor = '{SERVICE["monitor"]}'
timeout = 5
{extra}"""
    path = os.path.join(workdir, "hawrap.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


class DemoNode:
    def __init__(self, config: str, name: str, workdir: str, verbose: int = 1):
        self.config, self.name, self.workdir, self.verbose = config, name, workdir, verbose
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.socket = os.path.join(workdir, name, "control.sock")

    def start(self) -> None:
        log = open(self.log_path, "ab")
        argv = [sys.executable, "-m", "hawrap", "run", "--config", self.config, "--node", self.name, *(["-v"] * self.verbose)]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def status(self) -> dict | None:
        try:
            return control.request(self.socket, "status", timeout=5)
        except Exception:
            return None

    def command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "hawrap", *args, "--config", self.config, "--node", self.name],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def kill9(self) -> None:
        """SIGKILL every process of the node (supervisor, node, heartbeat): a dead machine."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_for(predicate, timeout: float, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(step)


def role(node: DemoNode) -> str | None:
    st = node.status()
    return st["role"] if st else None


def run_demo(workdir: str | None = None, verbose: int = 1) -> int:
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="hawrap-demo-")
    os.makedirs(workdir, exist_ok=True)
    config = write_demo_config(workdir)
    nodes = {n: DemoNode(config, n, workdir) for n in ("alpha", "beta")}
    out = print
    ok = True
    try:
        out(f"hawrap demo: two nodes on loopback, files in {workdir}")
        for n in nodes.values():
            n.start()
        primary = wait_for(lambda: next((n for n in nodes.values() if role(n) == "primary"), None), 20)
        if not primary:
            out("no node became primary within 20 s; see the logs")
            return 1
        other = nodes["beta" if primary.name == "alpha" else "alpha"]
        wait_for(lambda: role(other) == "secondary", 10)
        out(f"1. cluster up: {primary.name} is primary, {other.name} is {role(other)}")
        out(other.command("status").stdout.rstrip())

        out(f"\n2. kill -9 every process of {primary.name} (as if it lost power)")
        t0 = time.monotonic()
        primary.kill9()
        took = wait_for(lambda: role(other) == "primary", 10, 0.005)
        elapsed = time.monotonic() - t0
        if not took:
            out(f"   {other.name} did not take over")
            return 1
        out(f"   {other.name} took over in {elapsed * 1000:.0f} ms (dead time {load(config).timing.deadtime:g} s)")

        out(f"\n3. restart {primary.name}: it missed a takeover, so it stays in standby")
        primary.start()
        wait_for(lambda: role(primary) == "standby", 15)
        out(f"   {primary.name}: {role(primary)}; standby lock: {primary.status()['standby_lock']['reason']}")

        out(f"\n4. hawrap resume on {primary.name} (after the administrator's checks)")
        r = primary.command("resume")
        out("   " + (r.stdout or r.stderr).strip())
        wait_for(lambda: role(primary) == "secondary", 10)

        out("\n5. hawrap failback (planned switchover to the home node alpha)")
        r = nodes["alpha"].command("failback")
        out("   " + (r.stdout or r.stderr).strip().replace("\n", "\n   "))
        ok = wait_for(lambda: role(nodes["alpha"]) == "primary" and role(nodes["beta"]) == "secondary", 15) is not None
        out(f"\nsummary: alpha {role(nodes['alpha'])}, beta {role(nodes['beta'])}; takeover after kill -9 in {elapsed * 1000:.0f} ms")
        return 0 if ok else 1
    finally:
        for n in nodes.values():
            n.stop()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
