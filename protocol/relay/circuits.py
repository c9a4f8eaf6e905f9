"""The relay's side: reservations by peers that cannot be reached, and bounded circuits to them.

    names = RelayNames("demo")
    service = RelayService(own_id, raw_dial, names, RelayLimits())      # raw_dial: p2p's own stream opener
    await serve_on(p2p, service.handlers(), log)                        # reserve + hop (+ dialback, below)

A peer behind a NAT keeps a reservation with one or two reachable peers (``reserve``, renewed well inside
RelayLimits.reservation_s); its outbound connection to each is what lets the relay open streams to it. A peer that
wants to reach it opens ``hop`` on one of its relays naming the target; the relay opens ``stop`` on the target over
that connection, names the origin (as libp2p authenticated it), answers "ok" and then only copies bytes both ways
until either side hangs up, the circuit's byte budget or duration runs out, or the relay stops. The two ends
secure the stream themselves (protocol/relay/seal.py): the relay cannot read or alter it.

Bounds (RelayLimits; each refusal is one line back to the asker): reservations held, circuits open in all and per
origin, bytes per circuit (both directions), seconds per circuit. Only peers holding a live reservation can be
reached through a relay, so a relay cannot be used to reach arbitrary peers; ``admit`` (a private swarm's
membership check) is applied to both ends.

The dial-back check (``dialback``): a peer asks "can you open a TCP connection to me?"; the relay tries the ports
it names (at most MAX_DIALBACK_PORTS) at the address its connection came from -- never any other host, so it
cannot be used to scan third parties -- and answers with that observed address and the ports that answered.
This is how a node learns whether it is reachable (node/runtime/reachability.py), as libp2p's AutoNAT does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.pipeline.direct import maddr_ips
from protocol.streams import Handler, Stream, close_quietly, write_frame
from protocol.wire import WireError, as_map, count, pack, text, unpack_bounded
from protocol.wire import field as wire_field

logger = logging.getLogger(__name__)

MAX_CONTROL = 512  # bytes of a reserve / hop / stop / dialback message
CONTROL_TIMEOUT = 10.0
DIAL_TIMEOUT = 5.0
CHUNK = 65536
MAX_DIALBACK_PORTS = 4
DIALBACK_TIMEOUT = 3.0
MAX_DIALBACKS = 4  # concurrent dial-back checks a relay runs
PROBE_BYTES = 1 << 20  # the largest frame the probe service reads (a doctor's throughput check)
MAX_PROBE_FRAMES = 4  # frames one probe stream may send

RawDial = Callable[[str, str], Awaitable[tuple]]  # (peer, protocol) -> (StreamInfo, reader, writer), no relay


@dataclass(frozen=True)
class RelayNames:
    """The relay protocols of one swarm."""

    swarm: str

    @property
    def reserve(self) -> str:
        return f"swarmnode/{self.swarm}/relay/reserve"

    @property
    def hop(self) -> str:
        return f"swarmnode/{self.swarm}/relay/hop"

    @property
    def stop(self) -> str:
        return f"swarmnode/{self.swarm}/relay/stop"

    @property
    def dialback(self) -> str:
        return f"swarmnode/{self.swarm}/dialback"

    @property
    def probe(self) -> str:
        return f"swarmnode/{self.swarm}/probe"


@dataclass(frozen=True)
class RelayLimits:
    max_reservations: int = 32
    max_circuits: int = 64
    max_circuits_per_peer: int = 16  # open circuits from one origin, or to one target
    data_bytes: int = 1 << 30  # per circuit, both directions together
    duration_s: float = 900.0  # per circuit
    reservation_s: float = 60.0  # a reservation lapses this long after its last renewal

    def __post_init__(self) -> None:
        if min(self.max_reservations, self.max_circuits, self.max_circuits_per_peer, self.data_bytes) < 1 or \
                not (self.duration_s > 0 and self.reservation_s > 0):
            raise ValueError(f"relay limits must be positive: {self}")


@dataclass
class RelayStats:
    reservations: int = 0  # held now
    circuits: int = 0  # open now
    circuits_total: int = 0
    refused: Counter = field(default_factory=Counter)  # reason -> count
    bytes_relayed: int = 0  # both directions, all circuits
    cut: int = 0  # circuits ended by a byte or time budget


def _refusal(reason: str) -> bytes:
    return pack({"refused": reason})


def control_reply(data: bytes, what: str) -> dict:
    """A relay's answer as a map; ConnectionError carrying its one-line reason when it refused."""
    obj = as_map(unpack_bounded(data, MAX_CONTROL), what)
    if "refused" in obj:
        raise ConnectionError(f"{what} refused: {text(obj, 'refused', what)}")
    return obj


def observed_host(addr: str) -> str | None:
    """The IP of a libp2p remote address (/ip4/1.2.3.4/tcp/5 or /ip6/...), None for anything else (a circuit)."""
    ips = maddr_ips([addr]) if str(addr).startswith(("/ip4/", "/ip6/")) else []
    try:
        return str(ipaddress.ip_address(ips[0])) if ips else None
    except ValueError:
        return None


async def tcp_open(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within ``timeout`` (closed at once)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (TimeoutError, OSError):
        return False
    close_quietly(writer)
    return True


class RelayService:
    def __init__(self, own_id: str, raw_dial: RawDial, names: RelayNames, limits: RelayLimits | None = None,
                 admit: Callable[[str], bool] | None = None, clock: Clock = SYSTEM_CLOCK, relay: bool = True):
        self.own_id, self.raw_dial, self.names = own_id, raw_dial, names
        self.limits, self.admit, self.clock = limits or RelayLimits(), admit, clock
        self.relay = relay  # False: --no-relay-service (the dial-back check is still served)
        self.reserved: dict[str, float] = {}  # peer -> when its reservation lapses
        self.stats = RelayStats()
        self._from: Counter = Counter()  # open circuits by origin
        self._to: Counter = Counter()  # ... and by target
        self._dialbacks = asyncio.Semaphore(MAX_DIALBACKS)
        self._probes = asyncio.Semaphore(2)  # probe streams served at once

    def handlers(self) -> dict[str, Handler]:
        served: dict[str, Handler] = {self.names.dialback: self.on_dialback, self.names.probe: self.on_probe}
        if self.relay:
            served |= {self.names.reserve: self.on_reserve, self.names.hop: self.on_hop}
        return served

    def live_reservations(self) -> list[str]:
        now = self.clock.monotonic()
        for peer in [p for p, until in self.reserved.items() if until <= now]:
            del self.reserved[peer]
        self.stats.reservations = len(self.reserved)
        return sorted(self.reserved)

    def _refuse(self, reason: str) -> bytes:
        self.stats.refused[reason.split(":")[0]] += 1
        return _refusal(reason)

    async def on_reserve(self, stream: Stream) -> None:
        as_map(unpack_bounded(await stream.receive(MAX_CONTROL, CONTROL_TIMEOUT), MAX_CONTROL), "relay reserve")
        if self.admit is not None and not self.admit(stream.peer):
            await stream.send(self._refuse("not a member of this swarm"))
            return
        live = self.live_reservations()
        if stream.peer not in self.reserved and len(live) >= self.limits.max_reservations:
            await stream.send(self._refuse(f"reservations full ({self.limits.max_reservations})"))
            return
        self.reserved[stream.peer] = self.clock.monotonic() + self.limits.reservation_s
        self.stats.reservations = len(self.reserved)
        await stream.send(pack({"ttl": self.limits.reservation_s, "circuits": self.limits.max_circuits_per_peer,
                                "data": self.limits.data_bytes, "duration": self.limits.duration_s}))

    def _check_circuit(self, origin: str, target: str) -> str | None:
        """Why a circuit from origin to target is refused, None if it may open."""
        if target not in self.live_reservations():
            return f"no reservation: {target[-8:]} does not relay through this peer"
        if self.admit is not None and not (self.admit(origin) and self.admit(target)):
            return "not a member of this swarm"
        if self.stats.circuits >= self.limits.max_circuits:
            return f"circuits full ({self.limits.max_circuits})"
        if max(self._from[origin], self._to[target]) >= self.limits.max_circuits_per_peer:
            return f"circuits per peer full ({self.limits.max_circuits_per_peer})"
        return None

    async def on_hop(self, stream: Stream) -> None:
        ask = as_map(unpack_bounded(await stream.receive(MAX_CONTROL, CONTROL_TIMEOUT), MAX_CONTROL), "relay hop")
        target, origin = text(ask, "to", "relay hop"), stream.peer
        reason = self._check_circuit(origin, target)
        if reason is not None:
            await stream.send(self._refuse(reason))
            return
        self.stats.circuits += 1
        self._from[origin] += 1
        self._to[target] += 1
        try:
            try:
                _, t_reader, t_writer = await asyncio.wait_for(self.raw_dial(target, self.names.stop), DIAL_TIMEOUT)
            except Exception as e:  # p2pd's ControlFailure, a timeout: the target went away
                await stream.send(self._refuse(f"target unreachable: {type(e).__name__}"))
                return
            try:
                await write_frame(t_writer, pack({"from": origin}))
                await stream.send(pack({"ok": True}))
                self.stats.circuits_total += 1
                await self._pipe(stream.reader, stream.writer, t_reader, t_writer)
            finally:
                close_quietly(t_writer)
                stream.close()
        finally:
            self.stats.circuits -= 1
            self._from[origin] -= 1
            self._to[target] -= 1
            self._from += Counter()  # drop zero counts
            self._to += Counter()

    async def _pipe(self, a_reader, a_writer, b_reader, b_writer) -> None:
        """Copy both ways until both sides have hung up (one side's end is passed on as end-of-file), or the
        circuit's byte or time budget is spent (then both are cut)."""
        budget = [self.limits.data_bytes]

        async def copy(reader, writer) -> None:
            while True:
                chunk = await reader.read(CHUNK)
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                budget[0] -= len(chunk)
                if budget[0] < 0:
                    raise WireError(f"circuit passed its {self.limits.data_bytes}-byte budget")
                self.stats.bytes_relayed += len(chunk)
                writer.write(chunk)
                await writer.drain()

        tasks = [asyncio.ensure_future(copy(a_reader, b_writer)), asyncio.ensure_future(copy(b_reader, a_writer))]
        try:
            async with asyncio.timeout(self.limits.duration_s):
                done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # a budget spent or a side reset: cut the other way too
        except (TimeoutError, WireError) as e:
            self.stats.cut += 1
            logger.info("relay circuit cut: %s", e or "its duration ran out")
        except (ConnectionError, OSError) as e:
            logger.debug("relay circuit ended: %s", e)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def on_probe(self, stream: Stream) -> None:
        await probe_service(stream, self._probes)

    async def on_dialback(self, stream: Stream) -> None:
        ask = as_map(unpack_bounded(await stream.receive(MAX_CONTROL, CONTROL_TIMEOUT), MAX_CONTROL), "dialback")
        ports = wire_field(ask, "ports", list, "dialback")
        if not 1 <= len(ports) <= MAX_DIALBACK_PORTS or not all(
                isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports):
            raise WireError(f"dialback: 1 to {MAX_DIALBACK_PORTS} TCP ports expected")
        host = observed_host(stream.addr)
        if host is None:  # a relayed stream: nothing to dial back
            await stream.send(pack({"seen": str(stream.addr)[:256], "open": []}))
            return
        async with self._dialbacks:
            results = await asyncio.gather(*(tcp_open(host, port, DIALBACK_TIMEOUT) for port in ports))
        await stream.send(pack({"seen": str(stream.addr)[:256], "open": [p for p, ok in zip(ports, results) if ok]}))


async def probe_service(stream: Stream, busy: asyncio.Semaphore) -> None:
    """``swarmnode doctor``'s peer check: each frame (at most PROBE_BYTES, MAX_PROBE_FRAMES of them) answered with
    its length, so the asker times a round trip and a transfer end to end (over a relay too)."""
    async with busy:
        for _ in range(MAX_PROBE_FRAMES):
            try:
                data = await stream.receive(PROBE_BYTES, CONTROL_TIMEOUT)
            except asyncio.IncompleteReadError:
                return
            await stream.send(len(data).to_bytes(4, "big"))


def dialback_from_wire(data: bytes) -> tuple[str, list[int]]:
    """(the address the asked peer saw us at, the ports it could open) of a dial-back answer."""
    obj = control_reply(data, "dialback")
    ports = wire_field(obj, "open", list, "dialback")
    if len(ports) > MAX_DIALBACK_PORTS or not all(isinstance(p, int) for p in ports):
        raise WireError("dialback: bad port list")
    return text(obj, "seen", "dialback", 256), ports


def reservation_from_wire(data: bytes) -> float:
    """The seconds a reservation lasts, from a relay's answer."""
    obj = control_reply(data, "relay reservation")
    ttl = wire_field(obj, "ttl", (int, float), "relay reservation")
    count(obj, "circuits", "relay reservation")
    if not 1.0 <= ttl <= 3600.0:
        raise WireError(f"relay reservation: ttl {ttl} out of range")
    return float(ttl)
