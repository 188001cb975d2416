"""``hawrap run`` with ``backend = "etcd"`` on three nodes beside a real three-member etcd.

Each node runs the real thing: hawrap's supervisor and node, the leader's VIP, its TCP
service and its ``mirror daemon`` toward both replicas, each replica's ``mirror serve``.  The
client's namespace probes the VIP every 20 ms and samples every 50 ms which MACs answer ARP
for it; a thread reads every node's interface every 50 ms.  Faults: hawrap killed on the
leader (SIGKILL of every process but its etcd member: its VIP is left on the interface, for
the kernel to expire), the leader cut from the etcd majority by an ``ip rule`` blackhole (it
still answers ARP: only its own stop takes the VIP away), a replica stopped while the leader
writes.  Never two VIP holders, never an acknowledged file lost.  Times are printed
(figures belong to benchmarks/).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from etcdlab import NODES, wait_for
from hawraplab import Client, Hawrap, HawrapLab, missing, tree, write_config, write_files

from hawrap.etcdnode import KEEP_RETRY, REFUSED_GRACE

TTL = 4


@pytest.fixture
def hlab(tmp_path):
    from etcdlab import can_run

    why = can_run()
    if why:
        pytest.skip(why)
    the_lab = HawrapLab(str(tmp_path))
    try:
        yield the_lab
    finally:
        the_lab.close()


def start_cluster(lab: HawrapLab, **kw) -> tuple[Hawrap, Client]:
    hw = Hawrap(lab, write_config(lab, ttl=TTL, **kw))
    client = Client(lab)
    for node in NODES:
        hw.start(node)
    return hw, client


def stop_cluster(hw: Hawrap, client: Client) -> None:
    """The client's probes, then hawrap on every node."""
    client.stop()
    for node in NODES:
        hw.stop(node)


def wait_leader(
    hw: Hawrap, client: Client, since: float, not_from: str | None = None, timeout: float = 40
) -> str:
    """The node the client reaches through the VIP (its service answers its name)."""
    first = wait_for(lambda: client.first_answer_after(since, not_from), timeout)
    assert first, f"the VIP did not answer (excluding {not_from}) within {timeout} s\n{logs(hw)}"
    return first.answer


def wait_replicated(lab: HawrapLab, nodes, files: dict[str, str], timeout: float = 30) -> None:
    """The files are on every node in ``nodes``: acknowledged, as the client is told."""
    done = wait_for(lambda: not any(missing(tree(lab, n), files) for n in nodes), timeout, 0.1)
    assert done, f"{ {n: missing(tree(lab, n), files)[:5] for n in nodes} }\n{lab.logs(tail=6000)}"


def logs(hw: Hawrap) -> str:
    return hw.lab.logs(tail=6000)


@pytest.mark.parametrize("state_dir", [None, "own-state-dir"])
def test_leader_killed_a_replica_with_every_acknowledged_file_takes_over(hlab, state_dir):
    """``own-state-dir``: the tree keeps its epoch and identity outside the tree; the
    receivers must use it too, or the new leader is refused after the failover."""
    where = None if state_dir is None else os.path.join(hlab.workdir, "tree-state", "{node}")
    hw, client = start_cluster(hlab, state_dir=where)
    try:
        leader = wait_leader(hw, client, 0.0)
        replicas = [n for n in NODES if n != leader]
        acked = write_files(tree(hlab, leader), "before", 40)
        wait_replicated(hlab, replicas, acked)
        killed_at = hw.kill(leader)
        new = wait_leader(hw, client, killed_at, not_from=leader)
        answered = client.first_answer_after(killed_at, leader)
        print(f"hawrap killed on {leader} -> the VIP answers on {new} after {answered.end - killed_at:.2f} s")
        assert new in replicas
        assert not missing(tree(hlab, new), acked), "the new leader lacks acknowledged files"
        # the new leader mirrors to the other replica
        later = write_files(tree(hlab, new), "after", 10)
        wait_replicated(hlab, [n for n in replicas if n != new], later)
        # the old leader returns: a replica, and its copy becomes the new leader's
        with open(os.path.join(tree(hlab, leader), "never-acknowledged.bin"), "wb") as f:
            f.write(b"written on the old leader after its crash")
        hw.start(leader)
        wait_replicated(hlab, [leader], later)
        assert wait_for(
            lambda: not os.path.exists(os.path.join(tree(hlab, leader), "never-acknowledged.bin")), 30
        )
        assert not os.path.exists(os.path.join(tree(hlab, new), "never-acknowledged.bin"))
        assert not missing(tree(hlab, new), later) and not missing(tree(hlab, new), acked)
        assert wait_for(lambda: client.answering(time.monotonic() - 1) == new, 10)
        st = hw.status(leader)
        assert st and st["role"] == "replica", st
        # once the new leader's sessions reached it, it follows the new epoch like the others
        epoch = hw.status(new)["epoch"]
        assert wait_for(lambda: (hw.status(leader) or {}).get("position", {}).get("epoch") == epoch, 30), (
            logs(hw)
        )
    finally:
        stop_cluster(hw, client)
    client.check(cut_off=frozenset())


def receivers(lab: HawrapLab, node: str) -> list[int]:
    """The node's ``mirror serve`` processes (by their command line)."""
    out = []
    for pid in lab.pids(node):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"mirror" in argv and b"serve" in argv:
            out.append(pid)
    return out


def go_on(pids: list[int]) -> None:
    """SIGCONT to every process of ``pids`` still there."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def published(hw: Hawrap, on: str) -> dict[str, tuple[int, int]]:
    """Every member's published (epoch, seq), as ``hawrap status`` on node ``on`` reads etcd."""
    st = hw.status(on) or {}
    members = (st.get("etcd_view") or {}).get("members") or []
    return {m["name"]: (m["epoch"], m["seq"]) for m in members}


def daemon_pairs_full(lab: HawrapLab, node: str) -> list[dict]:
    """Every field the node's ``mirror daemon`` status file shows of each destination."""
    try:
        with open(os.path.join(tree(lab, node), ".mirror", "mirror-daemon.status.json")) as f:
            return json.load(f)["pairs"]
    except (OSError, ValueError, KeyError) as exc:
        return [{"error": repr(exc)}]


def daemon_pairs(lab: HawrapLab, node: str) -> list[dict]:
    """What the node's ``mirror daemon`` says of each destination, the fields that matter here."""
    keys = ("name", "state", "journal_seq", "mirrored_seq", "applied", "catch_up", "pending", "last_error", "fenced_epoch")
    return [p if "error" in p else {k: p.get(k) for k in keys} for p in daemon_pairs_full(lab, node)]


def test_a_replica_that_stopped_applying_is_never_promoted_over_one_that_has_everything(hlab):
    """Replica B's receiver is frozen (SIGSTOP: it applies nothing, its hawrap is alive and
    eligible) while the leader writes files that C acknowledges; then the leader is killed.
    C publishes a higher sequence at the same epoch: C is promoted, never B (the client,
    probing the VIP every 20 ms, never reaches B), and C has every acknowledged file."""
    hw, client = start_cluster(hlab)
    frozen: list[int] = []
    try:
        leader = wait_leader(hw, client, 0.0)
        b, c = [n for n in NODES if n != leader]
        acked = write_files(tree(hlab, leader), "before", 10)
        wait_replicated(hlab, [b, c], acked)
        # both replicas have recorded what they applied, at the leader's epoch: B's record is
        # the one the frozen receiver leaves behind
        level = wait_for(lambda: (lambda p: p.get(b) == p.get(c) and p.get(b, (0, 0))[0] > 0)(
            published(hw, leader)), 30, 0.2)  # fmt: skip
        assert level, (published(hw, leader), daemon_pairs(hlab, leader), logs(hw))
        frozen = receivers(hlab, b)
        assert frozen, f"no mirror serve on {b}"
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        for i in range(3):
            files = write_files(tree(hlab, leader), f"during{i}", 10)
            wait_replicated(hlab, [c], files)  # acknowledged: on C
            acked.update(files)
        assert missing(tree(hlab, b), acked), "the frozen replica cannot have applied them"
        # C's position is ahead of B's at the same epoch, as etcd holds them
        ahead = wait_for(lambda: (lambda p: p.get(c, (0, 0)) > p.get(b, (0, 0)) and p[c][0] == p[b][0])(
            published(hw, leader)), 30, 0.2)  # fmt: skip
        assert ahead, (published(hw, leader), daemon_pairs(hlab, leader), logs(hw))
        positions = published(hw, leader)
        print(f"published before the kill: {positions}")
        killed_at = hw.kill(leader)
        new = wait_leader(hw, client, killed_at, not_from=leader)
        answered = client.first_answer_after(killed_at, leader)
        print(f"hawrap killed on {leader} -> the VIP answers on {new} after {answered.end - killed_at:.2f} s")
        assert new == c, f"{new} was promoted while {c} had every acknowledged change\n{logs(hw)}"
        assert not missing(tree(hlab, c), acked), "the new leader lacks acknowledged files"
        time.sleep(TTL)  # a window for a wrong election to show (the client samples throughout)
        assert b not in {r.answer for r in client.probes()}, "the replica that was behind served"
        assert wait_for(lambda: client.answering(time.monotonic() - 0.5) == c, 10)
        st = hw.status(b)
        assert st and st["role"] == "replica", st
    finally:
        go_on(frozen)
        stop_cluster(hw, client)
    client.check()


def notes(lab: HawrapLab) -> str:
    """What the nodes notified so far (the configuration's notify command appends it)."""
    try:
        with open(os.path.join(lab.workdir, "notify.log")) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def unconfirmed(state: str) -> set[str]:
    """What the journals in a tree's state dir hold that no replica confirmed."""
    from mirror.journal import read_pending

    out: set[str] = set()
    for name in os.listdir(state):
        if name.startswith("journal-"):
            out |= {os.fsdecode(p) for p in read_pending(os.fsencode(os.path.join(state, name)), had_by_none=True).entries}
    return out


@pytest.mark.parametrize("disk", ["room", "full"])
def test_a_leader_killed_with_changes_no_replica_confirmed_keeps_them_aside_when_it_returns(hlab, disk):
    """Both replicas' receivers frozen, the leader journals files no replica can confirm,
    then its hawrap is killed and the receivers go on.  A replica leads; the old leader
    returns as a replica, and before the new leader's copy replaces its tree it copies
    those files aside (whole, into its tree's state dir), and says so once: a restart
    does not copy them again.  ``full``: the state dirs are small disks the copies do not
    fit on; the old leader receives nothing (sampled) until there is room, says so once,
    then keeps them and receives."""
    where, mounts = None, []
    if disk == "full":
        for node in NODES:
            state = os.path.join(hlab.workdir, "tree-state", node)
            os.makedirs(state)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", state], check=True)
            mounts.append(state)
        where = os.path.join(hlab.workdir, "tree-state", "{node}")
    hw, client = start_cluster(hlab, state_dir=where)
    frozen: list[int] = []
    try:
        leader = wait_leader(hw, client, 0.0)
        replicas = [n for n in NODES if n != leader]
        state_dir = os.path.join(tree(hlab, leader), ".mirror") if where is None else where.format(node=leader)
        acked = write_files(tree(hlab, leader), "before", 10)
        wait_replicated(hlab, replicas, acked)
        frozen = [pid for n in replicas for pid in receivers(hlab, n)]
        assert len(frozen) >= 2, "no mirror serve on the replicas"
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        alone = write_files(tree(hlab, leader), "unconfirmed", 6, size=200_000)
        assert wait_for(lambda: set(alone) <= unconfirmed(state_dir), 10, 0.05), unconfirmed(state_dir)
        killed_at = hw.kill(leader)
        go_on(frozen)
        frozen = []
        new = wait_leader(hw, client, killed_at, not_from=leader)
        assert new in replicas and set(missing(tree(hlab, new), alone)) == set(alone)
        hw.start(leader)
        if disk == "full":
            assert wait_for(lambda: "cannot be kept aside" in notes(hlab), 30, 0.1), logs(hw)
            until = time.monotonic() + 2 * KEEP_RETRY
            while time.monotonic() < until:  # sampled: nothing of them replaced, nothing received
                assert not missing(tree(hlab, leader), alone) and not receivers(hlab, leader), logs(hw)
                time.sleep(0.1)
            subprocess.run(["mount", "-o", "remount,size=16m", state_dir], check=True)
        # the new leader's copy replaces the tree (its receiver starts once the copies are made)
        assert wait_for(lambda: set(missing(tree(hlab, leader), alone)) == set(alone), 30, 0.1), logs(hw)
        kept_root = os.path.join(state_dir, "kept")
        [stamp] = os.listdir(kept_root)
        assert not missing(os.path.join(kept_root, stamp), alone), "a kept copy is not whole"
        assert wait_for(lambda: (hw.status(leader) or {}).get("role") == "replica", 10)
        told = notes(hlab)
        assert told.count("local-changes-kept") == 1 and stamp in told, told
        assert told.count("cannot be kept aside") == (disk == "full"), told  # told once
        shown = hw.cli(leader, "status").stdout
        assert "kept aside from data: 1 copies" in shown and stamp in shown, shown
        # a restart finds nothing left to keep
        hw.stop(leader)
        hw.start(leader)
        assert wait_for(lambda: receivers(hlab, leader), 30, 0.1), logs(hw)
        assert os.listdir(kept_root) == [stamp]
        assert notes(hlab).count("local-changes-kept") == 1
    finally:
        go_on(frozen)
        stop_cluster(hw, client)
        for path in mounts:
            subprocess.run(["umount", "-l", path], check=False)
    client.check()


def test_a_double_failure_loses_nothing_the_dead_replica_confirmed(hlab):
    """Replica C's receiver is frozen while the leader L writes files that B confirms; then
    hawrap is killed on L and on B together, and C, which never had them, is elected.  B
    comes back holding them and does not receive (sampled: nothing of them replaced, no
    receiver), tells the administrator once, and ``hawrap resume`` is refused until
    ``--discard-local-changes``.  L comes back and, before C's copy replaces its tree,
    keeps them aside whole, though a replica had confirmed them.  Both end with C's tree."""
    hw, client = start_cluster(hlab)
    frozen: list[int] = []
    try:
        leader = wait_leader(hw, client, 0.0)
        b, c = [n for n in NODES if n != leader]
        state_dir = os.path.join(tree(hlab, leader), ".mirror")
        wait_replicated(hlab, [b, c], write_files(tree(hlab, leader), "before", 10))
        frozen = receivers(hlab, c)
        assert frozen, f"no mirror serve on {c}"
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        confirmed = write_files(tree(hlab, leader), "confirmed", 8, size=50_000)
        wait_replicated(hlab, [b], confirmed)
        # b's confirmation is in the leader's journal and b's position is published above c's
        assert wait_for(lambda: not set(confirmed) & unconfirmed(state_dir), 30, 0.05), unconfirmed(state_dir)
        assert wait_for(lambda: (lambda p: p.get(b, (0, 0)) > p.get(c, (0, 0)))(published(hw, leader)), 30, 0.1), (
            published(hw, leader), logs(hw))  # fmt: skip
        killed_at = hw.kill(leader)
        hw.kill(b)
        go_on(frozen)
        frozen = []
        assert wait_leader(hw, client, killed_at, not_from=leader) == c
        assert set(missing(tree(hlab, c), confirmed)) == set(confirmed), "c was to lack them"
        after = write_files(tree(hlab, c), "after", 5)
        # b returns: held, its copy kept whole
        hw.start(b)
        assert wait_for(lambda: "replica-ahead" in notes(hlab), 30, 0.1), logs(hw)
        assert wait_for(lambda: (hw.status(b) or {}).get("held"), 10, 0.1), hw.status(b)
        until = time.monotonic() + 3 * TTL  # c's daemon retries b within 10 s (its backoff)
        while time.monotonic() < until:
            assert not missing(tree(hlab, b), confirmed) and not receivers(hlab, b), logs(hw)
            time.sleep(0.1)
        shown = hw.cli(b, "status").stdout
        assert "held: holds changes the leader" in shown and c in shown, shown
        refused = hw.cli(b, "resume")
        assert refused.returncode == 1 and "--discard-local-changes" in refused.stderr, refused
        assert not missing(tree(hlab, b), confirmed)
        # the former leader returns: what c never had is kept aside before c's copy replaces it
        hw.start(leader)
        wait_replicated(hlab, [leader], after, timeout=60)
        assert wait_for(lambda: set(missing(tree(hlab, leader), confirmed)) == set(confirmed), 30, 0.1), logs(hw)
        [stamp] = os.listdir(os.path.join(state_dir, "kept"))
        assert not missing(os.path.join(state_dir, "kept", stamp), confirmed), "a kept copy is not whole"
        # the administrator lets b's copy go
        let_go = hw.cli(b, "resume", "--discard-local-changes")
        assert let_go.returncode == 0, let_go
        wait_replicated(hlab, [b], after, timeout=60)
        assert wait_for(lambda: set(missing(tree(hlab, b), confirmed)) == set(confirmed), 30, 0.1), logs(hw)
        assert notes(hlab).count("replica-ahead") == 1, notes(hlab)
    finally:
        go_on(frozen)
        stop_cluster(hw, client)
    client.check()


@pytest.mark.parametrize("raised", ["one replica", "both replicas"])
def test_a_replica_that_took_a_raised_epoch_first_is_mirrored_to_again(hlab, raised):
    """Replica b's tree (and c's: ``both replicas``) is given an epoch above the term's (a
    member that kept a higher one) while the leader's hawrap is paused: its daemon's next
    sessions there are refused as older, and each such pair stops for good (a fenced
    sender must not retry; with both refused, the daemon exits 4).  Thawed, the leader
    raises the term's epoch above theirs in place and starts its daemon again: what it
    wrote, and writes next, reaches both; nobody else leads meanwhile, and nobody is told
    of a refusal that the raise explains (sampled past REFUSED_GRACE)."""
    from mirror.epoch import observe_epoch

    hw, client = start_cluster(hlab)
    paused = None
    try:
        leader = wait_leader(hw, client, 0.0)
        b, c = [n for n in NODES if n != leader]
        wait_replicated(hlab, [b, c], write_files(tree(hlab, leader), "before", 5))
        epoch = hw.status(leader)["epoch"]
        paused = hw.procs[leader].pid
        os.killpg(paused, signal.SIGSTOP)  # hawrap's supervisor and node; its mirror daemon runs on
        for n in [b, c] if raised == "both replicas" else [b]:
            observe_epoch(os.path.join(tree(hlab, n), ".mirror"), epoch + 50)
        during = write_files(tree(hlab, leader), "during", 3)
        fenced = wait_for(lambda: any(p.get("fenced_epoch") is not None and str(p.get("name")).endswith(f"@{b}")
                                      for p in daemon_pairs(hlab, leader)), 5, 0.02)  # fmt: skip
        os.killpg(paused, signal.SIGCONT)
        paused = None
        thawed = time.monotonic()
        assert fenced, daemon_pairs(hlab, leader)
        wait_replicated(hlab, [b, c], during, timeout=30)
        after = write_files(tree(hlab, leader), "after", 5)
        wait_replicated(hlab, [b, c], after)
        assert hw.status(leader)["epoch"] > epoch + 50, "the term's epoch was not raised in place"
        while time.monotonic() < thawed + REFUSED_GRACE + 2:  # sampled: no alert for what the raise explains
            assert "refused our changes" not in notes(hlab), notes(hlab)
            time.sleep(0.1)
        assert {r.answer for r in client.probes()} <= {leader, None}, "another node served"
    finally:
        if paused is not None:
            os.killpg(paused, signal.SIGCONT)
        stop_cluster(hw, client)
    client.check()


def test_leader_cut_from_the_etcd_majority_stops_serving_before_anyone_starts(hlab):
    hw, client = start_cluster(hlab)
    try:
        leader = wait_leader(hw, client, 0.0)
        acked = write_files(tree(hlab, leader), "before", 20)
        replicas = [n for n in NODES if n != leader]
        wait_replicated(hlab, replicas, acked)
        cut_at = time.monotonic()
        hlab.partition(leader, "blackhole")  # its ARP answers still reach the client
        new = wait_leader(hw, client, cut_at, not_from=leader)
        assert new in replicas
        # the interface sampler's round that sees the VIP on the new leader may end after the
        # probe that reached it: await it
        assert wait_for(lambda: any(new in h for t, h in list(client.holding) if t > cut_at), 10)
        held_old = [t for t, h in client.holding if leader in h and t > cut_at]
        held_new = [t for t, h in client.holding if new in h and t > cut_at]
        assert held_old and held_new
        print(f"blackhole: {leader} dropped the VIP {held_old[-1] - cut_at:.2f} s after the cut, {new} took it "
              f"{held_new[0] - cut_at:.2f} s after it")  # fmt: skip
        assert held_old[-1] < held_new[0]
        assert not missing(tree(hlab, new), acked)
        hlab.heal(leader, "blackhole")
        assert wait_for(lambda: (hw.status(leader) or {}).get("leader") == new, 30), logs(hw)
        time.sleep(TTL)  # a window for a wrong re-election to show (sampled throughout)
        assert wait_for(lambda: client.answering(time.monotonic() - 0.5) == new, 10)
    finally:
        stop_cluster(hw, client)
    client.check()


DOWN = float(os.environ.get("HAMIRROR_REPLICA_DOWN", "4"))


def test_a_replica_stopped_catches_up_and_the_other_is_not_held_back(hlab):
    """One replica's hawrap (and its receiver) is stopped for HAMIRROR_REPLICA_DOWN seconds
    (the issue's scenario: a minute) while the leader keeps writing: the other replica gets
    every round, the leader stays, and the stopped one catches up when it returns."""
    hw, client = start_cluster(hlab)
    try:
        leader = wait_leader(hw, client, 0.0)
        away, other = [n for n in NODES if n != leader]
        wait_replicated(hlab, [away, other], write_files(tree(hlab, leader), "start", 10))
        began = time.monotonic()
        how = hw.stop(away)
        print(f"hawrap stop of {away} took {time.monotonic() - began:.2f} s")
        assert how == "stopped", f"{how}\n{logs(hw)}"
        left = hw.leftovers(away)
        assert not left, f"hawrap's stop left processes running on {away}: {left}\n{logs(hw)}"
        stopped, rounds, written = time.monotonic(), 0, {}
        while time.monotonic() - stopped < DOWN or rounds < 3:
            files = write_files(tree(hlab, leader), f"round{rounds}", 5)
            written.update(files)
            wait_replicated(hlab, [other], files, timeout=15)  # not held back by the absent one
            rounds += 1
        assert missing(tree(hlab, away), written), "the stopped replica cannot have received anything"
        st = hw.status(leader)
        assert st["role"] == "leader" and not st["mirror"]["replica"]["in_sync"], st
        assert f"data@{away}" in st["mirror"]["replica"]["detail"]
        hw.start(away)
        wait_replicated(hlab, [away], written, timeout=60)
        assert wait_for(
            lambda: (hw.status(leader) or {}).get("mirror", {}).get("replica", {}).get("in_sync"), 30
        )
        assert wait_for(lambda: client.answering(time.monotonic() - 0.5) == leader, 10)
    finally:
        stop_cluster(hw, client)
    client.check()


def test_hawrap_stopped_or_killed_on_a_replica_leaves_no_mirror_process(hlab):
    """One replica's receiver is frozen (SIGSTOP) when its hawrap is stopped: the stop still
    ends, by itself, and leaves nothing running.  The other replica's hawrap (supervisor and
    node process, not the receiver in its session) is killed with SIGKILL: the receiver dies
    with it, although no supervisor is left to clean up.  The leader serves throughout."""
    hw, client = start_cluster(hlab)
    try:
        leader = wait_leader(hw, client, 0.0)
        frozen, killed = [n for n in NODES if n != leader]
        wait_replicated(hlab, [frozen, killed], write_files(tree(hlab, leader), "start", 10))
        receiver = hw.mirror_pids(frozen)
        assert receiver, hw.leftovers(frozen)
        for pid in receiver:
            os.kill(pid, signal.SIGSTOP)
        how = hw.stop(frozen)
        assert how == "stopped", f"{how}\n{logs(hw)}"
        assert not hw.leftovers(frozen)
        assert hw.mirror_pids(killed), hw.leftovers(killed)
        hw.kill_hawrap(killed)
        assert wait_for(lambda: not hw.mirror_pids(killed), 10), hw.leftovers(killed)
        assert wait_for(lambda: client.answering(time.monotonic() - 0.5) == leader, 10)
    finally:
        stop_cluster(hw, client)
    client.check()


def test_one_etcd_member_killed_changes_nothing(hlab):
    hw, client = start_cluster(hlab)
    try:
        leader = wait_leader(hw, client, 0.0)
        victim = leader  # the member beside the leader, the first endpoint of one node at least
        hlab.kill_etcd(victim)
        killed_at = time.monotonic()
        time.sleep(3 * TTL)  # longer than any lease: a failover would show (sampled throughout)
        answers = {r.answer for r in client.probes() if r.start > killed_at and r.answer}
        assert answers == {leader}, answers
        st = hw.status(leader)
        assert st["role"] == "leader" and st["leadership"]["leading"], st
        hlab.start_etcd(victim)
    finally:
        stop_cluster(hw, client)
    client.check()


def test_failover_to_a_named_node_and_the_standby_lock(hlab):
    hw, client = start_cluster(hlab)
    try:
        leader = wait_leader(hw, client, 0.0)
        target, third = [n for n in NODES if n != leader]
        files = write_files(tree(hlab, leader), "before", 20)
        asked = time.monotonic()
        r = hw.cli(third, "failover", "--to", target, "--wait", "40")
        assert r.returncode == 0, r.stdout + r.stderr + logs(hw)
        assert wait_leader(hw, client, asked, not_from=leader) == target
        assert not missing(tree(hlab, target), files)
        # the standby lock: the leader steps down, the other one takes over; while locked,
        # the node is never elected
        r = hw.cli(target, "standby", "--reason", "maintenance")
        assert r.returncode == 0, r.stdout + r.stderr
        locked_at = time.monotonic()
        new = wait_leader(hw, client, locked_at, not_from=target)
        assert new != target
        status = hw.status(target)
        assert status["role"] == "replica" and not status["eligible"]
        assert hw.cli(new, "failover", "--to", target, "--wait", "10").returncode != 0  # refused: ineligible
        r = hw.cli(target, "resume")
        assert r.returncode == 0, r.stdout + r.stderr + logs(hw)
        assert wait_for(lambda: (hw.status(target) or {}).get("eligible"), 10)
        text = hw.cli(target, "status").stdout
        assert "member" in text and "etcd http://" in text, text
    finally:
        stop_cluster(hw, client)
    client.check()


def test_standby_on_the_leader_hands_over_what_it_served_before_it_steps_down(hlab):
    """The leader's mirror daemon frozen (SIGSTOP: nothing written on the leader reaches a
    replica) while files are written there, then ``hawrap standby`` on the leader.  It stops
    serving, makes the final sync toward the most up-to-date replica and hands it the key:
    the new leader has every file when it first answers for the VIP.  The old leader, now a
    replica, resumes at once: not held, nothing kept aside, nothing of its files lost."""
    hw, client = start_cluster(hlab)
    frozen: list[int] = []
    try:
        leader = wait_leader(hw, client, 0.0)
        replicas = [n for n in NODES if n != leader]
        wait_replicated(hlab, replicas, write_files(tree(hlab, leader), "start", 10))
        frozen = hw.mirror_pids(leader)
        assert frozen, hw.leftovers(leader)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        served = write_files(tree(hlab, leader), "served", 20)
        assert all(set(missing(tree(hlab, n), served)) == set(served) for n in replicas)
        asked = time.monotonic()
        r = hw.cli(leader, "standby", "--reason", "maintenance")
        assert r.returncode == 0 and "hands over" in r.stdout, r.stdout + r.stderr
        new = wait_leader(hw, client, asked, not_from=leader)
        assert not missing(tree(hlab, new), served), f"the new leader lacks what {leader} served\n{logs(hw)}"
        print(f"standby on {leader} -> {new} answers {client.first_answer_after(asked, leader).end - asked:.2f} s later")
        go_on(frozen)
        frozen = []
        assert wait_for(lambda: (hw.status(leader) or {}).get("role") == "replica", 10), logs(hw)
        r = hw.cli(leader, "resume")
        assert r.returncode == 0, r.stdout + r.stderr + logs(hw)
        assert wait_for(lambda: (hw.status(leader) or {}).get("eligible"), 10), logs(hw)
        later = write_files(tree(hlab, new), "after", 5)
        wait_replicated(hlab, NODES, later)
        assert not missing(tree(hlab, leader), served)
        assert not os.path.exists(os.path.join(tree(hlab, leader), ".mirror", "kept")), os.listdir(
            os.path.join(tree(hlab, leader), ".mirror")
        )
        told = notes(hlab)
        assert "replica-ahead" not in told and "local-changes-kept" not in told, told
        assert wait_for(lambda: client.answering(time.monotonic() - 0.5) == new, 10)
    finally:
        go_on(frozen)
        stop_cluster(hw, client)
    client.check()


def tree_files(root: str) -> dict[str, bytes]:
    """Every file below ``root`` but the state dir, with its content; one replaced or
    removed while the walk reads (a compare repairing the tree) is left out."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != ".mirror"]
        for name in files:
            try:
                with open(os.path.join(d, name), "rb") as f:
                    out[os.path.relpath(os.path.join(d, name), root)] = f.read()
            except FileNotFoundError:
                pass
    return out


def test_a_replica_written_to_behind_the_mirror_is_made_exact_and_told_once(hlab):
    """One replica's copy changed behind the mirror (a file edited, one removed, a stray one
    left: a service started there by mistake, a restore by hand): nothing on the leader
    tells its daemon.  The daemon's scheduled compare of that replica
    (``mirror.reconcile_interval``) makes it exact again, and the leader tells the
    administrator once (``replica-diverged``, naming the tree, the node and a path); the
    compares after it find nothing.  The other replica is left alone."""
    hw, client = start_cluster(hlab, reconcile_interval=1.0)
    try:
        leader = wait_leader(hw, client, 0.0)
        b, c = [n for n in NODES if n != leader]
        wait_replicated(hlab, [b, c], write_files(tree(hlab, leader), "mail", 20))
        # a change on the leader within a second of a compare may have its event on the way
        # and is not reported: the leader's tree is left older than that
        root = tree(hlab, leader)
        newest = max(os.lstat(os.path.join(d, n)).st_ctime for d, ds, fs in os.walk(root) for n in [".", *ds, *fs])
        assert wait_for(lambda: time.time() - newest > 1.5, 5)
        before_c = tree_files(tree(hlab, c))
        victims = sorted(tree_files(tree(hlab, b)))[:2]
        with open(os.path.join(tree(hlab, b), victims[0]), "r+b") as f:
            f.write(b"written on the replica")
        os.unlink(os.path.join(tree(hlab, b), victims[1]))
        with open(os.path.join(tree(hlab, b), "d0", "stray"), "wb") as f:
            f.write(b"not on the leader")
        assert wait_for(lambda: tree_files(tree(hlab, b)) == tree_files(root), 30, 0.2), logs(hw)
        assert wait_for(lambda: "replica-diverged" in notes(hlab), 15, 0.1), notes(hlab) + logs(hw)
        told = [line for line in notes(hlab).splitlines() if "replica-diverged" in line]
        assert len(told) == 1 and f"the copy of data on {b} was found changed" in told[0], told
        # two more compares of b's copy, now exact, tell nothing more
        sessions = lambda: next((p.get("sessions") or 0 for p in daemon_pairs_full(hlab, leader) if p.get("name") == f"data@{b}"), 0)  # noqa: E731
        done = sessions()
        assert wait_for(lambda: sessions() >= done + 2, 15, 0.1), daemon_pairs(hlab, leader)
        assert notes(hlab).count("replica-diverged") == 1, notes(hlab)
        assert tree_files(tree(hlab, c)) == before_c
    finally:
        stop_cluster(hw, client)
    client.check()


def _tree_held(lab, node: str) -> bool:
    """Whether ``node`` has recorded the tree it holds on its disk (hawrap.treedisk)."""
    try:
        with open(os.path.join(lab.workdir, "state", node, "trees-held.json"), "rb") as f:
            return bool(json.loads(f.read()).get("held", {}).get("data"))
    except (OSError, ValueError):
        return False


def test_a_member_whose_tree_is_not_mounted_steps_down_and_is_not_elected_until_it_is(hlab):
    """Each node's tree is a bind-mounted disk (``require_mount``); the leader's is unmounted
    in its own mount namespace, under its services: it steps down, another member is
    elected, and it is eligible again once mounted."""
    binds = []
    for node in NODES:
        disk = os.path.join(hlab.workdir, "disks", node)
        os.makedirs(disk)
        os.makedirs(tree(hlab, node))
        subprocess.run(["mount", "--bind", disk, tree(hlab, node)], check=True)
        binds.append(tree(hlab, node))
    hw, client = start_cluster(hlab, require_mount=True)
    try:
        leader = wait_leader(hw, client, 0.0)
        in_leader = ["nsenter", "-t", str(hw.procs[leader].pid), "-m"]
        unmounted = time.monotonic()
        subprocess.run([*in_leader, "umount", "-l", tree(hlab, leader)], check=True)
        new = wait_leader(hw, client, unmounted, not_from=leader)
        status = hw.status(leader)
        assert status is not None, logs(hw)
        assert not status["eligible"] and "nothing is mounted at" in status["ineligible_because"], status
        assert hw.cli(new, "failover", "--to", leader, "--wait", "10").returncode != 0  # refused: ineligible
        subprocess.run([*in_leader, "mount", "--bind", os.path.join(hlab.workdir, "disks", leader),
                        tree(hlab, leader)], check=True)  # fmt: skip
        assert wait_for(lambda: (hw.status(leader) or {}).get("eligible"), 10), logs(hw)
        # its disk replaced by a blank one: ineligible until adopted, then filled by the leader
        early = write_files(tree(hlab, new), "before-new-disk", 10)
        assert wait_for(lambda: not missing(os.path.join(hlab.workdir, "disks", leader), early), 30), logs(hw)
        # ... once the node knows the tree it holds there: a node that never saw its disk hold
        # a tree (it stepped down before its first session wrote the tree's identity) takes
        # the first tree it sees for its own, and has nothing to tell a blank disk by
        assert wait_for(lambda: _tree_held(hlab, leader), 10), logs(hw)
        blank = os.path.join(hlab.workdir, "disks", "blank")
        os.makedirs(blank)
        subprocess.run([*in_leader, "umount", "-l", tree(hlab, leader)], check=True)
        subprocess.run([*in_leader, "mount", "--bind", blank, tree(hlab, leader)], check=True)
        assert wait_for(lambda: "holds no tree" in ((hw.status(leader) or {}).get("ineligible_because") or ""), 10), logs(hw)
        # it receives nothing meanwhile: the new leader's pair toward it finds no receiver
        during = write_files(tree(hlab, new), "while-blank", 5)

        def pair_down() -> bool:
            detail = ((hw.status(new) or {}).get("mirror", {}).get("replica") or {}).get("detail", "")
            return f"@{leader}" in detail and ("unreachable" in detail or "disconnected" in detail)

        assert wait_for(pair_down, 20), logs(hw)
        written = sorted(os.path.relpath(os.path.join(d, n), blank) for d, dirs, files in os.walk(blank) for n in dirs + files)
        assert written == [], f"{written}\n{logs(hw)}"
        r = hw.cli(leader, "resume", "--new-disk")
        assert r.returncode == 0, r.stdout + r.stderr + logs(hw)
        assert wait_for(lambda: (hw.status(leader) or {}).get("eligible"), 10), logs(hw)
        acked = write_files(tree(hlab, new), "after-new-disk", 10)
        assert wait_for(lambda: not missing(blank, early | during | acked), 30), logs(hw)
    finally:
        stop_cluster(hw, client)
        for path in binds:
            while subprocess.run(["umount", "-l", path], capture_output=True).returncode == 0:
                pass
    client.check()


def test_a_frozen_leader_loses_the_vip_before_anyone_takes_it(hlab):
    """The whole leader node paused (SIGSTOP of every process, its etcd member too): it can
    do nothing, but its kernel keeps answering ARP for the VIP until the address's lifetime
    ends, which must come before its lease can expire for the others.  Thawed, it finds its
    lease gone, stops, and follows the new leader."""
    hw, client = start_cluster(hlab)
    leader = None
    try:
        leader = wait_leader(hw, client, 0.0)
        acked = write_files(tree(hlab, leader), "before", 20)
        wait_replicated(hlab, [n for n in NODES if n != leader], acked)
        frozen_at = time.monotonic()
        hw.freeze(leader, True)
        new = wait_leader(hw, client, frozen_at, not_from=leader)
        # the interface sampler's next round (three `ip` runs) may come after the first answer
        assert wait_for(lambda: any(new in h for t, h in client.holding if t > frozen_at), 10)
        held_old = [t for t, h in client.holding if leader in h and t > frozen_at]
        held_new = [t for t, h in client.holding if new in h and t > frozen_at]
        assert held_new and (not held_old or held_old[-1] < held_new[0])
        print(f"frozen {leader}: its VIP expired {held_old[-1] - frozen_at if held_old else 0:.2f} s after the freeze, "
              f"{new} took it {held_new[0] - frozen_at:.2f} s after it")  # fmt: skip
        assert not missing(tree(hlab, new), acked)
        hw.freeze(leader, False)
        # Thawed, it follows the new leader.  With etcd before the fix of etcd-io/etcd#15247
        # (Debian 12 ships 3.4.23) the thawed etcd member, the raft leader when frozen, revokes
        # every lease as it resumes, the new leader's too: the new leader then stops and any
        # member may win again (docs/ETCD.md).  Either way one leader serves the VIP, and the
        # samplers (client.check) never see two holders.
        assert wait_for(lambda: (hw.status(leader) or {}).get("leader") in NODES, 30), logs(hw)
        now_leading = hw.status(leader)["leader"]
        assert wait_for(lambda: client.answering(time.monotonic() - 0.5) == now_leading, 30), logs(hw)
    finally:
        if leader is not None:
            hw.freeze(leader, False)
        stop_cluster(hw, client)
    client.check()


@pytest.mark.parametrize("process", ["daemon", "receiver"])
def test_a_frozen_mirror_process_is_started_again_and_the_replicas_catch_up(hlab, process):
    """The leader's mirror daemon, or a replica's receiver, frozen (SIGSTOP; a deadlock looks
    the same from outside): it never exits.  The daemon: its status stops changing, the
    leader counts its replicas not in sync and kills it after STUCK_SECONDS.  The receiver:
    its replica's hawrap probes it every STUCK_SECONDS, finds it silent and kills it (before,
    the replica fell behind for good).  Its supervisor starts it again, and the replicas get
    what the leader wrote meanwhile.  The leader serves throughout."""
    from hawrap.mirrorctl import PROBE_TIMEOUT, STUCK_SECONDS

    hw, client = start_cluster(hlab)
    try:
        leader = wait_leader(hw, client, 0.0)
        replicas = [n for n in NODES if n != leader]
        wait_replicated(hlab, replicas, write_files(tree(hlab, leader), "start", 10))
        node = leader if process == "daemon" else replicas[0]
        frozen = hw.mirror_pids(node)
        assert frozen, hw.leftovers(node)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        written = write_files(tree(hlab, leader), "while-frozen", 10)
        if process == "daemon":
            assert wait_for(lambda: not (hw.status(leader) or {})["mirror"]["replica"]["in_sync"], 10), logs(hw)
        else:
            wait_replicated(hlab, replicas[1:], written)  # the other replica is not held back
        assert wait_for(lambda: not set(frozen) & set(hw.mirror_pids(node)), 2 * STUCK_SECONDS + PROBE_TIMEOUT + 10), (
            f"the frozen {process} was left\n{logs(hw)}"
        )
        wait_replicated(hlab, replicas, written, timeout=60)
        told = "killed, to be started again" if process == "daemon" else "the mirror receiver: it did not answer a hello"
        assert told in logs(hw)
        assert wait_for(lambda: client.answering(time.monotonic() - 0.5) == leader, 10)
    finally:
        stop_cluster(hw, client)
    client.check()


def queued_to_receiver(lab: HawrapLab, node: str) -> int:
    """Bytes waiting, unread, in the node's receiver's connections (its Recv-Q)."""
    from hawraplab import MIRROR_PORT

    out = subprocess.run(["ip", "netns", "exec", lab.ns[node], "ss", "-tnH", "state", "established",
                          f"( sport = :{MIRROR_PORT} )"], capture_output=True, text=True).stdout  # fmt: skip
    return sum(int(line.split()[0]) for line in out.splitlines() if line.split())


def test_a_leader_frozen_in_a_session_neither_holds_back_nor_writes_to_the_replicas_once_another_leads(hlab):
    """The leader's sessions toward both replicas begin (their receivers frozen a moment, so
    its ``start`` waits unread), then the leader's hawrap and mirror processes are frozen
    (SIGSTOP; its etcd member runs on), holding each replica's module in a session.  A
    replica is elected: its changes reach the other replica while the former leader is still
    frozen (the receiver hangs up on the older epoch's connection instead of waiting out its
    session timeout, ten minutes).  Thawed, the former leader writes nothing to either
    replica (sampled throughout), and keeps aside, when it returns as a replica, the files
    its frozen sessions never delivered."""
    hw, client = start_cluster(hlab)
    receivers_frozen: list[int] = []
    leader_frozen: list[int] = []
    stop = threading.Event()
    seen: list[tuple[str, str]] = []
    try:
        leader = wait_leader(hw, client, 0.0)
        replicas = [n for n in NODES if n != leader]
        state_dir = os.path.join(tree(hlab, leader), ".mirror")
        wait_replicated(hlab, replicas, write_files(tree(hlab, leader), "before", 10))
        receivers_frozen = [pid for n in replicas for pid in receivers(hlab, n)]
        for pid in receivers_frozen:
            os.kill(pid, signal.SIGSTOP)
        stale = write_files(tree(hlab, leader), "stale", 20, size=100_000)
        assert wait_for(lambda: set(stale) <= unconfirmed(state_dir), 10, 0.05), unconfirmed(state_dir)
        # each replica holds the leader's session start, unread
        assert wait_for(lambda: all(queued_to_receiver(hlab, n) for n in replicas), 10, 0.02), logs(hw)
        etcd = hlab.etcd.get(leader)
        leader_frozen = [pid for pid in hlab.node_pids(leader) if etcd is None or pid != etcd.pid]
        for pid in leader_frozen:
            os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        go_on(receivers_frozen)
        receivers_frozen = []

        def sample() -> None:  # no file of the frozen sessions ever shows on a replica
            while not stop.is_set():
                for n in replicas:
                    for rel in stale:
                        if os.path.exists(os.path.join(tree(hlab, n), rel)):
                            seen.append((n, rel))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        new = wait_leader(hw, client, frozen_at, not_from=leader)
        other = next(n for n in replicas if n != new)
        after = write_files(tree(hlab, new), "after", 10)
        wait_replicated(hlab, [other], after, timeout=30)
        took = time.monotonic() - frozen_at
        print(f"{leader} frozen in a session: {new} leads, its changes on {other} {took:.1f} s after the freeze")
        go_on(leader_frozen)
        leader_frozen = []
        # back as a replica: the stale files kept aside, the tree the new leader's
        assert wait_for(lambda: (hw.status(leader) or {}).get("role") == "replica", 30), logs(hw)
        back = wait_for(lambda: not missing(tree(hlab, leader), after), 60, 0.1)
        assert back, (f"{leader} lacks {missing(tree(hlab, leader), after)}; {new}'s pairs: {daemon_pairs(hlab, new)}; "
                      f"{leader}: {hw.status(leader)}; receivers {receivers(hlab, leader)}\n{logs(hw)}")  # fmt: skip
        assert wait_for(lambda: set(missing(tree(hlab, leader), stale)) == set(stale), 30, 0.1), logs(hw)
        [stamp] = os.listdir(os.path.join(state_dir, "kept"))
        assert not missing(os.path.join(state_dir, "kept", stamp), stale), "a kept copy is not whole"
        later = write_files(tree(hlab, new), "later", 5)
        wait_replicated(hlab, NODES, later)
    finally:
        stop.set()
        go_on(receivers_frozen + leader_frozen)
        stop_cluster(hw, client)
    assert not seen, f"files of the frozen leader's sessions reached a replica: {seen[:5]}"
    client.check()
