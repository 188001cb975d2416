"""S6: failover.  Client-visible outage from killing the primary (all its links and all its
processes: a power loss) to the virtual IP answering on the standby, hawrap side by side
with keepalived in the same network namespaces: keepalived with its default timers (VRRP,
advert_int 1 s) and keepalived tuned to its fastest (VRRPv3, advert_int 0.1 s); then false
failovers of each under heavy CPU and disk load on both nodes.

Needs root (network namespaces).  Run as:

    python -m benchmarks.bench_failover --trials 12 --load-seconds 120 [--markdown OUT] [--json OUT]

The client (tests/cluster/probe.py) opens a TCP connection to the VIP every 20 ms; the
outage of a trial is the time from the injection to the end of the first connection
answered by the standby.  The failure is injected at a random point of each system's
advertisement cycle (U(0, interval) after a settled state).  hawrap runs with its default
timings and starts the TCP service as a resource on takeover; keepalived only moves the VIP
(the service runs on both nodes all the time), which favours keepalived.

Under load, a false failover is any change of the node serving the client (or, for hawrap,
any role change) while nothing failed; hawrap's refused takeovers (a heartbeat gap longer
than the dead time, the VIP still answering) are counted apart: no role changed, but the
administrator was notified.
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

from hawrap.config import load  # noqa: E402

# (name, VRRP version, advert_int): keepalived's defaults, and its fastest: VRRPv3 counts
# the interval in centiseconds; 0.1 s is about as low as it stays stable here.
KEEPALIVED = {"keepalived": (2, 1.0), "keepalived-fast": (3, 0.1)}


def keepalived_conf(node: str, workdir: str, version: int, advert: float) -> str:
    prio = 150 if node == "a" else 100
    state = "MASTER" if node == "a" else "BACKUP"
    path = os.path.join(workdir, f"keepalived-{node}.conf")
    with open(path, "w") as f:
        f.write(f"""global_defs {{
    router_id lab_{node}
    vrrp_version {version}
}}
vrrp_instance VI_1 {{
    state {state}
    interface lan0
    virtual_router_id 51
    priority {prio}
    advert_int {advert:g}
    virtual_ipaddress {{
        {L.VIP}/24 dev lan0
    }}
}}
""")
    return path


class Keepalived:
    def __init__(self, lab: L.Lab, flavour: str = "keepalived"):
        self.lab = lab
        self.version, self.advert = KEEPALIVED[flavour]
        self.procs: dict[str, subprocess.Popen] = {}
        self.services: dict[str, subprocess.Popen] = {}

    def start(self, node: str) -> None:
        wd = self.lab.workdir
        conf = keepalived_conf(node, wd, self.version, self.advert)
        argv = [
            "keepalived",
            "-n",
            "-l",
            "-D",
            "-P",
            "-f",
            conf,
            "-p",
            f"{wd}/ka-{node}.pid",
            "-r",
            f"{wd}/ka-vrrp-{node}.pid",
            "-c",
            f"{wd}/ka-chk-{node}.pid",
        ]
        self.procs[node] = self.lab.spawn(node, argv, f"keepalived-{node}.log")
        pidfile = f"{wd}/svc-{node}.pid"
        svc = [
            sys.executable,
            "-I",
            "-S",
            os.path.join(L.HERE, "tcp_service.py"),
            "--port",
            str(L.SERVICE_PORT),
            "--name",
            node,
            "--pidfile",
            pidfile,
        ]
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


def measure_trial(
    lab: L.Lab, probe: L.Probe, victim: str, survivor: str, phase: float, rng: random.Random
) -> float | None:
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


def hawrap_trial(lab: L.Lab, rng: random.Random, timing: str = "") -> float | None:
    state = os.path.join(lab.workdir, "state")
    shutil.rmtree(state, ignore_errors=True)  # a fresh cluster each trial: a is home and primary
    config = L.write_config(lab, initdead=1.0, timing=timing)
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
        return measure_trial(lab, probe, "a", "b", load(config).timing.interval, rng)
    finally:
        if probe:
            probe.stop()
            os.unlink(probe.out)
        h.stop("b")
        lab.kill_all("a")
        lab.power_on("a")


def keepalived_trial(lab: L.Lab, rng: random.Random, flavour: str = "keepalived") -> float | None:
    ka = Keepalived(lab, flavour)
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
        return measure_trial(lab, probe, "a", "b", ka.advert, rng)
    finally:
        if probe:
            probe.stop()
            os.unlink(probe.out)
        ka.stop("b")
        lab.kill_all("a")
        lab.power_on("a")


def _load(lab: L.Lab, seconds: float, cpu_hogs: int) -> tuple[list[subprocess.Popen], float]:
    """Start the load on both nodes; return the processes and the start time."""
    hogs = []
    for node in ("a", "b"):
        for _ in range(cpu_hogs):
            hogs.append(lab.spawn(node, [sys.executable, "-c", "while True: pass"], f"hog-{node}.log"))
        target = os.path.join(lab.workdir, f"disk-load-{node}")
        disk = f"while :; do dd if=/dev/zero of={target} bs=1M count=256 conv=fsync status=none; done"
        hogs.append(lab.spawn(node, ["sh", "-c", disk], f"disk-{node}.log"))
    return hogs, time.monotonic()


def _unload(lab: L.Lab, hogs: list[subprocess.Popen]) -> None:
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


def _sample_until(lab: L.Lab, start: float, seconds: float) -> tuple[int, int, list[float]]:
    both_vip = samples = 0
    loadavg = []
    while time.monotonic() - start < seconds:
        samples += 1
        if lab.vip_on("a") and lab.vip_on("b"):
            both_vip += 1
        if samples % 20 == 0:
            with open("/proc/loadavg") as f:
                loadavg.append(float(f.read().split()[0]))
        time.sleep(0.5)
    return both_vip, samples, loadavg


def _holder_changes(results: list[L.ProbeResult], start: float, end: float) -> int:
    """How often the node answering the client changed (a failover, false or not)."""
    answers = [r.answer for r in results if start <= r.start <= end and r.answer]
    return sum(1 for x, y in zip(answers, answers[1:], strict=False) if x != y)


def load_test(lab: L.Lab, seconds: float, cpu_hogs: int, timing: str = "") -> dict:
    """hawrap with default timings while both nodes burn CPU and write+fsync to disk."""
    shutil.rmtree(os.path.join(lab.workdir, "state"), ignore_errors=True)
    notify_log = os.path.join(lab.workdir, "notify.log")
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
    notified_before = os.path.getsize(notify_log) if os.path.exists(notify_log) else 0
    hogs, start = _load(lab, seconds, cpu_hogs)
    both_vip, samples, loadavg = _sample_until(lab, start, seconds)
    _unload(lab, hogs)
    results = probe.stop()
    statuses = {n: h.status(n) for n in ("a", "b")}
    transitions = {n: statuses[n]["transitions"][before[n] :] for n in ("a", "b")}
    window = [r for r in results if start <= r.start <= start + seconds]
    failed = [r for r in window if r.answer is None]
    gaps = {n: statuses[n]["link_stats"] for n in ("a", "b")}
    with open(notify_log) as f:
        f.seek(notified_before)
        events = [line.split()[4] for line in f if len(line.split()) > 4]
    h.stop("a")
    h.stop("b")
    return {
        "system": "hawrap",
        "seconds": seconds,
        "false_failovers": sum(1 for n in transitions for t in transitions[n]),
        "refused_takeovers": events.count("takeover-refused"),
        "notifications": sorted(set(events)),
        "transitions": transitions,
        "holder_changes": _holder_changes(results, start, start + seconds),
        "vip_on_both_samples": both_vip,
        "samples": samples,
        "probes": len(window),
        "failed_probes": len(failed),
        "longest_heartbeat_gap_ms": {n: {link: s[4] for link, s in gaps[n].items()} for n in gaps},
        "load_average_median": statistics.median(loadavg) if loadavg else None,
        "roles_after": {n: statuses[n]["role"] for n in statuses},
    }


def keepalived_load_test(lab: L.Lab, seconds: float, cpu_hogs: int, flavour: str) -> dict:
    """keepalived under the same load: a false failover is the VIP moving to b (or back)."""
    ka = Keepalived(lab, flavour)
    ka.start("a")
    ka.start("b")
    try:
        if not L.wait_for(lambda: lab.vip_on("a") and not lab.vip_on("b"), 30):
            raise RuntimeError("keepalived did not elect a")
        probe = L.Probe(lab, name="probe-ka-load")
        settle_served_by(probe, "a")
        time.sleep(2.0)
        hogs, start = _load(lab, seconds, cpu_hogs)
        both_vip, samples, loadavg = _sample_until(lab, start, seconds)
        _unload(lab, hogs)
        results = probe.stop()
        window = [r for r in results if start <= r.start <= start + seconds]
        changes = _holder_changes(results, start, start + seconds)
        return {
            "system": flavour,
            "seconds": seconds,
            "false_failovers": changes,
            "holder_changes": changes,
            "vip_on_both_samples": both_vip,
            "samples": samples,
            "probes": len(window),
            "failed_probes": sum(1 for r in window if r.answer is None),
            "load_average_median": statistics.median(loadavg) if loadavg else None,
        }
    finally:
        ka.stop("a")
        ka.stop("b")


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
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--load-seconds", type=float, default=120.0, help="per system; 0: no load test")
    ap.add_argument("--cpu-hogs", type=int, default=3, help="busy loops per node (2 cores here)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--systems", default="hawrap,keepalived,keepalived-fast")
    ap.add_argument(
        "--timing",
        default="",
        help='extra [timing] lines for hawrap, e.g. "interval = 0.05; deadtime = 0.25"',
    )
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--markdown", help="append the Markdown summary here")
    args = ap.parse_args()
    why = L.can_run()
    if why:
        print(f"bench_failover: skipped: {why}", file=sys.stderr)
        return 0
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    systems = [x for x in args.systems.split(",") if x]
    if shutil.which("keepalived") is None:
        print(
            "# peer 'keepalived' is not installed: skipped (apt-get install -y keepalived)", file=sys.stderr
        )
        systems = [x for x in systems if not x.startswith("keepalived")]
    timing = args.timing.replace(";", "\n")
    workdir = tempfile.mkdtemp(prefix="bench-failover-")
    lab = L.Lab(workdir)
    raw: dict = {
        "seed": seed,
        "timing": args.timing,
        "trials": {x: [] for x in systems},
        "failed_trials": dict.fromkeys(systems, 0),
        "load": {},
    }
    try:
        for i in range(args.trials):  # alternating, same namespaces
            for name in systems:
                if name == "hawrap":
                    outage = hawrap_trial(lab, rng, timing)
                else:
                    outage = keepalived_trial(lab, rng, name)
                if outage is None:
                    raw["failed_trials"][name] += 1
                else:
                    raw["trials"][name].append(outage)
                print(
                    f"trial {i + 1} {name}: {'no takeover' if outage is None else f'{outage:.3f} s'}",
                    flush=True,
                )
        if args.load_seconds > 0:
            for name in systems:
                print(
                    f"load test {name}: {args.load_seconds:g} s of CPU + disk load on both nodes", flush=True
                )
                if name == "hawrap":
                    raw["load"][name] = load_test(lab, args.load_seconds, args.cpu_hogs, timing)
                else:
                    raw["load"][name] = keepalived_load_test(lab, args.load_seconds, args.cpu_hogs, name)
                print(json.dumps(raw["load"][name]), flush=True)
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)
    text = render(raw, args)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=2)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    return 0


LABELS = {
    "hawrap": "hawrap",
    "keepalived": "keepalived (VRRPv2, advert_int 1 s)",
    "keepalived-fast": "keepalived (VRRPv3, advert_int 0.1 s)",
}


def render(raw: dict, args) -> str:
    stats = {name: summarize(v) for name, v in raw["trials"].items() if v}
    base = stats.get("keepalived")
    fast = stats.get("keepalived-fast")
    lines = [
        "| system | trials | median s | p90 s | min s | max s | vs keepalived | vs keepalived-fast |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in stats.items():
        label = LABELS[name] + (f" ({raw['timing']})" if name == "hawrap" and raw["timing"] else "")
        r1 = f"{s['median'] / base['median']:.3f}" if base else "-"
        r2 = f"{s['median'] / fast['median']:.3f}" if fast else "-"
        lines.append(
            f"| {label} | {s['n']} | {s['median']:.3f} | {s['p90']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {r1} | {r2} |"
        )
    text = "\n".join(lines) if stats else "(no failover trials)"
    if raw["load"]:
        text += (
            f"\n\nUnder load ({args.load_seconds:g} s per system, {args.cpu_hogs} busy loops + a dd/fsync loop per node):\n\n"
            "| system | false failovers | refused takeovers | VIP on both | failed probes | load average |\n"
            "|---|---:|---:|---:|---:|---:|\n"
        )
        for name, ld in raw["load"].items():
            refused = ld.get("refused_takeovers", "-")
            text += (
                f"| {LABELS[name]} | {ld['false_failovers']} | {refused} | {ld['vip_on_both_samples']}/{ld['samples']} | "
                f"{ld['failed_probes']}/{ld['probes']} | {ld['load_average_median']:.1f} |\n"
            )
        if "hawrap" in raw["load"]:
            text += f"\nhawrap's longest heartbeat gap (ms): {raw['load']['hawrap']['longest_heartbeat_gap_ms']}\n"
    text += f"\nseed {raw['seed']}; failed trials {raw['failed_trials']}"
    return text


if __name__ == "__main__":
    sys.exit(main())
