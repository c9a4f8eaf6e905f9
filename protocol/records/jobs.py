"""Federated training jobs: the job spec, its DHT records, their wire form and the signed-record validator.

DHT layout (swarm ``S``; keys are hashed by hivemind, so a validator only ever sees ``key_id(...)``):
  - ``jobs_key(S)`` = "swarmnode/S/jobs", subkey ``job_id``: the JobRecord, signed by the job's submitter.
    ``job_id = job_id_for(spec, submitter, nonce)`` and the record carries all three, so the subkey is bound to
    one submitter and one immutable spec: nobody else can write, overwrite or cancel that entry.
  - ``progress_key(S, job_id)`` = "swarmnode/S/job-progress/<first hex digit of job_id>", subkey
    ``"<job_id>/<peer_id>"``: one JobProgress per participant (round, model hash, metrics), signed by that peer.

Why 16 fixed progress buckets rather than one key per job: a validator cannot recognise a key from its hash,
so a per-job key is protected only on nodes that were told the job id. The nodes that *store* a key are the
ones nearest its hash, not the ones following the job; they would accept anything under an unknown job's key,
and hivemind drops a whole dictionary from a response when one entry fails validation, so one forged entry
would hide every honest participant's progress from the readers that do protect it. With fixed bucket keys
every node protects every job from the start; the first hex digit of the (sha256-based) job id spreads jobs
over 16 keys, and a reader filters its bucket by the subkey prefix.

Signatures are Ed25519 over (key, subkey, value, expiration_time), as in protocol/records/validation.py: a replayed old
record cannot be given a later expiry, and a record cannot move to another subkey, dictionary or swarm.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import msgpack

from protocol.allreduce.messages import MAX_GROUP_SIZE
from protocol.records.peer_keys import PeerIdError, public_key_from_peer_id
from protocol.records.peer import swarm_key
from protocol.wire import WireError, _get, exact_map, unpack_bounded


JOB_SCHEMA_VERSION = 1
ARCHS = ("gpt2", "llama", "bert", "minilm", "mlp", "cnn")  # node/ml/models.py builds each
TASKS_BY_ARCH = {"gpt2": ("causal-lm",), "llama": ("causal-lm",), "bert": ("classification",),
                 "minilm": ("classification",), "mlp": ("classification",), "cnn": ("classification",)}
INNER_KINDS = ("sgd", "adamw")
OUTER_KINDS = ("fedavg", "diloco")
JOB_STATES = ("running", "paused", "done", "cancelled")
JOB_KINDS = ("federated", "pipeline")
PIPELINE_STRATEGIES = ("balanced", "layer_wise", "memory_aware")  # memory_aware: sized for the chosen hosts
MAX_STAGES = 16
MAX_STAGE_REPLICAS = 4  # so an assignment (<= 64 peer ids, ~3.5 KiB) keeps the record far below its bound
MAX_MICRO_BATCHES = 1024
MAX_MANIFEST_WIRE_BYTES = 1 << 20  # protocol/transfer/shards.py MAX_MANIFEST_BYTES
PROGRESS_STATES = ("running", "paused", "done", "declined")  # "cancelled" is the submitter's word alone
MAX_REASON = 200  # characters of a decline's reason (shown on other nodes' terminals: printable only)
MAX_NAME = 64  # job and dataset names, model config keys and string values
MAX_NONCE = 64
MAX_MODEL_OVERRIDES = 16
MAX_ROUNDS = 1_000_000
MAX_LOCAL_STEPS = 1_000_000
MAX_BATCH_SIZE = 65_536
MAX_ROUND_TIMEOUT_S = 86_400.0
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_JOB_SPEC_BYTES = 8 * 1024
# The largest record (longest names, MAX_MODEL_OVERRIDES long overrides, MAX_GROUP_SIZE participants) is about
# 16.3 KiB (tests/test_job_records.py::test_largest_record_fits); the limit leaves room for a schema change.
MAX_JOB_RECORD_BYTES = 32 * 1024
MAX_JOB_PROGRESS_BYTES = 32 * 1024
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_HEX_RE = re.compile(r"[0-9a-f]+")
JOB_ID_HEX = 16
PROGRESS_BUCKETS = "0123456789abcdef"


def jobs_key(swarm: str) -> str:
    return swarm_key(swarm, "jobs")


def progress_key(swarm: str, job_id: str) -> str:
    """The bucket dictionary holding every participant's JobProgress of ``job_id`` (see module docstring)."""
    _check_job_id("job_id", job_id)
    return swarm_key(swarm, f"job-progress/{job_id[0]}")


def progress_subkey(job_id: str, peer_id: str) -> str:
    return f"{job_id}/{peer_id}"


def parse_progress_subkey(subkey: Any) -> tuple[str, str]:
    """(job_id, peer_id) of a progress subkey; ValueError if it is not one."""
    if not isinstance(subkey, str) or subkey.count("/") != 1:
        raise ValueError(f"not a job progress subkey: {subkey!r:.80}")
    job_id, peer_id = subkey.split("/")
    _check_job_id("job_id", job_id)
    _check_peer_id("peer_id", peer_id)
    return job_id, peer_id


# ---- field checks (ValueError naming the field, as the job file's dotted path) -------------------------


def _show(value: Any) -> str:
    return f"{value!r:.40}"


def _check_int(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: must be an integer, got {_show(value)}")
    if value < lo:
        raise ValueError(f"{field}: must be >= {lo}, got {value}")
    if value > hi:
        raise ValueError(f"{field}: must be <= {hi}, got {value}")
    return value


def _check_float(field: str, value: Any, *, gt: float | None = None, ge: float | None = None,
                 lt: float | None = None, le: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{field}: must be finite, got {value}")
    for bound, ok, word in ((gt, lambda b: value > b, ">"), (ge, lambda b: value >= b, ">="),
                            (lt, lambda b: value < b, "<"), (le, lambda b: value <= b, "<=")):
        if bound is not None and not ok(bound):
            raise ValueError(f"{field}: must be {word} {bound:g}, got {value}")
    return float(value)


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise ValueError(f"{field}: must be one of {', '.join(map(repr, choices))}, got {_show(value)}")
    return value


def _check_name(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field}: must be a string, got {_show(value)}")
    if not 1 <= len(value) <= MAX_NAME or not _NAME_RE.fullmatch(value):
        raise ValueError(f"{field}: must be 1-{MAX_NAME} characters of [A-Za-z0-9._-], got {_show(value)}")
    return value


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{field}: must be true or false, got {_show(value)}")
    return value


def _check_job_id(field: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) != JOB_ID_HEX or not _HEX_RE.fullmatch(value):
        raise ValueError(f"{field}: must be {JOB_ID_HEX} lowercase hex digits, got {_show(value)}")
    return value


def _check_peer_id(field: str, value: Any) -> str:
    try:
        public_key_from_peer_id(value)
    except PeerIdError as e:
        raise ValueError(f"{field}: {e}") from None
    return value


def _check_model_hash(field: str, value: Any) -> str:
    if not isinstance(value, str) or (value and (len(value) != 64 or not _HEX_RE.fullmatch(value))):
        raise ValueError(f"{field}: must be '' or a 64-digit lowercase hex sha256, got {_show(value)}")
    return value


def _check_peers(field: str, value: Any, limit: int) -> tuple[str, ...]:
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{field}: must be a list of peer ids, got {_show(value)}")
    if len(value) > limit:
        raise ValueError(f"{field}: more than {limit} peers ({len(value)})")
    for i, peer in enumerate(value):
        _check_peer_id(f"{field}[{i}]", peer)
    if len(set(value)) != len(value):
        raise ValueError(f"{field}: a peer is listed twice")
    return tuple(value)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass field in __post_init__


# ---- the job spec ----------------------------------------------------------------------------------------

Scalar = bool | int | float | str


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline job's cut: ``stages`` stages planned by ``strategy`` (protocol/planning/stage_plan.py), each hosted by
    ``replicas`` nodes at submission; while it trains, nodes that join the swarm are placed on the bottleneck
    stage up to ``max_replicas`` hosts per stage (0: ``replicas``, so newcomers only replace the dead); each
    step runs ``micro_batches`` micro-batches of ``micro_batch`` sequences. The number of steps is
    JobSpec.rounds (one round = one optimizer step of every stage)."""

    stages: int
    strategy: str = "balanced"
    replicas: int = 1
    micro_batch: int = 4
    micro_batches: int = 4
    max_replicas: int = 0

    def __post_init__(self) -> None:
        _check_int("pipeline.stages", self.stages, 1, MAX_STAGES)
        _check_choice("pipeline.strategy", self.strategy, PIPELINE_STRATEGIES)
        _check_int("pipeline.replicas", self.replicas, 1, MAX_STAGE_REPLICAS)
        _check_int("pipeline.micro_batch", self.micro_batch, 1, MAX_BATCH_SIZE)
        _check_int("pipeline.micro_batches", self.micro_batches, 1, MAX_MICRO_BATCHES)
        if self.max_replicas != 0:
            _check_int("pipeline.max_replicas", self.max_replicas, self.replicas, MAX_STAGE_REPLICAS)

    @property
    def replica_cap(self) -> int:
        """The most hosts a stage gets while the job trains."""
        return self.max_replicas or self.replicas


@dataclass(frozen=True)
class PipelineAssignment:
    """Where a pipeline job's stages live, chosen and signed (inside the JobRecord) by the submitter: stage i
    holds layers ``spans[i]`` and is hosted by the peers ``hosts[i]``; the signed shard manifest (protocol/
    shards.py, signed by the submitter's key) has sha256 ``manifest_sha256`` and ``manifest_size`` bytes and is
    served, like the shards, by the submitter's ShardServer."""

    spans: tuple[tuple[int, int], ...]
    hosts: tuple[tuple[str, ...], ...]
    manifest_sha256: str
    manifest_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.spans, (tuple, list)) or not 1 <= len(self.spans) <= MAX_STAGES:
            raise ValueError(f"assignment.spans: must be a list of 1-{MAX_STAGES} [start, end] pairs, "
                             f"got {_show(self.spans)}")
        spans, start = [], 0
        for i, span in enumerate(self.spans):
            if not isinstance(span, (tuple, list)) or len(span) != 2:
                raise ValueError(f"assignment.spans[{i}]: must be [start, end], got {_show(span)}")
            a = _check_int(f"assignment.spans[{i}]", span[0], start, start)
            b = _check_int(f"assignment.spans[{i}]", span[1], a + 1, 1_000_000)
            spans.append((a, b))
            start = b
        _set(self, "spans", tuple(spans))
        if not isinstance(self.hosts, (tuple, list)) or len(self.hosts) != len(spans):
            raise ValueError(f"assignment.hosts: must list the hosts of each of the {len(spans)} stages")
        hosts = tuple(_check_peers(f"assignment.hosts[{i}]", g, MAX_STAGE_REPLICAS) for i, g in enumerate(self.hosts))
        if any(not g for g in hosts):
            raise ValueError("assignment.hosts: every stage needs at least one host")
        every = [p for g in hosts for p in g]
        if len(set(every)) != len(every):
            raise ValueError("assignment.hosts: a peer hosts two stages")
        _set(self, "hosts", hosts)
        _check_model_hash("assignment.manifest_sha256", self.manifest_sha256)
        if not self.manifest_sha256:
            raise ValueError("assignment.manifest_sha256: required")
        _check_int("assignment.manifest_size", self.manifest_size, 1, MAX_MANIFEST_WIRE_BYTES)

    def stage_of(self, peer_id: str) -> int | None:
        return next((i for i, g in enumerate(self.hosts) if peer_id in g), None)


@dataclass(frozen=True)
class ModelSpec:
    """An architecture plus config overrides (e.g. n_layer, n_embd, hidden); names are checked by the node's
    model builder, which knows each architecture's config. ``overrides`` accepts a mapping and is stored as
    sorted (name, value) pairs so that the spec stays hashable and its wire form canonical."""

    arch: str
    overrides: tuple[tuple[str, Scalar], ...] = ()

    def __post_init__(self) -> None:
        _check_choice("model.arch", self.arch, ARCHS)
        pairs = list(self.overrides.items()) if isinstance(self.overrides, Mapping) else self.overrides
        if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
            raise ValueError(f"model: overrides must be a mapping of names to values, got {_show(self.overrides)}")
        if len(pairs) > MAX_MODEL_OVERRIDES:
            raise ValueError(f"model: at most {MAX_MODEL_OVERRIDES} config overrides, got {len(pairs)}")
        for name, value in pairs:
            if not isinstance(name, str) or not name.isidentifier() or len(name) > MAX_NAME or name == "arch":
                raise ValueError(f"model: {name!r:.40} is not a valid config name")
            field = f"model.{name}"
            if isinstance(value, float):
                _check_float(field, value)
            elif isinstance(value, int) and not isinstance(value, bool):
                _check_int(field, value, -(2**63), 2**63 - 1)
            elif isinstance(value, str):
                if len(value) > MAX_NAME:
                    raise ValueError(f"{field}: longer than {MAX_NAME} characters")
            elif not isinstance(value, bool):
                raise ValueError(f"{field}: must be a number, string or boolean, got {_show(value)}")
        if len({name for name, _ in pairs}) != len(pairs):
            raise ValueError("model: a config override is given twice")
        _set(self, "overrides", tuple(sorted(pairs)))

    def config(self) -> dict[str, Scalar]:
        return dict(self.overrides)


@dataclass(frozen=True)
class InnerOpt:
    """The optimizer of each node's local steps. ``momentum`` is SGD's (AdamW keeps its default betas)."""

    kind: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("inner.kind", self.kind, INNER_KINDS)
        _set(self, "lr", _check_float("inner.lr", self.lr, gt=0))
        _set(self, "weight_decay", _check_float("inner.weight_decay", self.weight_decay, ge=0))
        _set(self, "momentum", _check_float("inner.momentum", self.momentum, ge=0, lt=1))
        if self.kind == "adamw" and self.momentum != 0:
            raise ValueError(f"inner.momentum: applies to sgd only, got {self.momentum} with adamw")


@dataclass(frozen=True)
class OuterOpt:
    """The step applied to the averaged update after each round.

    fedavg: the new global model is the average of the participants' models (lr 1, no momentum).
    diloco: outer SGD on the pseudo-gradient (global - average) with lr and (Nesterov) momentum; DiLoCo
    (Douillard et al. 2023, arXiv:2311.08105) uses lr 0.7, momentum 0.9, Nesterov."""

    kind: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        _check_choice("outer.kind", self.kind, OUTER_KINDS)
        _set(self, "lr", _check_float("outer.lr", self.lr, gt=0, le=10))
        _set(self, "momentum", _check_float("outer.momentum", self.momentum, ge=0, lt=1))
        _check_bool("outer.nesterov", self.nesterov)
        if self.kind == "fedavg":
            if self.lr != 1.0:
                raise ValueError(f"outer.lr: fedavg averages the models (lr 1.0); use kind 'diloco', got {self.lr}")
            if self.momentum != 0.0 or self.nesterov:
                raise ValueError("outer.momentum: fedavg has no momentum; use kind 'diloco'")
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("outer.nesterov: needs momentum > 0")


@dataclass(frozen=True)
class JobSpec:
    """What a submitter asks the swarm to train; immutable for the life of the job (its id hashes it)."""

    name: str
    model: ModelSpec
    dataset: str  # a name every participant resolves against its own local data, e.g. "digits"
    task: str  # "classification" or "causal-lm"
    rounds: int
    inner: InnerOpt
    local_steps: int = 10  # optimizer steps on local data per round
    batch_size: int = 32
    outer: OuterOpt = OuterOpt()
    density: float = 1.0  # fraction of update entries exchanged per round (top-k); 1.0 = dense
    min_participants: int = 2  # a round starts with at least this many; below it the job pauses
    max_participants: int = 8
    round_timeout_s: float = 60.0
    seed: int = 0  # initial parameters and data order
    eval_every: int = 1  # rounds between evaluations
    kind: str = "federated"  # or "pipeline": one model cut into stages hosted by different nodes
    pipeline: PipelineSpec | None = None  # required for (and only for) kind "pipeline"

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        _check_choice("kind", self.kind, JOB_KINDS)
        if self.kind == "pipeline":
            if not isinstance(self.pipeline, PipelineSpec):
                raise ValueError(f"pipeline: kind 'pipeline' needs a [pipeline] table, got {_show(self.pipeline)}")
            if self.task != "causal-lm":
                raise ValueError(f"task: a pipeline job trains a causal LM ('causal-lm'), got {self.task!r}")
            if self.batch_size != self.pipeline.micro_batch * self.pipeline.micro_batches:
                raise ValueError(f"batch_size: must be pipeline.micro_batch * pipeline.micro_batches "
                                 f"({self.pipeline.micro_batch * self.pipeline.micro_batches}), got {self.batch_size}")
        elif self.pipeline is not None:
            raise ValueError("pipeline: only for kind 'pipeline'")
        for field, kind in (("model", ModelSpec), ("inner", InnerOpt), ("outer", OuterOpt)):
            if not isinstance(getattr(self, field), kind):
                raise ValueError(f"{field}: must be a {kind.__name__}, got {_show(getattr(self, field))}")
        _check_name("dataset", self.dataset)
        _check_choice("task", self.task, ("classification", "causal-lm"))
        if self.task not in TASKS_BY_ARCH[self.model.arch]:
            supported = " or ".join(map(repr, TASKS_BY_ARCH[self.model.arch]))
            raise ValueError(f"task: arch {self.model.arch!r} trains for {supported}, got {self.task!r}")
        _check_int("rounds", self.rounds, 1, MAX_ROUNDS)
        _check_int("local_steps", self.local_steps, 1, MAX_LOCAL_STEPS)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _set(self, "density", _check_float("density", self.density, gt=0, le=1))
        _check_int("min_participants", self.min_participants, 1, MAX_GROUP_SIZE)
        _check_int("max_participants", self.max_participants, 1, MAX_GROUP_SIZE)
        if self.max_participants < self.min_participants:
            raise ValueError(f"max_participants: must be >= min_participants ({self.min_participants}), "
                             f"got {self.max_participants}")
        _set(self, "round_timeout_s", _check_float("round_timeout_s", self.round_timeout_s, gt=0,
                                                    le=MAX_ROUND_TIMEOUT_S))
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("eval_every", self.eval_every, 1, MAX_ROUNDS)

    def replace(self, **changes) -> "JobSpec":
        return dataclasses.replace(self, **changes)


def job_id_for(spec: JobSpec, submitter: str, nonce: str) -> str:
    """16 hex digits of sha256 over the canonical wire form of (spec, submitter, nonce)."""
    if not isinstance(spec, JobSpec):
        raise ValueError(f"spec: must be a JobSpec, got {_show(spec)}")
    if not isinstance(submitter, str) or not submitter:
        raise ValueError(f"submitter: must be a peer id, got {_show(submitter)}")
    if not isinstance(nonce, str) or not 1 <= len(nonce) <= MAX_NONCE:
        raise ValueError(f"nonce: must be 1-{MAX_NONCE} characters, got {_show(nonce)}")
    canonical = msgpack.packb(["swarmnode-job", _spec_to_map(spec), submitter, nonce], use_bin_type=True)
    return hashlib.sha256(canonical).hexdigest()[:JOB_ID_HEX]


# ---- records in the DHT ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRecord:
    """The submitter's entry in ``jobs_key(swarm)`` under subkey ``job_id``.

    ``round`` counts completed rounds; ``model_hash`` is the sha256 of the global parameters after them
    ("" while unknown). Participants publish their own view in JobProgress records; this one moves only when
    the submitter writes it (and stays put if the submitter is gone)."""

    job_id: str
    submitter: str  # peer id; its key signs the record
    nonce: str  # makes resubmitting the same spec a new job
    spec: JobSpec
    state: str = "running"
    round: int = 0
    model_hash: str = ""
    participants: tuple[str, ...] = ()
    updated_at: float = 0.0  # unix time the submitter signed this record
    assignment: PipelineAssignment | None = None  # a pipeline job's stages and hosts (set at submission)

    def __post_init__(self) -> None:
        _check_job_id("job_id", self.job_id)
        _check_peer_id("submitter", self.submitter)
        if not isinstance(self.spec, JobSpec):
            raise ValueError(f"spec: must be a JobSpec, got {_show(self.spec)}")
        expected = job_id_for(self.spec, self.submitter, self.nonce)
        if self.job_id != expected:
            raise ValueError(f"job_id: {self.job_id} is not the id of this spec, submitter and nonce ({expected})")
        _check_choice("state", self.state, JOB_STATES)
        _check_int("round", self.round, 0, self.spec.rounds)
        _check_model_hash("model_hash", self.model_hash)
        _set(self, "participants", _check_peers("participants", self.participants, self.spec.max_participants))
        _set(self, "updated_at", _check_float("updated_at", self.updated_at, ge=0))
        if self.assignment is not None:
            if not isinstance(self.assignment, PipelineAssignment) or self.spec.kind != "pipeline":
                raise ValueError("assignment: only a pipeline job's record holds one")
            p = self.spec.pipeline
            if len(self.assignment.spans) != p.stages or any(len(g) > p.replica_cap for g in self.assignment.hosts):
                raise ValueError(f"assignment: must give {p.stages} stages 1-{p.replica_cap} hosts each")
            if self.submitter in {p for g in self.assignment.hosts for p in g}:
                raise ValueError("assignment: the submitter trains; it hosts no stage")

    @classmethod
    def create(cls, spec: JobSpec, submitter: str, nonce: str, updated_at: float,
               assignment: PipelineAssignment | None = None) -> "JobRecord":
        return cls(job_id_for(spec, submitter, nonce), submitter, nonce, spec, updated_at=updated_at,
                   assignment=assignment)

    def replace(self, **changes) -> "JobRecord":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class JobProgress:
    """One participant's view of a job, under ``progress_key(swarm, job_id)`` / ``progress_subkey(job_id, writer)``."""

    job_id: str
    writer: str  # peer id of the participant that signed this record
    round: int  # completed rounds
    model_hash: str  # sha256 of the global parameters after ``round`` rounds ("" while unknown)
    state: str = "running"  # running | paused | done
    participants: tuple[str, ...] = ()  # who took part in the last round
    train_loss: float | None = None  # mean local training loss of the last round
    eval_metric: float | None = None  # last evaluation (accuracy for classification, loss for causal-lm)
    bytes_exchanged: int = 0  # sent + received by this writer in the last round
    round_time_s: float = 0.0
    updated_at: float = 0.0
    next_round: int = 0  # the round id this writer will try next (paused writers align on the largest)
    reason: str = ""  # state "declined" only: why this writer does not take part (no local data, no memory, ...)

    def __post_init__(self) -> None:
        _check_job_id("job_id", self.job_id)
        _check_peer_id("writer", self.writer)
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON or not self.reason.isprintable():
            raise ValueError(f"reason: must be at most {MAX_REASON} printable characters, got {_show(self.reason)}")
        if (self.state == "declined") != bool(self.reason):
            raise ValueError("reason: a declined writer gives one, and only a declined writer")
        _check_int("next_round", self.next_round, 0, 2**31)
        _check_int("round", self.round, 0, MAX_ROUNDS)
        _check_model_hash("model_hash", self.model_hash)
        _check_choice("state", self.state, PROGRESS_STATES)
        _set(self, "participants", _check_peers("participants", self.participants, MAX_GROUP_SIZE))
        for field in ("train_loss", "eval_metric"):
            if getattr(self, field) is not None:
                _set(self, field, _check_float(field, getattr(self, field)))
        _check_int("bytes_exchanged", self.bytes_exchanged, 0, 2**63 - 1)
        _set(self, "round_time_s", _check_float("round_time_s", self.round_time_s, ge=0))
        _set(self, "updated_at", _check_float("updated_at", self.updated_at, ge=0))

    def replace(self, **changes) -> "JobProgress":
        return dataclasses.replace(self, **changes)


# ---- wire form: msgpack maps keyed by the dataclass field names (plus "v" at the top) ---------------------
# Decoding checks the map's exact key set, then lets the dataclass check every value (types, bounds, peer ids):
# one set of rules for job files, local callers and peers.


def _fields(obj: Any) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _from_map(kind: type, obj: Any, where: str, versioned: bool = False,
              decode: Mapping[str, Callable[[Any], Any]] | None = None) -> Any:
    """Build ``kind`` from a map holding exactly its fields; ``decode`` turns nested maps into their objects."""
    names = [f.name for f in dataclasses.fields(kind)] + (["v"] if versioned else [])
    obj = exact_map(obj, names, where)
    if versioned:
        version = _get(obj, "v", int, where)
        if version != JOB_SCHEMA_VERSION:
            raise WireError(f"{where}: unknown schema version {version} (this node reads {JOB_SCHEMA_VERSION})")
    values = {name: obj[name] for name in names if name != "v"}
    for name, decoder in (decode or {}).items():
        values[name] = decoder(values[name])
    try:
        return kind(**values)
    except ValueError as e:  # the message names the field ("inner.lr: must be > 0, got -1")
        raise WireError(f"{where.partition('.')[0]}: {e}") from None


def _optional(decode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda obj: None if obj is None else decode(obj)


def _spec_to_map(spec: JobSpec) -> dict:
    """Federated specs keep the schema-1 form without ``kind`` and ``pipeline`` (their job ids and wire bytes are
    unchanged, so nodes of earlier versions still read them); a pipeline spec carries both, and a node that does
    not know them refuses its record as having unknown fields, i.e. does not take part."""
    model = {"arch": spec.model.arch, "overrides": dict(spec.model.overrides)}
    out = {"v": JOB_SCHEMA_VERSION, **_fields(spec), "model": model, "inner": _fields(spec.inner),
           "outer": _fields(spec.outer), "pipeline": None if spec.pipeline is None else _fields(spec.pipeline)}
    if spec.kind == "federated":
        del out["kind"], out["pipeline"]
    return out


def _spec_from_map(obj: Any) -> JobSpec:
    nested = {name: functools.partial(_from_map, kind, where=f"job spec.{name}")
              for name, kind in (("model", ModelSpec), ("inner", InnerOpt), ("outer", OuterOpt))}
    nested["pipeline"] = _optional(functools.partial(_from_map, PipelineSpec, where="job spec.pipeline"))
    if isinstance(obj, dict) and "kind" not in obj and "pipeline" not in obj:
        obj = {**obj, "kind": "federated", "pipeline": None}  # the schema-1 federated form (see _spec_to_map)
    return _from_map(JobSpec, obj, "job spec", versioned=True, decode=nested)


def _assignment_to_map(assignment: PipelineAssignment | None) -> dict | None:
    if assignment is None:
        return None
    return {**_fields(assignment), "spans": [list(s) for s in assignment.spans],
            "hosts": [list(g) for g in assignment.hosts]}


def job_spec_to_wire(spec: JobSpec) -> bytes:
    return msgpack.packb(_spec_to_map(spec), use_bin_type=True)


def job_spec_from_wire(data: bytes) -> JobSpec:
    return _spec_from_map(unpack_bounded(data, MAX_JOB_SPEC_BYTES))


def job_record_to_wire(record: JobRecord) -> bytes:
    out = {"v": JOB_SCHEMA_VERSION, **_fields(record), "spec": _spec_to_map(record.spec),
           "assignment": _assignment_to_map(record.assignment)}
    if record.spec.kind == "federated":
        del out["assignment"]  # the schema-1 form, as in _spec_to_map
    return msgpack.packb(out, use_bin_type=True)


def job_record_from_wire(data: bytes) -> JobRecord:
    obj = unpack_bounded(data, MAX_JOB_RECORD_BYTES)
    if isinstance(obj, dict) and "assignment" not in obj:
        obj = {**obj, "assignment": None}
    assignment = _optional(functools.partial(_from_map, PipelineAssignment, where="job record.assignment"))
    return _from_map(JobRecord, obj, "job record", versioned=True,
                     decode={"spec": _spec_from_map, "assignment": assignment})


def job_progress_to_wire(progress: JobProgress) -> bytes:
    out = {"v": JOB_SCHEMA_VERSION, **_fields(progress)}
    if not progress.reason:
        del out["reason"]  # a participant's progress keeps its schema-1 bytes
    return msgpack.packb(out, use_bin_type=True)


def job_progress_from_wire(data: bytes) -> JobProgress:
    obj = unpack_bounded(data, MAX_JOB_PROGRESS_BYTES)
    if isinstance(obj, dict) and "reason" not in obj:
        obj = {**obj, "reason": ""}
    return _from_map(JobProgress, obj, "job progress", versioned=True)


# ---- model state transfer (a joiner or a node that fell behind downloads the current global state) --------

MAX_STATE_HEADER_BYTES = 4 * 1024
MAX_HISTORY_BYTES = 32 * 1024 * 1024  # ~60k rounds at ~0.5 KB each; a sender drops the oldest beyond that


@dataclass(frozen=True)
class StateHeader:
    """Sent before the raw state: float32 parameters (size * 4 bytes), then the outer momentum if any."""

    job_id: str
    completed: int  # rounds completed: the parameters are the global model after them
    next_round: int  # the round id the participants will run next (failed attempts consume ids too)
    model_hash: str  # sha256 of the parameters' little-endian float32 bytes
    size: int  # number of parameters
    has_momentum: bool  # an outer momentum buffer of the same size follows the parameters
    history_size: int = 0  # bytes of the sender's round history (a JSON list) sent last; 0: none

    def __post_init__(self) -> None:
        _check_job_id("job_id", self.job_id)
        _check_int("completed", self.completed, 0, MAX_ROUNDS)
        _check_int("next_round", self.next_round, 0, 2**31)
        _check_model_hash("model_hash", self.model_hash)
        if not self.model_hash:
            raise ValueError("model_hash: required")
        _check_int("size", self.size, 1, 2**34)
        _check_bool("has_momentum", self.has_momentum)
        _check_int("history_size", self.history_size, 0, MAX_HISTORY_BYTES)


def state_header_to_wire(header: StateHeader) -> bytes:
    return msgpack.packb({"v": JOB_SCHEMA_VERSION, **_fields(header)}, use_bin_type=True)


def state_header_from_wire(data: bytes) -> StateHeader:
    return _from_map(StateHeader, unpack_bounded(data, MAX_STATE_HEADER_BYTES), "state header", versioned=True)
