"""Control messages of a training pipeline: between the trainer, the stage replicas and the state-backup holders.

    data = control_to_wire(EndStep(step, (mb1, mb2), group, backup=None))          # sender
    msg = control_from_wire(data, (Status, Commit, EndStep, Resync))               # receiver: one of these, or
                                                                                    # WireError (a ValueError)
    rec = member_record_from_wire(item.value)   # a stage's DHT member record (replica / backup / gone)
    stage_protocol(swarm, pipeline_id, stage, "forward")    # the libp2p protocol names a stage host serves

Each message is a frozen dataclass whose fields are checked on construction (so a decoded message is as valid
as one built locally) with one x_to_wire / x_from_wire pair: a control frame is a msgpack map {"t": tag, "v":
PIPE_PROTOCOL_VERSION, ...fields}, decoded with protocol/wire.py unpack_bounded (every container bounded by
CONTROL_BOUND); unknown or missing fields, another version, or a tag the reader does not expect are refused.
A DHT member record is a 4-item msgpack array of at most MAX_RECORD_BYTES. The activation and gradient frames
between stages are in protocol/pipeline/activations.py; what the messages mean is in node/jobs/pipeline/trainer.py
(the trainer) and node/jobs/pipeline/stage_host.py (a replica); DirectOpen / DirectOffer set up a direct data path
(protocol/pipeline/direct.py). Pure: msgpack only, no I/O, no node/ imports.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from protocol import rejections
from protocol.wire import WireError, pack, unpack_bounded

# ---- names -------------------------------------------------------------------------------------------------

PIPE_PROTOCOL_VERSION = 1
STAGE_KINDS = ("forward", "backward", "control", "infer")  # infer: a served stage (node/serving/host.py)
MAX_STEP = 2**63 - 1
MAX_MB_ID = 2**64 - 1
MAX_MICRO_BATCHES = 65_536  # per step and replica: far above any batch / micro-batch ratio in use
MAX_GROUP = 256  # replicas of one stage (protocol/allreduce/messages.py MAX_GROUP_SIZE)
MAX_REASON = 256
# A control frame: MAX_MICRO_BATCHES 9-byte ids, or MAX_GROUP 128-character ids, plus fields: < 1 MiB.
CONTROL_BOUND = 1 << 20
CONTROL_OBJECTS = 2 * MAX_MICRO_BATCHES + 64  # a CommitReply with both id lists full, plus its fields
MAX_RECORD_BYTES = 256
_PEER_RE = re.compile(r"[1-9A-HJ-NP-Za-km-z]{20,128}")  # base58 libp2p peer id
_HEX_RE = re.compile(r"([0-9a-f]{64})?")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def stage_protocol(swarm: str, pipeline_id: str, stage: int, kind: str) -> str:
    """The libp2p protocol a replica of ``stage`` serves ``kind`` (forward, backward, control) under."""
    if kind not in STAGE_KINDS:
        raise ValueError(f"kind must be one of {STAGE_KINDS}, got {kind!r}")
    return f"swarmnode/{swarm}/pipe/{pipeline_id}/s{stage}/{kind}"


def pipe_protocol(swarm: str, pipeline_id: str, kind: str) -> str:
    """Per-node protocols of a pipeline: "state" (serve a stage's state) and "backup" (receive one)."""
    if kind not in ("state", "backup"):
        raise ValueError(f"kind must be state or backup, got {kind!r}")
    return f"swarmnode/{swarm}/pipe/{pipeline_id}/{kind}"


def stage_key(swarm: str, pipeline_id: str, stage: int) -> str:
    """DHT key under which the replicas (and state backups) of ``stage`` announce themselves, one subkey each."""
    return f"swarmnode/{swarm}/pipe/{pipeline_id}/s{stage}/members"


# ---- field checks (ValueError; from_wire turns it into a WireError) ----------------------------------------

def _uint(hi: int) -> Callable[[Any, str], None]:
    def check(v: Any, what: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
            raise ValueError(f"{what}: expected an integer in [0, {hi}], got {v!r:.40}")
    return check


_step, _count, _stage = _uint(MAX_STEP), _uint(MAX_MICRO_BATCHES), _uint(4095)


def _ids(v: Any, what: str) -> None:
    if not isinstance(v, tuple) or len(v) > MAX_MICRO_BATCHES:
        raise ValueError(f"{what}: expected at most {MAX_MICRO_BATCHES} micro-batch ids")
    for i in v:
        _uint(MAX_MB_ID)(i, what)


def _peer(v: Any, what: str) -> str:
    if not isinstance(v, str) or not _PEER_RE.fullmatch(v):
        raise ValueError(f"{what}: expected a base58 peer id, got {v!r:.40}")
    return v


def check_peer_id(value: Any, what: str) -> str:
    """``value`` if it is a base58 libp2p peer id (a DHT subkey, a group member); ValueError naming ``what``."""
    return _peer(value, what)


def _group(v: Any, what: str) -> None:
    if not isinstance(v, tuple) or not 1 <= len(v) <= MAX_GROUP:
        raise ValueError(f"{what}: expected 1 to {MAX_GROUP} peer ids")
    for p in v:
        _peer(p, what)


def _hex(v: Any, what: str) -> None:
    if not isinstance(v, str) or not _HEX_RE.fullmatch(v):
        raise ValueError(f"{what}: expected 64 lowercase hex digits or nothing")


def _reason(v: Any, what: str) -> None:
    if not isinstance(v, str) or len(v) > MAX_REASON or _CONTROL_CHARS.search(v):
        raise ValueError(f"{what}: expected one line of at most {MAX_REASON} characters")


def _number(v: Any, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{what}: expected a finite number >= 0, got {v!r:.40}")


def _bool(v: Any, what: str) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{what}: expected true or false, got {v!r:.20}")


def _optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], None]:
    return lambda v, what: None if v is None else check(v, what)


def one_line(text: Any) -> str:
    return " ".join(str(text).split())[:MAX_REASON]


# ---- messages ----------------------------------------------------------------------------------------------

class _Message:
    """Base of the frozen message dataclasses: construction runs ``_checks`` (field -> check) on every field."""

    _checks: dict[str, Callable[[Any, str], Any]] = {}
    if TYPE_CHECKING:  # set on each subclass by @dataclass; declared for the type checker only
        __dataclass_fields__: ClassVar[dict[str, Any]]

    def __post_init__(self) -> None:
        for name, check in self._checks.items():
            check(getattr(self, name), f"{_TAGS[type(self)]}.{name}")


@dataclass(frozen=True)
class Status(_Message):
    """Trainer -> replica: where are you? (``step``: the trainer's, for logs)."""
    step: int
    _checks = {"step": _step}


@dataclass(frozen=True)
class StatusReply(_Message):
    step: int  # the step the replica is accumulating (= optimizer steps completed)
    committed: int  # micro-batches committed this step
    params_hash: str  # node/ml/models.py params_sha256 of the stage now
    _checks = {"step": _step, "committed": _count, "params_hash": _hex}


@dataclass(frozen=True)
class Commit(_Message):
    """Trainer -> replica: count these micro-batches (their pending gradients) in step ``step``."""
    step: int
    micro_batches: tuple[int, ...]
    _checks = {"step": _step, "micro_batches": _ids}


@dataclass(frozen=True)
class CommitReply(_Message):
    step: int
    committed: tuple[int, ...]  # now counted (also those an earlier copy of this commit counted)
    missing: tuple[int, ...]  # no pending gradient of this id from this trainer
    _checks = {"step": _step, "committed": _ids, "missing": _ids}


@dataclass(frozen=True)
class EndStep(_Message):
    """Trainer -> every live replica of a stage: average with ``group`` and step. ``micro_batches``: the ids the
    trainer counts on this replica; ``backup``: push the new state to this peer (or None)."""
    step: int
    micro_batches: tuple[int, ...]
    group: tuple[str, ...]
    backup: str | None
    _checks = {"step": _step, "micro_batches": _ids, "group": _group, "backup": _optional(_peer)}


@dataclass(frozen=True)
class EndStepReply(_Message):
    step: int  # the step that ended
    applied: bool  # an optimizer step was taken (False: nothing averaged; the gradient stays in error feedback)
    weight: float  # micro-batches behind the applied average (of every replica included)
    committed: int  # micro-batches this replica contributed
    discarded: int  # commits dropped: not the ones the trainer counts here (or a non-finite gradient)
    members: int  # replicas in the averaging round (1: stepped alone)
    params_hash: str
    backup_ok: bool | None  # None: no backup asked
    error: str
    _checks = {"step": _step, "applied": _bool, "weight": _number, "committed": _count, "discarded": _count,
               "members": _uint(MAX_GROUP), "params_hash": _hex, "backup_ok": _optional(_bool), "error": _reason}


@dataclass(frozen=True)
class Resync(_Message):
    """Trainer -> a replica behind or diverged: load the state of ``step`` (or later) from ``source``."""
    step: int
    source: str
    _checks = {"step": _step, "source": _peer}


@dataclass(frozen=True)
class Advance(_Message):
    """Trainer -> the most advanced replicas of a stage none of whose replicas or backups is at the trainer's
    ``step`` (its last replica at that step died, or failed its step end, before its state was backed up): label
    the state held as ``step``; the stage loses the updates in between, the pipeline goes on. The reply is a
    StatusReply (a ControlError if the replica is past ``step``)."""
    step: int
    _checks = {"step": _step}


@dataclass(frozen=True)
class Discard(_Message):
    """Trainer -> replica: drop what this trainer committed in ``step``, an attempt it abandoned (a failed
    step is retried with new micro-batch ids; commits of the old attempt would not match its count). The reply
    is a StatusReply; a ControlError when the replica also holds commits of another trainer."""
    step: int
    _checks = {"step": _step}


@dataclass(frozen=True)
class ControlError(_Message):
    reason: str
    _checks = {"reason": _reason}


@dataclass(frozen=True)
class StateRequest(_Message):
    """Ask a node for the state of ``stage`` (its own, or a backup it holds) at ``min_step`` or later."""
    stage: int
    min_step: int
    _checks = {"stage": _stage, "min_step": _step}


@dataclass(frozen=True)
class StateHead(_Message):
    """Precedes ``size`` bytes of state (StageHost.snapshot), sent in frames of at most 1 MiB."""
    stage: int
    step: int  # optimizer steps these parameters have taken
    size: int
    sha256: str  # of the bytes
    params_hash: str  # params_sha256 of the parameters inside
    _checks = {"stage": _stage, "step": _step, "size": _uint(2**40), "sha256": _hex, "params_hash": _hex}


@dataclass(frozen=True)
class BackupAck(_Message):
    ok: bool
    reason: str
    _checks = {"ok": _bool, "reason": _reason}


def _ip(v: Any, what: str) -> None:
    if not isinstance(v, str) or len(v) > 45:
        raise ValueError(f"{what}: expected an IP address, got {v!r:.40}")
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise ValueError(f"{what}: expected an IP address (no host names), got {v!r:.40}") from None


def _port(v: Any, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ValueError(f"{what}: expected a TCP port in [1, 65535], got {v!r:.40}")


def _raw(size: int) -> Callable[[Any, str], None]:
    def check(v: Any, what: str) -> None:
        if not isinstance(v, bytes) or len(v) != size:
            raise ValueError(f"{what}: expected {size} bytes")
    return check


@dataclass(frozen=True)
class DirectOpen(_Message):
    """Trainer -> replica, over the authenticated libp2p control stream: offer me a direct TCP session for
    forward/backward hops (protocol/pipeline/direct.py). The reply is a DirectOffer, or a ControlError when the replica
    serves no direct path."""
    _checks = {}


@dataclass(frozen=True)
class DirectOffer(_Message):
    """The replica's direct endpoint and a fresh session: ``key`` opens and seals the frames of the one TCP
    connection that first uses ``session`` (it travels only inside libp2p's encrypted stream)."""
    host: str  # an IP literal (never a name: a peer's offer causes no DNS lookup)
    port: int
    session: bytes  # protocol/pipeline/direct.py SESSION_SIZE random bytes
    key: bytes  # KEY_SIZE random bytes (AES-256-GCM)
    _checks = {"host": _ip, "port": _port, "session": _raw(16), "key": _raw(32)}


def _role(v: Any, what: str) -> None:
    if v not in ("replica", "backup", "gone"):
        raise ValueError(f"{what}: expected replica, backup or gone, got {v!r:.20}")


@dataclass(frozen=True)
class MemberRecord(_Message):
    """A DHT record under stage_key: a replica of the stage, or a node holding a backup of its state."""
    role: str  # "replica" | "backup" | "gone" (a replica that stopped cleanly)
    throughput: float  # micro-batches per second it offers (routing weight)
    step: int  # the step it is at (replica) or the backup's step
    beat: float  # unix time of this heartbeat
    _checks = {"role": _role, "throughput": _number, "step": _step, "beat": _number}


_TAGS: dict[type[_Message], str] = {Status: "status", StatusReply: "status_reply", Commit: "commit",
                                    CommitReply: "commit_reply", EndStep: "end_step", EndStepReply: "end_step_reply",
                                    Resync: "resync", Advance: "advance", Discard: "discard",
                                    ControlError: "error", StateRequest: "state_request", StateHead: "state",
                                    BackupAck: "backup_ack", MemberRecord: "record", DirectOpen: "direct_open",
                                    DirectOffer: "direct_offer"}
_BY_TAG = {tag: cls for cls, tag in _TAGS.items() if cls is not MemberRecord}  # a record is never a frame


def control_to_wire(msg: Any) -> bytes:
    tag = _TAGS.get(type(msg))
    if tag is None:
        raise TypeError(f"not a pipeline control message: {type(msg).__name__}")
    body = {"t": tag, "v": PIPE_PROTOCOL_VERSION}
    for name in msg.__dataclass_fields__:
        value = getattr(msg, name)
        body[name] = list(value) if isinstance(value, tuple) else value
    return pack(body)


def control_from_wire(data: bytes, expect: type | tuple[type, ...], bound: int = CONTROL_BOUND):
    """The message in ``data``, one of the ``expect`` types; WireError (a ValueError) on anything else, counted in
    protocol/rejections.py as a refused "pipeline control" frame."""
    try:
        return _decode(data, expect if isinstance(expect, tuple) else (expect,), bound)
    except WireError as e:
        rejections.count("pipeline control", e)
        raise


def _decode(data: bytes, expect: tuple[type, ...], bound: int):
    obj = unpack_bounded(data, bound, max_objects=CONTROL_OBJECTS)
    if not isinstance(obj, dict):
        raise WireError(f"control frame: expected a map, got {type(obj).__name__}")
    tag = obj.get("t")
    cls = _BY_TAG.get(tag) if isinstance(tag, str) else None
    if cls not in expect:
        raise WireError(f"expected {' or '.join(_TAGS[c] for c in expect)}, got {obj.get('t')!r:.40}")
    names = tuple(cls.__dataclass_fields__)
    unknown = [k for k in obj if k not in ("t", "v", *names)]
    if unknown:
        raise WireError(f"{_TAGS[cls]}: unknown field {unknown[0]!r:.40}")
    missing = [k for k in ("v", *names) if k not in obj]
    if missing:
        raise WireError(f"{_TAGS[cls]}: missing field {missing[0]!r}")
    if type(obj["v"]) is not int or obj["v"] != PIPE_PROTOCOL_VERSION:
        raise WireError(f"{_TAGS[cls]}: unsupported version {obj['v']!r:.20}")
    try:
        return cls(**{k: tuple(obj[k]) if isinstance(obj[k], list) else obj[k] for k in names})
    except (ValueError, TypeError) as e:
        raise WireError(str(e)) from None


def member_record_to_wire(rec: MemberRecord) -> bytes:
    return pack([rec.role, rec.throughput, rec.step, rec.beat])


def member_record_from_wire(data: Any) -> MemberRecord:
    if not isinstance(data, bytes):
        raise WireError("record is not bytes")
    obj = unpack_bounded(data, MAX_RECORD_BYTES)
    if not isinstance(obj, list) or len(obj) != 4:
        raise WireError("record: expected [role, throughput, step, beat]")
    try:
        return MemberRecord(*obj)
    except (ValueError, TypeError) as e:
        raise WireError(str(e)) from None


__all__ = ["CONTROL_BOUND", "MAX_GROUP", "MAX_MB_ID", "MAX_MICRO_BATCHES", "MAX_REASON", "MAX_RECORD_BYTES", "MAX_STEP",
           "PIPE_PROTOCOL_VERSION", "STAGE_KINDS", "Advance", "BackupAck", "Commit", "CommitReply", "ControlError",
           "DirectOffer", "DirectOpen", "Discard", "EndStep", "EndStepReply", "MemberRecord", "Resync", "StateHead",
           "StateRequest", "Status", "StatusReply", "check_peer_id", "control_from_wire", "control_to_wire",
           "member_record_from_wire", "member_record_to_wire", "one_line", "pipe_protocol", "stage_key",
           "stage_protocol"]
