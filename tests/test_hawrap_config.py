"""hawrap configuration: the annotated example loads; mistakes name the file and the key."""

from __future__ import annotations

import os

import pytest

from hawrap import config
from hawrap.errors import ConfigError

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "hawrap.toml")

MINIMAL = """
[cluster]
name = "t"
secret_file = "secret"
[[link]]
name = "hb"
[[node]]
name = "a"
lan_interface = "lo"
address = { hb = "127.0.0.2" }
[[node]]
name = "b"
lan_interface = "lo"
address = { hb = "127.0.0.3" }
"""


def write(tmp_path, text, secret=b"0123456789abcdef0123"):
    (tmp_path / "secret").write_bytes(secret)
    (tmp_path / "secret").chmod(0o600)
    path = tmp_path / "h.toml"
    path.write_text(text)
    return str(path)


def test_example_loads(tmp_path):
    text = open(EXAMPLE).read().replace("/etc/hawrap/secret", str(tmp_path / "secret"))
    cfg = config.load(write(tmp_path, text))
    assert [n.name for n in cfg.nodes] == ["alpha", "beta"]
    assert cfg.timing.interval == 0.05 and cfg.timing.deadtime == 0.25
    assert cfg.timing.lan_hold == 1.0 and cfg.timing.watchdog == 2.0
    assert cfg.mirror.max_lag == 2.0 and cfg.mirror.alert_after == 10.0 and cfg.mirror.reconcile_interval == 3600
    assert cfg.vip.ip == "198.51.100.100" and cfg.vip_interface("alpha") == "eth0"
    assert cfg.services[0].monitor[0] == "sh" and cfg.mirror.trees[0].name == "spool"
    assert cfg.peer_of("alpha").name == "beta"
    assert cfg.standby_lock_path("beta") == "/var/lib/hawrap/beta/standby.lock"


def test_watchdog_must_leave_room_for_the_heartbeat_report(tmp_path):
    with pytest.raises(ConfigError, match="timing.watchdog"):
        config.load(write(tmp_path, MINIMAL + "\n[timing]\ndeadtime = 1.0\nwatchdog = 1.5\n"))


def test_minimal_defaults(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL))
    assert cfg.failback == "manual" and cfg.vip is None and cfg.services == ()
    assert cfg.node("a").state_dir == "/var/lib/hawrap/a"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace('name = "t"\n', ""), "cluster.name: missing"),
        (lambda t: t + "[timing]\ninterval = 0.3\ndeadtime = 0.5\n", "at least twice"),
        (lambda t: t + "[timing]\ninterval = -1\n", "timing.interval: must be greater than 0"),
        (lambda t: t + "[timing]\nintervall = 1\n", "unknown key 'timing.intervall'"),
        (lambda t: t + "[mirror]\nreconcile_interval = -1\n", "mirror.reconcile_interval: must be 0 or more"),
        (lambda t: t.replace('"127.0.0.3"', '"nope"'), "node[1].address.hb: 'nope' is not an IP address"),
        (lambda t: t.replace('"127.0.0.3"', '"127.0.0.2"'),
         "node[1].address.hb: 127.0.0.2 is also the address of node 'a' on this link"),
        (lambda t: t + '[vip]\naddress = "198.51.100.1"\n', "vip.address: needs a prefix length"),
        (lambda t: t.replace('name = "t"\n', 'name = "t"\nping_nodes = ["127.0.0.2"]\n'),
         "cluster.ping_nodes: 127.0.0.2 is the address of node 'a': a tie-breaker must be another host"),
        (lambda t: t.replace('name = "t"\n', 'name = "t"\nping_nodes = ["127.0.9.9"]\n') + '[vip]\naddress = "127.0.9.9/8"\n',
         "cluster.ping_nodes: 127.0.9.9 is the VIP"),
        (lambda t: t + '[vip]\naddress = "127.0.0.3/8"\n',
         "vip.address: 127.0.0.3 is the address of node 'b' on link hb: the VIP must be an address of its own"),
        (lambda t: t + '[vip]\naddress = "198.51.100.1/24"\nkind = "magic"\n', "vip.kind"),
        (lambda t: t.replace("[cluster]\n", '[cluster]\nhome = "zed"\n'), "cluster.home"),
        (
            lambda t: t + '[[mirror.tree]]\nname = "x"\npath = "/x"\nlock_file = "/l"\n',
            "mirror.secret_file is required",
        ),
        (lambda t: t + '[notify]\nsmtp_host = "localhost"\n', "notify.mail_to is required"),
        (
            lambda t: t + '[[service]]\nname = "s"\nstart = [1]\nstop = "x"\nmonitor = "y"\n',
            "service[0].start: must be a list of strings",
        ),
        (lambda t: "this is = = not toml", "not valid TOML"),
        # entries an administrator meant otherwise: nothing would ever fail back; a [[service]] copied
        (lambda t: t.replace('name = "t"\n', 'name = "t"\nfailback = "auto"\n'),
         'cluster.failback: "auto" fails back to the home node: set cluster.home'),
        (lambda t: t.replace('name = "t"\n', 'name = "t"\nfailback_delay = -5.0\n'),
         "cluster.failback_delay: must be 0 or more"),
        (lambda t: t + "".join('[[service]]\nname = "mail"\nstart = ["a"]\nstop = ["b"]\nmonitor = ["c"]\n'
                               for _ in range(2)),
         "service[1].name: another service is named 'mail'"),
    ],
)
def test_errors_name_file_and_key(tmp_path, edit, message):
    path = write(tmp_path, edit(MINIMAL))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert message in str(info.value) and path in str(info.value)


def _trees(*trees):
    text = '[mirror]\nsecret_file = "secret"\n'
    for name, path, *state_dir in trees:
        text += f'[[mirror.tree]]\nname = "{name}"\npath = "{path}"\nlock_file = "/run/{name}.lock"\n'
        text += f'state_dir = "{state_dir[0]}"\n' if state_dir else ""
    return text


@pytest.mark.parametrize(
    "trees, message",
    [
        ((("data", "/srv/data"), ("data", "/srv/mail")), "mirror.tree[1].name: another tree is named 'data'"),
        ((("da/ta", "/srv/data"),), "mirror.tree[0].name: 'da/ta' cannot name a module"),
        ((("data", "/srv/data"), ("mail", "/srv/data/")), "mirror.tree[1].path: tree 'data' is /srv/data too"),
        ((("all", "/srv"), ("mail", "/srv/mail")), "mirror.tree[1].path: tree 'mail' (/srv/mail) lies inside tree 'all' (/srv)"),
        ((("mail", "/srv/mail"), ("all", "/srv")), "mirror.tree[1].path: tree 'mail' (/srv/mail) lies inside tree 'all' (/srv)"),
        ((("a", "/srv/a", "/var/lib/t"), ("b", "/srv/b", "/var/lib/t")), "mirror.tree[1].state_dir: tree 'a' keeps"),
    ],
)
def test_trees_that_would_share_files_are_refused(tmp_path, trees, message):
    """Each tree is mirrored by a daemon of its own into a module of its own: two trees
    sharing a name, a directory (or one inside the other) or a state dir would overwrite and
    delete each other's files on the peer."""
    path = write(tmp_path, MINIMAL + _trees(*trees))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert message in str(info.value), str(info.value)
    assert len(str(info.value).splitlines()) == 1, str(info.value)
    config.load(write(tmp_path, MINIMAL + _trees(("srv", "/srv"), ("srv2", "/srv2"), ("mail", "/var/mail"))))


def test_a_trees_paths_must_be_absolute(tmp_path):
    """The mirror processes hawrap starts do not run in the directory the file was written
    in: a relative tree path, lock file or state dir would name another place."""
    keys = {"path": "/srv/data", "lock_file": "/run/data.lock", "state_dir": "/var/lib/data"}
    for key, relative in (("path", "srv/data"), ("lock_file", "data.lock"), ("state_dir", "state")):
        tree = "".join(f'{k} = "{relative if k == key else v}"\n' for k, v in keys.items())
        path = write(tmp_path, MINIMAL + f'[mirror]\nsecret_file = "secret"\n[[mirror.tree]]\nname = "data"\n{tree}')
        with pytest.raises(ConfigError) as info:
            config.load(path)
        assert f"mirror.tree[0].{key}: '{relative}' must be an absolute path" in str(info.value), str(info.value)
    config.load(write(tmp_path, MINIMAL + '[mirror]\nsecret_file = "secret"\n[[mirror.tree]]\nname = "data"\n'
                      + "".join(f'{k} = "{v}"\n' for k, v in keys.items())))  # fmt: skip


def test_short_secret_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="at least 16"):
        config.load(write(tmp_path, MINIMAL, secret=b"short"))


def test_unknown_node(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL))
    with pytest.raises(ConfigError, match="no node named 'c'"):
        cfg.node("c")


@pytest.mark.parametrize(
    "edit, message, lines",
    [
        (lambda t: t.replace('lock_file = "/run/data.lock"', 'lock_file = "/srv/data/.mirror.lock"'),
         "the lock_file of tree 'data' (/srv/data/.mirror.lock) lies inside the tree /srv/data", 1),
        (lambda t: t.replace('name = "t"\n', 'name = "t"\nstate_dir = "/srv/data/hawrap"\n'),
         "the state_dir of node 'a' (/srv/data/hawrap/a) lies inside the tree /srv/data", 2),
        (lambda t: t.replace('name = "t"\n', 'name = "t"\nstandby_lock = "/srv/data/{node}.standby"\n'),
         "the standby_lock of node 'b' (/srv/data/b.standby) lies inside the tree /srv/data", 2),
        (lambda t: t.replace('path = "/srv/data"', 'path = "/srv/data/{node}"')
                    .replace('lock_file = "/run/data.lock"', 'lock_file = "/srv/data/{node}/lock"'),
         "the lock_file of tree 'data' (/srv/data/a/lock) lies inside the tree /srv/data/a", 2),
        (lambda t: t + '[[mirror.tree]]\nname = "web"\npath = "/srv/web"\nlock_file = "/run/web.lock"\n'
                       'state_dir = "/srv/data/web-state"\n',
         "the state_dir of tree 'web' (/srv/data/web-state) lies inside the tree /srv/data", 1),
        (lambda t: t.replace('[mirror]\nsecret_file = "secret"', '[mirror]\nsecret_file = "/srv/data/secret"'),
         "mirror.secret_file (/srv/data/secret) lies inside the tree /srv/data: whoever the tree's files are served to", 1),
    ],
)
def test_hawraps_own_files_inside_a_mirrored_tree_are_refused(tmp_path, edit, message, lines):
    """The primary's daemon would copy them to the peer, whose receiver replaces the peer's own
    (its epoch and state, its standby lock, a tree's mirroring lock or journal) or deletes
    them; a secret there is served with the tree.  Each node's paths as it resolves them."""
    tree = '[mirror]\nsecret_file = "secret"\n[[mirror.tree]]\nname = "data"\npath = "/srv/data"\nlock_file = "/run/data.lock"\n'
    config.load(write(tmp_path, MINIMAL + tree))
    path = write(tmp_path, edit(MINIMAL + tree))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert f"{path}: mirror.tree[0].path: {message}" in str(info.value), str(info.value)
    assert "keep hawrap's files outside the mirrored trees" in str(info.value)
    # each node's own once; a state dir in one line, none more for the files in it (its standby lock)
    assert str(info.value).count("lies inside") == lines, str(info.value)


def test_a_trees_own_state_dir_inside_it_is_allowed(tmp_path):
    """Left out of the tree's mirroring, as the default <path>/.mirror is."""
    config.load(write(tmp_path, MINIMAL + '[mirror]\nsecret_file = "secret"\n[[mirror.tree]]\nname = "data"\n'
                      'path = "/srv/data"\nlock_file = "/run/data.lock"\nstate_dir = "/srv/data/state"\n'))  # fmt: skip
