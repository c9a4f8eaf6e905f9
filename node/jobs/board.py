"""The job board: the swarm's jobs as this node reads them from the DHT, and what this node writes there.

    board = JobBoard(dht, swarm, peer_id)
    await board.refresh()                  # every job record and its progress entries -> board.views
    await board.store_record(record)       # a record this node submitted (signed by the node's validator)
    await board.publish(progress)          # this node's progress in a job
    await board.decline(job_id, reason)    # this node's signed reason for not taking part

DHT layout and signatures: protocol/records/job_records.py. Every job kind (node/jobs/federated/, node/jobs/pipeline/)
reads and writes jobs through this one class; node/jobs/manager.py polls it and dispatches each job by kind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.records.job_records import (
    MAX_REASON,
    JobProgress,
    JobRecord,
    job_progress_from_wire,
    job_progress_to_wire,
    job_record_from_wire,
    job_record_to_wire,
    jobs_key,
    parse_progress_subkey,
    progress_key,
    progress_subkey,
)
from protocol.wire import WireError

logger = logging.getLogger(__name__)
POLL_S = 1.0  # how often a node reads the board (the manager's poll; the job kinds' own waits on it)
JOB_TTL_S = 24 * 3600.0  # a job record outlives any node; the submitter and participants refresh it
# (expiry times are on the DHT's clock, get_dht_time; the records' own times on the injected clock)


@dataclass
class JobView:
    """One job as this node sees it: the submitter's record, every participant's progress, the declines."""

    record: JobRecord
    progress: JobProgress | None = None  # the freshest participant view
    at_best: tuple[JobProgress, ...] = ()  # every writer's progress at that round, freshest first
    declined: str = ""  # why this node does not take part ("" if it does or has not decided), with a hint
    declines: dict[str, str] = field(default_factory=dict)  # writer -> reason, every node's signed decline
    takers: int = 0  # nodes that announced they take part (any non-declined progress)
    announced: set[tuple[int, str]] = field(default_factory=set)  # (round, model hash) in signed progress
    exclusions: dict[tuple[str, str], str] = field(default_factory=dict)  # (excluded, by writer) -> evidence

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def holders(self) -> tuple[str, ...]:  # who can serve the state of the latest round
        return tuple(p.writer for p in self.at_best)

    @property
    def state(self) -> str:
        if self.record.state in ("cancelled", "done") or self.progress is None:
            return self.record.state
        if any(p.state == "done" for p in self.at_best):
            return "done"
        return self.progress.state

    @property
    def round(self) -> int:
        return max(self.record.round, self.progress.round if self.progress else 0)


class JobBoard:
    def __init__(self, dht: DHTNode, swarm: str, peer_id: str, clock: Clock = SYSTEM_CLOCK):
        self.dht, self.swarm, self.peer_id, self.clock = dht, swarm, peer_id, clock
        self.views: dict[str, JobView] = {}

    async def refresh(self) -> None:
        """Read every job record and its progress from the DHT into ``views``."""
        found = await self.dht.get(jobs_key(self.swarm), latest=True)
        records = found.value if found is not None and isinstance(found.value, dict) else {}
        for job_id, item in records.items():
            try:
                record = job_record_from_wire(item.value)
            except (WireError, ValueError) as e:
                logger.debug("skipping job entry %s: %s", job_id, e)
                continue
            view = self.views.setdefault(record.job_id, JobView(record))
            if record.updated_at >= view.record.updated_at:
                view.record = record
            entries = await self._progress_entries(record.job_id)
            view.declines = {p.writer: p.reason for p in entries if p.state == "declined"}
            progress = [p for p in entries if p.state != "declined"]
            view.takers = len({p.writer for p in progress})
            view.exclusions = {(peer, p.writer): why for p in progress for peer, why in zip(p.excluded, p.evidence)}
            if progress:
                view.announced |= {(p.round, p.model_hash) for p in progress}
                view.progress = max(progress, key=lambda p: (p.round, p.updated_at))
                at_best = [p for p in progress if p.round == view.progress.round]
                view.at_best = tuple(sorted(at_best, key=lambda p: -p.updated_at))

    async def _progress_entries(self, job_id: str) -> list[JobProgress]:
        found = await self.dht.get(progress_key(self.swarm, job_id), latest=True)
        entries = []
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                try:
                    if parse_progress_subkey(subkey)[0] != job_id:
                        continue
                    entries.append(job_progress_from_wire(item.value))
                except (WireError, ValueError):
                    continue
        return entries

    async def store_record(self, record: JobRecord) -> bool:
        """Store a record this node submitted (a new job, a cancellation, done, moved hosts); False if no peer
        accepted it."""
        return bool(await self.dht.store(jobs_key(self.swarm), job_record_to_wire(record),
                                         get_dht_time() + JOB_TTL_S, subkey=record.job_id))

    async def publish(self, progress: JobProgress) -> None:
        """Store this node's progress in a job (a warning if no peer took it) and show it here at once."""
        ok = await self.dht.store(progress_key(self.swarm, progress.job_id), job_progress_to_wire(progress),
                                  get_dht_time() + JOB_TTL_S, subkey=progress_subkey(progress.job_id, self.peer_id))
        if not ok:
            logger.warning("progress of job %s was not stored", progress.job_id)
        view = self.views.get(progress.job_id)
        if view is not None and (view.progress is None or progress.round >= view.progress.round):
            view.progress = progress

    async def decline(self, job_id: str, reason: str) -> None:
        """Tell the swarm why this node does not take part (signed, under this node's progress subkey; printable
        and bounded, as other nodes show it)."""
        decline = JobProgress(job_id, self.peer_id, 0, "", "declined", updated_at=self.clock.time(),
                              reason="".join(c if c.isprintable() else " " for c in reason)[:MAX_REASON])
        ok = await self.dht.store(progress_key(self.swarm, job_id), job_progress_to_wire(decline),
                                  get_dht_time() + JOB_TTL_S, subkey=progress_subkey(job_id, self.peer_id))
        if not ok:
            logger.warning("the decline of job %s was not stored", job_id)
