"""Every bad input gives exit code 1 or 2 and one line on stderr naming the problem, never a traceback."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import FAST_ARGS, run_cli

UNKNOWN_PEER = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"  # well-formed, nobody has it


def assert_one_line_error(result, exit_code: int, *needles: str) -> None:
    assert result.returncode == exit_code, (result.returncode, result.stderr[-1500:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-1500:]
    assert lines[0].startswith("swarmnode: error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def run_node(home, *args, env=None):
    return run_cli("run", "--home", str(home), "--log-level", "ERROR", *FAST_ARGS, *args, env=env)


@pytest.mark.parametrize(
    "addr, needle",
    [
        ("not-a-multiaddr", "invalid --join address"),
        ("/ip4/127.0.0.1/tcp/4001", "must end in /p2p/"),
        ("/ip4/127.0.0.1/tcp/4001/p2p/QmNotEd25519", "invalid --join address"),
        ("/ip4/999.1.1.1/tcp/1/p2p/" + UNKNOWN_PEER, "invalid --join address"),
    ],
)
def test_invalid_join_multiaddr(tmp_path, addr, needle):
    assert_one_line_error(run_node(tmp_path / "n", "--join", addr), 2, needle)


def test_unreachable_bootstrap_peer_retries_then_exits_2(tmp_path):
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{UNKNOWN_PEER}"
    result = run_node(tmp_path / "n", "--listen", "/ip4/127.0.0.1/tcp/0", "--join", addr,
                      "--join-attempts", "2", "--join-backoff", "0.1")
    assert_one_line_error(result, 2, "could not reach any bootstrap peer after 2 attempts", addr)


def test_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run_node(tmp_path / "n", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert_one_line_error(result, 2, f"port {port}", "already in use")


def test_invalid_listen_address(tmp_path):
    assert_one_line_error(run_node(tmp_path / "n", "--listen", "/ip4/127.0.0.1/udp/0"), 2, "invalid --listen address")


def test_key_readable_by_others_is_refused(tmp_path):
    home = tmp_path / "n"
    home.mkdir()
    key = home / "identity.key"
    key.write_text("whatever")
    os.chmod(key, 0o644)
    assert_one_line_error(run_node(home), 2, "readable by others", "chmod 600")


def test_corrupt_key_is_refused(tmp_path):
    home = tmp_path / "n"
    home.mkdir()
    key = home / "identity.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    os.chmod(key, 0o600)
    assert_one_line_error(run_node(home), 2, "corrupt")
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\ngarbage")  # nothing overwritten


def test_missing_explicit_key_file_directory_is_created(tmp_path):
    """A missing key is not an error: it is created on first run (mode 0600) at the configured path."""
    from node.runtime.identity import load_or_create_key

    _, created = load_or_create_key(tmp_path / "deep" / "dir" / "id.key")
    assert created and (tmp_path / "deep" / "dir" / "id.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("command", ["status", "peers", "leave"])
def test_cli_without_a_running_daemon(tmp_path, command):
    assert_one_line_error(run_cli(command, "--home", str(tmp_path / "nobody")), 1, "no swarmnode daemon is running")


def test_cli_with_a_stale_socket(tmp_path):
    home = tmp_path / "stale"
    home.mkdir()
    with socket.socket(socket.AF_UNIX) as s:  # a socket file nobody listens on (daemon was SIGKILLed)
        s.bind(str(home / "control.sock"))
    assert_one_line_error(run_cli("status", "--home", str(home)), 1, "not answering")


def test_bad_config_value(tmp_path):
    env = dict(os.environ, SWARMNODE_HEARTBEAT="soon")
    assert_one_line_error(run_node(tmp_path / "n", env=env), 2, "SWARMNODE_HEARTBEAT")


def test_second_daemon_on_the_same_home_is_refused(node_factory, tmp_path):
    first = node_factory("shared", ["--listen", "/ip4/127.0.0.1/tcp/0"]).wait_ready()
    result = run_node(first.home, "--listen", "/ip4/127.0.0.1/tcp/0")
    assert_one_line_error(result, 2, "already running", str(first.proc.pid))
    assert (first.home / "control.sock").exists() and (first.home / "node.json").exists()  # untouched
