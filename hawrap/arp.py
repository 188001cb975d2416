"""Duplicate address check and gratuitous ARP without starting a process (root: AF_PACKET).

Doing what ``arping -D`` and ``arping -U`` do from inside hawrap keeps them off the takeover's
critical path: starting ``arping`` costs 70-90 ms per call here (library and capture setup),
its own timeout comes on top, and the two calls of a takeover would use a fifth of the
one-second budget.  The frames are the same:

* probe (RFC 5227): ARP request, sender IP 0.0.0.0, target IP = the address; any ARP frame
  whose *sender* IP is the address, from another MAC, means someone holds it;
* gratuitous ARP: ARP request with sender IP = target IP = the address, broadcast; a Linux
  neighbour whose cache has the address updates its entry to our MAC.

``VipConfig.arping`` selects the external tool instead ("auto", "habets", "iputils").

``ArpSocket`` keeps its packet socket open between uses: opening and binding one costs
about 15 ms here (and closing it as much: the kernel waits for an RCU grace period), a fifth
of a takeover's ARP check.  Frames queued while it was idle are drained before each probe.
"""

from __future__ import annotations

import select
import socket
import struct
import time

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6


def interface_mac(interface: str) -> bytes:
    with open(f"/sys/class/net/{interface}/address") as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


def _frame(src_mac: bytes, op: int, sender_ip: bytes, target_ip: bytes) -> bytes:
    eth = BROADCAST + src_mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, src_mac, sender_ip, ZERO_MAC, target_ip)
    return eth + arp


def _socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    sock.bind((interface, ETH_P_ARP))
    return sock


class ArpSocket:
    """A packet socket on one interface, for probes and announcements (not thread-safe:
    one user at a time, as the node's main loop and its announcement thread take turns)."""

    def __init__(self, interface: str):
        self.interface = interface
        self._sock: socket.socket | None = None
        self._mac = b""

    def _open(self) -> socket.socket:
        if self._sock is None:
            self._mac = interface_mac(self.interface)
            self._sock = _socket(self.interface)
            self._sock.setblocking(False)
        return self._sock

    def _drain(self) -> None:
        while True:
            try:
                self._sock.recv(128)
            except (BlockingIOError, InterruptedError):
                return

    def _send(self, frame_for) -> socket.socket:
        """Send (a frame built with our MAC); on a socket gone bad (the interface was
        re-created), open a new one and try once more."""
        for attempt in (1, 2):
            sock = self._open()
            try:
                sock.send(frame_for(self._mac))
                return sock
            except OSError:
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def probe(self, ip: str, timeout: float) -> str | None:
        """Who answers ARP for ``ip`` within ``timeout`` seconds ("MAC aa:bb:.."), or None."""
        target = socket.inet_aton(ip)
        self._open()
        self._drain()  # what came while we were idle says nothing about now
        sock = self._send(lambda mac: _frame(mac, 1, b"\0\0\0\0", target))
        deadline = time.monotonic() + timeout
        while True:
            # Never give up without one look at the socket: a reply that arrived while this
            # process was not scheduled is queued there, and missing it would take an
            # address that another host holds.
            ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            while True:
                try:
                    data = sock.recv(128)
                except (BlockingIOError, InterruptedError):
                    break
                if len(data) < 42:
                    continue
                sender_mac, sender_ip = data[22:28], data[28:32]
                if sender_ip == target and sender_mac != self._mac:
                    return "MAC " + sender_mac.hex(":")

    def gratuitous(self, ip: str) -> None:
        """One gratuitous ARP request announcing that ``ip`` is at this interface's MAC."""
        addr = socket.inet_aton(ip)
        self._send(lambda mac: _frame(mac, 1, addr, addr))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def probe(interface: str, ip: str, timeout: float) -> str | None:
    """A one-off probe (see ``ArpSocket.probe``)."""
    arp = ArpSocket(interface)
    try:
        return arp.probe(ip, timeout)
    finally:
        arp.close()


def gratuitous(interface: str, ip: str) -> None:
    """A one-off gratuitous ARP (see ``ArpSocket.gratuitous``)."""
    arp = ArpSocket(interface)
    try:
        arp.gratuitous(ip)
    finally:
        arp.close()
