"""Is the node process alive and making progress?  (systemd's WatchdogSec, in miniature.)

A frozen node process (SIGSTOP, a hung thread, a deadlock) would otherwise go on holding the
VIP while its heartbeat process, which runs apart, keeps saying "primary": nobody would
ever replace it.  So:

* the node's main loop marks its progress (``Progress.beat``), and declares how long an
  action may legitimately take before it starts one (``Progress.busy``: a service start, a
  final sync);
* a ``Feeder`` thread in the node writes a byte to its supervisor every ``period`` while
  the main loop is healthy, and sends the same keepalive to the heartbeat process;
* the supervisor (``watch``) kills the node process when no byte came for ``timeout``
  seconds (its cleanup then drops the VIP and stops the services, and it starts a new node
  process); the heartbeat process stops sending heartbeats after the same time without a
  keepalive, so that even an unsupervised frozen node stops claiming to be alive.

A frozen process feeds nothing at all, whatever its main loop was doing.  Before declaring
silence, the pipe is read once more: bytes queued while the supervisor itself was not
scheduled still count.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable

ENV = "HAWRAP_WATCHDOG_FD"  # the node process's end of the pipe to its supervisor
STARTUP_GRACE = 15.0  # the first keepalive may take this long (interpreter start, imports)


class Progress:
    """The main loop's liveness: beats, and declared long actions (thread-safe reads)."""

    def __init__(self) -> None:
        self.last_beat = time.monotonic()
        self.busy_until = 0.0

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    @contextlib.contextmanager
    def busy(self, seconds: float):
        """Work that may block the loop for up to ``seconds`` (its own timeouts bound it)."""
        outer = self.busy_until
        self.busy_until = max(outer, time.monotonic() + seconds)
        try:
            yield
        finally:
            self.busy_until = outer
            self.beat()

    def healthy(self, limit: float) -> bool:
        now = time.monotonic()
        return now - self.last_beat < limit or now < self.busy_until


class Feeder:
    """Keepalives every ``period`` while ``progress`` is healthy: a byte on ``fd`` (None: no
    supervisor) and ``also()`` (the heartbeat process's keepalive)."""

    def __init__(
        self, fd: int | None, period: float, progress: Progress, limit: float, also: Callable[[], None]
    ):
        self.fd, self.period, self.progress, self.limit, self.also = fd, period, progress, limit, also
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog-feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait = 0.0  # the first keepalive at once: the supervisor's startup grace ends with it
        while not self._stop.wait(wait):
            wait = self.period
            if not self.progress.healthy(self.limit):
                continue  # a stuck main loop: let the supervisor and the heartbeat process notice
            if self.fd is not None:
                try:
                    os.write(self.fd, b".")
                except BlockingIOError:
                    pass  # the supervisor is not reading: the pipe is full of keepalives already
                except OSError:
                    self.fd = None  # no supervisor any more
            self.also()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def watch(
    proc: subprocess.Popen,
    fd: int,
    timeout: float,
    stopping: Callable[[], bool],
    stop_timeout: float | None = None,
) -> bool:
    """Wait for ``proc`` to exit; kill it (SIGKILL) if it sends no keepalive on ``fd`` for
    ``timeout`` seconds (``STARTUP_GRACE`` for the first).  Returns True if it was killed
    for that.  While ``stopping()``, it is only waited for (an orderly stop takes its time),
    for at most ``stop_timeout`` seconds: then it is killed too (returns False)."""
    stop_began: float | None = None
    last = time.monotonic()
    limit = max(timeout, STARTUP_GRACE)
    open_ = True
    wait = min(timeout / 4, 0.5)
    while True:
        before = time.monotonic()
        if open_:
            ready, _, _ = select.select([fd], [], [], wait)
            if ready:
                got, open_ = _drain(fd)
                if got:
                    last, limit = time.monotonic(), timeout
        else:
            time.sleep(0.05)  # the process closed its end: it is exiting
        now = time.monotonic()
        if now - before > wait + timeout / 2:
            last = now  # we were not running (frozen with it, or starved): no verdict on that gap
        if proc.poll() is not None:
            return False
        if stopping():
            stop_began = now if stop_began is None else stop_began
            if stop_timeout is None or now - stop_began < stop_timeout:
                continue
            _kill(proc)
            return False
        if time.monotonic() - last < limit:
            continue
        if open_ and _drain(fd)[0]:  # queued while we were not scheduled
            last, limit = time.monotonic(), timeout
            continue
        _kill(proc)
        return True


def _kill(proc: subprocess.Popen) -> None:
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _drain(fd: int) -> tuple[bool, bool]:
    """Read what the pipe holds without blocking: (anything read, still open)."""
    got = False
    while select.select([fd], [], [], 0)[0]:
        data = os.read(fd, 4096)
        if not data:
            return got, False
        got = True
    return got, True
