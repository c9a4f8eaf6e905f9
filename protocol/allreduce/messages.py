"""Messages of the all-reduce round, as frozen dataclasses (wire form in protocol/wire.py).

Payloads stay encoded (codecs.EncodedUpdate: codec names + bytes) until the receiver has checked the
header against what it expects, so nothing proportional to untrusted input is allocated before that.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.allreduce.codecs import EncodedUpdate

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


@dataclass(frozen=True)
class CommitFrame:
    """Which spans' results a member holds; a span is applied only if every responding member holds it."""

    round_id: str
    sender: str
    have: tuple[bool, ...]  # one flag per member span, in GroupPlan order
