"""What the control API serves, in Python terms: the NodeService a daemon implements (node/daemon.py).

    server, endpoint = await start_control_server(daemon, config)   # node/api/server.py serves any NodeService

The gRPC servicer (node/api/server.py) knows nothing of the daemon but this interface, and node/api/serde.py
converts its answers to the control API's protobuf messages (proto/swarmnode/v1/control.proto), so the daemon
(the one composition root) imports the API, never the other way round.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the CLI imports this module: no hivemind or torch at its start
    from node.jobs.board import JobView
    from node.runtime.doctor import Report
    from node.runtime.membership import PeerView
    from protocol.records.peer import Capability
    from protocol.relay.circuits import RelayStats

TOKEN_METADATA = "x-swarmnode-token"  # gRPC metadata key of the control token (TCP mode)


def read_token(path: pathlib.Path) -> str:
    """The control token a daemon wrote (``<home>/control.token``, 0600) for clients over TCP."""
    return pathlib.Path(path).read_text().strip()


@dataclass(frozen=True)
class NodeStatus:
    peer_id: str
    addrs: tuple[str, ...]
    swarm: str
    version: str
    uptime_s: float
    peers_seen: int  # live peers at the last read of the swarm's records
    last_heartbeat_age_s: float  # -1.0: no heartbeat stored yet
    capability: Capability | None
    home: str
    pid: int
    reachability: str = "public"
    relay: RelayStats | None = None  # this node's relay service counters
    dashboard: str = ""  # the dashboard page's URL ("" when off)


@dataclass(frozen=True)
class JobSummary:
    """A job as this node sees it, and this node's own copy of its model if it takes part."""

    view: JobView
    local: tuple[int, str] | None = None  # (rounds or steps completed here, model hash here)


class NodeService(Protocol):
    peer_id: str  # this node's libp2p peer id

    def status(self) -> NodeStatus: ...

    async def peers(self) -> list[PeerView]:
        """Every live peer record this node reads, its own included."""
        ...

    async def submit(self, toml_text: str, source: str) -> str:
        """Sign and publish a job file; its job id (NodeError naming the field when it cannot run)."""
        ...

    async def list_jobs(self) -> list[JobSummary]:
        """Every job in the swarm, freshly read, by job id."""
        ...

    async def job(self, job_id: str) -> JobSummary | None:
        """One job, freshly read; None if the swarm has no such job."""
        ...

    def job_history(self, job_id: str) -> list[dict]:
        """This node's report of a job's rounds, oldest first: a federated job's are the entries of the export's
        report.json (its own rounds and those it inherited with a downloaded state); a pipeline job's trainer keeps
        its steps (node/jobs/pipeline/throughput.py; pipeline.json's "history"); [] where this node keeps none."""
        ...

    async def cancel(self, job_id: str) -> bool: ...

    async def export(self, job_id: str, out: pathlib.Path, merge: bool = False) -> list[pathlib.Path]: ...

    async def doctor(self) -> Report:
        """This node's reachability checked afresh, its relays and every live peer (node/runtime/doctor.py)."""
        ...

    async def leave(self) -> bool:
        """Withdraw this node's record (True if the DHT took the tombstone), then stop the daemon."""
        ...
