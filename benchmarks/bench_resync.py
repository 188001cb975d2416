"""S8: resync after an outage, 1% of the files changed on the survivor while its peer was down.

    python -m benchmarks.bench_resync --workdir /work/bench [--files 50000 --bytes 6G] [--runs 3]

What hawrap does after `hawrap resume`: the survivor's `mirror daemon` ran the whole time with
the mirroring lock held, journaling every change; the lock goes, and the daemon catches up
from its journal (then reconciles the whole tree in the background).  Measured: from the lock's
removal to the end of the catch-up session (from the daemon's status file), against a full
`rsync -a --delete A/ B/` and a full `mirror sync --delete A B` of the same state.  Each round
starts from trees put back to the corpus's state by rsync (untimed, flushed).
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
import time

from benchmarks import corpus
from benchmarks.bench_compare import ensure_corpus
from benchmarks.harness import MIRROR, have, run_child


def changed_files(root: str, fraction: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    files = []
    for dirpath, dirnames, names in os.walk(root):
        if dirpath == root:
            dirnames[:] = [d for d in dirnames if d != ".mirror"]
        files.extend(os.path.join(dirpath, n) for n in names if not os.path.islink(os.path.join(dirpath, n)))
    files.sort()
    return rng.sample(files, max(1, int(len(files) * fraction)))


def rewrite(paths: list[str], rng: random.Random) -> None:
    """New content by rename over the old (so hard-linked snapshots keep theirs)."""
    for path in paths:
        with open(path, "rb") as f:
            data = bytearray(f.read())
        at = rng.randrange(max(len(data), 1))
        data[at : at + 64] = rng.randbytes(64)
        with open(path + ".new", "wb") as f:
            f.write(data)
        os.rename(path + ".new", path)


def restore(reference: str, target: str) -> None:
    """Make ``target`` a copy of ``reference`` again (its state dir, and so the daemon's
    journal, starts empty), rewriting only what differs, and flush it (untimed)."""
    subprocess.run(["rsync", "-a", "--delete", "--exclude=/.mirror", reference + "/", target + "/"], check=True)
    shutil.rmtree(os.path.join(target, ".mirror"), ignore_errors=True)
    os.sync()


def status(status_dir: str) -> dict | None:
    try:
        with open(os.path.join(status_dir, "mirror-daemon.status.json")) as f:
            return json.load(f)["pairs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def one_round(a: str, snapshot_b: str, b: str, work: str, fraction: float, seed: int) -> tuple[float, int]:
    """Returns (seconds from lock removal to caught up, changed files)."""
    restore(snapshot_b, b)
    lock = os.path.join(work, "mirror.lock")
    status_dir = os.path.join(work, "status")
    shutil.rmtree(status_dir, ignore_errors=True)
    subprocess.run(MIRROR + ["lock", "acquire", lock, "--reason", "peer down"], check=True, stdout=subprocess.DEVNULL)
    log = open(os.path.join(work, "daemon.log"), "ab")
    proc = subprocess.Popen(MIRROR + ["daemon", a, b, "--lock-file", lock, "--status-dir", status_dir, "-v"],
                            stdout=log, stderr=log)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (st := status(status_dir)) is None or st["state"] != "locked":
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("daemon did not reach the locked state")
            time.sleep(0.05)
        paths = changed_files(a, fraction, seed)
        rewrite(paths, random.Random(seed))
        while (st := status(status_dir))["pending"] < len(paths):  # every change journaled
            time.sleep(0.05)
        sessions_before = st["sessions"]
        start = time.perf_counter()
        os.unlink(lock)
        while True:
            st = status(status_dir)
            if st and st["sessions"] > sessions_before and st["state"] != "catching up":
                break
            time.sleep(0.002)
        # The catch-up session's own duration is the figure; the status file lags by < 0.5 s.
        elapsed = st["last_session_seconds"]
        wall = time.perf_counter() - start
        print(f"  caught up {len(paths)} changes: session {elapsed:.3f} s (seen after {wall:.3f} s)", file=sys.stderr)
        return elapsed, len(paths)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/work/bench")
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--bytes", type=corpus.parse_size, default=6 << 30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.01)
    args = ap.parse_args(argv)
    if not have("rsync"):
        return 2
    a0, b0 = ensure_corpus(args.workdir, args.files, args.bytes, args.seed)
    work = os.path.join(os.path.dirname(a0), "resync")
    os.makedirs(work, exist_ok=True)
    # Each round: the survivor's tree (A8) starts as A, the replica (B8) as B; the round's
    # changes are made on A8.  Full copies (hard links to A and B would give every file
    # nlink 2, which changes what both tools do).
    a = os.path.join(work, "A8")
    b = os.path.join(work, "B8")
    ours, rsync_t, sync_t, counts = [], [], [], []
    for r in range(args.runs):
        restore(a0, a)
        seconds, n = one_round(a, b0, b, work, args.fraction, args.seed + r)
        ours.append(seconds)
        counts.append(n)
        for dst, runner, bucket in ((b, "rsync", rsync_t), (b, "mirror", sync_t)):
            restore(b0, dst)
            argv_ = (["rsync", "-a", "--delete", a + "/", dst + "/"] if runner == "rsync"
                     else MIRROR + ["sync", "--delete", a, dst])  # fmt: skip
            bucket.append(run_child(argv_)[0])
    med = statistics.median
    print(f"\n**S8: resync after an outage, {med(counts)} of {args.files} files changed ({args.fraction:.1%}), "
          f"{args.runs} rounds**\n")
    print("| case | median s | ratio vs rsync |")
    print("|---|---:|---:|")
    print(f"| mirror daemon catch-up from its journal (lock removed -> caught up) | {med(ours):.3f} | "
          f"{med(ours) / med(rsync_t):.3f} |")
    print(f"| mirror sync --delete A B (full comparison) | {med(sync_t):.3f} | {med(sync_t) / med(rsync_t):.3f} |")
    print(f"| rsync -a --delete A/ B/ (full) | {med(rsync_t):.3f} | 1.000 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
