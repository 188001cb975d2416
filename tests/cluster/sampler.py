"""The safety sampler of the fault tests: runs in the client's namespace and, every PERIOD,
asks the LAN who holds the virtual IP and whether the service answers on each node.

Each round it broadcasts an ARP probe for the VIP (sender IP 0.0.0.0, as RFC 5227 probes do,
so no neighbour cache on the LAN changes) and collects every MAC that answers for the VIP
within WINDOW; at the same time it opens a TCP connection to the service port of each node's
own LAN address.  Two MACs answering in one round are two VIP holders as the clients see
them; the service answering on both nodes is a service running twice where clients reach it.

Between rounds it keeps reading the ARP socket: every frame whose sender IP is the VIP
(gratuitous ARPs, replies) is logged with its time and MAC, so the test can find an
announcement from a node that did not hold the address.

One JSON line per round: ``{"t": start, "arp": [mac, ...], "svc": {"a": bool, "b": bool}}``;
one per frame seen: ``{"t": time, "frame": op, "mac": mac}``.  CLOCK_MONOTONIC, as the test.
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import signal
import socket
import struct
import sys
import time

ETH_P_ARP = 0x0806


def mac_of(interface: str) -> bytes:
    with open(f"/sys/class/net/{interface}/address") as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


def probe_frame(mac: bytes, target: bytes) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, b"\0\0\0\0", b"\0" * 6, target)
    return b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interface", default="lan0")
    ap.add_argument("--vip", required=True)
    ap.add_argument("--node", action="append", default=[], help="NAME=ADDRESS, repeatable")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--period", type=float, default=0.05)
    ap.add_argument("--window", type=float, default=0.035)
    ap.add_argument("--duration", type=float, default=900.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    nodes = dict(n.split("=", 1) for n in args.node)
    vip = socket.inet_aton(args.vip)
    mac = mac_of(args.interface)
    frame = probe_frame(mac, vip)
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    raw.bind((args.interface, ETH_P_ARP))
    raw.setblocking(False)
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    out = open(args.out, "a", buffering=1)
    start = time.monotonic()

    def read_frames(answered: set[str] | None) -> None:
        while True:
            try:
                data = raw.recv(128)
            except (BlockingIOError, InterruptedError):
                return
            if len(data) < 42:
                continue
            op = struct.unpack("!H", data[20:22])[0]
            sender_mac, sender_ip = data[22:28], data[28:32]
            if sender_ip != vip or sender_mac == mac:
                continue
            who = sender_mac.hex(":")
            out.write(json.dumps({"t": time.monotonic(), "frame": op, "mac": who}) + "\n")
            if answered is not None and op == 2:
                answered.add(who)

    next_round = start
    while not stop and time.monotonic() - start < args.duration:
        now = time.monotonic()
        if now < next_round:
            select.select([raw], [], [], next_round - now)
            read_frames(None)
            continue
        t0 = time.monotonic()
        next_round += args.period
        if next_round < t0:
            next_round = t0 + args.period
        read_frames(None)
        answered: set[str] = set()
        try:
            raw.send(frame)
        except OSError:
            pass  # our own link is down: nobody answers this round
        conns: dict[socket.socket, str] = {}
        svc = dict.fromkeys(nodes, False)
        for name, addr in nodes.items():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((addr, args.port))
            if err in (0, errno.EINPROGRESS):
                conns[s] = name
            else:
                s.close()
        deadline = t0 + args.window
        while True:
            left = deadline - time.monotonic()
            waiting = list(conns)
            ready_r, ready_w, _ = select.select([raw], waiting, [], max(0.0, left))
            if raw in ready_r:
                read_frames(answered)
            for s in ready_w:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    svc[conns[s]] = True
                s.close()
                del conns[s]
            if left <= 0:
                break
        read_frames(answered)
        for s in conns:
            s.close()
        out.write(json.dumps({"t": t0, "arp": sorted(answered), "svc": svc}) + "\n")
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
