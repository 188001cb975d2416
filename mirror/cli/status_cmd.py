"""Show what `mirror daemon` is doing: per pair its state, last sync, pending changes,
replication lag (seconds and bytes), latency and last error.

Reads the status file the daemon rewrites twice a second (in its status dir: --state-dir,
or the status_dir of --config).  Exit status 0 if every pair is live, 1 otherwise (locked,
disconnected, catching up, ...), 2 if no daemon status is found or it is stale.
"""

from __future__ import annotations

import sys
import time

from ..errors import EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK
from ._common import path_arg, print_json


def add_arguments(parser):
    parser.add_argument("tree", nargs="?", help="a source tree of the daemon (its state dir holds the status)")
    parser.add_argument("--state-dir", metavar="DIR", help="the daemon's status dir")
    parser.add_argument("--config", metavar="FILE", help="the daemon's configuration (for its status dir)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from ..daemon import read_status
    from ..statedir import default_state_dir

    if args.config:
        from ..config import load_daemon_config

        status_dir = load_daemon_config(args.config).status_dir
    elif args.state_dir:
        status_dir = path_arg(args.state_dir)
    elif args.tree:
        status_dir = default_state_dir(path_arg(args.tree))
    else:
        print("mirror status: give TREE, --state-dir DIR or --config FILE", file=sys.stderr)
        return EXIT_ERROR
    try:
        status = read_status(status_dir)
    except FileNotFoundError:
        print(f"mirror status: no daemon status in {status_dir.decode(errors='replace')}", file=sys.stderr)
        return EXIT_ERROR
    age = time.time() - status["updated"]
    stale = age > 5
    if args.json:
        print_json({**status, "age_seconds": round(age, 3), "stale": stale})
    else:
        print(f"mirror daemon pid {status['pid']}, status {age:.1f} s old{' (STALE: not running?)' if stale else ''}")
        for p in status["pairs"]:
            last = time.strftime("%H:%M:%S", time.localtime(p["last_sync"])) if p["last_sync"] else "never"
            print(f"{p['name']}: {p['state']} since {time.strftime('%H:%M:%S', time.localtime(p['since']))}")
            print(f"  {p['source']} -> {p['destination']}")
            print(f"  last sync {last}, {p['pending']} pending, lag {p['lag_seconds']:.3f} s / {p['lag_bytes']} bytes")
            if p.get("latency_p50_ms") is not None:
                print(f"  latency p50 {p['latency_p50_ms']} ms, p99 {p['latency_p99_ms']} ms; "
                      f"{p['sessions']} sessions, {p['files_sent']} files, {p['failures']} failures")
            if p.get("last_error"):
                print(f"  last error: {p['last_error']}")
    if stale:
        return EXIT_ERROR
    return EXIT_OK if all(p["state"] == "live" for p in status["pairs"]) else EXIT_DIFFERENT
