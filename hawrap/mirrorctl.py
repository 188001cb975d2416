"""How hawrap drives the mirror engine: its public library API for locks and epochs, its CLI
for moving data.  hawrap never copies a file itself.

* Locks: ``mirror.lockfile`` on each tree's lock file (the mirroring lock of docs/DESIGN.md
  invariant 4): held while this node must not mirror toward the peer nor accept its writes.
* Epochs: ``mirror.epoch`` in each tree's state dir, raised on every takeover (invariant 5).
* Data, through the commands configured in ``[mirror]`` (defaults below):
  - primary:   ``mirror daemon SRC mirror://PEER:PORT/TREE --secret-file F --lock-file L
    --state-dir D``, one per tree, kept running (restarted if it exits);
  - secondary: ``mirror serve --listen ADDR:PORT --module TREE=PATH ... --secret-file F
    --lock-file L``, one process for all trees;
  - planned switchover: ``mirror sync SRC mirror://PEER:PORT/TREE --delete --secret-file F``.

Placeholders in the configured argv: ``{mirror}`` (the mirror command, spliced),
``{src}``, ``{dst}``, ``{secret_file}``, ``{lock_file}``, ``{state_dir}``, ``{listen}``,
``{tree}``, ``{modules}`` (spliced as ``--module NAME=PATH`` pairs), ``{node}``,
``{reconcile_interval}`` (``mirror.reconcile_interval``, seconds).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from mirror import epoch as mirror_epoch
from mirror import lockfile
from mirror.atomicfile import atomic_write
from mirror.errors import EXIT_AUTH, EXIT_CONNECT_TIMEOUT, EXIT_GUARD, EXIT_STALE_EPOCH, EXIT_TIMEOUT
from mirror.statedir import resolve_state_dir

from .config import ClusterConfig, TreeConfig
from .errors import HawrapError
from .treedisk import TreeDisks

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0  # a mirror process that exits is restarted after this long
STOP_GRACE = 5.0  # after SIGTERM, a mirror process has this long to finish cleanly, then SIGKILL
STUCK_SECONDS = 10.0  # a daemon whose status has not changed this long is killed and started again
STATUS_STALE = 2.0  # the daemon rewrites its status at least twice a second: older than this, it is stuck
PROBE_TIMEOUT = 5.0  # a receiver that has not answered a hello this long is hung or stopped
# A hand-over's final sync gives up on a receiver silent this long (a live one says it is
# alive every third of it): the services are down while it waits, so a frozen target, or
# one whose node is paused, must not hold them for the engine's default two minutes.
FINAL_SYNC_SILENCE = 15.0


@dataclass(frozen=True)
class Tree:
    """A tree resolved for one node (``{node}`` replaced)."""

    name: str
    path: str
    lock_file: str
    state_dir: str
    require_mount: bool = False


def fan_out_pair(tree: str, node: str) -> str:
    """The name of the pair mirroring ``tree`` to ``node`` in a fan-out daemon (etcd mode),
    which is also that destination's cursor in the tree's journal."""
    return f"{tree}@{node}"


def resolve_trees(cfg: ClusterConfig, node: str) -> list[Tree]:
    out = []
    for t in cfg.mirror.trees:
        sub = _sub(t, node)
        out.append(
            Tree(sub.name, sub.path, sub.lock_file, os.fsdecode(resolve_state_dir(sub.path, sub.state_dir)),
                 sub.require_mount)
        )
    return out


def _sub(t: TreeConfig, node: str) -> TreeConfig:
    def r(v):
        return None if v is None else v.replace("{node}", node)

    return TreeConfig(name=t.name, path=r(t.path), lock_file=r(t.lock_file), state_dir=r(t.state_dir),
                      require_mount=t.require_mount)


def engine_available(command: tuple[str, ...] = ("mirror",)) -> bool:
    """True once the engine provides what hawrap drives: ``mirror sync``, ``serve`` and ``daemon``."""
    try:
        return all(
            subprocess.run([*command, verb, "--help"], capture_output=True, timeout=60).returncode == 0
            for verb in ("sync", "serve", "daemon")
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=1)
def parent_death_prefix() -> tuple[str, ...]:
    """``setpriv --pdeathsig KILL --`` (util-linux), spliced before every long-running mirror
    command: the kernel kills the process as soon as the thread that started it dies, so a
    node process killed with SIGKILL (or by the OOM killer) leaves no receiver or daemon
    mirroring on its own, even when no supervisor is left to clean up.  The signal is set in
    the child before it execs, which ``subprocess`` can only do from Python in a forked copy
    of this multi-threaded process (``preexec_fn``: unsafe).  Empty where setpriv is missing
    or too old: then the pid files and ``stop_orphans`` are the only cleanup."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    try:
        probe = subprocess.run(
            [setpriv, "--pdeathsig", "KILL", "--", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return (setpriv, "--pdeathsig", "KILL", "--") if probe.returncode == 0 else ()


def _signal_group(proc: subprocess.Popen, *signums: int) -> None:
    """Signal the process's group (the process and whatever it started), if not yet reaped."""
    for signum in signums:
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)


class _Supervised:
    """A long-running mirror process, restarted after RESTART_DELAY if it exits.
    ``on_exit(name, code, message)`` hears of every unexpected exit (code None: it could not
    be started), so that the node can tell the administrator."""

    def __init__(self, name: str, argv: list[str], on_exit=None, pid_dir: str | None = None):
        self.name = name
        self.argv = argv
        self.on_exit = on_exit
        # Its pid, for ``stop_orphans``: the process runs in a session of its own, so a node
        # process killed with SIGKILL would leave it running, mirroring on its own.
        self.pid_file = os.path.join(pid_dir, f"mirror-{name.replace(' ', '-')}.pid") if pid_dir else None
        self.proc: subprocess.Popen | None = None
        self.starts = 0  # how many processes were started: which one a status is from
        self.started = 0.0  # time.monotonic() of the current process's start
        self._stop = threading.Event()
        # Held while a process is started: ``stop`` then either sees it, or prevents it.
        self._spawn = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"mirror-{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                with self._spawn:
                    if self._stop.is_set():
                        return
                    self.starts += 1
                    self.started = time.monotonic()
                    # started from this thread, which lives as long as the process: the
                    # parent-death signal fires when the node process dies, not before
                    self.proc = subprocess.Popen(
                        [*parent_death_prefix(), *self.argv],
                        stdin=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        start_new_session=True,
                    )
            except OSError as exc:
                log.error("mirror %s: cannot start %s: %s", self.name, self.argv[0], exc.strerror)
                if self.on_exit:
                    self.on_exit(self.name, None, f"cannot start {self.argv[0]}: {exc.strerror}")
                self._stop.wait(RESTART_DELAY * 5)
                continue
            log.info("mirror %s started (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))
            if self.pid_file:
                try:
                    atomic_write(self.pid_file, f"{self.proc.pid}\n".encode(), 0o600, durable=False)
                except OSError as exc:
                    log.warning(
                        "mirror %s: cannot write %s (a crash would leave it running): %s",
                        self.name,
                        self.pid_file,
                        exc,
                    )
            last = _relay_stderr(self.proc, self.name)
            code = self.proc.wait()
            if self._stop.is_set():
                return
            log.warning("mirror %s exited with %d; restarting in %g s", self.name, code, RESTART_DELAY)
            if self.on_exit:
                self.on_exit(self.name, code, last)
            self._stop.wait(RESTART_DELAY)

    def _halt(self) -> subprocess.Popen | None:
        """No (re)start from now on; the current process, if any."""
        with self._spawn:
            self._stop.set()
            return self.proc

    def restart(self) -> None:
        """SIGKILL the current process: it is started again, as after any exit."""
        with self._spawn:
            proc = None if self._stop.is_set() else self.proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL now, not restarted, without waiting (``stop`` reaps it)."""
        proc = self._halt()
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM (the engine finishes or abandons the current file cleanly), not restarted,
        without waiting.  SIGCONT after it: a stopped process (SIGSTOP, a debugger) would
        otherwise hold the signal pending until the grace ran out."""
        proc = self._halt()
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGTERM, signal.SIGCONT)

    def reap(self, deadline: float, after_kill: float = STOP_GRACE) -> None:
        """Wait for the process until ``deadline`` (time.monotonic()), then SIGKILL it and
        wait ``after_kill`` seconds more."""
        proc = self.proc
        if proc is not None:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("mirror %s (pid %d) has not exited: SIGKILL", self.name, proc.pid)
                _signal_group(proc, signal.SIGKILL)
                try:
                    proc.wait(after_kill)
                except subprocess.TimeoutExpired:  # in an uninterruptible sleep (a hung disk)
                    log.error(
                        "mirror %s (pid %d) survives SIGKILL (uninterruptible sleep?)", self.name, proc.pid
                    )
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if self.pid_file and (proc is None or proc.returncode is not None):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pid_file)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns once it is gone."""
        self.terminate()
        self.reap(time.monotonic() + grace)


def stop_orphans(pid_dir: str, timeout: float = 10.0) -> list[str]:
    """Stop the mirror processes a dead node process left running (by their pid files):
    SIGTERM to each one's process group (it abandons the file in flight cleanly), SIGKILL
    after ``timeout``.  Returns what was stopped, for the log."""
    stopped = []
    for pid_file in glob.glob(os.path.join(glob.escape(pid_dir), "mirror-*.pid")):
        try:
            with open(pid_file) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                alive = b"mirror" in f.read()
        except (OSError, ValueError):
            alive = False
        if alive:
            for signum in (signal.SIGTERM, signal.SIGCONT):  # SIGCONT: a stopped one acts on it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signum)
            deadline = time.monotonic() + timeout
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(f"{os.path.basename(pid_file)[:-4]} (pid {pid})")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file)
    return stopped


def _relay_stderr(proc: subprocess.Popen, name: str) -> str:
    """Pass the process's stderr on to ours line by line until it closes; return the last
    line (the engine's reason for exiting, for the administrator)."""
    last = ""
    for raw in proc.stderr:
        line = raw.decode(errors="replace").rstrip()
        if line:
            last = line
            os.write(2, raw)
    proc.stderr.close()
    return last[-300:]


EXITS_BEFORE_ALERT = 3  # a mirror process that keeps exiting (its cause unknown) is reported


def exit_alert(code: int | None, message: str, in_a_row: int) -> str | None:
    """What to tell the administrator about a mirror process's exit, or None (yet): at once
    when restarting cannot help (fenced, wrong secret, a guard refusing to destroy the
    replica); after EXITS_BEFORE_ALERT exits in a row otherwise (a silent peer, say)."""
    if code == EXIT_STALE_EPOCH:
        return f"the peer refused our changes: its copy has a newer epoch than ours ({message})"
    if code == EXIT_AUTH:
        return f"authentication failed: mirror.secret_file differs between the nodes ({message})"
    if code == EXIT_GUARD:
        return (f"refused to destroy the replica (the source is not the tree the replica mirrors, or "
                f"more deletions than allowed): nothing is mirrored until it is checked ({message})")  # fmt: skip
    if in_a_row >= EXITS_BEFORE_ALERT:
        if code in (EXIT_TIMEOUT, EXIT_CONNECT_TIMEOUT):
            what = "the peer stayed silent" if code == EXIT_TIMEOUT else "no connection to the peer"
            return f"exited {in_a_row} times in a row ({what}, exit {code}): {message}"
        last = "could not start" if code is None else f"exit {code}"
        return f"exited {in_a_row} times in a row (last: {last}): {message}"
    return None


def _write_generated(path: str, lines: list[str]) -> None:
    """A generated configuration file, written only when it would change: the same one as
    the last start is used as it is, even from a full file system."""
    data = ("\n".join(lines) + "\n").encode()
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            if f.read(len(data) + 1) == data:
                return
    atomic_write(path, data, 0o600)


def _toml(value: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's (quotes, backslashes, control characters)."""
    return json.dumps(value)


class StatusWatch:
    """Whether a daemon's status file is fresh, judged on the monotonic clock: the wall-clock
    time written in it may step (NTP, a clock set wrong at boot) and must not make a live
    replica pass for dead, nor a dead daemon for live, for as long as the step.  A status that
    carries the daemon's monotonic time is judged by it (the daemon runs on this machine, in
    this boot); an older daemon's, by whether it was seen to change lately."""

    def __init__(self):
        self.restarts = 0  # killed as stuck since its status last changed: the next wait doubles
        self.start = -1  # the daemon process (``_Supervised.starts``) the rest is about
        self.before: float | None = None  # the time its file said when first read: maybe a previous process's
        self.last: float | None = None
        self.changed = 0.0  # time.monotonic() when ``last`` was first read

    def fresh(self, start: int, updated: float, written: float | None = None, started: float = 0.0) -> bool:
        """``updated`` (and ``written``, its monotonic time), just read from the file of the
        daemon started ``start``-th (at ``started``, monotonic): fresh if written by that
        daemon within STATUS_STALE seconds."""
        now = time.monotonic()
        if start != self.start:
            self.start, self.before, self.last, self.changed = start, updated, updated, now
        elif updated != self.last:
            self.last, self.changed, self.restarts = updated, now, 0
        if written is not None:
            return started <= written and now - written <= STATUS_STALE
        return self.last != self.before and now - self.changed <= STATUS_STALE

    def stuck(self, start: int) -> float | None:
        """How long the status of the daemon started ``start``-th has not changed, once that
        is past STUCK_SECONDS (doubled at each restart that did not help); else None."""
        silent = time.monotonic() - self.changed
        return silent if start == self.start and silent > STUCK_SECONDS * 2**self.restarts else None


def receiver_silent(address: str, port: int, module: str, timeout: float = PROBE_TIMEOUT) -> str:
    """Why the receiver at ``address:port`` is hung or stopped: it took the connection (the
    kernel does that for a stopped process too) and sent nothing back to a hello within
    ``timeout`` seconds.  '' when it answered (a challenge or a refusal: either is a process
    at work), and when nothing listens (its supervisor restarts a process that exited).  The
    connection ends before any secret is used."""
    import socket

    from mirror import protocol as P

    hello = P.encode([P.HELLO, {**P.hello_versions(), "module": module, "nonce": os.urandom(P.NONCE_SIZE),
                                "software": P.SOFTWARE}])  # fmt: skip
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.sendall(hello)
            sock.recv(1)  # its first byte, or the end of the connection
    except TimeoutError:
        return f"it did not answer a hello within {timeout:g} s"
    except OSError:
        pass
    return ""


class ReceiverWatch:
    """While this node receives from a primary that says its replica is not in sync: is this
    node's receiver the cause?  A receiver that hangs (a deadlock) or is stopped (SIGSTOP, a
    frozen cgroup) never exits, and this node's copy would stay outdated, so unable to take
    over, until an administrator came.  After STUCK_SECONDS of that, the receiver is probed
    (``receiver_silent``, in a thread of its own: the node's loop never waits on it); one that
    does not answer is to be killed, and the wait doubles while restarts do not help (one
    that answers starts the count again).  The etcd backend's replicas, which hear no such
    word from their leader, probe every STUCK_SECONDS while they receive."""

    def __init__(self, probe):
        self._probe = probe  # () -> str: why the receiver is silent, '' if it answered
        self.since: float | None = None  # the primary has said "not in sync" since then
        self.restarts = 0
        self._running: tuple[threading.Thread, list[str]] | None = None  # a probe, and where it answers

    def check(self, outdated: bool) -> str:
        """``outdated``: the primary says now that its replica is not in sync.  Returns why the
        receiver must be killed, once per silent probe; '' otherwise."""
        now = time.monotonic()
        if not outdated:
            self.since, self.restarts, self._running = None, 0, None  # a probe under way is forgotten
            return ""
        if self.since is None:
            self.since = now
        if self._running is not None:
            thread, answer = self._running
            if thread.is_alive():
                return ""
            self._running = None
            self.restarts = self.restarts + 1 if answer[0] else 0
            self.since = now  # the next probe after another wait
            return answer[0]
        if now - self.since > STUCK_SECONDS * 2**self.restarts:
            answer = [""]
            thread = threading.Thread(target=lambda: answer.__setitem__(0, self._probe()), name="receiver-probe",
                                      daemon=True)  # fmt: skip
            self._running = (thread, answer)
            thread.start()
        return ""


@dataclass(frozen=True)
class Replica:
    """Is the peer's copy receiving our changes live?  ``detail`` says what is not."""

    in_sync: bool
    detail: str


class MirrorControl:
    """``destinations``: the nodes a primary mirrors to.  Two-node mode: None, the peer, through
    the configured ``mirror.daemon`` argv.  With several (the etcd backend): one daemon per tree
    with a pair per destination, from a generated ``mirror daemon --config`` file."""

    def __init__(self, cfg: ClusterConfig, node: str, on_exit=None, destinations: list[str] | None = None):
        self.cfg = cfg
        self.node = node
        self.on_exit = on_exit
        self.trees = resolve_trees(cfg, node)
        self.fan_out = destinations is not None
        self.destinations = list(destinations) if destinations is not None else [cfg.peer_of(node).name]
        self.peer = cfg.node(self.destinations[0]) if self.destinations else None
        self.me = cfg.node(node)
        link = cfg.mirror_link()
        self.addresses = {name: cfg.node(name).addresses[link] for name in self.destinations}
        self.peer_address = self.addresses[self.peer.name] if self.peer else None
        self.my_address = self.me.addresses[link]
        self.direction: str | None = None
        self._procs: list[_Supervised] = []
        self.disks = TreeDisks(self.trees, self.me.state_dir)  # unfit to serve while one is not the tree's
        self._status_seen = {t.name: StatusWatch() for t in self.trees}
        # Each pair's count of entries its scheduled compares repaired with no change seen in
        # the source (``mirror status``'s unseen_repaired), as last read with its daemon's pid;
        # and what rose since.
        self._unseen: dict[str, tuple[int, int]] = {}
        self._diverged: list[str] = []

    # ---------------------------------------------------------- locks and epochs

    def acquire_locks(self, reason: str) -> None:
        for t in self.trees:
            info = lockfile.acquire(t.lock_file, reason=reason)
            log.info("mirror lock %s: %s", "taken" if info.created else "already held", info.describe())

    def release_locks(self) -> None:
        for t in self.trees:
            if lockfile.release(t.lock_file):
                log.info("mirror lock released: %s", t.lock_file)

    def locked(self) -> dict[str, bool]:
        return {t.name: lockfile.is_locked(t.lock_file) for t in self.trees}

    def raise_epochs(self, at_least: int) -> None:
        """Every tree's epoch strictly rises and reaches at least the cluster epoch."""
        for t in self.trees:
            mirror_epoch.bump_epoch(t.state_dir)
            mirror_epoch.observe_epoch(t.state_dir, at_least)

    def observe_epochs(self, n: int) -> None:
        """Every tree's epoch reaches at least ``n``, except a tree with another disk mounted in
        its place (``TreeDisks``): that disk is not the tree's, and a blank one stays blank."""
        unfit = self.disks.unfit_trees()
        for t in self.trees:
            if t.name not in unfit:
                mirror_epoch.observe_epoch(t.state_dir, n)

    def epochs(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {}
        for t in self.trees:
            try:
                out[t.name] = mirror_epoch.read_epoch(t.state_dir)
            except Exception as exc:  # shown in status, never fatal there
                out[t.name] = f"error: {exc}"
        return out

    # ---------------------------------------------------------- data

    def _destination(self, tree: Tree, node: str) -> str:
        return f"mirror://{self.addresses[node]}:{self.cfg.mirror.port}/{tree.name}"

    def _fan_out_argv(self, tree: Tree) -> list[str]:
        """``mirror daemon --config F``, F written here: one pair per destination, all with
        the tree as source (each destination has its own position and state)."""
        lines = [
            "# written by hawrap: the fan-out of one tree, one pair per destination",
            "[daemon]",
            f"status_dir = {_toml(tree.state_dir)}",
            f"reconcile_interval = {self.cfg.mirror.reconcile_interval!r}",
        ]
        for node in self.destinations:
            lines += [
                "",
                "[[pair]]",
                f"name = {_toml(fan_out_pair(tree.name, node))}",
                f"source = {_toml(tree.path)}",
                f"destination = {_toml(self._destination(tree, node))}",
                f"state_dir = {_toml(tree.state_dir)}",
                f"lock_file = {_toml(tree.lock_file)}",
            ]
            if self.cfg.mirror.secret_file:
                lines.append(f"secret_file = {_toml(self.cfg.mirror.secret_file)}")
        path = os.path.join(self.me.state_dir, f"mirror-daemon-{tree.name}.toml")
        _write_generated(path, lines)
        return [*self.cfg.mirror.command, "daemon", "--config", path]

    def _serve_argv(self) -> list[str]:
        """The receiver.  A tree whose state dir is not the default one needs it named, or the
        receiver would keep the tree's epoch and identity apart from the daemon's (and refuse
        the next primary); one that must be a mount point says so (``require_mount``): then
        ``mirror serve --config F``, F written here with each module's state dir, and the
        privileges the default ``mirror.serve`` grants."""
        default = all(t.state_dir == os.fsdecode(resolve_state_dir(t.path, None)) for t in self.trees)
        if default and not any(t.require_mount for t in self.trees):
            return self._argv(self.cfg.mirror.serve)
        lines = [
            "# written by hawrap: the receiver of this node's trees",
            f"listen = {_toml(f'{self.my_address}:{self.cfg.mirror.port}')}",
        ]
        if self.cfg.mirror.secret_file:
            lines.append(f"secret_file = {_toml(self.cfg.mirror.secret_file)}")
        for t in self.trees:
            lines += [
                "",
                f"[modules.{_toml(t.name)}]",
                f"path = {_toml(t.path)}",
                f"state_dir = {_toml(t.state_dir)}",
                f"lock_file = {_toml(t.lock_file)}",
                "keep_owners = true",
                "allow_setid = true",
                "allow_specials = true",
                *(["require_mount = true"] if t.require_mount else []),
            ]
        path = os.path.join(self.me.state_dir, "mirror-serve.toml")
        _write_generated(path, lines)
        return [*self.cfg.mirror.command, "serve", "--config", path]

    def _argv(self, template: tuple[str, ...], tree: Tree | None = None, **extra: str) -> list[str]:
        values = {
            "secret_file": self.cfg.mirror.secret_file or "",
            "listen": f"{self.my_address}:{self.cfg.mirror.port}",
            "node": self.node,
            "reconcile_interval": f"{self.cfg.mirror.reconcile_interval:g}",
            **extra,
        }
        if tree is not None:
            target = extra.pop("to", None) or (self.peer.name if self.peer else "")
            values.update(
                src=tree.path,
                dst=self._destination(tree, target) if target else "",
                lock_file=tree.lock_file,
                state_dir=tree.state_dir,
                tree=tree.name,
            )
        elif self.trees:
            # the receiver: one lock file per node is what it checks; use the first tree's
            values.setdefault("lock_file", self.trees[0].lock_file)
        argv: list[str] = []
        for item in template:
            if item == "{mirror}":
                argv += list(self.cfg.mirror.command)
            elif item == "{modules}":
                for t in self.trees:
                    argv += ["--module", f"{t.name}={t.path}"]
            else:
                try:
                    argv.append(item.format(**values))
                except KeyError as exc:
                    raise HawrapError(
                        f"{self.cfg.path}: mirror command item {item!r}: unknown placeholder {exc}"
                    ) from exc
        return argv

    def set_direction(self, direction: str | None) -> None:
        """ "send": a daemon per tree toward the peer; "receive": the receiver; None: nothing."""
        if not self.trees or direction == self.direction:
            self.direction = direction if self.trees else None
            return
        self.stop_processes()
        if direction == "send" and self.fan_out and not self.destinations:
            pass  # a cluster of one: nobody to mirror to
        elif direction == "send":
            for t in self.trees:
                argv = self._fan_out_argv(t) if self.fan_out else self._argv(self.cfg.mirror.daemon, t)
                self._procs.append(_Supervised(f"daemon {t.name}", argv, self.on_exit, self.me.state_dir))
        elif direction == "receive":
            self._procs.append(_Supervised("serve", self._serve_argv(), self.on_exit, self.me.state_dir))
        self.direction = direction

    def replica(self) -> Replica:
        """While sending: every tree's daemon is live (connected, its initial sync done)
        and less than ``mirror.max_lag`` seconds behind, by the status file it rewrites
        twice a second (``mirror status``) in the tree's state dir."""
        if not self.trees:
            return Replica(True, "no mirrored trees")
        if self.direction != "send":
            return Replica(False, "not mirroring toward the peer")
        from mirror.daemon import load_status

        problems = []
        for tree, proc in zip(self.trees, self._procs, strict=True):
            try:
                status = load_status(tree.state_dir)
                pairs = status.pairs
                if len(pairs) < max(1, len(self.destinations) if self.fan_out else 1):
                    raise IndexError
            except (OSError, ValueError, IndexError):
                problems.append(f"{tree.name}: starting")
                continue
            if not self._status_seen[tree.name].fresh(proc.starts, status.updated, status.monotonic, proc.started):
                problems.append(f"{tree.name}: no fresh status from its daemon")
                continue
            for pair in pairs:
                where = pair.get("name", tree.name) if self.fan_out else tree.name
                copy = f"{tree.name} on {where.rpartition('@')[2]}" if self.fan_out else f"{tree.name} on the peer"
                self._note_unseen(where, copy, status.pid, pair)
                if pair.get("state") != "live":
                    error = pair.get("last_error")
                    problems.append(f"{where}: {pair.get('state')}" + (f" ({error})" if error else ""))
                elif (pair.get("lag_seconds") or 0) > self.cfg.mirror.max_lag:
                    problems.append(f"{where}: {pair['lag_seconds']:.1f} s behind")
                elif pair.get("unwatched_count"):
                    # Their changes arrive only by the daemon's rescans, up to a minute late,
                    # and count in no lag: the standby's copy is not bounded by max_lag.
                    dirs = pair.get("unwatched_dirs") or []
                    problems.append(f"{where}: {pair['unwatched_count']} source directories not watched, their "
                                    f"changes late by up to a minute" + (f" (e.g. {dirs[0][0]}: {dirs[0][1]})"
                                                                          if dirs else ""))  # fmt: skip
        return Replica(not problems, "; ".join(problems) or "live")

    def _note_unseen(self, where: str, copy: str, pid: int, pair: dict) -> None:
        count, (last_pid, before) = pair.get("unseen_repaired") or 0, self._unseen.get(where, (pid, 0))
        if last_pid != pid:
            before = 0  # another daemon (started again) counts from 0
        if count > before:
            n, shown = count - before, ", ".join(pair.get("last_unseen") or [])
            self._diverged.append(f"the copy of {copy} was found changed where the tree was not "
                                  f"({n} {'entry' if n == 1 else 'entries'}, e.g. {shown}): written to behind "
                                  "the mirror (a service running there?); made like this node's again")  # fmt: skip
        self._unseen[where] = (pid, count)

    def diverged(self) -> list[str]:
        """What the daemons' scheduled compares repaired on the peer's copy that no change here
        accounts for, since the last call (read by ``replica``), for the administrator."""
        told, self._diverged = self._diverged, []
        return told

    def restart_stuck(self) -> list[str]:
        """While sending: each daemon whose status stopped changing (hung, or stopped: a
        SIGSTOP, a frozen cgroup) is killed and so started again, which syncs the replica
        whole; what was done, for the administrator.  Call after ``replica``, which reads the
        statuses."""
        if self.direction != "send" or not self.trees:
            return []
        done = []
        for tree, proc in zip(self.trees, self._procs, strict=True):
            watch = self._status_seen[tree.name]
            silent = watch.stuck(proc.starts)
            if silent is not None:
                watch.restarts += 1
                proc.restart()
                done.append(f"the mirror daemon of {tree.name}: its status has not changed for {silent:.0f} s "
                            "(hung or stopped): killed, to be started again")  # fmt: skip
        return done

    def restart_fenced(self) -> list[str]:
        """While sending as the leader: each daemon with a pair a replica refused as older
        (``fenced``: that pair stops for good) is started again once its tree's epoch is
        above the one the pair was refused at.  Only the leader's in-place raise moves a
        serving node's trees (docs/ETCD.md): a replica that took the raised epoch first
        refused the pair, and the daemon started again sends at the new epoch.  What was
        done, for the log."""
        done = []
        for tree, proc, status in self._daemon_statuses():
            epoch = mirror_epoch.read_epoch(tree.state_dir)
            refused = [p.get("name") for p in status.pairs if p.get("state") == "fenced"
                       and isinstance(p.get("fenced_epoch"), int) and p["fenced_epoch"] < epoch]  # fmt: skip
            if refused:
                proc.restart()
                done.append(f"the mirror daemon of {tree.name}: {', '.join(map(str, refused))} refused at an epoch "
                            f"below the tree's {epoch} (raised in place): started again")  # fmt: skip
        return done

    def refused(self, name: str) -> bool | None:
        """Whether the mirror process ``name`` (a daemon) now running has a pair a replica
        refused as older, by its status; None while it has written none."""
        for _, proc, status in self._daemon_statuses():
            if proc.name == name:
                return any(p.get("state") == "fenced" for p in status.pairs)
        return None

    def _daemon_statuses(self):
        """While sending: ``(tree, process, status)`` for each daemon whose current process
        has written its status (one from the process before, or none yet, is left out)."""
        if self.direction != "send":
            return
        from mirror.daemon import load_status

        for tree, proc in zip(self.trees, self._procs, strict=True):
            try:
                status = load_status(tree.state_dir)
            except (OSError, ValueError):
                continue
            if proc.proc is not None and status.pid == proc.proc.pid:
                yield tree, proc, status

    def receiver_watch(self) -> ReceiverWatch:
        """A ``ReceiverWatch`` of this node's receiver, probed on the first tree's module."""
        name = self.trees[0].name if self.trees else ""
        return ReceiverWatch(lambda: receiver_silent(self.my_address, self.cfg.mirror.port, name))

    def restart_receiver(self) -> None:
        """While receiving: kill the receiver; its supervisor starts it again."""
        if self.direction == "receive":
            for p in self._procs:
                p.restart()

    def final_sync(self, timeout: float = 3600.0, to: str | None = None) -> None:
        """One-shot ``mirror sync --delete`` of every tree toward the peer (or node ``to``);
        raises on failure, a receiver silent for FINAL_SYNC_SILENCE included."""
        from mirror.daemon import journal_head

        for t in self.trees:
            argv = self._argv(self.cfg.mirror.sync, t, to=to or "") + ["--timeout", f"{FINAL_SYNC_SILENCE:g}"]
            head = journal_head(t.state_dir) if self.fan_out else 0
            if head:
                # its daemon is stopped: the sync covers the journal up to its head, and the
                # target then publishes the position this node hands over with
                argv += ["--journal-seq", str(head)]
            start = time.monotonic()
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise HawrapError(f"final sync of {t.name} failed: {exc}") from exc
            if proc.returncode != 0:
                err = proc.stderr.decode(errors="replace").strip()[-500:]
                raise HawrapError(f"final sync of {t.name} failed (exit {proc.returncode}): {err}")
            log.info("final sync of %s done in %.2f s", t.name, time.monotonic() - start)

    def kill_processes(self) -> None:
        """SIGKILL every mirror process's group now, without waiting (a node that must stop
        serving at once); ``stop_processes`` reaps them later."""
        for p in list(self._procs):
            p.kill()

    def kill_senders(self) -> None:
        """SIGKILL every mirror daemon's group now (a node that stops serving sends nothing);
        the receiver, a replica's, is left running: a stop that comes after the node began
        to receive again must not leave it a replica with no receiver."""
        for p in list(self._procs):
            if p.name.startswith("daemon "):
                p.kill()

    def stop_receiver(self, wait: float = 1.0) -> None:
        """Kill the receiver now (SIGKILL) and reap it, waiting ``wait`` seconds at most: a
        takeover's step before the services start (``fsm.StopReceiver``).  No grace is
        needed: the replica stays whole (atomic renames; the next writer removes the
        temporaries), and the mirroring lock, taken first, would discard its uncommitted
        files anyway.  One stuck in the kernel (a hung disk) is left for ``stop_processes``."""
        if self.direction != "receive":
            return
        self.kill_processes()
        deadline = time.monotonic() + wait
        for p in self._procs:
            p.reap(deadline, after_kill=0.0)
        self._procs = [p for p in self._procs if p.proc is not None and p.proc.poll() is None]
        self.direction = None

    def stop_processes(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM to every mirror process at once, SIGKILL to those still there after
        ``grace``: the stop takes at most about ``grace``, however many trees."""
        for p in self._procs:
            p.terminate()
        deadline = time.monotonic() + grace
        for p in self._procs:
            p.reap(deadline)
        self._procs = []

    def close(self) -> None:
        self.stop_processes()
        self.direction = None
