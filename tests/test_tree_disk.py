"""hawrap's check that a ``require_mount`` tree has its own disk mounted (hawrap.treedisk),
on real bind mounts (each "disk" a directory) and identities recorded by real syncs: nothing
mounted, another disk in the tree's place (blank, or holding another tree), the tree's own
disk back, and a new disk adopted by the administrator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from helpers import is_root, run_mirror
from servers import mirror_server
from test_hawrap_config import MINIMAL, write

from hawrap.errors import HawrapError
from hawrap.mirrorctl import Tree
from hawrap.treedisk import HELD_FILE, MountTable, TreeDisks
from mirror.epoch import bump_epoch, observe_epoch, read_epoch

pytestmark = pytest.mark.skipif(not is_root(), reason="bind mounts need root")


@pytest.fixture
def place(tmp_path):
    """A mount point, disks to put there, and the node's state dir; whatever is mounted at
    the end is unmounted."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tmp_path / "node-state").mkdir()
    yield tmp_path
    while subprocess.run(["umount", "-l", str(tree)], capture_output=True).returncode == 0:
        pass


def disk(place, name: str, files: int = 0) -> str:
    path = place / "disks" / name
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"f{i}").write_text(f"{name} {i}\n")
    return str(path)


def mount(place, source: str) -> None:
    subprocess.run(["umount", "-l", str(place / "tree")], capture_output=True)
    subprocess.run(["mount", "--bind", source, str(place / "tree")], check=True)


def mirrored(source: str, replica: str, *args: str) -> None:
    """``source`` mirrored onto ``replica`` by a real sync (each records its tree identity)."""
    assert run_mirror("sync", source + "/", replica, "--delete", "--no-fsync", *args).returncode == 0


def tree_at(place, state_dir: str | None = None) -> Tree:
    path = str(place / "tree")
    return Tree("data", path, str(place / "data.lock"), state_dir or os.path.join(path, ".mirror"), True)


def test_the_replicas_own_disk_passes_and_another_disk_in_its_place_does_not(place):
    """State dir in the tree (the default): the tree id travels with the disk."""
    own, blank, foreign = disk(place, "own"), disk(place, "blank"), disk(place, "foreign", 3)
    mirrored(disk(place, "primary", 5), own)
    mirrored(disk(place, "elsewhere", 2), foreign)  # another cluster's replica
    mount(place, own)
    disks = TreeDisks([tree_at(place)], str(place / "node-state"))
    assert disks.unfit() == ""
    held = json.loads((place / "node-state" / HELD_FILE).read_text())["held"]
    tree_id = json.loads((place / "tree" / ".mirror" / "tree-identity").read_text())["tree"]
    assert held == {"data": tree_id}

    mount(place, blank)
    why = disks.unfit()
    assert f"{place}/tree holds no tree" in why and f"not tree {tree_id}" in why and "--new-disk" in why, why
    mount(place, foreign)
    assert f"not tree {tree_id}" in disks.unfit() and "holds tree " in disks.unfit()
    # hawrap restarted meanwhile: what it held is read back from its state dir
    assert f"not tree {tree_id}" in TreeDisks([tree_at(place)], str(place / "node-state")).unfit()
    subprocess.run(["umount", "-l", str(place / "tree")], check=True)
    assert disks.unfit() == f"nothing is mounted at {place}/tree (require_mount)"
    mount(place, own)
    assert disks.unfit() == ""


def test_a_tree_whose_state_dir_is_apart_knows_its_file_system(place):
    """State dir apart from the tree: its identity names the file system the tree was on."""
    own, other = disk(place, "own", 4), disk(place, "other", 4)
    state_dir = str(place / "tree-state")
    mount(place, own)
    mirrored(str(place / "tree"), disk(place, "peer"), "--state-dir", state_dir)  # this node as the primary
    disks = TreeDisks([tree_at(place, state_dir)], str(place / "node-state"))
    assert disks.unfit() == ""
    mount(place, other)
    why = disks.unfit()
    assert f"another file system is mounted at {place}/tree" in why and f"{state_dir}/tree-identity" in why, why
    mount(place, own)
    assert disks.unfit() == ""


def test_a_new_disk_adopted_is_mirrored_over_in_full(place):
    own, new = disk(place, "own"), disk(place, "new", 2)
    primary = disk(place, "primary", 6)
    mirrored(primary, own)
    mount(place, own)
    disks = TreeDisks([tree_at(place)], str(place / "node-state"))
    assert disks.unfit() == ""
    with pytest.raises(HawrapError, match="nothing to adopt"):
        disks.adopt()
    subprocess.run(["umount", "-l", str(place / "tree")], check=True)
    with pytest.raises(HawrapError, match="nothing is mounted"):
        disks.adopt()

    mount(place, new)
    mirrored(disk(place, "elsewhere", 1), str(place / "tree"))  # the new disk held another tree,
    bump_epoch(place / "tree" / ".mirror", 500)  # of a cluster at a higher epoch than this one's 7
    (place / "tree" / ".mirror" / "journal-0000000000000001").write_bytes(b"another tree's journal")
    observe_epoch(place / "node-state", 7)
    bump_epoch(place / "disks" / "primary" / ".mirror", 7)
    assert "holds tree " in disks.unfit()
    # as it is, the primary is refused: stale against that cluster's epoch, or another tree
    refused = run_mirror("sync", primary + "/", str(place / "tree"), "--delete", "--no-fsync", check_codes=(4, 25))
    assert b"refused" in refused.stderr
    assert disks.adopt() == ["data"]
    assert disks.unfit() == "" and disks.incomplete() == ["data"]
    assert not os.path.exists(place / "tree" / ".mirror" / "tree-identity")
    assert read_epoch(place / "tree" / ".mirror") == 7  # not 500: it would fence the primary off
    assert not any(n.startswith("journal-") for n in os.listdir(place / "tree" / ".mirror"))
    # hawrap restarted meanwhile: the new disk is still to be mirrored onto
    assert TreeDisks([tree_at(place)], str(place / "node-state")).incomplete() == ["data"]
    # the primary's deleting sync over the network (a receiver records what it applied) is
    # no longer refused as another tree's: the new disk becomes the tree's replica
    with mirror_server(place, {"data": str(place / "tree")}) as server:
        mirrored(primary, server.url("data"), "--secret-file", server.secret_file)
    assert sorted(os.listdir(place / "tree")) == sorted(os.listdir(primary))
    assert disks.unfit() == "" and disks.incomplete() == []
    assert json.loads((place / "node-state" / HELD_FILE).read_text()) == {"held": {"data": disks.held["data"]},
                                                                          "adopted": []}  # fmt: skip
    mount(place, own)
    assert disks.unfit() == ""  # the same tree id: the old disk is the tree's too


def test_a_garbled_record_of_held_trees_is_recorded_again(place):
    own = disk(place, "own")
    mirrored(disk(place, "primary", 1), own)
    mount(place, own)
    (place / "node-state" / HELD_FILE).write_text("{not json")
    disks = TreeDisks([tree_at(place)], str(place / "node-state"))
    assert disks.unfit() == ""
    assert list(json.loads((place / "node-state" / HELD_FILE).read_text())["held"]) == ["data"]


def test_hawrap_check_names_another_disk_and_records_nothing(place):
    own, blank = disk(place, "own"), disk(place, "blank")
    mirrored(disk(place, "primary", 2), own)
    mount(place, own)
    node_state = place / "state" / "a"
    node_state.mkdir(parents=True)
    config = write(place, MINIMAL.replace('secret_file = "secret"', f'secret_file = "secret"\nstate_dir = "{place}/state/{{node}}"')
                   + f'[mirror]\nsecret_file = "secret"\n[[mirror.tree]]\nname = "data"\npath = "{place}/tree"\n'
                   + f'lock_file = "{place}/data.lock"\nrequire_mount = true\n')  # fmt: skip
    check = [sys.executable, "-m", "hawrap", "check", "--config", config, "--node", "a"]
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0
    assert not (node_state / HELD_FILE).exists()  # a check records nothing
    TreeDisks([tree_at(place)], str(node_state)).unfit()  # the node, running, holds the tree
    mount(place, blank)
    proc = subprocess.run(check, capture_output=True, text=True)
    assert proc.returncode == 2 and "mirror.tree[0].require_mount" in proc.stderr, proc
    assert f"{place}/tree holds no tree" in proc.stderr and "--new-disk" in proc.stderr, proc.stderr


def test_the_mount_table_is_read_again_at_each_change_and_only_then(place):
    """The node asks at every step; the table is cached between changes, never past one."""
    table = MountTable()
    where = place / "tree"
    assert table.is_mount_point(os.fsencode(where)) is False
    for _ in range(3):
        mount(place, disk(place, f"d{_}"))
        assert table.is_mount_point(os.fsencode(where)) is True
        subprocess.run(["umount", str(where)], check=True)
        assert table.is_mount_point(os.fsencode(where)) is False


def test_the_disks_are_asked_from_several_threads_at_once(place):
    """The node's loop, the leadership's campaign and the control socket all ask whether the
    disks are fit; two polls of the mount table at once raised "concurrent poll()
    invocation" and the node process died (its supervisor started it again, the
    administrator's commands meanwhile said it was not running)."""
    mount(place, disk(place, "own"))
    disks = TreeDisks([tree_at(place)], str(place / "node-state"))
    failures: list[BaseException] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            try:
                disks.unfit()
                disks.unfit_trees()
            except BaseException as exc:  # noqa: BLE001 - any one of them is the failure
                failures.append(exc)
                return

    askers = [threading.Thread(target=ask) for _ in range(3)]
    for t in askers:
        t.start()
    try:
        for i in range(30):  # each change makes every asker read the table again
            if failures:
                break
            mount(place, disk(place, f"d{i}"))
    finally:
        stop.set()
        for t in askers:
            t.join()
    assert failures == []


def test_a_new_disk_served_is_the_trees_copy_from_then_on(place):
    """Forced primary on a new disk: what it writes there exists nowhere else, so it is no
    longer a disk waiting to be mirrored onto (which would rank it below an older copy)."""
    own = disk(place, "own")
    mirrored(disk(place, "primary", 1), own)
    mount(place, own)
    disks = TreeDisks([tree_at(place)], str(place / "node-state"))
    assert disks.unfit() == ""
    mount(place, disk(place, "new"))
    assert disks.adopt() == ["data"] and disks.incomplete() == ["data"]
    disks.served()
    assert disks.incomplete() == []
    assert TreeDisks([tree_at(place)], str(place / "node-state")).incomplete() == []  # recorded
