"""protocol/wire.py: round trips of peer records and capabilities, and WireError on every bad input."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import pytest

from protocol.records.peer import (
    CAPABILITY_SCHEMA_VERSION,
    MAX_ADDRS,
    MAX_GPUS,
    MAX_RECORD_BYTES,
    Capability,
    GpuInfo,
    PeerRecord,
    capability_from_wire,
    capability_to_wire,
    peer_record_from_wire,
    peer_record_to_wire,
)
from protocol.wire import MAX_TEXT, WireError, unpack_bounded

PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"

CPU_ONLY = Capability(
    gpus=(),
    cpu_cores=8,
    ram_bytes=16 * 2**30,
    disk_free_bytes=100 * 2**30,
    tflops_fp32=0.25,
    tflops_bf16=None,
    platform="Linux-6.1-x86_64 / torch 2.13.0+cpu",
)

MULTI_GPU = Capability(
    gpus=(
        GpuInfo("NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0)),
        GpuInfo("NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0)),
        GpuInfo("NVIDIA A100-SXM4-40GB", 40 * 2**30, (8, 0)),
    ),
    cpu_cores=64,
    ram_bytes=512 * 2**30,
    disk_free_bytes=2 * 2**40,
    tflops_fp32=51.2,
    tflops_bf16=612.5,
    platform="Linux-5.15-x86_64 / torch 2.13.0+cu128",
)


def make_record(capability: Capability = CPU_ONLY, **changes) -> PeerRecord:
    record = PeerRecord(
        peer_id=PEER_ID,
        addrs=(f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}", f"/ip6/::1/tcp/31337/p2p/{PEER_ID}"),
        version="0.1.0",
        capability=capability,
        updated_at=1_700_000_000.5,
    )
    return record.replace(**changes)


def record_dict(capability: Capability = CPU_ONLY) -> dict:
    """A valid peer record as the decoded msgpack map, for tests that break one field."""
    return msgpack.unpackb(peer_record_to_wire(make_record(capability)), raw=False)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def assert_wire_error(data: bytes, *fragments: str) -> WireError:
    with pytest.raises(WireError) as info:
        peer_record_from_wire(data)
    message = str(info.value)
    assert message and "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return info.value


# ---- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("capability", [CPU_ONLY, MULTI_GPU], ids=["cpu-only", "multi-gpu"])
def test_capability_round_trip(capability):
    wire = capability_to_wire(capability)
    assert capability_from_wire(wire) == capability
    # and through msgpack, as it travels inside a peer record
    assert capability_from_wire(msgpack.unpackb(pack(wire), raw=False)) == capability


@pytest.mark.parametrize("capability", [CPU_ONLY, MULTI_GPU], ids=["cpu-only", "multi-gpu"])
@pytest.mark.parametrize("leaving", [False, True])
def test_peer_record_round_trip(capability, leaving):
    record = make_record(capability, leaving=leaving)
    data = peer_record_to_wire(record)
    assert isinstance(data, bytes)
    decoded = peer_record_from_wire(data)
    assert decoded == record
    assert decoded.capability.device_kind == ("cuda" if capability.gpus else "cpu")
    assert decoded.schema_version == CAPABILITY_SCHEMA_VERSION


def test_round_trip_preserves_gpu_order_and_compute_capability_as_tuple():
    decoded = peer_record_from_wire(peer_record_to_wire(make_record(MULTI_GPU)))
    assert [g.name for g in decoded.capability.gpus] == [g.name for g in MULTI_GPU.gpus]
    assert all(isinstance(g.compute_capability, tuple) for g in decoded.capability.gpus)
    assert decoded.capability.gpus[2].compute_capability == (8, 0)


def test_integer_throughput_decodes_as_float():
    obj = record_dict()
    obj["capability"]["tflops_fp32"] = 2
    obj["updated_at"] = 1_700_000_000
    decoded = peer_record_from_wire(pack(obj))
    assert decoded.capability.tflops_fp32 == 2.0 and isinstance(decoded.capability.tflops_fp32, float)
    assert isinstance(decoded.updated_at, float)


def test_missing_bf16_means_none():
    obj = record_dict(MULTI_GPU)
    del obj["capability"]["tflops_bf16"]
    assert peer_record_from_wire(pack(obj)).capability.tflops_bf16 is None


def test_accepts_bytearray_and_memoryview():
    data = peer_record_to_wire(make_record(MULTI_GPU))
    assert peer_record_from_wire(bytearray(data)) == make_record(MULTI_GPU)
    assert peer_record_from_wire(memoryview(data)) == make_record(MULTI_GPU)


def test_limits_are_inclusive():
    gpu = GpuInfo("g" * MAX_TEXT, 1, (0, 0))
    cap = dataclasses.replace(CPU_ONLY, gpus=(gpu,) * MAX_GPUS)
    record = make_record(cap, addrs=("/ip4/10.0.0.1/tcp/1",) * MAX_ADDRS, version="v" * MAX_TEXT)
    assert peer_record_from_wire(peer_record_to_wire(record)) == record


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", b"\x81\x01\x02", peer_record_to_wire(make_record()) + b"\x00", bytes(range(256))],
    ids=["empty", "reserved-byte", "truncated", "int-map-key", "trailing-bytes", "garbage"],
)
def test_garbage_bytes(data):
    assert_wire_error(data, "undecodable")


@pytest.mark.parametrize("data", ["a string", None, 123, [b"x"]], ids=["str", "none", "int", "list"])
def test_not_bytes(data):
    assert_wire_error(data, "expected bytes")


@pytest.mark.parametrize("obj", [[1, 2, 3], "peer", 7, None, b"\x80"], ids=["array", "str", "int", "nil", "bin"])
def test_non_map(obj):
    assert_wire_error(pack(obj), "expected a map")


@pytest.mark.parametrize("field", ["schema", "peer_id", "addrs", "version", "capability", "updated_at", "leaving"])
def test_missing_record_field(field):
    obj = record_dict()
    del obj[field]
    assert_wire_error(pack(obj), "missing field", repr(field))


@pytest.mark.parametrize("field", ["gpus", "cpu_cores", "ram", "disk_free", "tflops_fp32", "platform"])
def test_missing_capability_field(field):
    obj = record_dict()
    del obj["capability"][field]
    assert_wire_error(pack(obj), "missing field", repr(field))


@pytest.mark.parametrize("field", ["name", "mem", "cc"])
def test_missing_gpu_field(field):
    obj = record_dict(MULTI_GPU)
    del obj["capability"]["gpus"][1][field]
    assert_wire_error(pack(obj), "missing field", repr(field))


def _set(obj: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


@pytest.mark.parametrize(
    "path, value",
    [
        # bool where int
        (("schema",), True),
        (("capability", "cpu_cores"), True),
        (("capability", "ram"), False),
        (("capability", "gpus", 0, "mem"), True),
        # bool where float
        (("capability", "tflops_fp32"), True),
        (("capability", "tflops_bf16"), False),
        (("updated_at",), True),
        # str where float / int
        (("capability", "tflops_fp32"), "1.5"),
        (("capability", "tflops_bf16"), "612"),
        (("updated_at",), "1700000000"),
        (("capability", "cpu_cores"), "8"),
        (("schema",), "1"),
        # float where int
        (("capability", "cpu_cores"), 8.0),
        (("capability", "disk_free"), 1.5),
        # other wrong shapes
        (("peer_id",), b"12D3KooW"),
        (("peer_id",), 5),
        (("version",), None),
        (("leaving",), 0),
        (("leaving",), "no"),
        (("addrs",), "/ip4/1.2.3.4/tcp/1"),
        (("addrs",), [1]),
        (("addrs",), [b"/ip4/1.2.3.4/tcp/1"]),
        (("capability",), [1, 2]),
        (("capability", "gpus"), {"0": 1}),
        (("capability", "gpus", 0), "H100"),
        (("capability", "gpus", 0, "name"), 100),
        (("capability", "platform"), ["Linux"]),
    ],
    ids=lambda v: "/".join(map(str, v)) if isinstance(v, tuple) else repr(v)[:20],
)
def test_wrong_types(path, value):
    obj = record_dict(MULTI_GPU)
    _set(obj, path, value)
    assert_wire_error(pack(obj))


@pytest.mark.parametrize("field", ["tflops_fp32", "tflops_bf16"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, -1e-9, -3], ids=str)
def test_bad_throughput(field, value):
    obj = record_dict(MULTI_GPU)
    obj["capability"][field] = value
    assert_wire_error(pack(obj), field, "finite non-negative")


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_bad_updated_at(value):
    obj = record_dict()
    obj["updated_at"] = value
    assert_wire_error(pack(obj), "updated_at")


@pytest.mark.parametrize("path", [("capability", "cpu_cores"), ("capability", "ram"), ("capability", "gpus", 0, "mem")])
def test_negative_count(path):
    obj = record_dict(MULTI_GPU)
    _set(obj, path, -1)
    assert_wire_error(pack(obj), "out of range")


@pytest.mark.parametrize("schema", [0, CAPABILITY_SCHEMA_VERSION + 1, 999, -1])
def test_unknown_schema_version(schema):
    obj = record_dict()
    obj["schema"] = schema
    assert_wire_error(pack(obj), "unknown schema version", str(schema))


def test_too_many_addrs():
    obj = record_dict()
    obj["addrs"] = ["/ip4/10.0.0.1/tcp/1"] * (MAX_ADDRS + 1)
    assert_wire_error(pack(obj), "addrs", str(MAX_ADDRS))


def test_over_long_addr():
    obj = record_dict()
    obj["addrs"] = ["/ip4/10.0.0.1/tcp/1/" + "x" * 300]
    assert_wire_error(pack(obj), "addrs")


def test_too_many_gpus():
    obj = record_dict(MULTI_GPU)
    obj["capability"]["gpus"] = [obj["capability"]["gpus"][0]] * (MAX_GPUS + 1)
    assert_wire_error(pack(obj), "gpus", str(MAX_GPUS))


def test_oversize_frame():
    obj = record_dict()
    obj["padding"] = b"\x00" * MAX_RECORD_BYTES  # an otherwise valid record, too large as a whole
    data = pack(obj)
    assert len(data) > MAX_RECORD_BYTES
    assert_wire_error(data, "exceeds", str(MAX_RECORD_BYTES))


def test_oversize_garbage_is_rejected_before_decoding():
    assert_wire_error(b"\xc1" * (MAX_RECORD_BYTES + 1), "exceeds")


@pytest.mark.parametrize(
    "path",
    [("peer_id",), ("version",), ("capability", "platform"), ("capability", "gpus", 0, "name")],
    ids=lambda p: p[-1],
)
def test_over_long_text(path):
    obj = record_dict(MULTI_GPU)
    _set(obj, path, "x" * (MAX_TEXT + 1))
    assert_wire_error(pack(obj), "longer than", str(MAX_TEXT))


@pytest.mark.parametrize(
    "cc",
    [[9], [9, 0, 1], [], [-1, 0], [100, 0], [9, 100], [9.0, 0], [True, 0], ["9", "0"], [None, 0]],
    ids=repr,
)
def test_bad_compute_capability(cc):
    obj = record_dict(MULTI_GPU)
    obj["capability"]["gpus"][1]["cc"] = cc
    assert_wire_error(pack(obj), "gpus[1].cc")


def test_compute_capability_not_a_list():
    obj = record_dict(MULTI_GPU)
    obj["capability"]["gpus"][0]["cc"] = "9.0"
    assert_wire_error(pack(obj), "cc")


def test_capability_from_wire_rejects_non_map():
    with pytest.raises(WireError, match="capability: expected a map"):
        capability_from_wire([1, 2])


def test_wire_error_is_a_value_error():
    assert issubclass(WireError, ValueError)
    with pytest.raises(ValueError):
        peer_record_from_wire(b"\xc1")


# ---- unpack_bounded ------------------------------------------------------------------------------------


def test_unpack_bounded_decodes_plain_values():
    obj = {"a": [1, 2.5, None, True, "x", b"\x00\x01"], "b": {"c": -3}}
    assert unpack_bounded(pack(obj), 1024) == obj


@pytest.mark.parametrize("ext", [msgpack.ExtType(5, b"abc"), msgpack.ExtType(1, b"x" * 100), msgpack.Timestamp(1, 0)],
                         ids=repr)
def test_unpack_bounded_rejects_ext_types(ext):
    for obj in (ext, [1, ext], {"k": ext}):
        with pytest.raises(WireError, match="ext"):
            unpack_bounded(pack(obj), 1024)


def test_unpack_bounded_rejects_zero_length_ext():
    data = pack(msgpack.ExtType(5, b""))
    assert data == b"\xc7\x00\x05"
    with pytest.raises(WireError, match="ext"):
        unpack_bounded(data, 1024)


def test_unpack_bounded_rejects_oversize_input():
    data = pack(b"x" * 100)
    assert unpack_bounded(data, len(data)) == b"x" * 100
    with pytest.raises(WireError, match="exceeds"):
        unpack_bounded(data, len(data) - 1)


def test_unpack_bounded_refuses_huge_declared_array_without_allocating():
    # array32 header declaring 2**32-1 elements, in a 5-byte frame
    with pytest.raises(WireError):
        unpack_bounded(b"\xdd\xff\xff\xff\xff", 1024)


def test_unpack_bounded_rejects_deep_nesting():
    with pytest.raises(WireError):
        unpack_bounded(b"\x91" * 5000 + b"\x00", 10_000)


@pytest.mark.parametrize("data", ["text", 5, None])
def test_unpack_bounded_rejects_non_bytes(data):
    with pytest.raises(WireError, match="expected bytes"):
        unpack_bounded(data, 1024)
