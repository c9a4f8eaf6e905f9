"""The one place that converts between wire bytes and protocol objects (as flower's common/serde.py).

Every ``x_from_wire`` checks types, sizes and bounds before building anything, and raises WireError
(a ValueError) with a one-line reason. msgpack only: no pickle, no ext types, bounded lengths, nesting and
object counts (unpack_bounded checks the structure before msgpack builds any object).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import msgpack

from protocol.allreduce.codecs import EncodedUpdate
from protocol.allreduce.messages import (
    MAX_BANDWIDTH,
    MAX_GROUP_SIZE,
    MAX_ROUND_ID,
    MAX_TENSOR_ELEMENTS,
    ROUND_PROTOCOL_VERSION,
    CommitFrame,
    GroupPlan,
    Invite,
    InviteReply,
    PartFrame,
    ResultFrame,
    TensorSpec,
)
from protocol.records.peer import (
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


def exact_map(obj: Any, names: Sequence[str], where: str, error: type[ValueError] = WireError) -> dict:
    """``obj`` if it is a map holding exactly the keys ``names``; else ``error`` naming the first stray or
    missing field (every decoder of a peer's map checks its shape this way before reading a value)."""
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a map, got {type(obj).__name__}")
    unknown = sorted(str(k) for k in obj if k not in names)
    if unknown:
        raise error(f"{where}: unknown field {unknown[0]!r:.40}")
    missing = [k for k in names if k not in obj]
    if missing:
        raise error(f"{where}: missing field {missing[0]!r}")
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack ext type {code} is not allowed on the wire")


# Nesting of arrays/maps any of our messages needs: the deepest, a job record (record -> assignment -> hosts ->
# one stage's hosts, or record -> spec -> model -> overrides), has 4 levels; error messages that show a value
# (``{value!r:.40}``) recurse per level, and Python's recursion limit is ~1000 (msgpack's own is 1024).
MAX_DEPTH = 32
# Objects (every value, map keys and containers included) in a message when its decoder names no tighter
# limit: each costs up to ~72 bytes of Python objects however few bytes encode it (an empty map is one byte)
# and ~0.1-0.3 us of _scan, so this caps what one frame can cost the receiver (~9 MB, ~40 ms) before any
# field is checked. Above the largest legitimate message: a pipeline Commit or CommitReply naming
# MAX_MICRO_BATCHES = 65,536 micro-batch ids (protocol/pipeline/control.py). Decoders of known small
# structures pass their own limit (activation frames, round messages, manifests).
MAX_OBJECTS = 1 << 17

# How each msgpack type byte is walked by _scan: (kind, argument).
#   _SCALAR: skip ``argument`` bytes after the type byte (ints, floats, nil, bools, fixstr's payload)
#   _RAW: str/bin whose length is in the ``argument`` bytes after the type byte (payload skipped in O(1))
#   _ARRAY / _MAP: a container whose count is in the type byte (argument 0) or in ``argument`` bytes after it
#   _REFUSED: ext types and the never-used byte 0xc1
_SCALAR, _RAW, _ARRAY, _MAP, _REFUSED = range(5)


def _type_table() -> tuple[tuple[int, ...], tuple[int, ...]]:
    kind, arg = [_REFUSED] * 256, [0] * 256
    for b in range(0x00, 0x80):  # positive fixint
        kind[b] = _SCALAR
    for b in range(0xE0, 0x100):  # negative fixint
        kind[b] = _SCALAR
    for b in range(0x80, 0x90):  # fixmap
        kind[b] = _MAP
    for b in range(0x90, 0xA0):  # fixarray
        kind[b] = _ARRAY
    for b in range(0xA0, 0xC0):  # fixstr: its length is in the type byte
        kind[b], arg[b] = _SCALAR, b & 0x1F
    for b, extra in {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1,
                     0xD1: 2, 0xD2: 4, 0xD3: 8}.items():
        kind[b], arg[b] = _SCALAR, extra
    for b, width in {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}.items():  # bin8/16/32, str8/16/32
        kind[b], arg[b] = _RAW, width
    kind[0xDC], arg[0xDC], kind[0xDD], arg[0xDD] = _ARRAY, 2, _ARRAY, 4
    kind[0xDE], arg[0xDE], kind[0xDF], arg[0xDF] = _MAP, 2, _MAP, 4
    return tuple(kind), tuple(arg)


_KIND, _ARG = _type_table()
_EXT_CODE_AT = {0xC7: 2, 0xC8: 3, 0xC9: 5, 0xD4: 1, 0xD5: 1, 0xD6: 1, 0xD7: 1, 0xD8: 1}  # type byte -> code offset


def _scan(data: bytes | bytearray | memoryview, max_objects: int) -> None:
    """Walk the msgpack structure of ``data`` without building anything; WireError at the first header that
    breaks a limit: nesting beyond MAX_DEPTH, more than ``max_objects`` values, a container declaring more
    values than bytes remain (each value takes at least one), a str/bin running past the end, an ext type,
    trailing bytes. Cost: a few hundred ns per value; str/bin payloads are skipped in O(1)."""
    end = len(data)
    pos = objects = 0
    todo = 1  # values still to read in the innermost open container (the top level holds one)
    stack: list[int] = []  # ``todo`` of each enclosing container
    while True:
        if not todo:
            if not stack:
                break
            todo = stack.pop()
            continue
        if pos >= end:
            raise WireError(f"undecodable msgpack: truncated ({end} bytes end inside a value)")
        todo -= 1
        objects += 1
        if objects > max_objects:
            raise WireError(f"msgpack value of more than {max_objects} objects (the limit for this message)")
        b = data[pos]
        kind = _KIND[b]
        if kind == _SCALAR:
            pos += 1 + _ARG[b]
            continue
        width = _ARG[b]
        if kind == _REFUSED:
            if b == 0xC1:
                raise WireError("undecodable msgpack: byte 0xc1 is never used")
            at = pos + _EXT_CODE_AT[b]
            code = int.from_bytes(data[at:at + 1], "big", signed=True) if at < end else "?"
            raise WireError(f"msgpack ext type {code} is not allowed on the wire")
        if width:
            count = int.from_bytes(data[pos + 1:pos + 1 + width], "big")
        else:
            count = b & 0x0F
        pos += 1 + width
        if kind == _RAW:
            pos += count
            if pos > end:
                raise WireError(f"undecodable msgpack: truncated (a {count}-byte str/bin runs past the end)")
            continue
        if len(stack) >= MAX_DEPTH:
            raise WireError(f"msgpack nested deeper than {MAX_DEPTH} levels")
        if kind == _MAP:
            count *= 2
        if count > end - pos:
            raise WireError(f"undecodable msgpack: {'a map' if kind == _MAP else 'an array'} declares {count} values in "
                            f"the {max(0, end - pos)} bytes left")
        if count:
            stack.append(todo)
            todo = count
    if pos != end:
        raise WireError(f"undecodable msgpack: truncated ({end} bytes end inside a value)" if pos > end else
                        f"undecodable msgpack: {end - pos} trailing bytes after the value")


def unpack_bounded(data: bytes, max_bytes: int, max_objects: int = MAX_OBJECTS) -> Any:
    """msgpack-decode ``data`` of at most ``max_bytes``, nested at most MAX_DEPTH deep, of at most
    ``max_objects`` values; WireError on anything odd. The structure is checked (_scan) before anything is
    built, so a refused frame costs no allocation, and an accepted one at most ~72 B per object plus a copy
    of its str/bin payloads."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    if isinstance(data, memoryview) and (data.ndim != 1 or data.format != "B"):
        try:
            data = data.cast("B")  # bytes, as msgpack reads any buffer
        except TypeError:
            raise WireError("expected a contiguous byte buffer") from None
    if len(data) > max_bytes:
        raise WireError(f"frame of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    _scan(data, max_objects)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=len(data),
            max_bin_len=len(data),
            max_array_len=len(data),
            max_map_len=len(data) // 2,
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


# ---- all-reduce round messages ---------------------------------------------------------------------------

_MESSAGE_TAGS = {Invite: "invite", InviteReply: "invite_reply", GroupPlan: "plan", PartFrame: "part",
                 ResultFrame: "result", CommitFrame: "commit"}
MAX_CONTROL_FRAME = 64 * 1024  # invites, plans, commits
# msgpack values in a round message: a plan's members and [start, end] spans (4 per member) are the most, plus
# ~30 for the fields and a payload map; twice that, so an oversized group reaches its field check. A part or
# result frame is bounded by its own length only: this keeps its Python objects to ~150 KB.
MAX_ROUND_OBJECTS = 8 * MAX_GROUP_SIZE + 64


def _tensor_to_wire(t: TensorSpec) -> list:
    return [t.name, t.size, t.dtype]


def _tensor_from_wire(obj: Any, where: str) -> TensorSpec:
    if not isinstance(obj, list) or len(obj) != 3:
        raise WireError(f"{where}.tensor: expected [name, size, dtype]")
    name, size, dtype = obj
    if not isinstance(name, str) or len(name) > MAX_TEXT:
        raise WireError(f"{where}.tensor: bad name")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_TENSOR_ELEMENTS:
        raise WireError(f"{where}.tensor: bad size {size!r:.40}")
    if dtype not in ("float32",):
        raise WireError(f"{where}.tensor: unsupported dtype {dtype!r:.40}")
    return TensorSpec(name, size, dtype)


def _span_from_wire(obj: Any, where: str) -> tuple[int, int]:
    if (not isinstance(obj, list) or len(obj) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_TENSOR_ELEMENTS for x in obj)
            or obj[0] > obj[1]):
        raise WireError(f"{where}.span: expected [start, end] with 0 <= start <= end")
    return obj[0], obj[1]


def _peer_list(obj: Any, where: str) -> tuple[str, ...]:
    if not isinstance(obj, list) or len(obj) > MAX_GROUP_SIZE or not all(isinstance(p, str) and len(p) <= 64 for p in obj):
        raise WireError(f"{where}: expected at most {MAX_GROUP_SIZE} peer ids")
    return tuple(obj)


def _sparse_to_wire(p: EncodedUpdate) -> dict:
    return {"nnz": p.nnz, "ic": p.index_codec, "idx": p.indices, "vc": p.value_codec, "val": p.values}


def _sparse_from_wire(obj: Any, where: str) -> EncodedUpdate:
    obj = _dict(obj, f"{where}.payload")
    return EncodedUpdate(
        index_codec=_text(obj, "ic", where, 16),
        value_codec=_text(obj, "vc", where, 16),
        nnz=_count(obj, "nnz", where),
        indices=_get(obj, "idx", bytes, where),
        values=_get(obj, "val", bytes, where),
    )


def message_to_wire(msg) -> bytes:
    tag = _MESSAGE_TAGS.get(type(msg))
    if tag is None:
        raise TypeError(f"not a round message: {type(msg).__name__}")
    body: dict = {"t": tag, "v": ROUND_PROTOCOL_VERSION, "round": msg.round_id}
    if isinstance(msg, Invite):
        body.update(leader=msg.leader, tensor=_tensor_to_wire(msg.tensor))
    elif isinstance(msg, InviteReply):
        body.update(sender=msg.sender, accept=msg.accept, bw=msg.bandwidth)
    elif isinstance(msg, GroupPlan):
        body.update(leader=msg.leader, members=list(msg.members), spans=[list(s) for s in msg.spans],
                    tensor=_tensor_to_wire(msg.tensor), deadline=msg.deadline)
    elif isinstance(msg, PartFrame):
        body.update(sender=msg.sender, tensor=_tensor_to_wire(msg.tensor), span=list(msg.span), weight=msg.weight,
                    density=msg.density, payload=_sparse_to_wire(msg.payload))
    elif isinstance(msg, ResultFrame):
        body.update(sender=msg.sender, tensor=_tensor_to_wire(msg.tensor), span=list(msg.span),
                    included=list(msg.included), total_weight=msg.total_weight, payload=_sparse_to_wire(msg.payload))
    else:
        body.update(sender=msg.sender, have=list(msg.have))
    return msgpack.packb(body, use_bin_type=True)


def message_from_wire(data: bytes, max_bytes: int, expect: type):
    """Decode one round message of type ``expect``; WireError on anything else (checked before payloads)."""
    obj = _dict(unpack_bounded(data, max_bytes, MAX_ROUND_OBJECTS), "round message")
    tag = obj.get("t")
    if tag != _MESSAGE_TAGS[expect]:
        raise WireError(f"expected a {_MESSAGE_TAGS[expect]!r} message, got {tag!r:.40}")
    if type(obj.get("v")) is not int or obj["v"] != ROUND_PROTOCOL_VERSION:
        raise WireError(f"unsupported round protocol version {obj.get('v')!r:.20}")
    where = tag
    round_id = _text(obj, "round", where, MAX_ROUND_ID)
    if expect is Invite:
        return Invite(round_id, _text(obj, "leader", where, 64), _tensor_from_wire(obj.get("tensor"), where))
    if expect is InviteReply:
        bandwidth = _rate(obj.get("bw"), f"{where}.bw")
        if bandwidth >= MAX_BANDWIDTH:
            raise WireError(f"{where}.bw: {bandwidth:g} bytes/s is not a real link")
        return InviteReply(round_id, _text(obj, "sender", where, 64), _get(obj, "accept", bool, where), bandwidth)
    if expect is GroupPlan:
        members = _peer_list(obj.get("members"), f"{where}.members")
        spans_raw = _get(obj, "spans", list, where)
        if len(spans_raw) != len(members):
            raise WireError(f"{where}: {len(spans_raw)} spans for {len(members)} members")
        tensor = _tensor_from_wire(obj.get("tensor"), where)
        spans = tuple(_span_from_wire(s, where) for s in spans_raw)
        if spans and (spans[0][0] != 0 or spans[-1][1] != tensor.size or
                      any(a[1] != b[0] for a, b in zip(spans, spans[1:]))):
            raise WireError(f"{where}: spans do not tile the tensor")
        return GroupPlan(round_id, _text(obj, "leader", where, 64), members, spans, tensor,
                         _rate(obj.get("deadline"), f"{where}.deadline"))
    sender = _text(obj, "sender", where, 64)
    if expect is CommitFrame:
        have = _get(obj, "have", list, where)
        if len(have) > MAX_GROUP_SIZE or not all(isinstance(h, bool) for h in have):
            raise WireError(f"{where}.have: expected a list of booleans")
        return CommitFrame(round_id, sender, tuple(have))
    tensor = _tensor_from_wire(obj.get("tensor"), where)
    span = _span_from_wire(obj.get("span"), where)
    payload = _sparse_from_wire(obj.get("payload"), where)
    if payload.nnz > span[1] - span[0]:
        raise WireError(f"{where}: {payload.nnz} entries for a span of {span[1] - span[0]}")
    if expect is PartFrame:
        weight = _rate(obj.get("weight"), f"{where}.weight")
        density = _rate(obj.get("density"), f"{where}.density")
        if weight == 0 or density > 1:
            raise WireError(f"{where}: weight must be > 0 and density <= 1")
        return PartFrame(round_id, sender, tensor, span, weight, density, payload)
    included = _peer_list(obj.get("included"), f"{where}.included")
    return ResultFrame(round_id, sender, tensor, span, included, _rate(obj.get("total_weight"), f"{where}.total_weight"),
                       payload)
