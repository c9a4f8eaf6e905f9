"""The one place that speaks msgpack: bounded decoding, canonical encoding, and the checked field readers
every decoder of a peer's bytes uses.

    data = pack({"t": "part", "v": 1, ...})              # canonical msgpack (bin type for bytes), no pickle
    obj = unpack_bounded(data, max_bytes, max_objects)   # WireError before anything is built from odd bytes
    obj = exact_map(obj, names, where)                   # exactly these keys
    n = count(obj, "nnz", where); s = text(obj, "sender", where, 64); x = field(obj, "idx", bytes, where)

Each message family keeps its ``x_to_wire`` / ``x_from_wire`` pairs beside its frozen dataclasses (as
flower's serde keeps one pair per message): peer records in protocol/records/peer.py, round messages in
protocol/allreduce/messages.py, jobs in protocol/records/, pipeline frames in protocol/pipeline/, shard
manifests and transfers in protocol/transfer/. Every one of them encodes with ``pack`` and decodes with
``unpack_bounded`` and these readers, so the rules below hold for every byte a peer sends: every
``x_from_wire`` checks types, sizes and bounds before building anything, and raises WireError (a ValueError)
with a one-line reason; msgpack only: no pickle, no ext types, bounded lengths, nesting and object counts
(unpack_bounded checks the structure before msgpack builds any object).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

MAX_TEXT = 128  # the bound on a free-text field when its reader names no other


class WireError(ValueError):
    """Bytes from a peer that do not decode to what the receiver expects."""


def pack(obj: Any) -> bytes:
    """The canonical msgpack bytes of ``obj`` (bytes as bin, str as str): what every encoder sends and signs."""
    return msgpack.packb(obj, use_bin_type=True)


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
            raise WireError(f"undecodable msgpack: {'a map' if kind == _MAP else 'an array'} declares {count} "
                            f"values in the {max(0, end - pos)} bytes left")
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


def field(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]`` if it is a ``kind`` (a bool is no int here unless ``kind`` names bool); else WireError."""
    if key not in obj:
        raise WireError(f"{where}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise WireError(f"{where}.{key}: expected {kind}, got bool")
    if not isinstance(value, kind):
        raise WireError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def text(obj: dict, key: str, where: str, limit: int = MAX_TEXT) -> str:
    """A str field of at most ``limit`` characters."""
    value = field(obj, key, str, where)
    if len(value) > limit:
        raise WireError(f"{where}.{key}: longer than {limit} characters")
    return value


def count(obj: dict, key: str, where: str) -> int:
    """An int field in [0, 2**63)."""
    value = field(obj, key, int, where)
    if not 0 <= value < 2**63:
        raise WireError(f"{where}.{key}: {value} out of range")
    return value


def rate(value: Any, where: str) -> float:
    """A finite non-negative number (int or float, not bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise WireError(f"{where}: expected a finite non-negative number, got {value!r:.40}")
    return float(value)


def as_map(value: Any, where: str) -> dict:
    """``value`` if it is a map; else WireError."""
    if not isinstance(value, dict):
        raise WireError(f"{where}: expected a map, got {type(value).__name__}")
    return value


def fields_of(obj: Any) -> dict:
    """A frozen dataclass as the map of its field names to values (the wire form of most records)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def from_map(kind: type, obj: Any, where: str, version: int | None = None,
             decode: Mapping[str, Callable[[Any], Any]] | None = None) -> Any:
    """Build the dataclass ``kind`` from a map holding exactly its fields (and ``"v"`` == ``version`` when
    given); ``decode`` turns nested values into their objects first. The dataclass checks every value (its
    ValueError, which names the field, becomes a WireError), so a peer's record passes the same rules as a
    local caller's."""
    names = [f.name for f in dataclasses.fields(kind)] + (["v"] if version is not None else [])
    obj = exact_map(obj, names, where)
    if version is not None:
        found = field(obj, "v", int, where)
        if found != version:
            raise WireError(f"{where}: unknown schema version {found} (this node reads {version})")
    values = {name: obj[name] for name in names if name != "v"}
    for name, decoder in (decode or {}).items():
        values[name] = decoder(values[name])
    try:
        return kind(**values)
    except ValueError as e:  # the message names the field ("inner.lr: must be > 0, got -1")
        raise WireError(f"{where.partition('.')[0]}: {e}") from None
