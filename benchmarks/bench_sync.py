"""S1n, S3, S4 (and the delta threshold) side by side with rsync and cp -a.

    python -m benchmarks.bench_sync --workdir /work/bench [--files 50000 --bytes 6G]
                                    [--runs 5] [--scenarios S1n,S3,S4,S4f,threshold,sparse] [--cold]

- S1n: an unchanged replica over loopback: `mirror sync A mirror://127.0.0.1:P/m` against
  `rsync -a --delete A/ rsync://127.0.0.1:Q/m/` (an rsync daemon started here).
- S3: initial mirror into an empty replica, local and over loopback, against `rsync -a`
  (local and daemon) and `cp -a`.  mirror fsyncs every file by default (rsync and cp do
  not); the `--no-fsync` row shows what that costs.
- S4: 100 files modified, 10 created, 10 deleted (benchmarks.corpus --mutate), local and
  over loopback, against `rsync -a --delete`.  A4 and B4 are full copies of A and B (hard
  links would give every file nlink 2); before every run B4 is put back to B's state by
  `rsync -a --delete B/ B4/` and flushed (untimed).  mirror fsyncs what it writes; rsync
  does not: the `--no-fsync` rows show what durability costs.
- S4f: S4's changed entries alone, in small trees of their own: what is left is each tool's
  fixed cost (start-up, the transfer of 110 files, the final fsyncs), without the walks.
- threshold: time and bytes to bring N edited files of one size up to date, sent whole
  vs as deltas, over loopback: where deltas start to pay (the sender's DELTA_THRESHOLD).
- sparse: initial mirror of files with holes (VM images: 1 GiB each, 32 to 64 data runs at
  places the seed picks), local, durable, against `rsync -a`, `rsync -aS` and `cp -a` (its
  default `--sparse=auto`), each followed by `sync`, and over loopback against an rsync
  daemon with `-S`; also the blocks each replica takes.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from benchmarks import corpus
from benchmarks.bench_compare import ensure_corpus
from benchmarks.harness import (
    MIRROR,
    Case,
    dentry_cache_note,
    drop_caches,
    have,
    measure,
    paired_ratio,
    table,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Servers:
    """A `mirror serve` and an `rsync --daemon` on loopback, each serving module m = a dir."""

    def __init__(self, workdir: str, mirror_root: str, rsync_root: str):
        self.dir = tempfile.mkdtemp(prefix="bench-servers-", dir=workdir)
        self.secret = os.path.join(self.dir, "secret")
        with open(self.secret, "w") as f:
            f.write("benchmark-secret-123\n")
        os.chmod(self.secret, 0o600)
        self.mirror_root, self.rsync_root = mirror_root, rsync_root
        self.mport, self.rport = free_port(), free_port()
        conf = os.path.join(self.dir, "rsyncd.conf")
        with open(conf, "w") as f:
            f.write(f"use chroot = false\nmunge symlinks = false\nuid = root\ngid = root\n[m]\npath = {rsync_root}\nread only = false\n")
        self.procs = [
            subprocess.Popen(MIRROR + ["serve", "--listen", f"127.0.0.1:{self.mport}", "--module",
                                       f"m={mirror_root}", "--secret-file", self.secret, "-q"]),  # fmt: skip
            subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={self.rport}",
                              "--address=127.0.0.1"]),  # fmt: skip
        ]
        for port in (self.mport, self.rport):
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def mirror_url(self) -> str:
        return f"mirror://127.0.0.1:{self.mport}/m"

    def rsync_url(self) -> str:
        return f"rsync://127.0.0.1:{self.rport}/m/"

    def close(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def restore_from(reference: str, target: str):
    """Put ``target`` back to ``reference``'s state (only what a run changed is rewritten),
    then flush it, so no run pays for the previous one's writeback."""

    def prepare():
        # the reference's state dir stays out: it records the tree the reference mirrors, and the
        # source guard rightly refuses a replica that says it mirrors another tree
        subprocess.run(["rsync", "-a", "--delete", "--exclude=/.mirror/", reference + "/", target + "/"], check=True)
        os.sync()

    return prepare


def reset_from(snapshot: str, target: str):
    def prepare():
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run(["cp", "-al", snapshot, target], check=True)

    return prepare


def empty(*dirs: str, flush: bool = False, cold: bool = False):
    def prepare():
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        if flush:  # no run pays for the writeback of the one before
            os.sync()
        if cold:  # the source read from disk, as a first mirror of a tree finds it
            drop_caches()

    return prepare


def threshold_sweep(workdir: str, runs: int) -> str:
    """Edited files of one size, sent whole or as deltas over loopback: time and bytes."""
    lines = ["| file size | files | whole: median s | delta: median s | whole: wire MB | delta: wire MB |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    from mirror.transfer import sync

    for size in (16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20):
        count = max(4, min(400, (64 << 20) // size))
        base = tempfile.mkdtemp(prefix="sweep-", dir=workdir)
        src, snap, dst = (os.path.join(base, x) for x in ("src", "snap", "dst"))
        os.makedirs(src)
        for i in range(count):
            with open(os.path.join(src, f"f{i}"), "wb") as f:
                f.write(os.urandom(size))
        subprocess.run(["cp", "-a", src, snap], check=True)
        for i in range(count):  # a 64-byte edit in the middle of every file
            p = os.path.join(src, f"f{i}")
            data = bytearray(open(p, "rb").read())
            data[size // 2 : size // 2 + 64] = os.urandom(64)
            with open(p + ".t", "wb") as f:
                f.write(data)
            os.rename(p + ".t", p)
        servers = Servers(workdir, dst, dst)
        results = {}
        try:
            for name, threshold in (("whole", 1 << 62), ("delta", 0)):
                secs, wire = [], []
                for _ in range(runs):
                    reset_from(snap, dst)()
                    t = time.perf_counter()
                    r = sync(src, servers.mirror_url(), secret_file=servers.secret, delta_threshold=threshold)
                    secs.append(time.perf_counter() - t)
                    wire.append(r.stats.wire_sent)
                    assert r.ok
                results[name] = (sorted(secs)[len(secs) // 2], sorted(wire)[len(wire) // 2])
        finally:
            servers.close()
            shutil.rmtree(base, ignore_errors=True)
        (ws, wb), (ds, db) = results["whole"], results["delta"]
        lines.append(f"| {size >> 10} KiB | {count} | {ws:.3f} | {ds:.3f} | {wb / 1e6:.2f} | {db / 1e6:.2f} |")
    return "\n".join(lines)


def s4_source(a: str) -> str:
    """A4, beside A: a full copy of A with S4's change set (made once)."""
    # Full copies, not hard links: a file linked from another tree has nlink 2, which
    # changes what both tools do with it (and would slow every later scenario's A).
    a4 = os.path.join(os.path.dirname(a), "A4")
    if not os.path.isdir(a4):
        subprocess.run(["cp", "-a", a, a4 + ".tmp"], check=True)
        # A's state (its tree identity above all) belongs to A: a copy that kept it would be
        # refused by the source guard as a tree that moved.
        shutil.rmtree(os.path.join(a4 + ".tmp", ".mirror"), ignore_errors=True)
        print(corpus.mutate(a4 + ".tmp", seed=3), file=sys.stderr)
        os.rename(a4 + ".tmp", a4)
    return a4


def s4_fixed_cases(base: str) -> list[Case]:
    """S4 cut down to what it changes: the files S4 sends or deletes, with their directories,
    in trees of their own (A4f from A4, which ``s4_source`` made, and B4f from B).  What is left of S4's time is each
    tool's cost per process and per changed file: start-up, the transfer, the final fsyncs."""
    a4, b = os.path.join(base, "A4"), os.path.join(base, "B")
    a4f, b4f, dst = (os.path.join(base, name) for name in ("A4f", "B4f.orig", "B4f"))
    if not os.path.isdir(a4f):
        listing = subprocess.run(["rsync", "-a", "--delete", "-n", "--itemize-changes", "--out-format=%i %n",
                                  a4 + "/", b + "/"], check=True, capture_output=True).stdout.decode()  # fmt: skip
        sent = [line[12:] for line in listing.splitlines() if line.startswith(">f")]
        deleted = [line[12:] for line in listing.splitlines() if line.startswith("*deleting")]
        # B4f.orig first: A4f's presence says both are complete (an interrupted build is redone).
        for source, target, names in ((b, b4f, sent + deleted), (a4, a4f, sent)):
            shutil.rmtree(target + ".tmp", ignore_errors=True)
            names_file = target + ".list"
            with open(names_file, "w") as f:
                f.write("\n".join(names) + "\n")
            copy = subprocess.run(["rsync", "-a", f"--files-from={names_file}", source + "/", target + ".tmp/"],
                                  capture_output=True)  # fmt: skip
            os.unlink(names_file)
            # 23 (some files not transferred) is expected from B: the sent names that are new.
            if copy.returncode not in (0, 23):
                raise RuntimeError(f"building {target}: {copy.stderr.decode(errors='replace')[-2000:]}")
            shutil.rmtree(target, ignore_errors=True)
            os.rename(target + ".tmp", target)
    reset = restore_from(b4f, dst)
    return [
        Case("mirror sync A4f B4f (local)", MIRROR + ["sync", "--delete", a4f, dst], prepare=reset),
        Case("mirror sync --no-fsync A4f B4f (local)", MIRROR + ["sync", "--delete", "--no-fsync", a4f, dst],
             prepare=reset),  # fmt: skip
        Case("rsync -a --delete A4f/ B4f/", ["rsync", "-a", "--delete", a4f + "/", dst + "/"], prepare=reset),
    ]


SPARSE_FILES = 4
SPARSE_LENGTH = 1 << 30


def sparse_images(workdir: str, seed: int) -> str:
    """A tree of ``SPARSE_FILES`` files of ``SPARSE_LENGTH`` bytes each, mostly holes: 32 to 64
    runs of random data (64 KiB to 2 MiB, 64 KiB aligned) at places ``seed`` picks (made once)."""
    root = os.path.join(workdir, f"sparse-s{seed}", "src")
    if os.path.isdir(root):
        return root
    rng = random.Random(seed)
    os.makedirs(root + ".tmp", exist_ok=True)
    for i in range(SPARSE_FILES):
        with open(os.path.join(root + ".tmp", f"image{i}.raw"), "wb") as f:
            f.truncate(SPARSE_LENGTH)
            for _ in range(rng.randint(32, 64)):
                f.seek(rng.randrange(0, SPARSE_LENGTH - (2 << 20), 64 << 10))
                f.write(rng.randbytes(rng.randrange(64 << 10, 2 << 20, 64 << 10)))
    os.rename(root + ".tmp", root)
    return root


def kib_used(path: str) -> int:
    out = subprocess.run(["du", "-sk", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def sparse_scenario(workdir: str, seed: int, runs: int) -> None:
    src = sparse_images(workdir, seed)
    dst = os.path.join(os.path.dirname(src), "dst")
    prep = empty(dst, flush=True)
    prep()
    servers = Servers(workdir, dst, dst)
    local = [
        Case("mirror sync S D (local)", MIRROR + ["sync", src, dst], prepare=prep),
        Case("rsync -a S/ D/ && sync", ["sh", "-c", f"rsync -a '{src}/' '{dst}/' && sync"], prepare=prep),
        Case("rsync -aS S/ D/ && sync", ["sh", "-c", f"rsync -aS '{src}/' '{dst}/' && sync"], prepare=prep),
        Case("cp -a S/. D/ && sync", ["sh", "-c", f"cp -a '{src}/.' '{dst}/' && sync"], prepare=prep),
    ]
    net = [
        Case("mirror sync S mirror://127.0.0.1/m", MIRROR + ["sync", src, servers.mirror_url(), "--secret-file",
                                                              servers.secret], prepare=prep),  # fmt: skip
        Case("rsync -aS S/ rsync://127.0.0.1/m/ && sync",
             ["sh", "-c", f"rsync -aS '{src}/' '{servers.rsync_url()}' && sync"], prepare=prep),  # fmt: skip
    ]
    what = f"{SPARSE_FILES} files of {SPARSE_LENGTH >> 20} MiB with holes, {kib_used(src) >> 10} MiB of data (seed {seed})"
    try:
        results = measure(local + net, runs, warmup=0)
        for title, cases in (("local", local), ("over loopback", net)):
            print(table({c.name: results[c.name] for c in cases}, cases[-2 if title == "local" else -1].name,
                        f"sparse, {title}: {what}"))  # fmt: skip
            print()
        print("| case | replica's blocks, MiB |\n|---|---:|")
        for case in local + net:  # once more each, untimed: what it leaves on the replica's disk
            prep()
            subprocess.run(case.command, check=True, capture_output=True)
            print(f"| {case.name} | {kib_used(dst) >> 10} |")
        print()
    finally:
        servers.close()
        shutil.rmtree(dst, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/work/bench")
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--bytes", type=corpus.parse_size, default=6 << 30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scenarios", default="S1n,S4,S3")
    ap.add_argument("--cold", action="store_true", help="S3: drop the page cache before every run (root)")
    args = ap.parse_args(argv)
    if not (have("rsync") and have("cp")):
        return 2
    scenarios = set(args.scenarios.split(","))
    a, b = ensure_corpus(args.workdir, args.files, args.bytes, args.seed)
    base = os.path.dirname(a)
    print(f"corpus: {args.files} files, {args.bytes / 1e9:.1f} GB; page cache warm; ours: {' '.join(MIRROR)}")
    print(f"{dentry_cache_note()}\n")

    if "threshold" in scenarios:
        print("**Delta threshold: edited files sent whole vs as deltas over loopback**\n")
        print(threshold_sweep(args.workdir, args.runs))
        print()

    if "S1n" in scenarios:
        servers = Servers(args.workdir, b, b)
        try:
            cases = [
                Case("mirror sync A mirror://127.0.0.1/m", MIRROR + ["sync", a, servers.mirror_url(),
                                                                      "--secret-file", servers.secret]),  # fmt: skip
                Case("rsync -a --delete A/ rsync://127.0.0.1/m/", ["rsync", "-a", "--delete", a + "/", servers.rsync_url()]),
            ]
            print(table(measure(cases, args.runs), cases[1].name, "S1n: unchanged replica over loopback"))
            print()
        finally:
            servers.close()

    if "S4" in scenarios:
        a4 = s4_source(a)
        dst = os.path.join(base, "B4")
        if not os.path.isdir(dst):
            subprocess.run(["cp", "-a", b, dst + ".tmp"], check=True)
            # B's state records the tree B mirrors (A); B4 mirrors A4 (see s4_source)
            shutil.rmtree(os.path.join(dst + ".tmp", ".mirror"), ignore_errors=True)
            os.rename(dst + ".tmp", dst)
        reset = restore_from(b, dst)
        reset()
        servers = Servers(args.workdir, dst, dst)
        try:
            net = ["--secret-file", servers.secret]
            local_cases = [
                Case("mirror sync A4 B4 (local)", MIRROR + ["sync", "--delete", a4, dst], prepare=reset),
                Case("mirror sync --no-fsync A4 B4 (local)", MIRROR + ["sync", "--delete", "--no-fsync", a4, dst],
                     prepare=reset),  # fmt: skip
                Case("rsync -a --delete A4/ B4/ (local)", ["rsync", "-a", "--delete", a4 + "/", dst + "/"], prepare=reset),
            ]
            net_cases = [
                Case("mirror sync A4 mirror://127.0.0.1/m", MIRROR + ["sync", "--delete", a4, servers.mirror_url(), *net],
                     prepare=reset),  # fmt: skip
                Case("mirror sync --no-fsync A4 mirror://127.0.0.1/m",
                     MIRROR + ["sync", "--delete", "--no-fsync", a4, servers.mirror_url(), *net], prepare=reset),
                Case("rsync -a --delete A4/ rsync://127.0.0.1/m/", ["rsync", "-a", "--delete", a4 + "/", servers.rsync_url()],
                     prepare=reset),  # fmt: skip
            ]
            results = measure(local_cases + net_cases, args.runs)
            for title, cases in (("S4: 100 modified, 10 created, 10 deleted (local)", local_cases),
                                 ("S4: the same over loopback", net_cases)):  # fmt: skip
                print(table({c.name: results[c.name] for c in cases}, cases[-1].name, title))
                print()
        finally:
            servers.close()

    if "S4f" in scenarios:
        s4_source(a)
        print(table(measure(s4_fixed_cases(base), args.runs), "rsync -a --delete A4f/ B4f/",
                    "S4f: S4's changed entries alone (no walk to speak of): each tool's fixed costs"))  # fmt: skip
        print()

    if "sparse" in scenarios:
        sparse_scenario(args.workdir, args.seed, max(1, args.runs // 2))

    if "S3" in scenarios:
        dst = os.path.join(base, "B3")
        prep = empty(dst, flush=True, cold=args.cold)
        prep()
        servers = Servers(args.workdir, dst, dst)
        try:
            cases = [
                Case("mirror sync A B3 (local)", MIRROR + ["sync", a, dst], prepare=prep),
                Case("mirror sync --no-fsync A B3 (local)", MIRROR + ["sync", "--no-fsync", a, dst], prepare=prep),
                Case("rsync -a A/ B3/ (local)", ["rsync", "-a", a + "/", dst + "/"], prepare=prep),
                Case("cp -a A/. B3/", ["cp", "-a", a + "/.", dst + "/"], prepare=prep),
                # Durable like mirror's copy: what the peers cost once their data is on disk.
                Case("rsync -a A/ B3/ && sync", ["sh", "-c", f"rsync -a '{a}/' '{dst}/' && sync"], prepare=prep),
                Case("cp -a A/. B3/ && sync", ["sh", "-c", f"cp -a '{a}/.' '{dst}/' && sync"], prepare=prep),
                Case("mirror sync A mirror://127.0.0.1/m", MIRROR + ["sync", a, servers.mirror_url(),
                                                                      "--secret-file", servers.secret], prepare=prep),  # fmt: skip
                Case("rsync -a A/ rsync://127.0.0.1/m/", ["rsync", "-a", a + "/", servers.rsync_url()], prepare=prep),
            ]
            results = measure(cases, max(1, args.runs // 2), warmup=0)
            print(table(results, "rsync -a A/ B3/ (local)", "S3: initial mirror into an empty replica"))
            ours = results["mirror sync A B3 (local)"]
            for peer in ("cp -a A/. B3/", "cp -a A/. B3/ && sync", "rsync -a A/ B3/ && sync"):
                print(f"\nmirror sync A B3 (local) / ({peer}): paired {paired_ratio(ours, results[peer]):.3f}", end="")
            print(f"\n\npage cache: {'dropped before every run' if args.cold else 'warm'}")
            print()
        finally:
            servers.close()
            shutil.rmtree(dst, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
