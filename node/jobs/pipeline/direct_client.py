"""The trainer's side of the direct data path: a pool of persistent, sealed TCP connections to stage replicas.

    pool = DirectPool(p2p, open_session, retry_s=60.0, connect_timeout=5.0)   # open_session: DirectOpen -> DirectOffer
    if pool.usable(peer):
        reply = await pool.exchange(peer, stage, "forward", frame, bound)     # DirectFailure: use libp2p instead
    pool.failed(peer, reason)                                                # libp2p only, for retry_s
    pool.close()

A hop goes over a persistent TCP connection to the replica, in a session the replica handed out over the
authenticated libp2p control stream (node/jobs/pipeline/direct_server.py is the replica's side), at an
address the libp2p connection to that peer uses (so an offer cannot point the trainer at a third party). A
connection carries one request at a time and returns to the pool only after a complete reply: a connection
that failed mid-request is never reused, so a late reply cannot be read as the next request's. After a
failure a replica is reached over libp2p only for ``retry_s`` seconds (node/jobs/pipeline/trainer.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hivemind.p2p import P2P

from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.pipeline.control import DirectOffer, one_line
from protocol.pipeline.direct import BACKWARD, FORWARD, REPLY, DirectChannel, maddr_ips, read_sealed, send_sealed
from protocol.streams import close_quietly

logger = logging.getLogger(__name__)


class DirectFailure(Exception):
    """The direct path to a replica failed before a reply; the request goes over libp2p instead."""


@dataclass
class _Connection:
    """One direct connection to one replica, idle in the pool or carrying one request."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    channel: DirectChannel


class DirectPool:
    def __init__(self, p2p: P2P, open_session: Callable[[str, int], Awaitable[DirectOffer]], retry_s: float,
                 connect_timeout: float, clock: Clock = SYSTEM_CLOCK):
        self.p2p, self.open_session, self.clock = p2p, open_session, clock
        self.retry_s, self.connect_timeout = retry_s, connect_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}  # idle connections per (replica, stage)
        self._off: dict[str, float] = {}  # replica -> clock.monotonic() until which hops use libp2p only

    def usable(self, peer: str) -> bool:
        """False while ``peer`` is in its libp2p-only window after a direct failure."""
        return self._off.get(peer, 0.0) <= self.clock.monotonic()

    def idle_connections(self) -> int:
        return sum(len(c) for c in self._idle.values())

    def failed(self, peer: str, reason: str) -> None:
        """Reach ``peer`` over libp2p only for retry_s; close its idle connections."""
        if self.usable(peer):
            logger.info("direct path to %s failed (%s); libp2p for %g s", peer[-8:], reason, self.retry_s)
        self._off[peer] = self.clock.monotonic() + self.retry_s
        for key in [k for k in self._idle if k[0] == peer]:
            for conn in self._idle.pop(key):
                close_quietly(conn.writer)

    async def exchange(self, peer: str, stage: int, kind: str, data: bytes, bound: int) -> bytes:
        """The reply frame to one forward/backward request frame (DirectFailure before a reply)."""
        idle = self._idle.get((peer, stage), [])
        conn = None
        while idle and conn is None:
            conn = idle.pop()
            if conn.reader.at_eof() or conn.writer.is_closing():  # the replica closed it (idle, restarted)
                close_quietly(conn.writer)
                conn = None
        if conn is None:
            conn = await self._connect(peer, stage)
        try:
            await send_sealed(conn.writer, conn.channel, FORWARD if kind == "forward" else BACKWARD, data)
            _, raw = await read_sealed(conn.reader, conn.channel, (REPLY,), bound)
        except BaseException as e:  # never reused: a late reply would be read as the next request's
            close_quietly(conn.writer)
            if isinstance(e, (ValueError, OSError, EOFError)):  # WireError, ConnectionError, IncompleteReadError
                raise DirectFailure(f"{type(e).__name__}: {one_line(e)}") from None
            raise
        self._idle.setdefault((peer, stage), []).append(conn)
        return raw

    async def _connect(self, peer: str, stage: int) -> _Connection:
        """A new connection in a new session, asked for over libp2p; only to an address of the replica's libp2p
        connection."""
        try:
            offer = await self.open_session(peer, stage)
        except Exception as e:  # the trainer's HopError (its reason), or anything the control exchange raised
            raise DirectFailure(f"no direct session: {getattr(e, 'reason', None) or one_line(e)}") from None
        known = {ip for info in await self.p2p.list_peers() if info.peer_id.to_base58() == peer
                 for ip in maddr_ips(info.addrs)}
        if offer.host not in known:
            raise DirectFailure(f"offered {offer.host}, not an address of its libp2p connection {sorted(known)}")
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(offer.host, offer.port)
        except (OSError, TimeoutError) as e:
            raise DirectFailure(f"connect to {offer.host}:{offer.port}: {type(e).__name__}: {one_line(e)}") from None
        return _Connection(reader, writer, DirectChannel(offer.key, offer.session, "trainer"))

    def close(self) -> None:
        """Close the idle connections (a hop in flight closes its own when it ends)."""
        for conns in self._idle.values():
            for conn in conns:
                close_quietly(conn.writer)
        self._idle.clear()
