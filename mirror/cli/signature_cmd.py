"""Write the signature of BASIS to SIG: the block sums a delta against BASIS is computed from.

Like ``rdiff signature``.  '-' reads BASIS from stdin or writes SIG to stdout.  The block
size defaults to the rule in mirror/delta.py (about 4 KiB for files over 1 MiB, to keep
signature + delta bytes small); the strong-hash seed is random per signature.
"""

from __future__ import annotations

import logging

from .. import delta
from ..deltafmt import write_signature
from ..errors import UsageError
from ._files import open_input, write_output

_log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("basis", metavar="BASIS", help="the old file ('-' for stdin)")
    parser.add_argument("signature", metavar="SIG", help="the signature file to write ('-' for stdout)")
    parser.add_argument("--block-size", type=int, metavar="BYTES", help="block size (default: by file size)")
    parser.add_argument("--strong-len", type=int, metavar="BYTES", help="strong hash bytes per block (1-16)")


def run(args) -> int:
    with open_input(args.basis) as basis:
        try:
            sig = delta.signature(basis, block_size=args.block_size, strong_len=args.strong_len)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    size = write_output(args.signature, lambda out: write_signature(sig, out))
    _log.info(
        "signature: %d bytes of basis in %d blocks of %d bytes, %d bytes written",
        sig.basis_size,
        sig.block_count,
        sig.block_size,
        size,
    )
    return 0
