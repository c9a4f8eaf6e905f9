"""Fault injection for the all-reduce round: one enum, one function that builds the bad bytes.

Used through RoundHooks.outgoing_part (protocol/allreduce/averager.py) by the test/benchmark peer process
(node/devtools/reduce_peer.py), never by a production node. Each fault is a way a broken or malicious peer could
answer, and each must cost that peer its place in the span without hurting the receiver.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

import numpy as np

from protocol.allreduce.codecs import EncodedUpdate
from protocol.allreduce.messages import PartFrame, TensorSpec, message_to_wire


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


def mangle_part(fault: Fault, frame: PartFrame, data: bytes, seed: int = 0, other_peer: str = "") -> bytes:
    """The bytes a faulty peer sends instead of ``data`` (the honest encoding of ``frame``)."""
    rng = np.random.default_rng(seed)
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
        span_len = frame.span[1] - frame.span[0]
        gap = span_len + 5  # one delta-varint index past the end of the span
        varint = bytearray()
        while True:
            byte, gap = gap & 0x7F, gap >> 7
            varint.append(byte | (0x80 if gap else 0))
            if not gap:
                break
        enc = EncodedUpdate("delta-varint", "fp32", 1, bytes(varint), struct.pack("<f", 1.0))
        return message_to_wire(dataclasses.replace(frame, payload=enc))
    if fault is Fault.OVERSIZE:
        span_len = frame.span[1] - frame.span[0]
        return data + b"\0" * (span_len * 16 + 8192)
    raise ValueError(f"unknown fault {fault!r}")
