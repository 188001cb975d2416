"""A tree with a state dir of its own: the receiver, the daemon and the final sync all use it,
so the tree's epoch and identity stay in one place on a node (a split would make the replica
refuse the next primary after a failover).  A tree that must be a mount point: its receiver
is told so."""

from __future__ import annotations

import os

from hawrap import config
from hawrap.mirrorctl import MirrorControl
from mirror.config import load_serve_config

CONFIG = """
[cluster]
name = "t"
secret_file = "secret"
state_dir = "{root}/state/{{node}}"
[[link]]
name = "hb"
[[node]]
name = "a"
lan_interface = "lo"
address = {{ hb = "127.0.0.2" }}
[[node]]
name = "b"
lan_interface = "lo"
address = {{ hb = "127.0.0.3" }}
[mirror]
secret_file = "secret"
[[mirror.tree]]
name = "spool"
path = "{root}/{{node}}/spool"
lock_file = "{root}/{{node}}/spool.lock"
state_dir = "{root}/{{node}}/spool-state"
[[mirror.tree]]
name = "www"
path = "{root}/{{node}}/www"
lock_file = "{root}/{{node}}/www.lock"
"""


def load(tmp_path):
    (tmp_path / "secret").write_bytes(b"0123456789abcdef0123")
    (tmp_path / "secret").chmod(0o600)
    path = tmp_path / "h.toml"
    path.write_text(CONFIG.format(root=tmp_path))
    return config.load(str(path))


def test_the_receiver_is_told_each_tree_state_dir(tmp_path):
    cfg = load(tmp_path)
    ctl = MirrorControl(cfg, "a")
    os.makedirs(cfg.node("a").state_dir)
    argv = ctl._serve_argv()
    assert argv[-3:-1] == ["serve", "--config"]
    serve = load_serve_config(argv[-1])
    assert serve.listen == ("127.0.0.2", cfg.mirror.port)
    spool, www = serve.modules["spool"], serve.modules["www"]
    assert spool.state_dir == os.fsencode(f"{tmp_path}/a/spool-state")
    assert www.state_dir == os.fsencode(f"{tmp_path}/a/www/.mirror")
    assert spool.path == os.fsencode(f"{tmp_path}/a/spool") and spool.lock_file == os.fsencode(
        f"{tmp_path}/a/spool.lock"
    )
    assert spool.privileges.owners and spool.privileges.setid and spool.privileges.specials
    assert not spool.privileges.devices


def test_default_state_dirs_keep_the_configured_serve_command(tmp_path):
    cfg = load(tmp_path)
    cfg = config.ClusterConfig(**{**cfg.__dict__, "mirror": config.MirrorConfig(
        **{**cfg.mirror.__dict__, "trees": tuple(config.TreeConfig(t.name, t.path, t.lock_file) for t in cfg.mirror.trees)})})  # fmt: skip
    argv = MirrorControl(cfg, "a")._serve_argv()
    assert "--module" in argv and "--config" not in argv


def test_daemon_and_final_sync_pass_the_tree_state_dir(tmp_path):
    cfg = load(tmp_path)
    ctl = MirrorControl(cfg, "a")
    for template in (cfg.mirror.daemon, cfg.mirror.sync):
        argv = ctl._argv(template, ctl.trees[0])
        assert argv[argv.index("--state-dir") + 1] == f"{tmp_path}/a/spool-state"


def test_a_tree_that_must_be_a_mount_point_is_told_to_the_receiver(tmp_path):
    cfg = load(tmp_path)
    trees = (config.TreeConfig("spool", f"{tmp_path}/{{node}}/spool", f"{tmp_path}/{{node}}/spool.lock",
                               require_mount=True),)  # fmt: skip
    cfg = config.ClusterConfig(**{**cfg.__dict__, "mirror": config.MirrorConfig(**{**cfg.mirror.__dict__, "trees": trees})})
    ctl = MirrorControl(cfg, "a")
    os.makedirs(cfg.node("a").state_dir)
    argv = ctl._serve_argv()
    assert argv[-3:-1] == ["serve", "--config"]  # the default state dir, but a setting only a file holds
    spool = load_serve_config(argv[-1]).modules["spool"]
    assert spool.require_mount and spool.path == os.fsencode(f"{tmp_path}/a/spool")
    assert spool.state_dir == os.fsencode(f"{tmp_path}/a/spool/.mirror")


def test_require_mount_is_read_from_the_cluster_configuration(tmp_path):
    (tmp_path / "secret").write_bytes(b"0123456789abcdef0123")
    (tmp_path / "secret").chmod(0o600)
    path = tmp_path / "h.toml"
    path.write_text(CONFIG.format(root=tmp_path) + "require_mount = true\n")  # the last tree's, www
    trees = {t.name: t for t in config.load(str(path)).mirror.trees}
    assert trees["www"].require_mount and not trees["spool"].require_mount
