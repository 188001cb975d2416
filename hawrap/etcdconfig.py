"""The ``[etcd]`` table of hawrap's configuration (``[cluster] backend = "etcd"``).

Parsed here, beside the etcd modules, so that ``hawrap.config`` only calls ``parse`` and keeps
the result.  Every message names the file and the key; the connection and the timing are
checked by the same rules the leadership applies at start (``EtcdConnection.check``,
``Timing.check``: the minimum safe TTL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError
from .etcdclient import EtcdConnection
from .leadership import Keys, Timing, check_name

BACKENDS = ("two-node", "etcd")


@dataclass(frozen=True)
class EtcdSettings:
    conn: EtcdConnection
    timing: Timing
    prefix: str


def _abs(base: str, p: str | None) -> str | None:
    return None if p is None else os.path.normpath(os.path.join(base, p))


def parse(section, cluster_name: str, path: str) -> EtcdSettings:
    """``section``: the ``[etcd]`` table (``hawrap.config._Section``)."""
    base = os.path.dirname(os.path.abspath(path))
    endpoints = section.get("endpoints", list)
    if not all(isinstance(e, str) for e in endpoints):
        section.fail("endpoints", "must be a list of strings (http://HOST:PORT)")
    positive = lambda v: None if v > 0 else "must be greater than 0"  # noqa: E731
    conn = EtcdConnection(
        endpoints=tuple(endpoints),
        ca_file=_abs(base, section.get("ca_file", str, None)),
        cert_file=_abs(base, section.get("cert_file", str, None)),
        key_file=_abs(base, section.get("key_file", str, None)),
        user=section.get("user", str, None),
        password_file=_abs(base, section.get("password_file", str, None)),
        request_timeout=section.get("request_timeout", float, 0.5, positive),
    )
    keepalive = section.get("keepalive_interval", float, None, positive)
    initdead = section.get("initdead", float, None, lambda v: None if v >= 0 else "must not be negative")
    timing = Timing(
        ttl=section.get("ttl", int, 10, lambda v: None if v >= 1 else "must be at least 1 (seconds)"),
        stop_budget=section.get("stop_budget", float, 1.0, positive),
        keepalive_interval=keepalive,
        poll_interval=section.get("poll_interval", float, 0.1, positive),
        handover_timeout=section.get("handover_timeout", float, 30.0, positive),
        initdead=initdead,
    )
    prefix = section.get("prefix", str, f"/hamirror/{cluster_name}")
    section.finish()
    try:
        Keys(prefix)
        conn.check()
        timing.check(conn)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return EtcdSettings(conn, timing, prefix)


def check_nodes(path: str, names: list[str]) -> None:
    """etcd mode: two or more nodes (three recommended), each name usable in an etcd key."""
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"{path}: backend etcd needs two or more [[node]] tables with different names")
    for name in names:
        try:
            check_name(name)
        except ConfigError as exc:
            raise ConfigError(f"{path}: [[node]] {exc}") from None
