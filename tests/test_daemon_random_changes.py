"""A live daemon under random changes of every kind a tree sees, in bursts that overlap its
sessions: nested directories made, renamed and removed, files written in place, by rename,
appended and cut short, hard links made and edited through either name, symlinks pointed
elsewhere, kinds swapped, modes and times set (a linked file's names removed or renamed away
after it was changed through them, too).  After each burst the replica must become
exactly the source (contents, modes, times of files and directories, links), within a bound
far below the daemon's periodic reconcile: what only a full reconcile would repair counts as
a divergence.  The daemon is held (SIGSTOP) for runs of changes, so that its watcher reads
their events late, as a busy one does; in a second test it is also killed (SIGKILL) once,
and started again.  A reader reads the replica's files throughout: never a content the
source did not have.  In a third test some names are excluded (``*.tmp``: files and
directories made, written, renamed to and from included names, linked to included files)
and the replica must equal the source without them.  Each trial's changes are listed in a
failure.

CI runs one seed per test and mode; ``HAMIRROR_RANDOM_TRIALS=N`` runs N."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import time

import pytest

from tests.daemons import converged, live_daemon
from tests.helpers import PollingThread
from tests.replica_checks import MODES, Target

TRIALS = int(os.environ.get("HAMIRROR_RANDOM_TRIALS", "1"))
BURSTS = 4
OPS_PER_BURST = 60
# Far below the daemon's reconcile interval; above its follow-up compare of linked files.
CONVERGE_SECONDS = 30.0
EXCLUDED = ".tmp"  # the excludes test's pattern: *.tmp
PAGE = 4096


def _without_excluded(snap: dict) -> dict:
    """A snapshot without the ``*.tmp`` names and what is below them; a hard-link group
    named by its first name left (the source's may be an excluded one)."""
    kept = {k: v for k, v in snap.items() if not any(part.endswith(EXCLUDED.encode()) for part in k.split(b"/"))}
    leaders: dict[bytes, bytes] = {}
    for k in sorted(kept):
        if kept[k][0] == "file":
            leaders.setdefault(kept[k][5], k)
    return {k: v[:5] + (leaders[v[5]],) if v[0] == "file" else v for k, v in kept.items()}


class _Tree:
    """The source tree and a random change to it; each change is appended to ``log``."""

    def __init__(self, root, rng: random.Random, log: list, excluded_share: float = 0.0):
        self.root = root
        self.rng = rng
        self.log = log
        self.n = 0
        self.excluded_share = excluded_share  # of new names, the share ending in EXCLUDED
        # Every content a file of the tree has had (an in-place rewrite passes through empty);
        # of them, those it had only in the middle of a write call.
        self.contents = {hashlib.sha256(b"").digest()}
        self.midwrite: set[bytes] = set()

    def _all(self, kind: str) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel
            if not rel:
                dirnames[:] = [d for d in dirnames if d != ".mirror"]  # the state dir: not content
            if kind == "dir":
                out.append(rel)
                continue
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                path = os.path.join(rel, name)
                full = os.path.join(self.root, path)
                if kind == "file" and os.path.isfile(full) and not os.path.islink(full):
                    out.append(path)
                elif kind == "symlink" and os.path.islink(full):
                    out.append(path)
        return sorted(out)

    def _new_name(self, parent: str) -> str:
        self.n += 1
        suffix = EXCLUDED if self.rng.random() < self.excluded_share else ""
        return os.path.join(parent, f"n{self.n}{suffix}")

    def _content(self) -> bytes:
        size = self.rng.choice([0, 1, 100, 4000, 70_000, 300_000])  # the largest sent as deltas
        return self.rng.randbytes(size)

    def _hold(self, data: bytes, written_from: int) -> None:
        """``data`` is about to be a file's content, written by one write call from offset
        ``written_from``: the reader may see it from now on, and every state the file passes
        through on the way.  The kernel copies a write into the file a page at a time and
        moves its size each time (its times once, first): a reader, or the daemon, can read
        the file stopped after any page, a true state of it, though never a whole one."""
        self.contents.add(hashlib.sha256(data).digest())
        for end in range((written_from // PAGE + 1) * PAGE, len(data), PAGE):
            digest = hashlib.sha256(data[:end]).digest()
            self.contents.add(digest)
            self.midwrite.add(digest)

    def _content_to_hold(self) -> bytes:
        """A content to write into an empty file."""
        data = self._content()
        self._hold(data, written_from=0)
        return data

    def change(self) -> None:
        rng = self.rng
        dirs, files = self._all("dir"), self._all("file")
        op = rng.choice(
            ["write_new", "write_new", "overwrite", "overwrite", "append", "truncate", "replace_by_rename",
             "unlink", "mkdir", "mkdir", "rmtree", "rename_dir", "rename_file", "symlink", "retarget",
             "hardlink", "chmod", "utime", "dir_utime", "dir_chmod", "file_to_dir", "dir_to_file"]
        )  # fmt: skip
        full = lambda p: os.path.join(self.root, p)  # noqa: E731
        sub_dirs = [d for d in dirs if d]
        if op in ("overwrite", "append", "truncate", "hardlink", "chmod", "utime") and not files:
            op = "write_new"
        if op in ("replace_by_rename", "unlink", "rename_file", "file_to_dir") and not files:
            op = "write_new"
        if op in ("dir_utime", "dir_chmod", "rmtree", "rename_dir", "dir_to_file") and not sub_dirs:
            op = "mkdir"
        if op == "retarget" and not self._all("symlink"):
            op = "symlink"
        if op == "write_new":
            path = self._new_name(rng.choice(dirs))
            with open(full(path), "wb") as f:
                f.write(self._content_to_hold())
        elif op == "overwrite":  # in place: every name of a linked file sees it
            path = rng.choice(files)
            with open(full(path), "r+b") as f:
                f.truncate(0)
                f.write(self._content_to_hold())
        elif op == "append":
            path = rng.choice(files)
            more = self._content()
            with open(full(path), "rb") as f:
                old = f.read()
            self._hold(old + more, written_from=len(old))
            with open(full(path), "ab") as f:
                f.write(more)
        elif op == "truncate":
            path = rng.choice(files)
            with open(full(path), "rb") as f:
                data = f.read()
            self._hold(data[: len(data) // 2], written_from=len(data) // 2)
            os.truncate(full(path), len(data) // 2)
        elif op == "replace_by_rename":
            path = rng.choice(files)
            tmp = full(path) + ".tmp"
            with open(tmp, "wb") as f:
                f.write(self._content_to_hold())
            os.rename(tmp, full(path))
        elif op == "unlink":
            path = rng.choice(files)
            os.unlink(full(path))
        elif op == "mkdir":
            path = self._new_name(rng.choice(dirs))
            os.mkdir(full(path))
            if rng.random() < 0.5:
                with open(full(os.path.join(path, "inside")), "wb") as f:
                    f.write(self._content_to_hold())
        elif op == "rmtree":
            path = rng.choice(sub_dirs)
            shutil.rmtree(full(path))
        elif op == "rename_dir":
            path = rng.choice(sub_dirs)
            targets = [d for d in dirs if d != path and not (d + "/").startswith(path + "/")]
            new = self._new_name(rng.choice(targets))
            os.rename(full(path), full(new))
            path = f"{path} -> {new}"
        elif op == "rename_file":
            old = rng.choice(files)
            if rng.random() < 0.5 and len(files) > 1:
                new = rng.choice([f for f in files if f != old])  # over another file
            else:
                new = self._new_name(rng.choice(dirs))
            os.rename(full(old), full(new))
            path = f"{old} -> {new}"
        elif op == "symlink":
            path = self._new_name(rng.choice(dirs))
            os.symlink(rng.choice(["nowhere", "../x", "a" * 50]), full(path))
        elif op == "retarget":
            path = rng.choice(self._all("symlink"))
            os.unlink(full(path))
            os.symlink(f"t{rng.randrange(1000)}", full(path))
        elif op == "hardlink":
            old = rng.choice(files)
            new = self._new_name(rng.choice(dirs))
            os.link(full(old), full(new))
            path = f"{old} => {new}"
        elif op == "chmod":
            path = rng.choice(files)
            os.chmod(full(path), rng.choice([0o600, 0o644, 0o640, 0o755]))
        elif op == "utime":
            path = rng.choice(files)
            t = rng.randrange(10**9, 2 * 10**9) * 10**9 + rng.randrange(10**9)
            os.utime(full(path), ns=(t, t))
        elif op == "dir_utime":
            path = rng.choice(sub_dirs)
            t = rng.randrange(10**9, 2 * 10**9) * 10**9
            os.utime(full(path), ns=(t, t))
        elif op == "dir_chmod":
            path = rng.choice(sub_dirs)
            os.chmod(full(path), rng.choice([0o700, 0o755, 0o750]))
        elif op == "file_to_dir":
            path = rng.choice(files)
            os.unlink(full(path))
            os.mkdir(full(path))
        elif op == "dir_to_file":
            path = rng.choice(sub_dirs)
            shutil.rmtree(full(path))
            with open(full(path), "wb") as f:
                f.write(self._content_to_hold())
        self.log.append(f"{op} {path}")


class _Reader(PollingThread):
    """Reads every file of the replica over and over: each must hold a content its source
    had (never a part of one, never a mix); ``midwrite`` counts the reads of a state the
    source had only in the middle of a write, which the daemon copied then."""

    def __init__(self, root, tree: _Tree):
        super().__init__(name="replica-reader")
        self.root, self.tree = str(root), tree
        self.torn: list = []
        self.files = 0
        self.midwrite = 0

    def sample(self):
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == self.root:
                dirnames[:] = [d for d in dirnames if d != ".mirror"]
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    with open(path, "rb") as f:  # a symlink's target is never there: it fails
                        data = f.read()
                    digest = hashlib.sha256(data).digest()
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    continue
                self.files += 1
                if digest not in self.tree.contents:
                    self.torn.append((os.path.relpath(path, self.root), len(data)))
                elif digest in self.tree.midwrite:
                    self.midwrite += 1


def _trial(tmp_path, where: str, seed: int, kill: bool = False, excludes: bool = False) -> None:
    """``kill``: in one burst, at a random change, the daemon is killed (SIGKILL), and started
    again after the burst.  ``excludes``: a quarter of the new names are excluded."""
    rng = random.Random(seed)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    log: list[str] = []
    tree = _Tree(str(src), rng, log, excluded_share=0.25 if excludes else 0.0)
    view = _without_excluded if excludes else None
    for _ in range(30):
        tree.change()
    kill_at = (rng.randrange(BURSTS), rng.randrange(OPS_PER_BURST)) if kill else None
    dst.mkdir()
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(Target(where, dst, tmp_path).running()).daemon_args()
        if excludes:
            target += ["--exclude", "*" + EXCLUDED]
        d = stack.enter_context(live_daemon(src, *target))
        reader = stack.enter_context(_Reader(dst, tree))
        converged(src, dst, view=view)
        for burst in range(BURSTS):
            log.append(f"-- burst {burst}")
            held = False
            for i in range(OPS_PER_BURST):
                # The daemon held (SIGSTOP) now and then: its watcher reads a run of events
                # late, after later changes, as a busy or preempted one does.
                if not held and rng.random() < 0.1:
                    d.proc.send_signal(signal.SIGSTOP)
                    held = True
                elif held and rng.random() < 0.2:
                    d.proc.send_signal(signal.SIGCONT)
                    held = False
                if (burst, i) == kill_at:
                    log.append("-- the daemon killed")
                    d.proc.kill()
                    d.proc.wait()
                tree.change()
                if rng.random() < 0.1:  # a pause: a session starts in the middle of the burst
                    time.sleep(rng.uniform(0.001, 0.05))
            if d.proc.poll() is not None:
                log.append("-- the daemon started again")
                d = stack.enter_context(live_daemon(src, *target))
            elif held:
                d.proc.send_signal(signal.SIGCONT)
            try:
                converged(src, dst, timeout=CONVERGE_SECONDS, view=view)
            except AssertionError as exc:
                raise AssertionError(f"seed {seed}, {where}, burst {burst}: {exc}\nchanges:\n" + "\n".join(log)) from None
        assert "Traceback" not in d.log_text()
        reader.wait_polls(1)
    if reader.torn:
        first = reader.torn[0][0]
        history = [line for line in log if line.startswith("--") or first in line]
        raise AssertionError(
            f"seed {seed}, {where}: read from the replica, content the source never had (path, size): {reader.torn[:5]}"
            f" ({reader.midwrite} reads of a state it had in the middle of a write); changes:\n" + "\n".join(history)
        )
    assert reader.files > 0


@pytest.mark.parametrize("where", MODES)
@pytest.mark.parametrize("trial", range(TRIALS))
def test_random_changes_in_bursts_converge_exactly(tmp_path, where, trial):
    _trial(tmp_path, where, seed=1000 + trial)


@pytest.mark.parametrize("where", MODES)
@pytest.mark.parametrize("trial", range(TRIALS))
def test_random_changes_with_the_daemon_killed_in_a_burst_converge_exactly(tmp_path, where, trial):
    """The journal replayed after a kill -9 (nested directories renamed, links, kinds swapped)."""
    _trial(tmp_path, where, seed=2000 + trial, kill=True)


@pytest.mark.parametrize("where", MODES)
@pytest.mark.parametrize("trial", range(TRIALS))
def test_random_changes_with_excluded_names_converge_exactly_without_them(tmp_path, where, trial):
    """Temporary names renamed into place, included files renamed to excluded names and
    back, excluded directories holding included-looking names, links across the line."""
    _trial(tmp_path, where, seed=3000 + trial, excludes=True)
