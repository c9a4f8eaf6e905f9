"""Frames a training pipeline sends between stage replicas: activations forward, gradients backward.

    data = activation_to_wire(ForwardRequest("job1", 1, mb, step, hidden), wire_dtype="bf16")   # sender
    req = activation_from_wire(data, ForwardRequest, ExpectedTensor.hidden(8, 512, 768))       # receiver
    reply = activation_from_wire(data, ForwardReply, ExpectedTensor.like(req.tensor), micro_batch=mb)
        # -> ForwardReply, or ErrorReply when the stage could not serve it
    frame = await read_frame(reader, max_frame_bytes(expected))   # protocol/streams.py, bound from ``expected``

A frame is a msgpack map {"t": tag, "v": version, ...ids..., "tensor"/"grad": tensor map}; a tensor map is
{"dtype": name, "shape": [ints], "raw": little-endian bytes}. Wire dtypes: float32, float16, bfloat16
(carried as raw uint16 words, viewed as torch.bfloat16: numpy has no bfloat16) and int64 (token ids). A sender
may shrink float32 activations to float16/bfloat16 on the wire (``wire_dtype``); the receiver casts back to
its ExpectedTensor's ``compute_dtype``. Every refusal is a WireError (a ValueError) with a one-line reason.
Pure: no I/O, no node/ imports.

Why it is built this way -- the attacks and races it handles:
  * A peer announcing a huge tensor (shape (10**9,), or a 4-GiB length prefix): the receiver derives its frame
    bound from its own ExpectedTensor (max_frame_bytes), read_frame refuses a longer length prefix before
    reading the body, and the declared shape is checked against the bounds before the raw bytes are looked at;
    nothing is allocated from a declared size.
  * Shape and raw length disagreeing (a truncated or padded frame): prod(shape) * itemsize must equal
    len(raw) exactly, checked before any tensor exists.
  * Type confusion: dtype outside the receiver's allow-list (float where token ids are expected, float64,
    bool), a bool where an int is due, a str where bytes are due, unknown or missing fields (a newer
    sender's field is refused, not silently ignored: that needs a version bump) -- all refused.
  * Poisoned values: NaN/Inf in a float tensor would flow into the stage's gradients and, through the
    all-reduce, into every replica; refused on decode. Token ids outside [0, vocab) would fault the embedding
    lookup; refused by ``value_range``. A sender whose float32 values overflow float16 gets a ValueError
    instead of sending Inf.
  * Crossed or late replies (a retried micro-batch whose first reply arrives late, a stream reused for the
    next micro-batch): replies carry the micro-batch id and are checked against the one asked for.
  * Aliasing: a decoded tensor owns writable memory (one copy out of the frame), so the stage can run
    in-place ops and the frame's buffer can be freed.
"""

from __future__ import annotations

import math
import re
import secrets
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protocol import rejections
from protocol.streams import MAX_FRAME
from protocol.wire import WireError, exact_map, pack, unpack_bounded

ACTIVATION_PROTOCOL_VERSION = 2  # 2: ForwardRequest.train
MAX_DIMS = 8
MAX_PIPELINE_ID = 128  # characters; a job id (protocol/records/job_spec.py) or job id + pipeline index
MAX_STAGE = 4096  # protocol/transfer/shards.py MAX_SHARDS: one stage per shard at most
MAX_MICRO_BATCH = 2**64 - 1
MAX_STEP = 2**63 - 1
MAX_REASON = 256  # characters of an ErrorReply reason
# Everything in a frame but the raw tensor bytes: tag, version, a 128-character id (<= 4 bytes per char),
# 64-bit ids, a shape of MAX_DIMS 9-byte ints, map keys, a bin header; or an ErrorReply's reason. ~1.2 KiB max.
FRAME_OVERHEAD = 2048
# msgpack values in a frame: a map of at most 7 fields (14 values), a tensor map (6), a shape of MAX_DIMS ints,
# the two maps themselves: 30. Twice that, so that a frame with a stray field still reaches its field checks;
# a frame of 2 GiB of empty maps is refused before one of them is built (protocol/wire.py unpack_bounded).
MAX_FRAME_OBJECTS = 64

# name -> (torch dtype, little-endian numpy dtype of the raw words, itemsize). bfloat16 travels as int16 words.
_DTYPES: dict[str, tuple[torch.dtype, str, int]] = {
    "float32": (torch.float32, "<f4", 4),
    "float16": (torch.float16, "<f2", 2),
    "bfloat16": (torch.bfloat16, "<i2", 2),
    "int64": (torch.int64, "<i8", 8),
}
DTYPES = tuple(_DTYPES)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32",
            "long": "int64", **{d: d for d in DTYPES}}
_BY_TORCH = {spec[0]: name for name, spec in _DTYPES.items()}
_LITTLE = sys.byteorder == "little"
_ONE_LINE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Dim = int | tuple[int, int]  # an exact size, or inclusive bounds (lo, hi)


def dtype_name(dtype: str | torch.dtype) -> str:
    """The wire name of ``dtype`` ("bf16", torch.bfloat16 -> "bfloat16"); ValueError if not on the allow-list."""
    name = _BY_TORCH.get(dtype) if isinstance(dtype, torch.dtype) else _ALIASES.get(dtype) if isinstance(
        dtype, str) else None
    if name is None:
        raise ValueError(f"dtype {dtype!r:.40} is not one of {', '.join(DTYPES)}")
    return name


def new_micro_batch_id() -> int:
    """A random 64-bit id: unique across every replica of a pipeline without coordination."""
    return secrets.randbits(64)


# ---- what a receiver accepts -------------------------------------------------------------------------------


def _check_int(value: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what}: expected an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


@dataclass(frozen=True)
class ExpectedTensor:
    """What a receiver accepts in one tensor slot, checked against a frame's header before anything is built.

    ``shape`` has one entry per dimension: an int (exact size) or (lo, hi) inclusive bounds; ``dtypes`` are
    the wire dtypes accepted; ``compute_dtype`` is what the decoded tensor is cast to (None: keep the wire
    dtype); ``value_range`` (lo, hi) bounds every element of an int64 tensor (token ids: (0, vocab - 1))."""

    dtypes: tuple[str, ...]
    shape: tuple[Dim, ...]
    compute_dtype: str | None = None
    value_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        dtypes = tuple(dtype_name(d) for d in self.dtypes) if isinstance(self.dtypes, (tuple, list)) else ()
        if not dtypes:
            raise ValueError("ExpectedTensor.dtypes: name at least one wire dtype")
        floats = {d in FLOAT_DTYPES for d in dtypes}
        if len(floats) != 1:
            raise ValueError("ExpectedTensor.dtypes: mixes float and integer dtypes")
        compute = None if self.compute_dtype is None else dtype_name(self.compute_dtype)
        if compute is not None and (compute in FLOAT_DTYPES) != floats.pop():
            raise ValueError(f"ExpectedTensor.compute_dtype: {compute} cannot hold {dtypes[0]} values")
        if not isinstance(self.shape, (tuple, list)) or len(self.shape) > MAX_DIMS:
            raise ValueError(f"ExpectedTensor.shape: expected at most {MAX_DIMS} dimensions")
        dims: list[Dim] = []
        for i, d in enumerate(self.shape):
            if isinstance(d, (tuple, list)) and len(d) == 2:
                lo = _check_int(d[0], 0, MAX_FRAME, f"ExpectedTensor.shape[{i}] low bound")
                dims.append((lo, _check_int(d[1], lo, MAX_FRAME, f"ExpectedTensor.shape[{i}] high bound")))
            else:
                dims.append(_check_int(d, 0, MAX_FRAME, f"ExpectedTensor.shape[{i}]"))
        if self.value_range is not None:
            if dtypes != ("int64",) or not isinstance(self.value_range, (tuple, list)) or len(self.value_range) != 2:
                raise ValueError("ExpectedTensor.value_range: (lo, hi) bounds apply to int64 tensors only")
            lo = _check_int(self.value_range[0], -(2**63), 2**63 - 1, "ExpectedTensor.value_range low")
            object.__setattr__(self, "value_range", (lo, _check_int(self.value_range[1], lo, 2**63 - 1,
                                                                   "ExpectedTensor.value_range high")))
        object.__setattr__(self, "dtypes", dtypes)
        object.__setattr__(self, "compute_dtype", compute)
        object.__setattr__(self, "shape", tuple(dims))
        if self.max_raw_bytes + FRAME_OVERHEAD > MAX_FRAME:
            raise ValueError(f"ExpectedTensor: up to {self.max_raw_bytes} bytes does not fit one frame "
                             f"({MAX_FRAME} bytes)")

    @property
    def max_raw_bytes(self) -> int:
        """The most raw bytes a frame matching this may carry."""
        elements = math.prod(d[1] if isinstance(d, tuple) else d for d in self.shape)
        return elements * max(_DTYPES[d][2] for d in self.dtypes)

    @classmethod
    def hidden(cls, max_batch: int, max_seq: int, hidden: int, dtypes: tuple[str, ...] = FLOAT_DTYPES,
               compute_dtype: str | None = "float32") -> ExpectedTensor:
        """Hidden states (or their gradient) between stages: (1..max_batch, 1..max_seq, hidden)."""
        return cls(tuple(dtypes), ((1, max_batch), (1, max_seq), hidden), compute_dtype)

    @classmethod
    def token_ids(cls, max_batch: int, max_seq: int, vocab: int) -> ExpectedTensor:
        """The first stage's input: int64 ids in [0, vocab), (1..max_batch, 1..max_seq)."""
        return cls(("int64",), ((1, max_batch), (1, max_seq)), "int64", (0, vocab - 1))

    @classmethod
    def like(cls, t: torch.Tensor, dtypes: tuple[str, ...] | None = None) -> ExpectedTensor:
        """Exactly ``t``'s shape (a reply to a request carrying ``t``, a gradient of ``t``), in ``t``'s dtype;
        float tensors accept any float wire dtype unless ``dtypes`` says otherwise."""
        own = dtype_name(t.dtype)
        if dtypes is None:
            dtypes = FLOAT_DTYPES if own in FLOAT_DTYPES else (own,)
        return cls(tuple(dtypes), tuple(t.shape), own)


def max_frame_bytes(expected: ExpectedTensor | None) -> int:
    """The length bound to pass to read_frame for a frame carrying (at most) one ``expected`` tensor."""
    return FRAME_OVERHEAD + (0 if expected is None else expected.max_raw_bytes)


# ---- tensors -----------------------------------------------------------------------------------------------


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in float tensor ``t``: aminmax propagates NaN (torch docs) and is one pass with no temporary,
    about 10x faster than isfinite(t).all() on a 1-MB tensor."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def encode_tensor(t: torch.Tensor, wire_dtype: str | torch.dtype | None = None) -> dict:
    """The wire map of ``t`` ({dtype, shape, raw}), converted to ``wire_dtype`` (e.g. "bf16") when given.

    ValueError if ``t`` is not a CPU-convertible tensor of an allowed dtype, if a float tensor holds NaN/Inf
    or overflows the wire dtype, or if an integer tensor is asked to travel as a float (or vice versa)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(t).__name__}")
    own = dtype_name(t.dtype)
    wire = own if wire_dtype is None else dtype_name(wire_dtype)
    if (own in FLOAT_DTYPES) != (wire in FLOAT_DTYPES):
        raise ValueError(f"a {own} tensor cannot travel as {wire}")
    if t.dim() > MAX_DIMS:
        raise ValueError(f"tensor of {t.dim()} dimensions; at most {MAX_DIMS} travel")
    t = t.detach().to("cpu", _DTYPES[wire][0]).contiguous()
    if wire in FLOAT_DTYPES and not _all_finite(t):
        raise ValueError(f"tensor holds NaN or Inf as {wire}" + ("" if wire == own else " (out of its range?)"))
    if wire == "bfloat16":
        t = t.view(torch.int16)
    arr = t.numpy()
    if not _LITTLE:
        arr = arr.astype(np.dtype(_DTYPES[wire][1]))
    return {"dtype": wire, "shape": list(t.shape), "raw": arr.reshape(-1).view(np.uint8).data}




def decode_tensor(obj: Any, expected: ExpectedTensor, where: str = "tensor") -> torch.Tensor:
    """The tensor of a wire map, in ``expected.compute_dtype``: dtype, shape and byte size are checked against
    ``expected`` before any tensor exists, values (finite floats, int range) right after; WireError if not."""
    obj = exact_map(obj, ("dtype", "shape", "raw"), where)
    wire = obj["dtype"]
    if not isinstance(wire, str) or wire not in expected.dtypes:
        raise WireError(f"{where}.dtype: {wire!r:.40} is not one of {', '.join(expected.dtypes)}")
    shape = obj["shape"]
    if not isinstance(shape, list) or len(shape) != len(expected.shape):
        raise WireError(f"{where}.shape: expected {len(expected.shape)} dimensions, got {shape!r:.60}")
    for i, (size, want) in enumerate(zip(shape, expected.shape)):
        lo, hi = want if isinstance(want, tuple) else (want, want)
        if isinstance(size, bool) or not isinstance(size, int) or not lo <= size <= hi:
            bound = f"[{lo}, {hi}]" if lo != hi else str(lo)
            raise WireError(f"{where}.shape[{i}]: {size!r:.40} where {bound} is expected")
    raw = obj["raw"]
    if not isinstance(raw, (bytes, bytearray)) and not (isinstance(raw, memoryview) and raw.format == "B"
                                                        and raw.ndim == 1):  # memoryview: encode_tensor's own
        raise WireError(f"{where}.raw: expected bytes, got {type(raw).__name__}")
    torch_dtype, np_dtype, itemsize = _DTYPES[wire]
    elements = math.prod(shape)
    if len(raw) != elements * itemsize:
        raise WireError(f"{where}.raw: {len(raw)} bytes for shape {tuple(shape)} of {wire} "
                        f"({elements * itemsize} expected)")
    if elements == 0:
        t = torch.empty(shape, dtype=torch_dtype)
    elif _LITTLE:  # one copy into memory the tensor owns, writable; no numpy round trip
        words = torch.int16 if wire == "bfloat16" else torch_dtype
        t = torch.frombuffer(bytearray(raw), dtype=words).view(torch_dtype).reshape(shape)
    else:
        native = np.frombuffer(raw, dtype=np_dtype).astype(np.dtype(np_dtype).newbyteorder("="))
        t = torch.from_numpy(native).view(torch_dtype).reshape(shape)
    if wire in FLOAT_DTYPES:
        if elements and not _all_finite(t):
            raise WireError(f"{where}: holds NaN or Inf")
    elif expected.value_range is not None and elements:
        lo, hi = expected.value_range
        least, most = torch.aminmax(t)
        if least.item() < lo or most.item() > hi:
            raise WireError(f"{where}: values outside [{lo}, {hi}]")
    if expected.compute_dtype is not None and expected.compute_dtype != wire:
        t = t.to(_DTYPES[expected.compute_dtype][0])
    return t


# ---- frames ------------------------------------------------------------------------------------------------


def _pipeline(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PIPELINE_ID:
        raise ValueError(f"pipeline: expected 1 to {MAX_PIPELINE_ID} characters, got {value!r:.40}")
    return value


def _tensor_arg(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class ForwardRequest:
    """Run stage ``stage`` of pipeline ``pipeline`` forward on ``tensor`` (token ids for stage 0, else the
    previous stage's hidden states) for micro-batch ``micro_batch`` of optimizer step ``step``. ``train``
    False: an evaluation pass (no graph kept, no backward to follow)."""

    pipeline: str
    stage: int
    micro_batch: int  # 64-bit, new_micro_batch_id()
    step: int
    tensor: torch.Tensor
    train: bool = True

    def __post_init__(self) -> None:
        _pipeline(self.pipeline)
        _check_int(self.stage, 0, MAX_STAGE - 1, "stage")
        _check_int(self.micro_batch, 0, MAX_MICRO_BATCH, "micro_batch")
        _check_int(self.step, 0, MAX_STEP, "step")
        _tensor_arg(self.tensor, "tensor")
        if not isinstance(self.train, bool):
            raise ValueError(f"train must be a bool, got {self.train!r:.40}")


@dataclass(frozen=True)
class ForwardReply:
    """The stage's output for ``micro_batch`` (hidden states, or the last stage's logits/loss inputs)."""

    micro_batch: int
    tensor: torch.Tensor

    def __post_init__(self) -> None:
        _check_int(self.micro_batch, 0, MAX_MICRO_BATCH, "micro_batch")
        _tensor_arg(self.tensor, "tensor")


@dataclass(frozen=True)
class BackwardRequest:
    """Backpropagate ``grad`` (d loss / d the stage's output for ``micro_batch``) through the stage."""

    micro_batch: int
    grad: torch.Tensor

    def __post_init__(self) -> None:
        _check_int(self.micro_batch, 0, MAX_MICRO_BATCH, "micro_batch")
        _tensor_arg(self.grad, "grad")


@dataclass(frozen=True)
class BackwardReply:
    """d loss / d the stage's input for ``micro_batch``; None from the first stage (its input is token ids)."""

    micro_batch: int
    grad: torch.Tensor | None

    def __post_init__(self) -> None:
        _check_int(self.micro_batch, 0, MAX_MICRO_BATCH, "micro_batch")
        if self.grad is not None:
            _tensor_arg(self.grad, "grad")


@dataclass(frozen=True)
class ErrorReply:
    """The stage could not serve ``micro_batch``; ``reason`` is one line for logs (never parsed)."""

    micro_batch: int
    reason: str

    def __post_init__(self) -> None:
        _check_int(self.micro_batch, 0, MAX_MICRO_BATCH, "micro_batch")
        if not isinstance(self.reason, str):
            raise ValueError(f"reason: expected a str, got {type(self.reason).__name__}")
        # normalised, not refused: an honest sender's exception text may span lines or run long
        object.__setattr__(self, "reason", _ONE_LINE.sub(" ", self.reason).strip()[:MAX_REASON])


ActivationFrame = ForwardRequest | ForwardReply | BackwardRequest | BackwardReply | ErrorReply
_TAGS = {ForwardRequest: "fwd", ForwardReply: "fwd_reply", BackwardRequest: "bwd", BackwardReply: "bwd_reply",
         ErrorReply: "error"}
_FIELDS = {
    "fwd": ("pipeline", "stage", "mb", "step", "train", "tensor"),
    "fwd_reply": ("mb", "tensor"),
    "bwd": ("mb", "grad"),
    "bwd_reply": ("mb", "grad"),
    "error": ("mb", "reason"),
}


def activation_to_wire(msg: ActivationFrame, wire_dtype: str | torch.dtype | None = None) -> bytes:
    """The bytes of one frame; float tensors travel as ``wire_dtype`` when given (int64 ids never change)."""
    tag = _TAGS.get(type(msg))
    if tag is None:
        raise TypeError(f"not an activation frame: {type(msg).__name__}")

    def tensor(t: torch.Tensor) -> dict:
        return encode_tensor(t, wire_dtype if dtype_name(t.dtype) in FLOAT_DTYPES else None)

    body: dict = {"t": tag, "v": ACTIVATION_PROTOCOL_VERSION, "mb": msg.micro_batch}
    if isinstance(msg, ForwardRequest):
        body.update(pipeline=msg.pipeline, stage=msg.stage, step=msg.step, train=msg.train, tensor=tensor(msg.tensor))
    elif isinstance(msg, ForwardReply):
        body.update(tensor=tensor(msg.tensor))
    elif isinstance(msg, (BackwardRequest, BackwardReply)):
        body.update(grad=None if msg.grad is None else tensor(msg.grad))
    else:
        body.update(reason=msg.reason)
    return pack(body)


def _wire_int(obj: dict, key: str, hi: int, where: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise WireError(f"{where}.{key}: expected an integer in [0, {hi}], got {value!r:.40}")
    return value


def activation_from_wire(data: bytes, expect: type, tensor: ExpectedTensor | None, *,
                         micro_batch: int | None = None) -> ActivationFrame:
    """Decode one frame of type ``expect`` whose tensor must match ``tensor``; WireError on anything else (counted
    in protocol/rejections.py as a refused "pipeline <type>" frame).

    For a reply type (ForwardReply, BackwardReply) an ErrorReply is accepted in its place, and
    ``micro_batch``, when given, must be the frame's id. ``tensor`` None means no tensor is expected: only
    valid for BackwardReply (the first stage's, which has no input gradient)."""
    try:
        return _decode(data, expect, tensor, micro_batch)
    except WireError as e:
        rejections.count(f"pipeline {expect.__name__}", e)
        raise


def _decode(data: bytes, expect: type, tensor: ExpectedTensor | None, micro_batch: int | None) -> ActivationFrame:
    tag = _TAGS.get(expect)
    if tag is None or expect is ErrorReply:
        raise TypeError(f"expect must be a request or reply type, got {expect!r:.60}")
    if tensor is None and expect is not BackwardReply:
        raise TypeError(f"a {expect.__name__} always carries a tensor: pass its ExpectedTensor")
    obj = unpack_bounded(data, max_frame_bytes(tensor), MAX_FRAME_OBJECTS)
    if not isinstance(obj, dict):
        raise WireError(f"activation frame: expected a map, got {type(obj).__name__}")
    got = obj.get("t")
    replies = (ForwardReply, BackwardReply)
    if got != tag and not (got == "error" and expect in replies):
        raise WireError(f"expected a {tag!r} frame, got {got!r:.40}")
    where = got
    obj = exact_map(obj, ("t", "v", *_FIELDS[got]), where)
    if type(obj["v"]) is not int or obj["v"] != ACTIVATION_PROTOCOL_VERSION:
        raise WireError(f"{where}: unsupported activation protocol version {obj['v']!r:.20}")
    mb = _wire_int(obj, "mb", MAX_MICRO_BATCH, where)
    if micro_batch is not None and mb != micro_batch:
        raise WireError(f"{where}: reply for micro-batch {mb:016x}, expected {micro_batch:016x}")
    if got == "error":
        reason = obj["reason"]
        if not isinstance(reason, str) or len(reason) > MAX_REASON or _CONTROL.search(reason):
            raise WireError(f"{where}.reason: expected one line of at most {MAX_REASON} characters")
        return ErrorReply(mb, reason)
    if tensor is None:  # expect is BackwardReply (checked above): the first stage's, which has no input gradient
        if obj["grad"] is not None:
            raise WireError(f"{where}.grad: the first stage's reply carries no input gradient")
        return BackwardReply(mb, None)
    if expect is ForwardRequest:
        pipeline = obj["pipeline"]
        if not isinstance(pipeline, str) or not 0 < len(pipeline) <= MAX_PIPELINE_ID:
            raise WireError(f"{where}.pipeline: expected 1 to {MAX_PIPELINE_ID} characters")
        stage = _wire_int(obj, "stage", MAX_STAGE - 1, where)
        step = _wire_int(obj, "step", MAX_STEP, where)
        if not isinstance(obj["train"], bool):
            raise WireError(f"{where}.train: expected true or false, got {obj['train']!r:.20}")
        return ForwardRequest(pipeline, stage, mb, step, decode_tensor(obj["tensor"], tensor, f"{where}.tensor"),
                              obj["train"])
    if expect is ForwardReply:
        return ForwardReply(mb, decode_tensor(obj["tensor"], tensor, f"{where}.tensor"))
    if expect is BackwardRequest:
        return BackwardRequest(mb, decode_tensor(obj["grad"], tensor, f"{where}.grad"))
    if obj["grad"] is None:
        raise WireError(f"{where}.grad: missing input gradient")
    return BackwardReply(mb, decode_tensor(obj["grad"], tensor, f"{where}.grad"))


__all__ = ["ACTIVATION_PROTOCOL_VERSION", "DTYPES", "FLOAT_DTYPES", "ActivationFrame", "BackwardReply",
           "BackwardRequest", "ErrorReply", "ExpectedTensor", "ForwardReply", "ForwardRequest",
           "activation_from_wire", "activation_to_wire", "decode_tensor", "dtype_name", "encode_tensor",
           "max_frame_bytes", "new_micro_batch_id"]
