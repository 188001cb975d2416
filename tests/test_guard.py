"""The source and deletion guards (``mirror.guard``): an empty, unmounted or replaced source
never empties a replica, by ``mirror sync --delete`` (locally and over ``mirror://``) or by
the live daemon; a reader polling the replica sees every file throughout."""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import ExitStack, contextmanager

import pytest

from mirror import protocol as P
from mirror.errors import EXIT_GUARD, SourceGuardError
from mirror.transfer import sync
from tests.daemons import converged, live_daemon
from tests.helpers import MIRROR, REPO, PollingThread, is_root, loop_mounted, mounted, run_mirror, wait_until
from tests.peers import RawSession
from tests.servers import SECRET, mirror_server
from tests.snapshot import assert_mirrors, snapshot

FILES = 101


def _fill(root, n: int = FILES) -> None:
    for i in range(n):
        d = root / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(b"mail %d\n" % i * (i + 1))


def _empty(root) -> None:
    """Remove everything the user had in ``root`` (hamirror's state stays)."""
    subprocess.run(["rm", "-rf", *[str(p) for p in root.iterdir() if p.name != ".mirror"]], check=True)


def _content(root) -> dict:
    """The replica's entries, but not its root's own times (the source's root did change)."""
    return {k: v for k, v in snapshot(root).items() if k != b"."}


def _files(root) -> int:
    return sum(1 for k, v in snapshot(root).items() if v[0] == "file")


class ReplicaWatch(PollingThread):
    """Counts the replica's files every 20 ms from the start of the block (one count done
    when it begins); ``fewest`` is the least it ever saw."""

    interval = 0.02

    def __init__(self, root):
        super().__init__(name="replica-watch")
        self.root = str(root)
        self.fewest = None

    def sample(self) -> None:
        count = 0
        for _, _, names in os.walk(self.root):
            count += sum(1 for n in names if n.startswith("f"))
        self.fewest = count if self.fewest is None else min(self.fewest, count)

    def __enter__(self):
        super().__enter__()
        try:
            self.wait_polls()
        except BaseException:
            self.stop()
            raise
        return self


def umount(path, lazy: bool = False) -> None:
    subprocess.run(["umount", *(["-l"] if lazy else []), str(path)], check=True)


needs_root = pytest.mark.skipif(not is_root(), reason="mounts a tmpfs")


# -- sync --delete from an empty source ---------------------------------------------------------


@pytest.mark.parametrize("dry_run", [False, True])
def test_sync_delete_from_an_empty_source_deletes_nothing(tmp_path, dry_run):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fill(src)
    assert sync(src, dst, delete=True).ok
    before = _content(dst)
    _empty(src)
    proc = run_mirror("sync", "--delete", *(["-n"] if dry_run else []), src, dst, check_codes=(EXIT_GUARD,))
    assert b"refused to delete every entry of the replica" in proc.stderr, proc.stderr
    assert _content(dst) == before and _files(dst) == FILES


def test_allow_mass_delete_empties_the_replica_when_meant(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fill(src, 5)
    assert sync(src, dst, delete=True).ok
    _empty(src)
    run_mirror("sync", "--delete", "--allow-mass-delete", src, dst, check_codes=(0,))
    assert_mirrors(src, dst)


def test_max_delete_counts_a_directory_with_what_it_holds(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fill(src, 30)  # d0..d6, 4 or 5 files each
    (src / "keep").write_text("stays")
    assert sync(src, dst, delete=True).ok
    subprocess.run(["rm", "-rf", str(src / "d0"), str(src / "d1")], check=True)  # 2 dirs of 5 files: 12
    result = sync(src, dst, delete=True, max_delete=11)
    assert result.exit_code == EXIT_GUARD and "more than --max-delete 11" in result.deletions_refused
    assert (dst / "d0").is_dir() and (dst / "d1").is_dir() and _files(dst) == 31
    proc = run_mirror("sync", "--delete", "--max-delete", "11", src, dst, check_codes=(EXIT_GUARD,))
    assert b"deletions refused" in proc.stderr
    assert sync(src, dst, delete=True, max_delete=12).ok
    assert_mirrors(src, dst)


def test_other_changes_still_go_when_deletions_are_refused(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fill(src, 20)
    assert sync(src, dst, delete=True).ok
    subprocess.run(["rm", "-rf", str(src / "d0")], check=True)
    (src / "d1" / "new").write_text("new mail")
    result = sync(src, dst, delete=True, max_delete=1)
    assert result.exit_code == EXIT_GUARD
    assert (dst / "d1" / "new").read_text() == "new mail" and (dst / "d0").is_dir()


# -- unmounted sources ----------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("state", ["in-tree", "elsewhere"])
@pytest.mark.parametrize("leftovers", [False, True])
def test_sync_delete_from_an_unmounted_source_is_refused(tmp_path, state, leftovers):
    """The mount point under a tmpfs: empty, or holding old files from before the mount."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    if leftovers:
        (src / "d0").mkdir()
        (src / "d0" / "f0").write_text("an old file left under the mount point")
    extra = ["--state-dir", str(tmp_path / "state")] if state == "elsewhere" else []
    with mounted(src):
        _fill(src)
        run_mirror("sync", "--delete", *extra, src, dst, check_codes=(0,))
        before = _content(dst)
        umount(src)
        proc = run_mirror("sync", "--delete", *extra, src, dst, check_codes=(EXIT_GUARD,))
        assert b"refused" in proc.stderr, proc.stderr
        assert _content(dst) == before and _files(dst) == FILES


@needs_root
def test_a_plain_copy_from_an_unmounted_source_does_not_make_it_the_tree(tmp_path):
    src, dst, state = tmp_path / "src", tmp_path / "dst", tmp_path / "state"
    src.mkdir()
    (src / "old").write_text("left under the mount point")
    with mounted(src):
        _fill(src)
        run_mirror("sync", "--delete", "--state-dir", state, src, dst, check_codes=(0,))
        umount(src)
        run_mirror("sync", "--state-dir", state, src, dst, check_codes=(0,))  # no --delete: a copy, allowed
        proc = run_mirror("sync", "--delete", "--state-dir", state, src, dst, check_codes=(EXIT_GUARD,))
        assert b"not on the filesystem it was on" in proc.stderr, proc.stderr
        assert _files(dst) == FILES + 1  # every file, and the one the plain copy brought


@needs_root
def test_sync_delete_from_an_unmounted_source_over_the_wire(tmp_path):
    src, replica = tmp_path / "src", tmp_path / "replica"
    src.mkdir()
    replica.mkdir()
    with mirror_server(tmp_path, {"m": str(replica)}) as server, mounted(src):
        _fill(src)
        args = ("--secret-file", server.secret_file, src, server.url("m"))
        run_mirror("sync", "--delete", *args, check_codes=(0,))
        before = _content(replica)
        umount(src)
        proc = run_mirror("sync", "--delete", *args, check_codes=(EXIT_GUARD,))
        assert b"refused" in proc.stderr, proc.stderr
        (src / "stale").write_text("a file under the mount point")
        proc = run_mirror("sync", "--delete", *args, check_codes=(EXIT_GUARD,))
        assert b"this replica mirrors tree" in proc.stderr, proc.stderr
        assert _content(replica) == before


def test_sync_delete_from_an_empty_source_over_the_wire(tmp_path):
    src, replica = tmp_path / "src", tmp_path / "replica"
    _fill(src)
    replica.mkdir()
    with mirror_server(tmp_path, {"m": str(replica)}) as server:
        assert sync(src, server.url("m"), delete=True, secret=SECRET).ok
        before = _content(replica)
        _empty(src)
        result = sync(src, server.url("m"), delete=True, secret=SECRET)
        assert result.exit_code == EXIT_GUARD and "every entry" in result.deletions_refused
        assert _content(replica) == before


def test_another_tree_may_not_delete_in_a_replica(tmp_path):
    a, b, dst = tmp_path / "a", tmp_path / "b", tmp_path / "dst"
    _fill(a, 10)
    _fill(b, 3)
    assert sync(a, dst, delete=True).ok
    with pytest.raises(SourceGuardError, match="this replica mirrors tree"):
        sync(b, dst, delete=True)
    assert _files(dst) == 10
    assert sync(b, dst).ok  # a plain copy (no --delete) is no mirror: allowed, nothing deleted
    assert _files(dst) == 10
    assert sync(b, dst, delete=True, allow_mass_delete=True).ok  # meant: b is now the tree
    assert_mirrors(b, dst)
    assert sync(b, dst, delete=True).ok


def test_one_source_with_several_state_dirs_is_one_tree(tmp_path):
    """A sync without --state-dir, a daemon with one, another with another: one tree."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fill(src, 10)
    assert sync(src, dst, delete=True, state_dir=tmp_path / "state-a").ok
    (src / "d0" / "f0").unlink()
    assert sync(src, dst, delete=True, state_dir=tmp_path / "state-b").ok
    (src / "d1" / "f1").unlink()
    assert sync(src, dst, delete=True).ok
    assert_mirrors(src, dst)


def test_a_replica_that_becomes_the_source_is_the_same_tree(tmp_path):
    """Failover: the standby's replica becomes the source, mirrored back to the old primary."""
    a, b = tmp_path / "a", tmp_path / "b"
    _fill(a, 10)
    assert sync(a, b, delete=True).ok
    (b / "d0" / "f0").unlink()
    (b / "d1" / "new").write_text("written on b after the failover")
    assert sync(b, a, delete=True).ok
    assert_mirrors(b, a)


# -- the live daemon ---------------------------------------------------------------------------------


def _status(src, state_dir=None) -> dict:
    path = os.path.join(state_dir or os.path.join(src, ".mirror"), "mirror-daemon.status.json")
    try:
        with open(path) as f:
            return json.load(f)["pairs"][0]
    except (FileNotFoundError, ValueError):
        return {}


def test_daemon_on_an_emptied_source_halts(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fill(src)
    assert sync(src, dst, delete=True).ok
    _empty(src)
    with ReplicaWatch(dst) as watch, live_daemon(src, dst) as d:
        status = wait_until(lambda: _status(src).get("state") == "halted" and _status(src), timeout=60)
        assert "every entry of the replica" in status["last_error"]
        proc = run_mirror("status", src, check_codes=(1,))
        assert b"halted" in proc.stdout and b"every entry" in proc.stdout
    assert watch.fewest == FILES and _files(dst) == FILES
    assert "ERROR" in d.log_text() and "halted" in d.log_text()


@needs_root
def test_daemon_on_an_unmounted_source_over_the_wire_halts(tmp_path):
    """The daemon starts while the source is not mounted (its state dir, in the tree, is
    gone with it): the receiver refuses the new tree, the pair halts, the replica stays."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    src.mkdir()
    replica.mkdir()
    with mirror_server(tmp_path, {"m": str(replica)}) as server:
        with mounted(src):
            _fill(src)
            assert sync(src, server.url("m"), delete=True, secret=SECRET).ok
            umount(src)
        before = _content(replica)
        with (
            ReplicaWatch(replica) as watch,
            live_daemon(src, server.url("m"), "--secret-file", server.secret_file) as d,
        ):
            status = wait_until(lambda: _status(src).get("state") == "halted" and _status(src), timeout=60)
            assert "this replica mirrors tree" in status["last_error"]
        assert watch.fewest == FILES and _content(replica) == before
        assert "ERROR" in d.log_text()


@needs_root
@pytest.mark.parametrize("state", ["in-tree", "elsewhere"])
def test_daemon_halts_when_its_source_is_unmounted_and_resumes_when_it_is_back(tmp_path, state):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    state_dir = str(tmp_path / "state") if state == "elsewhere" else None
    extra = ["--state-dir", state_dir] if state_dir else []
    image = tmp_path / "fs.img"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(src)], check=True)
    try:
        _fill(src)
        with live_daemon(src, dst, *extra) as d, ExitStack() as stack:
            converged(src, dst)
            watch = stack.enter_context(ReplicaWatch(dst))  # from the moment the replica is whole
            # The daemon holds its journal open in an in-tree state dir: only a lazy unmount goes.
            umount(src, lazy=state == "in-tree")
            status = wait_until(lambda: _status(src, state_dir).get("state") == "halted" and _status(src, state_dir),
                                timeout=60)  # fmt: skip
            assert "halted" in d.log_text() and _files(dst) == FILES
            (src / "left-under-the-mount-point").write_text("must not reach the replica")
            time.sleep(0.5)  # a halted pair sends nothing: give it the chance to misbehave
            assert not (dst / "left-under-the-mount-point").exists()
            (src / "left-under-the-mount-point").unlink()
            subprocess.run(["mount", "-o", "loop", str(image), str(src)], check=True)
            wait_until(lambda: _status(src, state_dir).get("state") == "live", timeout=60)
            (src / "d0" / "after").write_text("mirrored again")
            wait_until(lambda: (dst / "d0" / "after").exists(), timeout=30)
        assert watch.fewest == FILES and watch.polls > 10, status
    finally:
        subprocess.run(["umount", "-l", str(src)], capture_output=True)


# -- hostile peers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [
    {"tree": "not hex at all, and too long"},
    {"tree": 7},
    {"deletions": "all"},
    {"deletions": {"max_delete": -1}},
])  # fmt: skip
def test_malformed_guard_fields_are_refused(tmp_path, start):
    root = tmp_path / "module"
    _fill(root, 3)
    s = RawSession(root, start=start)
    assert s.ready[0] == P.ERROR and s.ready[1] == "ProtocolError", s.ready
    s.close()
    assert _files(root) == 3


def test_a_peer_of_another_tree_cannot_delete(tmp_path):
    root = tmp_path / "module"
    _fill(root, 3)
    first = RawSession(root, start={"tree": "a" * 32, "delete": True})
    first.drain_summary()
    first.end()
    s = RawSession(root, start={"tree": "b" * 32, "delete": True})
    assert s.ready[0] == P.ERROR and s.ready[1] == "SourceGuardError", s.ready
    s.close()
    assert _files(root) == 3


def test_a_peer_cannot_delete_past_its_own_policy(tmp_path):
    root = tmp_path / "module"
    _fill(root, 3)
    s = RawSession(root, start={"tree": "a" * 32, "delete": True})
    s.drain_summary()
    s.send(*[[P.DELETE, f"d{i}".encode()] for i in range(3)])
    result = s.end()
    assert result[0] == P.RESULT and "every entry" in result[1]["deletions_refused"], result
    assert _files(root) == 3


def test_a_dry_run_peer_can_write_nothing(tmp_path):
    """A dry run is all a read-only module accepts: it may not carry a write."""
    root = tmp_path / "module"
    _fill(root, 3)
    s = RawSession(root, start={"dry_run": True}, module_options={"read_only": True})
    assert s.ready[0] == P.READY, s.ready
    s.drain_summary()
    s.send([P.MKDIR, b"planted", [0o755, 0, 0, 0]])
    assert s.until(P.RESULT)[0] == P.ERROR
    s.close()
    assert not (root / "planted").exists()


# -- a replica whose filesystem is not there --------------------------------------------------------
#
# A module may keep its state dir apart from its tree (hawrap's trees can): unmounted, the replica
# is an empty directory of the filesystem below, while its records (the tree it mirrors, its epoch,
# the journal position it applied) still say it holds the data.


def _ext4(tmp_path):
    image = tmp_path / "replica.img"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    return image


class _Replica:
    """A filled source ``src`` mirrored (with ``--delete``) to a `mirror serve` module on an
    ext4 image mounted at ``path``, the module's state dir apart; ``sync`` syncs again."""

    def __init__(self, tmp_path, server, image):
        self.src, self.path, self.server, self.image = tmp_path / "src", tmp_path / "replica", server, image

    def sync(self, *options: str, codes=(0,)):
        return run_mirror("sync", *options, "--secret-file", self.server.secret_file, self.src, self.server.url("m"),
                          check_codes=codes)  # fmt: skip

    def mount(self) -> None:
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.path)], check=True)


@contextmanager
def _replica_on_a_disk(tmp_path):
    """A ``_Replica``, mirrored once; unmounted at the end if still mounted."""
    _fill(tmp_path / "src")
    (tmp_path / "replica").mkdir()
    (tmp_path / "srv").mkdir()
    image = _ext4(tmp_path)
    settings = {"m": {"state_dir": str(tmp_path / "state")}}
    try:
        with mirror_server(tmp_path / "srv", {"m": str(tmp_path / "replica")}, settings=settings) as server:
            replica = _Replica(tmp_path, server, image)
            replica.mount()
            replica.sync("--delete")
            yield replica
    finally:
        if os.path.ismount(tmp_path / "replica"):
            umount(tmp_path / "replica", lazy=True)


UNMOUNTED = "is not on the filesystem it was on when it first mirrored"


@needs_root
def test_a_sync_to_an_unmounted_replica_is_refused_and_writes_nothing_there(tmp_path):
    """Twice guarded: the source remembers the mount point the receiver said the replica lay
    under, and the replica's guard (its state dir apart) that its tree was on that disk; each
    refuses on its own (``--no-dst-require-mount`` sets the first aside)."""
    with _replica_on_a_disk(tmp_path) as replica:
        umount(replica.path)
        (replica.src / "d0" / "new").write_text("written while the replica is away")
        err = replica.sync("--delete", codes=(EXIT_GUARD,)).stderr.decode()
        assert f"nothing is mounted at {replica.path} on 127.0.0.1" in err, err
        for extra in (["--delete"], [], ["--delete", "--dry-run"]):
            proc = replica.sync("--no-dst-require-mount", *extra, codes=(EXIT_GUARD,))
            assert UNMOUNTED in proc.stderr.decode() and str(replica.path) in proc.stderr.decode(), proc.stderr
            assert os.listdir(replica.path) == []  # not a file, not even the replica's .mirror
        with mounted(replica.path):  # another filesystem mounted in its place
            proc = replica.sync("--delete", codes=(EXIT_GUARD,))
            assert UNMOUNTED in proc.stderr.decode(), proc.stderr
            assert os.listdir(replica.path) == []
        replica.mount()  # back: mirrored as if nothing happened
        replica.sync("--delete")
        assert_mirrors(replica.src, replica.path)


@needs_root
def test_a_replica_that_really_moved_is_taken_with_allow_mass_delete(tmp_path):
    with _replica_on_a_disk(tmp_path) as replica:
        umount(replica.path)
        with mounted(replica.path):  # a new, empty disk for it
            replica.sync("--delete", codes=(EXIT_GUARD,))
            replica.sync("--delete", "--allow-mass-delete")
            assert_mirrors(replica.src, replica.path)
            (replica.src / "d1" / "later").write_text("on the new disk")
            replica.sync("--delete")  # recorded: no override
            assert_mirrors(replica.src, replica.path)


@needs_root
def test_a_replica_with_its_state_inside_may_move_to_another_filesystem(tmp_path):
    """Its records go wherever the tree goes: a copy on a new disk is the replica."""
    src, old = tmp_path / "src", tmp_path / "old"
    _fill(src)
    assert sync(src, old, delete=True).ok
    with mounted(tmp_path / "new") as new:
        subprocess.run(["cp", "-a", f"{old}/.", str(new)], check=True)
        (src / "d2" / "later").write_text("after the move")
        assert sync(src, new, delete=True).ok
        assert_mirrors(src, new)


@needs_root
@pytest.mark.parametrize("guard", ["the source's record", "the replica's guard"])
def test_the_live_daemon_halts_on_an_unmounted_replica_and_resumes_once_it_is_back(tmp_path, guard):
    """Either guard alone halts the pair (``--no-dst-require-mount`` sets the source's aside)."""
    src, path = tmp_path / "src", tmp_path / "replica"
    extra, told = ((), f"nothing is mounted at {path} on 127.0.0.1") if guard == "the source's record" else (
        ("--no-dst-require-mount",), UNMOUNTED)  # fmt: skip
    seen: list[list[str]] = []  # what the mount point ever held while the disk was away

    def halted():
        if not os.path.ismount(path):
            seen.append(os.listdir(path))
        return _status(src).get("state") == "halted" and _status(src)

    with _replica_on_a_disk(tmp_path) as replica:
        with live_daemon(src, replica.server.url("m"), "--secret-file", replica.server.secret_file, *extra) as d:
            converged(src, path)
            umount(path)  # between two sessions the receiver holds nothing open in it
            (src / "d0" / "new").write_text("written while the replica is away")
            status = wait_until(halted, timeout=60)
            assert told in status["last_error"], status
            assert run_mirror("status", src, check_codes=(1,)).returncode == 1
            assert seen and all(entries == [] for entries in seen), seen
            replica.mount()
            converged(src, path)
            wait_until(lambda: _status(src).get("state") == "live", timeout=60)
        assert "halted" in d.log_text() and "resumes" in d.log_text()


# A module that must be a mount point (``require_mount``): the only guard for a replica whose state
# dir is inside it, which an unmounted replica has lost (it would be a new, empty replica).


@needs_root
@pytest.mark.parametrize("how", ["config", "option"])
def test_a_module_that_must_be_a_mount_point_refuses_every_session_while_nothing_is_mounted(tmp_path, how):
    src, replica = tmp_path / "src", tmp_path / "replica"
    _fill(src)
    replica.mkdir()
    (tmp_path / "srv").mkdir()
    extra, settings = ((), {"m": {"require_mount": True}}) if how == "config" else (("--require-mount",), None)
    with mirror_server(tmp_path / "srv", {"m": str(replica)}, *extra, settings=settings) as server:
        url, secret = server.url("m"), ("--secret-file", server.secret_file)
        for delete in (["--delete"], []):
            proc = run_mirror("sync", *delete, *secret, src, url, check_codes=(EXIT_GUARD,))
            assert "is not a mount point (require_mount)" in proc.stderr.decode(), proc.stderr
            assert os.listdir(replica) == []  # the filesystem below is not filled, nor given a .mirror
        with mounted(replica):
            assert run_mirror("sync", "--delete", *secret, src, url).returncode == 0
            assert_mirrors(src, replica)
        run_mirror("sync", "--delete", *secret, src, url, check_codes=(EXIT_GUARD,))
        assert os.listdir(replica) == []
    # --check names the module whose filesystem is not there
    if how == "option":
        proc = run_mirror("serve", "--check", "--module", f"m={replica}", "--require-mount", *secret,
                          check_codes=(2,))  # fmt: skip
        assert f"--require-mount: nothing is mounted at {replica}" in proc.stderr.decode(), proc.stderr


@needs_root
def test_a_local_replica_that_must_be_a_mount_point_is_refused_while_nothing_is_mounted(tmp_path):
    """``--dst-require-mount``: a local replica's state dir is inside it, so an unmounted mount
    point looks like a new, empty replica, and a sync would fill the disk under it (often the
    root file system).  Refused with nothing written there, not even a ``.mirror``; mirrored
    once its disk is mounted; a remote destination is told the option is not its own."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    _fill(src)
    replica.mkdir()
    for delete in (["--delete"], [], ["--dry-run"]):
        proc = run_mirror("sync", *delete, "--dst-require-mount", src, replica, check_codes=(EXIT_GUARD,))
        assert "is not a mount point (require_mount)" in proc.stderr.decode(), proc.stderr
        assert os.listdir(replica) == []
    with mounted(replica):
        assert run_mirror("sync", "--delete", "--dst-require-mount", src, replica).returncode == 0
        assert_mirrors(src, replica)
    run_mirror("sync", "--delete", "--dst-require-mount", src, replica, check_codes=(EXIT_GUARD,))
    assert os.listdir(replica) == []
    proc = run_mirror("sync", "--dst-require-mount", src, "mirror://127.0.0.1:1/m", check_codes=(2,))
    assert "--dst-require-mount is for a local destination" in proc.stderr.decode(), proc.stderr
    proc = run_mirror("daemon", "--check", "--dst-require-mount", src, replica, check_codes=(2,))
    assert f"--dst-require-mount: nothing is mounted at {replica}" in proc.stderr.decode(), proc.stderr


def _disk_records(src) -> list:
    return sorted((src / ".mirror").glob("replica-disk-*"))


@needs_root
@pytest.mark.parametrize("where", ["at the mount point", "below it"])
def test_a_local_replica_whose_disk_did_not_come_up_is_refused_without_any_option(tmp_path, where):
    """No option given: the source remembers the mount point its local replica was found
    under, and while nothing is mounted there the replica is refused with nothing written
    (not the tree, not a ``.mirror``, not the replica's directory itself).  Any disk mounted
    there is taken (backup disks in rotation); ``--no-dst-require-mount`` writes into the
    directory as it is, and forgets the mount point."""
    src, disk = tmp_path / "src", tmp_path / "disk"
    _fill(src)
    disk.mkdir()
    replica = disk if where == "at the mount point" else disk / "replica"
    with mounted(disk):
        assert run_mirror("sync", "--dry-run", src, replica).returncode == 0
        assert _disk_records(src) == []  # a dry run remembers nothing
        assert run_mirror("sync", "--delete", src, replica).returncode == 0
        assert_mirrors(src, replica)
    assert len(_disk_records(src)) == 1
    (src / "d0" / "new").write_text("written while the disk is away")
    for extra in (["--delete"], [], ["--dry-run"], ["--mkpath"]):
        proc = run_mirror("sync", *extra, src, replica, check_codes=(EXIT_GUARD,))
        assert f"nothing is mounted at {disk}, where the replica {replica} was" in proc.stderr.decode(), proc.stderr
        assert os.listdir(disk) == []
    proc = run_mirror("daemon", "--check", src, replica, check_codes=(2,))
    assert f"DST: refused: nothing is mounted at {disk}" in proc.stderr.decode(), proc.stderr
    record = _disk_records(src)[0]
    saved = record.read_bytes()
    record.write_bytes(b"not a record")
    proc = run_mirror("sync", src, replica, check_codes=(EXIT_GUARD,))
    assert f"{record}: damaged record of where the replica {replica}'s disk was" in proc.stderr.decode(), proc.stderr
    record.write_bytes(saved)
    with mounted(disk):  # another disk: taken, and filled
        assert run_mirror("sync", "--delete", src, replica).returncode == 0
        assert_mirrors(src, replica)
    assert os.listdir(disk) == []
    assert run_mirror("sync", "--delete", "--no-dst-require-mount", src, replica).returncode == 0
    assert_mirrors(src, replica)
    assert _disk_records(src) == []  # forgotten: the directory is the replica now
    assert run_mirror("sync", "--delete", src, replica).returncode == 0


@needs_root
@pytest.mark.parametrize("rule", ["required", "remembered"])
def test_the_live_daemon_halts_on_a_local_replica_whose_disk_went_away_until_it_is_back(tmp_path, rule):
    """A live daemon toward a local replica on its own disk (``--dst-require-mount``, or no
    option: the mount point remembered at its first connection): its disk unmounted under
    it (a failing USB disk, an administrator's umount), the next change halts the pair
    (journaled) and nothing is ever written under the mount point (sampled throughout); the
    disk mounted again gets the change.  (With the option, a blank disk in its place is
    refused until the daemon starts again, as a server's module is: the test above with a
    server.)"""
    src, replica = tmp_path / "src", tmp_path / "replica"
    _fill(src)
    image = _ext4(tmp_path)
    seen: list[list[str]] = []  # what the mount point held whenever nothing was mounted

    def look():
        if not os.path.ismount(replica):
            seen.append(os.listdir(replica))

    with ExitStack() as stack:
        stack.enter_context(loop_mounted(image, replica))
        d = stack.enter_context(live_daemon(src, replica, *(["--dst-require-mount"] if rule == "required" else [])))
        converged(src, replica)
        with PollingThread(look, interval=0.01) as sampler:
            umount(replica, lazy=True)  # its writer lock is open there: detached, as a vanished disk is
            (src / "d0" / "new").write_text("written while the replica is away")
            status = wait_until(lambda: _status(src).get("state") == "halted" and _status(src), timeout=60)
            told = "is not a mount point (require_mount)" if rule == "required" else f"nothing is mounted at {replica}"
            assert told in status["last_error"], status
        assert sampler.polls > 10 and seen and all(entries == [] for entries in seen), seen[:5]
        subprocess.run(["mount", "-o", "loop", str(image), str(replica)], check=True)
        converged(src, replica, timeout=60)  # at the halt's next try, 5 s on
        wait_until(lambda: _status(src).get("state") == "live", timeout=60)
    assert "halted" in d.log_text()


@contextmanager
def _bound(disk, where):
    """``disk`` (a directory) bind-mounted at ``where``; unmounted at the end if still there."""
    subprocess.run(["mount", "--bind", str(disk), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@needs_root
@pytest.mark.parametrize("other", ["blank", "files of its own", "another tree's replica"])
def test_another_disk_mounted_under_a_running_server_is_refused_until_it_starts_again(tmp_path, other):
    """A mounted replica (``require_mount``) swapped under a running ``mirror serve`` (a spare
    disk, another machine's): each new connection is welcomed on the new disk, so without a
    check across connections the next session fills it (or deletes in it) in the moments
    before whoever watches the mount stops the server.  Refused, with nothing written there,
    not even its ``.mirror``; the tree's own disk mounted again is mirrored as before; a
    server started again takes the new disk as the replica."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    own, spare = tmp_path / "own", tmp_path / "spare"
    for d in (replica, own, spare):
        d.mkdir()
    _fill(src)
    if other == "files of its own":
        (spare / "theirs").write_bytes(b"not this tree's\n")
    elif other == "another tree's replica":
        (tmp_path / "theirs").mkdir()
        (tmp_path / "theirs" / "theirs").write_bytes(b"another tree's\n")
        assert run_mirror("sync", tmp_path / "theirs", spare).returncode == 0
    before = snapshot(spare)
    settings = {"m": {"require_mount": True}}
    (tmp_path / "srv").mkdir()
    with mirror_server(tmp_path / "srv", {"m": str(replica)}, settings=settings) as server:
        url, secret = server.url("m"), ("--secret-file", server.secret_file)
        with _bound(own, replica):
            assert run_mirror("sync", "--delete", *secret, src, url).returncode == 0
            assert_mirrors(src, replica)
        with _bound(spare, replica):
            for delete in (["--delete"], [], ["--dry-run"]):
                proc = run_mirror("sync", *delete, *secret, src, url, check_codes=(EXIT_GUARD,))
                err = proc.stderr.decode()
                assert "is another disk than the one this server mirrored tree" in err, err
                assert ("holds tree " if other == "another tree's replica" else "holds no tree") in err, err
                assert snapshot(spare) == before  # nothing written, not even a .mirror
        (src / "d0" / "new").write_bytes(b"after\n")
        with _bound(own, replica):  # its own disk back: mirrored as before
            assert run_mirror("sync", "--delete", *secret, src, url).returncode == 0
            assert_mirrors(src, replica)
    with mirror_server(tmp_path / "srv", {"m": str(replica)}, settings=settings) as server:
        url, secret = server.url("m"), ("--secret-file", server.secret_file)
        with _bound(spare, replica):  # started again: the administrator took the new disk
            args = ["--allow-mass-delete"] if other != "blank" else []
            assert run_mirror("sync", "--delete", *args, *secret, src, url).returncode == 0
            assert_mirrors(src, replica)


@needs_root
def test_a_server_started_again_knows_the_trees_disk_before_its_first_session(tmp_path):
    """A ``mirror serve`` started again (its supervisor restarts it: hawrap, systemd) while
    the tree's own disk is mounted takes that disk as the tree's at once, not at its first
    session: a blank disk mounted in its place before anyone synced is refused, with nothing
    written there; the own disk back, mirrored as before.  A damaged identity on the disk
    does not keep the server from starting: the session names it."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    own, spare = tmp_path / "own", tmp_path / "spare"
    for d in (replica, own, spare):
        d.mkdir()
    _fill(src)
    settings = {"m": {"require_mount": True}}
    (tmp_path / "srv").mkdir()
    with _bound(own, replica):
        with mirror_server(tmp_path / "srv", {"m": str(replica)}, settings=settings) as server:
            assert run_mirror("sync", "--delete", "--secret-file", server.secret_file, src,
                              server.url("m")).returncode == 0  # fmt: skip
        assert_mirrors(src, replica)
        with mirror_server(tmp_path / "srv", {"m": str(replica)}, settings=settings) as server:
            url, secret = server.url("m"), ("--secret-file", server.secret_file)
            subprocess.run(["umount", "-l", str(replica)], check=True)
            with _bound(spare, replica):
                for delete in (["--delete"], []):
                    proc = run_mirror("sync", *delete, *secret, src, url, check_codes=(EXIT_GUARD,))
                    err = proc.stderr.decode()
                    assert "is another disk than the one this server mirrored tree" in err, err
                    assert "holds no tree" in err, err
                    assert os.listdir(spare) == []  # nothing written, not even a .mirror
            subprocess.run(["mount", "--bind", str(own), str(replica)], check=True)
            (src / "d0" / "new").write_bytes(b"after\n")
            assert run_mirror("sync", "--delete", *secret, src, url).returncode == 0
            assert_mirrors(src, replica)
        (own / ".mirror" / "tree-identity").write_bytes(b"{not json")
        with mirror_server(tmp_path / "srv", {"m": str(replica)}, settings=settings) as server:
            proc = run_mirror("sync", "--delete", "--secret-file", server.secret_file, src, server.url("m"),
                              check_codes=(EXIT_GUARD,))  # fmt: skip
            assert b"damaged tree identity" in proc.stderr, proc.stderr


@needs_root
def test_a_disk_mounted_in_the_replicas_place_during_a_session_is_given_no_record(tmp_path):
    """A session writes through the descriptors of the tree it opened, but reads and writes
    its state files by path: the epoch (looked at during the session, written back when
    found lower than the server saw) and what it applied (``.mirror/applied``, at its end).
    Another disk mounted at the replica's path meanwhile (no ``require_mount`` here: its
    state dir is inside, so a blank disk is a new replica) must get neither: with the record
    it would call itself caught up while holding nothing, and the next sender would send
    only what came after.  The session stops ("connect again") and the blank disk stays
    blank."""
    src, replica = tmp_path / "src", tmp_path / "replica"
    own, spare = tmp_path / "own", tmp_path / "spare"
    for d in (src, replica, own, spare):
        d.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    _fill(src, 10)
    # epoch 3: the server remembers it, and a session that read the blank disk's 0 would write it back there
    assert run_mirror("epoch", "bump", src, "--to", "3").returncode == 0
    (tmp_path / "srv").mkdir()
    with mirror_server(tmp_path / "srv", {"m": str(replica)}) as server, _bound(own, replica):
        url, secret = server.url("m"), ("--secret-file", server.secret_file)
        # 1 MiB/s: the big file takes about 3 s, and the disk is swapped while it comes
        sync = subprocess.Popen([*MIRROR, "sync", "--bwlimit", "1M", *secret, str(src), url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)  # fmt: skip
        try:
            temp = own / ".mirror" / "tmp"
            assert wait_until(lambda: temp.is_dir() and any(p.stat().st_size for p in temp.iterdir()), 20)
            umount(replica, lazy=True)
            subprocess.run(["mount", "--bind", str(spare), str(replica)], check=True)
            _, err = sync.communicate(timeout=60)
        finally:
            sync.kill()
        assert sync.returncode != 0, err
        assert b"is no longer the directory this session wrote to" in err, err
        assert os.listdir(spare) == []  # no .mirror/applied, nothing at all
        # the next sync sees the blank disk for what it is: everything is sent
        assert run_mirror("sync", *secret, src, url).returncode == 0
        assert_mirrors(src, spare)


@needs_root
def test_a_bind_mount_of_a_directory_of_the_same_filesystem_is_a_mount_point(tmp_path):
    from mirror.guard import is_mount_point

    disk, where = tmp_path / "disk", tmp_path / "mount point with space"
    disk.mkdir()
    where.mkdir()
    assert not is_mount_point(os.fsencode(where)) and not os.path.ismount(where)
    subprocess.run(["mount", "--bind", str(disk), str(where)], check=True)
    try:
        assert is_mount_point(os.fsencode(where))  # os.path.ismount cannot tell (same device)
    finally:
        umount(where)
    assert not is_mount_point(os.fsencode(where))


@contextmanager
def _xfs_on_another_device(image, where, fsid: int):
    """``image`` (xfs) mounted at ``where`` through a loop device other than the one whose
    ``f_fsid`` was ``fsid``: as after a boot that found the disks in another order.  Loop
    devices ahead of it are taken by small pads (the one just unmounted may still be on its
    way out, and is then not the first free one: the image would get it again)."""
    pads = []
    try:
        for n in range(4):
            pad = where.parent / f"{where.name}.pad{n}"
            subprocess.run(["truncate", "-s", "1M", str(pad)], check=True)
            taken = subprocess.run(["losetup", "-f", "--show", str(pad)], check=True, capture_output=True, text=True)
            pads.append(taken.stdout.strip())
            with loop_mounted(image, where):
                if os.statvfs(where).f_fsid != fsid:
                    yield where
                    return
        raise AssertionError(f"the image came back on the loop device it was on, past pads {pads}")
    finally:
        for device in pads:
            subprocess.run(["losetup", "-d", device], check=True)


@pytest.mark.skipif(not is_root(), reason="loop mounts need root")
def test_an_xfs_source_found_on_another_device_number_is_still_the_tree(tmp_path):
    """xfs's f_fsid is its device number: the same disk found in another order at boot
    (mounted by UUID, as it should be) passed for another filesystem, and every deleting
    session was refused.  The filesystem's UUID says it is the same; another xfs is not."""
    src, dst, state = tmp_path / "src", tmp_path / "dst", tmp_path / "state"
    images = [tmp_path / "xfs.img", tmp_path / "other-xfs.img"]
    for image in images:
        subprocess.run(["truncate", "-s", "300M", str(image)], check=True)
        subprocess.run(["mkfs.xfs", "-q", str(image)], check=True)
    dst.mkdir()

    def synced(*extra: str) -> int:
        return run_mirror("sync", str(src) + "/", str(dst), "--delete", "--no-fsync", "--state-dir", str(state),
                          *extra, check_codes=(0, EXIT_GUARD)).returncode  # fmt: skip

    with loop_mounted(images[0], src):
        _fill(src, 20)
        assert synced() == 0
        fsid = os.statvfs(src).f_fsid
        recorded = json.loads((state / "tree-identity").read_text())
        assert len(recorded["uuid"]) == 32, recorded
        # as a release that kept no UUID recorded it: found on its f_fsid, the UUID is added
        (state / "tree-identity").write_text(json.dumps({"tree": recorded["tree"], "fs": recorded["fs"]}))
        assert synced() == 0
        assert json.loads((state / "tree-identity").read_text()) == recorded
    with _xfs_on_another_device(images[0], src, fsid):
        (src / "after-boot").write_text("new")
        assert synced() == 0 and (dst / "after-boot").exists()
    with loop_mounted(images[1], src):
        assert synced() == EXIT_GUARD
        assert _content(dst)  # nothing deleted


def _foreign(tmp_path):
    """A source tree and a directory that holds other things, none of them named as the
    source's: ``mirror sync --delete /srv/mail /backup`` meant as rsync's (a copy *into*
    /backup), or a mistyped destination."""
    src, backup = tmp_path / "srv" / "mail", tmp_path / "backup"
    (src / "cur").mkdir(parents=True)
    (src / "cur" / "1").write_bytes(b"a mail\n")
    for name in ("web", "db"):
        (backup / name).mkdir(parents=True)
        (backup / name / "data").write_bytes(name.encode() * 100)
    return src, backup


def test_a_deleting_sync_into_a_directory_that_shares_nothing_with_the_source_is_refused(tmp_path):
    """It would delete everything the directory held: refused before anything is made there
    (exit 25, not even a .mirror), by the CLI, a dry run and the library, until the
    administrator says so; then mirrored as usual."""
    src, backup = _foreign(tmp_path)
    before = snapshot(backup)
    for dry in ([], ["-n"]):
        proc = run_mirror("sync", "--delete", *dry, src, backup, check_codes=(EXIT_GUARD,))
        err = proc.stderr.decode()
        assert f"refused: {backup} is no replica yet" in err and "holds 2 entries (db, web)" in err, err
        assert "--allow-mass-delete" in err and "Traceback" not in err, err
        assert snapshot(backup) == before and not (backup / ".mirror").exists()
    with pytest.raises(SourceGuardError, match="is no replica yet"):
        sync(src, backup, delete=True)
    assert snapshot(backup) == before
    # excluded, they are not at stake: the rest is mirrored beside them
    assert run_mirror("sync", "--delete", "--exclude", "/web/", "--exclude", "/db/", src, tmp_path / "backup2").returncode == 0
    assert run_mirror("sync", "--delete", "--allow-mass-delete", src, backup).returncode == 0
    assert sorted(os.listdir(backup)) == [".mirror", "cur"]
    # a replica now: its source's entries all renamed is an ordinary change
    os.rename(src / "cur", src / "new")
    assert run_mirror("sync", "--delete", src, backup).returncode == 0
    assert sorted(os.listdir(backup)) == [".mirror", "new"]


def test_a_copy_made_before_and_a_new_file_systems_lost_found_are_mirrored_into(tmp_path):
    """Not what the guard is for: a copy made by rsync before hamirror (it shares names with
    the source; what is stale in it goes), an excluded entry (never deleted), and a new file
    system's lost+found (the only entry: nothing of anyone's)."""
    src, backup = _foreign(tmp_path)
    subprocess.run(["rsync", "-a", f"{src}/", f"{backup}/"], check=True)  # web and db stale beside a copy
    assert run_mirror("sync", "--delete", src, backup).returncode == 0
    assert sorted(os.listdir(backup)) == [".mirror", "cur"]
    fresh = tmp_path / "fresh"
    (fresh / "lost+found").mkdir(parents=True)
    assert run_mirror("sync", "--delete", src, fresh).returncode == 0
    assert (fresh / "cur" / "1").exists()
    kept = tmp_path / "kept"
    (kept / "web").mkdir(parents=True)
    assert run_mirror("sync", "--delete", "--exclude", "/web/", src, kept).returncode == 0
    assert sorted(os.listdir(kept)) == [".mirror", "cur", "web"]


def test_a_daemon_pair_into_such_a_directory_deletes_nothing(tmp_path):
    """The pair is refused at its start (before its first session writes anything) and the
    directory keeps everything; with allow_mass_delete it is mirrored."""
    src, backup = _foreign(tmp_path)
    before = snapshot(backup)
    config = tmp_path / "daemon.toml"
    config.write_text(f'[[pair]]\nsource = "{src}"\ndestination = "{backup}"\n')
    log = tmp_path / "daemon.log"
    with live_daemon(src, None, "--config", str(config), log_path=str(log)) as daemon:
        assert wait_until(lambda: "is no replica yet" in log.read_text(), 60), log.read_text()
        assert snapshot(backup) == before and daemon.proc.poll() is None
    config.write_text(config.read_text() + "allow_mass_delete = true\n")
    with live_daemon(src, None, "--config", str(config), log_path=str(log)):
        assert wait_until(lambda: (backup / "cur" / "1").exists() and not (backup / "web").exists(), 60)


def test_a_servers_module_that_is_no_replica_yet_and_shares_nothing_is_refused_too(tmp_path):
    """The sender tells its root's names (``start``'s ``roots``): the receiver refuses before
    anything is written (no .mirror), a dry run too; the override passes, and a root with
    more names than a sender tells is not checked (mirrored as before)."""
    src, backup = _foreign(tmp_path)
    before = snapshot(backup)
    (tmp_path / "srv-state").mkdir()
    with mirror_server(tmp_path / "srv-state", {"m": backup}) as server:
        for dry in ([], ["-n"]):
            proc = run_mirror("sync", "--delete", *dry, "--secret-file", server.secret_file, src, server.url("m"),
                              check_codes=(EXIT_GUARD,))  # fmt: skip
            assert b"is no replica yet" in proc.stderr and b"(db, web)" in proc.stderr, proc.stderr
            assert snapshot(backup) == before and not (backup / ".mirror").exists()
        # with the override it is mirrored as before
        assert run_mirror("sync", "--delete", "--allow-mass-delete", "--secret-file", server.secret_file, src,
                          server.url("m")).returncode == 0  # fmt: skip
        assert sorted(os.listdir(backup)) == [".mirror", "cur"]
    many = tmp_path / "many"
    many.mkdir()
    for i in range(P.ROOT_NAMES_MAX + 1):
        (many / f"f{i}").write_bytes(b"x")
    other = tmp_path / "other"
    (other / "old").mkdir(parents=True)
    (tmp_path / "srv-state2").mkdir()
    with mirror_server(tmp_path / "srv-state2", {"o": other}) as server:
        assert run_mirror("sync", "--delete", "--secret-file", server.secret_file, many, server.url("o")).returncode == 0
    assert not (other / "old").exists() and len(os.listdir(other)) == P.ROOT_NAMES_MAX + 2
