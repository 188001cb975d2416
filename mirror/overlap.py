"""Trees that overlap where they must not: a local replica and its source (the same
directory by another path, one inside the other, the source's state dir inside the
replica); the local replicas of a daemon's pairs (two sources writing one replica, one
replica inside another's, two pairs mirroring at each other); a server's writable modules.
Compared by directory identity, so a symlink or a bind mount is no way round it.  A remote
replica is on another host as far as a sender can tell: only the same destination written
twice is seen."""

from __future__ import annotations

import contextlib
import os

from .errors import display_path, fs_path
from .exclude import excluded_dir, make_excluder


def path_below(outer: bytes, inner: bytes) -> bytes | None:
    """``inner``'s path below the directory ``outer`` (b"" for ``outer`` itself), or None
    when it is not there.  Compared by directory identity (device and inode) along
    ``inner``'s resolved parents that exist, so a symlink or a bind mount of a parent is no
    way round it; neither need exist yet (then their resolved paths are compared)."""
    at = os.path.realpath(inner)
    try:
        st = os.stat(outer)
    except OSError:  # not made yet: by its resolved path
        outer = os.path.realpath(outer)
        if at == outer or at.startswith(outer.rstrip(b"/") + b"/"):
            return at[len(outer) :].strip(b"/")
        return None
    target, place = (st.st_dev, st.st_ino), at
    while True:
        with contextlib.suppress(OSError):
            st = os.stat(place)
            if (st.st_dev, st.st_ino) == target:
                return at[len(place) :].strip(b"/")
        if place == b"/":
            return None
        place = os.path.dirname(place)


def nesting_problem(src: bytes, dst: bytes, excludes=()) -> str | None:
    """Why the local replica ``dst`` cannot mirror the tree ``src`` (None: it can): the same
    directory, the source inside the replica (a sync writes into the tree it reads, and
    ``--delete`` deletes the source), or the replica inside the source and not excluded from
    it (each sync would copy the replica into itself once more; a live daemon, seeing its own
    writes as changes, would do so until the disk is full)."""
    if not os.path.isdir(src):
        return None  # said as such by whoever opens it
    inside = path_below(src, dst)
    if inside == b"":
        return f"the source {display_path(src)} and the replica {display_path(dst)} are the same directory: nothing to mirror"
    if inside is not None and not excluded_below(excludes, inside):
        return (f"the replica {display_path(dst)} lies inside the source {display_path(src)}: each sync would copy "
                f"the replica into itself once more; put it elsewhere or exclude it (--exclude "
                f"'/{display_path(inside)}/')")  # fmt: skip
    if path_below(dst, src) is not None:
        return (f"the source {display_path(src)} lies inside the replica {display_path(dst)}: a sync would write into "
                "the tree it reads (and --delete would delete it); put the replica elsewhere")  # fmt: skip
    return None


def state_dir_problem(state_dir: bytes | None, dst: bytes) -> str | None:
    """Why the source's state dir (``--state-dir``) cannot lie where it is: inside the local
    replica ``dst``, where it is not part of the source, so each deleting sync would delete
    it, and with it the source's tree identity and journal (None: it can)."""
    if state_dir is None or path_below(dst, state_dir) is None:
        return None
    return (f"the source's state dir {display_path(state_dir)} lies inside the replica {display_path(dst)}: a sync "
            "would delete it (the source's tree identity and journal with it); put it elsewhere")  # fmt: skip


def excluded_below(excludes, path: bytes) -> bool:
    """Whether the directory ``path`` (below a tree's root) is left out by ``excludes``."""
    excluder = make_excluder(fs_path(p) for p in excludes)
    return excluder is not None and excluded_dir(excluder.excluded, path)


def pair_problems(pairs) -> list[tuple[int, str, str]]:
    """``(index, key, problem)`` for each pair of a daemon whose local replica overlaps its
    source or another pair's (``key``: the pair's key at fault, ``destination`` or
    ``state_dir``); a destination that does not parse is left to whoever reads it."""
    from .errors import MirrorError
    from .transfer import parse_destination

    problems: list[tuple[int, str, str]] = []
    for i, pair in enumerate(pairs):
        try:
            destination = parse_destination(pair.destination)
        except MirrorError:
            continue
        if destination.kind != "local":
            continue
        if problem := nesting_problem(pair.source, destination.path, pair.excludes):
            problems.append((i, "destination", problem))
        if problem := state_dir_problem(pair.state_dir, destination.path):
            problems.append((i, "state_dir", problem))
    return problems + [(i, "destination", problem) for i, problem in pair_overlap_problems(pairs)]


def pair_overlap_problems(pairs) -> list[tuple[int, str]]:
    """``(index, problem)`` for each pair of a daemon whose replica another pair also writes:
    the same destination (two sources overwriting each other's files, and with ``delete``
    deleting them, for ever), a local one inside another's that the outer pair does not
    exclude (its sessions delete or overwrite what the inner pair writes), or two local
    pairs mirroring at each other."""
    from .errors import MirrorError
    from .transfer import parse_destination

    problems: list[tuple[int, str]] = []
    places = []
    for i, pair in enumerate(pairs):
        try:
            places.append((i, pair, parse_destination(pair.destination)))
        except MirrorError:
            continue
    for j, inner, d_inner in places:
        for i, outer, d_outer in places[:j] + places[j + 1 :]:
            if d_inner.kind != "local" or d_outer.kind != "local":
                if i < j and d_inner == d_outer:
                    problems.append((j, f"pair {outer.name!r} writes the same replica {inner.destination}"))
                continue
            if i < j and _overlap(d_outer.path, inner.source) and _overlap(d_inner.path, outer.source):
                problems.append((j, f"pairs {outer.name!r} and {inner.name!r} mirror at each other (each one's "
                                    "replica holds the other's source): each would undo the other's changes"))  # fmt: skip
                continue
            below = path_below(d_outer.path, d_inner.path)
            if below == b"" and i < j:
                problems.append((j, f"pair {outer.name!r} writes the same replica {display_path(d_inner.path)}"))
            elif below and not excluded_below(outer.excludes, below):
                problems.append((j, f"the replica {display_path(d_inner.path)} lies inside the replica "
                                    f"{display_path(d_outer.path)} of pair {outer.name!r}, whose sessions would delete "
                                    f"or overwrite what this pair writes there; exclude '/{display_path(below)}/' from "
                                    f"pair {outer.name!r} or put the replica elsewhere"))  # fmt: skip
    return problems


def _overlap(a: bytes, b: bytes) -> bool:
    """Whether one of two directories is, or holds, the other."""
    return path_below(a, b) is not None or path_below(b, a) is not None


def module_overlap_problems(modules) -> list[tuple[str, str]]:
    """``(name, problem)`` for each module of a server whose tree another writable module
    also holds (the same directory, or one inside the other): their senders, each under its
    own module's writer lock, would overwrite and delete each other's files.  A read-only
    module (dry runs only) may lie anywhere."""
    problems: list[tuple[str, str]] = []
    writable = sorted((name, m) for name, m in modules.items() if not m.read_only)
    for j, (name, inner) in enumerate(writable):
        for i, (other, outer) in enumerate(writable):
            below = path_below(outer.path, inner.path) if i != j else None
            if below == b"" and i < j:
                problems.append((name, f"module {other!r} is the same directory {display_path(inner.path)}"))
            elif below:
                problems.append((name, f"{display_path(inner.path)} lies inside module {other!r} "
                                       f"({display_path(outer.path)}): their senders would overwrite and delete each "
                                       "other's files; make one of them read-only or give each its own directory"))  # fmt: skip
    return problems
