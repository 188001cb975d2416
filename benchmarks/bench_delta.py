"""S5 and friends: ``mirror signature|delta|patch`` side by side with ``rdiff``, bytes vs rsync.

Scenarios (each file is generated deterministically from --seed into --dir):

* S5: a file of --size bytes (1 GiB) and a new version with 1,000 scattered 100-byte edits
  and a 1 MiB insertion.  Each phase timed for ours and rdiff, alternating runs; once with
  each tool's default block size and once with ours forced to rdiff's block size (for the
  delta-size comparison at the same block size).
* best case: the new file is identical to the basis.
* worst case: nothing in common (an unrelated random file): the rolling loop runs at every byte.
* bytes on the wire vs ``rsync --no-whole-file`` (its --stats sent + received).
* memory: a 4 GiB stream through ``mirror signature -`` and ``mirror delta SIG -``, peak RSS.

Page cache: warm (the files are read once before timing and fit in memory).  Outputs are
removed and ``sync`` is run before every timed run, so one run's writeback does not land
in the next one's time.  Nothing is installed: a missing peer is skipped with a note.

    python benchmarks/bench_delta.py --dir /work/bench-delta --runs 5
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import MIRROR, Case, have, measure  # noqa: E402

MIB = 1 << 20
EDITS = 1000
EDIT_LEN = 100
INSERT_LEN = MIB
RDIFF_BLOCK = 32768  # what rdiff (librsync 2.3.2) picks for 1 GiB: sqrt(size), as rsync


def generate(path: str, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(left, 8 * MIB)
            out.write(rng.randbytes(n))
            left -= n


def make_s5(basis: str, new: str, seed: int) -> None:
    """basis with EDITS scattered EDIT_LEN-byte replacements and one INSERT_LEN insertion."""
    size = os.path.getsize(basis)
    rng = random.Random(seed + 1)
    edits = sorted(rng.sample(range(0, size - EDIT_LEN, EDIT_LEN), EDITS))
    insert_at = rng.randrange(size)
    events = [(at, "edit") for at in edits] + [(insert_at, "insert")]
    events.sort()
    with open(basis, "rb") as src, open(new, "wb") as out:
        pos = 0
        for at, kind in events:
            shutil.copyfileobj(_Limited(src, at - pos), out, 8 * MIB)
            pos = at
            if kind == "edit":
                out.write(rng.randbytes(EDIT_LEN))
                src.seek(EDIT_LEN, 1)
                pos += EDIT_LEN
            else:
                out.write(rng.randbytes(INSERT_LEN))
        shutil.copyfileobj(src, out, 8 * MIB)


class _Limited:
    def __init__(self, stream, limit: int):
        self.stream, self.left = stream, limit

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.stream.read(n)
        self.left -= len(data)
        return data


def warm(*paths: str) -> None:
    buffer = bytearray(MIB)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def rdiff_block_size(signature_path: str) -> int:
    """The block length in a librsync signature header (magic, block_len, strong_len)."""
    with open(signature_path, "rb") as f:
        return int.from_bytes(f.read(8)[4:8], "big")


def fresh(*paths: str):
    """A prepare step: remove outputs and flush dirty pages before a timed run."""

    def prepare() -> None:
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)
        os.sync()

    return prepare


TIME = "/usr/bin/time"


def timed(d: str, name: str, argv: list[str]) -> list[str]:
    """``argv`` under GNU time writing its peak RSS (KiB) to a file.  (The harness's own
    ru_maxrss of a child starts at this process's size: exec keeps the old high-water mark.)"""
    if not os.path.exists(TIME):
        return argv
    return [TIME, "-q", "-f", "%M", "-o", rss_file(d, name), *argv]


def rss_file(d: str, name: str) -> str:
    return os.path.join(d, "rss." + name.replace(" ", "_"))


def rss_mib(d: str, name: str) -> str:
    try:
        with open(rss_file(d, name)) as f:
            return f"{int(f.read().split()[-1]) / 1024:.1f}"
    except (OSError, ValueError, IndexError):
        return "-"


def phase_cases(
    d: str,
    basis: str,
    new: str,
    tag: str,
    block: int | None,
    with_rdiff: bool,
    rdiff_block: int | None = None,
) -> list[Case]:
    """Signature, delta and patch cases for ours (and rdiff), outputs named by ``tag``."""
    sig, delta, out = (os.path.join(d, f"{tag}.{x}") for x in ("sig", "delta", "out"))
    rsig, rdelta, rout = (os.path.join(d, f"{tag}.r{x}") for x in ("sig", "delta", "out"))
    block_args = ["--block-size", str(block)] if block else []
    cases = [
        Case(f"{tag} ours signature", [*MIRROR, "signature", *block_args, basis, sig], fresh(sig)),
        Case(f"{tag} ours delta", [*MIRROR, "delta", sig, new, delta], fresh(delta)),
        Case(f"{tag} ours patch", [*MIRROR, "patch", basis, delta, out], fresh(out)),
    ]
    if with_rdiff:
        cases += [
            Case(
                f"{tag} rdiff signature",
                ["rdiff", "signature", *(["-b", str(rdiff_block)] if rdiff_block else []), basis, rsig],
                fresh(rsig),
            ),
            Case(f"{tag} rdiff delta", ["rdiff", "delta", rsig, new, rdelta], fresh(rdelta)),
            Case(f"{tag} rdiff patch", ["rdiff", "patch", basis, rdelta, rout], fresh(rout)),
        ]
    for case in cases:
        case.command = timed(d, case.name, list(case.command))
    return cases


def run_phases(cases: list[Case], runs: int, warmup: int) -> dict:
    """Phases must run in order within a round (delta needs the signature), so measure
    round by round: each round runs every case once, ours and rdiff alternating."""
    results = None
    for round_no in range(warmup + runs):
        r = measure(cases, runs=1, warmup=0)
        if round_no < warmup:
            continue
        if results is None:
            results = r
        else:
            for name, m in r.items():
                results[name].seconds += m.seconds
                results[name].peak_rss_kib += m.peak_rss_kib
    return results


def report_phases(results: dict, tag: str, size: int, d: str, with_rdiff: bool) -> list[str]:
    """Medians per phase; RSS from the last run under GNU time."""
    lines = [
        "| phase | ours median s | ours GB/s | rdiff median s | rdiff GB/s | ratio ours/rdiff | ours RSS MiB | rdiff RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total_ours = total_rdiff = 0.0
    for phase in ("signature", "delta", "patch"):
        ours = results[f"{tag} ours {phase}"]
        total_ours += ours.median
        row = f"| {phase} | {ours.median:.3f} | {size / ours.median / 1e9:.2f} |"
        if with_rdiff:
            peer = results[f"{tag} rdiff {phase}"]
            total_rdiff += peer.median
            row += (
                f" {peer.median:.3f} | {size / peer.median / 1e9:.2f} | {ours.median / peer.median:.3f} |"
                f" {rss_mib(d, f'{tag} ours {phase}')} | {rss_mib(d, f'{tag} rdiff {phase}')} |"
            )
        else:
            row += f" - | - | - | {rss_mib(d, f'{tag} ours {phase}')} | - |"
        lines.append(row)
    if with_rdiff:
        lines.append(
            f"| **total** | **{total_ours:.3f}** | | **{total_rdiff:.3f}** | | **{total_ours / total_rdiff:.3f}** | | |"
        )
    sizes = {x: os.path.getsize(os.path.join(d, f"{tag}.{x}")) for x in ("sig", "delta")}
    line = f"\nSizes: ours signature {sizes['sig']:,} B, delta {sizes['delta']:,} B"
    if with_rdiff:
        rsizes = {x: os.path.getsize(os.path.join(d, f"{tag}.r{x}")) for x in ("sig", "delta")}
        line += (
            f"; rdiff signature {rsizes['sig']:,} B, delta {rsizes['delta']:,} B"
            f" (delta ratio ours/rdiff {sizes['delta'] / rsizes['delta']:.3f})"
        )
    lines.append(line)
    return lines


def rsync_bytes(d: str, basis: str, new: str) -> int | None:
    """Bytes rsync moves (sent + received) to update a copy of ``basis`` to ``new``."""
    if not have("rsync"):
        return None
    dest = os.path.join(d, "rsync-dest")
    os.makedirs(dest, exist_ok=True)
    target = os.path.join(dest, "file")
    shutil.copyfile(basis, target)
    os.utime(target, (0, 0))
    proc = subprocess.run(
        ["rsync", "--no-whole-file", "--stats", "-I", new, target], capture_output=True, text=True, check=True
    )
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", proc.stdout).group(1).replace(",", ""))
    received = int(re.search(r"Total bytes received: ([\d,]+)", proc.stdout).group(1).replace(",", ""))
    shutil.rmtree(dest)
    return sent + received


def memory_probe(d: str, size: int) -> list[str]:
    """Peak RSS of signature and delta over a ``size``-byte stream fed through a pipe."""
    gen = (
        "import random,sys\n"
        "r=random.Random(int(sys.argv[2])); blk=r.randbytes(1<<20); w=sys.stdout.buffer.write\n"
        "n=int(sys.argv[1])>>20\n"
        "for i in range(n): w(blk[i%977:]+blk[:i%977]) if i%50 else w(r.randbytes(1<<20))\n"
    )
    sig = os.path.join(d, "mem.sig")
    lines = []
    for argv, label in (
        ([*MIRROR, "signature", "--block-size", "4096", "-", sig], "signature"),
        ([*MIRROR, "delta", sig, "-", os.devnull], "delta"),
    ):
        producer = subprocess.Popen([sys.executable, "-c", gen, str(size), "7"], stdout=subprocess.PIPE)
        start = time.perf_counter()
        consumer = subprocess.Popen(timed(d, "mem " + label, argv), stdin=producer.stdout)
        producer.stdout.close()
        status = consumer.wait()
        producer.wait()
        elapsed = time.perf_counter() - start
        if status != 0:
            raise RuntimeError(f"{label} over a pipe failed")
        sig_bytes = os.path.getsize(sig)
        rss = float(rss_mib(d, "mem " + label)) * MIB
        lines.append(
            f"| {label} of a {size / (1 << 30):.2f} GiB stream | {rss / MIB:.1f} |"
            f" {sig_bytes / MIB:.1f} | {(rss - sig_bytes) / MIB:.1f} | {elapsed:.1f} |"
        )
    os.unlink(sig)
    return [
        "| run | peak RSS MiB | signature MiB | RSS beyond the signature MiB | seconds |",
        "|---|---:|---:|---:|---:|",
        *lines,
    ]


def parallel_probe(basis: str, new: str, runs: int) -> list[str]:
    """Two deltas of the S5 file one after the other, then in two threads at once."""
    import statistics
    import threading

    from mirror import fastpath

    engine = fastpath.choose("delta")
    with open(basis, "rb") as f:
        sig = engine.signature(f)

    def one() -> None:
        with open(new, "rb") as f:
            for _ in engine.delta(sig, f):
                pass

    sequential, threaded = [], []
    for _ in range(runs):
        start = time.perf_counter()
        one()
        one()
        sequential.append(time.perf_counter() - start)
        threads = [threading.Thread(target=one) for _ in range(2)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        threaded.append(time.perf_counter() - start)
    seq, par = statistics.median(sequential), statistics.median(threaded)
    return [
        "| two S5 deltas in one process | median s |",
        "|---|---:|",
        f"| one after the other | {seq:.3f} |",
        f"| in two threads | {par:.3f} |",
        f"| speedup | {seq / par:.2f}x |",
    ]


PARTS = ("s5", "same", "best", "worst", "rsync", "memory", "threads")


def _parts(text: str) -> list[str]:
    """``--skip``'s value: one part or a comma list; an unknown name is an error, not ignored."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default="/work/bench-delta", help="scratch directory for the big files")
    parser.add_argument("--size", type=int, default=1 << 30, help="basis size in bytes (default 1 GiB)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--worst-runs", type=int, default=3, help="runs of the worst case (rdiff takes ~35 s)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        type=_parts,
        help="skip parts (repeatable, or a comma list): " + ", ".join(PARTS),
    )
    parser.add_argument("--memory-size", type=int, default=4 << 30)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.skip = [part for parts in args.skip for part in parts]

    d = args.dir
    os.makedirs(d, exist_ok=True)
    basis, new, other = (os.path.join(d, name) for name in ("basis.bin", "new.bin", "other.bin"))
    if args.generate_only:
        if not os.path.exists(basis) or os.path.getsize(basis) != args.size:
            generate(basis, args.size, args.seed)
            if os.path.exists(new):
                os.unlink(new)
        if not os.path.exists(new):
            make_s5(basis, new, args.seed)
        if "worst" not in args.skip and not os.path.exists(other):
            generate(other, args.size, args.seed + 100)
        return 0
    # Generate in a child: a child's peak RSS (ru_maxrss) starts from this process's peak.
    subprocess.run([sys.executable, os.path.abspath(__file__), "--generate-only", *sys.argv[1:]], check=True)
    warm(basis, new)
    with_rdiff = have("rdiff")
    from mirror import fastpath

    print(f"# bench_delta: size {args.size:,} B, runs {args.runs} (+{args.warmup} warm-up), warm page cache")
    print(f"# engine: {fastpath.choose('delta').__name__}; load average {os.getloadavg()[0]:.2f}")
    out: list[str] = []

    def section(
        title: str,
        tag: str,
        target: str,
        block: int | None,
        rdiff: bool,
        runs: int,
        rdiff_block: int | None = None,
    ) -> None:
        cases = phase_cases(d, basis, target, tag, block, rdiff, rdiff_block)
        results = run_phases(cases, runs, args.warmup)
        lines = [f"\n### {title}\n", *report_phases(results, tag, args.size, d, rdiff)]
        out.extend(lines)
        print("\n".join(lines), flush=True)

    if "s5" not in args.skip:
        section("S5, each tool's default block size", "s5", new, None, with_rdiff, args.runs)
    if "same" not in args.skip:
        block = RDIFF_BLOCK
        if with_rdiff and os.path.exists(os.path.join(d, "s5.rsig")):
            block = rdiff_block_size(os.path.join(d, "s5.rsig"))  # what rdiff chose by default
        title = f"S5, both at rdiff's default block size ({block})"
        section(title, "s5same", new, block, with_rdiff, args.runs, block)
    if "best" not in args.skip:
        section("Best case: identical file", "best", basis, None, with_rdiff, args.runs)
    if "worst" not in args.skip:
        section("Worst case: nothing in common", "worst", other, None, with_rdiff, args.worst_runs)
    if "rsync" not in args.skip and "s5" not in args.skip:
        ours = os.path.getsize(os.path.join(d, "s5.sig")) + os.path.getsize(os.path.join(d, "s5.delta"))
        theirs = rsync_bytes(d, basis, new)
        lines = ["\n### S5 bytes on the wire\n", "| tool | bytes | ratio vs rsync |", "|---|---:|---:|"]
        if theirs:
            lines.append(f"| rsync --no-whole-file -I (sent + received) | {theirs:,} | 1.000 |")
            lines.append(f"| ours: signature + delta, default block size | {ours:,} | {ours / theirs:.3f} |")
        out.extend(lines)
        print("\n".join(lines), flush=True)
    if "memory" not in args.skip:
        lines = ["\n### Memory over a pipe (no file size known; --block-size 4096)\n"]
        lines += memory_probe(d, args.memory_size)
        out.extend(lines)
        print("\n".join(lines), flush=True)

    if "threads" not in args.skip:
        lines = ["\n### GIL released: two files on two cores\n", *parallel_probe(basis, new, args.runs)]
        out.extend(lines)
        print("\n".join(lines), flush=True)

    print("\n# ---- Markdown for RESULTS.md ----")
    print("\n".join(out))
    if not args.keep:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
