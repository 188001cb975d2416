"""hawrap.leadership against a real three-member etcd cluster in network namespaces.

Each test runs a hamirror member beside each etcd member and injects the faults users meet:
a member process killed (SIGKILL), a node cut from the majority (ip rule blackhole, link
down, or a bridge port silently dropping everything), etcd members killed (one: no change
of leader; two: quorum lost).  Safety is checked two ways, throughout each test: the
members' serving terms, from their event logs on the one CLOCK_MONOTONIC every process
shares, never overlap (a stop is recorded when the pretend stop work is done); and a sampler
reading the serving markers every 20 ms never sees two.  Times are printed, not asserted
(figures belong to benchmarks/).
"""

from __future__ import annotations

import os
import random
import time

import pytest
from etcdlab import NODES, Members, Sampler, overlaps, wait_for


def start_all(lab, **kw) -> Members:
    members = Members(lab, **kw)
    for node in NODES:
        if not os.path.exists(members.path("position", node)):
            members.set_position(node, 0, 0)
        members.start(node)
    return members


def assert_safe(members: Members, sampler: Sampler) -> None:
    sampler.stop()
    bad = overlaps(members.serving_intervals(open_until=time.monotonic()))
    assert not bad, f"two members served at once: {bad}\n{members.lab.logs()}"
    assert sampler.max_serving <= 1, [s for s in sampler.samples if len(s[1]) > 1][:5]
    assert sampler.longest_gap() < 0.25, f"sampler starved: {sampler.longest_gap():.3f} s between samples"
    epochs = [e.epoch for e in members.wins()]
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs), (
        f"epochs of successive wins must rise: {epochs}"
    )


def last_win(members: Members, node: str):
    return [e for e in members.wins() if e.node == node][-1]


def test_leader_elected_and_epoch_rises_on_every_change(lab):
    members = start_all(lab)
    sampler = Sampler(members)
    try:
        first = members.wait_leader()
        times = []
        previous = first
        for _ in range(2):
            killed_at = members.kill(previous)
            new = members.wait_leader(not_in=(previous,))
            times.append(last_win(members, new).t - killed_at)
            members.start(previous)  # it comes back as a replica
            assert wait_for(
                lambda p=previous: any(e.event == "leader_changed" for e in members.events(p)[-3:]), 10
            )
            previous = new
        print(f"leader killed -> new leader (TTL {members.ttl} s): {', '.join(f'{t:.2f} s' for t in times)}")
        wins = members.wins()
        assert len(wins) == 3 and wins[0].node == first
    finally:
        assert_safe(members, sampler)


@pytest.mark.parametrize("how", ["blackhole", "link-down", "bridge-block"])
def test_partitioned_leader_stops_serving_before_anyone_wins(lab, how):
    members = start_all(lab)
    sampler = Sampler(members)
    try:
        old = members.wait_leader()
        old_epoch = last_win(members, old).epoch
        cut_at = time.monotonic()
        lab.partition(old, how)
        new = members.wait_leader(not_in=(old,))
        stopped = [e for e in members.events(old) if e.event == "stopped" and e.t > cut_at]
        assert stopped, f"{old} never stopped serving\n{lab.logs()}"
        won = last_win(members, new)
        print(f"{how}: {old} stopped {stopped[0].t - cut_at:.2f} s after the cut, {new} won {won.t - cut_at:.2f} s after it "
              f"(margin {won.t - stopped[0].t:.2f} s)")  # fmt: skip
        assert stopped[0].t < won.t, "the new leader won before the old one had stopped"
        assert won.epoch > old_epoch
        lab.heal(old, how)
        # the old leader comes back as a replica of the new one, and never serves again
        assert wait_for(
            lambda: any(e.event == "leader_changed" and e.t > won.t for e in members.events(old)), 20
        ), lab.logs()
        time.sleep(members.ttl)  # a window for a wrong re-election to show (sampled throughout)
        assert members.leader() == new
    finally:
        assert_safe(members, sampler)


def test_link_healed_while_the_leader_stops_gives_no_one_the_key_before_it_has_stopped(lab):
    """The cut heals just as the leader's watchdog fires, while it is still stopping (a slow
    stop: services that take a second to go down).  Its given-up lease must not be revoked
    (which frees the leader key at once) before the stop is done, or another member wins
    while it still serves."""
    members = start_all(lab, ttl=4, stop_budget=1.5, stop_delay=1.0)
    sampler = Sampler(members)
    try:
        old = members.wait_leader()
        cut_at = time.monotonic()
        lab.partition(old, "blackhole")
        assert wait_for(
            lambda: any(e.event == "stop_serving" and e.t > cut_at for e in members.events(old)),
            20,
            step=0.01,
        ), lab.logs()
        lab.heal(old, "blackhole")
        healed_at = time.monotonic()
        stopped = wait_for(
            lambda: next((e for e in members.events(old) if e.event == "stopped" and e.t > cut_at), None), 10
        )
        assert stopped, lab.logs()
        new = members.wait_leader(timeout=30)
        won = last_win(members, new)
        print(f"healed {healed_at - cut_at:.2f} s after the cut; {old} stopped +{stopped.t - cut_at:.2f} s, "
              f"{new} won +{won.t - cut_at:.2f} s")  # fmt: skip
        assert new == old or won.t > stopped.t, "a member won while the old leader was still stopping"
    finally:
        assert_safe(members, sampler)


def test_leader_whose_only_etcd_member_dies_stops_before_anyone_wins(lab):
    """Members that list only the etcd member beside them (a common deployment): the leader's
    etcd member killed leaves it without a quorum, the two others keep one."""
    members = start_all(lab, local_only=True)
    sampler = Sampler(members)
    try:
        old = members.wait_leader()
        killed_at = time.monotonic()
        lab.kill_etcd(old)
        new = members.wait_leader(not_in=(old,))
        stopped = [e for e in members.events(old) if e.event == "stopped" and e.t > killed_at]
        won = last_win(members, new)
        assert stopped and stopped[0].t < won.t, f"stopped {stopped}, won {won}\n{lab.logs()}"
        print(
            f"{old}'s etcd member killed: stopped +{stopped[0].t - killed_at:.2f} s, {new} won +{won.t - killed_at:.2f} s"
        )
        lab.start_etcd(old)
        assert wait_for(
            lambda: any(e.event == "leader_changed" and e.t > won.t for e in members.events(old)), 30
        ), lab.logs()
    finally:
        assert_safe(members, sampler)


def test_flapping_links_never_make_two_leaders(lab):
    """Nodes cut and healed at random (all three ways), for HAMIRROR_TRIALS rounds."""
    seed = random.randrange(2**32)
    print(f"random seed {seed}")
    rng = random.Random(seed)
    members = start_all(lab)
    sampler = Sampler(members)
    try:
        members.wait_leader()
        for _ in range(int(os.environ.get("HAMIRROR_TRIALS", "4"))):
            node = members.leader() if rng.random() < 0.7 and members.leader() else rng.choice(NODES)
            how = rng.choice(["blackhole", "link-down", "bridge-block"])
            lab.partition(node, how)
            time.sleep(rng.uniform(0.2, 3.0))
            lab.heal(node, how)
            time.sleep(rng.uniform(0.0, 2.0))
        members.wait_leader(timeout=30)
    finally:
        assert_safe(members, sampler)


def test_a_paused_leader_resumes_into_stop_serving_and_never_serves_again(lab):
    """SIGSTOP (a frozen VM): the others win once its lease expires; on SIGCONT its watchdog
    fires before anything else can happen and it never claims the key.  While frozen it
    could not act: its VIP must go by the kernel's own clock (docs/ETCD.md, integration)."""
    members = start_all(lab)
    sampler = Sampler(members)
    resumed_at = None
    try:
        old = members.wait_leader()
        old_epoch = last_win(members, old).epoch
        members.pause(old, True)
        paused_at = time.monotonic()
        new = wait_for(
            lambda: next((e.node for e in members.wins() if e.node != old and e.t > paused_at), None), 20
        )
        assert new, lab.logs()
        resumed_at = time.monotonic()
        members.pause(old, False)
        assert wait_for(
            lambda: any(e.event == "stopped" and e.t > resumed_at for e in members.events(old)), 5
        ), lab.logs()
        stopped = next(e.t for e in members.events(old) if e.event == "stopped" and e.t > resumed_at)
        print(f"paused leader stopped {stopped - resumed_at:.3f} s after SIGCONT")
        time.sleep(members.ttl)
        assert not [e for e in members.events(old) if e.event == "elected" and e.t > paused_at]
        assert last_win(members, new).epoch > old_epoch
        assert members.leader() == new
    finally:
        sampler.stop()
        # the only overlap allowed: the frozen leader's term, ended on resume
        for (n1, _, e1), (n2, _, e2) in overlaps(members.serving_intervals(open_until=time.monotonic())):
            frozen_end = e1 if n1 == old else e2
            assert resumed_at is not None and old in (n1, n2), (n1, n2)
            assert frozen_end is not None and frozen_end < resumed_at + 1.0


def test_one_etcd_member_killed_changes_no_leader(lab):
    # TTL 4: the leader must ride out an etcd election (up to two election timeouts, 2 s here)
    members = start_all(lab, ttl=4)
    sampler = Sampler(members)
    try:
        leader = members.wait_leader()
        wins_before = len(members.wins())
        # first the etcd member beside the leader (its first endpoint), then the raft leader
        for victim in (leader, None):
            victim = victim or lab.etcd_leader()
            assert victim, "no etcd raft leader"
            t = time.monotonic()
            lab.kill_etcd(victim)
            time.sleep(2 * members.ttl + 1)  # two lease lifetimes: a wrongly lost lease would show
            assert len(members.wins()) == wins_before, (
                f"leader changed after etcd member {victim} died\n{lab.logs()}"
            )
            assert not [e for e in members.events() if e.event == "stop_serving" and e.t > t], lab.logs()
            lab.start_etcd(victim)
            assert wait_for(lambda v=victim: lab.etcd_healthy(v), 20)
        assert members.leader() == leader
    finally:
        assert_safe(members, sampler)


def test_quorum_lost_everywhere_stops_the_leader_and_elects_no_one(lab):
    members = start_all(lab)
    sampler = Sampler(members)
    try:
        leader = members.wait_leader()
        epoch = last_win(members, leader).epoch
        others = [n for n in NODES if n != leader]
        t = time.monotonic()
        for n in others:
            lab.kill_etcd(n)
        assert wait_for(lambda: any(e.event == "stopped" and e.t > t for e in members.events(leader)), 10), (
            lab.logs()
        )
        time.sleep(2 * members.ttl)
        assert members.leader() is None and len(members.wins()) == 1
        for n in others:
            lab.start_etcd(n)
        new = members.wait_leader(timeout=30)
        assert last_win(members, new).epoch > epoch
    finally:
        assert_safe(members, sampler)


def test_member_behind_waits_while_an_up_to_date_one_is_eligible(lab):
    members = Members(lab)
    for node, seq in (("n1", 30), ("n2", 20), ("n3", 10)):
        members.set_position(node, 7, seq)
    members = start_all(lab)
    sampler = Sampler(members)
    try:
        assert members.wait_leader() == "n1"
        members.kill("n1")
        assert members.wait_leader(not_in=("n1",)) == "n2", "n3 is behind n2: only n2 may win"
        time.sleep(members.ttl)
        assert not [e for e in members.events("n3") if e.event == "elected"]
        # the one ahead gone too: the one left takes over (nothing newer is alive)
        members.kill("n2")
        assert members.wait_leader(not_in=("n1", "n2")) == "n3"
        # an epoch from before (the two-node mode's, say) stays below the new ones
        assert all(e.epoch > 7 for e in members.wins())
    finally:
        assert_safe(members, sampler)


def test_standby_lock_keeps_a_member_out_of_elections(lab):
    members = Members(lab)
    members.set_standby("n1", True)
    for node, seq in (("n1", 99), ("n2", 5), ("n3", 5)):
        members.set_position(node, 1, seq)
    members = start_all(lab)
    sampler = Sampler(members)
    try:
        first = members.wait_leader()
        assert first != "n1", "the most up-to-date member is in standby: it must not campaign"
        members.kill(first)
        second = members.wait_leader(not_in=(first,))
        assert second not in ("n1", first)
        # standby on the leader: it steps down, and with n1 in standby and the third dead nobody leads
        t = time.monotonic()
        members.set_standby(second, True)
        assert wait_for(lambda: any(e.event == "demoted" and e.t > t for e in members.events(second)), 10)
        time.sleep(2 * members.ttl)
        assert members.leader() is None
        assert not [e for e in members.events("n1") if e.event == "elected"]
        members.set_standby("n1", False)
        assert members.wait_leader() == "n1"
    finally:
        assert_safe(members, sampler)


def test_standby_lock_on_the_leader_hands_the_key_to_the_most_up_to_date_member_first(lab):
    """The standby lock on the leader: it makes the final sync toward the most up-to-date
    eligible member and hands it the key, as ``failover --to`` does, so that the next term
    starts from the leader's data.  A member that does not catch up within the hand-over
    timeout gets nothing from it: the leader steps down without a hand-over and never
    serves again meanwhile, and the election picks the successor."""
    members = Members(lab)
    for node, seq in (("n1", 30), ("n2", 20), ("n3", 10)):
        members.set_position(node, 7, seq)
    members = start_all(lab, handover_timeout=3.0)
    sampler = Sampler(members)
    try:
        assert members.wait_leader() == "n1"
        epoch = last_win(members, "n1").epoch
        members.set_position("n2", 7, 30)  # n2 caught up; n3 stays behind
        t = time.monotonic()
        members.set_standby("n1", True)
        assert members.wait_leader(not_in=("n1",)) == "n2", lab.logs()
        won = last_win(members, "n2")
        handed = [e for e in members.events("n1") if e.event == "prepare_handover" and e.t > t]
        assert [e.target for e in handed] == ["n2"], members.events("n1")
        assert handed[0].t < won.t and won.epoch > epoch
        assert any(e.event == "demoted" and e.reason == "handed over to n2" for e in members.events("n1"))
        print(f"standby on the leader: {won.t - t:.2f} s from the lock to the new leader")
        # the next one that is the most up to date does not catch up: no hand-over, a plain step-down
        members.set_standby("n1", False)
        assert wait_for(lambda: (members.record("n1") or {}).get("eligible") is True, 10)
        members.set_position("n2", 7, 50)
        t = time.monotonic()
        members.set_standby("n2", True)
        assert members.wait_leader(not_in=("n2",)) == "n1", "n1 is the most up-to-date eligible member"
        tried = [e for e in members.events("n2") if e.t > t]
        assert [e.target for e in tried if e.event == "prepare_handover"] == ["n1"], tried
        assert [e for e in tried if e.event == "demoted" and "did not reach" in e.reason], tried
        assert not [e for e in tried if e.event in ("elected", "handover_aborted")], "it served again"
    finally:
        assert_safe(members, sampler)


def test_failover_to_moves_the_key_to_an_up_to_date_member(lab):
    members = start_all(lab, handover_timeout=3.0)
    sampler = Sampler(members)
    try:
        leader = members.wait_leader()
        target, behind = [n for n in NODES if n != leader]
        epoch = last_win(members, leader).epoch
        t = time.monotonic()
        reply = members.failover(via=behind, to=target)
        assert reply["ok"], reply
        assert members.wait_leader(not_in=(leader,)) == target
        handed = [e for e in members.events(leader) if e.event == "prepare_handover" and e.t > t]
        won = last_win(members, target)
        assert handed and handed[0].t < won.t and won.epoch > epoch
        print(f"failover --to {target}: {won.t - t:.2f} s from the command to the new leader")
        # a member behind the leader is refused after the catch-up timeout; the leader goes on
        members.set_position(behind, 0, 0)
        members.set_position(target, 0, 50)
        reply = members.failover(via=leader, to=behind)
        assert not reply["ok"] and "did not reach" in reply["message"], reply
        assert members.wait_leader() == target
        # a member in standby is refused at once
        members.set_standby(behind, True)
        assert wait_for(lambda: (members.record(behind) or {}).get("eligible") is False, 10)
        reply = members.failover(via=leader, to=behind)
        assert not reply["ok"] and "not eligible" in reply["message"], reply
        assert members.leader() == target
    finally:
        assert_safe(members, sampler)


def test_resign_hands_the_key_to_an_equally_up_to_date_member(lab):
    members = start_all(lab)
    sampler = Sampler(members)
    try:
        leader = members.wait_leader()
        t = time.monotonic()
        members.resign(leader)
        new = members.wait_leader(not_in=(leader,))
        assert any(e.event == "demoted" and e.t > t for e in members.events(leader))
        assert last_win(members, new).t > t
        assert wait_for(lambda: any(e.event == "resigned" for e in members.events(leader)), 10)
    finally:
        assert_safe(members, sampler)
