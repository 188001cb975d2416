"""Receive a sync on stdin/stdout (what `mirror sync SRC HOST:PATH` runs over ssh).

Not for interactive use: the protocol runs on standard input and output.  Like a `mirror
serve` module, the replica accepts no device node, FIFO or socket, keeps no setuid/setgid
bit and no owner unless told (--allow-devices, --allow-specials, --allow-setid,
--keep-owners; `mirror sync --remote-option=--keep-owners SRC HOST:PATH` passes them).
With --require-mount, PATH must be a mount point: with nothing mounted there (its disk did
not come up) the sync is refused (exit 25) and nothing is made there.
"""

from __future__ import annotations

import os
import sys

from ..apply import ModuleConfig
from ..errors import UsageError
from ..protocol import StreamTransport
from ..receiver import Receiver
from ..secretfile import read_secret_file
from ._common import add_privilege_arguments, privileges_from_args


def add_arguments(parser):
    parser.add_argument("path", help="the replica tree")
    parser.add_argument("--secret-file", metavar="FILE", help="require the sender to prove this shared secret")
    parser.add_argument("--lock-file", metavar="PATH", help="refuse writes while this mirroring lock exists")
    parser.add_argument("--state-dir", metavar="DIR", help="the replica's state dir (default PATH/.mirror)")
    add_privilege_arguments(parser, "the replica")
    parser.add_argument("--require-mount", action="store_true",
                        help="PATH is a mount point: refuse every session while nothing is mounted there")  # fmt: skip


def run(args) -> int:
    path = os.fsencode(args.path)
    # Made by the first session let in (mirror.apply): none is, with nothing mounted where
    # the replica's disk must be, and nothing is made on the disk under it.
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"{args.path} is not a directory")
    module = ModuleConfig(
        name="", path=os.path.abspath(path), secret=read_secret_file(args.secret_file) if args.secret_file else None,
        lock_file=os.fsencode(args.lock_file) if args.lock_file else None,
        state_dir=os.fsencode(args.state_dir) if args.state_dir else None, privileges=privileges_from_args(args),
        require_mount=args.require_mount,
    )  # fmt: skip
    # The protocol owns stdout: anything else printed there would corrupt it.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=1 << 20)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # Unbuffered: between sessions a read waits at most the sender's idle limit for the pipe.
    transport = StreamTransport(os.fdopen(os.dup(sys.stdin.fileno()), "rb", buffering=0), out,
                                peer="the sender (stdin)")  # fmt: skip
    Receiver(transport, {"": module}, peer="stdio", timeouts=(transport.set_read_timeout, None)).serve()
    return 0
