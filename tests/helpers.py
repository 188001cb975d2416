"""Small helpers shared by tests: run the real CLI, make world-readable temp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from contextlib import contextmanager

MIRROR = [sys.executable, "-m", "mirror"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Root without the capabilities that bypass file permissions: permission bits apply to it.
WITHOUT_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def run_mirror(*args, prefix: list[str] | None = None, check_codes=(0, 1, 2, 3, 4, 5), input: bytes | None = None,
               timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m mirror ARGS`` for real; bytes arguments pass through unchanged."""
    proc = subprocess.run(
        (prefix or []) + MIRROR + [os.fsencode(a) if isinstance(a, str) else a for a in args],
        capture_output=True, input=input, timeout=timeout,
        env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode in check_codes, proc
    return proc




def is_root() -> bool:
    return os.geteuid() == 0


def wait_until(condition, timeout: float = 30.0, interval: float = 0.01):
    """Poll ``condition`` until it is true (returns its value) or fail after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


@contextmanager
def changing(step):
    """Call ``step(n)`` for n = 0, 1, 2, ... in a thread of its own while the block runs (a
    tree changing under a scan)."""
    stop = threading.Event()

    def run():
        n = 0
        while not stop.is_set():
            step(n)
            n += 1

    worker = threading.Thread(target=run)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
