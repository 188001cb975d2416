"""A tree's root ``.mirror`` is left out of every scan only when it is hamirror's state dir;
a user's own ``.mirror`` is refused, with a message naming it, by every command."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from mirror.errors import StateDirError
from mirror.statedir import MARKER, check_root, ensure_state_dir
from mirror.transfer import sync
from tests.daemons import converged, live_daemon, pair_status
from tests.helpers import MIRROR, run_mirror, wait_until
from tests.replica_checks import MODES, Target
from tests.servers import mirror_server
from tests.snapshot import snapshot


def _user_mirror_dir(root) -> None:
    (root / ".mirror").mkdir(parents=True)
    (root / ".mirror" / "notes.txt").write_text("my own files, not hamirror's")


def _below_root(snap: dict) -> dict:
    return {k: v for k, v in snap.items() if k != b"."}


def _trees(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("content")
    return src, dst


def test_a_new_state_dir_is_marked(tmp_path):
    path = ensure_state_dir(os.fsencode(tmp_path / "t" / ".mirror"))
    assert os.path.isfile(os.path.join(path, MARKER))
    check_root(tmp_path / "t")


@pytest.mark.parametrize("command", ["scan", "diff", "sync", "sync-delete", "dry-run"])
def test_a_users_own_mirror_dir_in_the_source_is_refused(tmp_path, command):
    src, dst = _trees(tmp_path)
    _user_mirror_dir(src)
    dst.mkdir()
    (dst / "keep").write_text("replica file")
    args = {
        "scan": ["scan", src],
        "diff": ["diff", src, dst],
        "sync": ["sync", src, dst],
        "sync-delete": ["sync", "--delete", src, dst],
        "dry-run": ["sync", "-n", "--delete", src, dst],
    }[command]
    before = snapshot(dst)
    proc = run_mirror(*args)
    assert proc.returncode == 2, proc
    assert b".mirror is not hamirror's state dir" in proc.stderr and b"notes.txt" in proc.stderr, proc.stderr
    assert snapshot(dst) == before
    assert (src / ".mirror" / "notes.txt").exists() and not (src / ".mirror" / MARKER.decode()).exists()


def test_a_users_own_mirror_dir_in_the_replica_is_refused(tmp_path):
    src, dst = _trees(tmp_path)
    _user_mirror_dir(dst)
    proc = run_mirror("sync", "--delete", src, dst)
    assert proc.returncode == 2 and b"notes.txt" in proc.stderr, proc
    assert sorted(os.listdir(dst)) == [".mirror"] and os.listdir(dst / ".mirror") == ["notes.txt"]


def test_a_mirror_file_at_the_root_is_refused(tmp_path):
    src, dst = _trees(tmp_path)
    (src / ".mirror").write_text("a file the user named .mirror")
    with pytest.raises(StateDirError, match="not hamirror's state dir but a file"):
        sync(src, dst)
    assert not dst.exists() or os.listdir(dst) in ([], [".mirror"])


def test_a_mirror_dir_is_refused_even_with_the_state_dir_elsewhere(tmp_path):
    """Every scan leaves a root .mirror out, wherever the state is kept: it is refused too."""
    src, dst = _trees(tmp_path)
    _user_mirror_dir(src)
    proc = run_mirror("sync", "--state-dir", tmp_path / "state", src, dst)
    assert proc.returncode == 2 and b"notes.txt" in proc.stderr, proc


def test_an_unmarked_hamirror_state_dir_is_adopted(tmp_path):
    """A state dir from before the marker, recognised by what it holds, is marked and used."""
    src, dst = _trees(tmp_path)
    state = src / ".mirror"
    (state / "tmp").mkdir(parents=True)
    (state / "epoch").write_text("3\n")
    (state / "journal-0123456789abcdef").write_bytes(b"")
    (state / "digests-0123456789abcdef.manifest").write_bytes(b"")
    (state / ".epoch.a1b2c3d4e5f6.tmp").write_bytes(b"")
    assert sync(src, dst).ok
    assert (state / MARKER.decode()).is_file()
    assert not (dst / "tmp").exists() and (dst / "d" / "f").read_text() == "content"


def test_serve_refuses_a_module_whose_mirror_dir_is_not_its_state(tmp_path):
    replica = tmp_path / "replica"
    _user_mirror_dir(replica)
    proc = run_mirror("serve", "--listen", "127.0.0.1:0", "--module", f"m={replica}", "--secret-file",
                      os.devnull, check_codes=(2, 5))  # fmt: skip
    secret = tmp_path / "secret"
    secret.write_text("a-long-enough-secret\n")
    secret.chmod(0o600)
    proc = run_mirror("serve", "--listen", "127.0.0.1:0", "--module", f"m={replica}", "--secret-file", secret)
    assert proc.returncode == 2 and b"notes.txt" in proc.stderr, proc


def test_serve_refuses_a_session_once_a_users_mirror_dir_appears(tmp_path):
    src, dst = _trees(tmp_path)
    replica = tmp_path / "replica"
    replica.mkdir()
    with mirror_server(tmp_path, {"m": str(replica)}) as server:
        assert sync(src, server.url("m"), secret_file=server.secret_file).ok
        (replica / ".mirror" / MARKER.decode()).unlink()
        (replica / ".mirror" / "notes.txt").write_text("mine")
        proc = run_mirror("sync", "--delete", "--secret-file", server.secret_file, src, server.url("m"))
        assert proc.returncode == 2 and b"notes.txt" in proc.stderr, proc
    assert (replica / "d" / "f").read_text() == "content"


def test_daemon_refuses_a_source_with_a_users_mirror_dir(tmp_path):
    src, dst = _trees(tmp_path)
    _user_mirror_dir(src)
    proc = subprocess.Popen(
        [*MIRROR, "daemon", str(src), str(dst)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    assert proc.returncode == 2 and b"notes.txt" in err, err
    assert not dst.exists() or not (dst / "d").exists()
    wait_until(lambda: True)


@pytest.mark.parametrize("mode", MODES)
def test_a_state_dir_removed_under_the_live_daemon_is_made_again_with_what_it_held(tmp_path, mode):
    """``rm -r SRC/.mirror`` (a clean-up script, a restore) while the daemon runs: the epoch
    that fences former primaries, the tree id the replica knows and the journal would be
    gone.  The daemon puts them back from what it read there, and goes on mirroring: the
    next session does not present epoch 0 (which the replica refuses: the pair fenced for
    good), and a restart is not refused either."""
    from mirror.epoch import read_epoch
    from mirror.guard import load

    src, dst = _trees(tmp_path)
    dst.mkdir()
    state = os.fsencode(src / ".mirror")
    run_mirror("epoch", "bump", "--to", "3", src)  # a tree that has been through failovers
    target = Target(mode, dst, tmp_path)
    with target.running():
        where, *options = target.daemon_args()
        with live_daemon(src, where, *options) as daemon:
            converged(src, dst)
            wait_until(lambda: pair_status(src).get("sessions"))  # the first full sync is over
            identity = load(state)
            for round_ in range(2):
                shutil.rmtree(src / ".mirror")
                if round_:  # idle: the daemon's check of its source finds it gone
                    wait_until(lambda: os.path.exists(os.path.join(state, b"epoch")), timeout=30)
                # at once, the first time: the session after it reads the epoch, gone
                (src / "d" / f"new{round_}").write_text("new")
                converged(src, dst)
                wait_until(lambda: pair_status(src).get("state") == "live", timeout=30)
                assert read_epoch(state) == 3
                assert load(state).tree_id == identity.tree_id
                assert [n for n in os.listdir(state) if n.startswith(b"journal-")], os.listdir(state)
            (src / "d" / "f").write_text("changed")
            converged(src, dst)
        assert daemon.proc.returncode == 0, daemon.log_text()
        text = daemon.log_text()
        assert text.count("the state dir was removed while the daemon ran: made again") == 2, text
        assert "fenced" not in text and "Traceback" not in text, text
        (src / "d" / "after").write_text("the daemon started again")
        with live_daemon(src, where, *options) as daemon:
            converged(src, dst)
            wait_until(lambda: pair_status(src).get("state") == "live", timeout=30)
        assert daemon.proc.returncode == 0 and "fenced" not in daemon.log_text(), daemon.log_text()


@pytest.mark.parametrize("mode", MODES)
def test_a_replica_state_dir_removed_under_its_writer_still_keeps_a_second_writer_out(tmp_path, mode):
    """The one-writer lock lived only in the replica's state dir: ``rm -r DST/.mirror`` under
    a live daemon unlinked the file its writer held locked, and a second sync (a split
    brain's other primary, a mistaken manual sync) made a new one, took it, and wrote into
    the replica at the same time: here, with ``--delete``, another tree's content over it.
    The second writer must be refused for as long as the first one holds the replica."""
    src, dst = _trees(tmp_path)
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    (other / "x" / "y").write_text("another tree")
    dst.mkdir()
    target = Target(mode, dst, tmp_path)
    with target.running():
        where, *options = target.daemon_args()
        with live_daemon(src, where, *options) as daemon:
            converged(src, dst)
            wait_until(lambda: pair_status(src).get("state") == "live", timeout=30)
            refused = target.sync(other, "--delete")
            assert refused.returncode == 2 and b"busy" in refused.stderr, refused
            shutil.rmtree(dst / ".mirror")  # the root's time moves: not compared from here on
            refused = target.sync(other, "--delete")
            assert refused.returncode == 2 and b"busy" in refused.stderr, refused
            assert _below_root(snapshot(dst)) == _below_root(snapshot(src))
            (src / "d" / "after").write_text("mirrored on by the writer that holds the replica")
            converged(src, dst, view=_below_root)
        assert "Traceback" not in daemon.log_text(), daemon.log_text()
    assert not (dst / "x").exists()
