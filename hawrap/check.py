"""``hawrap check``: everything a configuration would only reveal at takeover, found before
anything runs (as ``keepalived -t`` or ``crm_verify`` do).

The file's own problems come from ``config.read``; this adds what depends on the host the
node runs on: its interfaces and addresses, the tools the configuration names, the secret
and tree files.  Every problem is listed, each naming the file and the key.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess

from mirror import MirrorError, read_secret_file

from . import config as config_mod
from .errors import HawrapError


def check(path: str, node: str | None) -> tuple[list[str], list[str]]:
    """(problems, notes): each problem is ``FILE: KEY: message``; notes say what was not
    checked and why."""
    cfg, problems = config_mod.read(path)
    notes: list[str] = []
    if cfg is None:
        notes.append("the host checks need a configuration that can be read: fix the problems above first")
        return problems.items, notes
    if node is not None and node not in (n.name for n in cfg.nodes):
        problems.add("--node", f"no node named {node!r} (known: {', '.join(n.name for n in cfg.nodes)})")
        node = None
    if node is None:
        host = socket.gethostname().split(".")[0]
        node = host if host in (n.name for n in cfg.nodes) else None
    if node is None:
        notes.append("no --node given and this host is not one of the nodes: interfaces, addresses and tree "
                     "paths were not checked")  # fmt: skip
    _tools(cfg, problems)
    _secrets(cfg, problems)
    if node is not None:
        _host(cfg, node, problems)
    return problems.items, notes


def _found(command: str) -> bool:
    if os.sep in command:
        return os.path.isfile(command) and os.access(command, os.X_OK)
    return shutil.which(command) is not None


def _tools(cfg: config_mod.ClusterConfig, problems: config_mod.Problems) -> None:
    vip = cfg.vip
    if vip is not None and vip.kind == "ip" and vip.arping != "builtin":
        if not _found("arping"):
            problems.add("vip.arping", f"{vip.arping!r} needs the arping tool, which is not installed "
                                       "(apt-get install arping, or arping = \"builtin\")")  # fmt: skip
        elif vip.arping != "auto":
            from .resources import arping_flavour

            try:
                installed = arping_flavour("auto")
            except (HawrapError, OSError, subprocess.SubprocessError) as exc:
                problems.add("vip.arping", f"cannot tell which arping is installed: {exc}")
            else:
                if installed != vip.arping:
                    problems.add("vip.arping", f"{vip.arping!r}, but the installed arping is {installed}'s")
    if vip is not None and vip.kind == "ip" and not _found("ip"):
        problems.add("vip", "the ip tool (iproute2) is not installed: the VIP cannot be added")
    if cfg.mirror.trees and not _found(cfg.mirror.command[0]):
        problems.add("mirror.command", f"{cfg.mirror.command[0]!r} is not an executable found on PATH")
    for i, service in enumerate(cfg.services):
        if service.shell:
            continue
        for action in ("start", "stop", "monitor"):
            argv = getattr(service, action)
            if argv and not _found(argv[0]):
                problems.add(f"service[{i}].{action}", f"{argv[0]!r} is not an executable found on PATH")
    if cfg.notify.command and not _found(cfg.notify.command[0]):
        problems.add("notify.command", f"{cfg.notify.command[0]!r} is not an executable found on PATH")


def _secrets(cfg: config_mod.ClusterConfig, problems: config_mod.Problems) -> None:
    if cfg.mirror.trees and cfg.mirror.secret_file:
        try:
            read_secret_file(cfg.mirror.secret_file)
        except MirrorError as exc:
            problems.add("mirror.secret_file", str(exc))


def _interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _host(cfg: config_mod.ClusterConfig, node: str, problems: config_mod.Problems) -> None:
    index = [n.name for n in cfg.nodes].index(node)
    me = cfg.node(node)
    if not _interface_exists(me.lan_interface):
        problems.add(
            f"node[{index}].lan_interface", f"{me.lan_interface!r} is not an interface of this host ({node})"
        )
    if cfg.vip is not None and cfg.vip.kind == "ip":
        interface = cfg.vip_interface(node)
        if interface != me.lan_interface and not _interface_exists(interface):
            problems.add("vip.interface", f"{interface!r} is not an interface of this host ({node})")
    for link, address in me.addresses.items():
        problem = _local_address_problem(address)
        if problem:
            problems.add(f"node[{index}].address.{link}", f"{address}: {problem} (this host is {node})")
    from .mirrorctl import resolve_trees
    from .treedisk import TreeDisks

    for i, tree in enumerate(resolve_trees(cfg, node)):
        if not os.path.isdir(tree.path):
            problems.add(f"mirror.tree[{i}].path", f"{tree.path} is not a directory on this host ({node})")
        elif tree.require_mount and (problem := TreeDisks([tree], me.state_dir, record=False).unfit()):
            problems.add(f"mirror.tree[{i}].require_mount", f"{problem} (on this host, {node})")
        parent = os.path.dirname(tree.lock_file) or "."
        if not os.path.isdir(parent):
            problems.add(f"mirror.tree[{i}].lock_file", f"its directory {parent} does not exist on this host")


def _local_address_problem(address: str) -> str | None:
    """Why heartbeats cannot be sent from ``address`` on this host, or None."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return "not an address of this host"
            return exc.strerror
    return None
