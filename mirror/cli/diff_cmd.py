"""Compare two trees and print one line per difference, like `rsync -n -i` (see README).

SRC and DST are directories or manifests saved by `mirror scan --save`.  The two trees are
scanned at once.  Quick check by size and mtime; --checksum compares content digests,
cached in each tree's state dir (DIR/.mirror, or --state-dir) so an unchanged tree costs a
stat per file the next time.

Exit status: 0 identical, 1 different, 2 error or comparison incomplete (an entry could
not be read, or vanished during the scan: each is named on stderr).
"""

from __future__ import annotations

import sys

from ..errors import EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK
from ..treescan import TreeScan
from ._common import (
    add_exclude_arguments,
    excluder_from_args,
    path_arg,
    print_json,
    problem_json,
    warn_problem,
)


def add_arguments(parser):
    parser.add_argument("src", help="source tree (or saved manifest)")
    parser.add_argument("dst", help="destination tree (or saved manifest)")
    parser.add_argument("--checksum", "-c", action="store_true",
                        help="compare file contents by xxh3-128 digest, not by size and mtime")
    parser.add_argument("--json", action="store_true", help="print the differences as JSON")
    parser.add_argument("--no-owner", action="store_true", help="do not compare owner and group")
    parser.add_argument("--no-dir-times", action="store_true", help="do not compare directory mtimes")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="keep both trees' digest caches in DIR instead of each tree's .mirror/")
    parser.add_argument("--no-cache", action="store_true", help="neither use nor update the digest cache")
    add_exclude_arguments(parser)


def run(args) -> int:
    excluder = excluder_from_args(args)
    state_dir = path_arg(args.state_dir) if args.state_dir else None
    sides = []
    for text in (args.src, args.dst):
        sides.append(TreeScan(path_arg(text), excluder=excluder, checksum=args.checksum,
                              state_dir=state_dir, use_cache=not args.no_cache))
    src, dst = sides
    for side in sides:
        side.start()
    # Imported only now: both trees are being scanned while the comparison code loads.
    from ..compare import CompareOptions, CompareSummary, compare_trees, root_entry
    from ..itemize import change_json, item_lines

    options = CompareOptions(checksum=args.checksum, owner=not args.no_owner, dir_times=not args.no_dir_times)
    summary = CompareSummary()
    roots = [None if side.is_manifest else root_entry(side.root, side.problems) for side in sides]
    changes = compare_trees(src, dst, options, summary, roots[0], roots[1])
    out = sys.stdout
    collected = []
    for change in changes:
        if args.json:
            collected.append(change_json(change))
        else:
            for line in item_lines(change):
                out.write(line)
                out.write("\n")
    out.flush()
    for side, label in ((src, "src"), (dst, "dst")):
        for problem in side.problems:
            if not args.json:
                warn_problem("diff", problem, label)
    problems = src.problems + dst.problems
    if args.json:
        print_json({
            "identical": summary.identical and not problems,
            "complete": not problems,
            "counts": summary.counts,
            "changes": collected,
            "problems": {"src": [problem_json(p) for p in src.problems],
                         "dst": [problem_json(p) for p in dst.problems]},
            "seconds": {"src_scan": round(src.stats.seconds, 6), "dst_scan": round(dst.stats.seconds, 6)},
        })  # fmt: skip
    if problems:
        print(f"mirror diff: {len(problems)} entries could not be compared; the comparison is incomplete",
              file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK if summary.identical else EXIT_DIFFERENT


