"""One cluster node: feeds the state machine with facts and carries out its actions.

Inputs arrive on one queue (heartbeat reports from the heartbeat process, LAN health from the
link monitor, administrator commands from the control socket, a periodic tick) and are
handled one at a time by ``Node.run``: there is a single writer of the node's state.  After
every decision the advertised state goes to the heartbeat process, so the peer learns of a
change within one heartbeat interval.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

from mirror import epoch as mirror_epoch
from mirror import lockfile
from mirror.atomicfile import write_record
from mirror.errors import MirrorError, os_error_message

from . import fsm, watchdog
from .config import ClusterConfig
from .control import ControlServer
from .errors import HawrapError, ResourceError
from .heartbeat import HeartbeatChild, config_message
from .links import LanHealth, LanMonitor
from .mirrorctl import MirrorControl, Replica, exit_alert, stop_orphans
from .notify import Notifier
from .resources import ResourceGroup, Service, VirtualIP
from .unsynced import STATE_FILE, settle

log = logging.getLogger(__name__)

TICK = 0.05  # timeouts (initdead, handover, retry) are checked at least this often
HEARTBEAT_RESTARTS = 5  # heartbeat process deaths tolerated (per run) before giving up
# A resource that fails more often than this within RESTART_WINDOW seconds is a crash loop:
# the node hands over to a peer able to serve instead of restarting it again.
RESTART_LIMIT = 3
RESTART_WINDOW = 60.0
ITERATION_BOUND = 30.0  # one round of the loop (state file fsyncs under disk load) may take this long
FINAL_SYNC_TIMEOUT = 3600.0
REPLICA_CHECK_INTERVAL = 0.1  # how often the daemon's status is read while primary


def build_resources(cfg: ClusterConfig, name: str) -> ResourceGroup:
    node = cfg.node(name)
    vip = VirtualIP(cfg.vip, cfg.vip_interface(name), node.state_dir) if cfg.vip else None
    env = dict(os.environ, HAWRAP_NODE=name, HAWRAP_STATE_DIR=node.state_dir)
    return ResourceGroup(vip, [Service(s, env) for s in cfg.services])


def cleanup(cfg: ClusterConfig, name: str) -> list[str]:
    """Stop the services, drop the VIP and stop the mirror processes this node may have left
    behind (supervisor, systemd ExecStartPre/ExecStopPost).  Locks and epochs are left alone."""
    state_dir = cfg.node(name).state_dir
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    for stopped in stop_orphans(state_dir):
        log.warning("cleanup: stopped the orphaned mirror process %s", stopped)
    return build_resources(cfg, name).stop()


class Node:
    def __init__(self, cfg: ClusterConfig, name: str):
        self.cfg = cfg
        self.name = name
        self.me = cfg.node(name)
        self.peer_name = cfg.peer_of(name).name
        os.makedirs(self.me.state_dir, mode=0o700, exist_ok=True)
        self.policy = fsm.Policy(
            initdead=cfg.timing.initdead,
            handover_timeout=cfg.timing.handover_timeout,
            failback=cfg.failback,
            failback_delay=cfg.failback_delay,
            retry_interval=cfg.timing.monitor_interval,
            lan_hold=cfg.timing.lan_hold,
            data_guard=bool(cfg.mirror.trees),
        )
        persisted = self._load_state()
        self.persisted = persisted
        self.mirror = MirrorControl(cfg, name, on_exit=lambda *exit: self.events.put(("mirror", exit)))
        self.state = fsm.State(
            node=name,
            is_home=cfg.home == name,
            started=time.monotonic(),
            epoch=mirror_epoch.read_epoch(self.me.state_dir),
            owns_epoch=persisted.get("owns_epoch", False),
            # the lock files are the truth: a lock taken before a restart is released by the
            # same rules as one taken in this run (when the peer rejoins as a secondary)
            mirror_locked=any(self.mirror.locked().values()),
            epoch_parity=1 if cfg.nodes[0].name == name else 0,
            uptodate=persisted.get("uptodate", False),
            peer_outdated=persisted.get("peer_outdated", False),
        )
        self.events: queue.Queue = queue.Queue()
        self.resources = build_resources(cfg, name)
        self.notifier = Notifier(cfg.notify, cfg.name, name, self.peer_name)
        self.lan = LanHealth(None)
        self.peer_msg: dict | None = None
        self.peer_alive = False
        self.links: dict[str, bool] = {link.name: False for link in cfg.links}
        self._links_reported_down: set[str] = set()
        self.heartbeat: HeartbeatChild | None = None
        self.heartbeat_restarts = 0
        self.vip_seen = False  # VIP found up by the monitor while not primary
        self.resource_failure = ""  # a resource that could not be kept running here (fsm fact)
        self._restarts: list[float] = []
        # Per service: what its last monitor found while primary, and how often it failed.
        self.service_health = {s.name: {"running": None, "failures": 0} for s in cfg.services}
        self.replica = Replica(not self.mirror.trees, "not mirroring toward the peer")
        self.unfit = ""  # fsm.Facts.unfit, as last seen
        self.state_unsaved = ""  # why node-state.json could not be written, while it cannot
        self.copy_incomplete = False  # fsm.Facts.copy_incomplete, as last seen
        self.replica_in_sync = False  # the last value given to the state machine (and advertised)
        self.final_synced = False  # a planned switchover's final sync is done
        # When the last hand-over's final sync began (wall clock), until this node sends or
        # receives again: the peer has everything changed here before (``hawrap resume``).
        synced_whole = persisted.get("synced_whole")
        self.synced_whole = float(synced_whole) if isinstance(synced_whole, int | float) else None
        self._replica_bad_since: float | None = None
        self._replication_alerted = False
        self._mirror_exits: collections.Counter = (
            collections.Counter()
        )  # unexpected exits in a row, per process
        self._mirror_alerted: set[str] = set()
        self._next_replica_check = 0.0
        self._receiver_watch = self.mirror.receiver_watch()  # while receiving: is the receiver hung?
        self.transitions: collections.deque = collections.deque(maxlen=20)
        self.progress = watchdog.Progress()
        self.feeder: watchdog.Feeder | None = None
        self._last_iteration = time.monotonic()
        self._pending_reply: dict | None = None
        self._stop = threading.Event()
        self._stop_requested = False  # by a signal (``request_stop``)
        self._advertised: dict | None = None
        self._next_monitor = 0.0
        # Called with (role, reason) on every change of role, from the node's loop (systemd's
        # readiness and status: see hawrap.cli).
        self.on_role_change: Callable[[str, str], None] | None = None
        self.lan_monitor = LanMonitor(
            self.me.lan_interface,
            cfg.ping_nodes,
            lambda h: self.events.put(("lan", h)),
            carrier_interval=cfg.timing.carrier_interval,
            ping_interval=cfg.timing.ping_interval,
            ping_timeout=cfg.timing.ping_timeout,
            failures=cfg.timing.ping_failures,
        )
        self.control: ControlServer | None = None

    # ------------------------------------------------------------ persistence

    def _state_path(self) -> str:
        return os.path.join(self.me.state_dir, STATE_FILE)

    def _load_state(self) -> dict:
        try:
            with open(self._state_path()) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("%s is garbled; starting without the remembered role", self._state_path())
            return {}

    def _save_state(self) -> None:
        """node-state.json, written (fsynced) before the heartbeat says anything it implies.
        A file system that cannot take it (read-only, failing) does not stop the node: its
        services run on as its state says, the write is tried again at every step, and the
        administrator is told that a restart meanwhile would start from the state last
        written."""
        s, old, now = self.state, self.persisted, time.time()

        def since(key: str, flag: bool, flag_before: bool) -> float | None:
            """When ``flag`` last became true (kept while it stays true), None while false."""
            if not flag:
                return None
            return old.get(key) or now if flag_before else now

        data = {
            "role": s.role, "epoch": s.epoch, "owns_epoch": s.owns_epoch, "time": now,
            "uptodate": s.uptodate, "peer_outdated": s.peer_outdated,
            # since when our copy has not been known complete; since when the peer's has lacked ours
            "outdated_since": since("outdated_since", not s.uptodate, bool(old) and not old.get("uptodate", False)),
            "peer_outdated_since": since("peer_outdated_since", s.peer_outdated, old.get("peer_outdated", False)),
            "synced_whole": self.synced_whole,
        }  # fmt: skip
        try:
            # a full file system too: rewritten in place, the format allows trailing blanks
            write_record(self._state_path(), json.dumps(data).encode() + b"\n", 0o600, filler=b" ")
        except OSError as exc:
            problem = os_error_message(exc, self._state_path())
            if problem != self.state_unsaved:
                self._notify("error", f"cannot record this node's state, {problem}: going on as it "
                                      "says, trying again at every step; a restart meanwhile would "
                                      "start from the state last recorded")  # fmt: skip
            self.state_unsaved = problem
            return
        if self.state_unsaved:
            log.warning("this node's state is recorded again in %s", self._state_path())
            self.state_unsaved = ""
        self.persisted = data

    def _persisted_changed(self) -> bool:
        s, old = self.state, self.persisted
        return (s.role, s.epoch, s.owns_epoch, s.uptodate, s.peer_outdated, self.synced_whole) != (
            old.get("role"), old.get("epoch"), old.get("owns_epoch"), old.get("uptodate", False), old.get("peer_outdated", False),
            old.get("synced_whole"),
        )  # fmt: skip

    # ------------------------------------------------------------ facts

    def standby_lock_path(self) -> str:
        return self.cfg.standby_lock_path(self.name)

    def facts(self, command: str | None = None) -> fsm.Facts:
        peer = None
        if self.peer_alive and self.peer_msg and self.peer_msg.get("peer"):
            p = self.peer_msg["peer"]
            peer = fsm.PeerView(
                name=self.peer_name, role=p["role"], epoch=p["epoch"], owns_epoch=p["owns_epoch"],
                standby=p["standby"], lan_ok=p["lan_ok"], serving=p["serving"], request=p["request"],
                home=self.cfg.home == self.peer_name, uptodate=p["uptodate"], in_sync=p["in_sync"],
                copy_incomplete=p.get("incomplete", False), ahead=p.get("ahead", False),
            )  # fmt: skip
        now = time.monotonic()
        self.unfit = self.mirror.disks.unfit()  # also advertised: the peer then counts on us for nothing
        self.copy_incomplete = bool(self.mirror.disks.incomplete())  # advertised: we rank below a whole copy
        if not self.mirror.trees:
            in_sync = True
        elif self.state.role == fsm.RELEASING:
            in_sync = self.final_synced
        else:
            in_sync = self.mirror.direction == "send" and self.replica.in_sync
        return fsm.Facts(
            now=now,
            # When the peer is declared silent it was last heard a dead time ago, and the first
            # heartbeat missed was due one interval later: a cut that silenced it came before
            # that, so only a probe sent after it proves our LAN survived the cut.
            lan_confirmed=self.lan_monitor.answered_since(
                now - self.cfg.timing.deadtime + self.cfg.timing.interval
            ),
            lan_ok=self.lan.ok,
            lan_problem=self.lan.problem,
            peer=peer,
            standby_lock=lockfile.is_locked(self.standby_lock_path()),
            unfit=self.unfit,
            copy_incomplete=self.copy_incomplete,
            command=command,
            resource_failure=self.resource_failure,
            replica_in_sync=in_sync,
        )

    # ------------------------------------------------------------ the loop

    def start(self) -> None:
        self.resources.prepare()
        self._start_heartbeat()
        self.lan_monitor.start()
        self.control = ControlServer(self.cfg.control_socket(self.name), self._control_request)
        fd = os.environ.get(watchdog.ENV)
        if fd is not None:
            os.set_blocking(int(fd), False)
        self.feeder = watchdog.Feeder(
            None if fd is None else int(fd), self.cfg.timing.watchdog / 4, self.progress, self.cfg.timing.watchdog,
            lambda: self.heartbeat and self.heartbeat.keepalive(),
        )  # fmt: skip
        log.info("node %s started (epoch %d, home %s)", self.name, self.state.epoch, self.cfg.home)

    def _start_heartbeat(self) -> None:
        child = HeartbeatChild(
            config_message(self.cfg, self.name), lambda m: self.events.put(("hb", (child, m)))
        )
        self.heartbeat = child
        self._advertised = None
        self._advertise()

    def _check_heartbeat(self) -> None:
        """A heartbeat process that reports nothing for timing.watchdog seconds (it reports
        every half dead time) is frozen: it is replaced.  A gap in our own loop is not its
        fault: then the clock starts again."""
        now = time.monotonic()
        limit = self.cfg.timing.watchdog
        stalled, self._last_iteration = now - self._last_iteration > limit / 2, now
        hb = self.heartbeat
        if hb is None or self._stop.is_set():
            return
        if stalled:
            hb.last_message = max(hb.last_message, now)
            return
        if now - hb.last_message < limit:
            return
        self._notify(
            "heartbeat",
            f"the heartbeat process (pid {hb.proc.pid}) reported nothing for {limit:g} s: replacing it",
        )
        hb.kill()
        hb.stop(1)
        self._start_heartbeat()

    def stop(self) -> None:
        self._stop.set()
        self.events.put(("stop", None))

    def request_stop(self) -> None:
        """``stop`` from a signal handler: a plain store the loop sees within TICK.  The handler
        runs in the main thread between two bytecodes, possibly while that thread holds the
        events queue's lock (inside ``get``): ``put`` there would wait for it forever."""
        self._stop_requested = True

    def run(self) -> None:
        """Until ``stop()``; then an orderly shutdown (resources stopped, VIP dropped)."""
        self.start()
        try:
            while not (self._stop_requested or self._stop.is_set()):
                try:
                    kind, payload = self.events.get(timeout=TICK)
                except queue.Empty:
                    kind, payload = "tick", None
                self.progress.beat()
                self._check_heartbeat()
                command = None
                if kind == "hb":
                    child, payload = payload
                    if child is not self.heartbeat or not self._heartbeat_message(payload):
                        continue  # a replaced child's last words, or nothing to decide
                elif kind == "lan":
                    if payload.ok is not self.lan.ok and payload.ok is not None:
                        (log.info if payload.ok else log.warning)(
                            "own LAN %s%s",
                            "healthy" if payload.ok else "unhealthy",
                            f": {payload.problem}" if payload.problem else "",
                        )
                    self.lan = payload
                elif kind == "cmd":
                    command = self._admin_command(payload)
                    if command is None:
                        continue
                elif kind == "mirror":
                    self._mirror_exit(*payload)
                elif kind == "stop":
                    break
                with self.progress.busy(ITERATION_BOUND):
                    self._step(command)
                    self._monitor()
                    self._watch_replication()
        finally:
            self._stop.set()  # (the heartbeat's exit is expected from here on)
            self.shutdown()

    def _heartbeat_message(self, msg: dict) -> bool:
        t = msg.get("t")
        if t == "note":
            log.info("heartbeat: %s", msg["msg"])
            return False
        if t == "exit":
            if self._stop.is_set():
                return False
            self.heartbeat_restarts += 1
            log.error("the heartbeat process died (%d/%d)", self.heartbeat_restarts, HEARTBEAT_RESTARTS)
            if self.heartbeat:
                self.heartbeat.stop(1)
            if self.heartbeat_restarts > HEARTBEAT_RESTARTS:
                self._notify("fatal", "the heartbeat process keeps dying: stopping this node")
                self._stop.set()
                return False
            self._start_heartbeat()
            return False
        if t != "peer":
            return False
        old_links, was_alive = self.links, self.peer_alive
        self.peer_msg = msg
        self.peer_alive = msg["alive"]
        self.links = msg["links"]
        if self.peer_alive != was_alive:
            (log.info if self.peer_alive else log.warning)(
                "peer %s %s", self.peer_name, "heard" if self.peer_alive else "silent on every link"
            )
        if self.peer_alive and was_alive:
            # One link lost while the peer is still heard on another: both carry on (a
            # point-to-point link cannot tell which NIC failed), the administrator is told.
            for link, up in self.links.items():
                if old_links.get(link) and not up:
                    heard_on = ", ".join(n for n, u in self.links.items() if u)
                    self._links_reported_down.add(link)
                    self._notify("link-down", f"heartbeat link {link} lost (peer still heard on {heard_on})")
        for link, up in self.links.items():
            if up and link in self._links_reported_down:
                self._links_reported_down.discard(link)
                self._notify("link-up", f"heartbeat link {link} restored")
        return True

    def _admin_command(self, payload) -> str | None:
        request, reply = payload
        command = request.get("command")
        if command == "status":
            reply.put(self.status())
            return None
        if command == "standby":
            info = lockfile.acquire(
                self.standby_lock_path(), reason=request.get("reason") or "hawrap standby"
            )
            self._pending_reply = {"reply": reply, "command": "standby"}
            log.warning("standby requested: %s", info.describe())
            return "standby"
        if command == "resume":
            if self.lan.ok is not True:
                reply.put(
                    {
                        "ok": False,
                        "error": f"resume refused: own LAN unhealthy ({self.lan.problem or 'no verdict yet'})",
                    }
                )
                return None
            if request.get("new_disk"):
                try:
                    self.mirror.disks.adopt()
                except HawrapError as exc:
                    reply.put({"ok": False, "error": f"resume --new-disk refused: {exc}"})
                    return None
            unfit = self.mirror.disks.unfit()
            if unfit:  # the node rejoins by itself once that is over
                reply.put({"ok": False, "error": f"resume refused: {unfit}"})
                return None
            removed = lockfile.release(self.standby_lock_path())
            self._pending_reply = {"reply": reply, "command": "resume", "removed": removed}
            return "resume"
        if command in fsm.COMMANDS:
            self._pending_reply = {"reply": reply, "command": command}
            return command
        reply.put({"ok": False, "error": f"unknown command {command!r}"})
        return None

    def _step(self, command: str | None) -> None:
        fsm_command = command if command in fsm.COMMANDS else None
        facts = self.facts(fsm_command)
        before = self.state
        new, actions = fsm.decide(before, facts, self.policy)
        self.state = new
        self.replica_in_sync = facts.replica_in_sync
        self._execute(actions, facts, before)
        if self.state.role != fsm.PRIMARY:
            self.resource_failure, self._restarts = "", []
        else:
            self.mirror.disks.served()
        if self._persisted_changed():
            self._save_state()
            if self.state.role != before.role:
                self.transitions.append(
                    {
                        "time": time.time(),
                        "from": before.role,
                        "to": self.state.role,
                        "reason": self.state.reason,
                    }
                )
                log.warning("%s -> %s: %s", before.role, self.state.role, self.state.reason)
                if self.on_role_change is not None:
                    self.on_role_change(self.state.role, self.state.reason)
        if command in ("standby", "resume") and self._pending_reply:
            pending, self._pending_reply = self._pending_reply, None
            if command == "standby":  # releasing: it hands over first, standby whatever comes of it
                ok = self.state.role in (fsm.STANDBY, fsm.RELEASING)
            else:
                ok = self.state.role != fsm.STANDBY
            pending["reply"].put({"ok": ok, "role": self.state.role, "reason": self.state.reason})
        elif fsm_command and self._pending_reply:  # its reply was in the actions a failure cut short
            pending, self._pending_reply = self._pending_reply, None
            pending["reply"].put({"ok": False, "message": self.state.reason, "role": self.state.role})
        self._advertise()

    def _execute(self, actions: list[fsm.Action], facts: fsm.Facts, before: fsm.State) -> None:
        """Carry out ``actions`` in order.  A takeover (its actions begin with the address
        check) is all or nothing: the check failing leaves ``before`` as it was; any later
        step failing is rolled back by the state machine's ``takeover_failed``."""
        takeover = bool(actions) and isinstance(actions[0], fsm.CheckAddressFree)
        for action in actions:
            started = time.monotonic()
            try:
                with self.progress.busy(self._bound(action)):
                    self._do(action)
            except (ResourceError, HawrapError, MirrorError, OSError) as exc:
                log.error("%s failed: %s", type(action).__name__, exc)
                if isinstance(action, fsm.CheckAddressFree):
                    self.state, more = fsm.takeover_refused(before, facts, self.policy, str(exc))
                    self._execute(more, facts, before)
                    return
                if isinstance(action, fsm.StartResources) or (
                    takeover and isinstance(action, (fsm.AcquireMirrorLock, fsm.RaiseEpoch))
                ):
                    self.state, more = fsm.takeover_failed(before, self.state, facts, self.policy, str(exc))
                    self._execute(more, facts, before)
                    return
                if isinstance(action, fsm.FinalSync):
                    self.state, more = fsm.release_failed(self.state, facts, self.policy, str(exc))
                    self._execute(more, facts, before)
                    return
                self._notify("error", f"{type(action).__name__} failed: {exc}")
            took = time.monotonic() - started
            if took > 0.005:
                log.info("%s took %.0f ms", type(action).__name__, took * 1000)

    def _bound(self, action: fsm.Action) -> float:
        """How long ``action`` may take, by its own timeouts (for the watchdog)."""
        services = sum(svc.timeout for svc in self.cfg.services) * 2
        if isinstance(action, fsm.FinalSync):
            return FINAL_SYNC_TIMEOUT + 60
        if isinstance(action, (fsm.StartResources, fsm.StopResources, fsm.StopServices)):
            return services + ITERATION_BOUND
        return ITERATION_BOUND

    def _do(self, action: fsm.Action) -> None:
        if isinstance(action, fsm.Notify):
            self._notify(action.event, action.message)
        elif isinstance(action, fsm.Reply):
            if self._pending_reply and self._pending_reply["command"] in fsm.COMMANDS:
                self._pending_reply["reply"].put(
                    {"ok": action.ok, "message": action.message, "role": self.state.role}
                )
                self._pending_reply = None
        elif isinstance(action, fsm.AcquireMirrorLock):
            self.mirror.acquire_locks(action.reason)
        elif isinstance(action, fsm.ReleaseMirrorLock):
            self.mirror.release_locks()
        elif isinstance(action, fsm.RaiseEpoch):
            mirror_epoch.observe_epoch(self.me.state_dir, action.to)
            self.mirror.raise_epochs(action.to)
        elif isinstance(action, fsm.ObserveEpoch):
            mirror_epoch.observe_epoch(self.me.state_dir, action.epoch)
            self.mirror.observe_epochs(action.epoch)
        elif isinstance(action, fsm.WriteStandbyLock):
            lockfile.acquire(self.standby_lock_path(), reason=action.reason)
        elif isinstance(action, fsm.CheckAddressFree):
            if self.resources.vip is not None:
                self.resources.vip.check_free()
        elif isinstance(action, fsm.StopReceiver):
            self.mirror.stop_receiver()
        elif isinstance(action, fsm.StartResources):
            self.resources.start(checked=True)
            self.vip_seen = False
        elif isinstance(action, fsm.StopServices):
            for error in self.resources.stop_services():
                self._notify("error", error)
        elif isinstance(action, fsm.StopResources):
            for error in self.resources.stop():
                self._notify("error", error)
            self.vip_seen = False
        elif isinstance(action, fsm.Reannounce):
            if self.resources.vip is not None and not self.resources.vip.announce():
                log.warning("%s is not here: not announcing it", self.resources.vip.name)
        elif isinstance(action, fsm.FinalSync):
            self.final_synced = False
            began = time.time()  # the services and the daemons are stopped
            self.mirror.final_sync(FINAL_SYNC_TIMEOUT)
            self.final_synced, self.synced_whole = True, began
            # every journaled change was made before the sync began: the peer has it now
            for problem in settle(self.mirror.trees):
                log.warning("cannot mark the journal as mirrored after the final sync, %s", problem)
        elif isinstance(action, fsm.SetMirrorDirection):
            if action.direction is not None:
                self.synced_whole = None
            if action.direction == "send":
                self.final_synced = False
            self.mirror.set_direction(action.direction)
            self.replica = self.mirror.replica() if action.direction == "send" else self.replica

    def _notify(self, event: str, message: str) -> None:
        self.notifier.notify(event, message, self.state.role, self.state.epoch)

    def _advertise(self) -> None:
        s = self.state
        state = {
            "role": s.role,
            "epoch": s.epoch,
            "owns_epoch": s.owns_epoch,
            "standby": lockfile.is_locked(self.standby_lock_path()) or bool(self.unfit),
            "lan_ok": self.lan.ok,
            "serving": s.serving or self.vip_seen,
            "request": s.request,
            "uptodate": s.uptodate,
            "in_sync": self.replica_in_sync and s.role in (fsm.PRIMARY, fsm.RELEASING),
            "incomplete": self.copy_incomplete,
            "ahead": s.peer_outdated,
        }
        if state != self._advertised and self.heartbeat is not None:
            self.heartbeat.update(state)
            self._advertised = state

    def _monitor(self) -> None:
        """Every monitor_interval: restart what failed while primary; anywhere else, a VIP
        found up (someone tried to serve here) is advertised (the peer pushes back) and removed."""
        now = time.monotonic()
        if now < self._next_monitor:
            return
        self._next_monitor = now + self.cfg.timing.monitor_interval
        with self.progress.busy(sum(svc.timeout for svc in self.cfg.services) * 2 + ITERATION_BOUND):
            self._monitor_resources(now)

    def _monitor_resources(self, now: float) -> None:
        if self.state.role == fsm.PRIMARY:
            if self.resource_failure:
                return  # the state machine hands over (or keeps serving what still runs)
            failed = self.resources.failed()
            seen_at = time.monotonic()
            for name, health in self.service_health.items():
                health["running"] = name not in failed
                health["failures"] += name in failed
            if not failed:
                if self.resources.vip is not None:
                    self.resources.vip.refresh(seen_at)
                return
            what = ", ".join(failed)
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
            if len(self._restarts) > RESTART_LIMIT:
                self.resource_failure = (
                    f"{what} failed {len(self._restarts)} times within {RESTART_WINDOW:g} s"
                )
                return
            self._notify(
                "resource", f"{what} not running: restarting {'it' if len(failed) == 1 else 'them'} here"
            )
            try:
                self.resources.restart(failed)
            except ResourceError as exc:
                self.resource_failure = f"restarting {what} failed: {exc}"
        elif self.state.role in (fsm.STANDBY, fsm.SECONDARY, fsm.INIT):
            if self.resources.vip_present():
                self.vip_seen = True
                self._advertise()
                self._notify(
                    "push-back",
                    f"{self.resources.vip.name} found up on a node in role {self.state.role}: removing it",
                )
                for error in self.resources.stop():
                    self._notify("error", error)
                self.vip_seen = False
                self._advertise()

    # ------------------------------------------------------------ replication

    def _mirror_exit(self, name: str, code: int | None, message: str) -> None:
        """A mirror process exited (its supervisor restarts it): say so, once, when restarting
        will not help: refused for its epoch or its secret, or exiting again and again."""
        self._mirror_exits[name] += 1
        if name in self._mirror_alerted:
            return
        what = exit_alert(code, message, self._mirror_exits[name])
        if what is None:
            return
        self._mirror_alerted.add(name)
        self._notify("replication", f"mirror {name}: {what}")

    def _watch_replication(self) -> None:
        """While sending: is the replica live?  Told once when it has not been for
        mirror.alert_after seconds while the peer could receive, and again when it recovers.
        While receiving from a primary whose replica is not live: is our receiver the cause
        (``ReceiverWatch``)?"""
        now = time.monotonic()
        if now < self._next_replica_check:
            return
        self._next_replica_check = now + REPLICA_CHECK_INTERVAL
        peer = self.peer_msg.get("peer") if self.peer_alive and self.peer_msg else None
        told = self.mirror.direction == "receive" and bool(peer) and peer["role"] == fsm.PRIMARY and not peer["in_sync"]
        silent = self._receiver_watch.check(told)
        if silent:
            self.mirror.restart_receiver()
            self._notify("error", f"the mirror receiver: {silent} (hung or stopped): killed, to be started again")
        if self.mirror.direction != "send":
            self._replica_bad_since = None
            return
        self.replica = self.mirror.replica()
        for restarted in self.mirror.restart_stuck():
            self._notify("error", restarted)
        for diverged in self.mirror.diverged():
            self._notify("replica-diverged", diverged)
        if self.replica.in_sync:
            if self._replication_alerted:
                self._notify("replication-restored", f"the replica on {self.peer_name} is live again")
            self._replica_bad_since, self._replication_alerted = None, False
            self._mirror_exits.clear()
            self._mirror_alerted.clear()
            return
        if self._replica_bad_since is None:
            self._replica_bad_since = now
        peer = self.facts().peer
        receiving = peer is not None and peer.role == fsm.SECONDARY and not peer.standby
        if (
            not self._replication_alerted
            and receiving
            and now - self._replica_bad_since >= self.cfg.mirror.alert_after
        ):
            self._replication_alerted = True
            self._notify(
                "replication",
                f"replication toward {self.peer_name} not live for {now - self._replica_bad_since:.0f} s: {self.replica.detail}",
            )

    def _control_request(self, request: dict) -> dict:
        reply: queue.Queue = queue.Queue()
        self.events.put(("cmd", (request, reply)))
        try:
            return reply.get(timeout=self.cfg.timing.handover_timeout + 30)
        except queue.Empty:
            return {"ok": False, "error": "the node did not answer in time"}

    # ------------------------------------------------------------ status

    def status(self) -> dict:
        s = self.state
        peer = self.peer_msg.get("peer") if self.peer_msg and self.peer_alive else None
        return {
            "ok": True,
            "cluster": self.cfg.name,
            "node": self.name,
            "role": s.role,
            "reason": s.reason,
            "epoch": s.epoch,
            "owns_epoch": s.owns_epoch,
            "home": self.cfg.home,
            "serving": s.serving,
            "request": s.request,
            "lan": {
                "ok": self.lan.ok,
                "problem": self.lan.problem,
                "carrier": self.lan.carrier,
                "ping_reachable": list(self.lan.reachable),
            },
            "peer": {"name": self.peer_name, "alive": self.peer_alive, **(peer or {})},
            "links": self.links,
            "link_stats": (self.peer_msg or {}).get("stats", {}),
            "standby_lock": (lambda i: i.as_dict() if i else None)(lockfile.status(self.standby_lock_path())),
            "unfit": self.unfit or None,
            "state_unsaved": self.state_unsaved or None,
            "mirror": {
                "direction": self.mirror.direction,
                "locked": self.mirror.locked(),
                "epochs": self.mirror.epochs(),
            },
            "data": {
                "guarded": self.policy.data_guard,
                "uptodate": s.uptodate,
                "outdated_since": self.persisted.get("outdated_since"),
                "peer_outdated": s.peer_outdated,
                "peer_outdated_since": self.persisted.get("peer_outdated_since"),
                "new_disks": self.mirror.disks.incomplete(),  # adopted, not yet mirrored onto
                "replica": {"in_sync": self.replica.in_sync, "detail": self.replica.detail}
                if self.mirror.direction == "send"
                else None,
            },
            "vip": {"address": self.cfg.vip.address, "present": self.resources.vip_present()}
            if self.cfg.vip
            else None,
            "services": [
                {
                    "name": name,
                    "state": _service_state(health["running"], s.serving),
                    "failures": health["failures"],
                }
                for name, health in self.service_health.items()
            ],
            "transitions": list(self.transitions),
            "pid": os.getpid(),
        }

    # ------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Orderly stop: stop serving (the peer takes over when our heartbeats stop)."""
        if self.feeder:
            self.feeder.stop()
            self.feeder = None
        if self.control:
            self.control.close()
            self.control = None
        if self.state.role in (fsm.PRIMARY, fsm.RELEASING):
            log.warning("shutting down while %s: stopping resources", self.state.role)
        for error in self.resources.stop():
            log.error("%s", error)
        self.resources.close()
        self.mirror.close()
        if self.heartbeat:
            self.heartbeat.stop()
            self.heartbeat = None
        self.lan_monitor.stop()
        self.notifier.close()
        log.info("node %s stopped", self.name)


def _service_state(running: bool | None, serving: bool) -> str:
    """A service as ``hawrap status`` shows it: by its last monitor while this node serves."""
    if not serving:
        return "stopped"
    return {True: "running", False: "failed", None: "started"}[running]
