"""Trees that overlap (``mirror.overlap``).  A local replica nested with its source: the same
directory (by another path: a symlink, a bind mount), the replica inside the source, the
source inside the replica; two pairs of a daemon writing one replica; two writable modules
of a server on one directory.  Refused before anything is written (exit 2, naming both), by
``mirror sync``, the library, ``mirror daemon`` and ``mirror serve`` at their start, on
reload and by ``--check``; a replica inside its source that the source excludes is
mirrored, and stays one level deep however often it is synced."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

import mirror
from mirror.errors import EXIT_ERROR, UsageError
from tests.helpers import MIRROR, REPO, is_root, run_mirror
from tests.snapshot import snapshot


def _source(root):
    (root / "mail" / "cur").mkdir(parents=True)
    (root / "mail" / "cur" / "1").write_bytes(b"a mail\n")
    (root / "top").write_bytes(b"top\n")
    return root


def _refused(args, *expected: str) -> str:
    err = run_mirror("sync", *args, check_codes=(EXIT_ERROR,)).stderr.decode()
    assert "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("delete", [[], ["--delete"]])
def test_a_replica_inside_its_source_is_refused_with_nothing_written(tmp_path, delete):
    src = _source(tmp_path / "src")
    before = snapshot(src)
    _refused([*delete, src, src / "mail" / "backup"], f"the replica {src}/mail/backup lies inside the source {src}",
             "--exclude '/mail/backup/'")  # fmt: skip
    assert snapshot(src) == before and not (src / ".mirror").exists()
    # through a symlink to the source, and with parents still to be made
    os.symlink(src, tmp_path / "alias")
    _refused([*delete, "--mkpath", tmp_path / "alias", src / "new" / "deeper"], "lies inside the source")
    assert snapshot(src) == before


@pytest.mark.parametrize("delete", [[], ["--delete"]])
def test_a_source_inside_its_replica_is_refused_and_keeps_its_files(tmp_path, delete):
    """With --delete the replica's sync would delete the source itself (it is not in the
    source's listing): refused before anything is read or written."""
    replica = tmp_path / "replica"
    src = _source(replica / "incoming")
    (replica / "old").write_bytes(b"the replica's own\n")
    before = snapshot(replica)
    _refused([*delete, src, replica], f"the source {src} lies inside the replica {replica}")
    assert snapshot(replica) == before
    os.symlink(replica, tmp_path / "alias")
    _refused([*delete, src, tmp_path / "alias"], "lies inside the replica")
    assert snapshot(replica) == before


def test_the_same_directory_by_another_path_is_refused(tmp_path):
    src = _source(tmp_path / "src")
    os.symlink(src, tmp_path / "alias")
    for replica in (src, tmp_path / "alias", f"{src}/./mail/.."):
        _refused([src, replica], "are the same directory")
    assert not (src / ".mirror").exists()


@pytest.mark.skipif(not is_root(), reason="a bind mount needs root")
def test_a_bind_mount_of_the_source_is_the_same_directory(tmp_path):
    src = _source(tmp_path / "src")
    (tmp_path / "bound").mkdir()
    subprocess.run(["mount", "--bind", str(src), str(tmp_path / "bound")], check=True)
    try:
        _refused([src, tmp_path / "bound"], "are the same directory")
        _refused(["--mkpath", src, tmp_path / "bound" / "sub" / "replica"], "lies inside the source")
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "bound")], check=True)


def test_a_replica_the_source_excludes_is_mirrored_and_never_nested(tmp_path):
    src = _source(tmp_path / "src")
    replica = src / "mail" / "backup"
    for pattern in ("/mail/backup/", "backup"):
        for _ in range(3):
            assert run_mirror("sync", "--delete", "--exclude", pattern, src, replica).returncode == 0
        assert sorted(os.listdir(replica)) == [".mirror", "mail", "top"]
        assert not (replica / "mail" / "backup").exists()
        assert (replica / "mail" / "cur" / "1").read_bytes() == b"a mail\n"


def test_the_library_refuses_it_too(tmp_path):
    src = _source(tmp_path / "src")
    with pytest.raises(UsageError, match="lies inside the source"):
        mirror.sync(src, src / "backup")
    assert not (src / "backup").exists()


def test_the_daemon_refuses_a_nested_pair_at_its_start_and_check_names_it(tmp_path):
    """A live daemon would otherwise retry the pair for ever (or, with the replica inside the
    source, see its own writes as changes and copy the replica into itself until the disk is full)."""
    src = _source(tmp_path / "src")
    before = snapshot(src)
    for args in ([src, src / "backup"], [src / "mail", src]):
        proc = subprocess.run([*MIRROR, "daemon", *map(str, args)], capture_output=True, timeout=60, cwd=REPO)
        assert proc.returncode == EXIT_ERROR and b"lies inside the" in proc.stderr, proc.stderr
        proc = subprocess.run([*MIRROR, "daemon", "--check", *map(str, args)], capture_output=True, timeout=60,
                              cwd=REPO)  # fmt: skip
        assert proc.returncode == EXIT_ERROR and b"DST: the " in proc.stderr, proc.stderr
    config = tmp_path / "daemon.toml"
    config.write_text(f'[[pair]]\nsource = "{src}"\ndestination = "{src}/backup"\n')
    for check in ([], ["--check"]):
        proc = subprocess.run([*MIRROR, "daemon", *check, "--config", str(config)], capture_output=True, timeout=60,
                              cwd=REPO)  # fmt: skip
        assert proc.returncode == EXIT_ERROR, proc.stderr
        assert f"{config}: 'pair[0].destination': the replica {src}/backup lies inside".encode() in proc.stderr
    assert snapshot(src) == before


def test_a_reload_with_a_nested_pair_keeps_the_running_configuration(tmp_path):
    from tests.daemons import converged
    from tests.helpers import wait_until
    from tests.test_daemon import _config_daemon

    src = _source(tmp_path / "src")
    config, log = tmp_path / "d.toml", tmp_path / "daemon.log"
    config.write_text(f'[[pair]]\nsource = "{src}"\ndestination = "{tmp_path / "replica"}"\n')
    with _config_daemon(config, log) as proc:
        converged(src, tmp_path / "replica")
        config.write_text(f'[[pair]]\nsource = "{src}"\ndestination = "{src / "backup"}"\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload failed" in log.read_text(), 30), log.read_text()
        assert f"'pair[0].destination': the replica {src}/backup lies inside the source" in log.read_text()
        (src / "later").write_bytes(b"still mirrored where it was\n")
        converged(src, tmp_path / "replica")
        assert not (src / "backup").exists() and proc.poll() is None


def _daemon(*args):
    return subprocess.run([*MIRROR, "daemon", *map(str, args)], capture_output=True, timeout=60, cwd=REPO)


def test_two_pairs_writing_one_replica_are_refused(tmp_path):
    """Two sources into one replica overwrite (and with delete, delete) each other's files for
    ever; a replica inside another pair's one is deleted by it, unless that pair excludes it."""
    one, two = _source(tmp_path / "one"), _source(tmp_path / "two")
    config = tmp_path / "daemon.toml"

    def pairs(*destinations, exclude=None):
        text = ""
        for src, dst in zip((one, two), destinations, strict=True):
            text += f'[[pair]]\nsource = "{src}"\ndestination = "{dst}"\n'
            if exclude and src == one:
                text += f'exclude = ["{exclude}"]\n'
        config.write_text(text)

    pairs(tmp_path / "replica", tmp_path / "replica")  # neither made yet
    for check in ([], ["--check"]):
        proc = _daemon(*check, "--config", config)
        assert proc.returncode == EXIT_ERROR, proc.stderr
        assert f"'pair[1].destination': pair 'one' writes the same replica {tmp_path}/replica".encode() in proc.stderr
    os.symlink(tmp_path / "replica", tmp_path / "alias")
    (tmp_path / "replica").mkdir()
    pairs(tmp_path / "replica", tmp_path / "alias")
    assert b"writes the same replica" in _daemon("--check", "--config", config).stderr
    pairs(tmp_path / "replica", tmp_path / "replica" / "two")
    proc = _daemon("--check", "--config", config)
    assert proc.returncode == EXIT_ERROR and b"lies inside the replica" in proc.stderr, proc.stderr
    assert b"exclude '/two/' from pair 'one'" in proc.stderr
    pairs(tmp_path / "replica", tmp_path / "replica" / "two", exclude="/two/")
    proc = _daemon("--check", "--config", config)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "replica")) == []  # nothing written by the refusals
    # two pairs mirroring at each other (1999's lock file kept two nodes from doing so)
    pairs(two, one)
    for check in ([], ["--check"]):
        proc = _daemon(*check, "--config", config)
        assert proc.returncode == EXIT_ERROR and b"pairs 'one' and 'two' mirror at each other" in proc.stderr, proc
    pairs(two, tmp_path / "replica")  # a cascade, one -> two -> replica: allowed
    assert _daemon("--check", "--config", config).returncode == 0


def test_two_pairs_to_one_remote_replica_are_refused(tmp_path):
    one, two = _source(tmp_path / "one"), _source(tmp_path / "two")
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123")
    secret.chmod(0o600)
    config = tmp_path / "daemon.toml"
    config.write_text("".join(f'[[pair]]\nsource = "{src}"\ndestination = "mirror://127.0.0.1:9/m"\n'
                              f'secret_file = "{secret}"\n' for src in (one, two)))  # fmt: skip
    proc = _daemon("--check", "--config", config)
    assert proc.returncode == EXIT_ERROR, proc.stderr
    assert b"'pair[1].destination': pair 'one' writes the same replica mirror://127.0.0.1:9/m" in proc.stderr


def test_a_server_refuses_writable_modules_one_inside_the_other(tmp_path):
    """Each module has its own writer lock: senders to two modules holding the same files
    would overwrite and delete each other's.  Refused at the start, by --check and on reload
    (the running configuration kept); a read-only module may lie anywhere."""
    from tests.servers import mirror_server

    srv = _source(tmp_path / "srv")
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123")
    secret.chmod(0o600)
    base = ["serve", "--secret-file", secret, "--listen", "127.0.0.1:0"]
    for modules, told in ((["all", srv, "mail", srv / "mail"], f"--module mail: {srv}/mail lies inside module 'all'"),
                          (["all", srv, "again", f"{srv}/."], "--module all: module 'again' is the same directory")):  # fmt: skip
        args = [*base, "--module", f"{modules[0]}={modules[1]}", "--module", f"{modules[2]}={modules[3]}"]
        for check in ([], ["--check"]):
            proc = subprocess.run([*MIRROR, *map(str, args), *check], capture_output=True, timeout=60, cwd=REPO)
            assert proc.returncode == EXIT_ERROR and told.encode() in proc.stderr, proc.stderr
    proc = subprocess.run([*MIRROR, *map(str, base), "--read-only", "--check", "--module", f"all={srv}", "--module",
                           f"mail={srv / 'mail'}"], capture_output=True, timeout=60, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "run").mkdir()
    with mirror_server(tmp_path / "run", {"all": srv}, settings={"all": {}}) as server:
        config = tmp_path / "run" / "serve.toml"
        config.write_text(config.read_text() + f'[modules.mail]\npath = "{srv / "mail"}"\n')
        server.proc.send_signal(signal.SIGHUP)
        log = tmp_path / "run" / "server.log"
        from tests.helpers import wait_until

        assert wait_until(lambda: "reload failed" in log.read_text(), 30), log.read_text()
        assert f"'modules.mail.path': {srv}/mail lies inside module 'all'" in log.read_text()
        proc = run_mirror("sync", "--dry-run", "--secret-file", server.secret_file, src := _source(tmp_path / "s"),
                          server.url("mail"), check_codes=(EXIT_ERROR,))  # fmt: skip
        assert b"unknown module 'mail'" in proc.stderr and src.exists(), proc.stderr  # not served


def test_a_source_state_dir_inside_the_replica_is_refused(tmp_path):
    """Not part of the source, it would be deleted by each deleting sync, and the source's
    tree identity and journal with it."""
    src = _source(tmp_path / "src")
    replica = tmp_path / "replica"
    for delete in ([], ["--delete"]):
        _refused([*delete, "--state-dir", replica / "state", src, replica],
                 f"the source's state dir {replica}/state lies inside the replica {replica}")  # fmt: skip
    assert not replica.exists()
    proc = _daemon("--check", "--state-dir", replica / "state", src, replica)
    assert proc.returncode == EXIT_ERROR and b"--state-dir: the source's state dir" in proc.stderr, proc.stderr
    assert run_mirror("sync", "--delete", "--state-dir", tmp_path / "state", src, replica).returncode == 0


@pytest.mark.parametrize("option", ["--dst-lock-file", "--lock-file"])
def test_a_lock_file_inside_the_replica_is_refused(tmp_path, option):
    """A sync would write a file of the source's at the lock's place, and that file then locks
    every sync after it (or, the lock not being in the source, --delete deletes it)."""
    src = _source(tmp_path / "src")
    (src / "replica.lock").write_bytes(b"a file of the source's, named like the lock\n")
    replica = tmp_path / "replica"
    for delete in ([], ["--delete"]):
        _refused([*delete, option, replica / "replica.lock", src, replica],
                 f"the lock file {replica}/replica.lock lies inside the replica {replica}")  # fmt: skip
    assert not replica.exists()
    with pytest.raises(UsageError, match="lies inside the replica"):
        mirror.sync(src, replica, **{option[2:].replace("-", "_"): replica / "replica.lock"})
    assert not replica.exists()
    # elsewhere, the source's file of that name is mirrored as any other, every time
    for _ in range(2):
        assert run_mirror("sync", "--delete", option, tmp_path / "replica.lock", src, replica).returncode == 0
    assert (replica / "replica.lock").read_bytes() == (src / "replica.lock").read_bytes()


def test_a_pairs_lock_file_or_state_dir_inside_another_pairs_replica_is_refused(tmp_path):
    """The other pair's sessions would delete them (or write a file of its source's over them)."""
    one, two = _source(tmp_path / "one"), _source(tmp_path / "two")
    config = tmp_path / "daemon.toml"
    for key, value, told in (("lock_file", tmp_path / "r1" / "two.lock", "the lock file"),
                             ("state_dir", tmp_path / "r1" / "state", "the source's state dir")):  # fmt: skip
        config.write_text(f'[[pair]]\nsource = "{one}"\ndestination = "{tmp_path / "r1"}"\n'
                          f'[[pair]]\nsource = "{two}"\ndestination = "{tmp_path / "r2"}"\n{key} = "{value}"\n')  # fmt: skip
        for check in ([], ["--check"]):
            proc = _daemon(*check, "--config", config)
            assert proc.returncode == EXIT_ERROR, proc.stderr
            assert (f"'pair[1].{key}': {told} {value} lies inside the replica of pair 'one' {tmp_path}/r1".encode()
                    in proc.stderr), proc.stderr  # fmt: skip
        assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    proc = _daemon("--check", "--lock-file", tmp_path / "r" / "x.lock", one, tmp_path / "r")
    assert proc.returncode == EXIT_ERROR and b"--lock-file: the lock file" in proc.stderr, proc.stderr


def test_a_server_refuses_a_lock_file_or_state_dir_where_senders_write(tmp_path):
    """A module's lock file inside a writable module (its own or another's), or its state dir
    inside another's: senders would write a file there from their source (locking the
    module) or delete it.  A read-only module's tree may hold them."""
    srv, other = _source(tmp_path / "srv"), _source(tmp_path / "other")
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123")
    secret.chmod(0o600)
    base = ["serve", "--secret-file", secret, "--listen", "127.0.0.1:0"]
    lock = srv / "mirror.lock"
    args = [*base, "--lock-file", lock, "--module", f"all={srv}", "--module", f"other={other}"]
    for check in ([], ["--check"]):
        proc = subprocess.run([*MIRROR, *map(str, args), *check], capture_output=True, timeout=60, cwd=REPO)
        assert proc.returncode == EXIT_ERROR, proc.stderr
        assert f"--lock-file: the lock file {lock} lies inside module 'all' ({srv})".encode() in proc.stderr
        assert proc.stderr.count(b"the lock file") == 1, proc.stderr  # one lock for both modules: said once
    proc = subprocess.run([*MIRROR, *map(str, [*base, "--read-only", "--lock-file", lock, "--module", f"all={srv}",
                                               "--check"])], capture_output=True, timeout=60, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config = tmp_path / "serve.toml"
    config.write_text(f'listen = "127.0.0.1:0"\nsecret_file = "{secret}"\n[modules.all]\npath = "{srv}"\n'
                      f'[modules.other]\npath = "{other}"\nstate_dir = "{srv}/other-state"\n')  # fmt: skip
    for check in ([], ["--check"]):
        proc = subprocess.run([*MIRROR, "serve", "--config", str(config), *check], capture_output=True, timeout=60,
                              cwd=REPO)  # fmt: skip
        assert proc.returncode == EXIT_ERROR, proc.stderr
        assert (f"{config}: 'modules.other.state_dir': the state dir {srv}/other-state lies inside module 'all' "
                f"({srv}), whose senders would delete it").encode() in proc.stderr, proc.stderr  # fmt: skip
    assert not (srv / "other-state").exists()


def test_pairs_mirroring_in_a_ring_are_refused_and_a_cascade_is_not(tmp_path):
    """one -> two -> three -> one: every change comes round again, and each pair's deletions
    undo the new files of the pair before it.  Said once, for the ring's last pair."""
    trees = [_source(tmp_path / name) for name in ("one", "two", "three")]
    config = tmp_path / "daemon.toml"

    def pairs(*edges):
        config.write_text("".join(f'[[pair]]\nname = "{src.name}"\nsource = "{src}"\ndestination = "{dst}"\n'
                                  for src, dst in edges))  # fmt: skip

    pairs((trees[0], trees[1]), (trees[1], trees[2]), (trees[2], trees[0]))
    before = [snapshot(tree) for tree in trees]
    for check in ([], ["--check"]):
        proc = _daemon(*check, "--config", config)
        assert proc.returncode == EXIT_ERROR, proc.stderr
        assert (b"'pair[2].destination': pairs 'one' -> 'two' -> 'three' -> 'one' mirror in a ring (each one's "
                b"replica holds the next one's source)" in proc.stderr), proc.stderr  # fmt: skip
        assert proc.stderr.count(b"mirror in a ring") == 1, proc.stderr
    assert [snapshot(tree) for tree in trees] == before
    pairs((trees[0], trees[1]), (trees[1], trees[2]), (trees[2], tmp_path / "elsewhere"))
    assert _daemon("--check", "--config", config).returncode == 0
