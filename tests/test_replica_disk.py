"""The remembered replica disk (``mirror.replicadisk``): what is recorded, what is refused.

The mounts themselves are exercised in ``test_guard.py`` and ``test_remote_shell.py``; here
the rule on its own, with the mount point a replica lies under given as a receiver's
``welcome`` gives it.
"""

from __future__ import annotations

import re

import pytest

from mirror.errors import SourceGuardError
from mirror.replicadisk import check_replica_disk, recorded_mount

REPLICA = b"backup:/mnt/usb/\xff odd\nname"  # any byte but NUL, as a path may hold


def _check(state, disk: bytes, require=None, record=True):
    check_replica_disk(bytes(state), REPLICA, disk, require, record=record, where=" on backup")


def test_a_disk_above_the_recorded_one_is_refused_and_any_other_is_taken(tmp_path):
    _check(tmp_path, b"/mnt/usb", record=False)  # a dry run keeps nothing
    assert recorded_mount(bytes(tmp_path), REPLICA) is None
    _check(tmp_path, b"/mnt/usb")
    assert recorded_mount(bytes(tmp_path), REPLICA) == b"/mnt/usb"
    for above in (b"/mnt", b"/"):  # nothing mounted at /mnt/usb any more
        with pytest.raises(SourceGuardError, match="nothing is mounted at /mnt/usb on backup, where the replica"):
            _check(tmp_path, above)
        with pytest.raises(SourceGuardError):
            _check(tmp_path, above, record=False)
    assert recorded_mount(bytes(tmp_path), REPLICA) == b"/mnt/usb"
    _check(tmp_path, b"/mnt/usb/inner")  # a disk mounted deeper: taken, and kept
    assert recorded_mount(bytes(tmp_path), REPLICA) == b"/mnt/usb/inner"
    _check(tmp_path, b"/srv/array")  # the replica moved to another disk: not above the old one
    assert recorded_mount(bytes(tmp_path), REPLICA) == b"/srv/array"
    _check(tmp_path, b"/", require=False)  # --no-dst-require-mount: written as it is, forgotten
    assert recorded_mount(bytes(tmp_path), REPLICA) is None
    _check(tmp_path, b"/")  # the root file system: nothing to keep
    assert recorded_mount(bytes(tmp_path), REPLICA) is None


@pytest.mark.parametrize("damage", [b"", b"no separator", REPLICA + b"\0relative", b"other\0/mnt", REPLICA + b"\0/a\0/b",
                                    REPLICA + b"\0/" + b"x" * (256 << 10)])  # fmt: skip
def test_a_damaged_record_refuses_naming_its_file(tmp_path, damage):
    _check(tmp_path, b"/mnt/usb")
    (record,) = tmp_path.glob("replica-disk-*")
    record.write_bytes(damage)
    for disk in (b"/mnt/usb", b"/"):
        with pytest.raises(SourceGuardError, match=re.escape(f"{record}: damaged record")):
            _check(tmp_path, disk)
