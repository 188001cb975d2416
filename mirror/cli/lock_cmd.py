"""Create, remove or inspect a mirroring lock file.

While the lock file exists, nothing is mirrored toward the other node: the sender stops
sending and the receiver refuses writes.  The file records who took it, when and why.

  mirror lock acquire PATH --reason "failover to node-b"   (exit 0: taken, 3: already held)
  mirror lock status PATH          (exit 0: not locked, 3: locked)
  mirror lock release PATH         (exit 0: released, or was not locked)
"""

from __future__ import annotations

import json

from .. import lockfile
from ..errors import EXIT_LOCKED, EXIT_OK, display_path


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("acquire", "release", "status"))
    parser.add_argument("path", help="the lock file")
    parser.add_argument("--reason", default="", help="why the lock is taken (recorded in the file)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    path = args.path
    if args.action == "acquire":
        info = lockfile.acquire(path, reason=args.reason)
        _show(args, info, "acquired" if info.created else "already held")
        return EXIT_OK if info.created else EXIT_LOCKED
    if args.action == "release":
        removed = lockfile.release(path)
        if args.json:
            print(json.dumps({"path": path, "released": removed}))
        else:
            print(f"{path}: released" if removed else f"{path}: was not locked")
        return EXIT_OK
    info = lockfile.status(path)
    if info is None:
        if args.json:
            print(json.dumps({"path": path, "locked": False}))
        else:
            print(f"{path}: not locked")
        return EXIT_OK
    _show(args, info, None)
    return EXIT_LOCKED


def _show(args, info: lockfile.LockInfo, what: str | None) -> None:
    if args.json:
        print(json.dumps(info.as_dict()))
    else:
        line = info.describe()
        if what == "already held":
            line = f"{display_path(info.path)}: already held: " + line.split(": ", 1)[1]
        print(line)
