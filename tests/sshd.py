"""A real OpenSSH server for the remote-shell tests, in a network namespace the test made.

``ssh_server(workdir, prefix, host)`` runs ``sshd`` (its own host key, root by public key
only, nothing from the machine's configuration) under ``prefix`` (``ip netns exec NS``) and
yields an ``SshServer`` whose ``bin`` is a directory holding an ``ssh`` that reaches it:
first on a client's PATH, it is what ``mirror`` runs for ``HOST:PATH`` (``ssh -T``).  On the
server, sessions find this Python's ``mirror`` first on their PATH.  Nothing is changed
outside ``workdir`` but sshd's privilege-separation directory, ``/run/sshd``, which it needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

SSHD = "/usr/sbin/sshd"
PORT = 2222


def sshd_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (sshd, network namespaces)"
    for tool in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen")):
        if not tool or not os.path.exists(tool):
            return "needs OpenSSH (packages openssh-server and openssh-client)"
    return None


@dataclass
class SshServer:
    host: str  # what goes before the ':' of a destination
    bin: str  # a directory whose ``ssh`` reaches the server
    log: str

    def env(self) -> dict:
        """An environment whose ``ssh`` is the one that reaches this server."""
        return {**os.environ, "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


@contextmanager
def ssh_server(workdir: str, prefix: list[str], host: str):
    here = os.path.join(workdir, "sshd")
    os.makedirs(here)
    host_key, client_key = os.path.join(here, "host_key"), os.path.join(here, "client_key")
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    authorized = os.path.join(here, "authorized_keys")
    shutil.copy(client_key + ".pub", authorized)
    config = os.path.join(here, "sshd_config")
    session_path = f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin"
    with open(config, "w") as f:
        f.write(f"""\
ListenAddress {host}:{PORT}
HostKey {host_key}
PidFile {here}/sshd.pid
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
SetEnv PATH={session_path}
LogLevel VERBOSE
""")
    client = os.path.join(here, "bin")
    os.makedirs(client)
    ssh = os.path.join(client, "ssh")
    with open(ssh, "w") as f:
        f.write(f"""#!/bin/sh
exec {shutil.which("ssh")} -i {client_key} -p {PORT} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \\
    -o BatchMode=yes -o LogLevel=ERROR "$@"
""")
    os.chmod(ssh, 0o755)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = os.path.join(here, "sshd.log")
    with open(log, "ab") as out:
        proc = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", config], stdout=out, stderr=out)
    server = SshServer(host=f"root@{host}", bin=client, log=log)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run([*prefix, ssh, server.host, "true"], capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd does not answer:\n{server.log_text()}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        proc.wait(10)
