"""What this node holds that its peer lacks, before ``hawrap resume`` lets the peer's copy
replace it (the resync mirrors the survivor's trees over this node's, deletions included).

Two sources, both on this node's disk, so the answer is available with hawrap stopped:

* the mirror daemon's journals (``mirror.journal``): every change its watcher saw and never
  confirmed mirrored, by path;
* the node's data state (``node-state.json``): whether it served while its peer's copy did
  not receive its changes (``peer_outdated``, since when).  Then everything changed here
  since that moment is missing on the peer, journaled or not (an initial sync cut short, or
  changes made while no daemon watched, are not in any journal).
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass, field

from mirror.errors import display_path
from mirror.journal import read_pending
from mirror.journal import settle as settle_journal

from .config import ClusterConfig
from .mirrorctl import resolve_trees
from .node import STATE_FILE

SHOWN = 20  # paths printed per tree; the count says how many there are


@dataclass
class Unsynced:
    peer: str
    since: float | None = None  # served while the peer's copy was outdated, since then
    journaled: dict[str, list[str]] = field(default_factory=dict)  # tree -> paths never mirrored

    def __bool__(self) -> bool:
        return self.since is not None or any(self.journaled.values())

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
            if not paths:
                continue
            lines.append(f"  tree {tree}: {len(paths)} changes journaled and never mirrored:")
            lines += [f"    {p}" for p in paths[:SHOWN]]
            if len(paths) > SHOWN:
                lines.append(f"    ... and {len(paths) - SHOWN} more")
        return "\n".join(lines)


def _journals(state_dir: str) -> list[str]:
    """The journal files in a tree's state dir (one per daemon configuration)."""
    return sorted(glob.glob(os.path.join(glob.escape(state_dir), "journal-*")))


def journaled(state_dir: str, *, had_by_none: bool = False) -> tuple[set[bytes], set[bytes]]:
    """The paths of every change recorded in the tree's journals and not checkpointed (for
    some destination; with ``had_by_none``, for any): ``(entries, subtrees)``.  A rename's new
    name counts as a subtree (a directory moved there brings everything below it), its old
    name as an entry."""
    entries: set[bytes] = set()
    subtrees: set[bytes] = set()
    for path in _journals(state_dir):
        pending = read_pending(os.fsencode(path), had_by_none=had_by_none)
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


def find(cfg: ClusterConfig, node: str) -> Unsynced:
    found = Unsynced(cfg.peer_of(node).name)
    try:
        with open(os.path.join(cfg.node(node).state_dir, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {}
    if isinstance(state, dict) and state.get("peer_outdated"):
        found.since = state.get("peer_outdated_since") or state.get("time") or 0.0
    for tree in resolve_trees(cfg, node):
        found.journaled[tree.name] = journaled_paths(tree.state_dir)
    return found
