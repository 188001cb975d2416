"""Walk a tree and summarise it: entries by kind, bytes, seconds.

With --save FILE the scan is written as a manifest (with --checksum, including the
xxh3-128 digest of every regular file), which `mirror diff` accepts in place of a tree.
"""

from __future__ import annotations

import sys

from ..errors import EXIT_ERROR, EXIT_OK
from ..manifest import ManifestHeader, ManifestWriter, now_ns
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
    parser.add_argument("dir", help="the tree to scan")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--save", metavar="FILE", help="write the scan as a manifest to FILE (atomically)")
    parser.add_argument("--checksum", "-c", action="store_true", help="also compute content digests (cached)")
    parser.add_argument("--state-dir", metavar="DIR", help="where the digest cache lives (default DIR/.mirror)")
    add_exclude_arguments(parser)


def run(args) -> int:
    root = path_arg(args.dir)
    tree = TreeScan(
        root, excluder=excluder_from_args(args), checksum=args.checksum,
        state_dir=path_arg(args.state_dir) if args.state_dir else None, background=False,
    )  # fmt: skip
    writer = None
    if args.save:
        header = ManifestHeader(root=root, scanned_at_ns=now_ns(), checksum=args.checksum)
        writer = ManifestWriter(path_arg(args.save), header)
    try:
        for listing in tree:
            if writer is not None:
                writer.add(listing)
            for problem in listing.problems:
                if not args.json:
                    warn_problem("scan", problem)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.commit()
    stats = tree.stats
    if args.json:
        print_json({
            "root": args.dir,
            "entries": stats.entries,
            "by_kind": stats.by_kind(),
            "directories_listed": stats.dirs,
            "file_bytes": stats.file_bytes,
            "digests": stats.digests,
            "digest_cache": stats.cache,
            "seconds": round(stats.seconds, 6),
            "complete": not tree.problems,
            "problems": [problem_json(p) for p in tree.problems],
        })  # fmt: skip
    else:
        kinds = ", ".join(f"{n} {k}" for k, n in stats.by_kind().items() if n)
        print(f"{args.dir}: {stats.entries} entries ({kinds or 'empty'})")
        print(f"  {stats.file_bytes} bytes in regular files ({stats.file_bytes / 1e9:.3f} GB)")
        if args.checksum:
            print(f"  {stats.digests} digests (cache: {stats.cache})")
        print(f"  scanned in {stats.seconds:.3f} s")
        if tree.problems:
            print(f"  {len(tree.problems)} entries could not be scanned (see warnings)", file=sys.stderr)
    return EXIT_ERROR if tree.problems else EXIT_OK
