"""A destination that comes back catches up from the journal, not by a full sync: the daemon
compares what the replica's receiver says it applied (``welcome``'s ``applied``) with its
journal, and replays only the changes after it, unless the journal no longer holds them.

The receivers are real ``mirror serve`` processes frozen with SIGSTOP (a silent peer) while
the tree changes; a sampler reads the replica's applied record every 20 ms throughout and
checks it never goes back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mirror.applied import read_applied
from tests.daemons import converged
from tests.helpers import MIRROR, PollingThread, run_mirror
from tests.servers import mirror_server
from tests.test_daemon_fanout import wait_pairs


def _scrape(port: int, destination: str) -> dict:
    """The daemon's metrics for ``destination``: {(name, how label or None): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, s.labels.get("how")): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.labels.get("destination") == destination}  # fmt: skip


class AppliedSampler(PollingThread):
    """Reads a replica's applied record every 20 ms; fails if it ever goes back."""

    interval = 0.02

    def __init__(self, replica):
        super().__init__()
        self.state = os.fsencode(replica / ".mirror")
        self.samples: list[tuple[int, int]] = []
        self.errors: list[str] = []

    def sample(self):
        rec = read_applied(self.state)
        if rec is None:
            return False
        point = (rec.epoch, rec.seq)
        if self.samples and point < self.samples[-1]:
            self.errors.append(f"the applied record went back from {self.samples[-1]} to {point}")
        self.samples.append(point)


def _daemon(tmp_path, src, servers: dict, *daemon_lines: str):
    config = tmp_path / "daemon.toml"
    text = "[daemon]\ntimeout = 2\ncontimeout = 2\n" + "".join(f"{line}\n" for line in daemon_lines)
    for name, (server, _) in servers.items():
        text += f"""
[[pair]]
name = "{name}"
source = "{src}"
destination = "{server.url("m")}"
secret_file = "{server.secret_file}"
"""
    config.write_text(text)
    log = open(tmp_path / "daemon.log", "ab")
    return subprocess.Popen([*MIRROR, "daemon", "--config", str(config), "-v"], stdout=log, stderr=log), log


def _change(src, round_: int, n: int) -> None:
    for i in range(n):
        (src / f"r{round_}-{i}").write_bytes(os.urandom(200))
    (src / "renamed").mkdir(exist_ok=True)
    os.replace(src / f"r{round_}-0", src / "renamed" / f"r{round_}")
    (src / "base0").unlink(missing_ok=True)
    (src / "base1").write_bytes(os.urandom(100))


def _stop_and_resume(server, src, others, round_: int, n: int, condition, rounds: int = 1) -> None:
    """Freeze ``server``'s receiver, change the tree (``rounds`` of ``n`` files; the other
    replicas keep up with each), wait until the daemon's status says ``condition``, then let
    it go on."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        for r in range(rounds):
            _change(src, round_ * 100 + r, n)
            for replica in others:
                converged(src, replica, timeout=30)
        wait_pairs(src, condition, timeout=30)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_a_stopped_destination_catches_up_from_the_journal(tmp_path):
    src, a = tmp_path / "src", tmp_path / "a"
    src.mkdir()
    a.mkdir()
    for i in range(30):
        (src / f"base{i}").write_bytes(os.urandom(300))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mirror_server(tmp_path, {"m": str(a)}) as ra, AppliedSampler(a) as sampler:
        daemon, log = _daemon(tmp_path, src, {"to-a": (ra, a)}, f'metrics = "127.0.0.1:{port}"')
        try:
            converged(src, a)
            pairs = wait_pairs(src, lambda p: p["to-a"]["state"] == "live" and p["to-a"]["lag_entries"] == 0)
            first = pairs["to-a"]
            assert first["catch_up"]["how"] == "full" and first["full_syncs"] == 1
            assert first["applied"]["seq"] == first["journal_seq"]
            # live: a burst of changes, files still open among them; once it is mirrored the
            # replica's record reaches the journal's head
            for i in range(40):
                with open(src / f"live{i}", "wb") as f:
                    f.write(os.urandom(100))
                    if i % 10 == 0:
                        os.fsync(f.fileno())
            converged(src, a)
            pairs = wait_pairs(src, lambda p: p["to-a"]["state"] == "live" and p["to-a"]["lag_entries"] == 0)
            assert pairs["to-a"]["applied"]["seq"] == pairs["to-a"]["journal_seq"] > first["journal_seq"]
            for round_ in range(2):
                _stop_and_resume(ra, src, [], round_, 20,
                                 lambda p: p["to-a"]["state"] in ("unreachable", "disconnected"))  # fmt: skip
                converged(src, a, timeout=60)
                pairs = wait_pairs(src, lambda p, r=round_: p["to-a"]["journal_catch_ups"] == r + 1
                                   and p["to-a"]["state"] == "live" and p["to-a"]["lag_entries"] == 0)  # fmt: skip
                pair = pairs["to-a"]
                assert pair["catch_up"]["how"] == "journal", pair["catch_up"]
                assert pair["catch_up"]["changes"] > 0
                assert pair["full_syncs"] == 1  # only the first sync was a full one
                assert (
                    pair["applied"]["seq"]
                    == pair["journal_seq"]
                    == read_applied(os.fsencode(a / ".mirror")).seq
                )
            text = run_mirror("status", str(src)).stdout.decode()
            assert (
                f"applied epoch 0 seq {pair['journal_seq']} of journal seq {pair['journal_seq']}, 0 entries behind"
                in text
            )
            assert "last caught up by journal replay of" in text and "2 replays, 1 full syncs" in text, text
            metrics = _scrape(port, ra.url("m"))
            assert metrics["mirror_catch_ups", "journal"] == 2 and metrics["mirror_catch_ups", "full"] == 1
            assert metrics["mirror_lag_entries", None] == 0
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            log.close()
        sampler.wait_polls()  # the record as the daemon left it
    assert not sampler.errors, sampler.errors
    assert len(set(sampler.samples)) >= 3  # it moved on with the catch-ups
    text = (tmp_path / "daemon.log").read_text()
    assert text.count("catching up from the journal") == 2, text


def test_a_destination_older_than_retention_gets_a_full_sync(tmp_path):
    src, a, b = tmp_path / "src", tmp_path / "a", tmp_path / "b"
    for d in (src, a, b):
        d.mkdir()
    for i in range(10):
        (src / f"base{i}").write_bytes(os.urandom(300))
    with mirror_server(tmp_path, {"m": str(a)}) as ra, mirror_server(tmp_path, {"m": str(b)}) as rb:
        daemon, log = _daemon(tmp_path, src, {"to-a": (ra, a), "to-b": (rb, b)}, "journal_retain = 30")
        try:
            converged(src, a)
            converged(src, b)
            wait_pairs(src, lambda p: all(x["state"] == "live" and x["lag_entries"] == 0 for x in p.values()))
            # b away while the tree takes far more changes than the journal holds for it
            _stop_and_resume(rb, src, [a], 0, 10,
                             lambda p: p["to-b"]["state"] in ("unreachable", "disconnected")
                             and p["to-a"]["pending"] == 0, rounds=6)  # fmt: skip
            converged(src, b, timeout=60)
            pairs = wait_pairs(src, lambda p: p["to-b"]["full_syncs"] == 2 and p["to-b"]["state"] == "live"
                               and p["to-b"]["lag_entries"] == 0)  # fmt: skip
            assert "let this destination go" in pairs["to-b"]["catch_up"]["reason"], pairs["to-b"]["catch_up"]
            assert pairs["to-b"]["journal_catch_ups"] == 0
            assert pairs["to-a"]["full_syncs"] == 1  # the other destination was never held back
            converged(src, a)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            log.close()
    text = (tmp_path / "daemon.log").read_text()
    assert "destination to-b is" in text and "destination to-a is" not in text, text


def test_a_replica_far_below_our_epoch_is_synced_again_until_it_records_it(tmp_path):
    """A session raises a replica's epoch by at most MAX_EPOCH_STEP, and a session the
    replica could not take at our epoch records nothing: the daemon syncs again, backing off,
    until it holds our epoch and has recorded what it applied, with no change to send."""
    from mirror.epoch import MAX_EPOCH_STEP, bump_epoch, read_epoch

    src, a = tmp_path / "src", tmp_path / "a"
    src.mkdir()
    a.mkdir()
    (src / "f").write_text("x")
    epoch = 2 * MAX_EPOCH_STEP + 3
    bump_epoch(os.fsencode(src / ".mirror"), to=epoch)
    with mirror_server(tmp_path, {"m": str(a)}) as ra:
        daemon, log = _daemon(tmp_path, src, {"to-a": (ra, a)})
        try:
            pairs = wait_pairs(src, lambda p: (p["to-a"]["applied"] or {}).get("epoch") == epoch)
            assert read_epoch(os.fsencode(a / ".mirror")) == epoch
            assert pairs["to-a"]["sessions"] >= 3 and pairs["to-a"]["lag_entries"] == 0
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            log.close()


def test_the_journal_holds_what_a_replica_lacks_past_its_checkpoint_within_the_bound(tmp_path):
    """A session that deferred a file (still open) is checkpointed while the replica's record
    stays behind: the records after the record are held so a reconnection replays them; past
    the bound the hold goes and the reconnection resyncs in full (rewind refused)."""
    from mirror import journal as J

    j = J.Journal(os.fsencode(tmp_path / "journal-0a"), (b"x", b"y"), max_retained=5)
    first = j.append([(J.ENTRY, b"a", 0)])
    for c in (b"x", b"y"):
        j.checkpoint(j.take(c).seq, c)
    j.hold(first, b"x")  # x's replica recorded ``first``
    j.append([(J.ENTRY, b"open", 0)])
    for c in (b"x", b"y"):
        j.checkpoint(j.take(c).seq, c)  # x's session deferred "open": its record stays at first
    assert j.rewind(first, b"x") and set(j.pending(cursor=b"x").entries) == {b"open"}
    j.checkpoint(j.take(b"x").seq, b"x")
    j.hold(None, b"x")
    assert not j.rewind(first, b"x")  # nothing held: dropped at y's and x's checkpoints
    j.hold(j.position(b"x")[0], b"x")
    held_from = j.position(b"x")[0]
    j.append([(J.ENTRY, b"later", 0)])
    j.checkpoint(j.take(b"x").seq, b"x")
    for i in range(10):  # both keep up, but x's replica records nothing (say every session defers a file)
        j.append([(J.ENTRY, b"f%d" % i, 0)])
        for c in (b"x", b"y"):
            j.checkpoint(j.take(c).seq, c)
    assert not j.rewind(held_from, b"x")  # the hold went past the bound
    assert not j.overrun(b"x")  # x itself keeps up: it is not let go, only its hold goes
    j.close()


def _long_dir(root, depth: int = 14):
    """A directory ``depth`` levels of 250-byte names below ``root`` (a path of ~3.5 KB):
    a few thousand names there are more than one ``start`` frame holds."""
    path = root
    for level in range(depth):
        path = path / (f"{level:02d}" + "d" * 248)
    path.mkdir(parents=True)
    return path


def test_a_destination_that_comes_back_to_more_changes_than_a_session_can_name_catches_up_whole(tmp_path):
    """A scoped session names every changed path and rename in its ``start`` frame; a
    replica away while thousands of files with long paths arrived and were renamed (or
    hundreds of thousands of short ones) would get a frame over the limit at every try, for
    good.  Past what one frame holds, the daemon compares the whole tree instead, and leaves
    the renames to it when they alone are too many."""
    src, a = tmp_path / "src", tmp_path / "a"
    src.mkdir()
    a.mkdir()
    deep = _long_dir(src)
    for i in range(1200):
        (deep / (f"{i:04d}" + "o" * 196)).write_bytes(b"%d" % i)
    with mirror_server(tmp_path, {"m": str(a)}) as ra:
        daemon, log = _daemon(tmp_path, src, {"to-a": (ra, a)})
        try:
            converged(src, a)
            wait_pairs(src, lambda p: p["to-a"]["state"] == "live" and p["to-a"]["lag_entries"] == 0)
            os.kill(ra.proc.pid, signal.SIGSTOP)
            try:
                # 1,200 renames of ~3.7 KB paths: 9 MB; 2,600 new files: 9.6 MB; the frame: 8 MiB
                for i in range(1200):
                    os.rename(deep / (f"{i:04d}" + "o" * 196), deep / (f"{i:04d}" + "r" * 196))
                for i in range(2600):
                    (deep / (f"{i:04d}" + "f" * 196)).write_bytes(b"%d" % i)
                wait_pairs(src, lambda p: p["to-a"]["state"] in ("unreachable", "disconnected")
                           and p["to-a"]["pending"] >= 3800)  # fmt: skip
            finally:
                os.kill(ra.proc.pid, signal.SIGCONT)
            converged(src, a, timeout=60)
            pairs = wait_pairs(src, lambda p: p["to-a"]["state"] == "live" and p["to-a"]["lag_entries"] == 0)
            # the first sync, and this one (counted when begun: one cut short, as when the
            # continued receiver is still busy with its old session on a loaded machine, is
            # begun and counted again)
            assert pairs["to-a"]["full_syncs"] >= 2, pairs["to-a"]
            assert "more than one session names" in pairs["to-a"]["catch_up"]["reason"], pairs["to-a"]
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            log.close()
    text = (tmp_path / "daemon.log").read_text()
    assert "exceeds the frame limit" not in text, text[-3000:]


def _paths(tag: str, count: int, length: int) -> list[bytes]:
    """``count`` distinct relative paths of ``length`` bytes (at least 8), names of at most 250."""
    out = []
    n = -(-(length + 1) // 251)  # names, each followed by a slash but the last
    sizes = [(length - (n - 1)) // n + (i < (length - (n - 1)) % n) for i in range(n)]
    for i in range(count):
        head = f"{tag}{i}".encode()
        names = [head.ljust(sizes[0], b"y")] + [b"x" * size for size in sizes[1:]]
        out.append(b"/".join(names))
    return out


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_batch_the_daemon_sends_as_one_session_fits_the_start_frame_and_the_receivers_limits(data):
    """Whatever mix of changed paths, subtrees and renames ``_fits_a_session`` lets through
    as one scoped session, the sender's ``start`` (the scope with each entry's directory,
    the renames with their expectations, a renamed directory's new path in the scope)
    encodes within the frame, and the receiver's checks take it."""
    from mirror import protocol as P
    from mirror.daemon import _fits_a_session, _with_directories
    from mirror.journal import Pending
    from mirror.renames import FILE, parse
    from mirror.treescan import Scope

    def sizes(what: str, most: int):
        length = data.draw(st.integers(8, 4000), label=f"{what} length")
        return length, data.draw(st.integers(0, min(most, 6_000_000 // length)), label=f"{what} count")

    entry_len, entries = sizes("entry", 60_000)
    tree_len, trees = sizes("subtree", 20_000)
    rename_len, renames = sizes("rename", 30_000)
    moves = list(zip(_paths("o", renames, rename_len), _paths("n", renames, rename_len), strict=True))
    batch = Pending(entries=dict.fromkeys(_paths("e", entries, entry_len), 0.0),
                    trees=set(_paths("t", trees, tree_len)), renames=moves)  # fmt: skip
    assume(_fits_a_session(batch))
    scope = Scope(entries=_with_directories(batch.entries), trees=batch.trees | {new for _, new in moves})
    planned = [[old, new, [FILE, 2**40, 2**62, b"d" * 16]] for old, new in moves]
    frame = P.encode([P.START, {"epoch": 2**40, "delete": True, "checksum": False, "dry_run": False, "flags": 15,
                                "owner": True, "excludes": [], "no_fsync": False, "scope": scope.as_wire(),
                                "renames": planned, "tree": "0" * 32, "keepalive": 10.0, "deletions": None,
                                "seq": 2**40, "base": 2**40, "journal": "j" * 32}])  # fmt: skip
    assert len(frame) <= P.MAX_FRAME
    start = P.decode(frame[P._HEADER.size :])
    P.checked_start(start, scope=(None, Scope.from_wire), renames=([], parse))
