"""``hawrap resume`` never lets the peer's copy replace changes of this node's that the peer
lacks without listing them and being told so: the mirror daemon's journals (real
``mirror.journal`` files) and the node's persisted data state are read from disk, with
hawrap stopped, and the command refuses without ``--discard-local-changes``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hawrap import config, unsynced
from hawrap.demo import write_demo_config
from mirror.journal import ENTRY, RENAME, Journal


def mirrored_config(tmp_path) -> str:
    secret = tmp_path / "mirror-secret"
    secret.write_text("m" * 32)
    secret.chmod(0o600)
    for node in ("alpha", "beta"):
        (tmp_path / "data" / node).mkdir(parents=True)
    extra = f"""
[mirror]
secret_file = "{secret}"

[[mirror.tree]]
name = "data"
path = "{tmp_path}/data/{{node}}"
lock_file = "{tmp_path}/data/{{node}}.lock"
"""
    return write_demo_config(str(tmp_path), extra=extra)


def journal_of(tmp_path, node="alpha") -> Journal:
    state_dir = tmp_path / "data" / node / ".mirror"
    state_dir.mkdir(exist_ok=True)
    return Journal(os.fsencode(state_dir / "journal-0123456789abcdef"))


def resume(config_path: str, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "hawrap", "resume", "--config", config_path, "--node", "alpha", *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_nothing_unsynced_on_a_clean_node(tmp_path):
    cfg = config.load(mirrored_config(tmp_path))
    assert not unsynced.find(cfg, "alpha")


def test_journaled_changes_never_mirrored_are_listed(tmp_path):
    cfg = config.load(mirrored_config(tmp_path))
    j = journal_of(tmp_path)
    j.append([(ENTRY, b"mail/new-1", 0), (ENTRY, b"caf\xe9", 0), (RENAME, b"a", b"b")])
    j.close()
    found = unsynced.find(cfg, "alpha")
    assert found and found.journaled == {"data": ["a", "b", "caf\\xe9", "mail/new-1"]}
    text = found.describe("alpha")
    assert "beta lacks" in text and "4 changes journaled and never mirrored" in text and "mail/new-1" in text
    # once a session has mirrored them (the daemon's checkpoint), nothing is left to lose
    j = journal_of(tmp_path)
    j.checkpoint(j.pending().seq)
    j.close()
    assert not unsynced.find(cfg, "alpha")


def test_a_degraded_primary_holds_changes_no_journal_lists(tmp_path):
    path = mirrored_config(tmp_path)
    (tmp_path / "alpha").mkdir(exist_ok=True)
    (tmp_path / "alpha" / "node-state.json").write_text(
        json.dumps({"role": "standby", "peer_outdated": True, "peer_outdated_since": 1.7e9})
    )
    found = unsynced.find(config.load(path), "alpha")
    assert found and found.since == 1.7e9
    assert "everything changed here since then is missing there" in found.describe("alpha")


def test_resume_refuses_without_the_flag_and_says_what_would_be_replaced(tmp_path):
    path = mirrored_config(tmp_path)
    (tmp_path / "alpha").mkdir(exist_ok=True)
    lock = tmp_path / "alpha" / "standby.lock"
    lock.write_text("{}")
    j = journal_of(tmp_path)
    j.append([(ENTRY, b"spool/unsent", 0)])
    j.close()
    r = resume(path)
    assert r.returncode == 1 and "spool/unsent" in r.stdout and "--discard-local-changes" in r.stderr
    assert lock.exists()  # nothing done
    r = resume(path, "--discard-local-changes")
    assert r.returncode == 0, r.stderr
    assert not lock.exists() and "replaces the above" in r.stdout
