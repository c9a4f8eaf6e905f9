"""Frames of inference through served stages: a client sends each stage of a served model its input and gets the
stage's output back (node/serving/host.py answers, node/serving/client.py asks).

    data = infer_to_wire(InferRequest("srv1", 0, session, start=0, tensor=ids, keep=True))         # client
    req = infer_from_wire(data, InferRequest, expect=ExpectedTensor.token_ids(1, 512, vocab))      # host
    reply = infer_from_wire(raw, InferReply, expect=ExpectedTensor.hidden(1, 512, 768), session=s)
        # -> InferReply, or InferError when the host could not serve it

A request names the served model (``serve``), the stage, a 64-bit ``session`` and ``start``: how many tokens of the
session the host's key/value cache must already hold. ``keep`` True keeps the cache after the reply (the next
request of the session continues at start + T); False is a one-shot pass (encoders, a whole sequence) that leaves
nothing behind. A host whose cache of the session holds another length (it expired, the host restarted, a reply
was lost) refuses with InferError, and the client replays the session's prefix from 0 -- never a silently wrong
continuation. ``last`` True asks the last stage for the last position only ((B, 1, V) logits: what generation
needs; a prefill's full logits would be T times the bytes). ``mask`` is an encoder's (B, T) padding mask (1 =
token), passed to every stage.

Tensors travel as protocol/pipeline/activations.py's tensor maps, checked against the receiver's ExpectedTensor
before anything is allocated (shape bounds, dtype allow-list, finite values, token ids in the vocabulary); every
field is checked for type and range, unknown or missing fields are refused, and each refusal is one WireError
line, counted in protocol/rejections.py. Pure: no I/O, no node/ imports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from protocol import rejections
from protocol.pipeline.activations import (
    FRAME_OVERHEAD,
    MAX_FRAME_OBJECTS,
    ExpectedTensor,
    decode_tensor,
    dtype_name,
    encode_tensor,
)
from protocol.wire import WireError, exact_map, pack, unpack_bounded

INFERENCE_PROTOCOL_VERSION = 1
MAX_SESSION = 2**64 - 1
MAX_START = 1 << 20  # tokens a session may hold before a request (far above any context window here)
MAX_STAGE = 256
MAX_SERVE_ID = 64
MAX_REASON = 300
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ONE_LINE = re.compile(r"\s+")


def _int(value: Any, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise ValueError(f"{what}: expected an integer in [0, {hi}], got {value!r:.40}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what}: expected a bool, got {value!r:.40}")
    return value


@dataclass(frozen=True)
class InferRequest:
    serve: str  # the served model's id (its job id)
    stage: int
    session: int  # 64-bit, random per session (new_session_id)
    start: int  # tokens of the session the host's cache holds before this request (0: a new session)
    tensor: torch.Tensor  # token ids (B, T) for stage 0, else the previous stage's hidden states (B, T, H)
    keep: bool = True  # keep the key/value cache after this request (a causal LM's generation)
    last: bool = False  # the last stage returns position T - 1 only
    mask: torch.Tensor | None = None  # int64 (B, T) padding mask, 1 = token (encoders)

    def __post_init__(self) -> None:
        if not isinstance(self.serve, str) or not _ID.fullmatch(self.serve):
            raise ValueError(f"serve: expected an id of 1-{MAX_SERVE_ID} letters, digits, '._-', got "
                             f"{self.serve!r:.40}")
        _int(self.stage, MAX_STAGE - 1, "stage")
        _int(self.session, MAX_SESSION, "session")
        _int(self.start, MAX_START, "start")
        _bool(self.keep, "keep")
        _bool(self.last, "last")
        for name in ("tensor", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, torch.Tensor):
                raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


@dataclass(frozen=True)
class InferReply:
    session: int
    tensor: torch.Tensor  # the stage's output: hidden states, or the last stage's logits / last hidden states

    def __post_init__(self) -> None:
        _int(self.session, MAX_SESSION, "session")
        if not isinstance(self.tensor, torch.Tensor):
            raise ValueError(f"tensor: expected a torch.Tensor, got {type(self.tensor).__name__}")


@dataclass(frozen=True)
class InferError:
    """The host could not serve the request; ``held`` is how many tokens of the session its cache holds (0: none),
    so the client knows whether to replay. ``reason`` is one line for logs (never parsed)."""

    session: int
    reason: str
    held: int = 0

    def __post_init__(self) -> None:
        _int(self.session, MAX_SESSION, "session")
        _int(self.held, MAX_START, "held")
        if not isinstance(self.reason, str):
            raise ValueError(f"reason: expected a str, got {type(self.reason).__name__}")
        object.__setattr__(self, "reason", _ONE_LINE.sub(" ", self.reason).strip()[:MAX_REASON])


InferFrame = InferRequest | InferReply | InferError
_TAGS: dict[type, str] = {InferRequest: "infer", InferReply: "infer_reply", InferError: "infer_error"}
_FIELDS = {
    "infer": ("serve", "stage", "session", "start", "keep", "last", "tensor", "mask"),
    "infer_reply": ("session", "tensor"),
    "infer_error": ("session", "reason", "held"),
}


def max_infer_bytes(expected: ExpectedTensor, mask: ExpectedTensor | None = None) -> int:
    """The length bound for a frame carrying ``expected`` (and a ``mask``)."""
    return FRAME_OVERHEAD + expected.max_raw_bytes + (0 if mask is None else mask.max_raw_bytes)


def infer_to_wire(msg: InferFrame, wire_dtype: str | torch.dtype | None = None) -> bytes:
    """The bytes of one frame; float tensors travel as ``wire_dtype`` when given (int64 ids never change)."""
    tag = _TAGS.get(type(msg))
    if tag is None:
        raise TypeError(f"not an inference frame: {type(msg).__name__}")

    def tensor(t: torch.Tensor) -> dict:
        return encode_tensor(t, wire_dtype if t.is_floating_point() else None)

    body: dict = {"t": tag, "v": INFERENCE_PROTOCOL_VERSION, "session": msg.session}
    if isinstance(msg, InferRequest):
        body.update(serve=msg.serve, stage=msg.stage, start=msg.start, keep=msg.keep, last=msg.last,
                    tensor=tensor(msg.tensor), mask=None if msg.mask is None else tensor(msg.mask))
    elif isinstance(msg, InferReply):
        body.update(tensor=tensor(msg.tensor))
    else:
        body.update(reason=msg.reason, held=msg.held)
    return pack(body)


def infer_from_wire(data: bytes, expect: type, tensor: ExpectedTensor | None = None, *,
                    mask: ExpectedTensor | None = None, session: int | None = None) -> InferFrame:
    """Decode one frame of type ``expect`` (InferRequest, or InferReply -- an InferError is accepted in its place)
    whose tensor must match ``tensor`` (and mask ``mask``; a request with a mask where ``mask`` is None is refused);
    ``session``, when given, must be the reply's. WireError on anything else, counted as a refusal."""
    if expect not in (InferRequest, InferReply) or tensor is None:
        raise TypeError("expect InferRequest or InferReply, with the ExpectedTensor of its tensor")
    try:
        return _decode(data, expect, tensor, mask, session)
    except WireError as e:
        rejections.count(f"inference {expect.__name__}", e)
        raise


def _decode(data: bytes, expect: type, tensor: ExpectedTensor, mask: ExpectedTensor | None,
            session: int | None) -> InferFrame:
    obj = unpack_bounded(data, max_infer_bytes(tensor, mask), MAX_FRAME_OBJECTS)
    if not isinstance(obj, dict):
        raise WireError(f"inference frame: expected a map, got {type(obj).__name__}")
    got, tag = obj.get("t"), _TAGS[expect]
    if got != tag and not (got == "infer_error" and expect is InferReply):
        raise WireError(f"expected a {tag!r} frame, got {got!r:.40}")
    obj = exact_map(obj, ("t", "v", *_FIELDS[got]), got)
    if type(obj["v"]) is not int or obj["v"] != INFERENCE_PROTOCOL_VERSION:
        raise WireError(f"{got}: unsupported inference protocol version {obj['v']!r:.20}")
    if session is not None and obj["session"] != session and not (got == "infer_error" and obj["session"] == 0):
        # (session 0: a host that could not read the request's session says so)
        raise WireError(f"{got}: reply for session {obj['session']!r:.24}, expected {session:016x}")
    try:
        if got == "infer_error":
            if not isinstance(obj["reason"], str) or len(obj["reason"]) > MAX_REASON:
                raise WireError(f"{got}.reason: expected one line of at most {MAX_REASON} characters")
            return InferError(obj["session"], obj["reason"], obj["held"])
        t = decode_tensor(obj["tensor"], tensor, f"{got}.tensor")
        if got == "infer_reply":
            return InferReply(obj["session"], t)
        m = None
        if obj["mask"] is not None:
            if mask is None:
                raise WireError(f"{got}.mask: this stage takes no padding mask")
            m = decode_tensor(obj["mask"], mask, f"{got}.mask")
            if tuple(m.shape) != tuple(t.shape[:2]):
                raise WireError(f"{got}.mask: shape {tuple(m.shape)} is not the tensor's (B, T) {tuple(t.shape[:2])}")
        return InferRequest(obj["serve"], obj["stage"], obj["session"], obj["start"], t, obj["keep"], obj["last"], m)
    except WireError:
        raise
    except ValueError as e:  # a field of the wrong type or range (the dataclasses' checks)
        raise WireError(f"{got}: {e}") from None


def padding_mask(max_batch: int, max_seq: int) -> ExpectedTensor:
    """An encoder's (B, T) padding mask: int64 0/1."""
    return ExpectedTensor((dtype_name("int64"),), ((1, max_batch), (1, max_seq)), "int64", (0, 1))


__all__ = ["INFERENCE_PROTOCOL_VERSION", "InferError", "InferFrame", "InferReply", "InferRequest", "infer_from_wire",
           "infer_to_wire", "max_infer_bytes", "padding_mask"]
