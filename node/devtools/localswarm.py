"""Real node processes on loopback, for `swarmnode dev-swarm`, the integration tests and the benchmarks.

Each node is ``python -m node.cli run`` in its own process group with its own home directory, so it can be
killed with a real signal; stop() always ends with SIGKILL to the whole group (no orphaned p2pd).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import psutil

from node.api.client import ControlClient
from node.runtime.config import NodeConfig
from node.runtime.errors import NodeError

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; TimeoutError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


class NodeProcess:
    def __init__(self, home: pathlib.Path, args: Sequence[str] = (), env: dict | None = None,
                 prefix: Sequence[str] = ()):
        self.home = pathlib.Path(home)
        self.args = list(args)
        self.env = env
        self.prefix = list(prefix)  # e.g. ["ip", "netns", "exec", NS]: a command that execs the node (same pid)
        self.proc: subprocess.Popen | None = None
        self.state: dict = {}

    @property
    def log_path(self) -> pathlib.Path:
        return self.home / "daemon.log"

    def start(self) -> NodeProcess:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.home / "node.json").unlink(missing_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "node.cli", "run", "--home", str(self.home), *self.args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        log.close()
        return self

    def _process(self) -> subprocess.Popen:
        if self.proc is None:
            raise RuntimeError(f"the node in {self.home} has not been started")
        return self.proc

    def _ready(self) -> dict | None:
        proc = self._process()
        if proc.poll() is not None:
            raise NodeError(f"node exited with code {proc.returncode} before it was ready: {self.log_tail()}")
        try:
            state = json.loads((self.home / "node.json").read_text())
        except (OSError, ValueError):
            return None
        return state if state.get("pid") == proc.pid else None

    def wait_ready(self, timeout: float = 30.0) -> NodeProcess:
        self.state = wait_for(self._ready, timeout, f"node in {self.home} to start")
        return self

    @property
    def peer_id(self) -> str:
        return self.state["peer_id"]

    @property
    def addr(self) -> str:
        return self.state["addrs"][0]

    def client(self, timeout: float = 30.0) -> ControlClient:
        return ControlClient(NodeConfig(home=self.home, control=self._control_mode()), timeout=timeout)

    def _control_mode(self) -> str:
        return "unix" if self.state.get("control", "unix:").startswith("unix:") else self.state["control"]

    def peer_ids(self) -> set[str]:
        with self.client() as c:
            return {p.peer_id for p in c.peers().peers}

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self._process().pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def send(self, sig: int) -> None:
        """Deliver a real signal to the node's Python process only (as a user's `kill` would)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill_hard(self) -> None:
        """SIGKILL the node (its Python process); p2pd, losing its parent, must not outlive it."""
        children = self.descendants()
        self.send(signal.SIGKILL)
        self._process().wait(10)
        _, alive = psutil.wait_procs(children, timeout=5)
        for p in alive:  # should not happen; keeps a broken build from leaking processes
            p.kill()

    def stop(self, timeout: float = 6.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole process group. Returns the exit code."""
        if self.proc is None:
            return None
        children = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)
        _, alive = psutil.wait_procs(children, timeout=2)
        for p in alive:
            p.kill()
        return self.proc.returncode


class LocalSwarm:
    """N nodes on loopback: the first starts the swarm, the others join it by its multiaddr."""

    def __init__(self, root: pathlib.Path, n: int, swarm: str = "dev", extra_args: Sequence[str] = (),
                 dataset: str | None = None, scheme: str = "label-skew", envs: dict[int, dict] | None = None):
        if n < 1:
            raise ValueError(f"a swarm needs at least one node, got {n}")
        self.root, self.n, self.swarm, self.extra_args = pathlib.Path(root), n, swarm, list(extra_args)
        self.dataset, self.scheme = dataset, scheme  # give node i slice i of n of this dataset (non-IID by default)
        self.envs = envs or {}  # node index -> extra environment (fault injection of the byzantine suite)
        self.nodes: list[NodeProcess] = []

    def node_args(self, join: Sequence[str] = ()) -> list[str]:
        args = ["--listen", LOOPBACK, "--swarm", self.swarm, *self.extra_args]
        for addr in join:
            args += ["--join", addr]
        return args

    def add_node(self, join: Sequence[str] | None = None, home: pathlib.Path | None = None,
                 data_index: int | None = None) -> NodeProcess:
        if join is None:
            join = [self.nodes[0].addr] if self.nodes else []
        home = home or self.root / f"node{len(self.nodes)}"
        args = self.node_args(join)
        if self.dataset is not None:
            from node.ml.datasets import write_node_data

            index = len(self.nodes) % self.n if data_index is None else data_index
            if not (home / "data" / self.dataset).exists():
                write_node_data(self.dataset, home / "data" / self.dataset, n_nodes=self.n, node_index=index,
                                scheme=self.scheme, seed=0)
            args += ["--data", str(home / "data")]
        env = self.envs.get(len(self.nodes))
        node = NodeProcess(home, args, None if env is None else {**os.environ, **env}).start()
        self.nodes.append(node)
        return node

    def start(self, timeout: float = 60.0) -> LocalSwarm:
        self.add_node(join=[]).wait_ready(timeout)
        joiners = [self.add_node() for _ in range(self.n - 1)]
        for node in joiners:
            node.wait_ready(timeout)
        return self

    def wait_converged(self, timeout: float = 30.0) -> None:
        expected = {n.peer_id for n in self.nodes if n._process().poll() is None}

        def sees_all(node: NodeProcess) -> bool:
            return node.peer_ids() == expected

        for node in self.nodes:
            if node._process().poll() is None:
                wait_for(functools.partial(sees_all, node), timeout,
                         f"{node.home.name} to see all {len(expected)} peers")

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.send(signal.SIGTERM)
        for node in self.nodes:
            node.stop()
