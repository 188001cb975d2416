"""Authentication in both directions: neither end talks to a peer that cannot prove the secret."""

from __future__ import annotations

import os

import pytest

from mirror.apply import ModuleConfig
from mirror.errors import AuthError
from mirror.transfer import sync
from tests.peers import in_process_server
from tests.servers import SECRET

# -- authentication ------------------------------------------------------------------------


def test_sender_with_a_secret_refuses_a_receiver_that_skips_authentication(tmp_path):
    src, impostor = tmp_path / "src", tmp_path / "impostor"
    src.mkdir()
    impostor.mkdir()
    (src / "payroll.csv").write_bytes(b"confidential")
    with in_process_server({"m": ModuleConfig("m", os.fsencode(impostor), secret=None)}) as server:
        with pytest.raises(AuthError):
            sync(src, f"mirror://127.0.0.1:{server.port}/m", secret=SECRET)
    assert not (impostor / "payroll.csv").exists()


def test_receiver_with_a_secret_refuses_a_sender_without_one(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_bytes(b"x")
    with in_process_server({"m": ModuleConfig("m", os.fsencode(dst), secret=SECRET)}) as server:
        with pytest.raises(AuthError):
            sync(src, f"mirror://127.0.0.1:{server.port}/m")
        with pytest.raises(AuthError):
            sync(src, f"mirror://127.0.0.1:{server.port}/m", secret=b"wrong-secret-value")
        assert sync(src, f"mirror://127.0.0.1:{server.port}/m", secret=SECRET).ok
    assert (dst / "f").read_bytes() == b"x"
