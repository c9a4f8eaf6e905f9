"""The timeout logic of the pipeline's components, on a virtual clock (tests/clocks.py), with no network.

The fast counterpart of the real-process churn tests that only `make chaos` runs (tests/test_pipeline_churn.py,
the chaos-marked jobs in tests/test_pipeline_jobs.py): there, replicas and hosts are killed while a real trainer
waits out its deadlines in real seconds; here each deadline is reached at once and checked at its exact virtual
time, so `make test` covers:
  * PipelineTrainer (node/jobs/pipeline/trainer.py): a hop waits ``replica_wait`` for a replica of a stage, polling
    every 0.25 s; a replica that failed is skipped until its record heartbeats after the failure, and one that is
    alive but failed earlier in the step fails the step at once; a replica that could not catch up is left alone
    for REALIGN_BACKOFF_S.
  * DirectPool (direct_client.py): after a direct failure a replica is reached over libp2p only for ``retry_s``, and
    its idle connections are closed.
  * DirectServer (direct_server.py): offered sessions expire after ``direct_session_ttl`` and at most
    ``direct_sessions`` are kept.
  * StageHost (stage_host.py): a forward kept for a backward (and a pending gradient) expires after
    ``activation_ttl``.
  * PipelineJobs (pipeline_jobs.py): a failing step is retried every POLL_S for RECOVERY_TIMEOUTS round timeouts;
    a new host waits one round timeout for the state of its stage once the job has taken steps.

The trainer and the hosts run on a real tiny untied GPT-2 split into two signed stages in a temporary folder.
Only the network and the DHT are stand-ins: a p2p whose streams never connect (every request fails as an
unreachable peer does), and in-memory DHT reads. The direct path's listener runs on 127.0.0.1 in this process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import pathlib

import numpy as np
import pytest
import torch
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from node.jobs.board import POLL_S, JobBoard, JobView
from node.jobs.pipeline.direct_client import DirectPool
from node.jobs.pipeline.direct_server import DirectServer
from node.jobs.pipeline.pipeline_jobs import RECOVERY_TIMEOUTS, PipelineJobs
from node.jobs.pipeline.stage_config import StageConfig
from node.jobs.pipeline.stage_host import StageHost
from node.jobs.pipeline.stage_state import Refused
from node.jobs.pipeline.steps import HopError, PipelineError, TrainerConfig
from node.jobs.pipeline.trainer import REALIGN_BACKOFF_S, PipelineTrainer
from node.ml.models import build_model
from node.ml.splitter import load_stage, split_model
from protocol.pipeline.activations import BackwardRequest, ForwardRequest
from protocol.pipeline.control import Commit, MemberRecord, Resync, StatusReply, member_record_to_wire, stage_key
from protocol.pipeline.direct import FORWARD, REPLY, DirectChannel, read_sealed, send_sealed
from tests.clocks import VirtualClock
from tests.test_wire_bytes import ID_A, ID_B, ID_C, ID_D, KEY_A, pipe_record

SWARM = "timeouts"
JOB = "job"
TRAINER, REPLICA_0, REPLICA_1, OTHER = ID_A, ID_B, ID_C, ID_D
T = 8  # tokens per sequence
TINY_GPT2 = {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    """A tiny untied GPT-2 split into two stages (one layer each), signed with a fixed key."""
    out = tmp_path_factory.mktemp("shards")
    split_model(build_model("gpt2", TINY_GPT2, 0).module, [(0, 1), (1, 2)], out, KEY_A)
    return out


# ---- stand-ins for the network and the DHT ------------------------------------------------------------------


class UnreachableP2P:
    """The part of hivemind's P2P the trainer and hosts touch: this node's id, and streams that never connect
    (as to a peer that died: p2pd answers "peer unreachable"); every dial is recorded."""

    def __init__(self, me: str = TRAINER, peers: dict[str, list[str]] | None = None):
        self.peer_id = PeerID.from_base58(me)
        self.dialed: list[tuple[str, str]] = []  # (peer, protocol)
        self.peers = peers or {}  # peer -> its libp2p connection's multiaddrs (list_peers)

    async def call_binary_stream_handler(self, peer, protocol):
        self.dialed.append((peer.to_base58(), protocol))
        raise ConnectionRefusedError("peer unreachable (test stand-in)")

    async def list_peers(self):
        return [PeerInfo(PeerID.from_base58(p), addrs) for p, addrs in self.peers.items()]

    async def get_visible_maddrs(self):
        return []  # no listen address: a direct listener binds 127.0.0.1


@dataclasses.dataclass
class PeerInfo:
    peer_id: PeerID
    addrs: list[str]


@dataclasses.dataclass
class Item:
    value: bytes


@dataclasses.dataclass
class Found:
    value: dict[str, Item]


class MemoryDHT:
    """The part of hivemind's DHTNode that is read here: ``records(key, now)`` scripts what get() returns at each
    virtual time (None: nothing stored); stores succeed and are kept."""

    def __init__(self, clock: VirtualClock, records=None):
        self.clock, self.records = clock, records or (lambda key, now: None)
        self.stored: list[tuple[str, object]] = []  # (key, subkey)
        self.reads = 0

    async def store(self, key, value, expiration_time, subkey=None) -> bool:
        self.stored.append((key, subkey))
        return True

    async def get(self, key, latest=False):
        self.reads += 1
        found = self.records(key, self.clock.monotonic())
        return None if found is None else Found({peer: Item(raw) for peer, raw in found.items()})


def tokens(rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(rows * (T + 1), dtype=torch.long).reshape(rows, T + 1) % 256
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def trainer(shards, clock, config: TrainerConfig, replicas=None, dht=None) -> tuple[PipelineTrainer, UnreachableP2P]:
    p2p = UnreachableP2P()
    return PipelineTrainer(p2p, dht, JOB, shards, config, replicas=replicas, clock=clock), p2p


# ---- PipelineTrainer: waiting for a replica ------------------------------------------------------------------


def test_a_stage_without_replicas_fails_the_step_after_replica_wait_polling_every_quarter_second(shards):
    clock = VirtualClock()
    config = TrainerConfig(swarm=SWARM, micro_batch_size=1, replica_wait=5.0, direct=False)
    pipeline, p2p = trainer(shards, clock, config, replicas={0: [], 1: [REPLICA_1]})
    with pytest.raises(PipelineError, match=r"no live replica of stage 0 within 5 s"):
        asyncio.run(pipeline.step(*tokens()))
    # polled every 0.25 s until the clock was past the deadline: the first poll after 5 s is at 5.25 s
    assert clock.sleeps == [0.25] * 21
    assert clock.monotonic() == pytest.approx(config.replica_wait + 0.25)
    assert all(peer == REPLICA_1 for peer, _ in p2p.dialed)  # only the step query; no hop left the trainer


def test_a_replica_alive_but_failed_earlier_in_the_step_fails_it_at_once(shards):
    clock = VirtualClock()
    config = TrainerConfig(swarm=SWARM, micro_batch_size=1, replica_wait=60.0, direct=False)
    pipeline, p2p = trainer(shards, clock, config, replicas={0: [REPLICA_0], 1: [REPLICA_1]})
    with pytest.raises(PipelineError, match=r"stage 0: its live replicas \['.{8}'\] failed earlier in step 0"):
        asyncio.run(pipeline.step(*tokens()))
    assert clock.monotonic() == 0.0 and clock.sleeps == []  # no wait for a replica that is there
    assert (REPLICA_0, f"swarmnode/{SWARM}/pipe/{JOB}/s0/forward") in p2p.dialed  # its forward hop failed


def member_records(clock: VirtualClock, beats_from: float | None):
    """DHT records of the two stages: stage 1's replica heartbeats all along; stage 0's last beat is from before
    the test until ``beats_from`` (None: never again), when it heartbeats again."""

    def records(key: str, now: float):
        if key == stage_key(SWARM, JOB, 1):
            return {REPLICA_1: member_record_to_wire(MemberRecord("replica", 1.0, 0, clock.time()))}
        beat = clock.wall - 1.0 if beats_from is None or now < beats_from else clock.wall + beats_from
        return {REPLICA_0: member_record_to_wire(MemberRecord("replica", 1.0, 0, beat))}

    return records


@pytest.mark.parametrize("beats_from, error, ends_at", [
    (None, r"no live replica of stage 0 within 5 s", 5.25),  # never beats again: skipped, the hop waits it out
    (0.0, r"no live replica of stage 0 within 5 s", 5.25),  # a beat at the failure time is not newer than it
    (2.0, r"stage 0: its live replicas .* failed earlier in step 0", 2.0),  # beats again: alive, but out of the step
])
def test_a_failed_replica_is_skipped_until_its_record_beats_after_the_failure(shards, beats_from, error, ends_at):
    clock = VirtualClock()
    config = TrainerConfig(swarm=SWARM, micro_batch_size=1, replica_wait=5.0, direct=False)
    dht = MemoryDHT(clock, member_records(clock, beats_from))
    pipeline, p2p = trainer(shards, clock, config, dht=dht)
    with pytest.raises(PipelineError, match=error):
        asyncio.run(pipeline.step(*tokens()))  # the forward to stage 0's replica fails at 0 s (unreachable)
    assert clock.monotonic() == pytest.approx(ends_at)
    assert set(clock.sleeps) <= {0.25}
    forwards = [peer for peer, proto in p2p.dialed if proto.endswith("/forward")]
    assert forwards == [REPLICA_0]  # tried once; never again while it had not beaten since


def test_a_replica_that_could_not_catch_up_is_not_asked_again_for_the_realign_backoff(shards):
    clock = VirtualClock()
    pipeline, _ = trainer(shards, clock, TrainerConfig(swarm=SWARM), replicas={0: [REPLICA_0, OTHER]})
    pipeline.step_no = 5
    asked: list[tuple[float, str, object]] = []
    catches_up = iter([False, True])

    async def control(peer, stage, msg, expect, timeout=None):  # the replicas' answers to Resync
        asked.append((clock.monotonic(), peer, msg))
        if not next(catches_up):
            raise HopError(peer, "state fetch failed")
        return StatusReply(msg.step, 0, "0" * 64)

    pipeline._control = control
    steps = {REPLICA_0: 5, OTHER: 3}  # OTHER missed two step ends; REPLICA_0 is at the trainer's step

    async def scenario():
        assert await pipeline._realign(0, steps) == []  # failed: left alone for REALIGN_BACKOFF_S
        clock.advance(REALIGN_BACKOFF_S - 0.25)
        assert await pipeline._realign(0, steps) == []  # still backing off: not asked
        clock.advance(0.25)
        return await pipeline._realign(0, steps)  # the back-off is over: asked again, and caught up

    assert asyncio.run(scenario()) == [OTHER]
    assert asked == [(0.0, OTHER, Resync(5, REPLICA_0)), (REALIGN_BACKOFF_S, OTHER, Resync(5, REPLICA_0))]


# ---- the direct path ----------------------------------------------------------------------------------------


async def echo(kind: str, peer: str, data: bytes) -> bytes:
    return f"{kind} from {peer[-4:]}: ".encode() + data


def bound(kind: str) -> int:
    return 1 << 16


async def settle() -> None:
    """Let the loop run the closing handshakes of what a test closed (no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_after_a_direct_failure_a_replica_is_reached_over_libp2p_for_retry_s_and_its_idle_connections_close():
    clock = VirtualClock()

    async def scenario():
        servers = {peer: DirectServer(StageConfig(swarm=SWARM), echo, bound, peer[-4:], clock)
                   for peer in (REPLICA_0, REPLICA_1)}
        for server in servers.values():
            await server.start(UnreachableP2P(OTHER))
        opened: list[str] = []

        async def open_session(peer: str, stage: int):  # DirectOpen -> DirectOffer over libp2p, stood in
            opened.append(peer)
            return servers[peer].offer(TRAINER)

        loopback = ["/ip4/127.0.0.1/tcp/4001"]
        pool = DirectPool(UnreachableP2P(TRAINER, {REPLICA_0: loopback, REPLICA_1: loopback}), open_session,
                          retry_s=60.0, connect_timeout=5.0, clock=clock)
        try:
            for peer, stage in [(REPLICA_0, 0), (REPLICA_0, 1), (REPLICA_1, 0)]:
                assert await pool.exchange(peer, stage, "forward", b"x", 1 << 16) == b"forward from " + \
                    TRAINER[-4:].encode() + b": x"
            assert pool.idle_connections() == 3
            writers = [c.writer for (peer, _), conns in pool._idle.items() if peer == REPLICA_0 for c in conns]
            pool.failed(REPLICA_0, "test")
            assert pool.idle_connections() == 1 and len(writers) == 2 and all(w.is_closing() for w in writers)
            assert not pool.usable(REPLICA_0) and pool.usable(REPLICA_1)
            clock.advance(60.0 - 0.5)
            assert not pool.usable(REPLICA_0)
            clock.advance(0.5)
            assert pool.usable(REPLICA_0)  # retry_s passed: the direct path is tried again, on a new connection
            assert await pool.exchange(REPLICA_0, 0, "backward", b"y", 1 << 16) == b"backward from " + \
                TRAINER[-4:].encode() + b": y"
            assert opened == [REPLICA_0, REPLICA_0, REPLICA_1, REPLICA_0]
        finally:
            pool.close()
            for server in servers.values():
                server.stop()
            await settle()

    asyncio.run(scenario())


async def use_session(offer, payload: bytes) -> bytes | None:
    """The reply to one forward sent in the offered session, or None if the host closed the connection."""
    reader, writer = await asyncio.open_connection(offer.host, offer.port)
    channel = DirectChannel(offer.key, offer.session, "trainer")
    try:
        await send_sealed(writer, channel, FORWARD, payload)
        try:
            _, reply = await asyncio.wait_for(read_sealed(reader, channel, (REPLY,), 1 << 16), 10.0)
            return reply
        except asyncio.IncompleteReadError:
            return None
    finally:
        writer.close()
        await writer.wait_closed()


def test_offered_direct_sessions_expire_after_their_ttl_and_at_most_direct_sessions_are_kept():
    clock = VirtualClock()
    config = StageConfig(swarm=SWARM, direct_sessions=3, direct_session_ttl=60.0)

    async def scenario():
        server = DirectServer(config, echo, bound, "stage 0", clock)
        await server.start(UnreachableP2P(REPLICA_0))
        try:
            assert server.endpoint is not None and server.endpoint[0] == "127.0.0.1"
            first = server.offer(TRAINER)
            clock.advance(60.0)
            second = server.offer(TRAINER)
            assert list(server._sessions) == [first.session, second.session]  # at its ttl exactly: still kept
            clock.advance(0.5)
            third = server.offer(TRAINER)
            assert list(server._sessions) == [second.session, third.session]  # past its ttl: dropped
            fourth, fifth = server.offer(TRAINER), server.offer(TRAINER)
            assert list(server._sessions) == [third.session, fourth.session, fifth.session]  # the oldest dropped
            assert await use_session(fourth, b"a") == b"forward from " + TRAINER[-4:].encode() + b": a"
            clock.advance(60.0)  # fifth: offered at 60.5 s, used at its ttl exactly (120.5 s): still served
            assert await use_session(fifth, b"b") == b"forward from " + TRAINER[-4:].encode() + b": b"
            sixth = server.offer(TRAINER)
            clock.advance(60.5)  # sixth: offered at 120.5 s, used at 181 s, past its ttl
            assert await use_session(sixth, b"c") is None  # refused: the connection is closed
            assert await use_session(server.offer(TRAINER), b"d") == b"forward from " + TRAINER[-4:].encode() + b": d"
        finally:
            server.stop()
            await settle()

    asyncio.run(scenario())


# ---- StageHost: activations and pending gradients expire ------------------------------------------------------


def test_a_forward_kept_for_a_backward_expires_after_activation_ttl(shards):
    clock = VirtualClock()
    ttl = 10.0
    host = StageHost(UnreachableP2P(REPLICA_0), None, JOB, 0, load_stage(shards, 0),
                     StageConfig(swarm=SWARM, direct=False, activation_ttl=ttl), clock=clock)
    x, _ = tokens(2)

    def forward(mb: int) -> torch.Tensor:  # the worker-thread functions, as the host's _serve runs them
        return host._forward(ForwardRequest(JOB, 0, mb, host.step, x, True), TRAINER)

    def backward(mb: int, out: torch.Tensor):
        return host._backward(BackwardRequest(mb, torch.ones_like(out)), TRAINER)

    try:
        out1 = forward(1)
        clock.advance(ttl)
        out2 = forward(2)  # every forward first drops what expired: micro-batch 1, at its ttl exactly, is kept
        backward(1, out1)  # accepted; its gradient waits in a pending slot until ttl from now
        clock.advance(ttl + 0.5)
        forward(3)  # drops micro-batch 2's activations and micro-batch 1's pending gradient
        with pytest.raises(Refused, match=r"no forward of micro-batch 0000000000000002 from this peer in step 0"):
            backward(2, out2)
        reply = host._commit(Commit(0, (1,)), TRAINER)
        assert reply.committed == () and reply.missing == (1,)
        # with no forward in between, a backward or a commit after the ttl is refused all the same
        out4 = forward(4)
        clock.advance(ttl + 0.5)
        with pytest.raises(Refused, match=r"no forward of micro-batch 0000000000000004"):
            backward(4, out4)
        out5 = forward(5)
        backward(5, out5)
        clock.advance(ttl + 0.5)
        reply = host._commit(Commit(0, (5,)), TRAINER)
        assert reply.committed == () and reply.missing == (5,)
    finally:
        host._pool.shutdown(wait=True)


# ---- PipelineJobs: how long a failing step is retried, how long a host waits for its stage's state ---------------


def pipeline_jobs(tmp_path, clock: VirtualClock) -> PipelineJobs:
    board = JobBoard(MemoryDHT(clock), SWARM, TRAINER, clock)
    return PipelineJobs(UnreachableP2P(TRAINER), board, tmp_path / "home", tmp_path / "data", None, None, clock=clock)


class FailingTrainer:
    """A PipelineTrainer whose every step fails (no replica of a stage, out of retries); the calls recorded."""

    def __init__(self, clock: VirtualClock):
        self.clock, self.calls = clock, []

    async def step(self, x, y):
        self.calls.append((self.clock.monotonic(), x.clone()))
        raise PipelineError(f"attempt {len(self.calls)} failed")


def test_a_failing_step_is_retried_every_poll_s_for_recovery_timeouts_round_timeouts(tmp_path):
    clock = VirtualClock()
    jobs = pipeline_jobs(tmp_path, clock)
    view = JobView(pipe_record())
    spec = view.record.spec
    failing = FailingTrainer(clock)
    rows = torch.arange(16 * (T + 1), dtype=torch.long).reshape(16, T + 1)
    with pytest.raises(PipelineError) as raised:
        asyncio.run(jobs._steps(view, failing, rows, np.random.default_rng(0), T, None))
    give_up = RECOVERY_TIMEOUTS * spec.round_timeout_s  # 75 s: the attempt after it re-raises
    last = (math.floor(give_up / POLL_S) + 1) * POLL_S
    times = [t for t, _ in failing.calls]
    assert times == pytest.approx([i * POLL_S for i in range(len(times))]) and times[-1] == pytest.approx(last)
    assert clock.monotonic() == pytest.approx(last) and set(clock.sleeps) == {POLL_S}
    assert str(raised.value) == f"attempt {len(failing.calls)} failed"  # the last failure, re-raised
    assert all(torch.equal(x, failing.calls[0][1]) for _, x in failing.calls)  # the same batch every attempt
    assert failing.calls[0][1].shape == (spec.batch_size, T)


@pytest.mark.parametrize("steps_taken", [0, 3])
def test_a_new_host_waits_a_round_timeout_for_its_stage_state_once_the_job_has_taken_steps(tmp_path, shards,
                                                                                            steps_taken):
    clock = VirtualClock()
    jobs = pipeline_jobs(tmp_path, clock)
    view = JobView(pipe_record().replace(round=steps_taken))
    host = StageHost(UnreachableP2P(REPLICA_0), None, view.job_id, 0, load_stage(shards, 0),
                     StageConfig(swarm=SWARM, direct=False), clock=clock)
    try:
        if steps_taken == 0:  # nothing trained yet: the shard is the state, at once
            assert asyncio.run(jobs._load_latest_state(view, 0, host)) == "the shard (no step taken yet)"
            assert clock.monotonic() == 0.0 and jobs.board.dht.reads == 1
            return
        with pytest.raises(Refused, match=r"no replica or backup of stage 0 announces its state \(step 3\)"):
            asyncio.run(jobs._load_latest_state(view, 0, host))
        timeout = view.record.spec.round_timeout_s  # 12.5 s: polled every POLL_S until past it, at 13 s
        assert clock.monotonic() == pytest.approx((math.floor(timeout / POLL_S) + 1) * POLL_S)
        assert set(clock.sleeps) == {POLL_S} and jobs.board.dht.reads == len(clock.sleeps) + 1
        assert host.step == 0  # nothing loaded
    finally:
        host._pool.shutdown(wait=True)
