"""`mirror sync` over ssh against `rsync -a -e ssh`, side by side: a copy into an empty
replica and a sync of an unchanged one.

    python -m benchmarks.bench_ssh CORPUS [CORPUS...] [--runs 5]

A real OpenSSH server (``tests/sshd.py``) runs in a network namespace of its own, with its
loopback as the link (root only; the namespace is removed at the end).  Each run copies each
corpus once with each tool into a fresh replica, then syncs it once more unchanged; the tools
alternate within a run.  Printed: the median of each figure, and the median of the paired
ratios (mirror / rsync, same run).  mirror's copy makes every file durable (fsync or syncfs
before its rename); rsync's does not.  The cost of ssh's own connection is measured alone
(``ssh HOST true``), as is the remote command's start (``mirror receive --help``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.sshd import ssh_server, sshd_unavailable  # noqa: E402

PYTHON = sys.executable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    why = sshd_unavailable()
    if why:
        print(f"bench_ssh: {why}", file=sys.stderr)
        return 2
    ns = f"hmssh{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    work = tempfile.mkdtemp(prefix="bench-ssh-")
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        inside = ["ip", "netns", "exec", ns]
        with ssh_server(work, inside, "127.0.0.1") as server:
            env = server.env()
            ssh = os.path.join(server.bin, "ssh")

            def timed(*command: str) -> float:
                start = time.perf_counter()
                proc = subprocess.run([*inside, *command], env=env, capture_output=True)
                took = time.perf_counter() - start
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)}: {proc.stderr.decode(errors='replace')[-2000:]}")
                return took

            alone = {
                "ssh HOST true": [timed(ssh, server.host, "true") for _ in range(7)],
                "ssh HOST mirror receive --help": [
                    timed(ssh, server.host, f"{PYTHON} -m mirror receive --help") for _ in range(7)
                ],
            }
            for what, times in alone.items():
                print(f"{what}: median {statistics.median(times):.3f} s")
            for corpus in args.corpus:
                figures: dict[tuple[str, str], list[float]] = {}
                for _ in range(args.runs):
                    for tool in ("mirror", "rsync"):
                        dst = os.path.join(work, f"replica-{tool}")
                        shutil.rmtree(dst, ignore_errors=True)
                        if tool == "mirror":
                            command = [PYTHON, "-m", "mirror", "sync", "--remote-command", f"{PYTHON} -m mirror",
                                       corpus, f"{server.host}:{dst}"]  # fmt: skip
                        else:
                            command = ["rsync", "-a", "-e", ssh, corpus + "/", f"{server.host}:{dst}/"]
                        for case in ("copy", "unchanged"):
                            figures.setdefault((tool, case), []).append(timed(*command))
                print(f"\n{corpus}, {args.runs} runs")
                print("| case | mirror s | rsync s | mirror / rsync (paired median) |")
                print("|---|---:|---:|---:|")
                for case in ("copy", "unchanged"):
                    ours, theirs = figures[("mirror", case)], figures[("rsync", case)]
                    ratio = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
                    print(
                        f"| {case} | {statistics.median(ours):.3f} | {statistics.median(theirs):.3f} | {ratio:.2f} |"
                    )
    finally:
        subprocess.run(f"ip netns pids {ns} | xargs -r kill -9", shell=True)
        subprocess.run(["ip", "netns", "delete", ns])
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
