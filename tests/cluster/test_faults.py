"""Fault injection: the faults users meet, injected into a running two-node cluster with a
mirrored tree, a client probing the VIP every 20 ms and the safety samplers of ``safety.py``
watching every 50 ms (one VIP holder, one running service, no stale ARP announcement).

Each scenario also asserts what the cluster must do about the fault (take over, or not, or
wait for the administrator and say so), that replication resumes by itself within 5 s once
the fault heals, and prints its figures as one JSON line (``HAWRAP_FAULTS_RESULTS=FILE``
appends them there): time to takeover, client outages, role changes, notifications.

The random faults run ``HAWRAP_TRIALS`` times (1 in CI) with a seed printed on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time

import pytest
from helpers import PollingThread
from lab import (
    MIRROR,
    Hawrap,
    Probe,
    Toggler,
    first_answer_after,
    mirror_section,
    outages,
    snapshot,
    tree,
    wait_for,
    write_config,
    write_files,
)
from safety import Safety
from test_failover import Cluster

from hawrap.mirrorctl import engine_available
from mirror.errors import EXIT_OK

TRIALS = int(os.environ.get("HAWRAP_TRIALS", "1"))
RESULTS = os.environ.get("HAWRAP_FAULTS_RESULTS")
REPLICATION_RESUMES = 5.0  # seconds after the fault heals

pytestmark = pytest.mark.skipif(not engine_available(tuple(MIRROR)), reason="needs the mirror engine")


class FaultCluster(Cluster):
    """Cluster (test_failover) with a mirrored tree and the safety samplers."""

    def __init__(self, lab, rng, timing: str = "", start: bool = True):
        super().__init__(lab, rng, start=False)
        self.config = write_config(lab, extra=mirror_section(lab), timing=timing)
        self.h = Hawrap(lab, self.config)
        self.safety: Safety | None = None
        self.serial = 0
        if start:
            self.h.start("a")
            self.h.start("b")
            self.expect_roles(primary="a", other="secondary")
            self.probe = Probe(lab)
            self.safety = Safety(lab)
            self.served_by("a")
            self.replicates("a", "b", timeout=20.0)
            # settled: b knows its copy up to date (a's daemon is live and has said so)
            assert wait_for(lambda: self.h.status("b")["data"]["uptodate"], 10), self.h.logs()

    def start_watching(self) -> None:
        self.probe = self.probe or Probe(self.lab)
        self.safety = self.safety or Safety(self.lab)

    def replicates(self, src: str, dst: str, timeout: float = REPLICATION_RESUMES) -> float:
        """Write a new file on ``src``'s tree; return how long until ``dst`` has it."""
        self.serial += 1
        name = f"probe-{self.serial}.txt"
        body = os.urandom(64).hex()
        with open(os.path.join(tree(self.lab, src), name), "w") as f:
            f.write(body)
        t = time.monotonic()
        target = os.path.join(tree(self.lab, dst), name)

        def arrived():
            try:
                with open(target) as f:
                    return f.read() == body
            except FileNotFoundError:
                return False

        assert wait_for(arrived, timeout, 0.02), (
            f"{name} written on {src} did not reach {dst} within {timeout:g} s\n{self.h.logs()}"
        )
        return time.monotonic() - t

    def epoch(self, node: str) -> int:
        return self.h.status(node)["epoch"]

    def notifications(self, since_wall: float = 0.0) -> list[tuple[str, str, str]]:
        """(node, event, message) of every notification since ``since_wall`` (time.time())."""
        out = []
        path = os.path.join(self.lab.workdir, "notify.log")
        if not os.path.exists(path):
            return out
        with open(path, errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(" ", 5)
                if len(parts) >= 5 and float(parts[0]) >= since_wall:
                    out.append((parts[1].split("/")[-1], parts[4], parts[5] if len(parts) > 5 else ""))
        return out

    def role_changes(self, since_wall: float) -> list[str]:
        roles = {"takeover", "standby", "secondary", "releasing"}
        return [f"{node}:{event}" for node, event, _ in self.notifications(since_wall) if event in roles]

    def record(
        self,
        scenario: str,
        t0: float,
        t0_wall: float,
        healed: float | None = None,
        new_primary: str | None = None,
        **extra,
    ) -> dict:
        results = self.probe.results()
        gaps = [(round(a - t0, 3), round(b - t0, 3)) for a, b in outages(results) if b >= t0]
        figures = {
            "scenario": scenario,
            "fault_seconds": None if healed is None else round(healed - t0, 3),
            "takeover_seconds": None,
            "outages": gaps,
            "longest_outage": max((b - a for a, b in gaps), default=0.0),
            "role_changes": self.role_changes(t0_wall),
            "notifications": sorted({f"{n}:{e}" for n, e, _ in self.notifications(t0_wall)}),
            **extra,
        }
        if new_primary:
            first = first_answer_after(results, t0, new_primary)
            figures["takeover_seconds"] = None if first is None else round(first.end - t0, 3)
        rep = self.safety.report(t0)
        figures["safety_rounds"] = rep.rounds
        print("FIGURES " + json.dumps(figures))
        if RESULTS:
            with open(RESULTS, "a") as f:
                f.write(json.dumps(figures) + "\n")
        return figures

    def close(self) -> None:
        if self.probe:
            self.probe.stop()
        if self.safety:
            self.safety.stop()
        for node in ("a", "b"):
            self.h.stop(node)


@pytest.fixture
def fc(lab, rng):
    c = FaultCluster(lab, rng)
    try:
        yield c
    finally:
        c.close()


def now_both() -> tuple[float, float]:
    return time.monotonic(), time.time()


def no_outage_since(c: FaultCluster, t0: float) -> None:
    failed = [r for r in c.probe.results() if r.start >= t0 and r.answer is None]
    assert not failed, (
        f"{len(failed)} client probes failed after the fault: first at {failed[0].start - t0:.3f} s\n{c.h.logs()}"
    )


def count_files(root: str) -> int:
    return sum(len(files) for path, _, files in os.walk(root) if "/.mirror" not in path)


def kill_service(c: FaultCluster, node: str) -> None:
    with open(os.path.join(c.lab.workdir, f"{node}.service.pid")) as f:
        os.kill(int(f.read()), signal.SIGKILL)


# ---------------------------------------------------------------- pauses (SIGSTOP)


def test_whole_hawrap_paused_on_primary(fc):
    """Supervisor, node and heartbeat process frozen for 3 s: the standby hears nothing,
    but the VIP still answers, so it does not take over, and changes nothing it would
    have to undo (no lock, no epoch, its receiver keeps running)."""
    c = fc
    epoch_b = c.epoch("b")
    t0, w0 = now_both()
    os.killpg(c.h.pids("a")["supervisor"], signal.SIGSTOP)
    time.sleep(3.0)  # the fault's duration
    os.killpg(c.h.pids("a")["supervisor"], signal.SIGCONT)
    healed = time.monotonic()
    assert c.notified("takeover-refused"), c.h.logs()
    c.expect_roles(primary="a", other="secondary")
    assert c.epoch("b") == epoch_b, "a refused takeover left its epoch raised"
    assert c.h.status("b")["mirror"]["direction"] == "receive"
    no_outage_since(c, t0)
    c.replicates("a", "b")
    c.safety.check()
    c.record("whole hawrap paused 3 s on the primary", t0, w0, healed)


def test_heartbeat_process_paused_on_primary(fc):
    """The heartbeat process alone frozen (for good): the node notices its silence and
    replaces it; meanwhile the standby's takeover is refused (the VIP answers)."""
    c = fc
    epoch_b = c.epoch("b")
    old = c.h.pids("a")["heartbeat"]
    t0, w0 = now_both()
    os.kill(old, signal.SIGSTOP)
    assert wait_for(lambda: c.h.pids("a").get("heartbeat") not in (None, old), 10), c.h.logs()
    healed = time.monotonic()
    assert c.notified("heartbeat"), c.h.logs()
    c.expect_roles(primary="a", other="secondary")
    assert wait_for(lambda: c.h.status("b")["peer"]["alive"], 5)
    assert c.epoch("b") == epoch_b
    no_outage_since(c, t0)
    c.replicates("a", "b")
    c.safety.check()
    c.record("heartbeat process frozen on the primary", t0, w0, healed)


def test_node_process_paused_on_primary_with_its_service_dead(fc):
    """The node process frozen (its heartbeat process would go on saying "primary") and
    the service dies: the supervisor's watchdog replaces the frozen node after cleaning up
    (VIP dropped, service stopped), and the standby takes over."""
    c = fc
    t0, w0 = now_both()
    os.kill(c.h.pids("a")["node"], signal.SIGSTOP)
    kill_service(c, "a")
    assert wait_for(lambda: c.h.role("b") == "primary", 15), c.h.logs()
    healed = time.monotonic()
    c.served_by("b", since=t0)
    assert c.notified("watchdog"), c.h.logs()
    assert wait_for(lambda: c.h.role("a") in ("standby", "secondary"), 15), c.h.logs()
    if c.h.role("a") == "standby":
        r = c.h.cli("a", "resume")
        assert r.returncode == EXIT_OK, r.stdout + r.stderr
    c.expect_roles(primary="b", other="secondary")
    c.replicates("b", "a")
    c.safety.check()
    c.record("node process frozen on the primary, service dead", t0, w0, healed, new_primary="b")


# ---------------------------------------------------------------- heartbeat loss


@pytest.mark.parametrize("sender", ["a", "b"])
def test_one_way_heartbeat_loss_on_every_link(fc, sender):
    """One node's heartbeats are lost on every link for 3 s (the other direction works), then
    the loss heals: nobody takes over, nothing changes, replication never stops."""
    c = fc
    epochs = (c.epoch("a"), c.epoch("b"))
    t0, w0 = now_both()
    c.lab.block_heartbeats(sender, True)
    time.sleep(1.0)
    c.replicates("a", "b")  # mirroring goes on during the fault
    time.sleep(2.0)
    c.lab.block_heartbeats(sender, False)
    healed = time.monotonic()
    c.expect_roles(primary="a", other="secondary")
    assert (c.epoch("a"), c.epoch("b")) == epochs
    if sender == "a":
        assert c.notified("takeover-refused"), c.h.logs()
    no_outage_since(c, t0)
    c.replicates("a", "b")
    c.safety.check()
    c.record(f"heartbeats from {sender} lost on every link for 3 s", t0, w0, healed)


def test_random_heartbeat_loss(fc):
    """Heartbeats lost in random bursts in both directions (about 30% of the time):
    bursts longer than the dead time make the standby try, and the VIP check refuse."""
    c = fc
    for trial in range(TRIALS):
        epochs = (c.epoch("a"), c.epoch("b"))
        t0, w0 = now_both()
        togglers = [
            Toggler(lambda on, s=s: c.lab.block_heartbeats(s, on), c.rng, on=(0.05, 0.7), off=(0.4, 1.4))
            for s in ("a", "b")
        ]
        time.sleep(8.0)
        for t in togglers:
            t.stop()
        healed = time.monotonic()
        c.expect_roles(primary="a", other="secondary")
        assert (c.epoch("a"), c.epoch("b")) == epochs
        no_outage_since(c, t0)
        c.replicates("a", "b")
        c.safety.check()
        c.record(
            "random heartbeat loss", t0, w0, healed, trial=trial, duty=[round(t.duty(), 2) for t in togglers]
        )


def test_random_ping_node_reply_loss(fc):
    """The ping node's replies lost in random bursts for each node (about 30% of the time):
    the LAN verdict must hold for timing.lan_hold before anyone steps down, so nobody does."""
    c = fc
    for trial in range(TRIALS):
        t0, w0 = now_both()
        togglers = [
            Toggler(lambda on, n=n: c.lab.block_ping_replies(n, on), c.rng, on=(0.1, 0.6), off=(0.3, 1.3))
            for n in ("a", "b")
        ]
        time.sleep(8.0)
        for t in togglers:
            t.stop()
        healed = time.monotonic()
        c.expect_roles(primary="a", other="secondary")
        for node in ("a", "b"):
            assert not c.h.status(node)["standby_lock"]
        no_outage_since(c, t0)
        c.replicates("a", "b")
        c.safety.check()
        c.record(
            "random ping node reply loss",
            t0,
            w0,
            healed,
            trial=trial,
            duty=[round(t.duty(), 2) for t in togglers],
        )


def test_ping_node_down_for_both(fc):
    """The ping node stops answering both nodes for longer than lan_hold: a fault they share.
    The primary is the last node able to serve: it keeps serving; nobody locks itself out."""
    c = fc
    t0, w0 = now_both()
    for node in ("a", "b"):
        c.lab.block_ping_replies(node, True)
    assert c.notified("lan-unhealthy", timeout=10), c.h.logs()
    time.sleep(1.0)  # well past lan_hold: still nobody steps down
    for node in ("a", "b"):
        c.lab.block_ping_replies(node, False)
    healed = time.monotonic()
    c.expect_roles(primary="a", other="secondary")
    for node in ("a", "b"):
        assert not c.h.status(node)["standby_lock"]
    assert wait_for(lambda: c.h.status("b")["lan"]["ok"], 10)
    no_outage_since(c, t0)
    c.replicates("a", "b")
    c.safety.check()
    c.record("ping node down for both", t0, w0, healed)


# ---------------------------------------------------------------- LAN


def test_lan_flapping_on_primary(fc):
    """The primary's LAN link goes down and up at random, each time for less than
    timing.lan_hold: clients lose it only while the link is down; nobody fails over."""
    c = fc
    t0, w0 = now_both()
    toggler = Toggler(lambda on: c.lab.link("a", "lan0", not on), c.rng, on=(0.1, 0.5), off=(0.4, 1.0))
    time.sleep(6.0)
    toggler.stop()
    healed = time.monotonic()
    c.expect_roles(primary="a", other="secondary")
    assert not c.h.status("a")["standby_lock"]
    c.served_by("a", since=healed)
    for a, b in outages(c.probe.results()):
        if b < t0:
            continue
        assert any(s - 0.05 <= a <= e + 0.3 for s, e in toggler.spans), (
            f"outage {a - t0:.3f}-{b - t0:.3f} s outside the link's down spans"
        )
        assert any(a <= e and b <= e + 1.0 for s, e in toggler.spans if s - 0.05 <= a), (
            f"outage {a - t0:.3f}-{b - t0:.3f} s lasted beyond the fault"
        )
    c.replicates("a", "b")
    c.safety.check()
    c.record("LAN flapping on the primary", t0, w0, healed, down_spans=len(toggler.spans))


# ---------------------------------------------------------------- resources


def test_service_killed_on_a_healthy_primary(fc):
    """The service dies: it alone is restarted, on the same node (the VIP stays put)."""
    c = fc
    t0, w0 = now_both()
    kill_service(c, "a")
    c.served_by("a", since=t0 + 0.1)
    assert c.notified("resource"), c.h.logs()
    c.expect_roles(primary="a", other="secondary")
    assert not any(b for _, b in c.safety.holding if "b" in b)
    c.replicates("a", "b")
    c.safety.check()
    c.record("service killed on the primary", t0, w0, time.monotonic(), new_primary="a")


def test_service_that_cannot_restart_fails_over(fc):
    """The service dies and cannot be started again on this node: the peer takes over."""
    c = fc
    broken = os.path.join(c.lab.workdir, "a.service.broken")
    with open(broken, "w") as f:
        f.write("x")
    t0, w0 = now_both()
    kill_service(c, "a")
    assert wait_for(lambda: c.h.role("b") == "primary", 15), c.h.logs()
    c.served_by("b", since=t0)
    assert c.h.role("a") == "standby" and "tcp" in c.h.status("a")["standby_lock"]["reason"]
    os.unlink(broken)
    r = c.h.cli("a", "resume")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    c.expect_roles(primary="b", other="secondary")
    c.replicates("b", "a")
    c.safety.check()
    c.record("service cannot restart on the primary", t0, w0, time.monotonic(), new_primary="b")


# ---------------------------------------------------------------- replication


def test_replication_link_cut(fc):
    """Mirror traffic lost for 3 s (heartbeats flow): the primary alerts the administrator,
    the standby knows its copy is behind, and replication resumes by itself."""
    c = fc
    t0, w0 = now_both()
    c.lab.block_mirror(True)
    write_files(tree(c.lab, "a"), "during-cut", 5)
    assert wait_for(lambda: c.h.status("b")["data"]["uptodate"] is False, 10), c.h.logs()
    assert c.notified("replication"), c.h.logs()
    c.lab.block_mirror(False)
    healed = time.monotonic()
    c.replicates("a", "b")
    assert wait_for(lambda: snapshot(tree(c.lab, "a")) == snapshot(tree(c.lab, "b")), REPLICATION_RESUMES)
    assert wait_for(lambda: c.h.status("b")["data"]["uptodate"] is True, 10)
    c.expect_roles(primary="a", other="secondary")
    no_outage_since(c, t0)
    c.safety.check()
    c.record("mirror traffic cut for 3 s", t0, w0, healed)


class _Pause:
    """SIGSTOP to what ``pid()`` names now, SIGCONT to that same process when the pause ends
    (one restarted meanwhile is not the one paused); ``group``: its whole process group."""

    def __init__(self, pid, group: bool = False):
        self.pid, self.group, self.paused = pid, group, None

    def __call__(self, on: bool) -> None:
        send = os.killpg if self.group else os.kill
        if on:
            with contextlib.suppress(OSError, ValueError):
                self.paused = self.pid()
                send(self.paused, signal.SIGSTOP)
        elif self.paused is not None:
            with contextlib.suppress(ProcessLookupError):
                send(self.paused, signal.SIGCONT)
            self.paused = None


def _pid_file(c: FaultCluster, node: str, name: str):
    def read() -> int:
        with open(os.path.join(c.lab.workdir, "state", node, name)) as f:
            return int(f.read())

    return read


def _kill(pid):
    def apply(on: bool) -> None:
        if on:
            with contextlib.suppress(OSError, ValueError):
                os.kill(pid(), signal.SIGKILL)

    return apply


def test_random_faults_that_overlap(fc):
    """Jepsen's nemesis: nine faults switched on and off at random, each on its own clock,
    so that they overlap in every order: heartbeats of either node lost, mirror traffic
    lost, a's daemon, b's receiver, and either node's whole hawrap paused, a's daemon and
    b's receiver killed (their supervisors start them again).  Meanwhile a
    client writes a file every 20 ms on a (each whole: written aside, renamed in), and a
    reader polls b's copy.  None of these faults silences the VIP, so the roles and epochs
    never change; b never shows a file other than whole; once the faults stop, every file a
    wrote is on b, b is up to date, and one node held the VIP at every moment."""
    c = fc
    epochs = (c.epoch("a"), c.epoch("b"))
    src, dst = tree(c.lab, "a"), tree(c.lab, "b")
    written: dict[str, bytes] = {}
    torn: list[tuple[str, int]] = []

    def body(name: str) -> bytes:
        return (name * 200).encode()

    def write() -> None:
        name = f"nemesis-{len(written):05d}"
        with open(os.path.join(src, ".tmp-" + name), "wb") as f:
            f.write(body(name))
        os.rename(os.path.join(src, ".tmp-" + name), os.path.join(src, name))
        written[name] = body(name)

    def read() -> None:
        for name in os.listdir(dst):
            if name.startswith("nemesis-"):
                with contextlib.suppress(FileNotFoundError), open(os.path.join(dst, name), "rb") as f:
                    data = f.read()
                    if data != body(name):
                        torn.append((name, len(data)))

    short, calm = (0.2, 3.0), (0.5, 4.0)
    t0, w0 = now_both()
    with PollingThread(write, interval=0.02) as writer, PollingThread(read, interval=0.01) as reader:
        nemesis = [
            Toggler(lambda on: c.lab.block_heartbeats("a", on), c.rng, on=short, off=calm),
            Toggler(lambda on: c.lab.block_heartbeats("b", on), c.rng, on=short, off=calm),
            Toggler(lambda on: c.lab.block_mirror(on), c.rng, on=short, off=calm),
            Toggler(_Pause(_pid_file(c, "a", "mirror-daemon-data.pid")), c.rng, on=(0.5, 4.0), off=calm),
            Toggler(_Pause(_pid_file(c, "b", "mirror-serve.pid")), c.rng, on=(0.5, 4.0), off=calm),
            Toggler(_Pause(lambda: c.h.pids("a")["supervisor"], group=True), c.rng, on=(0.2, 2.0), off=(2.0, 6.0)),
            Toggler(_Pause(lambda: c.h.pids("b")["supervisor"], group=True), c.rng, on=(0.2, 2.0), off=(2.0, 6.0)),
            Toggler(_kill(_pid_file(c, "a", "mirror-daemon-data.pid")), c.rng, on=(0.0, 0.0), off=(2.0, 8.0)),
            Toggler(_kill(_pid_file(c, "b", "mirror-serve.pid")), c.rng, on=(0.0, 0.0), off=(2.0, 8.0)),
        ]
        time.sleep(12.0 * TRIALS)  # the faults' run
        for t in nemesis:
            t.stop()
        healed = time.monotonic()
        writer.stop()
        # everything a wrote reaches b, each file whole, by itself
        assert wait_for(lambda: all(os.path.exists(os.path.join(dst, n)) for n in written), 30, 0.1), c.h.logs()
        reader.wait_polls(2)
    c.expect_roles(primary="a", other="secondary")
    assert (c.epoch("a"), c.epoch("b")) == epochs, "a takeover was tried through a VIP that answered"
    assert reader.polls > 100 and torn == [], f"b showed {len(torn)} files not whole: {torn[:5]}"
    assert snapshot(src) == snapshot(dst)
    assert wait_for(lambda: c.h.status("b")["data"]["uptodate"], 20), c.h.logs()
    c.replicates("a", "b")
    c.safety.check()
    spans = {i: len(t.spans) for i, t in enumerate(nemesis)}
    c.record("nine faults on and off at random, overlapping", t0, w0, healed, files=len(written), faults=spans)


@pytest.mark.parametrize("fault", ["power off", "hawrap killed -9", "LAN down"])
def test_the_primary_fails_while_its_standby_is_outdated(fc, fault):
    """A double fault: mirror traffic is lost (b knows its copy outdated), then the primary
    loses power, or its hawrap is killed -9, or its LAN goes down.  b holds a copy without
    a's last changes: it must not serve it on its own.  Sampled throughout: b never holds
    the VIP, no client is ever answered by b.  Once a is back (booted, restarted by its
    supervisor, or its LAN up) it serves again, and when the mirror traffic flows b gets
    everything and is up to date."""
    c = fc
    c.lab.block_mirror(True)
    write_files(tree(c.lab, "a"), "not-mirrored", 5)
    assert wait_for(lambda: c.h.status("b")["data"]["uptodate"] is False, 10), c.h.logs()
    vip_on_b: list[float] = []

    def sample() -> None:
        if c.lab.vip_on("b"):
            vip_on_b.append(time.monotonic())

    t0, w0 = now_both()
    with PollingThread(sample, interval=0.02) as sampler:
        if fault == "power off":
            c.lab.power_off("a")
        elif fault == "hawrap killed -9":
            os.kill(c.h.status("a")["pid"], signal.SIGKILL)
        else:
            c.lab.link("a", "lan0", False)
        time.sleep(4.0)  # the fault's duration: well past the dead time and lan_hold
        assert c.h.role("b") == "secondary", c.h.logs()
        if fault == "power off":
            c.lab.power_on("a")
            c.h.start("a")
        elif fault == "LAN down":
            c.lab.link("a", "lan0", True)
        healed = time.monotonic()
        c.expect_roles(primary="a", other="secondary")
        c.served_by("a", since=healed)
    assert sampler.polls > 100 and vip_on_b == [], f"b held the VIP {len(vip_on_b)} times"
    assert [r for r in c.probe.results() if r.start >= t0 and r.answer == "b"] == []
    c.lab.block_mirror(False)
    assert wait_for(lambda: snapshot(tree(c.lab, "a")) == snapshot(tree(c.lab, "b")), 30, 0.2), c.h.logs()
    assert wait_for(lambda: c.h.status("b")["data"]["uptodate"], 20), c.h.logs()
    c.safety.check(strict=False)  # a powered-off node's namespace keeps its address until it boots
    c.record(f"{fault} on the primary while its standby is outdated", t0, w0, healed)


def check_kept(root: str, held: dict[str, str], listing: str) -> dict[str, str]:
    """``hawrap resume --keep-local-changes`` copied every listed file the node held, whole
    (each one's digest as the node held it before the resume); returns the copies."""
    [kept] = os.listdir(os.path.join(root, ".mirror", "kept"))
    copies = snapshot(os.path.join(root, ".mirror", "kept", kept))
    listed = {line.strip() for line in listing.split("kept a copy")[0].splitlines() if line.startswith("    ")}
    for path in listed & held.keys():
        assert copies.get(path) == held[path], f"{path}: not kept as held\n{listing}"
    assert all(held.get(path) == digest for path, digest in copies.items()), listing
    shutil.rmtree(os.path.join(root, ".mirror", "kept"))  # the administrator has dealt with it
    return copies


def test_random_failovers_under_writes(fc):
    """Failovers back and forth under a client that writes a whole file every 20 ms to
    whichever node serves, and a reader polling the other node's copy: at a random moment
    the serving node loses power, or its hawrap is killed -9, or its LAN goes down.  Each
    time the other takes over with every file its copy was ever seen to hold (nothing a
    takeover or the returning node's resync removes), the returning node is resumed (what it
    wrote after its last mirrored change, listed, is copied aside with --keep-local-changes,
    whole) and then holds exactly the survivor's tree; epochs only rise; one VIP holder as
    clients see it."""
    c = fc
    writes: dict[str, int] = {"to": 0}  # which tree the client writes to; None while nobody serves
    target: list[str | None] = ["a"]
    seen: dict[str, set[str]] = {"a": set(), "b": set()}  # names each copy was seen holding while receiving
    watching: list[str | None] = ["b"]
    gate = threading.Lock()

    def body(name: str) -> bytes:
        return (name * 100).encode()

    def write() -> None:
        with gate:  # a write under way ends before the target changes
            node = target[0]
            if node is None:
                return False
            writes["to"] += 1
            name = f"client-{writes['to']:05d}"
            root = tree(c.lab, node)
            with open(os.path.join(root, ".tmp-" + name), "wb") as f:
                f.write(body(name))
            os.rename(os.path.join(root, ".tmp-" + name), os.path.join(root, name))

    def aim(node: str | None) -> None:
        with gate:
            target[0] = node

    def read() -> None:
        node = watching[0]
        if node is None:
            return False
        root = tree(c.lab, node)
        for name in os.listdir(root):
            if name.startswith("client-"):
                with contextlib.suppress(FileNotFoundError), open(os.path.join(root, name), "rb") as f:
                    assert f.read() == body(name), f"{node} showed {name} not whole"
                seen[node].add(name)

    primary, other = "a", "b"
    epochs = [c.epoch("a")]
    figures = []
    t_start, w_start = now_both()
    with PollingThread(write, interval=0.02) as writer, PollingThread(read, interval=0.02) as reader:
        for cycle in range(3 * TRIALS):
            fault = c.rng.choice(["power off", "hawrap killed -9", "LAN down"])
            time.sleep(c.rng.uniform(0.2, 2.0))
            reader.wait_polls(1)
            held = set(seen[other])  # what the standby's copy was seen holding before the fault
            t0 = time.monotonic()
            aim(None)
            if fault == "power off":
                c.lab.power_off(primary)
            elif fault == "hawrap killed -9":
                os.kill(c.h.status(primary)["pid"], signal.SIGKILL)
            else:
                c.lab.link(primary, "lan0", False)
            watching[0] = None
            assert wait_for(lambda o=other: c.h.role(o) == "primary", 10), f"cycle {cycle}, {fault}\n{c.h.logs()}"
            took = time.monotonic() - t0
            c.served_by(other, since=t0)
            missing = held - set(os.listdir(tree(c.lab, other)))
            assert not missing, f"cycle {cycle}, {fault}: the new primary lost {sorted(missing)[:5]}"
            aim(other)
            if fault == "power off":
                c.lab.power_on(primary)
                c.h.start(primary)
            elif fault == "LAN down":
                c.lab.link(primary, "lan0", True)
            assert wait_for(lambda p=primary: c.h.role(p) in ("standby", "secondary"), 20), c.h.logs()
            # as the administrator checks before resuming: its LAN is healthy again
            assert wait_for(lambda p=primary: (c.h.status(p) or {}).get("lan", {}).get("ok") is True, 20), c.h.logs()
            kept: dict[str, str] = {}
            held_here = None
            if c.h.role(primary) == "standby":
                held_here = snapshot(tree(c.lab, primary))
                r = c.h.cli(primary, "resume")
                if r.returncode != EXIT_OK:  # it holds what it wrote last: the administrator keeps a copy
                    assert "lacks" in r.stdout, r.stdout + r.stderr
                    r = c.h.cli(primary, "resume", "--keep-local-changes")
                    assert r.returncode == EXIT_OK, r.stdout + r.stderr
                    shown = c.h.cli(primary, "status").stdout
                    assert "kept aside from data: 1 copies" in shown, shown
                    kept = check_kept(tree(c.lab, primary), held_here, r.stdout)
                assert r.returncode == EXIT_OK, r.stdout + r.stderr
            c.expect_roles(primary=other, other="secondary")
            watching[0] = primary
            # the returning node holds the survivor's tree, the client writing on meanwhile
            aim(None)
            assert wait_for(lambda p=primary, o=other: snapshot(tree(c.lab, p)) == snapshot(tree(c.lab, o)), 30, 0.1), (
                f"cycle {cycle}, {fault}\n{c.h.logs()}"
            )
            assert wait_for(lambda p=primary: c.h.status(p)["data"]["uptodate"], 20), c.h.logs()
            missing = seen[other] - set(os.listdir(tree(c.lab, other)))
            assert not missing, f"cycle {cycle}, {fault}: the resync removed {sorted(missing)[:5]} from the primary"
            if held_here is not None:
                # what the client wrote to the returning node and the survivor lacks is copied aside, never
                # replaced without a word (its last writes before the fault included)
                survivor = set(os.listdir(tree(c.lab, other)))
                gone = {p for p in held_here if p.startswith("client-") and p not in survivor}
                assert gone <= kept.keys(), f"cycle {cycle}, {fault}: replaced, not kept: {sorted(gone - kept.keys())}"
            aim(other)
            epochs.append(c.epoch(other))
            figures.append({"fault": fault, "takeover_seconds": round(took, 3), "kept_files": len(kept)})
            primary, other = other, primary
    assert epochs == sorted(set(epochs)), f"epochs did not strictly rise: {epochs}"
    assert writer.polls > 100 and reader.polls > 100
    c.safety.check(strict=False)  # a node powered off or cut off keeps its address until it boots or sees it
    c.record("random failovers under writes", t_start, w_start, cycles=figures)


# ---------------------------------------------------------------- crashes


def test_primary_powered_off(fc):
    """The plain failover (S6) under the samplers: the standby takes over, the old primary
    boots into standby, is resumed, and receives the survivor's changes."""
    c = fc
    t0, w0 = now_both()
    c.lab.power_off("a")
    assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
    c.served_by("b", since=t0)
    write_files(tree(c.lab, "b"), "after-takeover", 5)
    c.lab.power_on("a")
    c.h.start("a")
    assert wait_for(lambda: c.h.role("a") == "standby", 15), c.h.logs()
    r = c.h.cli("a", "resume")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    c.expect_roles(primary="b", other="secondary")
    healed = time.monotonic()
    assert wait_for(lambda: snapshot(tree(c.lab, "a")) == snapshot(tree(c.lab, "b")), REPLICATION_RESUMES), (
        c.h.logs()
    )
    c.safety.check(strict=False)  # a powered-off node's namespace keeps its address until it boots
    c.record("primary powered off", t0, w0, healed, new_primary="b")


def test_primary_killed_during_a_mirror_sync(lab, rng):
    """The primary dies while its replica is still being filled (the initial sync of a large
    tree): the standby's copy is incomplete, so it does not serve it on its own; the
    administrator is told, and ``force-primary`` says what is lost before doing it."""
    c = FaultCluster(lab, rng, start=False)
    try:
        write_files(tree(lab, "a"), "big", 2000, size=30_000)
        total = count_files(tree(lab, "a"))
        c.h.start("a")
        c.h.start("b")
        assert wait_for(lambda: 0 < count_files(tree(lab, "b")) < total, 30, 0.005), (
            "caught no sync in progress"
        )
        c.start_watching()
        t0, w0 = now_both()
        lab.power_off("a")
        assert c.notified("outdated", timeout=10), c.h.logs()
        assert c.h.role("b") == "secondary" and not lab.vip_on("b")
        partial = snapshot(tree(lab, "b"))
        original = snapshot(tree(lab, "a"))
        assert all(original[p] == digest for p, digest in partial.items()), (
            "a torn or foreign file on the replica"
        )
        r = c.h.cli("b", "force-primary")
        assert r.returncode == 1 and "may be lost" in r.stdout + r.stderr, r.stdout + r.stderr
        assert c.h.role("b") == "secondary"
        r = c.h.cli("b", "force-primary", "--accept-data-loss")
        assert r.returncode == EXIT_OK, r.stdout + r.stderr
        assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
        c.served_by("b", since=t0)
        forced = time.monotonic()
        lab.power_on("a")
        c.h.start("a")
        assert wait_for(lambda: c.h.role("a") == "standby", 15), c.h.logs()
        r = c.h.cli("a", "resume")
        assert r.returncode == 1 and "discard-local-changes" in r.stdout + r.stderr, r.stdout + r.stderr
        r = c.h.cli("a", "resume", "--discard-local-changes")
        assert r.returncode == EXIT_OK, r.stdout + r.stderr
        c.expect_roles(primary="b", other="secondary")
        c.replicates("b", "a")
        c.safety.check(strict=False)
        c.record(
            "primary killed during a mirror sync",
            t0,
            w0,
            forced,
            new_primary="b",
            replica_files=f"{len(partial)}/{total}",
        )
    finally:
        c.close()


def test_double_failure_stale_node_started_first(fc):
    """Standby down, the primary writes on, primary down, then the stale node boots alone:
    it must not serve its old copy; it waits (and says so) until the primary returns, which
    serves and brings it up to date."""
    c, lab = fc, fc.lab
    lab.power_off("b")
    write_files(tree(lab, "a"), "while-b-down", 20)
    newest = snapshot(tree(lab, "a"))
    assert wait_for(lambda: c.h.status("a")["data"]["peer_outdated"], 10), c.h.logs()
    t0, w0 = now_both()
    lab.power_off("a")
    lab.power_on("b")
    c.h.start("b")
    assert c.notified("outdated", timeout=15), c.h.logs()
    assert c.h.role("b") != "primary" and not lab.vip_on("b")
    assert snapshot(tree(lab, "b")) != newest
    lab.power_on("a")
    c.h.start("a")
    c.expect_roles(primary="a", other="secondary")
    healed = time.monotonic()
    c.served_by("a", since=healed)
    assert wait_for(lambda: snapshot(tree(lab, "b")) == newest, REPLICATION_RESUMES), c.h.logs()
    c.replicates("a", "b")
    c.safety.check(strict=False)
    c.record("double failure, stale node started first", t0, w0, healed, new_primary="a")
