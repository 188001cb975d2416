"""Two real hawrap nodes on loopback (no root): election, kill -9 with supervisor cleanup,
administrator commands, notifications, and ``hawrap demo`` itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from hawrap.demo import DemoNode, role, wait_for, write_demo_config


@pytest.fixture
def cluster(tmp_path):
    notify_log = tmp_path / "notify.log"
    script = tmp_path / "notify.sh"
    script.write_text(f'#!/bin/sh\necho "$2 $3 $4 $HAWRAP_EVENT" >> {notify_log}\n')
    script.chmod(0o755)
    config = write_demo_config(str(tmp_path), extra=f'\n[notify]\ncommand = ["{script}"]\n')
    nodes = {n: DemoNode(config, n, str(tmp_path)) for n in ("alpha", "beta")}
    for n in nodes.values():
        n.start()
    try:
        assert wait_for(
            lambda: role(nodes["alpha"]) == "primary" and role(nodes["beta"]) == "secondary", 20
        ), _logs(tmp_path)
        yield nodes, tmp_path, notify_log
    finally:
        for n in nodes.values():
            n.stop()


def _logs(tmp_path):
    return "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("*.log"))


def _peer_seen_by(node) -> dict:
    """The peer's state as ``node`` last heard it (its status file), or {}."""
    return node.status().get("peer") or {}


def serving(tmp_path, name):
    return (tmp_path / name / "dummy-vip").exists(), (tmp_path / name / "service.running").exists()


def test_home_node_wins_the_cold_start_and_status_json(cluster):
    nodes, tmp_path, notify_log = cluster
    assert serving(tmp_path, "alpha") == (True, True) and serving(tmp_path, "beta") == (False, False)
    # beta learns alpha's new role from alpha's next heartbeat, and writes its status file after.
    assert wait_for(lambda: (nodes["beta"].status().get("peer") or {}).get("role") == "primary", 5), _logs(
        tmp_path
    )
    r = nodes["beta"].command("status", "--json")
    st = json.loads(r.stdout)
    assert r.returncode == 0 and st["role"] == "secondary" and st["peer"]["role"] == "primary"
    assert st["links"] == {"hb": True, "lan": True} and st["lan"]["ok"] is True
    assert wait_for(
        lambda: notify_log.exists() and "demo/alpha MASTER 1 takeover" in notify_log.read_text(), 5
    )


def test_kill9_of_the_node_process_is_cleaned_up_by_the_supervisor(cluster):
    nodes, tmp_path, _ = cluster
    pid = nodes["alpha"].status()["pid"]
    os.kill(pid, signal.SIGKILL)
    # the supervisor removes the VIP and stops the service before anything else
    assert wait_for(lambda: serving(tmp_path, "alpha") == (False, False), 5), _logs(tmp_path)
    assert wait_for(lambda: role(nodes["beta"]) == "primary", 5)
    assert serving(tmp_path, "beta") == (True, True)
    # the restarted node process sees it missed a takeover: standby, not a second primary
    assert wait_for(lambda: role(nodes["alpha"]) == "standby", 10), _logs(tmp_path)
    assert nodes["alpha"].status()["pid"] != pid
    assert serving(tmp_path, "alpha") == (False, False)
    assert "cleanup (node process" in (tmp_path / "alpha.log").read_text()


def test_a_frozen_node_process_is_replaced_by_its_supervisor(cluster):
    """SIGSTOP of the node process (its heartbeat process runs on): its keepalives stop, the
    supervisor kills it after timing.watchdog, cleans up, says so, and starts a new one."""
    nodes, tmp_path, notify_log = cluster
    pid = nodes["alpha"].status()["pid"]
    os.kill(pid, signal.SIGSTOP)
    assert wait_for(lambda: serving(tmp_path, "alpha") == (False, False), 10), _logs(tmp_path)
    assert wait_for(lambda: role(nodes["beta"]) == "primary", 10), _logs(tmp_path)
    assert wait_for(lambda: notify_log.exists() and "watchdog" in notify_log.read_text(), 5)
    assert wait_for(lambda: role(nodes["alpha"]) in ("standby", "secondary"), 10), _logs(tmp_path)
    assert nodes["alpha"].status()["pid"] != pid
    assert not os.path.exists(f"/proc/{pid}")  # killed, not left frozen


def test_standby_resume_failover_failback(cluster):
    nodes, tmp_path, notify_log = cluster
    alpha, beta = nodes["alpha"], nodes["beta"]
    r = alpha.command("standby", "--reason", "disk check")
    # the primary hands over first (a planned switchover), then stands by
    assert r.returncode == 0 and "releasing" in r.stdout and "beta took over" in r.stdout, r.stdout
    assert role(alpha) == "standby" and role(beta) == "primary"
    assert serving(tmp_path, "alpha") == (False, False)
    lock = json.loads(alpha.command("status", "--json").stdout)["standby_lock"]
    assert lock["reason"] == "disk check"
    # failover is refused while the peer is in standby
    r = beta.command("failover")
    assert r.returncode == 1 and "refused" in r.stderr
    r = alpha.command("resume")
    assert r.returncode == 0 and "secondary" in r.stdout
    assert wait_for(lambda: role(alpha) == "secondary", 5)
    # beta hands over only to a healthy secondary: it learns that alpha is one from alpha's
    # next heartbeat, not when alpha says so locally.
    assert wait_for(
        lambda: _peer_seen_by(beta).get("role") == "secondary" and not _peer_seen_by(beta).get("standby"), 5
    )
    r = beta.command("failover")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: role(alpha) == "primary" and role(beta) == "secondary", 10)
    assert serving(tmp_path, "alpha") == (True, True) and serving(tmp_path, "beta") == (False, False)
    r = alpha.command("failback")
    assert r.returncode == 1 and "home node" in r.stderr
    events = notify_log.read_text()
    assert "standby" in events and "releasing" in events


def test_standby_says_in_its_exit_status_whether_anyone_serves(cluster):
    """``hawrap standby`` exits 0 only when another node serves afterwards: on the secondary
    while the primary serves, 0 at once; on the primary whose peer is gone (its hawrap
    stopped), the primary stands by all the same, services down, and exits 4 naming the peer
    and what to do, so that ``hawrap standby && reboot`` does not take the last server down
    unknowingly."""
    nodes, tmp_path, _ = cluster
    alpha, beta = nodes["alpha"], nodes["beta"]
    assert wait_for(lambda: _peer_seen_by(beta).get("role") == "primary", 5), _logs(tmp_path)
    r = beta.command("standby")
    assert r.returncode == 0 and "nobody serves" not in r.stderr, r.stdout + r.stderr
    assert role(beta) == "standby" and serving(tmp_path, "alpha") == (True, True)
    beta.stop()
    assert wait_for(lambda: _peer_seen_by(alpha).get("alive") is False, 10), _logs(tmp_path)
    r = alpha.command("standby", "--reason", "disk check")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "nobody serves: beta is silent" in r.stderr and "hawrap resume" in r.stderr, r.stderr
    assert role(alpha) == "standby" and serving(tmp_path, "alpha") == (False, False)
    r = alpha.command("resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert wait_for(lambda: role(alpha) == "primary" and serving(tmp_path, "alpha") == (True, True), 10), _logs(tmp_path)


def test_one_instance_per_node_and_no_cleanup_under_a_live_one(cluster):
    nodes, tmp_path, _ = cluster
    alpha = nodes["alpha"]
    r = subprocess.run(
        [sys.executable, "-m", "hawrap", "run", "--config", alpha.config, "--node", "alpha"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "already runs for this node" in r.stderr
    r = alpha.command("cleanup")
    assert r.returncode == 2 and "--force" in r.stderr
    assert serving(tmp_path, "alpha") == (True, True) and role(alpha) == "primary"


def test_commands_when_not_running(tmp_path):
    config = write_demo_config(str(tmp_path))
    node = DemoNode(config, "alpha", str(tmp_path))
    r = node.command("status")
    assert r.returncode == 3 and "not running" in r.stdout
    for command in ("force-primary", "failover", "failback"):  # a bad --wait is a usage error, not a traceback
        r = node.command(command, "--wait", "-1")
        assert r.returncode == 2 and "--wait: expected seconds (0 or more), got '-1'" in r.stderr, r.stderr
    r = node.command("standby")
    assert r.returncode == 0 and (tmp_path / "alpha" / "standby.lock").exists()
    r = node.command("resume")
    assert r.returncode == 0 and not (tmp_path / "alpha" / "standby.lock").exists()
    (tmp_path / "alpha").mkdir(exist_ok=True)
    (tmp_path / "alpha" / "dummy-vip").write_text("x")
    r = node.command("cleanup")
    assert r.returncode == 0 and not (tmp_path / "alpha" / "dummy-vip").exists()


def test_bad_config_is_a_clear_error(tmp_path):
    (tmp_path / "h.toml").write_text("[cluster]\n")
    r = subprocess.run(
        [sys.executable, "-m", "hawrap", "status", "--config", str(tmp_path / "h.toml"), "--node", "a"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "cluster.name: missing" in r.stderr


def test_hawrap_demo():
    """The demo needs no privilege: loopback links, a dummy VIP, no ping node."""
    r = subprocess.run([sys.executable, "-m", "hawrap", "demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "took over in" in r.stdout and "summary: alpha primary, beta secondary" in r.stdout


def test_status_shows_each_service_state_and_failures(cluster):
    nodes, tmp_path, _ = cluster
    marker = tmp_path / "alpha" / "service.running"

    def service(node):
        st = json.loads(nodes[node].command("status", "--json").stdout)
        return st["services"][0]

    assert wait_for(
        lambda: service("alpha") == {"name": "demo-service", "state": "running", "failures": 0}, 10
    )
    assert service("beta")["state"] == "stopped"
    marker.unlink()  # the service dies: the monitor finds it, counts it, restarts it
    assert wait_for(lambda: service("alpha")["failures"] == 1 and marker.exists(), 10), _logs(tmp_path)
    assert wait_for(lambda: service("alpha")["state"] == "running", 10)
    text = nodes["alpha"].command("status").stdout
    assert "service demo-service: running, 1 failures" in text, text
