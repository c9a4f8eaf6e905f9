"""Who this node deals with: the swarm's members, for job admission (accept_jobs_from = "members") and, in a
private swarm, for every stream a peer opens and every all-reduce round.

    admission = Admission(own_id, membership)                          # an open swarm
    admission = Admission(own_id, membership, validator.certified)     # a private swarm (certificates)
    await admission.is_member(peer)     # a job's submitter: is it a member? (accept_jobs_from = "members")
    admission.admit(peer)               # sync, for RoundHooks.admit: may this peer round with us?
    await admission.admit_stream(peer)  # node/runtime/p2pd.py's gate in front of every stream handler

Members of an open swarm: peers with a live signed peer record in the swarm (``swarmnode peers``), or seen with
one since this node started (a job outlives its submitter). Everyone may open streams and round with us there.

Members of a private swarm: holders of a valid membership certificate of it
(protocol/records/certificates.py), as the swarm's record validator
(protocol/records/membership_validation.py) learns them from every record it accepts, each of which carries
its writer's certificate. A peer this node has not heard of yet (it joined a moment ago) is looked up once:
the swarm's peer records are read again (at most once per REFRESH_S), which teaches the validator its
certificate if it has one. Nobody else gets a stream served or a place in a round, nor a place in this node's
DHT routing table (``keep_out_of_routing``): a member's stores and lookups then go to members only, so that an
outsider can neither make a member's store look failed (hivemind reports the last replica's answer, and an
outsider rejects every member's record) nor sit between members as the nearest node of the swarm's keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from hivemind.dht.node import DHTNode

from node.runtime.membership import Membership

logger = logging.getLogger(__name__)
REFRESH_S = 1.0  # the least time between two reads of the peer records prompted by peers this node did not know
MAX_LOGGED = 1000  # strangers whose refused streams are logged (one line each)


class Admission:
    def __init__(self, own_id: str, membership: Membership, certified: Callable[[str], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.own_id, self.membership, self.certified, self.clock = own_id, membership, certified, clock
        self.private = certified is not None
        self.seen: set[str] = set()  # peers seen with a live peer record since this node started
        self._refreshed = -REFRESH_S
        self._refused: set[str] = set()  # strangers whose refusal was logged
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Read the swarm's live peer records again (at most once per REFRESH_S, one read at a time)."""
        async with self._lock:
            if self.clock() - self._refreshed < REFRESH_S:
                return
            self._refreshed = self.clock()
            try:
                views = await self.membership.peers()
            except Exception as e:  # the DHT read failed: whoever asked is not known yet
                logger.debug("could not read the peer records: %s", e)
                return
            self.seen |= {v.record.peer_id for v in views}

    def _known(self, peer: str) -> bool:
        if peer == self.own_id:
            return True
        return self.certified(peer) if self.certified is not None else peer in self.seen

    async def is_member(self, peer: str) -> bool:
        """Whether ``peer`` is a member of this swarm (see the module docstring), reading the peer records if it
        is not known yet."""
        if self._known(peer):
            return True
        await self.refresh()
        return self._known(peer)

    def admit(self, peer: str) -> bool:
        """Whether ``peer`` may take part in a round with this node: anyone in an open swarm, a certified member in
        a private one (no lookup: the validator has seen the certificate of every peer whose entries we read)."""
        return not self.private or self._known(peer)

    async def admit_stream(self, peer: str) -> bool:
        """Whether to serve a stream ``peer`` opened: anyone in an open swarm, a certified member in a private
        one (looked up once if unknown)."""
        if not self.private or self._known(peer):
            return True
        await self.refresh()
        if self._known(peer):
            return True
        if peer not in self._refused and len(self._refused) < MAX_LOGGED:  # a line per stranger, not per stream
            self._refused.add(peer)
            logger.info("refused a stream from %s: no valid membership certificate of this private swarm", peer)
        return False


def keep_out_of_routing(dht: DHTNode, admit: Callable[[str], bool]) -> None:
    """Drop the peers ``admit`` refuses from ``dht``'s routing table (met while it bootstrapped) and add only peers it
    accepts from now on. hivemind's DHTProtocol calls ``update_routing_table`` on every request it serves and every
    answer it gets; a peer left out is still answered, it is only never offered as a neighbour, a store target or a
    lookup hop."""
    protocol: Any = getattr(dht, "protocol", None)
    table: Any = getattr(protocol, "routing_table", None)
    if not (hasattr(table, "uid_to_peer_id") and callable(getattr(protocol, "update_routing_table", None))):
        # hivemind's routing table is not a documented API: if a release changes it, members still refuse every
        # record and stream of an outsider; only their stores may report failure when an outsider is the last replica
        logger.warning("this hivemind's DHT routing table is not the one known here: outsiders stay routable")
        return
    for node_id, peer_id in list(table.uid_to_peer_id.items()):
        if node_id in table and not admit(peer_id.to_base58()):
            del table[node_id]
    update = protocol.update_routing_table

    async def members_only(node_id, peer_id, responded=True):
        if responded and not admit(peer_id.to_base58()):
            return
        await update(node_id, peer_id, responded)

    protocol.update_routing_table = members_only
