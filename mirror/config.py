"""Configuration files (TOML), loaded into frozen dataclasses and validated on load.

Every message names the file and the key, so a typo is found before the service starts.
``examples/mirror-serve.toml`` is the annotated example for ``mirror serve --config``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass

from .apply import ModuleConfig
from .errors import ConfigError, MirrorError
from .exclude import pattern_problem
from .privileges import Privileges
from .secretfile import read_secret_file

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


class Problems:
    """Every problem found in one configuration file, each ``FILE: message naming the key``:
    the whole file is read so that all of them are reported at once."""

    def __init__(self, file: str):
        self.file = file
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(f"{self.file}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError("\n".join(self.items))


class _Table:
    """Typed access to one TOML table with key-naming problems; unknown keys are problems.
    A value of the wrong type is recorded and reads as None (or the default), so the rest of
    the file is still checked."""

    def __init__(self, data: dict, problems: Problems, prefix: str, allowed: set[str]):
        self.data, self.problems, self.prefix = data, problems, prefix
        for key in sorted(set(data) - allowed):
            problems.add(f"unknown key {self._name(key)!r} (allowed: {', '.join(sorted(allowed))})")

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def get(self, key: str, kind: type, default=None, required: bool = False):
        if key not in self.data:
            if required:
                self.problems.add(f"missing required key {self._name(key)!r}")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            names = " or ".join(k.__name__ for k in kinds)
            self.problems.add(f"{self._name(key)!r} must be a {names}, got {value!r}")
            return None if required else default
        return value

    def path(self, key: str, default=None, required: bool = False) -> str | None:
        """A path: absolute, since a relative one would name another place for a service
        (started in ``/``) than for the same file run by hand."""
        value = self.get(key, str, default, required)
        if key in self.data and value is not None and not os.path.isabs(value):
            self.problems.add(f"{self._name(key)!r} must be absolute, got {value!r}")
            return None
        return value


def module_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a module (None: it can): clients name it in
    ``mirror://HOST/MODULE[/SUBPATH]`` and ``--module NAME=PATH`` splits at the first ``=``."""
    if not name or any(c in name for c in "/=") or not name.isprintable() or name != name.strip():
        return f"{name!r} cannot name a module: it must be printable, not empty, with no '/', '=' or outer blanks"
    return None


def _toml(path: str, problems: Problems) -> dict | None:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        problems.add(f"cannot read: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        problems.add(f"invalid TOML: {exc}")
    return None


def _listen(text: str, problems: Problems, key: str) -> tuple[str, int] | None:
    try:
        return parse_listen(text, f"{problems.file}: {key!r}")
    except ConfigError as exc:
        problems.items.append(str(exc))
        return None


def load_serve_config(path: str) -> ServeConfig:
    """``mirror serve --config FILE``; ConfigError lists every problem of the file."""
    config, problems = read_serve_config(path)
    problems.raise_if_any()
    return config


def read_serve_config(path: str) -> tuple[ServeConfig | None, Problems]:
    """The configuration (as far as it could be read; None if not at all) and every problem
    found: only a configuration without problems may be used."""
    problems = Problems(path)
    data = _toml(path, problems)
    if data is None:
        return None, problems
    top = _Table(data, problems, "", {"listen", "secret_file", "lock_file", "max_connections", "timeout", "modules"})
    listen = _listen(top.get("listen", str, DEFAULT_LISTEN), problems, "listen")
    default_secret = top.path("secret_file")
    default_lock = top.path("lock_file")
    modules_table = top.get("modules", dict, required=True)
    if modules_table == {}:
        problems.add("[modules] must define at least one module")
    modules = {}
    secrets: dict[str, bytes | None] = {}
    for name, table in (modules_table or {}).items():
        if not isinstance(table, dict):
            problems.add(f"'modules.{name}' must be a table")
            continue
        if problem := module_name_problem(name):
            problems.add(f"'modules.{name}': {problem}")
        t = _Table(table, problems, f"modules.{name}.", {"path", "secret_file", "lock_file", "read_only", "state_dir",
                                                          "allow_devices", "allow_specials", "allow_setid",
                                                          "keep_owners", "require_mount"})  # fmt: skip
        module_path = t.path("path", required=True)
        secret_file = t.path("secret_file", default_secret)
        secret = None
        if secret_file is None:
            if "secret_file" not in table and "secret_file" not in data:  # else refused above, as written
                problems.add(f"module {name!r} has no secret_file (set it for the module or at the top)")
        else:
            key = f"modules.{name}.secret_file" if "secret_file" in table else "secret_file"
            if secret_file not in secrets:  # a shared file is read (and reported) once
                try:
                    secrets[secret_file] = read_secret_file(secret_file)
                except MirrorError as exc:
                    secrets[secret_file] = None
                    problems.add(f"{key!r}: {exc}")
            secret = secrets[secret_file]
        lock = t.path("lock_file", default_lock)
        state_dir = t.path("state_dir")
        privileges = Privileges(devices=t.get("allow_devices", bool, False), specials=t.get("allow_specials", bool, False),
                                setid=t.get("allow_setid", bool, False), owners=t.get("keep_owners", bool, False))  # fmt: skip
        read_only = t.get("read_only", bool, False)
        require_mount = t.get("require_mount", bool, False)
        if module_path is None:
            continue
        modules[name] = ModuleConfig(
            name=name, path=os.fsencode(module_path), secret=secret or b"",
            lock_file=os.fsencode(lock) if lock else None, read_only=read_only,
            state_dir=os.fsencode(state_dir) if state_dir else None, privileges=privileges,
            require_mount=require_mount,
        )  # fmt: skip
    max_conn = top.get("max_connections", int, 64)
    if max_conn < 1:
        problems.add("'max_connections' must be at least 1")
    timeout = top.get("timeout", (int, float))
    if timeout is not None and timeout <= 0:
        problems.add("'timeout' must be positive")
    if listen is None or not modules:
        return None, problems
    # With problems, what could be read is still returned: ``--check`` looks at this host for it.
    return ServeConfig(listen=listen, modules=modules, max_connections=max_conn, timeout=timeout), problems


def _is_local_destination(text: str) -> bool:
    """Whether a pair's ``destination`` is a local directory (only one may require a mount)."""
    from .transfer import parse_destination

    try:
        return parse_destination(text).kind == "local"
    except MirrorError:
        return True  # a bad destination is reported where it is used


def load_daemon_config(path: str):
    """``mirror daemon --config FILE``: see examples/mirror-daemon.toml.  ConfigError lists
    every problem of the file."""
    config, problems = read_daemon_config(path)
    problems.raise_if_any()
    return config


def read_daemon_config(path: str):
    """The daemon's configuration (as far as it could be read; None if not at all) and every
    problem found: only a configuration without problems may be used."""
    from .daemon import DaemonConfig, PairConfig
    from .statedir import default_state_dir
    from .transfer import DEFAULT_CONTIMEOUT, DEFAULT_TIMEOUT

    problems = Problems(path)
    data = _toml(path, problems)
    if data is None:
        return None, problems
    top = _Table(data, problems, "", {"daemon", "pair"})
    daemon = _Table(top.get("daemon", dict, {}), problems, "daemon.",
                    {"status_dir", "coalesce_ms", "open_file_delay", "metrics", "reconcile_interval", "timeout",
                     "contimeout", "journal_retain"})  # fmt: skip
    timeouts = {}
    for key, default in (("timeout", DEFAULT_TIMEOUT), ("contimeout", DEFAULT_CONTIMEOUT)):
        value = daemon.get(key, (int, float), default)
        if value < 0:
            problems.add(f"'daemon.{key}' must be 0 (none) or more seconds, got {value}")
        timeouts[key] = float(value)
    pairs_data = top.get("pair", list, required=True)
    if pairs_data == []:
        problems.add("at least one [[pair]] is required")
    pairs = []
    for i, table in enumerate(pairs_data or ()):
        if not isinstance(table, dict):
            problems.add(f"'pair[{i}]' must be a table")
            continue
        t = _Table(table, problems, f"pair[{i}].",
                   {"name", "source", "destination", "secret_file", "lock_file", "state_dir", "exclude", "delete",
                    "max_delete", "allow_mass_delete", "rsh", "remote_command", "dst_require_mount"})  # fmt: skip
        source = t.path("source", required=True)
        excludes = t.get("exclude", list, [])
        if not all(isinstance(x, str) for x in excludes):
            problems.add(f"'pair[{i}].exclude' must be a list of strings")
            excludes = []
        elif problem := pattern_problem([os.fsencode(x) for x in excludes]):
            problems.add(f"'pair[{i}].exclude': {problem}")
        name = t.get("name", str, os.path.basename((source or "").rstrip("/")) or f"pair{i}")
        if any(p.name == name for p in pairs):
            problems.add(f"two pairs are named {name!r} (set 'name')")
        lock, state = t.path("lock_file"), t.path("state_dir")
        max_delete = t.get("max_delete", int)
        if max_delete is not None and max_delete < 0:
            problems.add(f"'pair[{i}].max_delete' must be 0 or more, got {max_delete}")
        destination = t.get("destination", str, required=True)
        if (destination is not None and not destination.startswith("mirror://") and _is_local_destination(destination)
                and not os.path.isabs(destination)):  # fmt: skip
            problems.add(f"'pair[{i}].destination' must be absolute, got {destination!r}")
            destination = None
        secret_file = t.path("secret_file")
        delete, allow_mass_delete = t.get("delete", bool, True), t.get("allow_mass_delete", bool, False)
        rsh, remote_command = t.get("rsh", str, "ssh -T"), t.get("remote_command", str, "mirror")
        dst_require_mount = t.get("dst_require_mount", bool)  # absent: the remembered rule (replicadisk)
        if dst_require_mount and destination is not None and not _is_local_destination(destination):
            problems.add(f"'pair[{i}].dst_require_mount' is for a local destination (a server's module says "
                         "require_mount)")  # fmt: skip
        if source is None or destination is None:
            continue
        pairs.append(PairConfig(
            name=name, source=os.fsencode(source), destination=destination,
            secret_file=secret_file, lock_file=os.fsencode(lock) if lock else None,
            state_dir=os.fsencode(state) if state else None, excludes=tuple(os.fsencode(x) for x in excludes),
            delete=delete, max_delete=max_delete, allow_mass_delete=allow_mass_delete, rsh=rsh,
            remote_command=remote_command, dst_require_mount=dst_require_mount, index=i, **timeouts,
        ))  # fmt: skip
    metrics = daemon.get("metrics", str)
    metrics_listen = _listen(metrics, problems, "daemon.metrics") if metrics else None
    status_dir = daemon.path("status_dir")
    coalesce = daemon.get("coalesce_ms", (int, float), 0.5)
    open_file_delay = daemon.get("open_file_delay", (int, float), 1.0)
    for key, value in (("coalesce_ms", coalesce), ("open_file_delay", open_file_delay)):
        if not value >= 0:
            problems.add(f"'daemon.{key}' must be 0 or more, got {value}")
    reconcile_interval = daemon.get("reconcile_interval", (int, float), 0)
    if not reconcile_interval >= 0:
        problems.add(f"'daemon.reconcile_interval' must be 0 (never) or more seconds, got {reconcile_interval}")
    from .journal import MAX_RETAINED

    journal_retain = daemon.get("journal_retain", int, MAX_RETAINED)
    if journal_retain < 1:
        problems.add(f"'daemon.journal_retain' must be 1 or more changes, got {journal_retain}")
    if not pairs:
        return None, problems
    return DaemonConfig(
        pairs=tuple(pairs),
        status_dir=os.fsencode(status_dir) if status_dir else default_state_dir(pairs[0].source),
        coalesce=coalesce / 1000,
        open_file_delay=float(open_file_delay),
        metrics=metrics_listen,
        reconcile_interval=reconcile_interval if reconcile_interval > 0 else None,
        journal_retain=max(1, journal_retain),
    ), problems
