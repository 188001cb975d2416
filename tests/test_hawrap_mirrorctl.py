"""hawrap's handle on the mirror engine: locks and epochs through the mirror library, data
commands built from the configured templates and run as real processes."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import time

import pytest

from hawrap import config, mirrorctl
from hawrap.errors import HawrapError
from mirror import epoch as mirror_epoch
from mirror import lockfile
from mirror.config import load_serve_config
from tests.helpers import process_state, wait_until

TEMPLATE = """
[cluster]
name = "t"
secret_file = "secret"
state_dir = "{root}/state"
[[link]]
name = "hb"
[[link]]
name = "lan"
[[node]]
name = "a"
lan_interface = "lo"
address = {{ hb = "203.0.113.1", lan = "198.51.100.11" }}
[[node]]
name = "b"
lan_interface = "lo"
address = {{ hb = "203.0.113.2", lan = "198.51.100.12" }}
[mirror]
command = ["{recorder}"]
secret_file = "msecret"
port = 9999
link = "hb"
[[mirror.tree]]
name = "spool"
path = "{root}/{{node}}/spool"
lock_file = "{root}/{{node}}.lock"
[[mirror.tree]]
name = "www"
path = "{root}/{{node}}/www"
lock_file = "{root}/{{node}}.lock"
state_dir = "{root}/{{node}}/www-state"
"""


@pytest.fixture
def exits():
    return queue.Queue()


@pytest.fixture
def ctl(tmp_path, exits):
    (tmp_path / "secret").write_text("0123456789abcdef0123")
    (tmp_path / "msecret").write_text("x" * 32)
    for name in ("secret", "msecret"):
        (tmp_path / name).chmod(0o600)
    recorder = tmp_path / "fake-mirror"
    # a stand-in for the engine's CLI that records how it was called; "sync" exits with
    # the code in $TMP/sync-exit (0 by default), the others keep running like a daemon
    recorder.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n'
        f'if [ "$1" = sync ]; then exit $(cat {tmp_path}/sync-exit 2>/dev/null || echo 0); fi\n'
        f'if [ "$1" = daemon ] && [ -f {tmp_path}/daemon-exit ]; then echo "mirror daemon: refused: stale epoch" >&2; exit $(cat {tmp_path}/daemon-exit); fi\n'
        f"if [ -f {tmp_path}/ignore-term ]; then trap '' TERM; else trap 'exit 0' TERM; fi\n"
        "while :; do sleep 0.05; done\n"
    )
    recorder.chmod(0o755)
    for sub in ("a/spool", "a/www", "state/a"):
        (tmp_path / sub).mkdir(parents=True)
    path = tmp_path / "h.toml"
    path.write_text(TEMPLATE.format(recorder=recorder, root=tmp_path))
    c = mirrorctl.MirrorControl(config.load(str(path)), "a", on_exit=lambda *e: exits.put(e))
    yield c, tmp_path
    c.close()


def calls(tmp_path):
    try:
        return (tmp_path / "calls").read_text().splitlines()
    except FileNotFoundError:
        return []


def wait_calls(tmp_path, n, timeout=10):
    deadline = time.monotonic() + timeout
    while len(calls(tmp_path)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return calls(tmp_path)


def started(c, timeout=10):
    """The processes ``c`` runs, once each is started (the stand-in may record its call
    before the starting thread has stored its handle)."""
    deadline = time.monotonic() + timeout
    while any(p.proc is None for p in c._procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [p.proc for p in c._procs]


def test_trees_resolved_per_node(ctl):
    c, tmp = ctl
    assert [t.path for t in c.trees] == [f"{tmp}/a/spool", f"{tmp}/a/www"]
    assert c.trees[0].state_dir == f"{tmp}/a/spool/.mirror" and c.trees[1].state_dir == f"{tmp}/a/www-state"
    assert c.peer_address == "203.0.113.2" and c.my_address == "203.0.113.1"


def test_locks_and_epochs_through_the_mirror_library(ctl):
    c, tmp = ctl
    c.acquire_locks("takeover by a")
    assert lockfile.status(f"{tmp}/a.lock").reason == "takeover by a"
    assert c.locked() == {"spool": True, "www": True}
    c.raise_epochs(5)
    assert c.epochs() == {"spool": 5, "www": 5}
    c.raise_epochs(5)  # every takeover raises, even past the cluster epoch
    assert c.epochs() == {"spool": 6, "www": 6}
    c.observe_epochs(3)
    assert mirror_epoch.read_epoch(f"{tmp}/a/www-state") == 6
    c.release_locks()
    assert c.locked() == {"spool": False, "www": False}


def test_sending_runs_one_daemon_per_tree_and_stops_them(ctl):
    c, tmp = ctl
    c.set_direction("send")
    got = wait_calls(tmp, 2)
    secret = f"{tmp}/msecret"
    assert sorted(got) == sorted([
        f"daemon {tmp}/a/spool mirror://203.0.113.2:9999/spool --secret-file {secret} --lock-file {tmp}/a.lock --state-dir {tmp}/a/spool/.mirror --reconcile-interval 3600",
        f"daemon {tmp}/a/www mirror://203.0.113.2:9999/www --secret-file {secret} --lock-file {tmp}/a.lock --state-dir {tmp}/a/www-state --reconcile-interval 3600",
    ])  # fmt: skip
    procs = started(c)
    c.set_direction("receive")
    assert all(p.poll() is not None for p in procs)
    got = wait_calls(tmp, 3)
    # www has a state dir of its own: the receiver gets every module's from a generated config
    assert got[2] == f"serve --config {tmp}/state/a/mirror-serve.toml"
    modules = load_serve_config(f"{tmp}/state/a/mirror-serve.toml").modules
    assert modules["www"].state_dir == os.fsencode(f"{tmp}/a/www-state")
    assert modules["spool"].state_dir == os.fsencode(f"{tmp}/a/spool/.mirror")
    c.set_direction(None)
    assert c._procs == []


def test_a_daemon_that_exits_is_restarted(ctl, monkeypatch):
    c, tmp = ctl
    monkeypatch.setattr(mirrorctl, "RESTART_DELAY", 0.05)
    c.set_direction("send")
    wait_calls(tmp, 2)
    first = started(c)[0]
    first.kill()

    def restarted():
        proc = c._procs[0].proc  # None between the exit and the restart
        return proc is not None and proc is not first and proc.poll() is None

    deadline = time.monotonic() + 10
    while not restarted() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert restarted()


def test_final_sync_runs_sync_with_delete_and_reports_failure(ctl):
    c, tmp = ctl
    c.final_sync()
    assert (
        calls(tmp)[0]
        == f"sync {tmp}/a/spool mirror://203.0.113.2:9999/spool --delete --secret-file {tmp}/msecret --state-dir {tmp}/a/spool/.mirror"
        f" --timeout {mirrorctl.FINAL_SYNC_SILENCE:g}"  # a frozen receiver holds the hand-over 15 s, not 2 min
    )
    (tmp / "sync-exit").write_text("4")
    with pytest.raises(HawrapError, match="final sync of spool failed \\(exit 4\\)"):
        c.final_sync()


def test_unknown_placeholder_names_the_config(ctl, tmp_path):
    c, tmp = ctl
    with pytest.raises(HawrapError, match="unknown placeholder"):
        c._argv(("{mirror}", "{nope}"), c.trees[0])


def test_engine_available_is_false_for_a_missing_command(tmp_path):
    assert not mirrorctl.engine_available((os.path.join(str(tmp_path), "no-such-mirror"),))


def test_an_exiting_daemon_is_reported_with_its_code_and_last_words(ctl, exits, monkeypatch):
    c, tmp = ctl
    monkeypatch.setattr(mirrorctl, "RESTART_DELAY", 0.05)
    (tmp / "daemon-exit").write_text("4")
    c.set_direction("send")
    got = {exits.get(timeout=10)[:2] for _ in range(2)}
    assert got == {("daemon spool", 4), ("daemon www", 4)}
    name, code, message = exits.get(timeout=10)
    assert code == 4 and message == "mirror daemon: refused: stale epoch"


def _status(tmp, state="live", lag=0.0, updated=None, unseen=0, pid=1, unwatched=0):
    path = tmp / "a" / "spool" / ".mirror" / "mirror-daemon.status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    pair = {
        "name": "spool",
        "state": state,
        "lag_seconds": lag,
        "last_error": "connection refused" if state != "live" else None,
        "unseen_repaired": unseen,
        "last_unseen": ["new/1", "cur/2"][:unseen],
        "unwatched_count": unwatched,
        "unwatched_dirs": [["cur", "the inotify watch limit"]][:unwatched],
    }
    path.write_text(
        json.dumps({"pid": pid, "updated": time.time() if updated is None else updated, "pairs": [pair]})
    )


def test_replica_state_from_the_daemons_status(ctl):
    c, tmp = ctl
    assert c.replica() == mirrorctl.Replica(False, "not mirroring toward the peer")
    c.set_direction("send")
    (tmp / "a" / "www-state").mkdir()
    www = tmp / "a" / "www-state" / "mirror-daemon.status.json"

    def written(updated=None, **spool):
        """Both daemons write their status (``updated``: the wall-clock time they write)."""
        when = time.time() if updated is None else updated
        www.write_text(json.dumps({"updated": when, "pairs": [{"state": "live", "lag_seconds": 0.1}]}))
        _status(tmp, updated=when, **spool)

    written()
    # what the files say when the daemons have just started may be their predecessors'
    assert not c.replica().in_sync and "no fresh status" in c.replica().detail
    written()
    assert c.replica().in_sync
    written(lag=5.0)  # live, but further behind than mirror.max_lag
    assert c.replica() == mirrorctl.Replica(False, "spool: 5.0 s behind")
    written(state="disconnected")
    assert c.replica() == mirrorctl.Replica(False, "spool: disconnected (connection refused)")
    # live and caught up, but a directory it cannot watch sends its changes by rescans only
    written(unwatched=1)
    assert c.replica() == mirrorctl.Replica(
        False, "spool: 1 source directories not watched, their changes late by up to a minute "
               "(e.g. cur: the inotify watch limit)")  # fmt: skip
    # the wall clock stepped back an hour: a status written since is as fresh as any
    written(updated=time.time() - 3600)
    assert c.replica().in_sync
    # a daemon that stops writing its status is stale STATUS_STALE s on, whatever time it wrote
    written(updated=time.time() + 3600)
    assert c.replica().in_sync
    wait_until(lambda: "no fresh status" in c.replica().detail, timeout=mirrorctl.STATUS_STALE + 5)


def test_a_peer_copy_found_changed_behind_the_mirror_is_told_once(ctl):
    """The daemon's scheduled compares count what they repaired with no change seen here
    (``unseen_repaired``): each rise is told to the administrator once, and a daemon started
    again counts from 0."""
    c, tmp = ctl
    c.set_direction("send")
    (tmp / "a" / "www-state").mkdir()
    www = tmp / "a" / "www-state" / "mirror-daemon.status.json"

    def told_after(unseen: int, pid: int = 1) -> list[str]:
        www.write_text(json.dumps({"updated": time.time(), "pairs": [{"state": "live", "lag_seconds": 0}]}))
        _status(tmp, unseen=unseen, pid=pid)
        c.replica()
        return c.diverged()

    assert [told_after(n) for n in (0, 0)] == [[], []]
    told = told_after(2)
    assert len(told) == 1 and "spool" in told[0] and "2 entries, e.g. new/1, cur/2" in told[0], told
    assert told_after(2) == []
    told = told_after(1, pid=2)  # its daemon started again
    assert len(told) == 1 and "(1 entry, e.g. new/1)" in told[0], told


def test_mirror_processes_left_by_a_dead_node_are_stopped_by_cleanup(ctl):
    c, tmp = ctl
    c.set_direction("send")
    wait_calls(tmp, 2)
    pids = [p.pid for p in started(c)]
    assert sorted(os.listdir(tmp / "state" / "a")) == ["mirror-daemon-spool.pid", "mirror-daemon-www.pid"]
    stopped = mirrorctl.stop_orphans(str(tmp / "state" / "a"))  # as if the node process had died
    assert len(stopped) == 2 and os.listdir(tmp / "state" / "a") == []
    for p in c._procs:
        p.proc.wait(5)  # reaped by their supervising threads too; here: they are gone
    assert all(
        not os.path.exists(f"/proc/{pid}/cmdline") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        for pid in pids
    )


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return process_state(pid) not in ("", "Z")


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_stopped_receiver_is_continued_and_stops_on_sigterm(ctl):
    """A receiver frozen by SIGSTOP (with everything it started) holds SIGTERM pending: the
    stop continues it, so that it exits cleanly on SIGTERM (the stand-in's trap exits 0)
    instead of waiting out the grace for SIGKILL."""
    c, tmp = ctl
    c.set_direction("receive")
    wait_calls(tmp, 1)
    proc = started(c)[0]
    os.killpg(proc.pid, signal.SIGSTOP)
    assert _wait(lambda: process_state(proc.pid) == "T")
    c.stop_processes(grace=60)
    assert proc.returncode == 0, f"exit {proc.returncode}: it did not act on SIGTERM"
    assert not os.path.exists(tmp / "state" / "a" / "mirror-serve.pid")


def test_a_receiver_ignoring_sigterm_is_killed_after_the_grace(ctl):
    c, tmp = ctl
    (tmp / "ignore-term").write_text("")
    c.set_direction("receive")
    wait_calls(tmp, 1)
    proc = started(c)[0]
    c.stop_processes(grace=0.5)
    assert proc.returncode == -signal.SIGKILL and not _alive(proc.pid)
    assert c._procs == []


PARENT = """
import os, sys, time
sys.path.insert(0, {root!r})
from hawrap import config, mirrorctl
c = mirrorctl.MirrorControl(config.load({config!r}), "a")
c.set_direction({direction!r})
while not all(p.proc is not None for p in c._procs):
    time.sleep(0.01)
print(" ".join(str(p.proc.pid) for p in c._procs), flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize("direction", ["receive", "send"])
def test_mirror_processes_die_with_a_node_process_killed_by_sigkill(ctl, direction):
    """A node process killed with SIGKILL (no supervisor left to clean up): the kernel kills
    its receiver or daemons with it (parent-death signal), none mirrors on its own."""
    if not mirrorctl.parent_death_prefix():
        pytest.skip("util-linux setpriv with --pdeathsig is not installed")
    c, tmp = ctl
    root = os.path.dirname(os.path.dirname(os.path.abspath(mirrorctl.__file__)))
    script = PARENT.format(root=root, config=c.cfg.path, direction=direction)
    node = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in node.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
        node.kill()
        node.wait(10)
        assert _wait(lambda: not any(_alive(p) for p in pids)), [p for p in pids if _alive(p)]
    finally:
        node.kill()
        node.wait(10)
        node.stdout.close()
        for p in pids if "pids" in locals() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def test_a_status_that_stops_changing_is_stuck_after_a_wait_that_doubles_with_each_restart():
    watch = mirrorctl.StatusWatch()
    assert watch.fresh(1, 100.0) is False  # what the file said when the daemon started
    assert watch.fresh(1, 100.5) is True and watch.stuck(1) is None
    watch.changed -= mirrorctl.STUCK_SECONDS + 1  # no change seen since: as if that long ago
    assert watch.stuck(1) is not None and watch.stuck(0) is None  # (another daemon's: not this one's)
    watch.restarts += 1  # killed; started again (start 2), and still nothing changes
    assert watch.fresh(2, 100.5) is False and watch.stuck(2) is None
    watch.changed -= 2 * mirrorctl.STUCK_SECONDS + 1
    assert watch.stuck(2) > 2 * mirrorctl.STUCK_SECONDS
    assert watch.fresh(2, 101.0) is True and watch.restarts == 0  # it writes again


def test_a_status_with_the_daemons_monotonic_time_is_judged_by_it_at_the_first_look():
    started = time.monotonic()
    watch = mirrorctl.StatusWatch()
    # written by this daemon just now: fresh at once, whatever the wall-clock time says
    assert watch.fresh(1, time.time() - 3600, time.monotonic(), started)
    # written before this daemon started (a predecessor's), or too long ago: not fresh
    assert not mirrorctl.StatusWatch().fresh(1, time.time(), started - 1, started)
    assert not mirrorctl.StatusWatch().fresh(1, time.time(), time.monotonic() - mirrorctl.STATUS_STALE - 1, 0.0)


def test_a_receiver_that_does_not_answer_a_hello_is_found_silent(tmp_path):
    """The probe of a secondary's receiver, on a real ``mirror serve``: at work, it answers
    (a challenge, or a refusal for a module it does not serve); stopped (SIGSTOP: the kernel
    still takes the connection), it is silent; nothing listening is its supervisor's case."""
    from tests.servers import mirror_server

    (tmp_path / "data").mkdir()
    with mirror_server(tmp_path, {"data": str(tmp_path / "data")}) as server:
        assert mirrorctl.receiver_silent(server.host, server.port, "data") == ""
        assert mirrorctl.receiver_silent(server.host, server.port, "no-such-module") == ""
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            why = mirrorctl.receiver_silent(server.host, server.port, "data", timeout=0.5)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert why == "it did not answer a hello within 0.5 s"
        port = server.port
    assert mirrorctl.receiver_silent("127.0.0.1", port, "data", timeout=0.5) == ""


def test_a_silent_receiver_is_reported_once_per_probe_and_the_wait_doubles(tmp_path, monkeypatch):
    """ReceiverWatch over a real receiver: probed only after the primary has said "not in
    sync" for STUCK_SECONDS, in a thread; silent: reported once, and the next probe waits
    twice as long; answering: never reported, and the count starts again; the primary in
    sync again: all forgotten."""
    from tests.servers import mirror_server

    monkeypatch.setattr(mirrorctl, "STUCK_SECONDS", 0.3)
    (tmp_path / "data").mkdir()
    with mirror_server(tmp_path, {"data": str(tmp_path / "data")}) as server:
        watch = mirrorctl.ReceiverWatch(lambda: mirrorctl.receiver_silent(server.host, server.port, "data", 0.3))
        reports: list[tuple[float, str]] = []

        def run(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                why = watch.check(True)
                if why:
                    reports.append((time.monotonic(), why))
                time.sleep(0.01)

        run(1.0)  # answering: probed (after 0.3 s, then again) and never reported
        assert reports == [] and watch.restarts == 0
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            run(2.2)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        # silent: the first probe may have started before the stop; each report ends a 0.3 s
        # probe, and the wait before the next one doubles
        assert 1 <= len(reports) <= 3 and watch.restarts == len(reports), reports
        assert reports[0][1] == "it did not answer a hello within 0.3 s"
        gaps = [b[0] - a[0] for a, b in zip(reports, reports[1:], strict=False)]
        assert all(gap > 0.6 for gap in gaps), gaps
        # answering again: the next probe starts the count again
        end = time.monotonic() + 0.3 * 2**watch.restarts + 2.0
        while watch.restarts and time.monotonic() < end:
            assert watch.check(True) == ""
            time.sleep(0.01)
        assert watch.restarts == 0
        watch.check(False)
        assert watch.since is None
