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


def probe(interface: str, ip: str, timeout: float) -> str | None:
    """Who answers ARP for ``ip`` within ``timeout`` seconds ("MAC aa:bb:.."), or None."""
    mac = interface_mac(interface)
    target = socket.inet_aton(ip)
    with _socket(interface) as sock:
        sock.send(_frame(mac, 1, b"\0\0\0\0", target))
        deadline = time.monotonic() + timeout
        while True:
            # Never give up without one look at the socket: a reply that arrived while this
            # process was not scheduled is queued there, and missing it would take an
            # address that another host holds.
            ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            data = sock.recv(128)
            if len(data) < 42:
                continue
            sender_mac, sender_ip = data[22:28], data[28:32]
            if sender_ip == target and sender_mac != mac:
                return "MAC " + sender_mac.hex(":")


def gratuitous(interface: str, ip: str) -> None:
    """One gratuitous ARP request announcing that ``ip`` is at this interface's MAC."""
    mac = interface_mac(interface)
    addr = socket.inet_aton(ip)
    with _socket(interface) as sock:
        sock.send(_frame(mac, 1, addr, addr))
