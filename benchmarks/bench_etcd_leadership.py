"""etcd leadership (issue 19, part A): time from a leader's death to a new leader, and the
margin by which a leader cut from the etcd majority stops before anyone else wins.

Needs root (network namespaces), etcd and etcd3gw.  Run as:

    python -m benchmarks.bench_etcd_leadership --trials 10 --ttl 2 [--ttl 5] [--json OUT]

The lab is tests/etcd/etcdlab.py: a three-member etcd cluster in namespaces, a hamirror member
(tests/etcd/member.py: hawrap.leadership with a recording listener) beside each.  A trial
kills the leading member process with SIGKILL at a random point of its keepalive cycle
(U(0, TTL/6) after it was seen serving) and measures the time to the next ``elected`` event,
on the one monotonic clock every process shares; the killed member is started again and
rejoins before the next trial.  Partition trials cut the leader's node with an ``ip rule``
blackhole and record (stop done - cut) and (win - cut).  This measures leadership only: no
VIP or services move (part B measures client-visible failover beside two-node and keepalived).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "etcd"))

import etcdlab as L  # noqa: E402


def kill_trials(workdir: str, ttl: int, trials: int, rng: random.Random) -> list[float]:
    lab = L.Lab(workdir)
    try:
        members = L.Members(lab, ttl=ttl)
        for node in L.NODES:
            members.set_position(node, 0, 0)
            members.start(node)
        times = []
        for i in range(trials):
            leader = members.wait_leader(timeout=60)
            time.sleep(rng.uniform(0, ttl / 6))
            killed = members.kill(leader)
            new = members.wait_leader(timeout=60, not_in=(leader,))
            won = [e for e in members.wins() if e.node == new][-1]
            times.append(won.t - killed)
            print(f"  kill {i + 1}/{trials}: {leader} -> {new} in {times[-1]:.3f} s", flush=True)
            members.start(leader)
            L.wait_for(lambda n=leader: any(e.event == "leader_changed" for e in members.events(n)[-3:]), 30)
            time.sleep(ttl)  # the restarted member is past its start-up wait
        return times
    finally:
        lab.close()


def partition_trials(workdir: str, ttl: int, trials: int) -> list[tuple[float, float]]:
    lab = L.Lab(workdir)
    try:
        members = L.Members(lab, ttl=ttl)
        for node in L.NODES:
            members.set_position(node, 0, 0)
            members.start(node)
        out = []
        for i in range(trials):
            old = members.wait_leader(timeout=60)
            cut = time.monotonic()
            lab.partition(old, "blackhole")
            new = members.wait_leader(timeout=60, not_in=(old,))
            stopped = next(e.t for e in members.events(old) if e.event == "stopped" and e.t > cut)
            won = [e for e in members.wins() if e.node == new][-1].t
            out.append((stopped - cut, won - cut))
            print(
                f"  partition {i + 1}/{trials}: {old} stopped at +{stopped - cut:.3f} s, {new} won at +{won - cut:.3f} s",
                flush=True,
            )
            lab.heal(old, "blackhole")
            L.wait_for(
                lambda n=old, t=won: any(e.event == "leader_changed" and e.t > t for e in members.events(n)),
                30,
            )
            time.sleep(ttl)
        bad = L.overlaps(members.serving_intervals(open_until=time.monotonic()))
        assert not bad, f"two members served at once: {bad}"
        return out
    finally:
        lab.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--ttl", type=int, action="append")
    ap.add_argument("--partitions", type=int, default=5)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    why = L.can_run()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    results = {"seed": seed, "ttl": {}}
    for ttl in args.ttl or [2]:
        with tempfile.TemporaryDirectory(prefix="bench-etcd-") as d:
            print(f"TTL {ttl} s: {args.trials} leader kills", flush=True)
            kills = kill_trials(d, ttl, args.trials, rng)
        with tempfile.TemporaryDirectory(prefix="bench-etcd-") as d:
            print(f"TTL {ttl} s: {args.partitions} partitions of the leader", flush=True)
            parts = partition_trials(d, ttl, args.partitions)
        r = {
            "kill_to_new_leader": {
                "median": statistics.median(kills),
                "min": min(kills),
                "max": max(kills),
                "all": kills,
            },
            "partition_stop": statistics.median(p[0] for p in parts),
            "partition_win": statistics.median(p[1] for p in parts),
            "partition_margin_min": min(p[1] - p[0] for p in parts),
        }
        results["ttl"][ttl] = r
        print(f"TTL {ttl} s: leader killed -> new leader median {r['kill_to_new_leader']['median']:.3f} s "
              f"(min {min(kills):.3f}, max {max(kills):.3f}, n={len(kills)}); partitioned leader stopped at "
              f"+{r['partition_stop']:.3f} s, new leader at +{r['partition_win']:.3f} s (median), smallest margin "
              f"{r['partition_margin_min']:.3f} s")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
