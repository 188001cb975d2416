"""The small TCP service of the cluster tests: answers every connection with its node name.

It writes its pid file only once it listens, so a monitor that finds the pid file alive
knows the service answers.  SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--pidfile", required=True)
    args = ap.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", args.port))
    sock.listen(128)
    tmp = f"{args.pidfile}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.rename(tmp, args.pidfile)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    answer = args.name.encode() + b"\n"
    while True:
        conn, _ = sock.accept()
        try:
            conn.sendall(answer)
        except OSError:
            pass
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
