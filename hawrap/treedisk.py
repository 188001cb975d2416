"""Whether each tree that must be a mount point (``require_mount``) has its own disk mounted.

A node must not serve a tree, nor count its copy as one, when the disk under it is not the
tree's: nothing mounted (the empty mount point), or another file system mounted in its
place (device names swapped at boot, a spare disk, another cluster's disk).  Two records
tell the tree's disk from another:

- the tree's identity (``tree-identity`` in its state dir, ``mirror.guard``): with the state
  dir apart from the tree, it names the file system the tree was on (its UUID where the
  kernel tells it, else ``f_fsid``, and the root's inode), which another disk does not match;
- the tree id this node has seen on the disk, kept in the node's state dir
  (``trees-held.json``): with the state dir in the tree, it travels with the disk, and
  another disk shows another tree id or none.

A disk that replaces the tree's on purpose (the old one failed) is adopted by the
administrator (``hawrap resume --new-disk``): its records are dropped so that the peer
mirrors its copy over it in full, and this node's copy counts as outdated until the
replica's own record says a session has been applied to it (``applied`` in its state dir):
the peer's word alone may predate the new disk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import select
import threading

from mirror.applied import APPLIED_FILE
from mirror.atomicfile import write_record
from mirror.epoch import observe_epoch, read_epoch
from mirror.errors import SourceGuardError
from mirror.guard import IDENTITY_FILE, TreeIdentity, is_mount_point, load, on_recorded_fs
from mirror.statedir import state_dir_below

from .errors import HawrapError

log = logging.getLogger(__name__)

HELD_FILE = "trees-held.json"
ADOPT_HINT = "if this disk replaces the tree's on purpose, run 'hawrap resume --new-disk'"


class MountTable:
    """Whether a path is a mount point, from the kernel's mount table read again only when
    the kernel says it changed (``poll`` on ``/proc/self/mountinfo``: ``POLLPRI`` once per
    change): the node asks at every step, and a host with thousands of mounts has a table of
    megabytes."""

    def __init__(self):
        try:
            self._file = open("/proc/self/mountinfo", "rb", buffering=0)  # held open: polled
        except OSError:
            self._file = None
        self._poll = select.poll()
        if self._file is not None:
            self._poll.register(self._file, select.POLLPRI)
        self._known: dict[bytes, bool] = {}

    def is_mount_point(self, path: bytes) -> bool:
        if self._file is None:
            return is_mount_point(path)
        if self._poll.poll(0):
            self._known.clear()
        if path not in self._known:
            self._known[path] = is_mount_point(path)
        return self._known[path]


def _one_at_a_time(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class TreeDisks:
    """The disks of ``trees`` (``mirrorctl.Tree``), checked at every call of ``unfit``; the
    tree ids held, recorded in ``state_dir`` as soon as a fit tree shows one (unless
    ``record`` is false: ``hawrap check`` only reads).  Asked from several threads (the
    node's loop, the leadership's campaign, the control socket): one at a time."""

    def __init__(self, trees, state_dir: str, record: bool = True):
        self.record = record
        self.trees = [t for t in trees if t.require_mount]
        self.state_dir = state_dir  # the node's: its epoch, and the tree ids held
        self.path = os.path.join(state_dir, HELD_FILE)
        self.held: dict[str, str] = {}
        self.adopted: set[str] = set()  # new disks no session has been applied to yet
        self.mounts = MountTable()
        self._lock = threading.RLock()
        self._load()

    @_one_at_a_time
    def unfit(self) -> str:
        """Why this node cannot serve its trees now ("" if it can)."""
        return "; ".join(problem for t in self.trees if (problem := self._problem(t)))

    @_one_at_a_time
    def unfit_trees(self) -> set[str]:
        """The names of the trees whose disk is not theirs now (``unfit``): nothing is written there."""
        return {t.name for t in self.trees if self._problem(t)}

    @_one_at_a_time
    def incomplete(self) -> list[str]:
        """The trees whose new disk has not been mirrored onto yet."""
        done = {t.name for t in self.trees if t.name in self.adopted
                and os.path.exists(os.path.join(t.state_dir, os.fsdecode(APPLIED_FILE)))}  # fmt: skip
        if done:
            self.adopted -= done
            try:
                self._save()
            except OSError as exc:  # an adopted disk found mirrored again after a restart
                log.warning("%s: cannot record that %s is mirrored (%s)", self.path, ", ".join(done), exc.strerror)
        return sorted(self.adopted)

    @_one_at_a_time
    def served(self) -> None:
        """This node serves its trees: a new disk is the tree's copy from now on (the changes
        made on it exist nowhere else), not one waiting to be mirrored onto."""
        if self.adopted:
            self.adopted.clear()
            try:
                self._save()
            except OSError as exc:  # said again at the next step that serves
                log.warning("%s: cannot record that the new disks are served (%s)", self.path, exc.strerror)

    @_one_at_a_time
    def adopt(self) -> list[str]:
        """The mounted trees whose disk is not the held one become the tree's new disks: the
        held id is forgotten and the tree's identity and applied position are removed (the
        next sender records its tree, and compares everything).  Returns their names; raises
        ``HawrapError`` while a tree has nothing mounted, or when every disk is the tree's."""
        missing = [t.path for t in self.trees if not self.mounts.is_mount_point(os.fsencode(t.path))]
        if missing:
            raise HawrapError(f"nothing is mounted at {', '.join(missing)}: mount the new disk first")
        adopted = []
        for t in self.trees:
            problem = self._problem(t)
            if not problem:
                continue
            self._forget_disk(t)
            self.held.pop(t.name, None)
            self.adopted.add(t.name)
            log.warning("%s: adopted a new disk at %s (was: %s)", t.name, t.path, problem)
            adopted.append(t.name)
        if not adopted:
            raise HawrapError("every tree's disk is the one this node holds: nothing to adopt")
        try:
            self._save()
        except OSError as exc:
            raise HawrapError(f"{self.path}: cannot record the new disks: {exc.strerror}") from None
        return adopted

    def _forget_disk(self, t) -> None:
        """What the tree's state dir says of the disk goes: its identity and what was applied
        to it; a state dir on the disk itself (another tree's, another cluster's) also its
        journals, digest cache and epoch, which is set to this node's (a higher one would
        fence this cluster's primary off the new disk)."""
        state_dir = os.fsencode(t.state_dir)
        names = [IDENTITY_FILE, APPLIED_FILE]
        on_disk = state_dir_below(os.fsencode(t.path), state_dir) is not None
        if on_disk:
            names += [b"epoch", b"mirror-daemon.status.json"]
            with contextlib.suppress(FileNotFoundError):
                names += [n for n in os.listdir(state_dir) if n.startswith((b"journal-", b"digests-"))]
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(state_dir, name))
        if on_disk and os.path.isdir(state_dir) and (epoch := read_epoch(self.state_dir)):
            observe_epoch(state_dir, epoch)

    def _problem(self, t) -> str:
        path, state_dir = os.fsencode(t.path), os.fsencode(t.state_dir)
        if not self.mounts.is_mount_point(path):
            return f"nothing is mounted at {t.path} (require_mount)"
        try:
            identity = load(state_dir)
        except SourceGuardError as exc:
            return str(exc)
        record = os.path.join(t.state_dir, os.fsdecode(IDENTITY_FILE))
        if identity is not None and identity.fs is not None and state_dir_below(path, state_dir) is None:
            if not on_recorded_fs(identity, path):
                return (f"another file system is mounted at {t.path} than the one recorded in {record}: "
                        f"{ADOPT_HINT}")  # fmt: skip
        held = self.held.get(t.name)
        if held is None:
            if identity is not None and self.record:
                self._hold(t.name, identity)
            return ""
        if identity is None or identity.tree_id != held:
            found = f"tree {identity.tree_id}" if identity else f"no tree ({record} missing)"
            return (f"{t.path} holds {found}, not tree {held} that this node held there (recorded in {self.path}): "
                    f"another disk mounted in its place? {ADOPT_HINT}")  # fmt: skip
        return ""

    def _hold(self, name: str, identity: TreeIdentity) -> None:
        self.held[name] = identity.tree_id
        try:
            self._save()
        except OSError as exc:  # tried again at the next call
            del self.held[name]
            log.warning("%s: cannot record the tree id held (%s)", self.path, exc.strerror)
            return
        log.info("%s: holds tree %s", name, identity.tree_id)

    def _save(self) -> None:
        record = {"held": self.held, "adopted": sorted(self.adopted)}
        write_record(self.path, json.dumps(record, sort_keys=True).encode() + b"\n", 0o600, filler=b" ")

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read(1 << 16))
            held, adopted = data["held"], data["adopted"]
            if not (isinstance(held, dict) and all(isinstance(v, str) for v in held.values())
                    and isinstance(adopted, list) and all(isinstance(v, str) for v in adopted)):  # fmt: skip
                raise ValueError("not a record of tree ids")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable (%s); the tree ids held are recorded again", self.path, exc)
            return
        self.held, self.adopted = held, set(adopted)
