"""Configuration files (TOML), loaded into frozen dataclasses and validated on load.

Every message names the file and the key, so a typo is found before the service starts.
``examples/mirror-serve.toml`` is the annotated example for ``mirror serve --config``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass

from .errors import ConfigError
from .protocol import load_secret
from .receiver import ModuleConfig

DEFAULT_LISTEN = "0.0.0.0:8730"


@dataclass(frozen=True)
class ServeConfig:
    listen: tuple[str, int]
    modules: dict[str, ModuleConfig]
    max_connections: int = 64


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
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self.file}: {self._name(key)!r} must be a {kind.__name__}, got {value!r}")
        return value


def load_serve_config(path: str) -> ServeConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    top = _Table(data, path, "", {"listen", "secret_file", "lock_file", "max_connections", "modules"})
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
        t = _Table(table, path, f"modules.{name}.", {"path", "secret_file", "lock_file", "read_only", "state_dir"})
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
        )  # fmt: skip
    max_conn = top.get("max_connections", int, 64)
    if max_conn < 1:
        raise ConfigError(f"{path}: 'max_connections' must be at least 1")
    return ServeConfig(listen=listen, modules=modules, max_connections=max_conn)
