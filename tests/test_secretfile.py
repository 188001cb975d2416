"""Shared-secret files: one strict-modes rule for every mirror command and for hawrap."""

from __future__ import annotations

import os

import pytest

from mirror import SecretFileError, read_secret_file
from tests.helpers import run_mirror

GOOD = b"a-shared-secret-long-enough\n"


def _secret(tmp_path, data: bytes = GOOD, mode: int = 0o600, name: str = "secret"):
    path = tmp_path / name
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_a_private_secret_file_gives_its_first_line(tmp_path):
    assert read_secret_file(str(_secret(tmp_path, GOOD + b"second line ignored\n"))) == GOOD.strip()
    assert (
        read_secret_file(os.fsencode(_secret(tmp_path, b"  0123456789abcdef  ", mode=0o400)))
        == b"0123456789abcdef"
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602, 0o620])
def test_a_secret_group_or_others_may_access_is_refused_naming_file_and_mode(tmp_path, mode):
    path = _secret(tmp_path, mode=mode)
    with pytest.raises(SecretFileError) as info:
        read_secret_file(str(path))
    assert str(path) in str(info.value) and f"mode {mode:04o}" in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "0 bytes"), (b"short\n", "5 bytes"), (b"0123456789abcde\n", "15 bytes"),
     (b"\nthe-secret-is-on-line-two\n", "0 bytes"), (b"x" * 5000, "longer than 4096")],
)  # fmt: skip
def test_a_short_or_oversized_secret_is_a_usage_error(tmp_path, data, message):
    with pytest.raises(SecretFileError, match=message) as info:
        read_secret_file(str(_secret(tmp_path, data)))
    assert info.value.exit_code == 2


def test_missing_fifo_and_directory_are_refused_without_hanging(tmp_path):
    with pytest.raises(SecretFileError, match="cannot read it"):
        read_secret_file(str(tmp_path / "absent"))
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(SecretFileError, match="not a regular file"):
        read_secret_file(str(tmp_path / "fifo"))  # a FIFO in its place must not block the service
    with pytest.raises(SecretFileError, match="not a regular file"):
        read_secret_file(str(tmp_path))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_secret_owned_by_another_user_is_refused(tmp_path):
    path = _secret(tmp_path)
    os.chown(path, 65534, 65534)
    with pytest.raises(SecretFileError, match="owned by uid 65534"):
        read_secret_file(str(path))


@pytest.mark.parametrize("command", ["sync", "serve", "daemon"])
def test_every_mirror_command_refuses_a_world_readable_secret_with_exit_2(tmp_path, command):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_bytes(b"data")
    secret = _secret(tmp_path, mode=0o644)
    argv = {
        "sync": ["sync", src, "mirror://127.0.0.1:1/m", "--secret-file", secret],
        "serve": ["serve", "--listen", "127.0.0.1:0", "--module", f"m={dst}", "--secret-file", secret],
        "daemon": ["daemon", src, "mirror://127.0.0.1:1/m", "--secret-file", secret],
    }[command]
    proc = run_mirror(*argv, timeout=60)
    assert proc.returncode == 2, proc
    assert str(secret).encode() in proc.stderr and b"mode 0644" in proc.stderr, proc.stderr
    assert b"Traceback" not in proc.stderr
    assert not (dst / "f").exists()


def test_a_too_short_secret_is_exit_2_not_authentication_failed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    secret = _secret(tmp_path, b"short\n")
    proc = run_mirror("sync", src, "mirror://127.0.0.1:1/m", "--secret-file", secret)
    assert proc.returncode == 2 and b"at least 16" in proc.stderr, proc


def test_serve_config_names_the_file_and_key_of_a_readable_secret(tmp_path):
    secret = _secret(tmp_path, mode=0o640)
    config = tmp_path / "serve.toml"
    config.write_text(f'secret_file = "{secret}"\n[modules.m]\npath = "{tmp_path}"\n')
    proc = run_mirror("serve", "--config", config)
    assert proc.returncode == 2, proc
    assert f"{config}: 'secret_file': secret file {secret} has mode 0640".encode() in proc.stderr, proc.stderr


def test_hawrap_reads_its_secret_by_the_same_rule(tmp_path):
    from hawrap.config import load
    from hawrap.errors import ConfigError
    from tests.test_hawrap_config import MINIMAL, write

    path = write(tmp_path, MINIMAL)
    (tmp_path / "secret").chmod(0o644)
    with pytest.raises(ConfigError, match=r"cluster\.secret_file: secret file .*secret has mode 0644"):
        load(path)
    (tmp_path / "secret").chmod(0o600)
    assert load(path).secret == b"0123456789abcdef0123"
