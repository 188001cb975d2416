"""Show or raise a tree's owner epoch (used by the failover wrapper on takeover).

A receiver refuses a sender whose epoch is older than the one it has seen, so a stale
primary that comes back cannot overwrite the survivor's newer data.

  mirror epoch show TREE [--state-dir DIR] [--json]
  mirror epoch bump TREE [--state-dir DIR] [--json]
"""

from __future__ import annotations

import json

from .. import epoch
from ..errors import EXIT_OK, display_path
from ..statedir import resolve_state_dir


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("show", "bump"))
    parser.add_argument("tree", help="the tree's root directory")
    parser.add_argument("--state-dir", help="the tree's state dir (default: TREE/.mirror)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    state_dir = resolve_state_dir(args.tree, args.state_dir)
    value = epoch.bump_epoch(state_dir) if args.action == "bump" else epoch.read_epoch(state_dir)
    if args.json:
        print(json.dumps({"tree": args.tree, "state_dir": display_path(state_dir), "epoch": value}))
    else:
        print(value)
    return EXIT_OK
