"""Jobs in the DHT: the submitter's JobRecord (with a pipeline job's PipelineAssignment), every participant's
JobProgress, their keys and their wire form (the spec they carry: protocol/records/job_spec.py).

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
from dataclasses import dataclass
from typing import Any

from protocol.allreduce.messages import MAX_GROUP_SIZE
from protocol.records.job_spec import (
    JOB_SCHEMA_VERSION,
    MAX_ROUNDS,
    MAX_STAGE_REPLICAS,
    MAX_STAGES,
    JobSpec,
    job_id_for,
    optional,
    spec_from_map,
    spec_to_map,
)
from protocol.records.peer import swarm_key
from protocol.records.values import (
    check_choice,
    check_float,
    check_int,
    check_job_id,
    check_model_hash,
    check_peer_id,
    check_peers,
    set_field,
    show,
)
from protocol.wire import fields_of, from_map, pack, unpack_bounded

JOB_STATES = ("running", "paused", "done", "cancelled")
MAX_MANIFEST_WIRE_BYTES = 1 << 20  # protocol/transfer/shards.py MAX_MANIFEST_BYTES
PROGRESS_STATES = ("running", "paused", "done", "declined")  # "cancelled" is the submitter's word alone
MAX_REASON = 200  # characters of a decline's reason (shown on other nodes' terminals: printable only)
PROGRESS_BUCKETS = "0123456789abcdef"
# The largest record (longest names, MAX_MODEL_OVERRIDES long overrides, MAX_GROUP_SIZE participants) is about
# 16.3 KiB (tests/test_job_records.py::test_largest_record_fits); the limit leaves room for a schema change.
MAX_JOB_RECORD_BYTES = 32 * 1024
MAX_JOB_PROGRESS_BYTES = 32 * 1024
MAX_EXCLUDED = 32  # members one progress record names as excluded (with 256 participants it stays under 32 KiB)


def jobs_key(swarm: str) -> str:
    return swarm_key(swarm, "jobs")


def progress_key(swarm: str, job_id: str) -> str:
    """The bucket dictionary holding every participant's JobProgress of ``job_id`` (see module docstring)."""
    check_job_id("job_id", job_id)
    return swarm_key(swarm, f"job-progress/{job_id[0]}")


def progress_subkey(job_id: str, peer_id: str) -> str:
    return f"{job_id}/{peer_id}"


def parse_progress_subkey(subkey: Any) -> tuple[str, str]:
    """(job_id, peer_id) of a progress subkey; ValueError if it is not one."""
    if not isinstance(subkey, str) or subkey.count("/") != 1:
        raise ValueError(f"not a job progress subkey: {subkey!r:.80}")
    job_id, peer_id = subkey.split("/")
    check_job_id("job_id", job_id)
    check_peer_id("peer_id", peer_id)
    return job_id, peer_id


# ---- records in the DHT ----------------------------------------------------------------------------------


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
                             f"got {show(self.spans)}")
        spans, start = [], 0
        for i, span in enumerate(self.spans):
            if not isinstance(span, (tuple, list)) or len(span) != 2:
                raise ValueError(f"assignment.spans[{i}]: must be [start, end], got {show(span)}")
            a = check_int(f"assignment.spans[{i}]", span[0], start, start)
            b = check_int(f"assignment.spans[{i}]", span[1], a + 1, 1_000_000)
            spans.append((a, b))
            start = b
        set_field(self, "spans", tuple(spans))
        if not isinstance(self.hosts, (tuple, list)) or len(self.hosts) != len(spans):
            raise ValueError(f"assignment.hosts: must list the hosts of each of the {len(spans)} stages")
        hosts = tuple(check_peers(f"assignment.hosts[{i}]", g, MAX_STAGE_REPLICAS) for i, g in enumerate(self.hosts))
        if any(not g for g in hosts):
            raise ValueError("assignment.hosts: every stage needs at least one host")
        every = [p for g in hosts for p in g]
        if len(set(every)) != len(every):
            raise ValueError("assignment.hosts: a peer hosts two stages")
        set_field(self, "hosts", hosts)
        check_model_hash("assignment.manifest_sha256", self.manifest_sha256)
        if not self.manifest_sha256:
            raise ValueError("assignment.manifest_sha256: required")
        check_int("assignment.manifest_size", self.manifest_size, 1, MAX_MANIFEST_WIRE_BYTES)

    def stage_of(self, peer_id: str) -> int | None:
        return next((i for i, g in enumerate(self.hosts) if peer_id in g), None)


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
        check_job_id("job_id", self.job_id)
        check_peer_id("submitter", self.submitter)
        if not isinstance(self.spec, JobSpec):
            raise ValueError(f"spec: must be a JobSpec, got {show(self.spec)}")
        expected = job_id_for(self.spec, self.submitter, self.nonce)
        if self.job_id != expected:
            raise ValueError(f"job_id: {self.job_id} is not the id of this spec, submitter and nonce ({expected})")
        check_choice("state", self.state, JOB_STATES)
        check_int("round", self.round, 0, self.spec.rounds)
        check_model_hash("model_hash", self.model_hash)
        set_field(self, "participants", check_peers("participants", self.participants, self.spec.max_participants))
        set_field(self, "updated_at", check_float("updated_at", self.updated_at, ge=0))
        if self.assignment is not None:
            p = self.spec.pipeline  # set exactly when kind is "pipeline" or "serve" (JobSpec checks it)
            if not isinstance(self.assignment, PipelineAssignment) or self.spec.kind == "federated" or p is None:
                raise ValueError("assignment: only a pipeline job's or a served model's record holds one")
            if len(self.assignment.spans) != p.stages or any(len(g) > p.replica_cap for g in self.assignment.hosts):
                raise ValueError(f"assignment: must give {p.stages} stages 1-{p.replica_cap} hosts each")
            if self.submitter in {p for g in self.assignment.hosts for p in g}:
                raise ValueError("assignment: the submitter trains (or serves the endpoint); it hosts no stage")

    @classmethod
    def create(cls, spec: JobSpec, submitter: str, nonce: str, updated_at: float,
               assignment: PipelineAssignment | None = None) -> JobRecord:
        return cls(job_id_for(spec, submitter, nonce), submitter, nonce, spec, updated_at=updated_at,
                   assignment=assignment)

    def replace(self, **changes) -> JobRecord:
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
    # members this writer excluded from the job (protocol/allreduce/robust.py's evidence in consecutive rounds), and
    # per excluded member the evidence, one line each; absent from the wire when empty
    excluded: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_job_id("job_id", self.job_id)
        check_peer_id("writer", self.writer)
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON or not self.reason.isprintable():
            raise ValueError(f"reason: must be at most {MAX_REASON} printable characters, got {show(self.reason)}")
        if (self.state == "declined") != bool(self.reason):
            raise ValueError("reason: a declined writer gives one, and only a declined writer")
        check_int("next_round", self.next_round, 0, 2**31)
        set_field(self, "excluded", check_peers("excluded", self.excluded, MAX_EXCLUDED))
        if (not isinstance(self.evidence, (tuple, list)) or len(self.evidence) != len(self.excluded)
                or not all(isinstance(e, str) and len(e) <= MAX_REASON and e.isprintable() for e in self.evidence)):
            raise ValueError(f"evidence: one line of at most {MAX_REASON} printable characters per excluded member")
        set_field(self, "evidence", tuple(self.evidence))
        check_int("round", self.round, 0, MAX_ROUNDS)
        check_model_hash("model_hash", self.model_hash)
        check_choice("state", self.state, PROGRESS_STATES)
        set_field(self, "participants", check_peers("participants", self.participants, MAX_GROUP_SIZE))
        for field in ("train_loss", "eval_metric"):
            if getattr(self, field) is not None:
                set_field(self, field, check_float(field, getattr(self, field)))
        check_int("bytes_exchanged", self.bytes_exchanged, 0, 2**63 - 1)
        set_field(self, "round_time_s", check_float("round_time_s", self.round_time_s, ge=0))
        set_field(self, "updated_at", check_float("updated_at", self.updated_at, ge=0))

    def replace(self, **changes) -> JobProgress:
        return dataclasses.replace(self, **changes)


# ---- wire form ---------------------------------------------------------------------------------------------


def assignment_to_map(assignment: PipelineAssignment | None) -> dict | None:
    if assignment is None:
        return None
    return {**fields_of(assignment), "spans": [list(s) for s in assignment.spans],
            "hosts": [list(g) for g in assignment.hosts]}


def job_record_to_wire(record: JobRecord) -> bytes:
    out = {"v": JOB_SCHEMA_VERSION, **fields_of(record), "spec": spec_to_map(record.spec),
           "assignment": assignment_to_map(record.assignment)}
    if record.spec.kind == "federated":
        del out["assignment"]  # the schema-1 form, as in spec_to_map
    return pack(out)


def job_record_from_wire(data: bytes) -> JobRecord:
    obj = unpack_bounded(data, MAX_JOB_RECORD_BYTES)
    if isinstance(obj, dict) and "assignment" not in obj:
        obj = {**obj, "assignment": None}
    assignment = optional(functools.partial(from_map, PipelineAssignment, where="job record.assignment"))
    return from_map(JobRecord, obj, "job record", version=JOB_SCHEMA_VERSION,
                     decode={"spec": spec_from_map, "assignment": assignment})


def job_progress_to_wire(progress: JobProgress) -> bytes:
    out = {"v": JOB_SCHEMA_VERSION, **fields_of(progress)}
    for name in ("reason", "excluded", "evidence"):
        if not out[name]:
            del out[name]  # a participant's progress keeps its schema-1 bytes
    return pack(out)


def job_progress_from_wire(data: bytes) -> JobProgress:
    obj = unpack_bounded(data, MAX_JOB_PROGRESS_BYTES)
    if isinstance(obj, dict):
        obj = {"reason": "", "excluded": (), "evidence": (), **obj}
    return from_map(JobProgress, obj, "job progress", version=JOB_SCHEMA_VERSION)
