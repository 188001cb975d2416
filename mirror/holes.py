"""Writing a file that keeps its holes: a block of zeros is left unwritten, so it reads as
zeros and takes no space.

A receiver writes a file whose sender says it has holes (a VM image, a database file: fewer
blocks than its length) through ``HoleWriter``: whatever its content arrives as (literal
data, or blocks of the replica's own copy for a delta), each aligned block of zeros stays a
hole in the new file, as ``cp --sparse=auto`` and ``rsync -S`` leave them.
"""

from __future__ import annotations

import errno
import os

BLOCK = 4096  # the usual file-system block (ext4, xfs, btrfs, tmpfs pages): holes come in whole blocks
_ZEROS = bytes(BLOCK)


class HoleWriter:
    """``write`` for the new, empty file ``fd``: what ``data`` holds is written at the current
    position but for its aligned blocks of zeros, skipped; ``skip`` leaves a run unwritten;
    ``finish()`` gives the file its length (a hole at the end is only a length)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.pos = 0

    def write(self, data) -> int:
        with memoryview(data) as view:
            raw = data if type(data) is bytes else view.tobytes()  # bytes compare in C (startswith)
            n = len(view)
            start = self.pos
            first = min(n, -start % BLOCK)  # up to the first block boundary: written as it is
            pending = 0  # view[pending:at] waits to be written
            at = first
            while at + BLOCK <= n:
                if raw.startswith(_ZEROS, at):
                    if pending < at:
                        self._write(view[pending:at], start + pending)
                    pending = at + BLOCK
                at += BLOCK
            self._write(view[pending:n], start + pending)
        self.pos += n
        return n

    def skip(self, length: int) -> None:
        """Leave ``length`` bytes from the current position a hole (a sender's ``hole``)."""
        self.pos += length

    def _write(self, view: memoryview, offset: int) -> None:
        while view:
            written = os.pwrite(self.fd, view, offset)
            if not written:
                raise OSError(errno.EIO, "a write wrote nothing")
            view, offset = view[written:], offset + written

    def finish(self) -> None:
        os.ftruncate(self.fd, self.pos)
