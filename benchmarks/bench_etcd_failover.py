"""hawrap with the etcd backend (issue 19, part B): client-visible failover on three nodes, and
replication lag to each of the two replicas under a steady write load.

Needs root (network namespaces), etcd and etcd3gw.  Run as:

    python -m benchmarks.bench_etcd_failover --trials 10 [--ttl 4] [--fault hawrap|power] [--json OUT]
    python -m benchmarks.bench_etcd_failover --compare --trials 10 [--ttl 4] [--systems etcd,two-node,keepalived]

The lab is tests/etcd/hawraplab.py: a three-member etcd cluster in namespaces, real
``hawrap run`` nodes beside it (VIP, the TCP service of tests/cluster, a fan-out mirror
daemon on the leader), and a client probing the VIP every 20 ms.  A trial kills the leader
at a random point of its keepalive cycle (U(0, TTL/6) after the client saw it settled) and
measures the time from the kill to the end of the first probe answered by another node.
``--fault hawrap``: every process of the leader's node but its etcd member gets SIGKILL (its
VIP stays until the kernel expires it); ``power``: its link goes down and every process
dies, its etcd member included.  The killed node is started again and rejoins as a replica
before the next trial, which kills the new leader.

The lag phase writes a file every 50 ms on the leader for 20 s and records, per replica,
when each file appears there (polled every 5 ms).

``--compare`` measures instead the etcd mode beside the two-node mode and keepalived, in the
same namespaces with the same client (``SharedLab``: the etcd lab plus a heartbeat link and a
ping address), the primary losing power, ``--trials`` rounds of one trial per system in a
shuffled order; ``--systems`` picks among etcd, two-node, keepalived, keepalived-fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "etcd"))

import etcdlab as E  # noqa: E402
import hawraplab as H  # noqa: E402

from hawrap.config import load as load_config  # noqa: E402


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


# ---------------------------------------------------------------- side by side (--compare)

HB = {"n1": "198.51.100.1", "n2": "198.51.100.2"}  # the two-node mode's heartbeat link
PING_NODE = "203.0.113.1"  # on the bridge: the two-node mode's LAN check pings it
SYSTEMS = ("etcd", "two-node", "keepalived", "keepalived-fast")
KEEPALIVED = {"keepalived": (2, 1.0), "keepalived-fast": (3, 0.1)}  # VRRP version, advert_int


class SharedLab(H.HawrapLab):
    """The etcd lab (bridge, n1-n3 with an etcd member each, client c) plus what the two-node
    mode needs there: a heartbeat link n1-n2 and an address on the bridge to ping.  etcd runs
    on every node in every trial, whichever system is measured, so the load is the same."""

    def _build(self) -> None:
        super()._build()
        self.add_link("hb0", HB)
        E.sh("ip", "-n", self.ns["br"], "addr", "add", f"{PING_NODE}/24", "dev", "br0")


def power_off_node(lab: SharedLab, node: str) -> float:
    """Every link down, every process killed (its etcd member too): a power loss."""
    if node in HB:
        E.sh("ip", "-n", lab.ns[node], "link", "set", "hb0", "down")
    return power_off(lab, node)


def power_on_node(lab: SharedLab, node: str) -> None:
    E.sh("ip", "-n", lab.ns[node], "addr", "flush", "dev", "lan0")
    E.sh("ip", "-n", lab.ns[node], "addr", "add", f"{E.ADDR[node]}/24", "dev", "lan0")
    E.sh("ip", "-n", lab.ns[node], "link", "set", "lan0", "up")
    if node in HB:
        E.sh("ip", "-n", lab.ns[node], "link", "set", "hb0", "up")
    lab.start_etcd(node)
    if not E.wait_for(lambda: all(lab.etcd_healthy(n) for n in E.NODES), 60, 0.2):
        raise RuntimeError(f"etcd member of {node} did not rejoin\n{lab.logs()}")


def clear_nodes(lab: SharedLab) -> None:
    """Whatever a trial left (a service started in a session of its own, the VIP): gone,
    etcd members kept."""
    for node in E.NODES:
        etcd = lab.etcd.get(node)
        for pid in lab.pids(node):
            if etcd is None or pid != etcd.pid:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        lab.run_in(node, "ip", "addr", "del", f"{H.VIP}/24", "dev", "lan0", check=False)


def two_node_config(lab: SharedLab) -> str:
    """hawrap's two-node mode on n1 and n2, its defaults (heartbeats on both links, the LAN
    checked by pinging the bridge), the same VIP and TCP service as the etcd mode."""
    work = lab.workdir
    secret = os.path.join(work, "secret-two-node")
    with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(os.urandom(32).hex())
    pidfile = f"{work}/$HAWRAP_NODE.service.pid"
    server = (f"{sys.executable} -I -S {H.CLUSTER_TESTS}/tcp_service.py --port {H.SERVICE_PORT} "
              f"--name $HAWRAP_NODE --pidfile {pidfile}")  # fmt: skip
    nodes = "\n".join(
        f'[[node]]\nname = "{n}"\nlan_interface = "lan0"\naddress = {{ hb = "{HB[n]}", lan = "{E.ADDR[n]}" }}\n'
        for n in HB
    )
    text = f"""
[cluster]
name = "lab2"
secret_file = "{secret}"
home = "n1"
ping_nodes = ["{PING_NODE}"]
state_dir = "{work}/state-two-node/{{node}}"

[[link]]
name = "hb"
port = 694

[[link]]
name = "lan"
port = 694

{nodes}
[timing]
initdead = 1.0
monitor_interval = 0.5

[vip]
address = "{H.VIP}/24"

[[service]]
name = "tcp"
shell = true
start = 'setsid {server} >/dev/null 2>&1 < /dev/null &'
stop = 'test -f {pidfile} && kill $(cat {pidfile}); rm -f {pidfile}; exit 0'
monitor = 'test -f {pidfile} && grep -qs "^State:[[:space:]]*[RSD]" /proc/$(cat {pidfile})/status && exit 0 || exit 7'
timeout = 10
"""
    path = os.path.join(work, "hawrap-two-node.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def keepalived_start(lab: SharedLab, node: str, flavour: str) -> None:
    """keepalived on n1 (MASTER) or n2 (BACKUP), only moving the VIP; the TCP service runs on
    both nodes all the time (which favours keepalived: no service start on takeover)."""
    version, advert = KEEPALIVED[flavour]
    work = lab.workdir
    conf = os.path.join(work, f"keepalived-{node}.conf")
    with open(conf, "w") as f:
        f.write(f"""global_defs {{
    router_id lab_{node}
    vrrp_version {version}
}}
vrrp_instance VI_1 {{
    state {"MASTER" if node == "n1" else "BACKUP"}
    interface lan0
    virtual_router_id 51
    priority {150 if node == "n1" else 100}
    advert_int {advert:g}
    virtual_ipaddress {{
        {H.VIP}/24 dev lan0
    }}
}}
""")
    for what in ("ka", "ka-vrrp", "ka-chk"):  # left by the previous trial's keepalived, killed
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{work}/{what}-{node}.pid")
    lab.spawn(node, ["keepalived", "-n", "-l", "-D", "-P", "-f", conf, "-p", f"{work}/ka-{node}.pid",
                     "-r", f"{work}/ka-vrrp-{node}.pid", "-c", f"{work}/ka-chk-{node}.pid"], f"keepalived-{node}.log")  # fmt: skip
    lab.spawn(node, [sys.executable, "-I", "-S", f"{H.CLUSTER_TESTS}/tcp_service.py", "--port", str(H.SERVICE_PORT),
                     "--name", node, "--pidfile", f"{work}/ka-svc-{node}.pid"], f"ka-service-{node}.log")  # fmt: skip


def served_steadily(client: H.Client, node: str | None, since: float, timeout: float = 60) -> str | None:
    """The node (``node``, or any) that answered the last 15 probes (0.3 s) after ``since``."""

    def steady():
        recent = [r for r in client.probes() if r.start >= since][-15:]
        answers = {r.answer for r in recent}
        if len(recent) == 15 and len(answers) == 1 and None not in answers and node in (None, *answers):
            return answers.pop()
        return None

    return E.wait_for(steady, timeout, 0.05)


def compare_trial(lab: SharedLab, system: str, ttl: int, rng: random.Random, etcd_config: str) -> dict:
    """One failover of ``system``, started fresh on the shared lab: the primary loses power
    at a random point of the system's advertisement cycle after the client saw it settled."""
    for name in ("probe.jsonl", "sampler.jsonl"):  # each trial's client writes its own
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(lab.workdir, name))
    client = H.Client(lab)
    hawrap = None
    victim = None
    try:
        started = time.monotonic()
        if system == "etcd":
            hawrap = H.Hawrap(lab, etcd_config)
            nodes, cycle = E.NODES, ttl / 6  # the lease keepalive period
        elif system == "two-node":
            config = two_node_config(lab)
            shutil.rmtree(os.path.join(lab.workdir, "state-two-node"), ignore_errors=True)
            hawrap = H.Hawrap(lab, config)
            nodes, cycle = tuple(HB), load_config(config).timing.interval
        else:
            nodes, cycle = tuple(HB), KEEPALIVED[system][1]
        for node in nodes:
            if hawrap is not None:
                hawrap.start(node)
            else:
                keepalived_start(lab, node, system)
        victim = served_steadily(client, None if system == "etcd" else "n1", started)
        if victim is None:
            raise RuntimeError(f"{system}: the VIP never answered steadily\n{lab.logs()}")
        time.sleep(1.0 + rng.uniform(0, cycle))
        killed_at = power_off_node(lab, victim)
        first = E.wait_for(lambda: client.first_answer_after(killed_at, victim), 60)
        if first is None:
            raise RuntimeError(f"{system}: nobody answered after {victim} lost power\n{lab.logs()}")
        client.stop()
        try:
            safety = client.check(cut_off=frozenset({victim}))
        except AssertionError as exc:  # recorded and reported, not fatal to the other trials
            safety = {"rounds": len(client.rounds()), "violation": str(exc)[:500]}
        return {"system": system, "victim": victim, "new": first.answer, "outage": first.end - killed_at,
                "safety": safety}  # fmt: skip
    finally:
        client.stop()
        if hawrap is not None:
            for node in E.NODES:
                hawrap.stop(node)
        clear_nodes(lab)
        if victim is not None:
            power_on_node(lab, victim)


def compare(workdir: str, systems: list[str], ttl: int, trials: int, rng: random.Random) -> list[dict]:
    """``trials`` rounds; each round runs one trial of every system, in a shuffled order, so
    that the machine's load falls on all of them alike."""
    lab = SharedLab(workdir)
    results: list[dict] = []
    try:
        etcd_config = H.write_config(lab, ttl=ttl)
        for i in range(trials):
            order = list(systems)
            rng.shuffle(order)
            for system in order:
                r = compare_trial(lab, system, ttl, rng, etcd_config)
                r["round"] = i + 1
                r["load"] = os.getloadavg()[0]
                results.append(r)
                print(f"round {i + 1} {system}: {r['victim']} lost power -> {r['new']} answers after "
                      f"{r['outage']:.3f} s (load {r['load']:.2f})", flush=True)  # fmt: skip
    finally:
        lab.close()
    return results


def compare_report(results: list[dict], systems: list[str], ttl: int) -> str:
    by = {s: sorted(r["outage"] for r in results if r["system"] == s) for s in systems}
    names = {
        "etcd": f"hawrap on etcd (TTL {ttl} s), 3 nodes",
        "two-node": "hawrap two-node (defaults)",
        "keepalived": "keepalived (VRRPv2, advert_int 1 s)",
        "keepalived-fast": "keepalived (VRRPv3, advert_int 0.1 s)",
    }
    etcd = statistics.median(by["etcd"]) if by.get("etcd") else None
    lines = ["| system | trials | median s | min s | max s | etcd / this |", "|---|---:|---:|---:|---:|---:|"]
    for s in systems:
        v = by[s]
        if not v:
            continue
        median = statistics.median(v)
        ratio = f"{etcd / median:.2f}" if etcd is not None and s != "etcd" else "-"
        lines.append(f"| {names[s]} | {len(v)} | {median:.3f} | {v[0]:.3f} | {v[-1]:.3f} | {ratio} |")
    if etcd is not None:
        must = 2 * ttl + 0.5
        lines.append("")
        lines.append(
            f"etcd median {etcd:.3f} s <= 2 x TTL + 0.5 = {must:g} s: {'met' if etcd <= must else 'NOT MET'}"
        )
    loads = [r["load"] for r in results]
    lines.append(
        f"load average (1 min) at the trials: {min(loads):.2f}-{max(loads):.2f}, median {statistics.median(loads):.2f}"
    )
    rounds = sum(r["safety"]["rounds"] for r in results)
    bad = [
        f"round {r['round']} {r['system']}: {r['safety']['violation']}"
        for r in results
        if "violation" in r["safety"]
    ]
    lines.append(f"ARP rounds sampled (every 50 ms): {rounds}; checks failed (two MACs answering ARP for the VIP, "
                 f"the VIP on two live nodes' interfaces, or a sampler starved > 0.5 s): {len(bad)}")  # fmt: skip
    lines += bad
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--ttl", type=int, default=4)
    ap.add_argument("--fault", choices=["hawrap", "power"], default="hawrap")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument(
        "--compare",
        action="store_true",
        help="failover of the etcd mode, the two-node mode and keepalived side by side in the same "
        "namespaces, interleaved (the primary loses power); --trials rounds",
    )
    ap.add_argument(
        "--systems", default="etcd,two-node,keepalived", help=f"with --compare: some of {','.join(SYSTEMS)}"
    )
    args = ap.parse_args()
    why = E.can_run()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    if args.compare:
        systems = [s for s in args.systems.split(",") if s]
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown:
            print(f"--systems: unknown {unknown} (known: {', '.join(SYSTEMS)})", file=sys.stderr)
            return 2
        if any(s.startswith("keepalived") for s in systems) and shutil.which("keepalived") is None:
            print("keepalived is not installed (apt-get install keepalived)", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory(prefix="bench-etcd-compare-") as workdir:
            results = compare(workdir, systems, args.ttl, args.trials, rng)
        print("\n" + compare_report(results, systems, args.ttl))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "trials": results}, f, indent=1)
        return 0
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
