"""The one place that converts between wire bytes and protocol objects (as flower's common/serde.py).

Every ``x_from_wire`` checks types, sizes and bounds before building anything, and raises WireError
(a ValueError) with a one-line reason. msgpack only: no pickle, no ext types, bounded lengths.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from protocol.records import (
    CAPABILITY_SCHEMA_VERSION,
    MAX_ADDRS,
    MAX_GPUS,
    MAX_RECORD_BYTES,
    MAX_TEXT,
    Capability,
    GpuInfo,
    PeerRecord,
)


class WireError(ValueError):
    """Bytes from a peer that do not decode to what the receiver expects."""


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack ext type {code} is not allowed on the wire")


def unpack_bounded(data: bytes, max_bytes: int) -> Any:
    """msgpack-decode ``data`` with every container bounded by ``max_bytes``; WireError on anything odd."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(f"frame of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except WireError:
        raise
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as e:
        raise WireError(f"undecodable msgpack ({type(e).__name__}): {e}") from None


def _get(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise WireError(f"{where}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise WireError(f"{where}.{key}: expected {kind}, got bool")
    if not isinstance(value, kind):
        raise WireError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _text(obj: dict, key: str, where: str, limit: int = MAX_TEXT) -> str:
    value = _get(obj, key, str, where)
    if len(value) > limit:
        raise WireError(f"{where}.{key}: longer than {limit} characters")
    return value


def _count(obj: dict, key: str, where: str) -> int:
    value = _get(obj, key, int, where)
    if not 0 <= value < 2**63:
        raise WireError(f"{where}.{key}: {value} out of range")
    return value


def _rate(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise WireError(f"{where}: expected a finite non-negative number, got {value!r:.40}")
    return float(value)


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise WireError(f"{where}: expected a map, got {type(value).__name__}")
    return value


# ---- capability / peer record --------------------------------------------------------------------------


def capability_to_wire(cap: Capability) -> dict:
    return {
        "gpus": [{"name": g.name, "mem": g.memory_bytes, "cc": list(g.compute_capability)} for g in cap.gpus],
        "cpu_cores": cap.cpu_cores,
        "ram": cap.ram_bytes,
        "disk_free": cap.disk_free_bytes,
        "tflops_fp32": cap.tflops_fp32,
        "tflops_bf16": cap.tflops_bf16,
        "platform": cap.platform,
    }


def capability_from_wire(obj: Any) -> Capability:
    obj = _dict(obj, "capability")
    gpus_raw = _get(obj, "gpus", list, "capability")
    if len(gpus_raw) > MAX_GPUS:
        raise WireError(f"capability.gpus: more than {MAX_GPUS} entries")
    gpus = []
    for i, g in enumerate(gpus_raw):
        g = _dict(g, f"capability.gpus[{i}]")
        cc = _get(g, "cc", list, f"capability.gpus[{i}]")
        if len(cc) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 100 for x in cc):
            raise WireError(f"capability.gpus[{i}].cc: expected [major, minor]")
        gpus.append(GpuInfo(_text(g, "name", "gpu"), _count(g, "mem", "gpu"), (cc[0], cc[1])))
    bf16 = obj.get("tflops_bf16", None)
    return Capability(
        gpus=tuple(gpus),
        cpu_cores=_count(obj, "cpu_cores", "capability"),
        ram_bytes=_count(obj, "ram", "capability"),
        disk_free_bytes=_count(obj, "disk_free", "capability"),
        tflops_fp32=_rate(_get(obj, "tflops_fp32", (int, float), "capability"), "capability.tflops_fp32"),
        tflops_bf16=None if bf16 is None else _rate(bf16, "capability.tflops_bf16"),
        platform=_text(obj, "platform", "capability"),
    )


def peer_record_to_wire(record: PeerRecord) -> bytes:
    return msgpack.packb(
        {
            "schema": record.schema_version,
            "peer_id": record.peer_id,
            "addrs": list(record.addrs),
            "version": record.version,
            "capability": capability_to_wire(record.capability),
            "updated_at": record.updated_at,
            "leaving": record.leaving,
        },
        use_bin_type=True,
    )


def peer_record_from_wire(data: bytes) -> PeerRecord:
    obj = _dict(unpack_bounded(data, MAX_RECORD_BYTES), "peer record")
    schema = _get(obj, "schema", int, "peer record")
    if schema != CAPABILITY_SCHEMA_VERSION:
        raise WireError(f"peer record: unknown schema version {schema} (this node reads {CAPABILITY_SCHEMA_VERSION})")
    addrs = _get(obj, "addrs", list, "peer record")
    if len(addrs) > MAX_ADDRS or not all(isinstance(a, str) and len(a) <= 256 for a in addrs):
        raise WireError(f"peer record.addrs: expected at most {MAX_ADDRS} multiaddr strings")
    return PeerRecord(
        peer_id=_text(obj, "peer_id", "peer record"),
        addrs=tuple(addrs),
        version=_text(obj, "version", "peer record"),
        capability=capability_from_wire(_get(obj, "capability", dict, "peer record")),
        updated_at=_rate(_get(obj, "updated_at", (int, float), "peer record"), "peer record.updated_at"),
        leaving=_get(obj, "leaving", bool, "peer record"),
        schema_version=schema,
    )
