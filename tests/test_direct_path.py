"""The direct data path (protocol/pipeline/direct.py, node/jobs/pipeline/stage_host.py, node/jobs/pipeline/trainer.py)
over real p2pd daemons in this process: hops over it compute what hops over libp2p compute, refused frames close the
connection (and the host keeps serving), and a trainer that cannot reach a direct listener completes its step over
libp2p."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from node.jobs.pipeline.stage_config import StageConfig
from node.jobs.pipeline.stage_host import StageHost
from node.jobs.pipeline.steps import TrainerConfig
from node.jobs.pipeline.trainer import PipelineTrainer
from node.ml.models import build_model
from node.ml.splitter import load_stage
from protocol.pipeline.activations import (
    ExpectedTensor,
    ForwardReply,
    ForwardRequest,
    activation_from_wire,
    activation_to_wire,
)
from protocol.pipeline.control import (
    CONTROL_BOUND,
    DirectOffer,
    DirectOpen,
    control_from_wire,
    control_to_wire,
    stage_protocol,
)
from protocol.pipeline.direct import FORWARD, MAGIC, REPLY, DirectChannel, new_session, read_sealed, send_sealed
from protocol.streams import close_quietly, read_frame, write_frame
from protocol.wire import WireError
from tests.test_pipeline import SWARM, UNTIED_GPT2, batch, hosts_running, split, swarm

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
HIDDEN = ExpectedTensor(("float32",), (2, 8, 64), "float32")  # stage 0's output for (2, 8) token ids


def test_sealed_frames_round_trip_and_refuse_tampering():
    key, sid = new_session()
    trainer, host = DirectChannel(key, sid, "trainer"), DirectChannel(key, sid, "host")
    frames = [b"".join(trainer.seal(FORWARD, bytes([i]) * 100)) for i in range(3)]
    assert [host.open_frame(f, (FORWARD,), 100) for f in frames] == [(FORWARD, bytes([i]) * 100) for i in range(3)]
    with pytest.raises(WireError, match="sequence number 2, expected 3"):
        host.open_frame(frames[2], (FORWARD,), 100)  # replayed
    reply = b"".join(host.seal(REPLY, b"ok"))
    assert trainer.open_frame(reply, (REPLY,), 10) == (REPLY, b"ok")
    with pytest.raises(WireError, match="kind 1 where reply"):  # a request reflected back to its sender
        trainer.open_frame(b"".join(trainer.seal(FORWARD, b"x")), (REPLY,), 10)
    fresh = DirectChannel(key, sid, "host")
    bad = bytearray(frames[0])
    bad[-1] ^= 1
    with pytest.raises(WireError, match="authentication failed"):
        fresh.open_frame(bytes(bad), (FORWARD,), 100)
    with pytest.raises(WireError, match="peer announced a 116-byte body"):
        DirectChannel(key, sid, "host").open_frame(frames[0], (FORWARD,), 99)
    with pytest.raises(WireError, match="wrong session id"):
        DirectChannel(key, bytes(16), "host").open_frame(frames[0], (FORWARD,), 100)
    with pytest.raises(WireError, match="authentication failed"):  # another key
        DirectChannel(new_session()[0], sid, "host").open_frame(frames[0], (FORWARD,), 100)


def _pipelines(shards, p2ps, names):
    return {name: [StageHost(p2ps[i], None, name, i, load_stage(shards, i), StageConfig(swarm=SWARM))
                   for i in range(2)] for name in names}


@pytest.mark.timeout(120)
def test_direct_path_computes_what_libp2p_computes(tmp_path):
    model = build_model("gpt2", UNTIED_GPT2, 0).module
    shards = split(model, [(0, 2), (2, 4)], tmp_path / "shards")
    x, y = batch(0)

    async def scenario():
        async with swarm(3, with_dht=False) as (p2ps, _):
            pipes = _pipelines(shards, p2ps, ("direct", "libp2p"))
            async with hosts_running(pipes["direct"] + pipes["libp2p"]):
                out = {}
                for name, direct in (("direct", True), ("libp2p", False)):
                    trainer = PipelineTrainer(p2ps[2], None, name, shards,
                                              TrainerConfig(swarm=SWARM, micro_batch_size=2, direct=direct,
                                                            max_inflight=1),  # one commit order: equal sums
                                              replicas={i: [p2ps[i].peer_id.to_base58()] for i in range(2)})
                    try:
                        logits = await trainer.forward(x)
                        st = await trainer.accumulate(x, y)
                        out[name] = (logits, [h._acc.clone() for h in pipes[name]], [m.loss for m in st.micros],
                                     dict(trainer.hops), trainer.direct.idle_connections())
                    finally:
                        await trainer.close()
                return out

    out = asyncio.run(scenario())
    (d_logits, d_grads, d_losses, d_hops, d_pooled), (l_logits, l_grads, l_losses, l_hops, _) = out["direct"], \
        out["libp2p"]
    assert d_hops == {"direct": 2 + 4 * 4} and l_hops == {"libp2p": 2 + 4 * 4}  # forward(x) + 4 micro-batches
    assert d_pooled == 2  # one persistent connection per stage, reused by every hop
    assert torch.equal(d_logits, l_logits)  # the same bytes reached the same computation
    assert d_losses == l_losses
    assert all(torch.equal(a, b) for a, b in zip(d_grads, l_grads))


async def _offer(p2p, host: StageHost) -> DirectOffer:
    _, reader, writer = await p2p.call_binary_stream_handler(
        PeerID.from_base58(host.me), stage_protocol(SWARM, host.pipeline_id, host.index, "control"))
    try:
        await write_frame(writer, control_to_wire(DirectOpen()))
        return control_from_wire(await asyncio.wait_for(read_frame(reader, CONTROL_BOUND), 10), DirectOffer)
    finally:
        close_quietly(writer)


async def _closed(reader: asyncio.StreamReader) -> bool:
    """The host closed the connection without a reply."""
    return await asyncio.wait_for(reader.read(1), 10) == b""


@pytest.mark.timeout(120)
def test_refused_direct_frames_close_the_connection_and_the_host_keeps_serving(tmp_path, caplog):
    shards = split(build_model("gpt2", UNTIED_GPT2, 0).module, [(0, 2), (2, 4)], tmp_path / "shards")
    tokens = torch.randint(0, 256, (2, 8))

    def request(mb: int) -> bytes:
        return activation_to_wire(ForwardRequest("bad", 0, mb, 0, tokens))

    async def scenario():
        async with swarm(2, with_dht=False) as (p2ps, _):
            host = StageHost(p2ps[0], None, "bad", 0, load_stage(shards, 0), StageConfig(swarm=SWARM))
            async with hosts_running([host]):
                results = {}

                async def session():
                    offer = await _offer(p2ps[1], host)
                    reader, writer = await asyncio.open_connection(offer.host, offer.port)
                    return offer, reader, writer, DirectChannel(offer.key, offer.session, "trainer")

                async def good(reader, writer, channel, mb) -> bool:
                    await send_sealed(writer, channel, FORWARD, request(mb))
                    _, raw = await asyncio.wait_for(read_sealed(reader, channel, (REPLY,), 1 << 24), 10)
                    return isinstance(activation_from_wire(raw, ForwardReply, HIDDEN, micro_batch=mb),
                                      ForwardReply)

                # a tampered frame (one bit of the ciphertext flipped)
                offer, reader, writer, channel = await session()
                header, body = channel.seal(FORWARD, request(1))
                writer.write(header + body[:-1] + bytes([body[-1] ^ 1]))
                results["tampered"] = await _closed(reader)
                close_quietly(writer)
                # a replayed sequence number: the first copy is served, the second refused
                offer, reader, writer, channel = await session()
                header, body = channel.seal(FORWARD, request(2))
                writer.write(header + body)
                _, raw = await asyncio.wait_for(read_sealed(reader, channel, (REPLY,), 1 << 24), 10)
                writer.write(header + body)
                results["replayed"] = await _closed(reader)
                close_quietly(writer)
                # a wrong session id (another, never offered), and an offered session used by a second connection
                offer, reader, writer, channel = await session()
                header, body = DirectChannel(offer.key, bytes(16), "trainer").seal(FORWARD, request(3))
                writer.write(header + body)
                results["wrong session"] = await _closed(reader)
                close_quietly(writer)
                offer, reader, writer, channel = await session()
                assert await good(reader, writer, channel, 4)
                reader2, writer2 = await asyncio.open_connection(offer.host, offer.port)
                writer2.write(b"".join(DirectChannel(offer.key, offer.session, "trainer").seal(FORWARD, request(5))))
                results["session reused"] = await _closed(reader2)
                close_quietly(writer2)
                assert await good(reader, writer, channel, 6)  # the first connection goes on
                header, body = DirectChannel(offer.key, bytes(16), "trainer").seal(FORWARD, request(8))
                writer.write(header + body)  # an established connection switching to another session id
                results["session switched"] = await _closed(reader)
                close_quietly(writer)
                # an oversized declared length: refused from the header alone (no body is ever sent)
                offer, reader, writer, channel = await session()
                header = MAGIC + bytes([FORWARD]) + bytes(3) + offer.session + bytes(8)
                writer.write(header + (2**31).to_bytes(4, "big"))
                results["oversized"] = await _closed(reader)
                close_quietly(writer)
                # and the host still serves, on the direct path and over libp2p
                offer, reader, writer, channel = await session()
                results["serving"] = await good(reader, writer, channel, 7)
                close_quietly(writer)
                return results

    with caplog.at_level(logging.WARNING, logger="node.jobs.pipeline.stage_host"):
        results = asyncio.run(scenario())
    assert all(results.values()), results
    refusals = [r.getMessage() for r in caplog.records if "refused a direct frame" in r.getMessage()]
    for reason in ("authentication failed", "sequence number 0, expected 1", "unknown, used or expired session id",
                   "peer announced a 2147483648-byte body", "wrong session id"):
        assert sum(reason in line for line in refusals) >= 1, (reason, refusals)
    assert sum("unknown, used or expired" in line for line in refusals) == 2  # wrong session id + reused session
    assert all("connection closed" in line for line in refusals) and len(refusals) == 6


@pytest.mark.timeout(120)
def test_an_unreachable_direct_listener_falls_back_to_libp2p(tmp_path, caplog):
    model = build_model("gpt2", UNTIED_GPT2, 0).module
    shards = split(model, [(0, 2), (2, 4)], tmp_path / "shards")
    x, y = batch(1, 4)

    async def scenario():
        async with swarm(3, with_dht=False) as (p2ps, _):
            hosts = _pipelines(shards, p2ps, ("fb",))["fb"]
            async with hosts_running(hosts):
                hosts[1]._direct._server.close()  # still offered, but nobody listens: connect refused
                await hosts[1]._direct._server.wait_closed()
                trainer = PipelineTrainer(p2ps[2], None, "fb", shards, TrainerConfig(swarm=SWARM, micro_batch_size=2),
                                          replicas={i: [p2ps[i].peer_id.to_base58()] for i in range(2)})
                try:
                    st = await trainer.accumulate(x, y)
                    return dict(trainer.hops), st.retries, [len(h._committed) for h in hosts]
                finally:
                    await trainer.close()

    with caplog.at_level(logging.INFO, logger="node.jobs.pipeline.direct_client"):
        hops, retries, committed = asyncio.run(scenario())
    assert committed == [2, 2] and retries == 0
    assert hops == {"direct": 4, "libp2p": 4}  # stage 0 direct, stage 1 over libp2p (2 micro-batches x 2 ways)
    assert any("direct path to" in r.getMessage() and "connect to 127.0.0.1" in r.getMessage()
               for r in caplog.records)
