"""Whether others can open connections to this node, and, when they cannot, the relays it keeps.

    reach = Reachability(router, "auto", ports, clock)
    await reach.detect(join_peers)                   # before the DHT starts: a private node runs it in client mode
    await reach.fill_relays(candidates)              # a private node: reservations with up to WANT_RELAYS peers
    reach.start(candidates, routes, on_change)       # renewals, failover to another relay, peers' routes
    reach, service = await start_relaying(p2p, key, peer_id, swarm, mode, relay_service, join_peers)  # all of it

Detection (``--reachability auto``, the default) asks up to DETECT_PEERS peers to dial back this node's TCP
listening ports at the address they see it at (protocol/relay/circuits.py's dial-back check): public if any
could, private if they answered and none could, and "public (unverified)" when nobody answered or there was
nobody to ask (the first node of a swarm: it is what others join, so it is assumed reachable). ``public`` and
``private`` skip the check. A private node keeps reservations with WANT_RELAYS reachable peers that offer the
relay service, renews them every RENEW_S, replaces one that fails, and republishes its record (whose ``relays``
tell others how to reach it) whenever the set changes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.relay.circuits import RelayNames, RelayService
from protocol.relay.routes import RelayRouter
from protocol.streams import serve_on

logger = logging.getLogger(__name__)

MODES = ("auto", "public", "private")
DETECT_PEERS = 3
CHECK_S = 8.0  # the longest one peer's dial-back answer is waited for
WANT_RELAYS = 2
RENEW_S = 15.0  # well inside a relay's 60 s reservation
ROUTES_S = 3.0  # how often peers' relays are re-read from their records


@dataclass
class Detection:
    state: str = "public"  # "public" or "private": what this node acts as
    how: str = "assumed"  # "checked", "assumed" (nobody to ask / nobody answered) or "set" (--reachability)
    seen_as: list[str] = field(default_factory=list)  # addresses peers saw this node's connections come from
    open_ports: list[int] = field(default_factory=list)  # listening ports some peer could open
    asked: list[str] = field(default_factory=list)  # "peer: result" lines of the last check


def tcp_ports(maddrs: Sequence[str]) -> list[int]:
    """The TCP ports of this node's listening multiaddrs, in order, without repeats."""
    ports: list[int] = []
    for addr in maddrs:
        parts = str(addr).split("/")
        for i, part in enumerate(parts[:-1]):
            if part == "tcp" and parts[i + 1].isdigit() and int(parts[i + 1]) not in ports:
                ports.append(int(parts[i + 1]))
    return ports


class Reachability:
    def __init__(self, router: RelayRouter, mode: str, ports: Sequence[int], clock: Clock = SYSTEM_CLOCK,
                 rng: random.Random | None = None, want_relays: int = WANT_RELAYS):
        if mode not in MODES:
            raise ValueError(f"reachability must be one of {', '.join(MODES)}, got {mode!r}")
        self.router, self.mode, self.ports, self.clock = router, mode, list(ports)[:4], clock
        self.rng, self.want = rng or random.Random(), want_relays
        self.detection = Detection(state=mode if mode != "auto" else "public", how="set" if mode != "auto" else
                                   "assumed")
        self.relay_errors: dict[str, str] = {}  # relay -> why it was dropped last (for doctor)
        self._task: asyncio.Task | None = None

    @property
    def private(self) -> bool:
        return self.detection.state == "private"

    async def check(self, peers: Sequence[str]) -> Detection:
        """Ask up to DETECT_PEERS of ``peers`` to dial back this node's ports; the verdict (not applied)."""
        found = Detection(how="checked")
        answered = 0
        asked = list(peers)[:DETECT_PEERS]
        answers = await asyncio.gather(*(asyncio.wait_for(self.router.dialback(p, self.ports), CHECK_S)
                                         for p in asked), return_exceptions=True)
        for peer, answer in zip(asked, answers):
            if isinstance(answer, BaseException):  # an old node without the check, a peer gone: the others count
                found.asked.append(f"{peer}: no answer ({str(answer)[:80] or type(answer).__name__})")
                continue
            seen, open_ports = answer
            answered += 1
            found.seen_as.append(seen)
            found.open_ports = sorted(set(found.open_ports) | set(open_ports))
            found.asked.append(f"{peer}: saw {seen}, opened {open_ports or 'no port'}")
        if answered == 0:
            found.state, found.how = "public", "assumed"
        else:
            found.state = "public" if found.open_ports else "private"
        return found

    async def detect(self, peers: Sequence[str]) -> Detection:
        """Run the check when the mode is auto (and there is someone to ask), and keep its verdict."""
        if self.mode == "auto" and peers:
            self.detection = await self.check(peers)
        logger.info("reachability: %s (%s)%s", self.detection.state, self.detection.how,
                    f"; seen as {', '.join(self.detection.seen_as)}" if self.detection.seen_as else "")
        return self.detection

    async def fill_relays(self, candidates: Sequence[str]) -> bool:
        """Renew held reservations and take new ones until WANT_RELAYS are held; whether the set changed."""
        held = list(self.router.relays)
        keep = []
        for relay in held:
            try:
                await self.router.reserve(relay)
                keep.append(relay)
            except Exception as e:
                self.relay_errors[relay] = str(e)[:120] or type(e).__name__
                logger.warning("relay %s lost (%s); looking for another", relay, self.relay_errors[relay])
        fresh = [c for c in candidates if c not in keep and c != self.router.own_id]
        for relay in self.rng.sample(fresh, len(fresh)):
            if len(keep) >= self.want:
                break
            try:
                await self.router.reserve(relay)
            except Exception as e:
                self.relay_errors[relay] = str(e)[:120] or type(e).__name__
                continue
            keep.append(relay)
            logger.info("relaying through %s", relay)
        self.router.relays = tuple(keep)
        if not keep and self.private:
            logger.warning("no relay: peers that cannot reach this node directly will not reach it")
        return set(keep) != set(held)

    def start(self, candidates: Callable[[], Awaitable[list[str]]],
              routes: Callable[[], Awaitable[dict[str, tuple[str, ...]]]],
              on_change: Callable[[], Awaitable[object]]) -> None:
        self._task = asyncio.create_task(self._upkeep(candidates, routes, on_change), name="reachability")

    async def _upkeep(self, candidates, routes, on_change) -> None:
        last_renew = self.clock.monotonic()
        while True:
            await self.clock.sleep(ROUTES_S)
            try:
                self.router.set_routes(await routes())
                due = self.clock.monotonic() - last_renew >= RENEW_S
                if self.private and (due or len(self.router.relays) < self.want):
                    last_renew = self.clock.monotonic()
                    if await self.fill_relays(await candidates()):
                        await on_change()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a DHT read failing: try again at the next tick
                logger.warning("reachability upkeep: %s", e)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def start_relaying(p2p, key, peer_id: str, swarm: str, mode: str, relay_service: bool,
                         join_peers: Sequence[str]) -> tuple[Reachability, RelayService]:
    """Wire a node's relaying into its p2p (node/runtime/p2pd.py's P2P): the router every stream goes through, the
    ``stop`` handler, the relay service (reservations and circuits when the node is public and offers it; the
    dial-back check always), and this node's reachability, checked with ``join_peers`` when ``mode`` is auto."""
    names = RelayNames(swarm)
    router = RelayRouter(peer_id, key, names, p2p.raw_stream, p2p.stream_handlers.get, p2p.connected_peers)
    reach = Reachability(router, mode, tcp_ports([str(a) for a in await p2p.get_visible_maddrs()]))
    await reach.detect(join_peers)
    service = RelayService(peer_id, p2p.raw_stream, names, relay=relay_service and not reach.private)
    await serve_on(p2p, service.handlers(), logger, "relay service")
    await p2p.add_binary_stream_handler(names.stop, router.on_stop)
    p2p.router = router
    return reach, service
