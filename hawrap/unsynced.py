"""What this node holds that its peer lacks, before the peer's copy replaces it (``hawrap
resume``: the resync mirrors the survivor's trees over this node's, deletions included; an
etcd member about to receive).

Three sources, all on this node's disk, so the answer is available with hawrap stopped:

* the mirror daemon's journals (``mirror.journal``): every change its watcher saw and never
  confirmed mirrored, by path;
* the files changed as a killed daemon died that no journal record covers (its watcher had
  not read their events): ``recent_changes``;
* the node's data state (``node-state.json``): whether it served while its peer's copy did
  not receive its changes (``peer_outdated``, since when).  Then everything changed here
  since that moment is missing on the peer, journaled or not (an initial sync cut short, or
  changes made while no daemon watched, are not in any journal).

The tree is walked here too (``walk``: through descriptors, never following a symlink).
"""

from __future__ import annotations

import glob
import json
import os
import stat
import time
from dataclasses import dataclass, field

from mirror.applied import applied_path
from mirror.errors import display_path
from mirror.journal import read_pending, recorded_times
from mirror.journal import settle as settle_journal
from mirror.safefs import ConfinedTree
from mirror.statedir import STATUS_FILE, state_dir_below

from .config import ClusterConfig
from .mirrorctl import resolve_trees

STATE_FILE = "node-state.json"  # the two-node mode's node state (hawrap.node)
SHOWN = 20  # paths printed per list; the count says how many there are
# A change made this long before its daemon last wrote its status may not have reached the
# journal when the daemon was killed (its watcher had not read the event yet).
RECENT_MARGIN = 2.0
# A file's ctime comes from the kernel's coarse clock, up to a tick (10 ms at HZ=100) behind
# the time ``since`` was read from: entries changed this much earlier count too.
CTIME_SLACK = 0.05


@dataclass
class Unsynced:
    peer: str
    since: float | None = None  # served while the peer's copy was outdated, since then
    journaled: dict[str, list[str]] = field(default_factory=dict)  # tree -> paths never mirrored
    # tree -> (when its killed daemon was last heard, the files changed then that no record covers)
    recent: dict[str, tuple[float, set[bytes]]] = field(default_factory=dict)
    # A hand-over's final sync gave the peer everything from before this moment (wall clock);
    # tree -> the entries changed since, which it may lack.
    synced_whole: float | None = None
    after_sync: dict[str, set[bytes]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return (self.since is not None or any(self.journaled.values()) or bool(self.recent)
                or any(self.after_sync.values()))  # fmt: skip

    def describe(self, node: str) -> str:
        lines = [
            f"{node} holds changes that {self.peer} lacks; resuming lets {self.peer}'s copy replace them:"
        ]
        if self.since is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(self.since))
            lines.append(
                f"  {node} served while {self.peer}'s copy was not receiving its changes, since {when}:"
            )
            lines.append("  everything changed here since then is missing there (journaled or not)")
        for tree, paths in self.journaled.items():
            if paths:
                lines.append(f"  tree {tree}: {len(paths)} changes journaled and never mirrored:")
                lines += listed(paths)
        for tree, (heard, paths) in self.recent.items():
            when = time.strftime("%H:%M:%S", time.localtime(heard))
            lines.append(f"  tree {tree}: {len(paths)} files changed as its mirror daemon was killed (last heard "
                         f"at {when}) that its watcher never recorded:")  # fmt: skip
            lines += listed(sorted(display_path(p) for p in paths))
        for tree, paths in self.after_sync.items():
            if paths:
                when = time.strftime("%H:%M:%S", time.localtime(self.synced_whole))
                lines.append(f"  tree {tree}: {len(paths)} entries changed after the hand-over's final sync "
                             f"toward {self.peer} began (at {when}):")  # fmt: skip
                lines += listed(sorted(display_path(p) for p in paths))
        return "\n".join(lines)


def listed(paths: list[str]) -> list[str]:
    """The first SHOWN of ``paths``, indented as an item of a listing, and how many more
    there are."""
    more = [f"    ... and {len(paths) - SHOWN} more"] if len(paths) > SHOWN else []
    return [f"    {p}" for p in paths[:SHOWN]] + more


def _journals(state_dir: str) -> list[str]:
    """The journal files in a tree's state dir (one per daemon configuration)."""
    return sorted(glob.glob(os.path.join(glob.escape(state_dir), "journal-*")))


def journaled(state_dir: str, *, had_by_none: bool = False, lacking: bytes | None = None) -> tuple[set[bytes], set[bytes]]:
    """The paths of every change recorded in the tree's journals and not checkpointed (for
    some destination; with ``had_by_none``, for any; and with ``lacking``, a destination's
    cursor, for that one either): ``(entries, subtrees)``.  A rename's new name counts as a
    subtree (a directory moved there brings everything below it), its old name as an entry."""
    entries: set[bytes] = set()
    subtrees: set[bytes] = set()
    for path in _journals(state_dir):
        pending = read_pending(os.fsencode(path), had_by_none=had_by_none, lacking=lacking)
        entries.update(pending.entries)
        subtrees.update(pending.trees)
        for old, new in pending.renames:
            entries.add(old)
            subtrees.add(new)
    return entries - {b""}, subtrees - {b""}


def journaled_paths(state_dir: str) -> list[str]:
    """The journaled paths for humans (see ``journaled``)."""
    entries, subtrees = journaled(state_dir)
    return sorted(display_path(p) for p in entries | subtrees)


def settle(trees) -> list[str]:
    """What a resume decided (copied aside, or given up) is not listed again: every tree's
    journals are marked done (no daemon runs on a node that is not serving).  Returns the
    problems met, each naming its journal; the journals concerned are listed again."""
    problems = []
    for tree in trees:
        for path in _journals(tree.state_dir):
            try:
                settle_journal(os.fsencode(path))
            except OSError as exc:
                problems.append(f"{path}: {exc.strerror}")
    return problems


def changed_since(root: str, state_dir: str, since: float, files_only: bool = False) -> dict[bytes, int]:
    """Every entry below ``root`` whose ctime is at or after ``since`` (the state dir left
    out; with ``files_only``, directories too), with its ctime (ns), walked through
    descriptors without following a symlink."""
    since_ns = int(since * 1e9)
    tree = source_tree(root, state_dir)
    found: dict[bytes, int] = {}
    try:
        for path, st in walk(tree, b""):
            if st.st_ctime_ns >= since_ns and not (files_only and stat.S_ISDIR(st.st_mode)):
                found[path] = st.st_ctime_ns
    finally:
        tree.close()
    return found


def source_tree(root: str, state_dir: str) -> ConfinedTree:
    """The tree at ``root`` for reading without following a symlink, its state dir left out."""
    inside = state_dir_below(os.fsencode(root), os.fsencode(state_dir))
    return ConfinedTree(os.fsencode(root), reserved=None if inside in (None, b".") else inside)


def walk(tree: ConfinedTree, top: bytes):
    """``(path, stat)`` of every entry below directory ``top`` (b"": the root), parents first,
    never through a symlink, the reserved state dir left out."""
    stack = [top]
    while stack:
        current = stack.pop()
        fd = os.dup(tree.dir_fd(tree.parts(current) if current else []))
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
            for name in names:
                path = current + b"/" + name if current else name
                if tree.reserved is not None and path.split(b"/") == tree.reserved:
                    continue
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield path, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)
        finally:
            os.close(fd)


def last_heard(state_dir: str) -> tuple[float, float | None] | None:
    """When the tree's mirror daemon last wrote its status, if it was still running then
    (killed, or its node lost power: a clean stop journals every change it saw) and ran
    here after the tree last received (the receiver's applied record): changes made just
    before may never have reached its journal.  With it, when its last whole-tree compare
    of every destination ended (None if one has had none): a change before then that no
    record tells of was made before the watcher started, and that compare mirrored it."""
    try:
        with open(os.path.join(state_dir, os.fsdecode(STATUS_FILE))) as f:
            status = json.load(f)
        heard = float(status["updated"])
        compares = [pair.get("last_compare") for pair in status.get("pairs") or []]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if status.get("state") == "stopped":
        return None
    try:
        received = os.stat(applied_path(state_dir)).st_mtime
    except OSError:
        received = None
    if received is not None and heard <= received:
        return None
    compared = min(compares) if compares and all(isinstance(c, float | int) for c in compares) else None
    return heard, compared


def recent_changes(tree, since: float | None) -> tuple[float, set[bytes]] | None:
    """The files of ``tree`` changed from RECENT_MARGIN seconds before its daemon was last
    heard (``last_heard``) whose last change no journal record tells of (a record's time
    comes after the change it tells of), nor the daemon's last whole-tree compare:
    ``(heard, paths)``; None if there is no such moment or no such file, or if ``since``
    (the node served alone from then on) covers it."""
    found = last_heard(tree.state_dir)
    if found is None:
        return None
    heard, compared = found
    if since is not None and since <= heard - RECENT_MARGIN:
        return None
    entries, subtrees = journaled(tree.state_dir)
    named: dict[bytes, float] = {}
    whole: dict[bytes, float] = {}
    for journal in _journals(tree.state_dir):
        for mine, theirs in zip((named, whole), recorded_times(os.fsencode(journal)), strict=True):
            for path, when in theirs.items():
                mine[path] = max(mine.get(path, 0.0), when)
    paths = set()
    for path, ctime_ns in changed_since(tree.path, tree.state_dir, heard - RECENT_MARGIN, files_only=True).items():
        if path in entries or any(path.startswith(t + b"/") for t in subtrees):
            continue  # listed as journaled
        if compared is not None and ctime_ns < compared * 1e9:
            continue  # recorded since (the watcher ran throughout), or mirrored by that compare
        # Its last change was recorded, by name or within a directory recorded whole (and
        # mirrored: it is not pending).  A change within a clock tick after a record can
        # pass for recorded (ctime's clock is coarser).
        told = [named.get(path, 0.0)] + [whole.get(d, 0.0) for d in _ancestors(path)]
        if max(told) * 1e9 >= ctime_ns:
            continue
        paths.add(path)
    return (heard, paths) if paths else None


def _ancestors(path: bytes):
    """``a/b/c`` -> ``a/b``, ``a``."""
    while b"/" in path:
        path = path.rsplit(b"/", 1)[0]
        yield path


def find(cfg: ClusterConfig, node: str) -> Unsynced:
    found = Unsynced(cfg.peer_of(node).name)
    try:
        with open(os.path.join(cfg.node(node).state_dir, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {}
    if isinstance(state, dict) and state.get("peer_outdated"):
        found.since = state.get("peer_outdated_since") or state.get("time") or 0.0
    synced = state.get("synced_whole") if isinstance(state, dict) else None
    if isinstance(synced, int | float) and not isinstance(synced, bool):
        # the journals and the killed daemon's last changes are all older: the peer has them
        found.synced_whole = float(synced)
        for tree in resolve_trees(cfg, node):
            found.after_sync[tree.name] = set(changed_since(tree.path, tree.state_dir, synced - CTIME_SLACK))
        return found
    for tree in resolve_trees(cfg, node):
        found.journaled[tree.name] = journaled_paths(tree.state_dir)
        recent = recent_changes(tree, found.since)
        if recent is not None:
            found.recent[tree.name] = recent
    return found
