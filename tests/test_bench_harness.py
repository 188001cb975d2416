"""The benchmark harness's arithmetic and S4f's trees (benchmarks/harness.py, bench_sync.py,
side_by_side.py).

Nothing here is timed for speed: these check that the figures in benchmarks/RESULTS.md are
computed as their tables say, and that S4f's small trees hold what S4 changes, and only that.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.bench_sync import s4_fixed_cases
from benchmarks.harness import Measurement, measure, paired_ratio, table


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # Round 2 ran on a machine twice as slow, for both tools: the paired ratio ignores it,
    # the ratio of the medians does not.
    ours = Measurement(seconds=[1.0, 2.0, 1.1, 2.2])
    peer = Measurement(seconds=[2.0, 4.0, 2.0, 4.0])
    assert paired_ratio(ours, peer) == pytest.approx(0.525)
    assert ours.median / peer.median == pytest.approx(0.517, abs=1e-3)
    assert paired_ratio(ours, Measurement(seconds=[1.0])) is None  # not from the same rounds


def test_table_prints_both_ratios():
    results = {"ours": Measurement(seconds=[1.0, 3.0]), "peer": Measurement(seconds=[2.0, 4.0])}
    lines = table(results, "peer", "T").splitlines()
    assert lines[0] == "**T**"
    assert "| paired ratio |" in lines[2]
    assert lines[4].startswith("| ours | 2.0000 | 1.0000 | 3.0000 | 0.667 | 0.625 |")
    assert lines[5].startswith("| peer | 3.0000 | 2.0000 | 4.0000 | 1.000 | 1.000 |")


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_s4_fixed_trees_hold_only_what_s4_changes(tmp_path):
    base = str(tmp_path)
    for name in ("same.txt", "d/e/same.txt", "d/edited.txt", "d/e/gone.txt"):
        _write(os.path.join(base, "B", name), b"old " + name.encode())
    for name in ("same.txt", "d/e/same.txt"):
        _write(os.path.join(base, "A4", name), b"old " + name.encode())
    _write(os.path.join(base, "A4", "d/edited.txt"), b"new content")
    _write(os.path.join(base, "A4", "d/e/new.txt"), b"created")
    # The unchanged files keep the same times on both sides, as in the corpus.
    for name in ("same.txt", "d/e/same.txt"):
        st = os.stat(os.path.join(base, "B", name))
        os.utime(os.path.join(base, "A4", name), ns=(st.st_atime_ns, st.st_mtime_ns))

    cases = s4_fixed_cases(base)

    def files(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

    assert files(os.path.join(base, "A4f")) == ["d/e/new.txt", "d/edited.txt"]
    assert files(os.path.join(base, "B4f.orig")) == ["d/e/gone.txt", "d/edited.txt"]
    # Each case runs against B4f put back to B4f.orig; rsync's leaves A4f's exact copy.
    rsync = next(c for c in cases if c.name.startswith("rsync"))
    measure([rsync], runs=1, warmup=0)
    assert files(os.path.join(base, "B4f")) == ["d/e/new.txt", "d/edited.txt"]
    with open(os.path.join(base, "B4f", "d/edited.txt"), "rb") as f:
        assert f.read() == b"new content"


def test_side_by_side_resets_before_every_command_and_pairs_against_the_last(tmp_path, capsys):
    from benchmarks.side_by_side import main

    log = tmp_path / "log"
    a, b = (f"sh -c 'echo {name} >> {log}'" for name in "ab")
    main(["--runs", "2", "--reset", f"echo reset >> {log}", a, b])
    assert log.read_text().split() == ["reset", "a", "reset", "b"] * 3  # a warm-up round, then two
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [f"| {a}", f"| {b}"]
    assert rows[1].split(" | ")[5] == "1.000"  # the peer against itself
