"""A full disk must not take the cluster down with it.  A mail spool that filled up is full
on both nodes at once (they hold the same data); a /var filled by logs holds the node's state
dir and, here, its mirroring lock.  Each node's tree and state dir are small ext4 file
systems, mounted before hawrap starts; a disk is filled to its last block (by root, with no
reserve) with a file no mirroring touches, or fails and turns read-only.  The client probes the VIP all
along: a takeover still happens, and a primary that can no longer write its state keeps
serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import time

import pytest
from helpers import PollingThread, ext4_image, fill_file_system
from lab import MIRROR, mirror_section, tree, wait_for, write_files
from test_failover import Cluster
from test_mirrored_data import converged, start_mirrored

from hawrap.mirrorctl import engine_available

pytestmark = pytest.mark.skipif(
    not engine_available(tuple(MIRROR)), reason="needs the mirror engine ('mirror serve|daemon --help')"
)


def _state_dir(lab, node: str) -> str:
    return os.path.join(lab.workdir, "state", node)


def _lock(lab, node: str) -> str:
    return os.path.join(_state_dir(lab, node), "data.lock")


def _node_state(lab, node: str) -> dict:
    with open(os.path.join(_state_dir(lab, node), "node-state.json")) as f:
        return json.load(f)


@pytest.fixture
def fcluster(lab, rng):
    """a primary, b an up-to-date secondary; each node's tree and state dir (with the
    mirroring lock) an 8 MB ext4 file system, mounted ``errors=remount-ro``."""
    extra = mirror_section(lab).replace(
        f'lock_file = "{lab.workdir}/data/{{node}}.mirror.lock"',
        f'lock_file = "{lab.workdir}/state/{{node}}/data.lock"',
    )
    assert "state/{node}/data.lock" in extra
    with contextlib.ExitStack() as mounts:
        for node in ("a", "b"):
            for place, image in (
                (_state_dir(lab, node), f"{node}-var.img"),
                (tree(lab, node), f"{node}-spool.img"),
            ):
                os.makedirs(place, exist_ok=True)
                mounts.enter_context(ext4_image(pathlib.Path(place), os.path.join(lab.workdir, image), "-m", "0",
                                                size="8M"))  # fmt: skip
                subprocess.run(["mount", "-o", "remount,errors=remount-ro", place], check=True)
        c = Cluster(lab, rng, start=False)
        try:
            start_mirrored(c, extra)
            c.served_by("a")
            write_files(tree(lab, "a"), "mail", 50)
            assert converged(lab), c.h.logs()
            yield c
        finally:
            c.stop()


def test_a_spool_full_on_both_nodes_does_not_stop_the_takeover(fcluster):
    """A spool full for a while: the primary's daemon still says the replica is live (its
    status file is swapped, never replaced), so b stays up to date, sampled all along; then
    the takeover writes the tree's epoch in the tree's state dir, on the full disk."""
    c, lab = fcluster, fcluster.lab
    epoch = c.h.status("b")["epoch"]
    for node in ("a", "b"):
        fill_file_system(os.path.join(tree(lab, node), ".mirror"))  # the state dir: no session touches it
    uptodate: list[bool] = []
    with PollingThread(lambda: uptodate.append(c.h.status("b")["data"]["uptodate"]), interval=0.2) as sampler:
        full = time.monotonic()  # past mirror.alert_after (2 s), after which b would be outdated
        assert wait_for(lambda: time.monotonic() - full > 6 and sampler.polls > 20, 20)
    assert uptodate and all(uptodate), uptodate
    t0 = time.monotonic()
    lab.power_off("a")
    c.served_by("b", since=t0, timeout=15)
    st = c.h.status("b")
    assert st["role"] == "primary" and st["epoch"] > epoch, st
    assert st["mirror"]["epochs"]["data"] >= st["epoch"], st  # the tree is fenced at the new epoch
    assert os.path.exists(_lock(lab, "b"))


def test_a_standby_whose_state_dir_is_full_still_takes_over(fcluster):
    """Its node state, its epoch and its mirroring lock are all written on the full disk."""
    c, lab = fcluster, fcluster.lab
    epoch = c.h.status("b")["epoch"]
    fill_file_system(_state_dir(lab, "b"))
    t0 = time.monotonic()
    lab.power_off("a")
    c.served_by("b", since=t0, timeout=15)
    assert wait_for(lambda: _node_state(lab, "b")["role"] == "primary", 10), c.h.logs()
    recorded = _node_state(lab, "b")
    assert recorded["epoch"] > epoch and recorded["owns_epoch"], recorded
    assert c.h.status("b")["state_unsaved"] is None
    # the lock is taken empty (no block for a line saying who took it): it locks all the same
    assert os.path.getsize(_lock(lab, "b")) == 0
    assert c.h.status("b")["mirror"]["locked"]["data"]


def test_a_primary_whose_state_dir_is_full_keeps_serving_when_its_peer_dies(fcluster):
    """It records that the peer's copy lacks its writes, on the full disk, and serves on."""
    c, lab = fcluster, fcluster.lab
    fill_file_system(_state_dir(lab, "a"))
    t0 = time.monotonic()
    lab.power_off("b")
    write_files(tree(lab, "a"), "while-b-down", 5)
    assert wait_for(lambda: _node_state(lab, "a")["peer_outdated"], 20), c.h.logs()
    seen = time.monotonic()
    assert wait_for(lambda: len([r for r in c.probe.results() if r.start > seen + 2]) >= 20, 10)
    c.no_failed_probe_since(t0)
    c.served_by("a", since=t0)
    st = c.h.status("a")
    assert st["role"] == "primary" and st["state_unsaved"] is None, st


def test_a_primary_whose_state_dir_fails_keeps_serving_and_says_so(fcluster):
    """The disk under /var fails: the kernel turns it read-only (``errors=remount-ro``) and
    nothing can be recorded there any more.  The node serves on and says what it cannot
    record."""
    c, lab = fcluster, fcluster.lab
    device = subprocess.run(["findmnt", "-no", "SOURCE", _state_dir(lab, "a")], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    with open(f"/sys/fs/ext4/{os.path.basename(device)}/trigger_fs_error", "w") as f:
        f.write("test: the disk under a's state dir fails\n")
    t0 = time.monotonic()
    lab.power_off("b")
    assert wait_for(lambda: c.h.status("a")["state_unsaved"], 20), c.h.logs()
    st = c.h.status("a")
    assert "node-state.json" in st["state_unsaved"] and "Read-only" in st["state_unsaved"], st
    assert st["data"]["peer_outdated"] and st["role"] == "primary", st
    assert c.notified("cannot record this node's state", 10), c.h.logs()
    shown = c.h.cli("a", "status").stdout
    assert "STATE NOT RECORDED" in shown and "node-state.json" in shown, shown
    assert not _node_state(lab, "a")["peer_outdated"]  # nothing could be written
    seen = time.monotonic()
    assert wait_for(lambda: len([r for r in c.probe.results() if r.start > seen + 2]) >= 20, 10)
    c.no_failed_probe_since(t0)
    c.served_by("a", since=t0)


def test_a_primary_that_cannot_write_its_state_records_it_once_it_can(fcluster):
    """Its state dir refuses new files for a while (made immutable, as a read-only /var
    remounted read-write again would be): the state is written at the first step after."""
    c, lab = fcluster, fcluster.lab
    subprocess.run(["chattr", "+i", _state_dir(lab, "a")], check=True)
    try:
        t0 = time.monotonic()
        lab.power_off("b")
        assert wait_for(lambda: c.h.status("a")["state_unsaved"], 20), c.h.logs()
        assert "Operation not permitted" in c.h.status("a")["state_unsaved"]
        assert not _node_state(lab, "a")["peer_outdated"]
    finally:
        subprocess.run(["chattr", "-i", _state_dir(lab, "a")], check=True)
    assert wait_for(lambda: _node_state(lab, "a")["peer_outdated"], 10), c.h.logs()
    assert c.h.status("a")["state_unsaved"] is None
    c.no_failed_probe_since(t0)
    c.served_by("a", since=t0)


def test_a_node_whose_state_dir_is_full_when_it_starts_joins_the_cluster(fcluster):
    """/var filled up while b was down (or hawrap restarted): b starts, rejoins as the
    secondary, its copy up to date, and can take over."""
    c, lab = fcluster, fcluster.lab
    c.h.stop("b")
    fill_file_system(_state_dir(lab, "b"))
    restarted = time.time()
    c.h.start("b")
    assert wait_for(lambda: c.h.role("b") == "secondary", 20), c.h.logs()

    def settled() -> bool:
        """a's daemon live on a connection to b's new receiver, and b told its copy is up to
        date (its own status says so from the start: what it recorded before)."""
        pair = c.h.status("a")["mirror"]["trees"][0]["pairs"][0]
        return pair["state"] == "live" and pair["since"] > restarted and c.h.status("b")["data"]["uptodate"]

    assert wait_for(settled, 30), c.h.logs()
    t0 = time.monotonic()
    lab.power_off("a")
    c.served_by("b", since=t0, timeout=15)
