"""The supervisor's watchdog, with real processes: a fed process lives, a frozen one is
killed within the timeout, and a pause of the watcher together with its process (SIGSTOP of
the whole hawrap) is no reason to kill anything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from hawrap.watchdog import Progress

TIMEOUT = 0.6

# The watcher: starts a child that writes a keepalive every 0.1 s, watches it, reports.
WATCHER = f"""
import os, subprocess, sys, time
from hawrap import watchdog
r, w = os.pipe()
feeder = "import os, sys, time\\nwhile True:\\n    os.write({{w}}, b'.')\\n    time.sleep(0.1)\\n"
child = subprocess.Popen([sys.executable, "-c", feeder.format(w=w)], pass_fds=(w,))
os.close(w)
print(child.pid, flush=True)
killed = watchdog.watch(child, r, {TIMEOUT}, lambda: False)
print("killed" if killed else f"exited {{child.returncode}}", flush=True)
"""


def start_watcher() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    return proc, int(proc.stdout.readline())


def test_a_fed_process_lives_and_a_frozen_one_is_killed():
    proc, child = start_watcher()
    try:
        time.sleep(3 * TIMEOUT)  # fed all along: nothing happens
        assert proc.poll() is None
        t0 = time.monotonic()
        os.kill(child, signal.SIGSTOP)
        assert proc.stdout.readline().strip() == "killed"
        assert time.monotonic() - t0 < TIMEOUT + 1.0
    finally:
        proc.kill()
        proc.wait()


def test_frozen_together_with_its_watcher_it_is_not_killed():
    proc, child = start_watcher()
    try:
        time.sleep(2 * TIMEOUT)
        os.killpg(proc.pid, signal.SIGSTOP)  # the watcher and its child, as SIGSTOP of the whole hawrap
        time.sleep(4 * TIMEOUT)
        # the watcher happens to run first after the pause: it must not judge the gap it
        # slept through itself before its child has had a chance to run
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(TIMEOUT / 3)
        os.kill(child, signal.SIGCONT)
        time.sleep(3 * TIMEOUT)  # the child feeds again: it must still be alive
        os.kill(child, signal.SIGTERM)
        assert proc.stdout.readline().strip() == f"exited {-signal.SIGTERM}"
    finally:
        proc.kill()
        proc.wait()


def test_progress_is_healthy_while_beating_or_inside_a_declared_bound():
    p = Progress()
    assert p.healthy(0.5)
    p.last_beat -= 1.0
    assert not p.healthy(0.5)
    with p.busy(10):
        p.last_beat -= 1.0
        assert p.healthy(0.5)
        with p.busy(1):  # a shorter inner bound does not cut the outer one
            assert p.busy_until > time.monotonic() + 5
    assert p.healthy(0.5)  # leaving a bound counts as progress


# A node process that ignores SIGTERM (a stop that hangs) but keeps feeding its keepalives.
STUCK = """
import os, subprocess, sys
from hawrap import watchdog
r, w = os.pipe()
feeder = "import os, signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\nprint(flush=True)\\nwhile True:\\n    os.write({w}, b'.')\\n    time.sleep(0.1)\\n"
child = subprocess.Popen([sys.executable, "-c", feeder.format(w=w)], pass_fds=(w,), stdout=subprocess.PIPE)
os.close(w)
child.stdout.readline()  # SIGTERM is ignored from here on
child.send_signal(15)
killed = watchdog.watch(child, r, 5.0, lambda: True, stop_timeout=0.5)
print(f"{killed} {child.returncode}", flush=True)
"""


def test_a_node_process_that_does_not_stop_is_killed_after_the_stop_timeout():
    proc = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == f"False {-signal.SIGKILL}", proc.stderr
