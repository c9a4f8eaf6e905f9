"""Golden wire bytes: the exact bytes of one frame of every wire message type, pinned by sha256 and length.

Why: issue 12 regroups protocol/ (and node/) into subpackages with no change of behaviour. Other nodes, DHT
records already stored and signatures already made read these bytes, so the regroup must not change a single
one of them: not a map key, not the order of fields, not an int's width. Every case below builds one
deterministic instance (fixed field values, fixed Ed25519 keys from fixed 32-byte seeds: Ed25519 signatures are
deterministic, and so is AES-GCM under a fixed key and nonce), encodes it with the project's own encoder, and
compares sha256 and length with values written literally here, generated once from the code before the regroup.
Where a decoder exists, the bytes must also decode back to an equal object that re-encodes to the same bytes.

After a move only the import lines of this file may change. A golden value changes only with a deliberate wire
change (a version bump), never with a refactor; regenerate a value by printing ``digest(CASES[name].encoded())``.

Pinned: protocol/records/peer.py (capabilities, peer records), protocol/allreduce/messages.py (every all-reduce round
message with its sparse payload), protocol/allreduce/matchmaking.py (declarations, started markers),
protocol/records/job_spec.py and job_records.py (specs, records, progress), protocol/transfer/job_state.py (state
headers), protocol/pipeline/control.py (every control message, member records), protocol/pipeline/activations.py
(every frame, float32 / fp16 / bf16 / int64 tensors), protocol/transfer/shard_transfer.py, protocol/transfer/shards.py
(a signed manifest), protocol/allreduce/codecs.py (the payload of every index / value codec),
protocol/pipeline/direct.py (sealed frames), protocol/streams.py (the length prefix), the signed DHT values of
protocol/records/validation.py and protocol/records/job_validation.py, the libp2p key file of
protocol/records/peer_keys.py, and the DHT keys and libp2p protocol names every node derives. The Declaration of
protocol/allreduce/messages.py has no encoder of its own: its wire form is matchmaking's declaration (the bandwidth;
the peer id is the DHT subkey, the expiry the DHT's).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import msgpack
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

import protocol.pipeline.control as pipeline_messages
from protocol.allreduce.codecs import DenseCodec, EncodedUpdate, SparseCodec
from protocol.allreduce.entry_validation import SignedMatchmakingValidator
from protocol.allreduce.matchmaking import (
    STARTED,
    declaration_from_wire,
    declaration_to_wire,
    declared_subkey,
    round_key,
    started_from_wire,
    started_subkey,
    started_to_wire,
)
from protocol.allreduce.messages import (
    MAX_CONTROL_FRAME,
    CommitFrame,
    GroupPlan,
    Invite,
    InviteReply,
    PartFrame,
    ResultFrame,
    TensorSpec,
    message_from_wire,
    message_to_wire,
)
from protocol.allreduce.sparsify import SparseUpdate
from protocol.pipeline.activations import (
    ActivationFrame,
    BackwardReply,
    BackwardRequest,
    ErrorReply,
    ExpectedTensor,
    ForwardReply,
    ForwardRequest,
    activation_from_wire,
    activation_to_wire,
)
from protocol.pipeline.control import (
    Advance,
    BackupAck,
    Commit,
    CommitReply,
    ControlError,
    DirectOffer,
    DirectOpen,
    Discard,
    EndStep,
    EndStepReply,
    MemberRecord,
    Resync,
    StateHead,
    StateRequest,
    Status,
    StatusReply,
    control_from_wire,
    control_to_wire,
    member_record_from_wire,
    member_record_to_wire,
    pipe_protocol,
    stage_key,
    stage_protocol,
)
from protocol.pipeline.direct import (
    BACKWARD,
    FORWARD,
    HEADER_SIZE,
    REPLY,
    DirectChannel,
    parse_header,
    read_sealed,
    send_sealed,
)
from protocol.records.job_records import (
    JobProgress,
    JobRecord,
    PipelineAssignment,
    job_progress_from_wire,
    job_progress_to_wire,
    job_record_from_wire,
    job_record_to_wire,
    jobs_key,
    progress_key,
    progress_subkey,
)
from protocol.records.job_spec import (
    InnerOpt,
    JobSpec,
    ModelSpec,
    OuterOpt,
    PipelineSpec,
    job_spec_from_wire,
    job_spec_to_wire,
)
from protocol.records.job_validation import SignedJobRecordValidator
from protocol.records.peer import (
    Capability,
    GpuInfo,
    PeerRecord,
    capability_from_wire,
    capability_to_wire,
    peer_record_from_wire,
    peer_record_to_wire,
    swarm_key,
)
from protocol.records.peer_keys import libp2p_private_key, peer_id_of
from protocol.records.validation import SignedPeerRecordValidator, key_id
from protocol.streams import read_frame, write_frame
from protocol.transfer.job_state import StateHeader, state_header_from_wire, state_header_to_wire
from protocol.transfer.shard_transfer import (
    ChunkReply,
    ChunkRequest,
    TransferRefusal,
    chunk_reply_from_wire,
    chunk_reply_to_wire,
    chunk_request_from_wire,
    chunk_request_to_wire,
    refusal_to_wire,
    shard_protocol,
)
from protocol.transfer.shards import (
    ShardInfo,
    ShardManifest,
    TiedWeight,
    canonical_config_json,
    manifest_from_wire,
    manifest_to_wire,
    sign_manifest,
    verify_manifest,
)

# ---- fixed inputs ----------------------------------------------------------------------------------------------


def key(first: int) -> Ed25519PrivateKey:
    """An Ed25519 key from the fixed 32-byte seed first, first + 1, ..., first + 31."""
    return Ed25519PrivateKey.from_private_bytes(bytes(range(first, first + 32)))


KEY_A, KEY_B, KEY_C, KEY_D, KEY_E = (key(32 * i) for i in range(5))
ID_A, ID_B, ID_C, ID_D, ID_E = (peer_id_of(k.public_key()) for k in (KEY_A, KEY_B, KEY_C, KEY_D, KEY_E))
SWARM = "demo"
HASH = "0123456789abcdef" * 4
HASH_2 = "fedcba9876543210" * 4
EXPIRATION = 1_700_000_030.25
ROUND = "r-7"
TENSOR = TensorSpec("grads", 1000)
MICRO_BATCH = 0x0123456789ABCDEF
PIPELINE = "0123456789abcdef/0"
DIRECT_KEY, DIRECT_SESSION = bytes(range(100, 132)), bytes(range(16))


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def run(coro) -> Any:
    return asyncio.run(coro)


class FakeWriter:
    """The part of asyncio.StreamWriter that write_frame and send_sealed use."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data

    async def drain(self) -> None:
        pass


async def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()  # made inside the running loop
    reader.feed_data(data)
    reader.feed_eof()
    return reader


# records

CPU = Capability((), 8, 16 * 2**30, 100 * 2**30, 0.25, None, "Linux-6.1-x86_64 / torch 2.13.0+cpu")
GPUS = Capability((GpuInfo("NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0)), GpuInfo("NVIDIA A100-SXM4-40GB", 40 * 2**30,
                                                                                 (8, 0))),
                  64, 512 * 2**30, 2 * 2**40, 51.2, 612.5, "Linux-5.15-x86_64 / torch 2.13.0+cu128")


def peer_record(leaving: bool = False) -> PeerRecord:
    return PeerRecord(ID_A, (f"/ip4/127.0.0.1/tcp/31337/p2p/{ID_A}", f"/ip6/::1/tcp/31337/p2p/{ID_A}"), "0.1.0",
                      CPU if leaving else GPUS, 1_700_000_000.5, leaving=leaving)


# all-reduce round

UPDATE = SparseUpdate(np.array([3, 10, 11, 250], np.int64), np.array([0.5, -2.0, 1.25, 3.0], np.float32), 300)
INT2_UPDATE = SparseUpdate(UPDATE.indices, np.array([1.0, -3.0, 3.0, -1.0], np.float32), 300)  # int2 levels exactly


def part_frame() -> PartFrame:
    # delta-varint named: the frame's bytes as pinned before issue 17 made "auto" pick rice (pinned on its own below)
    return PartFrame(ROUND, ID_B, TENSOR, (400, 700), 32.0, 0.01, SparseCodec("fp16", "delta-varint").compress(UPDATE))


def result_frame() -> ResultFrame:
    return ResultFrame(ROUND, ID_B, TENSOR, (400, 700), tuple(sorted((ID_A, ID_B))), 64.0,
                       SparseCodec("fp32", "bitmap").compress(UPDATE))


def group_plan() -> GroupPlan:
    return GroupPlan(ROUND, ID_A, tuple(sorted((ID_A, ID_B, ID_C))), ((0, 400), (400, 700), (700, 1000)), TENSOR,
                     1_700_000_060.0)


# jobs

FED_SPEC = JobSpec(name="digits-demo", model=ModelSpec("mlp", {"hidden": 128}), dataset="digits",
                   task="classification", rounds=30, inner=InnerOpt("sgd", 0.1, momentum=0.9), local_steps=20,
                   density=0.01)
PIPE_SPEC = JobSpec(
    name="bytes-gpt", model=ModelSpec("gpt2", {"n_layer": 4, "n_embd": 64, "resid_pdrop": 0.1, "act": "gelu_new",
                                                "tie_word_embeddings": False, "bias": -3}),
    dataset="pystdlib-bytes", task="causal-lm", rounds=100, inner=InnerOpt("adamw", 3e-4, weight_decay=0.1),
    outer=OuterOpt("diloco", 0.7, 0.9, True), batch_size=8, min_participants=1, max_participants=4,
    round_timeout_s=12.5, seed=2**32 - 1, eval_every=5, kind="pipeline",
    pipeline=PipelineSpec(stages=2, replicas=2, micro_batch=4, micro_batches=2, max_replicas=3))


def fed_record() -> JobRecord:
    return JobRecord.create(FED_SPEC, ID_A, "n1", 1_700_000_000.5).replace(round=3, model_hash=HASH,
                                                                            participants=(ID_B, ID_C))


def pipe_record() -> JobRecord:
    assignment = PipelineAssignment(((0, 2), (2, 4)), ((ID_B, ID_C), (ID_D, ID_E)), HASH_2, 1234)
    return JobRecord.create(PIPE_SPEC, ID_A, "n2", 1_700_000_000.5, assignment)


def progress() -> JobProgress:
    return JobProgress(fed_record().job_id, ID_B, 3, HASH, participants=(ID_A, ID_B), train_loss=0.25, eval_metric=0.9,
                       bytes_exchanged=12345, round_time_s=1.5, updated_at=1_700_000_001.0, next_round=4)


def declined() -> JobProgress:
    return JobProgress(fed_record().job_id, ID_C, 0, "", state="declined", updated_at=1_700_000_002.0,
                       reason="no local data for dataset 'digits'")


# activations (values on a 1/8 grid: exact in float16 and bfloat16, so a shrunk frame decodes to the original)


def hidden(scale: float = 1.0) -> torch.Tensor:
    return (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 8 - 1) * scale


def tokens() -> torch.Tensor:
    return torch.tensor([[1, 2, 3, 4], [5, 6, 7, 255]], dtype=torch.int64)


LIKE_HIDDEN = ExpectedTensor.like(hidden())

# shards

SHA_1 = hashlib.sha256(b"stage 0").hexdigest()
SHA_2 = hashlib.sha256(b"stage 1").hexdigest()


def manifest() -> ShardManifest:
    unsigned = ShardManifest(HASH, "GPT2LMHeadModel", canonical_config_json({"n_layer": 4, "n_embd": 64,
                                                                             "vocab_size": 256}),
                             4, "float32", (ShardInfo(0, 2, "stage-000.safetensors", SHA_1, 1000),
                                            ShardInfo(2, 4, "stage-001.safetensors", SHA_2, 2000)),
                             (TiedWeight("lm_head.weight", "transformer.wte.weight"),), ID_A)
    return sign_manifest(unsigned, KEY_A)


def decode_manifest(data: bytes) -> ShardManifest:
    return verify_manifest(manifest_from_wire(data), trusted_signers={ID_A}, expected_model_hash=HASH)


CHUNK = ChunkRequest(SHA_1, 1 << 20, 1024)

# codecs: the case bytes are the EncodedUpdate's fields, in order, as one msgpack array (the frame layer's own
# map around them is pinned by the part and result frames)


def encoded_bytes(e: EncodedUpdate) -> bytes:
    return pack([e.index_codec, e.value_codec, e.nnz, e.indices, e.values])


def codec_case(codec) -> tuple[Callable, Callable]:
    def encode(update: SparseUpdate) -> bytes:
        return encoded_bytes(codec.compress(update))

    def decode(data: bytes) -> SparseUpdate:
        got = codec.extract(EncodedUpdate(*unpack(data)), UPDATE.size)
        keep = got.values != 0  # a dense encoding carries the zeros too
        return SparseUpdate(got.indices[keep], got.values[keep], got.size)

    return encode, decode


# direct path: (kind, sequence number, payload) -> header | ciphertext | tag

DIRECT_PAYLOAD = b"activation frame bytes " * 4


def _channels(kind: int) -> tuple[DirectChannel, DirectChannel]:
    """(sender, receiver) of a frame of ``kind``."""
    trainer = DirectChannel(DIRECT_KEY, DIRECT_SESSION, "trainer")
    host = DirectChannel(DIRECT_KEY, DIRECT_SESSION, "host")
    return (host, trainer) if kind == REPLY else (trainer, host)


def seal(frame: tuple[int, int, bytes]) -> bytes:
    kind, seq, payload = frame
    sender, _ = _channels(kind)
    for _ in range(seq):
        sender.seal(kind, b"earlier")
    return b"".join(sender.seal(kind, payload))


def open_sealed(data: bytes) -> tuple[int, int, bytes]:
    head = parse_header(data[:HEADER_SIZE], (FORWARD, BACKWARD, REPLY), len(data))
    assert (head.session, head.length) == (DIRECT_SESSION, len(data) - HEADER_SIZE)
    twin, receiver = _channels(head.kind)
    for _ in range(head.seq):
        receiver.open_frame(b"".join(twin.seal(head.kind, b"earlier")), (head.kind,), len(data))
    kind, payload = receiver.open_frame(data, (head.kind,), len(data))
    return kind, head.seq, payload


def send_sealed_bytes(frame: tuple[int, int, bytes]) -> bytes:
    kind, seq, payload = frame
    assert seq == 0

    async def main() -> bytes:
        writer = FakeWriter()
        await send_sealed(writer, _channels(kind)[0], kind, payload)
        return bytes(writer.buffer)

    return run(main())


def read_sealed_frame(data: bytes) -> tuple[int, int, bytes]:
    async def main() -> tuple[int, int, bytes]:
        host = _channels(FORWARD)[1]
        kind, payload = await read_sealed(await reader_of(data), host, (FORWARD, BACKWARD), len(data))
        return kind, host.received - 1, payload

    return run(main())


# streams


def write_frame_bytes(body: bytes) -> bytes:
    async def main() -> bytes:
        writer = FakeWriter()
        await write_frame(writer, body)
        return bytes(writer.buffer)

    return run(main())


def read_frame_body(data: bytes) -> bytes:
    async def main() -> bytes:
        reader = await reader_of(data)
        body = await read_frame(reader, len(data))
        assert reader.at_eof()
        return body

    return run(main())


# signed DHT values (records built as hivemind's DHTNode hands them to sign_value)


def dht_peer_record() -> DHTRecord:
    return DHTRecord(key_id(swarm_key(SWARM, "peers")), MSGPackSerializer.dumps(ID_A),
                     MSGPackSerializer.dumps(peer_record_to_wire(peer_record())), EXPIRATION)


def dht_job_record() -> DHTRecord:
    record = fed_record()
    return DHTRecord(key_id(jobs_key(SWARM)), MSGPackSerializer.dumps(record.job_id),
                     MSGPackSerializer.dumps(job_record_to_wire(record)), EXPIRATION)


def dht_progress() -> DHTRecord:
    item = progress()
    return DHTRecord(key_id(progress_key(SWARM, item.job_id)), MSGPackSerializer.dumps(progress_subkey(item.job_id,
                                                                                                       ID_B)),
                     MSGPackSerializer.dumps(job_progress_to_wire(item)), EXPIRATION)


def dht_declaration() -> DHTRecord:
    return DHTRecord(key_id(round_key(SWARM, "grads", ROUND)), MSGPackSerializer.dumps(declared_subkey(ID_A)),
                     MSGPackSerializer.dumps(declaration_to_wire(1.25e8)), EXPIRATION)


def dht_started() -> DHTRecord:
    return DHTRecord(key_id(round_key(SWARM, "grads", ROUND)), MSGPackSerializer.dumps(started_subkey(ID_A)),
                     MSGPackSerializer.dumps(started_to_wire(sorted((ID_A, ID_B, ID_C)))), EXPIRATION)


def matchmaking_validator(swarm: str, signer: Ed25519PrivateKey) -> SignedMatchmakingValidator:
    return SignedMatchmakingValidator(signer, now=lambda: EXPIRATION - 60.0)


def signed_case(validator_class: Callable, signer: Ed25519PrivateKey) -> tuple[Callable, Callable]:
    def encode(record: DHTRecord) -> bytes:
        return validator_class(SWARM, signer).sign_value(record)

    def decode(data: bytes, record: DHTRecord) -> DHTRecord:
        stored = dataclasses.replace(record, value=data)
        reader = validator_class(SWARM, key(200))  # another node's validator
        assert reader.validate(stored) is True
        return dataclasses.replace(record, value=reader.strip_value(stored))

    return encode, decode


# names every node derives alike: DHT keys (and the hash hivemind stores them under) and libp2p protocols


def names() -> list[str]:
    job_id = fed_record().job_id
    return [
        swarm_key(SWARM, "peers"), key_id(swarm_key(SWARM, "peers")).hex(), round_key(SWARM, "grads", ROUND), STARTED,
        jobs_key(SWARM), key_id(jobs_key(SWARM)).hex(), progress_key(SWARM, job_id),
        key_id(progress_key(SWARM, job_id)).hex(), progress_subkey(job_id, ID_B),
        *(stage_protocol(SWARM, PIPELINE, 1, kind) for kind in ("forward", "backward", "control")),
        pipe_protocol(SWARM, PIPELINE, "state"), pipe_protocol(SWARM, PIPELINE, "backup"), stage_key(SWARM, PIPELINE,
                                                                                                     1),
        shard_protocol(SWARM), ID_A,
    ]


# ---- the table -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    build: Callable[[], Any]  # the deterministic instance
    encode: Callable[[Any], bytes]  # the project's encoder
    decode: Callable[..., Any] | None = None  # its decoder: bytes -> an object equal to build(); None: none exists
    decode_needs_object: bool = False  # decode(bytes, build()) (a signed DHT value is checked against its record)

    def encoded(self) -> bytes:
        return self.encode(self.build())


def control(build: Callable[[], Any]) -> Case:
    return Case(build, control_to_wire, lambda data: control_from_wire(data, type(build())))


def round_message(build: Callable[[], Any]) -> Case:
    return Case(build, message_to_wire, lambda data: message_from_wire(data, MAX_CONTROL_FRAME, type(build())))


_sparse_auto, _sparse_bitmap = codec_case(SparseCodec("fp16")), codec_case(SparseCodec("fp32", "bitmap"))
_sparse_dense_index, _dense_fp32 = codec_case(SparseCodec("fp32", "delta-varint")), codec_case(DenseCodec("fp32"))
_dense_fp16 = codec_case(DenseCodec("fp16"))
_sparse_int2_rice = codec_case(SparseCodec("int2", "rice"))
_signed_peer = signed_case(SignedPeerRecordValidator, KEY_A)
_signed_job, _signed_progress = signed_case(SignedJobRecordValidator, KEY_A), signed_case(SignedJobRecordValidator,
                                                                                          KEY_B)
_signed_entry = signed_case(matchmaking_validator, KEY_A)

CASES: dict[str, Case] = {
    # protocol/wire.py
    "wire/capability_cpu": Case(lambda: CPU, lambda c: pack(capability_to_wire(c)),
                                lambda data: capability_from_wire(unpack(data))),
    "wire/capability_gpus": Case(lambda: GPUS, lambda c: pack(capability_to_wire(c)),
                                 lambda data: capability_from_wire(unpack(data))),
    "wire/peer_record": Case(peer_record, peer_record_to_wire, peer_record_from_wire),
    "wire/peer_record_leaving": Case(lambda: peer_record(leaving=True), peer_record_to_wire, peer_record_from_wire),
    "wire/invite": round_message(lambda: Invite(ROUND, ID_A, TENSOR)),
    "wire/invite_reply": round_message(lambda: InviteReply(ROUND, ID_B, True, 1.25e8)),
    "wire/invite_reply_declined": round_message(lambda: InviteReply(ROUND, ID_C, False, 0.0)),
    "wire/group_plan": round_message(group_plan),
    "wire/part_frame": round_message(part_frame),
    "wire/result_frame": round_message(result_frame),
    "wire/commit_frame": round_message(lambda: CommitFrame(ROUND, ID_C, (True, False, True))),
    # protocol/allreduce/matchmaking.py (protocol/allreduce/messages.py Declaration: the DHT value of a peer's
    # declaration)
    "matchmaking/declaration": Case(lambda: 1.25e8, declaration_to_wire, declaration_from_wire),
    "matchmaking/started": Case(lambda: tuple(sorted((ID_A, ID_B, ID_C))), started_to_wire, started_from_wire),
    # protocol/records/job_spec.py, job_records.py
    "jobs/spec_federated": Case(lambda: FED_SPEC, job_spec_to_wire, job_spec_from_wire),
    "jobs/spec_pipeline": Case(lambda: PIPE_SPEC, job_spec_to_wire, job_spec_from_wire),
    "jobs/record_federated": Case(fed_record, job_record_to_wire, job_record_from_wire),
    "jobs/record_pipeline": Case(pipe_record, job_record_to_wire, job_record_from_wire),
    "jobs/progress": Case(progress, job_progress_to_wire, job_progress_from_wire),
    "jobs/progress_declined": Case(declined, job_progress_to_wire, job_progress_from_wire),
    "jobs/state_header": Case(lambda: StateHeader(fed_record().job_id, 3, 4, HASH, 1000, True, 512),
                              state_header_to_wire, state_header_from_wire),
    # protocol/pipeline/control.py
    "pipeline/status": control(lambda: Status(7)),
    "pipeline/status_reply": control(lambda: StatusReply(7, 3, HASH)),
    "pipeline/commit": control(lambda: Commit(7, (1, 42, 2**64 - 1))),
    "pipeline/commit_reply": control(lambda: CommitReply(7, (1, 42), (2**64 - 1,))),
    "pipeline/end_step": control(lambda: EndStep(7, (1, 42), (ID_B, ID_C), ID_D)),
    "pipeline/end_step_no_backup": control(lambda: EndStep(7, (1, 42), (ID_B,), None)),
    "pipeline/end_step_reply": control(lambda: EndStepReply(7, True, 8.0, 4, 1, 2, HASH, True, "")),
    "pipeline/end_step_reply_failed": control(lambda: EndStepReply(7, False, 0.0, 0, 4, 1, "", None,
                                                                   "averaging round failed: 1 of 2 members")),
    "pipeline/resync": control(lambda: Resync(7, ID_B)),
    "pipeline/advance": control(lambda: Advance(9)),
    "pipeline/discard": control(lambda: Discard(7)),
    "pipeline/control_error": control(lambda: ControlError("stage 1 is at step 9, past 7")),
    "pipeline/state_request": control(lambda: StateRequest(1, 7)),
    "pipeline/state_head": control(lambda: StateHead(1, 7, 123456, HASH, HASH_2)),
    "pipeline/backup_ack": control(lambda: BackupAck(True, "")),
    "pipeline/direct_open": control(DirectOpen),
    "pipeline/direct_offer": control(lambda: DirectOffer("127.0.0.1", 40123, DIRECT_SESSION, DIRECT_KEY)),
    "pipeline/member_record": Case(lambda: MemberRecord("replica", 12.5, 7, 1_700_000_000.25), member_record_to_wire,
                                   member_record_from_wire),
    # protocol/pipeline/activations.py
    "activations/forward_request": Case(lambda: ForwardRequest(PIPELINE, 1, MICRO_BATCH, 7, hidden()),
                                        activation_to_wire,
                                        lambda data: activation_from_wire(data, ForwardRequest, LIKE_HIDDEN)),
    "activations/forward_request_bf16": Case(lambda: ForwardRequest(PIPELINE, 1, MICRO_BATCH, 7, hidden()),
                                             lambda m: activation_to_wire(m, wire_dtype="bf16"),
                                             lambda data: activation_from_wire(data, ForwardRequest, LIKE_HIDDEN)),
    "activations/forward_request_tokens": Case(lambda: ForwardRequest(PIPELINE, 0, 5, 7, tokens(), train=False),
                                               lambda m: activation_to_wire(m, wire_dtype="fp16"),
                                               lambda data: activation_from_wire(
                                                   data, ForwardRequest, ExpectedTensor.token_ids(4, 16, 256))),
    "activations/forward_reply": Case(lambda: ForwardReply(MICRO_BATCH, hidden(2.0)), activation_to_wire,
                                      lambda data: activation_from_wire(data, ForwardReply, LIKE_HIDDEN,
                                                                        micro_batch=MICRO_BATCH)),
    "activations/forward_reply_fp16": Case(lambda: ForwardReply(MICRO_BATCH, hidden(2.0)),
                                           lambda m: activation_to_wire(m, wire_dtype="fp16"),
                                           lambda data: activation_from_wire(data, ForwardReply, LIKE_HIDDEN)),
    "activations/backward_request": Case(lambda: BackwardRequest(MICRO_BATCH, hidden(0.5)), activation_to_wire,
                                         lambda data: activation_from_wire(data, BackwardRequest, LIKE_HIDDEN)),
    "activations/backward_reply": Case(lambda: BackwardReply(MICRO_BATCH, hidden(-0.25)), activation_to_wire,
                                       lambda data: activation_from_wire(data, BackwardReply, LIKE_HIDDEN)),
    "activations/backward_reply_first_stage": Case(lambda: BackwardReply(MICRO_BATCH, None), activation_to_wire,
                                                   lambda data: activation_from_wire(data, BackwardReply, None)),
    "activations/error_reply": Case(lambda: ErrorReply(MICRO_BATCH, "stage 1: CUDA out of memory"), activation_to_wire,
                                    lambda data: activation_from_wire(data, ForwardReply, LIKE_HIDDEN)),
    # protocol/transfer/shard_transfer.py
    "shard_transfer/chunk_request": Case(lambda: CHUNK, chunk_request_to_wire, chunk_request_from_wire),
    "shard_transfer/chunk_reply": Case(lambda: ChunkReply(SHA_1, 1 << 20, bytes(range(256)) * 4), chunk_reply_to_wire,
                                       lambda data: chunk_reply_from_wire(data, CHUNK)),
    "shard_transfer/refusal": Case(lambda: TransferRefusal("out_of_range", "offset 5000 is past the end of 4096 bytes"),
                                   refusal_to_wire, lambda data: chunk_reply_from_wire(data, CHUNK)),
    # protocol/transfer/shards.py
    "shards/manifest": Case(manifest, manifest_to_wire, decode_manifest),
    # protocol/allreduce/codecs.py
    "codecs/sparse_fp16_auto": Case(lambda: UPDATE, *_sparse_auto),  # rice indices since issue 17 (a deliberate change)
    "codecs/sparse_int2_rice": Case(lambda: INT2_UPDATE, *_sparse_int2_rice),
    "codecs/sparse_fp32_bitmap": Case(lambda: UPDATE, *_sparse_bitmap),
    "codecs/sparse_fp32_delta_varint": Case(lambda: UPDATE, *_sparse_dense_index),
    "codecs/dense_fp32": Case(lambda: UPDATE, *_dense_fp32),
    "codecs/dense_fp16": Case(lambda: UPDATE, *_dense_fp16),
    # protocol/pipeline/direct.py
    "direct/forward_send_sealed": Case(lambda: (FORWARD, 0, DIRECT_PAYLOAD), send_sealed_bytes, read_sealed_frame),
    "direct/backward_seq1": Case(lambda: (BACKWARD, 1, DIRECT_PAYLOAD), seal, open_sealed),
    "direct/reply_seq0": Case(lambda: (REPLY, 0, DIRECT_PAYLOAD[::-1]), seal, open_sealed),
    # protocol/streams.py
    "streams/write_frame": Case(lambda: bytes(range(256)) + b"frame body" * 5, write_frame_bytes, read_frame_body),
    # protocol/records/validation.py, protocol/records/job_validation.py: the signed values stored in the DHT
    "dht/signed_peer_record": Case(dht_peer_record, *_signed_peer, decode_needs_object=True),
    "dht/signed_job_record": Case(dht_job_record, *_signed_job, decode_needs_object=True),
    "dht/signed_job_progress": Case(dht_progress, *_signed_progress, decode_needs_object=True),
    # protocol/allreduce/entry_validation.py: matchmaking entries (subkeys "!declared/<peer>", "!started/<peer>")
    "dht/signed_declaration": Case(dht_declaration, *_signed_entry, decode_needs_object=True),
    "dht/signed_started_marker": Case(dht_started, *_signed_entry, decode_needs_object=True),
    # protocol/records/peer_keys.py: the key file p2pd reads; and the names of keys and protocols
    "peer_keys/libp2p_private_key": Case(lambda: KEY_A, libp2p_private_key),
    "names/dht_keys_and_protocols": Case(names, lambda lines: "\n".join(lines).encode()),
}

# name -> (sha256 of the bytes, their length), generated from the code before the regroup (issue 8)
GOLDEN: dict[str, tuple[str, int]] = {
    "activations/backward_reply": ("551ee2c0b56ab15c38b132a36d30015bbba17f48c3bbd976e528c8493524281c", 160),
    "activations/backward_reply_first_stage": ("4b269718719213dd532ed88f4b2b62c589bf8d74329e34dcb7948292aea77011", 34),
    "activations/backward_request": ("df70f8f72fe27305ca7534ec93d5e436cc63e9257b78ab87dbf8a1bd06d01fb4", 154),
    "activations/error_reply": ("92e7d83ca840621861a49b5d4d1da540d7c8de51f73e7549f71f7b0927ef1210", 59),
    "activations/forward_reply": ("1971bef56e2d492031a86c271fd9ab23b9e56d1b4e6f7756df526e0c2453d59b", 162),
    "activations/forward_reply_fp16": ("b9a0e67cfbc368093b9784f082d09c8ebd9c7183639f8e54ce35e2d851936be4", 114),
    "activations/forward_request": ("6ae07957eeedeb198a5664f488de9878705eb5086a73e2287dc3ec328c04143a", 204),
    "activations/forward_request_bf16": ("2447ed84b7ca458aa10ebf7ed71d15144faa7764d345e0ac8aa51c275f0cb2f3", 157),
    "activations/forward_request_tokens": ("0c2312e9c3de72b874e72ea95f964e86bb5f5f3e821890aa6f4ac665a3a7aeeb", 161),
    "codecs/dense_fp16": ("581227e1125a7fc12695b21cafed1a20ae8cd3c234d0d93ef21c2679549a4b20", 620),
    "codecs/dense_fp32": ("df78d5ecbd0c163538afab86f8c83001cf80ec0a4d07c586e0fe9022ed7fa8d2", 1220),
    "codecs/sparse_fp16_auto": ("fe6c5184c4a63b1d837a0a88d0e765ee55785fd41d134fe5261ff2dabf636ed1", 29),  # rice
    "codecs/sparse_int2_rice": ("8fd3eb60a3972e55e8658d5a65a2c895c87a1befa45365ec3296f21b08b15ba4", 26),
    "codecs/sparse_fp32_bitmap": ("4051501e1537e3fc15687111441810509e9169290a1a31b0642fe77f728e0599", 72),
    "codecs/sparse_fp32_delta_varint": ("7b7b9b79649f35651ca13f4b63166e7b8261afb6bd3c39d052ecb5951d9e50d1", 45),
    "dht/signed_declaration": ("10c615c4595df59ee55db24a184938d60019073cce4d616f038c6ad2b81a600e", 79),
    "dht/signed_job_progress": ("e7158cd1e4dabb042e775e7bc57a3863c4586747ce7c5f4b19e473cb8dd28a7a", 490),
    "dht/signed_started_marker": ("c249cc3b4d53c8d0fd4e0eda1eb23fa330e28f8d60d479ca19b788c7dcaa5f88", 238),
    "dht/signed_job_record": ("e1b6f08eb8bf7881c7b5954796fa42eec10996530eb1e7571a2a3190a9572c49", 763),
    "dht/signed_peer_record": ("c52746186b50a1d0e625c9a1b3d28c19746f8bb3ca9ce84088f955e706804ac5", 594),
    "direct/backward_seq1": ("75462228a75ecc13ad87f333ac4d94f477449b634ca3faeaa51f967766f2d282", 144),
    "direct/forward_send_sealed": ("9c0cd30ea1e36bcd2c90e34617b5f581785718f19736ca570218703402f54964", 144),
    "direct/reply_seq0": ("25be45f4b59497766697a00143dc4d5cf2e9f151e22f8aa08162b6b8abd1c293", 144),
    "jobs/progress": ("c2c5ec55e6b31bdaef9444c0488cc92889a0ee1bbc59710978daca8b2ab69970", 423),
    "jobs/progress_declined": ("65541882bf8a151c2997294b5d3171ed5530856bfed2064f0eae8d4b31de1c5d", 276),
    "jobs/record_federated": ("75e4fa1fadaebe236355d9d17380a4e0abcecd884bb075ef068e944b33206796", 696),
    "jobs/record_pipeline": ("5233554f7833b81b26f6da54ffaf85a011fbf5a19fe8ddcba3e9b34900326629", 1051),
    "jobs/spec_federated": ("2bf163547be5a9884b8b744df6c8ef2f80d22576bd9a1bef07eb595688031389", 350),
    "jobs/spec_pipeline": ("31b5955899c128ccc1db74888e28830dc431c313d9f12592c8587080f8abbf1d", 529),
    "jobs/state_header": ("3a81d48956fe0e0050d40646a4f1e724da9a9843e25dd4d34c768dc5e2ae9593", 166),
    "matchmaking/declaration": ("bc87bb59c61c2449e371937453fe44805912a00096d07783d07a1d0e4e706802", 13),
    "matchmaking/started": ("457a4c7a3ae6132b2bc3b70051fd8400dee248491a66fbab416557efb20b2d80", 172),
    "names/dht_keys_and_protocols": ("2dacec3594660fa91c5aec5e99632e1c6e9620ba991572ccd48c8a01b5f7668f", 673),
    "peer_keys/libp2p_private_key": ("8c1df7ef2522f6a77c0bb2e8f9332e5b124358875ae06daa5feb774b66e9362e", 68),
    "pipeline/advance": ("b014132eb31a8ee8264fb11f720fc88b0158c0d3041eb8858a033ca25ce03eaa", 20),
    "pipeline/backup_ack": ("1b50243371ae0461e481bb11b1838e44bd3bcfb6ad9b211e8e1c84f342a3d2a8", 29),
    "pipeline/commit": ("6e4bb72ac4ed3042f4026834e57ad5891daff8b29ee35148d6e40f094ec312c4", 45),
    "pipeline/commit_reply": ("7f54e2b62c1669b1e4dfc9401e0f6cdc00cf70e0c29bb67edbe2a43e131f8cb1", 56),
    "pipeline/control_error": ("483b8fc884c49300615ffb12d261222041fd505b49b6a409aee7e152ec8612c0", 48),
    "pipeline/direct_offer": ("f21d2bda8a6d5ecf07aecf553a3b63fa4ecb20145c7cd433e32aef70c98cbbda", 106),
    "pipeline/direct_open": ("6891debb6c1b284341d0c21b104b7c5e25efb5fa71378a619e39499935adb3f0", 18),
    "pipeline/discard": ("80b9bde081710af007ae125792e38cfe7829aacf2ec24bb54472c0ea08bc104d", 20),
    "pipeline/end_step": ("49b3ad82986fcff393ac32d1f78f532aeb11d5a7cc2bbb9723ce0e2e9afb9f93", 214),
    "pipeline/end_step_no_backup": ("c0f64395a8428c9008cd5a2916c766f7e808844e81ad014f08bb422228fb33d7", 107),
    "pipeline/end_step_reply": ("4e4c330de9845ef97796336a90cad499ce5257895b57dea288f65fd1f6577f1f", 179),
    "pipeline/end_step_reply_failed": ("d9f0d14bf089b476ba839301bfb648e73de6133f452e474ebfbb86220d05de66", 153),
    "pipeline/member_record": ("e8f8710de4547394f45776c6a6a6b69a5af9017152627a7c8bdd986704fe7c7b", 28),
    "pipeline/resync": ("c71ab37b927568f520eea04bdc8a4847e011c5e26594e2eeb54690c48f42b2ff", 80),
    "pipeline/state_head": ("8ab1aed84b0b8519972f09c0b77ef465839c8cd95c39c4760cad03a114676055", 186),
    "pipeline/state_request": ("5c1894d204a8727b3e7a6bb6b8e6c600e2fcc5c50bed083417d3040b649e4dc6", 37),
    "pipeline/status": ("ad3df330e19b872c700d44075298866bd35c0b42a406c90a059908ab74cbc9d9", 19),
    "pipeline/status_reply": ("7af7b2adb0be3440a7e9cd34cc744cb0e2aaf87726c59334a80add39d680f583", 114),
    "shard_transfer/chunk_reply": ("3d4af2ee45c030b63ea4c3c77debd5c2df9efa9e85b72ca02bd46097792e6890", 1129),
    "shard_transfer/chunk_request": ("b98817f23eeba8d80245e6fc23a1fad5273a99e8a10e7e57dc01527dad172380", 105),
    "shard_transfer/refusal": ("075b8aa8b40dc8e17912ceac702be15a11d08f006e2ecf312ff001613ef1ac3a", 82),
    "shards/manifest": ("e6de4f6c3bdbb7e601a2f4c2fcb3157e9765b47fbb25411b8025be72275b1934", 632),
    "streams/write_frame": ("0ebf2fb5d3c06f28a4bd7732508fad5e7e94c1c6e1c778265d0328ce6a863291", 310),
    "wire/capability_cpu": ("4e17affab1b84d6f18b7774b28c13b65faa31269691e6c536b6d46177da8a4b4", 130),
    "wire/capability_gpus": ("0e5f0fec5bb85ec620eea6fc65a48a6b5106de818cb016964bd91fb3bd7281ac", 235),
    "wire/commit_frame": ("01919081b38cde382d9a0441ad8715acf235785c668549eaa671d8b1b27016ef", 93),
    "wire/group_plan": ("0af3a9deecc80e2867d97428541d9ee5cc29054209c3fc7bb97ea9155d50e512", 322),
    "wire/invite": ("26d41b81af75a8ed50cd56cad26c1f26694953188edd6d03b328617a5e00dcdd", 109),
    "wire/invite_reply": ("27b709107640c74230610cfb54958dbb48b2c7690f12d366aa7b4e8ce5dd8a34", 110),
    "wire/invite_reply_declined": ("ac9e0110b463cd0973d9ba4a933a7d76a50c09e22c451989e825c5d75642d80c", 110),
    "wire/part_frame": ("23b07cb877b1b5336fffd0e36bf578d2475766ab7eff0791fb6415e8e5079332", 215),
    "wire/peer_record": ("35368be2cac1e374295e6b2de3ec0f9b4996026ca76d870f3cad9a149a32d004", 527),
    "wire/peer_record_leaving": ("a6270dc431ce1ce2295de648ff908e03de33476e966b41c1ff5ec9043c14cf86", 422),
    "wire/result_frame": ("d9c367e6bff43777ea001bd8059b4e6bdc9f029016269e71b8f11a6148259c1e", 359),
}


def digest(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def assert_same(got: Any, want: Any, where: str = "value") -> None:
    """Equal values of the same types all the way down (tensors: dtype, shape and elements; arrays likewise)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} where {type(want).__name__} was encoded"
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape) == (want.dtype, want.shape) and torch.equal(got, want), where
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want), where
    elif dataclasses.is_dataclass(want):
        for field in dataclasses.fields(want):
            assert_same(getattr(got, field.name), getattr(want, field.name), f"{where}.{field.name}")
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r:.80} != {want!r:.80}"


def test_every_case_has_a_golden_value():
    assert sorted(CASES) == sorted(GOLDEN)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_wire_bytes_are_unchanged(name):
    assert digest(CASES[name].encoded()) == GOLDEN[name], f"the wire bytes of {name} changed"


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.decode is not None))
def test_decoding_the_golden_bytes_round_trips(name):
    case = CASES[name]
    obj = case.build()
    data = case.encode(obj)
    back = case.decode(data, case.build()) if case.decode_needs_object else case.decode(data)
    assert_same(back, obj, name)
    assert case.encode(back) == data


def test_the_pinned_classes_are_every_wire_message():
    """A message class added to one of the encoders needs a case here (and a golden value)."""
    built = {type(c.build()) for c in CASES.values()}
    control_messages = {Status, StatusReply, Commit, CommitReply, EndStep, EndStepReply, Resync, Advance, Discard,
                        ControlError, StateRequest, StateHead, BackupAck, DirectOpen, DirectOffer, MemberRecord}
    round_messages = {Invite, InviteReply, GroupPlan, PartFrame, ResultFrame, CommitFrame}
    frames = set(get_args(ActivationFrame))
    assert control_messages | round_messages | frames <= built
    exported = {getattr(pipeline_messages, n) for n in pipeline_messages.__all__}
    assert {c for c in exported if isinstance(c, type) and dataclasses.is_dataclass(c)} == control_messages
