"""`mirror status` never says live for a daemon that stopped, died or hangs, and its exit
status tells them apart; it lists the files that failed."""

from __future__ import annotations

import json
import os
import signal

from tests.daemons import converged, live_daemon
from tests.helpers import run_mirror, wait_until
from tests.servers import mirror_server

ANY = tuple(range(10))


def _status(src, *extra):
    return run_mirror("status", str(src), *extra, check_codes=ANY)


def _wait_live(src):
    wait_until(lambda: _status(src).returncode == 0, timeout=60)


def _no_pair_live(proc) -> bool:
    pairs = json.loads(proc.stdout)["pairs"]
    return all(p["state"] != "live" for p in pairs)


def test_a_daemon_killed_with_sigkill_is_reported_dead(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 1000)
    with live_daemon(src, dst) as d:
        converged(src, dst)
        _wait_live(src)
        d.proc.kill()  # SIGKILL: no chance to write "stopped"
        d.proc.wait()
        proc = _status(src)
        assert proc.returncode == 7, proc
        assert b"DEAD" in proc.stdout and b"live since" not in proc.stdout, proc.stdout
        proc = _status(src, "--json")
        assert proc.returncode == 7 and json.loads(proc.stdout)["daemon"] == "dead"
        assert _no_pair_live(proc)


def test_a_daemon_stopped_by_sigterm_says_stopped(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with live_daemon(src, dst) as d:
        _wait_live(src)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
        proc = _status(src, "--json")
        assert proc.returncode == 6, proc
        status = json.loads(proc.stdout)
        assert status["daemon"] == "stopped" and status["state"] == "stopped" and _no_pair_live(proc)
        assert all(p["last_state"] == "stopped" for p in status["pairs"])


def test_a_hung_daemon_is_reported_stale(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with live_daemon(src, dst) as d:
        _wait_live(src)
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            proc = wait_until(lambda: (p := _status(src)).returncode == 8 and p, timeout=30)
            assert b"STALE" in proc.stdout and b"live since" not in proc.stdout
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        _wait_live(src)  # it comes back by itself


def test_a_pid_taken_by_another_process_is_not_the_daemon(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with live_daemon(src, dst) as d:
        _wait_live(src)
        d.proc.kill()
        d.proc.wait()
    status_file = src / ".mirror" / "mirror-daemon.status.json"
    status = json.loads(status_file.read_bytes())
    status.update(pid=os.getpid(), updated=status["updated"] + 3600)  # a live pid, started at another time
    status_file.write_text(json.dumps(status))
    assert _status(src).returncode == 7


def test_status_lists_the_files_that_failed(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "ok").write_bytes(b"fine")
    os.mkfifo(src / "pipe")  # the receiver refuses FIFOs unless --allow-specials: a failed entry
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        with live_daemon(src, server.url("m"), "--secret-file", server.secret_file):
            wait_until(
                lambda: (p := _status(src)).returncode == 1 and b"failed: pipe" in p.stdout, timeout=60
            )
            status = json.loads(_status(src, "--json").stdout)
            assert status["pairs"][0]["failed_files"][0][0] == "pipe"
            assert status["pairs"][0]["last_success"] is None


def test_a_first_sync_shows_its_progress(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for d in range(40):
        (src / f"d{d}").mkdir()
        for f in range(100):
            (src / f"d{d}" / f"f{f}").write_bytes(os.urandom(16384))

    def pair():
        proc = _status(src, "--json")
        return json.loads(proc.stdout)["pairs"][0] if proc.returncode != 2 else {}

    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        with live_daemon(src, server.url("m"), "--secret-file", server.secret_file):
            # Files arrive: the first sync is under way.  Stopping the receiver holds it there.
            wait_until(lambda: any(os.scandir(dst / "d0")) if (dst / "d0").exists() else False, timeout=60)
            server.proc.send_signal(signal.SIGSTOP)
            try:
                during = wait_until(
                    lambda: (p := pair()).get("state") == "syncing" and p["progress"] and p, timeout=60
                )
            finally:
                server.proc.send_signal(signal.SIGCONT)
            _wait_live(src)
    progress = during["progress"]
    assert progress["entries"] > 0 and progress["bytes"] >= 0 and progress["entries_total"] is None, progress


def test_a_catch_up_shows_its_progress_of_the_journaled_changes(tmp_path):
    src, dst, lock = tmp_path / "src", tmp_path / "dst", tmp_path / "lock"
    src.mkdir()
    dst.mkdir()

    def pair():
        return json.loads(_status(src, "--json").stdout)["pairs"][0]

    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        with live_daemon(src, server.url("m"), "--secret-file", server.secret_file, "--lock-file", str(lock)):
            _wait_live(src)
            lock.write_text("{}")  # while locked, changes are only journaled
            wait_until(lambda: pair()["state"] == "locked")
            for i in range(300):
                (src / f"f{i}").write_bytes(os.urandom(16384))
            wait_until(lambda: pair()["pending"] >= 300, timeout=60)
            # The receiver stopped: the catch-up stays in flight, whatever the machine's speed.
            server.proc.send_signal(signal.SIGSTOP)
            try:
                lock.unlink()
                during = wait_until(
                    lambda: (p := pair())["state"] == "catching up" and p["progress"] and p, timeout=60
                )
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert during["progress"]["entries_total"] >= 300, during
            assert during["progress"]["entries"] <= during["progress"]["entries_total"]
            _wait_live(src)
            assert pair()["progress"] is None
            converged(src, dst)


def test_a_reader_holding_the_status_file_keeps_what_it_opened_while_the_daemon_rewrites_it(tmp_path):
    """The daemon rewrites its status (at least twice a second) over a spare that it swaps in:
    the spare is the file as it was before the last swap, so a reader holding it open (hawrap,
    a monitoring script, slow or stopped) saw the next content but one arrive under it, torn
    if mid-read.  The daemon tells it is held (a lease, SIGIO ignored) and sets it aside."""
    from mirror.daemon import STATUS_FILE

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    path = src / ".mirror" / STATUS_FILE.decode()
    with live_daemon(src, tmp_path / "dst") as d:
        _wait_live(src)
        with open(path, "rb") as reader:
            held = os.fstat(reader.fileno()).st_ino
            opened = reader.read()

            def set_aside() -> bool:
                assert os.pread(reader.fileno(), 1 << 20, 0) == opened  # never written under the reader
                try:  # the spare's name is made again as it is set aside
                    present = {os.stat(path).st_ino, os.stat(path.with_name(f".{path.name}.spare")).st_ino}
                except FileNotFoundError:
                    return False
                return held not in present

            wait_until(set_aside, timeout=30)
        assert d.proc.poll() is None
        assert _status(src).returncode == 0
        assert "cannot write the status file" not in d.log_text()
