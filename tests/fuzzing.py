"""A small seeded fuzzing harness for every decoder of peer or user input (used by tests/test_fuzz.py).

    rng = random.Random("target-name:0")                 # one seeded generator per target
    mutate = Mutator(rng)
    cases = byte_cases(mutate, seeds, count)             # the seeds, then mutations of them, then random bytes
    fuzz(decode, cases, errors=(WireError,), bound=msgpack_bound(MAX))   # AssertionError with a reproducer

For each case ``fuzz`` checks the decoder's contract:
  * it returns (``accept(result)`` may check the object) or raises one of ``errors``; anything else (TypeError,
    KeyError, OverflowError, RecursionError, MemoryError, a msgpack or struct exception leaking out, a warning
    turned into an error by filterwarnings=error) is a failure;
  * it takes at most TIME_LIMIT_S of wall time;
  * its peak traced allocation (tracemalloc, from just before the call) stays within ``bound(case)`` bytes.
The first failures are reported with the exact input (Python repr; hex up to REPRO_BYTES) and the traceback;
generation is deterministic, so the case index and SWARMNODE_FUZZ_SEED also reproduce it.

tracemalloc sees what Python, numpy and safetensors' Python side allocate; torch's CPU allocator and upb (the
protobuf runtime) allocate outside it, so for those decoders the bound covers the Python side only.

Run longer (pytest's 60-s per-test timeout off): SWARMNODE_FUZZ_INPUTS=20000 .venv/bin/python -m pytest
tests/test_fuzz.py -q --timeout 0. Another corpus: SWARMNODE_FUZZ_SEED=7 (the default is 0). Seeds 0-4 at
10,000-15,000 cases per target found the bugs tests/test_fuzz_regressions.py pins; since their fixes (and the
generators' skips of those inputs removed), seeds 0-2 at 5,000 cases per target pass.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import random
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

INPUTS = int(os.environ.get("SWARMNODE_FUZZ_INPUTS", "1000"))  # cases per target (a few targets run a fraction)
SEED = int(os.environ.get("SWARMNODE_FUZZ_SEED", "0"))
TIME_LIMIT_S = 1.0  # per case
# Allocation bounds (bytes). msgpack.unpackb, json.loads and tomllib build the whole object graph before any
# field is checked; the costliest input byte is an empty map or array (0x80 / 0x90, "{}," / "[],"): one Python
# object of 56-64 bytes plus an 8-byte slot in its parent, ~72 bytes measured with tracemalloc. So a decoder
# that materialises its input may reach ~72 x its length; OBJECT_BYTES_PER_INPUT_BYTE rounds that up. For
# msgpack that is the bound of small frames only: unpack_bounded walks the structure first and refuses more
# than a number of objects (protocol/wire.py MAX_OBJECTS, or the decoder's own, e.g. an activation frame's
# MAX_FRAME_OBJECTS), so a large frame costs its objects' ~72 B each plus one copy of its str/bin payloads
# (tests/test_fuzz_regressions.py test_msgpack_amplification holds an activation frame to 8 B per byte).
OBJECT_BYTES_PER_INPUT_BYTE = 80
SLACK = 256 * 1024  # exception objects and formatted messages, regex and dataclass machinery, first-use caches
MAX_CASE_BYTES = 256 * 1024  # mutated inputs beyond this are dropped: slower, and they find nothing smaller ones miss
REPRO_BYTES = 4096  # hex of failing inputs up to this length goes into the report
MAX_FAILURES = 5


def rng_for(name: str) -> random.Random:
    """The seeded generator of one target (str seeds hash with sha512: independent of PYTHONHASHSEED)."""
    return random.Random(f"{name}:{SEED}")


def count(share: float = 1.0) -> int:
    return max(1, int(INPUTS * share))


# ---- the contract check ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    accepted: int = 0
    rejected: int = 0
    slowest_s: float = 0.0
    peak_bytes: int = 0
    failures: list[str] = field(default_factory=list)


def show(case: Any) -> str:
    if isinstance(case, (bytes, bytearray)):
        data = bytes(case)
        text = f"{len(data)} bytes: {data[:REPRO_BYTES]!r}"
        return text + (f"\n    hex: {data.hex()}" if len(data) <= REPRO_BYTES else " (truncated)")
    text = repr(case)
    return text if len(text) <= 3 * REPRO_BYTES else text[: 3 * REPRO_BYTES] + "... (truncated)"


def fuzz(decode: Callable[[Any], Any], cases: Iterable[Any], *, errors: tuple[type[BaseException], ...],
         bound: Callable[[Any], int], accept: Callable[[Any, Any], None] | None = None,
         time_limit: float = TIME_LIMIT_S, min_accepted: int = 1) -> Outcome:
    """Run ``decode`` on every case and assert its contract (module docstring); return the tallies."""
    out = Outcome()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        for index, case in enumerate(cases):
            problem = None
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter()
            try:
                result = decode(case)
            except errors:
                result, outcome = None, "rejected"
            except Exception:  # noqa: BLE001 - the point: nothing else may escape
                result, outcome = None, "crashed"
                problem = f"raised {traceback.format_exc(limit=-12)}"
            else:
                outcome = "accepted"
            elapsed = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] - before
            out.slowest_s, out.peak_bytes = max(out.slowest_s, elapsed), max(out.peak_bytes, peak)
            if outcome == "accepted" and accept is not None:
                try:
                    accept(case, result)
                except Exception:  # noqa: BLE001
                    problem = f"returned an invalid object {result!r:.300}: {traceback.format_exc(limit=-6)}"
            limit = bound(case)
            if problem is None and (elapsed > time_limit or peak > limit):
                # Measure once more: a one-off resize of a global table (interned strings, type caches) or a
                # descheduled process on the shared cores is not the decoder's doing; a real excess repeats.
                elapsed2, peak2 = _measure(decode, case, errors)
                elapsed, peak = min(elapsed, elapsed2), min(peak, peak2)
            if problem is None and elapsed > time_limit:
                problem = f"took {elapsed:.2f} s (limit {time_limit} s)"
            if problem is None and peak > limit:
                problem = f"allocated {peak:,} bytes at peak (bound {limit:,})"
            if problem is not None:
                out.failures.append(f"case #{index} (SWARMNODE_FUZZ_SEED={SEED}): {show(case)}\n  {problem}")
                if len(out.failures) >= MAX_FAILURES:
                    break
            elif outcome == "accepted":
                out.accepted += 1
            else:
                out.rejected += 1
    finally:
        if started:
            tracemalloc.stop()
    print(f"fuzz: {out.accepted} accepted, {out.rejected} rejected, slowest {out.slowest_s * 1e3:.1f} ms, "
          f"peak {out.peak_bytes:,} B")  # shown with pytest -rP or -s
    assert not out.failures, f"{len(out.failures)}+ failing case(s):\n" + "\n\n".join(out.failures)
    assert out.accepted >= min_accepted, f"only {out.accepted} cases accepted: the seeds are not valid?"
    return out


def _measure(decode: Callable[[Any], Any], case: Any, errors: tuple) -> tuple[float, int]:
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    try:
        decode(case)
    except errors:
        pass
    return time.perf_counter() - t0, tracemalloc.get_traced_memory()[1] - before


def msgpack_bound(max_bytes: int, extra: int = 0) -> Callable[[Any], int]:
    """The bound of a decoder that unpacks at most ``max_bytes`` with unpack_bounded (see the constants)."""
    return lambda case: OBJECT_BYTES_PER_INPUT_BYTE * min(_length(case), max_bytes) + extra + SLACK


def _length(case: Any) -> int:
    if isinstance(case, (bytes, bytearray, str)):
        return len(case)
    if isinstance(case, (tuple, list)):
        return sum(_length(c) for c in case)
    return 64


# ---- mutations ---------------------------------------------------------------------------------------------

INTS = (0, 1, -1, 2, 7, 8, 15, 16, 31, 64, 127, 128, 255, 256, 1023, 4095, 4096, 65535, 65536, 2**20, 2**31 - 1,
        2**31, 2**32 - 1, 2**32, 2**34, 2**34 + 1, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -2**31,
        -2**63)
FLOATS = (0.0, -0.0, 0.5, -1.0, 1.5, 1e-310, 65504.0, 1e15, 1e300, math.inf, -math.inf, math.nan)
STRS = ("", "a", "t", "v", "x", "\x00", "\n", "é", "😀", "\u2028", "a" * 65, "b" * 129, "c" * 257, "12D3KooW",
        "0" * 64, "f" * 16, "0" * 16 + "/", "float32", "float16", "bfloat16", "int64", "float64", "dense",
        "bitmap", "delta-varint", "rice", "fp16", "fp32", "running", "cancelled", "error", "refused", "chunk", "get")
BYTES = (b"", b"\x00", b"\xff" * 8, b"\x00" * 63, b"\x00" * 64, b"\x00" * 65, bytes(range(256)))
# Nesting depths of generated msgpack: below and above unpack_bounded's cap (protocol/wire.py MAX_DEPTH, 32),
# near Python's recursion limit (~1000, where an error message formatting the value used to crash) and
# msgpack's own stack limit (1024), and beyond it.
DEPTHS = (10, 33, 100, 300, 999, 1025, 3000)
# Hand-made msgpack fragments: giant declared lengths, ext types, the reserved byte, invalid UTF-8, odd keys.
RAW_FRAGMENTS = (
    b"\xdd\xff\xff\xff\xff", b"\xdd\x00\x01\x00\x00\xc0", b"\xdf\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff\xc0\xc0",
    b"\xc6\xff\xff\xff\xff", b"\xc6\x00\x10\x00\x00abc", b"\xc5\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xda\x00\x05ab",
    b"\xc9\xff\xff\xff\xff\x01", b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x01", b"\xc7\x0c\xff" + b"\x00" * 12,
    b"\xc1", b"\xa3\xff\xfe\xfd", b"\xd9\x02\xed\xa0", b"\x81\x90\xc0", b"\x81\xc0\xc0", b"\x81\x01\xc0",
    b"\x81\xc4\x01t\xc0", b"\x82\xa1t\xc0\xa1t\xc3", b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00", b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\xca\x7f\x80\x00\x00",
    b"\x93\xc0", b"\x82\xa1a",
)


def raw_fragment(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # deep nesting of arrays or maps (see DEPTHS)
        depth = rng.choice(DEPTHS)
        return (b"\x91" if rng.random() < 0.5 else b"\x81\xa1k") * depth + b"\xc0"
    if kind == 1:  # many small objects in a bounded number of bytes
        n = rng.choice((16, 256, 4096))
        return b"\xdc" + n.to_bytes(2, "big") + rng.choice((b"\x80", b"\x90", b"\xc0", b"\xa0")) * n
    if kind == 2:  # big containers declared level after level, far beyond the bytes that follow
        return rng.choice((b"\xdc\x27\x10", b"\xdc\xff\xff", b"\xde\x27\x10\xa1k")) * rng.choice((2, 33,
                                                                                                  1000)) + b"\xc0"
    return rng.choice(RAW_FRAGMENTS)


class Mutator:
    """Byte-level and structure-aware (msgpack, JSON-like trees) mutations, all drawn from one seeded rng."""

    def __init__(self, rng: random.Random, strs: Sequence[str] = STRS):
        self.rng = rng
        self.strs = tuple(strs)
        self._sentinels = 0

    # -- bytes --
    def bytes_(self, data: bytes, pool: Sequence[bytes] = ()) -> bytes:
        rng, b = self.rng, bytearray(data)
        for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
            op = rng.randrange(11)
            pos = rng.randrange(len(b) + 1)
            if op == 0 and b:  # flip one bit
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
            elif op == 1 and b:  # set an interesting byte
                b[rng.randrange(len(b))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x90, 0xC0, 0xC1, 0xC3, 0xDD, 0xDF,
                                                       0xC6, 0xCF, 0xD3, 0xCB, rng.randrange(256)))
            elif op == 2:  # insert random bytes
                b[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, 8, 33)))
            elif op == 3 and b:  # delete a range
                del b[pos:pos + rng.choice((1, 2, 4, 16, len(b)))]
            elif op == 4 and b:  # duplicate a range
                end = min(len(b), pos + rng.choice((1, 4, 16, 64)))
                b[pos:pos] = b[pos:end] * rng.choice((1, 2, 16))
            elif op == 5:  # truncate
                del b[pos:]
            elif op == 6:  # append junk
                b += rng.randbytes(rng.choice((1, 8, 64)))
            elif op == 7 and len(b) >= 4:  # overwrite four bytes with a big-endian edge value
                i = rng.randrange(len(b) - 3)
                b[i:i + 4] = rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0, 1)).to_bytes(4, "big")
            elif op == 8:  # insert a msgpack fragment
                b[pos:pos] = raw_fragment(rng)
            elif op == 9 and pool:  # splice with another seed
                other = rng.choice(pool)
                cut = rng.randrange(len(other) + 1)
                b[pos:] = other[cut:]
            elif op == 10 and b:  # random byte
                b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)

    def random_bytes(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.5:
            return rng.randbytes(rng.choice((0, 1, 2, 5, 16, 64, 300)))
        try:
            return msgpack.packb(self.random_tree(3), use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            return b"\xc0"

    # -- trees (decoded msgpack, JSON, TOML) --
    def interesting(self) -> Any:
        rng = self.rng
        kind = rng.randrange(8)
        if kind == 0:
            return rng.choice(INTS)
        if kind == 1:
            return rng.choice(FLOATS)
        if kind == 2:
            return rng.choice(self.strs)
        if kind == 3:
            return rng.choice(BYTES)
        if kind == 4:
            return rng.choice((None, True, False))
        if kind == 5:
            return rng.choice(([], {}, [None], {"": None}, [[]], {"t": {}}))
        if kind == 6:
            return msgpack.ExtType(rng.choice((0, 1, 5, 127)), rng.randbytes(rng.choice((0, 1, 4, 8, 12))))
        return self.random_tree(2)

    def random_tree(self, depth: int) -> Any:
        rng = self.rng
        if depth <= 0 or rng.random() < 0.4:
            return rng.choice((rng.choice(INTS), rng.choice(FLOATS), rng.choice(self.strs), rng.choice(BYTES), None,
                               True))
        if rng.random() < 0.5:
            return [self.random_tree(depth - 1) for _ in range(rng.randrange(4))]
        return {rng.choice(self.strs): self.random_tree(depth - 1) for _ in range(rng.randrange(4))}

    def perturb(self, value: Any) -> Any:
        rng = self.rng
        if isinstance(value, bool):
            return rng.choice((not value, int(value), None, str(value).lower()))
        if isinstance(value, int):
            new = rng.choice((value + 1, value - 1, -value, value * 2, value ^ (1 << rng.randrange(64)), value + 2**32,
                              float(value), str(value), rng.choice(INTS)))
            return new if not isinstance(new, int) or -2**63 <= new < 2**64 else rng.choice(INTS)
        if isinstance(value, float):
            return rng.choice((-value, value * 1e300, value + 1e-9, math.nan, math.inf, int(value) if math.isfinite(
                value) else 0, str(value)))
        if isinstance(value, str):
            op = rng.randrange(7)
            if op == 0 and value:
                return value[: rng.randrange(len(value))]
            if op == 1:
                return value + rng.choice(("x", "é", "\x00", "\n", "/", "😀", "A"))
            if op == 2 and value:
                i = rng.randrange(len(value))  # '²' and '٣' are str.isdigit() but not int()-able / not ASCII
                c = chr(rng.choice((0, 10, 47, 48, 65, 90, 97, 127, 233, 0xB2, 0x663, 0x2028, 0x1F600)))
                return value[:i] + c + value[i + 1:]
            if op == 3:
                return value * rng.choice((2, 9, 65)) if value else "z" * 300
            if op == 4:
                return value.upper()
            if op == 5:
                return value.encode()
            return rng.choice(self.strs)
        if isinstance(value, (bytes, bytearray)):
            if rng.random() < 0.3:
                return value.decode("latin-1")
            return self.bytes_(bytes(value)) if rng.random() < 0.7 else bytes(rng.choice((0, 1, len(value) + 1)))
        if isinstance(value, list):
            v = list(value)
            op = rng.randrange(5)
            if op == 0 and v:
                del v[rng.randrange(len(v))]
            elif op == 1 and v:
                v.insert(rng.randrange(len(v) + 1), rng.choice(v))
            elif op == 2:
                v.append(self.interesting())
            elif op == 3:
                v = v * rng.choice((2, 17, 300)) if v else [None] * 300
            else:
                v = []
            return v
        if isinstance(value, dict):
            return self.mutate_tree(dict(value))
        return self.interesting()

    def _nodes(self, obj: Any, parent: Any, key: Any, out: list, depth: int = 0) -> None:
        out.append((parent, key))
        if depth > 40 or len(out) > 2000:
            return
        if isinstance(obj, dict):
            for k in list(obj):
                self._nodes(obj[k], obj, k, out, depth + 1)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                self._nodes(v, obj, i, out, depth + 1)

    def mutate_tree(self, tree: Any, raws: dict | None = None, rounds: int | None = None) -> Any:
        """``tree`` (mutated in place where it is a container) with 1-3 mutations; ``raws`` collects
        sentinel strings to be replaced by raw msgpack fragments after packing (None: no raw fragments)."""
        rng = self.rng
        box = [tree]
        for _ in range(rounds or rng.choice((1, 1, 1, 2, 3))):
            nodes: list = []
            self._nodes(box[0], box, 0, nodes)
            parent, key = rng.choice(nodes)
            value = parent[key]
            op = rng.randrange(10)
            if op <= 2:
                parent[key] = self.perturb(value)
            elif op == 3:
                parent[key] = self.interesting()
            elif op == 4 and raws is not None:
                self._sentinels += 1
                sentinel = f"\x00sentinel-{self._sentinels}\x00"
                raws[sentinel] = raw_fragment(rng)
                parent[key] = sentinel
            elif op == 5:
                parent[key] = [value] if rng.random() < 0.5 else {rng.choice(self.strs): value}
            elif op == 6:  # type confusion with another node's value
                other_parent, other_key = rng.choice(nodes)
                parent[key] = copy.deepcopy(other_parent[other_key])  # a copy: the tree stays acyclic
            elif isinstance(parent, dict):
                if op == 7:
                    del parent[key]
                elif op == 8:
                    parent[self._new_key(key)] = parent.pop(key)
                else:
                    parent[self._new_key(key)] = self.interesting()
            elif isinstance(parent, list) and parent is not box:
                if op == 7:
                    del parent[key]
                elif op == 8:
                    parent.insert(key, value)
                else:
                    parent.append(self.interesting())
            else:
                parent[key] = self.perturb(value)
        return box[0]

    def _new_key(self, key: Any) -> Any:
        rng = self.rng
        return rng.choice((f"{key}_", str(key).upper(), "", "extra", "\x00", rng.choice(self.strs), 1, -1, b"t",
                           None, 1.5, self.perturb(str(key))))

    def msgpack(self, data: bytes) -> bytes:
        """A structure-aware mutation of the msgpack ``data`` (one of our own valid encodings)."""
        tree = msgpack.unpackb(data, raw=False, strict_map_key=False)
        raws: dict[str, bytes] = {}
        tree = self.mutate_tree(tree, raws)
        try:
            out = msgpack.packb(tree, use_bin_type=self.rng.random() > 0.05,
                                use_single_float=self.rng.random() < 0.1)
        except (OverflowError, ValueError, TypeError):  # e.g. an int outside msgpack's range
            return self.bytes_(data)
        for sentinel, raw in raws.items():
            out = out.replace(msgpack.packb(sentinel), raw)
        return out


def byte_cases(mutate: Mutator, seeds: Sequence[bytes], n: int, *, structured: bool = True,
               random_share: float = 0.1, value_share: float = 0.0) -> Iterator[Any]:
    """The seeds, then ``n`` cases: msgpack-aware mutations (if ``structured``), byte mutations, random bytes,
    and (``value_share``) values that are not bytes at all, as a DHT item's value may be any msgpack value."""
    yield from seeds
    rng = mutate.rng
    for _ in range(n):
        r = rng.random()
        if r < value_share:
            case = mutate.interesting()
        elif r < random_share:
            case = mutate.random_bytes()
        elif structured and r < random_share + 0.55:
            case = mutate.msgpack(rng.choice(seeds))
        else:
            case = mutate.bytes_(rng.choice(seeds), seeds)
        if isinstance(case, bytes) and len(case) > MAX_CASE_BYTES:
            continue
        yield case


def text_cases(mutate: Mutator, seeds: Sequence[str], n: int) -> Iterator[str]:
    """Character-level mutations of strings (through bytes, decoded leniently, surrogates never produced)."""
    yield from seeds
    for _ in range(n):
        data = mutate.bytes_(mutate.rng.choice(seeds).encode(), [s.encode() for s in seeds])
        yield data.decode("utf-8", "replace")


# ---- TOML (tomllib reads it; nothing here writes it, so a tiny emitter) ------------------------------------


def toml_key(key: Any) -> str:
    key = str(key)
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return toml_string(key)


def toml_string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        elif 0xD800 <= ord(c) <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (bytes, bytearray)):
        return toml_string(bytes(v).decode("latin-1"))
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    return '""'  # None and anything else TOML cannot hold


def toml_dumps(data: dict, rng: random.Random) -> str:
    """TOML text for ``data``: top-level tables as [sections] (or inline, at random), the rest as key = value."""
    lines, sections = [], []
    for k, v in data.items():
        if isinstance(v, dict) and rng.random() < 0.8:
            sections.append((k, v))
        else:
            lines.append(f"{toml_key(k)} = {toml_value(v)}")
    for k, v in sections:
        lines.append(f"[{toml_key(k)}]")
        lines.extend(f"{toml_key(k2)} = {toml_value(v2)}" for k2, v2 in v.items())
    return "\n".join(lines) + "\n"


TOML_EXTRAS = (datetime.date(1979, 5, 27), datetime.datetime(1979, 5, 27, 7, 32), datetime.time(7, 32),
               [1, "a"], {"a": {"b": 1}}, 10**30, -(10**30), 2**64)


def toml_cases(mutate: Mutator, seeds: Sequence[str], n: int) -> Iterator[str]:
    """TOML texts: the seeds, tree mutations (TOML's own types too: dates, big ints, inline tables) re-emitted,
    and character-level mutations of the text."""
    import tomllib

    yield from seeds
    rng = mutate.rng
    for _ in range(n):
        seed = rng.choice(seeds)
        if rng.random() < 0.6:
            tree = mutate.mutate_tree(tomllib.loads(seed))
            if rng.random() < 0.3:
                nodes: list = []
                mutate._nodes(tree, [tree], 0, nodes)
                parent, key = rng.choice(nodes)
                parent[key] = rng.choice(TOML_EXTRAS)
            nest = rng.choice((10, 100, 400, 1000)) if rng.random() < 0.03 else 0
            if nest:  # nested arrays, spliced into the text (tomllib recurses once per level)
                nodes = []
                mutate._nodes(tree, [tree], 0, nodes)
                parent, key = rng.choice(nodes)
                parent[key] = "\x00nest\x00"
            text = toml_dumps(tree, rng) if isinstance(tree, dict) else toml_value(tree)
            yield text.replace(toml_string("\x00nest\x00"), "[" * nest + "1" + "]" * nest)
        else:
            yield mutate.bytes_(seed.encode(), [s.encode() for s in seeds]).decode("utf-8", "replace")
