"""Any commands side by side, the last one the peer: e.g. two builds of hamirror and rsync.

    python -m benchmarks.side_by_side --runs 11 --reset "rsync -a --delete --exclude=/.mirror/ B/ B4/; sync" \\
        "OLD/bin/mirror sync --delete A4 B4" "NEW/bin/mirror sync --delete A4 B4" "rsync -a --delete A4/ B4/"

Each round runs every command once, in turn, with ``--reset`` (a shell command, untimed)
before each; one warm-up round is not counted.  Prints ``harness.table``: medians and the
paired ratio of each command to the last one.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess

from benchmarks.harness import Case, measure, table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--reset", help="a shell command run before every timed command, untimed")
    parser.add_argument("commands", nargs="+", help="each command as one string; the last is the peer")
    args = parser.parse_args(argv)
    reset = (lambda: subprocess.run(args.reset, shell=True, check=True)) if args.reset else None
    cases = [Case(command, shlex.split(command), prepare=reset) for command in args.commands]
    print(table(measure(cases, runs=args.runs), baseline=args.commands[-1]))


if __name__ == "__main__":
    main()
