"""A cluster upgraded one node at a time (README, "Running as a service"): node b runs the
release before (the last commit of mirror protocol version 4, taken from the repository's
history with ``git archive`` and run as pure Python: hawrap, its node and heartbeat
processes, its mirror serve and daemon), node a this release.  The new primary mirrors to
the old secondary; ``hawrap standby`` hands over to it; the old primary then mirrors back to
the new node, resumed as its secondary.  A client probes the VIP throughout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import unpack_previous_release
from lab import (
    MIRROR,
    Hawrap,
    Probe,
    mirror_section,
    outages,
    snapshot,
    tree,
    wait_for,
    write_config,
    write_files,
)
from test_failover import Cluster

from hawrap.mirrorctl import engine_available

pytestmark = pytest.mark.skipif(not engine_available(tuple(MIRROR)), reason="needs the mirror engine")


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory):
    return unpack_previous_release(tmp_path_factory.mktemp("previous-release"), "mirror", "hawrap")


def _in_release(where: str, *argv: str) -> list[str]:
    """``argv`` (a ``python -m`` module and its arguments) run from the release in ``where``,
    pure Python (that release is not compiled here); its children inherit the directory, so
    they are that release's too."""
    line = " ".join(f"'{a}'" for a in argv)
    return ["sh", "-c", f"cd '{where}' && exec env -u MIRROR_REQUIRE_FAST MIRROR_FORCE_PURE=1 '{sys.executable}' -m {line}"]


class MixedHawrap(Hawrap):
    """hawrap on both lab nodes, ``old`` running the release in ``where``."""

    def __init__(self, lab, config: str, old: str, where: str):
        super().__init__(lab, config)
        self.old, self.where = old, where

    def start(self, node: str, env: dict | None = None) -> None:
        if node != self.old:
            return super().start(node, env)
        argv = _in_release(self.where, "hawrap", "run", "--config", self.config, "--node", node, "-v")
        self.procs[node] = self.lab.spawn(node, argv, f"hawrap-{node}.log")

    def cli(self, node: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        if node != self.old:
            return super().cli(node, *args, timeout=timeout)
        argv = _in_release(self.where, "hawrap", *args, "--config", self.config, "--node", node)
        return self.lab.run_in(node, *argv, check=False, timeout=timeout)


def _converged(lab, timeout: float = 60.0) -> bool:
    return bool(wait_for(lambda: snapshot(tree(lab, "a")) == snapshot(tree(lab, "b")), timeout, 0.2))


def test_a_cluster_a_release_apart_mirrors_and_hands_over_both_ways(lab, rng, previous_release):
    c = Cluster(lab, rng, start=False)
    c.config = write_config(lab, extra=mirror_section(lab))
    c.h = MixedHawrap(lab, c.config, old="b", where=previous_release)
    try:
        c.h.start("a")
        c.h.start("b")
        c.expect_roles(primary="a", other="secondary", timeout=40)
        assert wait_for(lambda: (c.h.status("b") or {}).get("data", {}).get("uptodate"), 40), c.h.logs()
        c.probe = Probe(lab)
        c.served_by("a")
        # b's processes are the release before's: each runs in its directory, where its
        # `python -m` finds its packages (and a's do not)
        running = {node: {pid: os.readlink(f"/proc/{pid}/cwd") for pid in lab.pids(node)} for node in ("a", "b")}
        assert len(running["b"]) >= 4 and set(running["b"].values()) == {previous_release}, running
        assert previous_release not in running["a"].values(), running

        # This release's sender to the release before's receiver.
        write_files(tree(lab, "a"), "new-to-old", 60)
        assert _converged(lab), "the primary's changes did not reach the node of the release before"

        # The hand-over toward the release before: its final sync, then b serves.
        r = c.h.cli("a", "standby")
        assert r.returncode == 0, r.stdout + r.stderr + c.h.logs()
        assert wait_for(lambda: c.h.role("b") == "primary", 30), c.h.logs()
        c.served_by("b")
        assert _converged(lab)

        # The release before's sender to this release's receiver.
        write_files(tree(lab, "b"), "old-to-new", 60)
        r = c.h.cli("a", "resume")
        assert r.returncode == 0, r.stdout + r.stderr + c.h.logs()
        c.expect_roles(primary="b", other="secondary", timeout=40)
        assert _converged(lab), "the old primary's changes did not reach the node of this release"
        assert wait_for(lambda: (c.h.status("a") or {}).get("data", {}).get("uptodate"), 40), c.h.logs()
        c.served_by("b")
        gaps = outages(c.probe.results())
        print("rolling upgrade: the VIP unanswered", json.dumps([round(end - start, 2) for start, end in gaps]))
    finally:
        c.stop()
