"""``--bwlimit``: the one rate limiter, for a remote sync's transport and a local sync's copy."""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """``--bwlimit`` (bytes per second): a token bucket with a quarter second of burst, held as
    the time its debt is paid (``free_at``): a frame waits until it is paid for."""

    BURST = 0.25  # seconds

    def __init__(self, rate: int):
        self.rate = rate
        self.free_at = 0.0  # long past: the bucket starts full
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self.free_at = max(self.free_at, now - self.BURST) + n / self.rate
            wait = self.free_at - now
        if wait > 0:
            time.sleep(wait)
