"""Configuration checks before anything runs: `hawrap check`, `mirror serve|daemon --check`.

Each bad configuration holds several problems at once; the check must name every one of
them (file and key) in a single run and exit 2, and a valid one exits 0."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO, run_mirror
from tests.test_hawrap_config import MINIMAL, write

HAWRAP = [sys.executable, "-m", "hawrap"]


def run_hawrap(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HAWRAP, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=REPO, env=env
    )


def test_hawrap_check_accepts_a_valid_configuration(tmp_path):
    path = write(tmp_path, MINIMAL)
    proc = run_hawrap("check", "--config", path, "--node", "a")
    assert proc.returncode == 0, proc
    assert "valid" in proc.stdout


def test_hawrap_check_lists_every_problem_with_file_and_key(tmp_path):
    tree = tmp_path / "data"
    text = (
        MINIMAL.replace('lan_interface = "lo"\naddress = { hb = "127.0.0.2" }',
                        'lan_interface = "nosuch0"\naddress = { hb = "198.51.100.7" }')
        + '[timing]\nintervall = 0.1\ndeadtime = "fast"\n'
        + '[vip]\naddress = "2001:db8::10/64"\ninterface = "nosuch1"\narping = "auto"\n'
        + f'[mirror]\nsecret_file = "msecret"\n[[mirror.tree]]\nname = "t"\npath = "{tree}/{{node}}"\n'
        + f'lock_file = "{tmp_path}/gone/lock"\n'
        + f'[[mirror.tree]]\nname = "u"\npath = "{tmp_path}"\nlock_file = "{tmp_path}/lock"\nrequire_mount = true\n'
    )  # fmt: skip
    path = write(tmp_path, text)
    (tmp_path / "secret").chmod(0o640)
    (tmp_path / "msecret").write_bytes(b"short")
    (tmp_path / "msecret").chmod(0o600)
    bin_dir = tmp_path / "bin"  # a PATH without arping (nor ip)
    bin_dir.mkdir()
    proc = run_hawrap("check", "--config", path, "--node", "a", env={**os.environ, "PATH": str(bin_dir)})
    assert proc.returncode == 2, proc
    expected = {
        "cluster.secret_file": "mode 0640",
        "timing.intervall": "unknown key",
        "timing.deadtime": "must be float",
        "vip.address": "is IPv6",
        "vip.arping": "needs the arping tool",
        "vip.interface": "'nosuch1' is not an interface",
        "node[0].lan_interface": "'nosuch0' is not an interface",
        "node[0].address.hb": "198.51.100.7: not an address of this host",
        "mirror.secret_file": "at least 16",
        "mirror.tree[0].path": "is not a directory",
        "mirror.tree[0].lock_file": "does not exist",
        "mirror.tree[1].require_mount": f"nothing is mounted at {tmp_path}",
        "mirror.tree[1].path": f"tree 't' ({tree}/{{node}}) lies inside tree 'u' ({tmp_path})",
    }
    lines = proc.stderr.splitlines()
    for key, message in expected.items():
        assert any(line.startswith(f"{path}: ") and key in line and message in line for line in lines), (
            key, message, proc.stderr)  # fmt: skip
    assert "Traceback" not in proc.stderr


def test_hawrap_check_unknown_node_and_unreadable_file(tmp_path):
    path = write(tmp_path, MINIMAL)
    proc = run_hawrap("check", "--config", path, "--node", "zed")
    assert proc.returncode == 2 and "--node: no node named 'zed'" in proc.stderr, proc
    proc = run_hawrap("check", "--config", tmp_path / "absent.toml")
    assert proc.returncode == 2 and "absent.toml: cannot read the configuration" in proc.stderr, proc


def test_hawrap_run_refuses_the_same_problems_at_load(tmp_path):
    path = write(tmp_path, MINIMAL + '[timing]\nintervall = 0.1\n[notify]\nsmtp_port = "x"\n')
    proc = run_hawrap("status", "--config", path, "--node", "a")
    assert proc.returncode == 2, proc
    assert "timing.intervall" in proc.stderr and "notify.smtp_port" in proc.stderr


def _secret(tmp_path, mode=0o600, data=b"a-shared-secret-long-enough\n"):
    path = tmp_path / "secret"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_mirror_serve_check_valid_and_every_problem_of_a_bad_config(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    secret = _secret(tmp_path)
    good = tmp_path / "good.toml"
    good.write_text(f'listen = "127.0.0.1:0"\nsecret_file = "{secret}"\n[modules.m]\npath = "{tree}"\n')
    proc = run_mirror("serve", "--config", good, "--check")
    assert proc.returncode == 0 and b"valid" in proc.stdout, proc

    secret.chmod(0o644)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        f'listen = "198.51.100.9:8730"\nsecret_file = "{secret}"\nmax_conections = 3\n'
        f'[modules.m]\npath = "{tmp_path}/absent"\nlock_file = "{tmp_path}/no/dir/lock"\nread_only = "no"\n'
        f'[modules.n]\npath = "relative"\n'
    )
    proc = run_mirror("serve", "--config", bad, "--listen", "127.0.0.1:1", "--secret-file", secret, "--check")
    assert proc.returncode == 2, proc
    err = proc.stderr.decode()
    for expected in (
        "--listen: cannot be combined with --config",
        "--secret-file: cannot be combined with --config",
        f"{bad}: unknown key 'max_conections'",
        f"{bad}: 'secret_file': secret file {secret} has mode 0644",
        f"{bad}: 'modules.m.read_only' must be a bool",
        f"{bad}: 'modules.n.path' must be absolute",
        f"{bad}: 'modules.m.path': {tmp_path}/absent is not a directory",
        f"{bad}: 'modules.m.lock_file': the directory {tmp_path}/no/dir does not exist",
        f"{bad}: 'listen': 198.51.100.9 is not an address of this host",
    ):
        assert expected in err, (expected, err)
    assert "Traceback" not in err


def test_mirror_serve_refuses_options_that_config_would_ignore(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    secret = _secret(tmp_path)
    config = tmp_path / "serve.toml"
    config.write_text(f'listen = "127.0.0.1:0"\nsecret_file = "{secret}"\n[modules.m]\npath = "{tree}"\n')
    proc = run_mirror("serve", "--config", config, "--listen", "127.0.0.1:0", "--lock-file", tmp_path / "l")
    assert proc.returncode == 2, proc
    assert b"--listen: cannot be combined with --config" in proc.stderr
    assert b"--lock-file: cannot be combined with --config" in proc.stderr


def test_mirror_daemon_check_lists_every_problem(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    secret = _secret(tmp_path, data=b"short\n")
    config = tmp_path / "daemon.toml"
    config.write_text(
        f'[daemon]\nmetrics = "198.51.100.9:9100"\ncoalesce_ms = "fast"\njournal_retain = 0\n'
        f'reconcile_interval = -60\nopen_file_delay = -1\n'
        f'[[pair]]\nsource = "{src}"\ndestination = "{tmp_path}/no/parent/dst"\nlock_file = "{tmp_path}/x/lock"\n'
        f'dst_require_mount = true\n'
        f'[[pair]]\nname = "b"\nsource = "{tmp_path}/absent"\ndestination = "mirror://127.0.0.1/m"\n'
        f'secret_file = "{secret}"\ndeletee = true\n'
        f'[[pair]]\nname = "c"\nsource = "{src}"\ndestination = "mirror://127.0.0.1/c"\ndst_require_mount = true\n'
    )
    proc = run_mirror("daemon", "--config", config, "--max-delete", "3", "--check")
    assert proc.returncode == 2, proc
    err = proc.stderr.decode()
    for expected in (
        "--max-delete: cannot be combined with --config",
        f"{config}: unknown key 'pair[1].deletee'",
        f"{config}: 'daemon.coalesce_ms' must be a int or float",
        f"{config}: 'daemon.journal_retain' must be 1 or more changes, got 0",
        f"{config}: 'daemon.reconcile_interval' must be 0 (never) or more seconds, got -60",
        f"{config}: 'daemon.open_file_delay' must be 0 or more, got -1",
        f"{config}: 'pair[0].destination': the directory {tmp_path}/no/parent does not exist",
        f"{config}: 'pair[0].lock_file': the directory {tmp_path}/x does not exist",
        f"{config}: 'pair[1].source': {tmp_path}/absent is not a directory",
        f"{config}: 'pair[1].secret_file': secret file {secret}: the secret on its first line is 5 bytes",
        f"{config}: 'daemon.metrics': 198.51.100.9 is not an address of this host",
        f"{config}: 'pair[0].dst_require_mount': nothing is mounted at {tmp_path}/no/parent/dst",
        f"{config}: 'pair[2].secret_file': a mirror:// destination needs a secret file",
        f"{config}: 'pair[2].dst_require_mount' is for a local destination",
    ):
        assert expected in err, (expected, err)
    (tmp_path / "no" / "parent").mkdir(parents=True)
    config.write_text(f'[[pair]]\nsource = "{src}"\ndestination = "{tmp_path}/no/parent/dst"\n')
    proc = run_mirror("daemon", "--config", config, "--check")
    assert proc.returncode == 0 and b"valid" in proc.stdout, proc
    assert not (src / ".mirror").exists()  # a check changes nothing
