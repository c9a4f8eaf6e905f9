"""Messages of the all-reduce round, as frozen dataclasses, and their wire form (message_to_wire /
message_from_wire).

Payloads stay encoded (codecs.EncodedUpdate: codec names + bytes) until the receiver has checked the
header against what it expects, so nothing proportional to untrusted input is allocated before that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.allreduce.codecs import EncodedUpdate
from protocol.wire import MAX_TEXT, WireError, as_map, count, field, pack, rate, text, unpack_bounded

ROUND_PROTOCOL_VERSION = 1
MAX_GROUP_SIZE = 256
MAX_ROUND_ID = 128  # characters
MAX_TENSOR_ELEMENTS = 2**34  # a flat vector larger than this is refused outright
MAX_BANDWIDTH = 1e15  # bytes/s: no real link is faster; bounds what a peer can claim


@dataclass(frozen=True)
class TensorSpec:
    """What the flat vector being averaged is; every frame must match the receiver's."""

    name: str  # e.g. "grads" or "params"
    size: int  # number of elements of the flat vector
    dtype: str = "float32"


@dataclass(frozen=True)
class Declaration:
    """A peer's entry in the DHT dictionary of a round: 'I want to average this round'."""

    peer_id: str
    bandwidth: float  # advertised bytes/s, sizes its span
    expires_at: float


@dataclass(frozen=True)
class GroupPlan:
    """Sent by the round leader to every member: the final group, in span order."""

    round_id: str
    leader: str
    members: tuple[str, ...]  # sorted peer ids
    spans: tuple[tuple[int, int], ...]  # [start, end) owned by members[i]
    tensor: TensorSpec
    deadline: float  # unix time by which the round must end


@dataclass(frozen=True)
class Invite:
    round_id: str
    leader: str
    tensor: TensorSpec


@dataclass(frozen=True)
class InviteReply:
    round_id: str
    sender: str
    accept: bool
    bandwidth: float


@dataclass(frozen=True)
class PartFrame:
    """Reduce-scatter: a member's contribution to one owner's span."""

    round_id: str
    sender: str
    tensor: TensorSpec
    span: tuple[int, int]
    weight: float  # e.g. the sample count behind this contribution
    density: float  # the sender's top-k density, for reports
    payload: EncodedUpdate  # indices relative to the span start


@dataclass(frozen=True)
class ResultFrame:
    """All-gather: an owner's aggregate of its span, the same bytes for every member."""

    round_id: str
    sender: str
    tensor: TensorSpec
    span: tuple[int, int]
    included: tuple[str, ...]  # members whose parts were summed, sorted
    total_weight: float
    payload: EncodedUpdate  # indices relative to the span start
    # per included member, the fraction of its part the aggregate holds (a robust aggregator's clip factor,
    # protocol/allreduce/robust.py); () when every part was taken whole. Absent from the wire when empty.
    kept: tuple[float, ...] = ()


@dataclass(frozen=True)
class CommitFrame:
    """Which spans' results a member holds; a span is applied only if every responding member holds it."""

    round_id: str
    sender: str
    have: tuple[bool, ...]  # one flag per member span, in GroupPlan order


# ---- all-reduce round messages ---------------------------------------------------------------------------

_MESSAGE_TAGS = {Invite: "invite", InviteReply: "invite_reply", GroupPlan: "plan", PartFrame: "part",
                 ResultFrame: "result", CommitFrame: "commit"}
MAX_CONTROL_FRAME = 64 * 1024  # invites, plans, commits


def part_frame_bound(span_len: int) -> int:
    """Largest honest part/result frame for a span: header + worst-case indices (9-byte varints) + fp32."""
    return 4096 + span_len * 13
# msgpack values in a round message: a plan's members and [start, end] spans (4 per member) are the most, plus
# ~30 for the fields and a payload map; twice that, so an oversized group reaches its field check. A part or
# result frame is bounded by its own length only: this keeps its Python objects to ~150 KB.
MAX_ROUND_OBJECTS = 8 * MAX_GROUP_SIZE + 64


def _tensor_to_wire(t: TensorSpec) -> list:
    return [t.name, t.size, t.dtype]


def _tensor_from_wire(obj: Any, where: str) -> TensorSpec:
    if not isinstance(obj, list) or len(obj) != 3:
        raise WireError(f"{where}.tensor: expected [name, size, dtype]")
    name, size, dtype = obj
    if not isinstance(name, str) or len(name) > MAX_TEXT:
        raise WireError(f"{where}.tensor: bad name")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_TENSOR_ELEMENTS:
        raise WireError(f"{where}.tensor: bad size {size!r:.40}")
    if dtype not in ("float32",):
        raise WireError(f"{where}.tensor: unsupported dtype {dtype!r:.40}")
    return TensorSpec(name, size, dtype)


def _span_from_wire(obj: Any, where: str) -> tuple[int, int]:
    if (not isinstance(obj, list) or len(obj) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_TENSOR_ELEMENTS for x in obj)
            or obj[0] > obj[1]):
        raise WireError(f"{where}.span: expected [start, end] with 0 <= start <= end")
    return obj[0], obj[1]


def _peer_list(obj: Any, where: str) -> tuple[str, ...]:
    if (not isinstance(obj, list) or len(obj) > MAX_GROUP_SIZE
            or not all(isinstance(p, str) and len(p) <= 64 for p in obj)):
        raise WireError(f"{where}: expected at most {MAX_GROUP_SIZE} peer ids")
    return tuple(obj)


def _sparse_to_wire(p: EncodedUpdate) -> dict:
    return {"nnz": p.nnz, "ic": p.index_codec, "idx": p.indices, "vc": p.value_codec, "val": p.values}


def _sparse_from_wire(obj: Any, where: str) -> EncodedUpdate:
    obj = as_map(obj, f"{where}.payload")
    return EncodedUpdate(
        index_codec=text(obj, "ic", where, 16),
        value_codec=text(obj, "vc", where, 16),
        nnz=count(obj, "nnz", where),
        indices=field(obj, "idx", bytes, where),
        values=field(obj, "val", bytes, where),
    )


def message_to_wire(msg) -> bytes:
    tag = _MESSAGE_TAGS.get(type(msg))
    if tag is None:
        raise TypeError(f"not a round message: {type(msg).__name__}")
    body: dict = {"t": tag, "v": ROUND_PROTOCOL_VERSION, "round": msg.round_id}
    if isinstance(msg, Invite):
        body.update(leader=msg.leader, tensor=_tensor_to_wire(msg.tensor))
    elif isinstance(msg, InviteReply):
        body.update(sender=msg.sender, accept=msg.accept, bw=msg.bandwidth)
    elif isinstance(msg, GroupPlan):
        body.update(leader=msg.leader, members=list(msg.members), spans=[list(s) for s in msg.spans],
                    tensor=_tensor_to_wire(msg.tensor), deadline=msg.deadline)
    elif isinstance(msg, PartFrame):
        body.update(sender=msg.sender, tensor=_tensor_to_wire(msg.tensor), span=list(msg.span), weight=msg.weight,
                    density=msg.density, payload=_sparse_to_wire(msg.payload))
    elif isinstance(msg, ResultFrame):
        body.update(sender=msg.sender, tensor=_tensor_to_wire(msg.tensor), span=list(msg.span),
                    included=list(msg.included), total_weight=msg.total_weight, payload=_sparse_to_wire(msg.payload))
        if msg.kept:
            body["kept"] = list(msg.kept)
    else:
        body.update(sender=msg.sender, have=list(msg.have))
    return pack(body)


def message_from_wire(data: bytes, max_bytes: int, expect: type):
    """Decode one round message of type ``expect``; WireError on anything else (checked before payloads)."""
    obj = as_map(unpack_bounded(data, max_bytes, MAX_ROUND_OBJECTS), "round message")
    tag = obj.get("t")
    if tag != _MESSAGE_TAGS[expect]:
        raise WireError(f"expected a {_MESSAGE_TAGS[expect]!r} message, got {tag!r:.40}")
    if type(obj.get("v")) is not int or obj["v"] != ROUND_PROTOCOL_VERSION:
        raise WireError(f"unsupported round protocol version {obj.get('v')!r:.20}")
    where = tag
    round_id = text(obj, "round", where, MAX_ROUND_ID)
    if expect is Invite:
        return Invite(round_id, text(obj, "leader", where, 64), _tensor_from_wire(obj.get("tensor"), where))
    if expect is InviteReply:
        bandwidth = rate(obj.get("bw"), f"{where}.bw")
        if bandwidth >= MAX_BANDWIDTH:
            raise WireError(f"{where}.bw: {bandwidth:g} bytes/s is not a real link")
        return InviteReply(round_id, text(obj, "sender", where, 64), field(obj, "accept", bool, where), bandwidth)
    if expect is GroupPlan:
        members = _peer_list(obj.get("members"), f"{where}.members")
        spans_raw = field(obj, "spans", list, where)
        if len(spans_raw) != len(members):
            raise WireError(f"{where}: {len(spans_raw)} spans for {len(members)} members")
        tensor = _tensor_from_wire(obj.get("tensor"), where)
        spans = tuple(_span_from_wire(s, where) for s in spans_raw)
        if spans and (spans[0][0] != 0 or spans[-1][1] != tensor.size or
                      any(a[1] != b[0] for a, b in zip(spans, spans[1:]))):
            raise WireError(f"{where}: spans do not tile the tensor")
        return GroupPlan(round_id, text(obj, "leader", where, 64), members, spans, tensor,
                         rate(obj.get("deadline"), f"{where}.deadline"))
    sender = text(obj, "sender", where, 64)
    if expect is CommitFrame:
        have = field(obj, "have", list, where)
        if len(have) > MAX_GROUP_SIZE or not all(isinstance(h, bool) for h in have):
            raise WireError(f"{where}.have: expected a list of booleans")
        return CommitFrame(round_id, sender, tuple(have))
    tensor = _tensor_from_wire(obj.get("tensor"), where)
    span = _span_from_wire(obj.get("span"), where)
    payload = _sparse_from_wire(obj.get("payload"), where)
    if payload.nnz > span[1] - span[0]:
        raise WireError(f"{where}: {payload.nnz} entries for a span of {span[1] - span[0]}")
    if expect is PartFrame:
        weight = rate(obj.get("weight"), f"{where}.weight")
        density = rate(obj.get("density"), f"{where}.density")
        if weight == 0 or density > 1:
            raise WireError(f"{where}: weight must be > 0 and density <= 1")
        return PartFrame(round_id, sender, tensor, span, weight, density, payload)
    included = _peer_list(obj.get("included"), f"{where}.included")
    kept = obj.get("kept", [])
    if (not isinstance(kept, list) or (kept and len(kept) != len(included))
            or not all(type(k) is float and 0.0 <= k <= 1.0 for k in kept)):
        raise WireError(f"{where}.kept: expected one fraction in [0, 1] per included member")
    return ResultFrame(round_id, sender, tensor, span, included, rate(obj.get("total_weight"), f"{where}.total_weight"),
                       payload, tuple(kept))
