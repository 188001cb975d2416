"""hawrap's configuration: one TOML file describes both nodes, so the same file is installed
on each and ``--node NAME`` says which one this is.

Loaded into frozen dataclasses and validated at once; every message names the file and the
key.  ``{node}`` in a path is replaced by the node's name (both nodes can then run on one
machine, as in the tests and the demo).  See ``examples/hawrap.toml`` for every key.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

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
    )  # fmt: skip
    trees: tuple[TreeConfig, ...] = ()
    # The replica counts as up to date (the standby may take over on its own) while the
    # daemon is live and less than this many seconds behind; more, and it is outdated.
    max_lag: float = 2.0
    # Replication not live for this long while the peer could receive: the administrator is told.
    alert_after: float = 10.0


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


class _Section:
    """Typed access to one TOML table; errors name the file and the dotted key."""

    def __init__(self, path: str, prefix: str, data: Any):
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [{prefix}] must be a table")
        self.path, self.prefix, self.data = path, prefix, data
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, message: str):
        raise ConfigError(f"{self.path}: {self.key(name)}: {message}")

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
            self.fail(name, f"must be {names}, not {type(value).__name__} {value!r}")
        if check is not None:
            problem = check(value)
            if problem:
                self.fail(name, problem)
        return value

    def argv(self, name: str, default=...) -> tuple[str, ...]:
        value = self.get(name, (list, str), default)
        if isinstance(value, str):
            return (value,)
        if not all(isinstance(v, str) for v in value):
            self.fail(name, "must be a list of strings")
        return tuple(value)

    def sub(self, name: str, default=...) -> _Section:
        value = self.get(name, dict, {} if default is ... else default)
        return _Section(self.path, self.key(name), value)

    def tables(self, name: str) -> list[_Section]:
        value = self.get(name, list, [])
        return [_Section(self.path, f"{self.key(name)}[{i}]", v) for i, v in enumerate(value)]

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._used)
        if unknown:
            raise ConfigError(f"{self.path}: unknown key {self.key(unknown[0])!r} (misspelt?)")


def _positive(value) -> str | None:
    return None if value > 0 else "must be greater than 0"


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
    """Read and validate ``path``; raise ConfigError naming the file and key on any problem."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    base = os.path.dirname(os.path.abspath(path))
    top = _Section(path, "", doc)

    cluster = top.sub("cluster", ...)
    name = cluster.get("name", str)
    secret = _read_secret(path, base, cluster)
    home = cluster.get("home", str, None)
    failback = cluster.get(
        "failback", str, "manual", lambda v: None if v in FAILBACK_POLICIES else f"one of {FAILBACK_POLICIES}"
    )
    failback_delay = cluster.get("failback_delay", float, 10.0)
    ping_nodes = tuple(cluster.get("ping_nodes", list, []))
    for i, p in enumerate(ping_nodes):
        if not isinstance(p, str) or _ip(p):
            cluster.fail("ping_nodes", f"entry {i} {p!r} is not an IP address")
    state_dir_template = cluster.get("state_dir", str, "/var/lib/hawrap")
    standby_lock = cluster.get("standby_lock", str, "{state_dir}/standby.lock")
    from . import etcdconfig

    backend = cluster.get(
        "backend",
        str,
        "two-node",
        lambda v: None if v in etcdconfig.BACKENDS else f"one of {etcdconfig.BACKENDS}",
    )
    cluster.finish()

    links = []
    for sec in top.tables("link"):
        links.append(LinkConfig(name=sec.get("name", str), port=sec.get("port", int, 694, _port)))
        sec.finish()
    if not links:
        raise ConfigError(
            f"{path}: at least one [[link]] is required (a dedicated heartbeat link and the LAN)"
        )
    link_names = [link.name for link in links]
    if len(set(link_names)) != len(link_names):
        raise ConfigError(f"{path}: link names must be unique: {link_names}")

    nodes = []
    for sec in top.tables("node"):
        node_name = sec.get("name", str)
        addr_sec = sec.sub("address", ...)
        addresses = {}
        for link in links:
            addresses[link.name] = addr_sec.get(link.name, str, ..., _ip)
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
    if backend == "etcd":
        etcdconfig.check_nodes(path, [n.name for n in nodes])
    elif len(nodes) != 2 or nodes[0].name == nodes[1].name:
        raise ConfigError(
            f"{path}: exactly two [[node]] tables with different names are required (found {len(nodes)})"
        )
    if home is not None and home not in (n.name for n in nodes):
        raise ConfigError(f"{path}: cluster.home: {home!r} is not one of the nodes")

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
    if ping_nodes and timing.ping_interval > (timing.deadtime - timing.interval) / 2:
        raise ConfigError(
            f"{path}: timing.ping_interval ({timing.ping_interval}) must be at most half of "
            f"deadtime - interval ({timing.deadtime - timing.interval:g}): a takeover waits for a ping "
            "answer to a probe sent after the peer fell silent"
        )
    if timing.watchdog < 2 * timing.deadtime:
        raise ConfigError(
            f"{path}: timing.watchdog ({timing.watchdog}) must be at least twice timing.deadtime "
            f"({timing.deadtime}): the heartbeat process is judged frozen after that long"
        )
    if timing.deadtime < 2 * timing.interval:
        raise ConfigError(
            f"{path}: timing.deadtime ({timing.deadtime}) must be at least twice timing.interval "
            f"({timing.interval}), or a single lost packet is a failover"
        )

    vip = None
    if "vip" in doc:
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
    else:
        top.get("vip", dict, None)

    if vip is not None and vip.lifetime and vip.lifetime < 2 * timing.monitor_interval:
        raise ConfigError(
            f"{path}: vip.lifetime ({vip.lifetime}) must be at least twice timing.monitor_interval "
            f"({timing.monitor_interval:g}), which is how often the address is renewed"
        )

    services = []
    for sec in top.tables("service"):
        services.append(
            ServiceConfig(
                name=sec.get("name", str),
                start=sec.argv("start"),
                stop=sec.argv("stop"),
                monitor=sec.argv("monitor"),
                timeout=sec.get("timeout", float, 20.0, _positive),
                shell=sec.get("shell", bool, False),
            )
        )
        sec.finish()

    m = top.sub("mirror")
    trees = []
    for sec in m.tables("tree"):
        trees.append(
            TreeConfig(
                name=sec.get("name", str),
                path=sec.get("path", str),
                lock_file=sec.get("lock_file", str),
                state_dir=sec.get("state_dir", str, None),
            )
        )
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
    )
    m.finish()
    if trees and mirror.secret_file is None:
        raise ConfigError(f"{path}: mirror.secret_file is required when [[mirror.tree]] entries exist")

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
        raise ConfigError(f"{path}: notify.mail_to is required with notify.smtp_host")
    etcd = etcdconfig.parse(top.sub("etcd", ...), name, path) if backend == "etcd" else None
    if etcd is None and "etcd" in doc:
        raise ConfigError(f'{path}: [etcd] is only used with cluster.backend = "etcd"')
    top.finish()

    return ClusterConfig(
        path=path,
        name=name,
        secret=secret,
        nodes=tuple(nodes),
        links=tuple(links),
        ping_nodes=ping_nodes,
        home=home,
        failback=failback,
        failback_delay=failback_delay,
        timing=timing,
        vip=vip,
        services=tuple(services),
        mirror=mirror,
        notify=notify,
        standby_lock=standby_lock,
        backend=backend,
        etcd=etcd,
    )


def _abs(base: str, p: str) -> str:
    return os.path.normpath(os.path.join(base, p))


def _opt_abs(base: str, p: str | None) -> str | None:
    return None if p is None else _abs(base, p)


def _read_secret(path: str, base: str, cluster: _Section) -> bytes:
    secret_file = cluster.get("secret_file", str)
    full = _abs(base, secret_file)
    try:
        with open(full, "rb") as f:
            secret = f.read(4097).strip()
    except OSError as exc:
        cluster.fail("secret_file", f"cannot read {full}: {exc.strerror}")
    if len(secret) < 16:
        cluster.fail(
            "secret_file",
            f"{full} holds {len(secret)} bytes; at least 16 are needed (e.g. head -c 32 /dev/urandom | base64)",
        )
    if len(secret) > 4096:
        cluster.fail("secret_file", f"{full} is larger than 4096 bytes")
    return secret
