"""``hawrap status`` and ``hawrap failover --to NODE`` with the etcd backend.

Status combines what etcd holds (every member's record, the leader, the epoch, each etcd
endpoint's health: ``leadership.describe``) with what this node's running process says
(its role, its VIP, its mirror destinations), so it works from any node, even one whose
hawrap is stopped.
"""

from __future__ import annotations

import json
import time

from . import control
from .config import ClusterConfig
from .errors import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, HawrapError, NotRunning
from .kept import describe_kept, kept_copies
from .leadership import describe, request_failover
from .mirrorctl import resolve_trees


def status(cfg: ClusterConfig, node: str, as_json: bool) -> int:
    settings = cfg.etcd
    try:
        local = control.request(cfg.control_socket(node), "status")
    except NotRunning as exc:
        local = {"ok": False, "node": node, "running": False, "error": str(exc)}
    cluster = describe(settings.conn, settings.prefix)
    kept = kept_copies(resolve_trees(cfg, node))
    if local.get("ok"):
        local["mirror"]["kept"] = kept
    if as_json:
        print(json.dumps({**local, "etcd_view": cluster}, indent=2))
        return EXIT_OK if local.get("ok") else EXIT_NOT_RUNNING
    if local.get("ok"):
        print(f"{node} ({cfg.name}, etcd): {local['role']}, epoch {local['epoch']} - {local['reason']}")
        if local.get("held"):
            print(f"  held: {local['held']}")
        vip = local.get("vip")
        if vip:
            print(f"  vip {vip['address']}: {'here' if vip['present'] else 'not here'}")
        m = local["mirror"]
        if m.get("replica"):
            r = m["replica"]
            print(f"  replicas {', '.join(m['destinations'])}: {'in sync' if r['in_sync'] else r['detail']}")
        lock = local.get("standby_lock")
        print(f"  standby lock: {lock['reason'] if lock else 'none'}")
        for line in describe_kept(kept):
            print(line)
        for t in local["transitions"][-5:]:
            print(
                f"  {time.strftime('%H:%M:%S', time.localtime(t['time']))} {t['from']} -> {t['to']}: {t['reason']}"
            )
    else:
        print(f"{node}: not running ({local['error']})")
    if not cluster.get("ok"):
        print(f"  etcd: no quorum reached: {cluster.get('error')}")
    else:
        print(
            f"  leader: {cluster['leader'] or 'none'}"
            + (f" at epoch {cluster['epoch']}" if cluster["epoch"] else "")
        )
        for mem in cluster["members"]:
            lag = "" if mem["lag"] is None else f", {mem['lag']} behind"
            eligible = "eligible" if mem["eligible"] else f"not eligible ({mem['reason']})"
            print(
                f"  member {mem['name']}: {mem['role']}, position {mem['epoch']}/{mem['seq']}{lag}, {eligible}"
            )
        for name in sorted({n.name for n in cfg.nodes} - {m["name"] for m in cluster["members"]}):
            print(f"  member {name}: no record (not running, or cut off from etcd)")
        for problem in cluster["problems"]:
            print(f"  problem: {problem}")
    for ep in cluster.get("etcd", []):
        if ep["ok"]:
            leads = " (raft leader)" if ep["leader"] == ep["member"] else ""
            print(f"  etcd {ep['endpoint']}: healthy, term {ep['raft_term']}{leads}")
        else:
            print(f"  etcd {ep['endpoint']}: UNREACHABLE ({ep['error']})")
    return EXIT_OK if local.get("ok") else EXIT_NOT_RUNNING


def failover(cfg: ClusterConfig, to: str | None, wait: float) -> int:
    """Move the leader key to node ``to`` (its copy caught up first); exit 0 once it leads."""
    if not to:
        raise HawrapError("with the etcd backend, name the new leader: hawrap failover --to NODE")
    cfg.node(to)
    ok, message = request_failover(cfg.etcd.conn, cfg.etcd.prefix, to, timeout=wait)
    print(f"failover to {to}: {message}")
    return EXIT_OK if ok else EXIT_FAILED
