"""benchmarks/bench_live.py (S4d) keeps working: its measuring function, for a handful of
writes on a tiny tree, against a real `mirror daemon` (lsyncd and the plot are left out).

It asserts that every write arrives whole and is timed, never how fast: speed belongs to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.bench_live import make_tool, measure_latencies, percentile, pick_dirs, remove_written


def _tree(root) -> None:
    for d in ("a", "a/b", "c"):
        os.makedirs(os.path.join(root, d))
        for i in range(3):
            with open(os.path.join(root, d, f"f{i}.txt"), "wb") as f:
                f.write(os.urandom(100 + i))


@pytest.mark.parametrize("name", ["mirror-local", "mirror-reconcile"])
def test_measures_every_write_back_to_back_and_paced(tmp_path, name):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _tree(src)
    os.makedirs(dst)  # empty: the daemon's first sync fills it
    tool = make_tool(name, src, dst, str(tmp_path), dict(os.environ), reconcile_interval=0.05)
    dirs = pick_dirs(src, 2)
    assert len(dirs) == 2 and all(os.path.isdir(os.path.join(src, d)) for d in dirs)
    tool.start()
    try:
        tool.wait_ready(timeout=15)
        back_to_back, lost_b = measure_latencies(src, dst, dirs, 5, timeout=10)
        paced, lost_p = measure_latencies(src, dst, dirs, 3, interval=0.05, tag="s4dpaced", timeout=10)
    finally:
        tool.stop()
    assert (lost_b, lost_p) == (0, 0)
    assert len(back_to_back) == 5 and len(paced) == 3
    assert all(0 < t < 10 for t in back_to_back + paced)
    assert percentile(back_to_back, 0.5) <= percentile(back_to_back, 0.99) == max(back_to_back)
    # Each write arrived whole on the replica, under the same name.
    for i in range(5):
        name = f"s4d-{i:05d}.dat"
        with (
            open(os.path.join(src, dirs[i % 2], name), "rb") as a,
            open(os.path.join(dst, dirs[i % 2], name), "rb") as b,
        ):
            assert a.read() == b.read()
    assert remove_written([src, dst], dirs) == 16
    assert not any(n.startswith("s4d") for d in dirs for n in os.listdir(os.path.join(dst, d)))
