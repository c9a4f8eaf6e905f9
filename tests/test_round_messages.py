"""protocol/wire.py round messages: a round trip for every message type, WireError for every bad frame;
and protocol/allreduce/faults.py: no injected fault produces a part frame an honest receiver would accept."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
import pytest

from protocol.allreduce.codecs import (
    CodecError,
    EncodedUpdate,
    SparseCodec,
    extract_update,
    quantize_values,
    smallest_encoding,
)
from protocol.allreduce.faults import MALFORMED_FAULTS, Fault, mangle_part
from protocol.allreduce.messages import (
    MAX_CONTROL_FRAME,
    MAX_GROUP_SIZE,
    MAX_ROUND_ID,
    MAX_TENSOR_ELEMENTS,
    ROUND_PROTOCOL_VERSION,
    CommitFrame,
    GroupPlan,
    Invite,
    InviteReply,
    PartFrame,
    ResultFrame,
    TensorSpec,
    message_from_wire,
    message_to_wire,
    part_frame_bound,
)
from protocol.allreduce.sparsify import SparseUpdate
from protocol.planning.partition import plan_spans
from protocol.wire import WireError

A = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
B = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
C = "12D3KooWKnDfkoN3ZzVhNGqc6ZUZpFGBmtDoxN9tvKGJ9GCwAYPR"
ROUND = "grads/round-42"
TENSOR = TensorSpec("grads", 1000)
SPANS = tuple(plan_spans(1000, [1.0, 2.0, 1.0]))  # ((0, 250), (250, 750), (750, 1000))
SPAN = SPANS[1]
SPAN_LEN = SPAN[1] - SPAN[0]
BIG = 1 << 20  # max_bytes for frames that are not about size


def sparse_update(size: int, nnz: int, seed: int) -> SparseUpdate:
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(size, nnz, replace=False)).astype(np.int64)
    values = rng.standard_normal(nnz).astype(np.float32)
    return SparseUpdate(indices, values, size)


SPARSE_PAYLOAD = smallest_encoding(sparse_update(SPAN_LEN, 5, seed=1))  # rice indices
DENSE_PAYLOAD = smallest_encoding(sparse_update(SPAN_LEN, 480, seed=2))  # dense is smaller here
FP32_PAYLOAD = smallest_encoding(sparse_update(SPAN_LEN, 300, seed=3), "fp32")  # bitmap indices
VARINT_PAYLOAD = SparseCodec("int2", "delta-varint").compress(sparse_update(SPAN_LEN, 40, seed=4))

INVITE = Invite(ROUND, A, TENSOR)
REPLY = InviteReply(ROUND, B, True, 12.5e6)
PLAN = GroupPlan(ROUND, A, (A, B, C), SPANS, TENSOR, 1.7e9)
PART = PartFrame(ROUND, C, TENSOR, SPAN, 32.0, 0.01, SPARSE_PAYLOAD)
RESULT = ResultFrame(ROUND, B, TENSOR, SPAN, (A, B, C), 96.0, DENSE_PAYLOAD)
COMMIT = CommitFrame(ROUND, C, (True, False, True))
ALL = [INVITE, REPLY, PLAN, PART, RESULT, COMMIT]


def rt(msg):
    return message_from_wire(message_to_wire(msg), BIG, type(msg))


def as_dict(msg) -> dict:
    return msgpack.unpackb(message_to_wire(msg), raw=False)


def pack(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def mutated(msg, change) -> bytes:
    d = as_dict(msg)
    change(d)
    return pack(d)


def rejects(data: bytes, expect: type, max_bytes: int = BIG) -> None:
    with pytest.raises(WireError):
        message_from_wire(data, max_bytes, expect)


# ---- round trips -----------------------------------------------------------------------------------------


def test_payloads_use_several_codecs():
    assert SPARSE_PAYLOAD.index_codec == "rice"
    assert VARINT_PAYLOAD.index_codec == "delta-varint" and VARINT_PAYLOAD.value_codec == "int2"
    assert DENSE_PAYLOAD.index_codec == "dense"
    assert FP32_PAYLOAD.index_codec == "bitmap" and FP32_PAYLOAD.value_codec == "fp32"


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = message_to_wire(msg)
    assert isinstance(data, bytes)
    out = message_from_wire(data, len(data), type(msg))  # exactly its own size is within the bound
    assert out == msg
    assert type(out) is type(msg)


@pytest.mark.parametrize(
    "msg",
    [
        InviteReply(ROUND, B, False, 0.0),
        InviteReply(ROUND, B, True, 7),
        GroupPlan(ROUND, A, (), (), TENSOR, 0.0),  # "no group": a plan without members
        GroupPlan(ROUND, A, (A,), ((0, 1000),), TENSOR, 0.0),
        GroupPlan(ROUND, A, (A, B), ((0, 0), (0, 0)), TensorSpec("empty", 0), 1.0),
        GroupPlan(ROUND, A, (A, B), ((0, 0), (0, 1000)), TENSOR, 1.0),  # a zero-bandwidth member
        dataclasses.replace(PART, payload=DENSE_PAYLOAD, density=1.0),
        dataclasses.replace(PART, payload=FP32_PAYLOAD, weight=1e-3, density=0.0),
        dataclasses.replace(PART, span=(250, 250), payload=smallest_encoding(sparse_update(0, 0, 0))),
        dataclasses.replace(RESULT, payload=SPARSE_PAYLOAD, included=(), total_weight=0.0),
        dataclasses.replace(RESULT, payload=FP32_PAYLOAD),
        dataclasses.replace(RESULT, payload=VARINT_PAYLOAD),
        CommitFrame(ROUND, C, ()),
        CommitFrame(ROUND, C, (True,) * MAX_GROUP_SIZE),
        Invite("r" * MAX_ROUND_ID, A, TENSOR),  # the longest round id
        Invite("", A, TensorSpec("", MAX_TENSOR_ELEMENTS)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip_edge_cases(msg):
    assert rt(msg) == msg


def test_round_trip_group_of_max_size():
    members = tuple(f"peer{i:04d}" for i in range(MAX_GROUP_SIZE))
    plan = GroupPlan(ROUND, members[0], members, tuple(plan_spans(10**6, [1.0] * MAX_GROUP_SIZE)), TENSOR, 5.0)
    plan = dataclasses.replace(plan, tensor=TensorSpec("grads", 10**6))
    assert rt(plan) == plan
    result = dataclasses.replace(RESULT, included=members)
    assert rt(result) == result


@pytest.mark.parametrize("payload", [SPARSE_PAYLOAD, DENSE_PAYLOAD, FP32_PAYLOAD, VARINT_PAYLOAD],
                         ids=["sparse", "dense", "fp32", "varint"])
def test_payload_survives_the_frame_bit_for_bit(payload):
    out = rt(dataclasses.replace(PART, payload=payload))
    assert out.payload == payload
    a, b = extract_update(payload, SPAN_LEN), extract_update(out.payload, SPAN_LEN)
    assert np.array_equal(a.indices, b.indices) and a.values.tobytes() == b.values.tobytes()


def test_extracted_payload_is_the_quantized_update():
    update = sparse_update(SPAN_LEN, 5, seed=1)
    got = extract_update(rt(PART).payload, SPAN_LEN)
    assert np.array_equal(got.indices, update.indices)
    assert np.array_equal(got.values, quantize_values(update.values, "fp16"))


def test_message_to_wire_refuses_other_objects():
    with pytest.raises(TypeError):
        message_to_wire(TENSOR)
    with pytest.raises(TypeError):
        message_to_wire({"t": "invite"})


def test_frames_carry_tag_version_and_round():
    for msg in ALL:
        d = as_dict(msg)
        assert d["t"] and d["v"] == ROUND_PROTOCOL_VERSION and d["round"] == ROUND


# ---- WireError: the envelope ---------------------------------------------------------------------------


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_wrong_expected_type(msg):
    data = message_to_wire(msg)
    for other in {type(m) for m in ALL} - {type(msg)}:
        with pytest.raises(WireError, match="expected a"):
            message_from_wire(data, BIG, other)


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("tag", [None, "INVITE", "parts", 1, ["part"]])
def test_unknown_tag(msg, tag):
    rejects(mutated(msg, lambda d: d.__setitem__("t", tag)), type(msg))


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("version", [ROUND_PROTOCOL_VERSION + 1, 0, -1, "1", None, [1]])
def test_unknown_protocol_version(msg, version):
    with pytest.raises(WireError, match="version"):
        message_from_wire(mutated(msg, lambda d: d.__setitem__("v", version)), BIG, type(msg))


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_oversize_frame(msg):
    data = message_to_wire(msg)
    with pytest.raises(WireError, match="exceeds"):
        message_from_wire(data, len(data) - 1, type(msg))
    with pytest.raises(WireError, match="exceeds"):
        message_from_wire(data, 0, type(msg))


def test_oversize_is_checked_before_decoding():
    huge = pack({"t": "commit", "v": 1, "round": ROUND, "sender": C, "have": [True] * 100_000})
    with pytest.raises(WireError, match="exceeds"):
        message_from_wire(huge, MAX_CONTROL_FRAME, CommitFrame)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # reserved msgpack byte
        b"\xde\xad\xbe\xef",
        message_to_wire(PART)[:-1],  # truncated
        message_to_wire(PART) + b"\x00",  # trailing bytes
        bytes(np.random.default_rng(11).integers(0, 256, 300, dtype=np.uint8)),
        bytes(np.random.default_rng(12).integers(0, 256, 4096, dtype=np.uint8)),
        msgpack.packb([ROUND, C]),  # not a map
        msgpack.packb("part"),
        msgpack.packb(None),
        msgpack.packb({1: "part"}),  # non-string map keys
        msgpack.packb(msgpack.ExtType(3, b"\x00" * 8)),
        b"\x91" * 100_000 + b"\x90",  # deeply nested arrays
    ],
    ids=lambda d: repr(d[:6]),
)
@pytest.mark.parametrize("expect", [PartFrame, GroupPlan, CommitFrame])
def test_garbage_bytes(data, expect):
    rejects(data, expect, max_bytes=max(BIG, len(data)))


@pytest.mark.parametrize("data", [None, "text", 12, [1, 2], {"t": "part"}])
def test_not_bytes(data):
    rejects(data, PartFrame)


def test_ext_type_inside_a_field():
    d = as_dict(PART)
    d["payload"]["idx"] = msgpack.ExtType(1, b"\x01\x02")
    rejects(pack(d), PartFrame)


# ---- WireError: missing fields and wrong types -------------------------------------------------------------


def missing_field_cases():
    for msg in ALL:
        for key in as_dict(msg):
            yield pytest.param(msg, key, id=f"{type(msg).__name__}-{key}")
    for msg in (PART, RESULT):
        for key in as_dict(msg)["payload"]:
            yield pytest.param(msg, ("payload", key), id=f"{type(msg).__name__}-payload.{key}")


@pytest.mark.parametrize("msg, key", list(missing_field_cases()))
def test_missing_field(msg, key):
    d = as_dict(msg)
    if isinstance(key, tuple):
        del d[key[0]][key[1]]
    else:
        del d[key]
    rejects(pack(d), type(msg))


def setter(*path_and_value):
    *path, value = path_and_value

    def change(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return change


BAD_FIELDS = [
    # wrong types
    (INVITE, setter("round", 7)),
    (INVITE, setter("round", b"bytes-round")),
    (INVITE, setter("leader", None)),
    (INVITE, setter("leader", "x" * 65)),
    (INVITE, setter("tensor", "grads")),
    (INVITE, setter("tensor", ["grads", 1000])),
    (INVITE, setter("tensor", ["grads", 1000, "float32", "extra"])),
    (INVITE, setter("tensor", {"name": "grads", "size": 1000, "dtype": "float32"})),
    (INVITE, setter("tensor", [5, 1000, "float32"])),
    (INVITE, setter("tensor", ["g" * 10_000, 1000, "float32"])),
    (INVITE, setter("tensor", ["grads", "1000", "float32"])),
    (INVITE, setter("tensor", ["grads", 1000.0, "float32"])),
    (INVITE, setter("tensor", ["grads", -1, "float32"])),
    (INVITE, setter("tensor", ["grads", MAX_TENSOR_ELEMENTS + 1, "float32"])),
    (REPLY, setter("sender", 5)),
    (REPLY, setter("accept", "yes")),
    (REPLY, setter("accept", None)),
    (REPLY, setter("bw", "fast")),
    (REPLY, setter("bw", -1.0)),
    (REPLY, setter("bw", math.nan)),
    (REPLY, setter("bw", math.inf)),
    (PLAN, setter("members", f"{A},{B},{C}")),
    (PLAN, setter("members", [A, B, 3])),
    (PLAN, setter("members", [A, B, "x" * 65])),
    (PLAN, setter("spans", "0-1000")),
    (PLAN, setter("spans", [[0, 250], [250, "750"], [750, 1000]])),
    (PLAN, setter("spans", [[0, 250], [250, 750.0], [750.0, 1000]])),
    (PLAN, setter("spans", [[0, 250], [250, 750, 1], [750, 1000]])),
    (PLAN, setter("spans", [0, 250, 750])),
    (PLAN, setter("spans", [[0, 250], [250, 750]])),  # fewer spans than members
    (PLAN, setter("deadline", "soon")),
    (PLAN, setter("deadline", -1.0)),
    (PLAN, setter("deadline", math.nan)),
    (PLAN, setter("leader", None)),
    (PART, setter("span", "250:750")),
    (PART, setter("span", [250])),
    (PART, setter("span", [250.0, 750.0])),
    (PART, setter("span", [-1, 750])),
    (PART, setter("span", [0, MAX_TENSOR_ELEMENTS + 1])),
    (PART, setter("payload", [])),
    (PART, setter("payload", "x")),
    (PART, setter("payload", "nnz", "5")),
    (PART, setter("payload", "nnz", -1)),
    (PART, setter("payload", "nnz", 5.0)),
    (PART, setter("payload", "ic", 5)),
    (PART, setter("payload", "ic", "delta-varint" * 2)),  # longer than a codec name
    (PART, setter("payload", "vc", None)),
    (PART, setter("payload", "idx", "not-bytes")),
    (PART, setter("payload", "val", None)),
    (PART, setter("payload", "val", [1.0, 2.0])),
    (PART, setter("weight", "1")),
    (PART, setter("density", "1%")),
    (RESULT, setter("included", [A, 1])),
    (RESULT, setter("included", A)),
    (RESULT, setter("total_weight", -1.0)),
    (RESULT, setter("total_weight", math.inf)),
    (RESULT, setter("total_weight", None)),
    (COMMIT, setter("have", "TFT")),
    (COMMIT, setter("have", None)),
    (COMMIT, setter("sender", ["x"])),
    # a bool where an int or float is wanted (True == 1 and False == 0 must not slip through)
    (INVITE, setter("tensor", ["grads", True, "float32"])),
    (REPLY, setter("bw", True)),
    (REPLY, setter("accept", 1)),
    (PLAN, setter("spans", [[False, 250], [250, 750], [750, 1000]])),
    (PLAN, setter("deadline", True)),
    (PART, setter("span", [250, True])),
    (PART, setter("payload", "nnz", True)),
    (PART, setter("weight", True)),
    (PART, setter("density", False)),
    (RESULT, setter("total_weight", True)),
    (COMMIT, setter("have", [1, 0, 1])),
    (COMMIT, setter("have", [True, 0, True])),
    (COMMIT, setter("have", [True, None, True])),
    (COMMIT, setter("have", ["true"])),
    # spans that do not tile the tensor
    (PLAN, setter("spans", [[0, 250], [251, 750], [750, 1000]])),  # gap
    (PLAN, setter("spans", [[0, 250], [240, 750], [750, 1000]])),  # overlap
    (PLAN, setter("spans", [[1, 250], [250, 750], [750, 1000]])),  # not from 0
    (PLAN, setter("spans", [[0, 250], [250, 750], [750, 999]])),  # short of the end
    (PLAN, setter("spans", [[0, 250], [250, 750], [750, 1001]])),  # past the end
    (PLAN, setter("spans", [[0, 250], [750, 1000], [250, 750]])),  # out of order
    (PLAN, setter("tensor", ["grads", 2000, "float32"])),  # spans for another size
    # span start after its end
    (PLAN, setter("spans", [[0, 750], [750, 250], [250, 1000]])),
    (PART, setter("span", [750, 250])),
    (RESULT, setter("span", [751, 750])),
    # more entries than the span holds
    (PART, setter("payload", "nnz", SPAN_LEN + 1)),
    (RESULT, setter("payload", "nnz", SPAN_LEN + 1)),
    (PART, setter("span", [250, 252])),  # 5 entries, span of 2
    # weights and densities
    (PART, setter("weight", -1.0)),
    (PART, setter("weight", math.nan)),
    (PART, setter("weight", math.inf)),
    (PART, setter("weight", -math.inf)),
    (PART, setter("weight", 0.0)),
    (PART, setter("weight", 0)),
    (PART, setter("density", 1.0001)),
    (PART, setter("density", 2)),
    (PART, setter("density", -0.01)),
    (PART, setter("density", math.nan)),
    (RESULT, setter("total_weight", math.nan)),
    # dtypes
    (INVITE, setter("tensor", ["grads", 1000, "float16"])),
    (PART, setter("tensor", ["grads", 1000, "int64"])),
    (PLAN, setter("tensor", ["grads", 1000, "bfloat16"])),
    (RESULT, setter("tensor", ["grads", 1000, None])),
    (PART, setter("tensor", ["grads", 1000, ["float32"]])),
    # group sizes
    (PLAN, setter("members", [f"p{i}" for i in range(MAX_GROUP_SIZE + 1)])),
    (RESULT, setter("included", [f"p{i}" for i in range(MAX_GROUP_SIZE + 1)])),
    (COMMIT, setter("have", [True] * (MAX_GROUP_SIZE + 1))),
    # round ids
    (INVITE, setter("round", "r" * (MAX_ROUND_ID + 1))),
    (PART, setter("round", "r" * (MAX_ROUND_ID + 1))),
    (COMMIT, setter("round", "r" * 10_000)),
    (PLAN, setter("round", None)),
]


@pytest.mark.parametrize(
    "msg, change", [pytest.param(m, c, id=f"{i}-{type(m).__name__}") for i, (m, c) in enumerate(BAD_FIELDS)]
)
def test_bad_field(msg, change):
    rejects(mutated(msg, change), type(msg))


def test_group_plan_of_max_size_plus_one():
    members = [f"peer{i:04d}" for i in range(MAX_GROUP_SIZE + 1)]
    spans = [list(s) for s in plan_spans(1000, [1.0] * len(members))]
    d = as_dict(PLAN)
    d.update(members=members, spans=spans)
    rejects(pack(d), GroupPlan)
    d.update(members=members[:-1], spans=[list(s) for s in plan_spans(1000, [1.0] * MAX_GROUP_SIZE)])
    assert len(message_from_wire(pack(d), BIG, GroupPlan).members) == MAX_GROUP_SIZE


def test_round_id_length_boundary():
    ok = mutated(COMMIT, setter("round", "r" * MAX_ROUND_ID))
    assert message_from_wire(ok, BIG, CommitFrame).round_id == "r" * MAX_ROUND_ID
    rejects(mutated(COMMIT, setter("round", "r" * (MAX_ROUND_ID + 1))), CommitFrame)


def test_nnz_equal_to_span_length_is_fine():
    dense = smallest_encoding(sparse_update(SPAN_LEN, SPAN_LEN, seed=5))
    assert dense.nnz == SPAN_LEN
    assert rt(dataclasses.replace(PART, payload=dense)).payload == dense


# ---- faults: nothing a faulty peer sends is accepted -------------------------------------------------------


def receiver_rejects(data: bytes, frame: PartFrame) -> str | None:
    """Why an honest owner of ``frame.span`` expecting ``frame``'s round, tensor and sender refuses ``data``
    (the checks of Averager._accept_part), or None if it would accept it."""
    try:
        part = message_from_wire(data, len(data), PartFrame)
    except WireError as e:
        return f"wire: {e}"
    if part.round_id != frame.round_id:
        return "round"
    if part.sender != frame.sender:
        return "sender"
    if part.tensor != frame.tensor or part.span != frame.span:
        return "tensor/span"
    try:
        extract_update(part.payload, frame.span[1] - frame.span[0])
    except CodecError as e:
        return f"codec: {e}"
    return None


HONEST = [
    PART,
    dataclasses.replace(PART, payload=DENSE_PAYLOAD, density=1.0),
    dataclasses.replace(PART, payload=FP32_PAYLOAD),
    PartFrame("r1", B, TensorSpec("params", 10), (9, 10), 1.0, 1.0, smallest_encoding(sparse_update(1, 1, 4))),
    PartFrame("r1", B, TensorSpec("params", 200_000), (0, 200_000), 1.0, 0.01,
              smallest_encoding(sparse_update(200_000, 2000, 6))),
]


@pytest.mark.parametrize("frame", HONEST, ids=lambda f: f"{f.tensor.name}{list(f.span)}-{f.payload.index_codec}")
def test_honest_parts_are_accepted(frame):
    assert receiver_rejects(message_to_wire(frame), frame) is None
    assert len(message_to_wire(frame)) <= part_frame_bound(frame.span[1] - frame.span[0])


@pytest.mark.parametrize("fault", MALFORMED_FAULTS, ids=lambda f: f.value)
@pytest.mark.parametrize("frame", HONEST, ids=lambda f: f"{f.tensor.name}{list(f.span)}-{f.payload.index_codec}")
def test_every_malformed_fault_is_rejected(fault, frame):
    honest = message_to_wire(frame)
    for seed in range(4):
        for other_peer in ("", A):
            bad = mangle_part(fault, frame, honest, seed=seed, other_peer=other_peer)
            assert isinstance(bad, bytes)
            assert bad != honest
            assert receiver_rejects(bad, frame) is not None, (fault, seed, other_peer)


FAULT_TARGETS = {  # the receiver check each fault is built to fail
    Fault.GARBAGE: "wire",
    Fault.TRUNCATED: "wire",
    Fault.OVERSIZE: "wire",
    Fault.WRONG_SHAPE: "tensor/span",
    Fault.WRONG_ROUND: "round",
    Fault.SPOOFED_SENDER: "sender",
    Fault.NAN: "codec",
    Fault.INF: "codec",
    Fault.OUT_OF_RANGE: "codec",
}


def test_fault_table_covers_every_malformed_fault():
    # the well-formed hostile ones (HUGE, FLIP100, NOISE, HEAVY, RESULT_*) pass the receiver's checks by design:
    # robust aggregation bounds them (tests/test_robust_aggregation.py)
    assert set(FAULT_TARGETS) == set(MALFORMED_FAULTS)


@pytest.mark.parametrize("fault, reason", FAULT_TARGETS.items(), ids=lambda x: getattr(x, "value", x))
def test_each_fault_fails_the_check_it_targets(fault, reason):
    bad = mangle_part(fault, PART, message_to_wire(PART), other_peer=A)
    assert receiver_rejects(bad, PART).startswith(reason)


@pytest.mark.parametrize("frame", HONEST, ids=lambda f: f"{f.tensor.name}{list(f.span)}-{f.payload.index_codec}")
def test_oversize_exceeds_the_part_frame_bound(frame):
    bad = mangle_part(Fault.OVERSIZE, frame, message_to_wire(frame))
    assert len(bad) > part_frame_bound(frame.span[1] - frame.span[0])
    rejects(bad, PartFrame, max_bytes=part_frame_bound(frame.span[1] - frame.span[0]))


def test_spoofed_sender_names_the_other_peer():
    bad = mangle_part(Fault.SPOOFED_SENDER, PART, message_to_wire(PART), other_peer=A)
    assert message_from_wire(bad, BIG, PartFrame).sender == A


def test_garbage_is_reproducible_per_seed():
    honest = message_to_wire(PART)
    assert mangle_part(Fault.GARBAGE, PART, honest, seed=3) == mangle_part(Fault.GARBAGE, PART, honest, seed=3)
    assert mangle_part(Fault.GARBAGE, PART, honest, seed=3) != mangle_part(Fault.GARBAGE, PART, honest, seed=4)


def test_mangle_part_refuses_an_unknown_fault():
    with pytest.raises(ValueError):
        mangle_part("garbage", PART, message_to_wire(PART))  # type: ignore[arg-type]


def test_encoded_update_is_what_the_frame_carries():
    assert isinstance(rt(PART).payload, EncodedUpdate)
