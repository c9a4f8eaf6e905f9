"""Shard manifests: what a splitting node publishes about the stage files it cut a model into.

A model of L layers cut at spans [(0, a), (a, b), ..., (y, L)] becomes one safetensors file per stage plus
one manifest (``manifest.msgpack`` beside them) that lists, per shard: its layer range [start, end), file
name, byte size and sha256; and, for the whole model: the architecture (a transformers class name), its
config as canonical JSON, the parameter dtype, the model hash (sha256 of the unsplit model's parameters,
node/ml/models.py params_sha256), the tied weights, and the peer id of the node that split it. The splitter
signs the manifest with its Ed25519 key; since a peer id embeds its public key (protocol/records/peer_keys.py),
anyone can check the signature with no lookup.

    manifest = sign_manifest(ShardManifest(...), private_key)     # splitter side
    data = manifest_to_wire(manifest)                             # bytes, msgpack
    manifest = manifest_from_wire(data)                           # structure checked, signature NOT yet
    verify_manifest(manifest, trusted_signers={peer}, expected_model_hash=h)   # ShardError if not acceptable
    check_shard_bytes(manifest, index, shard_bytes)               # size + sha256, before parsing a byte of it

Tied weights. A tie ``TiedWeight(target="lm_head.weight", source="transformer.wte.weight")`` says the
target is the same tensor as the source in the unsplit model (GPT-2's LM head is its token embedding). When
one shard holds both, the file stores the source only and the loader re-ties them. When they fall in
different shards (first and last stage), the target's shard stores its own copy; the two copies start equal
and stay equal as long as both holders apply the *sum* of their two gradients (node/ml/stages.py
sync_tied_grads / tied_grad_sum).

The signature covers SIGNING_CONTEXT + the msgpack encoding of the wire map without its "signature" entry.
That map is rebuilt from the dataclass fields in a fixed order and holds only ints, strings and lists of
them, so the encoding is canonical: a receiver re-derives the exact signed bytes from what it parsed.
Every error is a ShardError (a ValueError) with a one-line reason. Pure: no I/O, no torch, no node/ imports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.records.peer_keys import PeerIdError, peer_id_of, public_key_from_peer_id
from protocol.wire import WireError, exact_map, pack, unpack_bounded

SHARD_SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.msgpack"
SIGNING_CONTEXT = b"swarmnode/shard-manifest/v1\x00"  # a manifest signature cannot pass for any other record's
SIGNATURE_BYTES = 64  # Ed25519 (RFC 8032)
MAX_SHARDS = 4096  # a stage per layer of the deepest models in use (Llama-3 405B: 126 layers) with room
MAX_LAYERS = 100_000
MAX_SHARD_BYTES = 2**40  # 1 TiB: a bound for the size field, far above any one stage
MAX_CONFIG_BYTES = 256 * 1024  # a transformers config.json is a few KiB; id2label maps can grow it
MAX_TIES = 16
MAX_TENSOR_NAME = 256
# The largest manifest: MAX_SHARDS entries of ~200 bytes (a 128-char file name, 64-char sha, ints) plus the
# config: about 1.1 MiB.
MAX_MANIFEST_BYTES = 2 * 1024 * 1024
# msgpack values in the largest manifest: MAX_SHARDS maps of 5 fields (11 values each), MAX_TIES maps of 2 (5
# each), 11 top-level fields (22) and the lists; the config travels as one JSON string.
MAX_MANIFEST_OBJECTS = 64 + 11 * MAX_SHARDS + 5 * MAX_TIES
DTYPES = ("float32", "float16", "bfloat16", "float64")
_ARCH_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # no path separators, no leading dot
_TENSOR_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class ShardError(ValueError):
    """A manifest or shard that this node must not use; the message is one line naming why."""


def _show(value: Any) -> str:
    return f"{value!r:.60}"


def _int(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ShardError(f"{field}: must be an integer in [{lo}, {hi}], got {_show(value)}")
    return value


def _match(field: str, value: Any, pattern: re.Pattern, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ShardError(f"{field}: must be {what}, got {_show(value)}")
    return value


def _tensor_name(field: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_TENSOR_NAME or not _TENSOR_RE.fullmatch(value):
        raise ShardError(f"{field}: must be a dotted tensor name, got {_show(value)}")
    return value


@dataclass(frozen=True)
class ShardInfo:
    """One stage file: layers [start, end) of the model."""

    start: int
    end: int
    file: str  # a bare file name beside the manifest ("stage-000.safetensors"), never a path
    sha256: str  # lowercase hex of the file's bytes
    size: int  # bytes

    def __post_init__(self) -> None:
        _int("shard.start", self.start, 0, MAX_LAYERS - 1)
        _int("shard.end", self.end, self.start + 1, MAX_LAYERS)
        _match("shard.file", self.file, _FILE_RE, "a bare file name of at most 128 characters")
        _match("shard.sha256", self.sha256, _SHA_RE, "64 lowercase hex digits")
        _int("shard.size", self.size, 1, MAX_SHARD_BYTES)


@dataclass(frozen=True)
class TiedWeight:
    """``target`` is the same tensor as ``source`` in the unsplit model (names as in its state_dict)."""

    target: str  # e.g. "lm_head.weight", held by the last stage
    source: str  # e.g. "transformer.wte.weight", held by the first stage

    def __post_init__(self) -> None:
        _tensor_name("tied.target", self.target)
        _tensor_name("tied.source", self.source)
        if self.target == self.source:
            raise ShardError(f"tied: {self.target} is tied to itself")


@dataclass(frozen=True)
class ShardManifest:
    """The signed description of a split model (see the module docstring)."""

    model_hash: str  # sha256 hex of the unsplit model's parameters (node/ml/models.py params_sha256)
    arch: str  # transformers class name, e.g. "GPT2LMHeadModel"
    config_json: str  # the model's config.to_dict() as canonical JSON (sorted keys, compact)
    num_layers: int  # L: the spans cover [0, L)
    dtype: str  # parameter dtype in every shard
    shards: tuple[ShardInfo, ...]
    tied: tuple[TiedWeight, ...]
    splitter: str  # peer id of the node that split and signed
    signature: bytes = b""  # Ed25519 over signed_bytes(); empty until sign_manifest

    def __post_init__(self) -> None:
        _match("model_hash", self.model_hash, _SHA_RE, "64 lowercase hex digits")
        _match("arch", self.arch, _ARCH_RE, "a transformers class name")
        if not isinstance(self.config_json, str) or len(self.config_json.encode()) > MAX_CONFIG_BYTES:
            raise ShardError(f"config_json: must be a JSON string of at most {MAX_CONFIG_BYTES} bytes")
        try:
            config = json.loads(self.config_json)
        except ValueError:
            raise ShardError("config_json: not valid JSON") from None
        except RecursionError:  # json.loads recurses once per level of nesting
            raise ShardError("config_json: JSON nested too deeply") from None
        if not isinstance(config, dict):
            raise ShardError("config_json: must encode a JSON object")
        _int("num_layers", self.num_layers, 1, MAX_LAYERS)
        if self.dtype not in DTYPES:
            raise ShardError(f"dtype: must be one of {', '.join(DTYPES)}, got {_show(self.dtype)}")
        shards = tuple(self.shards) if isinstance(self.shards, (list, tuple)) else None
        if not shards or len(shards) > MAX_SHARDS or not all(isinstance(s, ShardInfo) for s in shards):
            raise ShardError(f"shards: must list 1 to {MAX_SHARDS} shards")
        expected_start = 0
        for i, s in enumerate(shards):
            if s.start != expected_start:
                raise ShardError(f"shards[{i}]: starts at layer {s.start}, expected {expected_start} (spans must "
                                 "be contiguous)")
            expected_start = s.end
        if expected_start != self.num_layers:
            raise ShardError(f"shards: cover layers [0, {expected_start}), the model has {self.num_layers}")
        if len({s.file for s in shards}) != len(shards):
            raise ShardError("shards: two shards name the same file")
        tied = tuple(self.tied) if isinstance(self.tied, (list, tuple)) else None
        if tied is None or len(tied) > MAX_TIES or not all(isinstance(t, TiedWeight) for t in tied):
            raise ShardError(f"tied: must list at most {MAX_TIES} tied weights")
        if len({t.target for t in tied}) != len(tied):
            raise ShardError("tied: a target is listed twice")
        try:
            public_key_from_peer_id(self.splitter)
        except PeerIdError as e:
            raise ShardError(f"splitter: {e}") from None
        if not isinstance(self.signature, bytes) or len(self.signature) not in (0, SIGNATURE_BYTES):
            raise ShardError(f"signature: must be {SIGNATURE_BYTES} bytes (or empty before signing)")
        object.__setattr__(self, "shards", shards)
        object.__setattr__(self, "tied", tied)

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.start, s.end) for s in self.shards)

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

    def signed_bytes(self) -> bytes:
        """What the signature covers: SIGNING_CONTEXT + canonical msgpack of every field but the signature."""
        return SIGNING_CONTEXT + pack(_body(self))

    def replace(self, **changes) -> ShardManifest:
        return dataclasses.replace(self, **changes)


def canonical_config_json(config: dict) -> str:
    """The one JSON form of a config dict that manifests carry (sorted keys, no spaces, no NaN)."""
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ShardError(f"config is not plain JSON: {e}") from None


# ---- signing -----------------------------------------------------------------------------------------------


def sign_manifest(manifest: ShardManifest, private_key: Ed25519PrivateKey) -> ShardManifest:
    """The manifest with its signature; ``manifest.splitter`` must be the key's peer id."""
    if peer_id_of(private_key.public_key()) != manifest.splitter:
        raise ShardError(f"splitter {manifest.splitter} is not the peer id of the signing key")
    return manifest.replace(signature=private_key.sign(manifest.signed_bytes()))


def verify_manifest(manifest: ShardManifest, *, trusted_signers: Iterable[str] | None = None,
                    expected_model_hash: str | None = None) -> ShardManifest:
    """``manifest`` if its signature is the splitter's, the splitter is trusted (any signer when
    ``trusted_signers`` is None) and it describes the expected model; ShardError naming the first failure."""
    if not manifest.signature:
        raise ShardError("shard manifest is not signed")
    if trusted_signers is not None:
        trusted = set(trusted_signers)
        if manifest.splitter not in trusted:
            raise ShardError(f"shard manifest signed by {manifest.splitter}, which is not a trusted splitter")
    try:
        public_key_from_peer_id(manifest.splitter).verify(manifest.signature, manifest.signed_bytes())
    except InvalidSignature:
        raise ShardError(f"bad signature on the shard manifest (claimed splitter {manifest.splitter})") from None
    if expected_model_hash is not None and manifest.model_hash != expected_model_hash:
        raise ShardError(f"shard manifest is for model {manifest.model_hash[:16]}..., expected "
                         f"{str(expected_model_hash)[:16]}...")
    return manifest


def check_shard_bytes(manifest: ShardManifest, index: int, data: bytes) -> None:
    """Raise ShardError unless ``data`` is shard ``index`` of ``manifest`` (byte size, then sha256)."""
    _int("shard index", index, 0, len(manifest.shards) - 1)
    info = manifest.shards[index]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ShardError(f"shard {index} ({info.file}): expected bytes, got {type(data).__name__}")
    if len(data) != info.size:
        raise ShardError(f"shard {index} ({info.file}): {len(data)} bytes, the manifest says {info.size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise ShardError(f"shard {index} ({info.file}): sha256 {digest[:16]}... does not match the manifest's "
                         f"{info.sha256[:16]}...")


# ---- wire form: a msgpack map keyed by field names, "v" first ---------------------------------------------


def _body(m: ShardManifest) -> dict:
    return {
        "v": SHARD_SCHEMA_VERSION,
        "model_hash": m.model_hash,
        "arch": m.arch,
        "config_json": m.config_json,
        "num_layers": m.num_layers,
        "dtype": m.dtype,
        "shards": [{"start": s.start, "end": s.end, "file": s.file, "sha256": s.sha256, "size": s.size}
                   for s in m.shards],
        "tied": [{"target": t.target, "source": t.source} for t in m.tied],
        "splitter": m.splitter,
    }


def manifest_to_wire(manifest: ShardManifest) -> bytes:
    if not manifest.signature:
        raise ShardError("refusing to encode an unsigned shard manifest (sign_manifest first)")
    return pack({**_body(manifest), "signature": manifest.signature})




def _list(obj: dict, key: str, limit: int, where: str) -> list:
    value = obj[key]
    if not isinstance(value, list) or len(value) > limit:
        raise ShardError(f"{where}.{key}: must be a list of at most {limit} entries")
    return value


def manifest_from_wire(data: bytes) -> ShardManifest:
    """Parse and structurally check a manifest (ShardError on anything odd); call verify_manifest before use."""
    try:
        obj = unpack_bounded(data, MAX_MANIFEST_BYTES, MAX_MANIFEST_OBJECTS)
    except WireError as e:
        raise ShardError(f"shard manifest: {e}") from None
    fields = tuple(f.name for f in dataclasses.fields(ShardManifest))
    obj = exact_map(obj, ("v", *fields), "shard manifest", ShardError)
    if obj["v"] != SHARD_SCHEMA_VERSION or isinstance(obj["v"], bool):
        raise ShardError(f"shard manifest: unknown schema version {_show(obj['v'])} (this node reads "
                         f"{SHARD_SCHEMA_VERSION})")
    shards = []
    for i, s in enumerate(_list(obj, "shards", MAX_SHARDS, "shard manifest")):
        s = exact_map(s, tuple(f.name for f in dataclasses.fields(ShardInfo)), f"shard manifest.shards[{i}]",
                      ShardError)
        shards.append(ShardInfo(**s))
    tied = []
    for i, t in enumerate(_list(obj, "tied", MAX_TIES, "shard manifest")):
        tied.append(TiedWeight(**exact_map(t, ("target", "source"), f"shard manifest.tied[{i}]", ShardError)))
    values = {name: obj[name] for name in fields}
    values.update(shards=tuple(shards), tied=tuple(tied))
    if not isinstance(values["signature"], bytes) or len(values["signature"]) != SIGNATURE_BYTES:
        raise ShardError(f"shard manifest.signature: must be {SIGNATURE_BYTES} bytes")
    return ShardManifest(**values)


__all__ = ["DTYPES", "MANIFEST_FILE", "MAX_MANIFEST_BYTES", "SHARD_SCHEMA_VERSION", "ShardError", "ShardInfo",
           "ShardManifest", "TiedWeight", "canonical_config_json", "check_shard_bytes", "manifest_from_wire",
           "manifest_to_wire", "sign_manifest", "verify_manifest"]
