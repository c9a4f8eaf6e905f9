"""node/runtime/config.py: flag > env > TOML > default, and a one-line NodeError (exit 2) for every bad input.

Every test passes an explicit env dict; os.environ is never read.
"""

from __future__ import annotations

import pathlib

import pytest

from node.runtime.config import NodeConfig, resolve
from node.runtime.errors import EXIT_USAGE, NodeError

JOIN_TOML = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooWtoml"
JOIN_ENV = ("/ip4/198.51.100.1/tcp/1/p2p/12D3KooWenv1", "/ip4/198.51.100.2/tcp/2/p2p/12D3KooWenv2")
JOIN_FLAG = ["/ip4/192.0.2.1/tcp/9/p2p/12D3KooWflag"]


def write_toml(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def assert_usage_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    e = excinfo.value
    assert e.exit_code == EXIT_USAGE == 2
    message = str(e)
    assert message and "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.fixture
def toml_file(tmp_path):
    return write_toml(tmp_path, f'swarm = "from-toml"\nheartbeat = 4\njoin = ["{JOIN_TOML}"]\n')


# ---- precedence ----------------------------------------------------------------------------------------


def test_defaults():
    config = resolve({}, env={})
    assert config == NodeConfig()
    assert config.swarm == "default" and config.join == () and config.heartbeat == 10.0


def test_toml_over_default(toml_file):
    config = resolve({}, env={}, config_file=toml_file)
    assert config.swarm == "from-toml"
    assert config.heartbeat == 4.0 and isinstance(config.heartbeat, float)
    assert config.join == (JOIN_TOML,)
    assert config.ttl == 30.0  # untouched fields keep their default


def test_env_over_toml(toml_file):
    env = {"SWARMNODE_SWARM": "from-env", "SWARMNODE_HEARTBEAT": "5.5", "SWARMNODE_JOIN": ",".join(JOIN_ENV)}
    config = resolve({}, env=env, config_file=toml_file)
    assert config.swarm == "from-env"
    assert config.heartbeat == 5.5
    assert config.join == JOIN_ENV


def test_flag_over_env(toml_file):
    env = {"SWARMNODE_SWARM": "from-env", "SWARMNODE_HEARTBEAT": "5.5", "SWARMNODE_JOIN": ",".join(JOIN_ENV)}
    flags = {"swarm": "from-flag", "heartbeat": 2.0, "join": JOIN_FLAG}
    config = resolve(flags, env=env, config_file=toml_file)
    assert config.swarm == "from-flag"
    assert config.heartbeat == 2.0
    assert config.join == tuple(JOIN_FLAG)


def test_none_flags_are_not_given(toml_file):
    # argparse leaves flags the user did not give as None; they must not hide env or TOML values
    flags = {"swarm": None, "heartbeat": None, "join": None}
    config = resolve(flags, env={"SWARMNODE_SWARM": "from-env"}, config_file=toml_file)
    assert config.swarm == "from-env"
    assert config.heartbeat == 4.0
    assert config.join == (JOIN_TOML,)


def test_unrelated_flags_ignored():
    config = resolve({"nodes": 4, "demo": True, "swarm": "x"}, env={})
    assert config.swarm == "x"


def test_env_list_is_comma_separated_and_trimmed():
    env = {"SWARMNODE_LISTEN": " /ip4/0.0.0.0/tcp/1 , ,/ip6/::/tcp/1,", "SWARMNODE_ANNOUNCE": ""}
    config = resolve({}, env=env)
    assert config.listen == ("/ip4/0.0.0.0/tcp/1", "/ip6/::/tcp/1")
    assert config.announce == ()


def test_env_empty_list_overrides_toml(tmp_path):
    path = write_toml(tmp_path, f'join = ["{JOIN_TOML}"]\n')
    assert resolve({}, env={"SWARMNODE_JOIN": ""}, config_file=path).join == ()


def test_config_file_from_env(toml_file):
    config = resolve({}, env={"SWARMNODE_CONFIG": str(toml_file)})
    assert config.swarm == "from-toml"


def test_explicit_config_file_wins_over_env_config(toml_file, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text('swarm = "other"\n')
    assert resolve({}, env={"SWARMNODE_CONFIG": str(other)}, config_file=toml_file).swarm == "from-toml"


def test_types_converted():
    env = {"SWARMNODE_JOIN_ATTEMPTS": "7", "SWARMNODE_HOME": "/tmp/somewhere", "SWARMNODE_IDENTITY": "/tmp/id.key"}
    config = resolve({"ttl": "60"}, env=env)
    assert config.join_attempts == 7 and isinstance(config.join_attempts, int)
    assert config.home == pathlib.Path("/tmp/somewhere")
    assert config.identity_path == pathlib.Path("/tmp/id.key")
    assert config.ttl == 60.0


def test_paths_derive_from_home(tmp_path):
    config = resolve({"home": str(tmp_path)}, env={})
    assert config.identity_path == tmp_path / "identity.key"
    assert config.socket_path == tmp_path / "control.sock"
    assert config.token_path == tmp_path / "control.token"
    assert config.state_path == tmp_path / "node.json"


@pytest.mark.parametrize("control", ["unix", "tcp://127.0.0.1:5000", "tcp://localhost:0", "tcp://[::1]:5000"])
def test_loopback_control_accepted(control):
    assert resolve({"control": control}, env={}).control == control


# ---- errors --------------------------------------------------------------------------------------------


def test_unknown_toml_key(tmp_path):
    path = write_toml(tmp_path, 'swarm = "x"\nhearbeat = 5\n')
    with pytest.raises(NodeError) as excinfo:
        resolve({}, env={}, config_file=path)
    assert_usage_error(excinfo, "unknown key", "'hearbeat'")


@pytest.mark.parametrize("text", ["swarm = \n", "swarm = 'a'\nswarm = 'b'\n", "[[[", "heartbeat = 1.0.0\n"])
def test_invalid_toml(tmp_path, text):
    path = write_toml(tmp_path, text)
    with pytest.raises(NodeError) as excinfo:
        resolve({}, env={}, config_file=path)
    assert_usage_error(excinfo, "not valid TOML", str(path))


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(NodeError) as excinfo:
        resolve({}, env={}, config_file=path)
    assert_usage_error(excinfo, "does not exist", str(path))


def test_missing_config_file_from_env(tmp_path):
    with pytest.raises(NodeError) as excinfo:
        resolve({}, env={"SWARMNODE_CONFIG": str(tmp_path / "absent.toml")})
    assert_usage_error(excinfo, "does not exist")


@pytest.mark.parametrize(
    "name, value",
    [
        ("SWARMNODE_HEARTBEAT", "fast"),
        ("SWARMNODE_TTL", ""),
        ("SWARMNODE_JOIN_ATTEMPTS", "2.5"),
        ("SWARMNODE_JOIN_ATTEMPTS", "five"),
        ("SWARMNODE_JOIN_BACKOFF", "1s"),
        ("SWARMNODE_HEARTBEAT", "1\n2"),
    ],
)
def test_bad_number_in_env(name, value):
    with pytest.raises(NodeError) as excinfo:
        resolve({}, env={name: value})
    assert_usage_error(excinfo, name, "invalid value")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("heartbeat = true\n", "heartbeat"),
        ("heartbeat = [1.0]\n", "heartbeat"),
        ("join_attempts = 2.5\n", "join_attempts"),
        ("join_attempts = false\n", "join_attempts"),
        ("join = [1, 2]\n", "join"),
        ("join = 3\n", "join"),
        ("swarm = 5\n", "swarm"),
        ("home = 5\n", "home"),
    ],
)
def test_bad_types_in_toml(tmp_path, text, fragment):
    path = write_toml(tmp_path, text)
    with pytest.raises(NodeError) as excinfo:
        resolve({}, env={}, config_file=path)
    assert_usage_error(excinfo, fragment, "invalid value", str(path))


@pytest.mark.parametrize(
    "flags, env",
    [
        ({"heartbeat": 10.0, "ttl": 10.0}, {}),
        ({"heartbeat": 20.0, "ttl": 10.0}, {}),
        ({}, {"SWARMNODE_HEARTBEAT": "30"}),  # default ttl is 30
        ({"ttl": 5.0}, {}),  # default heartbeat is 10
    ],
)
def test_ttl_not_longer_than_heartbeat(flags, env):
    with pytest.raises(NodeError) as excinfo:
        resolve(flags, env=env)
    assert_usage_error(excinfo, "ttl", "heartbeat")


@pytest.mark.parametrize(
    "flags",
    [{"heartbeat": 0.0}, {"heartbeat": -1.0}, {"join_attempts": 0}, {"join_backoff": -1.0}, {"log_level": "LOUD"}],
    ids=lambda f: next(iter(f)),
)
def test_other_bad_values(flags):
    with pytest.raises(NodeError) as excinfo:
        resolve(flags, env={})
    assert_usage_error(excinfo, "bad configuration")


@pytest.mark.parametrize("swarm", ["", "has space", "slash/ed", "a" * 65, "ünïcode-ok?", "new\nline"])
def test_bad_swarm_name(swarm):
    with pytest.raises(NodeError) as excinfo:
        resolve({"swarm": swarm}, env={})
    assert_usage_error(excinfo, "swarm name")


def test_swarm_name_limits_accepted():
    assert resolve({"swarm": "a" * 64}, env={}).swarm == "a" * 64
    assert resolve({"swarm": "A-z_0.9"}, env={}).swarm == "A-z_0.9"


@pytest.mark.parametrize(
    "control",
    ["tcp://0.0.0.0:5000", "tcp://192.168.1.5:5000", "tcp://127.0.0.1.evil.example:80", "tcp://:5000", "tcp://localhost"],
)
def test_non_loopback_tcp_control(control):
    with pytest.raises(NodeError) as excinfo:
        resolve({"control": control}, env={})
    assert_usage_error(excinfo, "loopback")


def test_non_loopback_tcp_control_from_env():
    with pytest.raises(NodeError) as excinfo:
        resolve({}, env={"SWARMNODE_CONTROL": "tcp://10.0.0.1:1"})
    assert_usage_error(excinfo, "loopback")


@pytest.mark.parametrize("control", ["http://127.0.0.1:5000", "socket", ""])
def test_unknown_control_scheme(control):
    with pytest.raises(NodeError) as excinfo:
        resolve({"control": control}, env={})
    assert_usage_error(excinfo, "control must be")


def test_a_home_too_deep_for_a_unix_socket_is_a_one_line_error(tmp_path):
    """grpc would fail to bind <home>/control.sock with a traceback (a unix socket path holds 107 bytes)."""
    deep = tmp_path / ("d" * (120 - len(str(tmp_path))))
    with pytest.raises(NodeError) as excinfo:
        resolve({"home": str(deep)}, env={})
    assert_usage_error(excinfo, "over the 107 a unix socket path allows", "--control tcp://127.0.0.1:PORT")
    assert resolve({"home": str(deep), "control": "tcp://127.0.0.1:5000"}, env={}).home == deep  # tcp: no socket
