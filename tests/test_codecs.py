"""protocol/allreduce/codecs.py: one suite every codec must pass, then every malformed payload (CodecError)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from protocol.allreduce.codecs import (
    FP16_MAX,
    Codec,
    CodecError,
    DenseCodec,
    EncodedUpdate,
    SparseCodec,
    choose_index_codec,
    decode_indices,
    decode_values,
    decode_varints,
    encode_indices,
    encode_values,
    encode_varints,
    extract_update,
    quantize_values,
    smallest_encoding,
)
from protocol.allreduce.sparsify import SparseUpdate

SIZE = 10_007  # not a multiple of 8: the bitmap's last byte is partial

CODECS: list[Codec] = [
    SparseCodec("fp32", "delta-varint"),
    SparseCodec("fp16", "delta-varint"),
    SparseCodec("fp32", "bitmap"),
    SparseCodec("fp16", "bitmap"),
    SparseCodec("fp32", "auto"),
    SparseCodec("fp16", "auto"),
    DenseCodec("fp32"),
    DenseCodec("fp16"),
    SparseCodec("int8", "auto"),
    SparseCodec("int4", "delta-varint"),
    SparseCodec("int2", "bitmap"),
    SparseCodec("int2", "auto"),
    SparseCodec("fp16", "rice"),
    SparseCodec("int2", "rice"),
]


def random_update(density: float, seed: int, size: int = SIZE) -> SparseUpdate:
    rng = np.random.default_rng(seed)
    nnz = round(density * size)
    idx = np.sort(rng.choice(size, nnz, replace=False)).astype(np.int64)
    return SparseUpdate(idx, rng.standard_normal(nnz).astype(np.float32) * np.float32(10), size)


def one(index: int, value: float = -3.25, size: int = SIZE) -> SparseUpdate:
    return SparseUpdate(np.array([index], np.int64), np.array([value], np.float32), size)


def empty(size: int = SIZE) -> SparseUpdate:
    return SparseUpdate(np.empty(0, np.int64), np.empty(0, np.float32), size)


UPDATES = {
    "density=0.001": random_update(0.001, 1),
    "density=0.01": random_update(0.01, 2),
    "density=0.3": random_update(0.3, 3),
    "density=1.0": random_update(1.0, 4),
    "empty": empty(),
    "first": one(0),
    "last": one(SIZE - 1),
    "size=1": one(0, 2.0, size=1),
    "size=0": empty(0),
}


# ---- the shared suite ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=repr)
@pytest.mark.parametrize("name", list(UPDATES))
def test_round_trip(codec: Codec, name: str) -> None:
    update = UPDATES[name]
    encoded = codec.compress(update)
    assert isinstance(encoded.indices, bytes) and isinstance(encoded.values, bytes)
    got = codec.extract(encoded, update.size)
    expected = np.zeros(update.size, np.float32)
    expected[update.indices] = quantize_values(update.values, codec.value_codec)
    np.testing.assert_array_equal(got.to_dense(), expected)
    assert got.values.dtype == np.float32 and got.indices.dtype == np.int64
    if isinstance(codec, SparseCodec):
        np.testing.assert_array_equal(got.indices, update.indices)
    assert codec.nbytes(update) == encoded.nbytes
    assert codec.ratio(update) == pytest.approx(encoded.nbytes / max(1, 4 * update.size))
    # any codec's output decodes through the generic path too (the receiver does not know the codec object)
    np.testing.assert_array_equal(extract_update(encoded, update.size).to_dense(), expected)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
@pytest.mark.parametrize(
    "corrupt",
    [
        lambda e: dataclasses.replace(e, nnz=e.nnz + 1),
        lambda e: dataclasses.replace(e, nnz=-1),
        lambda e: dataclasses.replace(e, nnz=True),
        lambda e: dataclasses.replace(e, values=e.values[:-1]),
        lambda e: dataclasses.replace(e, values=e.values + b"\x00"),
        lambda e: dataclasses.replace(e, values=b"\xff" * len(e.values)),  # NaN in fp16 and fp32
        lambda e: dataclasses.replace(e, indices=e.indices + b"\x01"),
        lambda e: dataclasses.replace(e, indices=e.indices[:-1] if e.indices else b"\x01"),
        lambda e: dataclasses.replace(e, index_codec="zstd"),
        lambda e: dataclasses.replace(e, value_codec="bf16"),
        lambda e: dataclasses.replace(e, index_codec=None),
        lambda e: dataclasses.replace(e, indices="text"),
    ],
)
def test_corrupted_encodings_raise_codec_error(codec: Codec, corrupt) -> None:
    encoded = corrupt(codec.compress(random_update(0.01, 5)))
    with pytest.raises(CodecError):
        codec.extract(encoded, SIZE)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_wrong_expected_size_raises_codec_error(codec: Codec) -> None:
    update = SparseUpdate(np.array([3, SIZE - 1], np.int64), np.array([1, 2], np.float32), SIZE)
    encoded = codec.compress(update)
    with pytest.raises(CodecError):
        codec.extract(encoded, SIZE - 8)  # the last index, the bitmap length, the dense count: all too big
    with pytest.raises(CodecError):
        codec.extract(encoded, -1)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_garbage_payloads_never_raise_anything_but_codec_error(codec: Codec) -> None:
    rng = np.random.default_rng(99)
    good = codec.compress(random_update(0.01, 7))
    for _ in range(50):
        nnz = int(rng.integers(0, 200))
        junk_i = rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
        junk_v = rng.integers(0, 256, nnz * int(rng.choice([2, 4])), dtype=np.uint8).tobytes()
        bad = dataclasses.replace(good, nnz=nnz, indices=junk_i, values=junk_v)
        try:
            update = codec.extract(bad, SIZE)
        except CodecError:
            continue
        assert update.nnz == nnz and bool(np.all(np.isfinite(update.values)))  # accepted only if valid


# ---- index codecs -------------------------------------------------------------------------------------


def leb128(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def test_varints_match_a_reference_leb128() -> None:
    edges = [0, 1, 127, 128, 255, 16383, 16384, 2**21 - 1, 2**21, 2**35, 2**56 - 1, 2**56, 2**63 - 1, 2**64 - 1]
    rand = np.random.default_rng(0).integers(0, 2**62, 500, dtype=np.uint64).tolist()
    vals = edges + rand
    arr = np.array(vals, np.uint64)
    payload = encode_varints(arr)
    assert payload == b"".join(leb128(v) for v in vals)
    np.testing.assert_array_equal(decode_varints(np.frombuffer(payload, np.uint8), len(vals), 10), arr)
    assert encode_varints(np.empty(0, np.uint64)) == b""
    with pytest.raises(ValueError):
        encode_varints(np.array([1, 2], np.int64))


def test_delta_varint_at_the_largest_sizes() -> None:
    size = 2**62
    idx = np.array([0, 1, 2**40, size - 1], np.int64)
    name, payload = encode_indices(idx, size, "delta-varint")
    np.testing.assert_array_equal(decode_indices(name, payload, size, 4), idx)


def test_choose_index_codec_picks_the_smaller() -> None:
    sparse, denser = UPDATES["density=0.01"], random_update(0.6, 3)  # rice beats a bitmap up to ~40%
    assert choose_index_codec(sparse.indices, SIZE) == "rice"
    assert choose_index_codec(denser.indices, SIZE) == "bitmap"
    assert choose_index_codec(np.arange(SIZE, dtype=np.int64), SIZE) == "dense"
    assert choose_index_codec(np.empty(0, np.int64), SIZE) == "rice"
    for u in (sparse, denser):
        sizes = {c: len(encode_indices(u.indices, SIZE, c)[1]) for c in ("rice", "bitmap")}
        name, payload = encode_indices(u.indices, SIZE)
        assert len(payload) == min(sizes.values()) and name == min(sizes, key=sizes.get)


def test_one_percent_costs_under_two_bytes_per_index() -> None:
    u = random_update(0.01, 8, size=1_000_000)
    name, payload = encode_indices(u.indices, u.size, "delta-varint")
    assert len(payload) < 2 * u.nnz


@pytest.mark.parametrize("density", [0.001, 0.01, 0.05])
def test_rice_indices_cost_within_two_percent_of_the_gaps_entropy(density: float) -> None:
    """A random support of nnz in size has log2(C(size, nnz)) bits of entropy, ~log2(e / density) per index."""
    u = random_update(density, 8, size=1_000_000)
    name, payload = encode_indices(u.indices, u.size)
    entropy_bits = (math.lgamma(u.size + 1) - math.lgamma(u.nnz + 1) - math.lgamma(u.size - u.nnz + 1)) / math.log(2)
    assert name == "rice" and 8 * len(payload) <= 1.02 * entropy_bits + 64
    varint = len(encode_indices(u.indices, u.size, "delta-varint")[1])
    assert len(payload) < varint  # 1.03 against 1.28 bytes per index at 1%
    np.testing.assert_array_equal(decode_indices(name, payload, u.size, u.nnz), u.indices)


@pytest.mark.parametrize("idx, size", [
    ([0], 1), ([4], 5), ([0, 1, 2, 3, 4], 5), ([0, 2**61, 2**62 - 1], 2**62), ([2**62 - 1], 2**62),
    ([3, 700, 701, 702, 9000], 10_007), (list(range(0, 10_007, 2)), 10_007),
])
def test_rice_round_trips_at_the_edges(idx: list[int], size: int) -> None:
    indices = np.array(idx, np.int64)
    name, payload = encode_indices(indices, size, "rice")
    np.testing.assert_array_equal(decode_indices(name, payload, size, len(idx)), indices)


def _rice(k: int, rems: list[int], quotients: list[int], pad: int = 0) -> bytes:
    """A hand-built rice payload (see protocol/allreduce/rice.py): k, remainders, unary quotients."""
    rem_bits = [(r >> j) & 1 for r in rems for j in range(k)] + [1] * pad
    unary = [b for q in quotients for b in [0] * q + [1]]
    pack = lambda bits: np.packbits(np.array(bits, np.uint8), bitorder="little").tobytes()  # noqa: E731
    return bytes([k]) + (pack(rem_bits) if rem_bits else b"") + pack(unary)


@pytest.mark.parametrize(
    "codec, payload, size, nnz, match",
    [
        ("delta-varint", b"\x80", 1000, 1, "truncated varint"),
        ("delta-varint", b"\x05\x80", 1000, 1, "truncated varint"),
        ("delta-varint", b"\x81\x80\x01\x01", 1000, 2, "overlong varint"),  # 3 bytes where 2 fit size
        ("delta-varint", b"\x85\x00", 1000, 1, "overlong varint"),  # non-canonical 0 terminator
        ("delta-varint", b"\x64", 100, 1, "out of range"),  # first index == size
        ("delta-varint", b"\x32\x32", 100, 2, "out of range"),  # 50 + 50 == size
        ("delta-varint", b"\xff\x7f", 16000, 1, "out of range"),  # 16383
        ("delta-varint", b"\x05\x00", 100, 2, "duplicate"),
        ("delta-varint", b"\x05\x06", 1000, 1, "trailing bytes"),
        ("delta-varint", b"\x05\x06", 100, 1, "delta-varint payload of 2 bytes"),  # past nnz * max length
        ("delta-varint", b"\x00", 100, 0, "delta-varint payload of 1 bytes"),
        ("delta-varint", b"\x01\x01", 100, 3, "delta-varint payload of 2 bytes"),  # too short
        ("delta-varint", b"\x81\x01\x01", 1000, 3, "holds 2 varints"),
        ("delta-varint", b"", 100, 1, "payload of 0 bytes"),
        ("delta-varint", b"\x01", 10, 11, "nnz"),  # more entries than the vector has
        ("delta-varint", b"\x01", 10, -1, "nnz"),
        ("delta-varint", b"\x01", 10, 1.0, "nnz"),
        ("delta-varint", b"\x01", 10, None, "nnz"),
        ("delta-varint", "\x01", 10, 1, "must be bytes"),
        ("delta-varint", [1], 10, 1, "must be bytes"),
        ("bitmap", b"\x00" * 12, 100, 0, "bitmap of 12 bytes"),
        ("bitmap", b"\x00" * 14, 100, 0, "bitmap of 14 bytes"),
        ("bitmap", b"", 100, 0, "bitmap of 0 bytes"),
        ("bitmap", b"\x00\x01", 12, 1, "out of range"),  # bit 15 of a 12-long vector
        ("bitmap", b"\x80\x00", 12, 2, "holds 1 indices"),
        ("bitmap", b"\xff\xf0", 12, 11, "holds 12 indices"),
        ("dense", b"\x00", 4, 4, "dense"),
        ("dense", b"", 4, 3, "dense"),
        ("gzip", b"", 4, 0, "unknown index codec"),
        ("rice", b"", 100, 1, "rice payload of 0 bytes"),
        ("rice", b"\x00", 100, 0, "expected empty"),
        ("rice", b"\x08\x01", 100, 1, "does not fit size"),  # 2^8 > 99: remainders cannot need 8 bits
        ("rice", b"\x00\x01\x00", 100, 1, "trailing zero byte"),
        ("rice", b"\x00\x03", 100, 1, "2 terminators"),
        ("rice", _rice(0, [], [4]), 100, 2, "1 terminators"),
        ("rice", _rice(1, [1], [3], pad=1), 100, 1, "unused bits"),
        ("rice", b"\x04\x00", 100, 20, "too short"),  # 20 remainders of 4 bits need 10 bytes
        ("rice", _rice(0, [], [100]), 100, 1, "reaches past size"),  # first index 100 == size
        ("rice", _rice(3, [4], [12]), 100, 1, "gap or first index >= size"),  # 12 * 8 + 4 = 100
        ("rice", _rice(0, [], [50, 49]), 100, 2, "reach past size"),  # 50, then 50 + 49 + 1 = 100
        ("rice", b"\x01\x00", 10, 11, "nnz"),
        ("", b"", 4, 0, "unknown index codec"),
        (None, b"", 4, 0, "unknown index codec"),
        (b"bitmap", b"\x00", 4, 0, "unknown index codec"),
        (np.array(["bitmap"]), b"\x00", 4, 0, "unknown index codec"),
        ("bitmap", memoryview(b"\x00\x00\x00\x00")[::2], 16, 0, "contiguous"),
    ],
)
def test_malformed_indices(codec: object, payload: object, size: int, nnz: object, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_indices(codec, payload, size, nnz)


def test_index_payload_may_be_bytearray_or_memoryview() -> None:
    u = UPDATES["density=0.01"]
    for name in ("delta-varint", "bitmap"):
        _, payload = encode_indices(u.indices, SIZE, name)
        for wrapped in (bytearray(payload), memoryview(payload)):
            np.testing.assert_array_equal(decode_indices(name, wrapped, SIZE, u.nnz), u.indices)


@pytest.mark.parametrize(
    "indices, size, codec",
    [
        (np.array([2, 1], np.int64), 10, "auto"),
        (np.array([1, 1], np.int64), 10, "delta-varint"),
        (np.array([10], np.int64), 10, "bitmap"),
        (np.array([-1], np.int64), 10, "auto"),
        (np.array([1], np.int32), 10, "auto"),
        ([1], 10, "auto"),
        (np.array([1], np.int64), -1, "auto"),
        (np.array([1], np.int64), 10, "dense"),
        (np.array([1], np.int64), 10, "rle"),
    ],
)
def test_encode_indices_rejects_bad_arguments(indices: object, size: int, codec: str) -> None:
    with pytest.raises(ValueError):
        encode_indices(indices, size, codec)  # type: ignore[arg-type]


# ---- value codecs -------------------------------------------------------------------------------------


def test_fp16_clips_to_the_finite_range() -> None:
    v = np.array([1e6, -1e6, 65519.0, 70000.0, -3.4e38, 1.0], np.float32)
    got = decode_values("fp16", encode_values(v, "fp16"), v.size)
    np.testing.assert_array_equal(got, [FP16_MAX, -FP16_MAX, FP16_MAX, FP16_MAX, -FP16_MAX, 1.0])
    np.testing.assert_array_equal(quantize_values(v, "fp16"), got)


def test_value_round_trips_and_fresh_buffers() -> None:
    v = np.random.default_rng(1).standard_normal(1001).astype(np.float32)
    got = decode_values("fp32", encode_values(v, "fp32"), v.size)
    np.testing.assert_array_equal(got, v)
    got[0] = 5.0  # writable, not a view of the payload
    np.testing.assert_array_equal(decode_values("fp16", encode_values(v, "fp16"), v.size), v.astype(np.float16))
    assert len(encode_values(v, "fp16")) == 2 * v.size and len(encode_values(v, "fp32")) == 4 * v.size


NAN16, INF16 = np.float16(np.nan).tobytes(), np.float16(np.inf).tobytes()
NAN32, NINF32 = np.float32(np.nan).tobytes(), np.float32(-np.inf).tobytes()


@pytest.mark.parametrize(
    "codec, payload, nnz, match",
    [
        ("fp16", b"\x00" * 5, 3, "payload of 5 bytes"),
        ("fp16", b"\x00" * 7, 3, "payload of 7 bytes"),
        ("fp16", b"\x00" * 3, 3, "payload of 3 bytes"),
        ("fp32", b"\x00" * 11, 3, "payload of 11 bytes"),
        ("fp32", b"\x00" * 4, 0, "payload of 4 bytes"),
        ("fp16", b"\x00\x00" + NAN16, 2, "NaN or Inf"),
        ("fp16", INF16 + b"\x00\x00", 2, "NaN or Inf"),
        ("fp32", NAN32, 1, "NaN or Inf"),
        ("fp32", b"\x00" * 4 + NINF32, 2, "NaN or Inf"),
        ("bf16", b"\x00\x00", 1, "unknown value codec"),
        (None, b"", 0, "unknown value codec"),
        ("fp16", b"\x00\x00", -1, "nnz"),
        ("fp16", b"\x00\x00", True, "nnz"),
        ("fp16", "\x00\x00", 1, "must be bytes"),
    ],
)
def test_malformed_values(codec: object, payload: object, nnz: object, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_values(codec, payload, nnz)


@pytest.mark.parametrize(
    "values, codec",
    [
        (np.array([np.nan], np.float32), "fp16"),
        (np.array([np.inf], np.float32), "fp32"),
        (np.array([1.0], np.float64), "fp16"),
        (np.array([[1.0]], np.float32), "fp16"),
        (np.array([1.0], np.float32), "int16"),
    ],
)
def test_encode_values_rejects_bad_arguments(values: np.ndarray, codec: str) -> None:
    with pytest.raises(ValueError):
        encode_values(values, codec)


# ---- whole updates ------------------------------------------------------------------------------------


def test_smallest_encoding_is_sparse_or_dense_whichever_is_smaller() -> None:
    assert smallest_encoding(UPDATES["density=0.01"]).index_codec == "rice"
    assert smallest_encoding(UPDATES["density=0.3"]).index_codec == "rice"
    assert smallest_encoding(random_update(0.6, 3)).index_codec == "bitmap"
    nearly_full = random_update(0.97, 9)  # bitmap + 97% values > 100% values
    encoded = smallest_encoding(nearly_full)
    assert encoded.index_codec == "dense" and encoded.nbytes == 2 * SIZE
    np.testing.assert_array_equal(
        extract_update(encoded, SIZE).to_dense(), quantize_values(nearly_full.to_dense(), "fp16")
    )


def test_one_percent_fp16_ratio_is_about_three_bytes_per_entry() -> None:
    u = random_update(0.01, 10, size=1_000_000)
    ratio = SparseCodec().ratio(u)
    assert ratio < 0.01 * 3.5 / 4  # < 3.5 bytes per sent entry against 4 per dense entry
    assert DenseCodec("fp32").ratio(u) == 1.0 and DenseCodec("fp16").ratio(u) == 0.5


def test_codec_constructors_and_extract_validate() -> None:
    with pytest.raises(ValueError):
        SparseCodec("fp8")
    with pytest.raises(ValueError):
        SparseCodec("fp16", "huffman")
    with pytest.raises(ValueError):
        DenseCodec("int8")
    with pytest.raises(CodecError):
        extract_update({"nnz": 0}, 10)  # type: ignore[arg-type]
    ok = EncodedUpdate("delta-varint", "fp16", 0, b"", b"")
    assert extract_update(ok, 10).nnz == 0


# ---- integer value codecs (protocol/allreduce/quantize.py) ----------------------------------------------------


@pytest.mark.parametrize("codec, bits", [("int8", 8), ("int4", 4), ("int2", 2)])
def test_int_codecs_put_each_value_on_its_nearest_level_with_the_chunk_max_exact(codec: str, bits: int) -> None:
    from protocol.allreduce.quantize import CHUNK, int_payload_bytes

    rng = np.random.default_rng(bits)
    v = (rng.standard_normal(3 * CHUNK + 5) * 10).astype(np.float32)  # 4 chunks, the last one partial
    got = quantize_values(v, codec)
    np.testing.assert_array_equal(got, decode_values(codec, encode_values(v, codec), v.size))
    half = 2 ** (bits - 1)
    for c in range(4):
        block, q = v[c * CHUNK:(c + 1) * CHUNK], got[c * CHUNK:(c + 1) * CHUNK]
        scale = np.float32(np.abs(block).max() / np.float32(half - 0.5))
        i = int(np.argmax(np.abs(block)))
        assert q[i] == pytest.approx(block[i], rel=1e-6)  # the largest magnitude sits on the top level
        assert np.all(np.abs(q - block) <= scale / 2 * (1 + 1e-5))  # nearest of levels scale apart
        assert len(np.unique(np.round(q / scale - 0.5))) <= 2**bits and np.all(q != 0)  # no zero level
    assert len(encode_values(v, codec)) == int_payload_bytes(codec, v.size) == 4 * 4 + math.ceil(v.size * bits / 8)


def test_int_codecs_are_a_few_bits_per_entry_at_one_percent() -> None:
    u = random_update(0.01, 11, size=1_000_000)
    per_entry = {c: SparseCodec(c).nbytes(u) / u.nnz for c in ("fp16", "int8", "int4", "int2")}
    assert per_entry["int2"] < per_entry["int4"] < per_entry["int8"] < per_entry["fp16"]
    assert per_entry["int2"] < 0.6 * per_entry["fp16"]  # the indices (~1.3 B) now cost more than the values
    assert smallest_encoding(random_update(1.0, 12), "int4").index_codec == "dense"  # full support: no index bytes


@pytest.mark.parametrize(
    "codec, payload, nnz, match",
    [
        ("int4", b"\x00\x00\x80\x3f" + b"\x12", 3, "payload of 5 bytes"),  # 3 codes need 2 bytes
        ("int4", b"\x00\x00\x80\x3f" + b"\x12\xf0", 3, "unused bits"),  # a 4th code in the padding
        ("int2", b"\x00\x00\xc0\x7f" + b"\x00", 2, "scales must be finite"),  # NaN scale
        ("int2", b"\x00\x00\x80\xbf" + b"\x00", 2, "scales must be finite, >= 0"),  # -1.0
        ("int8", b"\xff\xff\x7f\x7f" + b"\x00", 1, "<= "),  # float32 max: the top level would overflow
        ("int8", b"", 1, "payload of 0 bytes"),
    ],
)
def test_malformed_int_values(codec: str, payload: bytes, nnz: int, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_values(codec, payload, nnz)


def test_int_codecs_refuse_dense_vectors_and_values_too_large() -> None:
    with pytest.raises(ValueError, match="sparse updates only"):
        DenseCodec("int4")
    with pytest.raises(ValueError, match="too large for int8"):
        encode_values(np.array([3e38], np.float32), "int8")
    assert decode_values("int2", b"", 0).size == 0 and encode_values(np.zeros(0, np.float32), "int2") == b""
