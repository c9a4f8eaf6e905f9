"""A swarm node inside a Python script: the daemon of `swarmnode run`, on its own event loop in a background thread.

    swarm = Swarm(join=["/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW..."], home="~/.swarmnode/run1")
    swarm.peer_id, swarm.addrs        # as `swarmnode run` prints them
    swarm.shutdown()                  # withdraws the node's record, stops p2pd (also on exit, Ctrl-C and SIGTERM)

It is a whole node (node/daemon.py Daemon): the DHT, its signed record, the job board, the control API (so
`swarmnode jobs --home HOME` shows what the script does), the state it serves to joiners and its checkpoints
under ``home``. By default it runs only its own script's runs and the jobs it submits (``accept_jobs_from =
self``), so that a swarm's other jobs do not take the script's CPU or GPU; pass ``accept_jobs_from`` (and any
other node setting, node/runtime/config.py NodeConfig) to change that. Its log goes to ``<home>/node.log``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import pathlib
import signal
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from node.daemon import SHUTDOWN_BUDGET_S, Daemon
from node.jobs.manager import JobManager
from node.runtime.config import NodeConfig

T = TypeVar("T")
LOGGERS = ("node", "protocol", "hivemind")


class Swarm:
    def __init__(self, join: Sequence[str] = (), home: str | pathlib.Path = "~/.swarmnode/script",
                 swarm: str = "default", listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",), device: str = "auto",
                 accept_jobs_from: Sequence[str] = ("self",), start_timeout: float = 120.0, **settings: Any):
        """Start the node and join the swarm through ``join`` (none: the first node of a new swarm). ValueError or
        node.runtime.errors.NodeError (one line) if a setting is bad or no bootstrap peer answers."""
        self.config = NodeConfig(home=pathlib.Path(home).expanduser(), swarm=swarm, join=tuple(join),
                                 listen=tuple(listen), device=device, accept_jobs_from=tuple(accept_jobs_from),
                                 **settings)
        self.config.home_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._log = logging.FileHandler(self.config.home_dir / "node.log")
        self._log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self._log)
            if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
                logging.getLogger(name).setLevel(logging.INFO)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarmnode", daemon=True)
        self._thread.start()
        self.daemon = Daemon(self.config)
        self._closed = False
        try:
            self.call(self.daemon.start(), start_timeout)
        except BaseException:
            self.shutdown()
            raise
        atexit.register(self.shutdown)
        _sigterm_ends_the_script()

    @property
    def peer_id(self) -> str:
        return self.daemon.peer_id

    @property
    def addrs(self) -> tuple[str, ...]:
        """Multiaddrs another script or node joins through (``join=[swarm.addrs[0]]``)."""
        return self.daemon.addrs

    @property
    def jobs(self) -> JobManager:
        if self.daemon.jobs is None:
            raise RuntimeError("the node is not running")
        return self.daemon.jobs

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the node's event loop and wait for its result (interruptible by Ctrl-C)."""
        if self._closed:
            coro.close()
            raise RuntimeError("the swarm node has been shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def shutdown(self) -> None:
        """Withdraw this node's record and stop it (p2pd included); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._loop.is_running():
                asyncio.run_coroutine_threadsafe(self.daemon.stop(), self._loop).result(SHUTDOWN_BUDGET_S)
        except Exception as e:  # a stop that fails must not hide the script's own error
            logging.getLogger(__name__).warning("stopping the swarm node: %s", e)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(SHUTDOWN_BUDGET_S)
            for name in LOGGERS:
                logging.getLogger(name).removeHandler(self._log)
            self._log.close()
            atexit.unregister(self.shutdown)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _sigterm_ends_the_script() -> None:
    """SIGTERM raises SystemExit in the main thread (if nobody else handles it), so that `finally` blocks, context
    managers and atexit stop the node cleanly instead of leaving its record behind."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
