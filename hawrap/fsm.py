"""The node state machine: the fault table of docs/DESIGN.md as a pure function.

``decide(state, facts, policy)`` looks at what this node knows right now (its LAN health,
what the peer last said on any link, whether the standby lock exists, an administrator's
command) and returns the next state and the list of actions to carry out, in order.  It
does no I/O and reads no clock, so it is tested exhaustively (tests/test_fsm.py drives two
of them through random fault sequences).  ``hawrap.node`` feeds it facts and executes the
actions; every action is idempotent, so deciding again after a crash is harmless.

Roles:

* ``init``       just started; waits up to ``initdead`` to hear the peer before deciding.
* ``secondary``  healthy, not serving; takes over when the primary dies, gives up, or hands over.
* ``primary``    serving: holds the virtual IP, runs the services, mirrors toward the peer.
* ``releasing``  planned switchover in progress: services stopped, final sync done, VIP
                 dropped; waits for the peer to announce itself primary.  A primary given
                 the standby lock goes this way too when its peer can take over, and ends
                 in standby whatever comes of it.
* ``standby``    out of service (standby lock present, LAN failure, fenced after a takeover it
                 missed, or lost a split brain); only ``hawrap resume`` brings it back.  Or
                 unfit to serve (a tree that must be a mount point has nothing mounted, or
                 another disk than its own): it rejoins by itself once that is over, keeping
                 its claim on its data (a new disk adopted by the administrator gives it up,
                 and counts as outdated until the peer has mirrored onto it in full).

The data state (with mirrored trees; DRBD's "Outdated" in spirit).  The primary says in
every heartbeat whether its replica is in sync (its mirror daemon live and at most
``mirror.max_lag`` behind).  A secondary is ``uptodate`` while the serving primary says so;
a primary whose replica is not in sync knows its peer is outdated (``peer_outdated``).  Both
are persisted, and every heartbeat carries ``peer_outdated`` as ``ahead``: a node that hears
its peer say so counts its own copy outdated whatever the peer's role (a former primary in
standby, or just started, still knows what it wrote).  A node serves on its own only with
data it knows to be the newest:

* a secondary takes over from a dead (or standby, or releasing) primary only if it is
  uptodate: the normal failover stays as fast as the dead time;
* a node that starts and never hears its peer serves alone only if it was a primary whose
  peer was outdated (a degraded primary: nobody can have served newer data since);
* otherwise it waits and tells the administrator, who may run ``hawrap force-primary``.

The safety rules, each one asserted by the property tests:

* A node starts serving only when its own LAN is healthy (carrier and ping node), its
  standby lock is absent, it is fit to serve (its trees mounted), and the peer is either
  silent on every link or says it is not serving (it released, went to standby, or is an
  idle secondary that ranks lower).
* Every takeover starts with the address check and is all or nothing.
* If both ever serve while hearing each other, the lower rank (standby lock or unfit first,
  then knowing its data up to date, then a whole copy rather than a new disk not yet
  mirrored onto, then holding changes the other lacks, then epoch, then who owns the
  epoch, then the home node, then the name) stops at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

INIT, SECONDARY, PRIMARY, STANDBY, RELEASING = "init", "secondary", "primary", "standby", "releasing"
ROLES = (INIT, SECONDARY, PRIMARY, STANDBY, RELEASING)
COMMANDS = ("failover", "failback", "force-primary")


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class PeerView:
    """The peer's latest heartbeat (None in Facts when it is silent on every link)."""

    name: str
    role: str
    epoch: int
    owns_epoch: bool
    standby: bool
    lan_ok: bool | None
    serving: bool
    request: str | None
    home: bool
    uptodate: bool = True  # its copy is known to hold every change (see the module docstring)
    in_sync: bool = True  # serving: its replica (our copy) receives its changes live
    copy_incomplete: bool = False  # its new disk is not yet mirrored onto (Facts.copy_incomplete)
    ahead: bool = False  # it holds changes our copy lacks (its ``peer_outdated``), whatever its role


@dataclass(frozen=True)
class Facts:
    now: float  # monotonic seconds
    lan_ok: bool | None  # None: not known yet (first carrier/ping verdict pending)
    peer: PeerView | None  # None: silent on every link for the dead time (or never heard)
    standby_lock: bool
    lan_problem: str = ""
    command: str | None = None  # "failover" | "failback", delivered once
    # A ping node answered a probe sent after the peer was last heard.  A cut that silences
    # the peer usually cuts us off too, and the ping monitor needs several lost probes to
    # say so: without this fresh answer, taking over on silence alone could split the brain.
    lan_confirmed: bool = True
    # A resource failed while serving and could not be restarted here ("" while all is well).
    resource_failure: str = ""
    # Primary: the replica receives our changes live; releasing: the final sync is done.
    replica_in_sync: bool = False
    # Why this node cannot serve now, a fault of its own host ("" while fit): a tree that
    # must be a mount point has nothing mounted, or another disk than the tree's, so its
    # services would write under it (hawrap.treedisk).
    unfit: str = ""
    # A tree's disk was replaced (``resume --new-disk``) and the peer has not yet mirrored
    # onto it in full: nothing this node knew of its copy holds until then.
    copy_incomplete: bool = False


@dataclass(frozen=True)
class Policy:
    initdead: float = 3.0
    handover_timeout: float = 10.0
    failback: str = "manual"  # "manual" | "auto"
    failback_delay: float = 10.0
    retry_interval: float = 2.0  # after a failed takeover, wait this long before trying again
    # after a refused one (the VIP answered): the check costs one ARP frame, and the holder
    # may be a frozen node about to be cleaned up by its supervisor
    recheck_interval: float = 0.5
    data_guard: bool = False  # trees are mirrored: serve alone only with data known newest
    # An unhealthy LAN verdict must hold this long before a node steps down for it: a burst
    # of lost ping replies or a flapping link is not worth a failover.
    lan_hold: float = 1.0


@dataclass(frozen=True)
class State:
    node: str
    is_home: bool
    started: float
    role: str = INIT
    epoch: int = 0
    owns_epoch: bool = False  # this node became primary in ``epoch``
    mirror_locked: bool = False  # we hold our mirroring lock (after a failure, until the peer rejoins)
    request: str | None = None  # what our heartbeat asks of the peer
    handover_deadline: float | None = None
    peer_ready_since: float | None = None  # peer a healthy secondary since (for auto failback)
    retry_at: float = 0.0  # no takeover attempt before this (after a failed one)
    # The two nodes take epochs of different parity (first node odd, second even): two
    # takeovers made without hearing each other can never claim the same epoch.
    epoch_parity: int | None = None
    reason: str = ""  # why we are in this role (shown by ``hawrap status``)
    direction: str | None = None  # the mirror direction last asked for (SetMirrorDirection)
    # While the LAN is unhealthy: whose fault it looks like ("ours", "isolated", "shared") and
    # since when that verdict has held (it must hold for lan_hold before anything is done).
    lan_fault: str = ""
    lan_fault_since: float = 0.0
    uptodate: bool = False  # our copy is known to hold every change made in the cluster
    peer_outdated: bool = False  # we served while the peer's copy did not get our changes
    # A standing problem the administrator has been told about: ``alert`` is the one seen in
    # this round, ``notified`` the last one notified, so each is notified once, not per round.
    alert: str = ""
    notified: str = ""
    unfit: str = ""  # in standby for this (Facts.unfit), not by a lock: rejoins once it is over

    @property
    def serving(self) -> bool:
        return self.role == PRIMARY


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class Action:
    pass


@dataclass(frozen=True)
class Notify(Action):
    event: str
    message: str


@dataclass(frozen=True)
class Reply(Action):
    """The answer to the administrator's command of this round."""

    ok: bool
    message: str


@dataclass(frozen=True)
class AcquireMirrorLock(Action):
    reason: str


@dataclass(frozen=True)
class ReleaseMirrorLock(Action):
    pass


@dataclass(frozen=True)
class RaiseEpoch(Action):
    to: int


@dataclass(frozen=True)
class ObserveEpoch(Action):
    epoch: int


@dataclass(frozen=True)
class WriteStandbyLock(Action):
    reason: str


@dataclass(frozen=True)
class CheckAddressFree(Action):
    """The first step of every takeover: an ARP probe for the VIP.  If another host answers,
    the takeover is refused before anything has been changed (``takeover_refused``)."""


@dataclass(frozen=True)
class StartResources(Action):
    """VIP (address, gratuitous ARP; its duplicate check was CheckAddressFree), then the
    services in order.  If it fails, ``takeover_failed`` rolls the takeover back."""


@dataclass(frozen=True)
class StopServices(Action):
    """Services in reverse order (the VIP stays): stops writes before a final sync."""


@dataclass(frozen=True)
class StopResources(Action):
    """Services in reverse order, then the VIP."""


@dataclass(frozen=True)
class Reannounce(Action):
    """Send gratuitous ARP again: a clashing peer was pushed back."""


@dataclass(frozen=True)
class FinalSync(Action):
    """One-shot sync of every tree toward the peer (planned switchover)."""


@dataclass(frozen=True)
class SetMirrorDirection(Action):
    direction: str | None  # "send" (mirror daemon toward the peer), "receive" (serve), None


@dataclass(frozen=True)
class StopReceiver(Action):
    """At a takeover, after the mirroring lock and before the services: the receiver is
    killed where it stands.  The lock stops only a receiver that runs; one frozen, or held
    in the middle of an operation by a slow disk, would carry it out in the tree now served."""


# ---------------------------------------------------------------- ranking


def rank(standby: bool, uptodate: bool, whole: bool, ahead: bool, epoch: int, owns_epoch: bool, home: bool,
         name: str) -> tuple:  # fmt: skip
    """Total order deciding who serves when both could: both nodes compute the same answer.
    ``whole``: no new disk waits to be mirrored onto (a blank disk's epoch says nothing of
    what it holds).  ``ahead``: it holds changes the other lacks (when only one does, the
    other's copy holds nothing it lacks, whatever their epochs)."""
    return (not standby, uptodate, whole, ahead, epoch, owns_epoch, home, name)


def my_rank(s: State, f: Facts, p: Policy) -> tuple:
    return rank(f.standby_lock or bool(f.unfit), s.uptodate or not p.data_guard, not f.copy_incomplete,
                s.peer_outdated and p.data_guard, s.epoch, s.owns_epoch, s.is_home, s.node)  # fmt: skip


def peer_rank(peer: PeerView, p: Policy) -> tuple:
    return rank(peer.standby, peer.uptodate or not p.data_guard, not peer.copy_incomplete, peer.ahead and p.data_guard,
                peer.epoch, peer.owns_epoch, peer.home, peer.name)  # fmt: skip


# ---------------------------------------------------------------- transitions


def decide(s: State, f: Facts, p: Policy) -> tuple[State, list[Action]]:
    state, actions = _decide(_data_state(replace(s, alert=""), f), f, p)
    if not state.alert:
        state = replace(state, notified="")  # the problem is over: notify it again if it returns
    if f.command is not None and not any(isinstance(a, Reply) for a in actions):
        actions.append(Reply(False, f"{f.command}: nothing to do in role {state.role}"))
    return state, actions


def _data_state(s: State, f: Facts) -> State:
    """What this node knows of its copy, from its own role or from the serving peer."""
    peer = f.peer
    peer_serves = peer is not None and (peer.serving or peer.role in (PRIMARY, RELEASING))
    if s.role == PRIMARY or (s.role == RELEASING and not peer_serves):
        if f.unfit:
            # The replica's verdict is about a tree that is gone: what we hold alone is what
            # the verdicts from before the disk went said (and the daemon's journals).
            return replace(s, uptodate=True)
        return replace(s, uptodate=True, peer_outdated=not f.replica_in_sync)
    if f.copy_incomplete:
        # The peer's word that its replica is in sync may predate the new disk (an idle
        # connection to the receiver it replaced): only the copy's own record counts.
        return replace(s, uptodate=False, owns_epoch=False, peer_outdated=False)
    if peer_serves:
        # what we hold that the peer lacks is gone once its copy has replaced ours
        s = replace(s, uptodate=peer.in_sync, peer_outdated=s.peer_outdated and not peer.in_sync)
    if peer is not None and peer.ahead:
        # It served while our copy did not get its changes (we were down, or cut off), and
        # it says so from any role: a peer in standby or just started does not serve, so
        # nothing above tells us, and the copy we last knew up to date is not any more.
        s = replace(s, uptodate=False)
    return s


def _may_serve(s: State, p: Policy, alone: bool) -> bool:
    """Our copy is good enough to serve without the peer: known up to date (a secondary of
    a primary that said so); ``alone`` (after a start that never heard the peer): only if we
    were a primary whose peer was outdated, so that nobody can have served newer data."""
    if not p.data_guard:
        return True
    return s.uptodate and (s.peer_outdated or not alone)


def _outdated(s: State, why: str) -> tuple[State, list[Action]]:
    return _alert(
        s, "outdated", "outdated",
        f"{why}, and this node's copy may lack the peer's latest changes: not serving it on its own. "
        "Start the peer, or run 'hawrap force-primary' to serve this copy (what it lacks is lost)",
    )  # fmt: skip


def _alert(s: State, key: str, event: str, message: str) -> tuple[State, list[Action]]:
    """Keep the standing problem ``key`` for this round; notify it only when it is new."""
    actions: list[Action] = [] if s.notified == key else [Notify(event, message)]
    return replace(s, alert=key, notified=key), actions


def _keep_alert(s: State) -> State:
    """Waiting out a retry delay: the problem notified is still standing."""
    return replace(s, alert=s.notified)


def peer_can_serve(peer: PeerView | None, p: Policy | None = None) -> bool:
    """The peer is a healthy secondary: heard, no standby lock, LAN healthy.  With ``p``: it
    could also take over from us on its own now (its copy known up to date, if guarded)."""
    healthy = peer is not None and peer.role == SECONDARY and not peer.standby and peer.lan_ok is True
    return healthy and (p is None or not p.data_guard or peer.uptodate)


def _decide(s: State, f: Facts, p: Policy) -> tuple[State, list[Action]]:
    if f.standby_lock and s.role != STANDBY:
        return _standby_lock(s, f, p)
    if f.unfit and s.role != STANDBY:
        state, actions = _go_standby(s, f.unfit, write_lock=False)
        return replace(state, unfit=f.unfit), actions
    in_grace = s.role == INIT and f.now < s.started + p.initdead
    alerts: list[Action] = []
    if f.lan_ok is False and s.role != STANDBY and not in_grace:
        lan = _lan_unhealthy(s, f, p)
        if isinstance(lan, State):
            s = lan
            if f.now - s.lan_fault_since >= p.lan_hold:
                s, alerts = _alert(s, "lan", "lan-unhealthy", _lan_message(s, f))
        else:
            return lan
    elif s.lan_fault:
        s = replace(s, lan_fault="", lan_fault_since=0.0)
    handler = {
        INIT: _init,
        SECONDARY: _secondary,
        PRIMARY: _primary,
        RELEASING: _releasing,
        STANDBY: _standby,
    }
    state, actions = handler[s.role](s, f, p)
    return state, alerts + actions


def _lan_unhealthy(s: State, f: Facts, p: Policy):
    """This node's LAN is unhealthy.  Stepping down is for a fault of this node's alone, and
    only once that verdict has held for ``lan_hold`` (a burst of lost ping replies or a
    flapping link is ignored).  A fault the peer shares (its own LAN unhealthy, or it cannot
    serve) is no reason for the last node able to serve to stop: carry on, the administrator
    told.  A primary that hears neither the peer nor the ping node is most likely the one cut
    off: it stops serving, without the standby lock, and serves again if its LAN comes back
    first.  Returns the state (carry on) or a transition."""
    peer = f.peer
    if s.role in (PRIMARY, RELEASING):
        ours = peer_can_serve(peer, p)  # the peer can take over from us
    else:  # the peer serves, or could, with a healthy LAN: we are not the last node able to
        ours = peer is not None and (peer_can_serve(peer, p) or (peer.serving and peer.lan_ok is True))
    fault = "ours" if ours else "isolated" if peer is None else "shared"
    if fault != s.lan_fault:
        s = replace(s, lan_fault=fault, lan_fault_since=f.now)
    if f.now - s.lan_fault_since < p.lan_hold:
        return s
    problem = f"own LAN unhealthy: {f.lan_problem or 'carrier or ping node lost'}"
    if fault == "ours":
        return _go_standby(s, problem, write_lock=True)
    if fault == "isolated" and s.role in (PRIMARY, RELEASING):
        return _step_back(s, f"{problem}, and the peer is silent too")
    return s


def _lan_message(s: State, f: Facts) -> str:
    peer = (
        "silent"
        if f.peer is None
        else f"unable to serve (role {f.peer.role}, LAN {'healthy' if f.peer.lan_ok else 'unhealthy'})"
    )
    return f"own LAN unhealthy ({f.lan_problem or 'carrier or ping node lost'}) but the peer is {peer}: staying {s.role}"


def _init(s: State, f: Facts, p: Policy):
    peer = f.peer
    if f.lan_ok is not True:
        return s, []
    if peer is None:
        if f.command == "force-primary":
            return _forced(s, f)
        if f.now < s.retry_at:
            return _keep_alert(s), []
        if f.now < s.started + p.initdead or not f.lan_confirmed:
            return s, []
        if not _may_serve(s, p, alone=True):
            return _outdated(s, "the peer has not been heard since this node started")
        return _takeover(s, f, lock=True, reason="peer not heard on any link since start")
    if peer.serving or peer.role in (PRIMARY, RELEASING):
        diverged = _diverged(s, peer, p, "while this node was away")
        if diverged:
            return diverged
        return _become_secondary(s, peer, "peer is primary")
    if f.command == "force-primary":
        return _forced(s, f)
    if peer.standby or peer.role == STANDBY:
        if not _may_serve(s, p, alone=False):
            return _outdated(s, "the peer is in standby")
        return _takeover(s, f, lock=True, reason="peer is in standby")
    if my_rank(s, f, p) > peer_rank(peer, p):
        return _takeover(s, f, lock=False, reason="cluster start: this node ranks first")
    return _become_secondary(s, peer, "cluster start: peer ranks first")


def _secondary(s: State, f: Facts, p: Policy):
    peer = f.peer
    if f.lan_ok is not True:
        return s, []
    if peer is None:
        if f.command == "force-primary":
            return _forced(s, f)
        if f.now < s.retry_at:
            return _keep_alert(s), []
        if not f.lan_confirmed:
            return s, []
        if not _may_serve(s, p, alone=False):
            return _outdated(s, "the peer is silent on every link")
        return _takeover(s, f, lock=True, reason="peer silent on every link for the dead time")
    actions: list[Action] = []
    if peer.serving or peer.role == PRIMARY:
        diverged = _diverged(s, peer, p, "while this node served")
        if diverged:
            return diverged
        if s.mirror_locked:  # nothing of ours to protect from the primary's copy any more
            s = replace(s, mirror_locked=False)
            actions.append(ReleaseMirrorLock())
        if peer.epoch > s.epoch:
            s = replace(s, epoch=peer.epoch, owns_epoch=False)
            actions.append(ObserveEpoch(peer.epoch))
        s, more = _direct(s, "receive")  # whatever stopped our receiver, the primary needs it
        actions += more
        if f.command == "failover" or (f.command == "failback" and s.is_home):
            s = replace(s, request="handover", handover_deadline=f.now + p.handover_timeout)
            actions.append(Reply(True, "asked the primary to hand over"))
        elif f.command == "failback":
            actions.append(Reply(False, "failback: this node is not the home node; run it on the home node"))
        if s.request == "handover" and s.handover_deadline is not None and f.now >= s.handover_deadline:
            s = replace(s, request=None, handover_deadline=None)
            actions.append(Notify("switchover-failed", "the primary did not hand over in time"))
        return s, actions
    if f.command == "force-primary":
        return _forced(s, f)
    if f.command is not None:
        actions.append(Reply(False, f"{f.command}: the peer is not serving (role {peer.role})"))
    if f.now < s.retry_at:
        return _keep_alert(s), actions
    if peer.role == RELEASING:
        if not _may_serve(s, p, alone=False):
            state, more = _outdated(s, "the peer is handing over")
            return state, actions + more
        state, more = _takeover(s, f, lock=False, reason="planned switchover from the peer")
        return state, actions + more
    if peer.standby or peer.role == STANDBY:
        if not _may_serve(s, p, alone=False):
            state, more = _outdated(s, "the peer went to standby")
            return state, actions + more
        state, more = _takeover(s, f, lock=True, reason="peer went to standby")
        return state, actions + more
    if peer.role == SECONDARY and my_rank(s, f, p) > peer_rank(peer, p):
        state, more = _takeover(s, f, lock=False, reason="no primary: this node ranks first")
        return state, actions + more
    return s, actions


def _primary(s: State, f: Facts, p: Policy):
    peer = f.peer
    actions: list[Action] = []
    if peer is None:
        s = replace(s, request=None, peer_ready_since=None)
        if f.resource_failure:
            s, actions = _alert(
                s,
                "resource",
                "resource-failed",
                f"{f.resource_failure}; the peer is not heard, so this node keeps trying",
            )
        if f.command is not None:
            actions.append(Reply(False, f"{f.command}: the peer is not heard on any link"))
        return s, actions
    if peer.serving:
        if peer_rank(peer, p) > my_rank(s, f, p):
            return _go_standby(
                s,
                f"split brain: the peer serves too and ranks first (epoch {peer.epoch} vs {s.epoch})",
                write_lock=True,
            )
        if s.request != "push_back":
            s = replace(s, request="push_back")
            actions += [
                Reannounce(),
                Notify(
                    "push-back",
                    f"peer serves too (role {peer.role}, standby={peer.standby}): pushing it back",
                ),
            ]
        return s, actions
    if s.request == "push_back":
        s = replace(s, request=None)
    if f.resource_failure:
        if peer_can_serve(peer, p):
            return _go_standby(s, f"{f.resource_failure}: handing over to the peer", write_lock=True)
        s, more = _alert(
            s,
            "resource",
            "resource-failed",
            f"{f.resource_failure}; the peer cannot take over, so this node keeps trying",
        )
        actions += more
    if peer.role == SECONDARY and not peer.serving and not peer.owns_epoch and peer.epoch > s.epoch:
        # The peer raised its epoch for a takeover that did not happen (it never served in
        # it: a server that did would own it): its receiver now refuses our older epoch.
        # Nothing of its own was written under that epoch, so ours can pass it.
        new_epoch = _next_epoch(s, peer.epoch)
        s = replace(s, epoch=new_epoch, owns_epoch=True)
        actions += [
            RaiseEpoch(new_epoch),
            Notify(
                "epoch-raised",
                f"the peer's epoch {peer.epoch} comes from a takeover that did not happen: epoch raised to {new_epoch} so that it accepts our changes again",
            ),
        ]
    healthy_secondary = peer_can_serve(peer)
    if s.mirror_locked and healthy_secondary:
        s = replace(s, mirror_locked=False)
        actions += [
            ReleaseMirrorLock(),
            Notify("resync", "peer rejoined as secondary: mirroring back the changes since the takeover"),
        ]
    s = replace(s, peer_ready_since=(s.peer_ready_since or f.now) if healthy_secondary else None)

    wanted = None
    if f.command == "failover" or peer.request == "handover":
        wanted = "planned switchover to the peer"
    elif f.command == "failback":
        if s.is_home:
            actions.append(Reply(False, "failback: this node is the home node and already serves"))
        else:
            wanted = "failback to the home node"
    elif (
        p.failback == "auto"
        and not s.is_home
        and peer.home
        and not s.mirror_locked
        and s.peer_ready_since is not None
        and f.now - s.peer_ready_since >= p.failback_delay
    ):
        wanted = "automatic failback to the home node"
    if wanted is None:
        return s, actions
    if not healthy_secondary:
        message = f"{wanted} refused: peer is not a healthy secondary (role {peer.role}, standby={peer.standby}, lan_ok={peer.lan_ok})"
        if f.command is not None:
            actions.append(Reply(False, message))
        return s, actions + ([Notify("switchover-refused", message)] if f.command else [])
    s, more = _release(s, f, p, wanted)
    actions += more
    if f.command is not None:
        actions.append(Reply(True, f"{wanted} started"))
    return s, actions


def _release(s: State, f: Facts, p: Policy, why: str) -> tuple[State, list[Action]]:
    """Hand over to the peer: services stopped, the final sync, the VIP dropped; the peer
    takes over once it sees us releasing with the sync done (our heartbeat's ``in_sync``)."""
    state = replace(s, role=RELEASING, handover_deadline=f.now + p.handover_timeout, request=None, reason=why,
                    direction=None)  # fmt: skip
    return state, [
        Notify("releasing", f"{why}: stopping services, final sync, dropping the VIP"),
        StopServices(),
        SetMirrorDirection(None),
        FinalSync(),
        StopResources(),
    ]


def _releasing(s: State, f: Facts, p: Policy):
    peer = f.peer
    if peer is not None and (peer.role == PRIMARY or peer.serving) and peer.epoch > s.epoch:
        return _become_secondary(s, peer, "switchover complete: peer is primary")
    if f.lan_ok is not True or f.copy_incomplete:
        # serving again takes a healthy LAN (an unhealthy one that holds: standby), and the
        # tree's own disk (one adopted meanwhile holds nothing yet)
        return s, []
    if peer is None:
        if not f.lan_confirmed:
            return s, []
        return _takeover(s, f, lock=True, reason="peer died during the switchover")
    if s.handover_deadline is not None and f.now >= s.handover_deadline and not peer.serving:
        return _takeover(s, f, lock=False, reason="switchover timed out: resuming service here")
    return s, []


def _standby_lock(s: State, f: Facts, p: Policy):
    """The standby lock on a node not yet in standby.  A primary whose peer is a healthy
    secondary hands over first, as a planned switchover does, so that the peer serves with
    every change made here, even those the daemon had not sent yet; the lock then keeps this
    node from serving again, whatever comes of the hand-over.  Anything else (a LAN or a
    disk of its own failing, no peer able to take over) goes to standby at once."""
    if s.role == PRIMARY and _may_hand_over(s, f):
        return _release(s, f, p, "the standby lock is present: handing over to the peer first")
    if s.role != RELEASING:
        return _go_standby(s, "the standby lock is present", write_lock=False)
    peer = f.peer
    if peer is not None and (peer.role == PRIMARY or peer.serving) and peer.epoch > s.epoch:
        return _go_standby(s, f"the standby lock is present; {peer.name} took over", write_lock=False)
    if f.lan_ok is False or f.unfit:
        why = f.unfit or f"own LAN unhealthy: {f.lan_problem or 'carrier or ping node lost'}"
        return _go_standby(s, f"the standby lock is present; the hand-over was cut short ({why})", write_lock=False)
    if peer is None:
        return _go_standby(s, "the standby lock is present; the peer went silent during the hand-over, so "
                              "nobody serves", write_lock=False)  # fmt: skip
    if s.handover_deadline is not None and f.now >= s.handover_deadline:
        return _go_standby(s, f"the standby lock is present; {peer.name} did not take over within "
                              f"{p.handover_timeout:g} s, so nobody serves", write_lock=False)  # fmt: skip
    return s, []


def _may_hand_over(s: State, f: Facts) -> bool:
    """A primary may hand over before it stands by: it is fit to serve and its LAN healthy
    (its copy and its path to the peer are sound), and the peer is a healthy secondary with a
    whole copy (one that would not take over from a releasing node would leave nobody
    serving until the hand-over times out)."""
    peer = f.peer
    return (
        f.lan_ok is True
        and not f.unfit
        and not s.mirror_locked
        and peer_can_serve(peer)
        and not peer.serving
        and not peer.copy_incomplete
    )


def _standby(s: State, f: Facts, p: Policy):
    if f.standby_lock:
        s = replace(s, unfit="")  # the administrator's standby now: only a resume ends it
        if f.command is not None:
            return s, [Reply(False, f"{f.command}: this node is in standby; run 'hawrap resume' first")]
        return s, []
    if f.unfit:
        if f.command is not None:
            return s, [Reply(False, f"{f.command}: refused: {f.unfit}")]
        return replace(s, reason=f.unfit), []
    if s.unfit:
        if f.lan_ok is not True:
            return s, []
        # Rejoined by itself: what it held alone (owns_epoch, peer_outdated) stays its own.
        return _become_secondary(replace(s, unfit=""), f.peer, f"fit to serve again (was: {s.unfit})")
    if f.lan_ok is False:
        reason = f"resume refused: own LAN unhealthy: {f.lan_problem or 'carrier or ping node lost'}"
        return replace(s, reason=reason), [WriteStandbyLock(reason), Notify("standby", reason)]
    if f.lan_ok is None:
        return s, []
    return _become_secondary(s, f.peer, "resumed by the administrator", resumed=True)


# ---------------------------------------------------------------- building blocks


def _forced(s: State, f: Facts) -> tuple[State, list[Action]]:
    """``hawrap force-primary``: serve this copy although it may not be the newest (the CLI
    showed the administrator what may be lost).  Only the data check is waived."""
    if f.lan_ok is not True or f.standby_lock:
        return s, [Reply(False, "force-primary: refused: own LAN unhealthy or standby lock present")]
    state, actions = _takeover(replace(s, uptodate=True), f, lock=True, reason="forced by the administrator")
    return state, [*actions, Reply(True, "taking over with this node's copy")]


def _next_epoch(s: State, above: int) -> int:
    """The smallest epoch above ``above`` (and ours) of this node's parity: the two nodes take
    epochs of different parity, so two takeovers made apart can never claim the same one."""
    new_epoch = max(s.epoch, above) + 1
    if s.epoch_parity is not None and new_epoch % 2 != s.epoch_parity:
        new_epoch += 1
    return new_epoch


def _direct(s: State, direction: str | None) -> tuple[State, list[Action]]:
    if s.direction == direction:
        return s, []
    return replace(s, direction=direction), [SetMirrorDirection(direction)]


def _takeover(s: State, f: Facts, *, lock: bool, reason: str):
    """Become primary, all or nothing.  The address check comes first and changes nothing:
    if the VIP still answers (a peer silent but alive: frozen, or its heartbeats lost one
    way), ``takeover_refused`` returns to the state before.  Every caller has checked LAN
    health and that the peer does not serve; the asserts make a future caller that forgets
    fail the property tests loudly."""
    assert f.lan_ok is True and not f.standby_lock and not f.unfit
    assert f.peer is None or not f.peer.serving
    new_epoch = _next_epoch(s, f.peer.epoch if f.peer else 0)
    actions: list[Action] = [CheckAddressFree()]
    if lock:
        actions.append(AcquireMirrorLock(f"takeover by {s.node}: {reason}"))
    actions += [
        RaiseEpoch(new_epoch),
        StopReceiver(),
        StartResources(),
        SetMirrorDirection("send"),
        Notify("takeover", f"{reason}: now primary at epoch {new_epoch}"),
    ]
    state = replace(
        s,
        role=PRIMARY,
        epoch=new_epoch,
        owns_epoch=True,
        mirror_locked=s.mirror_locked or lock,
        request=None,
        handover_deadline=None,
        peer_ready_since=None,
        reason=reason,
        direction="send",
        uptodate=True,
        peer_outdated=True,  # until its replica is in sync: nobody else has our changes yet
    )
    return state, actions


def takeover_refused(before: State, f: Facts, p: Policy, error: str) -> tuple[State, list[Action]]:
    """CheckAddressFree found the VIP answered elsewhere: nothing was done, nothing to undo.
    Stay as ``before`` (receiving, if a secondary), try again after retry_interval."""
    state = replace(before, retry_at=f.now + p.recheck_interval, reason=f"takeover refused: {error}")
    return _alert(
        state,
        "takeover-refused",
        "takeover-refused",
        f"the peer is silent but its address still answers, so it is alive: not taking over ({error}); checking again every {p.recheck_interval:g} s",
    )


def takeover_failed(
    before: State, after: State, f: Facts, p: Policy, error: str
) -> tuple[State, list[Action]]:
    """A step after the address check failed (epoch, lock, VIP, a service): undo the rest.
    Services and VIP stopped, the mirroring lock released if this takeover took it, the
    receiver running again.  The epoch cannot go back (it only rises); the state says we do
    not own it, so a primary that meets it knows no takeover happened in it."""
    actions: list[Action] = [StopResources()]
    if after.mirror_locked and not before.mirror_locked:
        actions.append(ReleaseMirrorLock())
    state = replace(
        after, role=SECONDARY, owns_epoch=False, mirror_locked=before.mirror_locked, retry_at=f.now + p.retry_interval,
        reason=f"takeover failed: {error}", request=None, direction=None, uptodate=before.uptodate,
        peer_outdated=before.peer_outdated,
    )  # fmt: skip
    state, more = _direct(state, "receive")
    actions += more
    state, more = _alert(
        state,
        "takeover-failed",
        "takeover-failed",
        f"takeover failed and was rolled back, retrying in {p.retry_interval:g} s: {error}",
    )
    return state, actions + more


def release_failed(s: State, f: Facts, p: Policy, error: str) -> tuple[State, list[Action]]:
    """The final sync (or a stop) failed during a planned switchover: keep serving here; or,
    handing over for the standby lock, go to standby (the peer lacks changes made here, so
    it does not take over on its own: nobody serves until the administrator acts)."""
    if f.standby_lock:
        return _go_standby(s, f"the standby lock is present; the hand-over's final sync failed: {error}",
                           write_lock=False)  # fmt: skip
    state = replace(
        s, role=PRIMARY, handover_deadline=None, reason=f"switchover aborted: {error}", direction="send"
    )
    return state, [
        StartResources(),
        SetMirrorDirection("send"),
        Notify("switchover-failed", f"switchover aborted, still primary: {error}"),
    ]


def _diverged(s: State, peer: PeerView, p: Policy, when: str):
    """A serving peer found by a node that served in an epoch of its own (it owns it), or
    that holds changes the peer lacks (it served while the peer's copy was outdated): the two
    copies may each hold writes the other lacks.  A mirror sync would overwrite this node's:
    the administrator checks first (``hawrap resume`` shows what this node has that the peer
    lacks)."""
    if s.owns_epoch and peer.epoch > s.epoch:
        why = f"peer took over (epoch {peer.epoch} > {s.epoch}) {when}"
    elif s.owns_epoch and peer.epoch < s.epoch:
        why = f"peer serves at epoch {peer.epoch}, older than this node's {s.epoch}: it may lack changes made here"
    elif p.data_guard and s.peer_outdated:
        why = f"peer serves (epoch {peer.epoch}), and this node holds changes it lacks (it served while the peer's copy was outdated)"
    else:
        return None
    return _go_standby(s, f"{why}: check this node, then run 'hawrap resume'", write_lock=True)


def _step_back(s: State, reason: str):
    """Stop serving but stay a secondary (no standby lock): the cause may be gone soon."""
    state = replace(
        s,
        role=SECONDARY,
        request=None,
        handover_deadline=None,
        peer_ready_since=None,
        reason=reason,
        retry_at=0.0,
    )
    state, direct = _direct(state, _receiving(state))
    return state, [StopResources(), *direct, Notify("stepped-back", reason)]


def _go_standby(s: State, reason: str, *, write_lock: bool):
    state = replace(
        s,
        role=STANDBY,
        mirror_locked=True,
        request=None,
        handover_deadline=None,
        peer_ready_since=None,
        reason=reason,
    )
    state, direct = _direct(state, None)
    actions: list[Action] = [StopResources(), *direct, AcquireMirrorLock(f"{s.node} in standby: {reason}")]
    if write_lock:
        actions.append(WriteStandbyLock(reason))
    actions.append(Notify("standby", reason))
    return state, actions


def _become_secondary(s: State, peer: PeerView | None, reason: str, resumed: bool = False):
    actions: list[Action] = []
    epoch = s.epoch
    if peer is not None and peer.epoch > s.epoch:
        epoch = peer.epoch
        actions.append(ObserveEpoch(peer.epoch))
    if resumed or s.mirror_locked:
        actions.append(ReleaseMirrorLock())
    state = replace(
        s,
        role=SECONDARY,
        epoch=epoch,
        # Resumed by the administrator (after ``hawrap resume`` showed what the peer lacks),
        # this node gives up its claim on its epoch: the primary may pass it and mirror over.
        owns_epoch=s.owns_epoch and epoch == s.epoch and s.role != RELEASING and not resumed,
        peer_outdated=s.peer_outdated and not resumed,  # what it holds alone is given up, likewise
        mirror_locked=False,
        request=None,
        handover_deadline=None,
        peer_ready_since=None,
        reason=reason,
    )
    state, direct = _direct(state, "receive" if resumed else _receiving(state))
    return state, actions + direct + [Notify("secondary", reason)]


def _receiving(s: State) -> str | None:
    """The mirror direction of a secondary that has not yet heard a primary: a node that
    still claims data of its own (it served in its own epoch, or while the peer did not get
    its changes) starts no receiver, or whoever serves next would mirror over that data
    before the check that the peer has it (``_diverged``, on hearing it serve); the
    receiver starts once that check has passed (``_secondary``)."""
    return None if s.owns_epoch or s.peer_outdated else "receive"
