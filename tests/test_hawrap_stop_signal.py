"""SIGTERM stops a node whatever its loop was doing when the signal came.

A Python signal handler runs in the main thread between two bytecodes, so it may interrupt
the node's loop while that thread holds a lock: the events queue's (inside ``get``, which
the loop calls twenty times a second), the stop event's, or the same lock taken by the
handler that the signal interrupts (SIGTERM to hawrap's process group comes twice to the
node process: from the kill, and forwarded by the supervisor).  A handler that takes such a
lock (``Queue.put``, ``Event.set``) waits for itself forever: the node never stops, and its
mirror processes go on after hawrap is killed.  Here the real signal is sent while the real
node object's locks are held, for both backends.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hawrap.demo import write_demo_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ETCD = """
[cluster]
name = "t"
backend = "etcd"
secret_file = "{root}/secret"
state_dir = "{root}/state/{{node}}"
[[link]]
name = "lan"
[[node]]
name = "n1"
lan_interface = "lo"
address = {{ lan = "127.0.0.11" }}
[[node]]
name = "n2"
lan_interface = "lo"
address = {{ lan = "127.0.0.12" }}
[[node]]
name = "n3"
lan_interface = "lo"
address = {{ lan = "127.0.0.13" }}
[etcd]
endpoints = ["http://127.0.0.1:9"]
"""

# Holds each lock the handler could want, sends itself SIGTERM, runs bytecodes (the handler
# runs there), lets go; then the loop must see the request.
SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from hawrap import cli, config
from mirror.sdnotify import SystemdNotifier
cfg = config.load({config!r})
if cfg.backend == "etcd":
    from hawrap.etcdnode import EtcdNode as Kind
else:
    from hawrap.node import Node as Kind
n = Kind(cfg, {node!r})
cli.stop_on_signals(n, SystemdNotifier.from_environment())
for lock in (n.events.mutex, n._stop._cond):
    with lock:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
    print("handled", flush=True)
print("stop requested" if n._stop_requested else "no stop request", flush=True)
"""


@pytest.mark.parametrize("backend", ["two-node", "etcd"])
def test_sigterm_while_the_loop_holds_its_locks_still_stops_the_node(tmp_path, backend):
    if backend == "etcd":
        (tmp_path / "secret").write_text("0123456789abcdef0123")
        (tmp_path / "secret").chmod(0o600)
        config, node = tmp_path / "h.toml", "n1"
        config.write_text(ETCD.format(root=tmp_path))
    else:
        config, node = write_demo_config(str(tmp_path)), "alpha"
    script = SCRIPT.format(root=ROOT, config=str(config), node=node)
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the signal handler waited for a lock its own thread held: {out!r} {err[-2000:]!r}")
    assert out.decode().split("\n") == ["handled", "handled", "stop requested", ""], err.decode()[-2000:]
