"""`mirror serve --config`: the annotated example loads; mistakes are named by key and file."""

from __future__ import annotations

import os

import pytest

from mirror.config import load_serve_config
from mirror.errors import ConfigError

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "mirror-serve.toml")


def _example_with(tmp_path, replace: dict[str, str]) -> str:
    text = open(EXAMPLE).read()
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return str(path)


def test_example_loads(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("a-long-enough-secret\n")
    secret.chmod(0o600)
    config = load_serve_config(_example_with(tmp_path, {"/etc/hamirror/secret": str(secret)}))
    assert config.listen == ("0.0.0.0", 8730)
    assert sorted(config.modules) == ["mail", "www"]
    assert config.modules["mail"].path == b"/var/spool/mail"
    assert config.modules["mail"].lock_file == b"/var/lib/hamirror/mirror.lock"
    assert config.modules["www"].secret == b"a-long-enough-secret"


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        ({'listen = "0.0.0.0:8730"': 'listen = "nowhere"'}, "'listen'"),
        ({"max_connections = 64": "max_conections = 64"}, "unknown key 'max_conections'"),
        ({'path = "/srv/www"': 'path = "relative/www"'}, "'modules.www.path' must be absolute"),
        ({"read_only = false": 'read_only = "no"'}, "'modules.www.read_only' must be a bool"),
        ({'[modules.www]\npath = "/srv/www"': "[modules.www]"}, "missing required key 'modules.www.path'"),
        ({"listen =": "listen = = "}, "invalid TOML"),
        ({"[modules.www]": '[modules."w/ww"]'}, "'modules.w/ww': 'w/ww' cannot name a module"),
        ({"[modules.www]": '[modules."w=w"]'}, "cannot name a module"),
        ({"[modules.www]": '[modules.""]'}, "'modules.': '' cannot name a module"),
    ],
)
def test_mistakes_are_named(tmp_path, replace, message):
    secret = tmp_path / "secret"
    secret.write_text("a-long-enough-secret\n")
    secret.chmod(0o600)
    replace = {"/etc/hamirror/secret": str(secret), **replace}
    path = _example_with(tmp_path, replace)
    with pytest.raises(ConfigError, match=message) as info:
        load_serve_config(path)
    assert path in str(info.value)


DAEMON_EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "mirror-daemon.toml")


def test_daemon_example_loads():
    from mirror.config import load_daemon_config

    config = load_daemon_config(DAEMON_EXAMPLE)
    assert [p.name for p in config.pairs] == ["mail", "www"]
    mail = config.pairs[0]
    assert mail.destination == "mirror://standby:8730/mail" and mail.excludes == (b"*.lock", b"/tmp/")
    assert mail.lock_file == b"/var/lib/hamirror/mirror.lock" and mail.delete
    assert config.metrics == ("127.0.0.1", 9730) and config.coalesce == 0.0005


def test_daemon_config_mistakes_are_named(tmp_path):
    from mirror.config import load_daemon_config

    bad = tmp_path / "d.toml"
    bad.write_text('[[pair]]\nsource = "/srv"\ndestination = "/x"\ndelete = "yes"\n')
    with pytest.raises(ConfigError, match=r"'pair\[0\].delete' must be a bool"):
        load_daemon_config(str(bad))
    bad.write_text('[[pair]]\nsource = "/srv"\ndestination = "h:/x"\nrsh = 5\n')
    with pytest.raises(ConfigError, match=r"'pair\[0\].rsh' must be a str"):
        load_daemon_config(str(bad))
    bad.write_text('[[pair]]\nsource = "srv"\ndestination = "/x"\n')
    with pytest.raises(ConfigError, match="must be absolute"):
        load_daemon_config(str(bad))


def test_a_module_named_on_the_command_line_is_checked_too(tmp_path):
    """A name clients could not reach (``mirror://HOST/a/b`` is module ``a``, subpath ``b``)."""
    from tests.helpers import run_mirror

    secret = tmp_path / "secret"
    secret.write_text("a-long-enough-secret\n")
    secret.chmod(0o600)
    proc = run_mirror("serve", "--secret-file", secret, "--module", f"a/b={tmp_path}", check_codes=(2,))
    assert b"--module a/b=" in proc.stderr and b"'a/b' cannot name a module" in proc.stderr, proc.stderr


def _said(problems) -> list[str]:
    """Each problem without its file name, in order."""
    return sorted(p.split(": ", 1)[1] for p in problems.items)


def test_every_path_of_a_configuration_must_be_absolute(tmp_path):
    """A relative path would name one place for the file run by hand and another for the
    service (started in ``/``): a mirroring lock checked where nobody takes it, say, lets
    mirroring go on through a lock.  Each is named; a problem that follows from one already
    named (a module then without a secret) is not said again."""
    from mirror.config import read_daemon_config, read_serve_config

    serve = tmp_path / "serve.toml"
    serve.write_text('secret_file = "secret"\nlock_file = "run/mirror.lock"\n[modules.m]\npath = "/srv/m"\n'
                     '[modules.n]\npath = "/srv/n"\nstate_dir = "state"\nsecret_file = "n.secret"\n')  # fmt: skip
    _, problems = read_serve_config(str(serve))
    assert _said(problems) == [
        "'lock_file' must be absolute, got 'run/mirror.lock'",
        "'modules.n.secret_file' must be absolute, got 'n.secret'",
        "'modules.n.state_dir' must be absolute, got 'state'",
        "'secret_file' must be absolute, got 'secret'",
    ], problems.items
    daemon = tmp_path / "daemon.toml"
    daemon.write_text('[daemon]\nstatus_dir = "status"\n'
                      '[[pair]]\nsource = "/srv/a"\ndestination = "replica"\nlock_file = "a.lock"\n'
                      'state_dir = "state"\nsecret_file = "secret"\n'
                      '[[pair]]\nsource = "/srv/b"\ndestination = "standby:b"\n'
                      '[[pair]]\nsource = "/srv/c"\ndestination = "mirror://standby/c"\n')  # fmt: skip
    config, problems = read_daemon_config(str(daemon))
    assert _said(problems) == [
        "'daemon.status_dir' must be absolute, got 'status'",
        "'pair[0].destination' must be absolute, got 'replica'",
        "'pair[0].lock_file' must be absolute, got 'a.lock'",
        "'pair[0].secret_file' must be absolute, got 'secret'",
        "'pair[0].state_dir' must be absolute, got 'state'",
    ], problems.items  # HOST:PATH is relative to the remote home, as rsync's
    # the pairs that could be read keep the place they have in the file, for what --check names
    assert [(p.name, p.index) for p in config.pairs] == [("b", 1), ("c", 2)]


def test_check_names_a_pair_by_its_place_in_the_file_when_one_before_it_is_unreadable(tmp_path):
    from tests.helpers import run_mirror

    daemon = tmp_path / "daemon.toml"
    daemon.write_text(f'[[pair]]\nsource = "relative"\ndestination = "/r"\n'
                      f'[[pair]]\nsource = "{tmp_path}/missing"\ndestination = "{tmp_path}/replica"\n')  # fmt: skip
    proc = run_mirror("daemon", "--check", "--config", daemon, check_codes=(2,))
    assert f"{daemon}: 'pair[1].source'".encode() in proc.stderr, proc.stderr
    assert b"'pair[0].source' must be absolute" in proc.stderr and b"'pair[0].source': " not in proc.stderr
