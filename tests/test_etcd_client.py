"""hawrap.etcdclient and the lease watchdog against a real single-member etcd on loopback:
endpoint failover, user/password authentication (token expiry included), TLS with client
certificates, and an etcd that goes silent (SIGSTOP) under a leader.  Skipped, naming what
is missing, without the etcd binary or the etcd3gw extra."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from hawrap.etcdclient import (
    EtcdClient,
    EtcdConnection,
    EtcdError,
    EtcdUnavailable,
    delete_op,
    put_op,
    range_op,
)
from hawrap.leadership import Leadership, Listener, Position, Timing, describe

try:
    import etcd3gw  # noqa: F401

    MISSING = None
except ImportError:
    MISSING = "etcd3gw is not installed (pip install 'hamirror[etcd]')"
if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
    MISSING = "etcd is not installed (Debian: etcd-server, etcd-client)"
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One etcd member on 127.0.0.1, data under ``workdir``."""

    def __init__(self, workdir, *extra: str, scheme: str = "http"):
        self.port, peer = free_port(), free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log = open(os.path.join(workdir, "etcd.log"), "ab")
        argv = [
            "etcd", "--name", "solo", "--data-dir", os.path.join(workdir, "etcd-data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"solo=http://127.0.0.1:{peer}", "--logger", "zap", "--log-level", "warn", *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

    def ctl(self, *args: str, check: bool = True, tls: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        env = dict(os.environ, ETCDCTL_API="3")
        r = subprocess.run(
            ["etcdctl", "--endpoints", self.url, *tls, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=20,
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {r.stderr}")
        return r

    def wait_ready(self, tls: tuple[str, ...] = ()) -> None:
        deadline = time.monotonic() + 20
        while self.ctl("endpoint", "health", check=False, tls=tls).returncode != 0:
            assert self.proc.poll() is None, "etcd exited"
            assert time.monotonic() < deadline, "etcd did not come up"
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def etcd(tmp_path):
    server = Etcd(str(tmp_path))
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def test_requests_move_to_the_next_endpoint_and_respect_the_deadline(etcd):
    dead = f"http://127.0.0.1:{free_port()}"
    client = EtcdClient(EtcdConnection((dead, etcd.url), request_timeout=0.5))
    try:
        client.txn([], [put_op("/t/k", b"v")])
        assert client.read(range_op("/t/k")).ranges()[0][0].value == b"v"
        assert client.endpoint == etcd.url
        statuses = client.endpoint_status()
        assert [s["ok"] for s in statuses] == [False, True]
    finally:
        client.close()
    nowhere = EtcdClient(EtcdConnection((dead, f"http://127.0.0.1:{free_port()}"), request_timeout=5))
    try:
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
            nowhere.read(range_op("/t/k"), deadline=time.monotonic() + 0.3)
        assert time.monotonic() - started < 2
    finally:
        nowhere.close()


def test_user_and_password_with_token_expiry(tmp_path):
    server = Etcd(str(tmp_path), "--auth-token-ttl", "1")
    try:
        server.wait_ready()
        server.ctl("user", "add", "root:s3cret")
        server.ctl("auth", "enable")
        pw = tmp_path / "pw"
        pw.write_text("s3cret\n")
        client = EtcdClient(
            EtcdConnection((server.url,), user="root", password_file=str(pw), request_timeout=2)
        )
        try:
            client.txn([], [put_op("/t/auth", b"1")])
            time.sleep(2.5)  # the simple token expires after a second unused: fetched again
            assert client.read(range_op("/t/auth")).ranges()[0][0].value == b"1"
        finally:
            client.close()
        pw.write_text("wrong\n")
        bad = EtcdClient(EtcdConnection((server.url,), user="root", password_file=str(pw), request_timeout=2))
        try:
            with pytest.raises(EtcdError, match="authentication as 'root' failed"):
                bad.read(range_op("/t/auth"))
        finally:
            bad.close()
        anonymous = EtcdClient(EtcdConnection((server.url,), request_timeout=2))
        try:
            with pytest.raises(EtcdError):
                anonymous.read(range_op("/t/auth"))
        finally:
            anonymous.close()
    finally:
        server.close()


def make_pki(d) -> dict[str, str]:
    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    # etcd's JSON gateway reaches its own gRPC server with the server certificate: with
    # --client-cert-auth that certificate must be good for client authentication too
    server_ext = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"
    for name, ext in (("server", server_ext), ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        ssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    return {k: str(d / k) for k in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_with_a_client_certificate(tmp_path):
    pki = make_pki(tmp_path)
    server = Etcd(str(tmp_path), "--cert-file", pki["server.crt"], "--key-file", pki["server.key"],
                  "--client-cert-auth", "--trusted-ca-file", pki["ca.crt"], scheme="https")  # fmt: skip
    try:
        server.wait_ready(
            tls=("--cacert", pki["ca.crt"], "--cert", pki["client.crt"], "--key", pki["client.key"])
        )
        conn = EtcdConnection(
            (server.url,),
            ca_file=pki["ca.crt"],
            cert_file=pki["client.crt"],
            key_file=pki["client.key"],
            request_timeout=2,
        )
        conn.check()
        client = EtcdClient(conn)
        try:
            client.txn([], [put_op("/t/tls", b"1")])
            assert client.read(range_op("/t/tls")).ranges()[0][0].value == b"1"
        finally:
            client.close()
        no_cert = EtcdClient(EtcdConnection((server.url,), ca_file=pki["ca.crt"], request_timeout=2))
        try:
            with pytest.raises(EtcdError):
                no_cert.read(range_op("/t/tls"))
        finally:
            no_cert.close()
    finally:
        server.close()


class Recorder(Listener):
    def __init__(self):
        self.events: list[tuple[float, str, object]] = []
        self.changed = threading.Condition()

    def _add(self, what, arg):
        with self.changed:
            self.events.append((time.monotonic(), what, arg))
            self.changed.notify_all()

    def elected(self, epoch):
        self._add("elected", epoch)

    def stop_serving(self, reason):
        self._add("stop_serving", reason)

    def demoted(self, reason):
        self._add("demoted", reason)

    def wait(self, what: str, count: int, timeout: float = 15.0) -> list:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: len([e for e in self.events if e[1] == what]) >= count, timeout
            )
        assert ok, f"no {count}x {what}: {self.events}"
        return [e for e in self.events if e[1] == what]


def test_a_silent_etcd_stops_the_leader_within_ttl_minus_the_stop_budget(etcd):
    """SIGSTOP etcd under a leader: the watchdog fires by the last renewal + TTL - budget;
    once etcd answers again, the abandoned lease is revoked and a new term starts higher."""
    listener = Recorder()
    conn = EtcdConnection((etcd.url,), request_timeout=0.3)
    timing = Timing(ttl=2, stop_budget=0.5)
    member = Leadership(conn, "/hamirror/solo", "a", timing, listener, expected=("a",))
    member.start()
    try:
        first = listener.wait("elected", 1)[0]
        time.sleep(0.5)  # some renewals
        etcd.proc.send_signal(signal.SIGSTOP)
        silenced = time.monotonic()
        stop = listener.wait("stop_serving", 1)[0]
        # the last renewal came at most a keepalive interval before the silence
        assert stop[0] - silenced <= timing.ttl - timing.stop_budget + 0.15, stop[0] - silenced
        assert stop[0] - silenced >= timing.ttl - timing.stop_budget - timing.keepalive - 0.05, (
            stop[0] - silenced
        )
        assert "no etcd quorum" in stop[2]
        etcd.proc.send_signal(signal.SIGCONT)
        second = listener.wait("elected", 2, timeout=20)[1]
        assert second[2] > first[2], "a new term after the lease was given up has a higher epoch"
    finally:
        etcd.proc.send_signal(signal.SIGCONT)
        member.stop()


def test_a_failing_position_callback_does_not_end_the_election_loop(etcd):
    """position() raising (a corrupt epoch file, say) costs rounds, not the member."""
    listener = Recorder()
    failures = iter(range(5))

    def position():
        if next(failures, None) is not None:
            raise ValueError("corrupt epoch file")
        return Position(3, 1)

    member = Leadership(
        EtcdConnection((etcd.url,), request_timeout=0.3), "/hamirror/solo", "a", Timing(ttl=2, stop_budget=0.5),
        listener, position=position, expected=("a",),
    )  # fmt: skip
    member.start()
    try:
        epoch = listener.wait("elected", 1)[0][2]
        assert epoch > 3, "the epoch is above the one the member published"
    finally:
        member.stop()


def test_status_lists_members_and_an_orderly_stop_frees_the_key_at_once(etcd):
    conn = EtcdConnection((etcd.url,), request_timeout=0.3)
    timing = Timing(ttl=2, stop_budget=0.5)
    a, b = Recorder(), Recorder()
    first = Leadership(
        conn, "/hamirror/duo", "a", timing, a, position=lambda: Position(2, 9), expected=("a", "b")
    )
    second = Leadership(
        conn, "/hamirror/duo", "b", timing, b, position=lambda: Position(2, 4), expected=("a", "b")
    )
    first.start()
    second.start()
    try:
        a.wait("elected", 1)
        view = describe(conn, "/hamirror/duo")
        assert view["ok"] and view["leader"] == "a" and view["epoch"] > 2
        rows = {m["name"]: m for m in view["members"]}
        assert rows["a"]["role"] == "leader" and rows["b"]["role"] == "replica"
        assert rows["b"]["lag"] == 5 and rows["b"]["eligible"]
        assert [e["ok"] for e in view["etcd"]] == [True]
        first.stop()  # revokes: the leader key and the record go now, not at expiry
        client = EtcdClient(conn)
        try:
            leader, mine = client.read(
                range_op("/hamirror/duo/leader"), range_op("/hamirror/duo/members/a")
            ).ranges()
        finally:
            client.close()
        assert mine == [] and (leader == [] or b'"b"' in leader[0].value)
        b.wait("elected", 1)
        assert [e[1] for e in a.events] == ["elected", "demoted"]
    finally:
        first.stop()
        second.stop()


def test_keys_written_by_a_hostile_client_block_campaigns_and_are_named(etcd, caplog):
    """A leader key or an epoch floor that is not ours: nobody campaigns (no safe epoch can be
    computed, and the key is taken), the problem names the key; once repaired, a normal win."""
    conn = EtcdConnection((etcd.url,), request_timeout=0.3)
    client = EtcdClient(conn)
    client.txn([], [put_op("/hamirror/h/leader", b"\x00garbage"), put_op("/hamirror/h/members/zz", b"[1,2]")])
    listener = Recorder()
    member = Leadership(conn, "/hamirror/h", "a", Timing(ttl=2, stop_budget=0.5), listener, expected=("a",))
    caplog.set_level("ERROR", logger="hawrap.leadership")
    member.start()
    try:
        for repaired, broken in (
            ("/hamirror/h/leader", "/hamirror/h/epoch-floor"),
            ("/hamirror/h/epoch-floor", None),
        ):
            time.sleep(2 * member.timing.ttl)  # a window for a wrong campaign (nothing to await)
            assert not [e for e in listener.events if e[1] == "elected"]
            client.txn([], [delete_op(repaired)] + ([put_op(broken, b"-5")] if broken else []))
        assert "etcd key /hamirror/h/leader: not JSON" in caplog.text
        assert "etcd key /hamirror/h/members/zz: not a JSON object" in caplog.text
        assert "etcd key /hamirror/h/epoch-floor: not a decimal number" in caplog.text
        listener.wait("elected", 1)
    finally:
        member.stop()
        client.close()
