"""Serve modules to `mirror sync` clients: mirror://HOST:PORT/MODULE.

Either --listen/--module/--secret-file on the command line, or --config FILE (TOML; see
examples/mirror-serve.toml).  Many clients at once; one writer per module at a time.
Every client proves it knows the shared secret (HMAC-SHA256 challenge-response, in both
directions; the secret itself never crosses the wire).  SIGHUP reads --config again: new,
changed and removed modules take effect for new sessions, sessions in flight finish on the
old settings.  Under systemd (Type=notify) it reports READY=1 once it listens.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from ..apply import ModuleConfig
from ..config import (
    DEFAULT_LISTEN,
    ServeConfig,
    load_serve_config,
    module_name_problem,
    parse_listen,
    read_serve_config,
)
from ..errors import MirrorError, UsageError
from ..sdnotify import SystemdNotifier
from ..secretfile import read_secret_file
from ..statedir import check_root
from ._common import add_privilege_arguments, privileges_from_args

log = logging.getLogger("mirror.serve")


def add_arguments(parser):
    parser.add_argument("--config", metavar="FILE", help="TOML configuration (instead of the options below)")
    parser.add_argument("--listen", help=f"ADDR:PORT to listen on (default {DEFAULT_LISTEN})")
    parser.add_argument("--module", action="append", default=[], metavar="NAME=PATH", help="a tree to serve")
    parser.add_argument("--secret-file", metavar="FILE", help="shared secret (first line of FILE)")
    parser.add_argument("--lock-file", metavar="PATH", help="refuse writes while this mirroring lock exists")
    parser.add_argument("--read-only", action="store_true", help="accept only dry runs")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="drop a client silent this long in the handshake or a session "
                             "(default 30 s / 600 s; a live daemon may idle between sessions)")
    parser.add_argument("--port-file", metavar="FILE", help="write the port listened on to FILE (for --listen :0)")
    add_privilege_arguments(parser, "the --module trees")
    parser.add_argument("--require-mount", action="store_true",
                        help="each --module PATH is a mount point: refuse every session while nothing is mounted there")  # fmt: skip
    parser.add_argument("--check", action="store_true",
                        help="check the configuration (or the options) and this host, list every problem, "
                             "and exit: 0 valid, 2 invalid")  # fmt: skip


# What may accompany --config: run-time settings, not what the file defines.
WITH_CONFIG = {"--timeout", "--port-file"}


def run(args) -> int:
    from ..server import MirrorServer
    from ._check import module_problems, refuse_conflicts

    if args.check:
        return _check(args)
    if args.config:
        refuse_conflicts(args, WITH_CONFIG)
        config = load_serve_config(args.config)
    else:
        config = _config_from_args(args)
    listen, modules, max_conn = config.listen, config.modules, config.max_connections
    timeout = args.timeout if args.timeout is not None else config.timeout
    for module in modules.values():
        check_root(module.path)  # a user's own .mirror at the root would be hidden: refused now
    for problem in module_problems(modules, args.config):
        raise UsageError(problem)
    notifier = SystemdNotifier.from_environment()
    try:
        server = MirrorServer(listen, modules, max_conn, timeout=timeout)
    except OSError as exc:  # "Address already in use" alone would not say which, nor where it was set
        where = f"{args.config}: 'listen'" if args.config else "--listen"
        raise UsageError(f"{where}: cannot listen on {listen[0]}:{listen[1]}: {exc.strerror}") from None
    if args.port_file:
        with open(args.port_file, "w") as f:
            f.write(f"{server.port}\n")
    log.info("serving %s on %s:%d", ", ".join(sorted(modules)), listen[0], server.port)
    signal.signal(signal.SIGTERM, lambda *_: _stop(server, notifier))
    reloader = _Reloader(server, args, notifier)
    signal.signal(signal.SIGHUP, lambda *_: reloader.request())
    # The socket listens already (bound in the constructor): a client connecting now is
    # accepted as soon as the loop below runs.
    notifier.ready(_describe(server))
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _config_from_args(args) -> ServeConfig:
    if not args.module:
        raise UsageError("no module to serve: give --module NAME=PATH (or --config FILE)")
    if not args.secret_file:
        raise UsageError("--secret-file is required: every client must prove it knows the secret")
    secret = read_secret_file(args.secret_file)
    modules = {}
    for spec in args.module:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--module: expected NAME=PATH, got {spec!r}")
        if problem := module_name_problem(name):
            raise UsageError(f"--module {spec}: {problem}")
        if not os.path.isdir(path):
            raise UsageError(f"--module {name}: {path} is not a directory")
        modules[name] = ModuleConfig(
            name=name, path=os.fsencode(os.path.abspath(path)), secret=secret,
            lock_file=os.fsencode(args.lock_file) if args.lock_file else None, read_only=args.read_only,
            privileges=privileges_from_args(args), require_mount=args.require_mount,
        )  # fmt: skip
    return ServeConfig(listen=parse_listen(args.listen or DEFAULT_LISTEN), modules=modules)


def _check(args) -> int:
    """``--check``: every problem of the configuration (or the options) and of this host."""
    from ._check import check, conflicts, serve_host_problems

    return check("serve", args, conflicts(args, WITH_CONFIG), read_serve_config, _config_from_args,
                 serve_host_problems)  # fmt: skip


def _describe(server) -> str:
    return f"serving {', '.join(sorted(server.modules))} on port {server.port}"


def _stop(server, notifier: SystemdNotifier) -> None:
    notifier.stopping()
    threading.Thread(target=server.shutdown, daemon=True).start()


class _Reloader:
    """SIGHUP: read --config again and serve its modules (see ``MirrorServer.reload``).  The
    work runs in a thread of its own, not in the signal handler, one reload at a time."""

    def __init__(self, server, args, notifier: SystemdNotifier):
        self.server = server
        self.args = args
        self.notifier = notifier
        self._lock = threading.Lock()

    def request(self) -> None:
        threading.Thread(target=self.reload, name="reload", daemon=True).start()

    def reload(self) -> None:
        with self._lock:
            self.notifier.reloading()
            try:
                self._reload()
            finally:
                self.notifier.ready(_describe(self.server))

    def _reload(self) -> None:
        path = self.args.config
        if not path:
            log.warning("SIGHUP: nothing to reload (modules come from the command line, not --config)")
            return
        try:
            config = load_serve_config(path)
            for module in config.modules.values():
                check_root(module.path)
            from ._check import module_problems

            for problem in module_problems(config.modules, path):
                raise UsageError(problem)
        except MirrorError as exc:
            log.error("reload failed, still serving the previous configuration: %s", exc)
            return
        server = self.server
        if config.listen[0] != server.server_address[0] or config.listen[1] not in (0, server.port):
            log.warning("%s: 'listen' changed to %s:%d; restart the service to listen there",
                        path, config.listen[0], config.listen[1])  # fmt: skip
        old, new = server.modules, config.modules
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(name for name in set(old) & set(new) if old[name] != new[name])
        timeout = self.args.timeout if self.args.timeout is not None else config.timeout
        server.reload(new, timeout)
        summary = {"added": added, "changed": changed, "removed": removed}
        log.warning("reloaded %s: serving %s (%s)", path, ", ".join(sorted(new)),
                    "; ".join(f"{what}: {', '.join(names) or 'none'}" for what, names in summary.items()))  # fmt: skip
