"""Mirror SRC to DST: a local directory, mirror://HOST:PORT/MODULE[/SUBPATH], or HOST:PATH.

Only what differs is sent: new and changed files (to a receiver, large ones as
rsync-style deltas against the replica's copy), directories, symlinks, hard links, devices, attributes; with
--delete, what is gone from SRC is removed from DST, after the new content is in place.
Every file is verified against SRC's xxh3-128 digest before it replaces the old one.

Exit status: 0 done, 1 partial (some files failed; each is named on stderr), 2 error,
3 a mirroring lock is present, 4 the replica has a newer epoch (fenced), 5 auth failed,
25 refused to destroy the replica: with --delete, a source that is not the tree the replica
mirrors (unmounted?), a sync that would empty the replica or delete more than --max-delete,
a replica whose disk is not mounted (the mount point it was last found under, or a local
DST itself with --dst-require-mount),
30 the receiver stayed silent longer than --timeout, 35 no connection within --contimeout.
"""

from __future__ import annotations

import sys

from ..errors import UsageError
from ..secretfile import read_secret_file
from ._common import add_exclude_arguments, excluder_from_args, path_arg

_UNITS = {"": 1024, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_rate(text: str) -> int:
    """``--bwlimit``: bytes per second; a bare number is KiB/s, like rsync.  A bad value is a
    usage error (argparse's: exit 2, the usage line, no traceback)."""
    import argparse
    import math

    t = text.strip().upper().removesuffix("/S").removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    number = t[:-1] if unit else t
    try:
        amount = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} (examples: 500, 20M, 1G)") from None
    if not math.isfinite(amount) or amount <= 0 or int(amount * _UNITS[unit]) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive rate, got {text!r} (examples: 500, 20M, 1G)")
    return int(amount * _UNITS[unit])


def add_arguments(parser):
    import argparse

    parser.add_argument("src", help="the source tree")
    parser.add_argument("dst", help="destination: DIR, mirror://HOST:PORT/MODULE[/SUBPATH] or HOST:PATH")
    parser.add_argument("--delete", action="store_true", help="delete what is not in SRC from DST")
    parser.add_argument("--mkpath", action="store_true", help="create DST's missing parent directories (local DST)")
    parser.add_argument("--checksum", "-c", action="store_true", help="compare content by digest, not size+mtime")
    parser.add_argument("-n", "--dry-run", action="store_true", help="only show what would change")
    parser.add_argument("-i", "--itemize-changes", action="store_true", help="print each change (as mirror diff)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    parser.add_argument("--stats", action="store_true", help="print transfer statistics at the end")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--secret-file", metavar="F", help="shared secret for mirror:// (first line of F)")
    parser.add_argument("--bwlimit", metavar="RATE", type=parse_rate, help="limit bandwidth (KiB/s, or 20M, 1G)")
    parser.add_argument("--rsh", default="ssh -T", help="remote shell for HOST:PATH (default 'ssh -T')")
    parser.add_argument("--remote-command", default="mirror", help="the mirror command on the remote host")
    parser.add_argument("-M", "--remote-option", action="append", default=[], metavar="OPT",
                        help="HOST:PATH: an option of the remote `mirror receive` (e.g. --remote-option=--keep-owners)")
    parser.add_argument("--lock-file", metavar="PATH", help="mirroring lock: refuse to send while PATH exists")
    parser.add_argument("--dst-lock-file", metavar="PATH", help="local DST only: the receiving side's lock file")
    parser.add_argument("--dst-require-mount", action=argparse.BooleanOptionalAction,
                        help="local DST only: DST must be a mount point; with nothing mounted there (its disk did "
                             "not come up) the sync writes nothing and exits 25. Without it, the same holds for "
                             "the mount point DST was last found under (remembered in SRC's state dir; a remote "
                             "DST's as its receiver tells it); --no-dst-require-mount: write into DST as it is, "
                             "and forget that")  # fmt: skip
    parser.add_argument("--state-dir", metavar="DIR", help="SRC's state dir (epoch, digest cache)")
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync on the receiver (tests, scratch copies)")
    parser.add_argument("--journal-seq", type=count_arg, metavar="N",
                        help="mirror://: the source's journal sequence this sync covers (its daemon stopped, "
                             "nothing journaled since): a complete sync has the receiver record it as applied")
    add_timeout_arguments(parser)
    parser.add_argument("--max-delete", type=count_arg, metavar="N",
                        help="with --delete: a sync that would delete more than N entries deletes none (exit 25)")
    parser.add_argument("--allow-mass-delete", action="store_true",
                        help="with --delete: let a sync empty the replica, or run from a source that is not the "
                             "tree the replica mirrors (an unmounted or replaced source), and record it")
    add_exclude_arguments(parser)


def run(args) -> int:
    from ..transfer import sync

    excluder = excluder_from_args(args)
    patterns = [p.text for p in excluder.patterns] if excluder else []
    itemize = (args.itemize_changes or args.dry_run) and not args.json
    names = args.verbose > 0 and not itemize and not args.json  # -v: rsync's list of names
    show = itemize or names

    def on_change(change):
        if progress is not None:
            progress.found(change)
        if show:
            from ..itemize import item_lines, name_lines

            for line in (item_lines if itemize else name_lines)(change):
                sys.stdout.write(line + "\n")

    _check_destination_parent(args, patterns)
    secret = read_secret_file(args.secret_file) if args.secret_file else None
    progress = _Progress() if args.progress else None
    try:
        result = sync(
            path_arg(args.src), path_arg(args.dst), delete=args.delete, checksum=args.checksum,
            dry_run=args.dry_run, excludes=patterns, secret=secret, lock_file=args.lock_file,
            dst_lock_file=args.dst_lock_file, dst_require_mount=args.dst_require_mount, state_dir=args.state_dir,
            bwlimit=args.bwlimit, rsh=args.rsh,
            remote_command=args.remote_command, remote_options=args.remote_option, fsync=not args.no_fsync, on_change=on_change if show or progress else None,
            on_progress=progress.advance if progress else None,
            keep_changes=args.json,  # only --json prints them at the end; -i prints each as it goes
            max_delete=args.max_delete, allow_mass_delete=args.allow_mass_delete, timeout=args.timeout,
            contimeout=args.contimeout,
            journal={"seq": args.journal_seq, "base": None, "journal": ""} if args.journal_seq else None,
        )  # fmt: skip
    finally:
        if progress:
            progress.close()
    for path, reason in result.failed:
        print(f"mirror sync: failed: {_show(path) or './'}: {reason}", file=sys.stderr)  # the root: as -i shows it
    for problem in result.problems:
        print(f"mirror sync: warning: {_show(problem.path) or './'}: {problem.message}", file=sys.stderr)  # ./: the root
    s = result.stats
    if args.json:
        from ..itemize import change_json
        from ._common import print_json

        print_json({
            "ok": result.ok, "dry_run": result.dry_run, "deletions_refused": result.deletions_refused,
            "changes": [change_json(c) for c in result.changes],
            "failed": [{"path": _show(p), "reason": r} for p, r in result.failed],
            "problems": [{"path": _show(p.path) or "./", "message": p.message} for p in result.problems],
            "stats": {
                "files_seen": s.files_seen, "files_sent": s.files_sent, "files_delta": s.files_delta,
                "other_changes": s.other_changes, "deleted": s.deleted, "literal_bytes": s.literal_bytes,
                "matched_bytes": s.matched_bytes, "size_of_sent_files": s.size_of_sent_files,
                "wire_sent": s.wire_sent, "wire_received": s.wire_received, "speedup": round(s.speedup, 2),
                "seconds": round(s.seconds, 6),
            },
        })  # fmt: skip
    elif names:
        print(f"sent {s.wire_sent:,} bytes  received {s.wire_received:,} bytes  "
              f"{s.files_sent} files sent, {s.deleted} deleted  speedup {s.speedup:.2f}")  # fmt: skip
    if args.stats and not args.json:
        print(f"files: {s.files_seen} seen, {s.files_sent} sent ({s.files_delta} as deltas), "
              f"{s.other_changes} other changes, {s.deleted} deleted")
        print(f"bytes: {s.literal_bytes} literal, {s.matched_bytes} matched from the replica, "
              f"{s.wire_sent} sent on the wire, {s.wire_received} received")
        print(f"speedup: {s.speedup:.2f}   time: {s.seconds:.3f} s")
    if result.deletions_refused:
        print(f"mirror sync: deletions refused: {result.deletions_refused}", file=sys.stderr)
    if result.failed or result.problems:
        print(f"mirror sync: partial: {len(result.failed)} files failed, {len(result.problems)} could not be read",
              file=sys.stderr)  # fmt: skip
    return result.exit_code


def add_timeout_arguments(parser) -> None:
    from ..transfer import DEFAULT_CONTIMEOUT, DEFAULT_TIMEOUT

    parser.add_argument("--timeout", type=seconds_arg, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"end when the receiver stays silent S seconds (default {DEFAULT_TIMEOUT:g}; 0: never)")
    parser.add_argument("--contimeout", type=seconds_arg, default=DEFAULT_CONTIMEOUT, metavar="S",
                        help=f"give up connecting to mirror:// after S seconds (default {DEFAULT_CONTIMEOUT:g})")


def seconds_arg(text: str, unit: str = "seconds") -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected {unit} (0 or more), got {text!r}")
    return value


def milliseconds_arg(text: str) -> float:
    return seconds_arg(text, "milliseconds")


def count_arg(text: str) -> int:
    """``--max-delete N``: a number of entries, 0 or more."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of entries (0 or more), got {text!r}")
    return value


def _check_destination_parent(args, excludes) -> None:
    """rsync's rule: DST itself may be created, not the directories above it, unless --mkpath
    (a typo in a path must not grow a new tree somewhere)."""
    import os

    from ..overlap import local_replica_problem
    from ..transfer import parse_destination

    destination = parse_destination(path_arg(args.dst))
    if destination.kind != "local" or args.dst_require_mount:  # a mount point's parent is there, or it is refused
        return
    parent = os.path.dirname(os.path.abspath(destination.path.rstrip(b"/") or b"/"))
    if os.path.isdir(parent) or not os.path.isdir(path_arg(args.src)):
        return  # the connection checks the replica's disk before it makes DST (and says a source is missing)
    from ..replicadisk import check_local_replica
    from ..statedir import resolve_state_dir

    # An unmounted disk is told as such, before --mkpath makes anything on the disk below.
    check_local_replica(resolve_state_dir(path_arg(args.src), path_arg(args.state_dir) if args.state_dir else None),
                       destination.path, None, record=False)  # fmt: skip
    state_dir = path_arg(args.state_dir) if args.state_dir else None
    locks = [path_arg(lock) for lock in (args.lock_file, args.dst_lock_file) if lock]
    if problem := local_replica_problem(path_arg(args.src), destination.path, excludes, state_dir, locks):
        raise UsageError(problem)  # before --mkpath makes anything
    if not args.mkpath:
        raise UsageError(f"{_show(destination.path)}: its parent directory {_show(parent)} does not exist "
                         "(--mkpath creates it)")  # fmt: skip
    if not args.dry_run:
        from ..atomicfile import make_dirs

        make_dirs(parent)


def _show(path: bytes) -> str:
    from ..itemize import escape_path

    return escape_path(path)


class _Progress:
    """``--progress``: bytes and files sent of those found to send so far, percentage, rate and
    ETA, on stderr.  The trees stream (compared while they are scanned), so the total grows
    until the scan ends, as with rsync's incremental recursion.  On a terminal a rich bar;
    elsewhere (a log, a pipe) a plain line at most once a second, and one at the end."""

    PLAIN_EVERY = 1.0

    def __init__(self, stream=None):
        import time

        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.done_bytes = self.done_files = 0
        self.total_bytes = self.total_files = 0
        self._last_line = 0.0
        self._bar = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(TextColumn("mirror sync"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TextColumn("{task.fields[files]}"), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=Console(file=self.stream), transient=True)  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task("sync", total=0, files="")

    def found(self, change) -> None:
        """A change planned: a file whose content will be sent adds to the total."""
        from ..compare import METADATA, REMOVED
        from ..entry import Kind

        src = change.src
        if change.change in (METADATA, REMOVED) or src is None or src.kind != Kind.FILE or change.link_to is not None:
            return
        self.total_bytes += src.size
        self.total_files += 1
        self._update()

    def advance(self, size: int) -> None:
        self.done_bytes += size
        self.done_files += 1
        self._update()

    def _update(self, final: bool = False) -> None:
        import time

        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done_bytes, total=max(self.total_bytes, self.done_bytes),
                             files=f"{self.done_files}/{self.total_files} files")  # fmt: skip
            return
        if final or now - self._last_line >= self.PLAIN_EVERY:
            self._last_line = now
            self.stream.write(self.line(now - self.started, final) + "\n")
            self.stream.flush()

    def line(self, elapsed: float, final: bool = False) -> str:
        total = max(self.total_bytes, self.done_bytes)
        percent = 100.0 * self.done_bytes / total if total else 100.0
        rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
        left = total - self.done_bytes
        eta = "0:00:00" if not left else (_clock(left / rate) if rate else "-:--:--")
        return (f"mirror sync: {_size(self.done_bytes)} of {_size(total)}{'' if final else ' found so far'} "
                f"({percent:.0f}%), {self.done_files}/{self.total_files} files, {_size(rate)}/s, "
                f"{'done in ' + _clock(elapsed) if final else 'ETA ' + eta}")  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self._update(final=True)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
