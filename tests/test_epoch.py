"""Per-tree epoch: monotonic, durable, corrupt files are errors, real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror import epoch
from mirror.errors import EXIT_ERROR


def mirror_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, timeout=60)


def test_absent_is_zero_and_bump_is_monotonic(tmp_path):
    sd = str(tmp_path / "state")
    assert epoch.read_epoch(sd) == 0
    assert [epoch.bump_epoch(sd) for _ in range(3)] == [1, 2, 3]
    assert (tmp_path / "state" / "epoch").read_text() == "3\n"
    assert epoch.read_epoch(sd) == 3


def test_observe_never_lowers(tmp_path):
    sd = str(tmp_path)
    assert epoch.observe_epoch(sd, 7) == 7
    assert epoch.observe_epoch(sd, 3) == 7
    assert epoch.read_epoch(sd) == 7
    assert epoch.bump_epoch(sd) == 8
    with pytest.raises(ValueError):
        epoch.observe_epoch(sd, -1)


@given(st.lists(st.one_of(st.none(), st.integers(0, 10**6)), max_size=30))
def test_epoch_is_max_of_observed_plus_bumps(tmp_path_factory, ops):
    sd = str(tmp_path_factory.mktemp("e"))
    expected = 0
    for op in ops:
        if op is None:
            expected += 1
            assert epoch.bump_epoch(sd) == expected
        else:
            expected = max(expected, op)
            assert epoch.observe_epoch(sd, op) == expected
        assert epoch.read_epoch(sd) == expected


@pytest.mark.parametrize("content", [b"", b"abc\n", b"-1\n", b"1 2\n", b"\xff", b"12\n\n", b"9" * 30])
def test_corrupt_epoch_is_an_error_never_zero(tmp_path, content):
    (tmp_path / "epoch").write_bytes(content)
    with pytest.raises(epoch.EpochError, match="corrupt epoch file|out of range"):
        epoch.read_epoch(str(tmp_path))
    with pytest.raises(epoch.EpochError):
        epoch.bump_epoch(str(tmp_path))
    with pytest.raises(epoch.EpochError):
        epoch.observe_epoch(str(tmp_path), 5)
    assert (tmp_path / "epoch").read_bytes() == content


def test_concurrent_bumps_give_distinct_epochs(tmp_path):
    sd = str(tmp_path)
    got = []
    lock = threading.Lock()

    def worker():
        for _ in range(20):
            value = epoch.bump_epoch(sd)
            with lock:
                got.append(value)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 81))


def test_concurrent_bumps_across_processes(tmp_path):
    sd = str(tmp_path)
    code = "import sys; from mirror import epoch\nfor _ in range(25): print(epoch.bump_epoch(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, sd], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    values = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        values += [int(v) for v in out.split()]
    assert sorted(values) == list(range(1, 76))


def test_no_temp_files_left(tmp_path):
    epoch.bump_epoch(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["epoch", "epoch.lock"]


def test_cli_show_and_bump_default_state_dir(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    r = mirror_cli("epoch", "show", str(tree))
    assert r.returncode == 0 and r.stdout.strip() == "0"
    r = mirror_cli("epoch", "bump", str(tree), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["epoch"] == 1
    assert (tree / ".mirror" / "epoch").read_text() == "1\n"
    r = mirror_cli("epoch", "show", str(tree))
    assert r.stdout.strip() == "1"
    for action in ("show", "bump"):  # a mistyped tree: neither epoch 0 nor a tree made there
        r = mirror_cli("epoch", action, str(tmp_path / "tre"))
        assert r.returncode == EXIT_ERROR and f"{tmp_path}/tre is not a directory" in r.stderr, r.stderr
        assert not (tmp_path / "tre").exists()


def test_cli_explicit_state_dir_and_corrupt_file(tmp_path):
    tree, sd = tmp_path / "tree", tmp_path / "sd"
    tree.mkdir()
    r = mirror_cli("epoch", "bump", str(tree), "--state-dir", str(sd))
    assert r.returncode == 0 and r.stdout.strip() == "1"
    assert (sd / "epoch").read_text() == "1\n" and not (tree / ".mirror").exists()
    (sd / "epoch").write_text("oops")
    r = mirror_cli("epoch", "show", str(tree), "--state-dir", str(sd))
    assert r.returncode == EXIT_ERROR and "corrupt epoch file" in r.stderr
