"""protocol/transfer/shard_transfer.py: shards fetched in chunks over real libp2p streams (p2pd daemons in this process,
port 0, stopped in finally), resumed after a cut stream from another peer or a later call without
re-requesting a byte already held, verified by sha256 before the atomic rename; a corrupt source, an unknown
shard, out-of-range requests and misbehaving servers are each refused with a one-line error."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import pathlib

import msgpack
import pytest

from node.runtime.p2pd import OwnedP2PDaemon
from protocol.streams import close_quietly, read_frame, write_frame
from protocol.transfer.shard_transfer import (
    MAX_CHUNK,
    BusyError,
    ChunkReply,
    ChunkRequest,
    ServeFault,
    ShardServer,
    ShardTransferError,
    TransferRefusal,
    chunk_reply_from_wire,
    chunk_reply_to_wire,
    chunk_request_from_wire,
    chunk_request_to_wire,
    fetch_shard,
    part_path,
    refusal_to_wire,
    reply_bound,
    shard_protocol,
)
from protocol.transfer.shards import ShardInfo
from protocol.wire import WireError

CHUNK = 64 * 1024
PROTOCOL = shard_protocol("test")
SHA = "ab" * 32


def make_shard(folder: pathlib.Path, name: str, size: int, seed: int) -> tuple[pathlib.Path, ShardInfo]:
    data = bytes((i * 131 + seed * 7 + (i >> 9)) & 0xFF for i in range(size))
    path = folder / name
    path.write_bytes(data)
    return path, ShardInfo(0, 1, name, hashlib.sha256(data).hexdigest(), size)


@contextlib.asynccontextmanager
async def daemons(n: int):
    """n connected p2pd daemons on loopback (each bootstraps from all before it); always stopped."""
    started: list[OwnedP2PDaemon] = []
    try:
        for _ in range(n):
            join = [str((await d.p2p.get_visible_maddrs())[0]) for d in started]
            d = OwnedP2PDaemon()
            started.append(d)
            await d.start(identity_path=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=join)
        yield [d.p2p for d in started]
    finally:
        for d in started:
            await d.stop()


@contextlib.asynccontextmanager
async def serving(servers: list[ShardServer]):
    try:
        for s in servers:
            await s.start()
        yield servers
    finally:
        for s in servers:
            await s.stop()


def lookup_of(*pairs: tuple[ShardInfo, pathlib.Path]):
    table = {info.sha256: path for info, path in pairs}
    return table.get


# ---- over real streams -------------------------------------------------------------------------------------


def test_a_multi_chunk_shard_arrives_verified_and_atomically(tmp_path):
    src, info = make_shard(tmp_path, "stage-0000.safetensors", 5 * CHUNK + 1234, seed=1)
    dest = tmp_path / "got" / info.file

    async def scenario():
        async with daemons(2) as (a, client):
            async with serving([ShardServer(a, PROTOCOL, lookup_of((info, src)))]) as (server,):
                got = await fetch_shard(client, [a.peer_id], info, dest, protocol_name=PROTOCOL, chunk=CHUNK)
                again = await fetch_shard(client, [], info, dest, protocol_name=PROTOCOL)  # already there: no request
                return got, again, list(server.served), client.peer_id.to_base58()

    got, again, served, client_id = asyncio.run(scenario())
    assert got == again == dest and dest.read_bytes() == src.read_bytes()
    assert not part_path(dest).exists()
    assert [(p, o) for p, o, _ in served] == [(client_id, i * CHUNK) for i in range(6)]  # once each, in order
    assert [n for _, _, n in served] == [CHUNK] * 5 + [1234]


def test_a_cut_transfer_resumes_from_the_part_file_without_rerequesting_bytes(tmp_path):
    """Peer A hangs up at its 4th request on a stream. A call with only A (one request in flight, so exactly 3
    chunks land) fails keeping them in .part; the next call, with B, asks B only for the rest."""
    src, info = make_shard(tmp_path, "stage-0001.safetensors", 8 * CHUNK, seed=2)
    cut_after = 3

    def cut(peer, req, index):
        return ServeFault.HANG_UP if index >= cut_after else None

    async def scenario():
        async with daemons(3) as (a, b, client):
            server_a = ShardServer(a, PROTOCOL, lookup_of((info, src)), fault=cut)
            server_b = ShardServer(b, PROTOCOL, lookup_of((info, src)))
            async with serving([server_a, server_b]):
                dest = tmp_path / "got" / info.file
                with pytest.raises(ShardTransferError, match=rf"fetched {cut_after * CHUNK} of {info.size} bytes; "
                                                             rf"{a.peer_id}: hung up \("):
                    await fetch_shard(client, [a.peer_id], info, dest, protocol_name=PROTOCOL, chunk=CHUNK, window=1)
                held = part_path(dest).stat().st_size
                await fetch_shard(client, [b.peer_id.to_base58()], info, dest, protocol_name=PROTOCOL, chunk=CHUNK)
                return dest, held, list(server_a.served), list(server_b.served)

    dest, held, from_a, from_b = asyncio.run(scenario())
    assert held == cut_after * CHUNK
    assert [o for _, o, _ in from_a] == [0, CHUNK, 2 * CHUNK]
    assert [o for _, o, _ in from_b] == [i * CHUNK for i in range(cut_after, 8)]  # not one byte asked twice
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == info.sha256 and not part_path(dest).exists()


def test_one_fetch_moves_to_the_next_peer_from_where_the_cut_one_stopped(tmp_path):
    """Pipelined requests (window 4): A's hang-up may also lose replies still in flight, so how much of A's
    output lands varies; whatever landed, B is asked for exactly the bytes after it."""
    src, info = make_shard(tmp_path, "stage-0001.safetensors", 8 * CHUNK, seed=2)

    async def scenario():
        async with daemons(3) as (a, b, client):
            server_a = ShardServer(a, PROTOCOL, lookup_of((info, src)),
                                   fault=lambda p, r, i: ServeFault.HANG_UP if i >= 3 else None)
            server_b = ShardServer(b, PROTOCOL, lookup_of((info, src)))
            async with serving([server_a, server_b]):
                dest = tmp_path / "got" / info.file
                await fetch_shard(client, [a.peer_id, b.peer_id], info, dest, protocol_name=PROTOCOL, chunk=CHUNK)
                return dest, list(server_a.served), list(server_b.served)

    dest, from_a, from_b = asyncio.run(scenario())
    assert [o for _, o, _ in from_a] == [0, CHUNK, 2 * CHUNK]
    resumed_at = from_b[0][1]
    assert resumed_at in (0, CHUNK, 2 * CHUNK, 3 * CHUNK)
    assert [o for _, o, _ in from_b] == list(range(resumed_at, 8 * CHUNK, CHUNK))
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == info.sha256 and not part_path(dest).exists()


def test_a_corrupt_source_is_named_and_leaves_nothing_behind(tmp_path):
    src, info = make_shard(tmp_path, "stage-0002.safetensors", 3 * CHUNK, seed=3)
    other, _ = make_shard(tmp_path, "other.bin", 3 * CHUNK, seed=4)  # same size, other bytes
    dest = tmp_path / "got" / info.file

    async def scenario():
        async with daemons(2) as (bad, client):
            async with serving([ShardServer(bad, PROTOCOL, lambda sha: other)]):
                with pytest.raises(ShardTransferError) as caught:
                    await fetch_shard(client, [bad.peer_id], info, dest, protocol_name=PROTOCOL, chunk=CHUNK)
                return str(caught.value), bad.peer_id.to_base58()

    message, bad_id = asyncio.run(scenario())
    assert "sha256" in message and "is not the manifest's" in message and bad_id in message
    assert "\n" not in message
    assert not dest.exists() and not part_path(dest).exists()


def test_an_unknown_shard_fails_clearly_on_every_peer(tmp_path):
    _, info = make_shard(tmp_path, "stage-0003.safetensors", 1000, seed=5)
    dest = tmp_path / "got" / info.file

    async def scenario():
        async with daemons(3) as (a, b, client):
            nothing = [ShardServer(a, PROTOCOL, lambda sha: None), ShardServer(b, PROTOCOL, lambda sha: None)]
            async with serving(nothing):
                with pytest.raises(ShardTransferError) as caught:
                    await fetch_shard(client, [a.peer_id, b.peer_id], info, dest, protocol_name=PROTOCOL)
                return str(caught.value), a.peer_id.to_base58(), b.peer_id.to_base58()

    message, a_id, b_id = asyncio.run(scenario())
    assert message.startswith(f"{info.file}: fetched 0 of 1000 bytes; ")
    assert f"{a_id}: ShardTransferError: refused (unknown_shard)" in message and b_id in message
    assert not dest.exists() and not part_path(dest).exists()


def test_the_server_refuses_out_of_range_oversize_and_malformed_requests(tmp_path):
    src, info = make_shard(tmp_path, "stage-0004.safetensors", 10_000, seed=6)

    async def ask(client, peer, frame: bytes, req: ChunkRequest):
        _, reader, writer = await client.call_binary_stream_handler(peer, PROTOCOL)
        try:
            await write_frame(writer, frame)
            return chunk_reply_from_wire(await asyncio.wait_for(read_frame(reader, reply_bound(req.length)), 10), req)
        finally:
            close_quietly(writer)

    async def scenario():
        async with daemons(2) as (a, client):
            server = ShardServer(a, PROTOCOL, lookup_of((info, src)), max_chunk=4096)
            async with serving([server]):
                replies = {}
                for name, req in {"past_end": ChunkRequest(info.sha256, 9_990, 100),
                                  "at_end": ChunkRequest(info.sha256, 10_000, 1),
                                  "too_large": ChunkRequest(info.sha256, 0, 8192),
                                  "honest": ChunkRequest(info.sha256, 9_000, 1000)}.items():
                    replies[name] = await ask(client, a.peer_id, chunk_request_to_wire(req), req)
                junk = msgpack.packb({"t": "get", "v": 1, "sha256": info.sha256, "offset": -1, "length": 5})
                replies["malformed"] = await ask(client, a.peer_id, junk, ChunkRequest(info.sha256, 0, 5))
                return replies, list(server.served)

    replies, served = asyncio.run(scenario())
    assert replies["past_end"] == TransferRefusal("out_of_range", "bytes [9990, 10090) of a 10000-byte shard")
    assert replies["at_end"].code == "out_of_range"
    assert replies["too_large"] == TransferRefusal("too_large", "chunks of at most 4096 bytes")
    assert replies["malformed"].code == "bad_request" and "offset" in replies["malformed"].reason
    assert replies["honest"] == ChunkReply(info.sha256, 9_000, src.read_bytes()[9_000:])
    assert [(o, n) for _, o, n in served] == [(9_000, 1000)]  # refused requests read nothing


@pytest.mark.parametrize("fault, message", [
    (ServeFault.SHORT, r"chunk: 65535 bytes at offset 131072, 65536 were asked for"),
    (ServeFault.WRONG_OFFSET, r"chunk: at offset 131073, 131072 was asked for"),
    (ServeFault.OVERSIZE, r"peer announced a 65793-byte frame; at most 65792 expected here"),
], ids=lambda v: getattr(v, "value", "msg"))
def test_a_misbehaving_server_costs_only_its_own_chunk(tmp_path, fault, message):
    """The third chunk is bad: the two before it stay in .part, nothing of the bad one is written, and the
    next peer is asked from there."""
    src, info = make_shard(tmp_path, "stage-0005.safetensors", 4 * CHUNK, seed=7)
    dest = tmp_path / "got" / info.file

    async def scenario():
        async with daemons(3) as (bad, good, client):
            bad_server = ShardServer(bad, PROTOCOL, lookup_of((info, src)),
                                     fault=lambda p, r, i: fault if i == 2 else None)
            good_server = ShardServer(good, PROTOCOL, lookup_of((info, src)))
            async with serving([bad_server, good_server]):
                with pytest.raises(ShardTransferError,
                                   match=rf"fetched {2 * CHUNK} of .*{bad.peer_id}: WireError: {message}"):
                    await fetch_shard(client, [bad.peer_id], info, dest, protocol_name=PROTOCOL, chunk=CHUNK)
                held = part_path(dest).stat().st_size
                await fetch_shard(client, [good.peer_id], info, dest, protocol_name=PROTOCOL, chunk=CHUNK)
                return held, [o for _, o, _ in good_server.served]

    held, good_offsets = asyncio.run(scenario())
    assert held == 2 * CHUNK
    assert good_offsets == [2 * CHUNK, 3 * CHUNK]
    assert dest.read_bytes() == src.read_bytes()


# ---- local behaviour (no network) --------------------------------------------------------------------------


def test_a_second_fetch_into_the_same_destination_is_refused_while_one_runs(tmp_path):
    _, info = make_shard(tmp_path, "stage-0006.safetensors", 100, seed=8)
    dest = tmp_path / "got" / info.file
    dest.parent.mkdir()
    fd = os.open(part_path(dest), os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running fetch holds it
        with pytest.raises(BusyError, match="another fetch into .* is running"):
            asyncio.run(fetch_shard(None, [], info, dest, protocol_name=PROTOCOL))
    finally:
        os.close(fd)


def test_a_stale_part_file_fails_the_hash_and_says_so(tmp_path):
    src, info = make_shard(tmp_path, "stage-0007.safetensors", 100, seed=9)
    dest = tmp_path / "got" / info.file
    dest.parent.mkdir()
    part_path(dest).write_bytes(b"\0" * 100)  # complete in size, wrong in content: no peer is asked
    with pytest.raises(ShardTransferError, match=r"bytes from no peer and 100 bytes resumed from an earlier \.part"):
        asyncio.run(fetch_shard(None, [], info, dest, protocol_name=PROTOCOL))
    assert not part_path(dest).exists() and not dest.exists()


def test_bad_arguments_are_value_errors(tmp_path):
    _, info = make_shard(tmp_path, "s.bin", 10, seed=0)
    for kwargs in ({"chunk": 0}, {"chunk": MAX_CHUNK + 1}, {"window": 0}, {"timeout": 0}):
        with pytest.raises(ValueError):
            asyncio.run(fetch_shard(None, [], info, tmp_path / "x", protocol_name=PROTOCOL, **kwargs))
    with pytest.raises(ValueError, match="not a peer id"):
        asyncio.run(fetch_shard(None, ["not-a-peer"], info, tmp_path / "x", protocol_name=PROTOCOL))


# ---- frames ------------------------------------------------------------------------------------------------


def test_frames_round_trip():
    req = ChunkRequest(SHA, 5, 7)
    assert chunk_request_from_wire(chunk_request_to_wire(req)) == req
    reply = ChunkReply(SHA, 5, b"abcdefg")
    assert chunk_reply_from_wire(chunk_reply_to_wire(reply), req) == reply
    refusal = TransferRefusal("busy", "too many streams; try later")
    assert chunk_reply_from_wire(refusal_to_wire(refusal), req) == refusal
    assert chunk_reply_from_wire(refusal_to_wire(TransferRefusal("busy", "two\nlines")), req).reason == "two lines"


def _pack(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize("frame, message", [
    (_pack(t="get", v=1, sha256=SHA, offset=0), "get: missing field 'length'"),
    (_pack(t="get", v=1, sha256=SHA, offset=0, length=1, extra=1), "get: unknown field 'extra'"),
    (_pack(t="get", v=2, sha256=SHA, offset=0, length=1), "unsupported shard transfer version 2"),
    (_pack(t="get", v=1, sha256=SHA.upper(), offset=0, length=1), "get.sha256: expected 64 lowercase hex"),
    (_pack(t="get", v=1, sha256=SHA, offset=True, length=1), r"get.offset: expected an integer"),
    (_pack(t="get", v=1, sha256=SHA, offset=0, length=0), r"get.length: expected an integer in \[1, "),
    (_pack(t="get", v=1, sha256=SHA, offset=0, length=MAX_CHUNK + 1), "get.length"),
    (_pack(t="chunk", v=1, sha256=SHA, offset=0, data=b""), "expected a 'get' frame"),
    (b"\xc1", "undecodable msgpack"),
    (b"x" * 2000, "exceeds the 1024-byte limit"),
])
def test_malformed_requests_are_refused(frame, message):
    with pytest.raises(WireError, match=message):
        chunk_request_from_wire(frame)


@pytest.mark.parametrize("frame, message", [
    (_pack(t="chunk", v=1, sha256="cd" * 32, offset=5, data=b"abcdefg"), "for another shard"),
    (_pack(t="chunk", v=1, sha256=SHA, offset=6, data=b"abcdefg"), "at offset 6, 5 was asked for"),
    (_pack(t="chunk", v=1, sha256=SHA, offset=5, data=b"abcdef"), "6 bytes at offset 5, 7 were asked for"),
    (_pack(t="chunk", v=1, sha256=SHA, offset=5, data="abcdefg"), "chunk.data: expected bytes, got str"),
    (_pack(t="chunk", v=1, sha256=SHA, offset=5), "chunk: missing field 'data'"),
    (_pack(t="refused", v=1, code="teapot", reason="x"), "unknown code 'teapot'"),
    (_pack(t="refused", v=1, code="busy", reason="a\nb"), "refused.reason: expected one line"),
    (_pack(t="chunk", v=1, sha256=SHA, offset=5, data=b"x" * 2000), "exceeds the 1024-byte limit"),
    (msgpack.packb([1, 2]), "expected a map, got list"),
])
def test_malformed_replies_are_refused(frame, message):
    with pytest.raises(WireError, match=message):
        chunk_reply_from_wire(frame, ChunkRequest(SHA, 5, 7))
