"""The ``mirror`` console script (and ``python -m mirror``): a head start, then the CLI.

Before the command-line code loads, a local ``mirror sync`` or ``mirror diff`` starts the
walk of its source tree (``mirror.earlywalk``), reading no more of the command line than
which argument is the source.  The CLI then runs as it always does.

At the end, once the output is flushed and no other thread is left to finish, the process
leaves without the interpreter's teardown: freeing every module costs about 7 ms, a few
per cent of a small sync.
"""

from __future__ import annotations

import os
import sys
import threading

# The options of these commands that take a value, as their argparse definitions say
# (tests/test_launch.py checks this table against them).
VALUE_OPTIONS = {
    "sync": frozenset({"--secret-file", "--bwlimit", "--rsh", "--remote-command", "--lock-file",
                       "--dst-lock-file", "--state-dir", "--exclude", "--exclude-from", "--max-delete",
                       "-M", "--remote-option", "--timeout", "--contimeout"}),  # fmt: skip
    "diff": frozenset({"--state-dir", "--exclude", "--exclude-from"}),
}


def source_argument(argv: list[str]) -> str | None:
    """The SRC of ``mirror sync|diff [options] SRC DST``, or None if anything is unclear.

    Both commands take exactly two positional arguments, so a misread option (an
    abbreviation of one that takes a value) shows as a third and nothing is guessed."""
    if not argv or argv[0] not in VALUE_OPTIONS:
        return None
    value_options = VALUE_OPTIONS[argv[0]]
    positionals = []
    args = iter(argv[1:])
    for arg in args:
        if arg == "--":
            return None
        if arg.startswith("-") and arg != "-":
            if arg in value_options:
                next(args, None)
            continue
        positionals.append(arg)
    return positionals[0] if len(positionals) == 2 else None


def main() -> None:
    argv = sys.argv[1:]
    from . import earlywalk

    source = source_argument(argv)
    if source is not None:
        root = os.fsencode(source)
        if os.path.isdir(root):
            # What the CLI does first for every command, done before the walk's thread
            # exists: growing the descriptor table of a threaded process waits for an RCU
            # grace period (6-12 ms here; see mirror.fdtable).
            from .fdtable import raise_limit, reserve

            raise_limit()
            reserve()
            earlywalk.start(root)
    try:
        from .cli import main as cli_main

        code = cli_main(argv)
    finally:
        earlywalk.discard()
    _exit(code)


def _exit(code: int | None) -> None:
    code = code or 0
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)  # the interpreter waits for them, as it always does
    try:
        if "logging" in sys.modules:
            sys.modules["logging"].shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        sys.exit(code)  # e.g. a closed pipe: the ordinary exit reports it
    os._exit(code)
