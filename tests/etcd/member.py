"""One hamirror member in the etcd lab: ``hawrap.leadership`` with a recording listener.

It stands in for the node until the node drives leadership itself: "serving" is a marker
file (``serving-NAME``) created when elected and removed when told to stop, after
``--stop-delay`` seconds of pretend work (dropping a VIP, stopping services).  Every call of
the listener is appended to ``events-NAME.jsonl`` with CLOCK_MONOTONIC, which every process
on the machine shares, so the test can order events across members.  The position comes
from ``position-NAME`` ("EPOCH SEQ"), the standby lock is ``standby.lock-NAME``.

SIGTERM: an orderly stop (stop serving, revoke the lease).  SIGUSR1: resign.

Also ``member.py failover --to NODE ...``: the administrator's command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from hawrap.etcdclient import EtcdConnection
from hawrap.leadership import Leadership, Listener, Position, Timing, request_failover
from mirror import lockfile


class Recorder(Listener):
    def __init__(self, name: str, workdir: str, stop_delay: float):
        self.name = name
        self.workdir = workdir
        self.stop_delay = stop_delay
        self.lock = threading.Lock()
        self.events = open(os.path.join(workdir, f"events-{name}.jsonl"), "a")
        self.marker = os.path.join(workdir, f"serving-{name}")

    def record(self, event: str, **fields) -> None:
        with self.lock:
            self.events.write(json.dumps({"t": time.monotonic(), "event": event, **fields}) + "\n")
            self.events.flush()

    def _serve(self, on: bool) -> None:
        if on:
            with open(self.marker, "w"):
                pass
        else:
            try:
                os.unlink(self.marker)
            except FileNotFoundError:
                pass

    def elected(self, epoch: int) -> None:
        self._serve(True)
        self.record("elected", epoch=epoch)

    def epoch_raised(self, epoch: int) -> None:
        self.record("epoch_raised", epoch=epoch)

    def stop_serving(self, reason: str) -> None:
        self.record("stop_serving", reason=reason)
        time.sleep(self.stop_delay)  # pretend: drop the VIP, stop the services
        self._serve(False)
        self.record("stopped", reason=reason)

    def demoted(self, reason: str) -> None:
        self._serve(False)
        self.record("demoted", reason=reason)

    def leader_changed(self, leader) -> None:
        self.record(
            "leader_changed", leader=leader.node if leader else None, epoch=leader.epoch if leader else None
        )

    def prepare_handover(self, target: str) -> bool:
        self._serve(False)
        self.record("prepare_handover", target=target)
        return True

    def handover_aborted(self, reason: str) -> None:
        self._serve(True)
        self.record("handover_aborted", reason=reason)


def read_position(path: str) -> Position:
    try:
        with open(path) as f:
            epoch, seq = f.read().split()
        return Position(int(epoch), int(seq))
    except FileNotFoundError:
        return Position()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", nargs="?", default="run", choices=["run", "failover"])
    ap.add_argument("--name")
    ap.add_argument("--to")
    ap.add_argument("--endpoint", action="append", required=True)
    ap.add_argument("--prefix", default="/hamirror/lab")
    ap.add_argument("--ttl", type=int, default=2)
    ap.add_argument("--stop-budget", type=float, default=0.5)
    ap.add_argument("--stop-delay", type=float, default=0.1)
    ap.add_argument("--request-timeout", type=float, default=0.3)
    ap.add_argument("--workdir", default=".")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--handover-timeout", type=float, default=30.0)
    ap.add_argument("--expect", action="append", default=[], help="a configured member's name (repeat)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = EtcdConnection(tuple(args.endpoint), request_timeout=args.request_timeout)
    if args.command == "failover":
        ok, message = request_failover(conn, args.prefix, args.to, timeout=args.timeout)
        print(json.dumps({"ok": ok, "message": message}))
        return 0 if ok else 1

    recorder = Recorder(args.name, args.workdir, args.stop_delay)
    position_file = os.path.join(args.workdir, f"position-{args.name}")
    standby_lock = os.path.join(args.workdir, f"standby.lock-{args.name}")

    def eligibility():
        return "standby lock present" if lockfile.is_locked(standby_lock) else None

    leadership = Leadership(
        conn, args.prefix, args.name, Timing(ttl=args.ttl, stop_budget=args.stop_budget, handover_timeout=args.handover_timeout), recorder,
        position=lambda: read_position(position_file), eligibility=eligibility, expected=tuple(args.expect),
        leaving=lambda: lockfile.is_locked(standby_lock),
    )  # fmt: skip
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def resign():
        recorder.record("resigning")
        recorder.record("resigned", ok=leadership.resign())

    signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=resign, daemon=True).start())
    leadership.start()
    recorder.record("started")
    done.wait()
    leadership.stop(revoke=True)
    recorder.record("exited")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
