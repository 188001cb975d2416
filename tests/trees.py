"""Generated directory trees for tests: a hypothesis strategy and a builder that puts them on disk.

A spec is a dict ``name -> node`` where a node is ``("file", content, mode, mtime_ns)``,
``("dir", children, mode)``, ``("symlink", target)``, ``("fifo",)`` or ``("hardlink", path)``
(a link to a file created earlier in build order).  Names are bytes and include what real
trees hold: non-UTF-8 bytes, newlines, spaces, backslashes, 255-byte names.
"""

from __future__ import annotations

import os

from hypothesis import strategies as st

_tricky = st.sampled_from([b"a b", b"new\nline", b"back\\slash", b"\xff\xfe", b"caf\xc3\xa9", b"x" * 255, b"-", b"*"])
_plain = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
names = st.one_of(_plain, _tricky)

_modes = st.sampled_from([0o644, 0o600, 0o755, 0o444, 0o4755, 0o1777])
_contents = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"same content", bytes(5000)]))
_mtimes = st.integers(min_value=0, max_value=2_000_000_000 * 10**9)


def _leaf():
    return st.one_of(
        st.tuples(st.just("file"), _contents, _modes, _mtimes),
        st.tuples(st.just("symlink"), st.one_of(names, st.just(b"../outside"), st.just(b"dangling/x"))),
        st.just(("fifo",)),
    )


def tree_specs(max_leaves: int = 20):
    return st.recursive(
        st.dictionaries(names, _leaf(), max_size=4),
        lambda children: st.dictionaries(
            names, st.one_of(_leaf(), st.tuples(st.just("dir"), children, st.sampled_from([0o755, 0o700, 0o2775]))),
            max_size=5,
        ),
        max_leaves=max_leaves,
    )


def build(root: bytes, spec: dict, links: list | None = None) -> list[bytes]:
    """Create ``spec`` under ``root``; returns the relative paths of the regular files made."""
    files: list[bytes] = []
    _build(root, b"", spec, files)
    return files


def _build(root: bytes, rel: bytes, spec: dict, files: list[bytes]) -> None:
    dir_times = []
    for name in sorted(spec):
        node = spec[name]
        relpath = rel + b"/" + name if rel else name
        path = os.path.join(root, relpath)
        kind = node[0]
        if kind == "file":
            with open(path, "wb") as f:
                f.write(node[1])
            os.chmod(path, node[2])
            os.utime(path, ns=(node[3], node[3]))
            files.append(relpath)
        elif kind == "dir":
            os.mkdir(path)
            _build(root, relpath, node[1], files)
            os.chmod(path, node[2])
            dir_times.append(path)
        elif kind == "symlink":
            os.symlink(node[1], path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "hardlink":
            os.link(os.path.join(root, node[1]), path)
    for path in dir_times:
        os.utime(path, ns=(10**18, 10**18))


def chain(parent, name: bytes, levels: int, leaf: bytes | None = b"leaf") -> bytes:
    """``levels`` nested directories ``name`` below the directory ``parent`` (a path), made one
    level at a time (a path past PATH_MAX cannot be named whole), a file ``leaf`` holding
    ``leaf`` in the deepest (None: none); the deepest's path relative to ``parent``."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        if leaf is not None:
            with open(os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
                f.write(leaf)
    finally:
        os.close(fd)
    return b"/".join([name] * levels)
