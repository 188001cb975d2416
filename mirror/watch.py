"""Watching a tree for changes: watchdog's inotify observer, with what it does not tell.

watchdog turns inotify events into file-system events, pairs renames and, for a new
directory, reports what was created inside it before its watch was added.  Two things it
only logs, and the daemon must know about:

- an inotify queue overflow (the kernel dropped events): watchdog 7.1 rebuilds its watches
  and discards what was pending;
- a directory below the root it cannot watch (``max_user_watches`` reached, a failing
  disk), at the start or later: watchdog passes over it without a word, and its changes
  would go unseen.  The watch group here keeps those directories (``unwatched``), says so,
  and the ``Watcher`` tries them again, and scans them whole, after ``REWATCH_SECONDS``, then
  less often; ``Watcher.unwatched()`` and ``retry_at`` tell the daemon's status.

``Watcher`` hooks both (a subclassed watch group and emitter) and reports them as
``rescan`` changes, so the daemon rescans instead of trusting a stream with holes in it
(again once a directory that could not be watched is).
Those classes are watchdog's internals, not its API: pyproject.toml pins the exact version
this was written and tested against, and tests/test_watch_pin.py lists what is relied on.
Changes are reported as ``FsEvent(kind, path, other)`` with paths relative to the root:

- ``entry``: this entry (file, directory, symlink ...) may differ; ``open`` is true while a
  regular file is still being written (a modify without its close yet); ``linked``: it is a
  file with other names (hard links), which changed with it though no event names them;
  ``written``: a file's content or attributes were changed in place (through a name that
  may have had other names: ``plan.Planner.replaced`` tells, should the name go); ``gone``:
  and the name was no regular file any more when the event was read;
  ``named``: it was made or removed (its directory's listing, and times, changed);
- ``closed``: a file open for writing was closed (mirror it now);
- ``tree``: a directory appeared (created or moved in): scan it whole;
- ``rename``: ``path`` became ``other``, both inside the tree;
- ``rescan``: events were lost below ``path`` (``b""``: the whole tree).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent
from watchdog.observers.inotify_move_event_grouper import PathedInotifyEvent

from .errors import display_path
from .exclude import excluded_dir
from .statedir import STATE_DIR_NAME

log = logging.getLogger(__name__)

# A directory watched twice (its own IN_CREATE and its parent's recursive walk both add it)
# makes watchdog warn that the callback is replaced: it is the same callback.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)

ENTRY, CLOSED, TREE, RENAME, RESCAN = "entry", "closed", "tree", "rename", "rescan"
# Directories that could not be watched are tried again (and rescanned) after this long,
# then less often while they stay unwatched, up to REWATCH_MAX_SECONDS.
REWATCH_SECONDS = 5.0
REWATCH_MAX_SECONDS = 60.0
WATCH_LIMIT_REASON = "inotify watch limit reached (fs.inotify.max_user_watches)"
_PATH_MAX = 4096  # inotify_add_watch takes an absolute path: less than this, with its NUL


class FsEvent(NamedTuple):
    kind: str
    path: bytes
    other: bytes | None = None
    open: bool = False
    linked: bool = False
    named: bool = False
    written: bool = False
    gone: bool = False


class _LostEvents(DirModifiedEvent):
    """Not a real event: the emitter's way to say events were lost below ``src_path`` (a
    DirModifiedEvent only so that it passes the emitter's event filter)."""

    event_type = "lost"


@dataclass(unsafe_hash=True, frozen=True)
class _FoundInNewDirectory(InotifyEvent):
    """An entry watchdog found by walking a directory that was just created.  The directory's
    own event comes first and is scanned whole, after the walk, so these add nothing: and
    a file found this way is not known to be open (its close may have come before the watch)."""


class _WatchGroup(InotifyWatchGroup):
    """watchdog's watch group, but a directory it cannot watch is kept in ``unwatched`` (path:
    why) and heard of (``unwatched_hook``), not passed over; and one ``skip_dir(path)`` names
    (the state dir, an excluded one) is not watched, nor anything below it: its changes are
    not mirrored, and watches are a limited resource (``max_user_watches``)."""

    overflow_hook: Callable[[], None] | None = None
    unwatched_hook: Callable[[], None] | None = None
    _retrying: dict[bytes, str] | None = None  # during ``rewatch``: what fails again

    def __init__(self, *args, skip_dir: Callable[[bytes], bool] | None = None, **kwargs):
        self.skip_dir = skip_dir or (lambda path: False)  # before the base class sets up its watches
        super().__init__(*args, **kwargs)

    def __repr__(self) -> str:
        # watchdog formats a watch's repr, its callbacks' (bound to this) included, in the
        # (ignored) warning it builds each time a watched directory is watched again: the
        # dataclass's repr of every path held made that quadratic in the watches.
        return f"<_WatchGroup {self.path!r}>"

    def on_queue_overflow(self) -> None:
        try:
            super().on_queue_overflow()  # the watches rebuilt
        except Exception:  # in the inotify thread, which must not end: the rescan still comes
            log.exception("%s: the watches could not all be set again", display_path(self.path))
        if self.overflow_hook is not None:
            self.overflow_hook()

    @property
    def unwatched(self) -> dict[bytes, str]:
        return self.__dict__.setdefault("_unwatched", {})  # filled while the base class sets up

    def _add_all_callbacks(self, path: bytes) -> None:
        if path != self.path and self.skip_dir(path):
            return
        self._add_callback(path)
        if self.is_recursive and path in self._active_callbacks_by_path:
            for subdir in self._subdirs(path):
                self._add_callback(subdir)

    def _subdirs(self, path: bytes):
        """The directories below ``path`` to watch: not symlinks, not ``skip_dir``'s (nor
        below them).  One that cannot be listed hides its own: it is said unwatchable; so is
        one whose path inotify cannot take (PATH_MAX), and nothing below it is walked."""

        def watchable(subdir: bytes) -> bool:
            if self.skip_dir(subdir):
                return False  # nor walked
            if len(subdir) >= _PATH_MAX:
                self._unwatchable(subdir, OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)))
                return False
            return True

        for _, _, subdirs in _listings(path, watchable, self._unwatchable):
            yield from subdirs

    def _add_callback(self, path: bytes, known: bool = True) -> None:
        """``known`` false: a directory already watched under another path (its rename not
        read yet) keeps that path, which the rename's event corrects."""
        try:
            wd = self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)
        except OSError as exc:
            if path == self.path:
                raise
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # gone: its deletion is an event
                self._unwatchable(path, exc)
            return
        if self._retrying is None:  # a retry settles its directories once done (``rewatch``)
            self.unwatched.pop(path, None)
        if not known and wd in self._active_callbacks_by_watch:
            return
        self._active_callbacks_by_path[path] = wd
        self._active_callbacks_by_watch[wd] = path

    def on_event(self, event) -> None:
        self._survive(super().on_event, event)

    def on_watch_deleted(self, wd) -> None:
        self._survive(super().on_watch_deleted, wd)

    def _survive(self, handle, arg) -> None:
        """watchdog's inotify thread, shared by every watch, ends on an exception from a
        handler (a state of its bookkeeping of paths it did not foresee, raced by renames and
        deletions): every later change would go unseen while the daemon says it is live.
        Handled as lost events instead: the watches are rebuilt and the tree rescanned."""
        try:
            handle(arg)
        except Exception:
            log.exception("%s: a watch event could not be handled: watching again and rescanning",
                          display_path(self.path))  # fmt: skip
            self.on_queue_overflow()

    def _remove_watch_internally(self, wd) -> None:
        # A path can have been given to a newer watch (the directory replaced) before the old
        # watch's end is read: that path then stays with the newer one.
        path = self._active_callbacks_by_watch.pop(wd, None)
        if path is not None and self._active_callbacks_by_path.get(path) == wd:
            del self._active_callbacks_by_path[path]

    def _move_watches(self, move_src_path: bytes, move_dst_path: bytes) -> bool:
        """watchdog moves a renamed directory's watches with it.  A directory made in it just
        before the rename was tried at its old path, gone by then: it is watched here, at its
        new one (the rename's own scan of the moved subtree comes after this)."""
        moved = super()._move_watches(move_src_path, move_dst_path)
        if moved and self.is_recursive:
            for subdir in self._subdirs(move_dst_path):
                if subdir not in self._active_callbacks_by_path:
                    self._add_callback(subdir, known=False)
        return moved

    def _unwatchable(self, path, exc: OSError) -> None:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return
        # inotify_add_watch's ENOSPC is the watch limit: named with the sysctl that raises it
        # (`mirror status` gives its hint on that name).
        why = WATCH_LIMIT_REASON if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        if self._retrying is not None:  # said by the caller's rescan
            self._retrying[os.fsencode(path)] = why
            return
        first = not self.unwatched  # one rescan covers them all; the retries rescan again
        self.unwatched[os.fsencode(path)] = why
        if first and self.unwatched_hook is not None:
            self.unwatched_hook()

    def rewatch(self) -> list[bytes]:
        """Try the unwatched directories again; all of them tried (the caller rescans them).
        One that fails again stays in ``unwatched`` throughout (the daemon's status reads it
        meanwhile, and a retry on a failing disk may take seconds)."""
        with self._lock:
            tried, done, failed = list(self.unwatched), [], {}
            self._retrying = failed
            try:
                for path in tried:
                    self._add_all_callbacks(path)
                    done.append(path)
            finally:  # an error leaves the untried ones for the next round
                self._retrying = None
                self.unwatched.update(failed)
                for path in done:
                    if path not in failed:
                        self.unwatched.pop(path, None)
            return tried

    def _recursive_simulate(self, src_path: bytes) -> list[InotifyEvent]:
        """What a directory just made holds, as made events of its watched directories (the
        base class's, with ``_listings``' walk: no deeper than inotify watches)."""
        events = []
        # One that cannot be listed (gone): its own event, or the rescan, says so.
        for top, found, _ in _listings(src_path, lambda path: len(path) < _PATH_MAX, lambda path, exc: None):
            wd = self._active_callbacks_by_path.get(top)
            if wd is None:
                continue  # not watched: its own made event reports it when it is
            for name, _, is_dir in found:
                mask = InotifyConstants.IN_CREATE | (InotifyConstants.IN_ISDIR if is_dir else 0)
                events.append(_FoundInNewDirectory(wd, mask, 0, name))
        return events


def _listings(top: bytes, descend: Callable[[bytes], bool], on_error: Callable[[bytes, OSError], None]):
    """``(directory, [(name, path, is_dir)], subdirectories walked)`` for ``top`` and each
    directory below it that ``descend(path)`` lets in, never through a symlink; a directory
    is listed only after its parent's item was handled.  The walk keeps its own stack: a
    chain of directories a user made thousands deep must not overflow the interpreter's.
    ``on_error(path, exc)``: one that cannot be listed."""
    stack = [top]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as it:
                found = [(e.name, e.path, e.is_dir(follow_symlinks=False)) for e in it]
        except OSError as exc:
            on_error(path, exc)
            continue
        subdirs = [sub for _, sub, is_dir in sorted(found, reverse=True) if is_dir and descend(sub)]
        yield path, found, subdirs
        stack.extend(subdirs)


class _Emitter(InotifyEmitter):
    """InotifyEmitter that reports queue overflows and failed watches as ``_LostEvents``;
    ``skip_dir``: the directories its watch group leaves unwatched."""

    def __init__(self, *args, skip_dir: Callable[[bytes], bool] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_dir = skip_dir

    def on_thread_start(self) -> None:
        path = os.fsencode(self.watch.path)
        self._inotify = _WatchGroup(
            self._inotify_fd, path, is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(), follow_symlink=False, skip_dir=self.skip_dir,
        )  # fmt: skip
        self._inotify.overflow_hook = lambda: self.queue_event(_LostEvents(self.watch.path))
        self._inotify.unwatched_hook = lambda: self.queue_event(_LostEvents(self.watch.path))
        if self._inotify.unwatched:  # found while the watches were first set up
            self.queue_event(_LostEvents(self.watch.path))

    def build_and_queue_event(self, event, *, full_events: bool = False) -> None:
        if isinstance(event, PathedInotifyEvent) and isinstance(event.ev, _FoundInNewDirectory):
            kind = DirCreatedEvent if event.ev.is_directory else FileCreatedEvent
            self.queue_event(kind(self._decode_path(event.path), is_synthetic=True))
            return
        super().build_and_queue_event(event, full_events=full_events)

    def queue_events(self, timeout, *, full_events: bool = False) -> None:
        # watchdog logs an ERROR when this runs as the observer stops (its watch group is
        # gone already): a normal shutdown, not worth a word.
        with self._lock:
            group = self._inotify
        if group is None:
            return
        try:
            event = group.read_event()
            if event is None:
                return
            with self._lock:
                if self._inotify is not None:
                    self.build_and_queue_event(event, full_events=full_events)
        except OSError as exc:
            # Typically ENOSPC from inotify_add_watch: a directory is not watched.
            log.warning("watch failed under %s: %s; rescanning", self.watch.path, exc)
            self.queue_event(_LostEvents(self.watch.path))


_EVENTS = [
    FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, DirModifiedEvent, FileDeletedEvent, DirDeletedEvent,
    FileMovedEvent, DirMovedEvent, FileClosedEvent, FileAttribEvent, DirAttribEvent,
]  # fmt: skip


class _Observer(BaseObserver):
    def __init__(self, skip_dir: Callable[[bytes], bool]):
        super().__init__(emitter_class=_Emitter, skip_dir=skip_dir)  # passed on to each emitter


class Watcher:
    """Reports changes below ``root`` to ``on_change(list[FsEvent])`` from a watchdog thread.

    ``excluded(path, is_dir)`` filters paths (the tree's exclude rules); the state dir is
    never reported.  ``start()`` returns once the watches are in place.
    """

    def __init__(self, root: bytes, on_change: Callable[[list[FsEvent]], None], excluded=None):
        self.root = os.path.realpath(root)
        self.on_change = on_change
        self.excluded = excluded
        self._observer: _Observer | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._rewatcher: threading.Thread | None = None
        self.retry_at: float | None = None  # when the unwatched directories are tried next (Unix time)

    def start(self) -> None:
        handler = _Handler(self)
        observer = _Observer(self._not_watched)
        # Not IN_OPEN nor IN_CLOSE_NOWRITE: the daemon's own reads would wake it for nothing.
        observer.schedule(handler, os.fsdecode(self.root), recursive=True, event_filter=_EVENTS)
        observer.start()
        self._observer = observer
        self._rewatcher = threading.Thread(target=self._rewatch, args=(observer,), name="rewatch", daemon=True)
        self._rewatcher.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._rewatcher is not None:
            self._rewatcher.join(timeout=10)
            self._rewatcher = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None

    def _rewatch(self, observer: _Observer) -> None:
        """Say which directories could not be watched, and try them again (``REWATCH_*``):
        each one tried is scanned whole, for what changed in it while it was not watched."""
        said, delay = 0, REWATCH_SECONDS
        while True:
            groups = _groups(observer)
            # dict() copies in one step: watchdog's thread may add to it meanwhile.
            unwatched = {path: why for group in groups for path, why in dict(group.unwatched).items()}
            if len(unwatched) > said:
                path, why = next(iter(unwatched.items()))
                log.warning("%s: %d %s cannot be watched, e.g. %s: %s; each is scanned whole when it is tried "
                            "again (after %g s, then less often); if the watch limit is reached, raise "
                            "fs.inotify.max_user_watches", display_path(self.root), len(unwatched),
                            "directory" if len(unwatched) == 1 else "directories", display_path(path), why,
                            REWATCH_SECONDS)  # fmt: skip
            elif said and not unwatched:
                log.warning("%s: every directory is watched again", display_path(self.root))
            said = len(unwatched)
            if not unwatched:
                delay = REWATCH_SECONDS
            self.retry_at = time.time() + delay
            if self._stopping.wait(delay):
                return
            try:
                tried = [self.relative(os.fsdecode(path)) for group in groups for path in group.rewatch()]
                self.report([FsEvent(TREE, path) for path in tried if path])
            except Exception:  # the next round tries again; a dead thread would never
                log.exception("%s: trying the unwatched directories again failed", display_path(self.root))
            if unwatched:
                delay = min(delay * 2, REWATCH_MAX_SECONDS)

    def unwatched(self) -> dict[bytes, str]:
        """The directories that cannot be watched now, relative to the root (``b""``: the
        root), with why; not those excluded, whose changes are not mirrored anyway."""
        observer = self._observer
        if observer is None:
            return {}
        out, seen = {}, {}
        for group in _groups(observer):
            for path, why in dict(group.unwatched).items():  # copied in one step, as in _rewatch
                rel = self.relative(os.fsdecode(path))
                if rel is not None and not self._excluded_dir(rel, seen):
                    out[rel] = why
        return out

    def _not_watched(self, path: bytes) -> bool:
        """A directory not to watch, nor below it: the state dir, an excluded one (its parent's
        watch still tells of it appearing, going, or being renamed to a name that is not)."""
        rel = self.relative(os.fsdecode(path))
        return rel is None or (bool(rel) and self.excluded is not None and self.excluded(rel, True))

    def _excluded_dir(self, rel: bytes, seen: dict[bytes, bool]) -> bool:
        """Whether directory ``rel`` or one above it is excluded (a scan does not go below an
        excluded directory; a kept one renamed to an excluded name keeps its watches, which
        still report); ``seen`` caches the answers."""
        return self.excluded is not None and excluded_dir(self.excluded, rel, seen)

    def relative(self, path: str) -> bytes | None:
        """``path`` relative to the root, or None if it is outside or in the state dir."""
        raw = os.fsencode(path)
        if raw == self.root:
            return b""
        if not raw.startswith(self.root + b"/"):
            return None
        rel = raw[len(self.root) + 1 :]
        if rel == STATE_DIR_NAME or rel.startswith(STATE_DIR_NAME + b"/"):
            return None
        return rel

    def report(self, changes: list[FsEvent]) -> None:
        """Pass ``changes`` on, minus excluded paths and everything below an excluded directory
        (whether an excluded path is itself a directory is not known here: dir-only rules are
        applied again by the scan, which knows)."""
        excluded = self.excluded
        if excluded is not None:
            seen: dict[bytes, bool] = {}

            def out(path: bytes, is_dir: bool) -> bool:
                return bool(path) and (excluded(path, is_dir) or self._excluded_dir(path.rpartition(b"/")[0], seen))

            kept = []
            for c in changes:
                if c.kind != RENAME:
                    if not out(c.path, c.kind == TREE):
                        kept.append(c)
                    elif c.named and (parent := c.path.rpartition(b"/")[0]) and not out(parent, True):
                        # Not mirrored, but its directory's times moved all the same (a sync
                        # sets them; the root's are compared at every session).
                        kept.append(FsEvent(ENTRY, parent))
                elif not out(c.other, False):
                    # From an excluded place, nothing of it is on the replica: it is new there,
                    # a directory scanned whole (its own entry comes with it, as for any rename).
                    kept.append(c if not out(c.path, False) else FsEvent(TREE, c.other))
            changes = kept
        if changes:
            self.on_change(changes)


def _groups(observer: _Observer) -> list[_WatchGroup]:
    return [group for e in list(observer.emitters) if isinstance(group := getattr(e, "_inotify", None), _WatchGroup)]


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher):
        self.w = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:
            # watchdog's dispatching thread ends on an exception: every later change would go
            # unseen while the daemon says it is live.  The event is lost instead: a rescan.
            log.exception("%s: a change event could not be handled: rescanning", display_path(self.w.root))
            self.w.report([FsEvent(RESCAN, b"")])

    def _dispatch(self, event: FileSystemEvent) -> None:
        w = self.w
        if isinstance(event, _LostEvents):
            w.report([FsEvent(RESCAN, b"")])
            return
        if event.is_synthetic or isinstance(event, DirModifiedEvent):
            # Synthetic events repeat, entry by entry, a directory creation or rename that is
            # reported (and scanned, or renamed) as a whole.  A directory's mtime moves with
            # every entry in it; the entries are reported themselves.
            return
        if event.event_type in ("opened", "closed_no_write"):
            return
        src = w.relative(event.src_path)
        if isinstance(event, (FileMovedEvent, DirMovedEvent)):
            dst = w.relative(event.dest_path)
            if src and dst:
                w.report([FsEvent(RENAME, src, dst), FsEvent(ENTRY, src, named=True), FsEvent(ENTRY, dst, named=True)])
            elif dst:  # moved in from outside the tree (or from the state dir)
                w.report([FsEvent(ENTRY, dst, named=True)] + ([FsEvent(TREE, dst)] if event.is_directory else []))
            elif src:  # moved out of the tree
                w.report([FsEvent(ENTRY, src, named=True)])
            return
        if not src:
            return
        if isinstance(event, DirCreatedEvent):
            w.report([FsEvent(ENTRY, src, named=True), FsEvent(TREE, src)])
        elif isinstance(event, FileClosedEvent):
            w.report([FsEvent(CLOSED, src)])
        elif isinstance(event, (FileModifiedEvent, FileCreatedEvent)):
            nlink = _regular_links(event.src_path)
            named = isinstance(event, FileCreatedEvent)
            w.report([FsEvent(ENTRY, src, open=nlink > 0, linked=nlink > 1, named=named, written=not named,
                              gone=nlink == 0)])  # fmt: skip
        elif isinstance(event, FileAttribEvent):
            w.report([FsEvent(ENTRY, src, written=True, gone=_regular_links(event.src_path) == 0)])
        else:  # deleted, a directory's attributes changed
            w.report([FsEvent(ENTRY, src, named=not isinstance(event, DirAttribEvent))])


def _regular_links(path: str) -> int:
    """The link count of the regular file at ``path`` now; 0 if it is none (or gone)."""
    try:
        import stat

        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_nlink if stat.S_ISREG(st.st_mode) else 0
