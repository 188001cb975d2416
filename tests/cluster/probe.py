"""The client of the cluster tests: connect to the VIP every INTERVAL seconds, record each try.

A new connection is started every interval whether or not the previous ones finished (a
connection whose SYN went to a dead MAC must not delay the next probe), each with its own
timeout.  One JSON line per probe: start and end (CLOCK_MONOTONIC, the same clock as the
test process), and the node name that answered or null.  Runs until SIGTERM or --duration.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import signal
import socket
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--timeout", type=float, default=0.25)
    ap.add_argument("--duration", type=float, default=600.0)  # bounded even if nobody stops it
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    host, port = args.target.rsplit(":", 1)
    addr = (host, int(port))
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    sel = selectors.DefaultSelector()
    out = open(args.out, "a", buffering=1)
    pending: dict[socket.socket, dict] = {}
    start = time.monotonic()
    next_probe = start

    def finish(sock, answer):
        info = pending.pop(sock)
        sel.unregister(sock)
        sock.close()
        out.write(json.dumps({"start": info["start"], "end": time.monotonic(), "answer": answer}) + "\n")

    while not stop and time.monotonic() - start < args.duration:
        now = time.monotonic()
        if now >= next_probe:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                out.write(json.dumps({"start": now, "end": time.monotonic(), "answer": None}) + "\n")
                s.close()
            else:
                pending[s] = {"start": now, "buf": b""}
                sel.register(s, selectors.EVENT_READ)
            next_probe += args.interval
            if next_probe < now:
                next_probe = now + args.interval
        wake = next_probe
        for info in pending.values():
            wake = min(wake, info["start"] + args.timeout)
        for key, _ in sel.select(max(0.0, wake - time.monotonic())):
            s = key.fileobj
            try:
                data = s.recv(256)
            except OSError:
                finish(s, None)
                continue
            info = pending[s]
            info["buf"] += data
            if not data or info["buf"].endswith(b"\n"):
                name = info["buf"].decode(errors="replace").strip() or None
                finish(s, name)
        now = time.monotonic()
        for s in [s for s, info in pending.items() if now - info["start"] >= args.timeout]:
            finish(s, None)
    for s in list(pending):
        finish(s, None)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
