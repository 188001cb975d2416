"""Serve modules to `mirror sync` clients: mirror://HOST:PORT/MODULE.

Either --listen/--module/--secret-file on the command line, or --config FILE (TOML; see
examples/mirror-serve.toml).  Many clients at once; one writer per module at a time.
Every client proves it knows the shared secret (HMAC-SHA256 challenge-response, in both
directions; the secret itself never crosses the wire).
"""

from __future__ import annotations

import logging
import os
import signal

from ..config import load_serve_config, parse_listen
from ..errors import UsageError
from ..privileges import Privileges
from ..protocol import load_secret
from ..receiver import ModuleConfig
from ..statedir import check_root
from ._common import add_privilege_arguments, privileges_from_args

log = logging.getLogger("mirror.serve")


def add_arguments(parser):
    parser.add_argument("--config", metavar="FILE", help="TOML configuration (instead of the options below)")
    parser.add_argument("--listen", default="0.0.0.0:8730", help="ADDR:PORT to listen on (default 0.0.0.0:8730)")
    parser.add_argument("--module", action="append", default=[], metavar="NAME=PATH", help="a tree to serve")
    parser.add_argument("--secret-file", metavar="FILE", help="shared secret (first line of FILE)")
    parser.add_argument("--lock-file", metavar="PATH", help="refuse writes while this mirroring lock exists")
    parser.add_argument("--read-only", action="store_true", help="accept only dry runs")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="drop a client silent this long in the handshake or a session "
                             "(default 30 s / 600 s; a live daemon may idle between sessions)")
    parser.add_argument("--port-file", metavar="FILE", help="write the port listened on to FILE (for --listen :0)")
    add_privilege_arguments(parser, "the --module trees")


def run(args) -> int:
    from ..server import MirrorServer

    if args.config:
        if args.module or privileges_from_args(args) != Privileges():
            raise UsageError("give modules (and what they allow) either with --config or with --module, not both")
        config = load_serve_config(args.config)
        listen, modules, max_conn = config.listen, config.modules, config.max_connections
        timeout = args.timeout if args.timeout is not None else config.timeout
    else:
        if not args.module:
            raise UsageError("no module to serve: give --module NAME=PATH (or --config FILE)")
        if not args.secret_file:
            raise UsageError("--secret-file is required: every client must prove it knows the secret")
        secret = load_secret(args.secret_file)
        modules = {}
        for spec in args.module:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"--module: expected NAME=PATH, got {spec!r}")
            if not os.path.isdir(path):
                raise UsageError(f"--module {name}: {path} is not a directory")
            modules[name] = ModuleConfig(
                name=name, path=os.fsencode(os.path.abspath(path)), secret=secret,
                lock_file=os.fsencode(args.lock_file) if args.lock_file else None, read_only=args.read_only,
                privileges=privileges_from_args(args),
            )  # fmt: skip
        listen, max_conn = parse_listen(args.listen), 64
        timeout = args.timeout
    for module in modules.values():
        check_root(module.path)  # a user's own .mirror at the root would be hidden: refused now
    server = MirrorServer(listen, modules, max_conn, timeout=timeout)
    if args.port_file:
        with open(args.port_file, "w") as f:
            f.write(f"{server.port}\n")
    log.warning("serving %s on %s:%d", ", ".join(sorted(modules)), listen[0], server.port)
    signal.signal(signal.SIGTERM, lambda *_: _stop(server))
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _stop(server) -> None:
    import threading

    threading.Thread(target=server.shutdown, daemon=True).start()
