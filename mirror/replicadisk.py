"""Whether a replica's disk is there before anything is written into it.

A replica keeps its state dir inside itself, so when the disk it lives on did not
come up (a mount that failed at boot, a USB disk that dropped) the directory left in its
place looks like a new, empty replica, and a sync fills the file system below (often the
root file system, and with it the node that serves).  Two rules stand in the way; both
refuse with ``SourceGuardError`` (exit 25) before anything is made there:

- **Required** (``require_mount``, ``--dst-require-mount``): the replica's directory must
  itself be a mount point, at every session.
- **Remembered** (the default): the source's state dir keeps, for each replica written
  into, the mount point its directory lay under (``replica-disk-*``; none for the root
  file system): a local replica's as found here, a remote one's as its receiver's
  ``welcome`` tells it.  While a mount point above that one is all there is, nothing is
  mounted there, and that replica is refused.  Any disk mounted there is taken (a rotated
  backup disk is filled), and the replica's own guard then judges it.
  ``--no-dst-require-mount`` writes into the directory as it is and forgets the record.
"""

from __future__ import annotations

import logging
import os

import xxhash

from .atomicfile import atomic_write
from .errors import SourceGuardError, display_path
from .guard import is_mount_point, mount_points
from .statedir import ensure_state_dir, read_state_file

log = logging.getLogger(__name__)

_RECORD_PREFIX = b"replica-disk-"
_MAX_RECORD = 256 << 10  # a destination as written (one argument: at most 128 KiB) and a mount point


def require_mounted(path: bytes) -> None:
    """Refuse a replica that must be a mount point (``require_mount``) with nothing mounted."""
    if not is_mount_point(path):
        raise SourceGuardError(f"refused: the replica {display_path(path)} is not a mount point (require_mount): "
                               "is its filesystem not mounted? Nothing was written")  # fmt: skip


def mount_point_above(path: bytes) -> bytes:
    """The mount point ``path`` (resolved; it need not exist yet) lies on or under."""
    path, table = os.path.realpath(path), mount_points()
    while path != b"/" and not is_mount_point(path, table):
        path = os.path.dirname(path)
    return path


def _record_path(state_dir: bytes, replica: bytes) -> bytes:
    return os.path.join(state_dir, _RECORD_PREFIX + xxhash.xxh3_64_hexdigest(replica).encode())


def recorded_mount(state_dir: bytes, replica: bytes) -> bytes | None:
    """The mount point ``replica`` (resolved) lay under when it was last written into, from
    ``state_dir`` (the source's); None if none is recorded."""
    path = _record_path(state_dir, replica)
    try:
        data = read_state_file(path, _MAX_RECORD + 1)
    except NotADirectoryError:
        return None  # no state dir there, but a user's file, which the session refuses
    except OSError as exc:
        raise SourceGuardError(f"{display_path(path)}: cannot read where the replica's disk was: "
                               f"{exc.strerror}") from None  # fmt: skip
    if data is None:
        return None
    recorded, sep, mount = data.partition(b"\0")  # paths hold any byte but NUL
    if len(data) > _MAX_RECORD or not sep or recorded != replica or not mount.startswith(b"/") or b"\0" in mount:
        raise SourceGuardError(f"{display_path(path)}: damaged record of where the replica {display_path(replica)}'s "
                               "disk was; remove it once that disk is mounted (the next sync records it again)")  # fmt: skip
    return mount


def check_local_replica(state_dir: bytes, path: bytes, require: bool | None, *, record: bool) -> None:
    """``check_replica_disk`` for a local replica at ``path``; ``require`` True also wants
    ``path`` itself to be a mount point."""
    if require:
        require_mounted(path)
    real = os.path.realpath(path)
    check_replica_disk(state_dir, real, mount_point_above(real), require, record=record)


def check_replica_disk(state_dir: bytes, replica: bytes, disk: bytes, require: bool | None, *, record: bool,
                       where: str = "") -> None:  # fmt: skip
    """Refuse ``replica`` (its name in the record: a local replica's resolved path, a remote
    one's address) when ``disk``, the mount point it lies under now (``where``: on which
    host), is above the one recorded in ``state_dir`` (the source's): that disk is not
    mounted.  (Another mount point, not above it, is a replica moved to another disk.)
    ``require`` False: no such rule, and the record is forgotten.  ``record`` (not a dry
    run): remember ``disk``."""
    known = recorded_mount(state_dir, replica)
    if require is None and known is not None and known != disk and known.startswith(disk.rstrip(b"/") + b"/"):
        raise SourceGuardError(
            f"refused: nothing is mounted at {display_path(known)}{where}, where the replica "
            f"{display_path(replica)} was on its own disk when it was last written into (recorded in "
            f"{display_path(state_dir)}): is that disk not mounted? Nothing was written. Mount it, or, if the "
            "replica is now meant to be the directory as it is, sync once with --no-dst-require-mount "
            "(dst_require_mount = false)"
        )
    if not record:
        return
    now = disk if require is not False else b"/"
    if (known or b"/") == now:
        return
    path = _record_path(state_dir, replica)
    try:
        if now == b"/":
            os.unlink(path)
        else:
            ensure_state_dir(state_dir)
            atomic_write(path, replica + b"\0" + now)
    except OSError as exc:
        log.warning("%s: cannot record where the replica %s's disk is (%s): a sync while it is not mounted "
                    "would not be refused", display_path(state_dir), display_path(replica), exc.strerror)  # fmt: skip
