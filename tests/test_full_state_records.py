"""Small state records on a file system with no block left: the epoch, a node's state and the
mirroring lock are still written (a takeover must not fail for want of a block), and nothing
else is.  On real file systems, ext4 (1 KiB blocks at this size, no reserve) and tmpfs, filled
to their last block by root."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest

from mirror import epoch, lockfile
from mirror.atomicfile import SECTOR, write_record, write_swapped
from tests.helpers import PollingThread, ext4_image, fill_file_system, is_root, mounted

pytestmark = pytest.mark.skipif(not is_root(), reason="mounts file systems")


@pytest.fixture(params=["ext4", "tmpfs"])
def full(request, tmp_path):
    """A directory on a small file system of each kind, and a function filling it."""
    place = tmp_path / "fs"
    if request.param == "ext4":
        context = ext4_image(place, tmp_path / "fs.img", "-m", "0", size="4M")
    else:
        context = mounted(place, "tmpfs", "size=1m")
    with context:
        yield place


def _entries(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n not in ("filler", "lost+found"))


def test_a_record_is_rewritten_in_place_when_no_new_file_fits(full):
    path = full / "node-state.json"
    path.write_bytes(json.dumps({"role": "secondary", "epoch": 7, "peer_outdated": False}).encode() + b"\n")
    fill_file_system(full)
    shorter = json.dumps({"role": "primary", "epoch": 8}).encode() + b"\n"
    write_record(path, shorter, 0o600, filler=b" ")
    assert path.read_bytes().rstrip(b" ") == shorter  # padded to the old length
    assert json.loads(path.read_bytes()) == {"role": "primary", "epoch": 8}
    longer = json.dumps({"role": "primary", "epoch": 8, "peer_outdated": True, "time": 1.5}).encode() + b"\n"
    write_record(path, longer, 0o600, filler=b" ")
    assert path.read_bytes() == longer
    assert _entries(full) == ["node-state.json"]  # no temporary file left


def test_a_record_past_one_sector_or_that_cannot_be_padded_is_not_written(full):
    path = full / "record"
    old = b"x" * 100
    path.write_bytes(old)
    fill_file_system(full)
    for data, filler in ((b"y" * (SECTOR + 1), b" "), (b"y" * 50, None)):
        with pytest.raises(OSError) as raised:
            write_record(path, data, filler=filler)
        assert raised.value.errno == errno.ENOSPC and raised.value.filename == bytes(path), raised.value
        assert path.read_bytes() == old
    # a record that was never written has no block to be written into
    with pytest.raises(OSError) as raised:
        write_record(full / "new", b"1\n")
    assert raised.value.errno == errno.ENOSPC
    assert _entries(full) == ["record"]


def test_the_epoch_rises_on_a_full_file_system(full):
    epoch.observe_epoch(full, 9)
    fill_file_system(full)
    assert epoch.bump_epoch(full) == 10  # one digit more
    assert epoch.observe_epoch(full, 12) == 12
    assert epoch.read_epoch(full) == 12
    assert (full / "epoch").read_bytes() == b"12\n"


def test_the_mirroring_lock_is_taken_empty_on_a_full_file_system(full):
    path = full / "data.lock"
    fill_file_system(full)
    info = lockfile.acquire(path, reason="takeover by b")
    assert info.created and info.problem and "full" in info.problem, info
    assert lockfile.is_locked(path) and path.stat().st_size == 0
    held = lockfile.status(path)
    assert held.problem and not held.created, held  # it locks; it cannot say who took it
    assert not lockfile.acquire(path, reason="again").created
    assert _entries(full) == ["data.lock"]
    assert lockfile.release(path) and not lockfile.is_locked(path)


def test_a_generated_configuration_unchanged_is_used_from_a_full_file_system(full):
    """hawrap writes ``mirror serve|daemon --config`` files when it starts the processes: the
    same file as last time is not written again, so a full /var does not stop them."""
    from hawrap.mirrorctl import _write_generated

    path = str(full / "mirror-serve.toml")
    _write_generated(path, ['listen = "10.0.0.1:8730"', "[modules.data]"])
    inode = os.stat(path).st_ino
    fill_file_system(full)
    _write_generated(path, ['listen = "10.0.0.1:8730"', "[modules.data]"])
    assert os.stat(path).st_ino == inode
    with pytest.raises(OSError) as raised:  # a changed one is written, or the error says why not
        _write_generated(path, ['listen = "10.0.0.2:8730"', "[modules.data]"])
    assert raised.value.errno == errno.ENOSPC
    assert (full / "mirror-serve.toml").read_text() == 'listen = "10.0.0.1:8730"\n[modules.data]\n'


def test_the_epoch_rises_when_no_inode_is_left(tmp_path):
    """A spool of many small files (a Maildir) runs out of inodes before blocks: the
    temporary file cannot be made, and the record is rewritten in place all the same."""
    place = tmp_path / "fs"
    with mounted(place, "tmpfs", "size=4m,nr_inodes=64"):
        epoch.observe_epoch(place, 3)
        with pytest.raises(OSError) as raised:
            for i in range(100):
                (place / f"mail{i}").touch()
        assert raised.value.errno == errno.ENOSPC
        assert epoch.bump_epoch(place) == 4
        assert epoch.read_epoch(place) == 4


@pytest.fixture
def sigio_ignored():
    """SIGIO ignored, as the daemon has it: ``write_swapped`` may then tell a held spare."""
    before = signal.signal(signal.SIGIO, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGIO, before)


def _status(i: int) -> bytes:
    return json.dumps({"updated": i, "pairs": [{"state": "live"}] * (i % 3)}).encode()


def test_a_reader_holding_the_status_across_two_rewrites_keeps_what_it_opened(full, sigio_ignored):
    """The second rewrite after a reader opened the status would go over the very file it
    holds (the spare is the file as it was before the last swap): the reader saw the new
    content arrive under it, torn if it came mid-read.  The held spare is set aside instead;
    on a full disk its replacement gets no block, and the status stays as it was until the
    reader lets go."""
    path = full / "mirror-daemon.status.json"
    for i in range(3):
        write_swapped(path, _status(i))
    with open(path, "rb") as reader:
        write_swapped(path, _status(3))
        write_swapped(path, _status(4))
        assert json.loads(reader.read())["updated"] == 2
    assert json.loads(path.read_bytes())["updated"] == 4
    fill_file_system(full)
    with open(path, "rb") as reader:
        write_swapped(path, _status(5))
        with pytest.raises(OSError) as raised:
            write_swapped(path, _status(6))
        assert raised.value.errno == errno.ENOSPC and os.fsencode(path) == os.fsencode(raised.value.filename)
        assert json.loads(reader.read())["updated"] == 4
    assert json.loads(path.read_bytes())["updated"] == 5
    write_swapped(path, _status(7))  # the set-aside file's blocks are free once it is let go
    assert json.loads(path.read_bytes())["updated"] == 7
    assert _entries(full) == [".mirror-daemon.status.json.spare", "mirror-daemon.status.json"]


def test_a_status_rewritten_by_swapping_changes_on_a_full_file_system_and_reads_whole(full, sigio_ignored):
    """The daemon's status: written twice before the disk fills, it is rewritten after, and a
    reader polling it meanwhile never sees anything but a whole status."""
    path = full / "mirror-daemon.status.json"
    for i in range(2):
        write_swapped(path, json.dumps({"updated": i, "pairs": [{"state": "live"}]}).encode())
    fill_file_system(full)
    torn: list[bytes] = []
    reads = 0

    def read() -> None:
        nonlocal reads
        data = path.read_bytes()
        reads += 1
        try:
            json.loads(data)
        except ValueError:
            torn.append(data)

    with PollingThread(read, interval=0):
        for i in range(2, 2000):
            write_swapped(path, _status(i))
    assert json.loads(path.read_bytes())["updated"] == 1999
    assert reads > 100 and not torn, torn[:3]
    assert _entries(full) == [".mirror-daemon.status.json.spare", "mirror-daemon.status.json"]
