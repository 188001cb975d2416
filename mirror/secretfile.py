"""Shared-secret files, read by one rule for every ``mirror`` command and for ``hawrap``.

The rule is rsyncd's "strict modes" (and ssh's for private keys): a secret that group or
others can read is no secret, so such a file is refused before it is used, naming the file
and its mode.  The secret is the file's first line without surrounding whitespace; it must
be at least ``MIN_SECRET_BYTES`` long.  Every refusal is a usage error (exit 2): the
administrator fixes the file, nothing about the peer is learnt from it.
"""

from __future__ import annotations

import os
import stat

from .errors import UsageError

MIN_SECRET_BYTES = 16  # an HMAC-SHA256 key shorter than this is guessable offline
MAX_SECRET_BYTES = 4096  # read at most this much: a secret file is never large
HOW_TO_MAKE = "e.g. (umask 077; head -c 32 /dev/urandom | base64 > FILE)"


class SecretFileError(UsageError):
    """A secret file that cannot be used: unreadable, not a regular file, readable by group
    or others, owned by another user, too short or too long.  The message names the file."""


def secret_file_problem(st: os.stat_result) -> str | None:
    """What is wrong with a secret file's metadata, or None (the strict-modes rule)."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return (f"has mode {mode:04o}: group or others may access it (strict modes, like rsyncd's); "
                f"run chmod 600 on it")  # fmt: skip
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        return f"is owned by uid {st.st_uid}, not by this user (uid {euid}) or root"
    return None


def read_secret_file(path: str | bytes) -> bytes:
    """The shared secret held in ``path`` (its first line, stripped), or ``SecretFileError``."""
    shown = os.fsdecode(path)
    try:
        # O_NONBLOCK: a FIFO put in the secret's place must not hang the service.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise SecretFileError(f"secret file {shown}: cannot read it: {exc.strerror}") from None
    try:
        problem = secret_file_problem(os.fstat(fd))
        if problem:
            raise SecretFileError(f"secret file {shown} {problem}")
        data = os.read(fd, MAX_SECRET_BYTES + 2)
    except OSError as exc:
        raise SecretFileError(f"secret file {shown}: cannot read it: {exc.strerror}") from None
    finally:
        os.close(fd)
    first, newline, _ = data.partition(b"\n")
    if len(first) > MAX_SECRET_BYTES or (not newline and len(data) > MAX_SECRET_BYTES):
        raise SecretFileError(f"secret file {shown}: the first line is longer than {MAX_SECRET_BYTES} bytes")
    secret = first.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretFileError(f"secret file {shown}: the secret on its first line is {len(secret)} bytes; at least "
                              f"{MIN_SECRET_BYTES} are needed ({HOW_TO_MAKE})")  # fmt: skip
    return secret
