"""A live two-node mirror on this machine: a receiver on loopback, the daemon, a few edits
timed from the write to their arrival, a final checksum comparison.  Cleans up after."""

from __future__ import annotations

from ..demo import cleanup, run_demo
from ..errors import EXIT_ERROR, EXIT_OK


def add_arguments(parser):
    parser.add_argument("--dir", help="work in DIR instead of a temporary directory")
    parser.add_argument("--files", type=int, default=200, help="files in the generated tree (default 200)")
    parser.add_argument("--keep", action="store_true", help="keep the generated trees afterwards")


def run(args) -> int:
    print("hamirror demo: a primary tree mirrored live to a standby through a real receiver on loopback")
    result = run_demo(args.dir, args.files, say=lambda line: print(line, flush=True))
    if result.differences:
        print("  DIFFERENCES:")
        for line in result.differences:
            print(f"   {line}")
    else:
        print("  primary and standby are identical (every file's xxh3-128 compared)")
    st = result.status
    if st:
        print(f"summary: {st['sessions']} sessions, {st['files_sent']} files sent, {st['bytes_sent']} bytes on the wire, "
              f"latency p50 {st['latency_p50_ms']} ms / p99 {st['latency_p99_ms']} ms, {st['pending']} pending")
    print("demo passed" if result.ok else "DEMO FAILED")
    if args.keep:
        print(f"trees kept in {result.workdir}")
    else:
        cleanup(result)
    return EXIT_OK if result.ok else EXIT_ERROR
