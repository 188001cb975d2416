"""Configuration files (TOML), loaded into frozen dataclasses and validated on load.

Every message names the file and the key, so a typo is found before the service starts.
``examples/mirror-serve.toml`` is the annotated example for ``mirror serve --config``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass

from .errors import ConfigError
from .privileges import Privileges
from .protocol import load_secret
from .receiver import ModuleConfig

DEFAULT_LISTEN = "0.0.0.0:8730"


@dataclass(frozen=True)
class ServeConfig:
    listen: tuple[str, int]
    modules: dict[str, ModuleConfig]
    max_connections: int = 64
    timeout: float | None = None


def parse_listen(text: str, where: str = "--listen") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{where}: expected ADDR:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Table:
    """Typed access to one TOML table with key-naming errors; unknown keys are refused."""

    def __init__(self, data: dict, file: str, prefix: str, allowed: set[str]):
        self.data, self.file, self.prefix = data, file, prefix
        unknown = set(data) - allowed
        if unknown:
            raise ConfigError(f"{file}: unknown key {self._name(sorted(unknown)[0])!r} "
                              f"(allowed: {', '.join(sorted(allowed))})")  # fmt: skip

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def get(self, key: str, kind: type, default=None, required: bool = False):
        if key not in self.data:
            if required:
                raise ConfigError(f"{self.file}: missing required key {self._name(key)!r}")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self.file}: {self._name(key)!r} must be a {names}, got {value!r}")
        return value


def load_serve_config(path: str) -> ServeConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    top = _Table(data, path, "", {"listen", "secret_file", "lock_file", "max_connections", "timeout", "modules"})
    listen = parse_listen(top.get("listen", str, DEFAULT_LISTEN), f"{path}: 'listen'")
    default_secret = top.get("secret_file", str)
    default_lock = top.get("lock_file", str)
    modules_table = top.get("modules", dict, required=True)
    if not modules_table:
        raise ConfigError(f"{path}: [modules] must define at least one module")
    modules = {}
    for name, table in modules_table.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: 'modules.{name}' must be a table")
        t = _Table(table, path, f"modules.{name}.", {"path", "secret_file", "lock_file", "read_only", "state_dir",
                                                      "allow_devices", "allow_specials", "allow_setid", "keep_owners"})  # fmt: skip
        module_path = t.get("path", str, required=True)
        if not os.path.isabs(module_path):
            raise ConfigError(f"{path}: 'modules.{name}.path' must be absolute, got {module_path!r}")
        secret_file = t.get("secret_file", str, default_secret)
        if secret_file is None:
            raise ConfigError(f"{path}: module {name!r} has no secret_file (set it for the module or at the top)")
        lock = t.get("lock_file", str, default_lock)
        state_dir = t.get("state_dir", str)
        modules[name] = ModuleConfig(
            name=name, path=os.fsencode(module_path), secret=load_secret(secret_file),
            lock_file=os.fsencode(lock) if lock else None, read_only=t.get("read_only", bool, False),
            state_dir=os.fsencode(state_dir) if state_dir else None,
            privileges=Privileges(devices=t.get("allow_devices", bool, False), specials=t.get("allow_specials", bool, False),
                                  setid=t.get("allow_setid", bool, False), owners=t.get("keep_owners", bool, False)),
        )  # fmt: skip
    max_conn = top.get("max_connections", int, 64)
    if max_conn < 1:
        raise ConfigError(f"{path}: 'max_connections' must be at least 1")
    timeout = top.get("timeout", (int, float))
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"{path}: 'timeout' must be positive")
    return ServeConfig(listen=listen, modules=modules, max_connections=max_conn, timeout=timeout)


def load_daemon_config(path: str):
    """``mirror daemon --config FILE``: see examples/mirror-daemon.toml."""
    from .daemon import DaemonConfig, PairConfig
    from .statedir import default_state_dir
    from .transfer import DEFAULT_CONTIMEOUT, DEFAULT_TIMEOUT

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    top = _Table(data, path, "", {"daemon", "pair"})
    daemon = _Table(top.get("daemon", dict, {}), path, "daemon.",
                    {"status_dir", "coalesce_ms", "open_file_delay", "metrics", "reconcile_interval", "timeout",
                     "contimeout"})  # fmt: skip
    timeouts = {}
    for key, default in (("timeout", DEFAULT_TIMEOUT), ("contimeout", DEFAULT_CONTIMEOUT)):
        value = daemon.get(key, (int, float), default)
        if value < 0:
            raise ConfigError(f"{path}: 'daemon.{key}' must be 0 (none) or more seconds, got {value}")
        timeouts[key] = float(value)
    pairs_data = top.get("pair", list, required=True)
    if not pairs_data:
        raise ConfigError(f"{path}: at least one [[pair]] is required")
    pairs = []
    for i, table in enumerate(pairs_data):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: 'pair[{i}]' must be a table")
        t = _Table(table, path, f"pair[{i}].",
                   {"name", "source", "destination", "secret_file", "lock_file", "state_dir", "exclude", "delete",
                    "max_delete", "allow_mass_delete"})  # fmt: skip
        source = t.get("source", str, required=True)
        if not os.path.isabs(source):
            raise ConfigError(f"{path}: 'pair[{i}].source' must be absolute, got {source!r}")
        excludes = t.get("exclude", list, [])
        if not all(isinstance(x, str) for x in excludes):
            raise ConfigError(f"{path}: 'pair[{i}].exclude' must be a list of strings")
        name = t.get("name", str, os.path.basename(source.rstrip("/")) or f"pair{i}")
        if any(p.name == name for p in pairs):
            raise ConfigError(f"{path}: two pairs are named {name!r} (set 'name')")
        lock, state = t.get("lock_file", str), t.get("state_dir", str)
        max_delete = t.get("max_delete", int)
        if max_delete is not None and max_delete < 0:
            raise ConfigError(f"{path}: 'pair[{i}].max_delete' must be 0 or more, got {max_delete}")
        pairs.append(PairConfig(
            name=name, source=os.fsencode(source), destination=t.get("destination", str, required=True),
            secret_file=t.get("secret_file", str), lock_file=os.fsencode(lock) if lock else None,
            state_dir=os.fsencode(state) if state else None, excludes=tuple(os.fsencode(x) for x in excludes),
            delete=t.get("delete", bool, True), max_delete=max_delete,
            allow_mass_delete=t.get("allow_mass_delete", bool, False), **timeouts,
        ))  # fmt: skip
    metrics = daemon.get("metrics", str)
    status_dir = daemon.get("status_dir", str)
    return DaemonConfig(
        pairs=tuple(pairs),
        status_dir=os.fsencode(status_dir) if status_dir else default_state_dir(pairs[0].source),
        coalesce=daemon.get("coalesce_ms", (int, float), 0.5) / 1000,
        open_file_delay=float(daemon.get("open_file_delay", (int, float), 1.0)),
        metrics=parse_listen(metrics, f"{path}: 'daemon.metrics'") if metrics else None,
        reconcile_interval=daemon.get("reconcile_interval", (int, float)),
    )
