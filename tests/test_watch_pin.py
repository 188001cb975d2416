"""watchdog is pinned to the version mirror/watch.py was written against, and still has what
it hooks.

mirror/watch.py subclasses watchdog's internal inotify classes (not its public API) to hear
of queue overflows and failed watches.  An upgrade must be a decision: change the pin, run
the daemon tests (tests/test_daemon*.py, tests/test_scoped_sessions.py) against the new
version, and update this list.  These checks fail first, naming what moved.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import tomllib
from importlib.metadata import version

from tests.helpers import REPO


def _pinned() -> str:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"watchdog\b", d)]
    match = re.fullmatch(r"watchdog==([\w.]+)", spec.replace(" ", ""))
    assert match, f"watchdog must be pinned to one version (its internals are hooked), not {spec!r}"
    return match.group(1)


def test_installed_watchdog_is_the_pinned_version():
    assert version("watchdog") == _pinned()


def _keyword_parameters(func) -> set[str]:
    return {p.name for p in inspect.signature(func).parameters.values() if p.kind == p.KEYWORD_ONLY}


def test_the_internals_mirror_watch_hooks_are_there():
    from watchdog.observers import inotify, inotify_c, inotify_move_event_grouper

    group = inotify.InotifyWatchGroup
    for name in ("on_queue_overflow", "_recursive_simulate", "read_event", "_add_all_callbacks", "_add_callback",
                 "on_event", "on_watch_deleted", "_move_watches", "_remove_watch_internally"):  # fmt: skip
        assert callable(getattr(group, name, None)), f"InotifyWatchGroup.{name} is gone"
    # _move_watches is extended: it must still report whether the source was watched, and be
    # what a paired move calls; _remove_watch_internally is replaced, over the same two maps.
    assert "source_was_watched = move_src_path is not None and self._move_watches(" in inspect.getsource(group)
    # _add_callback is replaced (watchdog's passes over a directory it cannot watch): what
    # the replacement uses of the group and of its inotify descriptor must still be there.
    source = inspect.getsource(group)
    for attribute in ("self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)",
                      "self._active_callbacks_by_path[path] = wd", "self._active_callbacks_by_watch[wd] = path",
                      "with self._lock:", "self._add_all_callbacks(src_path)"):  # fmt: skip
        assert attribute in source, f"InotifyWatchGroup no longer does {attribute}"
    from watchdog.observers.api import BaseObserver

    assert isinstance(getattr(BaseObserver, "emitters", None), property), "BaseObserver.emitters is gone"
    # The observer's extra keywords (our skip_dir) are passed on to each emitter it makes.
    assert "**self._emitter_kwargs," in inspect.getsource(BaseObserver.schedule), "BaseObserver.schedule changed"
    assert {"is_recursive", "event_mask", "follow_symlink"} <= set(inspect.signature(group).parameters)

    emitter = inotify.InotifyEmitter
    for name in ("on_thread_start", "build_and_queue_event", "queue_events", "_decode_path",
                 "get_event_mask_from_filter", "queue_event"):  # fmt: skip
        assert callable(getattr(emitter, name, None)), f"InotifyEmitter.{name} is gone"
    assert "full_events" in _keyword_parameters(emitter.build_and_queue_event)
    assert "full_events" in _keyword_parameters(emitter.queue_events)
    # Set by the emitter and read by the hooks.
    source = inspect.getsource(emitter)
    for attribute in ("self._inotify_fd", "self._inotify", "self._lock"):
        assert attribute in source, f"InotifyEmitter no longer has {attribute}"

    fields = [f.name for f in dataclasses.fields(inotify_c.InotifyEvent)]
    assert fields[:4] == ["wd", "mask", "cookie", "name"], fields
    assert inotify_move_event_grouper.PathedInotifyEvent._fields == ("ev", "path")


def test_mirror_watch_imports_with_this_watchdog():
    from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup

    from mirror import watch

    assert issubclass(watch._Emitter, InotifyEmitter) and issubclass(watch._WatchGroup, InotifyWatchGroup)
