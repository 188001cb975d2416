"""Is this node's own LAN healthy?  NIC carrier and ping node reachability.

The carrier is read from ``/sys/class/net/IF/carrier`` (an in-memory read, cheap enough to
poll every 50 ms).  Ping nodes are probed with ICMP echo from a raw socket bound to the
LAN interface (root), or the unprivileged ICMP datagram socket when
``net.ipv4.ping_group_range`` allows it; the LAN counts as healthy while at least one ping
node answers.  A ping node is unreachable only after ``failures`` consecutive probes each got
no reply within ``timeout`` *after it was sent*, and the socket is drained before a probe is
declared lost: a node too busy to run this thread for a while does not conclude that its
LAN failed.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0


def read_carrier(interface: str) -> bool | None:
    """True/False from sysfs; None when the interface does not exist."""
    try:
        with open(f"/sys/class/net/{interface}/carrier", "rb") as f:
            return f.read(4).strip() == b"1"
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # interface administratively down
            return False
        raise


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class IcmpProber:
    """Echo requests to several targets, replies matched by (identifier, sequence)."""

    def __init__(self, interface: str | None):
        self.raw = True
        try:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except PermissionError:
            # Unprivileged ICMP: the kernel rewrites the identifier to the socket's port.
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            self.raw = False
        if interface and self.raw:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            except OSError as exc:
                log.warning("cannot bind ping probes to %s: %s", interface, exc.strerror)
        self.sock.setblocking(False)
        self.ident = os.getpid() & 0xFFFF if self.raw else self.sock.getsockname()[1]
        self.seq = 0

    def send(self, target: str) -> int:
        self.seq = (self.seq + 1) & 0xFFFF
        header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, self.ident, self.seq)
        payload = b"hawrap-ping"
        packet = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, _checksum(header + payload), self.ident, self.seq) + payload
        try:
            self.sock.sendto(packet, (target, 0))
        except OSError:
            pass  # counted as lost when no reply comes (e.g. ENETUNREACH with the NIC down)
        return self.seq

    def replies(self) -> list[tuple[str, int]]:
        """(source, sequence) of every echo reply queued now."""
        got = []
        while True:
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return got
            if self.raw:
                data = data[(data[0] & 0x0F) * 4 :]  # raw sockets include the IP header
            if len(data) < 8:
                continue
            kind, _, _, ident, seq = struct.unpack("!BBHHH", data[:8])
            if kind == ICMP_ECHO_REPLY and (ident == self.ident or not self.raw):
                got.append((addr[0], seq))

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class LanHealth:
    ok: bool | None  # None: no verdict yet
    problem: str = ""
    carrier: bool | None = None
    reachable: tuple[str, ...] = ()


class LanMonitor:
    """Background thread; ``on_change(LanHealth)`` is called whenever the verdict changes."""

    def __init__(
        self,
        interface: str,
        ping_nodes: tuple[str, ...],
        on_change: Callable[[LanHealth], None],
        carrier_interval: float = 0.05,
        ping_interval: float = 0.2,
        ping_timeout: float = 0.3,
        failures: int = 3,
    ):
        self.interface = interface
        self.ping_nodes = ping_nodes
        self.on_change = on_change
        self.carrier_interval = carrier_interval
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.failures = failures
        self.health = LanHealth(None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lan-monitor", daemon=True)
        self._prober = IcmpProber(interface) if ping_nodes else None
        # per target: consecutive lost probes, outstanding (seq, sent_at) probes
        self._lost = {t: 0 for t in ping_nodes}
        self._answered = {t: False for t in ping_nodes}
        self._outstanding: dict[str, list[tuple[int, float]]] = {t: [] for t in ping_nodes}
        #: monotonic send time of the newest probe that got an answer (read by other threads)
        self.last_answered_probe: float | None = None

    def start(self) -> None:
        self._thread.start()

    def answered_since(self, t: float) -> bool:
        """A ping node answered a probe sent at or after ``t`` (True without ping nodes)."""
        if not self.ping_nodes:
            return True
        last = self.last_answered_probe
        return last is not None and last >= t

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._prober:
            self._prober.close()

    def _run(self) -> None:
        next_ping = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if self._prober and now >= next_ping:
                self._probe_round(now)
                next_ping = max(next_ping + self.ping_interval, now)
            self._evaluate()
            wait = self.carrier_interval
            if self._prober:
                wait = min(wait, max(0.0, next_ping - time.monotonic()))
                r, _, _ = select.select([self._prober.sock], [], [], wait)
                if r:
                    self._collect(time.monotonic())
            else:
                self._stop.wait(wait)

    def _collect(self, now: float) -> None:
        for source, seq in self._prober.replies():
            pending = self._outstanding.get(source)
            if pending is None:
                continue
            sent = next((t for s, t in pending if s == seq), None)
            if sent is not None:
                self._outstanding[source] = [(s, t) for s, t in pending if s != seq]
                if self.last_answered_probe is None or sent > self.last_answered_probe:
                    self.last_answered_probe = sent
                self._lost[source] = 0
                self._answered[source] = True

    def _probe_round(self, now: float) -> None:
        self._collect(now)  # drain before judging: late replies still count
        for target in self.ping_nodes:
            still = []
            for seq, sent_at in self._outstanding[target]:
                if now - sent_at >= self.ping_timeout:
                    self._lost[target] += 1
                else:
                    still.append((seq, sent_at))
            self._outstanding[target] = still
            self._outstanding[target].append((self._prober.send(target), now))

    def _evaluate(self) -> None:
        carrier = read_carrier(self.interface)
        reachable = tuple(t for t in self.ping_nodes if self._answered[t] and self._lost[t] < self.failures)
        verdict_pending = any(not self._answered[t] and self._lost[t] < self.failures for t in self.ping_nodes)
        if carrier is None:
            health = LanHealth(False, f"interface {self.interface} does not exist", carrier, reachable)
        elif not carrier:
            health = LanHealth(False, f"no carrier on {self.interface}", carrier, reachable)
        elif not self.ping_nodes or reachable:
            health = LanHealth(True, "", carrier, reachable)
        elif verdict_pending:
            health = LanHealth(None, "waiting for the first ping replies", carrier, reachable)
        else:
            health = LanHealth(False, f"ping node(s) {', '.join(self.ping_nodes)} unreachable via {self.interface}", carrier, reachable)
        if health != self.health:
            self.health = health
            self.on_change(health)
