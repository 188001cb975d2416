"""Trees that overlap where they must not: a local replica and its source (the same
directory by another path, one inside the other, the source's state dir or a lock file
inside the replica); the local replicas of a daemon's pairs (two sources writing one
replica, one replica inside another's, pairs mirroring in a ring, a pair's state dir or
lock file inside another's replica); a server's writable modules (and their lock
files and state dirs).
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


def state_dir_problem(state_dir: bytes | None, dst: bytes, whose: str = "") -> str | None:
    """Why the source's state dir (``--state-dir``) cannot lie where it is: inside the local
    replica ``dst`` (``whose``: " of pair 'x'" for another pair's), where it is not part of
    the source, so each deleting sync would delete it, and with it the source's tree identity
    and journal (None: it can)."""
    if state_dir is None or path_below(dst, state_dir) is None:
        return None
    return (f"the source's state dir {display_path(state_dir)} lies inside the replica{whose} {display_path(dst)}: a "
            "sync would delete it (the source's tree identity and journal with it); put it elsewhere")  # fmt: skip


def lock_file_problem(lock_file: bytes | None, tree: bytes, where: str | None = None) -> str | None:
    """Why a mirroring lock file cannot lie where it is: inside ``tree``, which senders write
    (``where`` names it; default "the replica TREE"), so a sync would write a file of the
    source's at that place (and so lock every sync after it) or delete it (None: it can)."""
    if lock_file is None or path_below(tree, lock_file) is None:
        return None
    return (f"the lock file {display_path(lock_file)} lies inside {where or f'the replica {display_path(tree)}'}: a "
            "sync would write a file there from the source (locking every sync after it) or delete it; put it "
            "elsewhere")  # fmt: skip


def local_replica_problem(src: bytes, dst: bytes, excludes=(), state_dir: bytes | None = None,
                          lock_files=()) -> str | None:  # fmt: skip
    """Why the local replica ``dst`` cannot mirror ``src`` (None: it can): the trees nested
    (``nesting_problem``), or the source's state dir or a lock file inside the replica."""
    problem = nesting_problem(src, dst, excludes) or state_dir_problem(state_dir, dst)
    for lock_file in lock_files:
        problem = problem or lock_file_problem(lock_file, dst)
    return problem


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
    replicas = []
    for pair in pairs:
        try:
            destination = parse_destination(pair.destination)
        except MirrorError:
            continue
        if destination.kind == "local":
            replicas.append((pair, destination.path))
    for i, pair in enumerate(pairs):
        for other, replica in replicas:
            if other is pair and (problem := nesting_problem(pair.source, replica, pair.excludes)):
                problems.append((i, "destination", problem))
            # Another pair's replica deletes them too: the state dir and lock file against each.
            whose = f" of pair {other.name!r}" if other is not pair else ""
            if problem := state_dir_problem(pair.state_dir, replica, whose):
                problems.append((i, "state_dir", problem))
            if problem := lock_file_problem(pair.lock_file, replica, f"the replica{whose} {display_path(replica)}"):
                problems.append((i, "lock_file", problem))
    return problems + [(i, "destination", problem) for i, problem in pair_overlap_problems(pairs)]


def pair_overlap_problems(pairs) -> list[tuple[int, str]]:
    """``(index, problem)`` for each pair of a daemon whose replica another pair also writes:
    the same destination (two sources overwriting each other's files, and with ``delete``
    deleting them, for ever), a local one inside another's that the outer pair does not
    exclude (its sessions delete or overwrite what the inner pair writes), or local pairs
    mirroring in a ring (``_ring_problems``)."""
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
            if _overlap(d_outer.path, inner.source) and _overlap(d_inner.path, outer.source):
                continue  # a ring, said below
            below = path_below(d_outer.path, d_inner.path)
            if below == b"" and i < j:
                problems.append((j, f"pair {outer.name!r} writes the same replica {display_path(d_inner.path)}"))
            elif below and not excluded_below(outer.excludes, below):
                problems.append((j, f"the replica {display_path(d_inner.path)} lies inside the replica "
                                    f"{display_path(d_outer.path)} of pair {outer.name!r}, whose sessions would delete "
                                    f"or overwrite what this pair writes there; exclude '/{display_path(below)}/' from "
                                    f"pair {outer.name!r} or put the replica elsewhere"))  # fmt: skip
    return problems + _ring_problems([(i, pair, d.path) for i, pair, d in places if d.kind == "local"])


def _ring_problems(local) -> list[tuple[int, str]]:
    """``(index, problem)`` for each ring of local pairs, each one's replica holding the next
    one's source (A to B and B to A, or A to B, B to C and C to A): every change would come
    round again, and each pair's deletions undo the others' new files.  Said once per ring,
    for its last pair.  A cascade that does not close (A to B, B to C) is allowed."""
    feeds = {i: [j for j, other, _ in local if j != i and _overlap(replica, other.source)] for i, _, replica in local}
    names = {i: pair.name for i, pair, _ in local}
    problems: list[tuple[int, str]] = []

    def walk(start: int, path: list[int]) -> None:  # each ring once: from its lowest index
        for nxt in feeds[path[-1]]:
            if nxt == start:
                ring = [names[k] for k in path]
                what = (f"pairs {ring[0]!r} and {ring[1]!r} mirror at each other (each one's replica holds the "
                        "other's source)" if len(ring) == 2 else
                        f"pairs {' -> '.join(map(repr, ring + ring[:1]))} mirror in a ring (each one's replica "
                        "holds the next one's source)")  # fmt: skip
                others = "the other's" if len(ring) == 2 else "the others'"
                problems.append((max(path), f"{what}: each would undo {others} changes"))
            elif nxt > start and nxt not in path and len(problems) < len(local):
                walk(start, path + [nxt])

    for i in sorted(feeds):
        walk(i, [i])
    return problems


def _overlap(a: bytes, b: bytes) -> bool:
    """Whether one of two directories is, or holds, the other."""
    return path_below(a, b) is not None or path_below(b, a) is not None


def module_problems(modules) -> list[tuple[str, str, str]]:
    """``(name, key, problem)`` for each module of a server whose tree another writable
    module also holds (the same directory, or one inside the other: their senders, each
    under its own module's writer lock, would overwrite and delete each other's files), or
    whose lock file or state dir lies in a writable module's tree, where senders write and
    delete (its own state dir there is left out of its mirroring).  A read-only module (dry
    runs only) may lie anywhere."""
    problems: list[tuple[str, str, str]] = []
    writable = sorted((name, m) for name, m in modules.items() if not m.read_only)
    locks_said: set[bytes] = set()  # one line for a lock file all modules share
    for j, (name, inner) in enumerate(writable):
        for i, (other, outer) in enumerate(writable):
            below = path_below(outer.path, inner.path) if i != j else None
            if below == b"" and i < j:
                problems.append((name, "path", f"module {other!r} is the same directory {display_path(inner.path)}"))
            elif below:
                problems.append((name, "path", f"{display_path(inner.path)} lies inside module {other!r} "
                                               f"({display_path(outer.path)}): their senders would overwrite and "
                                               "delete each other's files; make one of them read-only or give each "
                                               "its own directory"))  # fmt: skip
            if inner.lock_file not in locks_said and (
                problem := lock_file_problem(inner.lock_file, outer.path, f"module {other!r} ({display_path(outer.path)})")
            ):
                locks_said.add(inner.lock_file)
                problems.append((name, "lock_file", problem))
            if i != j and inner.state_dir is not None and path_below(outer.path, inner.state_dir) is not None:
                problems.append((name, "state_dir", f"the state dir {display_path(inner.state_dir)} lies inside module "
                                                    f"{other!r} ({display_path(outer.path)}), whose senders would "
                                                    "delete it; put it elsewhere"))  # fmt: skip
    return problems
