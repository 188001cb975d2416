"""What a replica has applied: the receiver records ``(epoch, seq, journal)`` after a session
that committed everything, never after a failed or partial one, never lower; the handshake
reports it.  Real ``mirror serve`` receivers, real sessions."""

from __future__ import annotations

import os

import pytest

from mirror.applied import Applied, AppliedError, applied_path, read_applied, record_applied
from mirror.epoch import bump_epoch
from mirror.errors import LockedError
from mirror.transfer import Connection
from mirror.treescan import Scope
from tests.servers import mirror_server
from tests.snapshot import assert_mirrors

TOKEN = "0123456789abcdef"


def test_the_record_never_goes_back(tmp_path):
    state = os.fsencode(tmp_path / "state")
    assert read_applied(state) is None
    assert record_applied(state, Applied(3, 10, TOKEN)) == Applied(3, 10, TOKEN)
    assert record_applied(state, Applied(3, 9, TOKEN)) == Applied(3, 10, TOKEN)  # lower seq, same epoch
    assert record_applied(state, Applied(2, 99, TOKEN)) == Applied(3, 10, TOKEN)  # older epoch
    assert record_applied(state, Applied(3, 10, "other")) == Applied(3, 10, "other")  # same point, new run
    assert record_applied(state, Applied(4, 0, "")) == Applied(4, 0, "")  # a newer primary, any seq
    assert read_applied(state) == Applied(4, 0, "")
    with open(applied_path(state), "wb") as f:
        f.write(b'{"epoch": -1, "seq": 2}')
    with pytest.raises(AppliedError, match="applied"):
        read_applied(state)
    with pytest.raises(ValueError):
        record_applied(os.fsencode(tmp_path / "s2"), Applied(1, -5, ""))


def _tree(root, n=20):
    (root / "d").mkdir(parents=True)
    for i in range(n):
        (root / "d" / f"f{i}").write_bytes(os.urandom(100 + i))


def _state(dst) -> bytes:
    return os.fsencode(dst / ".mirror")


def test_a_complete_session_is_recorded_and_reported_at_the_handshake(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    dst.mkdir()
    bump_epoch(os.fsencode(src / ".mirror"), to=7)
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        with Connection(src, server.url("m"), secret_file=server.secret_file, delete=True) as conn:
            assert conn.welcome["applied"] is None
            result = conn.session(journal={"seq": 40, "base": None, "journal": TOKEN})
            assert result.ok and result.receiver["applied"] == [7, 40, TOKEN]
            assert read_applied(_state(dst)) == Applied(7, 40, TOKEN)
            # a scoped batch continuing from the record moves it on
            (src / "d" / "f1").write_bytes(b"new")
            result = conn.session(Scope(entries=[b"d/f1"]), journal={"seq": 45, "base": 40, "journal": TOKEN})
            assert result.ok and read_applied(_state(dst)) == Applied(7, 45, TOKEN)
            # a scoped batch that does not say where it continues from records nothing
            (src / "d" / "f2").write_bytes(b"new")
            result = conn.session(Scope(entries=[b"d/f2"]), journal={"seq": 50, "journal": TOKEN})
            assert result.ok and result.receiver["applied"] == [7, 45, TOKEN]  # reported all the same
            assert read_applied(_state(dst)) == Applied(7, 45, TOKEN)
            result = conn.session(Scope(entries=[b"d/f2"]))
            assert result.receiver["applied"] == [7, 45, TOKEN]
            # the ordering hazard: a batch that continues from a point the replica never
            # reached (an earlier batch failed) must not be recorded as covering its seq
            (src / "d" / "f3").write_bytes(b"new")
            result = conn.session(Scope(entries=[b"d/f3"]), journal={"seq": 60, "base": 50, "journal": TOKEN})
            assert result.ok and result.receiver["applied"] == [7, 45, TOKEN]
            # nor a batch of another journal run
            result = conn.session(
                Scope(entries=[b"d/f3"]), journal={"seq": 70, "base": 45, "journal": "f" * 16}
            )
            assert read_applied(_state(dst)) == Applied(7, 45, TOKEN)
            # a plain full sync (no seq) never lowers it
            assert conn.session().ok and read_applied(_state(dst)) == Applied(7, 45, TOKEN)
        with Connection(src, server.url("m"), secret_file=server.secret_file) as conn:
            assert conn.welcome["applied"] == [7, 45, TOKEN]
        assert_mirrors(src, dst)
        # a subpath is part of the module: its sessions neither see nor write the record
        with Connection(src / "d", server.url("m") + "/d", secret_file=server.secret_file, epoch=7) as conn:
            assert conn.welcome["applied"] is None
            assert conn.session(journal={"seq": 99, "base": None, "journal": TOKEN}).ok
        assert read_applied(_state(dst)) == Applied(7, 45, TOKEN)


def test_a_partial_or_failed_session_records_nothing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    dst.mkdir()
    with mirror_server(tmp_path, {"m": str(dst)}) as server:
        url = server.url("m")
        with Connection(src, url, secret_file=server.secret_file, delete=True) as conn:
            assert conn.session(journal={"seq": 5, "base": None, "journal": TOKEN}).ok
        assert read_applied(_state(dst)) == Applied(0, 5, TOKEN)
        # deletions refused by the replica's guard: the session is partial
        for i in range(10):
            os.unlink(src / "d" / f"f{i}")
        (src / "added").write_text("x")
        with Connection(src, url, secret_file=server.secret_file, delete=True, max_delete=3) as conn:
            result = conn.session(journal={"seq": 9, "base": None, "journal": TOKEN})
            assert result.deletions_refused and (dst / "added").exists()
            assert result.receiver["applied"] == [0, 5, TOKEN]
        assert read_applied(_state(dst)) == Applied(0, 5, TOKEN)
        # a file unreadable on the sender: left out on this side, so not complete
        (src / "secret").write_text("s")
        os.chmod(src / "secret", 0)
        if os.geteuid() != 0:
            with Connection(src, url, secret_file=server.secret_file) as conn:
                result = conn.session(journal={"seq": 11, "base": None, "journal": TOKEN})
                assert result.failed and read_applied(_state(dst)) == Applied(0, 5, TOKEN)
        os.unlink(src / "secret")
        # a session cut short by a mirroring lock on the receiver (it reports LockedError)
        lock = tmp_path / "dst.lock"
    with mirror_server(tmp_path, {"m": str(dst)}, "--lock-file", str(lock)) as server:
        lock.write_text("held by a test\n")
        with Connection(src, server.url("m"), secret_file=server.secret_file, delete=True) as conn:
            with pytest.raises(LockedError):
                conn.session(journal={"seq": 12, "base": None, "journal": TOKEN})
        assert read_applied(_state(dst)) == Applied(0, 5, TOKEN)
        lock.unlink()
        with Connection(src, server.url("m"), secret_file=server.secret_file, delete=True,
                        allow_mass_delete=True) as conn:  # fmt: skip
            assert conn.session(journal={"seq": 12, "base": None, "journal": TOKEN}).ok
        assert read_applied(_state(dst)) == Applied(0, 12, TOKEN)
