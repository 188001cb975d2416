"""S6: failover.  Client-visible outage from killing the primary (all its links and all its
processes: a power loss) to the virtual IP answering on the standby, hawrap side by side
with keepalived (VRRP, default advert_int 1 s) in the same network namespaces; then false
failovers of hawrap during heavy CPU and disk load on both nodes.

Needs root (network namespaces).  Run as:

    python benchmarks/bench_failover.py --trials 15 --load-seconds 600 [--markdown OUT]

The client (tests/cluster/probe.py) opens a TCP connection to the VIP every 20 ms; the
outage of a trial is the time from the injection to the end of the first connection
answered by the standby.  The failure is injected at a random point of each system's
advertisement cycle (U(0, interval) after a settled state).  hawrap runs with its default
timings and starts the TCP service as a resource on takeover; keepalived only moves the VIP
(the service runs on both nodes all the time), which favours keepalived.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "cluster"))

import lab as L  # noqa: E402

KEEPALIVED_ADVERT = 1.0  # keepalived's default advert_int


def keepalived_conf(node: str, workdir: str) -> str:
    prio = 150 if node == "a" else 100
    state = "MASTER" if node == "a" else "BACKUP"
    path = os.path.join(workdir, f"keepalived-{node}.conf")
    with open(path, "w") as f:
        f.write(f"""global_defs {{
    router_id lab_{node}
}}
vrrp_instance VI_1 {{
    state {state}
    interface lan0
    virtual_router_id 51
    priority {prio}
    advert_int 1
    virtual_ipaddress {{
        {L.VIP}/24 dev lan0
    }}
}}
""")
    return path


class Keepalived:
    def __init__(self, lab: L.Lab):
        self.lab = lab
        self.procs: dict[str, subprocess.Popen] = {}
        self.services: dict[str, subprocess.Popen] = {}

    def start(self, node: str) -> None:
        wd = self.lab.workdir
        conf = keepalived_conf(node, wd)
        argv = ["keepalived", "-n", "-l", "-D", "-P", "-f", conf, "-p", f"{wd}/ka-{node}.pid", "-r", f"{wd}/ka-vrrp-{node}.pid", "-c", f"{wd}/ka-chk-{node}.pid"]
        self.procs[node] = self.lab.spawn(node, argv, f"keepalived-{node}.log")
        pidfile = f"{wd}/svc-{node}.pid"
        svc = [sys.executable, "-I", "-S", os.path.join(L.HERE, "tcp_service.py"), "--port", str(L.SERVICE_PORT), "--name", node, "--pidfile", pidfile]
        self.services[node] = self.lab.spawn(node, svc, f"ka-service-{node}.log")

    def stop(self, node: str) -> None:
        for table in (self.procs, self.services):
            proc = table.pop(node, None)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.lab.run_in(node, "ip", "addr", "del", f"{L.VIP}/24", "dev", "lan0", check=False)


def measure_trial(lab: L.Lab, probe: L.Probe, victim: str, survivor: str, phase: float, rng: random.Random) -> float | None:
    time.sleep(rng.uniform(0, phase))
    t0 = time.monotonic()
    lab.power_off(victim)
    got = L.wait_for(lambda: L.first_answer_after(probe.results(), t0, survivor), 20, 0.02)
    return None if got is None else got.end - t0


def settle_served_by(probe: L.Probe, node: str, timeout: float = 20) -> bool:
    def ok():
        rs = probe.results()
        return len(rs) >= 15 and all(r.answer == node for r in rs[-15:])

    return bool(L.wait_for(ok, timeout, 0.05))


def hawrap_trial(lab: L.Lab, rng: random.Random) -> float | None:
    state = os.path.join(lab.workdir, "state")
    shutil.rmtree(state, ignore_errors=True)  # a fresh cluster each trial: a is home and primary
    config = L.write_config(lab, initdead=1.0)
    h = L.Hawrap(lab, config)
    h.start("a")
    h.start("b")
    probe = None
    try:
        if not L.wait_for(lambda: h.role("a") == "primary" and h.role("b") == "secondary", 30):
            raise RuntimeError("hawrap cluster did not come up\n" + h.logs())
        probe = L.Probe(lab, name="probe-hawrap")
        if not settle_served_by(probe, "a"):
            raise RuntimeError("client not served by a")
        time.sleep(1.0)  # a settled heartbeat rhythm before the injection
        outage = measure_trial(lab, probe, "a", "b", 0.1, rng)
        return outage
    finally:
        if probe:
            probe.stop()
            os.unlink(probe.out)
        h.stop("b")
        lab.kill_all("a")
        lab.power_on("a")


def keepalived_trial(lab: L.Lab, rng: random.Random) -> float | None:
    ka = Keepalived(lab)
    ka.start("a")
    ka.start("b")
    probe = None
    try:
        if not L.wait_for(lambda: lab.vip_on("a") and not lab.vip_on("b"), 30):
            raise RuntimeError("keepalived did not elect a")
        probe = L.Probe(lab, name="probe-keepalived")
        if not settle_served_by(probe, "a"):
            raise RuntimeError("client not served by a (keepalived)")
        time.sleep(1.0)
        return measure_trial(lab, probe, "a", "b", KEEPALIVED_ADVERT, rng)
    finally:
        if probe:
            probe.stop()
            os.unlink(probe.out)
        ka.stop("b")
        lab.kill_all("a")
        lab.power_on("a")


def load_test(lab: L.Lab, seconds: float, cpu_hogs: int, timing: str = "") -> dict:
    """hawrap with default timings while both nodes burn CPU and write+fsync to disk."""
    shutil.rmtree(os.path.join(lab.workdir, "state"), ignore_errors=True)
    config = L.write_config(lab, initdead=1.0, timing=timing)
    h = L.Hawrap(lab, config)
    h.start("a")
    h.start("b")
    if not L.wait_for(lambda: h.role("a") == "primary" and h.role("b") == "secondary", 30):
        raise RuntimeError("hawrap cluster did not come up\n" + h.logs())
    probe = L.Probe(lab, name="probe-load")
    settle_served_by(probe, "a")
    time.sleep(2.0)
    before = {n: len(h.status(n)["transitions"]) for n in ("a", "b")}
    hogs = []
    for node in ("a", "b"):
        for _ in range(cpu_hogs):
            hogs.append(lab.spawn(node, [sys.executable, "-c", "while True: pass"], f"hog-{node}.log"))
        target = os.path.join(lab.workdir, f"disk-load-{node}")
        disk = f"while :; do dd if=/dev/zero of={target} bs=1M count=256 conv=fsync status=none; done"
        hogs.append(lab.spawn(node, ["sh", "-c", disk], f"disk-{node}.log"))
    start = time.monotonic()
    both_vip = 0
    samples = 0
    loadavg = []
    while time.monotonic() - start < seconds:
        samples += 1
        if lab.vip_on("a") and lab.vip_on("b"):
            both_vip += 1
        if samples % 20 == 0:
            with open("/proc/loadavg") as f:
                loadavg.append(float(f.read().split()[0]))
        time.sleep(0.5)
    for p in hogs:
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass
        p.wait()
    for node in ("a", "b"):
        try:
            os.unlink(os.path.join(lab.workdir, f"disk-load-{node}"))
        except FileNotFoundError:
            pass
    results = probe.stop()
    statuses = {n: h.status(n) for n in ("a", "b")}
    transitions = {n: statuses[n]["transitions"][before[n]:] for n in ("a", "b")}
    window = [r for r in results if start <= r.start <= start + seconds]
    failed = [r for r in window if r.answer is None]
    gaps = {n: statuses[n]["link_stats"] for n in ("a", "b")}
    h.stop("a")
    h.stop("b")
    return {
        "seconds": seconds,
        "false_failovers": sum(1 for n in transitions for t in transitions[n]),
        "transitions": transitions,
        "vip_on_both_samples": both_vip,
        "samples": samples,
        "probes": len(window),
        "failed_probes": len(failed),
        "longest_heartbeat_gap_ms": {n: {link: s[4] for link, s in gaps[n].items()} for n in gaps},
        "load_average_median": statistics.median(loadavg) if loadavg else None,
        "roles_after": {n: statuses[n]["role"] for n in statuses},
    }


def summarize(values: list[float]) -> dict:
    v = sorted(values)
    return {
        "n": len(v),
        "median": statistics.median(v),
        "min": v[0],
        "max": v[-1],
        "p90": v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--load-seconds", type=float, default=600.0)
    ap.add_argument("--cpu-hogs", type=int, default=3, help="busy loops per node (2 cores here)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--load-timing", default="", help='extra [timing] lines for the load test, e.g. "realtime_priority = 0; mlock = false"')
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--markdown", help="append the Markdown summary here")
    args = ap.parse_args()
    why = L.can_run()
    if why:
        print(f"bench_failover: skipped: {why}", file=sys.stderr)
        return 0
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    have_keepalived = shutil.which("keepalived") is not None
    if not have_keepalived:
        print("# peer 'keepalived' is not installed: skipped (apt-get install -y keepalived)", file=sys.stderr)
    workdir = tempfile.mkdtemp(prefix="bench-failover-")
    lab = L.Lab(workdir)
    raw: dict = {"seed": seed, "hawrap": [], "keepalived": [], "failed_trials": {"hawrap": 0, "keepalived": 0}}
    try:
        for i in range(args.trials):  # alternating, same namespaces
            for name, trial in (("hawrap", hawrap_trial), ("keepalived", keepalived_trial)):
                if name == "keepalived" and not have_keepalived:
                    continue
                outage = trial(lab, rng)
                if outage is None:
                    raw["failed_trials"][name] += 1
                else:
                    raw[name].append(outage)
                print(f"trial {i + 1} {name}: {'no takeover' if outage is None else f'{outage:.3f} s'}", flush=True)
        if args.load_seconds > 0:
            print(f"load test: {args.load_seconds:g} s of CPU + disk load on both nodes", flush=True)
            raw["load"] = load_test(lab, args.load_seconds, args.cpu_hogs, args.load_timing.replace(";", "\n"))
            print(json.dumps(raw["load"], indent=2), flush=True)
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)
    hs = summarize(raw["hawrap"]) if raw["hawrap"] else None
    lines = [
        "| system | trials | median s | p90 s | min s | max s | ratio vs keepalived |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ks = summarize(raw["keepalived"]) if raw["keepalived"] else None
    for name, s in (("hawrap (interval 0.1 s, deadtime 0.5 s)", hs), ("keepalived (VRRP advert_int 1 s)", ks)):
        if s is None:
            continue
        ratio = f"{s['median'] / ks['median']:.3f}" if ks else "-"
        lines.append(f"| {name} | {s['n']} | {s['median']:.3f} | {s['p90']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {ratio} |")
    text = "\n".join(lines) if hs or ks else "(no failover trials)"
    if "load" in raw:
        ld = raw["load"]
        text += (
            f"\n\nUnder load ({ld['seconds']:g} s, {args.cpu_hogs} busy loops + dd/fsync per node"
            + (f", timing override `{args.load_timing}`" if args.load_timing else "")
            + f", load average "
            f"{ld['load_average_median']}): false failovers {ld['false_failovers']}, VIP on both nodes in "
            f"{ld['vip_on_both_samples']}/{ld['samples']} samples, failed client probes {ld['failed_probes']}/{ld['probes']}, "
            f"longest heartbeat gap (ms) {ld['longest_heartbeat_gap_ms']}."
        )
    text += f"\n\nseed {seed}; failed trials {raw['failed_trials']}"
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=2)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
