"""Helpers shared by the subcommands: common options, warnings, JSON output."""

from __future__ import annotations

import argparse
import sys

from ..entry import ScanProblem
from ..errors import UsageError, display_path
from ..exclude import make_excluder, pattern_problem, read_pattern_file


def add_exclude_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="leave out paths matching PATTERN (rsync glob rules; repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--exclude-from", action="append", default=[], metavar="FILE",
        help="read exclude patterns from FILE, one per line",
    )  # fmt: skip


def excluder_from_args(args):
    patterns = [p.encode("utf-8", "surrogateescape") for p in args.exclude]
    for path in args.exclude_from:
        patterns.extend(read_pattern_file(path))
    problem = pattern_problem(patterns)
    if problem:
        raise UsageError(f"--exclude/--exclude-from: {problem}")
    return make_excluder(patterns)


def warn_problem(command: str, problem: ScanProblem, side: str = "") -> None:
    from ..itemize import escape_path

    where = f"{side}: " if side else ""
    print(f"mirror {command}: warning: {where}{escape_path(problem.path) or './'}: {problem.message}",
          file=sys.stderr)  # fmt: skip


def problem_json(problem: ScanProblem) -> dict:
    from ..itemize import escape_path

    return {"path": escape_path(problem.path) or "./", "errno": problem.errno, "message": problem.message}


def print_json(obj) -> None:
    import json

    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def path_arg(text: str) -> bytes:
    """Command-line paths as the bytes the user typed (argv is decoded with surrogateescape)."""
    return text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text


def show(path: bytes) -> str:
    return display_path(path)


def add_privilege_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """What a receiver lets senders create (``mirror.privileges``): nothing privileged unless told."""
    parser.add_argument("--allow-devices", action="store_true", help=f"accept device nodes in {what}")
    parser.add_argument("--allow-specials", action="store_true", help=f"accept FIFOs and sockets in {what}")
    parser.add_argument("--allow-setid", action="store_true", help=f"keep setuid/setgid bits of files in {what}")
    parser.add_argument("--keep-owners", action="store_true",
                        help=f"(as root) give files in {what} the sender's owners and groups")  # fmt: skip


def privileges_from_args(args):
    from ..privileges import Privileges

    return Privileges(devices=args.allow_devices, specials=args.allow_specials, setid=args.allow_setid,
                      owners=args.keep_owners)  # fmt: skip
