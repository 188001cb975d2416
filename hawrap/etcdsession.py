"""This member's etcd lease: granted, kept alive, and watched against the clock.

Everything a member publishes in etcd (its record, and the leader key while it leads) hangs
on one lease.  etcd deletes those keys when the lease expires, which is how the others
learn that a member is gone; it is also the danger: a leader cut off from the etcd quorum
keeps serving until it notices, while the others may take the key as soon as the lease
expires in etcd.

The rule that keeps those two apart: etcd starts a lease's TTL again when its leader
*receives* a keepalive, which is after we *sent* it, and a change of etcd leader only ever
extends leases.  So the lease cannot expire in etcd before ``send time of the last renewed
keepalive + TTL`` on our clock (give or take the two clocks' rates, which NTP keeps within
500 ppm).  ``LeaseSession`` keeps that instant (``valid_until``) and a watchdog thread fires
``on_lost`` at ``valid_until - margin``, where the margin is the time the caller needs to
stop serving plus the clock-rate allowance.  The watchdog only waits on a condition: nothing
it does can block on the network.

After ``on_lost`` has returned the lease is abandoned for good (revoked when etcd answers
again, which deletes its keys at once) and a new one is granted: a member never goes back to
a lease it has given up on.  Not before it has returned: revoking frees the leader key, so a
revoke sent while the node is still stopping (a link that heals at that moment) would let
another member win while this one still serves; and no campaign can start on a new lease
while the old term is being stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .etcdclient import EtcdClient, EtcdConnection, EtcdError

log = logging.getLogger(__name__)

# CLOCK_MONOTONIC is slewed by NTP by at most 500 ppm; etcd's clock may run that much fast
# while ours runs that much slow.
CLOCK_RATE_TOLERANCE = 0.001
RETRY_PAUSE = 0.05  # between two rounds of every endpoint failing


class LeaseSession:
    def __init__(
        self,
        conn: EtcdConnection,
        ttl: int,
        keepalive_interval: float,
        margin: float,
        on_lost: Callable[[str], None],
        name: str = "etcd",
    ):
        self.conn = conn
        self.ttl = ttl
        self.keepalive_interval = keepalive_interval
        self.margin = margin + ttl * CLOCK_RATE_TOLERANCE
        self.on_lost = on_lost
        self.name = name
        self._cond = threading.Condition()
        self._lease: int | None = None
        self._generation = 0
        self._valid_until = 0.0
        self._granted_ttl = 0
        self._last_renewal = 0.0
        self._abandoned: list[tuple[int, float]] = []  # (lease, when it has surely expired anyway)
        self._losing = False  # on_lost is running: no revoke, no new lease until it returns
        self._stopping = False
        self._keepalive = threading.Thread(target=self._keepalive_loop, name=f"{name}-keepalive", daemon=True)
        self._watchdog = threading.Thread(target=self._watchdog_loop, name=f"{name}-watchdog", daemon=True)

    # ------------------------------------------------------------ for the caller

    def start(self) -> None:
        self._keepalive.start()
        self._watchdog.start()

    def current(self) -> tuple[int | None, int]:
        """(lease id or None while there is no valid lease, generation: +1 per lease)."""
        with self._cond:
            if self._lease is not None and time.monotonic() < self._valid_until - self.margin:
                return self._lease, self._generation
            return None, self._generation

    def valid(self, generation: int) -> bool:
        """The lease of ``generation`` is still ours and not within the margin of expiring."""
        with self._cond:
            return (
                self._generation == generation
                and self._lease is not None
                and time.monotonic() < self._valid_until - self.margin
            )

    def status(self) -> dict:
        with self._cond:
            now = time.monotonic()
            return {
                "lease": self._lease,
                "granted_ttl": self._granted_ttl,
                "valid_for": round(self._valid_until - now, 3) if self._lease else None,
                "last_renewal_ago": round(now - self._last_renewal, 3) if self._last_renewal else None,
            }

    def stop(self, revoke: bool = True) -> None:
        """Stop both threads; revoke the lease (its keys go at once) unless ``revoke`` is False
        (then they go when it expires, as after a crash)."""
        with self._cond:
            self._stopping = True
            lease, self._lease = self._lease, None
            self._cond.notify_all()
        self._keepalive.join()
        self._watchdog.join()
        if revoke and lease is not None:
            client = EtcdClient(self.conn)
            try:
                client.revoke(lease, deadline=time.monotonic() + 2 * self.conn.request_timeout)
            except EtcdError as exc:
                log.warning(
                    "%s: could not revoke lease %x: %s (it expires in %d s)", self.name, lease, exc, self.ttl
                )
            finally:
                client.close()

    # ------------------------------------------------------------ the keepalive thread

    def _keepalive_loop(self) -> None:
        client = EtcdClient(self.conn)
        try:
            while not self._wait(0):
                if self._wait_while_losing():
                    return
                self._revoke_abandoned(client)
                lease, generation = self._grant(client)
                if lease is None:
                    self._wait(RETRY_PAUSE)
                    continue
                self._renew_until_lost(client, lease, generation)
        finally:
            client.close()

    def _grant(self, client: EtcdClient) -> tuple[int | None, int]:
        sent = time.monotonic()
        try:
            lease, granted = client.grant(self.ttl)
        except EtcdError as exc:
            log.debug("%s: lease grant failed: %s", self.name, exc)
            return None, 0
        with self._cond:
            if self._stopping:
                self._abandoned.append((lease, sent + granted))
                return None, 0
            self._generation += 1
            self._lease = lease
            self._granted_ttl = granted
            # etcd may grant more than asked (its minimum is 1.5 election timeouts): counting
            # on the smaller value only makes the watchdog earlier
            self._valid_until = sent + min(self.ttl, granted)
            self._last_renewal = sent
            self._cond.notify_all()
            log.info("%s: lease %x granted (TTL %d s)", self.name, lease, granted)
            return lease, self._generation

    def _renew_until_lost(self, client: EtcdClient, lease: int, generation: int) -> None:
        next_at = time.monotonic() + self.keepalive_interval
        while True:
            if self._wait(max(0.0, next_at - time.monotonic())):
                return
            with self._cond:
                if self._generation != generation or self._lease is None:
                    return  # the watchdog gave it up
                give_up_at = self._valid_until - self.margin
            sent = time.monotonic()
            try:
                ttl = client.keepalive(lease, deadline=give_up_at)
            except EtcdError as exc:
                log.debug("%s: keepalive failed: %s", self.name, exc)
                next_at = time.monotonic() + RETRY_PAUSE
                continue
            with self._cond:
                if self._generation != generation or self._lease is None:
                    return
                if ttl <= 0:
                    # etcd says it is gone: whatever the clock said, stop now
                    self._valid_until = 0.0
                    self._cond.notify_all()
                    next_at = time.monotonic() + RETRY_PAUSE
                    continue
                self._valid_until = max(self._valid_until, sent + min(self.ttl, ttl))
                self._last_renewal = sent
                self._cond.notify_all()
            next_at = sent + self.keepalive_interval

    def _revoke_abandoned(self, client: EtcdClient) -> None:
        """Revoke given-up leases: their keys (the leader key above all) go at once instead of
        at expiry.  One not revoked by the time it has surely expired is forgotten."""
        with self._cond:
            abandoned, self._abandoned = self._abandoned, []
        keep = []
        for lease, expired_by in abandoned:
            if time.monotonic() >= expired_by:
                continue
            try:
                client.revoke(lease, deadline=time.monotonic() + self.conn.request_timeout)
                log.info("%s: abandoned lease %x revoked", self.name, lease)
            except EtcdError as exc:
                log.debug("%s: revoking abandoned lease %x failed: %s", self.name, lease, exc)
                keep.append((lease, expired_by))
        with self._cond:
            self._abandoned += keep

    def _wait_while_losing(self) -> bool:
        """Wait until the lease-lost callback has returned; True when stopping."""
        with self._cond:
            while self._losing and not self._stopping:
                self._cond.wait()
            return self._stopping

    def _wait(self, seconds: float) -> bool:
        """Sleep (woken by stop); True when stopping."""
        with self._cond:
            if not self._stopping and seconds > 0:
                self._cond.wait(seconds)
            return self._stopping

    # ------------------------------------------------------------ the watchdog thread

    def _watchdog_loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                if self._lease is None:
                    self._cond.wait()
                    continue
                left = self._valid_until - self.margin - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                lease, self._lease = self._lease, None
                self._losing = True
                expired_by = time.monotonic() + self._granted_ttl * (1 + CLOCK_RATE_TOLERANCE)
                silent = time.monotonic() - self._last_renewal
                self._cond.notify_all()
            reason = (
                f"lease {lease:x} not renewed for {silent:.2f} s (TTL {self.ttl} s): no etcd quorum reached"
            )
            log.warning("%s: %s", self.name, reason)
            try:
                self.on_lost(reason)
            except Exception:
                log.exception("%s: the lease-lost callback failed", self.name)
            finally:
                with self._cond:
                    self._losing = False
                    self._abandoned.append((lease, expired_by))
                    self._cond.notify_all()
