"""S1, S2, S7: compare an unchanged replica, side by side with rsync (see docs/BENCHMARKS.md).

    python -m benchmarks.bench_compare --workdir /work/bench [--files 50000 --bytes 6G]
                                       [--runs 7] [--scenarios S1,S2,S7] [--cold]

The corpus is generated once in WORKDIR/c<files>-<bytes>/A and copied with ``cp -a`` to B.
Every case is a real command (``python -m mirror ...`` from the interpreter running this
script: install hamirror non-editable for figures, an editable install adds its import hook
to every start), run alternately with its rsync peer; medians and ratios come from the same
rounds.  The page cache is warm unless ``--cold`` (root: caches dropped before every run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from benchmarks import corpus
from benchmarks.harness import MIRROR, Case, dentry_cache_note, drop_caches, have, measure, table


def ensure_corpus(workdir: str, files: int, total: int, seed: int) -> tuple[str, str]:
    base = os.path.join(workdir, f"c{files}-{total >> 20}M-s{seed}")
    a, b = os.path.join(base, "A"), os.path.join(base, "B")
    if not os.path.isdir(b):
        shutil.rmtree(base, ignore_errors=True)
        corpus.build(a, files, total, seed)
        subprocess.run(["cp", "-a", a, b], check=True)
    return a, b


def remove_caches(*roots: str) -> None:
    """Forget the digest caches, keeping each root's mtime (removing .mirror would bump it)."""
    for root in roots:
        st = os.stat(root)
        shutil.rmtree(os.path.join(root, ".mirror"), ignore_errors=True)
        os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/work/bench")
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--bytes", type=corpus.parse_size, default=6 << 30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--scenarios", default="S1,S2")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    args = ap.parse_args(argv)
    if not have("rsync"):
        return 2
    a, b = ensure_corpus(args.workdir, args.files, args.bytes, args.seed)
    scenarios = set(args.scenarios.split(","))
    cold = drop_caches if args.cold else None
    print(f"corpus: {args.files} files, {args.bytes / 1e9:.1f} GB; page cache {'cold' if args.cold else 'warm'}; "
          f"ours: {' '.join(MIRROR)}")  # fmt: skip
    print(f"{dentry_cache_note()}\n")

    if "S1" in scenarios:
        remove_caches(a, b)
        cases = [
            Case("mirror diff A B", MIRROR + ["diff", a, b], prepare=cold),
            Case("rsync -a -n --delete A/ B/", ["rsync", "-a", "-n", "--delete", a + "/", b + "/"], prepare=cold),
        ]
        print(table(measure(cases, args.runs), "rsync -a -n --delete A/ B/", "S1: compare an unchanged replica"))
        print()

    if "S2" in scenarios:
        def uncached():
            remove_caches(a, b)
            if cold:
                cold()

        first = [
            Case("mirror diff --checksum (no cache yet)", MIRROR + ["diff", "--checksum", a, b], prepare=uncached),
            Case("rsync -a -c -n A/ B/", ["rsync", "-a", "-c", "-n", a + "/", b + "/"], prepare=cold),
        ]
        print(table(measure(first, args.runs), "rsync -a -c -n A/ B/", "S2: checksum compare, first run"))
        print()
        subprocess.run(MIRROR + ["diff", "--checksum", a, b], check=True, stdout=subprocess.DEVNULL)
        cached = [
            Case("mirror diff --checksum (cache warm)", MIRROR + ["diff", "--checksum", a, b], prepare=cold),
            Case("rsync -a -c -n A/ B/", ["rsync", "-a", "-c", "-n", a + "/", b + "/"], prepare=cold),
        ]
        print(table(measure(cached, args.runs), "rsync -a -c -n A/ B/", "S2: checksum compare, digest cache warm"))
        print()

    if "S7" in scenarios:
        remove_caches(a, b)
        cases = [
            Case("mirror diff A B", MIRROR + ["diff", a, b]),
            Case("rsync -a -n --delete A/ B/", ["rsync", "-a", "-n", "--delete", a + "/", b + "/"]),
        ]
        print(table(measure(cases, args.runs), "rsync -a -n --delete A/ B/", f"S7: memory, {args.files} files"))
        print("\n(peak RSS: the largest single process of the command's tree, from wait4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
