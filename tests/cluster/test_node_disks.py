"""A tree that must be a mount point (``require_mount``) whose disk goes away, did not come
up, or is another disk than the tree's: the node stops serving it at once, never takes over
with it, never receives into another disk, and rejoins by itself once its own disk is
mounted again (or a new one is adopted).  Each node's disk is a directory bind-mounted on
its tree before hawrap starts; a node's mounts change inside that node's own mount namespace
(each lab node runs in one, as each machine has its own mounts), so the other node and the
test still see theirs.  A node booting with another disk has it mounted in the test's
namespace before it starts (its own namespace is a copy of that one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from helpers import PollingThread
from lab import MIRROR, mirror_section, snapshot, tree, wait_for, write_files
from test_failover import Cluster
from test_mirrored_data import converged, start_mirrored

from hawrap.mirrorctl import engine_available
from mirror.epoch import bump_epoch
from mirror.journal import ENTRY, Journal

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


def _boot_with(lab, node: str, disk: str) -> None:
    """``node`` (powered off) boots with ``disk`` at its tree: device names swapped, a spare."""
    subprocess.run(["umount", "-l", tree(lab, node)], check=True)
    subprocess.run(["mount", "--bind", disk, tree(lab, node)], check=True)


def _spare(lab, name: str, files: dict[str, bytes] | None = None) -> str:
    path = os.path.join(lab.workdir, "disks", name)
    for rel, data in (files or {}).items():
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        with open(os.path.join(path, rel), "wb") as f:
            f.write(data)
    os.makedirs(path, exist_ok=True)
    return path


def _replica_detail(c: Cluster, node: str) -> str:
    return (c.h.status(node)["data"]["replica"] or {}).get("detail", "")


def _files(root: str) -> list[str]:
    return [os.path.join(d, n) for d, dirs, names in os.walk(root) if ".mirror" not in d.split(os.sep) for n in names]


def _answered_by(c: Cluster, node: str, since: float) -> list:
    return [r for r in c.probe.results() if r.start >= since and r.answer == node]


def _under_mount_point(c: Cluster, node: str) -> list[str]:
    """What lies in the mount point itself, as the node sees it while nothing is mounted."""
    return _in_node(c, node, "ls", "-A", tree(c.lab, node)).stdout.split()


@pytest.fixture
def rcluster(lab, rng):
    """Both nodes mirroring one tree with ``require_mount = true``, each on its bind-mounted
    disk; a primary, b an up-to-date secondary."""
    extra = mirror_section(lab) + "require_mount = true\n"
    for node in ("a", "b"):
        os.makedirs(_disk(lab, node))
        subprocess.run(["mount", "--bind", _disk(lab, node), tree(lab, node)], check=True)
    c = Cluster(lab, rng, start=False)
    try:
        start_mirrored(c, extra)
        c.served_by("a")
        yield c
    finally:
        c.stop()
        for node in ("a", "b"):
            while subprocess.run(["umount", "-l", tree(lab, node)], capture_output=True).returncode == 0:
                pass


@pytest.mark.parametrize("fault", ["unmounted", "another disk"])
def test_the_primarys_disk_gone_it_hands_over_and_rejoins_once_mounted(rcluster, fault):
    """Unmounted under its services, or another disk mounted in its place (a spare with a
    file of its own): a stops serving at once, b serves, a receives nothing meanwhile."""
    c, lab = rcluster, rcluster.lab
    write_files(tree(lab, "a"), "before", 100)
    assert converged(lab), c.h.logs()
    spare = _spare(lab, "spare", {"its-own": b"the spare's file\n"})
    on_spare = snapshot(spare)
    why = "nothing is mounted at" if fault == "unmounted" else "holds no tree"
    service = os.path.join(lab.workdir, "a.service.pid")
    service_up: list[float] = []  # when a's service was seen running

    def sample() -> None:
        if os.path.exists(service):
            service_up.append(time.monotonic())

    with PollingThread(sample, interval=0.002) as sampler:
        assert wait_for(lambda: service_up, 10)
        t0 = time.monotonic()
        _unmount(c, "a")
        if fault == "another disk":
            _in_node(c, "a", "mount", "--bind", spare, tree(lab, "a"))
        assert wait_for(lambda: c.h.role("a") == "standby", 10), c.h.logs()
        standby_seen = time.monotonic()
        st = c.h.status("a")
        assert why in (st["unfit"] or "") and why in st["reason"], st
        c.served_by("b", since=t0)
        # b serves, and writes: its mirroring toward a waits for a's disk
        write_files(tree(lab, "b"), "while-a-unmounted", 20)
        r = c.h.cli("a", "resume")
        assert r.returncode != 0 and why in r.stdout + r.stderr, r.stdout + r.stderr
        # With changes of its own on its disk as well, the disk is what it names: a resume
        # cannot happen before that is fixed (the journal is seen through this namespace,
        # where a's disk is still mounted)
        journal = os.path.join(_disk(lab, "a"), ".mirror", "journal-00000000000000aa")
        j = Journal(os.fsencode(journal))
        j.append([(ENTRY, b"written-before-the-unmount", 0)])
        j.close()
        r = c.h.cli("a", "resume")
        os.unlink(journal)
        assert r.returncode != 0 and why in r.stderr and "lacks" not in r.stdout, r.stdout + r.stderr
        if fault == "unmounted":
            assert _under_mount_point(c, "a") == [], "something was written under a's empty mount point"
        else:
            assert snapshot(spare) == on_spare, "something was written to the spare disk"
            _in_node(c, "a", "umount", "-l", tree(lab, "a"))
        remounted = time.monotonic()
        _mount(c, "a")
    ran = [t for t in service_up if standby_seen <= t <= remounted]
    assert sampler.polls > 100 and ran == [], f"a's service ran {len(ran)} times while its tree was {fault}"
    # a rejoins by itself, and gets what b wrote meanwhile
    c.expect_roles(primary="b", other="secondary")
    assert wait_for(lambda: snapshot(_disk(lab, "a")) == snapshot(tree(lab, "b")), 30, 0.2), c.h.logs()
    assert snapshot(spare) == on_spare


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


def test_a_degraded_primary_that_boots_with_another_disk_never_serves_it(rcluster):
    """A double failure: the secondary is down, the primary writes on alone (its peer
    outdated), loses power, and boots with a spare disk at its tree.  Alone and degraded,
    it would serve its copy on its own: it must not serve the spare.  Its own disk back, it
    serves the newest data."""
    c, lab = rcluster, rcluster.lab
    write_files(tree(lab, "a"), "before", 50)
    assert converged(lab), c.h.logs()
    lab.power_off("b")
    write_files(tree(lab, "a"), "while-b-down", 20)
    newest = snapshot(tree(lab, "a"))
    assert wait_for(lambda: c.h.status("a")["data"]["peer_outdated"], 10), c.h.logs()
    lab.power_off("a")
    spare = _spare(lab, "spare", {"old/mail": b"an old mail spool's file\n"})
    on_spare = snapshot(spare)
    _boot_with(lab, "a", spare)
    t0 = time.monotonic()
    lab.power_on("a")
    c.h.start("a")
    assert wait_for(lambda: c.h.role("a") == "standby", 15), c.h.logs()
    st = c.h.status("a")
    assert "holds no tree" in (st["unfit"] or "") and "--new-disk" in st["unfit"], st
    assert wait_for(lambda: len([r for r in c.probe.results() if r.start > t0 + 3]) >= 20, 15)
    assert _answered_by(c, "a", t0) == [] and not lab.vip_on("a")
    assert c.h.role("a") == "standby" and snapshot(spare) == on_spare
    # the administrator mounts its own disk: it rejoins, and serves the newest data again
    _in_node(c, "a", "umount", "-l", tree(lab, "a"))
    _mount(c, "a")
    assert wait_for(lambda: c.h.role("a") == "primary", 20), c.h.logs()
    c.served_by("a")
    assert snapshot(_disk(lab, "a")) == newest  # what a's tree shows in its own namespace


def test_a_secondary_that_boots_with_another_disk_receives_nothing_into_it(rcluster):
    """The secondary boots with another disk holding files of the same names: the primary
    must not mirror over them (its deletions and rewrites would destroy that disk's data),
    and the secondary never counts that copy as the tree's."""
    c, lab = rcluster, rcluster.lab
    write_files(tree(lab, "a"), "before", 30)
    assert converged(lab), c.h.logs()
    theirs = {os.path.relpath(p, tree(lab, "a")): b"another disk's data\n"
              for p in list(_files(tree(lab, "a")))[:10]}  # fmt: skip
    theirs["only-theirs/x"] = b"kept\n"
    lab.power_off("b")
    other = _spare(lab, "other", theirs)
    before = snapshot(other)
    _boot_with(lab, "b", other)
    lab.power_on("b")
    c.h.start("b")
    assert wait_for(lambda: c.h.role("b") == "standby", 15), c.h.logs()
    assert "holds no tree" in c.h.status("b")["unfit"], c.h.status("b")
    write_files(tree(lab, "a"), "after", 10)
    assert wait_for(lambda: c.h.status("a")["peer"].get("standby") is True, 10), c.h.status("a")
    assert wait_for(lambda: c.h.status("b")["data"]["uptodate"] is False, 20), c.h.logs()
    r = c.h.cli("b", "resume")
    assert r.returncode != 0 and "--new-disk" in r.stdout + r.stderr, r.stdout + r.stderr
    # a's daemon finds no receiver on b (it retries): the other disk is as it was
    assert wait_for(lambda: "disconnected" in _replica_detail(c, "a") or "unreachable" in _replica_detail(c, "a"),
                    20), _replica_detail(c, "a")  # fmt: skip
    assert snapshot(other) == before
    # its own disk back, b rejoins and gets a's changes
    _in_node(c, "b", "umount", "-l", tree(lab, "b"))
    _mount(c, "b")
    c.expect_roles(primary="a", other="secondary")
    assert wait_for(lambda: snapshot(_disk(lab, "b")) == snapshot(tree(lab, "a")), 30, 0.2), c.h.logs()
    assert snapshot(other) == before


@pytest.mark.parametrize("spare", ["blank", "another cluster's"])
def test_a_replaced_disk_is_adopted_and_mirrored_over_in_full(rcluster, spare):
    """The secondary's disk failed and was replaced by a blank one, or by one that served
    another cluster (its own tree, at a much higher epoch, which would fence this cluster's
    primary off it): refused as it is, then taken by the administrator (``resume
    --new-disk``), its copy outdated until the primary has mirrored everything onto it."""
    c, lab = rcluster, rcluster.lab
    write_files(tree(lab, "a"), "before", 40)
    assert converged(lab), c.h.logs()
    lab.power_off("b")
    new = _spare(lab, "new")
    if spare != "blank":
        elsewhere = _spare(lab, "elsewhere", {"theirs/x": b"another cluster's file\n"})
        subprocess.run([*MIRROR, "sync", elsewhere + "/", new, "--delete", "--no-fsync"], check=True)
        bump_epoch(os.path.join(new, ".mirror"), 500)
    _boot_with(lab, "b", new)
    lab.power_on("b")
    c.h.start("b")
    assert wait_for(lambda: c.h.role("b") == "standby", 15), c.h.logs()
    r = c.h.cli("b", "resume")
    assert r.returncode != 0 and "--new-disk" in r.stdout + r.stderr, r.stdout + r.stderr
    # a's daemon frozen meanwhile (SIGSTOP): b must not count the blank disk up to date
    # while nothing has been mirrored onto it
    with open(os.path.join(lab.workdir, "state", "a", "mirror-daemon-data.pid")) as f:
        daemon = int(f.read())
    os.kill(daemon, signal.SIGSTOP)
    try:
        r = c.h.cli("b", "resume", "--new-disk")
        assert r.returncode == 0, r.stdout + r.stderr
        assert c.h.role("b") == "secondary" and c.h.status("b")["data"]["uptodate"] is False
        assert c.h.status("b")["data"]["outdated_since"] is not None
        assert c.h.status("b")["data"]["new_disks"] == ["data"]
        assert "new disk of data: outdated" in c.h.cli("b", "status").stdout
        assert wait_for(lambda: c.h.status("a")["peer"].get("incomplete") is True, 5)  # heard by the peer
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert wait_for(lambda: snapshot(new) == snapshot(tree(lab, "a")), 30, 0.2), c.h.logs()
    assert wait_for(lambda: c.h.status("b")["data"]["uptodate"], 20), c.h.logs()
    assert c.h.status("b")["data"]["new_disks"] == []
    assert wait_for(lambda: c.h.status("a")["peer"].get("incomplete") is False, 5)
    r = c.h.cli("b", "resume", "--new-disk")
    assert r.returncode != 0 and "nothing to adopt" in r.stdout + r.stderr, r.stdout + r.stderr
