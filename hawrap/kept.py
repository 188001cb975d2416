"""Where the copies of a node's own changes are kept (each tree's state dir, ``kept/TIME``:
nothing mirrors or deletes there), and what ``hawrap status`` says of them until the
administrator removes them.  Light on imports: ``hawrap status`` runs it often."""

from __future__ import annotations

import os

KEPT = "kept"


def new_copy_dir(state_dir: str, stamp: str) -> str:
    """A directory name for a new copy: ``kept/STAMP``, or ``kept/STAMP-2``... if taken (two
    copies within a second)."""
    path = os.path.join(state_dir, KEPT, stamp)
    candidate, n = path, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def kept_copies(trees) -> dict[str, list[str]]:
    """Each tree's copies kept aside in its state dir (``kept/TIME``), oldest first; they
    stay until the administrator removes them."""
    out = {}
    for tree in trees:
        base = os.path.join(tree.state_dir, KEPT)
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        if names:
            out[tree.name] = [os.path.join(base, n) for n in names]
    return out


def describe_kept(kept: dict[str, list[str]]) -> list[str]:
    """``hawrap status`` lines for ``kept_copies``."""
    return [
        f"  kept aside from {name}: {len(paths)} copies of local changes the peer's copy replaced, the latest "
        f"{paths[-1]} (remove them once dealt with)"
        for name, paths in kept.items()
    ]
