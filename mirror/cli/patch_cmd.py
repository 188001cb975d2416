"""Rebuild the new file from BASIS and DELTA into OUT, and verify it.

Like ``rdiff patch``.  '-' reads DELTA from stdin or writes OUT to stdout (BASIS must be a
file: copies seek in it).  OUT is written to a temporary file and renamed into place only
after the whole-file digest carried in the delta matched; on a mismatch or a corrupt,
truncated or hostile delta the command exits non-zero and leaves no OUT behind.  (Written to
stdout, a failed patch cannot be taken back: the exit status tells.)
"""

from __future__ import annotations

import logging

from ..deltafmt import patch_stream
from ..errors import UsageError, fs_path
from ._files import STDIO, open_input, permission_bits, write_output

_log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("basis", metavar="BASIS", help="the old file the signature was made from")
    parser.add_argument("delta", metavar="DELTA", help="the delta file ('-' for stdin)")
    parser.add_argument("out", metavar="OUT", help="the file to write ('-' for stdout)")
    parser.add_argument(
        "--fsync", action="store_true", help="fsync OUT and its directory before returning (crash-durable)"
    )


def run(args) -> int:
    if args.basis == STDIO:
        raise UsageError("BASIS cannot be stdin: patching seeks in it")
    with open(fs_path(args.basis), "rb") as basis, open_input(args.delta) as delta:
        digest, size = write_output(
            args.out,
            lambda out: patch_stream(basis, delta, out),
            mode=permission_bits(args.basis),
            durable=args.fsync,
        )
    _log.info("patch: wrote %d bytes, digest %s verified", size, digest.hex())
    return 0
