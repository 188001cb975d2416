"""The ``hawrap`` command: parse, call the library, print, map errors to exit codes.

  hawrap run      --config FILE --node NAME     run this node (under its supervisor)
  hawrap status   --config FILE --node NAME [--json]
  hawrap standby  --config FILE --node NAME [--reason TEXT]
  hawrap resume   --config FILE --node NAME [--discard-local-changes]
  hawrap force-primary --config FILE --node NAME [--accept-data-loss]
  hawrap failover --config FILE --node NAME     planned switchover (stop writes, final sync, switch)
  hawrap failback --config FILE --node NAME     move the service back to the home node
  hawrap cleanup  --config FILE --node NAME     drop the VIP and stop services left behind
  hawrap demo                                   two nodes on loopback, no root needed

``--node`` defaults to $HAWRAP_NODE, then to the node named like this host.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time

from mirror import lockfile
from mirror.errors import MirrorError

from . import config as config_mod
from . import control
from .errors import EXIT_ERROR, EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, HawrapError, NotRunning


def _common(p: argparse.ArgumentParser, needs_config: bool = True) -> None:
    if needs_config:
        p.add_argument(
            "--config",
            "-c",
            default=os.environ.get("HAWRAP_CONFIG", "/etc/hawrap/hawrap.toml"),
            help="configuration file",
        )
        p.add_argument(
            "--node",
            "-n",
            default=os.environ.get("HAWRAP_NODE"),
            help="this node's name in the configuration",
        )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hawrap",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run this node")
    _common(p)
    p.add_argument(
        "--no-supervise", action="store_true", help="run the node process directly (no cleanup parent)"
    )
    p = sub.add_parser("status", help="roles, links, epoch, locks, last transitions")
    _common(p)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("standby", help="put this node in standby (writes the standby lock)")
    _common(p)
    p.add_argument("--reason", default="", help="recorded in the standby lock")
    p = sub.add_parser("resume", help="remove the standby lock after your checks: rejoin as secondary")
    _common(p)
    p.add_argument(
        "--discard-local-changes", action="store_true",
        help="resume even though this node holds changes the peer lacks (they are listed; the resync replaces them)",
    )  # fmt: skip
    p = sub.add_parser(
        "force-primary", help="serve this node's copy although it may lack the peer's latest changes"
    )
    _common(p)
    p.add_argument(
        "--accept-data-loss", action="store_true", help="do it (without it: only say what may be lost)"
    )
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the node to serve")
    for name, text in (
        ("failover", "planned switchover to the other node"),
        ("failback", "move the service back to the home node"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the switch to complete")
        if name == "failover":
            p.add_argument("--to", metavar="NODE", help="the new leader (etcd backend: required)")
    p = sub.add_parser("cleanup", help="drop the VIP and stop services this node left behind")
    _common(p)
    p.add_argument("--force", action="store_true", help="even while hawrap runs for this node")
    p = sub.add_parser("demo", help="two nodes on loopback with a dummy VIP (no root)")
    _common(p, needs_config=False)
    p.add_argument("--workdir", help="keep the demo's files here (default: a temporary dir)")
    return parser


def setup_logging(verbose: int, node: str | None = None) -> None:
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    who = f"hawrap[{node}]" if node else "hawrap"
    handler.setFormatter(logging.Formatter(f"%(asctime)s {who}: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _node_name(cfg: config_mod.ClusterConfig, given: str | None) -> str:
    if given:
        cfg.node(given)
        return given
    host = socket.gethostname().split(".")[0]
    for n in cfg.nodes:
        if n.name == host:
            return host
    raise HawrapError(f"--node is required: this host ({host}) is not one of {[n.name for n in cfg.nodes]}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            setup_logging(args.verbose)
            from .demo import run_demo

            return run_demo(args.workdir, args.verbose)
        cfg = config_mod.load(args.config)
        node = _node_name(cfg, args.node)
        setup_logging(args.verbose, node)
        return COMMANDS[args.command](cfg, node, args)
    except HawrapError as exc:
        print(f"hawrap {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except MirrorError as exc:  # a lock or epoch file problem, from the mirror library
        print(f"hawrap {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"hawrap {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def cmd_run(cfg, node, args) -> int:
    if not args.no_supervise:
        from .supervisor import child_command, supervise

        return supervise(cfg, node, child_command(cfg.path, node, args.verbose))
    from mirror.sdnotify import SystemdNotifier

    from . import instance
    from .node import Node
    from .supervisor import SUPERVISED_ENV

    # Taken out of the environment before anything is started: the services and mirror
    # processes this node runs must not report readiness in its name.
    notifier = SystemdNotifier.from_environment()
    if os.environ.get(SUPERVISED_ENV) != str(os.getppid()):
        lock_fd = instance.acquire(cfg.node(node).state_dir)  # noqa: F841 (held until exit)
    if cfg.backend == "etcd":
        from .etcdnode import EtcdNode

        n = EtcdNode(cfg, node)
    else:
        n = Node(cfg, node)
    n.on_role_change = lambda role, reason: _report_role(notifier, role, reason)
    notifier.status("init: waiting to hear the peer and to see the own LAN healthy")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: (notifier.stopping(), n.stop()))
    n.run()
    return EXIT_OK


def _report_role(notifier, role: str, reason: str) -> None:
    """systemd's view of the node: ready once it has left ``init`` (it has heard its peer or
    waited ``initdead``, and is primary with its resources up, secondary, or in standby)."""
    status = f"{role}: {reason}" if reason else role
    if role == "init":
        notifier.status(status)
    else:
        notifier.ready(status)


def cmd_status(cfg, node, args) -> int:
    if cfg.backend == "etcd":
        from .etcdadmin import status

        return status(cfg, node, args.json)
    try:
        st = control.request(cfg.control_socket(node), "status")
    except NotRunning as exc:
        info = lockfile.status(cfg.standby_lock_path(node))
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": False,
                        "node": node,
                        "running": False,
                        "error": str(exc),
                        "standby_lock": info.as_dict() if info else None,
                    }
                )
            )
        else:
            print(f"{node}: not running ({exc})")
            if info:
                print(f"standby lock: {info.describe()}")
        return EXIT_NOT_RUNNING
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    print(
        f"{st['node']} ({st['cluster']}): {st['role']}, epoch {st['epoch']}{' (owner)' if st['owns_epoch'] else ''}"
        + (f" - {st['reason']}" if st["reason"] else "")
    )
    lan = st["lan"]
    print(
        f"  own LAN: {'healthy' if lan['ok'] else 'UNHEALTHY' if lan['ok'] is False else 'unknown'}"
        + (f" ({lan['problem']})" if lan["problem"] else "")
    )
    peer = st["peer"]
    if peer["alive"]:
        print(
            f"  peer {peer['name']}: {peer['role']}, epoch {peer['epoch']}, standby lock {'yes' if peer['standby'] else 'no'}, serving {'yes' if peer['serving'] else 'no'}"
        )
    else:
        print(f"  peer {peer['name']}: silent on every link")
    for link, up in st["links"].items():
        stats = st["link_stats"].get(link)
        extra = (
            f" (sent {stats[0]}, received {stats[1]}, dropped {stats[2]}, longest gap {stats[4]:g} ms)"
            if stats
            else ""
        )
        print(f"  link {link}: {'up' if up else 'DOWN'}{extra}")
    if st["vip"]:
        print(f"  vip {st['vip']['address']}: {'here' if st['vip']['present'] else 'not here'}")
    print(f"  standby lock: {st['standby_lock']['reason'] if st['standby_lock'] else 'none'}")
    data = st.get("data") or {}
    if data.get("guarded"):
        if data["uptodate"]:
            copy = "up to date"
        else:
            since = data.get("outdated_since")
            copy = "NOT known up to date" + (
                f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
            )
        print(
            f"  data: {copy}"
            + (f"; {peer['name']}'s copy lacks this node's changes" if data["peer_outdated"] else "")
        )
        if data.get("replica"):
            print(
                f"  replica: {'in sync' if data['replica']['in_sync'] else 'NOT in sync: ' + data['replica']['detail']}"
            )
    m = st["mirror"]
    if m["locked"]:
        print(f"  mirror: direction {m['direction']}, locks {m['locked']}, epochs {m['epochs']}")
    for t in st["transitions"][-5:]:
        print(
            f"  {time.strftime('%H:%M:%S', time.localtime(t['time']))} {t['from']} -> {t['to']}: {t['reason']}"
        )
    return EXIT_OK


def cmd_standby(cfg, node, args) -> int:
    reason = args.reason or "hawrap standby by the administrator"
    try:
        answer = control.request(cfg.control_socket(node), "standby", reason=reason)
    except NotRunning:
        os.makedirs(os.path.dirname(cfg.standby_lock_path(node)) or ".", mode=0o700, exist_ok=True)
        info = lockfile.acquire(cfg.standby_lock_path(node), reason=reason)
        print(f"{node} is not running; standby lock written: {info.describe()}")
        return EXIT_OK
    print(f"{node}: {answer.get('role')}" + (f" ({answer['reason']})" if answer.get("reason") else ""))
    return EXIT_OK if answer.get("ok") else EXIT_FAILED


def cmd_resume(cfg, node, args) -> int:
    from .unsynced import find

    # with etcd, who leads next is decided by the positions the members publish
    unsynced = find(cfg, node) if cfg.backend != "etcd" else None
    if unsynced:
        print(unsynced.describe(node))
        if not args.discard_local_changes:
            print(
                f"{node}: not resumed. Keep what you need (copy it aside, or make {node} primary again with "
                f"its data), then run 'hawrap resume --discard-local-changes'",
                file=sys.stderr,
            )
            return EXIT_FAILED
        print(f"{node}: --discard-local-changes: resuming; {unsynced.peer}'s copy replaces the above")
    try:
        answer = control.request(cfg.control_socket(node), "resume")
    except NotRunning:
        removed = lockfile.release(cfg.standby_lock_path(node))
        print(f"{node} is not running; standby lock {'removed' if removed else 'was not present'}")
        return EXIT_OK
    if not answer.get("ok"):
        print(f"{node}: {answer.get('error') or answer.get('reason')}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{node}: {answer['role']}")
    return EXIT_OK


def cmd_force_primary(cfg, node, args) -> int:
    path = cfg.control_socket(node)
    st = control.request(path, "status")
    peer = st["peer"]
    if st["role"] == "primary":
        print(f"{node} is already primary")
        return EXIT_OK
    if peer.get("alive") and peer.get("serving"):
        print(
            f"{node}: force-primary refused: {peer['name']} serves (epoch {peer.get('epoch')}); use 'hawrap failover' on it",
            file=sys.stderr,
        )
        return EXIT_FAILED
    data = st["data"]
    if not data["guarded"] or data["uptodate"]:
        print(f"{node}'s copy was complete when it last heard from {peer['name']}")
    else:
        since = data.get("outdated_since")
        when = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(since)) if since else "its first start"
        print(
            f"{node}'s copy has not been known complete since {when}: changes made on {peer['name']} after that"
        )
        print(
            f"may be lost: they are not in this copy. If {peer['name']} comes back, it goes to standby, and"
        )
        print("'hawrap resume' there lists what it holds before anything of it is replaced.")
    if not args.accept_data_loss:
        print(
            f"{node}: nothing done; run 'hawrap force-primary --accept-data-loss' to serve this copy",
            file=sys.stderr,
        )
        return EXIT_FAILED
    answer = control.request(path, "force-primary")
    if not answer.get("ok"):
        print(
            f"{node}: force-primary refused: {answer.get('message') or answer.get('error')}", file=sys.stderr
        )
        return EXIT_FAILED
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        st = control.request(path, "status")
        if st["role"] == "primary":
            print(f"{node}: primary at epoch {st['epoch']}")
            return EXIT_OK
        time.sleep(0.1)
    print(f"{node}: not primary after {args.wait:g} s: {st['reason']}", file=sys.stderr)
    return EXIT_FAILED


def _switch(cfg, node, args, command: str) -> int:
    path = cfg.control_socket(node)
    answer = control.request(path, command)
    if not answer.get("ok"):
        print(f"{node}: {command} refused: {answer.get('message') or answer.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{node}: {answer['message']}")
    start_role = answer.get("role")
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        st = control.request(path, "status")
        if (
            st["role"] in ("primary", "secondary")
            and st["role"] != _origin(start_role, command)
            and st["peer"].get("alive")
        ):
            print(f"{node}: now {st['role']}; peer {st['peer']['name']} is {st['peer'].get('role')}")
            return EXIT_OK
        time.sleep(0.1)
    print(f"{node}: the switch did not complete within {args.wait:g} s", file=sys.stderr)
    return EXIT_FAILED


def _origin(role_after_command: str | None, command: str) -> str | None:
    # On the primary the command moves it to "releasing"; done when it is "secondary".
    # On the secondary it stays "secondary" until it is "primary".
    return "primary" if role_after_command == "releasing" else role_after_command


def cmd_failover(cfg, node, args) -> int:
    if cfg.backend == "etcd":
        from .etcdadmin import failover

        return failover(cfg, args.to, args.wait)
    return _switch(cfg, node, args, "failover")


def cmd_failback(cfg, node, args) -> int:
    return _switch(cfg, node, args, "failback")


def cmd_cleanup(cfg, node, args) -> int:
    from . import instance
    from .node import cleanup

    if not args.force and instance.held(cfg.node(node).state_dir):
        raise HawrapError(
            "hawrap runs for this node: cleanup would take its VIP away (use --force to insist)"
        )
    errors = cleanup(cfg, node)
    for error in errors:
        print(f"hawrap cleanup: {error}", file=sys.stderr)
    return EXIT_FAILED if errors else EXIT_OK


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "standby": cmd_standby,
    "resume": cmd_resume,
    "force-primary": cmd_force_primary,
    "failover": cmd_failover,
    "failback": cmd_failback,
    "cleanup": cmd_cleanup,
}


def entry_point() -> None:
    sys.exit(main())
