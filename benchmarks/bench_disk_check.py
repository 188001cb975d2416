"""What hawrap's check of a ``require_mount`` tree's disk costs a node's step, as the host's
mount table grows (a container host has thousands of mounts).

In a private mount namespace of its own (root only: ``unshare -m``), the benchmark mounts
``--mounts`` tmpfs file systems beside one tree, then times ``TreeDisks.unfit()`` and
``incomplete()`` (what a step asks) ``--steps`` times, alternating rounds of the cached mount
table (``MountTable``: read again only when the kernel says the table changed) with rounds
that read the table at every call (``mirror.guard.is_mount_point``, as before), and prints
each one's median per step and their paired ratio.

    python -m benchmarks.bench_disk_check [--mounts 2000 --steps 200 --rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace


def _measure(args) -> None:
    from hawrap.mirrorctl import Tree
    from hawrap.treedisk import TreeDisks
    from mirror.guard import is_mount_point

    work = tempfile.mkdtemp(prefix="bench-disk-check-")
    tree, state = os.path.join(work, "tree"), os.path.join(work, "state")
    os.makedirs(tree)
    os.makedirs(state)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", tree], check=True)
    for i in range(args.mounts):
        path = os.path.join(work, f"m{i}")
        os.makedirs(path)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path], check=True)
    with open("/proc/self/mountinfo", "rb") as f:
        size = len(f.read())
    disks = TreeDisks([Tree("data", tree, os.path.join(work, "lock"), os.path.join(tree, ".mirror"), True)], state)

    cached, every = [], []
    tables = {"cached": disks.mounts, "every call": SimpleNamespace(is_mount_point=is_mount_point)}
    for _ in range(args.rounds):
        for name, out in (("cached", cached), ("every call", every)):
            disks.mounts = tables[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                assert disks.unfit() == "" and disks.incomplete() == []
            out.append((time.perf_counter() - start) / args.steps * 1e3)
    ratio = statistics.median(c / e for c, e in zip(cached, every, strict=True))
    print(f"{args.mounts} mounts ({size} bytes of mountinfo), {args.rounds} rounds x {args.steps} steps:")
    print(f"  cached mount table: median {statistics.median(cached):.4f} ms per step")
    print(f"  read at every call: median {statistics.median(every):.4f} ms per step")
    print(f"  paired ratio cached / every call: {ratio:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mounts", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        _measure(args)
        return 0
    if os.geteuid() != 0:
        print("bench_disk_check: needs root (a private mount namespace with its own mounts)", file=sys.stderr)
        return 2
    argv = ["unshare", "-m", "--propagation", "private", sys.executable, "-m", "benchmarks.bench_disk_check",
            "--inside", "--mounts", str(args.mounts), "--steps", str(args.steps), "--rounds", str(args.rounds)]  # fmt: skip
    return subprocess.run(argv).returncode


if __name__ == "__main__":
    sys.exit(main())
