"""`mirror status` names the source directories the live daemon cannot watch, and is not
healthy (exit 1) while there are any: their changes reach the replica only when they are
tried again and rescanned, up to a minute late.

A real daemon mirrors a FUSE source (``tests/faultyfs.py``) one directory of which fails
its lookups with EIO, as on a failing disk: ``inotify_add_watch`` fails for it (and for
an excluded one, which the status leaves out: its changes are not mirrored anyway).  A try
while the disk still fails keeps it named; once the disk is back the daemon's next try
watches it, and the status no longer names it.  The tries come 5 s after the start, then
10 s later (``mirror.watch.REWATCH_SECONDS``, not shortened for the test): about 16 s.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request

import pytest

from mirror.watch import REWATCH_SECONDS
from tests.daemons import live_daemon, pair_status
from tests.faultyfs import faulty_fs
from tests.helpers import is_root, run_mirror, wait_until
from tests.snapshot import snapshot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unwatched_gauge(port: int) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    return next((s.value for s in samples if s.name == "mirror_unwatched_directories"), None)


def test_status_names_a_directory_the_daemon_cannot_watch_until_it_is_watched_again(tmp_path):
    replica = tmp_path / "replica"
    port = _free_port()
    with faulty_fs(tmp_path) as fs:
        for d in ("docs", "mail", "mail/cur", "cache"):
            (fs.backing / d).mkdir(parents=True)
            for i in range(3):
                (fs.backing / d / f"f{i}").write_bytes(b"%s %d\n" % (d.encode(), i))
        fs.fault("mail", "getattr_eio")
        fs.fault("cache", "getattr_eio")  # not watched either, but excluded: not mirrored anyway
        with live_daemon(fs.mount, replica, "--exclude", "cache/", "--metrics", f"127.0.0.1:{port}",
                         log_path=tmp_path / "daemon.log"):  # fmt: skip
            pair = wait_until(lambda: (p := pair_status(fs.mount)).get("state") == "live" and p["last_sync"] and p)
            assert fs.count("mail", "getattr_eio") > 0 and fs.count("cache", "getattr_eio") > 0
            assert pair.get("unwatched_count") == 1, pair
            assert pair["unwatched_dirs"] == [["mail", "Input/output error"]], pair
            assert abs(pair["rewatch_at"] - time.time()) <= 60, pair  # when it is tried again

            # Unreadable as well, it is among the failed files too (tried again with them).
            assert pair["exit"] == 1 and [p for p, _ in pair["failed_files"]] == ["mail"], pair
            text = run_mirror("status", fs.mount, check_codes=range(256))
            out = text.stdout.decode()
            assert text.returncode == 1, out
            assert "not watched: 1 directory of the source; changes there arrive by rescan, up to a minute late" in out
            assert "    mail: Input/output error\n" in out, out
            assert "max_user_watches" not in out, out  # the hint is for the watch limit only
            assert _unwatched_gauge(port) == 1.0

            # A try that fails again keeps it named, and the next one comes later.
            first_try = pair["rewatch_at"]
            pair = wait_until(lambda: (p := pair_status(fs.mount))["rewatch_at"] != first_try and p, timeout=20)
            assert pair["unwatched_dirs"] == [["mail", "Input/output error"]] and pair["exit"] == 1, pair
            assert pair["rewatch_at"] - first_try > 5, (first_try, pair)

            # The disk back, a session reads it (no file fails) before the next try watches it:
            # the unwatched directory alone keeps the exit at 1.
            assert pair["rewatch_at"] - time.time() > 3, pair
            fs.clear()

            def clean_session():
                (fs.mount / "docs" / "tick").write_bytes(b"%f" % time.time())
                p = pair_status(fs.mount)
                return p if p["state"] == "live" and p["failed_files"] == [] else None

            pair = wait_until(clean_session)
            assert pair["unwatched_count"] == 1 and pair["exit"] == 1, pair
            pair = wait_until(lambda: (p := pair_status(fs.mount))["exit"] == 0 and p)  # the next try watches it
            assert (pair["unwatched_count"], pair["unwatched_dirs"], pair["rewatch_at"]) == (0, [], None), pair
            text = run_mirror("status", fs.mount)
            assert "not watched" not in text.stdout.decode(), text.stdout.decode()
            assert _unwatched_gauge(port) == 0.0
            wait_until(lambda: (replica / "mail" / "cur" / "f0").exists())  # by the rescan of the try
            assert not (replica / "cache").exists()
            # Watched now (no directory is left to rescan): a change in it arrives by its watch.
            (fs.mount / "mail" / "cur" / "new").write_bytes(b"seen by its watch")
            wait_until(lambda: (replica / "mail" / "cur" / "new").exists(), timeout=4)


def _watch_limited(watches: int) -> list[str]:
    """A prefix that runs a command in a user namespace of its own whose inotify watch limit
    is ``watches`` (Linux 5.11 and later count watches per user namespace): a real ENOSPC
    from ``inotify_add_watch``, without touching the machine's own limit."""
    script = f'echo {watches} > /proc/sys/user/max_inotify_watches && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh"]


@pytest.mark.skipif(not is_root(), reason="the tree is root's, mapped into the user namespace")
def test_past_the_watch_limit_every_change_still_arrives_and_the_status_names_the_sysctl(tmp_path):
    from mirror.watch import WATCH_LIMIT_REASON

    src, replica = tmp_path / "src", tmp_path / "replica"
    for i in range(40):
        (src / f"d{i:02}" / "sub").mkdir(parents=True)
        (src / f"d{i:02}" / "f").write_bytes(b"%d" % i)
    with live_daemon(src, replica, prefix=_watch_limited(16), log_path=tmp_path / "daemon.log") as daemon:
        pair = wait_until(lambda: (p := pair_status(src)).get("state") == "live" and p["last_sync"] and p)
        assert pair["exit"] == 1 and pair["unwatched_count"] > 40, pair  # the limit, not the disk
        assert all(why == WATCH_LIMIT_REASON for _, why in pair["unwatched_dirs"]), pair
        text = run_mirror("status", src, check_codes=(1,)).stdout.decode()
        assert "raise the fs.inotify.max_user_watches sysctl" in text, text
        unwatched = {os.fsencode(path) for path, _ in pair["unwatched_dirs"]}
        watched = next(f"d{i:02}" for i in range(40) if b"d%02d" % i not in unwatched)
        blind = next(path.decode() for path in sorted(unwatched) if path.count(b"/") == 0)
        # A change where a watch is arrives by it; one where none could be set, by the
        # rescan that comes with each try to watch it again.
        (src / watched / "new").write_bytes(b"by its watch")
        (src / blind / "sub" / "deep").mkdir()
        (src / blind / "sub" / "deep" / "new").write_bytes(b"by a rescan")
        (src / blind / "f").unlink()
        wait_until(lambda: (replica / watched / "new").exists(), timeout=10)
        wait_until(lambda: (replica / blind / "sub" / "deep" / "new").exists(), timeout=3 * REWATCH_SECONDS)
        wait_until(lambda: not (replica / blind / "f").exists(), timeout=10)
        assert daemon.proc.poll() is None, daemon.log_text()
    assert snapshot(replica) == snapshot(src)


@pytest.mark.skipif(not is_root(), reason="the tree is root's, mapped into the user namespace")
def test_excluded_directories_spend_no_watches(tmp_path):
    """Ten directories, each with a kept subtree and an excluded ``cache/`` of 30: watching
    the caches too would pass the limit (64 watches) before the walk reached most kept ones.
    Not watched, they leave every kept directory watched; a cache renamed to a kept name is
    watched from then on."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    for i in range(10):
        (src / f"d{i}" / "sub" / "deeper").mkdir(parents=True)
        for j in range(30):
            (src / f"d{i}" / "cache" / f"c{j}").mkdir(parents=True)
    kept = 1 + 10 * 3  # the root, and each d, d/sub, d/sub/deeper
    limit = kept + 31 + 2  # and one cache renamed to a kept name, with a margin: not 341
    with live_daemon(src, replica, "--exclude", "cache/", prefix=_watch_limited(limit),
                     log_path=tmp_path / "daemon.log") as daemon:  # fmt: skip
        pair = wait_until(lambda: (p := pair_status(src)).get("state") == "live" and p["last_sync"] and p)
        assert pair["exit"] == 0 and not pair.get("unwatched_count"), pair
        for i in range(10):  # each arrives by its watch: none is left to a rescan
            (src / f"d{i}" / "sub" / "deeper" / "new").write_bytes(b"%d" % i)
        wait_until(lambda: all((replica / f"d{i}" / "sub" / "deeper" / "new").exists() for i in range(10)),
                   timeout=10)  # fmt: skip
        assert not (replica / "d0" / "cache").exists()
        (src / "d0" / "cache").rename(src / "d0" / "kept")  # now mirrored, and watched
        wait_until(lambda: (replica / "d0" / "kept" / "c29").is_dir(), timeout=10)
        (src / "d0" / "kept" / "c7" / "later").write_bytes(b"by the watch of a renamed directory")
        wait_until(lambda: (replica / "d0" / "kept" / "c7" / "later").exists(), timeout=10)
        pair = pair_status(src)
        assert pair["exit"] == 0 and not pair.get("unwatched_count"), pair
        assert daemon.proc.poll() is None, daemon.log_text()


def test_the_watch_limit_is_named_with_the_sysctl_that_raises_it(capsys):
    """What inotify's ENOSPC gives the status (not reproduced for real: the limit is the whole
    machine's), and how `mirror status` shows many directories."""
    from mirror.cli.status_cmd import _print_unwatched
    from mirror.watch import WATCH_LIMIT_REASON

    dirs = [[f"d{i}", WATCH_LIMIT_REASON] for i in range(20)]
    _print_unwatched({"unwatched_count": 3000, "unwatched_dirs": dirs, "rewatch_at": None})
    out = capsys.readouterr().out
    assert "not watched: 3000 directories of the source" in out and "next try" not in out, out
    assert out.count(f": {WATCH_LIMIT_REASON}\n") == 5 and "    ... and 2995 more\n" in out, out
    assert "raise the fs.inotify.max_user_watches sysctl" in out, out
