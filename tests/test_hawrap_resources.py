"""Resources with OCF semantics, run for real (shell commands), idempotent; notifications
through a real command and a real SMTP conversation; the LAN monitor on loopback."""

from __future__ import annotations

import json
import os
import queue
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest

from hawrap.config import NotifyConfig, ServiceConfig, VipConfig
from hawrap.errors import ResourceError
from hawrap.links import LanMonitor, read_carrier
from hawrap.notify import Notifier
from hawrap.resources import OCF_ERR_INSTALLED, ResourceGroup, Service, VirtualIP


def service(tmp_path, start_extra="", timeout=3.0, name="svc"):
    flag, count = tmp_path / f"{name}.running", tmp_path / f"{name}.starts"
    return (
        Service(
            ServiceConfig(
                name=name,
                start=(f"echo x >> {count}; {start_extra} touch {flag}",),
                stop=(f"rm -f {flag}",),
                monitor=(f"test -f {flag} && exit 0 || exit 7",),
                timeout=timeout,
                shell=True,
            )
        ),
        flag,
        count,
    )


def test_service_start_stop_are_idempotent(tmp_path):
    svc, flag, count = service(tmp_path)
    svc.start()
    svc.start()
    assert flag.exists() and count.read_text().count("x") == 1
    svc.stop()
    svc.stop()
    assert not flag.exists() and svc.monitor() == 7


def test_service_start_failure_carries_the_ocf_meaning(tmp_path):
    svc = Service(ServiceConfig("bad", ("sh", "-c", "exit 5"), ("true",), ("sh", "-c", "exit 7"), timeout=2))
    with pytest.raises(ResourceError) as info:
        svc.start()
    assert info.value.ocf_code == OCF_ERR_INSTALLED and "not installed" in str(info.value)


def test_service_that_never_comes_up_times_out(tmp_path):
    svc = Service(ServiceConfig("slow", ("true",), ("true",), ("sh", "-c", "exit 7"), timeout=0.3))
    t0 = time.monotonic()
    with pytest.raises(ResourceError, match="monitor still says 7"):
        svc.start()
    assert time.monotonic() - t0 < 5


def test_missing_command_is_not_installed():
    svc = Service(ServiceConfig("ghost", ("/nonexistent/x",), ("true",), ("/nonexistent/y",), timeout=1))
    assert svc.monitor() == OCF_ERR_INSTALLED


def test_group_starts_in_order_and_stops_in_reverse(tmp_path):
    order = tmp_path / "order"
    svcs = []
    for name in ("one", "two"):
        flag = tmp_path / name
        svcs.append(Service(ServiceConfig(
            name, (f"echo start-{name} >> {order}; touch {flag}",), (f"echo stop-{name} >> {order}; rm -f {flag}",),
            (f"test -f {flag} && exit 0 || exit 7",), timeout=3, shell=True,
        )))  # fmt: skip
    vip = VirtualIP(VipConfig(address="198.51.100.9/24", interface=None, kind="dummy"), "lo", str(tmp_path))
    group = ResourceGroup(vip, svcs)
    group.start()
    assert group.vip_present() and group.failed_services() == []
    assert group.stop() == []
    assert not group.vip_present()
    assert order.read_text().split() == ["start-one", "start-two", "stop-two", "stop-one"]


def test_restart_starts_only_what_failed(tmp_path):
    one, one_flag, one_count = service(tmp_path, name="one")
    two, two_flag, two_count = service(tmp_path, name="two")
    vip = VirtualIP(VipConfig(address="198.51.100.9/24", interface=None, kind="dummy"), "lo", str(tmp_path))
    group = ResourceGroup(vip, [one, two])
    group.start()
    assert group.failed() == []
    two_flag.unlink()  # the service died
    assert group.failed() == ["two"]
    group.restart(group.failed())
    assert group.failed() == []
    assert one_count.read_text().count("x") == 1 and two_count.read_text().count("x") == 2
    vip.stop()  # the address vanished: only it is added again
    assert group.failed() == [vip.name]
    group.restart(group.failed())
    assert (
        group.failed() == []
        and one_count.read_text().count("x") == 1
        and two_count.read_text().count("x") == 2
    )


def test_restart_of_a_service_that_cannot_start_raises(tmp_path):
    svc, flag, _ = service(tmp_path, start_extra="exit 1;")
    group = ResourceGroup(None, [svc])
    with pytest.raises(ResourceError, match="start exited 1"):
        group.restart(group.failed())


def _netns_run(script: str) -> dict:
    """Run ``script`` (Python) in a fresh network namespace whose v0 is wired (veth) to v1 in
    a second one, named in $PEER_NS (the script can open sockets there with ``in_peer_ns``)."""
    ns, peer = f"hwres{os.getpid()}", f"hwresp{os.getpid()}"
    for n in (ns, peer):
        subprocess.run(["ip", "netns", "add", n], check=True)
    try:
        for cmd in (
            ["ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", peer],
            ["ip", "-n", ns, "link", "set", "v0", "up"],
            ["ip", "-n", peer, "link", "set", "v1", "up"],
        ):
            subprocess.run(cmd, check=True)
        env = dict(os.environ, PEER_NS=peer)
        r = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.splitlines()[-1])
    finally:
        for n in (ns, peer):
            subprocess.run(["ip", "netns", "del", n])


VIP_SCRIPT = """
import ctypes, json, os, socket, subprocess, threading, time
from hawrap.config import VipConfig
from hawrap.resources import VirtualIP
def in_peer_ns(make):
    # setns changes the calling thread's namespace only: a socket made there stays in it
    got = []
    def run():
        fd = os.open("/run/netns/" + os.environ["PEER_NS"], os.O_RDONLY)
        assert ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) == 0
        got.append(make())
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return got[0]
sniff = in_peer_ns(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)))
sniff.bind(("v1", 0x0806))
sniff.setblocking(False)
def garps():
    n = 0
    while True:
        try:
            d = sniff.recv(128)
        except BlockingIOError:
            return n
        if d[28:32] == socket.inet_aton("198.51.100.9") and d[38:42] == d[28:32]:
            n += 1
def here():
    return "198.51.100.9/24" in subprocess.run(["ip", "-o", "addr", "show", "dev", "v0"], capture_output=True, text=True).stdout
vip = VirtualIP(VipConfig(address="198.51.100.9/24", interface="v0", garp_count=6, garp_interval=0.2), "v0", "/tmp")
out = {}
vip.start()
vip.start()  # already here: "Address already assigned" on this kernel, and still a success
out["after_two_starts"] = here()
subprocess.run(["ip", "addr", "del", "198.51.100.9/24", "dev", "v0"], check=True)  # gone without stop()
before = garps()
vip._garp_thread.join(5)
out["garps_after_removal"] = garps()
out["announced_when_gone"] = vip.announce()
out["garps_after_announce"] = garps()
vip.stop()
vip.stop()
out["after_stops"] = here()
# an address gone while the node did not look (expired, or frozen past its lifetime) is
# never brought back by a renewal: "ip addr change" would add it
lived = VirtualIP(VipConfig(address="198.51.100.9/24", interface="v0", lifetime=30), "v0", "/tmp")
lived.start()
seen = time.monotonic()
subprocess.run(["ip", "addr", "del", "198.51.100.9/24", "dev", "v0"], check=True)
lived.refresh(seen)
out["renewed_when_gone"] = here()
lived.start()
lived.refresh(time.monotonic() - 5)  # knowledge too old: not renewed either (and nothing breaks)
lived.refresh(time.monotonic())
out["renewed_when_here"] = here()
lived.stop()
out["garps_before_removal"] = before
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_vip_start_stop_judged_by_the_interface_and_announcements_end_with_the_holding():
    out = _netns_run(VIP_SCRIPT)
    assert out["after_two_starts"] is True and out["after_stops"] is False
    assert out["garps_before_removal"] >= 1  # the announcement of the holding went out
    assert out["garps_after_removal"] == 0  # its repeats stopped with it
    assert out["announced_when_gone"] is False and out["garps_after_announce"] == 0
    assert out["renewed_when_gone"] is False and out["renewed_when_here"] is True


def test_carrier():
    assert read_carrier("lo") in (True, False)  # lo reports its carrier (1 when up)
    assert read_carrier("no-such-if0") is None


def test_lan_monitor_without_ping_nodes_follows_carrier():
    got: queue.Queue = queue.Queue()
    mon = LanMonitor("lo", (), got.put, carrier_interval=0.01)
    mon.start()
    try:
        health = got.get(timeout=5)
        assert health.ok is True
    finally:
        mon.stop()
    mon = LanMonitor("no-such-if0", (), got.put, carrier_interval=0.01)
    mon.start()
    try:
        health = got.get(timeout=5)
        assert health.ok is False and "does not exist" in health.problem
    finally:
        mon.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP socket needs root")
def test_lan_monitor_pings_a_reachable_node():
    got: queue.Queue = queue.Queue()
    mon = LanMonitor(
        "lo", ("127.0.0.1",), got.put, carrier_interval=0.01, ping_interval=0.05, ping_timeout=0.2
    )
    mon.start()
    try:
        health = got.get(timeout=5)
        while health.ok is None:
            health = got.get(timeout=5)
        assert health.ok is True and health.reachable == ("127.0.0.1",)
    finally:
        mon.stop()


def test_notify_command_gets_keepalived_style_arguments(tmp_path):
    out = tmp_path / "calls"
    script = tmp_path / "notify.sh"
    script.write_text(f'#!/bin/sh\necho "$1|$2|$3|$4|$HAWRAP_EVENT|$HAWRAP_MESSAGE|$HAWRAP_ID" >> {out}\n')
    script.chmod(0o755)
    n = Notifier(NotifyConfig(command=(str(script),)), "web", "alpha", "beta")
    sent = n.notify("takeover", "peer died", "primary", 7)
    n.notify("standby", "LAN down", "standby", 7)
    n.close()
    lines = out.read_text().splitlines()
    assert lines[0] == f"INSTANCE|web/alpha|MASTER|7|takeover|peer died|{sent.id}"
    assert lines[1].startswith("INSTANCE|web/alpha|FAULT|7|standby|LAN down|")


class _SMTPHandler(socketserver.StreamRequestHandler):
    def handle(self):
        def say(line):
            self.wfile.write(line.encode() + b"\r\n")

        say("220 test ESMTP")
        data_mode, body = False, []
        for raw in self.rfile:
            line = raw.decode().rstrip("\r\n")
            if data_mode:
                if line == ".":
                    data_mode = False
                    self.server.messages.put("\n".join(body))
                    say("250 queued")
                else:
                    body.append(line)
                continue
            verb = line.split(" ")[0].upper()
            if verb in ("EHLO", "HELO"):
                say("250 test")
            elif verb == "DATA":
                data_mode = True
                say("354 go on")
            elif verb == "QUIT":
                say("221 bye")
                return
            else:
                say("250 ok")


def test_notify_mail_through_smtp(tmp_path):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SMTPHandler)
    server.messages = queue.Queue()
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        port = server.server_address[1]
        n = Notifier(
            NotifyConfig(smtp_host="127.0.0.1", smtp_port=port, mail_to=("admin@example.org",)),
            "web",
            "alpha",
            "beta",
        )
        n.notify("takeover", "peer silent on every link", "primary", 3)
        n.close()
        body = server.messages.get(timeout=10)
        assert "Subject: [hawrap web] alpha: takeover (primary, epoch 3)" in body
        assert "peer silent on every link" in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_slow_notification_does_not_block_the_caller(tmp_path):
    # an SMTP host that accepts the connection but never speaks
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(1)
    try:
        n = Notifier(
            NotifyConfig(
                smtp_host="127.0.0.1", smtp_port=sink.getsockname()[1], mail_to=("a@b",), timeout=1.0
            ),
            "c",
            "a",
            "b",
        )
        t0 = time.monotonic()
        n.notify("x", "y", "primary", 1)
        assert time.monotonic() - t0 < 0.5
        n.close()
    finally:
        sink.close()
