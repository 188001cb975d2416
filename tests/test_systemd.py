"""Running under systemd: the units, readiness (Type=notify) and `mirror serve`'s reload.

Readiness is tested with a real notification socket: the test binds the unix datagram
socket systemd would, passes it in ``$NOTIFY_SOCKET`` to the real command, and checks what
is true at the moment READY=1 arrives (the port accepts a sync, the first sync is done, the
VIP is up), and that it never arrives when the service cannot work.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from hawrap.demo import write_demo_config
from tests.daemons import converged
from tests.helpers import MIRROR, REPO, PollingThread, run_mirror, wait_until
from tests.servers import SECRET
from tests.snapshot import snapshot

UNITS = os.path.join(REPO, "packaging", "systemd")


# -- the unit files ------------------------------------------------------------------------


def _unit_files() -> list[str]:
    return sorted(os.path.join(UNITS, n) for n in os.listdir(UNITS) if n.endswith(".service"))


def _service_install_dir() -> str:
    """Where README's service install command creates hamirror's virtualenv."""
    with open(os.path.join(REPO, "README.md")) as f:
        lines = f.read().splitlines()
    start = lines.index("<!-- readme-command: service -->")
    block = "\n".join(lines[start + 2 : lines.index("```", start + 2)])
    found = re.search(r"python3 -m venv (\S+) && \1/bin/pip install \.", block)
    assert found, f"README's service block does not create a virtualenv: {block}"
    return found.group(1)


def _exec_lines(text: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in text.splitlines()
        if re.match(r"Exec(Start|StartPre|StopPost)=", line)
    ]


def test_units_start_what_readme_installs():
    venv = _service_install_dir()
    assert venv == "/opt/hamirror"
    names = [os.path.basename(p) for p in _unit_files()]
    assert names == ["hawrap@.service", "mirror-daemon.service", "mirror-serve.service"]
    for path in _unit_files():
        with open(path) as f:
            text = f.read()
        commands = _exec_lines(text)
        assert commands, path
        for command in commands:
            assert command.startswith(f"{venv}/bin/mirror ") or command.startswith(f"{venv}/bin/hawrap "), (
                path,
                command,
            )
        assert "Type=notify\n" in text, path
        assert "Documentation=file:///opt/hamirror/share/doc/hamirror/" in text, path
    with open(os.path.join(UNITS, "hawrap@.service")) as f:
        hawrap = f.read()
    # The node process (the supervisor's child) sends READY=1; hawrap starts `mirror` by name.
    assert "NotifyAccess=all\n" in hawrap and f"Environment=PATH={venv}/bin:" in hawrap
    settings = [line for line in hawrap.splitlines() if not line.startswith("#")]
    # Its heartbeat needs real-time priority, locked memory and root's network capabilities.
    assert not any(line.startswith(("RestrictRealtime=", "CapabilityBoundingSet=")) for line in settings)
    assert "LimitRTPRIO=99" in settings and "LimitMEMLOCK=infinity" in settings


def _verify(unit_dir: str, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", os.path.join(unit_dir, name)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian: systemd)"
)
def test_units_pass_systemd_analyze_verify(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    for tool in ("mirror", "hawrap"):
        assert os.access(os.path.join(bin_dir, tool), os.X_OK), (
            f"{tool} is not installed beside {sys.executable}"
        )
    installed, as_shipped = tmp_path / "installed", tmp_path / "shipped"
    installed.mkdir()
    as_shipped.mkdir()
    for path in _unit_files():
        name = os.path.basename(path)
        with open(path) as f:
            text = f.read()
        (as_shipped / name).write_text(text)
        # As if README's service install had run with the virtualenv this test runs from.
        (installed / name).write_text(text.replace("/opt/hamirror/bin/", bin_dir + "/"))
    for path in _unit_files():
        name = os.path.basename(path)
        r = _verify(str(installed), name)
        assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), (name, r.stdout, r.stderr)
        if not os.path.exists("/opt/hamirror/bin/mirror"):
            # The shipped units point at the documented install, and verify does check it.
            r = _verify(str(as_shipped), name)
            assert r.returncode != 0 and "/opt/hamirror/bin/" in r.stderr, (name, r.stderr)


# -- a notification socket -----------------------------------------------------------------


class NotifySocket:
    """The datagram socket systemd listens on; ``expect`` waits for a message with a field."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append(fields)
        return fields

    def expect(self, key: str, value: str | None = None, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            fields = self.receive(left)
            if fields is not None and key in fields and (value is None or fields[key] == value):
                return fields
        raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {self.messages}")


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(str(tmp_path / "notify"))
    yield sock
    sock.close()


def _env(notify: NotifySocket) -> dict[str, str]:
    return {**os.environ, "NOTIFY_SOCKET": notify.address}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- mirror serve ---------------------------------------------------------------------------


def _secret(tmp_path) -> str:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return str(path)


def test_serve_is_ready_only_once_it_accepts_a_sync(tmp_path, notify_socket):
    replica, src = tmp_path / "replica", tmp_path / "src"
    replica.mkdir()
    src.mkdir()
    (src / "f").write_bytes(b"x" * 1000)
    port_file = tmp_path / "port"
    secret = _secret(tmp_path)
    proc = subprocess.Popen([*MIRROR, "serve", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                             "--module", f"m={replica}", "--secret-file", secret],
                            env=_env(notify_socket), stderr=subprocess.PIPE)  # fmt: skip
    try:
        ready = notify_socket.expect("READY", "1")
        # At this moment, and not later: the port is known and takes a connection.
        port = int(port_file.read_text())
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert ready["STATUS"] == f"serving m on port {port}"
        assert notify_socket.messages == [ready], "nothing may come before READY=1"
        sync = run_mirror("sync", str(src), f"mirror://127.0.0.1:{port}/m", "--secret-file", secret)
        assert sync.returncode == 0, sync
        assert (replica / "f").read_bytes() == b"x" * 1000
        proc.send_signal(signal.SIGTERM)
        notify_socket.expect("STOPPING", "1")
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc)
        proc.stderr.close()


def test_serve_that_cannot_serve_never_says_ready(tmp_path, notify_socket):
    secret = _secret(tmp_path)
    # A module that is not a directory: a usage error before anything listens.
    proc = subprocess.run([*MIRROR, "serve", "--listen", "127.0.0.1:0", "--module", f"m={tmp_path / 'missing'}",
                           "--secret-file", secret], env=_env(notify_socket), capture_output=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and b"missing" in proc.stderr
    # The port already taken by someone else.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*MIRROR, "serve", "--listen", f"127.0.0.1:{port}", "--module", f"m={tmp_path}",
                               "--secret-file", secret], env=_env(notify_socket), capture_output=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0
    assert notify_socket.receive(0.5) is None and notify_socket.messages == []


def _serve_config(path, modules: dict[str, str], secret: str) -> None:
    text = f'listen = "127.0.0.1:0"\nsecret_file = "{secret}"\n'
    for name, tree in modules.items():
        text += f'\n[modules.{name}]\npath = "{tree}"\n'
    path.write_text(text)


def _trees(tmp_path, *names):
    trees = {}
    for name in names:
        trees[name] = tmp_path / name
        trees[name].mkdir()
    return trees


def test_serve_reloads_its_modules_on_sighup(tmp_path, notify_socket):
    t = _trees(tmp_path, "A", "A2", "B", "C", "big", "small")
    secret = _secret(tmp_path)
    (t["big"] / "big.bin").write_bytes(os.urandom(3 << 20))
    (t["small"] / "note").write_bytes(b"after the reload\n")
    config, port_file, log = tmp_path / "serve.toml", tmp_path / "port", tmp_path / "serve.log"
    _serve_config(config, {"a": t["A"], "b": t["B"]}, secret)
    with open(log, "wb") as out:
        proc = subprocess.Popen([*MIRROR, "serve", "--config", str(config), "--port-file", str(port_file)],
                                env=_env(notify_socket), stdout=out, stderr=out)  # fmt: skip
    try:
        notify_socket.expect("READY", "1")
        url = f"mirror://127.0.0.1:{int(port_file.read_text())}/"

        def sync(src, module):
            return subprocess.run([*MIRROR, "sync", str(src), url + module, "--secret-file", secret],
                                  capture_output=True, timeout=120, cwd=REPO)  # fmt: skip

        # A session in flight when the configuration changes (3 MiB at 1 MiB/s).
        slow = subprocess.Popen([*MIRROR, "sync", str(t["big"]), url + "a", "--secret-file", secret, "--bwlimit", "1M"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)  # fmt: skip
        try:
            wait_until(
                lambda: any((t["A"] / ".mirror").rglob("*")) if (t["A"] / ".mirror").exists() else False, 30
            )
            # a moves to A2, b goes, c comes.
            _serve_config(config, {"a": t["A2"], "c": t["C"]}, secret)
            proc.send_signal(signal.SIGHUP)
            notify_socket.expect("RELOADING", "1")
            ready = notify_socket.expect("READY", "1")
            assert ready["STATUS"].startswith("serving a, c on port ")
            assert slow.poll() is None, "the slow sync should still be in flight at the reload"
            out, err = slow.communicate(timeout=120)
        finally:
            _stop(slow)
        # The session in flight finished on the configuration it started with.
        assert slow.returncode == 0, err
        assert (t["A"] / "big.bin").read_bytes() == (t["big"] / "big.bin").read_bytes()
        assert not (t["A2"] / "big.bin").exists()
        # New sessions follow the new configuration.
        assert sync(t["small"], "a").returncode == 0
        assert (t["A2"] / "note").exists() and not (t["A"] / "note").exists()
        refused = sync(t["small"], "b")
        assert refused.returncode == 2 and b"unknown module 'b'" in refused.stderr, refused
        assert not (t["B"] / "note").exists()
        assert sync(t["small"], "c").returncode == 0 and (t["C"] / "note").exists()

        # A configuration that does not load leaves the running one in place.
        config.write_text("listen = [not toml\n")
        proc.send_signal(signal.SIGHUP)
        notify_socket.expect("RELOADING", "1")
        notify_socket.expect("READY", "1")
        (t["small"] / "note2").write_bytes(b"still serving\n")
        assert sync(t["small"], "c").returncode == 0 and (t["C"] / "note2").exists()
        assert proc.poll() is None
    finally:
        _stop(proc)
    text = log.read_text()
    assert "added: c; changed: a; removed: b" in text, text
    assert "reload failed, still serving the previous configuration" in text and "invalid TOML" in text, text


def test_live_daemon_on_a_reconfigured_module_reconnects_under_the_new_settings(tmp_path, notify_socket):
    t = _trees(tmp_path, "src", "A", "A2")
    secret = _secret(tmp_path)
    for i in range(20):
        (t["src"] / f"f{i}").write_bytes(os.urandom(2000))
    config, port_file = tmp_path / "serve.toml", tmp_path / "port"
    _serve_config(config, {"a": t["A"]}, secret)
    server = subprocess.Popen([*MIRROR, "serve", "--config", str(config), "--port-file", str(port_file)],
                              env=_env(notify_socket), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    daemon = None
    leaked: list[str] = []
    try:
        notify_socket.expect("READY", "1")
        url = f"mirror://127.0.0.1:{int(port_file.read_text())}/a"
        daemon = subprocess.Popen([*MIRROR, "daemon", str(t["src"]), url, "--secret-file", secret],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        converged(t["src"], t["A"])
        _serve_config(config, {"a": t["A2"]}, secret)
        server.send_signal(signal.SIGHUP)
        notify_socket.expect("RELOADING", "1")
        notify_socket.expect("READY", "1")

        def watch_old_tree():  # the old tree must never see a change made after the reload
            if (t["A"] / "after").exists():
                leaked.append("after")

        with PollingThread(watch_old_tree, interval=0.01, name="old-tree-watch"):
            (t["src"] / "after").write_bytes(b"made after the reload\n")
            converged(t["src"], t["A2"])
        assert not leaked and not (t["A"] / "after").exists()
    finally:
        if daemon is not None:
            _stop(daemon)
        _stop(server)


# -- mirror daemon --------------------------------------------------------------------------


def test_daemon_is_ready_once_its_first_sync_is_done(tmp_path):
    notify = NotifySocket(f"@hamirror-test-{os.getpid()}-{time.monotonic_ns()}")  # abstract address
    src, dst = tmp_path / "src", tmp_path / "dst"
    for i in range(3000):  # enough for the first sync to take a while
        d = src / f"d{i % 30}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(4000))
    proc = subprocess.Popen([*MIRROR, "daemon", str(src), str(dst)], env=_env(notify),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        ready = notify.expect("READY", "1", timeout=60)
        # When systemd hears READY=1, the replica is complete (checked at once, not waited for).
        assert snapshot(dst) == snapshot(src)
        assert ready["STATUS"] == "src: live"
        proc.send_signal(signal.SIGTERM)
        notify.expect("STOPPING", "1")
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc)
        notify.close()


def test_daemon_that_cannot_reach_its_replica_is_not_ready(tmp_path, notify_socket):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    proc = subprocess.Popen([*MIRROR, "daemon", str(src), f"mirror://127.0.0.1:{port}/m", "--secret-file",
                             _secret(tmp_path)], env=_env(notify_socket), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        status = notify_socket.expect("STATUS", timeout=30)
        while "unreachable" not in status["STATUS"]:
            status = notify_socket.expect("STATUS", timeout=30)
        while notify_socket.receive(1.0) is not None:  # whatever else it reports meanwhile
            pass
        assert proc.poll() is None, "a daemon whose replica is unreachable keeps retrying"
        assert not any("READY" in m for m in notify_socket.messages), notify_socket.messages
    finally:
        _stop(proc)


# -- hawrap ---------------------------------------------------------------------------------


def test_hawrap_node_is_ready_once_it_has_taken_its_role(tmp_path, notify_socket):
    env_dump = tmp_path / "notify-env"
    script = tmp_path / "notify.sh"
    # The notify command is started by the node: it must not inherit the notification socket.
    script.write_text(f'#!/bin/sh\necho "NOTIFY_SOCKET=${{NOTIFY_SOCKET:-unset}}" >> {env_dump}\n')
    script.chmod(0o755)
    config = write_demo_config(str(tmp_path), extra=f'\n[notify]\ncommand = ["{script}"]\n')
    with open(tmp_path / "alpha.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hawrap", "run", "--config", config, "--node", "alpha", "-v"],
                                env=_env(notify_socket), stdout=log, stderr=log, start_new_session=True)  # fmt: skip
    try:
        first = notify_socket.expect("STATUS")
        assert first["STATUS"].startswith("init:") and "READY" not in first
        ready = notify_socket.expect("READY", "1")
        # Alone, alpha takes over after initdead: at READY=1 its VIP and service are up.
        assert ready["STATUS"].startswith("primary:"), ready
        assert (tmp_path / "alpha" / "dummy-vip").exists() and (
            tmp_path / "alpha" / "service.running"
        ).exists()
        wait_until(lambda: env_dump.exists() and env_dump.read_text(), 10)
        assert env_dump.read_text().splitlines()[0] == "NOTIFY_SOCKET=unset"
        os.killpg(proc.pid, signal.SIGTERM)
        notify_socket.expect("STOPPING", "1")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
