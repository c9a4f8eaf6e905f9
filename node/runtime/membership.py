"""Swarm membership: this node's signed record in the DHT, refreshed on a heartbeat; the live peer list.

Each node owns one entry (subkey = its peer id) in the dictionary stored under ``swarmnode/<swarm>/peers``.
An entry lives ``ttl`` seconds unless refreshed, so a node that dies (even by SIGKILL) disappears from
everyone's list within ttl + one heartbeat. A graceful exit publishes a tombstone (``leaving=True``)
whose expiry is later than the live record's, so it supersedes it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from hivemind.dht.node import DHTNode

from protocol.records.peer import PeerRecord, peer_record_from_wire, peer_record_to_wire, swarm_key
from protocol.wire import WireError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerView:
    record: PeerRecord
    expires_at: float  # DHT expiration of the record (unix time)


def live_peers(entries: dict, now: float) -> list[PeerView]:
    """Decode a ``peers`` dictionary read from the DHT; drop tombstones, expired and undecodable entries."""
    views = []
    for subkey, item in entries.items():
        if item.expiration_time <= now or not isinstance(item.value, bytes):
            continue
        try:
            record = peer_record_from_wire(item.value)
        except WireError as e:  # validators already checked it; a mismatch means a bug or another version
            logger.debug("skipping peer entry %s: %s", subkey, e)
            continue
        if record.peer_id == subkey and not record.leaving:
            views.append(PeerView(record, item.expiration_time))
    return sorted(views, key=lambda v: v.record.peer_id)


class Membership:
    def __init__(
        self,
        dht: DHTNode,
        swarm: str,
        make_record: Callable[[], PeerRecord],
        heartbeat: float,
        ttl: float,
        clock: Callable[[], float] = time.time,
    ):
        self.dht, self.key = dht, swarm_key(swarm, "peers")
        self.make_record, self.heartbeat, self.ttl, self.clock = make_record, heartbeat, ttl, clock
        self.last_published: float | None = None  # clock() of the last successful store
        self._last_expiration = 0.0
        self.last_seen_count = 0
        self._task: asyncio.Task | None = None

    async def publish(self, leaving: bool = False) -> bool:
        now = self.clock()
        record = self.make_record().replace(updated_at=now, leaving=leaving)
        expiration = now + self.ttl
        if leaving:  # must outlive the live record to replace it everywhere it is stored
            expiration = max(expiration, self._last_expiration + self.heartbeat)
        ok = await self.dht.store(self.key, peer_record_to_wire(record), expiration, subkey=record.peer_id)
        if ok:
            self.last_published, self._last_expiration = now, expiration
        else:
            logger.warning("could not store this node's record in the DHT (no peer accepted it)")
        return bool(ok)

    async def peers(self) -> list[PeerView]:
        found = await self.dht.get(self.key, latest=True)
        if found is None or not isinstance(found.value, dict):
            views = []
        else:
            views = live_peers(found.value, self.clock())
        self.last_seen_count = len(views)
        return views

    def start(self) -> None:
        self._task = asyncio.create_task(self._heartbeat_loop(), name="membership-heartbeat")

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self.publish()
            except Exception as e:  # keep beating: one failed store must not end membership
                logger.warning("heartbeat failed: %s", e)

    async def withdraw(self, timeout: float = 2.0) -> bool:
        """Stop the heartbeat and publish the tombstone; False if it did not reach the DHT in time."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            return await asyncio.wait_for(self.publish(leaving=True), timeout)
        except (TimeoutError, OSError) as e:
            logger.warning("could not withdraw this node's record: %s", e)
            return False
