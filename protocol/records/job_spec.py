"""A job spec: what a submitter asks the swarm to train, immutable for the life of the job (its id hashes it).

    spec = JobSpec(name="digits", model=ModelSpec("mlp"), dataset="digits", task="classification", rounds=30,
                   inner=InnerOpt("sgd", 0.1))                     # ValueError naming the field if unfit
    job_id = job_id_for(spec, submitter_peer_id, nonce)             # 16 hex digits
    data = job_spec_to_wire(spec); spec == job_spec_from_wire(data)

Job files (TOML) become specs in node/jobs/spec.py; the records that carry a spec in the DHT are in
protocol/records/job_records.py.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from protocol.allreduce.messages import MAX_GROUP_SIZE
from protocol.allreduce.quantize import INT_BITS
from protocol.allreduce.robust import AGGREGATORS
from protocol.records.job_inputs import PRECISIONS, AdapterSpec, DataSpec, ModelFile, check_model_files
from protocol.records.values import (
    JOB_ID_HEX,
    MAX_NAME,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_name,
    set_field,
    show,
)
from protocol.wire import WireError, fields_of, from_map, pack, unpack_bounded

JOB_SCHEMA_VERSION = 1  # the "v" of every job spec, record, progress and state header map
# node/ml/models.py builds each; hf: a model folder; script: a Python script's own model (swarmnode.Optimizer), named
# by the layout of its parameters (SCRIPT_LAYOUT: names, shapes), which only the scripts running it train
ARCHS = ("gpt2", "llama", "bert", "minilm", "mlp", "cnn", "hf", "script")
TASKS_BY_ARCH = {"gpt2": ("causal-lm",), "llama": ("causal-lm",), "bert": ("classification", "embedding"),
                 "minilm": ("classification", "embedding"), "mlp": ("classification",), "cnn": ("classification",),
                 "hf": ("causal-lm", "classification", "embedding"), "script": ("custom",)}
# custom: a script's own loss; embedding: a served encoder's sentence vectors (kind "serve" only)
TASKS = ("classification", "causal-lm", "custom", "embedding")
SCRIPT_LAYOUT = "layout.json"  # a script run's one model file
ADAPTABLE_ARCHS = ("gpt2", "llama", "bert", "minilm", "hf")  # transformers models peft can wrap
INNER_KINDS = ("sgd", "adamw")
OUTER_KINDS = ("fedavg", "diloco")
JOB_KINDS = ("federated", "pipeline", "serve")  # serve: a model's stages hosted for inference (node/serving/)
PIPELINE_STRATEGIES = ("balanced", "layer_wise", "memory_aware")  # memory_aware: sized for the chosen hosts
MAX_STAGES = 16
MAX_STAGE_REPLICAS = 4  # so an assignment (<= 64 peer ids, ~3.5 KiB) keeps the record far below its bound
MAX_MICRO_BATCHES = 1024
MAX_NONCE = 64
MAX_MODEL_OVERRIDES = 16
MAX_ROUNDS = 1_000_000
MAX_LOCAL_STEPS = 1_000_000
MAX_BATCH_SIZE = 65_536
MAX_ROUND_TIMEOUT_S = 86_400.0
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_MODEL_FILES_ON_WIRE = 64  # decoded before ModelSpec checks MAX_MODEL_FILES
MAX_JOB_SPEC_BYTES = 16 * 1024  # the record (MAX_JOB_RECORD_BYTES) holds it

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
        check_int("pipeline.stages", self.stages, 1, MAX_STAGES)
        check_choice("pipeline.strategy", self.strategy, PIPELINE_STRATEGIES)
        check_int("pipeline.replicas", self.replicas, 1, MAX_STAGE_REPLICAS)
        check_int("pipeline.micro_batch", self.micro_batch, 1, MAX_BATCH_SIZE)
        check_int("pipeline.micro_batches", self.micro_batches, 1, MAX_MICRO_BATCHES)
        if self.max_replicas != 0:
            check_int("pipeline.max_replicas", self.max_replicas, self.replicas, MAX_STAGE_REPLICAS)

    @property
    def replica_cap(self) -> int:
        """The most hosts a stage gets while the job trains."""
        return self.max_replicas or self.replicas


@dataclass(frozen=True)
class ModelSpec:
    """An architecture plus config overrides (e.g. n_layer, n_embd, hidden); names are checked by the node's
    model builder, which knows each architecture's config. ``overrides`` accepts a mapping and is stored as
    sorted (name, value) pairs so that the spec stays hashable and its wire form canonical. Arch "hf" is a model
    folder (config.json, safetensors weights, maybe a tokenizer) named by ``files``, its signed manifest
    (protocol/records/job_inputs.py), and takes no overrides."""

    arch: str
    overrides: tuple[tuple[str, Scalar], ...] = ()
    files: tuple[ModelFile, ...] = ()

    def __post_init__(self) -> None:
        check_choice("model.arch", self.arch, ARCHS)
        if self.arch == "hf":
            set_field(self, "files", check_model_files(self.files))
            if self.overrides:
                raise ValueError("model: a model folder takes no config overrides (edit its config.json)")
        elif self.arch == "script":
            if (not isinstance(self.files, (list, tuple)) or len(self.files) != 1
                    or not isinstance(self.files[0], ModelFile) or self.files[0].name != SCRIPT_LAYOUT):
                raise ValueError(f"model.files: a script's run names one file, its {SCRIPT_LAYOUT}")
            set_field(self, "files", tuple(self.files))
            if self.overrides:
                raise ValueError("model: a script's run takes no config overrides (its model is the script's)")
        elif self.files:
            raise ValueError(f"model.files: only for a model folder (model.path), not arch {self.arch!r}")
        pairs = list(self.overrides.items()) if isinstance(self.overrides, Mapping) else self.overrides
        if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
            raise ValueError(f"model: overrides must be a mapping of names to values, got {show(self.overrides)}")
        if len(pairs) > MAX_MODEL_OVERRIDES:
            raise ValueError(f"model: at most {MAX_MODEL_OVERRIDES} config overrides, got {len(pairs)}")
        for name, value in pairs:
            if not isinstance(name, str) or not name.isidentifier() or len(name) > MAX_NAME or name == "arch":
                raise ValueError(f"model: {name!r:.40} is not a valid config name")
            field = f"model.{name}"
            if isinstance(value, float):
                check_float(field, value)
            elif isinstance(value, int) and not isinstance(value, bool):
                check_int(field, value, -(2**63), 2**63 - 1)
            elif isinstance(value, str):
                if len(value) > MAX_NAME:
                    raise ValueError(f"{field}: longer than {MAX_NAME} characters")
            elif not isinstance(value, bool):
                raise ValueError(f"{field}: must be a number, string or boolean, got {show(value)}")
        if len({name for name, _ in pairs}) != len(pairs):
            raise ValueError("model: a config override is given twice")
        set_field(self, "overrides", tuple(sorted(pairs)))

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
        check_choice("inner.kind", self.kind, INNER_KINDS)
        set_field(self, "lr", check_float("inner.lr", self.lr, gt=0))
        set_field(self, "weight_decay", check_float("inner.weight_decay", self.weight_decay, ge=0))
        set_field(self, "momentum", check_float("inner.momentum", self.momentum, ge=0, lt=1))
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
        check_choice("outer.kind", self.kind, OUTER_KINDS)
        set_field(self, "lr", check_float("outer.lr", self.lr, gt=0, le=10))
        set_field(self, "momentum", check_float("outer.momentum", self.momentum, ge=0, lt=1))
        check_bool("outer.nesterov", self.nesterov)
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
    kind: str = "federated"  # or "pipeline": one model cut into stages hosted by different nodes; or "serve"
    pipeline: PipelineSpec | None = None  # required for (and only for) kinds "pipeline" and "serve"
    precision: str = "fp32"  # compute precision of local steps and stage compute: fp32, bf16 or fp16 (autocast)
    data: DataSpec | None = None  # the declared schema of the participants' own data (None: a bundled dataset)
    adapter: AdapterSpec | None = None  # train a LoRA adapter on the frozen model instead of the whole model
    # how a federated round's span owners aggregate members' parts (protocol/allreduce/robust.py); "mean" has no
    # defence against a hostile member
    aggregator: str = "centered_clip"
    # how a federated round's parts carry their values (protocol/allreduce/codecs.py): fp16, or int8 / int4 / int2
    # with a scale per 128 entries (protocol/allreduce/quantize.py; the rounding stays in error feedback)
    values: str = "fp16"
    # the fraction of each span's average its owner sends back (global top-k; the rest stays in the owner's error
    # feedback for a later round); 1.0 = the whole average
    result_density: float = 1.0

    def __post_init__(self) -> None:
        check_name("name", self.name)
        check_choice("kind", self.kind, JOB_KINDS)
        if self.kind == "pipeline":
            if not isinstance(self.pipeline, PipelineSpec):
                raise ValueError(f"pipeline: kind 'pipeline' needs a [pipeline] table, got {show(self.pipeline)}")
            if self.task != "causal-lm":
                raise ValueError(f"task: a pipeline job trains a causal LM ('causal-lm'), got {self.task!r}")
            if self.batch_size != self.pipeline.micro_batch * self.pipeline.micro_batches:
                raise ValueError(f"batch_size: must be pipeline.micro_batch * pipeline.micro_batches "
                                 f"({self.pipeline.micro_batch * self.pipeline.micro_batches}), got {self.batch_size}")
        elif self.kind == "serve":
            if not isinstance(self.pipeline, PipelineSpec):
                raise ValueError(f"pipeline: kind 'serve' needs a [pipeline] table, got {show(self.pipeline)}")
            if self.task not in ("causal-lm", "embedding"):
                raise ValueError(f"task: a served model generates ('causal-lm') or embeds ('embedding'), got "
                                 f"{self.task!r}")
        elif self.pipeline is not None:
            raise ValueError("pipeline: only for kinds 'pipeline' and 'serve'")
        elif self.task == "embedding":
            raise ValueError("task: 'embedding' is for served models (kind 'serve')")
        for field, kind in (("model", ModelSpec), ("inner", InnerOpt), ("outer", OuterOpt)):
            if not isinstance(getattr(self, field), kind):
                raise ValueError(f"{field}: must be a {kind.__name__}, got {show(getattr(self, field))}")
        check_name("dataset", self.dataset)
        check_choice("task", self.task, TASKS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("aggregator", self.aggregator, AGGREGATORS)
        check_choice("values", self.values, JOB_VALUE_CODECS)
        if self.kind != "federated" and self.values != "fp16":
            raise ValueError(f"values: only for federated jobs (a pipeline's stages average fp16), got "
                             f"{self.values!r}")
        self._check_inputs()
        if self.task not in TASKS_BY_ARCH[self.model.arch]:
            supported = " or ".join(map(repr, TASKS_BY_ARCH[self.model.arch]))
            raise ValueError(f"task: arch {self.model.arch!r} trains for {supported}, got {self.task!r}")
        check_int("rounds", self.rounds, 1, MAX_ROUNDS)
        check_int("local_steps", self.local_steps, 1, MAX_LOCAL_STEPS)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        set_field(self, "density", check_float("density", self.density, gt=0, le=1))
        set_field(self, "result_density", check_float("result_density", self.result_density, gt=0, le=1))
        if self.kind != "federated" and self.result_density != 1.0:
            raise ValueError(f"result_density: only for federated jobs, got {self.result_density}")
        check_int("min_participants", self.min_participants, 1, MAX_GROUP_SIZE)
        check_int("max_participants", self.max_participants, 1, MAX_GROUP_SIZE)
        if self.max_participants < self.min_participants:
            raise ValueError(f"max_participants: must be >= min_participants ({self.min_participants}), "
                             f"got {self.max_participants}")
        set_field(self, "round_timeout_s", check_float("round_timeout_s", self.round_timeout_s, gt=0,
                                                    le=MAX_ROUND_TIMEOUT_S))
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("eval_every", self.eval_every, 1, MAX_ROUNDS)

    def _check_inputs(self) -> None:
        if self.data is not None:
            if not isinstance(self.data, DataSpec):
                raise ValueError(f"data: must be a [data] table, got {show(self.data)}")
            if self.data.task != self.task:
                raise ValueError(f"data: declares a {self.data.task} dataset ({'with' if self.data.classes else 'no'}"
                                 f" classes), the job's task is {self.task!r}")
            if self.data.tokenizer == "model" and self.model.arch != "hf":
                raise ValueError("data.tokenizer: 'model' needs a model folder (model.path) that ships a tokenizer")
            if self.kind == "pipeline" and self.data.kind != "text":
                raise ValueError(f"data.kind: a pipeline job trains on text, got {self.data.kind!r}")
        if self.adapter is not None:
            if not isinstance(self.adapter, AdapterSpec):
                raise ValueError(f"adapter: must be an [adapter] table, got {show(self.adapter)}")
            if self.model.arch not in ADAPTABLE_ARCHS:
                raise ValueError(f"adapter: LoRA adapts a transformers model ({', '.join(ADAPTABLE_ARCHS)}), "
                                 f"not arch {self.model.arch!r}")
            if self.kind != "federated":
                raise ValueError(f"adapter: {self.kind} jobs take every weight of their stages; use kind 'federated' "
                                 "(a trained adapter is served merged: its export's merged/ folder)")
        if self.data is not None or self.model.files:
            size = len(pack(spec_to_map(self)))
            if size > MAX_JOB_SPEC_BYTES:
                raise ValueError(f"job spec: {size} bytes on the wire, at most {MAX_JOB_SPEC_BYTES} (fewer "
                                 f"features, classes or model files)")

    def replace(self, **changes) -> JobSpec:
        return dataclasses.replace(self, **changes)


def job_id_for(spec: JobSpec, submitter: str, nonce: str) -> str:
    """16 hex digits of sha256 over the canonical wire form of (spec, submitter, nonce)."""
    if not isinstance(spec, JobSpec):
        raise ValueError(f"spec: must be a JobSpec, got {show(spec)}")
    if not isinstance(submitter, str) or not submitter:
        raise ValueError(f"submitter: must be a peer id, got {show(submitter)}")
    if not isinstance(nonce, str) or not 1 <= len(nonce) <= MAX_NONCE:
        raise ValueError(f"nonce: must be 1-{MAX_NONCE} characters, got {show(nonce)}")
    canonical = pack(["swarmnode-job", spec_to_map(spec), submitter, nonce])
    return hashlib.sha256(canonical).hexdigest()[:JOB_ID_HEX]


# ---- wire form: msgpack maps keyed by the dataclass field names (plus "v" at the top) ---------------------


JOB_VALUE_CODECS = ("fp16", *INT_BITS)  # a job's `values` (fp32 parts would only cost twice the bytes of fp16)


def optional(decode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``decode`` for a value that may be None (nil on the wire)."""
    return lambda obj: None if obj is None else decode(obj)


def spec_to_map(spec: JobSpec) -> dict:
    """Federated specs keep the schema-1 form without ``kind`` and ``pipeline`` (their job ids and wire bytes are
    unchanged, so nodes of earlier versions still read them); a pipeline spec carries both, and a node that does
    not know them refuses its record as having unknown fields, i.e. does not take part. The same holds for
    ``precision``, ``data``, ``adapter``, ``aggregator``, ``values``, ``result_density`` and the model's ``files``:
    present only when not their default."""
    model: dict[str, Any] = {"arch": spec.model.arch, "overrides": dict(spec.model.overrides)}
    if spec.model.files:
        model["files"] = [fields_of(f) for f in spec.model.files]
    out = {"v": JOB_SCHEMA_VERSION, **fields_of(spec), "model": model, "inner": fields_of(spec.inner),
           "outer": fields_of(spec.outer), "pipeline": None if spec.pipeline is None else fields_of(spec.pipeline),
           "data": None if spec.data is None else fields_of(spec.data),
           "adapter": None if spec.adapter is None else fields_of(spec.adapter)}
    if spec.kind == "federated":
        del out["kind"], out["pipeline"]
    for name, default in OPTIONAL_FIELDS.items():
        if out[name] == default:
            del out[name]
    return out


# left out of the wire map when default
OPTIONAL_FIELDS = {"precision": "fp32", "data": None, "adapter": None, "aggregator": "centered_clip",
                   "values": "fp16", "result_density": 1.0}


def _model_from_map(obj: Any) -> ModelSpec:
    if isinstance(obj, dict) and "files" in obj:
        files = obj["files"]
        if not isinstance(files, list) or len(files) > MAX_MODEL_FILES_ON_WIRE:
            raise WireError("job spec.model.files: must be a list of at most "
                            f"{MAX_MODEL_FILES_ON_WIRE} files, got {show(files)}")
        decoded = [from_map(ModelFile, f, "job spec.model.files") for f in files]
        return from_map(ModelSpec, {**obj, "files": decoded}, "job spec.model")
    if isinstance(obj, dict):
        obj = {**obj, "files": ()}
    return from_map(ModelSpec, obj, "job spec.model")


def spec_from_map(obj: Any) -> JobSpec:
    nested: dict[str, Callable[[Any], Any]] = {
        name: functools.partial(from_map, kind, where=f"job spec.{name}")
        for name, kind in (("inner", InnerOpt), ("outer", OuterOpt))}
    nested["model"] = _model_from_map
    for name, kind in (("pipeline", PipelineSpec), ("data", DataSpec), ("adapter", AdapterSpec)):
        nested[name] = optional(functools.partial(from_map, kind, where=f"job spec.{name}"))
    if isinstance(obj, dict) and "kind" not in obj and "pipeline" not in obj:
        obj = {**obj, "kind": "federated", "pipeline": None}  # the schema-1 federated form (see spec_to_map)
    if isinstance(obj, dict):
        obj = {**OPTIONAL_FIELDS, **obj}
    return from_map(JobSpec, obj, "job spec", version=JOB_SCHEMA_VERSION, decode=nested)


def job_spec_to_wire(spec: JobSpec) -> bytes:
    return pack(spec_to_map(spec))


def job_spec_from_wire(data: bytes) -> JobSpec:
    return spec_from_map(unpack_bounded(data, MAX_JOB_SPEC_BYTES))
