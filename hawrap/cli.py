"""The ``hawrap`` command: parse, call the library, print, map errors to exit codes.

  hawrap run      --config FILE --node NAME     run this node (under its supervisor)
  hawrap status   --config FILE --node NAME [--json]
  hawrap standby  --config FILE --node NAME [--reason TEXT]
  hawrap resume   --config FILE --node NAME [--discard-local-changes | --keep-local-changes [DIR]]
  hawrap force-primary --config FILE --node NAME [--accept-data-loss]
  hawrap failover --config FILE --node NAME     planned switchover (stop writes, final sync, switch)
  hawrap failback --config FILE --node NAME     move the service back to the home node
  hawrap cleanup  --config FILE --node NAME     drop the VIP and stop services left behind
  hawrap check    --config FILE [--node NAME]   check the configuration and this host; exit 0 valid, 2 not
  hawrap demo                                   two nodes on loopback, no root needed

``--node`` defaults to $HAWRAP_NODE, then to the node named like this host.

Exit status: 0 done; 1 the cluster did not do what was asked (refused, or not completed in
time); 2 bad usage, configuration or I/O error; 3 hawrap does not run for this node.
'hawrap COMMAND --help' says what each command returns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import textwrap
import time

from mirror import lockfile
from mirror.cli.sync_cmd import seconds_arg  # the engine's rule for a duration option
from mirror.errors import MirrorError

from . import config as config_mod
from . import control
from .errors import (
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_NOBODY_SERVES,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    HawrapError,
    NotRunning,
)


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


# Each command: its one-line help, what it does, and its exit status (documented in --help).
_EXIT_USAGE = "2 bad usage, configuration or I/O error"
UNAUTHENTICATED_RECENT = 10.0  # seconds: a packet that failed authentication this recently is news
COMMAND_HELP: dict[str, tuple[str, str, str]] = {
    "run": (
        "run this node",
        "Run this node of the cluster: heartbeats, takeover, services, mirroring. A supervisor "
        "process restarts the node process if it dies or hangs, cleaning up (VIP, services, "
        "mirror processes) first. Under systemd (Type=notify) it reports ready once the node "
        "has decided its role.",
        f"0 stopped (SIGTERM/SIGINT); 1 the node process failed too often; {_EXIT_USAGE}",
    ),
    "status": (
        "roles, links, epoch, locks, services, mirror lag, last transitions",
        "Show this node as its running hawrap sees it: role and why, own LAN, peer, links, VIP, "
        "standby lock, data state, each service's state and failure count, each tree's mirror "
        "daemon (state, lag, failed files, directories not watched) and the last transitions.",
        f"0 shown; {_EXIT_USAGE}; 3 hawrap does not run for this node",
    ),
    "standby": (
        "put this node in standby (writes the standby lock)",
        "Put this node in standby: services stopped, VIP dropped, the standby lock written (a "
        "node that boots with it stays in standby). A primary whose peer is a healthy secondary "
        "hands over first, as failover does (services stopped, a final sync, then the peer takes "
        "over with every change), and is in standby whatever comes of it; otherwise the peer "
        "takes over if its copy is known up to date. With the etcd backend a leader first makes "
        "the final sync toward the most up-to-date eligible member and hands it the leadership, "
        "as failover --to does.",
        f"0 in standby, and another node serves (or hawrap does not run here: the lock is written); 1 refused by "
        f"the node; {_EXIT_USAGE}; 4 in standby, and nobody serves (the hand-over failed, or no peer could take "
        f"over): resume this node, or make the peer primary",
    ),
    "resume": (
        "remove the standby lock after your checks: rejoin as secondary",
        "Remove the standby lock: the node rejoins as secondary and the primary mirrors its "
        "trees back. Refused, listing them, if this node holds changes its peer lacks, unless "
        "--keep-local-changes copies them aside first or --discard-local-changes gives them up. With "
        "--new-disk, a require_mount tree's disk that replaces the old one is taken as the "
        "tree's (refused while any is unmounted, or when none is new). With the etcd backend, "
        "--discard-local-changes also lets a member held for holding changes the leader never had "
        "(a double failure, see 'hawrap status') receive the leader's copy.",
        f"0 done; 1 refused (local changes, or by the node); {_EXIT_USAGE} (with --keep-local-changes: a "
        "copy that could not be made, nothing resumed)",
    ),
    "force-primary": (
        "serve this node's copy although it may lack the peer's latest changes",
        "Make this node primary although its copy is not known up to date: says first since "
        "when, and what may be lost; acts only with --accept-data-loss.",
        f"0 primary; 1 refused, or not primary within --wait; {_EXIT_USAGE}; 3 hawrap does not run",
    ),
    "failover": (
        "planned switchover to the other node",
        "Planned switchover: writes stop here, a final sync mirrors everything to the peer, "
        "then the peer takes over. Run on either node.",
        f"0 switched; 1 refused, or not completed within --wait; {_EXIT_USAGE}; 3 hawrap does not run",
    ),
    "failback": (
        "move the service back to the home node",
        "A failover toward cluster.home, when the other node serves.",
        f"0 switched; 1 refused, or not completed within --wait; {_EXIT_USAGE}; 3 hawrap does not run",
    ),
    "cleanup": (
        "drop the VIP and stop services this node left behind",
        "What the supervisor does after a crash: drop the VIP, stop the services and the "
        "mirror processes. Refused while hawrap runs for the node, unless --force.",
        f"0 clean; 1 something could not be stopped (each named); {_EXIT_USAGE}",
    ),
    "check": (
        "check the configuration (and, for --node, this host) before anything runs",
        "Check the configuration file, then what it needs on this host: the node's interfaces "
        "and addresses, arping and the other tools it names, the secret files (mode 0600, long "
        "enough), the mirrored trees. Every problem is listed, with file and key.",
        "0 valid; 2 invalid (every problem listed)",
    ),
    "demo": (
        "two nodes on loopback with a dummy VIP (no root)",
        "Two nodes on loopback with a dummy VIP: watch an election, a failure and a takeover.",
        "0 the demo passed; 1 it did not",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(
        prog="hawrap",
        description="hawrap: the two-node failover wrapper of hamirror (heartbeats, takeover, VIP, services, mirroring).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--version", action="version", version=f"hawrap (hamirror) {version('hamirror')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, needs_config: bool = True) -> argparse.ArgumentParser:
        help_, description, codes = COMMAND_HELP[name]
        p = sub.add_parser(
            name,
            help=help_,
            description=f"{textwrap.fill(description, 88)}\n\n{textwrap.fill(f'Exit status: {codes}.', 88)}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(p, needs_config)
        return p

    p = command("run")
    p.add_argument(
        "--no-supervise", action="store_true", help="run the node process directly (no cleanup parent)"
    )
    p = command("status")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p = command("standby")
    p.add_argument("--reason", default="", help="recorded in the standby lock")
    p = command("resume")
    local = p.add_mutually_exclusive_group()
    local.add_argument(
        "--discard-local-changes", action="store_true",
        help="resume even though this node holds changes the peer lacks (they are listed; the resync replaces them)",
    )  # fmt: skip
    local.add_argument(
        "--keep-local-changes", nargs="?", const="", default=None, metavar="DIR",
        help="copy the changes this node holds that the peer lacks into DIR/TREE (default: each tree's state dir, "
             "kept/TIME), durably, then resume (nothing is resumed if a copy fails)",
    )  # fmt: skip
    p.add_argument(
        "--new-disk", action="store_true",
        help="a require_mount tree's disk was replaced on purpose: take it as the tree's, to be mirrored over in full "
             "(this node's copy counts as outdated until then)",
    )  # fmt: skip
    p = command("force-primary")
    p.add_argument(
        "--accept-data-loss", action="store_true", help="do it (without it: only say what may be lost)"
    )
    p.add_argument("--wait", type=seconds_arg, default=30.0, help="seconds to wait for the node to serve")
    for name in ("failover", "failback"):
        p = command(name)
        p.add_argument("--wait", type=seconds_arg, default=30.0, help="seconds to wait for the switch to complete")
        if name == "failover":
            p.add_argument("--to", metavar="NODE", help="the new leader (etcd backend: required)")
    p = command("cleanup")
    p.add_argument("--force", action="store_true", help="even while hawrap runs for this node")
    command("check")
    p = command("demo", needs_config=False)
    p.add_argument("--workdir", help="keep the demo's files here (default: a temporary dir)")
    return parser


def setup_logging(verbose: int, node: str | None = None) -> None:
    from mirror import configure_logging

    configure_logging(f"hawrap[{node}]" if node else "hawrap", verbose)


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
        if args.command == "check":
            return cmd_check(args)
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


def cmd_check(args) -> int:
    from .check import check

    problems, notes = check(args.config, args.node)
    for problem in problems:
        print(problem, file=sys.stderr)
    for note in notes:
        print(f"hawrap check: note: {note}", file=sys.stderr)
    if problems:
        print(f"hawrap check: {args.config}: {len(problems)} problem{'s' if len(problems) > 1 else ''}",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    print(f"hawrap check: {args.config}: valid")
    return EXIT_OK


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
    stop_on_signals(n, notifier)
    n.run()
    return EXIT_OK


def stop_on_signals(n, notifier) -> None:
    """SIGTERM and SIGINT stop the node ``n`` in order, through ``request_stop``: the only
    call that is safe in a handler interrupting the node's own loop."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: (notifier.stopping(), n.request_stop()))


def _report_role(notifier, role: str, reason: str) -> None:
    """systemd's view of the node: ready once it has left ``init`` (it has heard its peer or
    waited ``initdead``, and is primary with its resources up, secondary, or in standby)."""
    status = f"{role}: {reason}" if reason else role
    if role == "init":
        notifier.status(status)
    else:
        notifier.ready(status)


def cmd_status(cfg, node, args) -> int:
    from .kept import describe_kept, kept_copies
    from .mirrorctl import resolve_trees

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
                        "kept": kept_copies(resolve_trees(cfg, node)),
                    }
                )
            )
        else:
            print(f"{node}: not running ({exc})")
            if info:
                print(f"standby lock: {info.describe()}")
            for line in describe_kept(kept_copies(resolve_trees(cfg, node))):
                print(line)
        return EXIT_NOT_RUNNING
    st["mirror"]["trees"] = _mirror_trees(cfg, node)
    st["mirror"]["kept"] = kept_copies(resolve_trees(cfg, node))
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
        refused = [link for link, stats in st["link_stats"].items() if len(stats) > 5 and stats[5] is not None
                   and stats[5] <= UNAUTHENTICATED_RECENT]  # fmt: skip
        if refused:
            print(f"  ... but packets from its address fail authentication on {', '.join(refused)}: "
                  "are both nodes' heartbeat secrets the same?")  # fmt: skip
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
    if st.get("unfit"):
        print(f"  UNFIT TO SERVE: {st['unfit']} (rejoins once it is over)")
    if st.get("state_unsaved"):
        print(f"  STATE NOT RECORDED: {st['state_unsaved']} (a restart now would start from the state last recorded)")
    if (st.get("data") or {}).get("new_disks"):
        print(f"  new disk of {', '.join(st['data']['new_disks'])}: outdated until the peer has mirrored onto it")
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
            + (f"; {peer['name']} says it holds changes this copy lacks" if peer["alive"] and peer.get("ahead") else "")
        )
        if data.get("replica"):
            print(
                f"  replica: {'in sync' if data['replica']['in_sync'] else 'NOT in sync: ' + data['replica']['detail']}"
            )
    for service in st.get("services", []):
        print(f"  service {service['name']}: {service['state']}, {service['failures']} failures")
    m = st["mirror"]
    if m["locked"]:
        print(f"  mirror: direction {m['direction']}, locks {m['locked']}, epochs {m['epochs']}")
    for tree in m["trees"]:
        if tree.get("daemon") is None:
            continue
        if tree["daemon"] != "running":
            print(f"  mirror daemon of {tree['name']}: {tree['daemon']}")
            continue
        for pair in tree["pairs"]:
            print(
                f"  mirror {tree['name']}: {pair['state']}, lag {pair['lag_seconds']:.3f} s / {pair['lag_bytes']} "
                f"bytes, {pair['pending']} pending"
                + (f", {len(pair['failed_files'])} files failed" if pair.get("failed_files") else "")
                + (f", {pair['unwatched_count']} directories not watched" if pair.get("unwatched_count") else "")
                + (", last whole-tree compare " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(pair["last_compare"]))
                   if pair.get("last_compare") else "")  # fmt: skip
            )
    for line in describe_kept(m["kept"]):
        print(line)
    for t in st["transitions"][-5:]:
        print(
            f"  {time.strftime('%H:%M:%S', time.localtime(t['time']))} {t['from']} -> {t['to']}: {t['reason']}"
        )
    return EXIT_OK


def _mirror_trees(cfg, node) -> list[dict]:
    """Each mirrored tree's daemon as ``mirror status --json`` sees it (state, lag, failed
    files); ``daemon`` is None where this node runs no daemon for it (it receives)."""
    import subprocess

    from .mirrorctl import resolve_trees

    out = []
    for tree in resolve_trees(cfg, node):
        entry: dict = {"name": tree.name, "daemon": None}
        try:
            proc = subprocess.run(
                [*cfg.mirror.command, "status", "--state-dir", tree.state_dir, "--json"],
                capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            status = json.loads(proc.stdout) if proc.stdout else None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            status = None
        if status is not None:
            entry.update(daemon=status["daemon"], pairs=status["pairs"])
        out.append(entry)
    return out


def _await_status(path: str, done, seconds: float) -> tuple[bool, dict]:
    """The node's status, asked every 0.1 s until ``done(status)`` or ``seconds`` have passed
    (asked once at least): whether it came, and the last status."""
    deadline = time.monotonic() + seconds
    while True:
        st = control.request(path, "status")
        if done(st):
            return True, st
        if time.monotonic() >= deadline:
            return False, st
        time.sleep(0.1)


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
    if not answer.get("ok"):
        return EXIT_FAILED
    if answer.get("role") == "releasing":
        # services stopped, final sync under way: wait for the peer to take over, or not
        ended, st = _await_status(cfg.control_socket(node), lambda st: st["role"] != "releasing",
                                  cfg.timing.handover_timeout + 5)  # fmt: skip
        if not ended:
            print(f"{node}: still handing over after {cfg.timing.handover_timeout + 5:g} s; nobody serves meanwhile",
                  file=sys.stderr)  # fmt: skip
            return EXIT_NOBODY_SERVES
        print(f"{node}: {st['role']} ({st['reason']})")
    if "peer" not in control.request(cfg.control_socket(node), "status"):
        return EXIT_OK  # etcd: a leader hands over in the background (its status shows the outcome)
    # A peer with a whole copy takes over once it hears this node stand by: waited for.
    _, st = _await_status(cfg.control_socket(node), lambda st: _peer_serves(st) or not _peer_may_take_over(st),
                          cfg.timing.handover_timeout)  # fmt: skip
    if _peer_serves(st):
        return EXIT_OK
    peer = st["peer"]
    why = ("is silent" if not peer.get("alive") else "is in standby too" if peer.get("standby")
           else "knows its copy outdated" if peer.get("uptodate", True) is False
           else f"did not take over within {cfg.timing.handover_timeout:g} s")  # fmt: skip
    print(f"{node}: in standby, and nobody serves: {peer['name']} {why}. Serve again with 'hawrap resume' here, "
          f"or, once its copy is checked, 'hawrap force-primary' on {peer['name']}", file=sys.stderr)  # fmt: skip
    return EXIT_NOBODY_SERVES


def _peer_serves(st: dict) -> bool:
    peer = st.get("peer") or {}
    return bool(peer.get("alive")) and (bool(peer.get("serving")) or peer.get("role") == "primary")


def _peer_may_take_over(st: dict) -> bool:
    """The peer is heard, not in standby, and counts its copy whole: it takes over on its own."""
    peer = st.get("peer") or {}
    return bool(peer.get("alive")) and not peer.get("standby") and peer.get("uptodate", True) is not False


def _keep_local_changes(cfg, node, unsynced, base: str | None) -> bool:
    """Copy aside what ``unsynced`` lists (``hawrap resume --keep-local-changes``): True once
    every copy is durable; False, said on stderr, if one could not be made."""
    from .mirrorctl import resolve_trees
    from .setaside import SetAsideError, check_dest, keep_unsynced

    trees = resolve_trees(cfg, node)
    if base is not None:
        why = check_dest(base, trees)
        if why:
            print(f"{node}: --keep-local-changes: {why}; nothing resumed", file=sys.stderr)
            return False
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        kept = keep_unsynced(trees, unsynced.since, base, stamp, synced_whole=unsynced.synced_whole)
    except SetAsideError as exc:
        print(f"{node}: --keep-local-changes: {exc}; nothing resumed", file=sys.stderr)
        return False
    print(f"{node}: kept a copy of the above:" if kept else f"{node}: nothing of the above is here to copy")
    for k in kept:
        print(k.describe())
    if unsynced.since is not None:
        print(f"  (what {unsynced.peer} lacks from before then, if it never received it, e.g. an initial sync cut "
              f"short, is not known here: copy the trees yourself if that may be so)")  # fmt: skip
    return True


def _outdated_peer_note(cfg, node) -> str:
    """When the peer does not serve and knows its copy outdated (it heard this node say it
    holds changes the peer lacks), a resume replaces nothing by itself: this node ranks
    first and serves again.  Said, so that the listing's warning is not taken for the whole
    story; the flags are still asked for (the peer could be made primary first)."""
    with contextlib.suppress(NotRunning, HawrapError):
        peer = control.request(cfg.control_socket(node), "status").get("peer") or {}
        if peer.get("alive") and not peer.get("serving") and peer.get("role") != "primary" and not peer.get("uptodate", True):
            return (f"{node}: {peer['name']} does not serve and knows its copy lacks these changes: once resumed, "
                    f"{node} ranks first and serves them again, unless {peer['name']} is made primary first "
                    f"('hawrap force-primary' there)")  # fmt: skip
    return ""


def cmd_resume(cfg, node, args) -> int:
    from .mirrorctl import resolve_trees
    from .unsynced import find, settle

    if not args.new_disk:
        # A node unfit to serve refuses anyway: say what to fix first, before what a resume loses.
        with contextlib.suppress(NotRunning):
            unfit = control.request(cfg.control_socket(node), "status").get("unfit")
            if unfit:
                print(f"{node}: resume refused: {unfit}", file=sys.stderr)
                return EXIT_FAILED
    if args.keep_local_changes is not None and cfg.backend == "etcd":
        print(f"{node}: --keep-local-changes: not with the etcd backend, where a member about to receive keeps "
              f"aside itself what no replica confirmed ('hawrap status' names the copies); a member held because "
              f"it holds changes the leader never had cannot tell which files they are: copy what you need "
              f"from its trees, then run 'hawrap resume --discard-local-changes'", file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    # with etcd, who leads next is decided by the positions the members publish
    unsynced = find(cfg, node) if cfg.backend != "etcd" else None
    if unsynced:
        print(unsynced.describe(node))
        note = _outdated_peer_note(cfg, node)
        if note:
            print(note)
        if args.keep_local_changes is not None:
            if not _keep_local_changes(cfg, node, unsynced, args.keep_local_changes or None):
                return EXIT_ERROR
            print(f"{node}: resuming; {unsynced.peer}'s copy replaces the above (copies kept)")
        elif not args.discard_local_changes:
            print(
                f"{node}: not resumed. 'hawrap resume --keep-local-changes [DIR]' copies them aside first; "
                f"or keep what you need yourself (or make {node} primary again with its data), then run "
                f"'hawrap resume --discard-local-changes'",
                file=sys.stderr,
            )
            return EXIT_FAILED
        else:
            print(f"{node}: --discard-local-changes: resuming; {unsynced.peer}'s copy replaces the above")
        for problem in settle(resolve_trees(cfg, node)):
            print(f"{node}: cannot mark the journal as dealt with, {problem}: a later resume lists it again",
                  file=sys.stderr)  # fmt: skip
    try:
        flags = {"new_disk": args.new_disk, "discard_local_changes": args.discard_local_changes}
        answer = control.request(cfg.control_socket(node), "resume", **{k: True for k, v in flags.items() if v})
    except NotRunning:
        if args.new_disk:
            print(f"{node} is not running: start it, then run 'hawrap resume --new-disk'", file=sys.stderr)
            return EXIT_FAILED
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
    if data.get("new_disks"):
        print(f"The new disk of {', '.join(data['new_disks'])} has not been mirrored onto yet: it may hold "
              "little or nothing of the tree.")  # fmt: skip
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
    serving, st = _await_status(path, lambda st: st["role"] == "primary", args.wait)
    if serving:
        print(f"{node}: primary at epoch {st['epoch']}")
        return EXIT_OK
    print(f"{node}: not primary after {args.wait:g} s: {st['reason']}", file=sys.stderr)
    return EXIT_FAILED


def _switch(cfg, node, args, command: str) -> int:
    path = cfg.control_socket(node)
    answer = control.request(path, command)
    if not answer.get("ok"):
        print(f"{node}: {command} refused: {answer.get('message') or answer.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{node}: {answer['message']}")
    origin = _origin(answer.get("role"), command)
    switched, st = _await_status(path, lambda st: st["role"] in ("primary", "secondary") and st["role"] != origin
                                 and st["peer"].get("alive"), args.wait)  # fmt: skip
    if switched:
        print(f"{node}: now {st['role']}; peer {st['peer']['name']} is {st['peer'].get('role')}")
        return EXIT_OK
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
