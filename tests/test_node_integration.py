"""Real node processes (python + p2pd each) on loopback: join, peers, leave, signals, churn."""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import sys
import time

import pytest

from node.devtools.localswarm import wait_for
from tests.conftest import run_cli

TTL, HEARTBEAT = 3.0, 1.0  # as in FAST_ARGS


def test_first_node_prints_joinable_multiaddr_and_status(node_factory):
    node = node_factory("first", ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "alpha"]).wait_ready()
    assert node.addr.startswith("/ip4/127.0.0.1/tcp/") and node.addr.endswith(f"/p2p/{node.peer_id}")
    assert node.peer_id.startswith("12D3KooW")
    # the line a newcomer copies: printed just after node.json is written (which wait_ready sees)
    wait_for(lambda: f"--join {node.addr}" in node.log_path.read_text(), 10, "the join line in the log")
    status = run_cli("status", "--home", str(node.home), "--json")
    assert status.returncode == 0, status.stderr
    s = json.loads(status.stdout)
    assert s["peer_id"] == node.peer_id and s["swarm"] == "alpha" and s["pid"] == node.proc.pid
    assert s["capability"]["cpu_cores"] >= 1 and s["capability"]["tflops_fp32"] > 0
    # the dashboard's URL, as the banner and node.json give it, in status and its table
    assert s["dashboard"] == json.loads((node.home / "node.json").read_text())["dashboard"]
    assert s["dashboard"].startswith("http://127.0.0.1:")
    assert f"dashboard  {s['dashboard']}" in run_cli("status", "--home", str(node.home)).stdout
    # the key and the control socket are private to the user
    assert stat.S_IMODE(os.stat(node.home / "identity.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(node.home / "control.sock").st_mode) == 0o600
    # the printed join command runs as printed: this very program (not a bare `swarmnode` that may not be on
    # PATH), a home of its own, the swarm and the address
    line = next(line for line in node.log_path.read_text().splitlines() if f"--join {node.addr}" in line)
    argv = shlex.split(line)
    assert argv[:4] == [sys.executable, "-m", "node.cli", "run"], argv
    rest = argv[4:]
    assert rest[:2] == ["--home", f"{node.home}-2"] and rest[2:] == ["--swarm", "alpha", "--join", node.addr], rest
    joiner = node_factory(f"{node.home.name}-2", [*rest[2:], "--listen", "/ip4/127.0.0.1/tcp/0"]).wait_ready()
    wait_for(lambda: node.peer_ids() == {node.peer_id, joiner.peer_id}, 20, "the joiner to be listed")
    talk = next(line for line in node.log_path.read_text().splitlines() if line.startswith("talk to it:"))
    assert f"{sys.executable} -m node.cli status|peers|jobs|leave --home {node.home}" in talk


def test_nodes_join_and_list_each_other(swarm_factory):
    swarm = swarm_factory(3)
    swarm.wait_converged(timeout=20)
    result = run_cli("peers", "--home", str(swarm.nodes[1].home), "--json")
    assert result.returncode == 0, result.stderr
    peers = json.loads(result.stdout)
    assert {p["peer_id"] for p in peers} == {n.peer_id for n in swarm.nodes}
    assert sum(p["is_self"] for p in peers) == 1
    for p in peers:
        assert p["capability"]["gpus"] == [] and p["capability"]["ram_bytes"] > 0 and p["version"]
        assert p["addrs"][0].endswith(p["peer_id"]) and p["expires_at"] > p["last_seen"]
    table = run_cli("peers", "--home", str(swarm.nodes[2].home))
    assert table.returncode == 0 and "PEER ID" in table.stdout and "none (CPU only)" in table.stdout
    assert "3 node(s)" in table.stdout


@pytest.mark.slow  # ~16 s, in `make chaos` (CI's own step): `make test` measured 10:53 on 2 cores
def test_node_joins_with_several_bootstrap_addresses_and_survives_their_death(swarm_factory):
    swarm = swarm_factory(2)
    a, b = swarm.nodes
    c = swarm.add_node(join=[a.addr, b.addr]).wait_ready()
    d = swarm.add_node(join=[a.addr]).wait_ready()
    swarm.wait_converged(timeout=20)
    a.kill_hard()  # the bootstrap peer of every node dies
    wait_for(lambda: c.peer_ids() == {b.peer_id, c.peer_id, d.peer_id}, TTL + HEARTBEAT + 20, "a to vanish from c")
    # the survivors stay a swarm: fresh heartbeats keep flowing between them
    t0 = time.time()
    wait_for(lambda: all(p.last_seen > t0 for p in d.client().peers().peers), 15, "fresh records on d")
    assert d.peer_ids() == {b.peer_id, c.peer_id, d.peer_id}


def test_sigkilled_node_disappears_within_ttl_and_restarts_with_same_peer_id(swarm_factory):
    swarm = swarm_factory(3)
    swarm.wait_converged(timeout=20)
    a, b, c = swarm.nodes
    p2pd_of_b = [p for p in b.descendants() if p.name() == "p2pd"]
    assert p2pd_of_b, "every node runs its own p2pd"
    killed_at = time.monotonic()
    b.kill_hard()
    assert not any(p.is_running() and p.status() != "zombie" for p in p2pd_of_b), "p2pd outlived its node"
    wait_for(lambda: b.peer_id not in a.peer_ids(), TTL + HEARTBEAT + 5, "the killed node to leave a's peers")
    assert time.monotonic() - killed_at <= TTL + HEARTBEAT + 5
    assert b.peer_id not in c.peer_ids()
    restarted = swarm.add_node(home=b.home).wait_ready()
    assert restarted.peer_id == b.peer_id
    wait_for(lambda: b.peer_id in a.peer_ids(), 15, "the restarted node to reappear")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_node_within_5s_and_withdraws_its_record(swarm_factory, sig):
    swarm = swarm_factory(2)
    swarm.wait_converged(timeout=20)
    a, b = swarm.nodes
    p2pds = [p for p in b.descendants() if p.name() == "p2pd"]
    t0 = time.monotonic()
    b.send(sig)
    assert b.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5.0
    assert not any(p.is_running() and p.status() != "zombie" for p in p2pds)
    assert not (b.home / "control.sock").exists() and not (b.home / "node.json").exists()
    # the tombstone removes it at once, well before its TTL would
    assert b.peer_id not in a.peer_ids()


def test_leave_withdraws_record_and_ends_process(swarm_factory):
    swarm = swarm_factory(2)
    swarm.wait_converged(timeout=20)
    a, b = swarm.nodes
    result = run_cli("leave", "--home", str(b.home), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"withdrawn": True}
    assert b.proc.wait(10) == 0
    assert a.peer_ids() == {a.peer_id}


def test_control_api_over_loopback_tcp_requires_the_token(node_factory):
    node = node_factory("tcp", ["--listen", "/ip4/127.0.0.1/tcp/0", "--control", "tcp://127.0.0.1:0"]).wait_ready()
    assert node.state["control"].startswith("tcp://127.0.0.1:")
    assert stat.S_IMODE(os.stat(node.home / "control.token").st_mode) == 0o600
    ok = run_cli("status", "--home", str(node.home), "--control", "tcp://127.0.0.1:0", "--json")
    assert ok.returncode == 0, ok.stderr
    (node.home / "control.token").write_text("wrong")
    denied = run_cli("status", "--home", str(node.home), "--control", "tcp://127.0.0.1:0")
    assert denied.returncode == 1 and "token" in denied.stderr and "Traceback" not in denied.stderr


def test_config_file_and_environment(node_factory, tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('swarm = "from-file"\nlisten = ["/ip4/127.0.0.1/tcp/0"]\nheartbeat = 1.0\nttl = 3.0\n')
    env = dict(os.environ, SWARMNODE_CONFIG=str(config), SWARMNODE_SWARM="from-env")
    node = node_factory("cfg", ["--benchmark-seconds", "0.05"], env=env, fast=False).wait_ready()
    assert node.state["swarm"] == "from-env"  # env beats the file
    assert node.addr.startswith("/ip4/127.0.0.1/")  # the file's listen address applied


def test_dev_swarm_demo_starts_and_stops_nodes(tmp_path):
    result = run_cli("dev-swarm", "--nodes", "3", "--demo", "--dir", str(tmp_path / "dev"), timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 node(s)" in result.stdout and "stopped 3 nodes" in result.stdout
