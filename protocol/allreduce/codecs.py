"""Byte encodings of sparse updates: index codecs, value codecs, and Codec objects that combine them.

    index codecs  "rice"          Golomb-Rice coded gaps (rice.py): ~log2(e/density) bits, 1.03 B/index at 1%
                  "delta-varint"  first index, then gaps, each as an LEB128 varint (~1.3 B/index at 1%)
                  "bitmap"        np.packbits of the support, ceil(size/8) bytes (smaller above ~1/8 density)
                  "dense"         no bytes: every index 0..size-1 (nnz == size)
    value codecs  "fp16"          little-endian IEEE half, clipped to +-65504 (the default)
                  "fp32"          little-endian IEEE single
                  "int8", "int4", "int2"   b-bit codes with a float32 scale per 128 entries (quantize.py):
                                  sparse parts only (no zero level), 8.25 / 4.25 / 2.25 bits per entry
    Codec         compress(update) -> EncodedUpdate; extract(encoded, size) -> SparseUpdate; ratio(update)
    SparseCodec   index codec (or "auto": the smallest) + value codec
    DenseCodec    the full vector ("dense" indices) + value codec
    smallest_encoding(update)     sparse or dense, whichever is fewer bytes (the all-gather's choice)

No msgpack here: the frame layer carries the codec names, nnz and the two payloads in its own maps and
passes them to ``extract`` / ``decode_*``, which check everything from a peer before allocating anything
larger than the payload itself or the receiver's own expected ``size``; any violation raises CodecError
(a ValueError) with a one-line reason. Encoders take our own data and raise plain ValueError.

fp16 clipping: a value beyond +-65504 (the largest finite half) would become Inf and make every receiver
reject the frame, so encode_values("fp16") clips it to +-65504 instead. Pass
``lambda v: quantize_values(v, "fp16")`` to ErrorFeedbackSparsifier.select so that the clipped excess and
the rounding error stay in the error-feedback residual rather than being lost.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from protocol.allreduce.quantize import INT_BITS, decode_int, encode_int, int_payload_bytes
from protocol.allreduce.rice import decode_rice, encode_rice, rice_bytes
from protocol.allreduce.sparsify import SparseUpdate

INDEX_CODECS = ("rice", "delta-varint", "bitmap", "dense")
FLOAT_CODECS: dict[str, np.dtype[np.floating[Any]]] = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}
VALUE_CODECS = (*FLOAT_CODECS, *INT_BITS)  # every value codec's name
FP16_MAX = float(np.finfo(np.float16).max)  # 65504.0
MAX_SIZE = 1 << 62  # vector length bound: varints stay <= 9 bytes and every index fits int64
DENSE_FP32_BYTES = 4  # the baseline of ratio(): a dense float32 vector


class CodecError(ValueError):
    """Bytes from a peer that are not a valid encoding for what the receiver expects."""


def _is_int(v: object) -> TypeGuard[int | np.integer[Any]]:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _as_buffer(payload: object, what: str) -> np.ndarray:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"{what} payload must be bytes, got {type(payload).__name__}")
    try:
        return np.frombuffer(payload, np.uint8)
    except (ValueError, TypeError, BufferError) as e:  # e.g. a non-contiguous memoryview
        raise CodecError(f"{what} payload is not a contiguous byte buffer: {e}") from None


def _check_size_nnz(size: object, nnz: object) -> tuple[int, int]:
    if not _is_int(size) or not 0 <= size <= MAX_SIZE:
        raise CodecError(f"size must be an int in [0, {MAX_SIZE}], got {size!r}")
    if not _is_int(nnz) or not 0 <= nnz <= size:
        raise CodecError(f"nnz must be an int in [0, size={size}], got {nnz!r}")
    return int(size), int(nnz)


def _max_varint_len(size: int) -> int:
    """Bytes of the longest canonical varint for a value < size (every index and gap is < size)."""
    return max(1, math.ceil(max(size - 1, 0).bit_length() / 7))


def _varint_lengths(vals: np.ndarray) -> np.ndarray:
    lens = np.ones(vals.size, np.int64)
    for j in range(1, 10):
        more = vals >= np.uint64(1 << (7 * j))
        if not more.any():
            break
        lens += more
    return lens


def _check_indices(indices: object, size: object) -> np.ndarray:
    if not _is_int(size) or not 0 <= size <= MAX_SIZE:
        raise ValueError(f"size must be an int in [0, {MAX_SIZE}], got {size!r}")
    if not isinstance(indices, np.ndarray) or indices.ndim != 1 or indices.dtype != np.int64:
        raise ValueError("indices must be a 1-D int64 array")
    if indices.size:
        if indices[0] < 0 or indices[-1] >= size:
            raise ValueError(f"indices out of range [0, {size})")
        if not bool(np.all(indices[1:] > indices[:-1])):
            raise ValueError("indices must be strictly increasing")
    return indices


def _gaps(indices: np.ndarray) -> np.ndarray:
    """(nnz,) uint64: the first index, then the differences (each >= 1)."""
    gaps = np.empty(indices.size, np.uint64)
    if indices.size:
        gaps[0] = indices[0]
        np.subtract(indices[1:], indices[:-1], out=gaps[1:], casting="unsafe")
    return gaps


# ---- index codecs -------------------------------------------------------------------------------------


def encode_varints(vals: np.ndarray) -> bytes:
    """LEB128 of each uint64 in ``vals``, vectorised over byte positions (at most 10 passes)."""
    if not isinstance(vals, np.ndarray) or vals.ndim != 1 or vals.dtype != np.uint64:
        raise ValueError("vals must be a 1-D uint64 array")
    lens = _varint_lengths(vals)
    ends = np.cumsum(lens)
    out = np.empty(int(ends[-1]) if vals.size else 0, np.uint8)
    starts = ends - lens
    for j in range(int(lens.max()) if vals.size else 0):
        if j == 0:
            pos, v, cont = starts, vals, lens > 1
        else:
            sel = np.flatnonzero(lens > j)
            pos, v, cont = starts[sel] + j, vals[sel], lens[sel] > j + 1
        out[pos] = ((v >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8) | (cont.astype(np.uint8) << 7)
    return out.tobytes()


def decode_varints(b: np.ndarray, count: int, max_len: int) -> np.ndarray:
    """(count,) uint64 from canonical LEB128 bytes ``b`` holding exactly ``count`` varints of <= max_len."""
    if b.size == 0:
        if count:
            raise CodecError(f"empty payload for {count} varints")
        return np.empty(0, np.uint64)
    if b[-1] & 0x80:
        raise CodecError("truncated varint at the end of the payload")
    ends = np.flatnonzero(b < 0x80)  # last byte of each varint; allocation bounded by len(b)
    if ends.size != count:
        what = "trailing bytes: " if ends.size > count else ""
        raise CodecError(f"{what}payload holds {ends.size} varints, expected {count}")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts + 1
    if int(lens.max()) > max_len:
        raise CodecError(f"overlong varint: {int(lens.max())} bytes where at most {max_len} fit the size")
    if bool(np.any((b[ends] == 0) & (lens > 1))):
        raise CodecError("overlong varint: non-canonical trailing zero byte")
    vals = (b[starts] & 0x7F).astype(np.uint64)
    for j in range(1, int(lens.max())):
        sel = np.flatnonzero(lens > j)
        vals[sel] |= (b[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return vals


def _decode_delta_varint(buf: np.ndarray, size: int, nnz: int) -> np.ndarray:
    max_len = _max_varint_len(size)
    if not nnz <= buf.size <= nnz * max_len:
        raise CodecError(f"delta-varint payload of {buf.size} bytes for nnz={nnz} (allowed {nnz}..{nnz * max_len})")
    gaps = decode_varints(buf, nnz, max_len)
    if nnz == 0:
        return np.empty(0, np.int64)
    if bool(np.any(gaps >= np.uint64(size))):
        raise CodecError(f"index out of range: a gap or first index >= size {size}")
    if nnz > 1 and bool(np.any(gaps[1:] == 0)):
        raise CodecError("duplicate index (zero gap)")
    idx = np.cumsum(gaps)  # each gap < size <= 2**62 and nnz <= size: a wrap would show as a decrease
    if idx[-1] >= np.uint64(size) or (nnz > 1 and not bool(np.all(idx[1:] > idx[:-1]))):
        raise CodecError(f"index out of range: indices reach past size {size}")
    return idx.astype(np.int64)


def _decode_bitmap(buf: np.ndarray, size: int, nnz: int) -> np.ndarray:
    want = (size + 7) // 8
    if buf.size != want:
        raise CodecError(f"bitmap of {buf.size} bytes for size {size} (expected {want})")
    if size % 8 and buf[-1] & ((1 << (8 - size % 8)) - 1):
        raise CodecError(f"index out of range: bitmap bits set past size {size}")
    count = int(np.bitwise_count(buf).sum(dtype=np.int64))
    if count != nnz:
        raise CodecError(f"bitmap holds {count} indices, expected nnz={nnz}")
    return np.flatnonzero(np.unpackbits(buf, count=size)).astype(np.int64, copy=False)


def _index_bytes(name: str, indices: np.ndarray, size: int) -> int:
    """Payload bytes of ``indices`` in index codec ``name`` ("auto": the smallest)."""
    if name == "auto":
        return 0 if indices.size == size else min(rice_bytes(indices), (size + 7) // 8)
    if name == "rice":
        return rice_bytes(indices)
    if name == "delta-varint":
        return int(_varint_lengths(_gaps(indices)).sum())
    return (size + 7) // 8 if name == "bitmap" else 0


def choose_index_codec(indices: np.ndarray, size: int) -> str:
    """The index codec with the fewest bytes: "dense" (0 B) if nnz == size, else rice or bitmap (ties: rice)."""
    indices = _check_indices(indices, size)
    if indices.size == size:
        return "dense"
    return "rice" if rice_bytes(indices) <= (size + 7) // 8 else "bitmap"


def encode_indices(indices: np.ndarray, size: int, codec: str = "auto") -> tuple[str, bytes]:
    """(codec name, payload) for sorted unique int64 ``indices`` < size; codec "auto" picks the smallest."""
    _check_indices(indices, size)
    if codec == "auto":  # rice unless every index is there (dense) or a bitmap is smaller: one encoding either way
        if indices.size == size:
            return "dense", b""
        payload = encode_rice(indices)
        return ("rice", payload) if len(payload) <= (size + 7) // 8 else encode_indices(indices, size, "bitmap")
    if codec == "rice":
        return codec, encode_rice(indices)
    if codec == "delta-varint":
        return codec, encode_varints(_gaps(indices))
    if codec == "bitmap":
        mask = np.zeros(size, np.bool_)
        mask[indices] = True
        return codec, np.packbits(mask).tobytes()
    if codec == "dense":
        if indices.size != size:
            raise ValueError(f"dense index codec needs all {size} indices, got {indices.size}")
        return codec, b""
    raise ValueError(f"unknown index codec {codec!r}; expected 'auto' or one of {INDEX_CODECS}")


def decode_indices(codec: object, payload: object, size: int, nnz: object) -> np.ndarray:
    """(nnz,) int64 strictly increasing indices < size, or CodecError. ``size`` is the receiver's own."""
    size, nnz = _check_size_nnz(size, nnz)
    buf = _as_buffer(payload, "index")
    if not isinstance(codec, str):
        raise CodecError(f"unknown index codec {str(codec)[:32]!r}")
    if codec == "rice":
        try:
            return decode_rice(buf, size, nnz)
        except ValueError as e:
            raise CodecError(str(e)) from None
    if codec == "delta-varint":
        return _decode_delta_varint(buf, size, nnz)
    if codec == "bitmap":
        return _decode_bitmap(buf, size, nnz)
    if codec == "dense":
        if nnz != size or buf.size:
            raise CodecError(f"dense indices need nnz == size ({nnz} vs {size}) and an empty payload")
        return np.arange(size, dtype=np.int64)
    raise CodecError(f"unknown index codec {str(codec)[:32]!r}")


# ---- value codecs -------------------------------------------------------------------------------------


def value_bytes(codec: str, nnz: int) -> int:
    """Bytes of ``nnz`` values in ``codec``."""
    _check_value_codec(codec)
    return int_payload_bytes(codec, nnz) if codec in INT_BITS else nnz * FLOAT_CODECS[codec].itemsize


def quantize_values(values: np.ndarray, codec: str = "fp16") -> np.ndarray:
    """(nnz,) float32: exactly what ``decode_values(codec, encode_values(values, codec), nnz)`` returns."""
    _check_value_codec(codec)
    if codec in INT_BITS:
        return decode_int(np.frombuffer(encode_values(np.asarray(values, np.float32), codec), np.uint8), codec,
                          len(values))
    if codec == "fp32":
        return np.array(values, np.float32)
    return np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float32)


def select_quantizer(codec: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """What ErrorFeedbackSparsifier.select should round the selected values to before the wire: fp16/fp32 as
    sent (the rounding stays in the residual); None for integer values, whose scales are per chunk of each span
    piece on the wire -- settle() puts that per-piece rounding back instead, so they are rounded once."""
    _check_value_codec(codec)
    return None if codec in INT_BITS else functools.partial(quantize_values, codec=codec)


def encode_values(values: np.ndarray, codec: str = "fp16") -> bytes:
    """Little-endian bytes of finite float32 ``values``; fp16 clips to +-65504 (see module docstring)."""
    _check_value_codec(codec)
    if not isinstance(values, np.ndarray) or values.ndim != 1 or values.dtype != np.float32:
        raise ValueError("values must be a 1-D float32 array")
    if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
        raise ValueError("values hold NaN or Inf")
    if codec in INT_BITS:
        return encode_int(values, codec)
    if codec == "fp16":
        values = np.clip(values, -FP16_MAX, FP16_MAX)
    return values.astype(FLOAT_CODECS[codec], copy=False).tobytes()


def decode_values(codec: object, payload: object, nnz: object) -> np.ndarray:
    """(nnz,) float32, writable, finite, or CodecError (unknown codec, wrong byte length, NaN/Inf)."""
    if not isinstance(codec, str) or codec not in VALUE_CODECS:
        raise CodecError(f"unknown value codec {str(codec)[:32]!r}")
    if not _is_int(nnz) or not 0 <= int(nnz) <= MAX_SIZE:  # int(): numpy's nnz * itemsize would wrap around
        raise CodecError(f"nnz must be an int in [0, {MAX_SIZE}], got {nnz!r:.40}")
    nnz = int(nnz)
    buf = _as_buffer(payload, "value")
    if codec in INT_BITS:
        try:
            return decode_int(buf, codec, nnz)
        except ValueError as e:
            raise CodecError(str(e)) from None
    dtype = FLOAT_CODECS[codec]
    if buf.size != nnz * dtype.itemsize:
        raise CodecError(f"{codec} payload of {buf.size} bytes for nnz={nnz} (expected {nnz * dtype.itemsize})")
    out = buf.view(dtype).astype(np.float32)  # a fresh, writable copy
    if out.size and not (np.isfinite(out.min()) and np.isfinite(out.max())):
        raise CodecError("values hold NaN or Inf")
    return out


# ---- codecs over whole updates ------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedUpdate:
    """The parts of one sparse update as they go into a frame (names, count, two payloads)."""

    index_codec: str  # one of INDEX_CODECS
    value_codec: str  # one of VALUE_CODECS
    nnz: int  # number of entries
    indices: bytes  # index payload
    values: bytes  # value payload

    @property
    def nbytes(self) -> int:
        return len(self.indices) + len(self.values)


def extract_update(encoded: EncodedUpdate, size: int) -> SparseUpdate:
    """Decode any EncodedUpdate for a vector of the receiver's ``size``; CodecError on any violation."""
    if not isinstance(encoded, EncodedUpdate):
        raise CodecError(f"expected an EncodedUpdate, got {type(encoded).__name__}")
    if not isinstance(encoded.value_codec, str) or encoded.value_codec not in VALUE_CODECS:
        raise CodecError(f"unknown value codec {str(encoded.value_codec)[:32]!r}")
    size, nnz = _check_size_nnz(size, encoded.nnz)
    values = decode_values(encoded.value_codec, encoded.values, nnz)  # length-checked before indices
    indices = decode_indices(encoded.index_codec, encoded.indices, size, nnz)
    return SparseUpdate(indices, values, size)


class Codec(ABC):
    """compress / extract / ratio over SparseUpdates (the interface of hivemind/compression/base.py)."""

    value_codec: str

    @abstractmethod
    def compress(self, update: SparseUpdate) -> EncodedUpdate:
        """Encode ``update``; values are rounded by the value codec (see quantize_values)."""

    def extract(self, encoded: EncodedUpdate, size: int) -> SparseUpdate:
        """Decode what any codec compressed, for a vector of the receiver's own ``size``."""
        return extract_update(encoded, size)

    def nbytes(self, update: SparseUpdate) -> int:
        """Payload bytes ``compress(update)`` produces."""
        return self.compress(update).nbytes

    def ratio(self, update: SparseUpdate) -> float:
        """Compressed payload bytes / dense float32 bytes of the same vector (lower is better)."""
        return self.nbytes(update) / max(1, DENSE_FP32_BYTES * update.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value_codec!r})"


def _check_value_codec(value_codec: str) -> str:
    if value_codec not in VALUE_CODECS:
        raise ValueError(f"unknown value codec {value_codec!r}; expected one of {tuple(VALUE_CODECS)}")
    return value_codec


class SparseCodec(Codec):
    """Indices by ``index_codec`` ("auto" = the smallest of INDEX_CODECS) and values by ``value_codec``."""

    def __init__(self, value_codec: str = "fp16", index_codec: str = "auto") -> None:
        self.value_codec = _check_value_codec(value_codec)
        if index_codec != "auto" and index_codec not in INDEX_CODECS:
            raise ValueError(f"unknown index codec {index_codec!r}; expected 'auto' or one of {INDEX_CODECS}")
        self.index_codec = index_codec

    def compress(self, update: SparseUpdate) -> EncodedUpdate:
        name, idx = encode_indices(update.indices, update.size, self.index_codec)
        return EncodedUpdate(name, self.value_codec, update.nnz, idx, encode_values(update.values, self.value_codec))

    def nbytes(self, update: SparseUpdate) -> int:
        return _index_bytes(self.index_codec, update.indices, update.size) + value_bytes(self.value_codec, update.nnz)

    def __repr__(self) -> str:
        return f"SparseCodec({self.value_codec!r}, {self.index_codec!r})"


class DenseCodec(Codec):
    """The whole vector (zeros included) with "dense" indices: 0 index bytes, size values."""

    def __init__(self, value_codec: str = "fp32") -> None:
        self.value_codec = _check_value_codec(value_codec)
        if value_codec in INT_BITS:  # no zero level: every zero of the vector would come back as +-scale/2
            raise ValueError(f"{value_codec} values are for sparse updates only (a dense vector's zeros have no "
                             "level)")

    def compress(self, update: SparseUpdate) -> EncodedUpdate:
        values = encode_values(update.to_dense(), self.value_codec)
        return EncodedUpdate("dense", self.value_codec, update.size, b"", values)

    def nbytes(self, update: SparseUpdate) -> int:
        return value_bytes(self.value_codec, update.size)


def smallest_encoding(update: SparseUpdate, value_codec: str = "fp16") -> EncodedUpdate:
    """``update`` sparse (smallest index codec) or dense, whichever payload is smaller; ties go sparse. Integer
    value codecs always go sparse (a full support costs no index bytes: the "dense" index codec)."""
    sparse = SparseCodec(value_codec)
    if value_codec in INT_BITS:
        return sparse.compress(update)
    dense = DenseCodec(value_codec)
    return (dense if dense.nbytes(update) < sparse.nbytes(update) else sparse).compress(update)
