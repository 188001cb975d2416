"""Real receivers for tests: `mirror serve` on loopback as a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager

SECRET = b"test-shared-secret-0123456789"
# What a module must grant to mirror every kind of entry, set-id bits and owners (mirror.privileges).
TRUSTING = ("--allow-devices", "--allow-specials", "--allow-setid", "--keep-owners")


@contextmanager
def mirror_server(tmp_path, modules: dict[str, str], *extra: str, secret: bytes = SECRET,
                  prefix: list[str] | None = None, host: str = "127.0.0.1", settings: dict[str, dict] | None = None,
                  port: int = 0):  # fmt: skip
    """``prefix`` runs the server under another command (``ip netns exec NS`` puts it in a
    network namespace, where it listens on ``host``); ``settings``: a module's keys of a
    configuration file (``state_dir``: there is no option for it), which is then used;
    ``port``: the one a server that went away listened on (0: any free one)."""
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(secret + b"\n")
    secret_file.chmod(0o600)  # a secret readable by others is refused
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    argv = [*(prefix or []), sys.executable, "-m", "mirror", "serve", "--port-file", str(port_file), *extra]
    if settings:
        config = [f"listen = {json.dumps(f'{host}:{port}')}", f"secret_file = {json.dumps(str(secret_file))}"]
        for name, path in modules.items():
            config += [f"[modules.{name}]", f"path = {json.dumps(str(path))}"]
            config += [f"{key} = {json.dumps(value)}" for key, value in settings.get(name, {}).items()]
        (tmp_path / "serve.toml").write_text("\n".join(config) + "\n")
        argv += ["--config", str(tmp_path / "serve.toml")]
    else:
        argv += ["--listen", f"{host}:{port}", "--secret-file", str(secret_file)]
        for name, path in modules.items():
            argv += ["--module", f"{name}={path}"]
    log = open(tmp_path / "server.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mirror serve did not start: {(tmp_path / 'server.log').read_text()}")
            time.sleep(0.02)
        port = int(port_file.read_text())
        yield Server(port, str(secret_file), proc, host)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Server:
    def __init__(self, port: int, secret_file: str, proc, host: str = "127.0.0.1"):
        self.host = host
        self.port = port
        self.secret_file = secret_file
        self.proc = proc

    def url(self, module: str) -> str:
        return f"mirror://{self.host}:{self.port}/{module}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def fake_rsh(tmp_path) -> str:
    """A stand-in for `ssh -T HOST`: drops the host, and like ssh hands the rest, joined by
    spaces, to a shell (so quoting matters exactly as it does over ssh)."""
    script = tmp_path / "fake-rsh"
    script.write_text(f'#!/bin/sh\nshift\ncd {os.getcwd()} || exit 1\nexec sh -c "$*"\n')
    script.chmod(0o755)
    return str(script)


REMOTE_MIRROR = f"{sys.executable} -m mirror"  # the remote command for fake_rsh
