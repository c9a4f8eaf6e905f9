"""The records nodes publish in the DHT, as frozen dataclasses (no I/O, no daemon state).

Their wire form is below (capability_to_wire / peer_record_to_wire and the checked decoders); signatures and
acceptance rules are in protocol/records/validation.py.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from protocol.wire import WireError, as_map, count, field, pack, rate, text, unpack_bounded

CAPABILITY_SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024  # signed value as stored in the DHT; anything larger is rejected by every node
MAX_ADDRS = 16
MAX_GPUS = 16
MAX_RELAYS = 4
REACHABILITY = ("public", "private")
TRAIN_DEVICE = re.compile(r"cpu|cuda:[0-9]{1,3}")  # a capability's train_device


def swarm_key(swarm: str, what: str) -> str:
    """DHT key of one of the swarm's shared dictionaries, e.g. swarm_key("demo", "peers")."""
    return f"swarmnode/{swarm}/{what}"


@dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    memory_bytes: int  # total device memory
    compute_capability: tuple[int, int]  # (major, minor), e.g. (9, 0)


@dataclass(frozen=True)
class Capability:
    """What a node brings: detected hardware and measured throughput."""

    gpus: tuple[GpuInfo, ...]  # empty on a CPU-only node
    cpu_cores: int  # logical cores
    ram_bytes: int  # total RAM
    disk_free_bytes: int  # free space under the node's home directory
    tflops_fp32: float  # measured matmul throughput (GPU 0 if any, else CPU)
    tflops_bf16: float | None  # measured on GPU only; None on CPU-only nodes
    platform: str  # e.g. "Linux-6.1-x86_64 / torch 2.13.0+cpu"
    # The device the node trains on and its free memory there (bytes, at the last heartbeat). Both are left out of
    # the wire map at their defaults, so records of nodes that predate them read as a CPU node of unknown free memory.
    train_device: str = "cpu"  # "cpu" or "cuda:N" (node/runtime/device.py)
    device_free_bytes: int | None = None

    @property
    def device_kind(self) -> str:
        return "cuda" if self.gpus else "cpu"


@dataclass(frozen=True)
class PeerRecord:
    """One node's entry in the swarm's ``peers`` dictionary; the DHT subkey is ``peer_id``."""

    peer_id: str  # libp2p peer id (12D3KooW...), which embeds the node's Ed25519 public key
    addrs: tuple[str, ...]  # full multiaddrs others can join with (/ip4/.../tcp/.../p2p/<peer_id>)
    version: str  # swarmnode software version
    capability: Capability
    updated_at: float  # unix time when the node signed this record
    leaving: bool = False  # True in the tombstone a node publishes on graceful exit
    schema_version: int = CAPABILITY_SCHEMA_VERSION
    # How others reach it (node/runtime/reachability.py). Left out of the wire map at their defaults, so records of
    # nodes that predate them read as a reachable node offering the relay service.
    reachability: str = "public"  # "public" or "private" (behind a NAT: reached through ``relays``)
    relays: tuple[str, ...] = ()  # a private node's relays (peer ids), at most MAX_RELAYS
    relay_service: bool = True  # a public node relays for private ones (False: --no-relay-service)

    def replace(self, **changes) -> PeerRecord:
        return dataclasses.replace(self, **changes)


# ---- wire form --------------------------------------------------------------------------


def capability_to_wire(cap: Capability) -> dict:
    return {
        "gpus": [{"name": g.name, "mem": g.memory_bytes, "cc": list(g.compute_capability)} for g in cap.gpus],
        "cpu_cores": cap.cpu_cores,
        "ram": cap.ram_bytes,
        "disk_free": cap.disk_free_bytes,
        "tflops_fp32": cap.tflops_fp32,
        "tflops_bf16": cap.tflops_bf16,
        "platform": cap.platform,
    } | ({"device": cap.train_device} if cap.train_device != "cpu" else {}) | (
        {"device_free": cap.device_free_bytes} if cap.device_free_bytes is not None else {})


def capability_from_wire(obj: Any) -> Capability:
    obj = as_map(obj, "capability")
    gpus_raw = field(obj, "gpus", list, "capability")
    if len(gpus_raw) > MAX_GPUS:
        raise WireError(f"capability.gpus: more than {MAX_GPUS} entries")
    gpus = []
    for i, g in enumerate(gpus_raw):
        g = as_map(g, f"capability.gpus[{i}]")
        cc = field(g, "cc", list, f"capability.gpus[{i}]")
        if len(cc) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 100 for x in cc):
            raise WireError(f"capability.gpus[{i}].cc: expected [major, minor]")
        gpus.append(GpuInfo(text(g, "name", "gpu"), count(g, "mem", "gpu"), (cc[0], cc[1])))
    bf16 = obj.get("tflops_bf16", None)
    return Capability(
        gpus=tuple(gpus),
        cpu_cores=count(obj, "cpu_cores", "capability"),
        ram_bytes=count(obj, "ram", "capability"),
        disk_free_bytes=count(obj, "disk_free", "capability"),
        tflops_fp32=rate(field(obj, "tflops_fp32", (int, float), "capability"), "capability.tflops_fp32"),
        tflops_bf16=None if bf16 is None else rate(bf16, "capability.tflops_bf16"),
        platform=text(obj, "platform", "capability"),
        train_device=_train_device(obj),
        device_free_bytes=count(obj, "device_free", "capability") if "device_free" in obj else None,
    )


def _train_device(obj: dict) -> str:
    """The optional "device" of a capability map: "cpu" when absent, else "cpu" or "cuda:N"."""
    if "device" not in obj:
        return "cpu"
    device = text(obj, "device", "capability", limit=16)
    if not TRAIN_DEVICE.fullmatch(device):
        raise WireError(f"capability.device: expected 'cpu' or 'cuda:N', got {device!r}")
    return device


def peer_record_to_wire(record: PeerRecord) -> bytes:
    return pack(
        {
            "schema": record.schema_version,
            "peer_id": record.peer_id,
            "addrs": list(record.addrs),
            "version": record.version,
            "capability": capability_to_wire(record.capability),
            "updated_at": record.updated_at,
            "leaving": record.leaving,
        }
        | ({"reach": record.reachability} if record.reachability != "public" else {})
        | ({"relays": list(record.relays)} if record.relays else {})
        | ({"relay_service": False} if not record.relay_service else {})
    )


def peer_record_from_wire(data: bytes) -> PeerRecord:
    obj = as_map(unpack_bounded(data, MAX_RECORD_BYTES), "peer record")
    schema = field(obj, "schema", int, "peer record")
    if schema != CAPABILITY_SCHEMA_VERSION:
        raise WireError(f"peer record: unknown schema version {schema} (this node reads {CAPABILITY_SCHEMA_VERSION})")
    addrs = field(obj, "addrs", list, "peer record")
    if len(addrs) > MAX_ADDRS or not all(isinstance(a, str) and len(a) <= 256 for a in addrs):
        raise WireError(f"peer record.addrs: expected at most {MAX_ADDRS} multiaddr strings")
    return PeerRecord(
        peer_id=text(obj, "peer_id", "peer record"),
        addrs=tuple(addrs),
        version=text(obj, "version", "peer record"),
        capability=capability_from_wire(field(obj, "capability", dict, "peer record")),
        updated_at=rate(field(obj, "updated_at", (int, float), "peer record"), "peer record.updated_at"),
        leaving=field(obj, "leaving", bool, "peer record"),
        schema_version=schema,
        reachability=_reachability(obj),
        relays=_relays(obj),
        relay_service=field(obj, "relay_service", bool, "peer record") if "relay_service" in obj else True,
    )


def _reachability(obj: dict) -> str:
    reach = text(obj, "reach", "peer record", limit=16) if "reach" in obj else "public"
    if reach not in REACHABILITY:
        raise WireError(f"peer record.reach: expected one of {', '.join(REACHABILITY)}, got {reach!r}")
    return reach


def _relays(obj: dict) -> tuple[str, ...]:
    relays = field(obj, "relays", list, "peer record") if "relays" in obj else []
    if len(relays) > MAX_RELAYS or not all(isinstance(r, str) and 0 < len(r) <= 64 for r in relays):
        raise WireError(f"peer record.relays: expected at most {MAX_RELAYS} peer ids")
    return tuple(relays)
