"""Heartbeat packets: authentication, bounds, replay and spoof rejection, boot adoption;
and the real heartbeat engine exchanging packets over loopback UDP."""

from __future__ import annotations

import json
import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
import time

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hawrap import wire
from hawrap.errors import WireAuthError, WireError
from hawrap.heartbeat import HeartbeatEngine

SECRET = b"s" * 32


def fields(node="b", link="hb", boot=b"B" * 16, seq=1, peer_boot=None, **kw):
    base = {
        "v": 2, "cluster": "c", "node": node, "link": link, "boot": boot, "seq": seq, "peer_boot": peer_boot,
        "role": "primary", "epoch": 3, "owns_epoch": True, "standby": False, "lan_ok": True,
        "serving": True, "request": None, "links": {"hb": True}, "uptodate": True, "in_sync": True,
        "incomplete": False, "ahead": False,
    }  # fmt: skip
    base.update(kw)
    return base


def test_roundtrip():
    f = fields()
    assert wire.decode(SECRET, wire.encode(SECRET, f)) == f
    assert wire.decode(SECRET, wire.encode(SECRET, fields(incomplete=True)))["incomplete"] is True
    assert wire.decode(SECRET, wire.encode(SECRET, fields(ahead=True)))["ahead"] is True


def test_an_older_peer_without_the_optional_fields_is_heard_with_their_defaults():
    older = fields()
    del older["incomplete"]  # a release before new disks were adopted
    del older["ahead"]  # a release before peers said they held changes the other lacks
    heard = wire.decode(SECRET, wire.encode(SECRET, older))
    assert heard["incomplete"] is False and heard["ahead"] is False
    with pytest.raises(WireError, match="'incomplete' has type int"):
        wire.decode(SECRET, wire.encode(SECRET, fields(incomplete=1)))


def test_wrong_secret_and_tampering_are_rejected():
    packet = wire.encode(SECRET, fields())
    with pytest.raises(WireAuthError, match="authentication"):
        wire.decode(b"x" * 32, packet)
    tampered = bytearray(packet)
    tampered[-3] ^= 1
    with pytest.raises(WireError, match="authentication"):
        wire.decode(SECRET, bytes(tampered))


def test_oversized_and_short_packets():
    with pytest.raises(WireError, match="larger"):
        wire.decode(SECRET, b"HW1" + b"\0" * wire.MAX_PACKET)
    with pytest.raises(WireError, match="not a hawrap"):
        wire.decode(SECRET, b"HW1abc")


def _signed(body: bytes) -> bytes:
    import hashlib
    import hmac

    return wire.MAGIC + hmac.new(SECRET, wire.MAGIC + body, hashlib.sha256).digest() + body


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([1, 2, 3]),
        msgpack.packb({**fields(), "seq": "1"}, use_bin_type=True),
        msgpack.packb({**fields(), "role": "king"}, use_bin_type=True),
        msgpack.packb({**fields(), "boot": b"short"}, use_bin_type=True),
        msgpack.packb({k: v for k, v in fields().items() if k != "epoch"}, use_bin_type=True),
        msgpack.packb({**fields(), "standby": 1}, use_bin_type=True),
        msgpack.packb({**fields(), "links": {"hb": "yes"}}, use_bin_type=True),
        msgpack.packb({**fields(), "v": 1}, use_bin_type=True),
    ],
)
def test_authenticated_but_malformed_bodies_are_rejected(body):
    with pytest.raises(WireError):
        wire.decode(SECRET, _signed(body))


@given(st.binary(max_size=2000))
def test_random_bytes_never_crash_the_decoder(data):
    for packet in (data, _signed(data)):
        try:
            wire.decode(SECRET, packet)
        except WireError:
            pass


def tracker():
    return wire.PeerTracker(b"A" * 16, "b", "c", ("hb", "lan"))


def test_new_boot_needs_our_boot_echoed_then_sequence_rises():
    t = tracker()
    assert not t.check(fields(seq=1), "hb").accepted  # not confirmed yet
    assert t.heard_boot == b"B" * 16  # we echo it
    v = t.check(fields(seq=2, peer_boot=b"A" * 16), "hb")
    assert v.accepted and v.new_boot
    assert t.check(fields(seq=3, peer_boot=b"A" * 16), "hb").accepted
    assert not t.check(fields(seq=3, peer_boot=b"A" * 16), "hb").accepted  # replay
    assert not t.check(fields(seq=2, peer_boot=b"A" * 16), "hb").accepted  # older
    # the other link has its own sequence window
    assert t.check(fields(link="lan", seq=3, peer_boot=b"A" * 16), "lan").accepted


def test_packet_replayed_onto_another_link_is_rejected():
    t = tracker()
    t.check(fields(seq=1, peer_boot=b"A" * 16), "hb")
    assert not t.check(fields(link="hb", seq=9, peer_boot=b"A" * 16), "lan").accepted


def test_old_boot_is_retired_after_a_restart():
    t = tracker()
    assert t.check(fields(seq=5, peer_boot=b"A" * 16), "hb").accepted
    new = fields(boot=b"N" * 16, seq=1, peer_boot=b"A" * 16)
    assert t.check(new, "hb").new_boot
    assert not t.check(fields(seq=6, peer_boot=b"A" * 16), "hb").accepted  # old boot replayed


def test_recording_from_before_our_start_cannot_be_adopted():
    t = tracker()
    assert not t.check(fields(seq=100, peer_boot=b"Z" * 16), "hb").accepted


def test_wrong_cluster_or_node():
    t = tracker()
    assert not t.check(fields(node="x", peer_boot=b"A" * 16), "hb").accepted
    assert not t.check({**fields(peer_boot=b"A" * 16), "cluster": "other"}, "hb").accepted


# ------------------------------------------------------------ the engine, for real, on loopback


def free_port(host):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EngineThread:
    def __init__(self, node, peer, links, interval=0.02, deadtime=0.1, watchdog=None):
        self.parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cfg = {
            "cluster": "c", "node": node, "peer": peer, "secret": SECRET, "interval": interval,
            "deadtime": deadtime, "links": links, "watchdog": watchdog,
        }  # fmt: skip
        self.engine = HeartbeatEngine(cfg, child)
        self.child = child
        self.reports: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run)
        self.reader = threading.Thread(target=self._read)
        self.thread.start()
        self.reader.start()

    def _run(self):
        try:
            self.engine.run()
        finally:
            self.engine.close()
            self.child.close()

    def _read(self):
        while True:
            data = self.parent.recv(65536)
            if not data:
                return
            self.reports.put(msgpack.unpackb(data, raw=False))

    def state(self, **kw):
        self.parent.send(msgpack.packb({"t": "state", **kw}))

    def keepalive(self):
        self.parent.send(msgpack.packb({"t": "alive"}))

    def expect(self, predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.reports.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if msg.get("t") == "peer" and predicate(msg):
                return msg
        raise AssertionError("expected heartbeat report did not arrive")

    def close(self):
        self.parent.send(msgpack.packb({"t": "stop"}))
        self.thread.join(5)
        self.parent.shutdown(socket.SHUT_RDWR)
        self.reader.join(5)
        self.parent.close()


def test_two_engines_hear_each_other_and_detect_silence():
    pa, pb = free_port("127.0.0.2"), free_port("127.0.0.3")
    a = EngineThread("a", "b", [["hb", "127.0.0.2", "127.0.0.3", pa], ["lan", "127.0.0.4", "127.0.0.5", pb]])
    b = EngineThread("b", "a", [["hb", "127.0.0.3", "127.0.0.2", pa], ["lan", "127.0.0.5", "127.0.0.4", pb]])
    try:
        b.state(role="primary", epoch=7, serving=True)
        msg = a.expect(lambda m: m["alive"] and all(m["links"].values()) and m["peer"]["epoch"] == 7)
        assert msg["peer"]["role"] == "primary" and msg["peer"]["serving"] is True
        b.close()
        t0 = time.monotonic()
        msg = a.expect(lambda m: not m["alive"])
        assert not any(msg["links"].values())
        assert time.monotonic() - t0 < 2.0
    finally:
        a.close()
        if b.thread.is_alive():
            b.close()


def test_spoofed_packets_from_the_peer_address_are_dropped():
    port = free_port("127.0.0.2")
    a = EngineThread("a", "b", [["hb", "127.0.0.2", "127.0.0.3", port]])
    try:
        forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        forger.bind(("127.0.0.3", port))
        boot = secrets.token_bytes(16)
        for seq in range(1, 30):
            forger.sendto(
                wire.encode(b"wrong-secret-wrong-secret", fields(node="b", boot=boot, seq=seq)),
                ("127.0.0.2", port),
            )
            time.sleep(0.005)
        forger.close()
        report = a.expect(lambda m: m["stats"]["hb"][2] > 0)
        assert report["alive"] is False and report["stats"]["hb"][1] == 0
        # and how recently a packet from the peer's address failed authentication, for status
        assert 0 <= report["stats"]["hb"][5] < 5
    finally:
        a.close()


def test_engine_exits_when_parent_goes_away():
    port = free_port("127.0.0.2")
    a = EngineThread("a", "b", [["hb", "127.0.0.2", "127.0.0.3", port]])
    a.parent.shutdown(socket.SHUT_RDWR)
    a.thread.join(5)
    assert not a.thread.is_alive()
    a.reader.join(5)
    a.parent.close()


def test_heartbeat_process_hardens_itself_where_permitted():
    from hawrap.heartbeat import harden

    problems = harden(0, False)  # no RT, no mlock requested: only the death signal
    assert problems == []
    if os.geteuid() == 0:
        code = (
            "import json, os; from hawrap.heartbeat import harden; p = harden(10, True); "
            "locked = any(l.startswith('VmLck:') and int(l.split()[1]) > 0 for l in open('/proc/self/status')); "
            "print(json.dumps([os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK, os.sched_getparam(0).sched_priority, p, locked]))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        policy, priority, problems, locked = json.loads(out.stdout)
        assert problems == [] and (policy, priority) == (os.SCHED_FIFO, 10) and locked


def test_heartbeats_stop_while_the_node_process_is_silent_and_resume_with_it():
    """The engine speaks for its node process only while that process shows signs of life
    (any control message: a state update or the watchdog feeder's keepalive)."""
    pa = free_port("127.0.0.2")
    a = EngineThread("a", "b", [["hb", "127.0.0.2", "127.0.0.3", pa]], watchdog=0.4)
    b = EngineThread("b", "a", [["hb", "127.0.0.3", "127.0.0.2", pa]])
    try:
        deadline = time.monotonic() + 10
        while True:  # a's node process alive (keepalives every 0.1 s): b hears a
            a.keepalive()
            try:
                b.expect(lambda m: m["alive"], timeout=0.1)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "b never heard a"
        b.expect(lambda m: not m["alive"], timeout=5)  # a's keepalives stopped: so do its heartbeats
        sent = a.engine.links["hb"].sent
        time.sleep(0.3)  # the fault: nothing from a's node process
        assert a.engine.links["hb"].sent == sent
        a.keepalive()
        b.expect(lambda m: m["alive"], timeout=5)
    finally:
        a.close()
        b.close()
