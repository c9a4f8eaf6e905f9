"""Both ends of a relayed stream: the origin dials a private peer through one of its relays, the target takes the
stream off its relay and hands it to the handler that serves its protocol.

    router = RelayRouter(own_id, key, names, raw_dial, lookup)   # lookup(protocol) -> the served stream handler
    router.set_routes({peer: (relay, ...)})          # private peers and their relays, from their peer records
    info, reader, writer = await router.dial(peer, protocol)      # what p2p.call_binary_stream_handler returns
    ttl = await router.reserve(relay)                # a private node, renewing its reservation (and connection)
    await p2p.add_binary_stream_handler(names.stop, router.on_stop)

The origin tries a direct stream first when it already holds a connection to the target (a private peer that
dialled it: no relay needed), then each of the target's relays in turn; the handshake and sealing are
protocol/relay/seal.py's. A target takes ``stop`` streams only from relays it holds a reservation with, and
answers a hello for a protocol it does not serve with a refusal. The handler runs exactly as for a direct
stream, with the origin as its authenticated peer (a private swarm's admission gate included).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID, StreamInfo
from hivemind.utils.multiaddr import Multiaddr

from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.relay.circuits import (
    CONTROL_TIMEOUT,
    DIAL_TIMEOUT,
    MAX_CONTROL,
    MAX_DIALBACK_PORTS,
    RawDial,
    RelayNames,
    control_reply,
    dialback_from_wire,
    reservation_from_wire,
)
from protocol.relay.seal import (
    MAX_HANDSHAKE,
    Accept,
    Hello,
    SealedReader,
    SealedWriter,
    accept_from_wire,
    accept_to_wire,
    answer,
    check_accept,
    check_hello,
    hello_from_wire,
    hello_to_wire,
    session_key,
)
from protocol.streams import STREAM_ENDINGS, close_quietly, read_frame, write_frame
from protocol.wire import as_map, pack, text, unpack_bounded

logger = logging.getLogger(__name__)
CONNECTED_TTL_S = 2.0  # how long one read of the peers this node is connected to is trusted


@dataclass
class RouteStats:
    direct: int = 0  # streams to private peers that went over an existing connection
    relayed_out: int = 0  # streams this node opened through a relay
    relayed_in: int = 0  # streams this node took off its relays
    failed: int = 0  # relayed dials that found no working relay


def circuit_addr(relay: str, peer: str) -> Multiaddr:
    return Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{peer}")


class RelayRouter:
    def __init__(self, own_id: str, key: Ed25519PrivateKey, names: RelayNames, raw_dial: RawDial,
                 lookup: Callable[[str], Callable | None], connected: Callable[[], Awaitable[set[str]]] | None = None,
                 clock: Clock = SYSTEM_CLOCK, rng: random.Random | None = None):
        self.own_id, self.key, self.names, self.raw_dial = own_id, key, names, raw_dial
        self.lookup, self.connected, self.clock = lookup, connected, clock
        self.rng = rng or random.Random()
        self.routes: dict[str, tuple[str, ...]] = {}  # private peer -> its relays
        self.relays: tuple[str, ...] = ()  # the relays this node holds reservations with (a private node)
        self.stats = RouteStats()
        self._connected: tuple[float, set[str]] = (-1e18, set())

    def set_routes(self, routes: dict[str, tuple[str, ...]]) -> None:
        self.routes = {peer: relays for peer, relays in routes.items() if peer != self.own_id}

    async def _is_connected(self, peer: str) -> bool:
        if self.connected is None:
            return False
        at, peers = self._connected
        if self.clock.monotonic() - at > CONNECTED_TTL_S:
            try:
                peers = await self.connected()
            except Exception as e:  # p2pd busy or gone: fall back to relays
                logger.debug("could not list connected peers: %s", e)
                peers = set()
            self._connected = (self.clock.monotonic(), peers)
        return peer in peers

    async def dial(self, peer: str, protocol: str) -> tuple:
        """A stream to ``peer`` speaking ``protocol``: direct unless the peer is private and not connected."""
        relays = [r for r in self.routes.get(peer, ()) if r != self.own_id]
        if not relays:
            return await self.raw_dial(peer, protocol)
        if await self._is_connected(peer):
            try:
                opened = await asyncio.wait_for(self.raw_dial(peer, protocol), DIAL_TIMEOUT)
                self.stats.direct += 1
                return opened
            except Exception as e:  # the connection dropped since: try its relays
                logger.debug("direct stream to private %s failed (%s); trying its relays", peer[-8:], e)
        errors = []
        for relay in self.rng.sample(relays, len(relays)):
            try:
                opened = await self._via(relay, peer, protocol)
                self.stats.relayed_out += 1
                return opened
            except Exception as e:  # a stream ending, a refusal, p2pd's ControlFailure: the next relay
                errors.append(f"{relay[-8:]}: {str(e) or type(e).__name__}")
        self.stats.failed += 1
        raise ConnectionError(f"could not reach private peer {peer[-8:]} through its relays ({'; '.join(errors)})")

    async def _via(self, relay: str, peer: str, protocol: str) -> tuple:
        _, reader, writer = await asyncio.wait_for(self.raw_dial(relay, self.names.hop), DIAL_TIMEOUT)
        try:
            await write_frame(writer, pack({"to": peer}))
            control_reply(await asyncio.wait_for(read_frame(reader, MAX_CONTROL), CONTROL_TIMEOUT), "relay hop")
            hello = Hello.make(self.key, protocol, self.own_id, peer, relay)
            await write_frame(writer, hello_to_wire(hello))
            accept = accept_from_wire(await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE), CONTROL_TIMEOUT))
            check_accept(accept, hello)
            key = session_key(hello, accept)
        except BaseException:
            close_quietly(writer)
            raise
        info = StreamInfo(PeerID.from_base58(peer), circuit_addr(relay, peer), protocol)
        return info, SealedReader(reader, key, "origin"), SealedWriter(writer, key, "origin")

    async def on_stop(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A relay's ``stop`` stream (a raw p2p stream handler): check, answer the hello, run the served handler."""
        relay = info.peer_id.to_base58()
        handed = False
        try:
            if relay not in self.relays:
                logger.info("refused a relayed stream from %s: not one of this node's relays", relay[-8:])
                return
            named = as_map(unpack_bounded(await asyncio.wait_for(read_frame(reader, MAX_CONTROL), CONTROL_TIMEOUT),
                                          MAX_CONTROL), "relay stop")
            origin = text(named, "from", "relay stop")
            hello = hello_from_wire(await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE), CONTROL_TIMEOUT))
            check_hello(hello, self.own_id, relay, origin)
            handler = self.lookup(hello.protocol)
            if handler is None:
                await write_frame(writer, accept_to_wire(Accept(b"", refused=f"protocol not served: "
                                                                              f"{hello.protocol[:120]}")))
                return
            accept = answer(self.key, hello)
            await write_frame(writer, accept_to_wire(accept))
            key = session_key(hello, accept)
            self.stats.relayed_in += 1
            handed = True
            await handler(StreamInfo(PeerID.from_base58(origin), circuit_addr(relay, origin), hello.protocol),
                          SealedReader(reader, key, "target"), SealedWriter(writer, key, "target"))
        except STREAM_ENDINGS as e:
            logger.info("relayed stream via %s ended: %s", relay[-8:], str(e) or type(e).__name__)
        finally:
            if not handed:
                close_quietly(writer)

    async def reserve(self, relay: str) -> float:
        """Take or renew a reservation with ``relay``; the seconds it lasts. ConnectionError (the relay's reason)
        or a stream ending if it refused or is gone."""
        _, reader, writer = await asyncio.wait_for(self.raw_dial(relay, self.names.reserve), DIAL_TIMEOUT)
        try:
            await write_frame(writer, pack({"v": 1}))
            return reservation_from_wire(await asyncio.wait_for(read_frame(reader, MAX_CONTROL), CONTROL_TIMEOUT))
        finally:
            close_quietly(writer)

    async def dialback(self, peer: str, ports: list[int]) -> tuple[str, list[int]]:
        """Ask ``peer`` to open TCP connections back to ``ports`` at the address it sees this node at: (that
        address, the ports it could open)."""
        _, reader, writer = await asyncio.wait_for(self.raw_dial(peer, self.names.dialback), DIAL_TIMEOUT)
        try:
            await write_frame(writer, pack({"ports": ports[:MAX_DIALBACK_PORTS]}))
            return dialback_from_wire(await asyncio.wait_for(read_frame(reader, MAX_CONTROL), CONTROL_TIMEOUT))
        finally:
            close_quietly(writer)
