"""Show or raise a tree's owner epoch (used by the failover wrapper on takeover).

A receiver refuses a sender whose epoch is older than the one it has seen, so a stale
primary that comes back cannot overwrite the survivor's newer data.

  mirror epoch show TREE [--state-dir DIR] [--json]
  mirror epoch bump TREE [--to N] [--state-dir DIR] [--json]

A sender may raise a replica's epoch by at most 16 per session (see docs/PROTOCOL.md): a
node whose replica was raised past its own epoch (by a holder of the secret) takes it back
with `mirror epoch bump TREE --to N`, N above the replica's.
"""

from __future__ import annotations

import json
import os

from .. import epoch
from ..errors import EXIT_OK, UsageError, display_path
from ..statedir import resolve_state_dir


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("show", "bump"))
    parser.add_argument("tree", help="the tree's root directory")
    parser.add_argument("--state-dir", help="the tree's state dir (default: TREE/.mirror)")
    parser.add_argument(
        "--to", type=int, metavar="N", help="bump: raise the epoch to N (above the current one)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    if args.state_dir is None and not os.path.isdir(args.tree):
        # A mistyped TREE would show epoch 0, or be made by a bump.
        raise UsageError(f"{args.tree} is not a directory (the tree's root; --state-dir names its state dir)")
    state_dir = resolve_state_dir(args.tree, args.state_dir)
    if args.to is not None and args.action != "bump":
        raise UsageError("--to goes with 'bump'")
    value = epoch.bump_epoch(state_dir, args.to) if args.action == "bump" else epoch.read_epoch(state_dir)
    if args.json:
        print(json.dumps({"tree": args.tree, "state_dir": display_path(state_dir), "epoch": value}))
    else:
        print(value)
    return EXIT_OK
