"""Relayed streams (protocol/relay/): the handshake and sealed records, then real p2pd daemons on loopback -- a
target reserving with a relay, an origin reaching it only through the relay, the relay's bounds."""

from __future__ import annotations

import asyncio
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.clock import SYSTEM_CLOCK
from protocol.records.peer_keys import peer_id_of
from protocol.relay.circuits import RelayLimits, RelayNames, RelayService, observed_host
from protocol.relay.routes import RelayRouter
from protocol.relay.seal import (
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
from protocol.streams import open_stream, serve_on
from protocol.wire import WireError

log = logging.getLogger(__name__)
KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(4)]
IDS = [peer_id_of(k.public_key()) for k in KEYS]
ORIGIN, TARGET, RELAY, OTHER = IDS


def handshake() -> tuple[Hello, Accept, bytes, bytes]:
    hello = Hello.make(KEYS[0], "swarmnode/t/echo", ORIGIN, TARGET, RELAY)
    received = hello_from_wire(hello_to_wire(hello))
    check_hello(received, TARGET, RELAY, ORIGIN)
    accept = answer(KEYS[1], received)
    got = accept_from_wire(accept_to_wire(accept))
    check_accept(got, hello)
    return hello, accept, session_key(hello, got), session_key(received, accept)


def test_both_ends_derive_one_key_and_every_forgery_is_refused():
    hello, accept, origin_key, target_key = handshake()
    assert origin_key == target_key and len(origin_key) == 32
    with pytest.raises(WireError, match="addressed to"):
        check_hello(hello_from_wire(hello_to_wire(hello)), OTHER, RELAY, ORIGIN)
    with pytest.raises(WireError, match="another relay or origin"):  # the relay claims another origin
        check_hello(hello_from_wire(hello_to_wire(hello)), TARGET, RELAY, OTHER)
    forged = Hello.make(KEYS[3], "swarmnode/t/echo", ORIGIN, TARGET, RELAY)  # the relay's own key, posing as origin
    with pytest.raises(WireError, match="bad signature"):
        check_hello(hello_from_wire(hello_to_wire(forged)), TARGET, RELAY, ORIGIN)
    fresh = Hello.make(KEYS[0], "swarmnode/t/echo", ORIGIN, TARGET, RELAY)  # an old accept replayed to a new hello
    with pytest.raises(WireError, match="bad signature"):
        check_accept(accept, fresh)
    with pytest.raises(WireError, match="bad signature"):  # an accept by someone other than the target
        check_accept(answer(KEYS[3], hello), hello)
    with pytest.raises(WireError, match="refused by"):
        check_accept(accept_from_wire(accept_to_wire(Accept(b"", refused="protocol not served: x"))), hello)
    with pytest.raises(WireError):
        hello_from_wire(b"\x92\x01\x02")


class Pipe:
    """An in-memory byte pipe with asyncio's reader and a writer that feeds it (both ends of a sealed stream)."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data
        self.reader.feed_data(data)

    async def drain(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self.reader.feed_eof()


def test_sealed_records_round_trip_and_refuse_tampering_replay_and_reordering():
    async def main() -> None:
        _, _, key, _ = handshake()
        pipe = Pipe()
        writer, reader = SealedWriter(pipe, key, "origin"), SealedReader(pipe.reader, key, "target")
        secret = b"parameters nobody on the path may read " * 3000  # 117 KB: two records
        writer.write(len(secret).to_bytes(4, "big"))
        writer.write(secret)
        await writer.drain()
        assert secret[:40] not in bytes(pipe.data) and writer.sent == 2
        assert int.from_bytes(await reader.readexactly(4), "big") == len(secret)
        assert await reader.readexactly(len(secret)) == secret
        writer.close()
        assert await reader.read(10) == b"" and reader.at_eof()

        for mangle in ("flip", "replay", "reorder", "other direction"):
            pipe = Pipe()
            writer = SealedWriter(pipe, key, "origin")
            for word in (b"first", b"second"):
                writer.write(word)
                await writer.drain()
            records = bytes(pipe.data)
            first_len = 4 + int.from_bytes(records[:4], "big")
            a, b = records[:first_len], records[first_len:]
            wire = {"flip": a[:-1] + bytes([a[-1] ^ 1]) + b, "replay": a + a, "reorder": b + a,
                    "other direction": a + b}[mangle]
            side = "origin" if mangle == "other direction" else "target"  # a record reflected back to its sender
            raw = asyncio.StreamReader()
            raw.feed_data(wire)
            raw.feed_eof()
            got = SealedReader(raw, key, side)
            with pytest.raises(WireError, match="failed authentication"):
                await got.readexactly(len(b"firstsecond"))

    asyncio.run(main())


def test_a_truncated_or_forged_record_ends_a_lingering_relayed_stream_like_a_hang_up():
    from protocol.streams import close_after_peer

    async def main() -> None:
        _, _, key, _ = handshake()
        for wire in (b"\x00\x00\x01\x00" + b"x" * 10, b"\x00\x00\x00\x20" + b"y" * 32):  # cut short; bad tag
            raw = asyncio.StreamReader()
            raw.feed_data(wire)
            raw.feed_eof()
            pipe = Pipe()
            await asyncio.wait_for(close_after_peer(SealedReader(raw, key, "target"), SealedWriter(pipe, key,
                                                                                                  "target")), 5)
            assert pipe.closed  # closed, and no exception escaped

    asyncio.run(main())


def test_observed_host_reads_only_ip_addresses():
    assert observed_host("/ip4/100.64.88.101/tcp/40123") == "100.64.88.101"
    assert observed_host("/ip6/::1/tcp/1") == "::1"
    assert observed_host("/p2p/12D3KooWA/p2p-circuit/p2p/12D3KooWB") is None


async def start_daemon(key_path=None, bootstrap=()):
    from node.runtime.p2pd import OwnedP2PDaemon

    daemon = OwnedP2PDaemon()
    p2p = await daemon.start(identity_path=key_path, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=bootstrap)
    return daemon, p2p


def write_identity(tmp_path, i: int) -> str:
    from node.runtime.identity import write_p2p_identity

    path = tmp_path / f"p2p{i}.key"
    write_p2p_identity(KEYS[i], path)
    return str(path)


@pytest.mark.timeout(120)
def test_an_origin_reaches_a_target_only_through_the_relay_it_reserved_with(tmp_path):
    """Real p2pd daemons: the origin's router is told the target is private (relay R), so its stream goes
    origin -> R -> target; the served handler sees the origin as its peer; the relay's bounds hold."""

    async def main() -> None:
        names = RelayNames("t")
        daemons = []
        try:
            for i in (2, 1, 0):  # relay first (the others bootstrap from it), then target, then origin
                boot = () if i == 2 else [f"{(await daemons[0][1].get_visible_maddrs())[0]}/p2p/{RELAY}"]
                daemons.append(await start_daemon(write_identity(tmp_path, i), boot))
            (_, relay_p2p), (_, target_p2p), (_, origin_p2p) = daemons
            service = RelayService(RELAY, relay_p2p.raw_stream, names, RelayLimits(data_bytes=300_000),
                                   clock=SYSTEM_CLOCK)
            await serve_on(relay_p2p, service.handlers(), log)
            seen = []

            async def echo(stream) -> None:
                seen.append((stream.peer, stream.addr))
                while True:
                    data = await stream.receive(1 << 20, 10.0)
                    await stream.send(data[::-1])
                    if data == b"bye":
                        return

            await serve_on(target_p2p, {"swarmnode/t/echo": echo}, log)
            routers = {}
            for i, p2p in ((1, target_p2p), (0, origin_p2p)):
                routers[i] = RelayRouter(IDS[i], KEYS[i], names, p2p.raw_stream, p2p.stream_handlers.get)
                p2p.router = routers[i]
                await p2p.add_binary_stream_handler(names.stop, routers[i].on_stop)

            routers[0].set_routes({TARGET: (RELAY,)})
            with pytest.raises(ConnectionError, match="no reservation"):  # the target has not reserved yet
                async with open_stream(origin_p2p, TARGET, "swarmnode/t/echo") as stream:
                    pass
            assert await routers[1].reserve(RELAY) == 60.0
            routers[1].relays = (RELAY,)
            async with open_stream(origin_p2p, TARGET, "swarmnode/t/echo") as stream:
                for payload in (b"hello", b"x" * 100_000, b"bye"):
                    await stream.send(payload)
                    assert await stream.receive(1 << 20, 10.0) == payload[::-1]
            assert seen == [(ORIGIN, f"/p2p/{RELAY}/p2p-circuit/p2p/{ORIGIN}")]
            assert routers[0].stats.relayed_out == 1 and routers[1].stats.relayed_in == 1
            assert service.stats.bytes_relayed > 200_000 and service.stats.circuits_total == 1

            with pytest.raises(ConnectionError, match="protocol not served"):
                async with open_stream(origin_p2p, TARGET, "swarmnode/t/nothing") as stream:
                    pass

            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):  # past the 300 KB budget: cut
                async with open_stream(origin_p2p, TARGET, "swarmnode/t/echo") as stream:
                    for _ in range(5):
                        await stream.send(b"y" * 100_000)
                        await stream.receive(1 << 20, 10.0)
            assert service.stats.cut == 1
            assert service.stats.circuits == 0 and not service._from and not service._to
        finally:
            for daemon, _ in reversed(daemons):
                await daemon.stop()

    asyncio.run(main())
