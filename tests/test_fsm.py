"""The node state machine, exhaustively: every row of the fault table, and two machines
driven through random fault sequences (hypothesis) with the safety properties checked at
every step and after convergence."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hawrap import fsm
from hawrap.fsm import (
    INIT,
    PRIMARY,
    RELEASING,
    SECONDARY,
    STANDBY,
    AcquireMirrorLock,
    CheckAddressFree,
    Facts,
    FinalSync,
    Notify,
    ObserveEpoch,
    PeerView,
    Policy,
    RaiseEpoch,
    ReleaseMirrorLock,
    Reply,
    SetMirrorDirection,
    StartResources,
    StopReceiver,
    StopResources,
    WriteStandbyLock,
)

POLICY = Policy(initdead=1.0, handover_timeout=2.0, failback="manual", retry_interval=0.5)


def peer(
    role=SECONDARY,
    epoch=1,
    owns=False,
    standby=False,
    lan_ok=True,
    serving=None,
    request=None,
    home=False,
    name="b",
    **kw,
):
    return PeerView(
        name=name, role=role, epoch=epoch, owns_epoch=owns, standby=standby, lan_ok=lan_ok,
        serving=(role == PRIMARY) if serving is None else serving, request=request, home=home, **kw,
    )  # fmt: skip


def state(role=SECONDARY, epoch=1, owns=False, home=True, **kw):
    kw.setdefault("direction", {SECONDARY: "receive", PRIMARY: "send"}.get(role))
    return replace(
        fsm.State(node="a", is_home=home, started=0.0), role=role, epoch=epoch, owns_epoch=owns, **kw
    )


def facts(now=10.0, lan_ok=True, p=None, lock=False, command=None, unfit=""):
    return Facts(now=now, lan_ok=lan_ok, peer=p, standby_lock=lock, command=command, lan_problem="test", unfit=unfit)


def lan_fault(s, f, p=None):
    """Decide twice, lan_hold apart: a LAN verdict counts once it has held that long."""
    s, _ = fsm.decide(s, replace(f, now=f.now - POLICY.lan_hold), p or POLICY)
    return fsm.decide(s, f, p or POLICY)


def kinds(actions):
    return [type(a) for a in actions]


# ------------------------------------------------------------ fault table rows


def test_primary_dies_secondary_takes_over_with_lock_epoch_vip_notify():
    s, acts = fsm.decide(state(SECONDARY, epoch=4), facts(p=None), POLICY)
    assert s.role == PRIMARY and s.epoch == 5 and s.owns_epoch and s.mirror_locked
    assert kinds(acts)[:5] == [CheckAddressFree, AcquireMirrorLock, RaiseEpoch, StopReceiver, StartResources]
    assert acts[2].to == 5 and isinstance(acts[-1], Notify)


def test_heartbeat_link_only_failure_changes_nothing():
    # the peer is still heard (on the LAN): neither side acts
    s, acts = fsm.decide(state(SECONDARY), facts(p=peer(PRIMARY, owns=True)), POLICY)
    assert s.role == SECONDARY and acts == []
    s, acts = fsm.decide(state(PRIMARY, owns=True), facts(p=peer(SECONDARY)), POLICY)
    assert s.role == PRIMARY and acts == []


def test_own_lan_failure_goes_standby_and_writes_the_lock():
    for role in (PRIMARY, SECONDARY, RELEASING):
        p = peer(PRIMARY if role == SECONDARY else SECONDARY, owns=role == SECONDARY)
        s, acts = lan_fault(state(role, owns=role == PRIMARY), facts(lan_ok=False, p=p))
        assert s.role == STANDBY and not s.serving
        assert StopResources in kinds(acts) and WriteStandbyLock in kinds(acts) and Notify in kinds(acts)
        assert kinds(acts).index(StopResources) == 0


def test_own_lan_failure_must_hold_for_lan_hold():
    for role in (PRIMARY, SECONDARY):
        p = peer(PRIMARY if role == SECONDARY else SECONDARY, owns=role == SECONDARY)
        s, acts = fsm.decide(state(role, owns=role == PRIMARY), facts(now=10.0, lan_ok=False, p=p), POLICY)
        assert s.role == role and acts == []
        s, acts = fsm.decide(s, facts(now=10.9, lan_ok=False, p=p), POLICY)
        assert s.role == role and acts == []
        s, acts = fsm.decide(s, facts(now=11.0, lan_ok=False, p=p), POLICY)
        assert s.role == STANDBY


def test_the_verdict_that_must_hold_is_whose_fault_it_is():
    # silent peer and no ping node for long; the peer is heard again (serving, healthy) just
    # before our own LAN recovers: not a fault of ours that held, so no standby lock
    s, _ = lan_fault(state(SECONDARY), facts(lan_ok=False, p=None))
    s, acts = fsm.decide(s, facts(now=10.05, lan_ok=False, p=peer(PRIMARY, owns=True)), POLICY)
    assert s.role == SECONDARY and WriteStandbyLock not in kinds(acts)
    s, acts = fsm.decide(s, facts(now=10.1, p=peer(PRIMARY, owns=True)), POLICY)
    assert s.role == SECONDARY and s.lan_fault == ""


def test_last_node_able_to_serve_does_not_step_down_for_a_shared_fault():
    # the peer's LAN is unhealthy too (the ping node itself is down), or it is in standby
    for p in (peer(SECONDARY, lan_ok=False), peer(STANDBY, standby=True, lan_ok=True)):
        s, acts = lan_fault(state(PRIMARY, owns=True), facts(lan_ok=False, p=p))
        assert s.role == PRIMARY and kinds(acts) == [Notify] and acts[0].event == "lan-unhealthy"
        s, acts = fsm.decide(s, facts(now=30, lan_ok=False, p=p), POLICY)
        assert s.role == PRIMARY and acts == []  # told once
    s, acts = lan_fault(state(SECONDARY), facts(lan_ok=False, p=peer(PRIMARY, owns=True, lan_ok=False)))
    assert s.role == SECONDARY and WriteStandbyLock not in kinds(acts)


def test_primary_cut_off_from_peer_and_ping_node_steps_back_without_the_lock():
    s, acts = lan_fault(state(PRIMARY, owns=True), facts(lan_ok=False, p=None))
    assert s.role == SECONDARY and StopResources in kinds(acts) and WriteStandbyLock not in kinds(acts)
    # its LAN back, the peer still silent: it serves again
    s, acts = fsm.decide(s, facts(now=20, p=None), POLICY)
    assert s.role == PRIMARY
    # a silent peer seen by a secondary with an unhealthy LAN: it just cannot take over
    s, acts = lan_fault(state(SECONDARY), facts(lan_ok=False, p=None))
    assert s.role == SECONDARY and StartResources not in kinds(acts) and WriteStandbyLock not in kinds(acts)


def test_peer_in_standby_is_taken_over_while_still_heard():
    s, acts = fsm.decide(state(SECONDARY), facts(p=peer(STANDBY, standby=True, lan_ok=False)), POLICY)
    assert s.role == PRIMARY and s.mirror_locked and StartResources in kinds(acts)


def test_peer_in_standby_but_still_serving_is_not_taken_over_yet():
    s, acts = fsm.decide(state(SECONDARY), facts(p=peer(STANDBY, standby=True, serving=True)), POLICY)
    assert s.role == SECONDARY and StartResources not in kinds(acts)


def test_boot_with_standby_lock_stays_standby():
    s, acts = fsm.decide(state(INIT, epoch=3), facts(now=0.1, lock=True, p=None), POLICY)
    assert s.role == STANDBY and WriteStandbyLock not in kinds(acts)
    s2, acts2 = fsm.decide(s, facts(now=50, lock=True, p=None), POLICY)
    assert s2.role == STANDBY and acts2 == []


def test_standby_lock_on_a_primary_hands_over_first_then_stands_by_whatever_happens():
    """The lock on a primary whose peer is a healthy secondary: services stopped, final
    sync, VIP dropped (a planned switchover), then standby once the peer serves, when it
    does not within the hand-over timeout, or when it goes silent; never serving again."""
    primary = state(PRIMARY, epoch=3, owns=True)
    s, acts = fsm.decide(primary, facts(lock=True, p=peer(SECONDARY, epoch=3)), POLICY)
    assert s.role == RELEASING and s.handover_deadline == 10.0 + POLICY.handover_timeout
    assert kinds(acts)[1:] == [fsm.StopServices, SetMirrorDirection, FinalSync, StopResources]
    assert WriteStandbyLock not in kinds(acts)
    # still handing over: nothing more
    s2, acts = fsm.decide(s, facts(now=11, lock=True, p=peer(SECONDARY, epoch=3)), POLICY)
    assert s2 == s and acts == []
    # the peer took over: standby, receiving nothing (the mirroring lock)
    done, acts = fsm.decide(s, facts(now=11, lock=True, p=peer(PRIMARY, epoch=4, owns=True)), POLICY)
    assert done.role == STANDBY and done.mirror_locked and AcquireMirrorLock in kinds(acts)
    assert "took over" in done.reason and StartResources not in kinds(acts)
    for late in (
        facts(now=12.5, lock=True, p=peer(SECONDARY, epoch=3)),  # past the hand-over timeout
        facts(now=11, lock=True, p=None),  # the peer went silent
        facts(now=11, lock=True, lan_ok=False, p=peer(SECONDARY, epoch=3)),  # our LAN failed
        facts(now=11, lock=True, unfit="tree data: nothing mounted", p=peer(SECONDARY, epoch=3)),
    ):
        out, acts = fsm.decide(s, late, POLICY)
        assert out.role == STANDBY and StartResources not in kinds(acts), late
    # the final sync failed: standby, not serving again
    out, acts = fsm.release_failed(s, facts(now=11, lock=True, p=peer(SECONDARY, epoch=3)), POLICY, "exit 30")
    assert out.role == STANDBY and StartResources not in kinds(acts) and "exit 30" in out.reason
    # without the lock the same failure keeps serving here (a failover)
    out, acts = fsm.release_failed(s, facts(now=11, p=peer(SECONDARY, epoch=3)), POLICY, "exit 30")
    assert out.role == PRIMARY and StartResources in kinds(acts)


def test_standby_lock_on_a_primary_whose_peer_cannot_take_over_stands_by_at_once():
    primary = state(PRIMARY, epoch=3, owns=True)
    for f in (
        facts(lock=True, p=None),
        facts(lock=True, p=peer(STANDBY, standby=True)),
        facts(lock=True, p=peer(SECONDARY, lan_ok=False)),
        facts(lock=True, p=peer(SECONDARY, copy_incomplete=True)),  # it would not take over
        facts(lock=True, lan_ok=False, p=peer(SECONDARY)),
        facts(lock=True, unfit="tree data: nothing mounted", p=peer(SECONDARY)),
    ):
        s, acts = fsm.decide(primary, f, POLICY)
        assert s.role == STANDBY and FinalSync not in kinds(acts), f
    # a primary that holds its mirroring lock (the peer has not rejoined yet) sends nothing
    s, acts = fsm.decide(replace(primary, mirror_locked=True), facts(lock=True, p=peer(SECONDARY)), POLICY)
    assert s.role == STANDBY and FinalSync not in kinds(acts)


def test_serving_peer_with_standby_lock_is_pushed_back():
    s, acts = fsm.decide(
        state(PRIMARY, epoch=5, owns=True),
        facts(p=peer(STANDBY, epoch=9, standby=True, serving=True)),
        POLICY,
    )
    assert s.role == PRIMARY and s.request == "push_back" and fsm.Reannounce in kinds(acts)
    # the pushed node, when it sees a higher-ranked primary while serving, stops
    pushed, acts = fsm.decide(
        state(PRIMARY, epoch=9, owns=True),
        facts(lock=True, p=peer(PRIMARY, epoch=5, owns=True, request="push_back")),
        POLICY,
    )
    assert pushed.role == STANDBY and StopResources in kinds(acts)


def test_resume_rejoins_as_secondary_and_survivor_releases_its_lock():
    s, acts = fsm.decide(
        state(STANDBY, epoch=3, mirror_locked=True),
        facts(lock=False, p=peer(PRIMARY, epoch=5, owns=True)),
        POLICY,
    )
    assert s.role == SECONDARY and s.epoch == 5 and ReleaseMirrorLock in kinds(acts)
    survivor, acts = fsm.decide(
        state(PRIMARY, epoch=5, owns=True, mirror_locked=True), facts(p=peer(SECONDARY, epoch=5)), POLICY
    )
    assert survivor.role == PRIMARY and not survivor.mirror_locked and ReleaseMirrorLock in kinds(acts)


def test_resume_refused_while_lan_unhealthy():
    s, acts = fsm.decide(state(STANDBY), facts(lock=False, lan_ok=False, p=peer(PRIMARY)), POLICY)
    assert s.role == STANDBY and WriteStandbyLock in kinds(acts)


def test_node_that_missed_a_takeover_fences_itself():
    s, acts = fsm.decide(
        state(INIT, epoch=3, owns=True), facts(now=0.2, p=peer(PRIMARY, epoch=4, owns=True)), POLICY
    )
    assert s.role == STANDBY and WriteStandbyLock in kinds(acts)


def test_fresh_node_joins_a_serving_peer_as_secondary():
    s, acts = fsm.decide(
        state(INIT, epoch=0, owns=False), facts(now=0.2, p=peer(PRIMARY, epoch=1, owns=True)), POLICY
    )
    assert s.role == SECONDARY and s.epoch == 1 and WriteStandbyLock not in kinds(acts)


def test_planned_failover_sequence_and_completion():
    s, acts = fsm.decide(
        state(PRIMARY, epoch=2, owns=True), facts(p=peer(SECONDARY, epoch=2), command="failover"), POLICY
    )
    assert s.role == RELEASING
    order = kinds(acts)
    assert order.index(fsm.StopServices) < order.index(FinalSync) < order.index(StopResources)
    assert any(isinstance(a, Reply) and a.ok for a in acts)
    other, acts = fsm.decide(
        state(SECONDARY, epoch=2, home=False), facts(p=peer(RELEASING, epoch=2, owns=True, home=True)), POLICY
    )
    assert other.role == PRIMARY and other.epoch == 3 and not other.mirror_locked
    done, acts = fsm.decide(s, facts(p=peer(PRIMARY, epoch=3, owns=True)), POLICY)
    assert done.role == SECONDARY and done.epoch == 3


def test_failover_refused_when_peer_not_ready():
    s, acts = fsm.decide(
        state(PRIMARY, owns=True), facts(p=peer(STANDBY, standby=True), command="failover"), POLICY
    )
    assert s.role == PRIMARY and any(isinstance(a, Reply) and not a.ok for a in acts)


def test_release_rolls_back_when_peer_does_not_take_over():
    s = state(RELEASING, epoch=2, owns=True, handover_deadline=12.0)
    s2, acts = fsm.decide(s, facts(now=11.0, p=peer(SECONDARY, epoch=2)), POLICY)
    assert s2.role == RELEASING
    s3, acts = fsm.decide(s, facts(now=12.5, p=peer(SECONDARY, epoch=2)), POLICY)
    assert s3.role == PRIMARY and StartResources in kinds(acts)


def test_split_brain_higher_epoch_wins():
    lo, acts = fsm.decide(
        state(PRIMARY, epoch=4, owns=True), facts(p=peer(PRIMARY, epoch=5, owns=True)), POLICY
    )
    assert lo.role == STANDBY and StopResources in kinds(acts)
    hi, acts = fsm.decide(
        state(PRIMARY, epoch=5, owns=True), facts(p=peer(PRIMARY, epoch=4, owns=True)), POLICY
    )
    assert hi.role == PRIMARY and hi.request == "push_back"


def test_no_takeover_on_silence_until_the_ping_node_answers_again():
    s, acts = fsm.decide(state(SECONDARY), replace(facts(p=None), lan_confirmed=False), POLICY)
    assert s.role == SECONDARY and acts == []
    s, acts = fsm.decide(state(SECONDARY), facts(p=None), POLICY)
    assert s.role == PRIMARY


def test_no_takeover_without_lan_or_during_initdead():
    s, acts = fsm.decide(state(SECONDARY), facts(lan_ok=None, p=None), POLICY)
    assert s.role == SECONDARY and acts == []
    s, acts = fsm.decide(state(INIT), facts(now=0.5, p=None), POLICY)
    assert s.role == INIT and acts == []
    s, acts = fsm.decide(state(INIT), facts(now=1.5, p=None), POLICY)
    assert s.role == PRIMARY


def test_auto_failback_after_delay():
    pol = replace(POLICY, failback="auto", failback_delay=3.0)
    s = state(PRIMARY, epoch=3, owns=True, home=False)
    s, acts = fsm.decide(s, facts(now=10, p=peer(SECONDARY, epoch=3, home=True)), pol)
    assert s.role == PRIMARY and s.peer_ready_since == 10
    s, acts = fsm.decide(s, facts(now=13.5, p=peer(SECONDARY, epoch=3, home=True)), pol)
    assert s.role == RELEASING


def test_epochs_of_the_two_nodes_never_collide():
    a = replace(state(SECONDARY, epoch=4), epoch_parity=1)
    b = replace(state(SECONDARY, epoch=4), epoch_parity=0, node="b")
    ea = fsm.decide(a, facts(p=None), POLICY)[0].epoch
    eb = fsm.decide(b, facts(p=None), POLICY)[0].epoch
    assert (ea, eb) == (5, 6)


def test_takeover_refused_by_the_address_check_changes_nothing_and_retries_later():
    before = state(SECONDARY, epoch=4, direction="receive")
    after, acts = fsm.decide(before, facts(p=None), POLICY)
    assert isinstance(acts[0], CheckAddressFree)
    s, acts = fsm.takeover_refused(before, facts(p=None), POLICY, "VIP answered by 02:00:00:00:00:01")
    assert replace(s, retry_at=0.0, reason="", alert="", notified="") == before
    assert kinds(acts) == [Notify] and acts[0].event == "takeover-refused"
    s2, acts = fsm.decide(s, facts(now=10.2, p=None), POLICY)
    assert s2.role == SECONDARY and acts == []
    s3, acts = fsm.decide(s2, facts(now=10.6, p=None), POLICY)
    assert s3.role == PRIMARY
    s4, acts = fsm.takeover_refused(s2, facts(now=10.6, p=None), POLICY, "again")
    assert acts == []  # the same standing problem: notified once


def test_takeover_that_fails_later_is_rolled_back():
    before = state(SECONDARY, epoch=4, direction="receive")
    after, _ = fsm.decide(before, facts(p=None), POLICY)
    s, acts = fsm.takeover_failed(before, after, facts(p=None), POLICY, "service tcp: start exited 1")
    assert s.role == SECONDARY and not s.owns_epoch and not s.mirror_locked and s.epoch == after.epoch
    assert kinds(acts)[:2] == [StopResources, ReleaseMirrorLock]
    assert any(isinstance(a, SetMirrorDirection) and a.direction == "receive" for a in acts)
    # a lock held before the takeover (the peer is in standby) is kept
    locked = replace(before, mirror_locked=True)
    after, _ = fsm.decide(locked, facts(p=None), POLICY)
    s, acts = fsm.takeover_failed(locked, after, facts(p=None), POLICY, "x")
    assert s.mirror_locked and ReleaseMirrorLock not in kinds(acts)


def test_secondary_that_hears_a_serving_primary_receives():
    s, acts = fsm.decide(state(SECONDARY, direction=None), facts(p=peer(PRIMARY, owns=True)), POLICY)
    assert [a.direction for a in acts if isinstance(a, SetMirrorDirection)] == [
        "receive"
    ] and s.direction == "receive"
    s, acts = fsm.decide(s, facts(p=peer(PRIMARY, owns=True)), POLICY)
    assert acts == []


def test_primary_passes_an_epoch_its_peer_raised_for_a_takeover_that_did_not_happen():
    s = replace(state(PRIMARY, epoch=3, owns=True), epoch_parity=1)
    s, acts = fsm.decide(s, facts(p=peer(SECONDARY, epoch=58, owns=False)), POLICY)
    assert s.role == PRIMARY and s.epoch == 59 and s.owns_epoch
    assert isinstance(acts[0], RaiseEpoch) and acts[0].to == 59 and acts[1].event == "epoch-raised"
    # an epoch the peer owns (it served in it) is not passed: that would overwrite its writes
    s = replace(state(PRIMARY, epoch=3, owns=True), epoch_parity=1)
    s, acts = fsm.decide(s, facts(p=peer(SECONDARY, epoch=58, owns=True)), POLICY)
    assert s.epoch == 3 and RaiseEpoch not in kinds(acts)


def test_resource_that_cannot_be_restarted_hands_over_to_a_peer_able_to_serve():
    f = replace(facts(p=peer(SECONDARY)), resource_failure="restarting tcp failed")
    s, acts = fsm.decide(state(PRIMARY, owns=True), f, POLICY)
    assert s.role == STANDBY and "restarting tcp failed" in s.reason
    assert kinds(acts)[0] == StopResources and WriteStandbyLock in kinds(acts)


def test_resource_failure_with_no_peer_able_to_serve_is_notified_once():
    for p in (None, peer(STANDBY, standby=True), peer(SECONDARY, lan_ok=False)):
        f = replace(facts(p=p), resource_failure="restarting tcp failed")
        s, acts = fsm.decide(state(PRIMARY, owns=True), f, POLICY)
        assert s.role == PRIMARY and kinds(acts) == [Notify] and acts[0].event == "resource-failed"
        s, acts = fsm.decide(s, f, POLICY)
        assert s.role == PRIMARY and acts == []  # still the same problem: no second notification
        s, acts = fsm.decide(s, facts(p=p), POLICY)  # over
        s, acts = fsm.decide(s, f, POLICY)
        assert kinds(acts) == [Notify]  # back again: told again


GUARD = replace(POLICY, data_guard=True)


def test_secondary_knows_its_copy_from_what_the_serving_primary_says():
    s, _ = fsm.decide(
        state(SECONDARY, uptodate=True), facts(p=peer(PRIMARY, owns=True, in_sync=False)), GUARD
    )
    assert not s.uptodate
    s, _ = fsm.decide(s, facts(p=peer(PRIMARY, owns=True, in_sync=True)), GUARD)
    assert s.uptodate
    # a primary knows its peer outdated while its replica is not in sync
    s, _ = fsm.decide(state(PRIMARY, owns=True), replace(facts(p=peer()), replica_in_sync=False), GUARD)
    assert s.uptodate and s.peer_outdated
    s, _ = fsm.decide(s, replace(facts(p=peer()), replica_in_sync=True), GUARD)
    assert not s.peer_outdated


def test_outdated_secondary_does_not_take_over_and_says_so_once():
    for p in (None, peer(STANDBY, standby=True), peer(RELEASING, owns=True, in_sync=False)):
        s, acts = fsm.decide(state(SECONDARY, uptodate=False), facts(p=p), GUARD)
        assert s.role == SECONDARY and CheckAddressFree not in kinds(acts)
        assert [a.event for a in acts if isinstance(a, Notify)] == ["outdated"]
        s, acts = fsm.decide(s, facts(now=11, p=p), GUARD)
        assert s.role == SECONDARY and acts == []
    # the same secondary, known up to date, takes over at once: the normal failover
    s, acts = fsm.decide(state(SECONDARY, uptodate=True), facts(p=None), GUARD)
    assert s.role == PRIMARY and s.peer_outdated


def test_a_node_that_never_hears_its_peer_serves_alone_only_as_a_degraded_primary():
    started = dict(role=INIT, epoch=3)
    for uptodate, peer_outdated, serves in ((True, True, True), (True, False, False), (False, False, False)):
        s, acts = fsm.decide(
            state(**started, owns=True, uptodate=uptodate, peer_outdated=peer_outdated),
            facts(now=5, p=None),
            GUARD,
        )
        assert (s.role == PRIMARY) is serves, (uptodate, peer_outdated)
        if not serves:
            assert s.role == INIT and [a.event for a in acts if isinstance(a, Notify)] == ["outdated"]


def test_force_primary_serves_an_outdated_copy_on_the_administrators_word():
    s, acts = fsm.decide(state(SECONDARY, uptodate=False), facts(p=None, command="force-primary"), GUARD)
    assert s.role == PRIMARY and s.uptodate and isinstance(acts[0], CheckAddressFree)
    assert any(isinstance(a, Reply) and a.ok for a in acts)
    s, acts = fsm.decide(state(INIT, uptodate=False), facts(now=5, p=None, command="force-primary"), GUARD)
    assert s.role == PRIMARY
    # never while the peer serves
    s, acts = fsm.decide(
        state(SECONDARY, uptodate=False), facts(p=peer(PRIMARY, owns=True), command="force-primary"), GUARD
    )
    assert s.role == SECONDARY and any(isinstance(a, Reply) and not a.ok for a in acts)


def test_primary_does_not_step_down_for_a_peer_whose_copy_is_outdated():
    p = peer(SECONDARY, uptodate=False)  # healthy, but it could not take over on its own
    s, acts = lan_fault(state(PRIMARY, owns=True), facts(lan_ok=False, p=p), GUARD)
    assert s.role == PRIMARY and [a.event for a in acts if isinstance(a, Notify)] == ["lan-unhealthy"]
    s, acts = fsm.decide(state(PRIMARY, owns=True), replace(facts(p=p), resource_failure="x"), GUARD)
    assert s.role == PRIMARY
    s, acts = lan_fault(
        state(PRIMARY, owns=True), facts(lan_ok=False, p=peer(SECONDARY, uptodate=True)), GUARD
    )
    assert s.role == STANDBY


def test_rank_puts_a_node_known_up_to_date_first():
    mine = fsm.my_rank(state(SECONDARY, epoch=5, uptodate=False), facts(), GUARD)
    assert mine < fsm.peer_rank(peer(SECONDARY, epoch=3, uptodate=True), GUARD)


UNMOUNTED = "nothing is mounted at /srv/mail (require_mount)"


def test_a_node_unfit_to_serve_stops_serving_at_once_and_never_takes_over():
    for role in (PRIMARY, RELEASING):
        s, acts = fsm.decide(state(role, owns=True), facts(p=peer(SECONDARY), unfit=UNMOUNTED), POLICY)
        assert s.role == STANDBY and s.unfit == UNMOUNTED and s.reason == UNMOUNTED
        assert kinds(acts)[0] == StopResources and WriteStandbyLock not in kinds(acts) and Notify in kinds(acts)
    for s in (state(SECONDARY), state(INIT, epoch=3)):  # a dead primary, a boot with the mount missing
        s, acts = fsm.decide(s, facts(p=None, unfit=UNMOUNTED), POLICY)
        assert s.role == STANDBY and StartResources not in kinds(acts)
        s, acts = fsm.decide(s, facts(now=30, p=None, unfit=UNMOUNTED, command="force-primary"), POLICY)
        assert s.role == STANDBY and acts == [Reply(False, f"force-primary: refused: {UNMOUNTED}")]
    # and it ranks below a fit peer while both serve
    assert fsm.my_rank(state(PRIMARY, epoch=9), facts(unfit=UNMOUNTED), POLICY) < fsm.peer_rank(peer(PRIMARY), POLICY)


def test_a_primary_whose_disk_goes_claims_no_changes_of_its_own_for_it():
    # The daemon mirroring a tree that was unmounted says its replica is not in sync: that
    # is the fault itself, not changes the peer lacks (a resume would otherwise be refused
    # for them, and a lone restart would take this node's copy for the only one).
    for outdated in (False, True):
        s = state(PRIMARY, epoch=5, owns=True, uptodate=True, peer_outdated=outdated)
        f = replace(facts(p=peer(SECONDARY, epoch=5), unfit=UNMOUNTED), replica_in_sync=False)
        s, _ = fsm.decide(s, f, GUARD)
        assert s.role == STANDBY and s.peer_outdated is outdated


def test_a_node_fit_again_rejoins_by_itself_keeping_its_claim_on_its_data():
    # A degraded primary (its peer outdated) whose disk went away: what it holds alone is
    # still its own once the disk is back, unlike after an administrator's resume.
    s = state(PRIMARY, epoch=5, owns=True, uptodate=True, peer_outdated=True)
    s, _ = fsm.decide(s, facts(p=peer(SECONDARY, epoch=5, uptodate=False), unfit=UNMOUNTED), GUARD)
    assert s.role == STANDBY and s.mirror_locked
    s, acts = fsm.decide(s, facts(now=11, lan_ok=None, p=peer(SECONDARY, epoch=5, uptodate=False)), GUARD)
    assert s.role == STANDBY and acts == []  # its LAN verdict first
    s, acts = fsm.decide(s, facts(now=12, p=peer(SECONDARY, epoch=5, uptodate=False)), GUARD)
    assert s.role == SECONDARY and s.owns_epoch and s.peer_outdated and s.unfit == ""
    assert ReleaseMirrorLock in kinds(acts) and WriteStandbyLock not in kinds(acts)
    # the administrator's standby meanwhile makes it the administrator's to end
    s = state(STANDBY, epoch=5, owns=True, unfit=UNMOUNTED, mirror_locked=True)
    s, _ = fsm.decide(s, facts(lock=True, unfit=UNMOUNTED), POLICY)
    s, _ = fsm.decide(s, facts(lock=False), POLICY)
    assert s.role == SECONDARY and not s.owns_epoch


def test_a_new_disk_not_yet_mirrored_onto_gives_up_every_claim_and_trusts_no_stale_word():
    # A degraded primary whose disk failed and was replaced: nothing it held alone is here
    # any more; with its peer dead it must not serve the new disk on its own.
    wrong = "/srv/spool holds no tree, not tree 0123 that this node held there"
    s = state(PRIMARY, epoch=5, owns=True, uptodate=True, peer_outdated=True)
    s, _ = fsm.decide(s, facts(p=None, unfit=wrong), GUARD)
    assert s.role == STANDBY and s.unfit == wrong
    adopted = Facts(now=12, lan_ok=True, peer=None, standby_lock=False, copy_incomplete=True)
    s, acts = fsm.decide(s, adopted, GUARD)
    assert s.role == SECONDARY and not (s.uptodate or s.owns_epoch or s.peer_outdated), s
    assert ReleaseMirrorLock in kinds(acts)
    for now in (13, 30, 300):  # the peer stays dead: the data guard keeps it from serving
        s, acts = fsm.decide(s, replace(adopted, now=now), GUARD)
        assert s.role == SECONDARY and StartResources not in kinds(acts)
    # the serving peer's word that its replica is in sync may predate the new disk
    serving = peer(PRIMARY, epoch=7, in_sync=True)
    s, _ = fsm.decide(s, replace(adopted, now=301, peer=serving), GUARD)
    assert not s.uptodate
    # once the copy's own record shows a session applied, the peer's word counts again
    s, _ = fsm.decide(s, facts(now=302, p=serving), GUARD)
    assert s.uptodate


# ------------------------------------------------------------ two machines, random faults

STEP = 0.1  # one heartbeat interval
DEADTIME_STEPS = 5


@dataclass
class SimNode:
    name: str
    home: bool
    state: fsm.State
    lock: bool = False  # the standby lock file
    serving: bool = False  # resources actually up
    lan_ok: bool = True
    muted: bool = False  # its heartbeats are lost on every link (one-way loss)
    last_heard: int | None = None  # step at which we last heard the peer
    view: PeerView | None = None
    command: str | None = None
    epoch_file: int = 0  # what RaiseEpoch/ObserveEpoch wrote
    mirror_lock: bool = False  # the mirroring lock file
    direction: str | None = None  # the mirror process running: "send", "receive" or None
    persisted: fsm.State | None = None  # node-state.json
    data: frozenset = frozenset()  # the writes this node's tree holds
    replica_ok: bool = False  # serving: the peer's tree got every write; releasing: final sync done
    mounted: bool = True  # its tree's disk (a tree that must be a mount point)
    new_disk: bool = False  # adopted by the administrator, no session applied to it yet
    down: bool = False  # powered off: it neither steps nor is heard; powered on, it restarts

    def advertised(self) -> PeerView:
        s = self.state
        return PeerView(
            name=self.name, role=s.role, epoch=s.epoch, owns_epoch=s.owns_epoch, standby=self.lock or not self.mounted,
            lan_ok=self.lan_ok, serving=self.serving, request=s.request, home=self.home, uptodate=s.uptodate,
            in_sync=self.replica_ok and (self.serving or s.role == RELEASING), copy_incomplete=self.new_disk,
            ahead=s.peer_outdated,
        )  # fmt: skip

    def disk(self) -> tuple:
        return (self.epoch_file, self.mirror_lock, self.direction)


@dataclass
class Sim:
    nodes: list[SimNode]
    hb_up: bool = True
    lan_path_up: bool = True
    step_no: int = 0
    sync_fails: bool = False
    start_fails: bool = False  # a service cannot start (a takeover fails after its address check)
    mirror_cut: bool = False  # mirror traffic lost (heartbeats still flow)
    stalled: bool = False  # the mirror daemons send nothing (frozen); a final sync still works
    policy: Policy = POLICY
    writes: dict = field(default_factory=dict)  # write number -> (writer, heard by the other node)
    discarded: set = field(default_factory=set)  # writes an administrator gave up (force-primary)
    log: list = field(default_factory=list)

    def connected(self) -> bool:
        lan = self.lan_path_up and all(n.lan_ok for n in self.nodes)
        return self.hb_up or lan

    def hears(self, i: int) -> bool:
        other = self.nodes[1 - i]
        return self.connected() and not other.muted and not other.down and not self.nodes[i].down

    def answers_arp(self, i: int) -> bool:
        """Node i's address check: the other node holds the VIP and the LAN carries ARP."""
        other = self.nodes[1 - i]
        return other.serving and self.lan_path_up and all(n.lan_ok for n in self.nodes)

    def write_and_replicate(self) -> None:
        """Each serving node's clients write; its daemon mirrors to a receiving peer when it can."""
        for i, node in enumerate(self.nodes):
            if node.state.role != RELEASING:
                node.replica_ok = False
            if not node.serving or not node.mounted:  # unmounted: it stops serving at its next step
                continue
            number = len(self.writes) + 1
            other = self.nodes[1 - i]
            # Known to the peer: made while it heard us, and did not serve its own branch
            # (in a split brain the writes of each side are that side's, until one stops).
            self.writes[number] = (node.name, self.hears(1 - i) and not other.serving)
            node.data |= {number}
            if (
                self.mirror_path()
                and not self.stalled
                and node.direction == "send"
                and other.direction == "receive"
                and other.mounted  # its receiver refuses while nothing is mounted
                and not (node.mirror_lock or other.mirror_lock or node.epoch_file < other.epoch_file)
            ):
                other.data = node.data  # a sync with --delete: the replica becomes the source
                other.new_disk = False  # its record of the session applied
                node.replica_ok = True

    def mirror_path(self) -> bool:
        return self.hears(0) and self.hears(1) and not self.mirror_cut

    def step(self):
        self.step_no += 1
        now = self.step_no * STEP
        self.write_and_replicate()
        adverts = [n.advertised() for n in self.nodes]
        for i, node in enumerate(self.nodes):
            if node.down:
                continue
            if self.hears(i):
                node.last_heard, node.view = self.step_no, adverts[1 - i]
            alive = node.last_heard is not None and self.step_no - node.last_heard < DEADTIME_STEPS
            f = Facts(
                now=now, lan_ok=node.lan_ok, peer=node.view if alive else None, standby_lock=node.lock,
                command=node.command, replica_in_sync=node.replica_ok, unfit="" if node.mounted else UNMOUNTED,
                copy_incomplete=node.new_disk,
            )  # fmt: skip
            node.command = None
            before = node.state
            new, actions = fsm.decide(before, f, self.policy)
            if StartResources in kinds(actions):
                # safety: never take over with an unhealthy LAN, a standby lock, an unmounted
                # tree, or a serving peer heard
                assert f.lan_ok is True and not f.standby_lock and node.mounted, (f, before)
                assert f.peer is None or not f.peer.serving, (f, before)
            node.state = new
            serving_before = node.serving
            self.execute(i, actions, f, before)
            if node.serving and not serving_before and self.policy.data_guard:
                if node.state.reason == "forced by the administrator":  # what it lacked is given up
                    self.discarded |= set().union(*(n.data for n in self.nodes)) - node.data
                else:
                    self.check_newest(i, heard=f.peer is not None and self.hears(i), claims=before.peer_outdated)
            node.persisted = node.state
            assert node.serving == (node.state.role == PRIMARY), (node.state, actions)
            assert node.mounted or not node.serving, (node.state, actions)
            assert node.state.epoch == node.epoch_file, (node.state, node.epoch_file, actions)
            assert node.direction == node.state.direction, (node.state, node.direction, actions)
            self.log.append((self.step_no, node.name, before.role, node.state.role))

    def check_newest(self, i: int, heard: bool, claims: bool) -> None:
        """A node that starts serving on its own holds every write that still exists, except
        writes it could not have known of: made by a peer it did not hear at that moment, or
        that served too (a partition: the writer then loses the split brain and waits for the
        administrator), unless it hears that peer now (down or cut off then, the writer can
        tell it since) and holds no branch of its own (``claims``: it served while the other
        did not get its changes, so each copy may hold writes the other lacks; the rank
        decides, the other copy waits for the administrator, and the end of
        ``test_random_faults_never_end_in_split_brain`` checks that nothing was lost)."""
        node, other = self.nodes[i], self.nodes[1 - i]
        if claims and other.state.peer_outdated:
            return  # each copy may hold writes the other lacks: no copy has them all
        alive = set().union(*(n.data for n in self.nodes)) - self.discarded
        missing = sorted(
            w for w in alive - node.data
            if self.writes[w][1] or self.writes[w][0] == node.name or (heard and not claims and w in other.data)
        )  # fmt: skip
        assert not missing, (f"{node.name} serves without writes {missing} it knew of", self.log[-12:])

    def execute(self, i: int, actions: list, f: Facts, before: fsm.State) -> None:
        """What hawrap.node does with the actions, with the faults of the simulation."""
        node = self.nodes[i]
        policy = self.policy
        for a in actions:
            if isinstance(a, CheckAddressFree) and self.answers_arp(i):
                disk = node.disk()
                node.state, more = fsm.takeover_refused(before, f, policy, "the address answers")
                self.execute(i, more, f, before)
                assert node.disk() == disk, "a refused takeover changed something"
                return
            if isinstance(a, StartResources) and self.start_fails:
                node.state, more = fsm.takeover_failed(
                    before, node.state, f, policy, "a service cannot start"
                )
                self.execute(i, more, f, before)
                return
            if isinstance(a, FinalSync) and (self.sync_fails or not self.mirror_path()):
                node.state, more = fsm.release_failed(node.state, f, policy, "sync failed")
                self.execute(i, more, f, before)
                return
            if isinstance(a, FinalSync):
                self.nodes[1 - i].data = node.data
                self.nodes[1 - i].new_disk = False
                node.replica_ok = True
            if isinstance(a, StartResources):
                # the receiver is gone before anything is served: the lock reaches only a running one
                assert node.direction != "receive", (node.state, actions)
                node.serving = True
                node.new_disk = False  # served: the tree's copy from now on (TreeDisks.served)
            elif isinstance(a, StopReceiver):
                node.direction = None if node.direction == "receive" else node.direction
            elif isinstance(a, StopResources):
                node.serving = False
            elif isinstance(a, WriteStandbyLock):
                node.lock = True
            elif isinstance(a, AcquireMirrorLock):
                node.mirror_lock = True
            elif isinstance(a, ReleaseMirrorLock):
                node.mirror_lock = False
            elif isinstance(a, (RaiseEpoch, ObserveEpoch)):
                node.epoch_file = max(node.epoch_file, a.to if isinstance(a, RaiseEpoch) else a.epoch)
            elif isinstance(a, SetMirrorDirection):
                node.direction = a.direction

    def power(self, i: int, on: bool) -> None:
        node = self.nodes[i]
        if on and node.down:
            node.down = False
            self.restart(i)
        elif not on:
            node.down, node.serving = True, False

    def restart(self, i):
        node = self.nodes[i]
        saved = node.persisted or node.state
        node.state = fsm.State(
            node=node.name, is_home=node.home, started=self.step_no * STEP, epoch=node.epoch_file,
            owns_epoch=saved.owns_epoch, mirror_locked=node.mirror_lock, epoch_parity=1 if node.name == "a" else 0,
            uptodate=saved.uptodate, peer_outdated=saved.peer_outdated,
        )  # fmt: skip
        node.serving = False  # the supervisor's cleanup removed the VIP
        node.direction = None  # and the node's mirror processes
        node.replica_ok = False
        node.last_heard, node.view = None, None

    def resume(self, i: int) -> None:
        """``hawrap resume``: the lock goes; what only this node holds is given up (the CLI
        listed it and asked for --discard-local-changes)."""
        node, other = self.nodes[i], self.nodes[1 - i]
        if node.lock:
            self.discarded |= node.data - other.data
        node.lock = False

    def replace_disk(self, i: int) -> None:
        """A node's disk fails and is replaced by a blank one: a serving node first loses it
        (unfit, it stops); one that does not serve gets the new disk, adopted by the
        administrator (``resume --new-disk``).  What only the old disk held is lost."""
        node, other = self.nodes[i], self.nodes[1 - i]
        if node.serving:
            node.mounted = False
            return
        self.discarded |= node.data - other.data
        node.data, node.mounted, node.new_disk = frozenset(), True, True

    def both_serving(self) -> bool:
        return all(n.serving for n in self.nodes)


EVENTS = st.sampled_from(
    ["hb_down", "hb_up", "lanpath_down", "lanpath_up", "a_lan_down", "a_lan_up", "b_lan_down", "b_lan_up",
     "a_restart", "b_restart", "a_failover", "b_failover", "a_failback", "b_failback", "a_standby", "b_standby",
     "a_resume", "b_resume", "sync_fails", "sync_ok", "a_mute", "b_mute", "a_unmute", "b_unmute",
     "start_fails", "start_ok", "mirror_cut", "mirror_ok", "a_force", "b_force", "a_unmount", "b_unmount",
     "a_mount", "b_mount", "a_newdisk", "b_newdisk", "stall", "unstall", "a_down", "b_down", "a_up", "b_up", "wait", "wait", "wait"]
)  # fmt: skip


def apply(sim: Sim, event: str):
    idx = {"a": 0, "b": 1}
    if event == "hb_down":
        sim.hb_up = False
    elif event == "hb_up":
        sim.hb_up = True
    elif event == "lanpath_down":
        sim.lan_path_up = False
    elif event == "lanpath_up":
        sim.lan_path_up = True
    elif event == "sync_fails":
        sim.sync_fails = True
    elif event == "sync_ok":
        sim.sync_fails = False
    elif event == "start_fails":
        sim.start_fails = True
    elif event == "start_ok":
        sim.start_fails = False
    elif event == "mirror_cut":
        sim.mirror_cut = True
    elif event == "mirror_ok":
        sim.mirror_cut = False
    elif event in ("stall", "unstall"):
        sim.stalled = event == "stall"
    elif event == "wait":
        pass
    else:
        who, what = event.split("_", 1)
        node = sim.nodes[idx[who]]
        if what == "lan_down":
            node.lan_ok = False
        elif what == "lan_up":
            node.lan_ok = True
        elif what == "mute":
            node.muted = True
        elif what == "unmute":
            node.muted = False
        elif what == "restart":
            sim.restart(idx[who])
        elif what in ("down", "up"):
            sim.power(idx[who], what == "up")
        elif what in ("failover", "failback"):
            node.command = what
        elif what == "force":
            node.command = "force-primary"
        elif what == "standby":
            node.lock = True
        elif what == "resume":
            sim.resume(idx[who])
        elif what in ("unmount", "mount"):
            node.mounted = what == "mount"
        elif what == "newdisk":
            sim.replace_disk(idx[who])


def new_sim(policy: Policy = POLICY) -> Sim:
    return Sim([
        SimNode("a", True, fsm.State(node="a", is_home=True, started=0.0, epoch_parity=1)),
        SimNode("b", False, fsm.State(node="b", is_home=False, started=0.0, epoch_parity=0)),
    ], policy=policy)  # fmt: skip


def converge(sim: Sim, steps: int = 120):
    sim.hb_up = sim.lan_path_up = True
    sim.sync_fails = sim.start_fails = sim.mirror_cut = sim.stalled = False
    for i, n in enumerate(sim.nodes):
        n.lan_ok, n.muted, n.mounted = True, False, True
        sim.power(i, True)
    for _ in range(steps):
        sim.step()


@settings(
    max_examples=int(os.environ.get("HAWRAP_FSM_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(st.tuples(EVENTS, st.integers(1, 12)), max_size=25), st.booleans())
# The primary's disk fails while its peer is outdated, and is replaced: its blank disk must
# not win on its epoch against the only copy left.
@example([("hb_down", 2), ("a_unmount", 1), ("a_newdisk", 1)], True)
# A new disk served (forced) holds the newest writes: it is no longer one to be mirrored onto.
@example([("hb_down", 1), ("a_newdisk", 1), ("b_newdisk", 1), ("b_force", 1), ("hb_down", 1), ("b_newdisk", 1)], True)
# The secondary powered off, the primary writing on alone, then put in standby: back, the
# secondary must hear from it (its ``ahead``) that the copy it last knew up to date is not.
@example([("hb_down", 2), ("b_down", 1), ("a_standby", 1)], True)
# Both copies diverged: b served while muted, then its disk went; a took over, then its
# disk went.  Back, neither may start a receiver before the check that the other has its
# writes: whoever serves first would mirror over them.
@example([("hb_down", 1), ("a_failover", 5), ("b_mute", 1), ("hb_down", 2), ("b_restart", 1), ("hb_down", 4),
          ("b_newdisk", 1), ("hb_down", 2), ("a_unmount", 1)], True)
# b, forced primary while a is unfit, then in standby: a (back) must not serve without
# b's writes; resumed, b serves, and a, which served an epoch of its own, stands by once more.
@example([("hb_down", 2), ("a_unmount", 1), ("b_mute", 1), ("b_force", 1), ("a_mount", 1), ("b_standby", 1)], True)
# b's disk replaced while it waits for a hand-over to complete: it must not serve the blank
# disk when the hand-over times out.
@example([("hb_down", 1), ("a_failover", 1), ("hb_down", 2), ("a_failover", 3), ("a_restart", 1), ("b_newdisk", 1)], True)
# a, cut off (LAN and heartbeats), steps back holding writes b lacks; b took over: a must
# not receive b's copy before it hears b serve and stands by.
@example([("hb_down", 3), ("a_lan_down", 1), ("hb_down", 4), ("b_unmount", 10)], True)
# Both copies diverged (b took over from a silent, unfit a; a holds a write b lacks): the
# higher epoch serves, the other copy waits for the administrator.
@example([("hb_down", 3), ("lanpath_down", 1), ("a_newdisk", 1), ("hb_down", 3), ("b_restart", 1)], True)
def test_random_faults_never_end_in_split_brain(script, mirrored):
    """With mirrored trees (``mirrored``: the data guard on), also: a node that starts serving
    on its own holds every write it could have known of (Sim.check_newest)."""
    sim = new_sim(replace(POLICY, data_guard=mirrored))
    clash = 0  # consecutive rounds in which both serve while hearing each other
    for event, steps in script:
        apply(sim, event)
        for _ in range(steps):
            sim.step()
            clash = clash + 1 if sim.both_serving() and sim.hears(0) and sim.hears(1) else 0
            assert clash <= 2, sim.log[-10:]
    converge(sim)
    assert not sim.both_serving(), sim.log[-20:]
    # With mirrored trees, no write lost without the administrator giving it up: each is
    # on a node, or was listed by a resume (or served over by force-primary)
    lost = sorted(set(sim.writes) - set().union(*(n.data for n in sim.nodes)) - sim.discarded)
    assert not (mirrored and lost), (f"writes {lost} lost", sim.log[-20:])
    # with every standby lock removed (the administrator resumed), exactly one node serves.
    # A node that claims data of its own and meets the peer serving stands by once more
    # (the peer took over after it served): the administrator resumes it too.
    for _ in range(2):
        for i in (0, 1):
            sim.resume(i)
        converge(sim)
    assert sum(n.serving for n in sim.nodes) == 1, [(n.name, n.state) for n in sim.nodes]
    roles = sorted(n.state.role for n in sim.nodes)
    assert roles == [PRIMARY, SECONDARY], roles
    # and replication works again: the secondary receives, nobody holds a mirroring lock,
    # and the primary's epoch is not older than its replica's (it would be refused)
    primary = next(n for n in sim.nodes if n.serving)
    secondary = next(n for n in sim.nodes if not n.serving)
    assert secondary.direction == "receive" and primary.direction == "send"
    assert not primary.mirror_lock and not secondary.mirror_lock, [(n.name, n.state) for n in sim.nodes]
    assert primary.epoch_file >= secondary.epoch_file, [(n.name, n.state) for n in sim.nodes]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "both"]), st.integers(1, 9), st.integers(1, 5)), max_size=20
    )
)
def test_lan_blips_shorter_than_lan_hold_change_no_role(blips):
    """Ping replies lost in bursts (each shorter than lan_hold, on one node or both): the
    roles never change and nobody writes a standby lock."""
    sim = new_sim()
    converge(sim, 30)
    for who, down, up in blips:
        for n in sim.nodes:
            n.lan_ok = not (who == "both" or who == n.name)
        for _ in range(down):  # fewer steps than lan_hold (10)
            sim.step()
        for n in sim.nodes:
            n.lan_ok = True
        for _ in range(up):
            sim.step()
        assert [n.state.role for n in sim.nodes] == [PRIMARY, SECONDARY], sim.log[-10:]
        assert not any(n.lock for n in sim.nodes)


def test_cold_start_elects_the_home_node():
    sim = new_sim()
    for _ in range(30):
        sim.step()
    assert sim.nodes[0].state.role == PRIMARY and sim.nodes[1].state.role == SECONDARY


def test_simulated_primary_death_and_resume_flow():
    sim = new_sim()
    converge(sim, 30)
    a, b = sim.nodes
    assert a.serving
    # primary loses power: silent on every link
    sim.hb_up = False
    a.lan_ok = False  # its NIC is gone with it
    for _ in range(DEADTIME_STEPS + 2):
        sim.step()
    assert b.serving and b.state.mirror_locked
    # a boots again with its network back: it missed the takeover, so it fences itself
    sim.restart(0)
    converge(sim, 30)
    assert b.serving and a.state.role == STANDBY and a.lock
    a.lock = False  # hawrap resume
    converge(sim, 10)
    assert a.state.role == SECONDARY and not b.state.mirror_locked and b.serving
    a.command = "failback"
    converge(sim, 20)
    assert a.serving and b.state.role == SECONDARY


def test_standby_of_a_primary_whose_daemon_lags_gives_the_peer_every_write():
    """The primary's daemon sends nothing (frozen) while clients write: its peer's copy is
    outdated and would not take over on its own.  The standby lock makes the primary hand
    over: the peer serves every write, the old primary stands by, and a resume gives up
    nothing.  (Without the hand-over nobody served: the peer said it was outdated.)"""
    sim = new_sim(GUARD)
    converge(sim, 30)
    a, b = sim.nodes
    sim.stalled = True
    for _ in range(5):
        sim.step()
    assert a.data - b.data and not b.state.uptodate  # writes only a holds
    a.lock = True  # hawrap standby
    for _ in range(10):
        sim.step()
        assert not (a.serving and b.serving)
    assert b.serving and a.state.role == STANDBY, sim.log[-6:]
    assert a.data <= b.data, sorted(a.data - b.data)
    sim.resume(0)
    assert not sim.discarded
    converge(sim, 20)
    assert b.serving and a.state.role == SECONDARY and a.data == b.data


def test_a_node_back_from_power_off_does_not_serve_what_a_peer_in_standby_says_is_old():
    """b is powered off; a serves on alone (its writes reach nobody), then the administrator
    puts a in standby (nobody serves: b is off).  b boots knowing its copy up to date from
    before: a's heartbeats (``ahead``) tell it that it is not, so b does not serve it.
    Resumed, a serves again, every write kept.  (Before, b served its old copy.)"""
    sim = new_sim(GUARD)
    converge(sim, 30)
    a, b = sim.nodes
    sim.power(1, False)
    for _ in range(DEADTIME_STEPS + 5):
        sim.step()
    alone = a.data - b.data
    assert a.serving and a.state.peer_outdated and alone
    a.lock = True  # hawrap standby: the peer is silent, so at once
    sim.step()
    assert a.state.role == STANDBY and not a.serving
    sim.power(1, True)
    for _ in range(30):
        sim.step()
        assert not b.serving, sim.log[-4:]
    assert not b.state.uptodate
    sim.resume(0)  # nobody else serves: a's copy is not replaced, whatever resume offered
    converge(sim, 30)
    assert a.serving and alone <= b.data, sim.log[-6:]
