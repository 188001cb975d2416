"""A real `mirror daemon` for tests, and waiting for a replica to converge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager

from tests.helpers import MIRROR, run_mirror
from tests.snapshot import snapshot


@contextmanager
def live_daemon(src, dst, *extra: str, log_path=None, check_exit: bool = True, prefix: list[str] | None = None):
    """``prefix`` runs it under another command (``ip netns exec NS``: in a network namespace);
    ``dst`` None: its pairs come from ``--config`` in ``extra`` (``src`` is still the tree)."""
    log = open(log_path or os.path.join(os.path.dirname(str(src)), "daemon.log"), "ab")
    pair = [str(src), str(dst)] if dst is not None else []
    proc = subprocess.Popen([*(prefix or []), *MIRROR, "daemon", *pair, "-v", *extra], stdout=log,
                            stderr=log)  # fmt: skip
    handle = DaemonProcess(proc, str(src), log.name)
    try:
        yield handle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


class DaemonProcess:
    def __init__(self, proc, src: str, log: str):
        self.proc = proc
        self.src = src
        self.log = log

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def converged(src, dst, timeout: float = 60.0, view=None) -> float:
    """Wait until ``dst`` mirrors ``src`` exactly (independent walk); returns the seconds waited.
    ``view``: what of a snapshot is compared (e.g. without excluded names)."""
    start = time.monotonic()
    last = None
    view = view or (lambda snap: snap)
    while time.monotonic() - start < timeout:
        try:
            a, b = view(snapshot(src)), view(snapshot(dst))
        except (FileNotFoundError, NotADirectoryError):
            a, b = None, "racing"
        if a == b:
            return time.monotonic() - start
        last = (a, b)
        time.sleep(0.05)
    a, b = last
    diff = {k: (a.get(k), b.get(k)) for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k)}
    raise AssertionError(f"replica did not converge in {timeout} s: {dict(list(diff.items())[:8])}")


def pair_status(src) -> dict:
    """The daemon's one pair as `mirror status --json` shows it, with the exit status."""
    proc = run_mirror("status", src, "--json", check_codes=range(256))
    pair = json.loads(proc.stdout)["pairs"][0] if proc.stdout else {}
    return {**pair, "exit": proc.returncode}
