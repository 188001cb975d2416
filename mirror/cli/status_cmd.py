"""Show what `mirror daemon` is doing: per pair its state, last sync, pending changes,
replication lag (seconds and bytes), what the destination has applied (its position in the
journal, and the lag in entries), how it last caught up (journal replay or full sync),
latency, progress of a first sync or catch-up, the files that failed, the directories of
the source it cannot watch (their changes arrive only by a rescan, up to a minute late) and
the last error.

Reads the status file the daemon rewrites twice a second (in its status dir: --state-dir,
or the status_dir of --config), and checks that the daemon that wrote it still runs: a
pair is never shown live for a daemon that stopped, died or hangs.

Exit status (alert on anything but 0):
  0  the daemon runs and every pair is live
  1  the daemon runs, a pair is not live (syncing, catching up, locked, disconnected,
     unreachable, halted, fenced, error: an internal error, tried again), files failed in its last session, or directories of
     its source cannot be watched (they are listed)
  2  no daemon status found, or bad usage
  6  stopped: the daemon exited (SIGTERM, SIGINT, all pairs fenced) and said so
  7  dead: the daemon's process is gone without saying so (killed, crashed)
  8  stale: the process exists but has not written its status for 5 s (hung, or stopped)
"""

from __future__ import annotations

import sys
import time

from ..errors import EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK
from ._common import path_arg, print_json

EXIT_STOPPED = 6
EXIT_DEAD = 7
EXIT_STALE = 8
STALE_SECONDS = 5.0  # the daemon writes every 0.5 s


def add_arguments(parser):
    parser.add_argument("tree", nargs="?", help="a source tree of the daemon (its state dir holds the status)")
    parser.add_argument("--state-dir", metavar="DIR", help="the daemon's status dir")
    parser.add_argument("--config", metavar="FILE", help="the daemon's configuration (for its status dir)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def daemon_state(status: dict) -> tuple[str, float]:
    """running, stopped, dead or stale: what became of the daemon that wrote ``status``; and
    how old the status is.  A running daemon's age is read on the monotonic clock, which it
    shares with us (the same boot: its process is still there), so that a wall clock stepped
    back does not pass a hung daemon off as running for as long as the step."""
    from ..daemon import process_start

    age = time.time() - status["updated"]
    if status.get("state") == "stopped":
        return "stopped", age
    started = process_start(status["pid"])
    if started is None or (status.get("pid_start") is not None and started != status["pid_start"]):
        return "dead", age  # its pid is gone, or is another process's now
    if isinstance(status.get("monotonic"), int | float):
        age = time.monotonic() - status["monotonic"]
    return ("stale" if age > STALE_SECONDS else "running"), age


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
    state, age = daemon_state(status)
    if state != "running":
        for p in status["pairs"]:  # what a pair was doing is history now, not its state
            p["last_state"], p["state"] = p["state"], f"not mirroring (daemon {state})"
    if args.json:
        print_json({**status, "daemon": state, "age_seconds": round(age, 3), "stale": state == "stale"})
    else:
        _print(status, state, age)
    if state != "running":
        return {"stopped": EXIT_STOPPED, "dead": EXIT_DEAD, "stale": EXIT_STALE}[state]
    healthy = all(p["state"] == "live" and not p.get("failed_files") and not p.get("unwatched_count")
                  for p in status["pairs"])  # fmt: skip
    return EXIT_OK if healthy else EXIT_DIFFERENT


def _print(status: dict, state: str, age: float) -> None:
    written = time.strftime("%H:%M:%S", time.localtime(status["updated"]))
    print({
        "running": f"mirror daemon pid {status['pid']}: running (status {age:.1f} s old)",
        "stopped": f"mirror daemon pid {status['pid']}: STOPPED at {written}",
        "dead": f"mirror daemon pid {status['pid']}: DEAD: the process is gone without having stopped "
                f"(killed or crashed); last status at {written}",
        "stale": f"mirror daemon pid {status['pid']}: STALE: no status for {age:.1f} s (hung or stopped?)",
    }[state])  # fmt: skip
    for p in status["pairs"]:
        last = time.strftime("%H:%M:%S", time.localtime(p["last_sync"])) if p["last_sync"] else "never"
        was = f" (was {p['last_state']})" if "last_state" in p else ""
        print(f"{p['name']}: {p['state']}{was} since {time.strftime('%H:%M:%S', time.localtime(p['since']))}")
        print(f"  {p['source']} -> {p['destination']}")
        success = p.get("last_success")
        print(f"  last sync {last}, last without failures "
              f"{time.strftime('%H:%M:%S', time.localtime(success)) if success else 'never'}, "
              f"{p['pending']} pending, lag {p['lag_seconds']:.3f} s / {p['lag_bytes']} bytes")  # fmt: skip
        print(f"  {_applied_line(p)}")
        print(f"  {_compare_line(p)}")
        progress = p.get("progress")
        if progress:
            total = progress.get("entries_total")
            done = f"{progress['entries']} of {total}" if total is not None else f"{progress['entries']}"
            print(f"  progress: {done} entries, {progress['bytes']} bytes done")
        if p.get("latency_p50_ms") is not None:
            print(f"  latency p50 {p['latency_p50_ms']} ms, p99 {p['latency_p99_ms']} ms; "
                  f"{p['sessions']} sessions, {p['files_sent']} files, {p['failures']} failures")  # fmt: skip
        for path, reason in p.get("failed_files") or ():
            print(f"  failed: {path}: {reason}")
        _print_unwatched(p)
        if p.get("unseen_repaired"):
            shown = p.get("last_unseen") or []
            print(f"  repaired by scheduled compares, no change seen in the source: {p['unseen_repaired']} entries "
                  f"(last: {', '.join(shown[:UNWATCHED_SHOWN])}{', ...' if len(shown) > UNWATCHED_SHOWN else ''})")  # fmt: skip
        if p.get("last_error"):
            print(f"  last error: {p['last_error']}")


UNWATCHED_SHOWN = 5  # --json lists up to 20


def _print_unwatched(p: dict) -> None:
    count = p.get("unwatched_count") or 0
    if not count:
        return
    retry = p.get("rewatch_at")
    print(f"  not watched: {count} {'directory' if count == 1 else 'directories'} of the source; changes there "
          f"arrive by rescan, up to a minute late"
          + (f" (next try {time.strftime('%H:%M:%S', time.localtime(retry))})" if retry else ""))  # fmt: skip
    shown = p.get("unwatched_dirs") or []
    for path, reason in shown[:UNWATCHED_SHOWN]:
        print(f"    {path}: {reason}")
    if count > min(len(shown), UNWATCHED_SHOWN):
        print(f"    ... and {count - min(len(shown), UNWATCHED_SHOWN)} more")
    if any("max_user_watches" in reason for _, reason in shown):
        print("    the inotify watch limit is reached: raise the fs.inotify.max_user_watches sysctl")


def _compare_line(p: dict) -> str:
    """When the replica was last found whole by a whole-tree compare, and how often one is due."""
    last = p.get("last_compare")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "never"
    interval = p.get("reconcile_interval")
    return f"last whole-tree compare {when}, " + (f"one every {interval:g} s" if interval else "none scheduled")


def _applied_line(p: dict) -> str:
    """The destination's applied position (its receiver's record) and its lag in journal
    entries; how its last (re)connection caught up."""
    applied = p.get("applied")
    if applied:
        where = f"applied epoch {applied['epoch']} seq {applied['seq']} of journal seq {p.get('journal_seq', 0)}"
        lag = p.get("lag_entries")
        where += f", {lag} entries behind" if lag is not None else " (of another journal run: not comparable)"
    else:
        where = f"applied: unknown (no record on the destination yet), journal seq {p.get('journal_seq', 0)}"
    catch_up = p.get("catch_up")
    if catch_up:
        how = ("journal replay" + (f" of {catch_up['changes']} changes" if catch_up.get("changes") is not None else "")
               if catch_up["how"] == "journal" else f"full sync ({catch_up['reason']})")  # fmt: skip
        where += f"; last caught up by {how}"
        where += f"; {p.get('journal_catch_ups', 0)} replays, {p.get('full_syncs', 0)} full syncs"
    return where
