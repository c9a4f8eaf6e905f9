"""node/jobs/pipeline/stage_host.py + node/jobs/pipeline/trainer.py over real libp2p daemons in this process (p2pd per
host, port 0, stopped in finally): a pipeline of stage hosts computes the unsplit model's logits and gradients, trains
with two replicas per stage that stay bit-identical and match single-process training, and survives bad frames.

The model is node/ml/models.py's tiny byte-level GPT-2 (4 layers) built with tie_word_embeddings=False: with the
embedding and the LM head tied, the first and last stage would each hold a copy whose gradients must be summed
across processes, which the pipeline trainer does not do (it refuses such a split)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import pathlib

import msgpack
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.node import DHTNode
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from node.jobs.pipeline.stage_config import StageConfig, StageHooks
from node.jobs.pipeline.stage_host import StageHost
from node.jobs.pipeline.stage_state import Refused, fetch_state
from node.jobs.pipeline.steps import PipelineError, TrainerConfig, causal_lm_loss
from node.jobs.pipeline.trainer import PipelineTrainer
from node.ml.models import build_model
from node.ml.splitter import load_stage, read_manifest, split_model
from node.runtime.p2pd import OwnedP2PDaemon
from protocol.pipeline.activations import (
    BackwardReply,
    BackwardRequest,
    ErrorReply,
    ForwardReply,
    ForwardRequest,
    activation_from_wire,
    activation_to_wire,
)
from protocol.pipeline.control import (
    Advance,
    Commit,
    CommitReply,
    ControlError,
    Discard,
    EndStep,
    EndStepReply,
    MemberRecord,
    StateHead,
    control_from_wire,
    control_to_wire,
    member_record_from_wire,
    member_record_to_wire,
    pipe_protocol,
    stage_protocol,
)
from protocol.streams import close_quietly, read_frame, write_frame
from protocol.wire import WireError

# Several p2pd clients share one event loop here; as in tests/test_job_runner.py, a StreamWriter of hivemind's
# client is sometimes collected after the loop closed (an "unclosed StreamWriter" ResourceWarning at teardown).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
SWARM = "pipetest"
TEXT = pathlib.Path(json.__file__).read_bytes() + pathlib.Path(contextlib.__file__).read_bytes()  # byte corpus
T = 16
# node/ml/models.py's gpt2 (4 layers, 64 wide, byte vocab) with its own LM head
UNTIED_GPT2 = {"n_layer": 4, "n_embd": 64, "n_positions": 32, "tie_word_embeddings": False}


def split(model: torch.nn.Module, spans, out: pathlib.Path) -> pathlib.Path:
    split_model(model, spans, out, Ed25519PrivateKey.generate())
    return out


def batch(step: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y: int64 (size, T) windows of the byte corpus, y shifted by one; seeded by ``step``."""
    starts = np.random.default_rng(step).integers(0, len(TEXT) - T - 1, size)
    rows = torch.tensor(np.stack([np.frombuffer(TEXT, np.uint8, T + 1, s) for s in starts]), dtype=torch.long)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


@contextlib.asynccontextmanager
async def swarm(n: int, with_dht: bool):
    """n p2pd daemons on loopback (each bootstrapping from the first), with a DHT node each if asked."""
    daemons, dhts = [], []
    try:
        for _ in range(n):
            join = [str((await daemons[0].p2p.get_visible_maddrs())[0])] if daemons else []
            d = OwnedP2PDaemon()
            daemons.append(d)
            await d.start(identity_path=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=join)
            if with_dht:
                dhts.append(await DHTNode.create(p2p=d.p2p, initial_peers=join or None,
                                                 ensure_bootstrap_success=bool(join)))
        yield [d.p2p for d in daemons], dhts or [None] * n
    finally:
        for dht in dhts:
            await dht.shutdown()
        for d in daemons:
            await d.stop()


@contextlib.asynccontextmanager
async def hosts_running(hosts: list[StageHost]):
    try:
        for h in hosts:
            await h.start()
        yield hosts
    finally:
        for h in hosts:
            await h.stop()


async def wait_replicas(trainer: PipelineTrainer, counts: dict[int, int], timeout: float = 60) -> None:
    """Until the trainer sees ``counts[stage]`` replicas of each stage announced in the DHT."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        have = {s: len(await trainer.replicas(s)) for s in counts}
        if all(have[s] >= n for s, n in counts.items()):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"replicas announced: {have}, expected {counts}")
        await asyncio.sleep(0.1)


def unflatten(host: StageHost, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, p in host.stage.named_parameters():
        out[name] = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


# ---- messages ----------------------------------------------------------------------------------------------

def test_control_messages_round_trip_and_refuse_malformed_frames():
    peer = "12D3KooW" + "A" * 44
    for msg in (Commit(3, (1, 2**64 - 1)), CommitReply(3, (1,), (2,)), EndStep(7, (5, 6), (peer,), None),
                EndStep(7, (), (peer, peer), peer), ControlError("no"),
                EndStepReply(2, True, 4.0, 2, 0, 2, "ab" * 32, None, ""),
                StateHead(1, 5, 100, "cd" * 32, "ef" * 32), Discard(9), Advance(9)):
        assert control_from_wire(control_to_wire(msg), type(msg)) == msg
    rec = MemberRecord("replica", 2.5, 4, 1e9)
    assert member_record_from_wire(member_record_to_wire(rec)) == rec
    good = msgpack.unpackb(control_to_wire(Commit(3, (1,))))
    for bad in ({**good, "extra": 1}, {**good, "step": -1}, {**good, "micro_batches": [-1]},
                {**good, "v": 2}, {**good, "micro_batches": ["x"]}, {**good, "t": "nope"}):
        with pytest.raises(WireError):
            control_from_wire(msgpack.packb(bad), Commit)
    with pytest.raises(WireError):
        control_from_wire(control_to_wire(Commit(3, (1,))), EndStep)  # another message than the one expected
    with pytest.raises(WireError):
        control_from_wire(msgpack.packb({**msgpack.unpackb(control_to_wire(EndStep(1, (), (peer,), None))),
                                         "group": ["not a peer id!"]}), EndStep)


# ---- equivalence -------------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_pipeline_forward_and_backward_equal_the_unsplit_model(tmp_path):
    model = build_model("gpt2", UNTIED_GPT2, 0).module
    shards = split(model, [(0, 1), (1, 2), (2, 3), (3, 4)], tmp_path / "shards")
    x, y = batch(0)

    async def scenario():
        async with swarm(5, with_dht=False) as (p2ps, _):
            hosts = [StageHost(p2ps[i], None, "eq", i, load_stage(shards, i), StageConfig(swarm=SWARM))
                     for i in range(4)]
            async with hosts_running(hosts):
                trainer = PipelineTrainer(p2ps[4], None, "eq", shards, TrainerConfig(swarm=SWARM, micro_batch_size=4),
                                          replicas={i: [p2ps[i].peer_id.to_base58()] for i in range(4)})
                logits = await trainer.forward(x)
                half = PipelineTrainer(p2ps[4], None, "eq", shards, TrainerConfig(swarm=SWARM, wire_dtype="bfloat16"),
                                       replicas={i: [p2ps[i].peer_id.to_base58()] for i in range(4)})
                bf16_logits = await half.forward(x)
                assert not any(h._acts for h in hosts)  # evaluation passes leave nothing waiting for a backward
                st = await trainer.accumulate(x, y)
                grads = {}
                for h in hosts:
                    assert len(h._committed) == 2  # two micro-batches of 4, each committed once
                    grads.update(unflatten(h, h._acc / len(h._committed)))
                return logits, bf16_logits, grads, st

    logits, bf16_logits, grads, st = asyncio.run(scenario())
    ref_model = copy.deepcopy(model)
    ref_logits = ref_model(input_ids=x, use_cache=False).logits
    assert (logits - ref_logits.detach()).abs().max().item() <= 1e-5
    assert (bf16_logits - ref_logits.detach()).abs().max().item() <= 0.05  # bfloat16 on the wire: ~3 digits
    causal_lm_loss(ref_logits, y).backward()
    ref = dict(ref_model.named_parameters())
    assert set(grads) == set(ref)
    for name, g in grads.items():
        scale = max(1.0, ref[name].grad.abs().max().item())
        assert (g - ref[name].grad).abs().max().item() <= 1e-5 * scale, name
    assert abs(sum(m.loss for m in st.micros) / 2 - causal_lm_loss(ref_logits, y).item()) < 1e-5


# ---- training with replicas ----------------------------------------------------------------------------------

STEPS = 4


@pytest.mark.timeout(180)
def test_two_replicas_per_stage_stay_bit_identical_and_match_single_process_training(tmp_path):
    model = build_model("gpt2", UNTIED_GPT2, 0).module
    shards = split(model, [(0, 2), (2, 4)], tmp_path / "shards")
    manifest = read_manifest(shards)
    stage_cfg = StageConfig(swarm=SWARM, optimizer="adamw", lr=3e-3, density=1.0, value_codec="fp32", heartbeat=0.5,
                            ttl=5.0, matchmaking_time=3.0, part_timeout=5.0, result_timeout=10.0)

    async def scenario():
        async with swarm(5, with_dht=True) as (p2ps, dhts):
            hosts = [StageHost(p2ps[i], dhts[i], "rep", i // 2, load_stage(shards, i // 2), stage_cfg,
                               manifest=manifest) for i in range(4)]
            async with hosts_running(hosts):
                trainer = PipelineTrainer(p2ps[4], dhts[4], "rep", shards,
                                          TrainerConfig(swarm=SWARM, micro_batch_size=2, hop_timeout=20, seed=1))
                await wait_replicas(trainer, {0: 2, 1: 2})  # the replicas' records are in the DHT
                reports = [await trainer.step(*batch(step)) for step in range(STEPS)]
                # a replica whose parameters drifted (a bit flipped, a partitioned round) is found by its hash at the
                # next step end and reloaded from its twin
                await hosts[1]._exec(lambda: hosts[1].stage.get_parameter("transformer.wte.weight").data.mul_(1.01))
                drift = await trainer.step(*batch(STEPS))
                resynced = hosts[0].params_hash == hosts[1].params_hash and hosts[0].step == hosts[1].step == STEPS + 1
                state = await fetch_state(p2ps[4], [p2ps[0].peer_id.to_base58()], pipe_protocol(SWARM, "rep", "state"),
                                          0, hosts[0].state_bound())
                backups = [(h.index, set(h.backups)) for h in hosts]
                return reports, state, hosts[0].params_hash, backups, drift, resynced

    reports, (head, _), hash0, backups, drift, resynced = asyncio.run(scenario())
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, foreach=False)
    ref_losses = []
    for step in range(STEPS):
        x, y = batch(step)
        loss = causal_lm_loss(ref(input_ids=x, use_cache=False).logits, y)
        ref_losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for r, ref_loss in zip(reports, ref_losses):
        assert r.micro_batches == 4 and r.retries == 0
        for stage in r.stages:
            assert stage.committed == 4 and stage.applied, stage
            assert len(stage.hashes) == 2 and stage.in_sync and len(set(stage.hashes.values())) == 1, stage
            assert all(rep.members == 2 for rep in stage.replies.values())
        assert abs(r.loss - ref_loss) <= 0.02 * ref_loss, (r.loss, ref_loss)
    assert reports[-1].loss < reports[0].loss
    assert not drift.stages[0].in_sync and drift.stages[1].in_sync and resynced
    assert head.step == STEPS + 1 and head.params_hash == hash0
    held = [(index, stage) for index, stages in backups for stage in stages]  # (holder's stage, backup's stage)
    assert sorted(set(held)) == [(0, 1), (1, 0)]  # a replica of each stage keeps the other stage's latest state


@pytest.mark.timeout(120)
def test_a_failed_hop_on_a_single_replica_stage_is_retried_without_wedging(tmp_path):
    """One replica per stage; stage 1 refuses the 2nd backward of step 1, after the 1st micro-batch was committed
    there. The step fails at once (the stage's only replica is out for the rest of the step) as a PipelineError;
    before the retry the trainer has the replicas Discard the abandoned attempt's commits, so the retried step
    counts each micro-batch once at each stage, and later steps go on (the replica's stale commit used to fail
    it in every status round)."""
    shards = split(build_model("gpt2", UNTIED_GPT2, 0).module, [(0, 2), (2, 4)], tmp_path / "shards")
    manifest = read_manifest(shards)
    cfg = StageConfig(swarm=SWARM, optimizer="adamw", lr=3e-3, heartbeat=0.5, ttl=5.0)

    async def refuse_once(kind: str, step: int, n: int) -> None:
        if (kind, step, n) == ("backward", 1, 2):
            raise Refused("injected failure")

    async def scenario():
        async with swarm(3, with_dht=True) as (p2ps, dhts):
            hosts = [StageHost(p2ps[i], dhts[i], "wedge", i, load_stage(shards, i), cfg,
                               StageHooks(before=refuse_once if i == 1 else None), manifest) for i in range(2)]
            async with hosts_running(hosts):
                trainer = PipelineTrainer(p2ps[2], dhts[2], "wedge", shards, TrainerConfig(
                    swarm=SWARM, micro_batch_size=2, hop_timeout=20, replica_wait=10, max_inflight=1, seed=1))
                await wait_replicas(trainer, {0: 1, 1: 1})
                reports = [await trainer.step(*batch(0))]
                with pytest.raises(PipelineError, match="failed earlier in step 1"):
                    await trainer.step(*batch(1))
                stale = len(hosts[1]._committed)
                reports += [await trainer.step(*batch(1)), await trainer.step(*batch(2))]
                return reports, stale, [(h.step, h.params_hash) for h in hosts]

    reports, stale, ends = asyncio.run(scenario())
    assert stale == 1  # the abandoned attempt's commit, held by the stage's only replica
    assert [r.step for r in reports] == [0, 1, 2]
    for r in reports:
        assert r.micro_batches == 4 and all(s.committed == 4 and s.applied for s in r.stages), r
    assert [step for step, _ in ends] == [3, 3]


@pytest.mark.timeout(120)
def test_replicas_that_missed_a_step_end_are_brought_to_the_trainers_step(tmp_path):
    """Stage 0 has replicas A and B, stage 1 only C. B refuses the end of step 1 (it stays at step 1, A and C move
    on): the trainer finds it behind and has it reload A's state within a later step, whose end it then takes
    part in. C refuses the end of step 3: no replica of stage 1 is at the trainer's step 4, so the next attempt
    fails once, and before the retry the trainer has C skip to step 4 (its step-3 update is lost) and the job
    goes on. (Reloading in the background, a replica slower to load than a step used to stay behind for good.)"""
    shards = split(build_model("gpt2", UNTIED_GPT2, 0).module, [(0, 2), (2, 4)], tmp_path / "shards")
    manifest = read_manifest(shards)
    cfg = StageConfig(swarm=SWARM, optimizer="adamw", lr=3e-3, heartbeat=0.2, ttl=5.0, matchmaking_time=3.0,
                      part_timeout=5.0, result_timeout=10.0)

    def refuse_end(at_step: int):
        async def hook(kind: str, step: int, n: int) -> None:
            if (kind, step) == ("end_step", at_step):
                raise Refused("injected: this replica misses the step end")
        return hook

    async def scenario():
        async with swarm(4, with_dht=True) as (p2ps, dhts):
            hooks = [None, refuse_end(1), refuse_end(3)]
            hosts = [StageHost(p2ps[i], dhts[i], "behind", stage, load_stage(shards, stage), cfg,
                               StageHooks(before=hooks[i]), manifest) for i, stage in enumerate((0, 0, 1))]
            async with hosts_running(hosts):
                trainer = PipelineTrainer(p2ps[3], dhts[3], "behind", shards, TrainerConfig(
                    swarm=SWARM, micro_batch_size=2, hop_timeout=20, end_step_timeout=20, replica_wait=10, seed=1))
                try:
                    await wait_replicas(trainer, {0: 2, 1: 1})
                    reports = [await trainer.step(*batch(step)) for step in range(4)]
                    failed = None
                    for step in range(4, 30):  # until B has caught up and the run is past C's advance
                        try:
                            reports.append(await trainer.step(*batch(step)))
                        except PipelineError as e:
                            assert failed is None, f"a second failed attempt: {e}"
                            failed = (trainer.step_no, str(e))
                            reports.append(await trainer.step(*batch(step)))
                        end = reports[-1].stages[0]  # B back in stage 0's averaging, and the round applied
                        if step >= 6 and len(end.replies) == 2 and end.applied and end.in_sync:
                            break
                    return reports, failed, [(h.step, h.params_hash) for h in hosts]
                finally:
                    await trainer.close()

    reports, failed, ends = asyncio.run(scenario())
    assert [r.step for r in reports] == list(range(len(reports)))
    assert reports[1].stages[1].applied
    assert None in reports[1].stages[0].replies.values()  # B's end of step 1 failed; A's did not
    assert not reports[3].stages[1].applied and set(reports[3].stages[1].replies.values()) == {None}  # C's
    assert failed is not None and failed[0] == 4 and "stage 1" in failed[1], failed
    assert reports[4].stages[1].applied and len(reports[4].stages[1].replies) == 1  # C, advanced to step 4
    last = reports[-1]
    assert len(last.stages[0].replies) == 2 and last.stages[0].in_sync and last.stages[0].applied, (
        f"B never took part in an applied step end again: {last.stages[0]}")
    steps = {step for step, _ in ends}
    assert steps == {len(reports)} and ends[0][1] == ends[1][1], ends  # A and B: same step, same parameters


# ---- bad frames ----------------------------------------------------------------------------------------------

async def raw_call(p2p, peer: str, protocol: str, data: bytes, header: bytes | None = None) -> bytes:
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), protocol)
    try:
        if header is not None:
            writer.write(header)
            await writer.drain()
        else:
            await write_frame(writer, data)
        return await asyncio.wait_for(read_frame(reader, 1 << 24), 10)
    finally:
        close_quietly(writer)


@pytest.mark.timeout(90)
def test_malformed_frames_get_an_error_reply_and_the_host_keeps_serving(tmp_path):
    shards = split(build_model("gpt2", UNTIED_GPT2, 0).module, [(0, 2), (2, 4)], tmp_path / "shards")
    H = 64

    async def scenario():
        async with swarm(3, with_dht=False) as (p2ps, _):
            host = StageHost(p2ps[0], None, "bad", 1, load_stage(shards, 1), StageConfig(swarm=SWARM, max_batch=4))
            async with hosts_running([host]):
                peer, client = p2ps[0].peer_id.to_base58(), p2ps[1]
                fwd, bwd = stage_protocol(SWARM, "bad", 1, "forward"), stage_protocol(SWARM, "bad", 1, "backward")
                good = torch.randn(2, T, H)

                def req(t, **kw):
                    fields = dict(pipeline="bad", stage=1, micro_batch=7, step=0, tensor=t) | kw
                    return activation_to_wire(ForwardRequest(**fields))

                bad_frames = {
                    "garbage": b"\x93\x01\x02garbage",
                    "token ids where hidden states go": req(torch.zeros(2, T, dtype=torch.long)),
                    "wrong width": req(torch.randn(2, T, H + 1)),
                    "batch over max_batch": req(torch.randn(5, T, H)),
                    "NaN": with_nan(req(good)),
                    "another stage": req(good, stage=0),
                    "another step": req(good, step=5),
                }
                replies = {}
                for what, data in bad_frames.items():
                    replies[what] = activation_from_wire(await raw_call(client, peer, fwd, data), ForwardReply,
                                                         None or _like(good, H))
                replies["oversize prefix"] = activation_from_wire(
                    await raw_call(client, peer, fwd, b"", header=(1 << 30).to_bytes(4, "big")), ForwardReply,
                    _like(good, H))
                replies["backward without forward"] = activation_from_wire(
                    await raw_call(client, peer, bwd, activation_to_wire(BackwardRequest(99, torch.randn(2, T, 256)))),
                    BackwardReply, _like(good, H))
                ok = activation_from_wire(await raw_call(client, peer, fwd, req(good)), ForwardReply,
                                          _like(torch.zeros(2, T, 256), 256), micro_batch=7)
                stranger = activation_from_wire(  # a backward must come from the peer that sent the forward
                    await raw_call(p2ps[2], peer, bwd, activation_to_wire(BackwardRequest(7, torch.randn(2, T, 256)))),
                    BackwardReply, _like(good, H))
                short = activation_to_wire(BackwardRequest(7, torch.randn(2, T - 1, 256)))
                wrong_shape = activation_from_wire(await raw_call(client, peer, bwd, short), BackwardReply,
                                                   _like(good, H))
                back = activation_from_wire(
                    await raw_call(client, peer, bwd, activation_to_wire(BackwardRequest(7, torch.randn(2, T, 256)))),
                    BackwardReply, _like(good, H), micro_batch=7)
                commit = control_from_wire(await raw_call(client, peer, stage_protocol(SWARM, "bad", 1, "control"),
                                                          control_to_wire(Commit(0, (7, 7, 8)))), CommitReply)
                return replies, ok, stranger, wrong_shape, back, commit, host

    replies, ok, stranger, wrong_shape, back, commit, host = asyncio.run(scenario())
    for what, reply in replies.items():
        assert isinstance(reply, ErrorReply) and reply.reason, what
        assert "\n" not in reply.reason
    assert "step 0, not 5" in replies["another step"].reason
    assert "NaN" in replies["NaN"].reason
    assert isinstance(ok, ForwardReply) and ok.tensor.shape == (2, T, 256)  # logits: the host still serves
    assert isinstance(stranger, ErrorReply) and "from this peer" in stranger.reason
    assert isinstance(wrong_shape, ErrorReply) and "shape" in wrong_shape.reason
    assert isinstance(back, BackwardReply) and back.grad.shape == (2, T, H)  # the forward survived the bad backward
    assert commit.committed == (7, 7) and commit.missing == (8,)  # a repeated id is counted once
    assert len(host._committed) == 1


def with_nan(frame: bytes) -> bytes:
    """The frame with its tensor's first value replaced by NaN (an honest sender refuses to encode one)."""
    obj = msgpack.unpackb(frame)
    raw = bytearray(obj["tensor"]["raw"])
    raw[:4] = np.array([np.nan], "<f4").tobytes()
    obj["tensor"]["raw"] = bytes(raw)
    return msgpack.packb(obj, use_bin_type=True)


def _like(t: torch.Tensor, width: int):
    from protocol.pipeline.activations import ExpectedTensor

    return ExpectedTensor(("float32", "float16", "bfloat16"), (t.shape[0], t.shape[1], width), "float32")
