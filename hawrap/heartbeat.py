"""The heartbeat: its own process, real-time priority, locked memory, no disk I/O.

A busy node must never look dead to its peer, so sending and receiving heartbeats is kept
off every slow path: the node process (state machine, resource commands, notifications,
logging) may stall on disk or CPU, this one does not.  It runs ``python -m hawrap.heartbeat``
as a child of the node process, set to SCHED_FIFO (with SCHED_RESET_ON_FORK, so nothing it
might start inherits it) and ``mlockall``'d where permitted, as corosync does.  It never
logs or touches the disk in its loop: it reports to its parent over a SOCK_SEQPACKET pair.

Parent -> child (msgpack maps): ``{"t": "config", ...}`` once, then ``{"t": "state", ...}``
whenever this node's advertised state changes, and ``{"t": "alive"}`` keepalives from the
node's watchdog feeder.  Child -> parent: ``{"t": "peer", ...}`` snapshots (per-link
liveness, the peer's latest fields) whenever something changes and at least every half
dead time (so that the node can tell a frozen child), and ``{"t": "note", "msg": ...}`` for
the parent to log (drops, spoofs, replays; rate-limited).

The child speaks for the node process only while that process shows signs of life: after
``watchdog`` seconds without any message from it, it stops sending heartbeats (the peer then
sees this node as dead, as it is), and starts again when the node does.

A link counts as up while an accepted packet arrived on it within the dead time.  Before a
link is declared down, its socket is drained: packets queued while this process was not
scheduled still count.  The child exits when its parent goes away (socket EOF, and
PR_SET_PDEATHSIG as a backstop).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import secrets
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass

import msgpack

from . import wire
from .errors import WireAuthError, WireError

PR_SET_PDEATHSIG = 1
MCL_CURRENT, MCL_FUTURE = 1, 2
NOTE_INTERVAL = 5.0  # at most one note per kind per this many seconds
MAX_CONTROL_MESSAGE = 65536
STATS_INTERVAL = 1.0  # an unchanged snapshot is still reported this often (for status)
KEEPALIVE = msgpack.packb({"t": "alive"})


@dataclass
class LinkSocket:
    name: str
    sock: socket.socket
    peer_addr: tuple[str, int]
    last_rx: float | None = None
    sent: int = 0
    send_errors: int = 0
    received: int = 0
    dropped: int = 0
    max_gap: float = 0.0  # longest time between two accepted packets (how close to the dead time)
    unauthenticated: float | None = None  # when a packet from the peer's address last failed authentication


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def harden(priority: int, mlock: bool) -> list[str]:
    """Real-time priority and locked memory where permitted; returns what could not be done."""
    problems = []
    libc = _libc()
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        problems.append("PR_SET_PDEATHSIG failed")
    if priority > 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
        except OSError as exc:
            problems.append(
                f"real-time priority {priority} not permitted ({exc.strerror}): heartbeat runs at normal priority"
            )
    if mlock and libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        problems.append(f"mlockall not permitted ({os.strerror(err)}): heartbeat memory may be paged out")
    return problems


class HeartbeatEngine:
    """The loop.  Separate from ``main`` so tests can run it in-process on loopback."""

    def __init__(self, cfg: dict, control: socket.socket):
        self.cfg = cfg
        self.control = control
        self.secret: bytes = cfg["secret"]
        self.node: str = cfg["node"]
        self.interval: float = cfg["interval"]
        self.deadtime: float = cfg["deadtime"]
        self.boot = secrets.token_bytes(16)
        self.seq = 0
        self.tracker = wire.PeerTracker(
            self.boot, cfg["peer"], cfg["cluster"], tuple(link[0] for link in cfg["links"])
        )
        self.state: dict = {
            "role": "init", "epoch": 0, "owns_epoch": False, "standby": False,
            "lan_ok": None, "serving": False, "request": None, "uptodate": False, "in_sync": False,
            "incomplete": False, "ahead": False,
        }  # fmt: skip
        self.peer_fields: dict | None = None
        self.report_interval: float = cfg.get("report_interval", STATS_INTERVAL)
        self.watchdog: float | None = cfg.get("watchdog")
        self.parent_seen = self._last_check = time.monotonic()
        self.muted = False  # heartbeats stopped: the node process is not making progress
        self.links: dict[str, LinkSocket] = {}
        self.selector = selectors.DefaultSelector()
        self._last_report: object = None
        self._last_report_time = 0.0
        self._notes: dict[str, float] = {}
        for name, local, peer, port in cfg["links"]:
            family = socket.AF_INET6 if ":" in local else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Heartbeats first on a congested NIC (interactive/"network control" class).
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 6)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0xC0)
            except OSError:
                pass
            sock.bind((local, port))
            sock.setblocking(False)
            link = LinkSocket(name, sock, (peer, port))
            self.links[name] = link
            self.selector.register(sock, selectors.EVENT_READ, link)
        control.setblocking(False)
        self.selector.register(control, selectors.EVENT_READ, None)

    # ------------------------------------------------------------ receive

    def _drain(self, link: LinkSocket, now: float) -> None:
        while True:
            try:
                packet, addr = link.sock.recvfrom(wire.MAX_PACKET + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if addr[0] != link.peer_addr[0]:
                link.dropped += 1
                self._note("source", f"link {link.name}: dropped a packet from unexpected address {addr[0]}")
                continue
            try:
                fields = wire.decode(self.secret, packet)
            except WireError as exc:
                link.dropped += 1
                if isinstance(exc, WireAuthError):
                    link.unauthenticated = now
                self._note("wire", f"link {link.name}: dropped a packet from {addr[0]}: {exc}")
                continue
            verdict = self.tracker.check(fields, link.name)
            if not verdict.accepted:
                link.dropped += 1
                self._note("replay", f"link {link.name}: dropped a packet: {verdict.reason}")
                continue
            if verdict.new_boot:
                for other in self.links.values():
                    other.last_rx = None  # packets of the old boot no longer vouch for the peer
                self._note(
                    "boot",
                    f"peer {fields['node']} (re)started: new boot id {fields['boot'].hex()}",
                    force=True,
                )
            link.received += 1
            if link.last_rx is not None:
                link.max_gap = max(link.max_gap, now - link.last_rx)
            link.last_rx = now
            self.peer_fields = fields

    def _control_message(self) -> bool:
        """Apply state updates from the parent; False when the parent has gone."""
        while True:
            try:
                data = self.control.recv(MAX_CONTROL_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            self.parent_seen = time.monotonic()
            msg = msgpack.unpackb(data, raw=False)
            if msg.get("t") == "state":
                self.state.update({k: msg[k] for k in self.state if k in msg})
            elif msg.get("t") == "stop":
                return False

    # ------------------------------------------------------------ send

    def _send_all(self) -> None:
        self.seq += 1
        heard = self._links_up(time.monotonic())
        for link in self.links.values():
            fields = {
                "v": wire.VERSION, "cluster": self.cfg["cluster"], "node": self.node, "link": link.name,
                "boot": self.boot, "seq": self.seq, "peer_boot": self.tracker.heard_boot,
                "links": heard, **self.state,
            }  # fmt: skip
            try:
                link.sock.sendto(wire.encode(self.secret, fields), link.peer_addr)
                link.sent += 1
            except OSError as exc:
                link.send_errors += 1
                self._note(f"send-{link.name}", f"link {link.name}: cannot send: {exc.strerror}")

    # ------------------------------------------------------------ report

    def _links_up(self, now: float) -> dict[str, bool]:
        return {
            name: link.last_rx is not None and now - link.last_rx < self.deadtime
            for name, link in self.links.items()
        }

    def _report(self, now: float) -> None:
        links = self._links_up(now)
        alive = any(links.values())
        peer = None
        if alive and self.peer_fields is not None:
            f = self.peer_fields
            peer = {
                k: f[k]
                for k in (
                    "role",
                    "epoch",
                    "owns_epoch",
                    "standby",
                    "lan_ok",
                    "serving",
                    "request",
                    "links",
                    "uptodate",
                    "in_sync",
                    "incomplete",
                    "ahead",
                )
            }
        snapshot = (links, peer)
        if snapshot == self._last_report and now - self._last_report_time < self.report_interval:
            return
        message = {
            "t": "peer", "alive": alive, "links": links, "peer": peer,
            "boot": self.boot.hex(), "peer_boot": self.tracker.current_boot.hex() if self.tracker.current_boot else None,
            # the last item: seconds since a packet from the peer's address failed authentication
            "stats": {n: [lk.sent, lk.received, lk.dropped, lk.send_errors, round(lk.max_gap * 1000, 1),
                          None if lk.unauthenticated is None else round(now - lk.unauthenticated, 1)]
                      for n, lk in self.links.items()},
        }  # fmt: skip
        try:
            self.control.send(msgpack.packb(message, use_bin_type=True))
        except (BlockingIOError, InterruptedError):
            return  # parent busy: the next round sends the then-current snapshot
        except OSError:
            return
        self._last_report = snapshot
        self._last_report_time = now

    def _note(self, kind: str, msg: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._notes.get(kind, -NOTE_INTERVAL) < NOTE_INTERVAL:
            return
        self._notes[kind] = now
        try:
            self.control.send(msgpack.packb({"t": "note", "msg": msg}, use_bin_type=True))
        except OSError:
            pass

    # ------------------------------------------------------------ loop

    def _parent_frozen(self, now: float) -> bool:
        """No message from the node process for ``watchdog`` seconds (after reading what is
        queued, and not counting a gap in our own loop: we may be the one that was frozen)."""
        if self.watchdog is not None and now - self._last_check > self.watchdog / 2:
            self.parent_seen = max(self.parent_seen, now)
        self._last_check = now
        if self.watchdog is None or now - self.parent_seen < self.watchdog:
            frozen = False
        else:
            self._control_message()
            frozen = now - self.parent_seen >= self.watchdog
        if frozen != self.muted:
            self.muted = frozen
            if frozen:
                self._note(
                    "muted",
                    f"the node process has not been heard for {self.watchdog:g} s: heartbeats stopped",
                    force=True,
                )
            else:
                self._note("muted", "the node process is back: heartbeats resumed", force=True)
        return frozen

    def next_expiry(self) -> float | None:
        expiries = [lk.last_rx + self.deadtime for lk in self.links.values() if lk.last_rx is not None]
        return min(expiries) if expiries else None

    def run(self, stop_after: float | None = None) -> None:
        next_send = time.monotonic()
        end = None if stop_after is None else next_send + stop_after
        while True:
            now = time.monotonic()
            if now >= next_send:
                if not self._parent_frozen(now):
                    self._send_all()
                next_send += self.interval
                if next_send < now:  # we were not scheduled for a while: do not send a burst
                    next_send = now + self.interval
            wake = next_send
            expiry = self.next_expiry()
            if expiry is not None and expiry > now:
                wake = min(wake, expiry + 0.001)
            events = self.selector.select(max(0.0, wake - time.monotonic()))
            now = time.monotonic()
            for key, _ in events:
                if key.data is None:
                    if not self._control_message():
                        return
                else:
                    self._drain(key.data, now)
            expiry = self.next_expiry()
            if expiry is not None and expiry <= now:
                for link in self.links.values():  # queued packets still count
                    self._drain(link, now)
            self._report(now)
            if end is not None and now >= end:
                return

    def close(self) -> None:
        for link in self.links.values():
            link.sock.close()
        self.selector.close()


def config_message(cluster_cfg, node_name: str) -> dict:
    """What the child needs, from the node's ClusterConfig."""
    me = cluster_cfg.node(node_name)
    peer = cluster_cfg.peer_of(node_name)
    return {
        "t": "config",
        "cluster": cluster_cfg.name,
        "node": me.name,
        "peer": peer.name,
        "secret": cluster_cfg.secret,
        "interval": cluster_cfg.timing.interval,
        "deadtime": cluster_cfg.timing.deadtime,
        "report_interval": min(STATS_INTERVAL, cluster_cfg.timing.deadtime / 2),
        "watchdog": cluster_cfg.timing.watchdog,
        "priority": cluster_cfg.timing.realtime_priority,
        "mlock": cluster_cfg.timing.mlock,
        "links": [
            [link.name, me.addresses[link.name], peer.addresses[link.name], link.port]
            for link in cluster_cfg.links
        ],
    }


def main(fd: int) -> int:
    control = socket.socket(fileno=fd)
    control.setblocking(True)
    data = control.recv(MAX_CONTROL_MESSAGE)
    if not data:
        return 0
    cfg = msgpack.unpackb(data, raw=False)
    problems = harden(cfg["priority"], cfg["mlock"])
    engine = HeartbeatEngine(cfg, control)
    for problem in problems:
        engine._note(problem, problem, force=True)
    # Everything is imported and allocated: freeze the heap so the collector never walks it.
    gc.collect()
    gc.freeze()
    engine._note("ready", f"heartbeat running, boot id {engine.boot.hex()}", force=True)
    try:
        engine.run()
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    sys.exit(main(int(sys.argv[1])))


class HeartbeatChild:
    """Parent-side handle: starts ``python -m hawrap.heartbeat``, feeds it our state, and
    calls ``on_message`` (from a reader thread) with each report; ``{"t": "exit"}`` when the
    child has gone."""

    def __init__(self, config: dict, on_message):
        import subprocess
        import threading

        self._on_message = on_message
        self.last_message = time.monotonic()  # when the child last reported (reader thread)
        self.sock, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hawrap.heartbeat", str(child_end.fileno())],
                pass_fds=[child_end.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            child_end.close()
        self.sock.send(msgpack.packb(config, use_bin_type=True))
        self._thread = threading.Thread(target=self._read, name="heartbeat-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_CONTROL_MESSAGE)
            except OSError:
                data = b""
            if not data:
                self._on_message({"t": "exit"})
                return
            self.last_message = time.monotonic()
            try:
                msg = msgpack.unpackb(data, raw=False)
            except Exception:  # a broken child: treat like its exit
                self._on_message({"t": "exit"})
                return
            self._on_message(msg)

    def update(self, state: dict) -> None:
        try:
            self.sock.send(msgpack.packb({"t": "state", **state}, use_bin_type=True))
        except OSError:
            pass  # the reader thread reports the child's exit

    def keepalive(self) -> None:
        """The node process makes progress (from its watchdog feeder, any thread)."""
        try:
            self.sock.send(KEEPALIVE, socket.MSG_DONTWAIT)
        except OSError:
            pass  # full (the child is not reading: it is the frozen one) or gone

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (works on a stopped process too); the reader thread then reports the exit."""
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.sock.send(msgpack.packb({"t": "stop"}))
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout)
        self.sock.close()
