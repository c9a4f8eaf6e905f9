"""Node configuration from flags, SWARMNODE_* environment variables and an optional TOML file.

Precedence, highest first: command-line flag > environment variable > TOML file > default.
The TOML file is ``--config PATH`` (or SWARMNODE_CONFIG); its keys are the field names below, e.g.

    swarm = "demo"
    listen = ["/ip4/0.0.0.0/tcp/31337"]
    join = ["/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW..."]
    heartbeat = 10.0
    accept_jobs_from = "members"  # or "self", "anyone", or a list: ["self", "12D3KooW..."]
    max_jobs = 2                  # and max_job_memory = "8GiB", max_job_steps, max_job_hours, cpu_threads, ...

    [datasets.churn]              # own data under a dataset name (as `swarmnode data add churn ...`)
    path = "/srv/churn.csv"
    format = "csv"                # csv, parquet, jsonl, text or imagefolder
    label = "churned"             # optional: the label column (text_field: a text column)

List fields take a comma-separated string in the environment (SWARMNODE_JOIN=addr1,addr2).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import pathlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from node.runtime.errors import EXIT_USAGE, NodeError
from protocol.records.peer_keys import PeerIdError, public_key_from_peer_id

ENV_PREFIX = "SWARMNODE_"
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]{1,3})?")  # as node/runtime/device.py (which imports torch)
DEFAULT_HOME = pathlib.Path("~/.swarmnode")
MAX_UNIX_PATH = 107  # bytes of a unix socket path (the kernel's sun_path holds 108 with its terminating NUL)


def host_port(value: str, what: str, alternatives: str = "") -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port); ValueError naming ``what`` if it is not one."""
    host, _, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535 or any(c.isspace() for c in host):
        raise ValueError(f"{what} must be HOST:PORT (port 0: any free one){alternatives}, got {value!r:.80}")
    return host, int(port)


@dataclass(frozen=True)
class NodeConfig:
    home: pathlib.Path = DEFAULT_HOME  # keys, control socket, state
    swarm: str = "default"  # namespace of the swarm's DHT keys
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)  # libp2p listen multiaddrs
    announce: tuple[str, ...] = ()  # public multiaddrs to announce (behind port forwarding)
    join: tuple[str, ...] = ()  # bootstrap peers: full multiaddrs ending in /p2p/<peer id>
    identity: pathlib.Path | None = None  # Ed25519 key file; default <home>/identity.key
    control: str = "unix"  # "unix" (<home>/control.sock, mode 0600) or "tcp://127.0.0.1:PORT" (token auth)
    # the dashboard page and GET /metrics (node/api/dashboard.py): HOST:PORT (port 0: any free one) or "off";
    # bound off loopback, every request needs the token in <home>/dashboard.token
    dashboard: str = "127.0.0.1:0"
    # the HTTP endpoints of the models this node serves (node/jobs/serve/serve_jobs.py): HOST:PORT (port 0: any free
    # one); off loopback, every request needs the token in <home>/jobs/<job>/http.token
    http: str = "127.0.0.1:0"
    heartbeat: float = 10.0  # seconds between re-publications of this node's record
    ttl: float = 30.0  # seconds a record lives in the DHT without a refresh
    join_attempts: int = 5  # bootstrap attempts before giving up with exit code 2
    join_backoff: float = 1.0  # first retry delay in seconds, doubled each time
    benchmark_seconds: float = 0.3  # budget of the matmul micro-benchmark
    log_level: str = "INFO"
    data: pathlib.Path | None = None  # local datasets, <data>/<dataset>/ (`swarmnode data add`); default <home>/data
    # own data bound to dataset names ([datasets.NAME] tables: path, format, label, text_field; node/ml/user_data.py)
    datasets: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    device: str = "auto"  # where training runs: auto (the first CUDA device, else cpu), cpu, cuda, cuda:N
    # whose jobs this node runs and how much of the machine each gets (node/jobs/policy.py)
    accept_jobs_from: tuple[str, ...] = ("members",)  # "self", "members", "anyone" and/or peer ids
    max_jobs: int = 2  # jobs this node takes part in at once
    max_job_memory: int = 0  # bytes of a job's estimated training memory ("8GiB" in TOML/flags); 0: free memory
    max_job_steps: int = 1_000_000  # local steps a job may ask of this node (rounds x local_steps); 0: no bound
    max_job_hours: float = 0.0  # the longest one job may keep this node busy; 0: no bound
    cpu_threads: int = 0  # torch threads of each job's local training; 0: torch's default (one per core)
    gpu_memory_fraction: float = 0.0  # share of a CUDA device's memory jobs may allocate; 0: all of it
    swarm_cert: pathlib.Path | None = None  # membership certificate of a private swarm; default <home>/swarm.cert
    # behind a NAT (node/runtime/reachability.py): auto (checked by peers dialling back), public or private
    reachability: str = "auto"
    relay_service: bool = True  # a reachable node relays for private ones, within RelayLimits (--no-relay-service)
    relayed_span_share: float = 0.0  # all-reduce span of a private member, as a share of a reachable one's (0: none)

    def __post_init__(self) -> None:
        for name in ("heartbeat", "ttl", "join_backoff", "benchmark_seconds"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number of seconds, got {getattr(self, name)}")
        if self.heartbeat <= 0:
            raise ValueError(f"heartbeat must be > 0 seconds, got {self.heartbeat}")
        if self.ttl <= self.heartbeat:
            raise ValueError(f"ttl ({self.ttl} s) must be longer than heartbeat ({self.heartbeat} s)")
        if self.join_attempts < 1:
            raise ValueError(f"join_attempts must be >= 1, got {self.join_attempts}")
        if self.join_backoff < 0 or self.benchmark_seconds < 0:
            raise ValueError("join_backoff and benchmark_seconds must be >= 0")
        if not self.swarm or len(self.swarm) > 64 or not all(c.isalnum() or c in "-_." for c in self.swarm):
            raise ValueError(f"swarm name must be 1-64 characters of [A-Za-z0-9._-], got {self.swarm!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if not DEVICE_NAME.fullmatch(self.device):  # the form only; node/runtime/device.py resolves it at start
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r:.40}")
        object.__setattr__(self, "accept_jobs_from", check_accept_jobs_from(self.accept_jobs_from))
        for name in ("max_jobs", "max_job_memory", "max_job_steps", "cpu_threads"):
            if getattr(self, name) < (1 if name == "max_jobs" else 0):
                raise ValueError(f"{name} must be >= {1 if name == 'max_jobs' else 0}, got {getattr(self, name)}")
        if not (math.isfinite(self.max_job_hours) and self.max_job_hours >= 0):
            raise ValueError(f"max_job_hours must be a finite number >= 0 (0: no bound), got {self.max_job_hours}")
        if not (math.isfinite(self.gpu_memory_fraction) and 0 <= self.gpu_memory_fraction <= 1):
            raise ValueError(f"gpu_memory_fraction must be in [0, 1] (0: no bound), got {self.gpu_memory_fraction}")
        if self.reachability not in ("auto", "public", "private"):
            raise ValueError(f"reachability must be auto, public or private, got {self.reachability!r:.40}")
        if not (math.isfinite(self.relayed_span_share) and 0 <= self.relayed_span_share <= 1):
            raise ValueError(f"relayed_span_share must be in [0, 1], got {self.relayed_span_share}")
        if self.control != "unix" and not self.control.startswith("tcp://"):
            raise ValueError(f"control must be 'unix' or 'tcp://HOST:PORT', got {self.control!r}")
        if self.control == "unix" and len(os.fsencode(self.socket_path)) > MAX_UNIX_PATH:  # else grpc's traceback
            raise ValueError(f"control socket {self.socket_path} is {len(os.fsencode(self.socket_path))} bytes, over "
                             f"the {MAX_UNIX_PATH} a unix socket path allows: use a shorter --home, or --control "
                             "tcp://127.0.0.1:PORT")
        if self.control.startswith("tcp://"):
            host = self.control[len("tcp://") :].rpartition(":")[0]
            if host not in LOOPBACK_HOSTS:
                raise ValueError(f"the control API listens on loopback only, got {self.control!r}")
        self.dashboard_address()  # ValueError if malformed
        self.http_address()

    @property
    def home_dir(self) -> pathlib.Path:
        return self.home.expanduser()

    @property
    def data_dir(self) -> pathlib.Path:
        """Where this node's datasets live: --data, or <home>/data."""
        return self.data.expanduser() if self.data is not None else self.home_dir / "data"

    @property
    def swarm_cert_path(self) -> pathlib.Path:
        """Where this node's membership certificate of a private swarm is: --swarm-cert, or <home>/swarm.cert."""
        return (self.swarm_cert or self.home_dir / "swarm.cert").expanduser()

    @property
    def identity_path(self) -> pathlib.Path:
        return (self.identity or self.home_dir / "identity.key").expanduser()

    @property
    def socket_path(self) -> pathlib.Path:
        return self.home_dir / "control.sock"

    @property
    def token_path(self) -> pathlib.Path:
        return self.home_dir / "control.token"

    def dashboard_address(self) -> tuple[str, int] | None:
        """(host, port) the dashboard binds, None when "off"; ValueError if ``dashboard`` is neither."""
        return None if self.dashboard == "off" else host_port(self.dashboard, "dashboard", " or 'off'")

    def http_address(self) -> tuple[str, int]:
        """(host, port) the endpoints of served models bind; ValueError if ``http`` is not HOST:PORT."""
        return host_port(self.http, "http")

    def dashboard_is_loopback(self) -> bool:
        """Whether the dashboard binds a loopback address only (127.0.0.0/8, ::1, localhost): then it needs no token."""
        address = self.dashboard_address()
        if address is None or address[0] == "localhost":
            return address is not None
        try:
            return ipaddress.ip_address(address[0]).is_loopback
        except ValueError:  # a host name: it may resolve anywhere
            return False

    @property
    def dashboard_token_path(self) -> pathlib.Path:
        return self.home_dir / "dashboard.token"

    @property
    def state_path(self) -> pathlib.Path:
        """JSON written once the node is up: pid, peer id, addrs, control endpoint (for scripts)."""
        return self.home_dir / "node.json"


FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
ACCEPT_WORDS = ("self", "members", "anyone")  # accept_jobs_from's words (node/jobs/policy.py says what they mean)
SIZE_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
              "gb": 10**9, "tb": 10**12}
SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def check_accept_jobs_from(entries: Any) -> tuple[str, ...]:
    """``entries`` (a list of "self", "members", "anyone" and peer ids) without repeats; ValueError naming the
    first entry that is neither a word nor an Ed25519 peer id."""
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError(f"accept_jobs_from must list one or more of {', '.join(ACCEPT_WORDS)} or peer ids, "
                         f"got {entries!r:.60}")
    for entry in entries:
        if entry in ACCEPT_WORDS:
            continue
        try:
            public_key_from_peer_id(entry)
        except PeerIdError:
            raise ValueError(f"accept_jobs_from: {entry!r:.60} is neither {', '.join(ACCEPT_WORDS)} nor a peer id "
                             "(12D3KooW...)") from None
    return tuple(dict.fromkeys(entries))


def parse_size(text: str) -> int:
    """Bytes from "8GiB", "512 MiB", "1.5GB" or a plain number of bytes; ValueError otherwise."""
    match = SIZE.fullmatch(text)
    if match is None or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"expected a size such as 8GiB, 512MiB or a number of bytes, got {text!r:.40}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def _convert(name: str, value: Any, source: str) -> Any:
    kind = FIELDS[name].type
    try:
        if "Mapping" in kind:
            if not isinstance(value, Mapping):
                raise TypeError("expected a table of [datasets.NAME] tables")
            return dict(value)
        if "tuple" in kind:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError("expected a list of strings")
            return tuple(value)
        if "Path" in kind:
            if not isinstance(value, (str, os.PathLike)):
                raise TypeError("expected a path")
            return pathlib.Path(value)
        if kind == "bool":
            if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "0", "false", "no"):
                return value.strip().lower() in ("1", "true", "yes")
            if not isinstance(value, bool):
                raise TypeError("expected true or false")
            return value
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError("expected a number")
            return float(value)
        if kind == "int":
            if name == "max_job_memory" and isinstance(value, str):
                return parse_size(value)
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError("expected an integer")
            return int(value)
        if not isinstance(value, str):
            raise TypeError("expected a string")
        return value
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: float() of an int beyond float range
        raise NodeError(f"{source}: invalid value {value!r:.80} ({e})", EXIT_USAGE) from None


TOML_INT_RANGE = (-(2**63), 2**63 - 1)  # TOML integers are 64-bit (toml.io v1.0.0); tomllib reads any size


def check_toml_ints(data: Any, label: str) -> None:
    """NodeError naming the dotted key of the first integer in parsed TOML ``data`` outside TOML's 64-bit range
    (tomllib accepts any size; a float field given 1e400 as an integer would raise OverflowError later)."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:  # iterative: the nesting is tomllib's to bound, not ours to recurse into again
        where, value = todo.pop()
        if isinstance(value, dict):
            todo.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, int) and not TOML_INT_RANGE[0] <= value <= TOML_INT_RANGE[1]:
            digits = len(str(abs(value))) if value.bit_length() < 10_000 else "thousands of"
            raise NodeError(f"{label}: {where[:80]}: integer of {digits} digits is outside TOML's 64-bit range",
                            EXIT_USAGE)


def parse_toml(data: str | bytes, label: str) -> dict[str, Any]:
    """TOML text (bytes must be UTF-8) parsed and its integers checked (check_toml_ints); NodeError
    "<label>: ..." if it is not UTF-8, not valid TOML (nesting too deep for tomllib included) or out of range."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise NodeError(f"{label}: not UTF-8 text (byte {e.start})", EXIT_USAGE) from None
    try:
        parsed = tomllib.loads(data)
    except tomllib.TOMLDecodeError as e:
        raise NodeError(f"{label}: not valid TOML: {e}", EXIT_USAGE) from None
    except ValueError as e:  # int() of a literal beyond Python's 4300-digit limit escapes tomllib as is
        raise NodeError(f"{label}: not valid TOML: {str(e).partition(':')[0]}", EXIT_USAGE) from None
    except RecursionError:  # tomllib recurses once per level of nested arrays / inline tables
        raise NodeError(f"{label}: not valid TOML: nested too deeply", EXIT_USAGE) from None
    check_toml_ints(parsed, label)
    return parsed


def read_toml(path: pathlib.Path) -> dict[str, Any]:
    try:
        with open(path.expanduser(), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise NodeError(f"config file {path} does not exist", EXIT_USAGE) from None
    except OSError as e:  # a directory, a name too long, no permission, ...
        raise NodeError(f"config file {path}: cannot read it ({e.strerror or e})", EXIT_USAGE) from None
    except ValueError as e:  # a NUL in the path
        raise NodeError(f"config file {str(path)!r:.200}: not a usable path ({e})", EXIT_USAGE) from None
    data = parse_toml(raw, f"config file {path}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise NodeError(f"config file {path}: unknown key {unknown[0]!r} (known: {', '.join(FIELDS)})", EXIT_USAGE)
    return data


def resolve(
    flags: Mapping[str, Any], env: Mapping[str, str] | None = None, config_file: pathlib.Path | None = None
) -> NodeConfig:
    """Merge the sources (flags > env > file > defaults); ``flags`` holds only the flags the user gave."""
    env = os.environ if env is None else env
    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = pathlib.Path(env[ENV_PREFIX + "CONFIG"])
    values: dict[str, Any] = {}
    if config_file is not None:
        for name, value in read_toml(config_file).items():
            values[name] = _convert(name, value, f"{config_file}: {name}")
    for name in FIELDS:
        if ENV_PREFIX + name.upper() in env:
            values[name] = _convert(name, env[ENV_PREFIX + name.upper()], ENV_PREFIX + name.upper())
    for name, value in flags.items():
        if value is not None and name in FIELDS:
            values[name] = _convert(name, value, "--" + name.replace("_", "-"))
    try:
        return NodeConfig(**values)
    except ValueError as e:
        raise NodeError(f"bad configuration: {e}", EXIT_USAGE) from None
