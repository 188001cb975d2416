"""The etcd backend's rules without etcd: who may campaign, the epoch floor, decoding what is
read from etcd (hostile values included), and the configuration checks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hawrap.errors import ConfigError
from hawrap.etcdclient import EtcdConnection, KeyValue
from hawrap.leadership import (
    Keys,
    Member,
    Position,
    Start,
    Timing,
    campaign_verdict,
    check_name,
    leader_value,
    new_floor,
    parse_snapshot,
)

positions = st.builds(Position, st.integers(0, 5), st.integers(0, 5))
names = st.sampled_from(["a", "b", "c", "d", "e"])
members = st.lists(
    st.builds(Member, name=names, position=positions, eligible=st.booleans(), yielding=st.booleans()),
    min_size=1,
    max_size=5,
    unique_by=lambda m: m.name,
)


@given(members)
def test_no_member_campaigns_while_an_eligible_one_is_ahead(ms):
    for me in ms:
        others = [m for m in ms if m is not me]
        if campaign_verdict(me, others) is None:
            assert me.eligible
            assert not any(m.eligible and m.position > me.position for m in others)


@given(members)
def test_some_eligible_member_always_campaigns(ms):
    """Liveness: if anyone may lead, the most up-to-date eligible members are not all blocked."""
    if any(m.eligible for m in ms):
        assert any(campaign_verdict(me, [m for m in ms if m is not me]) is None for me in ms)


@given(members, names)
def test_a_failover_request_leaves_the_key_to_its_target(ms, target):
    verdicts = {me.name: campaign_verdict(me, [m for m in ms if m is not me], target) for me in ms}
    if any(m.name == target and m.eligible for m in ms):
        assert all(v is not None for n, v in verdicts.items() if n != target)


def test_equal_positions_prefer_the_member_that_did_not_resign():
    a = Member("a", Position(3, 9), True, yielding=True)
    b = Member("b", Position(3, 9), True)
    assert campaign_verdict(a, [b]) is not None and campaign_verdict(b, [a]) is None
    # but a resigned member that is strictly ahead still campaigns: newest data wins
    a2 = Member("a", Position(3, 10), True, yielding=True)
    assert campaign_verdict(a2, [b]) is None and campaign_verdict(b, [a2]) is not None


def test_a_member_in_standby_is_ignored_and_never_campaigns():
    standby = Member("a", Position(9, 9), False, reason="standby lock present")
    b = Member("b", Position(1, 1), True)
    assert "standby" in campaign_verdict(standby, [b])
    assert campaign_verdict(b, [standby]) is None


@given(st.integers(0, 2**40), st.lists(st.integers(0, 2**40), max_size=5), st.integers(1, 2**20))
def test_the_new_epoch_is_above_every_published_epoch_and_the_last_leaders(floor, published, revision_step):
    ms = [Member(f"m{i}", Position(e, 0), True) for i, e in enumerate(published)]
    previous_epoch = floor + 100  # the last leader's: floor + its revision
    f = new_floor(floor, ms)
    new_epoch = f + 100 + revision_step  # a later revision
    assert new_epoch > previous_epoch
    assert all(new_epoch > e for e in published)


def kv(key: str, value: bytes, lease: int = 0, rev: int = 5) -> KeyValue:
    return KeyValue(key, value, rev, rev, lease)


def test_snapshot_decodes_our_records():
    keys = Keys("/hamirror/x")
    member = Member("a", Position(4, 17), True, lease=77)
    snap = parse_snapshot(
        keys,
        12,
        [
            [kv(keys.leader, json.dumps({"node": "a", "floor": 30}).encode(), 77, 9)],
            [kv(keys.floor, b"30")],
            [kv(keys.member("a"), member.value(), 77, 11)],
            [kv(keys.failover, json.dumps({"to": "b"}).encode(), 88)],
        ],
    )
    assert snap.problems == []
    assert snap.leader.node == "a" and snap.leader.epoch == 39 and snap.leader.lease == 77
    assert snap.members["a"].position == Position(4, 17) and snap.members["a"].eligible
    assert snap.failover == {"to": "b", "lease": 88} and snap.floor == 30


@given(st.binary(max_size=200), st.binary(max_size=200), st.binary(max_size=200))
def test_snapshot_of_garbage_reports_problems_and_trusts_nothing(leader, floor, member):
    keys = Keys("/hamirror/x")
    snap = parse_snapshot(
        keys, 3, [[kv(keys.leader, leader)], [kv(keys.floor, floor)], [kv(keys.member("a"), member)], []]
    )
    if snap.leader is None:
        assert snap.leader_raw is not None  # a key that is there but not ours still blocks campaigns
    if snap.floor is None:
        assert any(keys.floor in p for p in snap.problems)
    for m in snap.members.values():
        assert isinstance(m.position.epoch, int) and m.position.epoch >= 0


def test_snapshot_rejects_hostile_values_naming_the_key():
    keys = Keys("/hamirror/x")
    snap = parse_snapshot(
        keys,
        3,
        [
            [kv(keys.leader, json.dumps({"node": "a", "floor": -1}).encode())],
            [kv(keys.floor, b"12abc")],
            [
                kv(keys.member("a"), json.dumps({"epoch": 2**62 + 1, "seq": 0, "eligible": True}).encode()),
                kv(keys.member("../evil"), b"{}"),
                kv(keys.member("b"), b"x" * 5000),
            ],  # fmt: skip
            [],
        ],
    )
    assert snap.leader is None and snap.floor is None and snap.members == {}
    text = "\n".join(snap.problems)
    assert (
        keys.leader in text and keys.floor in text and keys.member("a") in text and keys.member("b") in text
    )


def test_names_and_prefixes_that_would_break_the_key_layout_are_refused():
    for bad in ("", "a/b", "../x", "-x", "x" * 64):
        with pytest.raises(ConfigError):
            check_name(bad)
    for bad in ("hamirror", "/hamirror/", "/a//b"):
        with pytest.raises(ConfigError, match="etcd.prefix"):
            Keys(bad)


def test_a_ttl_too_short_for_one_lost_keepalive_is_refused_naming_the_key():
    conn = EtcdConnection(("http://127.0.0.1:2379",), request_timeout=0.5)
    with pytest.raises(ConfigError, match=r"etcd\.ttl = 2 s is below the minimum safe TTL of 3 s"):
        Timing(ttl=2, stop_budget=1.0).check(conn)
    Timing(ttl=3, stop_budget=1.0).check(conn)
    Timing(ttl=2, stop_budget=0.5).check(EtcdConnection(conn.endpoints, request_timeout=0.3))


def test_connection_settings_are_checked_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"etcd\.endpoints\[1\]"):
        EtcdConnection(("http://127.0.0.1:2379", "etcd:2379")).check()
    with pytest.raises(ConfigError, match="go together"):
        EtcdConnection(("https://127.0.0.1:2379",), cert_file=str(tmp_path)).check()
    with pytest.raises(ConfigError, match=r"etcd\.password_file: cannot read"):
        EtcdConnection(
            ("http://127.0.0.1:2379",), user="root", password_file=str(tmp_path / "missing")
        ).check()
    with pytest.raises(ConfigError, match="plain http but TLS"):
        EtcdConnection(("http://127.0.0.1:2379",), ca_file=__file__).check()


def test_a_higher_sequence_at_the_same_epoch_wins_and_a_higher_epoch_wins_whatever_the_sequence():
    behind = Member("b", Position(7, 120), True)
    ahead = Member("c", Position(7, 121), True)
    assert campaign_verdict(ahead, [behind]) is None
    assert "c is more up to date (7/121 > 7/120)" in campaign_verdict(behind, [ahead])
    newer = Member("d", Position(8, 0), True)
    assert campaign_verdict(newer, [behind, ahead]) is None and campaign_verdict(ahead, [newer]) is not None


@given(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 2**40))
def test_the_fence_keeps_the_new_epoch_above_every_tree_but_does_not_rank(floor, epoch, fence):
    """A replica whose trees took the leader's epoch before its sessions arrived publishes
    the epoch of its data and, apart, the fence: the next term's epoch is above the fence."""
    m = Member("a", Position(epoch, 5, fence=fence), True)
    assert new_floor(floor, [m]) >= max(epoch, fence)
    assert Position(epoch, 5, fence=fence) == Position(epoch, 5)
    keys = Keys("/hamirror/x")
    snap = parse_snapshot(keys, 12, [[], [], [kv(keys.member("a"), m.value(), 77, 11)], []])
    assert snap.members["a"].position.fence == fence
    # a record from before the fence existed still decodes
    old = json.dumps({"epoch": epoch, "seq": 5, "eligible": True, "lease": "77"}).encode()
    snap = parse_snapshot(keys, 12, [[], [], [kv(keys.member("a"), old, 77, 11)], []])
    assert snap.members["a"].position == Position(epoch, 5) and snap.members["a"].position.fence == 0


def test_a_member_back_with_data_past_the_leaders_start_is_ahead_and_data_from_the_leader_is_not():
    """A double failure: the leader that wrote 7/91-100 and the replica that confirmed them
    died; c, at 7/90, was elected with the floor 7.  The confirming replica back at 7/100 is
    ahead on that tree; at 7/90 or below it is not, nor once it holds the new leader's data
    (an epoch above the floor), nor on a tree the leader's start does not name."""
    start = Start(7, {"mail": (7, 90), "www": (6, 400)})
    assert start.ahead({"mail": (7, 100), "www": (6, 400)}) == {"mail": ((7, 100), (7, 90))}
    assert start.ahead({"mail": (7, 90), "www": (6, 12)}) == {}
    assert start.ahead({"mail": (9, 3), "www": (8, 0)}) == {}  # sent by the new leader (epoch > floor)
    assert start.ahead({"www": (7, 0)}) == {"www": ((7, 0), (6, 400))}  # a term the leader had nothing of
    assert start.ahead({"other": (7, 500)}) == {}


def test_the_leader_keys_start_round_trips_and_a_hostile_one_is_ignored_naming_the_key():
    keys = Keys("/hamirror/x")
    start = Start(30, {"mail": (7, 90), "www": (0, 0)})
    snap = parse_snapshot(keys, 12, [[kv(keys.leader, leader_value("a", 30, start), 77, 9)], [], [], []])
    assert snap.problems == [] and snap.leader.start == start and snap.leader.epoch == 39
    old = json.dumps({"node": "a", "floor": 30}).encode()  # written by an older hamirror
    snap = parse_snapshot(keys, 12, [[kv(keys.leader, old, 77, 9)], [], [], []])
    assert snap.problems == [] and snap.leader.start is None
    for bad in ({"floor": 1, "trees": {"mail": [1]}}, {"floor": 1, "trees": {"mail": [-1, 2]}},
                {"floor": "x", "trees": {}}, {"trees": {"mail": [2**62 + 1, 0]}, "floor": 1}, [1, 2]):  # fmt: skip
        raw = json.dumps({"node": "a", "floor": 30, "from": bad}).encode()
        snap = parse_snapshot(keys, 12, [[kv(keys.leader, raw, 77, 9)], [], [], []])
        assert snap.leader.node == "a" and snap.leader.start is None  # the leader is still known
        assert any(keys.leader in p and "from" in p for p in snap.problems), snap.problems
    # a start too large for a record is left out rather than making the key unreadable
    huge = Start(1, {f"t{i:04}": (1, 1) for i in range(400)})
    assert json.loads(leader_value("a", 1, huge)) == {"node": "a", "floor": 1}
