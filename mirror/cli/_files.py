"""Opening the files of the delta commands, where ``-`` means stdin or stdout.

Outputs named by a path are replaced atomically (``mirror.atomicfile``): a failed command
leaves the previous file, or none, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import BinaryIO

from ..atomicfile import AtomicFile
from ..errors import UsageError, fs_path

STDIO = "-"


@contextlib.contextmanager
def open_input(path: str) -> Iterator[BinaryIO]:
    if path == STDIO:
        yield sys.stdin.buffer
        return
    with open(fs_path(path), "rb") as stream:
        yield stream


def write_output(path: str, write: Callable[[BinaryIO], object], *, mode: int = 0o644, durable: bool = False):
    """Call ``write(stream)`` on stdout or on a temporary file that replaces ``path`` on success."""
    if path == STDIO:
        result = write(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return result
    with AtomicFile(fs_path(path), mode, durable=durable) as stream:
        return write(stream)


def check_one_stdin(*paths: str) -> None:
    if sum(path == STDIO for path in paths) > 1:
        raise UsageError("only one input can be read from stdin ('-')")


def permission_bits(path: str, default: int = 0o644) -> int:
    try:
        return os.stat(fs_path(path)).st_mode & 0o7777
    except OSError:
        return default
