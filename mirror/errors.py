"""Every error the mirror engine raises on purpose, with the exit code the CLI maps it to.

Messages are written for the administrator reading them: they say what went wrong, where,
and when it helps, what to do.  The library raises these; only ``mirror.cli`` turns them
into exit codes.
"""

from __future__ import annotations

import errno
import os

# Exit codes shared by every ``mirror`` subcommand (documented in the README).
EXIT_OK = 0  # done; for ``diff``: the trees are identical
EXIT_DIFFERENT = 1  # ``diff``: differences found; ``sync``: partial, some files failed
EXIT_ERROR = 2  # the job could not be done (bad usage, bad input, I/O error)
EXIT_LOCKED = 3  # refused: a mirroring lock is present
EXIT_STALE_EPOCH = 4  # refused: the sender's epoch is older than the receiver's (fencing)
EXIT_AUTH = 5  # refused: authentication failed
EXIT_GUARD = (
    25  # refused to destroy the replica: not the source it mirrors, or deletions over the limits (rsync's 25)
)
EXIT_TIMEOUT = 30  # the peer stayed silent longer than --timeout (rsync's 30)
EXIT_CONNECT_TIMEOUT = 35  # no connection within --contimeout (rsync's 35)


class MirrorError(Exception):
    """Base class: something the user can act on.  ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_ERROR


class UsageError(MirrorError):
    """The command line or the configuration asks for something impossible."""


class ConfigError(MirrorError):
    """A configuration file is invalid; the message names the file and the key."""


class FastPathUnavailable(MirrorError):
    """The compiled extension is missing and ``MIRROR_REQUIRE_FAST=1`` forbids the slow path."""


class FormatError(MirrorError):
    """A stored or transmitted structure (manifest, signature, delta, frame) is malformed."""


class ManifestError(FormatError):
    """A manifest file is truncated, corrupted or of an unknown version."""


class LimitExceeded(FormatError):
    """A length, count or size read from input exceeds the limit allowed before allocation."""


class IntegrityError(MirrorError):
    """Data did not match the digest that was promised for it; nothing was committed."""


class ProtocolError(MirrorError):
    """The peer broke the wire protocol; the connection is closed."""


class ConnectionLost(ProtocolError):
    """The connection broke while we sent: the peer's own error, if it sent one first, says
    why."""


class PeerTimeout(ProtocolError):
    """The peer sent nothing (or took nothing) for longer than the I/O timeout: it is stopped,
    hung or gone.  The connection is closed."""

    exit_code = EXIT_TIMEOUT


class ConnectError(MirrorError):
    """The receiver could not be reached (refused, no route, no answer)."""


class ConnectTimeout(ConnectError):
    """No connection within the connect timeout."""

    exit_code = EXIT_CONNECT_TIMEOUT


class AuthError(MirrorError):
    """The peer failed the shared-secret challenge (or we did)."""

    exit_code = EXIT_AUTH


class LockedError(MirrorError):
    """A mirroring lock is present on this node or on the peer; nothing is sent or written."""

    exit_code = EXIT_LOCKED


class StaleEpochError(MirrorError):
    """The sender's tree epoch is older than the receiver's: a stale primary is fenced off.
    ``sent_epoch``: the epoch the refused session was sent at, where the sender knows it."""

    exit_code = EXIT_STALE_EPOCH
    sent_epoch: int | None = None


class SourceGuardError(MirrorError):
    """A deleting sync from a source that is not the tree the replica mirrors (unmounted, or
    another filesystem in its place): nothing was sent or deleted."""

    exit_code = EXIT_GUARD


class Cancelled(MirrorError):
    """The sync was asked to stop (SIGTERM): the file in flight was abandoned cleanly."""

    exit_code = 130


class StateDirError(MirrorError):
    """A tree's ``.mirror`` is not hamirror's state dir: leaving it out would hide the user's files."""


class UnsafePathError(MirrorError):
    """A path would leave the tree root (``..``, absolute, NUL, empty component, symlink)."""


def os_error_message(err: OSError, path: bytes | str | None = None) -> str:
    """``'<path>: <strerror>'`` with the path decoded losslessly for display."""
    where = path if path is not None else err.filename
    text = err.strerror or str(err)
    if where is None:
        return text
    return f"{display_path(where)}: {text}"


def failure_reason(exc: BaseException) -> str:
    """How a file that failed is described to the other side: ``'ENOSPC: No space left on
    device'`` (the symbolic code lets a sender tell a full disk from a vanished file)."""
    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        return f"{code}: {exc.strerror or exc}"
    return str(exc)


def display_path(path: bytes | str) -> str:
    """A path for humans: bytes that are not UTF-8 are shown as backslash escapes."""
    if isinstance(path, str):
        return path
    return path.decode("utf-8", "backslashreplace")


def fs_path(path: bytes | str) -> bytes:
    """Any path-like argument as the bytes the kernel sees."""
    return os.fsencode(path)
