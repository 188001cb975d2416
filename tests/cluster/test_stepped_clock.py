"""The primary's wall clock steps back an hour under a mirrored cluster (NTP correcting a
clock set wrong at boot): every process of node a runs under ``tests/clockstep.py``'s
library.  Whether the standby's copy is up to date must not depend on it: hawrap judges its
daemon's status on its own monotonic clock, so b stays up to date, sampled all along, and
takes over when a dies.
"""

from __future__ import annotations

import time

import pytest
from clockstep import ClockStep, clockstep_unavailable
from helpers import PollingThread
from lab import MIRROR, Hawrap, Probe, mirror_section, tree, wait_for, write_config, write_files
from test_failover import Cluster
from test_mirrored_data import converged

from hawrap.mirrorctl import engine_available

pytestmark = pytest.mark.skipif(
    not engine_available(tuple(MIRROR)) or clockstep_unavailable() is not None,
    reason="needs the mirror engine and gcc",
)


def test_a_primary_whose_clock_steps_back_keeps_its_standby_up_to_date(lab, rng):
    clock = ClockStep(lab.workdir)
    c = Cluster(lab, rng, start=False)
    try:
        c.config = write_config(lab, extra=mirror_section(lab))
        c.h = Hawrap(lab, c.config)
        c.h.start("a", env=clock.env())
        c.h.start("b")
        c.expect_roles(primary="a", other="secondary")
        assert wait_for(lambda: c.h.status("b")["data"]["uptodate"], 20), c.h.logs()
        c.probe = Probe(lab)
        write_files(tree(lab, "a"), "before", 20)
        assert converged(lab), c.h.logs()
        seen: list[tuple[float, bool, bool]] = []  # (when, b up to date, a's replica in sync)

        def sample() -> None:
            when = time.monotonic()
            a, b = c.h.status("a"), c.h.status("b")
            if a and b:
                seen.append((when, b["data"]["uptodate"], (a["data"]["replica"] or {}).get("in_sync", False)))

        with PollingThread(sample, interval=0.2):
            clock.step(-3600)
            stepped = time.monotonic()
            write_files(tree(lab, "a"), "after-the-step", 20)
            assert converged(lab), c.h.logs()
            # Past mirror.alert_after (2 s), after which an out-of-sync replica marks b outdated:
            # samples begun from 3 s after the step on, however long a `hawrap status` takes
            # on a loaded machine (two of them a sample).
            late = lambda: sum(1 for when, _, _ in seen if when > stepped + 3)  # noqa: E731
            assert wait_for(lambda: time.monotonic() - stepped > 6 and late() >= 5, 60), seen
        assert seen and all(uptodate and in_sync for _, uptodate, in_sync in seen), seen
        t0 = time.monotonic()
        lab.power_off("a")
        c.served_by("b", since=t0, timeout=15)
    finally:
        c.stop()
