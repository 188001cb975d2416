"""hawrap's configuration: one TOML file describes both nodes, so the same file is installed
on each and ``--node NAME`` says which one this is.

Loaded into frozen dataclasses and validated at once; every message names the file and the
key.  ``{node}`` in a path is replaced by the node's name (both nodes can then run on one
machine, as in the tests and the demo).  See ``examples/hawrap.toml`` for every key.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from mirror import MirrorError, read_secret_file
from mirror.config import module_name_problem

from .errors import ConfigError

FAILBACK_POLICIES = ("manual", "auto")
VIP_KINDS = ("ip", "dummy")
ARPING_FLAVOURS = ("builtin", "auto", "habets", "iputils")

# Default timings, chosen for a fast failover that a busy node does not trigger: the
# heartbeat runs in its own real-time, memory-locked process, so a packet is late only by
# scheduling latency (the longest gap between two heartbeats received was 88 and 134 ms in
# two runs with both nodes' cores saturated and their disks busy with fsyncs, on a shared
# VM: benchmarks/RESULTS.md, S6), and five intervals of silence are needed before the peer
# is declared dead.  A false verdict costs no failover anyway: the takeover's first step,
# the ARP check, finds the VIP still answering and changes nothing (the administrator is
# told).  initdead leaves time for the peer's first packets after a boot.
DEFAULT_INTERVAL = 0.05
DEFAULT_DEADTIME = 0.25
DEFAULT_INITDEAD = 3.0


@dataclass(frozen=True)
class LinkConfig:
    name: str
    port: int


@dataclass(frozen=True)
class NodeConfig:
    name: str
    addresses: dict[str, str]  # link name -> this node's address on that link
    lan_interface: str
    state_dir: str


@dataclass(frozen=True)
class Timing:
    interval: float = DEFAULT_INTERVAL
    deadtime: float = DEFAULT_DEADTIME
    initdead: float = DEFAULT_INITDEAD
    monitor_interval: float = 2.0  # how often resources are monitored while serving
    carrier_interval: float = 0.05  # how often the LAN carrier is read
    ping_interval: float = 0.1
    ping_timeout: float = 0.3  # a probe without a reply within this is lost
    ping_failures: int = 3  # consecutive lost probes before the ping node counts as unreachable
    handover_timeout: float = 10.0  # a planned switchover not completed by then is rolled back
    lan_hold: float = 1.0  # an unhealthy LAN verdict must last this long before a node steps down
    watchdog: float = 2.0  # a node process without progress this long is replaced (heartbeats stop)
    realtime_priority: int = 50  # SCHED_FIFO priority of the heartbeat process; 0: normal scheduling
    mlock: bool = True  # lock the heartbeat process's memory (no page-in stall under disk load)


@dataclass(frozen=True)
class VipConfig:
    address: str  # "198.51.100.100/24"
    interface: str | None  # None: the node's lan_interface
    kind: str = "ip"  # "ip": ip addr + arping; "dummy": a marker file (demo, unit tests)
    # An ARP reply crosses a LAN in well under a millisecond and the kernel sends it from
    # softirq even when user space is starved: 50 ms is ample and costs the takeover little.
    dad_timeout: float = 0.05
    garp_count: int = 3
    garp_interval: float = 0.5
    arping: str = "builtin"  # ARP from hawrap itself; or the arping tool ("auto", "habets", "iputils")
    lifetime: int = 0  # >0: the address expires unless refreshed (a kill -9'd hawrap cannot leave it)

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    start: tuple[str, ...]
    stop: tuple[str, ...]
    monitor: tuple[str, ...]
    timeout: float = 20.0
    shell: bool = False


@dataclass(frozen=True)
class TreeConfig:
    name: str  # also the receiver's module name
    path: str
    lock_file: str
    state_dir: str | None = None
    require_mount: bool = False  # the path is a mount point: its receiver refuses while nothing is mounted there


@dataclass(frozen=True)
class MirrorConfig:
    command: tuple[str, ...] = ("mirror",)
    secret_file: str | None = None
    port: int = 8730
    link: str | None = None  # whose addresses carry mirror traffic; default: the first link
    sync: tuple[str, ...] = (
        "{mirror}",
        "sync",
        "{src}",
        "{dst}",
        "--delete",
        "--secret-file",
        "{secret_file}",
        # the tree's epoch and identity are where the daemon keeps them
        "--state-dir",
        "{state_dir}",
    )
    serve: tuple[str, ...] = (
        "{mirror}", "serve", "--listen", "{listen}", "{modules}",
        "--secret-file", "{secret_file}", "--lock-file", "{lock_file}",
        # The replica must be an exact copy to take over from: owners, set-id bits, FIFOs and
        # sockets are kept (the sender is the authenticated peer node); device nodes are not.
        "--keep-owners", "--allow-setid", "--allow-specials",
    )  # fmt: skip
    daemon: tuple[str, ...] = (
        "{mirror}", "daemon", "{src}", "{dst}", "--secret-file", "{secret_file}",
        "--lock-file", "{lock_file}", "--state-dir", "{state_dir}",
        "--reconcile-interval", "{reconcile_interval}",
    )  # fmt: skip
    trees: tuple[TreeConfig, ...] = ()
    # The replica counts as up to date (the standby may take over on its own) while the
    # daemon is live and less than this many seconds behind; more, and it is outdated.
    max_lag: float = 2.0
    # Replication not live for this long while the peer could receive: the administrator is told.
    alert_after: float = 10.0
    # The daemon compares the whole tree this often (seconds; 0: never), besides the compares
    # after a reconnect or a lock: what no event told (a replica changed by hand, a lost
    # event) is repaired within this time, a standby kept exact.
    reconcile_interval: float = 3600.0


@dataclass(frozen=True)
class NotifyConfig:
    command: tuple[str, ...] = ()
    smtp_host: str | None = None
    smtp_port: int = 25
    mail_from: str = "hawrap@localhost"
    mail_to: tuple[str, ...] = ()
    timeout: float = 10.0


@dataclass(frozen=True)
class ClusterConfig:
    path: str
    name: str
    secret: bytes
    nodes: tuple[NodeConfig, ...]
    links: tuple[LinkConfig, ...]
    ping_nodes: tuple[str, ...]
    home: str | None
    failback: str
    failback_delay: float
    timing: Timing
    vip: VipConfig | None
    services: tuple[ServiceConfig, ...]
    mirror: MirrorConfig
    notify: NotifyConfig
    standby_lock: str = field(default="{state_dir}/standby.lock")
    backend: str = "two-node"  # or "etcd": leadership from etcd (hawrap.etcdconfig, docs/ETCD.md)
    etcd: Any = None  # hawrap.etcdconfig.EtcdSettings with backend "etcd"

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigError(
            f"{self.path}: no node named {name!r} (known: {', '.join(n.name for n in self.nodes)})"
        )

    def peer_of(self, name: str) -> NodeConfig:
        self.node(name)
        return next(n for n in self.nodes if n.name != name)

    def standby_lock_path(self, name: str) -> str:
        node = self.node(name)
        return self.standby_lock.replace("{state_dir}", node.state_dir).replace("{node}", name)

    def control_socket(self, name: str) -> str:
        return os.path.join(self.node(name).state_dir, "control.sock")

    def vip_interface(self, name: str) -> str:
        if self.vip is not None and self.vip.interface:
            return self.vip.interface.replace("{node}", name)
        return self.node(name).lan_interface

    def mirror_link(self) -> str:
        return self.mirror.link or self.links[0].name


class _Abort(Exception):
    """A problem already recorded makes the rest of this part of the file unreadable."""


class Problems:
    """Every problem of one configuration file, each as ``FILE: KEY: message``; the file is
    read to the end so that all of them are reported at once."""

    def __init__(self, path: str):
        self.path = path
        self.items: list[str] = []

    def add(self, key: str | None, message: str) -> None:
        self.items.append(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    def part(self, read, fallback=None):
        """``read()``, or ``fallback`` when it stopped on a problem it recorded."""
        try:
            return read()
        except _Abort:
            return fallback

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError("\n".join(self.items))

    def __bool__(self) -> bool:
        return bool(self.items)


class _Section:
    """Typed access to one TOML table; problems name the file and the dotted key.  A value of
    the wrong type, or failing its check, is recorded and its default used (so the rest is
    still checked); a missing required key or a malformed table ends the part being read."""

    def __init__(self, problems: Problems, prefix: str, data: Any):
        self.problems, self.prefix, self.data = problems, prefix, data
        self.path = problems.path
        self._used: set[str] = set()
        if not isinstance(data, dict):
            problems.add(None, f"[{prefix}] must be a table")
            raise _Abort

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, message: str):
        self.problems.add(self.key(name), message)
        raise _Abort

    def note(self, name: str, message: str) -> None:
        self.problems.add(self.key(name), message)

    def get(self, name: str, kind, default=..., check=None):
        self._used.add(name)
        if name not in self.data:
            if default is ...:
                self.fail(name, "missing (required)")
            return default
        value = self.data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            return self._bad(name, f"must be {names}, not {type(value).__name__} {value!r}", default)
        if check is not None:
            problem = check(value)
            if problem:
                return self._bad(name, problem, default)
        return value

    def _bad(self, name: str, message: str, default):
        if default is ...:
            self.fail(name, message)
        self.note(name, message)
        return default

    def argv(self, name: str, default=...) -> tuple[str, ...]:
        value = self.get(name, (list, str), default)
        if isinstance(value, str):
            return (value,)
        if not all(isinstance(v, str) for v in value):
            return self._bad(name, "must be a list of strings", default)
        return tuple(value)

    def sub(self, name: str, default=...) -> _Section:
        value = self.get(name, dict, {} if default is ... else default)
        return _Section(self.problems, self.key(name), value)

    def tables(self, name: str) -> list[_Section]:
        value = self.get(name, list, [])
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_Section(self.problems, f"{self.key(name)}[{i}]", v))
            except _Abort:
                pass
        return out

    def finish(self) -> None:
        for name in sorted(set(self.data) - self._used):
            self.problems.add(None, f"unknown key {self.key(name)!r} (misspelt?)")


def _positive(value) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _port(value) -> str | None:
    return None if 0 < value < 65536 else "must be a port number 1-65535"


def _ip(value) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not an IP address"
    return None


def _interface_address(value) -> str | None:
    try:
        ipaddress.ip_interface(value)
    except ValueError:
        return f"{value!r} is not an address with prefix length (e.g. 198.51.100.100/24)"
    return None if "/" in value else "needs a prefix length (e.g. /24)"


def load(path: str) -> ClusterConfig:
    """Read and validate ``path``; raise ConfigError listing every problem, each naming the
    file and the key."""
    cfg, problems = read(path)
    problems.raise_if_any()
    assert cfg is not None
    return cfg


def read(path: str) -> tuple[ClusterConfig | None, Problems]:
    """``path`` read and validated: the configuration (None if a part of it could not be read
    at all) and every problem found (``hawrap check`` prints them all)."""
    problems = Problems(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        problems.add(None, f"cannot read the configuration: {exc.strerror}")
        return None, problems
    except tomllib.TOMLDecodeError as exc:
        problems.add(None, f"not valid TOML: {exc}")
        return None, problems
    base = os.path.dirname(os.path.abspath(path))
    top = _Section(problems, "", doc)
    # Each part is read even when an earlier one had a problem; one that cannot be read at
    # all leaves None and the configuration is not built.
    parts: dict[str, Any] = {}
    parts["cluster"] = problems.part(lambda: _cluster(top, base))
    parts["links"] = problems.part(lambda: _links(top))
    parts["nodes"] = problems.part(
        lambda: (
            _nodes(top, base, parts["links"], parts["cluster"])
            if parts["links"] and parts["cluster"]
            else None
        )
    )
    parts["timing"] = problems.part(lambda: _timing(top, parts["cluster"]))
    parts["vip"] = problems.part(lambda: _vip(top, doc, parts["timing"]))
    parts["services"] = problems.part(lambda: _services(top))
    parts["mirror"] = problems.part(lambda: _mirror(top, base, parts["links"] or []))
    parts["notify"] = problems.part(lambda: _notify(top))
    parts["etcd"] = problems.part(lambda: _etcd(top, doc, parts["cluster"]), False)
    top.finish()
    cluster = parts["cluster"]
    if (
        cluster
        and parts["nodes"]
        and cluster["home"] is not None
        and cluster["home"] not in (n.name for n in parts["nodes"])
    ):
        problems.add("cluster.home", f"{cluster['home']!r} is not one of the nodes")
    if cluster and cluster["failback"] == "auto" and cluster["home"] is None:
        problems.add("cluster.failback", '"auto" fails back to the home node: set cluster.home (without it, '
                                         "nothing would ever fail back)")  # fmt: skip
    vip = ipaddress.ip_interface(parts["vip"].address).ip if parts["vip"] else None
    if vip is not None and parts["nodes"]:
        # A node's own address as the VIP: the takeover's check would find it answered for ever.
        for node in parts["nodes"]:
            for link, address in node.addresses.items():
                if ipaddress.ip_address(address) == vip:
                    problems.add("vip.address", f"{vip} is the address of node {node.name!r} on link {link}: the VIP "
                                                "must be an address of its own, moved between the nodes")  # fmt: skip
    if cluster and parts["nodes"]:
        # A tie-breaker a node always reaches (itself, or the VIP it holds) breaks no tie.
        own = {ipaddress.ip_address(a): n.name for n in parts["nodes"] for a in n.addresses.values()}
        for ping in cluster["ping_nodes"]:
            ip = ipaddress.ip_address(ping)
            if ip in own or ip == vip:
                what = f"the address of node {own[ip]!r}" if ip in own else "the VIP"
                problems.add("cluster.ping_nodes", f"{ping} is {what}: a tie-breaker must be another host on the "
                                                   "LAN (the default gateway, say)")  # fmt: skip
    if cluster and parts["nodes"] and parts["mirror"]:
        _files_outside_trees(problems, cluster, parts["nodes"], parts["mirror"])
    if (
        any(value is None for key, value in parts.items() if key not in ("vip", "etcd"))
        or parts["etcd"] is False
    ):
        return None, problems
    return (
        ClusterConfig(
            path=path,
            nodes=tuple(parts["nodes"]),
            links=tuple(parts["links"]),
            timing=parts["timing"],
            vip=parts["vip"],
            services=tuple(parts["services"]),
            mirror=parts["mirror"],
            notify=parts["notify"],
            etcd=parts["etcd"],
            **{k: v for k, v in cluster.items() if k not in ("state_dir_template", "secret_path")},
        ),
        problems,
    )


def _cluster(top: _Section, base: str) -> dict:
    cluster = top.sub("cluster", ...)
    out = {"name": cluster.get("name", str)}
    out["secret"] = cluster.problems.part(lambda: _read_secret(base, cluster), b"")
    out["secret_path"] = _abs(base, cluster.get("secret_file", str, ""))
    out["home"] = cluster.get("home", str, None)
    out["failback"] = cluster.get(
        "failback", str, "manual", lambda v: None if v in FAILBACK_POLICIES else f"one of {FAILBACK_POLICIES}"
    )
    out["failback_delay"] = cluster.get("failback_delay", float, 10.0, _not_negative)
    ping_nodes = tuple(cluster.get("ping_nodes", list, []))
    for i, p in enumerate(ping_nodes):
        if not isinstance(p, str) or _ip(p):
            cluster.note("ping_nodes", f"entry {i} {p!r} is not an IP address")
    out["ping_nodes"] = tuple(p for p in ping_nodes if isinstance(p, str) and not _ip(p))
    out["state_dir_template"] = cluster.get("state_dir", str, "/var/lib/hawrap")
    out["standby_lock"] = cluster.get("standby_lock", str, "{state_dir}/standby.lock")
    from . import etcdconfig  # the etcd modules load only where they are used

    out["backend"] = cluster.get(
        "backend",
        str,
        "two-node",
        lambda v: None if v in etcdconfig.BACKENDS else f"one of {etcdconfig.BACKENDS}",
    )
    cluster.finish()
    return out


def _links(top: _Section) -> list[LinkConfig]:
    links = []
    for sec in top.tables("link"):
        links.append(LinkConfig(name=sec.get("name", str), port=sec.get("port", int, 694, _port)))
        sec.finish()
    if not links:
        top.fail("link", "at least one [[link]] is required (a dedicated heartbeat link and the LAN)")
    link_names = [link.name for link in links]
    if len(set(link_names)) != len(link_names):
        top.note("link", f"link names must be unique: {link_names}")
    return links


def _nodes(top: _Section, base: str, links: list[LinkConfig], cluster: dict) -> list[NodeConfig]:
    state_dir_template = cluster["state_dir_template"]
    nodes = []
    for sec in top.tables("node"):
        node_name = sec.get("name", str)
        addr_sec = sec.sub("address", ...)
        addresses = {}
        for link in links:
            addresses[link.name] = addr_sec.get(link.name, str, ..., _ip)
        for link in links:  # a copied [[node]] whose addresses were left as they were
            other = next((n.name for n in nodes if n.addresses.get(link.name) == addresses[link.name]), None)
            if other is not None:
                addr_sec.note(link.name, f"{addresses[link.name]} is also the address of node {other!r} on this link")
        addr_sec.finish()
        state_dir = sec.get(
            "state_dir",
            str,
            os.path.join(state_dir_template, "{node}")
            if "{node}" not in state_dir_template
            else state_dir_template,
        )
        nodes.append(
            NodeConfig(
                name=node_name,
                addresses=addresses,
                lan_interface=sec.get("lan_interface", str),
                state_dir=_abs(base, state_dir.replace("{node}", node_name)),
            )
        )
        sec.finish()
    if cluster["backend"] == "etcd":
        from . import etcdconfig

        try:
            etcdconfig.check_nodes(top.path, [n.name for n in nodes])
        except ConfigError as exc:
            top.problems.items.append(str(exc))
            raise _Abort from None
    elif len(nodes) != 2 or nodes[0].name == nodes[1].name:
        top.fail(
            "node", f"exactly two [[node]] tables with different names are required (found {len(nodes)})"
        )
    return nodes


def _timing(top: _Section, cluster: dict | None) -> Timing:
    t = top.sub("timing")
    timing = Timing(
        interval=t.get("interval", float, DEFAULT_INTERVAL, _positive),
        deadtime=t.get("deadtime", float, DEFAULT_DEADTIME, _positive),
        initdead=t.get("initdead", float, DEFAULT_INITDEAD, _positive),
        monitor_interval=t.get("monitor_interval", float, 2.0, _positive),
        carrier_interval=t.get("carrier_interval", float, 0.05, _positive),
        ping_interval=t.get("ping_interval", float, 0.1, _positive),
        ping_timeout=t.get("ping_timeout", float, 0.3, _positive),
        ping_failures=t.get("ping_failures", int, 3, _positive),
        handover_timeout=t.get("handover_timeout", float, 10.0, _positive),
        lan_hold=t.get("lan_hold", float, 1.0, _positive),
        watchdog=t.get("watchdog", float, 2.0, _positive),
        realtime_priority=t.get(
            "realtime_priority", int, 50, lambda v: None if 0 <= v <= 99 else "must be 0-99"
        ),
        mlock=t.get("mlock", bool, True),
    )
    t.finish()
    if cluster and cluster["ping_nodes"] and timing.ping_interval > (timing.deadtime - timing.interval) / 2:
        t.note(
            "ping_interval",
            f"{timing.ping_interval} must be at most half of deadtime - interval "
            f"({timing.deadtime - timing.interval:g}): a takeover waits for a ping answer to a probe "
            "sent after the peer fell silent",
        )
    if timing.watchdog < 2 * timing.deadtime:
        t.note(
            "watchdog",
            f"{timing.watchdog} must be at least twice timing.deadtime ({timing.deadtime}): the "
            "heartbeat process is judged frozen after that long",
        )
    if timing.deadtime < 2 * timing.interval:
        t.note(
            "deadtime",
            f"{timing.deadtime} must be at least twice timing.interval ({timing.interval}), or a "
            "single lost packet is a failover",
        )
    return timing


def _vip(top: _Section, doc: dict, timing: Timing | None) -> VipConfig | None:
    if "vip" not in doc:
        return None
    v = top.sub("vip")
    vip = VipConfig(
        address=v.get("address", str, ..., _interface_address),
        interface=v.get("interface", str, None),
        kind=v.get("kind", str, "ip", lambda k: None if k in VIP_KINDS else f"one of {VIP_KINDS}"),
        dad_timeout=v.get("dad_timeout", float, 0.05, _positive),
        garp_count=v.get("garp_count", int, 3, _positive),
        garp_interval=v.get("garp_interval", float, 0.5, _positive),
        arping=v.get(
            "arping",
            str,
            "builtin",
            lambda k: None if k in ARPING_FLAVOURS else f"one of {ARPING_FLAVOURS}",
        ),
        lifetime=v.get("lifetime", int, 0, lambda x: None if x >= 0 else "must be >= 0"),
    )
    v.finish()
    if vip.kind == "ip" and ipaddress.ip_interface(vip.address).version == 6:
        # Takeover checks the address with ARP and announces it with gratuitous ARP: IPv4 only.
        v.note("address", f"{vip.address} is IPv6, but hawrap announces a VIP with ARP (IPv4) only")
    if timing is not None and vip.lifetime and vip.lifetime < 2 * timing.monitor_interval:
        v.note(
            "lifetime",
            f"{vip.lifetime} must be at least twice timing.monitor_interval "
            f"({timing.monitor_interval:g}), which is how often the address is renewed",
        )
    return vip


def _services(top: _Section) -> list[ServiceConfig]:
    services = []
    for sec in top.tables("service"):
        service = sec.problems.part(functools.partial(_service, sec))
        if service is not None and any(other.name == service.name for other in services):
            # a [[service]] copied and its name (and most likely its commands) left as they were
            sec.note("name", f"another service is named {service.name!r}")
        sec.finish()
        if service is not None:
            services.append(service)
    return services


def _service(sec: _Section) -> ServiceConfig:
    return ServiceConfig(
        name=sec.get("name", str),
        start=sec.argv("start"),
        stop=sec.argv("stop"),
        monitor=sec.argv("monitor"),
        timeout=sec.get("timeout", float, 20.0, _positive),
        shell=sec.get("shell", bool, False),
    )


def _mirror(top: _Section, base: str, links: list[LinkConfig]) -> MirrorConfig:
    m = top.sub("mirror")
    link_names = [link.name for link in links]
    trees = []
    for sec in m.tables("tree"):
        tree = TreeConfig(
            name=sec.get("name", str, ..., module_name_problem),  # also the receiver's module name
            # Absolute: the mirror processes hawrap starts do not run where the file was written.
            path=os.path.normpath(sec.get("path", str, ..., _absolute)),
            lock_file=sec.get("lock_file", str, ..., _absolute),
            state_dir=sec.get("state_dir", str, None, _absolute),
            require_mount=sec.get("require_mount", bool, False),
        )
        for other in trees:
            _apart_from(sec, tree, other)
        trees.append(tree)
        sec.finish()
    defaults = MirrorConfig()
    mirror = MirrorConfig(
        command=m.argv("command", ("mirror",)),
        secret_file=_opt_abs(base, m.get("secret_file", str, None)),
        port=m.get("port", int, 8730, _port),
        link=m.get(
            "link", str, None, lambda v: None if v in link_names else f"not one of the links {link_names}"
        ),
        sync=m.argv("sync", defaults.sync),
        serve=m.argv("serve", defaults.serve),
        daemon=m.argv("daemon", defaults.daemon),
        trees=tuple(trees),
        max_lag=m.get("max_lag", float, defaults.max_lag, _positive),
        alert_after=m.get("alert_after", float, defaults.alert_after, _positive),
        reconcile_interval=m.get("reconcile_interval", float, defaults.reconcile_interval, _not_negative),
    )
    m.finish()
    if trees and mirror.secret_file is None:
        m.note("secret_file", "mirror.secret_file is required when [[mirror.tree]] entries exist")
    return mirror


def _apart_from(sec: _Section, tree: TreeConfig, other: TreeConfig) -> None:
    """Two trees are mirrored by two daemons into two receivers' modules: one name each, and
    neither inside the other (the outer tree's sessions would overwrite and delete what the
    inner's write, and both would claim the same files), nor one state dir for both."""
    if tree.name == other.name:
        sec.note("name", f"another tree is named {tree.name!r}")
    path, theirs = os.path.normpath(tree.path), os.path.normpath(other.path)
    if path == theirs:
        sec.note("path", f"tree {other.name!r} is {tree.path} too")
    elif os.path.isabs(path) == os.path.isabs(theirs) and os.path.commonpath([path, theirs]) in (path, theirs):
        inner, outer = (tree, other) if len(path) > len(theirs) else (other, tree)
        sec.note("path", f"tree {inner.name!r} ({inner.path}) lies inside tree {outer.name!r} ({outer.path}): "
                         "each tree needs a directory of its own")  # fmt: skip
    if tree.state_dir and other.state_dir and os.path.normpath(tree.state_dir) == os.path.normpath(other.state_dir):
        sec.note("state_dir", f"tree {other.name!r} keeps its state in {tree.state_dir} too")


def _files_outside_trees(problems: Problems, cluster: dict, nodes: list[NodeConfig], mirror: MirrorConfig) -> None:
    """hawrap's own files must not lie in a mirrored tree: the primary's daemon would send its
    copy to the peer, whose receiver overwrites the peer's own (its epoch, state, standby
    lock, a tree's mirroring lock or journal) or, the file being only there, deletes it; and
    a secret there is served with the tree's files.  A tree's own state dir inside it is left
    out of its mirroring, as ``.mirror`` is.  Each node's paths are checked as it resolves
    them (``{node}`` replaced)."""
    secrets = [("cluster.secret_file", cluster["secret_path"]), ("mirror.secret_file", mirror.secret_file)]
    lines: dict[tuple[int, str], None] = {}  # in order, each once: most paths are the same for both nodes
    for n in nodes:
        def at(path, n=n):
            return path.replace("{node}", n.name) if path else path

        files = [(f"the state_dir of node {n.name!r}", n.state_dir),
                 (f"the standby_lock of node {n.name!r}",
                  at(cluster["standby_lock"].replace("{state_dir}", n.state_dir)))]  # fmt: skip
        files += [(f"the lock_file of tree {t.name!r}", at(t.lock_file)) for t in mirror.trees]
        for i, tree in enumerate(mirror.trees):
            theirs = [(f"the state_dir of tree {t.name!r}", at(t.state_dir)) for t in mirror.trees if t is not tree]
            said: list[str] = []
            for what, path in files + theirs + secrets:
                if not path or not _lexically_below(at(tree.path), path) or any(_lexically_below(p, path) for p in said):
                    continue  # one line for a state dir, not one more for each file in it
                said.append(path)
                why = ("whoever the tree's files are served to could read it, and the mirror copies it to the peer"
                       if (what, path) in secrets else
                       "the mirror would copy it to the peer, replacing the peer's own or deleting it")  # fmt: skip
                lines[i, f"{what} ({path}) lies inside the tree {at(tree.path)}: {why}; keep hawrap's files "
                         "outside the mirrored trees"] = None  # fmt: skip
    for i, text in lines:
        problems.add(f"mirror.tree[{i}].path", text)


def _lexically_below(outer: str, inner: str) -> bool:
    """Whether the absolute path ``inner`` is ``outer`` or lies inside it, as written."""
    outer, inner = os.path.normpath(outer), os.path.normpath(inner)
    return os.path.isabs(inner) and os.path.commonpath([outer, inner]) == outer


def _notify(top: _Section) -> NotifyConfig:
    n = top.sub("notify")
    notify = NotifyConfig(
        command=n.argv("command", ()),
        smtp_host=n.get("smtp_host", str, None),
        smtp_port=n.get("smtp_port", int, 25, _port),
        mail_from=n.get("mail_from", str, "hawrap@localhost"),
        mail_to=tuple(n.get("mail_to", list, [])),
        timeout=n.get("timeout", float, 10.0, _positive),
    )
    n.finish()
    if notify.smtp_host and not notify.mail_to:
        n.note("mail_to", "notify.mail_to is required with notify.smtp_host")
    return notify


def _etcd(top: _Section, doc: dict, cluster: dict | None):
    """The ``[etcd]`` table, parsed by hawrap.etcdconfig; None with the two-node backend."""
    if cluster is None or cluster["backend"] != "etcd":
        if "etcd" in doc:
            top.note("etcd", '[etcd] is only used with cluster.backend = "etcd"')
        top.sub("etcd", {})  # marks the key as read
        return None
    from . import etcdconfig

    try:
        return etcdconfig.parse(top.sub("etcd", ...), cluster["name"], top.path)
    except ConfigError as exc:
        top.problems.items.append(str(exc))
        raise _Abort from None


def _absolute(path: str) -> str | None:
    return None if os.path.isabs(path) else f"{path!r} must be an absolute path"


def _abs(base: str, p: str) -> str:
    return os.path.normpath(os.path.join(base, p))


def _opt_abs(base: str, p: str | None) -> str | None:
    return None if p is None else _abs(base, p)


def _read_secret(base: str, cluster: _Section) -> bytes:
    secret_file = cluster.get("secret_file", str)
    try:
        return read_secret_file(_abs(base, secret_file))
    except MirrorError as exc:
        cluster.fail("secret_file", str(exc))
