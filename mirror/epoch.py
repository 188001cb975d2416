"""A tree's owner epoch: it rises on every takeover and fences off a stale primary.

The epoch lives in the tree's state dir (``<root>/.mirror/epoch`` by default) as a decimal
number on one line.  It only ever rises: ``bump_epoch`` on a takeover, ``observe_epoch`` when
a receiver sees a sender with a newer one.  Each change is written atomically and fsynced,
under an advisory lock so that two concurrent bumps give two different epochs; on a full
file system it is rewritten in place (``atomicfile.write_record``), so that a takeover can
still fence a tree whose disk is full.

A missing file means epoch 0 (a tree that never had an owner).  A file that exists but is
not a number is an error: silently treating it as 0 would let a stale primary through.
A replica's epoch as a running process knows it (``fencing_epoch``) is also never below what
it has read or recorded there: the file removed under a server (with its state dir, say)
does not open the door to a former primary.
"""

from __future__ import annotations

import logging
import os
import re
import threading

from .atomicfile import write_record
from .errors import FormatError, display_path, fs_path
from .statedir import ensure_state_dir, read_state_file, state_lock

log = logging.getLogger(__name__)

EPOCH_FILE = b"epoch"
_LOCK_FILE = b"epoch.lock"
_EPOCH_RE = re.compile(rb"\A[0-9]{1,19}\n?\Z")
MAX_EPOCH = 2**63 - 1
# How far one session may raise a replica's epoch.  A takeover raises it by one or two; a
# replica that missed several takeovers catches up over as many sessions (its sender, newer
# than the replica, is accepted meanwhile).  A holder of the secret can therefore not set
# 2^63-1 and fence the module for good: a node raises its own epoch past whatever was set
# (``mirror epoch bump --to``), and that rises by at most this much per session.
MAX_EPOCH_STEP = 16
_seen: dict[bytes, int] = {}  # state dir -> the highest epoch this process read or recorded there
_seen_lock = threading.Lock()


class EpochError(FormatError):
    """The epoch file is corrupt: the fencing decision cannot be made safely."""


def epoch_path(state_dir: bytes | str) -> bytes:
    return os.path.join(fs_path(state_dir), EPOCH_FILE)


def read_epoch(state_dir: bytes | str) -> int:
    """The recorded epoch, 0 if none was ever recorded."""
    path = epoch_path(state_dir)
    try:
        data = read_state_file(path, 64)
    except OSError as exc:
        raise EpochError(f"{display_path(path)}: cannot read the epoch: {exc.strerror}") from None
    if data is None:
        return 0
    if not _EPOCH_RE.match(data):
        raise EpochError(
            f"{display_path(path)}: corrupt epoch file (expected a decimal number, found {data[:32]!r}); "
            "restore it from the peer's value with 'mirror epoch' or remove it only if this tree "
            "was never fenced"
        )
    value = int(data)
    if value > MAX_EPOCH:
        raise EpochError(f"{display_path(path)}: epoch {value} is out of range")
    return value


def bump_epoch(state_dir: bytes | str, to: int | None = None) -> int:
    """Raise the epoch by one (a takeover), or to ``to``, and return the new value, durably
    written.  ``to`` must be above the current epoch."""
    with state_lock(state_dir, _LOCK_FILE):
        current = read_epoch(state_dir)
        new = current + 1 if to is None else to
        if new > MAX_EPOCH:
            raise EpochError(f"{display_path(epoch_path(state_dir))}: epoch cannot rise past {MAX_EPOCH}")
        if new <= current:
            raise EpochError(f"{display_path(epoch_path(state_dir))}: the epoch is {current} already; "
                             f"it only rises (asked for {new})")  # fmt: skip
        _write(state_dir, new)
        return new


def observe_epoch(state_dir: bytes | str, n: int) -> int:
    """Record that epoch ``n`` exists (seen from a sender); never lowers.  Returns the epoch now."""
    if not isinstance(n, int) or n < 0 or n > MAX_EPOCH:
        raise ValueError(f"invalid epoch {n!r}")
    with state_lock(state_dir, _LOCK_FILE):
        current = read_epoch(state_dir)
        if n > current:
            _write(state_dir, n)
        now = max(n, current)
    _remember(state_dir, now)
    return now


def fencing_epoch(state_dir: bytes | str) -> int:
    """A replica's epoch, to refuse an older sender by: ``read_epoch``, but never below what
    this process read or recorded there before.  A lower one on disk (the file or its state
    dir removed under a running server) is written back, with a warning."""
    current = read_epoch(state_dir)
    with _seen_lock:
        seen = _seen.get(fs_path(state_dir), 0)
    if current >= seen:
        _remember(state_dir, current)
        return current
    log.warning("%s: epoch %d, below the %d this process saw there (the file or its state dir removed?): "
                "%d written back", display_path(epoch_path(state_dir)), current, seen, seen)  # fmt: skip
    ensure_state_dir(fs_path(state_dir))
    return observe_epoch(state_dir, seen)


def _remember(state_dir: bytes | str, n: int) -> None:
    with _seen_lock:
        key = fs_path(state_dir)
        _seen[key] = max(_seen.get(key, 0), n)


def _write(state_dir: bytes | str, value: int) -> None:
    # Never shorter than the value it replaces: it only rises.
    write_record(epoch_path(state_dir), b"%d\n" % value, 0o644)
