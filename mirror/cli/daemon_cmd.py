"""Mirror trees live: every change reaches the destination in milliseconds.

One pair from the command line (mirror daemon SRC DST, DST as in `mirror sync`), or
several from --config FILE (TOML; see examples/mirror-daemon.toml).  At start each pair
is synced whole (an unchanged replica costs one scan on each side); then the tree is
watched (inotify) and each batch of changes is journaled, fsynced, and pushed through one
persistent connection.  While a mirroring lock exists nothing is sent; changes are
journaled and caught up when it goes.  SIGTERM stops cleanly, SIGHUP reloads --config.
Under systemd (Type=notify) it reports READY=1 once every pair's first sync is done.

A receiver silent longer than --timeout (it says it is alive while it works), or one that
cannot be reached within --contimeout, is reported `unreachable`; the pair reconnects with
backoff.

A pair whose source is not the tree its replica mirrors (unmounted, or another filesystem
in its place), or whose changes would empty the replica or delete more than --max-delete
entries, halts: nothing more is sent, `mirror status` says why, and a full sync is tried
again later (a source mounted again resumes by itself).

Exit status: 0 stopped by SIGTERM/SIGINT, 2 error, 4 every pair was fenced (the replica
has a newer epoch: this node must not mirror).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from ..config import load_daemon_config, parse_listen
from ..errors import EXIT_STALE_EPOCH, UsageError
from ..sdnotify import SystemdNotifier
from ._common import add_exclude_arguments, excluder_from_args, path_arg
from .sync_cmd import add_timeout_arguments, count_arg, milliseconds_arg, seconds_arg

log = logging.getLogger("mirror.daemon")


def add_arguments(parser):
    import argparse

    parser.add_argument("src", nargs="?", help="the source tree (one pair without --config)")
    parser.add_argument("dst", nargs="?", help="destination: DIR, mirror://HOST:PORT/MODULE or HOST:PATH")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration with one or more [[pair]]")
    parser.add_argument("--secret-file", metavar="F", help="shared secret for mirror://")
    parser.add_argument("--lock-file", metavar="PATH", help="mirroring lock: send nothing while PATH exists")
    parser.add_argument("--state-dir", metavar="DIR", help="SRC's state dir (epoch, journal; default SRC/.mirror)")
    parser.add_argument("--status-dir", metavar="DIR", help="where the status file is written (default: state dir)")
    parser.add_argument("--metrics", metavar="ADDR:PORT", help="serve Prometheus metrics here")
    parser.add_argument("--coalesce-ms", type=milliseconds_arg, default=0.5, metavar="MS",
                        help="gather changes this long (default 0.5)")
    parser.add_argument("--open-file-delay", type=seconds_arg, default=1.0, metavar="S",
                        help="mirror a file still open for writing after this many seconds (default 1)")
    parser.add_argument("--reconcile-interval", type=seconds_arg, default=0.0, metavar="S",
                        help="compare the whole tree every S seconds, besides the compares after a reconnect "
                             "or a lock: repairs what no event told (default 0: never)")  # fmt: skip
    parser.add_argument("--rsh", default="ssh -T", help="remote shell for HOST:PATH (default 'ssh -T')")
    parser.add_argument("--remote-command", default="mirror", help="the mirror command on the remote host")
    parser.add_argument("--dst-require-mount", action=argparse.BooleanOptionalAction,
                        help="local DST only: DST must be a mount point; with nothing mounted there the pair halts "
                             "(changes journaled) and tries again until its disk is mounted again. Without it, the "
                             "same holds for the mount point DST was last found under (a remote DST's as its "
                             "receiver tells it); --no-dst-require-mount: write into DST as it is, and forget that")  # fmt: skip
    parser.add_argument("--no-delete", action="store_true", help="do not delete on the replica what SRC deleted")
    add_timeout_arguments(parser)
    parser.add_argument("--max-delete", type=count_arg, metavar="N",
                        help="a session that would delete more than N entries deletes none: the pair halts")
    parser.add_argument("--allow-mass-delete", action="store_true",
                        help="let the pair empty the replica or mirror a source that is not the tree the replica "
                             "mirrors (an unmounted or replaced source); dangerous on a daemon")
    add_exclude_arguments(parser)
    parser.add_argument("--check", action="store_true",
                        help="check the configuration (or SRC, DST and the options) and this host, list every "
                             "problem, and exit: 0 valid, 2 invalid")  # fmt: skip


def _config_from_args(args):
    from ..daemon import DaemonConfig, PairConfig
    from ..statedir import resolve_state_dir

    if args.config:
        if args.src or args.dst:
            raise UsageError("give either --config FILE or SRC DST, not both")
        from ._check import refuse_conflicts

        refuse_conflicts(args, set())
        return load_daemon_config(args.config)
    if not (args.src and args.dst):
        raise UsageError("need SRC and DST (or --config FILE)")
    src = os.path.abspath(path_arg(args.src))
    if not os.path.isdir(src):
        raise UsageError(f"{args.src} is not a directory")
    excluder = excluder_from_args(args)
    state_dir = path_arg(args.state_dir) if args.state_dir else None
    pair = PairConfig(
        name=os.path.basename(src.rstrip(b"/")).decode("utf-8", "replace") or "root", source=src, destination=args.dst,
        secret_file=args.secret_file, lock_file=path_arg(args.lock_file) if args.lock_file else None,
        state_dir=state_dir, excludes=tuple(p.text for p in excluder.patterns) if excluder else (),
        delete=not args.no_delete, max_delete=args.max_delete, allow_mass_delete=args.allow_mass_delete,
        timeout=args.timeout, contimeout=args.contimeout, rsh=args.rsh, remote_command=args.remote_command,
        dst_require_mount=args.dst_require_mount,
    )  # fmt: skip
    return DaemonConfig(
        pairs=(pair,), status_dir=path_arg(args.status_dir) if args.status_dir else resolve_state_dir(src, state_dir),
        coalesce=args.coalesce_ms / 1000, open_file_delay=args.open_file_delay,
        metrics=parse_listen(args.metrics, "--metrics") if args.metrics else None,
        reconcile_interval=args.reconcile_interval or None,
    )  # fmt: skip


def check_pairs(config, file: str | None) -> None:
    """Every pair's secret file is usable (``mirror.secretfile``), and no local replica
    overlaps its source or another pair's (``mirror.overlap``): refused now, not at the
    first connection, which the daemon would try again and again."""
    from ..errors import ConfigError
    from ..overlap import pair_problems
    from ..secretfile import SecretFileError, read_secret_file

    def refuse(pair, key: str, problem: str):
        return ConfigError(f"{file}: 'pair[{pair.index}].{key}': {problem}") if file else UsageError(problem)

    for pair in config.pairs:
        if pair.secret_file:
            try:
                read_secret_file(pair.secret_file)
            except SecretFileError as exc:
                if file is None:
                    raise
                raise refuse(pair, "secret_file", str(exc)) from None
    for i, key, problem in pair_problems(config.pairs):
        raise refuse(config.pairs[i], key, problem)


def run(args) -> int:
    from ..daemon import Daemon

    if args.check:
        return _check(args)
    config = _config_from_args(args)
    check_pairs(config, args.config)
    notifier = SystemdNotifier.from_environment()
    try:
        daemon = Daemon(config)
    except OSError as exc:  # the metrics endpoint's address: say which, and where it was set
        where = f"{args.config}: 'daemon.metrics'" if args.config else "--metrics"
        host, port = config.metrics or ("", 0)
        raise UsageError(f"{where}: cannot listen on {host}:{port}: {exc.strerror}") from None
    stop = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    # The status file's writer tells a reader still holding its spare by a lease
    # (``atomicfile.write_swapped``): one broken while held signals SIGIO, not to end us.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    daemon.start()
    log.info("mirroring %s", ", ".join(f"{p.name}: {os.fsdecode(p.source)} -> {p.destination}" for p in config.pairs))
    readiness = _Readiness(notifier)
    try:
        while not stop.wait(0.2):
            if reload_requested.is_set():
                reload_requested.clear()
                if args.config:
                    notifier.reloading()
                    try:
                        new_config = load_daemon_config(args.config)
                        check_pairs(new_config, args.config)
                        daemon.reload(new_config)
                    except Exception as exc:  # a bad new config must not stop a running mirror
                        log.error("reload failed, keeping the running configuration: %s", exc)
                    readiness.reloaded()
            if daemon.all_fenced:
                return EXIT_STALE_EPOCH
            readiness.update(daemon)
    finally:
        notifier.stopping()
        daemon.stop()
    return 0


def _check(args) -> int:
    """``--check``: every problem of the configuration (or the arguments) and of this host."""
    from ..config import read_daemon_config
    from ._check import check, conflicts, daemon_host_problems

    problems = conflicts(args, set())
    if args.config and (args.src or args.dst):
        problems.append("SRC DST: cannot be combined with --config")
    return check("daemon", args, problems, read_daemon_config, _config_from_args, daemon_host_problems)


class _Readiness:
    """What systemd hears (Type=notify): READY=1 once every pair has finished its first sync
    and mirrors live (or is held by a mirroring lock, or fenced: doing what it must), and a
    STATUS line with each pair's state whenever one changes."""

    SETTLED = ("live", "locked", "fenced")

    def __init__(self, notifier: SystemdNotifier):
        self.notifier = notifier
        self.ready = False
        self.status = ""

    def reloaded(self) -> None:
        self.ready = False  # said again once the reloaded pairs have settled

    def update(self, daemon) -> None:
        if not self.notifier.enabled:
            return
        states = {name: pair.status.state for name, pair in daemon.pairs.items()}
        status = "; ".join(f"{name}: {state}" for name, state in sorted(states.items()))
        if not self.ready and states and all(state in self.SETTLED for state in states.values()):
            self.ready = True
            self.notifier.ready(status)
        elif status != self.status:
            self.notifier.status(status)
        self.status = status
