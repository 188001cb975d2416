"""``[cluster] backend = "etcd"``: the [etcd] table, three or more nodes, the fan-out daemon's
generated configuration; mistakes name the file and the key."""

from __future__ import annotations

import os

import pytest

from hawrap import config
from hawrap.errors import ConfigError
from hawrap.etcdnode import vip_lifetime
from hawrap.mirrorctl import MirrorControl
from mirror.config import load_daemon_config

NODES = """
[[link]]
name = "lan"
[[node]]
name = "n1"
lan_interface = "lo"
address = { lan = "127.0.0.11" }
[[node]]
name = "n2"
lan_interface = "lo"
address = { lan = "127.0.0.12" }
[[node]]
name = "n3"
lan_interface = "lo"
address = { lan = "127.0.0.13" }
"""

ETCD = (
    """
[cluster]
name = "mail"
backend = "etcd"
secret_file = "secret"
state_dir = "state/{node}"
"""
    + NODES
)


def write(tmp_path, text):
    (tmp_path / "secret").write_bytes(b"0123456789abcdef0123")
    (tmp_path / "secret").chmod(0o600)
    path = tmp_path / "h.toml"
    path.write_text(text)
    return str(path)


def test_etcd_backend_with_three_nodes(tmp_path):
    cfg = config.load(write(tmp_path, ETCD + '[etcd]\nendpoints = ["http://127.0.0.1:2379"]\nttl = 5\n'))
    assert cfg.backend == "etcd" and [n.name for n in cfg.nodes] == ["n1", "n2", "n3"]
    assert cfg.etcd.prefix == "/hamirror/mail" and cfg.etcd.timing.ttl == 5
    assert cfg.etcd.conn.endpoints == ("http://127.0.0.1:2379",) and cfg.etcd.conn.request_timeout == 0.5


def test_two_node_mode_is_the_default_and_still_wants_two_nodes(tmp_path):
    text = ETCD.replace('backend = "etcd"\n', "")
    with pytest.raises(ConfigError, match="exactly two"):
        config.load(write(tmp_path, text))


@pytest.mark.parametrize(
    "etcd, message",
    [
        ("", "etcd.endpoints: missing"),
        ('endpoints = ["127.0.0.1:2379"]', r"etcd.endpoints\[0\]"),
        ('endpoints = ["http://127.0.0.1:2379"]\nttl = 2', "below the minimum safe TTL"),
        ('endpoints = ["http://127.0.0.1:2379"]\nprefix = "nope/"', "etcd.prefix"),
        ('endpoints = ["http://127.0.0.1:2379"]\nuser = "root"', "go together"),
        ('endpoints = ["http://127.0.0.1:2379"]\nttll = 5', "unknown key 'etcd.ttll'"),
    ],
)
def test_bad_etcd_tables_name_the_file_and_the_key(tmp_path, etcd, message):
    with pytest.raises(ConfigError, match=message) as info:
        config.load(write(tmp_path, ETCD + "[etcd]\n" + etcd + "\n"))
    assert str(tmp_path / "h.toml") in str(info.value)


def test_an_etcd_table_without_the_etcd_backend_is_refused(tmp_path):
    text = ETCD.replace('backend = "etcd"', 'backend = "two-node"').split('[[node]]\nname = "n3"')[0]
    with pytest.raises(ConfigError, match=r"\[etcd\] is only used"):
        config.load(write(tmp_path, text + '[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n'))


def test_unknown_backend(tmp_path):
    with pytest.raises(ConfigError, match="cluster.backend"):
        config.load(write(tmp_path, ETCD.replace('"etcd"', '"zookeeper"')))


def test_fan_out_daemon_has_a_pair_per_other_node(tmp_path):
    (tmp_path / "data").mkdir()
    text = (
        ETCD
        + f"""
[etcd]
endpoints = ["http://127.0.0.1:2379"]
[mirror]
secret_file = "secret"
port = 8731
[[mirror.tree]]
name = "spool"
path = "{tmp_path}/data/{{node}} \\"quoted\\""
lock_file = "{tmp_path}/spool-{{node}}.lock"
"""
    )
    cfg = config.load(write(tmp_path, text))
    ctl = MirrorControl(cfg, "n2", destinations=["n1", "n3"])
    os.makedirs(cfg.node("n2").state_dir)
    argv = ctl._fan_out_argv(ctl.trees[0])
    assert argv[-3:-1] == ["daemon", "--config"]
    daemon = load_daemon_config(argv[-1])
    assert [p.name for p in daemon.pairs] == ["spool@n1", "spool@n3"]
    assert [p.destination for p in daemon.pairs] == [
        "mirror://127.0.0.11:8731/spool",
        "mirror://127.0.0.13:8731/spool",
    ]
    assert {p.source for p in daemon.pairs} == {os.fsencode(f'{tmp_path}/data/n2 "quoted"')}
    assert daemon.status_dir == os.fsencode(ctl.trees[0].state_dir)
    assert daemon.reconcile_interval == 3600  # mirror.reconcile_interval's default


@pytest.mark.parametrize(
    "valid_for, margin, expected",
    [(None, 1.0, 0), (4.0, 0.504, 2), (3.49, 0.504, 1), (2.4, 0.504, 0), (2.9, 0.504, 1), (10.0, 1.01, 7)],
)
def test_vip_lifetime_ends_before_the_watchdog_fires(valid_for, margin, expected):
    lifetime = vip_lifetime(valid_for, margin)
    assert lifetime == expected
    if valid_for is not None and lifetime:
        # the kernel drops it at most a second late: still before valid_for - margin
        assert lifetime + 1 <= valid_for - margin


@pytest.mark.parametrize(
    "code, in_a_row, alerted",
    [(4, 1, "newer epoch"), (5, 1, "authentication"), (25, 1, "refused to destroy"), (30, 1, None),
     (30, 3, "stayed silent"), (35, 3, "no connection"), (2, 2, None), (2, 3, "exit 2"), (None, 3, "could not start")],
)  # fmt: skip
def test_mirror_exits_that_restarting_cannot_cure_are_reported_at_once(code, in_a_row, alerted):
    from hawrap.mirrorctl import exit_alert

    what = exit_alert(code, "the engine's last line", in_a_row)
    assert (what is None) if alerted is None else (alerted in what and "the engine's last line" in what)


def test_a_node_publishes_what_it_applied_and_a_primary_its_journal_head(tmp_path, monkeypatch):
    """position(): a replica's is its receiver's record (the lowest over its trees; none:
    (0, 0)), whatever epoch its trees took; a node serving publishes its epoch and its
    daemon's journal head; the fence is the highest epoch any tree holds."""
    from hawrap.etcdnode import EtcdNode

    (tmp_path / "data").mkdir()
    trees = "".join(f"""
[[mirror.tree]]
name = "{name}"
path = "{tmp_path}/data/{name}-{{node}}"
lock_file = "{tmp_path}/{name}-{{node}}.lock"
""" for name in ("spool", "mail"))  # fmt: skip
    cfg = config.load(write(tmp_path, ETCD + '[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n[mirror]\n'
                            'secret_file = "secret"\n' + trees))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    node = EtcdNode(cfg, "n2")
    try:
        _positions(node)
    finally:
        node.notifier.close()


def _positions(node) -> None:
    import json

    from hawrap.leadership import Position
    from mirror.applied import Applied, record_applied
    from mirror.daemon import STATUS_FILE
    from mirror.epoch import bump_epoch

    spool, mail = (os.fsencode(t.state_dir) for t in node.mirror.trees)
    for t in node.mirror.trees:
        os.makedirs(t.path)
    assert node.position() == Position(0, 0)
    bump_epoch(spool, to=9)  # the leader's epoch, taken before any session arrived
    record_applied(spool, Applied(7, 500, "a"))
    assert node.position() == Position(0, 0) and node.position().fence == 9  # mail has no record yet
    record_applied(mail, Applied(7, 420, "a"))
    assert node.position() == Position(7, 420)
    record_applied(mail, Applied(7, 650, "a"))
    assert node.position() == Position(7, 500)
    # serving: its trees' epoch and the journal head its daemons show
    node._began_serving = True
    bump_epoch(mail, to=9)
    for state, head in ((spool, 40), (mail, 35)):
        status = {"pid": 1, "updated": 0, "pairs": [{"name": "x@n1", "journal_seq": head},
                                                    {"name": "x@n3", "journal_seq": head}]}  # fmt: skip
        with open(os.path.join(state, STATUS_FILE), "w") as f:
            json.dump(status, f)
    assert node.position() == Position(9, 35)
