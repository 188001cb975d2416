"""Demonstrate hamirror on a generated tree: copy it, change a few files, find exactly those."""

from __future__ import annotations

from ..demo import cleanup, run_demo
from ..errors import EXIT_ERROR, EXIT_OK
from ..itemize import escape_path


def add_arguments(parser):
    parser.add_argument("--dir", help="work in DIR instead of a temporary directory")
    parser.add_argument("--files", type=int, default=200, help="files in the generated tree (default 200)")
    parser.add_argument("--keep", action="store_true", help="keep the generated trees afterwards")


def run(args) -> int:
    result = run_demo(args.dir, args.files)
    print(f"hamirror demo: a {result.files}-file tree in {result.workdir}/primary, copied to .../replica")
    for step in result.steps:
        mark = "ok" if step.ok else "MISMATCH"
        print(f"\n== mirror diff, {step.title}: {len(step.found)} differences in {step.seconds * 1000:.1f} ms [{mark}]")
        for line in step.lines:
            print(f"   {line}")
        if not step.ok:
            print(f"   expected: {sorted(escape_path(p) for p in step.expected)}")
    print("\nall differences found exactly" if result.ok else "\nSOME DIFFERENCES WERE MISSED")
    if args.keep:
        print(f"trees kept in {result.workdir}")
    else:
        cleanup(result)
    return EXIT_OK if result.ok else EXIT_ERROR
