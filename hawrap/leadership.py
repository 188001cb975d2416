"""Who is primary, decided by etcd: the leader key, the epoch, promotion and hand-over.

The design, key layout and timing rules are in docs/ETCD.md; in short, under ``prefix``:

``members/NAME``  each member's record under its own lease: what it has applied (its
                  ``Position``: epoch, sequence), whether it may lead, and its lease id.
``leader``        ``{"node": NAME, "floor": F, "from": START}`` under the holder's lease.
                  Created with a transaction that requires it to be absent
                  (create_revision == 0).  START: where the holder's data stood when its
                  term began (``Start``), for members that come back with more.
``epoch-floor``   F, no lease: only ever rises.
``failover``      an administrator's ``failover --to NODE``, under a short lease of its own;
``failover-result`` the leader's refusal of it, under the same lease.

The epoch of a leadership is ``floor + mod_revision`` of the leader key: etcd's revision
rises with every write, so every new holder (a win, or a hand-over, which rewrites the key)
gets a higher epoch, and the floor, raised in the same transaction to the highest epoch any
member has published, makes it higher than every epoch trees already carry (those of the
two-node mode included).  The engine's epoch check then fences any former primary.

Only the most up-to-date eligible member campaigns: a member compares its position with
every other eligible member's record, and its campaign transaction fails if any record
changed since it read them.  A member that is behind waits.

``Leadership`` drives one member: a ``LeaseSession`` (the lease, its keepalive and the
quorum watchdog) and one loop thread that reads the cluster's keys every ``poll_interval``
(one linearizable read, which is also a quorum probe), publishes this member's record,
campaigns, steps down, hands over, and tells a ``Listener`` what to do.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field, replace

from .errors import ConfigError
from .etcdclient import (
    EtcdClient,
    EtcdConnection,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    compare,
    delete_op,
    put_op,
    range_op,
)
from .etcdsession import CLOCK_RATE_TOLERANCE, LeaseSession

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
MAX_VALUE = 4096  # bytes of a record; a larger value is not one of ours
# Epochs, floors and sequences read from etcd stay below 2**62, so that floor + revision stays
# within the engine's 63-bit epochs: a hostile record cannot push the epoch past its end.
MAX_NUMBER = 2**62
STALE_REFRESHES = 3  # a record not refreshed for this many TTLs is ignored (its member is wedged)


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Timing:
    """``ttl``: the lease TTL in whole seconds (etcd's unit).  ``stop_budget``: the time this
    node needs to stop serving (drop the VIP, stop or kill the services), wake-up latency of a
    loaded machine included.  See docs/ETCD.md, "Minimum safe TTL"."""

    ttl: int = 10
    stop_budget: float = 1.0
    keepalive_interval: float | None = None  # default: TTL / 6
    poll_interval: float = 0.1
    handover_timeout: float = 30.0
    # After a start, no campaign for this long (default: one TTL) unless every configured
    # member has published its record: a member that is behind must not win a cold start
    # because the others' records are not there yet.
    initdead: float | None = None

    @property
    def startup_wait(self) -> float:
        return self.initdead if self.initdead is not None else float(self.ttl)

    @property
    def keepalive(self) -> float:
        return self.keepalive_interval if self.keepalive_interval is not None else self.ttl / 6

    def minimum_ttl(self, request_timeout: float) -> float:
        """The smallest TTL that survives one lost keepalive: the watchdog fires at TTL minus
        the stop budget and the clock allowance after the last renewal sent, and by then two
        keepalives must have been tried, the second one to its timeout."""
        return (self.stop_budget + 2 * self.keepalive + request_timeout) / (1 - CLOCK_RATE_TOLERANCE)

    def check(self, conn: EtcdConnection, where: str = "etcd") -> None:
        if not isinstance(self.ttl, int) or self.ttl < 1:
            raise ConfigError(f"{where}.ttl must be a whole number of seconds, at least 1")
        if self.initdead is not None and self.initdead < 0:
            raise ConfigError(f"{where}.initdead must not be negative")
        for key in ("stop_budget", "poll_interval", "handover_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{where}.{key} must be greater than 0")
        if not self.keepalive > 0:
            raise ConfigError(f"{where}.keepalive_interval must be greater than 0")
        need = self.minimum_ttl(conn.request_timeout)
        if self.ttl < need:
            raise ConfigError(
                f"{where}.ttl = {self.ttl} s is below the minimum safe TTL of {math.ceil(need)} s for "
                f"stop_budget {self.stop_budget:g} s, keepalive_interval {self.keepalive:g} s and "
                f"request_timeout {conn.request_timeout:g} s (stop budget + 2 keepalive intervals + "
                "one request timeout): a single lost keepalive would stop the leader"
            )


# ---------------------------------------------------------------- records


@dataclass(frozen=True, order=True)
class Position:
    """What a member has applied: the epoch of the primary it came from, then that primary's
    journal sequence.  Ordered: a higher epoch is newer data whatever the sequence.

    ``fence``: the highest epoch on the member's trees (the fencing token they hold), which
    may be above the epoch of the data (a replica takes the leader's epoch before its
    sessions arrive).  Not part of the order: it only keeps every new term's epoch above it."""

    epoch: int = 0
    seq: int = 0
    fence: int = field(default=0, compare=False)

    @property
    def top_epoch(self) -> int:
        return max(self.epoch, self.fence)


@dataclass(frozen=True)
class Member:
    name: str
    position: Position
    eligible: bool
    reason: str = ""  # why it may not lead
    yielding: bool = False  # it resigned: an equally up-to-date member goes first
    lease: int = 0
    mod_revision: int = 0

    def value(self) -> bytes:
        return json.dumps(
            {
                "epoch": self.position.epoch,
                "seq": self.position.seq,
                "fence": self.position.fence,
                "eligible": self.eligible,
                "reason": self.reason,
                "yielding": self.yielding,
                "lease": str(self.lease),
            },  # fmt: skip
            sort_keys=True,
        ).encode()

    def same_record(self, other: Member | None) -> bool:
        return other is not None and other.value() == self.value()


@dataclass(frozen=True)
class Start:
    """Where a leader's data stood when its term began: ``trees``, each tree's position
    (epoch, sequence) as its member ranks it; ``floor``, the epoch floor its term was given
    (every epoch of data from before the term is at most that, as far as the members
    published; data this leader sent is above it).  A member coming back with a tree
    ahead of this holds changes the leader never had (``ahead``)."""

    floor: int
    trees: dict[str, tuple[int, int]]

    def value(self) -> dict:
        return {"floor": self.floor, "trees": {name: list(pos) for name, pos in sorted(self.trees.items())}}

    def ahead(self, mine: dict[str, tuple[int, int]]) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        """The trees of ``mine`` (a member's own positions) holding data from before this
        term that is past where the leader's copy stood: ``{tree: (mine, the leader's)}``."""
        out = {}
        for name, pos in mine.items():
            theirs = self.trees.get(name)
            if theirs is not None and pos[0] <= self.floor and pos > theirs:
                out[name] = (pos, theirs)
        return out


def parse_start(data, problems: list[str], key: str) -> Start | None:
    """A leader key's ``from``; absent (an older hamirror wrote the key) or not ours: None."""
    if data is None:
        return None
    try:
        if not isinstance(data, dict) or not isinstance(data.get("trees"), dict):
            raise ValueError("not an object with trees")
        trees = {}
        for name, pos in data["trees"].items():
            where = f"trees.{name}"[:80]
            if not isinstance(pos, list) or len(pos) != 2:
                raise ValueError(where)
            trees[str(name)] = (_number(pos[0], where), _number(pos[1], where))
        return Start(_int(data, "floor"), trees)
    except ValueError as exc:
        problems.append(f"etcd key {key}: bad 'from' ({exc}): members coming back are not compared with it")
        return None


@dataclass(frozen=True)
class Leader:
    node: str
    floor: int
    lease: int
    mod_revision: int
    start: Start | None = None

    @property
    def epoch(self) -> int:
        return self.floor + self.mod_revision


@dataclass(frozen=True)
class Snapshot:
    """The cluster's keys read at one revision."""

    revision: int
    leader: Leader | None
    leader_raw: KeyValue | None  # present even when its value is not ours (then leader is None)
    floor: int | None  # None: the key holds garbage; no campaign until an administrator fixes it
    members: dict[str, Member]
    failover: dict | None  # {"to": NAME, "lease": id}
    problems: list[str] = field(default_factory=list)


class Keys:
    def __init__(self, prefix: str):
        if not prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
            raise ConfigError(f"etcd.prefix: {prefix!r} must start with / and not end with /")
        self.prefix = prefix
        self.leader = f"{prefix}/leader"
        self.floor = f"{prefix}/epoch-floor"
        self.members = f"{prefix}/members/"
        self.failover = f"{prefix}/failover"
        self.failover_result = f"{prefix}/failover-result"

    def member(self, name: str) -> str:
        return self.members + name

    def snapshot_ops(self) -> list[dict]:
        return [
            range_op(self.leader),
            range_op(self.floor),
            range_op(self.members, prefix=True),
            range_op(self.failover),
        ]


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"node name {name!r}: letters, digits, '_', '.' and '-' only (it is part of an etcd key)"
        )
    return name


def _json(kv: KeyValue, problems: list[str]) -> dict | None:
    if len(kv.value) > MAX_VALUE:
        problems.append(f"etcd key {kv.key}: {len(kv.value)} bytes, not a hamirror record")
        return None
    try:
        data = json.loads(kv.value)
    except ValueError:
        problems.append(f"etcd key {kv.key}: not JSON: {kv.value[:60]!r}")
        return None
    if not isinstance(data, dict):
        problems.append(f"etcd key {kv.key}: not a JSON object")
        return None
    return data


def _int(data: dict, key: str, default: int | None = None) -> int:
    return _number(data[key] if default is None or key in data else default, key)


def _number(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(name)
    try:
        value = int(value)
    except ValueError:
        raise ValueError(name) from None
    if value < 0 or value > MAX_NUMBER:
        raise ValueError(name)
    return value


def parse_snapshot(keys: Keys, revision: int, ranges: list[list[KeyValue]]) -> Snapshot:
    """Decode the four ranges of ``Keys.snapshot_ops``; what is not ours is reported, not trusted."""
    problems: list[str] = []
    leader_kvs, floor_kvs, member_kvs, failover_kvs = ranges
    leader = leader_raw = None
    if leader_kvs:
        leader_raw = leader_kvs[0]
        data = _json(leader_raw, problems)
        try:
            if data is not None:
                node = data["node"]
                if not isinstance(node, str):
                    raise ValueError("node")
                start = parse_start(data.get("from"), problems, leader_raw.key)
                leader = Leader(node, _int(data, "floor"), leader_raw.lease, leader_raw.mod_revision, start)
        except (KeyError, ValueError) as exc:
            problems.append(f"etcd key {leader_raw.key}: bad or missing field {exc}")
    floor: int | None = 0
    if floor_kvs:
        try:
            floor = int(floor_kvs[0].value.decode("ascii"))
            if floor < 0 or floor > MAX_NUMBER:
                raise ValueError
        except ValueError:
            problems.append(f"etcd key {keys.floor}: not a decimal number: {floor_kvs[0].value[:40]!r}")
            floor = None
    members = {}
    for kv in member_kvs:
        name = kv.key[len(keys.members) :]
        data = _json(kv, problems)
        if data is None or not NAME_RE.match(name):
            continue
        try:
            members[name] = Member(
                name=name,
                position=Position(_int(data, "epoch"), _int(data, "seq"), _int(data, "fence", 0)),
                eligible=data["eligible"] is True,
                reason=str(data.get("reason", ""))[:200],
                yielding=data.get("yielding") is True,
                lease=kv.lease,
                mod_revision=kv.mod_revision,
            )
        except (KeyError, ValueError) as exc:
            problems.append(f"etcd key {kv.key}: bad or missing field {exc}")
    failover = None
    if failover_kvs:
        data = _json(failover_kvs[0], problems)
        if data is not None and isinstance(data.get("to"), str):
            failover = {"to": data["to"], "lease": failover_kvs[0].lease}
    return Snapshot(revision, leader, leader_raw, floor, members, failover, problems)


# ---------------------------------------------------------------- the promotion rule


def campaign_verdict(me: Member, others: list[Member], failover_to: str | None = None) -> str | None:
    """None if ``me`` may campaign for the free leader key, else why not.

    ``others``: the other members' fresh records.  Ineligible members (standby lock, unhealthy)
    are ignored.  A member strictly ahead blocks; at an equal position a yielding member lets a
    non-yielding one go first; otherwise equals all campaign and the transaction picks one.
    A pending ``failover --to`` naming an eligible member leaves the key to that member alone.
    """
    if not me.eligible:
        return f"not eligible: {me.reason or 'unknown reason'}"
    eligible = [m for m in others if m.eligible and m.name != me.name]
    if failover_to is not None and failover_to != me.name and any(m.name == failover_to for m in eligible):
        return f"failover to {failover_to} requested"
    for m in eligible:
        if m.position > me.position:
            return f"{m.name} is more up to date ({_pos(m.position)} > {_pos(me.position)})"
        if m.position == me.position and me.yielding and not m.yielding:
            return f"resigned: {m.name} is as up to date and goes first"
    return None


def new_floor(floor: int, members: list[Member]) -> int:
    """The floor for a new holder: no published epoch may reach the new epoch."""
    return max([floor] + [m.position.top_epoch for m in members])


def leader_value(node: str, floor: int, start: Start | None) -> bytes:
    """The leader key's value; a ``from`` too large for a record is left out (nobody is
    then compared with it) rather than making the key unreadable."""
    value = {"node": node, "floor": floor}
    if start is not None:
        value["from"] = start.value()
    raw = json.dumps(value).encode()
    return raw if len(raw) <= MAX_VALUE else json.dumps({"node": node, "floor": floor}).encode()


def _pos(p: Position) -> str:
    return f"{p.epoch}/{p.seq}"


# ---------------------------------------------------------------- the listener


class Listener:
    """What ``Leadership`` asks of the node.  Every method may be called from a thread of
    ``Leadership``'s own; the defaults do nothing."""

    def elected(self, epoch: int) -> None:
        """This member holds the leader key at ``epoch``: raise the trees' epochs, serve."""

    def epoch_raised(self, epoch: int) -> None:
        """Still the leader; the epoch went up (a member published a higher one)."""

    def stop_serving(self, reason: str) -> None:
        """URGENT, from the watchdog thread: the lease may expire for the others within the
        stop budget.  Drop the VIP and stop the services now; may run while ``elected`` is
        still running in another thread, and must win over it."""

    def demoted(self, reason: str) -> None:
        """No longer the leader (resigned, standby, handed over, key lost): do not serve."""

    def leader_changed(self, leader: Leader | None) -> None:
        """Another member leads (or nobody): follow it, observe its epoch."""

    def prepare_handover(self, target: str) -> bool:
        """A hand-over (``failover --to target``, or ``leaving``): stop the services, make
        the final sync toward ``target``.  Return False to refuse."""
        return True

    def handover_aborted(self, reason: str) -> None:
        """The hand-over did not happen: resume serving."""


# ---------------------------------------------------------------- one member


class Leadership:
    def __init__(
        self,
        conn: EtcdConnection,
        prefix: str,
        name: str,
        timing: Timing,
        listener: Listener,
        position=lambda: Position(),
        eligibility=lambda: None,
        expected: tuple[str, ...] = (),
        tree_positions=lambda: {},
        leaving=lambda: False,
    ):
        """``position()``: what this member has applied, now.  ``eligibility()``: None if it may
        lead, else why not (standby lock present, LAN down...).  Both are called from the loop
        thread every ``poll_interval`` and must be quick.  ``expected``: every configured
        member's name (ends the start-up wait early once all have published).
        ``tree_positions()``: each tree's position, written into the leader key as its term's
        ``Start`` when this member takes the key (elected, or handing it over).
        ``leaving()``: True when the member is ineligible on purpose only (the standby
        lock): holding the key, it then hands it over as ``failover --to`` does, to the most
        up-to-date eligible member, before it steps down."""
        conn.check()
        timing.check(conn)
        self.conn = conn
        self.keys = Keys(prefix)
        self.name = check_name(name)
        self.timing = timing
        self.listener = listener
        self.position = position
        self.eligibility = eligibility
        self.tree_positions = tree_positions
        self.leaving = leaving
        self.expected = frozenset(expected)
        self._started = 0.0
        self.session = LeaseSession(
            conn, timing.ttl, timing.keepalive, timing.stop_budget, self._lease_lost, name=f"etcd-{name}"
        )
        self._lock = threading.Lock()
        self._leading: Leader | None = None  # the key as we hold it, while we serve
        self._leading_generation = 0
        self._resign = threading.Event()
        self._resigned = threading.Event()
        self._yielding = False
        self._stop = threading.Event()
        self._published: Member | None = None
        self._published_at = 0.0
        self._seen: dict[str, tuple[int, float]] = {}  # member -> (mod_revision, first seen at)
        self._reported: tuple | bool = False  # the leader last told to the listener; False: none yet
        self._last_problems: list[str] = []
        self._last_error = ""
        self._view: Snapshot | None = None
        self._verdict = ""
        self._unreachable_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name=f"etcd-{name}-election", daemon=True)

    # ------------------------------------------------------------ control

    def start(self) -> None:
        self._started = time.monotonic()
        self.session.start()
        self._thread.start()

    def stop(self, revoke: bool = True) -> None:
        """Stop taking part.  With ``revoke`` (an orderly shutdown, after the node stopped
        serving) this member's keys go at once; without, they go when the lease expires."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            was_leading, self._leading = self._leading is not None, None
        if was_leading:
            self.listener.demoted("leadership stopped")
        self.session.stop(revoke=revoke)

    def resign(self, timeout: float = 10.0) -> bool:
        """Give up the leader key (after the node stopped serving); an equally up-to-date member
        takes it.  True once done (or if this member did not lead)."""
        self._resigned.clear()
        self._resign.set()
        return self._resigned.wait(timeout)

    @property
    def leading(self) -> Leader | None:
        with self._lock:
            return self._leading

    def status(self) -> dict:
        snap = self._view
        with self._lock:
            leading = self._leading
        return {
            "node": self.name,
            "leader": snap.leader.node if snap and snap.leader else None,
            "epoch": snap.leader.epoch if snap and snap.leader else None,
            "leading": leading is not None,
            "verdict": self._verdict,
            "etcd_reachable": self._unreachable_since is None,
            "session": self.session.status(),
        }

    # ------------------------------------------------------------ the watchdog's callback

    def _lease_lost(self, reason: str) -> None:
        with self._lock:
            leading, self._leading = self._leading, None
        if leading is not None:
            self.listener.stop_serving(reason)

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        client = EtcdClient(self.conn)
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self._round(client)
                except EtcdUnavailable as exc:
                    if self._unreachable_since is None:
                        self._unreachable_since = started
                        log.warning("%s: etcd unreachable: %s", self.name, exc)
                except EtcdError as exc:
                    if str(exc) != self._last_error:
                        log.error("%s: %s", self.name, exc)
                    self._last_error = str(exc)
                except Exception as exc:
                    # a failing callback (a corrupt epoch file behind position(), say) must not
                    # end the loop: a leader without it would keep the key and never step down
                    if repr(exc) != self._last_error:
                        log.exception("%s: election round failed", self.name)
                    self._last_error = repr(exc)
                else:
                    if self._unreachable_since is not None:
                        log.info(
                            "%s: etcd reachable again after %.1f s",
                            self.name,
                            time.monotonic() - self._unreachable_since,
                        )
                        self._unreachable_since = None
                self._stop.wait(max(0.0, started + self.timing.poll_interval - time.monotonic()))
        finally:
            client.close()

    def _deadline(self) -> float:
        return time.monotonic() + self.conn.request_timeout * len(self.conn.endpoints)

    def _read(self, client: EtcdClient) -> Snapshot:
        result = client.read(*self.keys.snapshot_ops(), deadline=self._deadline())
        snap = parse_snapshot(self.keys, result.revision, result.ranges())
        if snap.problems != self._last_problems:
            for problem in snap.problems:
                log.error("%s: %s", self.name, problem)
            self._last_problems = snap.problems
        self._view = snap
        return snap

    def _round(self, client: EtcdClient) -> None:
        lease, generation = self.session.current()
        snap = self._read(client)
        if lease is None:
            self._follow(snap)
            return
        me, wrote = self._publish(client, snap, lease)
        others = self._fresh_others(snap)
        leader = snap.leader
        mine = leader is not None and leader.node == self.name and leader.lease == lease
        if mine:
            self._as_holder(client, snap, me, others, generation)
            return
        with self._lock:
            lost, self._leading = self._leading, None
        if lost is not None:
            self.listener.demoted("the leader key is no longer this member's")
        if self._resign.is_set():
            self._resign.clear()
            self._resigned.set()
        self._follow(snap)
        # a record written this round is newer than the read: campaign on the next one
        if snap.leader_raw is None and not wrote:
            self._maybe_campaign(client, snap, me, others, generation)

    def _follow(self, snap: Snapshot) -> None:
        """Tell the listener when another member (or nobody) holds the key."""
        leader = snap.leader
        reported = (leader.node, leader.mod_revision) if leader else None
        if reported == self._reported:
            return
        self._reported = reported
        if leader is not None and leader.node == self.name:
            return  # our own key under a lease given up: it goes with the lease
        if leader is not None:
            self._yielding = False  # a new leader: the resignation has done its job
        self.listener.leader_changed(leader)

    # ------------------------------------------------------------ this member's record

    def _publish(self, client: EtcdClient, snap: Snapshot, lease: int) -> tuple[Member, bool]:
        why_not = self.eligibility()
        me = Member(
            name=self.name,
            position=self.position(),
            eligible=why_not is None,
            reason=why_not or "",
            yielding=self._yielding,
            lease=lease,
        )
        current = snap.members.get(self.name)
        fresh = time.monotonic() - self._published_at < self.timing.ttl
        if me.same_record(current) and fresh:
            return replace(me, mod_revision=current.mod_revision), False
        result = client.txn(
            [], [put_op(self.keys.member(self.name), me.value(), lease)], deadline=self._deadline()
        )
        self._published, self._published_at = me, time.monotonic()
        return replace(me, mod_revision=result.revision), True

    def _fresh_others(self, snap: Snapshot) -> list[Member]:
        """Other members' records, without those not refreshed for STALE_REFRESHES TTLs."""
        now = time.monotonic()
        out = []
        for name, m in snap.members.items():
            if name == self.name:
                continue
            seen = self._seen.get(name)
            if seen is None or seen[0] != m.mod_revision:
                self._seen[name] = (m.mod_revision, now)
            elif now - seen[1] > STALE_REFRESHES * self.timing.ttl:
                continue
            out.append(m)
        for name in set(self._seen) - set(snap.members):
            del self._seen[name]
        return out

    # ------------------------------------------------------------ campaigning

    def _maybe_campaign(
        self, client: EtcdClient, snap: Snapshot, me: Member, others: list[Member], generation: int
    ) -> None:
        if snap.floor is None:
            self._verdict = f"the epoch floor {self.keys.floor} is unreadable"
            return
        verdict = campaign_verdict(me, others, snap.failover["to"] if snap.failover else None)
        waited = time.monotonic() - self._started
        if verdict is None and waited < self.timing.startup_wait and not self.expected <= set(snap.members):
            missing = ", ".join(sorted(self.expected - set(snap.members))) or "members not configured"
            verdict = (
                f"starting: waiting up to {self.timing.startup_wait:g} s for the others' records ({missing})"
            )
        if verdict is not None:
            if verdict != self._verdict:
                log.info("%s: not campaigning: %s", self.name, verdict)
            self._verdict = verdict
            return
        floor = new_floor(snap.floor, [me, *snap.members.values()])
        after = snap.revision + 1
        compares = [
            compare(self.keys.leader, "CREATE", "EQUAL", 0),
            # nobody published a newer position, and no failover was requested, since the read
            compare(self.keys.members, "MOD", "LESS", after, prefix=True),
            compare(self.keys.failover, "MOD", "LESS", after),
            compare(self.keys.floor, "MOD", "LESS", after),
            # our record is alive under our lease
            compare(self.keys.member(self.name), "LEASE", "EQUAL", me.lease),
        ]
        start = Start(floor, self.tree_positions())
        value = leader_value(self.name, floor, start)
        success = [put_op(self.keys.leader, value, me.lease), put_op(self.keys.floor, str(floor).encode())]
        result = client.txn(compares, success, deadline=self._deadline())
        if not result.succeeded:
            self._verdict = "lost the campaign transaction (someone else won, or a record changed)"
            return
        self._take(Leader(self.name, floor, me.lease, result.revision, start), generation, "won the election")

    def _take(self, leader: Leader, generation: int, how: str) -> None:
        with self._lock:
            if not self.session.valid(generation):
                return  # the watchdog gave the lease up meanwhile: the key goes with it
            self._leading, self._leading_generation = leader, generation
        self._verdict = f"leader ({how})"
        self._yielding = False
        self._reported = (leader.node, leader.mod_revision)
        log.warning("%s: %s: leader at epoch %d", self.name, how, leader.epoch)
        self.listener.elected(leader.epoch)

    # ------------------------------------------------------------ holding the key

    def _as_holder(
        self, client: EtcdClient, snap: Snapshot, me: Member, others: list[Member], generation: int
    ) -> None:
        leader = snap.leader
        assert leader is not None
        if not me.eligible and not self._resign.is_set() and self.leaving():
            self._leave(client, leader, me, others)
            return
        if not me.eligible or self._resign.is_set():
            self._step_down(client, leader, me.reason if not me.eligible else "resigned")
            return
        with self._lock:
            held = self._leading
        if held is None:
            self._take(leader, generation, "the leader key was handed to this member")
            return
        if held.epoch != leader.epoch:
            with self._lock:
                if self._leading is not None:
                    self._leading = leader
            self.listener.epoch_raised(leader.epoch)
        if snap.failover is not None:
            self._hand_over(client, snap, leader)
            return
        higher = max((m.position.top_epoch for m in snap.members.values()), default=0)
        if higher > leader.epoch:
            self._raise_epoch(client, snap, leader, higher)

    def _step_down(self, client: EtcdClient, leader: Leader, reason: str) -> None:
        with self._lock:
            was, self._leading = self._leading, None
        if was is not None:
            self.listener.demoted(reason)
        if reason == "resigned":
            self._yielding = True
        try:
            client.txn(
                [compare(self.keys.leader, "MOD", "EQUAL", leader.mod_revision)],
                [delete_op(self.keys.leader)],
                deadline=self._deadline(),
            )
        except EtcdUnavailable:
            return  # the next round tries again; the key still names us, nobody else can serve
        log.warning("%s: stepped down (%s)", self.name, reason)
        self._verdict = f"stepped down: {reason}"
        if self._resign.is_set():
            self._resign.clear()
            self._resigned.set()

    def _leave(self, client: EtcdClient, leader: Leader, me: Member, others: list[Member]) -> None:
        """The standby lock on the leader: what it holds goes to the most up-to-date eligible
        member first (final sync, then the key), so that nothing it served is missing from
        the next leader.  With no such member, or a hand-over that fails, it steps down
        without one (the election picks the successor; what no replica has is kept aside
        when this node receives again)."""
        eligible = [m for m in others if m.eligible]
        if not eligible:
            self._step_down(client, leader, f"{me.reason}; no eligible member to hand over to")
            return
        target = max(eligible, key=lambda m: (m.position, m.name)).name
        log.warning("%s: %s: handing over to %s before stepping down", self.name, me.reason, target)
        done, message = self._transfer(client, leader, target)
        if done is None:
            return  # the watchdog stopped us
        if not done:
            self._step_down(client, leader, f"{me.reason}; hand-over to {target} {message}")

    def _raise_epoch(self, client: EtcdClient, snap: Snapshot, leader: Leader, higher: int) -> None:
        floor = max(higher, snap.floor or 0)
        log.warning(
            "%s: a member published epoch %d > ours (%d): raising the epoch", self.name, higher, leader.epoch
        )
        value = leader_value(self.name, floor, leader.start)
        client.txn(
            [
                compare(self.keys.leader, "MOD", "EQUAL", leader.mod_revision),
                compare(self.keys.leader, "LEASE", "EQUAL", leader.lease),
            ],
            [put_op(self.keys.leader, value, leader.lease), put_op(self.keys.floor, str(floor).encode())],
            deadline=self._deadline(),
        )  # the next round reads the new key and reports the new epoch

    # ------------------------------------------------------------ failover --to

    def _hand_over(self, client: EtcdClient, snap: Snapshot, leader: Leader) -> None:
        assert snap.failover is not None
        target_name, request_lease = snap.failover["to"], snap.failover["lease"]
        target = snap.members.get(target_name)

        def answer(ok: bool, message: str, extra: list[dict] | None = None) -> None:
            result = json.dumps({"to": target_name, "ok": ok, "message": message}).encode()
            ops = [
                delete_op(self.keys.failover),
                put_op(self.keys.failover_result, result, request_lease),
            ] + (extra or [])
            try:
                client.txn([], ops, deadline=self._deadline())
            except EtcdError as exc:
                log.warning("%s: could not answer the failover request: %s", self.name, exc)
            (log.warning if ok else log.error)("%s: failover to %s: %s", self.name, target_name, message)

        if target_name == self.name:
            answer(True, f"{self.name} already leads at epoch {leader.epoch}")
            return
        if target is None or not target.eligible:
            answer(
                False,
                f"refused: {target_name} is "
                + (f"not eligible ({target.reason})" if target else "not a live member"),
            )
            return
        done, message = self._transfer(client, leader, target_name)
        if done is not None:
            answer(done, message)
        if done is False:
            self.listener.handover_aborted(message)

    def _transfer(self, client: EtcdClient, leader: Leader, target_name: str) -> tuple[bool | None, str]:
        """Stop serving, make the final sync toward ``target_name``, wait until it publishes a
        position at least this leader's, then move the key to it in one transaction.
        (True, message) once it holds the key; (False, why) if the hand-over did not happen and
        the key is still ours (this member no longer serves; the caller decides what next);
        (None, why) if the watchdog stopped us meanwhile."""
        try:
            prepared = self.listener.prepare_handover(target_name)
        except Exception as exc:
            log.exception("%s: preparing the hand-over failed", self.name)
            return False, f"preparing failed: {exc}"
        if not prepared:
            return False, "refused by this node (see its log)"
        mine = self.position()
        deadline = time.monotonic() + self.timing.handover_timeout
        while True:
            if not self.session.valid(self._leading_generation):
                return None, "the watchdog stopped this member"  # the request stays for the next leader
            snap = self._read(client)
            target = snap.members.get(target_name)
            if target is None or not target.eligible:
                return False, f"aborted: {target_name} is no longer an eligible member"
            if target.position >= mine:
                break
            if time.monotonic() >= deadline or self._stop.is_set():
                return False, (
                    f"aborted: {target_name} at {_pos(target.position)} did not reach {_pos(mine)} "
                    f"within {self.timing.handover_timeout:g} s"
                )
            self._stop.wait(self.timing.poll_interval)
        floor = new_floor(snap.floor or 0, list(snap.members.values()))
        # the target caught up with this leader's trees: its term starts from them
        value = leader_value(target_name, floor, Start(floor, self.tree_positions()))
        compares = [
            compare(self.keys.leader, "MOD", "EQUAL", leader.mod_revision),
            compare(self.keys.member(target_name), "LEASE", "EQUAL", target.lease),
        ]
        ops = [
            put_op(self.keys.leader, value, target.lease),
            put_op(self.keys.floor, str(floor).encode()),
            delete_op(self.keys.failover),
        ]
        done = False
        try:
            done = client.txn(compares, ops, deadline=self._deadline()).succeeded
        except EtcdUnavailable:
            pass
        if not done:
            # the reply may have been lost after the write: what etcd holds decides
            try:
                now = self._read(client).leader
                done = now is not None and now.node == target_name
            except EtcdUnavailable:
                done = False  # cannot tell: the key still names us or has moved; either way we do not serve
        with self._lock:
            self._leading = None
        if done:
            self._verdict = f"handed over to {target_name}"
            self.listener.demoted(f"handed over to {target_name}")
            return True, f"{target_name} leads now"
        self.listener.demoted(f"hand-over to {target_name} failed")
        # the next round finds the key still ours (and takes it up again) or gone
        return None, f"hand-over to {target_name} failed"


# ---------------------------------------------------------------- administration


def request_failover(conn: EtcdConnection, prefix: str, to: str, timeout: float = 60.0) -> tuple[bool, str]:
    """``hawrap failover --to NODE``: ask the leader to hand the key to ``to``; wait until ``to``
    leads or the leader refuses.  (True, message) or (False, why)."""
    keys = Keys(prefix)
    check_name(to)
    client = EtcdClient(conn)
    lease = None
    try:
        lease, _ = client.grant(max(2, math.ceil(timeout)))
        request = json.dumps({"to": to, "at": time.time()}).encode()
        client.txn([], [put_op(keys.failover, request, lease), delete_op(keys.failover_result)])
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            result = client.read(range_op(keys.leader), range_op(keys.failover_result))
            snap_leader, answer = result.ranges()
            leader = parse_snapshot(keys, result.revision, [snap_leader, [], [], []]).leader
            if leader is not None and leader.node == to:
                return True, f"{to} leads at epoch {leader.epoch}"
            if answer:
                try:
                    data = json.loads(answer[0].value)
                    if not data.get("ok", False):
                        return False, str(data.get("message", "refused"))
                except ValueError:
                    pass
            time.sleep(0.1)
        return False, f"{to} did not become leader within {timeout:g} s"
    finally:
        if lease is not None:
            try:
                client.revoke(lease)  # the request and its answer go with it
            except EtcdError:
                pass
        client.close()


def describe(conn: EtcdConnection, prefix: str) -> dict:
    """``hawrap status`` in etcd mode: the leader, every member with its role and lag, etcd's health."""
    keys = Keys(prefix)
    client = EtcdClient(conn)
    try:
        health = client.endpoint_status()
        try:
            result = client.read(*keys.snapshot_ops())
        except EtcdUnavailable as exc:
            return {"ok": False, "error": str(exc), "etcd": health}
        snap = parse_snapshot(keys, result.revision, result.ranges())
    finally:
        client.close()
    leader = snap.leader
    lead_pos = snap.members[leader.node].position if leader and leader.node in snap.members else None
    members = []
    for m in sorted(snap.members.values(), key=lambda m: m.name):
        lag = None
        if lead_pos is not None and m.position.epoch == lead_pos.epoch:
            lag = max(0, lead_pos.seq - m.position.seq)
        members.append({"name": m.name, "role": "leader" if leader and leader.node == m.name else "replica",
                        "epoch": m.position.epoch, "seq": m.position.seq, "lag": lag, "eligible": m.eligible,
                        "reason": m.reason})  # fmt: skip
    return {
        "ok": True,
        "revision": snap.revision,
        "leader": leader.node if leader else None,
        "epoch": leader.epoch if leader else None,
        "from": leader.start.value() if leader and leader.start else None,
        "floor": snap.floor,
        "members": members,
        "failover": snap.failover,
        "problems": snap.problems,
        "etcd": health,
    }
