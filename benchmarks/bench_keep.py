"""``hawrap resume --keep-local-changes`` against copying the same files aside by hand.

A stopped node in standby whose mirror journal lists FILES files (exponential sizes around
MEAN_SIZE bytes, 50 directories) that its peer lacks.  Each run starts from that state
(journal, standby lock, no copies: untimed) and times the whole command; the peer is what
an administrator would type, ``rsync -a --files-from=LIST`` then ``sync -f`` (the copies
made durable, as hawrap makes them before the resync may replace the originals).

    python -m benchmarks.bench_keep --workdir /work/bench/keep --files 2000 --mean-size 40000 --runs 9
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys

from benchmarks.harness import Case, have, measure, table
from hawrap.demo import write_demo_config
from mirror.journal import ENTRY, Journal

JOURNAL = "journal-0123456789abcdef"


def build(base: str, files: int, mean_size: int, seed: int) -> list[str]:
    """The node alpha of a demo cluster, its tree and its journal; returns the files' paths."""
    rng = random.Random(seed)
    os.makedirs(base, exist_ok=True)
    secret = os.path.join(base, "mirror-secret")
    with open(secret, "w") as f:
        f.write("m" * 32)
    os.chmod(secret, 0o600)
    for node in ("alpha", "beta"):
        os.makedirs(os.path.join(base, "data", node), exist_ok=True)
    write_demo_config(base, extra=f"""
[mirror]
secret_file = "{secret}"

[[mirror.tree]]
name = "data"
path = "{base}/data/{{node}}"
lock_file = "{base}/data/{{node}}.lock"
""")
    root = os.path.join(base, "data", "alpha")
    paths = [f"spool/d{i % 50}/m{i:06d}" for i in range(files)]
    for rel in paths:
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(rng.randbytes(max(1, int(rng.expovariate(1 / mean_size)))))
    os.makedirs(os.path.join(root, ".mirror"), exist_ok=True)
    journal = Journal(os.fsencode(os.path.join(root, ".mirror", JOURNAL)))
    journal.append([(ENTRY, p.encode(), 0) for p in paths])
    journal.close()
    shutil.copy(os.path.join(root, ".mirror", JOURNAL), os.path.join(base, "journal.saved"))
    with open(os.path.join(base, "list"), "w") as f:
        f.write("\n".join(paths) + "\n")
    os.makedirs(os.path.join(base, "alpha"), exist_ok=True)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--mean-size", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args(argv)
    if not have("rsync"):
        return 2
    base = os.path.abspath(os.path.join(args.workdir, f"keep-{args.files}x{args.mean_size}-s{args.seed}"))
    if not os.path.exists(os.path.join(base, "list")):
        build(base, args.files, args.mean_size, args.seed)
    by_hand = os.path.join(base, "byhand")
    state = os.path.join(base, "data", "alpha", ".mirror")

    def reset() -> None:
        shutil.copy(os.path.join(base, "journal.saved"), os.path.join(state, JOURNAL))
        with open(os.path.join(base, "alpha", "standby.lock"), "w") as f:
            f.write("{}")
        shutil.rmtree(os.path.join(state, "kept"), ignore_errors=True)
        shutil.rmtree(by_hand, ignore_errors=True)

    config = os.path.join(base, "hawrap.toml")
    ours = "hawrap resume --keep-local-changes"
    peer = "rsync -a --files-from && sync -f"
    cases = [
        Case(ours, [sys.executable, "-m", "hawrap", "resume", "--config", config, "--node", "alpha",
                    "--keep-local-changes"], prepare=reset),  # fmt: skip
        Case(peer, ["sh", "-c", 'rsync -a --files-from="$0/list" "$0/data/alpha/" "$0/byhand/" && sync -f "$0/byhand"',
                    base], prepare=reset),  # fmt: skip
    ]
    print(table(measure(cases, runs=args.runs), baseline=peer,
                title=f"{args.files} journaled files of ~{args.mean_size} bytes, seed {args.seed}"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
