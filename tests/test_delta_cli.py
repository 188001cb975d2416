"""The real ``mirror signature|delta|patch`` commands, run as child processes."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from mirror.errors import EXIT_ERROR


def mirror(*args: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mirror {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()}")
    return proc


@pytest.fixture
def files(tmp_path):
    rng = random.Random(21)
    basis = rng.randbytes(200_000)
    new = basis[:50_000] + b"an edit" + basis[50_100:150_000] + rng.randbytes(3000) + basis[150_000:]
    (tmp_path / "basis").write_bytes(basis)
    (tmp_path / "new").write_bytes(new)
    return tmp_path, basis, new


def leftovers(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def test_round_trip_through_files(files):
    tmp, basis, new = files
    mirror("signature", str(tmp / "basis"), str(tmp / "sig"))
    mirror("delta", str(tmp / "sig"), str(tmp / "new"), str(tmp / "delta"))
    mirror("patch", str(tmp / "basis"), str(tmp / "delta"), str(tmp / "out"))
    assert (tmp / "out").read_bytes() == new
    assert os.path.getsize(tmp / "delta") < len(new) // 10
    assert leftovers(tmp) == []


def test_dash_means_stdin_and_stdout(files):
    tmp, basis, new = files
    sig = mirror("signature", "--block-size", "1024", "-", "-", stdin=basis).stdout
    assert sig.startswith(b"HMIRSIG\n")
    (tmp / "sig").write_bytes(sig)
    delta = mirror("delta", str(tmp / "sig"), "-", "-", stdin=new).stdout
    assert delta.startswith(b"HMIRDLT\n")
    out = mirror("patch", str(tmp / "basis"), "-", "-", stdin=delta).stdout
    assert out == new
    delta_from_sig_on_stdin = mirror("delta", "-", str(tmp / "new"), "-", stdin=sig).stdout
    (tmp / "delta").write_bytes(delta_from_sig_on_stdin)
    mirror("patch", str(tmp / "basis"), str(tmp / "delta"), str(tmp / "out"))
    assert (tmp / "out").read_bytes() == new


def test_corrupt_delta_leaves_no_output(files):
    tmp, basis, new = files
    mirror("signature", str(tmp / "basis"), str(tmp / "sig"))
    mirror("delta", str(tmp / "sig"), str(tmp / "new"), str(tmp / "delta"))
    data = bytearray((tmp / "delta").read_bytes())
    data[data.index(b"an edit")] ^= 0x20
    (tmp / "bad").write_bytes(bytes(data))
    proc = mirror("patch", str(tmp / "basis"), str(tmp / "bad"), str(tmp / "out"), check=False)
    assert proc.returncode == EXIT_ERROR
    assert b"does not match the digest" in proc.stderr
    assert not (tmp / "out").exists()
    assert leftovers(tmp) == []


def test_truncated_delta_keeps_the_previous_output(files):
    tmp, basis, new = files
    mirror("signature", str(tmp / "basis"), str(tmp / "sig"))
    mirror("delta", str(tmp / "sig"), str(tmp / "new"), str(tmp / "delta"))
    data = (tmp / "delta").read_bytes()
    (tmp / "cut").write_bytes(data[: len(data) // 2])
    (tmp / "out").write_bytes(b"previous version")
    proc = mirror("patch", str(tmp / "basis"), str(tmp / "cut"), str(tmp / "out"), check=False)
    assert proc.returncode == EXIT_ERROR
    assert b"truncated" in proc.stderr
    assert (tmp / "out").read_bytes() == b"previous version"
    assert leftovers(tmp) == []


def test_wrong_basis_is_refused(files):
    tmp, basis, new = files
    mirror("signature", str(tmp / "basis"), str(tmp / "sig"))
    mirror("delta", str(tmp / "sig"), str(tmp / "new"), str(tmp / "delta"))
    (tmp / "other").write_bytes(basis[:-1])
    proc = mirror("patch", str(tmp / "other"), str(tmp / "delta"), str(tmp / "out"), check=False)
    assert proc.returncode == EXIT_ERROR
    assert b"wrong or changed basis" in proc.stderr
    same_size = bytearray(basis)
    same_size[1000] ^= 1
    (tmp / "other").write_bytes(bytes(same_size))
    proc = mirror("patch", str(tmp / "other"), str(tmp / "delta"), str(tmp / "out"), check=False)
    assert proc.returncode == EXIT_ERROR
    assert b"digest" in proc.stderr
    assert not (tmp / "out").exists()


def test_bad_inputs_get_clear_messages(files):
    tmp, basis, new = files
    proc = mirror("delta", str(tmp / "new"), str(tmp / "new"), str(tmp / "delta"), check=False)
    assert proc.returncode == EXIT_ERROR and b"not a hamirror signature" in proc.stderr
    assert not (tmp / "delta").exists()
    proc = mirror("signature", "--block-size", "3", str(tmp / "basis"), str(tmp / "sig"), check=False)
    assert proc.returncode == EXIT_ERROR and b"block size 3 is outside" in proc.stderr
    assert not (tmp / "sig").exists()
    proc = mirror("signature", str(tmp / "missing"), str(tmp / "sig"), check=False)
    assert proc.returncode == EXIT_ERROR and b"No such file" in proc.stderr
    proc = mirror("delta", "-", "-", str(tmp / "delta"), check=False, stdin=b"")
    assert proc.returncode == EXIT_ERROR and b"only one input" in proc.stderr
    proc = mirror("patch", "-", str(tmp / "delta"), str(tmp / "out"), check=False, stdin=b"")
    assert proc.returncode == EXIT_ERROR and b"BASIS cannot be stdin" in proc.stderr
