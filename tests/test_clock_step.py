"""The live daemon when the wall clock steps (NTP correcting a clock that was wrong, a VM
resumed): the lag it reports, which hawrap compares with ``mirror.max_lag`` to decide
whether the standby's copy is up to date, runs on the monotonic clock once a change is
seen.  The daemon runs under ``tests/clockstep.py``'s library, its wall clock moved an hour
back and then forward while a change waits under the mirroring lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from mirror.cli.status_cmd import EXIT_STALE
from mirror.lockfile import acquire, release
from tests.clockstep import ClockStep, clockstep_unavailable
from tests.daemons import converged, live_daemon
from tests.helpers import MIRROR, PollingThread, wait_until

pytestmark = pytest.mark.skipif(clockstep_unavailable() is not None, reason=clockstep_unavailable() or "")


def _pair(src) -> dict:
    """The pair's status (``mirror status`` exits non-zero while it is locked or behind)."""
    proc = subprocess.run([*MIRROR, "status", str(src), "--json"], capture_output=True)
    return json.loads(proc.stdout)["pairs"][0] if proc.stdout else {}


def test_the_lag_of_a_waiting_change_follows_its_age_whatever_the_wall_clock_does(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    lock = tmp_path / "mirror.lock"
    clock = ClockStep(str(tmp_path))
    with live_daemon(src, dst, "--lock-file", str(lock), prefix=["env", f"LD_PRELOAD={clock.library}",
                                                                 f"HAMIRROR_TEST_CLOCK_STEP={clock.offset_file}"]):  # fmt: skip
        converged(src, dst)
        acquire(os.fsencode(lock), reason="test: the change waits")
        (src / "waiting").write_bytes(b"not mirrored while locked")
        wait_until(lambda: _pair(src).get("lag_seconds", 0) > 1.0, timeout=30)
        lags: list[float] = []

        def sample() -> None:
            pair = _pair(src)
            if pair.get("pending"):
                lags.append(pair["lag_seconds"])

        with PollingThread(sample, interval=0.1):
            clock.step(-3600)
            wait_until(lambda: len(lags) > 10)
            clock.step(+3600)
            n = len(lags)
            wait_until(lambda: len(lags) > n + 10)
        release(os.fsencode(lock))
        converged(src, dst)
    assert lags and all(0 < lag < 600 for lag in lags), lags  # neither an hour less nor an hour more
    for earlier, later in zip(lags, lags[1:], strict=False):
        assert later >= earlier - 0.5, f"the lag went from {earlier} s to {later} s: {lags}"


def test_a_hung_daemon_is_reported_stale_though_the_clock_stepped_back(tmp_path):
    """The daemon stopped (SIGSTOP) writes no more status; the wall clock then steps back an
    hour for it and for ``mirror status``: by the time written, its last status would look an
    hour younger than it is, and the daemon running, for that hour."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    clock = ClockStep(str(tmp_path))
    stepped = ["env", f"LD_PRELOAD={clock.library}", f"HAMIRROR_TEST_CLOCK_STEP={clock.offset_file}"]

    def status() -> subprocess.CompletedProcess:
        return subprocess.run([*stepped, *MIRROR, "status", str(src), "--json"], capture_output=True, text=True)

    with live_daemon(src, dst, prefix=stepped) as daemon:
        converged(src, dst)
        assert status().returncode == 0
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            clock.step(-3600)
            stale = wait_until(lambda: (s := status()).returncode == EXIT_STALE and s, timeout=30)
            assert json.loads(stale.stdout)["daemon"] == "stale"
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
