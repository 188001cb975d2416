"""The mirroring lock file: atomic creation, idempotent acquire, fail-safe reading, real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from mirror import lockfile
from mirror.errors import EXIT_LOCKED, MirrorError
from tests.helpers import WITHOUT_DAC


def mirror_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, timeout=60)


def test_acquire_records_owner_time_and_reason(tmp_path):
    path = tmp_path / "mirror.lock"
    info = lockfile.acquire(str(path), reason="takeover by node-b")
    assert info.created and info.host == socket.gethostname() and info.pid == os.getpid()
    doc = json.loads(path.read_text())
    assert doc["locked_by"] == {"host": socket.gethostname(), "pid": os.getpid()}
    assert doc["reason"] == "takeover by node-b"
    assert abs(doc["time"] - info.time) < 1e-6
    assert lockfile.is_locked(str(path))
    again = lockfile.status(str(path))
    assert again.host == info.host and again.pid == info.pid and again.reason == info.reason
    assert not again.created
    # no temp file left beside the lock
    assert sorted(os.listdir(tmp_path)) == ["mirror.lock"]


def test_acquire_is_idempotent_and_reports_the_holder(tmp_path):
    path = str(tmp_path / "l")
    first = lockfile.acquire(path, reason="first", owner=("node-a", 111))
    second = lockfile.acquire(path, reason="second", owner=("node-b", 222))
    assert first.created and not second.created
    assert (second.host, second.pid, second.reason) == ("node-a", 111, "first")
    assert "node-a pid 111" in second.describe() and "first" in second.describe()


def test_release_and_status_when_absent(tmp_path):
    path = str(tmp_path / "l")
    assert lockfile.status(path) is None and not lockfile.is_locked(path)
    assert lockfile.release(path) is False
    lockfile.acquire(path)
    assert lockfile.release(path) is True
    assert not lockfile.is_locked(path) and not os.path.exists(path)


@pytest.mark.parametrize(
    "content", [b"", b"garbage\xff\x00", b'{"locked_by": "x"}', b"[1,2]", b'{"locked_by":{"host":1,"pid":"x"},"time":1}']
)
def test_garbled_lock_still_locks(tmp_path, content):
    path = tmp_path / "l"
    path.write_bytes(content)
    assert lockfile.is_locked(str(path))
    info = lockfile.status(str(path))
    assert info is not None and info.problem
    assert "unreadable lock file" in info.describe()
    # acquire does not overwrite someone else's (garbled) lock
    again = lockfile.acquire(str(path), reason="mine")
    assert not again.created and path.read_bytes() == content


def test_oversized_and_symlinked_locks_still_lock(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b" " * (lockfile.MAX_LOCK_FILE_SIZE + 10))
    assert lockfile.status(str(big)).problem
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    assert lockfile.is_locked(str(link))
    assert "symbolic link" in lockfile.status(str(link)).problem


def test_unreadable_lock_counts_as_locked(tmp_path):
    """Permission denied on the lock (or its directory) means locked, never "no lock"."""
    path = tmp_path / "l"
    path.write_text("{}")
    path.chmod(0)
    code = (
        "import sys; from mirror import lockfile; p = sys.argv[1]; "
        "print(lockfile.is_locked(p), lockfile.status(p).problem)"
    )
    argv = [sys.executable, "-c", code, str(path)]
    if os.geteuid() == 0:  # root reads anything: look without the capabilities that allow it
        argv = [*WITHOUT_DAC, *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    locked, problem = r.stdout.split(" ", 1)
    assert locked == "True" and "Permission denied" in problem


def test_lock_in_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(MirrorError, match="cannot create the lock"):
        lockfile.acquire(str(tmp_path / "nodir" / "l"))


def test_concurrent_acquire_has_exactly_one_winner(tmp_path):
    path = str(tmp_path / "l")
    results = []
    barrier = threading.Barrier(8)

    def grab(i):
        barrier.wait()
        results.append(lockfile.acquire(path, reason=f"t{i}", owner=("h", i)))

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r.created]
    assert len(winners) == 1
    assert {r.pid for r in results} == {winners[0].pid}


def test_bytes_path_non_utf8(tmp_path):
    path = os.path.join(os.fsencode(tmp_path), b"lock-\xff")
    info = lockfile.acquire(path)
    assert info.path == path and lockfile.is_locked(path)
    assert lockfile.release(path)


def test_cli_acquire_status_release(tmp_path):
    path = str(tmp_path / "mirror.lock")
    r = mirror_cli("lock", "status", path)
    assert r.returncode == 0 and "not locked" in r.stdout
    r = mirror_cli("lock", "acquire", path, "--reason", "admin check")
    assert r.returncode == 0, r.stderr
    assert "locked by" in r.stdout and "admin check" in r.stdout
    r = mirror_cli("lock", "acquire", path, "--reason", "other")  # held by someone else: exit 3
    assert r.returncode == EXIT_LOCKED and "already held" in r.stdout and "admin check" in r.stdout
    r = mirror_cli("lock", "status", path, "--json")
    assert r.returncode == EXIT_LOCKED
    doc = json.loads(r.stdout)
    assert doc["locked"] and doc["reason"] == "admin check" and doc["pid"] > 0
    r = mirror_cli("lock", "release", path)
    assert r.returncode == 0 and "released" in r.stdout
    r = mirror_cli("lock", "status", path, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"path": path, "locked": False}


def test_cli_status_of_garbled_lock_is_locked(tmp_path):
    path = tmp_path / "l"
    path.write_bytes(b"\x00\x01")
    r = mirror_cli("lock", "status", str(path))
    assert r.returncode == EXIT_LOCKED and "unreadable" in r.stdout


def test_cli_error_in_missing_directory(tmp_path):
    r = mirror_cli("lock", "acquire", str(tmp_path / "missing" / "l"))
    assert r.returncode == 2 and "cannot create the lock" in r.stderr
