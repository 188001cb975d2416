"""A replica whose disk goes read-only under the live daemon (ext4 mounted
``errors=remount-ro``: an I/O error the kernel cannot ignore turns it read-only at once, here
by ``/sys/fs/ext4/DEV/trigger_fs_error``).  Every write fails with EROFS; the daemon keeps
running, names the failures, and reports its lag honestly: the oldest change not mirrored
grows from when it was first seen, whatever the retries (hawrap counts a replica more than
``mirror.max_lag`` behind as out of sync, so a standby whose disk failed does not pass for
up to date).  Sampled throughout, not only at the end."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.daemons import live_daemon, pair_status
from tests.helpers import PollingThread, ext4_image, is_root, wait_until

pytestmark = pytest.mark.skipif(not is_root(), reason="mounts an ext4 image")



def test_a_replica_gone_read_only_is_reported_behind_for_as_long_as_it_lasts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(b"%d" % i)
    with ext4_image(tmp_path / "replica", tmp_path / "replica.img") as replica:
        subprocess.run(["mount", "-o", "remount,errors=remount-ro", str(replica)], check=True)
        device = subprocess.run(["findmnt", "-no", "SOURCE", str(replica)], capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
        with live_daemon(src, replica, log_path=tmp_path / "daemon.log") as daemon:
            wait_until(lambda: (p := pair_status(src)).get("state") == "live" and p["last_sync"])
            with open(f"/sys/fs/ext4/{os.path.basename(device)}/trigger_fs_error", "w") as f:
                f.write("test: the replica's disk fails\n")
            options = subprocess.run(["findmnt", "-no", "OPTIONS", str(replica)], capture_output=True, text=True)
            assert "emergency_ro" in options.stdout or options.stdout.startswith("ro"), options.stdout
            (src / "new").write_bytes(b"written after the replica's disk failed")
            changed = time.time()
            lags: list[tuple[float, float]] = []  # (when, lag) while the pair reports the change

            def sample() -> None:
                pair = pair_status(src)
                if pair.get("pending"):
                    lags.append((time.time(), pair["lag_seconds"]))

            with PollingThread(sample, interval=0.2):
                pair = wait_until(lambda: (p := pair_status(src))["exit"] == 1 and p["failed_files"] and p, timeout=20)
                assert any("EROFS" in why or "Read-only" in why for _, why in pair["failed_files"]), pair
                wait_until(lambda: lags and lags[-1][1] > 6, timeout=30)
            assert not (replica / "new").exists()
            assert daemon.proc.poll() is None, daemon.log_text()
        # The lag is the age of the change, through every retry: it never starts again.
        for (_, lag0), (_, lag1) in zip(lags, lags[1:], strict=False):
            assert lag1 >= lag0 - 0.5, f"the lag went from {lag0} s to {lag1} s: {lags}"
        last_at, last = lags[-1]
        assert last >= last_at - changed - 1.5, (last_at - changed, lags)
    assert (src / "new").read_bytes() == b"written after the replica's disk failed"
