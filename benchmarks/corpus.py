"""Deterministic benchmark corpus: the reference tree of docs/BENCHMARKS.md.

Default: 50,000 files, about 6 GB, about 2,000 directories up to depth 6, heavy-tailed sizes
(most files 1-16 KiB, some of megabytes, a few over 100 MB), random (incompressible)
content, some symlinks (a few dangling) and some empty files.  The same ``--seed`` gives the
same names, sizes, contents and mtimes.  ``--scale`` (or ``--bytes``) shrinks the bytes but
keeps the file count, for quick runs.

Content comes from a seeded 256 MiB random pool: each file is a contiguous slice of it at a
seeded offset, so every file is incompressible on its own while generation runs at disk speed.

    python -m benchmarks.corpus DIR [--files N] [--bytes 6G] [--scale 0.1] [--seed 1]
    python -m benchmarks.corpus --mutate DIR [--modified 100 --created 10 --deleted 10]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass

POOL_SIZE = 256 << 20
# Timestamps are fixed, so two corpora made from one seed have identical metadata.
BASE_MTIME_NS = 1_700_000_000 * 10**9


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "")
    return int(float(number) * units[unit])


@dataclass(frozen=True)
class Plan:
    dirs: list[str]  # relative paths, parents before children
    files: list[tuple[str, int, int]]  # (relative path, size, pool offset)
    symlinks: list[tuple[str, str]]  # (relative path, target)


def _pool(seed: int, size: int) -> bytes:
    rng = random.Random(seed * 7919 + 17)
    return b"".join(rng.randbytes(1 << 20) for _ in range(size >> 20))


def _sizes(rng: random.Random, count: int, total: int) -> list[int]:
    """Heavy-tailed sizes summing to about ``total``: the small files keep their sizes and the
    larger ones are scaled so the sum comes out right (so --scale shrinks only the tail)."""
    sizes = []
    for _ in range(count):
        u = rng.random()
        if u < 0.01:
            sizes.append(0)
        elif u < 0.86:
            sizes.append(int(2 ** rng.uniform(10, 14)))  # 1-16 KiB
        elif u < 0.985:
            sizes.append(int(2 ** rng.uniform(14, 20)))  # 16 KiB - 1 MiB
        elif u < 0.9995:
            sizes.append(int(2 ** rng.uniform(20, 24.5)))  # 1-24 MiB
        else:
            sizes.append(int(2 ** rng.uniform(26.6, 27.6)))  # 100-200 MiB
    small = sum(s for s in sizes if s <= 16384)
    large = sum(s for s in sizes if s > 16384)
    factor = max(total - small, 0) / large if large else 0.0
    return [s if s <= 16384 else max(16385, int(s * factor)) for s in sizes]


def plan(files: int, total_bytes: int, seed: int) -> Plan:
    rng = random.Random(seed)
    n_dirs = max(1, min(2000, files // 25))
    dirs: list[str] = []
    depth = {"": 0}
    parents = [""]
    for i in range(n_dirs):
        parent = rng.choice(parents)
        path = f"{parent}/d{i:04d}" if parent else f"d{i:04d}"
        dirs.append(path)
        depth[path] = depth[parent] + 1
        if depth[path] < 6:
            parents.append(path)
    places = [""] + dirs
    n_links = files // 200
    n_regular = files - n_links
    sizes = _sizes(rng, n_regular, total_bytes)
    out_files = []
    for i, size in enumerate(sizes):
        where = rng.choice(places)
        name = f"f{i:06d}.{rng.choice(['txt', 'dat', 'eml', 'html', 'bin', 'log'])}"
        path = f"{where}/{name}" if where else name
        out_files.append((path, size, rng.randrange(POOL_SIZE)))
    links = []
    for i in range(n_links):
        where = rng.choice(places)
        path = f"{where}/l{i:05d}" if where else f"l{i:05d}"
        if rng.random() < 0.1:
            target = f"missing-{i}"  # dangling
        else:
            target_path = rng.choice(out_files)[0]
            up = "../" * (path.count("/"))
            target = up + target_path
        links.append((path, target))
    return Plan(dirs, out_files, links)


def _write_slice(fd: int, pool: memoryview, offset: int, size: int) -> None:
    while size:
        n = min(size, POOL_SIZE - offset)
        os.write(fd, pool[offset : offset + n])
        size -= n
        offset = 0


def build(root: str, files: int = 50_000, total_bytes: int = 6 << 30, seed: int = 1, quiet: bool = False) -> Plan:
    """Create the corpus under ``root`` (which must not exist or be empty)."""
    start = time.perf_counter()
    p = plan(files, total_bytes, seed)
    pool = memoryview(_pool(seed, POOL_SIZE))
    os.makedirs(root, exist_ok=True)
    for d in p.dirs:
        os.mkdir(os.path.join(root, d))
    for i, (path, size, offset) in enumerate(p.files):
        fd = os.open(os.path.join(root, path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_slice(fd, pool, offset, size)
        finally:
            os.close(fd)
        mtime = BASE_MTIME_NS + i * 1_000_003
        os.utime(os.path.join(root, path), ns=(mtime, mtime))
    for path, target in p.symlinks:
        os.symlink(target, os.path.join(root, path))
    for d in reversed(p.dirs):
        os.utime(os.path.join(root, d), ns=(BASE_MTIME_NS, BASE_MTIME_NS))
    del pool  # 256 MiB: not to be inherited by every child the benchmark starts
    if not quiet:
        total = sum(s for _, s, _ in p.files)
        print(
            f"corpus {root}: {len(p.files)} files, {len(p.symlinks)} symlinks, {len(p.dirs)} dirs, "
            f"{total / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    return p


def mutate(root: str, modified: int = 100, created: int = 10, deleted: int = 10, seed: int = 2) -> dict:
    """Scenario S4's change set: modify, create and delete regular files, deterministically."""
    rng = random.Random(seed)
    regular = []
    for dirpath, _, names in os.walk(root):
        if "/.mirror" in dirpath + "/":
            continue
        for n in names:
            full = os.path.join(dirpath, n)
            if os.path.isfile(full) and not os.path.islink(full):
                regular.append(full)
    regular.sort()
    picked = rng.sample(regular, modified + deleted)
    for path in picked[:modified]:
        # Written as a new file renamed over the old one: a tree made with `cp -al` from
        # another keeps the other's content intact (benchmarks reset replicas that way).
        with open(path, "rb") as f:
            data = bytearray(f.read())
        at = rng.randrange(max(len(data), 1))
        data[at : at + 64] = rng.randbytes(64)
        st = os.stat(path)
        with open(path + ".mutate", "wb") as f:
            f.write(data)
        os.chmod(path + ".mutate", st.st_mode & 0o7777)
        os.rename(path + ".mutate", path)
    for path in picked[modified:]:
        os.unlink(path)
    dirs = sorted({os.path.dirname(p) for p in regular})
    for i in range(created):
        with open(os.path.join(rng.choice(dirs), f"new{seed}-{i:03d}.dat"), "wb") as f:
            f.write(rng.randbytes(rng.randrange(1024, 65536)))
    return {"modified": modified, "created": created, "deleted": deleted}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--bytes", type=parse_size, default=6 << 30, help="total size, e.g. 6G (default)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply --bytes (keeps the file count)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mutate", action="store_true", help="apply S4's change set to an existing corpus")
    ap.add_argument("--modified", type=int, default=100)
    ap.add_argument("--created", type=int, default=10)
    ap.add_argument("--deleted", type=int, default=10)
    args = ap.parse_args(argv)
    if args.mutate:
        print(mutate(args.root, args.modified, args.created, args.deleted, args.seed + 1))
        return 0
    if os.path.exists(args.root) and os.listdir(args.root):
        print(f"corpus: {args.root} exists and is not empty", file=sys.stderr)
        return 2
    build(args.root, args.files, math.floor(args.bytes * args.scale), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
