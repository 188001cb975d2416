"""One cluster node whose leadership comes from etcd (``[cluster] backend = "etcd"``).

``hawrap.leadership`` decides who serves; this module carries it out on the node: the leader
raises its trees' epochs to the term's epoch, takes the VIP, starts the services and mirrors
every tree to every other node (``mirror daemon`` with one pair per destination); the others
serve the trees to it (``mirror serve``).  See docs/ETCD.md.

Threads.  The leadership's loop thread and its watchdog thread call the ``Listener`` methods;
the node's own loop (``run``) starts serving and does the slow, ordered work.  Every way of
*stopping* (``stop_serving`` from the watchdog, ``demoted`` and ``prepare_handover`` from the
leadership loop) runs at once in the calling thread, because the leader key may pass to
another member as soon as the call returns.  Serving is allowed only while ``_term`` names
the current term: a stop clears it under ``_term_lock``, and the loop adds the VIP only under
the same lock after checking it, so a stop always wins over a start in flight: the VIP
cannot be added after a stop has begun.

The VIP gets a kernel lifetime that ends before the watchdog's instant (the lease's last
renewal + TTL - stop budget) and is renewed after each keepalive, so even a frozen node
(SIGSTOP, a paused VM) loses it before its lease can expire for the others.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time

from mirror import epoch as mirror_epoch
from mirror import lockfile
from mirror.applied import read_applied
from mirror.daemon import journal_head
from mirror.errors import EXIT_STALE_EPOCH, MirrorError

from . import watchdog
from .config import ClusterConfig
from .control import ControlServer
from .errors import HawrapError, ResourceError
from .etcdsession import CLOCK_RATE_TOLERANCE
from .leadership import Leader, Leadership, Listener, Position, Start
from .links import LanHealth, LanMonitor
from .mirrorctl import MirrorControl, exit_alert, resolve_trees
from .node import build_resources
from .notify import Notifier
from .setaside import SetAsideError, keep_unsynced
from .unsynced import settle

log = logging.getLogger(__name__)

TICK = 0.05
VIP_RETRY = 0.1  # the VIP still answers elsewhere (a frozen former leader): look again this often
FINAL_SYNC_TIMEOUT = 3600.0
KEEP_RETRY = 5.0  # seconds between attempts to copy unconfirmed changes aside
# A leader's daemon refused as older is told of only if that lasts this long: the term's
# in-place raise reaches the replicas before this node's own trees (docs/ETCD.md).
REFUSED_GRACE = 10.0
# The kernel drops an expired IPv4 address from a timer rounded up to a whole second: a
# lifetime this much shorter still ends before the watchdog's instant.
KERNEL_EXPIRY_SLACK = 1

LEADER, REPLICA, INIT = "leader", "replica", "init"


def vip_lifetime(valid_for: float | None, margin: float) -> int:
    """Whole seconds the VIP may live: it must be gone before the watchdog fires
    (``valid_for - margin`` from now), despite the kernel's whole-second expiry timer.
    0: too little time left to add or renew it."""
    if valid_for is None:
        return 0
    return max(0, math.floor(valid_for - margin) - KERNEL_EXPIRY_SLACK)


class EtcdNode(Listener):
    def __init__(self, cfg: ClusterConfig, name: str):
        if cfg.etcd is None:
            raise HawrapError(f"{cfg.path}: cluster.backend is not etcd")
        self.cfg = cfg
        self.name = name
        self.me = cfg.node(name)
        self.others = [n.name for n in cfg.nodes if n.name != name]
        os.makedirs(self.me.state_dir, mode=0o700, exist_ok=True)
        self.settings = cfg.etcd
        self.events: queue.Queue = queue.Queue()
        self.mirror = MirrorControl(
            cfg, name, on_exit=lambda *exit: self.events.put(("mirror", exit)), destinations=self.others
        )
        self._receiver_watch = self.mirror.receiver_watch()  # while receiving: is the receiver hung?
        self.resources = build_resources(cfg, name)
        self.notifier = Notifier(cfg.notify, cfg.name, name, ",".join(self.others))
        self.lan = LanHealth(None)
        self.lan_monitor = LanMonitor(
            self.me.lan_interface,
            cfg.ping_nodes,
            lambda h: self.events.put(("lan", h)),
            carrier_interval=cfg.timing.carrier_interval,
            ping_interval=cfg.timing.ping_interval,
            ping_timeout=cfg.timing.ping_timeout,
            failures=cfg.timing.ping_failures,
        )
        timing = self.settings.timing
        # the watchdog's own margin: the VIP must be gone by then
        self.margin = timing.stop_budget + timing.ttl * CLOCK_RATE_TOLERANCE
        self.role = INIT
        self.reason = "starting"
        self.epoch = mirror_epoch.read_epoch(self.me.state_dir)
        self.leader: str | None = None
        self._term_lock = threading.Lock()
        self._term: int | None = None  # the term this node may serve in (a count of elections)
        self._terms = 0
        self._serving = False  # the loop has started serving for the current term
        self._began_serving = False  # it began to (until the stop is handled)
        self._vip_wanted = False  # the VIP is up for the current term (cleared under _term_lock)
        self._vip_renewed_for = 0.0  # the lease renewal the VIP's lifetime was last set from
        self._vip_keeper: threading.Thread | None = None
        self._leader_epoch: int | None = None
        self._leader_start: Start | None = None  # where the leader's data stood when its term began
        self._held: str | None = None  # why this node does not receive: it holds what the leader lacks
        self._let_go: tuple | None = None  # the term whose leader may replace it (``resume --discard-local-changes``)
        self._mirror_exits: dict[str, int] = {}  # unexpected exits, per process (reset when it is replaced)
        self._mirror_alerted: set[str] = set()
        self._refused_since: dict[str, tuple[float, str]] = {}  # while leading: daemon -> (first refusal, why)
        self._rejoined_at: dict | None = None  # the trees' epochs when this node (re)joined as a replica
        self._keep_retry_at = 0.0  # a copy aside that failed is tried again from then on
        self._keep_failed: str | None = None
        # (target, when its final sync began) of a hand-over whose final sync succeeded
        self._handed: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._stop_requested = False  # by a signal (``request_stop``)
        self.transitions: list[dict] = []
        self.progress = watchdog.Progress()
        self.feeder: watchdog.Feeder | None = None
        self.control: ControlServer | None = None
        self.on_role_change = None
        self.leadership = Leadership(
            self.settings.conn,
            self.settings.prefix,
            name,
            timing,
            self,
            position=self.position,
            eligibility=self.eligibility,
            expected=tuple(n.name for n in cfg.nodes),
            tree_positions=self.tree_positions,
            leaving=self.leaving,
        )

    # ------------------------------------------------------------ what leadership reads

    def position(self) -> Position:
        """What this node's data is (docs/ETCD.md): on a node serving (or handing over), its
        trees' epoch and its daemons' journal head; on a replica, what its receiver recorded
        as applied (``mirror.applied``), the lowest over its trees, (0, 0) for a tree with
        no record.  Without trees: the node's own epoch.  ``fence``: the highest epoch any
        tree holds."""
        trees = self.mirror.trees
        epochs = [mirror_epoch.read_epoch(t.state_dir) for t in trees]
        fence = max(epochs + [mirror_epoch.read_epoch(self.me.state_dir)])
        if not trees:
            return Position(mirror_epoch.read_epoch(self.me.state_dir), 0, fence)
        if self._began_serving:
            return Position(min(epochs), min(journal_head(t.state_dir) for t in trees), fence)
        points = []
        for t in trees:
            rec = read_applied(t.state_dir)
            points.append((rec.epoch, rec.seq) if rec is not None else (0, 0))
        epoch, seq = min(points)
        return Position(epoch, seq, fence)

    def tree_positions(self) -> dict[str, tuple[int, int]]:
        """Each tree's position, as ``position`` ranks the node by the lowest of them."""
        out = {}
        for t in self.mirror.trees:
            if self._began_serving:
                out[t.name] = (mirror_epoch.read_epoch(t.state_dir), journal_head(t.state_dir))
            else:
                rec = read_applied(t.state_dir)
                out[t.name] = (rec.epoch, rec.seq) if rec is not None else (0, 0)
        return out

    def eligibility(self) -> str | None:
        if lockfile.is_locked(self.cfg.standby_lock_path(self.name)):
            return "standby lock present"
        if self.lan.ok is False:
            return f"own LAN unhealthy: {self.lan.problem}"
        return self.mirror.disks.unfit() or None

    def leaving(self) -> bool:
        """The standby lock is all that keeps this node from leading: as leader it can still
        hand over, its final sync reaching the others over a healthy LAN from its own disks."""
        return (
            lockfile.is_locked(self.cfg.standby_lock_path(self.name))
            and self.lan.ok is not False
            and not self.mirror.disks.unfit()
        )

    # ------------------------------------------------------------ the listener

    def elected(self, epoch: int) -> None:
        with self._term_lock:
            self._terms += 1
            self._term = term = self._terms
        self.events.put(("elected", (term, epoch)))

    def epoch_raised(self, epoch: int) -> None:
        with self._term_lock:
            term = self._term
        if term is not None:
            self.events.put(("epoch", (term, epoch)))

    def stop_serving(self, reason: str) -> None:
        """From the watchdog thread: drop the VIP and stop the services now."""
        self._stop_now(f"no etcd quorum: {reason}")
        self.events.put(("stopped", reason))

    def demoted(self, reason: str) -> None:
        self._stop_now(reason)
        self.events.put(("stopped", reason))

    def leader_changed(self, leader: Leader | None) -> None:
        self.events.put(("leader", leader))

    def prepare_handover(self, target: str) -> bool:
        """A hand-over (``failover --to target``, or the standby lock on the leader): stop
        serving entirely (the key moves as soon as the target has our position), then the
        final sync toward the target."""
        self._stop_now(f"handing over to {target}")
        began = time.time()
        try:
            self.mirror.final_sync(FINAL_SYNC_TIMEOUT, to=target)
        except HawrapError as exc:
            log.error("final sync toward %s failed: %s", target, exc)
            return False
        self._handed = (target, began)
        return True

    def handover_aborted(self, reason: str) -> None:
        self._handed = None
        leading = self.leadership.leading
        if leading is not None:
            self.elected(leading.epoch)

    # ------------------------------------------------------------ stopping: at once

    def _stop_now(self, reason: str) -> None:
        """Idempotent, from any thread: no serving from now on, VIP first."""
        with self._term_lock:
            was, self._term = self._term, None
            self._vip_wanted = False
        if was is not None:
            log.warning("stop serving: %s", reason)
        started = time.monotonic()
        if self.resources.vip is not None:
            try:
                self.resources.vip.stop()
            except ResourceError as exc:
                log.error("%s", exc)
        for error in self.resources.stop_services():
            log.error("%s", error)
        self.mirror.kill_senders()  # a node that does not lead sends nothing
        took = time.monotonic() - started
        if was is not None:
            log.warning("stopped serving in %.0f ms", took * 1000)

    def _term_is(self, term: int) -> bool:
        with self._term_lock:
            return self._term == term

    # ------------------------------------------------------------ the loop

    def start(self) -> None:
        self.resources.prepare()
        self.lan_monitor.start()
        self.control = ControlServer(self.cfg.control_socket(self.name), self._control_request)
        fd = os.environ.get(watchdog.ENV)
        if fd is not None:
            os.set_blocking(int(fd), False)
        self.feeder = watchdog.Feeder(
            None if fd is None else int(fd), self.cfg.timing.watchdog / 4, self.progress, self.cfg.timing.watchdog,
            lambda: None,
        )  # fmt: skip
        # whatever a previous run left: this node serves nothing until etcd says it leads
        self._stop_now("starting")
        self._rejoining()
        self._set_role(REPLICA, "following (no leader known yet)")
        self._receive()
        if self.resources.vip is not None and self.resources.vip.cfg.kind == "ip":
            self._vip_keeper = threading.Thread(target=self._keep_vip, name="vip-keeper", daemon=True)
            self._vip_keeper.start()
        self.leadership.start()
        log.info("node %s started (etcd %s, prefix %s)", self.name, ",".join(self.settings.conn.endpoints),
                 self.settings.prefix)  # fmt: skip

    def stop(self) -> None:
        self._stop.set()
        self.events.put(("stop", None))

    def request_stop(self) -> None:
        """``stop`` from a signal handler: a plain store the loop sees within TICK.  The handler
        runs in the main thread between two bytecodes, possibly while that thread holds the
        events queue's lock (inside ``get``) or the stop event's: ``put`` or ``set`` there
        would wait for it forever, and the node would never stop."""
        self._stop_requested = True

    def run(self) -> None:
        self.start()
        try:
            while not (self._stop_requested or self._stop.is_set()):
                try:
                    kind, payload = self.events.get(timeout=TICK)
                except queue.Empty:
                    kind, payload = "tick", None
                self.progress.beat()
                if kind == "stop":
                    break
                with self.progress.busy(FINAL_SYNC_TIMEOUT):
                    self._handle(kind, payload)
                    if self._term is None:
                        self._receive()
                    if self._rejoined_at is not None:
                        self._follow_epoch()
                    self._push_back_vip()
                    self._restart_stuck_daemons()
                    self._restart_silent_receiver()
        finally:
            self.shutdown()

    def _receive(self) -> None:
        """A replica receives, unless a tree's disk is not its own (its receiver would let
        the leader's mirroring overwrite another disk): then nothing until it is.  It starts
        to receive once another member leads (etcd says who, and where its data stood: is
        this node's ahead, ``_hold``?), after copying aside what this node journaled as a
        leader and that member lacks (``_keep_unconfirmed``): its copy is about to replace it."""
        if self.mirror.disks.unfit():
            self.mirror.set_direction(None)
            return
        if self.mirror.direction != "receive":
            self.mirror.set_direction(None)  # its daemons stopped: their journals hold still
            if self.leader is None or self._hold() or not self._keep_unconfirmed():
                return
        self.mirror.set_direction("receive")

    def _hold(self) -> bool:
        """True while this node must not receive: a tree holds data from before the leader's
        term that is past where the leader's copy stood when its term began (the replicas
        that had it, and the leader that wrote it, died together).  This node does not know
        which files those are, so it keeps its copy whole, tells the administrator once, and
        waits for ``hawrap resume --discard-local-changes`` (docs/ETCD.md, "A double failure")."""
        start = self._leader_start
        term = (self.leader, start)
        ahead = start.ahead(self.tree_positions()) if start is not None and self._let_go != term else {}
        if not ahead:
            self._held = None
            return False
        what = ", ".join(f"{name} at {a[0]}/{a[1]} (the leader's from {b[0]}/{b[1]})" for name, (a, b) in sorted(ahead.items()))
        held = (f"holds changes the leader {self.leader} never had: {what}; not receiving, so that nothing of them "
                f"is replaced. Copy what you need from this node's trees, then run 'hawrap resume "
                f"--discard-local-changes' here")  # fmt: skip
        if held != self._held:
            log.error("%s", held)
            self.notifier.notify("replica-ahead", held, self.role, self.epoch)
            self._held = held
        return True

    def _keep_unconfirmed(self) -> bool:
        """Copy aside (``hawrap/setaside.py``, into each tree's state dir, ``kept/TIME``) the
        changes this node's journals hold that no replica confirmed, then settle the
        journals; the administrator is told where.  False while a copy cannot be made (told
        once, tried again every KEEP_RETRY seconds): this node does not receive meanwhile."""
        now = time.monotonic()
        if now < self._keep_retry_at:
            return False
        trees = resolve_trees(self.cfg, self.name)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        # handed over to this leader: its final sync gave it every file from before it began
        synced = self._handed[1] if self._handed is not None and self._handed[0] == self.leader else None
        try:
            kept = keep_unsynced(trees, None, None, stamp, had_by_none=True, lacking=self.leader, synced_whole=synced)
        except SetAsideError as exc:
            self._keep_retry_at = now + KEEP_RETRY
            if self._keep_failed != exc.cause:
                self.notifier.notify("error", f"changes no replica confirmed cannot be kept aside, {exc}: this node "
                                              f"does not receive until they are (tried every {KEEP_RETRY:g} s)",
                                     self.role, self.epoch)  # fmt: skip
            self._keep_failed = exc.cause
            return False
        self._keep_failed = None
        self._handed = None
        for problem in settle(trees):
            log.error("cannot mark the journal as dealt with, %s: its changes are kept again next time", problem)
        if kept:
            text = "; ".join(k.describe().strip().replace("\n", " ") for k in kept)
            self.notifier.notify("local-changes-kept", f"changes made here as leader that no replica confirmed, "
                                                       f"copied aside before the leader's copy replaces them: {text}",
                                 self.role, self.epoch)  # fmt: skip
        return True

    def _handle(self, kind: str, payload) -> None:
        if kind == "elected":
            self._serve(*payload)
        elif kind == "epoch":
            term, epoch = payload
            if self._term_is(term):
                self._raise_epochs(epoch)
        elif kind == "stopped":
            if self._term is None:  # (not a new term begun since)
                if self._began_serving:
                    self._rejoining()
                self._began_serving = self._serving = False
                self._receive()
                self._set_role(REPLICA, f"stopped serving: {payload}")
        elif kind == "leader":
            leader = payload
            self.leader = leader.node if leader else None
            self._leader_epoch = leader.epoch if leader else None
            self._leader_start = leader.start if leader else None
            if self._term is None:
                self._receive()
                who = f"{leader.node} leads at epoch {leader.epoch}" if leader else "no leader"
                self._set_role(REPLICA, who)
                self._follow_epoch()
        elif kind == "lan":
            if payload.ok is not self.lan.ok and payload.ok is not None:
                log.info("own LAN %s%s", "healthy" if payload.ok else "unhealthy",
                         f": {payload.problem}" if payload.problem else "")  # fmt: skip
            self.lan = payload
        elif kind == "mirror":
            name, code, message = payload
            if code == EXIT_STALE_EPOCH and self._term is not None:
                self._refused_since.setdefault(name, (time.monotonic(), message))
                return  # told in ``_restart_stuck_daemons`` if it lasts
            self._mirror_exits[name] = self._mirror_exits.get(name, 0) + 1
            self._alert_mirror(name, exit_alert(code, message, self._mirror_exits[name]))
        elif kind == "cmd":
            request, reply = payload
            reply.put(self._command(request))

    def _rejoining(self) -> None:
        """This node's copy may lack the leader's changes (it just started, or it served): it
        keeps the epoch of its data, and ranks below the replicas that followed, until the
        leader's sessions reach it (see ``_follow_epoch``)."""
        self._rejoined_at = self.mirror.epochs()

    def _follow_epoch(self) -> None:
        """A replica takes the leader's epoch, so that it fences a former primary at once and
        ranks with the other replicas.  A rejoining one only once every tree has received a
        session from a newer primary (the receiver raised its epoch, at most MAX_EPOCH_STEP
        a session: the leader's full sync has begun)."""
        epoch = self._leader_epoch
        if epoch is None or self._term is not None:
            return
        if self._rejoined_at is not None:
            now = self.mirror.epochs()
            if any(not isinstance(now[t], int) or now[t] <= then for t, then in self._rejoined_at.items()):
                return
            log.info("the leader's sessions have reached every tree: following its epoch %d", epoch)
            self._rejoined_at = None
        self._raise_epochs(epoch)

    def _raise_epochs(self, epoch: int) -> None:
        """The term's epoch is above every epoch a member published (docs/ETCD.md): observing
        it raises every tree.  A tree found above it is published, and the leader key raised."""
        mirror_epoch.observe_epoch(self.me.state_dir, epoch)
        self.mirror.observe_epochs(epoch)
        self.epoch = mirror_epoch.read_epoch(self.me.state_dir)

    def _serve(self, term: int, epoch: int) -> None:
        """Elected at ``epoch``: epochs, VIP, services, mirroring; abandoned (and undone) as
        soon as the term ends."""
        if not self._term_is(term):
            return
        started = time.monotonic()
        self._rejoined_at = None
        self._handed = None  # it serves again: what it writes from now on is its own
        # the former leader is no one to receive from once this term ends: etcd tells who is next
        self.leader = self._leader_epoch = self._leader_start = None
        self._began_serving = True  # from here its copy may hold changes no replica has
        self.mirror.disks.served()
        try:
            self._raise_epochs(epoch)
            # The receiver killed where it stands (fsm.StopReceiver): this node's trees are the source now.
            self.mirror.stop_receiver()
            self.mirror.set_direction(None)
            if self.resources.vip is not None and not self._take_vip(term):
                return
            for service in self.resources.services:
                if not self._term_is(term):
                    return
                service.start()
            if not self._term_is(term):
                return
            self._serving = True
            self._mirror_exits.clear()
            self._mirror_alerted.clear()
            self._refused_since.clear()
            self.mirror.set_direction("send")
            if not self._term_is(term):  # the stop may have missed the daemon just started
                self.mirror.kill_processes()
                return
        except (ResourceError, HawrapError, MirrorError, OSError) as exc:
            log.error("starting to serve failed: %s: resigning", exc)
            self.notifier.notify("error", f"could not serve at epoch {epoch}: {exc}", self.role, epoch)
            self._stop_now(f"start failed: {exc}")
            threading.Thread(target=self.leadership.resign, name="resign", daemon=True).start()
            return
        finally:
            if not self._term_is(term):
                self._stop_now("the term ended while starting")
        self._set_role(LEADER, f"leader at epoch {epoch}")
        log.warning(
            "serving at epoch %d (%.0f ms after the election)", epoch, (time.monotonic() - started) * 1000
        )

    def _take_vip(self, term: int) -> bool:
        vip = self.resources.vip
        assert vip is not None
        while True:
            if not self._term_is(term) or self._stop.is_set():
                return False
            try:
                vip.check_free()
                break
            except ResourceError as exc:
                # a former leader frozen with it: its lifetime ends before its lease does
                log.warning("%s", exc)
                self._stop.wait(VIP_RETRY)
        while True:
            lifetime = self._lifetime()
            with self._term_lock:
                if self._term != term:
                    return False
                if lifetime or vip.cfg.kind != "ip":
                    vip.start(check=False, lifetime=lifetime)
                    self._vip_wanted = True
                    self._vip_renewed_for = time.monotonic()
                    return True
            if self._stop.wait(TICK):
                return False

    def _lifetime(self) -> int:
        return vip_lifetime(self.leadership.session.status()["valid_for"], self.margin)

    def _keep_vip(self) -> None:
        """Its own thread: after each keepalive, the VIP's lifetime again, so that it ends
        before the watchdog fires; added back if it expired while the term is still ours (a
        loop slowed down: the lease, not the address, says who may hold it)."""
        vip = self.resources.vip
        assert vip is not None and vip.cfg.kind == "ip"
        while not self._stop.wait(TICK):
            if not self._vip_wanted:
                continue
            last = self.leadership.session.status()["last_renewal_ago"]
            if last is None:
                continue
            renewed_at = time.monotonic() - last
            if renewed_at <= self._vip_renewed_for + 0.001:
                continue
            lifetime = self._lifetime()
            if not lifetime:
                continue
            try:
                present = vip.running()
                seen = time.monotonic()
                with self._term_lock:
                    if not self._vip_wanted:
                        continue
                    if present:
                        vip.refresh(seen, lifetime)
                    else:
                        log.warning("%s expired while this node leads: adding it again", vip.name)
                        vip.start(check=False, lifetime=lifetime)
                self._vip_renewed_for = renewed_at
            except ResourceError as exc:
                log.error("%s", exc)

    def _restart_silent_receiver(self) -> None:
        """While receiving: a receiver that does not answer a hello is killed and started
        again (``ReceiverWatch``): hung or stopped, it would leave this replica behind for
        good, and a replica behind is not elected, until an administrator came."""
        silent = self._receiver_watch.check(self.mirror.direction == "receive")
        if silent:
            self.mirror.restart_receiver()
            self.notifier.notify("error", f"the mirror receiver: {silent} (hung or stopped): killed, to be started again",
                                 self.role, self.epoch)  # fmt: skip

    def _restart_stuck_daemons(self) -> None:
        """While leading: a mirror daemon whose status stopped changing is started again
        (``MirrorControl.restart_stuck``), checked every monitor interval."""
        now = time.monotonic()
        if self._term is None or now < getattr(self, "_next_daemon_check", 0.0):
            return
        self._next_daemon_check = now + self.cfg.timing.monitor_interval
        self.mirror.replica()  # reads each daemon's status
        for restarted in self.mirror.restart_stuck():
            self.notifier.notify("error", restarted, self.role, self.epoch)
        for restarted in self.mirror.restart_fenced():
            log.warning("%s", restarted)
        self._tell_lasting_refusals()

    def _tell_lasting_refusals(self) -> None:
        """A daemon that exited refused as older while this node leads is started again (at
        the tree's epoch then); the administrator is told only if a replica still refuses it
        REFUSED_GRACE seconds on: the term's in-place raise explains a shorter one."""
        for name, (since, message) in list(self._refused_since.items()):
            refused = self.mirror.refused(name)
            if refused is False:
                del self._refused_since[name]
                log.info("mirror %s: no longer refused as older (the term's epoch was raised in place)", name)
            elif time.monotonic() - since > REFUSED_GRACE:
                del self._refused_since[name]
                self._alert_mirror(name, exit_alert(EXIT_STALE_EPOCH, message, 1))
        for diverged in self.mirror.diverged():
            self.notifier.notify("replica-diverged", diverged, self.role, self.epoch)

    def _alert_mirror(self, name: str, what: str | None) -> None:
        """Tell the administrator of mirror process ``name`` once per episode (until it is replaced)."""
        if what is not None and name not in self._mirror_alerted:
            self._mirror_alerted.add(name)
            self.notifier.notify("replication", f"mirror {name}: {what}", self.role, self.epoch)

    def _push_back_vip(self) -> None:
        """A node that does not lead and finds the VIP on its interface removes it."""
        if self._term is not None or self.resources.vip is None:
            return
        now = time.monotonic()
        if now < getattr(self, "_next_vip_check", 0.0):
            return
        self._next_vip_check = now + self.cfg.timing.monitor_interval
        if self.resources.vip_present():
            log.warning("%s found up on a node that does not lead: removing it", self.resources.vip.name)
            self._stop_now("VIP found while not leading")

    def _set_role(self, role: str, reason: str) -> None:
        if (role, reason) == (self.role, self.reason):
            return
        if role != self.role:
            self.transitions.append({"time": time.time(), "from": self.role, "to": role, "reason": reason})
            del self.transitions[:-20]
            log.warning("%s -> %s: %s", self.role, role, reason)
            if self.on_role_change is not None:
                self.on_role_change(role, reason)
        self.role, self.reason = role, reason

    # ------------------------------------------------------------ administration

    def _control_request(self, request: dict) -> dict:
        reply: queue.Queue = queue.Queue()
        self.events.put(("cmd", (request, reply)))
        try:
            return reply.get(timeout=30)
        except queue.Empty:
            return {"ok": False, "error": "the node did not answer in time"}

    def _command(self, request: dict) -> dict:
        command = request.get("command")
        lock = self.cfg.standby_lock_path(self.name)
        if command == "status":
            return self.status()
        if command == "standby":
            lockfile.acquire(lock, reason=request.get("reason") or "hawrap standby")
            leading = self.leadership.leading is not None
            return {
                "ok": True,
                "role": self.role,
                "reason": "standby lock written: this node "
                + ("hands over to the most up-to-date eligible member after a final sync, then "
                   if leading and self.leaving() else "")
                + "leaves the elections",
            }  # fmt: skip
        if command == "resume":
            if request.get("new_disk"):
                try:  # its position goes with the old disk's records: elected only once caught up
                    self.mirror.disks.adopt()
                except HawrapError as exc:
                    return {"ok": False, "error": f"resume --new-disk refused: {exc}"}
            lockfile.release(lock)
            if self._held and request.get("discard_local_changes"):
                self._let_go = (self.leader, self._leader_start)
                self._held = None
                self._receive()
                self._set_role(REPLICA, f"{self.leader} leads: its copy replaces what this node held")
            elif self._held:
                return {"ok": False, "error": f"standby lock removed; {self._held}"}
            return {"ok": True, "role": self.role, "reason": "standby lock removed"}
        return {"ok": False, "error": f"{command!r} is not available with the etcd backend"}

    def status(self) -> dict:
        return {
            "ok": True,
            "backend": "etcd",
            "cluster": self.cfg.name,
            "node": self.name,
            "role": self.role,
            "reason": self.reason,
            "held": self._held,
            "epoch": self.epoch,
            "leader": self.leader if self._term is None else self.name,
            "position": {"epoch": self.position().epoch, "seq": self.position().seq},
            "eligible": (why_not := self.eligibility()) is None,
            "ineligible_because": why_not,
            "leadership": self.leadership.status(),
            "lan": {"ok": self.lan.ok, "problem": self.lan.problem},
            "standby_lock": (lambda i: i.as_dict() if i else None)(
                lockfile.status(self.cfg.standby_lock_path(self.name))
            ),
            "mirror": {
                "direction": self.mirror.direction,
                "destinations": self.mirror.destinations,
                "epochs": self.mirror.epochs(),
                "replica": (lambda r: {"in_sync": r.in_sync, "detail": r.detail})(self.mirror.replica())
                if self.mirror.direction == "send"
                else None,
            },
            "vip": {"address": self.cfg.vip.address, "present": self.resources.vip_present()}
            if self.cfg.vip
            else None,
            "transitions": list(self.transitions),
            "pid": os.getpid(),
        }

    # ------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Stop serving, then leave etcd (the lease revoked: our keys go at once)."""
        if self.feeder:
            self.feeder.stop()
            self.feeder = None
        if self.control:
            self.control.close()
            self.control = None
        self._stop.set()
        if self._vip_keeper is not None:
            self._vip_keeper.join()
        self._stop_now("shutting down")
        self.leadership.stop(revoke=True)
        self.resources.close()
        self.mirror.close()
        self.lan_monitor.stop()
        self.notifier.close()
        log.info("node %s stopped", self.name)
