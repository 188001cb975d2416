"""Every row of the fault table, for real: two hawrap nodes and a client in network
namespaces, a TCP service as a resource, the client connecting to the VIP every 20 ms.

Each scenario asserts who holds the VIP, that exactly one node serves (the client's answers
come from that node), the roles, and the locks.  Failures are injected at a random point of
the heartbeat cycle.  Outages are printed (speed is measured in benchmarks/, not asserted).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

import pytest
from helpers import PollingThread
from lab import VIP, Hawrap, Probe, first_answer_after, outages, require, wait_for, write_config

INTERVAL = 0.05  # the default heartbeat interval


class Cluster:
    def __init__(self, lab, rng, extra: str = "", timing: str = "", start: bool = True):
        self.lab, self.rng = lab, rng
        self.config = write_config(lab, extra=extra, timing=timing)
        self.h = Hawrap(lab, self.config)
        self.probe: Probe | None = None
        if start:
            self.h.start("a")
            self.h.start("b")
            self.expect_roles(primary="a", other="secondary")
            self.probe = Probe(lab)
            self.served_by("a")

    def stop(self) -> None:
        """The client's probes, then hawrap on both nodes."""
        if self.probe:
            self.probe.stop()
        for node in ("a", "b"):
            self.h.stop(node)

    def random_phase(self) -> float:
        """Sleep a random part of the heartbeat cycle; return the injection time."""
        time.sleep(self.rng.uniform(0, INTERVAL))
        return time.monotonic()

    def expect_roles(self, primary: str, other: str, timeout: float = 20.0) -> None:
        second = "b" if primary == "a" else "a"
        ok = wait_for(lambda: self.h.role(primary) == "primary" and self.h.role(second) == other, timeout)
        assert ok, (
            f"expected {primary} primary and {second} {other}; got {self.h.role('a')}/{self.h.role('b')}\n{self.h.logs()}"
        )

    def served_by(self, node: str, since: float | None = None, n: int = 10, timeout: float = 10.0) -> None:
        """The last ``n`` probes (after ``since``) were all answered by ``node``."""
        since = time.monotonic() if since is None else since

        def check():
            rs = [r for r in self.probe.results() if r.start >= since]
            return len(rs) >= n and all(r.answer == node for r in rs[-n:])

        assert wait_for(check, timeout), (
            f"client not served by {node}: {[r.answer for r in self.probe.results()[-20:]]}\n{self.h.logs()}"
        )

    def only_vip_holder(self, node: str, powered=("a", "b")) -> None:
        for other in powered:
            assert self.lab.vip_on(other) == (other == node), f"VIP on {other}: {self.lab.vip_on(other)}"

    def notified(self, text: str, timeout: float = 5.0) -> bool:
        path = os.path.join(self.lab.workdir, "notify.log")
        return bool(wait_for(lambda: os.path.exists(path) and text in open(path).read(), timeout))

    def transitions(self, node: str) -> list[str]:
        return [f"{t['from']}->{t['to']}" for t in self.h.status(node)["transitions"]]

    def report(self, label: str, t0: float, node: str) -> None:
        first = first_answer_after(self.probe.results(), t0, node)
        gaps = [(round(a - t0, 3), round(b - t0, 3)) for a, b in outages(self.probe.results()) if b >= t0]
        print(f"{label}: first answer from {node} {first.end - t0:.3f} s after injection; outages {gaps}")

    def no_failed_probe_since(self, t0: float) -> None:
        failed = [r for r in self.probe.results() if r.start >= t0 and r.answer is None]
        assert not failed, f"{len(failed)} probes failed after {t0}: {failed[:3]}"


@pytest.fixture
def cluster(lab, rng):
    c = Cluster(lab, rng)
    yield c
    c.stop()


@pytest.mark.parametrize("arp", ["builtin", "arping-tool"])
def test_primary_killed(lab, rng, arp):
    if arp == "arping-tool":
        require("arping")
    c = Cluster(lab, rng, start=False)
    if arp == "arping-tool":
        if shutil.which("arping") is None:
            pytest.skip("arping is not installed (Debian: arping; see packaging/debian-packages.txt)")
        with open(c.config) as f:
            text = f.read().replace(f'address = "{VIP}/24"', f'address = "{VIP}/24"\narping = "auto"')
        with open(c.config, "w") as f:
            f.write(text)
    c.h.start("a")
    c.h.start("b")
    c.expect_roles(primary="a", other="secondary")
    c.probe = Probe(lab)
    c.served_by("a")
    try:
        t0 = c.random_phase()
        lab.power_off("a")
        assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
        c.served_by("b", since=t0)
        c.only_vip_holder("b", powered=("b",))
        c.report(f"primary killed ({arp})", t0, "b")
        st = c.h.status("b")
        assert st["epoch"] > 1 and st["owns_epoch"] and not st["peer"]["alive"]
        assert c.notified("lab/b MASTER")
        # the dead node boots again: it missed a takeover, so it fences itself (standby lock)
        lab.power_on("a")
        c.h.start("a")
        assert wait_for(lambda: c.h.role("a") == "standby", 15), c.h.logs()
        assert "missed" in c.h.status("a")["reason"] or "took over" in c.h.status("a")["reason"]
        c.only_vip_holder("b")
        assert c.h.role("b") == "primary"
        c.served_by("b")
    finally:
        c.probe.stop()
        c.h.stop("a")
        c.h.stop("b")


def test_lan_down_on_primary(cluster):
    c = cluster
    t0 = c.random_phase()
    c.lab.link("a", "lan0", False)
    assert wait_for(lambda: c.h.role("a") == "standby" and c.h.role("b") == "primary", 10), c.h.logs()
    c.served_by("b", since=t0)
    c.only_vip_holder("b")
    st = c.h.status("a")
    assert st["standby_lock"] and "LAN" in st["standby_lock"]["reason"]
    assert st["peer"]["alive"] and st["links"]["hb"]  # still heard on the heartbeat link
    assert "secondary->primary" in c.transitions("b")
    assert c.notified("lab/a FAULT") and c.notified("lab/b MASTER")
    c.report("LAN down on primary", t0, "b")


def test_lan_down_on_standby(cluster):
    c = cluster
    t0 = c.random_phase()
    c.lab.link("b", "lan0", False)
    assert wait_for(lambda: c.h.role("b") == "standby", 10), c.h.logs()
    assert c.h.status("b")["standby_lock"]
    time.sleep(1.0)  # the primary must not be disturbed at all
    assert c.h.role("a") == "primary"
    c.only_vip_holder("a")
    c.served_by("a")
    c.no_failed_probe_since(t0)


def test_heartbeat_link_down_only(cluster):
    c = cluster
    t0 = c.random_phase()
    c.lab.link("a", "hb0", False)
    assert c.notified("lab/a MASTER 1 link-down") and c.notified("lab/b BACKUP 1 link-down"), c.h.logs()
    end = time.monotonic() + 1.5
    while time.monotonic() < end:  # both carry on
        assert c.h.role("a") == "primary" and c.h.role("b") == "secondary"
        time.sleep(0.1)
    st = c.h.status("b")
    assert st["links"] == {"hb": False, "lan": True}
    c.only_vip_holder("a")
    c.no_failed_probe_since(t0)
    c.lab.link("a", "hb0", True)
    assert c.notified("link-up heartbeat link hb restored")


def test_partition_node_without_ping_node_does_not_take_over(cluster):
    c = cluster
    t0 = c.random_phase()
    # b: carrier stays up, but neither the peer nor the ping node can be reached
    c.lab.link("a", "hb0", False)
    c.lab.lan_port("b", False)
    assert wait_for(lambda: c.h.status("b")["lan"]["ok"] is False, 10), c.h.logs()
    assert c.notified("lan-unhealthy"), c.h.logs()  # b cannot tell whose fault it is: it waits
    time.sleep(1.5)  # past lan_hold: b must neither serve nor lock itself out
    assert c.h.role("b") == "secondary" and not c.h.status("b")["standby_lock"]
    assert "secondary->primary" not in c.transitions("b")
    assert c.h.role("a") == "primary"
    c.only_vip_holder("a")
    c.no_failed_probe_since(t0)
    # heal: b is a secondary again by itself, a keeps serving
    c.lab.lan_port("b", True)
    c.lab.link("a", "hb0", True)
    assert wait_for(lambda: c.h.status("b")["lan"]["ok"] and c.h.status("b")["peer"]["alive"], 10), c.h.logs()
    assert c.h.role("b") == "secondary" and c.h.role("a") == "primary"
    c.only_vip_holder("a")


def test_partition_primary_loses_ping_node(cluster):
    c = cluster
    t0 = c.random_phase()
    c.lab.link("a", "hb0", False)
    c.lab.lan_port("a", False)
    assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
    # a hears neither its peer nor the ping node: it stops serving (no standby lock: it could
    # have been the peer that died along with the ping node)
    assert wait_for(lambda: c.h.role("a") == "secondary" and not c.lab.vip_on("a"), 10), c.h.logs()
    c.served_by("b", since=t0)
    c.report("partition, primary cut off", t0, "b")
    c.lab.lan_port("a", True)
    c.lab.link("a", "hb0", True)
    # healed: a served in an epoch of its own before the cut, b took over after it: the
    # administrator must look at a before it is mirrored over
    assert wait_for(lambda: c.h.role("a") == "standby", 10), c.h.logs()
    assert "took over" in c.h.status("a")["reason"]
    c.only_vip_holder("b")
    assert c.h.role("b") == "primary"


def test_restart_with_standby_lock_and_push_back(cluster):
    c = cluster
    c.lab.link("a", "lan0", False)
    assert wait_for(lambda: c.h.role("a") == "standby" and c.h.role("b") == "primary", 10), c.h.logs()
    c.lab.link("a", "lan0", True)
    c.h.stop("a")
    c.h.start("a")
    assert wait_for(lambda: c.h.role("a") == "standby", 10), c.h.logs()
    time.sleep(1.5)  # past initdead: it must still not serve
    assert c.h.role("a") == "standby" and c.h.role("b") == "primary"
    c.only_vip_holder("b")
    c.served_by("b")
    # someone makes the standby node serve anyway: address plus a gratuitous ARP that
    # points the client at it
    t0 = time.monotonic()
    c.lab.run_in("a", "ip", "addr", "add", f"{VIP}/24", "dev", "lan0")
    c.lab.run_in("a", sys.executable, "-c", f"from hawrap import arp; arp.gratuitous('lan0', '{VIP}')")
    assert c.notified("push-back"), c.h.logs()
    assert wait_for(lambda: not c.lab.vip_on("a"), 10), c.h.logs()
    c.served_by("b", since=t0)
    c.only_vip_holder("b")
    assert c.h.role("b") == "primary" and c.h.role("a") == "standby"


def test_resume_then_failback(cluster):
    c = cluster
    c.lab.link("a", "lan0", False)
    assert wait_for(lambda: c.h.role("a") == "standby" and c.h.role("b") == "primary", 10), c.h.logs()
    r = c.h.cli("a", "resume")
    assert r.returncode == 1 and "LAN unhealthy" in r.stderr  # the administrator's check failed
    c.lab.link("a", "lan0", True)
    assert wait_for(lambda: c.h.status("a")["lan"]["ok"], 10)
    r = c.h.cli("a", "resume")
    assert r.returncode == 0, r.stderr
    c.expect_roles(primary="b", other="secondary")
    assert c.notified("lab/b MASTER") and c.notified(" resync ")
    t0 = time.monotonic()
    r = c.h.cli("a", "failback")
    assert r.returncode == 0, r.stdout + r.stderr
    c.expect_roles(primary="a", other="secondary")
    c.served_by("a", since=t0)
    c.only_vip_holder("a")
    c.report("failback", t0, "a")


def test_planned_failover_and_back(cluster):
    c = cluster
    t0 = time.monotonic()
    r = c.h.cli("a", "failover")
    assert r.returncode == 0, r.stdout + r.stderr
    c.expect_roles(primary="b", other="secondary")
    c.served_by("b", since=t0)
    c.only_vip_holder("b")
    c.report("planned failover", t0, "b")
    assert "primary->releasing" in c.transitions("a") and "releasing->secondary" in c.transitions("a")
    assert not c.h.status("b")["standby_lock"]
    t1 = time.monotonic()
    r = c.h.cli("b", "failover")
    assert r.returncode == 0, r.stdout + r.stderr
    c.expect_roles(primary="a", other="secondary")
    c.served_by("a", since=t1)
    c.only_vip_holder("a")


def test_kill9_of_hawrap_supervisor_removes_the_vip(cluster):
    c = cluster
    pid = c.h.status("a")["pid"]
    t0 = c.random_phase()
    os.kill(pid, signal.SIGKILL)  # the node process only: the machine keeps running
    assert wait_for(lambda: not c.lab.vip_on("a"), 5), c.h.logs()
    assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
    c.served_by("b", since=t0)
    assert wait_for(lambda: c.h.role("a") in ("standby", "secondary"), 10), c.h.logs()
    c.only_vip_holder("b")
    c.report("hawrap killed -9 on the primary", t0, "b")


def test_a_node_restarted_with_another_heartbeat_secret_never_takes_over(cluster):
    """b restarted with another heartbeat secret (a key changed on one node only): neither
    accepts the other's heartbeats, so each hears its peer silent.  a serves on, b never
    takes the VIP (its takeover would stop at the ARP check, and a node that never heard
    its peer is not trusted alone), and each node's status says why it hears nothing."""
    c = cluster
    c.h.stop("b")
    other = os.path.join(c.lab.workdir, "another-secret")
    with open(other, "w") as f:
        f.write(os.urandom(32).hex())
    os.chmod(other, 0o600)
    with open(c.config) as f:
        text = f.read()
    mine = f'secret_file = "{c.lab.workdir}/secret"'
    assert mine in text
    config_b = os.path.join(c.lab.workdir, "hawrap-b.toml")
    with open(config_b, "w") as f:
        f.write(text.replace(mine, f'secret_file = "{other}"'))
    t0 = time.monotonic()
    c.h.config = config_b
    try:
        c.h.start("b")
    finally:
        c.h.config = c.config
    vip_on_b: list[float] = []

    def sample() -> None:
        if c.lab.vip_on("b"):
            vip_on_b.append(time.monotonic())

    hint = "packets from its address fail authentication"
    with PollingThread(sample, interval=0.02) as sampler:
        for node in ("a", "b"):
            assert wait_for(lambda n=node: hint in c.h.cli(n, "status").stdout, 15), c.h.cli(node, "status").stdout
        time.sleep(max(0.0, t0 + 5.0 - time.monotonic()))  # watched well past b's initdead (1 s)
    assert sampler.polls > 50 and vip_on_b == [], f"b held the VIP {len(vip_on_b)} times"
    assert c.h.role("a") == "primary"
    c.no_failed_probe_since(t0)


def test_everything_killed_vip_expires_and_duplicate_check_waits(lab, rng):
    """All of hawrap killed (supervisor too), the host alive: the VIP's lifetime runs out,
    and until then the peer's duplicate check refuses to take an address that still answers."""
    c = Cluster(lab, rng, start=False)
    with open(c.config) as f:
        text = f.read().replace(f'address = "{VIP}/24"', f'address = "{VIP}/24"\nlifetime = 3')
    with open(c.config, "w") as f:
        f.write(text)
    c.h.start("a")
    c.h.start("b")
    try:
        c.expect_roles(primary="a", other="secondary")
        c.probe = Probe(lab)
        c.served_by("a")
        t0 = c.random_phase()
        lab.kill_all("a")  # links stay up: a's kernel keeps answering for the VIP
        assert c.notified("takeover-refused"), c.h.logs()
        assert lab.vip_on("a") and c.h.role("b") == "secondary"
        assert wait_for(lambda: not lab.vip_on("a"), 8), "VIP did not expire"
        assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
        c.served_by("b", since=t0)
        c.only_vip_holder("b")
        c.report("everything killed, lifetime 3 s", t0, "b")
    finally:
        c.probe and c.probe.stop()
        c.h.stop("b")


def test_split_brain_resolves_to_the_higher_epoch(cluster):
    c = cluster
    # a and b cannot reach each other at all, but both reach the ping node and the client
    c.lab.isolate_nodes(True)
    c.lab.link("a", "hb0", False)
    assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
    assert c.h.role("a") == "primary"  # both serve while partitioned: unavoidable here
    epoch_b = c.h.status("b")["epoch"]
    assert epoch_b > c.h.status("a")["epoch"]
    t0 = time.monotonic()
    c.lab.isolate_nodes(False)
    c.lab.link("a", "hb0", True)
    assert wait_for(lambda: c.h.role("a") == "standby", 10), c.h.logs()
    assert "split brain" in c.h.status("a")["reason"]
    assert c.h.role("b") == "primary"
    c.served_by("b", since=t0)
    c.only_vip_holder("b")


def test_status_json_shape(cluster):
    c = cluster
    st = c.h.status("b")
    assert st["role"] == "secondary" and st["peer"]["role"] == "primary" and st["peer"]["alive"]
    assert st["links"] == {"hb": True, "lan": True}
    assert st["lan"] == {"ok": True, "problem": "", "carrier": True, "ping_reachable": ["198.51.100.1"]}
    assert st["vip"] == {"address": f"{VIP}/24", "present": False}
    r = c.h.cli("a", "status")
    assert r.returncode == 0 and "a (lab): primary" in r.stdout and "link hb: up" in r.stdout
    assert json.loads(c.h.cli("a", "status", "--json").stdout)["vip"]["present"] is True


@pytest.mark.slow
def test_soak_repeated_power_losses(cluster):
    """Many power losses of whichever node serves, each followed by a reboot and a resume:
    never two VIP holders, never a takeover missed, the client always ends up served."""
    c = cluster
    primary, other = "a", "b"
    for cycle in range(20):
        t0 = c.random_phase()
        c.lab.power_off(primary)
        assert wait_for(lambda o=other: c.h.role(o) == "primary", 10), f"cycle {cycle}\n{c.h.logs()}"
        c.served_by(other, since=t0)
        c.only_vip_holder(other, powered=(other,))
        c.lab.power_on(primary)
        c.h.start(primary)
        assert wait_for(lambda p=primary: c.h.role(p) == "standby", 15), f"cycle {cycle}\n{c.h.logs()}"
        c.only_vip_holder(other)
        assert c.h.cli(primary, "resume").returncode == 0
        assert wait_for(lambda p=primary: c.h.role(p) == "secondary", 10), f"cycle {cycle}\n{c.h.logs()}"
        c.only_vip_holder(other)
        primary, other = other, primary
