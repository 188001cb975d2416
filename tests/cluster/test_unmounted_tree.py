"""A tree that must be a mount point (``require_mount``) whose disk goes away, or did not
come up: the node stops serving it at once, never takes over with it, and rejoins by itself
once it is mounted again.  Each node's disk is a directory bind-mounted on its tree before
hawrap starts; it is unmounted inside that node's own mount namespace (each lab node runs in
one, as each machine has its own mounts), so the other node and the test still see theirs.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from helpers import PollingThread
from lab import MIRROR, mirror_section, snapshot, tree, wait_for, write_files
from test_failover import Cluster
from test_mirrored_data import converged, start_mirrored

from hawrap.mirrorctl import engine_available

pytestmark = pytest.mark.skipif(
    not engine_available(tuple(MIRROR)), reason="needs the mirror engine ('mirror serve|daemon --help')"
)


def _in_node(c: Cluster, node: str, *argv: str) -> subprocess.CompletedProcess:
    """``argv`` in ``node``'s mount namespace (its hawrap supervisor's, which its node process,
    services and mirror processes share)."""
    pid = str(c.h.procs[node].pid)
    return subprocess.run(["nsenter", "-t", pid, "-m", *argv], capture_output=True, text=True, check=True)


def _disk(lab, node: str) -> str:
    return os.path.join(lab.workdir, "disks", node)


def _unmount(c: Cluster, node: str) -> None:
    """Lazily, as an administrator can while the tree is in use (the services, the mirror
    daemon's open directories): a busy file system refuses a plain unmount."""
    _in_node(c, node, "umount", "-l", tree(c.lab, node))


def _mount(c: Cluster, node: str) -> None:
    _in_node(c, node, "mount", "--bind", _disk(c.lab, node), tree(c.lab, node))


def _under_mount_point(c: Cluster, node: str) -> list[str]:
    """What lies in the mount point itself, as the node sees it while nothing is mounted."""
    return _in_node(c, node, "ls", "-A", tree(c.lab, node)).stdout.split()


@pytest.fixture
def rcluster(lab, rng):
    """Both nodes mirroring one tree with ``require_mount = true``, each on its bind-mounted
    disk; a primary, b an up-to-date secondary."""
    mounted = []
    extra = mirror_section(lab) + "require_mount = true\n"
    for node in ("a", "b"):
        os.makedirs(_disk(lab, node))
        subprocess.run(["mount", "--bind", _disk(lab, node), tree(lab, node)], check=True)
        mounted.append(tree(lab, node))
    c = Cluster(lab, rng, start=False)
    try:
        start_mirrored(c, extra)
        c.served_by("a")
        yield c
    finally:
        c.stop()
        for path in mounted:
            subprocess.run(["umount", "-l", path], capture_output=True)


def test_the_primarys_disk_gone_it_hands_over_and_rejoins_once_mounted(rcluster):
    c, lab = rcluster, rcluster.lab
    write_files(tree(lab, "a"), "before", 100)
    assert converged(lab), c.h.logs()
    service = os.path.join(lab.workdir, "a.service.pid")
    service_up: list[float] = []  # when a's service was seen running

    def sample() -> None:
        if os.path.exists(service):
            service_up.append(time.monotonic())

    with PollingThread(sample, interval=0.002) as sampler:
        assert wait_for(lambda: service_up, 10)
        t0 = time.monotonic()
        _unmount(c, "a")
        assert wait_for(lambda: c.h.role("a") == "standby", 10), c.h.logs()
        standby_seen = time.monotonic()
        st = c.h.status("a")
        assert "nothing is mounted at" in (st["unfit"] or "") and "nothing is mounted at" in st["reason"], st
        c.served_by("b", since=t0)
        # b serves, and writes: its mirroring toward a waits for a's disk
        write_files(tree(lab, "b"), "while-a-unmounted", 20)
        r = c.h.cli("a", "resume")
        assert r.returncode != 0 and "nothing is mounted" in r.stdout + r.stderr, r.stdout + r.stderr
        assert _under_mount_point(c, "a") == [], "something was written under a's empty mount point"
        remounted = time.monotonic()
        _mount(c, "a")
    ran = [t for t in service_up if standby_seen <= t <= remounted]
    assert sampler.polls > 100 and ran == [], f"a's service ran {len(ran)} times while its tree was unmounted"
    # a rejoins by itself, and gets what b wrote meanwhile
    c.expect_roles(primary="b", other="secondary")
    assert converged(lab), c.h.logs()
    assert snapshot(tree(lab, "a")) == snapshot(tree(lab, "b"))


def test_a_secondary_whose_disk_is_missing_never_takes_over(rcluster):
    c, lab = rcluster, rcluster.lab
    _unmount(c, "b")
    assert wait_for(lambda: c.h.role("b") == "standby", 10), c.h.logs()
    assert wait_for(lambda: c.h.status("a")["peer"].get("standby") is True, 10), c.h.status("a")
    # a's changes cannot reach b now: a says so, and b knows its copy behind
    write_files(tree(lab, "a"), "while-b-unmounted", 20)
    assert wait_for(lambda: c.h.status("b")["data"]["uptodate"] is False, 20), c.h.logs()
    t0 = time.monotonic()
    lab.power_off("a")
    # b hears a die and stays out of service: no client is ever answered by b
    assert wait_for(lambda: c.h.status("b")["peer"]["alive"] is False, 10), c.h.logs()
    assert wait_for(lambda: len([r for r in c.probe.results() if r.start > t0 + 2]) >= 20, 10)
    assert [r for r in c.probe.results() if r.start >= t0 and r.answer == "b"] == []
    assert c.h.role("b") == "standby" and not lab.vip_on("b")
    assert _under_mount_point(c, "b") == []
    # mounted again, it rejoins as a secondary by itself; its copy misses a's last changes,
    # so the data guard keeps it from serving on its own (the administrator decides)
    _mount(c, "b")
    assert wait_for(lambda: c.h.role("b") == "secondary", 10), c.h.logs()
    assert c.notified("outdated", 10), c.h.logs()
    assert c.h.role("b") == "secondary" and not lab.vip_on("b")
    assert [r for r in c.probe.results() if r.start >= t0 and r.answer == "b"] == []
