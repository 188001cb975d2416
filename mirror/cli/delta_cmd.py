"""Write to DELTA the ops that turn the file SIG describes into NEW.

Like ``rdiff delta``.  '-' reads SIG or NEW from stdin (not both) or writes DELTA to
stdout.  The delta carries the xxh3-128 digest of NEW, which ``mirror patch`` verifies.
"""

from __future__ import annotations

import logging

from .. import delta
from ..deltafmt import DEFAULT_MAX_BLOCKS, read_signature, write_delta
from ._files import check_one_stdin, open_input, write_output

_log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("signature", metavar="SIG", help="signature of the old file ('-' for stdin)")
    parser.add_argument("new", metavar="NEW", help="the new file ('-' for stdin)")
    parser.add_argument("delta", metavar="DELTA", help="the delta file to write ('-' for stdout)")
    parser.add_argument(
        "--max-blocks",
        type=int,
        default=DEFAULT_MAX_BLOCKS,
        metavar="N",
        help=f"refuse signatures of more blocks (default {DEFAULT_MAX_BLOCKS})",
    )


def run(args) -> int:
    check_one_stdin(args.signature, args.new)
    with open_input(args.signature) as stream:
        sig = read_signature(stream, max_blocks=args.max_blocks)
    with open_input(args.new) as new:
        digest, size = write_output(args.delta, lambda out: write_delta(delta.delta(sig, new), out))
    _log.info("delta: %d bytes of new file, digest %s", size, digest.hex())
    return 0
