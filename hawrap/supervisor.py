"""A tiny parent that keeps the node process running and cleans up after it.

If the node process dies without stopping its resources (kill -9, a crash, the OOM killer),
the virtual IP would stay on this host while the peer takes it over, and both would answer
ARP for it (keepalived has exactly this problem).  So the supervisor, which does nothing
else and is unlikely to die with its child, first removes what the node may have left
behind (``cleanup``: services stopped, VIP dropped, mirror processes stopped), and only then
starts a new node process.  It also cleans up once before the first start, for a node that
died with its supervisor (for that case the systemd unit also runs ``hawrap cleanup`` in
ExecStartPre and ExecStopPost).

A node process that stops making progress (frozen, hung) is treated as dead: when its
keepalives stop for ``timing.watchdog`` seconds (``hawrap.watchdog``) the supervisor kills
it, tells the administrator, cleans up and starts a new one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from mirror.sdnotify import ENV, SystemdNotifier

from . import instance, watchdog
from .config import ClusterConfig
from .node import cleanup
from .notify import Notifier

SUPERVISED_ENV = "HAWRAP_SUPERVISOR_PID"  # set for the node process: its supervisor holds the instance lock

log = logging.getLogger(__name__)

MAX_RESTARTS = 5  # within RESTART_WINDOW seconds; more means a crash loop: give up
RESTART_WINDOW = 60.0
RESTART_DELAY = 0.5
# A node process that has not stopped this long after SIGTERM is killed, and what it may
# have left is cleaned up (its mirror processes die with it): before systemd's own
# TimeoutStopSec (60 s in packaging/systemd/hawrap@.service) would kill the whole unit.
STOP_TIMEOUT = 45.0


def supervise(cfg: ClusterConfig, node: str, child_argv: list[str]) -> int:
    stopping = False
    child: subprocess.Popen | None = None
    # systemd's notification socket goes to the node process alone (it says when the node is
    # up; the unit has NotifyAccess=all), not to the cleanup commands run from here.
    systemd = SystemdNotifier.from_environment()
    child_env = {**os.environ, **({ENV: systemd.address} if systemd.enabled else {})}

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        systemd.stopping()
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    lock_fd = instance.acquire(cfg.node(node).state_dir)  # before the cleanup: never clean up a live instance
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    notifier = Notifier(cfg.notify, cfg.name, node, cfg.peer_of(node).name)
    try:
        _cleanup(cfg, node, "before start")
        restarts: list[float] = []
        while not stopping:
            keepalive, child_end = os.pipe()
            try:
                env = {**child_env, SUPERVISED_ENV: str(os.getpid()), watchdog.ENV: str(child_end)}
                child = subprocess.Popen(child_argv, env=env, pass_fds=(child_end,))
            finally:
                os.close(child_end)
            if stopping:  # SIGTERM came while it was being started: ``forward`` did not see it
                child.send_signal(signal.SIGTERM)
            log.info("node process started (pid %d)", child.pid)
            try:
                frozen = watchdog.watch(child, keepalive, cfg.timing.watchdog, lambda: stopping, STOP_TIMEOUT)
            finally:
                os.close(keepalive)
            code = child.returncode
            if frozen:
                why = f"node process {child.pid} made no progress for {cfg.timing.watchdog:g} s (timing.watchdog): killed"
                log.error("%s", why)
                notifier.notify(
                    "watchdog", f"{why}; cleaning up (VIP, services) and starting a new one", "unknown", 0
                )
            if stopping:
                if code == -signal.SIGKILL:
                    log.error("node process %d did not stop within %g s: killed", child.pid, STOP_TIMEOUT)
                if code != 0:
                    _cleanup(cfg, node, f"node process exited {code} while stopping")
                return 0 if code in (0, -signal.SIGTERM) else 1
            died = "watchdog" if frozen else _describe(code)
            systemd.status(f"node process died ({died}): cleaning up and restarting it")
            _cleanup(cfg, node, f"node process {child.pid} died ({died})")
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
            if len(restarts) > MAX_RESTARTS:
                log.error("node process died %d times within %g s: giving up", len(restarts), RESTART_WINDOW)
                notifier.notify(
                    "fatal",
                    f"the node process died {len(restarts)} times within {RESTART_WINDOW:g} s: hawrap gives up on this node",
                    "unknown",
                    0,
                )
                return 1
            time.sleep(RESTART_DELAY)
        return 0
    finally:
        notifier.close()
        os.close(lock_fd)


def _cleanup(cfg: ClusterConfig, node: str, why: str) -> None:
    start = time.monotonic()
    errors = cleanup(cfg, node)
    for error in errors:
        log.error("cleanup: %s", error)
    log.warning("cleanup (%s) done in %.3f s", why, time.monotonic() - start)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def child_command(config: str, node: str, verbose: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hawrap",
        "run",
        "--config",
        config,
        "--node",
        node,
        "--no-supervise",
        *(["-v"] * verbose),
    ]
