"""A destination back from an absence: journal replay against a full sync.

    python -m benchmarks.bench_catch_up [--files 20000] [--changes 200] [--runs 5]

One ``mirror daemon`` mirrors a tree to two real ``mirror serve`` receivers on loopback.  In
each run receiver B is frozen (SIGSTOP), ``--changes`` files are rewritten while A keeps up,
and B is let go on (SIGCONT).  Measured: the duration of B's first session after it
reconnected (``last_session_seconds`` in the daemon's status), once with the default
retention (the daemon replays the journal from B's applied record) and once with
``journal_retain`` below the number of changes (the journal lets B go: a full sync of the
tree).  The reconnection backoff is not counted (it is the same for both).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.servers import mirror_server  # noqa: E402

MIRROR = [sys.executable, "-m", "mirror"]


def _status(src: str) -> dict:
    try:
        with open(os.path.join(src, ".mirror", "mirror-daemon.status.json")) as f:
            return {p["name"]: p for p in json.load(f)["pairs"]}
    except (OSError, ValueError, KeyError):
        return {}


def _wait(src: str, condition, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pairs = _status(src)
        if pairs and condition(pairs):
            return pairs
        time.sleep(0.05)
    raise TimeoutError(f"status not reached: {_status(src)}")


def _caught_up(count_key: str, before: int):
    def done(p):
        b = p["to-b"]
        return b[count_key] > before and b["state"] == "live" and b["lag_entries"] == 0 and b["pending"] == 0

    return done


def one_config(work: str, files: int, changes: int, runs: int, retain: int | None) -> list[float]:
    src = os.path.join(work, "src")
    for d in range(files // 100):
        os.makedirs(os.path.join(src, f"d{d:03d}"), exist_ok=True)
        for i in range(100):
            with open(os.path.join(src, f"d{d:03d}", f"f{i:03d}"), "wb") as f:
                f.write(os.urandom(64))
    a, b = os.path.join(work, "a"), os.path.join(work, "b")
    os.makedirs(a)
    os.makedirs(b)
    out = []
    sa, sb = Path(work, "sa"), Path(work, "sb")
    sa.mkdir()
    sb.mkdir()
    with mirror_server(sa, {"m": a}) as ra, mirror_server(sb, {"m": b}) as rb:
        config = os.path.join(work, "daemon.toml")
        text = "[daemon]\ntimeout = 2\ncontimeout = 2\n" + (f"journal_retain = {retain}\n" if retain else "")
        for name, server in (("to-a", ra), ("to-b", rb)):
            text += (f'\n[[pair]]\nname = "{name}"\nsource = "{src}"\ndestination = "{server.url("m")}"\n'
                     f'secret_file = "{server.secret_file}"\n')  # fmt: skip
        with open(config, "w") as f:
            f.write(text)
        log = open(os.path.join(work, "daemon.log"), "ab")
        daemon = subprocess.Popen([*MIRROR, "daemon", "--config", config], stdout=log, stderr=log)
        key = "full_syncs" if retain else "journal_catch_ups"
        try:
            _wait(src, lambda p: all(x["state"] == "live" and x["lag_entries"] == 0 for x in p.values()))
            for run in range(runs):
                before = _status(src)["to-b"][key]
                os.kill(rb.proc.pid, signal.SIGSTOP)
                try:
                    for i in range(changes):
                        with open(os.path.join(src, f"d{i % (files // 100):03d}", f"f{i // (files // 100):03d}"),
                                  "wb") as f:  # fmt: skip
                            f.write(os.urandom(64 + run))
                    _wait(src, lambda p: p["to-a"]["pending"] == 0 and p["to-b"]["state"] in ("unreachable",
                                                                                           "disconnected"))  # fmt: skip
                finally:
                    os.kill(rb.proc.pid, signal.SIGCONT)
                pairs = _wait(src, _caught_up(key, before))
                out.append(pairs["to-b"]["last_session_seconds"])
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
            log.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for label, retain in (("journal replay", None), ("full sync", max(1, args.changes // 4))):
        with tempfile.TemporaryDirectory(prefix="bench-catch-up-") as work:
            times = one_config(work, args.files, args.changes, args.runs, retain)
        results[label] = times
        print(f"{label}: median {statistics.median(times) * 1000:.1f} ms over {len(times)} runs "
              f"({', '.join(f'{t * 1000:.1f}' for t in times)} ms)")  # fmt: skip
    ratio = statistics.median(results["full sync"]) / statistics.median(results["journal replay"])
    print(f"full sync / journal replay: {ratio:.1f}x ({args.files} files, {args.changes} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
