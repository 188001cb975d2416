"""What a replica has applied: ``(epoch, seq, journal)``, recorded by its receiver.

``epoch`` is the epoch of the primary whose data the replica holds, ``seq`` that primary's
journal sequence which the last complete session covered (every change journaled up to it
is on the replica), ``journal`` the token of the journal (one daemon run's) the sequence
belongs to.  Promotion compares ``(epoch, seq)``; the primary's daemon uses the token to
know whether it may replay its journal from ``seq`` rather than resync the whole tree.

The record lives in the replica's state dir (``<root>/.mirror/applied``), one JSON object,
written atomically and fsynced under an advisory lock.  It never goes back: a lower epoch,
or a lower sequence at the same epoch, leaves it as it is.  A missing file means nothing
was recorded (``None``); a corrupt one is an error naming it: a replica must not claim data
it may not have.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

from .atomicfile import atomic_write
from .errors import FormatError, display_path, fs_path
from .statedir import read_state_file, state_lock

APPLIED_FILE = b"applied"
_LOCK_FILE = b"applied.lock"
MAX_SEQ = 2**63 - 1
MAX_TOKEN = 64


class AppliedError(FormatError):
    """The applied-position file is corrupt."""


class Applied(NamedTuple):
    epoch: int
    seq: int
    journal: str = ""  # the journal the sequence belongs to ("" for a plain sync)

    def as_wire(self) -> list:
        return [self.epoch, self.seq, self.journal]


def applied_path(state_dir: bytes | str) -> bytes:
    return os.path.join(fs_path(state_dir), APPLIED_FILE)


def _valid(epoch, seq, journal) -> bool:
    ints = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEQ for v in (epoch, seq))
    return ints and isinstance(journal, str) and len(journal) <= MAX_TOKEN


def read_applied(state_dir: bytes | str) -> Applied | None:
    """The recorded position, None if none was ever recorded."""
    path = applied_path(state_dir)
    try:
        data = read_state_file(path, 4096)
    except OSError as exc:
        raise AppliedError(
            f"{display_path(path)}: cannot read the applied position: {exc.strerror}"
        ) from None
    if data is None:
        return None
    try:
        raw = json.loads(data)
        value = Applied(raw["epoch"], raw["seq"], raw.get("journal", ""))
    except (ValueError, KeyError, TypeError):
        value = None
    if value is None or not _valid(*value):
        raise AppliedError(f"{display_path(path)}: corrupt applied-position file (found {data[:64]!r}); remove it "
                           "to make this replica rank lowest until its next complete session")  # fmt: skip
    return value


def newer(new: Applied, old: Applied | None) -> bool:
    """Whether ``new`` replaces ``old``: a higher epoch, or the same epoch and a sequence not
    lower (an equal sequence from another journal run takes its token)."""
    if old is None:
        return True
    return (new.epoch, new.seq) > (old.epoch, old.seq) or (
        (new.epoch, new.seq) == (old.epoch, old.seq) and new.journal != old.journal
    )


def record_applied(state_dir: bytes | str, value: Applied) -> Applied:
    """Record ``value`` durably unless the record already holds as much (see ``newer``);
    returns the record now."""
    if not _valid(*value):
        raise ValueError(f"invalid applied position {value!r}")
    with state_lock(state_dir, _LOCK_FILE):
        current = read_applied(state_dir)
        if not newer(value, current):
            return current
        data = json.dumps({"epoch": value.epoch, "seq": value.seq, "journal": value.journal}).encode() + b"\n"
        atomic_write(applied_path(state_dir), data, 0o644)
        return value
