"""Integer value codecs (issue 17): int8, int4 and int2 values with one float32 scale per chunk of CHUNK entries.

    payload = encode_int(values, "int4")              # float32 (nnz,) -> bytes: scales, then packed codes
    values = decode_int(buffer, "int4", nnz)           # ValueError with a one-line reason on anything invalid
    int_payload_bytes("int4", nnz)                     # ceil(nnz / CHUNK) * 4 + ceil(nnz * 4 / 8)

Levels: a symmetric mid-rise quantizer with all 2^b codes used, value = (code - 2^(b-1) + 1/2) * scale, so int2 has
the four levels +-scale/2, +-3 scale/2 and none at zero. Top-k sends only large entries, so a zero level would waste
a code; a chunk's scale is max|v| / (2^(b-1) - 1/2), which puts its largest magnitude exactly on the top level.
These codecs are for sparse parts only (protocol/allreduce/codecs.py refuses them for dense vectors, whose zeros
they cannot represent).

Rounding is deterministic, to the nearest level: the rounding error goes back into error feedback (settle.py puts
``piece - quantize_values(piece)`` back, per span piece, exactly as it does for fp16), and error feedback is what
makes a biased compressor converge (Karimireddy et al. 2019; SparseLoCo's 2-bit values are deterministic too).
Stochastic rounding would add variance error feedback does not need, and the encoder and settle would have to share
its random draws for ``quantize_values`` to equal what the receiver decodes.

Payload: ceil(nnz / CHUNK) little-endian float32 scales, then the codes packed from the low bits of each byte
(int4: entry 2i in the low nibble of byte i), the last byte's unused bits zero. A receiver checks the length from
nnz alone, every scale finite, >= 0 and small enough that no level overflows float32, and the padding bits zero,
before it builds the values. Pure numpy; no I/O.
"""

from __future__ import annotations

import math

import numpy as np

CHUNK = 128  # entries per scale: 0.25 bits of scale per entry
INT_BITS = {"int8": 8, "int4": 4, "int2": 2}
_SCALE = np.dtype("<f4")
_MAX_SCALE = float(np.finfo(np.float32).max) / 256  # (2^(b-1) - 1/2) * scale stays finite for every b <= 8


def int_payload_bytes(codec: str, nnz: int) -> int:
    bits = INT_BITS[codec]
    return math.ceil(nnz / CHUNK) * _SCALE.itemsize + math.ceil(nnz * bits / 8)


def _pack(codes: np.ndarray, bits: int) -> bytes:
    per = 8 // bits
    padded = np.zeros(math.ceil(codes.size / per) * per, np.uint8)
    padded[:codes.size] = codes
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8).tobytes()


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    codes = ((packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)
    if np.any(codes[count:]):
        raise ValueError("int codes: the last byte's unused bits are not zero")
    return codes[:count]


def encode_int(values: np.ndarray, codec: str) -> bytes:
    """Finite float32 ``values`` (our own) as scales + packed codes."""
    bits = INT_BITS[codec]
    half = 1 << (bits - 1)
    n = values.size
    chunks = math.ceil(n / CHUNK)
    padded = np.zeros(chunks * CHUNK, np.float32)
    padded[:n] = values
    blocks = padded.reshape(chunks, CHUNK)  # (chunks, CHUNK)
    scale = (np.abs(blocks).max(axis=1) / np.float32(half - 0.5)).astype(np.float32)  # (chunks,)
    if scale.size and float(scale.max()) > _MAX_SCALE:
        raise ValueError(f"values too large for {codec} (max |v| {float(np.abs(values).max()):.3g})")
    safe = np.where(scale > 0, scale, np.float32(1.0))
    levels = np.clip(np.floor(blocks / safe[:, None]), -half, half - 1)  # nearest level: (floor + 1/2) * scale
    codes = (levels.reshape(-1)[:n] + half).astype(np.uint8)
    return scale.astype(_SCALE).tobytes() + _pack(codes, bits)


def decode_int(buf: np.ndarray, codec: str, nnz: int) -> np.ndarray:
    """(nnz,) float32 from a uint8 ``buf``; ValueError naming what is wrong."""
    bits = INT_BITS[codec]
    half = 1 << (bits - 1)
    expected = int_payload_bytes(codec, nnz)
    if buf.size != expected:
        raise ValueError(f"{codec} payload of {buf.size} bytes for nnz={nnz} (expected {expected})")
    chunks = math.ceil(nnz / CHUNK)
    scale = buf[:chunks * _SCALE.itemsize].view(_SCALE).astype(np.float32)
    if scale.size and not (np.isfinite(scale).all() and scale.min() >= 0 and scale.max() <= _MAX_SCALE):
        raise ValueError(f"{codec} scales must be finite, >= 0 and <= {_MAX_SCALE:.3g}")
    codes = _unpack(buf[chunks * _SCALE.itemsize:], bits, nnz)
    levels = codes.astype(np.float32) - np.float32(half - 0.5)
    return (levels * np.repeat(scale, CHUNK)[:nnz]).astype(np.float32)
