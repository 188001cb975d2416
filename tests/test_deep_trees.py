"""A chain of directories deeper than a receiver takes, made by anyone who can write in the
tree (a shared web root, an IMAP user's nested folders, a runaway script): ``mkdir -p`` of
4,200 one-letter levels, or 270 levels of 250-byte names (a 66 KB path).  It used to fail
every sync whole (exit 2, nothing mirrored, locally too) and every session of the live
daemon, for good.  Now the part past the limit is left out and named, and everything else
is mirrored (exit 1, partial)."""

from __future__ import annotations

import os
import subprocess

import pytest

from mirror.constants import LISTED_DEPTH_MAX
from tests.daemons import converged, live_daemon, pair_status
from tests.helpers import wait_until
from tests.replica_checks import MODES, Target
from tests.trees import chain


def _deep_chains(src) -> None:
    (src / "levels").mkdir()
    (src / "long").mkdir()
    chain(src / "levels", b"d", 4200)
    chain(src / "long", b"n" * 250, 270)


def _depth(root, top: str) -> int:
    """Levels of the one-directory chain below ``root/top`` (counted one descriptor at a time)."""
    fd, levels = os.open(root / top, os.O_RDONLY | os.O_DIRECTORY), 0
    try:
        while subdirs := [n for n in os.listdir(fd) if os.path.isdir(os.path.join(f"/proc/self/fd/{fd}", n))]:
            child = os.open(subdirs[0], os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, levels = child, levels + 1
    finally:
        os.close(fd)
    return levels


@pytest.fixture
def trees(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    yield src, dst
    # pytest's own clean-up (shutil.rmtree) recurses once per level
    subprocess.run(["rm", "-rf", "--", src, dst], check=True)


@pytest.mark.parametrize("mode", MODES)
def test_a_sync_leaves_out_and_names_what_is_too_deep_and_mirrors_the_rest(trees, tmp_path, mode):
    src, dst = trees
    (src / "mail").mkdir()
    (src / "mail" / "inbox").write_text("the data that matters")
    _deep_chains(src)
    with Target(mode, dst, tmp_path).running() as target:
        proc = target.sync(src)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.count("not listed: too deep to mirror") == 2 and "partial" in err, err
    assert (dst / "mail" / "inbox").read_text() == "the data that matters"
    assert _depth(dst, "levels") == LISTED_DEPTH_MAX  # the deepest listed directory's subdirectory made, empty
    assert 250 < _depth(dst, "long") < 270


@pytest.mark.parametrize("mode", MODES)
def test_the_live_daemon_goes_on_mirroring_beside_a_chain_too_deep(trees, tmp_path, mode):
    """The chain made while the daemon runs (and there when it starts again): the changes
    after it arrive, and the pair says what it leaves out.  (A chain of one-letter names
    thousands deep made at once costs the watcher time quadratic in its depth, to be
    watched down to PATH_MAX: tens of seconds; not made here.)"""
    src, dst = trees
    (src / "f").write_text("before")
    (src / "long").mkdir()
    target = Target(mode, dst, tmp_path)
    with target.running():
        where, *options = target.daemon_args()
        for start in range(2):
            with live_daemon(src, where, *options) as daemon:
                if not start:
                    converged(src, dst)
                    chain(src / "long", b"n" * 250, 270)
                (src / "f").write_text(f"after the chain, run {start}")
                wait_until(lambda s=start: (dst / "f").read_text() == f"after the chain, run {s}", timeout=30)
                (src / "g").write_text(f"and more, run {start}")
                wait_until(lambda s=start: (dst / "g").exists() and (dst / "g").read_text() == f"and more, run {s}",
                           timeout=30)  # fmt: skip
                pair = wait_until(lambda: (p := pair_status(src)).get("state") == "live" and p, timeout=30)
                assert pair["exit"] in (0, 1), pair
                # said once the session that met it is over (the files above may come first)
                wait_until(lambda d=daemon, s=start: d.log_text().count("too deep to mirror") > s, timeout=30)
            assert "Traceback" not in daemon.log_text()


def test_a_scoped_scan_does_not_list_what_a_whole_scan_leaves_out(trees):
    """The live daemon's scoped sessions (a changed name, a subtree compared again) meet a
    too-deep directory as a whole scan does: incomplete, with the problem, nothing listed."""
    import errno

    from mirror.treescan import Scope, TreeScan

    src, _ = trees
    (src / "levels").mkdir()
    chain(src / "levels", b"d", LISTED_DEPTH_MAX + 3)
    deepest_listed = b"/".join([b"levels"] + [b"d"] * (LISTED_DEPTH_MAX - 1))
    first_unlisted = deepest_listed + b"/d"
    for scope in (Scope(entries=[first_unlisted + b"/d"]), Scope(trees=[first_unlisted]),
                  Scope(entries=[deepest_listed + b"/d"])):  # fmt: skip
        listings = list(TreeScan(os.fsencode(src), scope=scope, background=False))
        unlisted = [lst for lst in listings if lst.path == first_unlisted]
        if scope.entries == {deepest_listed + b"/d"}:  # its directory is listed: the name is in it
            assert [lst.path for lst in listings] == [deepest_listed] and listings[0].complete
            assert [e.name for e in listings[0]] == [b"d"]
            continue
        assert len(unlisted) == 1 and not unlisted[0].complete and len(unlisted[0]) == 0, scope
        assert [(p.path, p.errno) for p in unlisted[0].problems] == [(first_unlisted, errno.ENAMETOOLONG)]
