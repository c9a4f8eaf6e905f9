"""Fuzzing every decoder of peer or user input (issue #6): seeded mutations of valid encodings plus random bytes.

Each target builds real objects, encodes them with the project's own encoders, and feeds the decoder those
seeds, then mutations of them (bit flips, inserted/deleted/duplicated bytes, truncation, splices, and
structure-aware ones: values replaced by other types, huge and negative ints, NaN/Inf, giant declared lengths,
deep nesting, ext types, unknown, missing and renamed keys), then random bytes. The contract checked for every
case (tests/fuzzing.py): the decoder returns a valid object or raises its documented error type, within 1 s,
and within an allocation bound stated beside the target (OBJECT_BYTES_PER_INPUT_BYTE x the bytes it may parse
for anything that materialises msgpack/JSON/TOML, see tests/fuzzing.py).

Cases per target: SWARMNODE_FUZZ_INPUTS (default 1000; the CLI and file-based targets run a fraction);
corpus: SWARMNODE_FUZZ_SEED (default 0). Longer runs need pytest's per-test timeout off:
    SWARMNODE_FUZZ_INPUTS=20000 SWARMNODE_FUZZ_SEED=1 .venv/bin/python -m pytest tests/test_fuzz.py --timeout 0
The bugs this fuzzing found (RecursionError on deep msgpack, JSON and TOML; msgpack preallocation and
amplification; huge TOML integers and cnn blocks; NaN durations; non-UTF-8 argv and files; an unclamped
progress bar; numpy counts; non-ASCII digits) are fixed; tests/test_fuzz_regressions.py keeps each one's exact
input as a regression test, and no generator here skips any input: the targets produce those kinds of input
again (tests/fuzzing.py DEPTHS, over-declared containers, JSON_DEPTHS, TOML nesting, non-UTF-8 bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import random
import socket
import tomllib
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

import node.cli.main as cli
from node.api.rpc import control_pb2 as pb
from node.api.serde import capability_json, job_json, peers_json
from node.cli.format import format_job_line, format_jobs_table, format_peers_table
from node.daemon import parse_join_addr
from node.devtools.stage_peer import parse_stop_at
from node.jobs.federated.export import history_from_json, history_to_json
from node.jobs.pipeline.stage_state import OPTIMIZERS, Refused, state_from_bytes, state_to_bytes
from node.jobs.spec import job_spec_from_text, job_spec_from_toml, load_job_file
from node.ml.models import resolve_overrides
from node.runtime.config import FIELDS, resolve
from node.runtime.errors import NodeError
from protocol.allreduce.codecs import (
    CodecError,
    DenseCodec,
    EncodedUpdate,
    SparseCodec,
    decode_indices,
    decode_values,
    decode_varints,
    encode_indices,
    extract_update,
)
from protocol.allreduce.entry_validation import SignedMatchmakingValidator
from protocol.allreduce.matchmaking import (
    declaration_from_wire,
    declaration_to_wire,
    declared_subkey,
    round_key,
    seen_from_entries,
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
    BackwardReply,
    BackwardRequest,
    ErrorReply,
    ExpectedTensor,
    ForwardReply,
    ForwardRequest,
    activation_from_wire,
    activation_to_wire,
    decode_tensor,
    encode_tensor,
    max_frame_bytes,
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
)
from protocol.pipeline.direct import FORWARD, DirectChannel
from protocol.pipeline.direct import REQUESTS as DIRECT_KINDS
from protocol.records.job_records import (
    MAX_JOB_PROGRESS_BYTES,
    MAX_JOB_RECORD_BYTES,
    JobProgress,
    JobRecord,
    PipelineAssignment,
    job_progress_from_wire,
    job_progress_to_wire,
    job_record_from_wire,
    job_record_to_wire,
    jobs_key,
    parse_progress_subkey,
    progress_key,
    progress_subkey,
)
from protocol.records.job_spec import (
    MAX_JOB_SPEC_BYTES,
    InnerOpt,
    JobSpec,
    ModelSpec,
    OuterOpt,
    job_spec_from_wire,
    job_spec_to_wire,
)
from protocol.records.job_validation import SignedJobRecordValidator
from protocol.records.peer import (
    MAX_RECORD_BYTES,
    Capability,
    GpuInfo,
    PeerRecord,
    peer_record_from_wire,
    peer_record_to_wire,
    swarm_key,
)
from protocol.records.peer_keys import PeerIdError, peer_id_of, public_key_from_peer_id
from protocol.records.validation import SignedPeerRecordValidator, key_id
from protocol.transfer.job_state import (
    MAX_STATE_HEADER_BYTES,
    StateHeader,
    state_header_from_wire,
    state_header_to_wire,
)
from protocol.transfer.shard_transfer import (
    MAX_CONTROL_BYTES,
    ChunkReply,
    ChunkRequest,
    TransferRefusal,
    chunk_reply_from_wire,
    chunk_reply_to_wire,
    chunk_request_from_wire,
    chunk_request_to_wire,
    refusal_to_wire,
    reply_bound,
)
from protocol.transfer.shards import (
    MAX_MANIFEST_BYTES,
    ShardError,
    ShardInfo,
    ShardManifest,
    TiedWeight,
    canonical_config_json,
    manifest_from_wire,
    manifest_to_wire,
    sign_manifest,
    verify_manifest,
)
from protocol.wire import WireError, unpack_bounded
from tests.fuzzing import (
    OBJECT_BYTES_PER_INPUT_BYTE,
    SLACK,
    Mutator,
    byte_cases,
    count,
    fuzz,
    msgpack_bound,
    rng_for,
    text_cases,
    toml_cases,
)

KEYS = [Ed25519PrivateKey.from_private_bytes(random.Random(i).randbytes(32)) for i in range(6)]
PEERS = [peer_id_of(k.public_key()) for k in KEYS]
KEY_OF = dict(zip(PEERS, KEYS))
SHA = "0123456789abcdef" * 4
SWARM = "fuzz"


def roundtrip(encode, decode):
    """accept(): the decoded object re-encodes to bytes that decode to an equal object."""
    def check(case, result):
        assert decode(encode(result)) == result
    return check


# ---- protocol/wire.py ----------------------------------------------------------------------------------------


def test_unpack_bounded():
    """Bound: 80 B per byte it may parse (min(len, max_bytes)); refuses longer input before parsing."""
    m = Mutator(rng_for("unpack_bounded"))
    seeds = [msgpack.packb(m.random_tree(4), use_bin_type=True) for _ in range(30)] + [b"\x80", b"\xc0"]
    limits = (0, 1, 16, 256, 4096, 1 << 20)
    cases = [(data, m.rng.choice(limits) if i >= len(seeds) else 1 << 20)
             for i, data in enumerate(byte_cases(m, seeds, count()))]
    fuzz(lambda c: unpack_bounded(*c), cases, errors=(WireError,),
         bound=lambda c: OBJECT_BYTES_PER_INPUT_BYTE * min(len(c[0]), c[1]) + SLACK)


CAP_GPU = Capability((GpuInfo("NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0)), GpuInfo("A", 1, (8, 6))), 64, 2**40,
                     2**41, 60.5, 700.0, "Linux-6.1-x86_64 / torch 2.13.0+cu128")
CAP_CPU = Capability((), 2, 2**33, 0, 0.01, None, "")


def test_peer_record_from_wire():
    """Bound: msgpack of at most MAX_RECORD_BYTES (16 KiB) -> <= 1.3 MiB + slack."""
    seeds = [peer_record_to_wire(PeerRecord(p, tuple(f"/ip4/10.0.0.{i}/tcp/1/p2p/{p}" for i in range(n)), "0.1.0",
                                            cap, 1.7e9 + n, leaving))
             for p, n, cap, leaving in ((PEERS[0], 1, CAP_GPU, False), (PEERS[1], 0, CAP_CPU, True),
                                        (PEERS[2], 16, CAP_GPU, False))]
    fuzz(peer_record_from_wire, byte_cases(Mutator(rng_for("peer_record")), seeds, count(), value_share=0.02),
         errors=(WireError,),
         bound=msgpack_bound(MAX_RECORD_BYTES), accept=roundtrip(peer_record_to_wire, peer_record_from_wire))


def _sparse(rng: random.Random, size: int, density: float) -> SparseUpdate:
    idx = np.array(sorted(rng.sample(range(size), max(1, int(size * density)))), np.int64)
    return SparseUpdate(idx, np.array([rng.uniform(-3, 3) for _ in idx], np.float32), size)


def round_messages() -> list:
    rng = random.Random(1)
    t = TensorSpec("grads", 1000)
    plan = GroupPlan("r-1", PEERS[0], tuple(PEERS[:3]), ((0, 300), (300, 700), (700, 1000)), t, 1.7e9)
    part = PartFrame("r-1", PEERS[1], t, (300, 700), 32.0, 0.05,
                     SparseCodec("fp16").compress(_sparse(rng, 400, 0.05)))
    dense = PartFrame("r-1", PEERS[2], t, (0, 300), 1, 1.0, DenseCodec("fp32").compress(_sparse(rng, 300, 0.9)))
    bitmap = ResultFrame("r-1", PEERS[0], t, (700, 1000), tuple(PEERS[:2]), 64.0,
                         SparseCodec("fp32", "bitmap").compress(_sparse(rng, 300, 0.3)))
    result = ResultFrame("r-1", PEERS[0], t, (0, 300), tuple(PEERS[:3]), 96.5,
                         SparseCodec("fp16", "delta-varint").compress(_sparse(rng, 300, 0.02)))
    return [Invite("r-1", PEERS[0], t), Invite("", "", TensorSpec("p", 0)), InviteReply("r-1", PEERS[1], True, 1.25e7),
            InviteReply("r-2", PEERS[2], False, 0), plan, part, dense, bitmap, result,
            CommitFrame("r-1", PEERS[1], (True, False, True)), CommitFrame("r-1", PEERS[1], ())]


@pytest.mark.parametrize("expect", [Invite, InviteReply, GroupPlan, PartFrame, ResultFrame, CommitFrame],
                         ids=lambda t: t.__name__)
def test_message_from_wire(expect):
    """Every round message (all seeds, so every other type is a type-confusion case for this one), as the
    averager reads it: control frames bounded by MAX_CONTROL_FRAME, parts and results by their own length,
    then their payload extracted for the span. Bound: 80 B per byte parsed (+ the extracted update, which
    extract_update bounds by its payload)."""
    seeds = [message_to_wire(msg) for msg in round_messages()]
    control = expect not in (PartFrame, ResultFrame)

    def decode(data):
        msg = message_from_wire(data, MAX_CONTROL_FRAME if control else len(data), expect)
        if not control:
            extract_update(msg.payload, msg.span[1] - msg.span[0])
        return msg

    def accept(case, msg):
        assert type(msg) is expect
        assert message_from_wire(message_to_wire(msg), 1 << 20, expect) == msg

    fuzz(decode, byte_cases(Mutator(rng_for(f"message:{expect.__name__}")), seeds, count()),
         errors=(WireError, CodecError), bound=msgpack_bound(1 << 20), accept=accept)


# ---- protocol/allreduce/codecs.py
# --------------------------------------------------------------------------------------


def _updates(rng: random.Random) -> list[tuple[EncodedUpdate, int]]:
    out = []
    for size, density in ((1, 1.0), (7, 0.3), (64, 0.05), (300, 0.2), (1000, 0.01), (129, 0.9), (2**20, 2**-16)):
        u = _sparse(rng, size, density)
        for codec in (SparseCodec("fp16"), SparseCodec("fp32", "delta-varint"), SparseCodec("fp16", "bitmap"),
                      DenseCodec("fp16"), SparseCodec("int8"), SparseCodec("int4", "delta-varint"),
                      SparseCodec("int2", "bitmap"), SparseCodec("fp32", "rice"), SparseCodec("int2", "rice")):
            if codec.nbytes(u) < 1 << 16:
                out.append((codec.compress(u), size))
    return out


SIZES = (0, 1, 7, 8, 9, 64, 300, 1000, 2**20, 2**40, 2**62, 2**62 + 1, -1)


def _mutate_encoded(m: Mutator, enc: EncodedUpdate, size: int) -> tuple[EncodedUpdate, int]:
    rng = m.rng
    fields = {"index_codec": enc.index_codec, "value_codec": enc.value_codec, "nnz": enc.nnz,
              "indices": enc.indices, "values": enc.values}
    for _ in range(rng.choice((1, 1, 2, 3))):
        name = rng.choice((*fields, "size"))
        if name == "size":
            size = rng.choice((*SIZES, size + 1, size - 1, size * 8))
        elif name in ("indices", "values"):
            fields[name] = m.bytes_(getattr(enc, name)) if rng.random() < 0.8 else m.interesting()
        elif name == "nnz":
            fields[name] = rng.choice((enc.nnz + 1, enc.nnz - 1, 0, -1, size, 2**63, True, 1.0, np.int64(enc.nnz),
                                       np.uint64(3), np.uint64(2**62), np.uint64(2**64 - 1), np.int64(-1), "3",
                                       None))
        else:
            fields[name] = rng.choice(("dense", "bitmap", "delta-varint", "rice", "fp16", "fp32", "int8", "int4",
                                       "int2", "auto", "", None, 3, b"fp16"))
    if rng.random() < 0.05:  # NaN / Inf / -0 values in an otherwise valid payload
        vals = bytearray(enc.values)
        if len(vals) >= 4:
            i = rng.randrange(len(vals) - 3)
            vals[i:i + 4] = rng.choice((b"\x00\x7c\x00\x7c", b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f",
                                        b"\x00\x80\x00\x80"))
            fields["values"] = bytes(vals)
    return EncodedUpdate(**fields), size


def _codec_cases(name: str) -> tuple[Mutator, list[tuple[EncodedUpdate, int]], list]:
    m = Mutator(rng_for(name))
    seeds = _updates(random.Random(2))
    cases = list(seeds) + [_mutate_encoded(m, *m.rng.choice(seeds)) for _ in range(count())]
    return m, seeds, cases


def _payload_len(case) -> int:
    enc = case[0]
    return sum(len(b) for b in (enc.indices, enc.values) if isinstance(b, (bytes, bytearray, memoryview)))


def _check_update(case, u: SparseUpdate) -> None:
    assert isinstance(u, SparseUpdate) and u.size == case[1] and u.nnz == case[0].nnz
    assert u.values.flags.writeable and bool(np.all(np.isfinite(u.values)))


def test_extract_update():
    """Bound: 80 B per payload byte (indices as int64, bitmap unpacking, temporaries); the receiver's size
    never allocates on its own (values are length-checked first)."""
    _, _, cases = _codec_cases("extract_update")
    fuzz(lambda c: extract_update(*c), cases, errors=(CodecError,), accept=_check_update,
         bound=lambda c: OBJECT_BYTES_PER_INPUT_BYTE * _payload_len(c) + SLACK)


def test_decode_indices_and_values():
    """decode_indices / decode_values called alone (as extract_update does, in either order). Bound: 80 B per
    payload byte, plus 9 B per element of the receiver's own size for "dense" and "bitmap" (whose output and
    unpacked bits are size-long by definition; sizes here stay <= 2**20 when they would allocate)."""
    _, _, cases = _codec_cases("decode_indices")

    def decode(c):
        enc, size = c
        if _payload_len(c) % 2:  # about half the cases each
            return decode_values(enc.value_codec, enc.values, enc.nnz)
        if enc.index_codec == "dense" and enc.nnz == size and isinstance(size, int) and size > 2**20:
            size = 2**20  # the receiver's own size: a dense decode of 2**40 indices is asked for, not forged
        return decode_indices(enc.index_codec, enc.indices, size, enc.nnz)

    fuzz(decode, cases, errors=(CodecError,),
         bound=lambda c: OBJECT_BYTES_PER_INPUT_BYTE * _payload_len(c) + 9 * min(2**20, max(0, c[1])) + SLACK)


def test_decode_varints():
    """decode_varints within its preconditions (uint8 array, count >= 0, max_len 1..9). Bound: 80 B per byte."""
    m = Mutator(rng_for("varints"))
    seeds = [encode_indices(np.array(sorted(set(v)), np.int64), 2**62, "delta-varint")[1]
             for v in ([0], [1, 2, 3], [127, 128, 2**14, 2**21, 2**40, 2**62 - 1], list(range(0, 5000, 7)))]
    cases = [(data, m.rng.choice((0, 1, 3, 6, 715, len(data), len(data) + 1)), m.rng.randrange(1, 10))
             for data in byte_cases(m, seeds, count(), structured=False)]
    fuzz(lambda c: decode_varints(np.frombuffer(c[0], np.uint8), c[1], c[2]), cases, errors=(CodecError,),
         bound=lambda c: OBJECT_BYTES_PER_INPUT_BYTE * len(c[0]) + SLACK, min_accepted=0)


# ---- protocol/pipeline/activations.py
# ---------------------------------------------------------------------------------

HIDDEN = ExpectedTensor.hidden(2, 4, 8)  # (1..2, 1..4, 8): up to 256 raw bytes
TOKENS = ExpectedTensor.token_ids(2, 4, 50)


def activation_seeds() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 8, generator=g)
    ids = torch.randint(0, 50, (1, 4), generator=g)
    out = [activation_to_wire(ForwardRequest("job-1", 1, 2**64 - 1, 7, h), wd) for wd in (None, "bf16", "fp16")]
    out += [activation_to_wire(ForwardRequest("j", 0, 5, 0, ids)), activation_to_wire(ForwardReply(5, h[:1, :1])),
            activation_to_wire(BackwardRequest(5, h), "bf16"), activation_to_wire(BackwardReply(5, h)),
            activation_to_wire(BackwardReply(5, None)), activation_to_wire(ErrorReply(5, "stage busy\nretry"))]
    return out


@pytest.mark.parametrize("expect, tensor, mb", [
    (ForwardRequest, HIDDEN, None), (ForwardRequest, TOKENS, None), (ForwardReply, HIDDEN, 5),
    (BackwardRequest, HIDDEN, None), (BackwardReply, HIDDEN, 5), (BackwardReply, None, None)],
    ids=["fwd-hidden", "fwd-tokens", "fwd_reply", "bwd", "bwd_reply", "bwd_reply-first-stage"])
def test_activation_from_wire(expect, tensor, mb):
    """Bound: 80 B per byte parsed (the frame bound comes from ``tensor``: <= 2 KiB + 256 raw bytes)."""
    def accept(case, msg):
        assert isinstance(msg, (expect, ErrorReply))
        t = getattr(msg, "tensor", getattr(msg, "grad", None))
        if t is not None:
            assert t.dtype == {"int64": torch.int64}.get(tensor.compute_dtype, torch.float32)
            assert bool(torch.isfinite(t).all()) and t.dim() == len(tensor.shape)
        again = activation_from_wire(activation_to_wire(msg), expect, tensor, micro_batch=mb)
        assert type(again) is type(msg)

    name = f"activation:{expect.__name__}:{tensor is TOKENS}:{tensor is None}"
    fuzz(lambda d: activation_from_wire(d, expect, tensor, micro_batch=mb),
         byte_cases(Mutator(rng_for(name)), activation_seeds(), count()), errors=(WireError,),
         bound=msgpack_bound(max_frame_bytes(tensor)), accept=accept)


def test_decode_tensor():
    """decode_tensor on decoded maps (as a frame's "tensor" entry). Bound: the raw bytes' one copy, 2x for slack."""
    g = torch.Generator().manual_seed(1)
    seeds = [encode_tensor(t, wd) for t, wd in ((torch.randn(1, 4, 8, generator=g), None),
                                                 (torch.randn(2, 1, 8, generator=g), "bf16"),
                                                 (torch.randn(2, 2, 8, generator=g), "fp16"))]
    for s in seeds:
        s["raw"] = bytes(s["raw"])
    m = Mutator(rng_for("decode_tensor"))
    cases = seeds + [m.mutate_tree(copy.deepcopy(m.rng.choice(seeds))) for _ in range(count())]

    def raw_len(obj):
        raw = obj.get("raw") if isinstance(obj, dict) else None
        return len(raw) if isinstance(raw, (bytes, bytearray)) else 0

    fuzz(lambda obj: decode_tensor(obj, HIDDEN), cases, errors=(WireError,),
         bound=lambda obj: 2 * raw_len(obj) + SLACK)


# ---- protocol/records/job_spec.py, job_records.py, job_validation.py
# ---------------------------------------------------------------------

SPECS = [
    JobSpec(name="digits-demo", model=ModelSpec("mlp", {"hidden": 128}), dataset="digits", task="classification",
            rounds=30, inner=InnerOpt("sgd", 0.1, momentum=0.9), local_steps=20, density=0.01),
    JobSpec(name="gpt", model=ModelSpec("gpt2", {"n_layer": 2, "n_embd": 64, "dropout": 0.1, "tie": True, "act": "x"}),
            dataset="stdlib-text", task="causal-lm", rounds=5, inner=InnerOpt("adamw", 3e-4, weight_decay=0.01),
            outer=OuterOpt("diloco", 0.7, 0.9, True), min_participants=1, max_participants=256, seed=2**32 - 1),
]
PIPELINE_TOML = ('kind = "pipeline"\nname = "byte-gpt2-pipeline"\ndataset = "pystdlib-bytes"\ndensity = 0.5\n'
                 'round_timeout_s = 30\n[pipeline]\nstages = 2\nstrategy = "balanced"\nreplicas = 2\nmicro_batch = 4\n'
                 'micro_batches = 4\nsteps = 50\n[model]\narch = "gpt2"\nn_layer = 4\nn_embd = 128\nn_head = 4\n'
                 'n_positions = 128\ntie_word_embeddings = false\n[inner]\nkind = "adamw"\nlr = 0.001\n')  # examples/
SPECS.append(job_spec_from_toml(tomllib.loads(PIPELINE_TOML)))
RECORDS = [JobRecord.create(SPECS[0], PEERS[0], "n1", 1.7e9),
           JobRecord.create(SPECS[1], PEERS[1], "x" * 64, 0.0).replace(state="done", round=5, model_hash=SHA,
                                                                       participants=tuple(PEERS)),
           JobRecord.create(SPECS[2], PEERS[0], "p", 1.7e9, PipelineAssignment(
               ((0, 2), (2, 4)), ((PEERS[1], PEERS[2]), (PEERS[3], PEERS[4])), SHA, 2**20))]
PROGRESS = [JobProgress(job_id=RECORDS[0].job_id, writer=PEERS[1], round=3, model_hash=SHA, state="running",
                        participants=tuple(PEERS[:2]), train_loss=0.5, eval_metric=0.9, bytes_exchanged=12345,
                        round_time_s=1.5, updated_at=1.7e9, next_round=4),
            JobProgress(job_id=RECORDS[1].job_id, writer=PEERS[2], round=0, model_hash="", state="paused"),
            JobProgress(job_id=RECORDS[0].job_id, writer=PEERS[0], round=0, model_hash="", state="declined",
                        reason="no local data for dataset 'digits'")]
HEADERS = [StateHeader(job_id=RECORDS[0].job_id, completed=3, next_round=4, model_hash=SHA, size=2**34,
                       has_momentum=True, history_size=2**25),
           StateHeader(job_id="f" * 16, completed=0, next_round=0, model_hash=SHA, size=1, has_momentum=False)]


@pytest.mark.parametrize("decode, encode, seeds, limit", [
    (job_spec_from_wire, job_spec_to_wire, SPECS, MAX_JOB_SPEC_BYTES),
    (job_record_from_wire, job_record_to_wire, RECORDS, MAX_JOB_RECORD_BYTES),
    (job_progress_from_wire, job_progress_to_wire, PROGRESS, MAX_JOB_PROGRESS_BYTES),
    (state_header_from_wire, state_header_to_wire, HEADERS, MAX_STATE_HEADER_BYTES),
], ids=["job_spec", "job_record", "job_progress", "state_header"])
def test_job_wire(decode, encode, seeds, limit):
    """Bound: 80 B per byte parsed, the decoder's own limit caps it (8, 32, 32 and 4 KiB)."""
    cases = byte_cases(Mutator(rng_for(f"jobs:{decode.__name__}")), [encode(s) for s in seeds], count(),
                       value_share=0.02)  # records and progress are DHT item values (any msgpack value)
    fuzz(decode, cases, errors=(WireError,), bound=msgpack_bound(limit), accept=roundtrip(encode, decode))


def test_parse_progress_subkey_and_peer_ids():
    """DHT subkeys and peer ids as they arrive (any decoded msgpack value). Bound: a fixed 256 KiB."""
    m = Mutator(rng_for("subkeys"))
    seeds = [progress_subkey(r.job_id, p) for r, p in zip(RECORDS, PEERS)] + PEERS
    cases = [c if m.rng.random() < 0.9 else m.interesting() for c in text_cases(m, seeds, count())]

    def decode(c):
        return parse_progress_subkey(c) if isinstance(c, str) and "/" in c else public_key_from_peer_id(c)

    fuzz(decode, cases, errors=(ValueError, PeerIdError), bound=lambda c: SLACK)


def signed_record(record: DHTRecord, key) -> DHTRecord:
    """Sign whatever ``record`` holds with ``key`` (what a malicious node can do by hand)."""
    payload = msgpack.packb([record.key, record.subkey, record.value, record.expiration_time], use_bin_type=True)
    return replace(record, value=record.value + key.sign(payload))


def _validator_cases(name: str, seeds: list[tuple[DHTRecord, bytes, object]]) -> list[DHTRecord]:
    keys = [key_id(jobs_key(SWARM)), key_id(swarm_key(SWARM, "peers")), key_id(progress_key(SWARM, "0" * 16)),
            key_id(progress_key(SWARM, "f" * 16)), key_id(jobs_key("other-swarm")), bytes(20)]
    """Signed records; mutations of the payload re-signed by its owner (so the payload decoder is reached),
    of the signed value itself, of the key (re-signed), the subkey and the expiration time."""
    m = Mutator(rng_for(name))
    rng, out = m.rng, []
    for record, _, key in seeds:
        out.append(signed_record(record, key))
    for _ in range(count()):
        record, payload, key = rng.choice(seeds)
        r = rng.random()
        if r < 0.5:
            new = m.msgpack(payload) if rng.random() < 0.6 else m.bytes_(payload)
            wrapped = MSGPackSerializer.dumps(new) if rng.random() < 0.9 else m.bytes_(MSGPackSerializer.dumps(new))
            out.append(signed_record(replace(record, value=wrapped), rng.choice((key, key, key, KEYS[3]))))
        elif r < 0.7:
            signed = signed_record(record, key)
            out.append(replace(signed, value=m.bytes_(signed.value)))
        elif r < 0.78:  # another dictionary (a progress entry in the wrong bucket, another swarm's key, ...)
            out.append(signed_record(replace(record, key=rng.choice(keys)), key))
        elif r < 0.88:
            subkey = rng.choice((None, b"", b"\xc1", m.bytes_(record.subkey), m.msgpack(record.subkey),
                                 MSGPackSerializer.dumps(rng.choice(PEERS)), MSGPackSerializer.dumps(m.interesting())))
            out.append(signed_record(replace(record, subkey=subkey), key))
        else:
            signed = signed_record(record, key)
            out.append(replace(signed, expiration_time=rng.choice((math.nan, math.inf, -1.0, 0.0, 2.0**70,
                                                                    signed.expiration_time + 1e-6))))
    return out


def validator_bound(limit: int):
    # two unpack_bounded passes (the DHT's wrapping, then our payload) over at most ``limit`` bytes
    return lambda r: 2 * OBJECT_BYTES_PER_INPUT_BYTE * min(len(r.value), limit) + SLACK


def test_signed_peer_record_validator(caplog):
    """validate() never raises: True or False for anything. Bound: 2 x 80 B per byte of the 16-KiB record."""
    caplog.set_level(logging.ERROR, logger="protocol.records.validation")
    peers_key = key_id(swarm_key(SWARM, "peers"))
    seeds = []
    for p, cap in ((PEERS[0], CAP_GPU), (PEERS[1], CAP_CPU)):
        payload = peer_record_to_wire(PeerRecord(p, (f"/ip4/1.2.3.4/tcp/5/p2p/{p}",), "0.1", cap, 1.7e9))
        seeds.append((DHTRecord(peers_key, MSGPackSerializer.dumps(p), MSGPackSerializer.dumps(payload), 1.7e9 + 30),
                      payload, KEY_OF[p]))
    validator = SignedPeerRecordValidator(SWARM, KEYS[3])
    cases = _validator_cases("peer_validator", seeds)
    outcome = fuzz(validator.validate, cases, errors=(), bound=validator_bound(MAX_RECORD_BYTES + 80),
                   accept=lambda c, ok: isinstance(ok, bool) or pytest.fail(f"validate returned {ok!r}"))
    assert all(validator.validate(c) for c in cases[:len(seeds)]) and outcome.accepted == len(cases)


def test_signed_job_record_validator(caplog):
    """validate() never raises, for job records and progress entries. Bound: 2 x 80 B per byte of <= 32 KiB."""
    caplog.set_level(logging.ERROR, logger="protocol.records.validation")
    seeds = []
    for rec in RECORDS:
        payload = job_record_to_wire(rec)
        seeds.append((DHTRecord(key_id(jobs_key(SWARM)), MSGPackSerializer.dumps(rec.job_id),
                                MSGPackSerializer.dumps(payload), 1.7e9), payload, KEY_OF[rec.submitter]))
    for prog in PROGRESS:
        payload = job_progress_to_wire(prog)
        seeds.append((DHTRecord(key_id(progress_key(SWARM, prog.job_id)),
                                MSGPackSerializer.dumps(progress_subkey(prog.job_id, prog.writer)),
                                MSGPackSerializer.dumps(payload), 1.7e9), payload, KEY_OF[prog.writer]))
    validator = SignedJobRecordValidator(SWARM, KEYS[3])
    cases = _validator_cases("job_validator", seeds)
    fuzz(validator.validate, cases, errors=(), bound=validator_bound(MAX_JOB_RECORD_BYTES + 96),
         accept=lambda c, ok: isinstance(ok, bool) or pytest.fail(f"validate returned {ok!r}"))
    assert all(validator.validate(c) for c in cases[:len(seeds)])


def test_signed_matchmaking_validator_and_reader(caplog):
    """validate() never raises for declarations and started markers, and the matchmaking reader takes any of them
    (as the DHT hands them over: stripped) without raising. Bound: 2 x 80 B per byte of <= 64 KiB."""
    caplog.set_level(logging.ERROR, logger="protocol.records.validation")
    key = key_id(round_key(SWARM, "grads", "r1"))
    seeds = []
    for i, p in enumerate(PEERS[:3]):
        for subkey, payload in ((declared_subkey(p), declaration_to_wire(1e6 * i)),
                                (started_subkey(p), started_to_wire(PEERS[:i + 1]))):
            seeds.append((DHTRecord(key, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(payload), 1.7e9 + 30),
                          payload, KEY_OF[p]))
    validator = SignedMatchmakingValidator(KEYS[3], now=lambda: 1.7e9)
    cases = _validator_cases("matchmaking_validator", seeds)
    fuzz(validator.validate, cases, errors=(), bound=validator_bound(64 * 1024 + 96),
         accept=lambda c, ok: isinstance(ok, bool) or pytest.fail(f"validate returned {ok!r}"))
    assert all(validator.validate(c) for c in cases[:len(seeds)])

    class Item:  # what hivemind's DHT hands over per subkey: ValueWithExpiration
        def __init__(self, value: object, expiration_time: object):
            self.value, self.expiration_time = value, expiration_time

    def read(record: DHTRecord):
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value[:-64])
        except Exception:
            subkey, value = record.subkey, record.value
        return seen_from_entries({subkey if isinstance(subkey, (str, bytes, int)) else repr(subkey):
                                  Item(value, record.expiration_time)}, 1.7e9)

    fuzz(read, cases, errors=(), bound=validator_bound(64 * 1024 + 96))


# ---- protocol/transfer/shards.py, shard_transfer.py, matchmaking.py
# ---------------------------------------------------

MANIFEST = sign_manifest(ShardManifest(
    SHA, "GPT2LMHeadModel", canonical_config_json({"n_layer": 4, "n_embd": 64, "vocab_size": 256, "id2label": {
        "0": "a"}, "nested": [[1, 2], {"x": None}]}), 4, "float32",
    (ShardInfo(0, 1, "stage-0000.safetensors", SHA, 1000), ShardInfo(1, 4, "stage-0001.safetensors", "f" * 64, 2**33)),
    (TiedWeight("lm_head.weight", "transformer.wte.weight"),), PEERS[0]), KEYS[0])
MANIFEST_2 = sign_manifest(replace(MANIFEST, shards=(ShardInfo(0, 4, "s", SHA, 1),), tied=(), splitter=PEERS[1],
                                   signature=b""), KEYS[1])
JSON_DEPTHS = (1, 10, 200, 3000)  # nested JSON arrays/objects: 3000 is beyond json.loads' recursion limit


def test_manifest_from_wire():
    """manifest_from_wire, then verify_manifest (signature), as read_manifest does. Bound: 80 B per byte of the
    2-MiB manifest, plus the config_json string parsed a second time (x 2)."""
    m = Mutator(rng_for("manifest"))
    seeds = [manifest_to_wire(MANIFEST), manifest_to_wire(MANIFEST_2)]

    def cases():
        yield from byte_cases(m, seeds, count(0.8))
        for _ in range(count(0.2)):  # the config_json string: JSON-aware mutations, re-signed or not
            config = m.mutate_tree(json.loads(MANIFEST.config_json))
            depth = m.rng.choice(JSON_DEPTHS)
            dumped = json.dumps(config, default=repr, skipkeys=True)
            text = m.rng.choice((dumped, "[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth,
                                 dumped[:-1], "NaN", '{"x": 1e999}'))
            try:
                man = replace(MANIFEST, config_json=text, signature=b"")
            except ShardError:
                obj = msgpack.unpackb(seeds[0])
                obj["config_json"] = text
                yield msgpack.packb(obj)
                continue
            yield manifest_to_wire(sign_manifest(man, KEYS[0]))

    def decode(data):
        return verify_manifest(manifest_from_wire(data))

    fuzz(decode, cases(), errors=(ShardError,), accept=roundtrip(manifest_to_wire, manifest_from_wire),
         bound=lambda d: 2 * OBJECT_BYTES_PER_INPUT_BYTE * min(len(d), MAX_MANIFEST_BYTES) + SLACK)


REQUESTS = [ChunkRequest(SHA, 0, 1 << 20), ChunkRequest("f" * 64, 2**40 - 5, 5), ChunkRequest(SHA, 17, 1)]


def test_chunk_request_from_wire():
    """Bound: 80 B per byte of the 1-KiB control frame."""
    fuzz(chunk_request_from_wire,
         byte_cases(Mutator(rng_for("chunk_request")), [chunk_request_to_wire(r) for r in REQUESTS], count()),
         errors=(WireError,), bound=msgpack_bound(MAX_CONTROL_BYTES),
         accept=roundtrip(chunk_request_to_wire, chunk_request_from_wire))


def test_chunk_reply_from_wire():
    """The reply to one of our requests (chunk or refusal). Bound: 80 B per byte parsed, reply_bound(length)."""
    m = Mutator(rng_for("chunk_reply"))
    small = [r for r in REQUESTS if r.length < 64]
    seeds = [chunk_reply_to_wire(ChunkReply(r.sha256, r.offset, bytes(range(r.length)))) for r in small] + [
        refusal_to_wire(TransferRefusal(code, reason)) for code, reason in
        (("busy", "too many streams"), ("out_of_range", "bytes [0, 9) of a 1-byte shard\nx"), ("io_error", ""))]
    cases = [(data, m.rng.choice(small)) for data in byte_cases(m, seeds, count())]

    def accept(case, reply):
        assert isinstance(reply, (ChunkReply, TransferRefusal))
        if isinstance(reply, ChunkReply):
            assert (reply.sha256, reply.offset, len(reply.data)) == (case[1].sha256, case[1].offset, case[1].length)

    fuzz(lambda c: chunk_reply_from_wire(*c), cases, errors=(WireError,), accept=accept,
         bound=lambda c: OBJECT_BYTES_PER_INPUT_BYTE * min(len(c[0]), reply_bound(c[1].length)) + SLACK)


def test_matchmaking_records():
    """A round's DHT entries: declarations (<= 256 B) and the leader's started marker (<= 64 KiB)."""
    m = Mutator(rng_for("matchmaking"))
    seeds = [declaration_to_wire(1.25e7), declaration_to_wire(0), started_to_wire(PEERS), started_to_wire([])]
    cases = [(i % 2, c) for i, c in enumerate(byte_cases(m, seeds, count(), value_share=0.05))]
    fuzz(lambda c: (started_from_wire if c[0] else declaration_from_wire)(c[1]), cases, errors=(WireError,),
         bound=msgpack_bound(64 * 1024))


# ---- node/jobs/pipeline/trainer.py (stage hosts, trainers, backups)
# ---------------------------------------------------------

CONTROL_SEEDS = [Status(3), StatusReply(3, 17, SHA), StatusReply(0, 0, ""), Commit(3, (1, 2**64 - 1)),
                 CommitReply(3, (1,), (2**64 - 1,)), EndStep(3, (1, 2, 3), tuple(PEERS), PEERS[0]),
                 EndStep(0, (), (PEERS[1],), None), EndStepReply(3, True, 6.0, 3, 0, 2, SHA, True, ""),
                 EndStepReply(3, False, 0, 0, 1, 1, "", None, "average failed: timeout"), Resync(4, PEERS[2]),
                 ControlError("no state of stage 2 here"), StateRequest(2, 0), StateHead(2, 9, 2**40, SHA, SHA),
                 BackupAck(True, ""), BackupAck(False, "state of 9 bytes; at most 8 expected")]
CONTROL_SEEDS += [DirectOpen(), DirectOffer("127.0.0.1", 40123, bytes(range(16)), bytes(range(32))),
                  DirectOffer("2001:db8::1", 65535, b"\xff" * 16, b"k" * 32), Discard(7), Advance(2**40)]


@pytest.mark.parametrize("expect", [(Status, Commit, EndStep, Resync), StateRequest, StateHead,
                                    (StateHead, ControlError), BackupAck, (StatusReply, ControlError),
                                    (CommitReply, ControlError), (EndStepReply, ControlError),
                                    (Status, Commit, EndStep, Resync, Advance, Discard, DirectOpen),
                                    (DirectOffer, ControlError)],
                         ids=lambda e: "+".join(t.__name__ for t in (e if isinstance(e, tuple) else (e,))))
def test_control_from_wire(expect):
    """Every control message as each reader expects it (all types as seeds). Bound: 80 B per byte of 1 MiB."""
    types = expect if isinstance(expect, tuple) else (expect,)

    def accept(case, msg):
        assert isinstance(msg, types) and control_from_wire(control_to_wire(msg), expect) == msg

    name = "control:" + "+".join(t.__name__ for t in types)
    fuzz(lambda d: control_from_wire(d, expect),
         byte_cases(Mutator(rng_for(name)), [control_to_wire(s) for s in CONTROL_SEEDS], count(0.5)),
         errors=(WireError,), bound=msgpack_bound(1 << 20), accept=accept)


DIRECT_KEY, DIRECT_SESSION = bytes(range(32)), bytes(range(100, 116))


def test_direct_frame():
    """A sealed direct-path frame (protocol/pipeline/direct.py) as a host's fresh channel opens it: header checks,
    session, sequence number, declared length against a 4 KiB bound, AES-GCM tag. Bound: the frame's copies, 4x +
    slack."""
    def sealed(kind: int, payload: bytes) -> bytes:
        return b"".join(DirectChannel(DIRECT_KEY, DIRECT_SESSION, "trainer").seal(kind, payload))

    rng = rng_for("direct_frame")
    seeds = [sealed(FORWARD, b""), sealed(FORWARD, b"x" * 100), sealed(2, rng.randbytes(4096)),
             sealed(FORWARD, activation_seeds()[0])]

    def accept(case, result):
        kind, payload = result
        assert kind in DIRECT_KINDS and len(payload) <= 4096 and payload in [b"", b"x" * 100] + [
            DirectChannel(DIRECT_KEY, DIRECT_SESSION, "host").open_frame(s, DIRECT_KINDS, 4096)[1] for s in seeds[2:]]

    fuzz(lambda d: DirectChannel(DIRECT_KEY, DIRECT_SESSION, "host").open_frame(d, DIRECT_KINDS, 4096),
         byte_cases(Mutator(rng), seeds, count(), structured=False, value_share=0.02), errors=(WireError,),
         bound=lambda d: 4 * len(d) + SLACK if isinstance(d, (bytes, bytearray)) else SLACK, accept=accept)


def test_member_record_from_wire():
    """A stage's DHT member records. Bound: 80 B per byte of the 256-byte record."""
    seeds = [member_record_to_wire(MemberRecord(role, tp, step, beat))
             for role, tp, step, beat in (("replica", 2.5, 3, 1.7e9), ("backup", 0, 0, 0.0), ("gone", 1, 2**63 - 1, 1))]
    fuzz(member_record_from_wire, byte_cases(Mutator(rng_for("member_record")), seeds, count(), value_share=0.02),
         errors=(WireError,),
         bound=msgpack_bound(256), accept=roundtrip(member_record_to_wire, member_record_from_wire))


# ---- node/jobs/federated/export.py: a participant's round history (JSON, read after a state download)
# ---------------------

HISTORY = [{"round": r, "ok": r % 3 != 1, "error": None if r % 3 != 1 else "timeout", "participants": PEERS[:2],
            "train_loss": 0.5 / (r + 1), "samples": 320, "metrics": {"accuracy": 0.9} if r % 2 else {},
            "bytes_sent": 1000, "bytes_received": 2000, "seconds": 1.5, "local_seconds": 1.0, "model_hash": SHA,
            "paused": False, "reported_by": PEERS[0]} for r in range(4)]


def test_history_from_json():
    """Bound: JSON materialised like msgpack, 80 B per byte (nesting of JSON_DEPTHS spliced in as well)."""
    m = Mutator(rng_for("history"))
    seeds = [history_to_json(HISTORY), history_to_json(HISTORY[:1]), history_to_json([])]

    def cases():
        yield from seeds
        for _ in range(count()):
            seed = m.rng.choice(seeds)
            r = m.rng.random()
            if r < 0.45:
                yield json.dumps(m.mutate_tree(json.loads(seed)), default=repr, skipkeys=True).encode()
            elif r < 0.55:
                depth = m.rng.choice(JSON_DEPTHS)
                yield seed[:-1] + b"," + b"[" * depth + b"]" * depth + b"]" if len(seed) > 2 else b"[" * depth
            else:
                yield m.bytes_(seed, seeds)

    fuzz(history_from_json, cases(), errors=(ValueError,), bound=msgpack_bound(2**25),
         accept=lambda c, h: all(isinstance(e, dict) and isinstance(e["round"], int) for e in h) or pytest.fail())


# ---- node/jobs/spec.py, node/runtime/config.py: job files, the daemon's Submit, node config
# ------------------------------

JOB_TOML = ['name = "digits-demo"\ndataset = "digits"\ntask = "classification"\nrounds = 30\nlocal_steps = 20\n'
            'density = 0.01\n\n[model]\narch = "mlp"\nhidden = 128\n\n[inner]\nkind = "sgd"\nlr = 0.1\n'
            'momentum = 0.9\n',
            'name = "gpt"\ndataset = "stdlib-text"\ntask = "causal-lm"\nrounds = 5\nmin_participants = 1\n'
            'max_participants = 256\nround_timeout_s = 86400\nseed = 4294967295\neval_every = 2\n[model]\n'
            'arch = "gpt2"\nn_layer = 2\nn_embd = 64\n[inner]\nkind = "adamw"\nlr = 3e-4\nweight_decay = 0.01\n'
            '[outer]\nkind = "diloco"\n',
            'name = "c"\ndataset = "digits"\ntask = "classification"\nrounds = 1\n[model]\narch = "cnn"\nblocks = 2\n'
            '[inner]\nlr = 1\n[outer]\nkind = "diloco"\nlr = 0.5\nmomentum = 0.5\nnesterov = false\n',
            PIPELINE_TOML]


def submit_parse(text: str):
    """What the daemon's Submit does with a job file's text before storing the record (node/jobs/manager.py):
    parse it (node/jobs/spec.py job_spec_from_text) and check the model's overrides."""
    return job_spec_from_text(text, "job file", lambda model: resolve_overrides(model.arch, model.config()))


def test_job_spec_from_toml():
    """The daemon's Submit parse (job_spec_from_text + the model check): a JobSpec or NodeError.
    Bound: TOML materialised like msgpack, 80 B per character."""
    m = Mutator(rng_for("job_toml"))
    cases = list(toml_cases(m, JOB_TOML, count()))
    fuzz(submit_parse, cases, errors=(NodeError,), bound=lambda t: OBJECT_BYTES_PER_INPUT_BYTE * len(t) + SLACK,
         accept=lambda c, spec: job_spec_from_wire(job_spec_to_wire(spec)) == spec or pytest.fail())


def test_load_job_file(tmp_path):
    """Job files as bytes (any encoding) through load_job_file: a JobSpec or NodeError. Bound: 80 B per byte."""
    m = Mutator(rng_for("job_file"))
    path = tmp_path / "job.toml"
    seeds = [t.encode() for t in JOB_TOML]
    cases = list(byte_cases(m, seeds, count(0.3), structured=False))

    def decode(data):
        path.write_bytes(data)
        return load_job_file(path)

    fuzz(decode, cases, errors=(NodeError,), bound=lambda b: OBJECT_BYTES_PER_INPUT_BYTE * len(b) + SLACK)


CONFIG_TOML = ['swarm = "demo"\nlisten = ["/ip4/0.0.0.0/tcp/31337"]\njoin = ["/ip4/203.0.113.7/tcp/31337/p2p/'
               f'{PEERS[0]}"]\nheartbeat = 4\nttl = 12.5\njoin_attempts = 3\njoin_backoff = 0.5\n'
               'benchmark_seconds = 0\nlog_level = "debug"\ncontrol = "tcp://127.0.0.1:0"\nhome = "~/n"\n'
               'identity = "/tmp/k"\ndata = "d"\nannounce = []\n', 'swarm = "x"\n', '']


def test_config_file(tmp_path):
    """node/runtime/config.py resolve() with a --config file (any bytes): a NodeConfig with finite durations, or
    NodeError. Bound: TOML materialised, 80 B per byte."""
    m = Mutator(rng_for("config"))
    path = tmp_path / "node.toml"
    cases = [t.encode() for t in toml_cases(m, CONFIG_TOML[:2], count(0.5))]
    cases += list(byte_cases(m, [t.encode() for t in CONFIG_TOML], count(0.2), structured=False))

    def decode(data):
        path.write_bytes(data)
        return resolve({}, env={}, config_file=path)

    fuzz(decode, cases, errors=(NodeError,), accept=_finite_durations,
         bound=lambda b: OBJECT_BYTES_PER_INPUT_BYTE * len(b) + SLACK)


def _finite_durations(case, config) -> None:
    assert all(math.isfinite(getattr(config, f)) for f in ("heartbeat", "ttl", "join_backoff", "benchmark_seconds"))


def test_config_env():
    """SWARMNODE_* environment values (strings) through resolve(): a NodeConfig or NodeError."""
    m = Mutator(rng_for("config_env"))
    values = ["demo", "/ip4/1.2.3.4/tcp/1,/ip4/5.6.7.8/tcp/2", "4", "12.5", "0", "DEBUG", "unix", "tcp://[::1]:7",
              "~/x", "nan", "1e999", "-1", "1" * 5000, "1e5000", "0x10", "1_000", " 3 ", "inf"]
    cases = [(m.rng.choice(list(FIELDS)), v) for v in text_cases(m, values, count(0.5))]

    def decode(c):
        name, value = c
        return resolve({}, env={f"SWARMNODE_{name.upper()}": value.replace("\x00", "")})

    fuzz(decode, cases, errors=(NodeError,), bound=lambda c: SLACK, accept=_finite_durations)


# ---- user input on the command line: --join, --stop-at, and the control CLI ------------------------------------


def test_parse_join_addr():
    """--join addresses: a Multiaddr or NodeError. Bound: a fixed 256 KiB."""
    seeds = [f"/ip4/203.0.113.7/tcp/31337/p2p/{PEERS[0]}", f"/ip6/::1/udp/1/quic-v1/p2p/{PEERS[1]}",
             f"/dns4/example.org/tcp/1/p2p/{PEERS[2]}", "/ip4/1.2.3.4/tcp/1"]
    fuzz(parse_join_addr, text_cases(Mutator(rng_for("join_addr")), seeds, count(0.5)), errors=(NodeError,),
         bound=lambda c: SLACK + (2 << 20))  # + the multiaddr codec modules it imports on first use


def test_parse_stop_at():
    """node/devtools/stage_peer.py --stop-at, an argparse type (argparse turns ValueError and ArgumentTypeError into a
    usage error)."""
    fuzz(parse_stop_at, text_cases(Mutator(rng_for("stop_at")), ["forward:1", "backward:1:2", "end_step:0:1"],
                                   count(0.3)), errors=(argparse.ArgumentTypeError, ValueError), bound=lambda c: SLACK)


def _fill(msg, rng: random.Random, depth: int = 0):
    """``msg`` with every field set (repeated ones twice), for seeds of every control API message."""
    for f in msg.DESCRIPTOR.fields:
        if f.message_type is not None:
            subs = [getattr(msg, f.name).add() for _ in range(2)] if f.is_repeated else [getattr(msg, f.name)]
            for sub in subs:
                if depth < 3:
                    _fill(sub, rng, depth + 1)
            continue
        value = {f.TYPE_STRING: "12D3KooW-é😀", f.TYPE_BOOL: True, f.TYPE_UINT32: 2**32 - 1, f.TYPE_UINT64: 2**64 - 1,
                 f.TYPE_DOUBLE: rng.choice((1.5, math.nan, -math.inf))}.get(f.type, 7)
        if f.is_repeated:
            getattr(msg, f.name).extend([value, value])
        else:
            setattr(msg, f.name, value)
    return msg


MESSAGES = sorted(pb.DESCRIPTOR.message_types_by_name)


@pytest.mark.parametrize("name", MESSAGES)
def test_protobuf_messages(name):
    """Every control API message's FromString (requests as the daemon parses them, responses as the CLI does,
    then the CLI's formatting of what it parsed): a message or DecodeError. Bound: the Python side only (upb
    allocates outside tracemalloc), a fixed 256 KiB."""
    cls = getattr(pb, name)
    rng = rng_for(f"pb:{name}")
    seeds = [cls().SerializeToString(), _fill(cls(), rng).SerializeToString()]
    show = {"PeersResponse": lambda r: (format_peers_table(r), json.dumps(peers_json(r))),
            "JobsResponse": lambda r: (format_jobs_table(r), [json.dumps(job_json(j)) for j in r.jobs]),
            "JobInfo": lambda r: (format_job_line(r), json.dumps(job_json(r))),
            "StatusResponse": lambda r: json.dumps(capability_json(r.capability)),
            "Capability": lambda r: json.dumps(capability_json(r))}.get(name, lambda r: None)

    def decode(data):
        msg = cls.FromString(data)
        msg.SerializeToString()
        show(msg)
        return msg

    fuzz(decode, byte_cases(Mutator(rng), seeds, count(0.3), structured=False, random_share=0.2),
         errors=(DecodeError,), bound=lambda c: SLACK + 4 * len(c))


CLI_ARGV = [["status"], ["peers", "--json"], ["leave"], ["jobs"], ["job", "0123456789abcdef"],
            ["job", "0123456789abcdef", "--follow", "--json"], ["job", "x", "--export", "out"], ["cancel", "abc"],
            ["submit", "JOB"], ["submit", "JOB", "--follow"], ["status", "--config", "CFG"]]
CLI_TOKENS = ["--json", "--follow", "--export", "--config", "--", "-", "", "--unknown", "-h", "=", "é", "😀", "\x00",
              "x" * 300, "status", "job", "--home", "--ho", "--cont", "-1", "0123456789abcdef", "\udcff", "DIR"]


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """A node home with a control token, and --home/--control flags naming a loopback port that is bound but
    never listening (connection refused: no daemon, no stub). HOME points into tmp_path, SWARMNODE_* unset."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "control.token").write_text("token")
    (tmp_path / "job.toml").write_text(JOB_TOML[0])
    (tmp_path / "cfg.toml").write_text('swarm = "demo"\n')
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in [v for v in os.environ if v.startswith("SWARMNODE_")]:
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        yield ["--home", str(home), "--control", f"tcp://127.0.0.1:{closed.getsockname()[1]}"]


def run_cli(argv: list[str]) -> int:
    """node/cli/main.py main(argv): an exit code (0, 1, 2), or argparse's SystemExit (0 for -h, 2), never a
    traceback."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            assert e.code in (0, 2), out.getvalue()[-500:]
            return e.code
    assert code in (0, 1, 2) and "Traceback" not in out.getvalue(), out.getvalue()[-500:]
    return code


def test_cli_client_commands(tmp_path, cli_env):
    """node/cli/main.py main(argv) for the client commands (status, peers, leave, jobs, job, cancel, submit) against
    ``cli_env``'s dead endpoint: argv parsing, config resolution, job file reading and request building run for
    real, then the call fails with "not answering" (exit 1). Bound: a fixed 4 MiB (gRPC's C core allocates
    outside tracemalloc)."""
    rng = rng_for("cli")
    m = Mutator(rng)

    def fill(arg: str) -> str:
        return (arg.replace("JOB", str(tmp_path / "job.toml")).replace("CFG", str(tmp_path / "cfg.toml"))
                .replace("DIR", str(tmp_path)))

    def cases():
        for _ in range(count(0.1)):
            argv = [fill(a) for a in rng.choice(CLI_ARGV)]
            for _ in range(rng.choice((0, 1, 1, 2, 3))):
                i, op = rng.randrange(len(argv) + 1), rng.randrange(4)
                if op == 0 and argv:
                    del argv[min(i, len(argv) - 1)]
                elif op == 1:
                    argv.insert(i, fill(rng.choice(CLI_TOKENS)))
                elif op == 2 and argv:
                    j = min(i, len(argv) - 1)
                    argv[j] = os.fsdecode(m.bytes_(os.fsencode(argv[j])))  # non-UTF-8 bytes: lone surrogates
                else:
                    argv = argv + argv[:1]
            yield [a.replace("\x00", "") for a in argv] + cli_env  # our --home/--control win (they come last)

    fuzz(run_cli, cases(), errors=(), bound=lambda c: 4 << 20)


# ---- safetensors bytes from a peer (node/jobs/pipeline/stage_host.py load_state, node/ml/splitter.py stage_from_bytes)
# ----------


def _safetensors_cases(m: Mutator, seeds: list[bytes], n: int):
    """Byte mutations, and mutations of the JSON header (dtype, shape, data_offsets, names) re-framed with a
    correct length prefix so that the parser reads them."""
    yield from byte_cases(m, seeds, n // 2, structured=False)
    for _ in range(n - n // 2):
        data = m.rng.choice(seeds)
        size = int.from_bytes(data[:8], "little")
        header = m.mutate_tree(json.loads(data[8:8 + size]))
        blob = json.dumps(header, default=repr, skipkeys=True).encode()
        yield len(blob).to_bytes(8, "little") + blob + data[8 + size:]


def test_safetensors_load():
    """safetensors.torch.load on a peer's bytes (node/ml/splitter.py stage_from_bytes, after the manifest's sha256):
    a dict of tensors or one of the errors the call site catches (SafetensorError, ValueError, RuntimeError).
    Bound: 80 B per byte on the Python side (tensor storage is torch's, outside tracemalloc)."""
    g = torch.Generator().manual_seed(3)
    seeds = [safetensors.torch.save({"h.0.w": torch.randn(4, 3, generator=g), "h.0.b": torch.zeros(3)},
                                    metadata={"format": "pt"}),
             safetensors.torch.save({"a": torch.arange(10), "b": torch.ones(2, 2, dtype=torch.bfloat16)})]
    fuzz(safetensors.torch.load, _safetensors_cases(Mutator(rng_for("safetensors")), seeds, count()),
         errors=(safetensors.SafetensorError, ValueError, RuntimeError),
         bound=lambda d: OBJECT_BYTES_PER_INPUT_BYTE * len(d) + SLACK)


def stage_state_sample(optimizer: str) -> tuple[list, bytes, str]:
    """A small stage's (named parameters, state_to_bytes after one step, params hash as state_from_bytes
    computes it)."""
    g = torch.Generator().manual_seed(4)
    named = [("h.0.w", torch.nn.Parameter(torch.randn(4, 3, generator=g))),
             ("h.0.b", torch.nn.Parameter(torch.randn(3, generator=g)))]
    opt = (torch.optim.AdamW([p for _, p in named]) if optimizer == "adamw" else
           torch.optim.SGD([p for _, p in named], lr=0.1, momentum=0.9))
    for _, p in named:
        p.grad = torch.ones_like(p)
    opt.step()
    digest = hashlib.sha256()
    for _, p in named:
        digest.update(p.detach().numpy().astype("<f4").tobytes())
    return named, state_to_bytes(named, opt), digest.hexdigest()


def test_state_from_bytes():
    """node/jobs/pipeline/stage_state.py state_from_bytes: a replica's state as a peer sends it (resync, takeover,
    backup), with a StateHead that matches the bytes (the sender chooses both): the parameters and optimizer state, or
    Refused. Bound: 80 B per byte on the Python side."""
    states = {kind: stage_state_sample(kind) for kind in OPTIMIZERS}
    m = Mutator(rng_for("state_from_bytes"))
    cases = []
    for data in _safetensors_cases(m, [states["adamw"][1], states["sgd"][1]], count()):
        kind = m.rng.choice(list(OPTIMIZERS))
        head = StateHead(1, 3, len(data), hashlib.sha256(data).hexdigest(), states[kind][2])
        cases.append((head, data, kind))

    def decode(c):
        head, data, kind = c
        return state_from_bytes(head, data, 1, states[kind][0], OPTIMIZERS[kind])

    fuzz(decode, cases, errors=(Refused,), bound=lambda c: OBJECT_BYTES_PER_INPUT_BYTE * len(c[1]) + SLACK)
