"""A clean stop prints nothing alarming: three real nodes (one started alone, two joining it) stopped with SIGINT,
SIGTERM and `swarmnode leave` each exit 0 within 5 s, leave no p2pd and no socket file in /tmp behind, and
log no "Traceback" and no "Unhandled exception".

hivemind's client reads every connection to its unix socket (/tmp/hivemind-p2pclient-*.sock) as a stream p2pd
hands over, and logs "Unhandled exception in client_connected_cb ... IncompleteReadError" for one that closes
first. A node starting in another network namespace on the same machine (the netns testbed, `ip netns exec`)
sees none of our sockets in its /proc/net/unix and used to probe them all with a connection when it swept /tmp
for stale sockets: one traceback per live node per such start, found in every log at the node's stop. While
the nodes run, this test does that sweep (node/runtime/p2pd.py sweep_stale_sockets, as every node runs at start-up) from
a fresh network namespace, over these nodes' sockets only, aged past the sweep's 60 s; it must remove none of them
and disturb none of the nodes. Without root (no `unshare --net`) that step is left out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from node.runtime.p2pd import sweep_stale_sockets
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.timeout(120)
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
EXIT_WITHIN_S = 5.0


def other_netns_prefix() -> list[str] | None:
    """A command prefix that runs a program in a fresh network namespace, or None where that is not allowed."""
    try:
        ok = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ["unshare", "--net"] if ok else None


def p2pd_of(node) -> psutil.Process:
    (p2pd,) = [p for p in node.descendants() if p.name() == "p2pd"]
    return p2pd


def sockets_of(node) -> list[str]:
    """The unix socket files this node listens on in /tmp: its p2pd's control socket and hivemind's client one."""
    paths = [c.laddr for p in (psutil.Process(node.proc.pid), p2pd_of(node))
             for c in p.net_connections(kind="unix") if c.laddr and c.laddr.startswith("/tmp/")]
    assert any("/swarmnode-p2pd-" in p for p in paths) and any("/hivemind-p2pclient-" in p for p in paths), paths
    return sorted(set(paths))


def sweep_from_another_netns(prefix: list[str], paths: list[str]) -> int:
    """What a node starting in another network namespace does to /tmp, over ``paths`` only."""
    code = "import sys; from node.runtime.p2pd import sweep_stale_sockets; print(sweep_stale_sockets(sys.argv[1:]))"
    result = subprocess.run([*prefix, sys.executable, "-c", code, *paths], capture_output=True, text=True,
                            timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip())


def wait_exit(node, what: str) -> float:
    t0 = time.monotonic()
    try:
        node.proc.wait(EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{node.home.name} did not exit within {EXIT_WITHIN_S:.0f} s of {what}: {node.log_tail()}")
    return time.monotonic() - t0


def test_nodes_stopped_by_sigint_sigterm_and_leave_exit_quietly(node_factory):
    first = node_factory("first", ["--listen", LOOPBACK, "--swarm", "clean"]).wait_ready()
    joiners = [node_factory(name, ["--listen", LOOPBACK, "--swarm", "clean", "--join", first.addr])
               for name in ("second", "third")]
    nodes = [first, *[n.wait_ready() for n in joiners]]
    p2pds = [p2pd_of(n) for n in nodes]
    sockets = [path for n in nodes for path in sockets_of(n)]

    prefix = other_netns_prefix()
    if prefix is not None:
        old = time.time() - 120  # as if the nodes had been up for two minutes: past the sweep's 60 s
        for path in sockets:
            os.utime(path, (old, old), follow_symlinks=False)
        assert sweep_from_another_netns(prefix, sockets) == 0
        assert all(os.path.exists(p) for p in sockets)

    first.send(signal.SIGINT)
    wait_exit(first, "SIGINT")
    nodes[1].send(signal.SIGTERM)
    wait_exit(nodes[1], "SIGTERM")
    left = run_cli("leave", "--home", str(nodes[2].home))
    assert left.returncode == 0, left.stderr[-2000:]
    wait_exit(nodes[2], "swarmnode leave")

    _, alive = psutil.wait_procs(p2pds, timeout=EXIT_WITHIN_S)
    assert not alive, f"p2pd outlived its node: {[p.pid for p in alive]}"
    assert [n.proc.returncode for n in nodes] == [0, 0, 0], [n.log_tail() for n in nodes]
    assert not [p for p in sockets if os.path.exists(p)], "a stopped node left its socket file in /tmp"
    for n in nodes:
        log = n.log_path.read_text(errors="replace")
        assert "Traceback" not in log and "Unhandled exception" not in log, f"{n.home.name}:\n{log[-4000:]}"


def test_the_sweep_never_connects_to_a_live_client_socket_and_still_removes_dead_ones(tmp_path):
    """hivemind's client socket, live in this namespace, is seen bound from another one and never connected to;
    a dead one (its node SIGKILLed) goes, here and from another namespace."""
    live_path = tmp_path / "hivemind-p2pclient-live.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(live_path))
    live.listen()
    live.setblocking(False)
    dead_paths = [tmp_path / f"hivemind-p2pclient-dead{i}.sock" for i in range(2)]
    try:
        for path in dead_paths:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(str(path))
        old = time.time() - 120
        for path in [live_path, *dead_paths]:
            os.utime(path, (old, old), follow_symlinks=False)
        assert sweep_stale_sockets([str(dead_paths[0]), str(live_path)]) == 1
        prefix = other_netns_prefix()
        if prefix is not None:
            assert sweep_from_another_netns(prefix, [str(dead_paths[1]), str(live_path)]) == 1
        assert not any(p.exists() for p in dead_paths[: 2 if prefix is not None else 1])
        assert live_path.exists()
        try:
            knocked, _ = live.accept()
        except BlockingIOError:
            knocked = None
        else:
            knocked.close()
        assert knocked is None, "the sweep connected to a live hivemind client socket"
    finally:
        live.close()
