"""hawrap with the etcd backend (issue 19, part B): client-visible failover on three nodes, and
replication lag to each of the two replicas under a steady write load.

Needs root (network namespaces), etcd and etcd3gw.  Run as:

    python -m benchmarks.bench_etcd_failover --trials 10 [--ttl 4] [--fault hawrap|power] [--json OUT]

The lab is tests/etcd/hawraplab.py: a three-member etcd cluster in namespaces, real
``hawrap run`` nodes beside it (VIP, the TCP service of tests/cluster, a fan-out mirror
daemon on the leader), and a client probing the VIP every 20 ms.  A trial kills the leader
at a random point of its keepalive cycle (U(0, TTL/6) after the client saw it settled) and
measures the time from the kill to the end of the first probe answered by another node.
``--fault hawrap``: every process of the leader's node but its etcd member gets SIGKILL (its
VIP stays until the kernel expires it); ``power``: its link goes down and every process
dies, its etcd member included.  The killed node is started again and rejoins as a replica
before the next trial, which kills the new leader.

The lag phase writes a file every ``--write-interval`` on the leader for ``--lag-seconds``
and records, per replica, when each file appears there (polled every 5 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "etcd"))

import etcdlab as E  # noqa: E402
import hawraplab as H  # noqa: E402


def settled_leader(client: H.Client, since: float, not_from: str | None, timeout: float = 60) -> str:
    first = E.wait_for(lambda: client.first_answer_after(since, not_from), timeout)
    if not first:
        raise RuntimeError(f"no leader answered within {timeout} s")
    return first.answer


def power_off(lab: H.HawrapLab, node: str) -> float:
    E.sh("ip", "-n", lab.ns[node], "link", "set", "lan0", "down")
    t = time.monotonic()
    for _ in range(50):
        pids = lab.pids(node)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    return t


def power_on(lab: H.HawrapLab, hw: H.Hawrap, node: str) -> None:
    E.sh("ip", "-n", lab.ns[node], "addr", "flush", "dev", "lan0")
    E.sh("ip", "-n", lab.ns[node], "addr", "add", f"{E.ADDR[node]}/24", "dev", "lan0")
    E.sh("ip", "-n", lab.ns[node], "link", "set", "lan0", "up")
    lab.start_etcd(node)
    hw.start(node)


def failover_trials(workdir: str, ttl: int, trials: int, fault: str, rng: random.Random) -> dict:
    lab = H.HawrapLab(workdir)
    hw = H.Hawrap(lab, H.write_config(lab, ttl=ttl))
    client = H.Client(lab)
    times: list[float] = []
    try:
        for node in E.NODES:
            hw.start(node)
        leader = settled_leader(client, 0.0, None)
        for i in range(trials):
            time.sleep(rng.uniform(0, ttl / 6))
            if fault == "power":
                killed_at = power_off(lab, leader)
            else:
                killed_at = hw.kill(leader)
            new = settled_leader(client, killed_at, leader)
            answered = client.first_answer_after(killed_at, leader)
            times.append(answered.end - killed_at)
            print(f"trial {i + 1}: {leader} killed -> {new} answers after {times[-1]:.2f} s", flush=True)
            if fault == "power":
                power_on(lab, hw, leader)
            else:
                hw.start(leader)
            # the returning node is a replica of the new leader before the next trial
            E.wait_for(lambda n=leader, w=new: (hw.status(n) or {}).get("leader") == w, 60, 0.2)
            time.sleep(1.0)
            leader = new
        client.stop()
        safety = client.check(cut_off=frozenset(E.NODES) if fault == "power" else frozenset())
        lag = lag_phase(lab, hw, leader)
    finally:
        client.stop()
        for node in E.NODES:
            hw.stop(node)
        lab.close()
    return {"failover": times, "safety": safety, "lag": lag}


def lag_phase(
    lab: H.HawrapLab, hw: H.Hawrap, leader: str, seconds: float = 20.0, interval: float = 0.05
) -> dict:
    replicas = [n for n in E.NODES if n != leader]
    E.wait_for(lambda: (hw.status(leader) or {}).get("mirror", {}).get("replica", {}).get("in_sync"), 60, 0.2)
    written: dict[str, float] = {}
    seen: dict[str, dict[str, float]] = {r: {} for r in replicas}
    lock = threading.Lock()
    done = threading.Event()

    def poll():
        while not done.is_set() or any(len(seen[r]) < len(written) for r in replicas):
            with lock:
                names = list(written)
            for r in replicas:
                root = H.tree(lab, r)
                for name in names:
                    if name not in seen[r] and os.path.exists(os.path.join(root, "lag", name)):
                        seen[r][name] = time.monotonic()
            if done.is_set() and time.monotonic() > end + 30:
                return
            time.sleep(0.005)

    os.makedirs(os.path.join(H.tree(lab, leader), "lag"), exist_ok=True)
    poller = threading.Thread(target=poll)
    poller.start()
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        name = f"f{i:06d}"
        path = os.path.join(H.tree(lab, leader), "lag", name)
        with open(path + ".tmp", "wb") as f:
            f.write(os.urandom(4096))
        os.rename(path + ".tmp", path)
        with lock:
            written[name] = time.monotonic()
        i += 1
        time.sleep(interval)
    done.set()
    poller.join()
    out = {}
    for r in replicas:
        lags = sorted(seen[r][n] - written[n] for n in written if n in seen[r])
        out[r] = {
            "files": len(written),
            "arrived": len(lags),
            "median_ms": round(statistics.median(lags) * 1000, 1) if lags else None,
            "p99_ms": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000, 1) if lags else None,
            "max_ms": round(lags[-1] * 1000, 1) if lags else None,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--ttl", type=int, default=4)
    ap.add_argument("--fault", choices=["hawrap", "power"], default="hawrap")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", help="write raw results here")
    args = ap.parse_args()
    why = E.can_run()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-etcd-failover-") as workdir:
        raw = failover_trials(workdir, args.ttl, args.trials, args.fault, rng)
    times = raw["failover"]
    must = 2 * args.ttl + 0.5
    median = statistics.median(times)
    print(f"\nfailover with etcd (TTL {args.ttl} s, fault {args.fault}), {len(times)} trials: median {median:.2f} s, "
          f"min {min(times):.2f}, max {max(times):.2f} (must hold: median <= 2 x TTL + 0.5 = {must:g} s: "
          f"{'yes' if median <= must else 'NO'})")  # fmt: skip
    print(f"safety: {raw['safety']}")
    for replica, lag in raw["lag"].items():
        print(f"replication lag to {replica}: {lag}")
    try:
        load = os.getloadavg()
        print(f"load average during the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **raw}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
