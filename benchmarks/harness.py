"""Side-by-side timing: run our command and the peer's alternately, report medians and ratios.

Absolute seconds drift on shared machines; runs interleaved in one process of measurement
let the ratio ours/peer hold.  A case is an argv list (timed as a child process, whose peak
RSS is also recorded) or a Python callable.  ``prepare`` runs before every timed run of a
case (to reset a replica, drop a cache file, ...) and is not timed.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Command = Sequence[str] | Callable[[], object]


def mirror_command() -> list[str]:
    """The installed ``mirror`` script next to this interpreter, as an administrator runs it.

    Not ``python -m mirror`` from a source checkout: that imports the working tree's
    modules, uncompiled (and recompiled at every start where bytecode is not written),
    which adds 15-30 ms to every run."""
    script = os.path.join(os.path.dirname(sys.executable), "mirror")
    return [script] if os.path.exists(script) else [sys.executable, "-P", "-m", "mirror"]


MIRROR = mirror_command()


@dataclass
class Case:
    name: str
    command: Command
    prepare: Callable[[], object] | None = None
    ok_returncodes: tuple[int, ...] = (0,)


@dataclass
class Measurement:
    seconds: list[float] = field(default_factory=list)
    peak_rss_kib: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_rss_kib(self) -> int:
        return int(statistics.median(self.peak_rss_kib)) if self.peak_rss_kib else 0


def have(tool: str) -> bool:
    """True if ``tool`` is on PATH; prints why a peer is skipped otherwise."""
    if shutil.which(tool):
        return True
    print(f"# peer '{tool}' is not installed: skipped (apt-get install -y {tool})", file=sys.stderr)
    return False


def run_child(argv: Sequence[str], ok: tuple[int, ...] = (0,), env: dict | None = None) -> tuple[float, int]:
    """Run ``argv``; return (wall seconds, peak RSS in KiB of the largest process in its tree).

    The peak comes from GNU time when it is installed: a child forked straight from this
    (large) benchmark process would report this process's RSS, inherited at fork, as its own.
    """
    report = None
    if os.path.exists("/usr/bin/time"):
        fd, report = tempfile.mkstemp(prefix="rss-")
        os.close(fd)
        argv = ["/usr/bin/time", "-f", "%M", "-o", report, *argv]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    rss = 0
    if report is not None:
        with open(report) as f:
            lines = f.read().split()
        os.unlink(report)
        rss = int(lines[-1]) if lines and lines[-1].isdigit() else 0
    if proc.returncode not in ok:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {err.decode(errors='replace').strip()[-2000:]}")
    return elapsed, rss


def measure(cases: Sequence[Case], runs: int = 5, warmup: int = 1) -> dict[str, Measurement]:
    """Run every case ``warmup`` + ``runs`` times, alternating between cases each round."""
    results = {case.name: Measurement() for case in cases}
    for round_no in range(warmup + runs):
        for case in cases:
            if case.prepare:
                case.prepare()
            if callable(case.command):
                start = time.perf_counter()
                case.command()
                elapsed, rss = time.perf_counter() - start, 0
            else:
                elapsed, rss = run_child(case.command, case.ok_returncodes)
            if round_no >= warmup:
                results[case.name].seconds.append(elapsed)
                if rss:
                    results[case.name].peak_rss_kib.append(rss)
    return results


def paired_ratio(case: Measurement, baseline: Measurement) -> float | None:
    """The median over rounds of ``case / baseline`` timed in the same round.

    ``measure`` alternates the cases within each round, so both runs of a pair see the
    machine in the same state.  These VMs change speed by up to 2x from one minute to the
    next (the same in-process loop took 13 ms, then 25 ms): the ratio of two medians
    mixes rounds from either state, the median of paired ratios does not."""
    if not case.seconds or len(case.seconds) != len(baseline.seconds):
        return None
    return statistics.median(c / b for c, b in zip(case.seconds, baseline.seconds, strict=True))


def table(results: dict[str, Measurement], baseline: str, title: str = "") -> str:
    """A Markdown table: median seconds, min/max, ratio to ``baseline`` (of the medians, and
    the median of the per-round ratios: see ``paired_ratio``), peak RSS."""
    base = results.get(baseline)
    lines = []
    if title:
        lines.append(f"**{title}**\n")
    lines.append(f"| case | median s | min s | max s | ratio vs {baseline} | paired ratio | peak RSS MiB |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in results.items():
        ratio = f"{m.median / base.median:.3f}" if base else "-"
        paired = paired_ratio(m, base) if base else None
        rss = f"{m.median_rss_kib / 1024:.1f}" if m.peak_rss_kib else "-"
        lines.append(
            f"| {name} | {m.median:.4f} | {min(m.seconds):.4f} | {max(m.seconds):.4f} | {ratio} | "
            f"{'-' if paired is None else f'{paired:.3f}'} | {rss} |"
        )
    return "\n".join(lines)


def dentry_cache_note() -> str:
    """One line on the kernel's dentry cache, to print beside the figures.

    Every stat and open looks its names up in a hash table sized at boot (``dhash_entries``;
    these VMs boot with 131,072 buckets).  Millions of cached dentries (other corpora, earlier
    benchmarks) make each lookup walk long chains: S4 ran 0.52 s instead of 0.39 s, and rsync
    0.80 s instead of 0.57 s, before and after ``echo 2 > /proc/sys/vm/drop_caches``."""
    try:
        with open("/proc/sys/fs/dentry-state") as f:
            cached = int(f.read().split()[0])
        with open("/proc/cmdline") as f:
            buckets = next((int(arg.split("=", 1)[1]) for arg in f.read().split() if arg.startswith("dhash_entries=")), 0)
    except (OSError, ValueError):
        return "dentry cache: unknown"
    line = f"dentry cache: {cached:,} dentries" + (f" in {buckets:,} hash buckets" if buckets else "")
    if buckets and cached > 4 * buckets:
        line += " (long hash chains slow every lookup: `echo 2 > /proc/sys/vm/drop_caches` sheds them)"
    return line


def drop_caches() -> bool:
    """Drop the page cache (root only) for a cold run; False if not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False
