"""The live daemon over a real ssh connection that fails silently: OpenSSH's sshd in the
receiver's network namespace (``tests/sshd.py``), the daemon in the sender's, both ends of
the cable as in ``test_network_faults``.  Root only; skipped cleanly without OpenSSH.

A connection that vanishes without a word (a cable pulled, a host frozen) must not leave
either end believing in it: the daemon says "live" only while the receiver is there (ssh's
own keepalive, which ``mirror`` turns on), and the receiver over there, holding the
replica's writer lock between sessions, lets it go once the sender stops saying it is there
(the ``idle`` frames), rather than when sshd's TCP keepalive gives up, hours later.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests import test_network_faults
from tests.daemons import converged, live_daemon
from tests.helpers import MIRROR, wait_until
from tests.netlab import netns_unavailable
from tests.sshd import ssh_server, sshd_unavailable
from tests.test_network_faults import RECEIVER

WHY_NOT = sshd_unavailable() or netns_unavailable(f"hmprobe{os.getpid()}")
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
net = test_network_faults.net  # the fixture: the sender's and the receiver's hosts on one bridge


@pytest.fixture
def sshd(net, tmp_path):
    with ssh_server(str(tmp_path), ["ip", "netns", "exec", net.ns["r"]], RECEIVER) as server:
        yield server


def _trees(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "replica"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(b"%d" % i)
    return src, dst


def _state(src) -> str:
    try:
        return json.loads((src / ".mirror" / "mirror-daemon.status.json").read_text())["pairs"][0]["state"]
    except (FileNotFoundError, ValueError, KeyError, IndexError):
        return ""


def _ssh_child(pid: int) -> int:
    """The daemon's ssh client (its one child whose command is ssh)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if int(fields[1]) == pid and comm == "ssh":
                return int(entry)
    raise AssertionError(f"no ssh client under pid {pid}")


def test_an_idle_daemon_over_ssh_notices_the_receivers_host_vanish_and_comes_back(net, sshd, tmp_path):
    """The receiver's cable pulled while the daemon has nothing to send: no FIN, no reset.
    Without ssh's keepalive the connection would pass for live until TCP's, two hours on."""
    src, dst = _trees(tmp_path)
    prefix = ["ip", "netns", "exec", net.ns["s"], "env", f"PATH={sshd.env()['PATH']}"]
    with live_daemon(src, f"{sshd.host}:{dst}", "--timeout", "60", log_path=tmp_path / "daemon.log",
                     prefix=prefix) as daemon:  # fmt: skip
        wait_until(lambda: _state(src) == "live", timeout=60)
        converged(src, dst)
        net.receiver_link(False)
        cut = time.monotonic()
        wait_until(lambda: _state(src) != "live", timeout=30)
        noticed = time.monotonic() - cut
        net.receiver_link(True)
        (src / "after").write_bytes(b"written once the link is back")
        wait_until(lambda: (dst / "after").exists(), timeout=90)
        wait_until(lambda: _state(src) == "live", timeout=30)
        assert daemon.proc.poll() is None, daemon.log_text()
    print(f"an idle ssh connection to a vanished host ended after {noticed:.1f} s")


def test_a_receiver_over_ssh_lets_the_replica_go_when_its_sender_goes_silent(net, sshd, tmp_path):
    """The daemon's ssh client frozen (SIGSTOP): sshd hears nothing more, as from a sender
    whose network vanished.  The receiver it started holds the replica's writer lock between
    sessions: another sender is refused as busy until the receiver ends the silent
    connection, IDLE_INTERVAL * IDLE_MISSED seconds on."""
    src, dst = _trees(tmp_path)
    prefix = ["ip", "netns", "exec", net.ns["s"], "env", f"PATH={sshd.env()['PATH']}"]
    with live_daemon(src, f"{sshd.host}:{dst}", log_path=tmp_path / "daemon.log", prefix=prefix) as daemon:
        wait_until(lambda: _state(src) == "live", timeout=60)
        converged(src, dst)
        ssh = _ssh_child(daemon.proc.pid)
        os.kill(ssh, signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            (src / "other").write_bytes(b"sent by another sender")
            refused = 0
            while True:
                sync = subprocess.run([*prefix, *MIRROR, "sync", str(src), f"{sshd.host}:{dst}"], capture_output=True,
                                      text=True, timeout=60)  # fmt: skip
                if sync.returncode == 0:
                    break
                assert "busy" in sync.stderr, sync.stderr
                refused += 1
                assert time.monotonic() - frozen < 60, (
                    f"the replica is still held: {sync.stderr}\n{sshd.log_text()}"
                )
                time.sleep(1)
            let_go = time.monotonic() - frozen
        finally:
            os.kill(ssh, signal.SIGCONT)
        assert refused, "the frozen sender's receiver never held the replica: the fault did not land"
        assert (dst / "other").read_bytes() == b"sent by another sender"
        # the daemon hears that its connection ended, connects again, and is live once more
        (src / "after").write_bytes(b"the daemon's again")
        wait_until(lambda: (dst / "after").exists(), timeout=60)
        wait_until(lambda: _state(src) == "live", timeout=30)
        assert daemon.proc.poll() is None, daemon.log_text()
    print(f"the silent sender's receiver let the replica go after {let_go:.1f} s ({refused} syncs refused)")
