"""``mirror serve|daemon --check``: what a configuration would only reveal once it runs.

The file's own problems come from ``mirror.config``; these add the options that contradict
``--config`` and what depends on this host (trees, directories, addresses, secret files).
Each problem names the file (or the option) and the key.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import sys

from ..errors import EXIT_ERROR, EXIT_OK, MirrorError, UsageError, display_path
from ..guard import is_mount_point


def conflicts(args, allowed: set[str]) -> list[str]:
    """Options that ``--config`` would silently override: each one a problem."""
    if not args.config:
        return []
    return [f"{option}: cannot be combined with --config {args.config} (set it in the file)"
            for option in sorted(args.given_options - allowed)]  # fmt: skip


def refuse_conflicts(args, allowed: set[str]) -> None:
    problems = conflicts(args, allowed)
    if problems:
        raise UsageError("; ".join(problems))


def report(command: str, what: str, problems: list[str]) -> int:
    """Print the verdict of ``--check``: every problem, then a summary; the exit status."""
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"mirror {command}: {what}: {len(problems)} problem{'s' if len(problems) > 1 else ''}",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    print(f"mirror {command}: {what}: valid")
    return EXIT_OK


def check(command: str, args, problems: list[str], read_config, from_args, host_problems) -> int:
    """``mirror serve|daemon --check``: the configuration file (``read_config``) or the options
    (``from_args``), then this host (``host_problems``); every problem reported at once."""
    from ..errors import MirrorError

    if args.config:
        config, found = read_config(args.config)
        problems += found.items
    else:
        try:
            config = from_args(args)
        except MirrorError as exc:
            config = None
            problems.append(str(exc))
    if config is not None:
        problems += host_problems(config, args.config)
    return report(command, args.config or "the command line", problems)


def address_problem(host: str) -> str | None:
    """Why this host cannot listen on ``host``, or None."""
    if host in ("", "0.0.0.0", "::"):
        return None
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"{host}: {exc.strerror}"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(address[:2] if family == socket.AF_INET else address)
        except OSError as exc:
            return (
                f"{host} is not an address of this host" if exc.errno == errno.EADDRNOTAVAIL else exc.strerror
            )
    return None


def _directory(where: str, path: bytes | None, what: str, problems: list[str]) -> None:
    if path and not os.path.isdir(path):
        problems.append(f"{where}: {what} {display_path(path)} is not a directory")


def _parent(where: str, path: bytes | str | None, problems: list[str]) -> None:
    if path:
        parent = os.path.dirname(os.path.abspath(os.fsencode(path)))
        if not os.path.isdir(parent):
            problems.append(f"{where}: the directory {display_path(parent)} does not exist")


def _tree(where: str, path: bytes, problems: list[str]) -> None:
    from ..statedir import check_root

    if not os.path.isdir(path):
        problems.append(f"{where}: {display_path(path)} is not a directory")
        return
    try:
        check_root(path)
    except MirrorError as exc:
        problems.append(f"{where}: {exc}")


def _module_key(file: str | None, name: str, k: str) -> str:
    """A module's key as the administrator wrote it: in the file, or as an option."""
    if file:
        return f"{file}: 'modules.{name}.{k}'"
    return f"--module {name}" if k == "path" else f"--{k.replace('_', '-')}"


def module_problems(modules, file: str | None) -> list[str]:
    """The server's modules that share files where they must not (``overlap.module_problems``),
    each naming its key: what its start, its reload and ``--check`` refuse."""
    from ..overlap import module_problems

    return [f"{_module_key(file, name, k)}: {problem}" for name, k, problem in module_problems(modules)]


def serve_host_problems(config, file: str | None) -> list[str]:
    problems: list[str] = []
    for name, module in sorted(config.modules.items()):
        key = functools.partial(_module_key, file, name)
        _tree(key("path"), module.path, problems)
        if module.require_mount and os.path.isdir(module.path) and not is_mount_point(module.path):
            problems.append(f"{key('require_mount')}: nothing is mounted at {display_path(module.path)}")
        _parent(key("lock_file"), module.lock_file, problems)
        _directory(key("state_dir"), module.state_dir, "the state dir", problems)
    problems += module_problems(config.modules, file)
    problem = address_problem(config.listen[0])
    if problem:
        problems.append(f"{file}: 'listen': {problem}" if file else f"--listen: {problem}")
    return problems


def daemon_host_problems(config, where: str | None) -> list[str]:
    from ..secretfile import read_secret_file
    from ..transfer import parse_destination

    problems: list[str] = []
    for pair in config.pairs:

        def key(k: str, i=pair.index) -> str:
            return f"{where}: 'pair[{i}].{k}'" if where else f"--{k.replace('_', '-')}"

        _tree(key("source") if where else "SRC", pair.source, problems)
        if pair.secret_file:
            try:
                read_secret_file(pair.secret_file)
            except MirrorError as exc:
                problems.append(f"{key('secret_file')}: {exc}")
        try:
            destination = parse_destination(pair.destination)
        except MirrorError as exc:
            problems.append(f"{key('destination') if where else 'DST'}: {exc}")
        else:
            if destination.kind == "local":
                if os.path.lexists(destination.path) and not os.path.isdir(destination.path):
                    problems.append(f"{key('destination') if where else 'DST'}: {display_path(destination.path)} is "
                                    "not a directory")  # fmt: skip
                _parent(
                    key("destination") if where else "DST", destination.path.rstrip(b"/") or b"/", problems
                )
                if pair.dst_require_mount and not is_mount_point(destination.path):
                    mount_point = display_path(destination.path)
                    problems.append(f"{key('dst_require_mount')}: nothing is mounted at {mount_point}")
                elif pair.dst_require_mount is None:  # the remembered rule: where its disk was last found
                    from ..replicadisk import check_local_replica
                    from ..statedir import resolve_state_dir

                    try:
                        check_local_replica(resolve_state_dir(pair.source, pair.state_dir), destination.path, None,
                                           record=False)  # fmt: skip
                    except MirrorError as exc:
                        problems.append(f"{key('destination') if where else 'DST'}: {exc}")
            elif destination.kind == "server" and not pair.secret_file:
                problems.append(f"{key('secret_file')}: a mirror:// destination needs a secret file")
        _parent(key("lock_file"), pair.lock_file, problems)
        _directory(key("state_dir"), pair.state_dir, "the state dir", problems)
    from ..overlap import pair_problems

    for i, name, problem in pair_problems(config.pairs):
        option = {"destination": "DST", "state_dir": "--state-dir", "lock_file": "--lock-file"}
        label = f"{where}: 'pair[{config.pairs[i].index}].{name}'" if where else option[name]
        problems.append(f"{label}: {problem}")
    if config.metrics:
        problem = address_problem(config.metrics[0])
        if problem:
            problems.append(f"{where}: 'daemon.metrics': {problem}" if where else f"--metrics: {problem}")
    return problems
