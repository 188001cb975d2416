"""Remote syncs across a real link that fails: two network namespaces on a bridge, `mirror
serve` in one, `mirror sync` (the CLI) or `mirror daemon` in the other.

The link goes down for good, flaps, or loses one direction only, in the middle of a transfer
held to seconds by --bwlimit.  Every trial bounds its wait (a hang fails it), a reader polls
the replica throughout and records any content that is not a complete version of the
source's, and once the link is whole again the next sync (or the daemon) converges.  Root
only (network namespaces); skipped cleanly elsewhere.

HAMIRROR_NET_TRIALS raises the number of flapping trials (2 by default).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import time

import pytest

from mirror.errors import EXIT_TIMEOUT, MirrorError
from mirror.writerlock import WriterLock
from tests.daemons import converged, live_daemon
from tests.helpers import MIRROR, wait_until
from tests.netlab import NetLab, Toggler, netns_unavailable, wait_for
from tests.servers import mirror_server
from tests.snapshot import assert_mirrors
from tests.test_sync_atomicity import FILES, _Reader, _write_version

SENDER, RECEIVER = "198.51.100.21", "198.51.100.22"  # documentation range, inside the lab only
TIMEOUT = 3  # the sender's --timeout
BWLIMIT = "1M"  # a version of the tree (test_sync_atomicity's: 6 MiB) takes about 6 s to send
TRIALS = int(os.environ.get("HAMIRROR_NET_TRIALS", "2"))
VERSIONS = range(1, TRIALS + 2)  # the versions of the tree a test writes, in turn

WHY_NOT = netns_unavailable(f"hmprobe{os.getpid()}")
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


class TwoHosts(NetLab):
    """Namespaces ``s`` (the sender, SENDER) and ``r`` (the receiver, RECEIVER) on one bridge;
    the bridge's port for a node is ``<node>-lan`` in the bridge's namespace."""

    def __init__(self, workdir: str):
        super().__init__(workdir, f"hm{secrets.token_hex(3)}", ("s", "r"))

    def _build(self) -> None:
        self.add_namespaces()
        self.add_bridge()
        self.join_bridge("s", SENDER)
        self.join_bridge("r", RECEIVER)
        if not wait_for(
            lambda: self.run_in("s", "ping", "-c", "1", "-W", "1", RECEIVER, check=False).returncode == 0, 10
        ):
            raise RuntimeError("the lab's link does not come up")

    def receiver_link(self, up: bool) -> None:
        """The receiver's cable: its bridge port down (both directions lost, no RST) or up."""
        self.link("br", "r-lan", up)


@pytest.fixture
def net(tmp_path):
    lab = TwoHosts(str(tmp_path))
    try:
        yield lab
    finally:
        lab.close()


class Site:
    """The source on the sender's side, the replica served by `mirror serve` on the
    receiver's, a reader polling the replica; syncs run by the CLI in the sender's namespace."""

    def __init__(self, net: TwoHosts, tmp_path, server):
        self.net = net
        self.src, self.dst = tmp_path / "src", tmp_path / "replica"
        self.server = server
        self.url = server.url("m")
        self.runs = 0
        self.reader = _Reader(self.dst, VERSIONS)  # any content but theirs is torn

    def version(self, version: int) -> None:
        assert version in VERSIONS
        _write_version(self.src, version)

    def start_sync(self, *extra: str):
        self.runs += 1
        self.log = os.path.join(self.net.workdir, f"sync-{self.runs}.log")
        return self.net.spawn("s", [*MIRROR, "sync", "--timeout", str(TIMEOUT), "--secret-file", self.server.secret_file,
                                    *extra, str(self.src), self.url], f"sync-{self.runs}.log")  # fmt: skip

    def finish(self, proc, bound: float = 60) -> tuple[int, str]:
        """The sync's exit code and output; it must end within ``bound`` seconds (else: a hang)."""
        try:
            proc.wait(bound)
        except Exception:
            raise AssertionError(
                f"the sync hangs: still running after {bound} s\n{self.net.logs()}"
            ) from None
        with open(self.log, errors="replace") as f:
            return proc.returncode, f.read()

    def transferring(self, proc) -> None:
        """Wait until the sync writes to the replica (a temporary file exists)."""
        tmp = self.dst / ".mirror" / "tmp"
        wait_until(lambda: tmp.is_dir() and os.listdir(tmp) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, "the sync ended before the fault could land"

    def sync_converges(self, bound: float = 60) -> int:
        """Syncs until one is not refused as busy (within ``bound`` s); it must succeed and
        leave a mirror without temporary files.  How many were refused."""
        deadline = time.monotonic() + bound
        refused = 0
        while True:
            code, out = self.finish(self.start_sync())
            if code == 0:
                break
            assert "is busy: another sync is writing to it" in out, out
            refused += 1
            assert time.monotonic() < deadline, (
                f"the replica is still busy {bound} s after the link came back: {out}"
            )
            time.sleep(0.5)
        assert_mirrors(self.src, self.dst)
        assert os.listdir(self.dst / ".mirror" / "tmp") == []
        return refused


@pytest.fixture
def server_options():
    return ()


@pytest.fixture
def site(net, tmp_path, server_options):
    src, dst = tmp_path / "src", tmp_path / "replica"
    src.mkdir()
    dst.mkdir()
    with mirror_server(tmp_path, {"m": str(dst)}, *server_options, prefix=["ip", "netns", "exec", net.ns["r"]],
                       host=RECEIVER) as server:  # fmt: skip
        s = Site(net, tmp_path, server)
        s.version(1)
        code, out = s.finish(s.start_sync())
        assert code == 0, out
        with s.reader:
            yield s
    assert not s.reader.torn, s.reader.torn
    assert s.reader.reads > FILES


def _ends_by_its_timeout(site, proc, fault_at: float) -> str:
    """The sync ends with exit 30 soon after the fault, naming the receiver; its output."""
    code, out = site.finish(proc)
    took = time.monotonic() - fault_at
    assert code == EXIT_TIMEOUT, out
    assert (
        f"the receiver at {RECEIVER}:{site.server.port}" in out and "timed out after 3 s (--timeout)" in out
    ), out
    # Silent for --timeout, plus the receiver's keepalive interval (a third of it) it may
    # have just missed: not two or three times --timeout, closing the lost connection.
    assert took < 2 * TIMEOUT + 1.5, f"the sync took {took:.1f} s to end after the fault: {out}"
    return out


def test_a_link_down_for_good_ends_the_sync_within_its_timeout_and_the_next_sync_converges(net, site):
    """The receiver's cable pulled mid-transfer: nothing comes back, not even a reset."""
    site.version(2)
    proc = site.start_sync("--bwlimit", BWLIMIT)
    site.transferring(proc)
    net.receiver_link(False)
    _ends_by_its_timeout(site, proc, time.monotonic())
    assert not site.reader.torn, site.reader.torn
    net.receiver_link(True)
    site.sync_converges()


def test_lost_replies_end_the_sync_within_its_timeout(net, site):
    """The receiver's packets (its acknowledgements too) are lost; the sender's still arrive."""
    site.version(2)
    proc = site.start_sync("--bwlimit", BWLIMIT)
    site.transferring(proc)
    net.drop_to("r", SENDER, True)
    _ends_by_its_timeout(site, proc, time.monotonic())
    net.drop_to("r", SENDER, False)
    site.sync_converges()


@pytest.mark.parametrize("server_options", [("--timeout", "4")])
def test_lost_frames_end_the_sync_and_the_server_frees_the_module_by_its_own_timeout(net, site):
    """The sender's packets are lost, the receiver's still arrive: the sender ends by its
    timeout; the server, its session silent, drops it by its own --timeout and lets go of
    the writer lock while the link is still broken, so the next sync is not refused."""
    site.version(2)
    proc = site.start_sync("--bwlimit", BWLIMIT)
    site.transferring(proc)
    net.drop_to("s", RECEIVER, True)
    _ends_by_its_timeout(site, proc, time.monotonic())
    state_dir = os.fsencode(site.dst / ".mirror")

    def free() -> bool:
        try:
            WriterLock.take(state_dir, os.fsencode(site.dst), "the test", "the replica").release()
        except MirrorError:
            return False
        return True

    wait_until(free, timeout=30)
    assert os.listdir(site.dst / ".mirror" / "tmp") == []  # the lost session's temporary files
    net.drop_to("s", RECEIVER, False)
    assert site.sync_converges() == 0


def test_a_flapping_link_never_tears_a_file_nor_hangs_the_sync(net, site, rng):
    """Down for well under --timeout, a few times: each sync either completes or fails with
    a clear error (TCP's retransmission backoff can stretch a short outage past it), in
    bounded time; a failed one is followed by a sync that converges."""
    for trial in range(TRIALS):
        site.version(2 + trial)
        proc = site.start_sync("--bwlimit", BWLIMIT)
        site.transferring(proc)
        flapping = Toggler(lambda on: net.receiver_link(not on), rng, on=(0.2, TIMEOUT / 3), off=(0.3, 1.0))
        try:
            wait_for(lambda f=flapping, p=proc: len(f.spans) >= 3 or p.poll() is not None, timeout=60)
        finally:
            flapping.stop()
        code, out = site.finish(proc)
        print(f"trial {trial}: exit {code} after flaps {[round(b - a, 2) for a, b in flapping.spans]}: {out}")
        if code == 0:
            assert_mirrors(site.src, site.dst)
        else:
            assert (code == EXIT_TIMEOUT and "timed out" in out) or "connection lost" in out, out
            site.sync_converges()
        assert not site.reader.torn, site.reader.torn


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"random seed {seed}")
    return random.Random(seed)


def test_the_daemon_across_a_link_down_for_seconds_reports_unreachable_and_converges(net, site, tmp_path):
    """The link goes down under a live daemon, which then has changes to send: it reports
    the replica unreachable, and once the link is back it reconnects (the server has let go
    of its old connection's writer lock) and the replica converges."""
    status_file = site.src / ".mirror" / "mirror-daemon.status.json"

    def status() -> dict:
        try:
            return json.loads(status_file.read_text())["pairs"][0]
        except (FileNotFoundError, ValueError, KeyError, IndexError):
            return {}

    with live_daemon(site.src, site.url, "--secret-file", site.server.secret_file, "--timeout", str(TIMEOUT),
                     log_path=tmp_path / "daemon.log", prefix=["ip", "netns", "exec", net.ns["s"]]) as daemon:  # fmt: skip
        wait_until(lambda: status().get("state") == "live", timeout=60)
        net.receiver_link(False)
        site.version(2)  # changes the daemon sends into the dead link
        pair = wait_until(lambda: status().get("state") == "unreachable" and status(), timeout=60)
        assert "timed out" in pair["last_error"] and RECEIVER in pair["last_error"], pair
        net.receiver_link(True)
        converged(site.src, site.dst, timeout=60)
        wait_until(lambda: status().get("state") == "live", timeout=60)
        assert daemon.proc.poll() is None, daemon.log_text()


def test_an_idle_daemon_notices_a_silent_receiver_and_comes_back_by_itself(net, site, tmp_path):
    """The receiver's cable is pulled while the daemon has nothing to send: nothing closes
    the connection (no FIN, no RST), yet "live" must not outlast the receiver (hawrap counts
    a live replica as up to date): TCP keepalive ends the idle connection within seconds.
    The cable back, the daemon connects again by itself, with no change to send."""
    status_file = site.src / ".mirror" / "mirror-daemon.status.json"

    def state() -> str:
        try:
            return json.loads(status_file.read_text())["pairs"][0]["state"]
        except (FileNotFoundError, ValueError, KeyError, IndexError):
            return ""

    with live_daemon(site.src, site.url, "--secret-file", site.server.secret_file, "--timeout", str(TIMEOUT),
                     log_path=tmp_path / "daemon.log", prefix=["ip", "netns", "exec", net.ns["s"]]) as daemon:  # fmt: skip
        wait_until(lambda: state() == "live", timeout=60)
        net.receiver_link(False)
        cut = time.monotonic()
        wait_until(lambda: state() != "live", timeout=30)
        noticed = time.monotonic() - cut
        net.receiver_link(True)
        wait_until(lambda: state() == "live", timeout=60)
        assert daemon.proc.poll() is None, daemon.log_text()
    print(f"an idle connection to a silent receiver ended after {noticed:.1f} s")
