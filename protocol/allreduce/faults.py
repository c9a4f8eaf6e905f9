"""Fault injection for the all-reduce round: one enum, one function that builds the bad bytes.

Used through RoundHooks.outgoing_part / outgoing_result (protocol/allreduce/averager.py) by the test/benchmark peer
process (node/devtools/reduce_peer.py) and, for the byzantine suite, by a daemon started with
SWARMNODE_FAULT_BYZANTINE (node/daemon.py); never by a production node. Each fault is a way a broken or malicious
peer could answer. The malformed ones must cost that peer its place in the span without hurting the receiver; the
well-formed hostile ones (HUGE, FLIP100, NOISE, HEAVY, and an owner's RESULT_*) are what robust aggregation and the
members' result checks (protocol/allreduce/robust.py) bound and detect.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

import numpy as np

from protocol.allreduce.codecs import EncodedUpdate, extract_update, smallest_encoding
from protocol.allreduce.messages import PartFrame, ResultFrame, TensorSpec, message_to_wire
from protocol.allreduce.sparsify import SparseUpdate


class Fault(enum.Enum):
    GARBAGE = "garbage"  # random bytes instead of a frame
    WRONG_SHAPE = "wrong_shape"  # frame for a tensor of another size
    NAN = "nan"  # values hold NaN
    INF = "inf"  # values hold +Inf
    OVERSIZE = "oversize"  # a frame far larger than any honest part for the span
    WRONG_ROUND = "wrong_round"  # a frame that names another round
    OUT_OF_RANGE = "out_of_range"  # an index beyond the span
    SPOOFED_SENDER = "spoofed_sender"  # claims to come from another member
    TRUNCATED = "truncated"  # a valid frame cut short
    # well-formed and hostile: a byzantine member's part
    HUGE = "huge"  # 1e30 in every entry of the span (fp32)
    FLIP100 = "flip100"  # its honest part, sign-flipped and scaled by 100
    NOISE = "noise"  # N(0, 1) noise in every entry of the span instead of its part
    HEAVY = "heavy"  # its honest part with a claimed weight of 1e12
    # a byzantine owner's result for its span, sent to every member
    RESULT_SCALED = "result_scaled"  # the honest aggregate scaled by 100
    RESULT_FLIPPED = "result_flipped"  # the honest aggregate sign-flipped


RESULT_FAULTS = (Fault.RESULT_SCALED, Fault.RESULT_FLIPPED)
HOSTILE_PART_FAULTS = (Fault.HUGE, Fault.FLIP100, Fault.NOISE, Fault.HEAVY)  # well-formed: a receiver accepts them
MALFORMED_FAULTS = tuple(f for f in Fault if f not in HOSTILE_PART_FAULTS + RESULT_FAULTS)  # a receiver rejects them


def _recoded(frame, values: np.ndarray, indices: np.ndarray | None = None):
    span_len = frame.span[1] - frame.span[0]
    got = extract_update(frame.payload, span_len)
    idx = got.indices if indices is None else indices
    return dataclasses.replace(frame, payload=smallest_encoding(SparseUpdate(idx, values.astype(np.float32), span_len),
                                                                 "fp32"))


def mangle_part(fault: Fault, frame: PartFrame, data: bytes, seed: int = 0, other_peer: str = "") -> bytes:
    """The bytes a faulty peer sends instead of ``data`` (the honest encoding of ``frame``)."""
    rng = np.random.default_rng(seed)
    span_len = frame.span[1] - frame.span[0]
    if fault is Fault.GARBAGE:
        return rng.integers(0, 256, size=max(16, len(data)), dtype=np.uint8).tobytes()
    if fault is Fault.TRUNCATED:
        return data[: len(data) // 2]
    if fault is Fault.WRONG_SHAPE:
        tensor = TensorSpec(frame.tensor.name, frame.tensor.size + 1, frame.tensor.dtype)
        return message_to_wire(dataclasses.replace(frame, tensor=tensor))
    if fault is Fault.WRONG_ROUND:
        return message_to_wire(dataclasses.replace(frame, round_id=frame.round_id + "-stale"))
    if fault is Fault.SPOOFED_SENDER:
        return message_to_wire(dataclasses.replace(frame, sender=other_peer or frame.sender[::-1]))
    if fault in (Fault.NAN, Fault.INF):  # one entry, at the span's first position
        value = struct.pack("<f", float("nan") if fault is Fault.NAN else float("inf"))
        bad = EncodedUpdate("delta-varint", "fp32", 1, b"\x00", value)
        return message_to_wire(dataclasses.replace(frame, payload=bad))
    if fault is Fault.OUT_OF_RANGE:
        gap = span_len + 5  # one delta-varint index past the end of the span
        varint = bytearray()
        while True:
            byte, gap = gap & 0x7F, gap >> 7
            varint.append(byte | (0x80 if gap else 0))
            if not gap:
                break
        enc = EncodedUpdate("delta-varint", "fp32", 1, bytes(varint), struct.pack("<f", 1.0))
        return message_to_wire(dataclasses.replace(frame, payload=enc))
    if fault is Fault.HUGE:
        return message_to_wire(_recoded(frame, np.full(span_len, 1e30), np.arange(span_len)))
    if fault is Fault.NOISE:
        return message_to_wire(_recoded(frame, rng.standard_normal(span_len), np.arange(span_len)))
    if fault is Fault.FLIP100:
        return message_to_wire(_recoded(frame, -100.0 * extract_update(frame.payload, span_len).values))
    if fault is Fault.HEAVY:
        return message_to_wire(dataclasses.replace(frame, weight=1e12))
    if fault is Fault.OVERSIZE:
        return data + b"\0" * (span_len * 16 + 8192)
    raise ValueError(f"not a part fault: {fault!r}")


def mangle_result(fault: Fault, frame: ResultFrame, data: bytes) -> bytes:
    """The bytes a byzantine owner sends every member instead of ``data`` (its honest result ``frame``)."""
    got = extract_update(frame.payload, frame.span[1] - frame.span[0])
    if fault is Fault.RESULT_SCALED:
        return message_to_wire(_recoded(frame, 100.0 * got.values))
    if fault is Fault.RESULT_FLIPPED:
        return message_to_wire(_recoded(frame, -got.values))
    raise ValueError(f"not a result fault: {fault!r}")
