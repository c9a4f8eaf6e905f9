"""The records nodes publish in the DHT, as frozen dataclasses (no I/O, no daemon state).

Wire form lives in protocol/wire.py; signatures and acceptance rules in protocol/records/validation.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

CAPABILITY_SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024  # signed value as stored in the DHT; anything larger is rejected by every node
MAX_ADDRS = 16
MAX_GPUS = 16
MAX_TEXT = 128  # bound on any free-text field (GPU name, version, platform)


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

    def replace(self, **changes) -> "PeerRecord":
        return dataclasses.replace(self, **changes)
