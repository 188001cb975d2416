"""The ``mirror`` command: parse arguments, call the library, print, map errors to exit codes.

Subcommands live in their own modules and are imported only when chosen, so a quick
``mirror diff`` does not pay for importing the daemon.  Each module provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import EXIT_ERROR, MirrorError, os_error_message

# name -> (module, one-line help).  Keep in the order a newcomer would read them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mirror.cli.demo_cmd", "run a self-contained demonstration on a generated tree"),
    "scan": ("mirror.cli.scan_cmd", "walk a tree and summarise it (or save its manifest)"),
    "diff": ("mirror.cli.diff_cmd", "compare two trees and itemise every difference"),
    "sync": ("mirror.cli.sync_cmd", "mirror a tree to a directory, a mirror:// receiver or HOST:PATH"),
    "serve": ("mirror.cli.serve_cmd", "serve modules to mirror sync clients (mirror://)"),
    "receive": ("mirror.cli.receive_cmd", "receive a sync on stdin/stdout (run by sync over ssh)"),
    "daemon": ("mirror.cli.daemon_cmd", "mirror trees live (inotify, journal, one persistent connection)"),
    "status": ("mirror.cli.status_cmd", "show what the live daemon is doing"),
    "signature": ("mirror.cli.signature_cmd", "write the block signature of a file (like rdiff signature)"),
    "delta": ("mirror.cli.delta_cmd", "write the delta from a signature to a new file (like rdiff delta)"),
    "patch": ("mirror.cli.patch_cmd", "rebuild a file from basis + delta and verify it (like rdiff patch)"),
    "lock": ("mirror.cli.lock_cmd", "acquire, release or show a mirroring lock file"),
    "epoch": ("mirror.cli.epoch_cmd", "show or raise a tree's owner epoch (fencing)"),
}

_log = logging.getLogger("mirror")
_DESCRIPTION = "hamirror: fast, verified file mirroring for two-node clusters."
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool killed by it


def _terminal_columns() -> int:
    """As ``shutil.get_terminal_size``: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 80
    return columns


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's own, sized without importing ``shutil``: argparse makes a formatter for
    every option it adds, and shutil brings the compression modules into every run."""

    def __init__(self, prog: str, **kwargs):
        kwargs.setdefault("width", _terminal_columns() - 2)  # argparse keeps two columns free
        super().__init__(prog, **kwargs)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror",
        description=_DESCRIPTION,
        formatter_class=_HelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\nRun 'mirror COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", nargs="?", help=argparse.SUPPRESS)
    return parser


def _command_parser(name: str, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"mirror {name}",
        description=(module.__doc__ or COMMANDS[name][1]).strip(),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    module.add_arguments(parser)
    return parser


def full_parser() -> argparse.ArgumentParser:
    """Every command's parser under one: what the man page and shell completions are made
    from (``packaging/gen_cli_docs.py``).  ``mirror`` itself parses lazily, one command's
    parser at a time."""
    parser = argparse.ArgumentParser(prog="mirror", description=_DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_, description=(module.__doc__ or help_).strip(),
                           formatter_class=_HelpFormatter)  # fmt: skip
        p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
        p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
        module.add_arguments(p)
    return parser


def setup_logging(verbose: int, quiet: bool) -> None:
    from ..logsetup import configure_logging

    configure_logging("mirror", verbose, quiet)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top = _top_parser()
        args = top.parse_args(argv[:1])
        if args.version:
            from importlib.metadata import version

            print(f"mirror (hamirror) {version('hamirror')}")
            return 0
        if args.command:
            top.print_usage(sys.stderr)
            print(f"mirror: unknown command {args.command!r}", file=sys.stderr)
        else:
            top.print_help(sys.stderr)
        return EXIT_ERROR
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = _command_parser(name, module)
    args = parser.parse_args(argv[1:])
    # What was given, not defaulted: an option that --config would silently override is refused.
    args.given_options = {
        action.option_strings[-1]
        for action in parser._actions
        if action.option_strings and getattr(args, action.dest, None) != action.default
    } - {"--help", "--verbose", "--quiet", "--config", "--check"}
    setup_logging(args.verbose, args.quiet)
    from ..startup import raise_limit, reserve_descriptors

    raise_limit()  # a deep tree, a server's many sessions (see mirror/startup.py)
    reserve_descriptors()  # while the process is one thread
    try:
        code = module.run(args)
        sys.stdout.flush()  # here, where a closed pipe is handled, not at exit
        return code
    except BrokenPipeError:
        # `mirror diff | head`: the reader has what it wanted.  Quietly, like a tool killed by
        # SIGPIPE (the shell's 141); stdout goes to /dev/null so the exit flush cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except MirrorError as exc:
        print(f"mirror {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"mirror {name}: error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"mirror {name}: interrupted", file=sys.stderr)
        return 130
