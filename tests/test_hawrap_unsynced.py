"""``hawrap resume`` never lets the peer's copy replace changes of this node's that the peer
lacks without listing them and being told so: the mirror daemon's journals (real
``mirror.journal`` files) and the node's persisted data state are read from disk, with
hawrap stopped, and the command refuses without ``--discard-local-changes``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hawrap import config, setaside, unsynced
from hawrap.demo import write_demo_config
from mirror import journal as J
from mirror.journal import ENTRY, RENAME, Journal
from tests.test_full_disk import small_fs


def mirrored_config(tmp_path) -> str:
    secret = tmp_path / "mirror-secret"
    secret.write_text("m" * 32)
    secret.chmod(0o600)
    for node in ("alpha", "beta"):
        (tmp_path / "data" / node).mkdir(parents=True)
    extra = f"""
[mirror]
secret_file = "{secret}"

[[mirror.tree]]
name = "data"
path = "{tmp_path}/data/{{node}}"
lock_file = "{tmp_path}/data/{{node}}.lock"
"""
    return write_demo_config(str(tmp_path), extra=extra)


def journal_of(tmp_path, node="alpha") -> Journal:
    state_dir = tmp_path / "data" / node / ".mirror"
    state_dir.mkdir(exist_ok=True)
    return Journal(os.fsencode(state_dir / "journal-0123456789abcdef"))


def resume(config_path: str, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "hawrap", "resume", "--config", config_path, "--node", "alpha", *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_nothing_unsynced_on_a_clean_node(tmp_path):
    cfg = config.load(mirrored_config(tmp_path))
    assert not unsynced.find(cfg, "alpha")


def test_journaled_changes_never_mirrored_are_listed(tmp_path):
    cfg = config.load(mirrored_config(tmp_path))
    j = journal_of(tmp_path)
    j.append([(ENTRY, b"mail/new-1", 0), (ENTRY, b"caf\xe9", 0), (RENAME, b"a", b"b")])
    j.close()
    found = unsynced.find(cfg, "alpha")
    assert found and found.journaled == {"data": ["a", "b", "caf\\xe9", "mail/new-1"]}
    text = found.describe("alpha")
    assert "beta lacks" in text and "4 changes journaled and never mirrored" in text and "mail/new-1" in text
    # once a session has mirrored them (the daemon's checkpoint), nothing is left to lose
    j = journal_of(tmp_path)
    j.checkpoint(j.pending().seq)
    j.close()
    assert not unsynced.find(cfg, "alpha")


def test_a_degraded_primary_holds_changes_no_journal_lists(tmp_path):
    path = mirrored_config(tmp_path)
    (tmp_path / "alpha").mkdir(exist_ok=True)
    (tmp_path / "alpha" / "node-state.json").write_text(
        json.dumps({"role": "standby", "peer_outdated": True, "peer_outdated_since": 1.7e9})
    )
    found = unsynced.find(config.load(path), "alpha")
    assert found and found.since == 1.7e9
    assert "everything changed here since then is missing there" in found.describe("alpha")


def test_resume_refuses_without_the_flag_and_says_what_would_be_replaced(tmp_path):
    path = mirrored_config(tmp_path)
    (tmp_path / "alpha").mkdir(exist_ok=True)
    lock = tmp_path / "alpha" / "standby.lock"
    lock.write_text("{}")
    j = journal_of(tmp_path)
    j.append([(ENTRY, b"spool/unsent", 0)])
    j.close()
    r = resume(path)
    assert r.returncode == 1 and "spool/unsent" in r.stdout and "--discard-local-changes" in r.stderr
    assert lock.exists()  # nothing done
    r = resume(path, "--discard-local-changes")
    assert r.returncode == 0, r.stderr
    assert not lock.exists() and "replaces the above" in r.stdout
    assert not unsynced.find(config.load(path), "alpha")  # given up: not listed again


def kept_dirs(tmp_path, node="alpha") -> list:
    base = tmp_path / "data" / node / ".mirror" / "kept"
    return sorted(base.iterdir()) if base.exists() else []


def standby_lock(tmp_path):
    (tmp_path / "alpha").mkdir(exist_ok=True)
    lock = tmp_path / "alpha" / "standby.lock"
    lock.write_text("{}")
    return lock


def test_resume_keeps_a_durable_copy_of_what_the_journals_list_then_resumes(tmp_path):
    """``--keep-local-changes``: every journaled path still here is copied aside (content,
    mode, times; a symlink as a symlink, never followed; a directory renamed here with all
    below it; one journaled by itself without its content) before the lock goes."""
    path = mirrored_config(tmp_path)
    lock = standby_lock(tmp_path)
    root = tmp_path / "data" / "alpha"
    (root / "spool").mkdir()
    (root / "spool" / "unsent").write_bytes(b"mail that beta never got\n" * 1000)
    os.chmod(root / "spool" / "unsent", 0o640)
    os.utime(root / "spool" / "unsent", ns=(1_600_000_000_123_456_789,) * 2)
    (root / "spool" / "old").write_bytes(b"mirrored long ago")
    os.symlink("../../outside", root / "link")
    (root / "moved" / "x").mkdir(parents=True)
    (root / "moved" / "x" / "y").write_bytes(b"deep")
    (root / "own").mkdir()
    (root / "own" / "child").write_bytes(b"not listed")
    (tmp_path / "outside").write_bytes(b"outside the tree")
    os.mkfifo(root / "fifo")
    os.mkdir(os.fsencode(root) + b"/caf\xe9")
    (root / "sneaky").symlink_to(tmp_path)  # a journaled path through it names nothing here
    j = journal_of(tmp_path)
    j.append([(ENTRY, b"spool/unsent", 0), (ENTRY, b"link", 0), (RENAME, b"was", b"moved"), (ENTRY, b"moved/x/y", 0),
              (ENTRY, b"own", 0), (ENTRY, b"gone", 0), (ENTRY, b"fifo", 0), (ENTRY, b"caf\xe9", 0),
              (ENTRY, b"sneaky/outside", 0)])  # fmt: skip
    j.close()

    r = resume(path, "--keep-local-changes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not lock.exists() and "copies kept" in r.stdout
    [kept] = kept_dirs(tmp_path)
    copy = kept / "spool" / "unsent"
    assert copy.read_bytes() == (root / "spool" / "unsent").read_bytes()
    st = copy.stat()
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, 1_600_000_000_123_456_789)
    assert not (kept / "spool" / "old").exists()  # not listed: mirrored already
    assert os.readlink(kept / "link") == "../../outside"
    assert (kept / "moved" / "x" / "y").read_bytes() == b"deep"
    assert (kept / "own").is_dir() and not (kept / "own" / "child").exists()
    assert os.path.isdir(os.fsencode(kept) + b"/caf\xe9")
    assert not (kept / "fifo").exists() and not (kept / "sneaky").exists()
    assert not (kept / "was").exists()
    out = r.stdout
    assert "tree data: 2 files (" in out, out  # moved/x/y once, though listed and below a renamed directory
    assert "3 listed paths no longer exist here" in out and "gone" in out and "sneaky/outside" in out
    assert "1 special files not copied" in out and "fifo" in out
    assert str(kept) in out
    # the tree itself is untouched, its state dir not copied
    assert (root / "spool" / "unsent").exists() and not (kept / ".mirror").exists()
    # said by ``hawrap status`` until the administrator removes it
    argv = [sys.executable, "-m", "hawrap", "status", "--config", path, "--node", "alpha"]
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    assert f"kept aside from data: 1 copies of local changes the peer's copy replaced, the latest {kept}" in shown
    # kept: not listed, nor copied, again
    assert not unsynced.find(config.load(path), "alpha")
    lock.write_text("{}")
    r = resume(path)
    assert r.returncode == 0 and len(kept_dirs(tmp_path)) == 1, r.stdout + r.stderr


def test_resume_keeps_into_a_directory_of_the_administrators_choice(tmp_path):
    path = mirrored_config(tmp_path)
    lock = standby_lock(tmp_path)
    (tmp_path / "data" / "alpha" / "new").write_bytes(b"x" * 5000)
    j = journal_of(tmp_path)
    j.append([(ENTRY, b"new", 0)])
    j.close()
    r = resume(path, "--keep-local-changes", str(tmp_path / "saved"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "saved" / "data" / "new").read_bytes() == b"x" * 5000
    assert not lock.exists() and not kept_dirs(tmp_path)


def test_a_degraded_primary_keeps_everything_changed_since_its_peer_was_outdated(tmp_path):
    """No journal lists what was written while no daemon watched: with the node's data state
    saying since when the peer lacks its changes, every entry changed from then on is kept,
    nothing older, and never the tree's own state dir."""
    path = mirrored_config(tmp_path)
    lock = standby_lock(tmp_path)
    root = tmp_path / "data" / "alpha"
    (root / "before").write_bytes(b"the peer has this")
    old = (root / "before").stat().st_ctime_ns
    probe = root / "probe"
    # a file's ctime comes from a coarse clock: wait (by condition) for it to move on past the slack
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_ctime_ns > old + (setaside.CTIME_SLACK + 0.05) * 1e9:
            break
        time.sleep(0.01)
    since = (probe.stat().st_ctime_ns - 1000) / 1e9
    probe.unlink()
    (root / "d").mkdir()
    (root / "d" / "after").write_bytes(b"written while beta was outdated")
    journal_of(tmp_path).close()  # a state dir with content, changed now
    (tmp_path / "alpha" / "node-state.json").write_text(
        json.dumps({"role": "standby", "peer_outdated": True, "peer_outdated_since": since})
    )
    r = resume(path, "--keep-local-changes")
    assert r.returncode == 0, r.stdout + r.stderr
    [kept] = kept_dirs(tmp_path)
    assert (kept / "d" / "after").read_bytes() == b"written while beta was outdated"
    assert not (kept / "before").exists() and not (kept / ".mirror").exists()
    assert not lock.exists()


def test_a_copy_inside_the_tree_is_refused_and_nothing_resumes(tmp_path):
    path = mirrored_config(tmp_path)
    lock = standby_lock(tmp_path)
    (tmp_path / "data" / "alpha" / "new").write_bytes(b"x")
    j = journal_of(tmp_path)
    j.append([(ENTRY, b"new", 0)])
    j.close()
    r = resume(path, "--keep-local-changes", str(tmp_path / "data" / "alpha" / "saved"))
    assert r.returncode == 2 and "inside tree data" in r.stderr and "nothing resumed" in r.stderr
    assert lock.exists() and not (tmp_path / "data" / "alpha" / "saved").exists()
    r = resume(path, "--keep-local-changes", "--discard-local-changes")
    assert r.returncode == 2 and lock.exists()  # one or the other


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root")
def test_a_copy_that_does_not_fit_resumes_nothing(tmp_path):
    """The copies go to a file system that fills up: the file is named, nothing resumes, the
    lock stays and the tree is as it was."""
    path = mirrored_config(tmp_path)
    lock = standby_lock(tmp_path)
    body = os.urandom(1 << 20)
    (tmp_path / "data" / "alpha" / "big").write_bytes(body)
    j = journal_of(tmp_path)
    j.append([(ENTRY, b"big", 0)])
    j.close()
    with small_fs(tmp_path / "small", "tmpfs", size_kb=256) as small:
        r = resume(path, "--keep-local-changes", str(small))
        assert r.returncode == 2, r.stdout + r.stderr
        assert "copying big" in r.stderr and "No space left" in r.stderr and "nothing resumed" in r.stderr
        assert lock.exists() and (tmp_path / "data" / "alpha" / "big").read_bytes() == body
        assert os.listdir(small) == []  # no copy half made


def daemon_status(tmp_path, state: str, node="alpha", compared: float | None = None) -> None:
    """The tree's mirror daemon status file as a daemon leaves it: ``running`` when it was
    killed (or its node lost power), ``stopped`` after a clean stop; ``compared``: when its
    last whole-tree compare ended."""
    status = tmp_path / "data" / node / ".mirror" / "mirror-daemon.status.json"
    status.parent.mkdir(exist_ok=True)
    pairs = [{"name": "data", "state": "live", "last_compare": compared}]
    status.write_text(json.dumps({"pid": 1, "state": state, "updated": time.time(), "pairs": pairs}))


def test_files_changed_just_before_the_daemon_was_killed_are_listed_and_kept(tmp_path):
    """A write whose event the watcher had not read when the daemon was killed is in no
    journal: the files changed in the last seconds before the daemon was last heard are
    listed, and kept, as well; not after a clean stop, nor once the tree has received since."""
    path = mirrored_config(tmp_path)
    lock = standby_lock(tmp_path)
    root = tmp_path / "data" / "alpha"
    (root / "spool").mkdir()
    (root / "spool" / "last").write_bytes(b"written as the node died")
    (root / "journaled").write_bytes(b"seen")
    (root / "mirrored").write_bytes(b"seen and mirrored")
    (root / "again").write_bytes(b"seen and mirrored, then changed")
    (root / "newdir").mkdir()
    (root / "newdir" / "inside").write_bytes(b"in a directory seen whole, mirrored")
    j = journal_of(tmp_path)
    seq = j.append([(ENTRY, b"mirrored", 0), (ENTRY, b"again", 0), (ENTRY, b"newdir", 1)])
    j.checkpoint(seq)
    j.append([(ENTRY, b"journaled", 0)])
    j.close()
    recorded = J.recorded_times(os.fsencode(root / ".mirror" / "journal-0123456789abcdef"))[0][b"again"]
    while (root / "again").stat().st_ctime <= recorded:  # ctime's clock is coarser: wait for it to pass
        (root / "again").write_bytes(b"changed after its record, never recorded")
        time.sleep(0.005)
    daemon_status(tmp_path, "stopped")
    found = unsynced.find(config.load(path), "alpha")
    assert found.journaled == {"data": ["journaled"]} and not found.recent  # a clean stop journals all it saw
    # a whole-tree compare that ended after them mirrored them (the watcher ran throughout)
    daemon_status(tmp_path, "running", compared=time.time() + 0.1)
    found = unsynced.find(config.load(path), "alpha")
    assert found.journaled == {"data": ["journaled"]} and not found.recent
    daemon_status(tmp_path, "running")
    found = unsynced.find(config.load(path), "alpha")
    # not the journaled one, nor the one mirrored since its last change, nor the directory
    assert found.recent["data"][1] == {b"spool/last", b"again"}
    r = resume(path)
    assert r.returncode == 1 and "its watcher never recorded" in r.stdout and "spool/last" in r.stdout, r.stdout
    r = resume(path, "--keep-local-changes")
    assert r.returncode == 0, r.stdout + r.stderr
    [kept] = kept_dirs(tmp_path)
    assert (kept / "spool" / "last").read_bytes() == b"written as the node died"
    assert (kept / "journaled").read_bytes() == b"seen" and not lock.exists()
    # once the tree has received a session (its applied record written since), nothing is recent
    (root / ".mirror" / "applied").write_text("{}")
    assert not unsynced.find(config.load(path), "alpha")


def handed_over_tree(tmp_path):
    """alpha's tree as a hand-over's final sync found it: a file its daemon journaled and
    never confirmed, one changed as the daemon was killed (its status says it was running);
    then the moment the sync began, past ctime's coarser clock.  Returns (root, began)."""
    root = tmp_path / "data" / "alpha"
    (root / "spool").mkdir()
    (root / "spool" / "last").write_bytes(b"written as the daemon was killed")
    (root / "journaled").write_bytes(b"journaled, never confirmed")
    j = journal_of(tmp_path)
    j.append([(ENTRY, b"journaled", 0)])
    j.close()
    daemon_status(tmp_path, "running")
    before = max(p.stat().st_ctime for p in (root, root / "spool", root / "spool" / "last", root / "journaled"))
    while time.time() <= before + unsynced.CTIME_SLACK:  # ctime's clock is coarser: let it pass
        time.sleep(0.01)
    return root, time.time()


def write_after(path, began: float) -> None:
    """Write ``path`` until its ctime is at or after ``began`` (ctime's clock is coarser)."""
    while not path.exists() or path.stat().st_ctime < began:
        path.write_bytes(b"written after the final sync began")
        time.sleep(0.005)


def test_after_a_hand_over_only_what_changed_once_its_final_sync_began_is_kept(tmp_path):
    """A hand-over's final sync gave the new leader the whole tree as it stood once the
    services had stopped: what the journals list and what the killed daemon may have missed
    is on it, and is not copied aside again; a file changed after the sync began is."""
    from hawrap.mirrorctl import resolve_trees

    cfg = config.load(mirrored_config(tmp_path))
    root, began = handed_over_tree(tmp_path)
    write_after(root / "late", began)
    trees = resolve_trees(cfg, "alpha")
    [kept] = setaside.keep_unsynced(trees, None, None, "handed", had_by_none=True, synced_whole=began)
    assert sorted(os.listdir(kept.dest)) == ["late"], kept.describe()
    # the same tree without the hand-over: the journal's and the killed daemon's are kept too
    [kept] = setaside.keep_unsynced(trees, None, None, "plain", had_by_none=True)
    assert {"journaled", "late", "spool"} <= set(os.listdir(kept.dest)), kept.describe()


def test_two_node_resume_after_a_standby_hand_over_lists_only_what_changed_after_its_final_sync(tmp_path):
    """A primary put in standby hands over first (a final sync); its node state records when
    that sync began.  ``hawrap resume`` then lists neither its journals nor what its killed
    daemon may have missed (the peer has them), only what changed after the sync began, and
    ``--keep-local-changes`` copies only that aside."""
    path = mirrored_config(tmp_path)
    lock = standby_lock(tmp_path)
    root, began = handed_over_tree(tmp_path)
    state = tmp_path / "alpha" / "node-state.json"
    state.write_text(json.dumps({"role": "standby", "peer_outdated": False, "synced_whole": began}))
    assert not unsynced.find(config.load(path), "alpha")
    # without the record, the journal and the killed daemon's last file are listed
    state.write_text(json.dumps({"role": "standby", "peer_outdated": False}))
    assert unsynced.find(config.load(path), "alpha").journaled == {"data": ["journaled"]}
    state.write_text(json.dumps({"role": "standby", "peer_outdated": False, "synced_whole": began}))
    write_after(root / "late", began)
    r = resume(path)
    assert r.returncode == 1 and "changed after the hand-over's final sync toward beta began" in r.stdout, r.stdout
    listed = [line.strip() for line in r.stdout.splitlines() if line.startswith("    ")]
    assert "late" in listed and "journaled" not in listed and "spool/last" not in listed, r.stdout
    assert lock.exists()
    r = resume(path, "--keep-local-changes")
    assert r.returncode == 0, r.stdout + r.stderr
    [kept] = kept_dirs(tmp_path)
    assert sorted(os.listdir(kept)) == ["late"] and not lock.exists()
