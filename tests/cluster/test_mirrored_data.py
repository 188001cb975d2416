"""The scenarios that need real data mirroring: data intact and newest after a failover, a
resync after resume, no data lost in a planned failover, and a stale former primary fenced
off by the epoch.  hawrap drives ``mirror daemon`` / ``mirror serve`` / ``mirror sync``
(issues 4 and 5); until ``mirror sync --help`` works these are skipped, and they run by
themselves as soon as the engine lands.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from helpers import PollingThread, process_state
from lab import (
    MIRROR,
    NODE_HB,
    Hawrap,
    Probe,
    mirror_section,
    snapshot,
    tree,
    wait_for,
    write_config,
    write_files,
)
from lab import MIRROR_PORT as PORT
from test_failover import Cluster

from hawrap.mirrorctl import PROBE_TIMEOUT, STUCK_SECONDS, engine_available
from mirror import epoch as mirror_epoch
from mirror import lockfile
from mirror.errors import EXIT_LOCKED, EXIT_STALE_EPOCH

pytestmark = pytest.mark.skipif(
    not engine_available(tuple(MIRROR)),
    reason="waits for the mirror engine: 'mirror sync|serve|daemon --help' fails",
)


def converged(lab, timeout: float = 30.0) -> bool:
    return bool(wait_for(lambda: snapshot(tree(lab, "a")) == snapshot(tree(lab, "b")), timeout, 0.2))


def start_mirrored(c: Cluster, extra: str) -> None:
    """Start hawrap on both nodes of ``c`` with ``extra`` (a [mirror] section): a primary, b
    a secondary that knows its copy up to date; a client probing the VIP."""
    c.config = write_config(c.lab, extra=extra)
    c.h = Hawrap(c.lab, c.config)
    c.h.start("a")
    c.h.start("b")
    c.expect_roles(primary="a", other="secondary")
    # b knows its copy up to date (a's daemon has made its first sync and said so)
    assert wait_for(lambda: c.h.status("b")["data"]["uptodate"], 20), c.h.logs()
    c.probe = Probe(c.lab)


@pytest.fixture
def mcluster(lab, rng):
    c = Cluster(lab, rng, start=False)
    start_mirrored(c, mirror_section(lab))
    yield c
    c.stop()


def test_failover_keeps_newest_data_and_resume_resyncs(mcluster):
    c, lab = mcluster, mcluster.lab
    write_files(tree(lab, "a"), "before", 200)
    assert converged(lab), "the primary's changes did not reach the secondary"
    before = snapshot(tree(lab, "a"))
    t0 = c.random_phase()
    lab.power_off("a")
    assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
    assert snapshot(tree(lab, "b")) == before  # intact on the survivor
    assert lockfile.is_locked(os.path.join(lab.workdir, "data", "b.mirror.lock"))
    write_files(tree(lab, "b"), "after", 50)  # the survivor's newer data
    newest = snapshot(tree(lab, "b"))
    lab.power_on("a")
    c.h.start("a")
    assert wait_for(lambda: c.h.role("a") == "standby", 15), c.h.logs()
    time.sleep(1.0)
    assert snapshot(tree(lab, "b")) == newest  # nothing flowed back from the stale node
    r = c.h.cli("a", "resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert converged(lab), "resync after resume did not bring the survivor's changes back"
    assert snapshot(tree(lab, "a")) == newest
    assert c.h.cli("a", "failback").returncode == 0
    c.expect_roles(primary="a", other="secondary")
    assert snapshot(tree(lab, "a")) == newest and converged(lab)
    c.report("failover with mirrored data", t0, "b")


def test_planned_failover_loses_no_data(mcluster):
    c, lab = mcluster, mcluster.lab
    write_files(tree(lab, "a"), "burst", 300)
    r = c.h.cli("a", "failover")  # stop writes, final sync, switch
    assert r.returncode == 0, r.stdout + r.stderr
    c.expect_roles(primary="b", other="secondary")
    assert snapshot(tree(lab, "b")) == snapshot(tree(lab, "a"))


def freeze_and_write(c: Cluster, node: str, pid_file: str, n: int) -> dict[str, str]:
    """a's tree mirrored to b; then one mirror process of ``node`` frozen (SIGSTOP) and ``n``
    files written on a that b lacks, until b counts its copy outdated.  Returns a's copy."""
    a = tree(c.lab, "a")
    write_files(a, "before", 10)
    assert converged(c.lab), c.h.logs()
    with open(os.path.join(c.lab.workdir, "state", node, pid_file)) as f:
        os.kill(int(f.read()), signal.SIGSTOP)
    write_files(a, "unsent", n)
    assert wait_for(lambda: not c.h.status("b")["data"]["uptodate"], 20), c.h.logs()
    return snapshot(a)


def test_standby_on_the_primary_hands_over_what_its_daemon_had_not_sent(mcluster):
    """``hawrap standby`` on a primary whose mirror daemon is behind (frozen: SIGSTOP) while
    30 files were written that b lacks, so that b counts its copy outdated.  Standing by at
    once would leave them on a alone: b would not take over on its own (nobody serving) and
    a's ``resume`` would list them.  a hands over first: services stopped, a final sync, the
    VIP dropped; b serves every file a served from its first answer (sampled throughout);
    a stands by; its ``resume`` lists nothing and it receives b's writes."""
    c, lab = mcluster, mcluster.lab
    a, b = tree(lab, "a"), tree(lab, "b")
    served = freeze_and_write(c, "a", "mirror-daemon-data.pid", 30)
    assert snapshot(b) != served  # b lacks them (the daemon is killed as stuck only later)
    first_served: dict = {}

    def sample():  # b's copy the first time b holds the VIP
        if "tree" not in first_served and lab.vip_on("b"):
            first_served["tree"] = snapshot(b)

    t0 = time.monotonic()
    with PollingThread(sample) as sampler:
        r = c.h.cli("a", "standby", "--reason", "maintenance")
        assert r.returncode == 0 and "b took over" in r.stdout, r.stdout + r.stderr + c.h.logs()
        assert wait_for(lambda: "tree" in first_served, 10), c.h.logs()
    assert sampler.polls > 1
    assert first_served["tree"] == served, "b served without what a served"
    c.served_by("b", since=t0)
    c.report("standby of a primary whose daemon is behind", t0, "b")
    assert c.h.role("a") == "standby" and c.h.status("a")["standby_lock"]["reason"] == "maintenance"
    write_files(b, "after", 10)
    r = c.h.cli("a", "resume")
    assert r.returncode == 0 and "holds changes" not in r.stdout, r.stdout + r.stderr
    assert converged(lab), c.h.logs()
    assert snapshot(a) == snapshot(b) and not os.path.exists(os.path.join(a, ".mirror", "kept"))


def test_standby_whose_final_sync_meets_a_frozen_receiver_leaves_no_one_serving_old_data(mcluster):
    """b's mirror receiver frozen (SIGSTOP) while a writes 10 files b lacks, then ``hawrap
    standby`` on a: its hand-over's final sync gets no answer and gives up (after
    FINAL_SYNC_SILENCE, 15 s, or when b's probe replaces the receiver, whichever comes
    first); a stands by all the same (the lock), saying so.  b, whose copy
    lacks a's last files, never takes the VIP (sampled throughout),
    and says it is outdated.  a, resumed, serves again and b gets every file once its
    receiver is replaced."""
    from hawrap.mirrorctl import FINAL_SYNC_SILENCE

    c, lab = mcluster, mcluster.lab
    b = tree(lab, "b")
    served = freeze_and_write(c, "b", "mirror-serve.pid", 10)
    held: list = []
    with PollingThread(lambda: held.append(lab.vip_on("b")), interval=0.05) as sampler:
        t0 = time.monotonic()
        r = c.h.cli("a", "standby")
        took = time.monotonic() - t0
        assert r.returncode == 4 and "final sync failed" in r.stdout, r.stdout + r.stderr + c.h.logs()
        assert "nobody serves: b knows its copy outdated" in r.stderr, r.stderr
        assert c.h.role("a") == "standby"
        assert c.notified("the peer went to standby, and this node's copy may lack", 10), c.h.logs()
        assert c.h.role("b") != "primary" and c.h.status("b")["data"]["uptodate"] is False
    assert sampler.polls > 10 and not any(held), "b took the VIP without a's last files"
    # given up when silent for FINAL_SYNC_SILENCE, or sooner if b's own probe replaced the receiver
    assert took < FINAL_SYNC_SILENCE + 10, took
    print(f"standby with a frozen receiver: a stood by {took:.1f} s after the command")
    r = c.h.cli("a", "resume", "--keep-local-changes")
    assert r.returncode == 0, r.stdout + r.stderr
    c.expect_roles(primary="a", other="secondary")
    assert converged(lab, 60), c.h.logs()
    assert snapshot(b) == served


def test_a_node_that_starts_while_its_peer_stands_by_with_newer_data_does_not_serve(mcluster):
    """b's hawrap stopped (a reboot, say); a serves on alone, writing 20 files b lacks, then
    is put in standby (nobody to hand over to: at once, nobody serves).  b starts knowing its
    copy up to date from before.  a's heartbeats say that a holds changes b lacks, so b
    counts its copy outdated, says so, and never takes the VIP (sampled).  a, resumed (what
    it held copied aside first), ranks first and serves again; b gets every file."""
    c, lab = mcluster, mcluster.lab
    a, b = tree(lab, "a"), tree(lab, "b")
    write_files(a, "before", 10)
    assert converged(lab), c.h.logs()
    c.h.stop("b")
    assert wait_for(lambda: not c.h.status("a")["peer"]["alive"], 10), c.h.logs()
    write_files(a, "alone", 20)
    served = snapshot(a)
    assert wait_for(lambda: c.h.status("a")["data"]["peer_outdated"], 10), c.h.logs()
    r = c.h.cli("a", "standby")
    assert r.returncode == 4 and "a: standby" in r.stdout and "nobody serves: b is silent" in r.stderr, r.stdout + r.stderr
    held: list = []
    with PollingThread(lambda: held.append(lab.vip_on("b")), interval=0.02) as sampler:
        c.h.start("b")
        assert c.notified("the peer is in standby, and this node's copy may lack", 20), c.h.logs()
        assert c.h.status("b")["data"]["uptodate"] is False and c.h.role("b") != "primary"
        shown = c.h.cli("b", "status").stdout
        assert "NOT known up to date" in shown and "a says it holds changes this copy lacks" in shown, shown
    assert sampler.polls > 10 and not any(held), "b took the VIP with its old copy"
    assert snapshot(b) != served
    r = c.h.cli("a", "resume", "--keep-local-changes")
    assert r.returncode == 0 and "b does not serve and knows its copy lacks these changes" in r.stdout, r.stdout
    c.expect_roles(primary="a", other="secondary")
    assert converged(lab), c.h.logs()
    assert snapshot(b) == served


def test_stale_former_primary_never_overwrites_newer_data(mcluster):
    c, lab = mcluster, mcluster.lab
    write_files(tree(lab, "a"), "v1", 20)
    assert converged(lab)
    lab.power_off("a")
    assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
    target = os.path.join(tree(lab, "b"), "d0", "v1-0.bin")
    with open(target, "wb") as f:
        f.write(b"newer data written on the survivor")
    newest = snapshot(tree(lab, "b"))
    epoch_b = mirror_epoch.read_epoch(os.path.join(tree(lab, "b"), ".mirror"))
    epoch_a = mirror_epoch.read_epoch(os.path.join(tree(lab, "a"), ".mirror"))
    assert epoch_b > epoch_a
    # A receiver on b as if it still listened, and b's mirroring lock lifted, so that only
    # the epoch stands between the stale node and the newer data.
    c.h.stop("b")
    lockfile.release(os.path.join(lab.workdir, "data", "b.mirror.lock"))
    lab.power_on("a")
    secret = os.path.join(lab.workdir, "mirror-secret")
    serve = lab.spawn(
        "b",
        [
            *MIRROR,
            "serve",
            "--listen",
            f"{NODE_HB['b']}:{PORT}",
            "--module",
            f"data={tree(lab, 'b')}",
            "--secret-file",
            secret,
            "--lock-file",
            os.path.join(lab.workdir, "data", "b.mirror.lock"),
        ],
        "serve-b.log",
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            r = lab.run_in(
                "a",
                *MIRROR,
                "sync",
                tree(lab, "a"),
                f"mirror://{NODE_HB['b']}:{PORT}/data",
                "--delete",
                "--secret-file",
                secret,
                check=False,
                timeout=60,
            )
            if r.returncode in (EXIT_STALE_EPOCH, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the receiver may still be starting
        assert r.returncode == EXIT_STALE_EPOCH, (r.returncode, r.stderr)
        assert snapshot(tree(lab, "b")) == newest
        # and with b's lock present the refusal is the lock's
        lockfile.acquire(os.path.join(lab.workdir, "data", "b.mirror.lock"), reason="test")
        r = lab.run_in(
            "a",
            *MIRROR,
            "sync",
            tree(lab, "a"),
            f"mirror://{NODE_HB['b']}:{PORT}/data",
            "--delete",
            "--secret-file",
            secret,
            check=False,
            timeout=60,
        )
        assert r.returncode in (EXIT_LOCKED, EXIT_STALE_EPOCH)
        assert snapshot(tree(lab, "b")) == newest
    finally:
        serve.terminate()
        serve.wait(10)


def test_status_shows_the_mirror_state_and_lag(mcluster):
    c = mcluster
    r = c.h.cli("a", "status")
    assert r.returncode == 0 and "mirror data: live, lag " in r.stdout, r.stdout
    assert ", last whole-tree compare 20" in r.stdout, r.stdout  # the first sync compared it whole
    trees = json.loads(c.h.cli("a", "status", "--json").stdout)["mirror"]["trees"]
    assert trees[0]["name"] == "data" and trees[0]["daemon"] == "running"
    assert trees[0]["pairs"][0]["state"] == "live" and "lag_seconds" in trees[0]["pairs"][0]
    # the secondary receives: it runs no daemon for the tree
    assert json.loads(c.h.cli("b", "status", "--json").stdout)["mirror"]["trees"][0]["daemon"] is None


def test_a_frozen_receiver_is_gone_before_the_takeover_serves_anything(mcluster):
    """b's receiver is frozen (SIGSTOP: a debugger, a stalled cgroup) when a loses power.  The
    mirroring lock b takes cannot reach a frozen process, which would carry out the operation it
    stopped in (a rename past its last look at the lock) once continued.  So b kills it before
    its services start: a reader polling every millisecond never sees b's service up while the
    receiver exists, and the receiver never runs again (it is not continued)."""
    c, lab = mcluster, mcluster.lab
    with open(os.path.join(lab.workdir, "state", "b", "mirror-serve.pid")) as f:
        pid = int(f.read())
    service = os.path.join(lab.workdir, "b.service.pid")
    overlap: list[float] = []  # when b's service was seen up while the receiver existed
    seen = threading.Event()

    def sample() -> None:
        alive, up = process_state(pid) not in ("", "Z"), os.path.exists(service)
        if up and alive:
            overlap.append(time.monotonic())
        if up:
            seen.set()

    os.kill(pid, signal.SIGSTOP)
    assert wait_for(lambda: process_state(pid) == "T", 10)
    with PollingThread(sample, interval=0.001) as sampler:
        lab.power_off("a")
        assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
        assert seen.wait(10), c.h.logs()
        assert wait_for(lambda: process_state(pid) in ("", "Z"), 10), "the frozen receiver was left"
    assert sampler.polls > 0 and overlap == [], f"b served {overlap[-1] - overlap[0]:.3f} s beside its receiver"



def test_a_receiver_frozen_in_the_middle_of_a_batch_leaves_only_whole_files_to_the_survivor(mcluster):
    """b's receiver frozen while a's burst of new files is half through it (some committed,
    more queued or on their way), then a loses power.  b takes over with every file of the
    burst either whole or absent, never torn or half-renamed, sampled from the freeze to
    after its service starts; and the receiver is killed, never continued."""
    c, lab = mcluster, mcluster.lab
    with open(os.path.join(lab.workdir, "state", "b", "mirror-serve.pid")) as f:
        pid = int(f.read())
    write_files(tree(lab, "a"), "burst", 600, size=60_000)
    written = {p: d for p, d in snapshot(tree(lab, "a")).items() if "burst" in p}

    def arrived() -> int:  # names only: hashing each round would be slower than the burst
        return sum(1 for d, _, names in os.walk(tree(lab, "b")) for n in names
                   if os.path.relpath(os.path.join(d, n), tree(lab, "b")) in written)  # fmt: skip

    assert wait_for(lambda: arrived() > 0, 30, 0.005), c.h.logs()
    os.kill(pid, signal.SIGSTOP)
    assert wait_for(lambda: process_state(pid) == "T", 10)
    frozen_with = arrived()
    torn: list[str] = []

    def sample() -> None:
        for path, digest in snapshot(tree(lab, "b")).items():
            if path in written and digest != written[path]:
                torn.append(path)

    with PollingThread(sample, interval=0.01) as sampler:
        lab.power_off("a")
        assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
        assert wait_for(lambda: process_state(pid) in ("", "Z"), 10), "the frozen receiver was left"
        assert wait_for(lambda: os.path.exists(os.path.join(lab.workdir, "b.service.pid")), 10), c.h.logs()
    assert sampler.polls > 0 and not torn, f"torn files on the survivor: {sorted(set(torn))[:5]}"
    held = snapshot(tree(lab, "b"))
    assert all(held[p] == written[p] for p in held if p in written)
    print(f"frozen with {frozen_with} of {len(written)} files of the burst in place; the survivor holds "
          f"{sum(1 for p in held if p in written)}")  # fmt: skip


# the frozen process: on which node, its pid file, how long until it is killed, what is told
_FROZEN = {
    "daemon": ("a", "mirror-daemon-data.pid", STUCK_SECONDS + 10, "killed, to be started again"),
    "receiver": ("b", "mirror-serve.pid", STUCK_SECONDS + PROBE_TIMEOUT + 15,
                 "the mirror receiver: it did not answer a hello"),
}  # fmt: skip


@pytest.mark.parametrize("process", ["daemon", "receiver"])
def test_a_frozen_mirror_process_is_started_again_and_the_standby_catches_up(mcluster, process):
    """a's mirror daemon, or b's receiver, frozen (SIGSTOP: a debugger, a frozen cgroup; a
    deadlock looks the same from outside) while a serves: it never exits, nothing reaches b,
    whose copy is counted outdated, so that b could not take over.  The daemon: a sees its
    status stop changing and kills it after STUCK_SECONDS.  The receiver (the primary cannot
    restart a process on b): b hears a say its replica is not in sync for STUCK_SECONDS,
    probes its receiver, finds it silent, kills it.  Either is started again by its
    supervisor: what a wrote meanwhile reaches b, b is up to date again, the administrator
    is told."""
    c, lab = mcluster, mcluster.lab
    node, pid_file, within, told = _FROZEN[process]
    write_files(tree(lab, "a"), "before", 20)
    assert converged(lab), c.h.logs()
    with open(os.path.join(lab.workdir, "state", node, pid_file)) as f:
        frozen = int(f.read())
    os.kill(frozen, signal.SIGSTOP)
    write_files(tree(lab, "a"), "while-frozen", 20)
    assert wait_for(lambda: not c.h.status("b")["data"]["uptodate"], 20), c.h.logs()
    assert wait_for(lambda: process_state(frozen) in ("", "Z"), within), f"the frozen {process} was left"
    assert converged(lab), c.h.logs()
    assert wait_for(lambda: c.h.status("b")["data"]["uptodate"], 20), c.h.logs()
    assert c.notified(told, 5), c.h.logs()


def test_a_primary_lost_while_its_daemon_compares_the_whole_tree_is_taken_over_from(mcluster):
    """A file with two names changed through one of them makes a's daemon compare the whole
    tree after its session (at most every 10 s).  Such a compare checks a replica that is up
    to date, but the pair said ``syncing`` meanwhile, a's heartbeats said its replica was not
    in sync, and b counted its copy outdated: a lost then was not taken over from without the
    administrator.  Here the compare is held by b's receiver, frozen (SIGSTOP); b's view of
    its copy is sampled meanwhile, then a loses power: b takes over on its own."""
    from mirror.daemon import load_status

    c, lab = mcluster, mcluster.lab
    a, b = tree(lab, "a"), tree(lab, "b")
    status = os.path.join(a, ".mirror")
    write_files(a, "before", 50)
    with open(os.path.join(a, "mail"), "wb") as f:
        f.write(b"one message in two mailboxes")
    os.link(os.path.join(a, "mail"), os.path.join(a, "d0", "same-mail"))
    assert converged(lab), c.h.logs()  # the new name's session, and the compare it calls for at once
    with open(os.path.join(a, "mail"), "r+b") as f:
        f.write(b"ONE")  # its compare is due 10 s after the last one
    assert wait_for(lambda: open(os.path.join(b, "mail"), "rb").read().startswith(b"ONE"), 10), c.h.logs()
    sessions: list = []

    def settled() -> bool:  # the change's sessions (its modify, its close) are over
        pair = load_status(status).pairs[0]
        sessions.append((pair["sessions"], pair["pending"], pair["progress"]))
        return len(sessions) > 4 and len(set(sessions[-5:])) == 1 and sessions[-1][1:] == (0, None)

    assert wait_for(settled, 8, 0.2), sessions
    with open(os.path.join(lab.workdir, "state", "b", "mirror-serve.pid")) as f:
        receiver = int(f.read())
    os.kill(receiver, signal.SIGSTOP)  # the compare to come waits for it
    assert wait_for(lambda: load_status(status).pairs[0]["progress"] is not None, 20), load_status(status).pairs[0]
    views, until = [], time.monotonic() + 2  # several of a's heartbeats (every 0.5 s)
    while time.monotonic() < until:
        views.append(c.h.status("b")["data"]["uptodate"])
    assert len(views) > 1 and all(views), (views, c.h.logs())
    assert load_status(status).pairs[0]["progress"] is not None  # still comparing
    lab.power_off("a")
    assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()


@pytest.fixture
def reconciling(lab, rng):
    """As ``mcluster``, with a's daemon comparing the whole tree every second."""
    c = Cluster(lab, rng, start=False)
    start_mirrored(c, mirror_section(lab, "reconcile_interval = 1.0"))
    yield c
    c.stop()


def test_a_standby_copy_written_to_behind_the_mirror_is_made_exact_and_told(reconciling):
    """b's copy changed behind the mirror (a file edited, one removed, a stray one left: a
    service started on the standby by mistake, a restore by hand): no event on a tells a's
    daemon.  Its scheduled compare (``mirror.reconcile_interval``) makes b's copy exact again,
    the administrator is told what was found, and b's copy is counted up to date throughout
    (sampled): a compare is no gap in the replication."""
    from mirror.daemon import load_status

    c, lab = reconciling, reconciling.lab
    a, b = tree(lab, "a"), tree(lab, "b")
    write_files(a, "mail", 30)
    assert converged(lab), c.h.logs()
    # What changed on a within a second of a compare may be a change whose event is on its
    # way, not reported: a's tree is left older than that, so b's changes stand alone.
    newest = max(os.lstat(os.path.join(d, n)).st_ctime for d, ds, fs in os.walk(a) for n in [".", *ds, *fs])
    assert wait_for(lambda: time.time() - newest > 1.5, 5)
    victims = sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) if ".mirror" not in d
                     for f in fs)[:2]  # fmt: skip
    views: list[bool] = []
    with PollingThread(lambda: views.append(c.h.status("b")["data"]["uptodate"]), interval=0.2):
        with open(os.path.join(b, victims[0]), "r+b") as f:
            f.write(b"written on the standby")
        os.unlink(os.path.join(b, victims[1]))
        with open(os.path.join(b, "d0", "stray"), "wb") as f:
            f.write(b"not on the primary")
        assert converged(lab), c.h.logs()
        assert c.notified("written to behind the mirror", 10), c.h.logs()
        # and through two more compares, of a copy now exact
        compares = load_status(os.path.join(a, ".mirror")).pairs[0]["sessions"]
        assert wait_for(lambda: load_status(os.path.join(a, ".mirror")).pairs[0]["sessions"] >= compares + 2, 10)
    notes = open(os.path.join(lab.workdir, "notify.log")).read()
    assert "replica-diverged" in notes and "d0/stray" in notes, notes
    assert notes.count("replica-diverged") == 1, notes  # told once: the later compares found nothing
    assert len(views) > 3 and all(views), views


def test_split_brain_with_writes_on_both_sides_loses_neither(mcluster):
    """a and b cut from each other (both still reach the ping node and the client): both
    serve, and each is written to, one file on both sides with different content.  When the
    cut heals, a (the lower epoch) goes to standby, and nothing flows either way until the
    administrator says so: sampled every 50 ms, b never shows a file only a wrote, and a
    keeps its own writes.  ``hawrap resume`` on a lists a's writes and refuses;
    ``--keep-local-changes`` copies them aside whole (a's version of the file both wrote
    too), then a holds exactly b's tree."""
    c, lab = mcluster, mcluster.lab
    write_files(tree(lab, "a"), "before", 30)
    assert converged(lab)
    shared = os.path.join("d0", "before-0.bin")
    c.lab.isolate_nodes(True)
    c.lab.link("a", "hb0", False)
    assert wait_for(lambda: c.h.role("b") == "primary", 10), c.h.logs()
    assert c.h.role("a") == "primary"  # both serve while cut off: unavoidable here
    write_files(tree(lab, "a"), "only-on-a", 20)
    write_files(tree(lab, "b"), "only-on-b", 20)
    for node in ("a", "b"):
        with open(os.path.join(tree(lab, node), shared), "wb") as f:
            f.write(f"written on {node} during the split".encode())
    a_wrote = {p: d for p, d in snapshot(tree(lab, "a")).items() if "only-on-a" in p or p == shared}
    b_tree = snapshot(tree(lab, "b"))
    seen_on_b: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = snapshot(tree(lab, "b"))
            seen_on_b.update(p for p in now if "only-on-a" in p)
            if now.get(shared) != b_tree[shared]:
                seen_on_b.add(shared)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        c.lab.isolate_nodes(False)
        c.lab.link("a", "hb0", True)
        assert wait_for(lambda: c.h.role("a") == "standby", 10), c.h.logs()
        assert "split brain" in c.h.status("a")["reason"]
        assert c.h.role("b") == "primary"
        # a's copy is its own until the administrator decides
        held = snapshot(tree(lab, "a"))
        assert all(held.get(p) == d for p, d in a_wrote.items())
        r = c.h.cli("a", "resume")
        assert r.returncode != 0 and "lacks" in r.stdout, r.stdout + r.stderr
        listing = r.stdout
        assert "only-on-a-0.bin" in listing and shared in listing, listing
        assert all(held.get(p) == d for p, d in a_wrote.items())
        r = c.h.cli("a", "resume", "--keep-local-changes")
        assert r.returncode == 0, r.stdout + r.stderr
        c.expect_roles(primary="b", other="secondary")
        assert converged(lab), "a did not take b's copy after the resume"
    finally:
        stop.set()
        sampler.join()
    assert not seen_on_b, f"b showed what only a wrote: {sorted(seen_on_b)[:5]}"
    [kept] = os.listdir(os.path.join(tree(lab, "a"), ".mirror", "kept"))
    copies = snapshot(os.path.join(tree(lab, "a"), ".mirror", "kept", kept))
    lost = [p for p, d in a_wrote.items() if copies.get(p) != d]
    assert not lost, f"a's writes during the split neither on b nor kept: {lost[:5]}\n{listing}"
    assert snapshot(tree(lab, "b")).get(shared) == b_tree[shared]
