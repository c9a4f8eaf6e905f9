"""Job files: a TOML description of a federated training job, read into a protocol.records.jobs.JobSpec.

    name = "digits-demo"          # required: 1-64 characters of [A-Za-z0-9._-]
    dataset = "digits"            # required: each node resolves this name against its own local data
    task = "classification"       # required: "classification" or "causal-lm" (gpt2 / llama only)
    rounds = 30                   # required
    local_steps = 10              # default 10: optimizer steps on local data per round
    batch_size = 32               # default 32
    density = 1.0                 # default 1.0 (dense); top-k fraction of the update exchanged, 0 < d <= 1
    min_participants = 2          # default 2: fewer ready nodes and the job pauses
    max_participants = 8          # default 8
    round_timeout_s = 60          # default 60
    seed = 0                      # default 0
    eval_every = 1                # default 1 (rounds)

    [model]                       # required
    arch = "mlp"                  # required: gpt2, llama, bert, mlp or cnn
    hidden = 128                  # every other key is a config override (n_layer, n_embd, vocab_size, ...)

    [inner]                       # required: the local optimizer
    kind = "sgd"                  # default "sgd"; or "adamw"
    lr = 0.1                      # required
    weight_decay = 0.0            # default 0
    momentum = 0.9                # default 0 (sgd only)

    precision = "fp32"            # default "fp32": or "bf16" / "fp16" (autocast on the node's device)
    aggregator = "centered_clip"  # default: span owners clip hostile parts (protocol/allreduce/robust.py);
                                  # or "trimmed_mean", "median", "mean" (no defence)
    values = "fp16"               # default: how round parts carry values; or "int8", "int4", "int2" (a scale per
                                  # 128 entries; the rounding stays in error feedback)
    result_density = 1.0          # default: span owners send their whole average; below 1, only its largest
                                  # entries (global top-k; the rest waits in the owner's error feedback)

    [data]                        # optional: the participants' own data (``swarmnode data add NAME PATH``)
    kind = "tabular"              # "tabular" (features + label columns), "text" or "image" (class subfolders)
    features = ["a", "b"]         # tabular: numeric feature columns, in order
    label = "y"                   # tabular: the label column (text: a label field for classification)
    classes = ["no", "yes"]       # classification: label values, in class-index order
    block_size = 128              # text: tokens per window; tokenizer = "bytes" (default) or "model"
    side = 32                     # image: resized to side x side, channels = 1 or 3

    [model] path = "./my-model"   # instead of arch: a local Hugging Face folder (config.json + safetensors),
                                  # relative to the job file; its manifest (sha256 of every file) is signed
    [adapter]                     # optional: train a LoRA adapter on the frozen model (peft)
    r = 8                         # default 8; alpha = 16.0, dropout = 0.0, target_modules = [] (peft's default)

    [outer]                       # optional: the step after each round's average
    kind = "fedavg"               # default "fedavg" (lr 1, no momentum); "diloco" defaults to lr 0.7,
                                  # momentum 0.9, nesterov = true (DiLoCo, arXiv:2311.08105); with
                                  # momentum = 0, nesterov defaults to false

A pipeline job (one model too large for a node, cut into stages hosted by different nodes;
node/jobs/pipeline/pipeline_jobs.py):

    kind = "pipeline"             # default "federated"
    name = "tiny-gpt2-pipe"
    dataset = "pystdlib-bytes"    # read by the submitting node only (it runs the trainer)
    [pipeline]                    # required for kind "pipeline"
    stages = 2                    # required: stages (<= the model's layers)
    strategy = "balanced"         # default "balanced" (equal cost), "layer_wise" (equal layer counts) or
                                  # "memory_aware" (sized for the chosen hosts' memory and TFLOPS)
    replicas = 2                  # default 1: hosts per stage (replicas average their gradients every step)
    max_replicas = 4              # default = replicas: nodes joining while it trains go to the bottleneck
                                  # stage up to this many hosts per stage (dead hosts are always replaced)
    micro_batch = 4               # default 4: sequences per micro-batch
    micro_batches = 4             # default 4: micro-batches per step (batch_size = micro_batch * micro_batches)
    steps = 20                    # required: optimizer steps (the job's rounds)
    [model]                       # gpt2 or llama with tie_word_embeddings = false; [inner] as above (per stage)

A served model (its stages hosted by different nodes for inference; node/serving/serve_jobs.py; what
``swarmnode serve`` writes):

    kind = "serve"
    name = "my-model"             # the name clients pass as "model"
    task = "causal-lm"            # default: generate text; or "embedding" (an encoder's sentence vectors)
    [pipeline]
    stages = 2                    # required; strategy, replicas and max_replicas as above
    [model]                       # path = a model folder (a tokenizer beside it, or a byte-level model), or an arch

Every problem is a NodeError (exit code 2) with one line naming the file and the dotted field, e.g.
``job.toml: inner.lr: must be > 0, got -1``. Range and type rules live in protocol/records/values.py (the same rules
apply to specs that arrive from peers); this module adds file reading, unknown keys and required fields.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable
from typing import Any

from node.runtime.config import check_toml_ints, parse_toml
from node.runtime.errors import EXIT_USAGE, NodeError
from protocol.records.job_inputs import AdapterSpec, DataSpec, ModelFile
from protocol.records.job_spec import JOB_KINDS, InnerOpt, JobSpec, ModelSpec, OuterOpt, PipelineSpec

REQUIRED = ("name", "dataset", "task", "rounds", "model", "inner")
PIPELINE_REQUIRED = ("name", "dataset", "model", "inner", "pipeline")
DILOCO_DEFAULTS = {"lr": 0.7, "momentum": 0.9, "nesterov": True}
_TABLES = {"model": ModelSpec, "inner": InnerOpt, "outer": OuterOpt}


def _names(kind: type) -> list[str]:
    return [f.name for f in dataclasses.fields(kind)]


def load_job_file(path: str | os.PathLike, check_model: Callable[[ModelSpec], None] | None = None) -> JobSpec:
    """Read and check a job file. ``check_model`` (e.g. the node's model builder) may raise ValueError naming
    a ``model.<key>`` it does not know; that too becomes a one-line NodeError."""
    label = str(path)
    try:
        with open(pathlib.Path(path).expanduser(), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise NodeError(f"{label}: no such job file", EXIT_USAGE) from None
    except OSError as e:
        raise NodeError(f"{label}: cannot read the job file ({e.strerror or e})", EXIT_USAGE) from None
    except ValueError as e:  # a NUL in the path
        raise NodeError(f"{label!r:.200}: not a usable path ({e})", EXIT_USAGE) from None
    return job_spec_from_text(raw, label, check_model)


def job_spec_from_text(text: str | bytes, label: str = "job file",
                       check_model: Callable[[ModelSpec], None] | None = None,
                       model_folder: Callable[[str], tuple[ModelFile, ...]] | None = None) -> JobSpec:
    """A job file's text (bytes: UTF-8) parsed (node/runtime/config.py parse_toml: not UTF-8, not TOML, nested too
    deeply for tomllib, integers beyond 64 bits) and built into a JobSpec; NodeError "<label>: ..." if not."""
    return job_spec_from_toml(parse_toml(text, label), label, check_model, model_folder)


def job_spec_from_toml(data: dict[str, Any], label: str = "job file",
                       check_model: Callable[[ModelSpec], None] | None = None,
                       model_folder: Callable[[str], tuple[ModelFile, ...]] | None = None) -> JobSpec:
    """Build a JobSpec from parsed TOML; NodeError "<label>: <dotted field>: <problem>" on the first problem."""
    check_toml_ints(data, label)  # tomllib reads integers of any size; float fields cannot hold them all
    try:
        return _build(data, check_model, model_folder)
    except ValueError as e:
        raise NodeError(f"{label}: {e}", EXIT_USAGE) from None


def _pipeline_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The top-level fields of a pipeline job: [pipeline] read into a PipelineSpec, steps into rounds, the task
    and batch size implied."""
    table = data["pipeline"]
    if not isinstance(table, dict):
        raise ValueError(f"pipeline: must be a table ([pipeline]), got {table!r:.40}")
    _known(table, "pipeline.", [*_names(PipelineSpec), "steps"])
    for name in ("stages", "steps"):
        if name not in table:
            raise ValueError(f"pipeline.{name}: missing, required")
    for name in ("rounds", "batch_size", "local_steps", "min_participants", "max_participants", "outer"):
        if name in data:
            raise ValueError(f"{name}: not used by a pipeline job (see [pipeline])")
    pipeline = PipelineSpec(**{k: v for k, v in table.items() if k != "steps"})
    task = data.get("task", "causal-lm")
    return {"pipeline": pipeline, "rounds": table["steps"], "task": task,
            "batch_size": pipeline.micro_batch * pipeline.micro_batches, "min_participants": 1}


def _serve_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The fields a served model implies: [pipeline] (stages, strategy, replicas, max_replicas) read into a
    PipelineSpec; no data, rounds or optimizer (it trains nothing)."""
    if "pipeline" not in data or not isinstance(data["pipeline"], dict):
        raise ValueError("pipeline: missing (a [pipeline] table with stages), required")
    table = data["pipeline"]
    _known(table, "pipeline.", ["stages", "strategy", "replicas", "max_replicas"])
    if "stages" not in table:
        raise ValueError("pipeline.stages: missing, required")
    for name in ("dataset", "rounds", "batch_size", "local_steps", "min_participants", "max_participants", "inner",
                 "outer", "data", "adapter", "eval_every"):
        if name in data:
            raise ValueError(f"{name}: not used by a served model (kind = \"serve\" trains nothing)")
    return {"pipeline": PipelineSpec(**table), "dataset": "served", "rounds": 1, "task": data.get("task", "causal-lm"),
            "inner": {"kind": "sgd", "lr": 1.0}, "min_participants": 1}


def _build(data: dict[str, Any], check_model: Callable[[ModelSpec], None] | None,
           model_folder: Callable[[str], tuple[ModelFile, ...]] | None = None) -> JobSpec:
    _known(data, "", _names(JobSpec))
    if "kind" in data and data["kind"] not in JOB_KINDS:
        raise ValueError(f"kind: must be one of {', '.join(map(repr, JOB_KINDS))}, got {data['kind']!r:.40}")
    if data.get("kind") == "pipeline":
        for name in PIPELINE_REQUIRED:
            if name not in data:
                table = f" (a [{name}] table)" if name in (*_TABLES, "pipeline") else ""
                raise ValueError(f"{name}: missing{table}, required")
        try:
            rounds = data["pipeline"].get("steps") if isinstance(data["pipeline"], dict) else None
            data = {**data, **_pipeline_fields(data)}
        except TypeError as e:  # PipelineSpec(**table) with a wrong key cannot happen (checked); keep one line
            raise ValueError(f"pipeline: {e}") from None
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
            raise ValueError(f"pipeline.steps: must be an integer >= 1, got {rounds!r:.40}")
    elif data.get("kind") == "serve":
        data = {**data, **_serve_fields(data)}
    elif "pipeline" in data:
        raise ValueError("pipeline: only for kind = \"pipeline\" or \"serve\"")
    for name in REQUIRED:
        if name not in data:
            table = f" (a [{name}] table)" if name in _TABLES else ""
            raise ValueError(f"{name}: missing{table}, required")
    tables: dict[str, dict[str, Any]] = {}
    for name in _TABLES:
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ValueError(f"{name}: must be a table ([{name}]), got {table!r:.40}")
        tables[name] = table
    model, inner, outer = tables["model"], tables["inner"], dict(tables["outer"])
    _known(inner, "inner.", _names(InnerOpt))
    if "lr" not in inner:
        raise ValueError("inner.lr: missing, required")
    _known(outer, "outer.", _names(OuterOpt))
    if outer.get("kind") == "diloco":  # DiLoCo's defaults; Nesterov only where there is momentum to look ahead with
        outer = DILOCO_DEFAULTS | ({"nesterov": False} if outer.get("momentum") == 0 else {}) | outer
    model_spec = _model(model, model_folder)
    if check_model is not None:
        check_model(model_spec)
    fields = {k: v for k, v in data.items() if k not in _TABLES}
    for name, kind in (("data", DataSpec), ("adapter", AdapterSpec)):
        if name in fields:
            table = fields[name]
            if not isinstance(table, dict):
                raise ValueError(f"{name}: must be a table ([{name}]), got {table!r:.40}")
            _known(table, f"{name}.", _names(kind))
            if name == "data" and "kind" not in table:
                raise ValueError("data.kind: missing, required (tabular, text or image)")
            fields[name] = kind(**table)
    return JobSpec(model=model_spec, inner=InnerOpt(**{"kind": "sgd"} | inner), outer=OuterOpt(**outer), **fields)


def _model(model: dict[str, Any], model_folder: Callable[[str], tuple[ModelFile, ...]] | None) -> ModelSpec:
    """[model]: an arch with overrides, or ``path`` = a local model folder, read into its signed manifest."""
    if "path" in model:
        if set(model) != {"path"}:
            extra = sorted(set(model) - {"path"})[0]
            raise ValueError(f"model.{extra}: a model folder (model.path) takes no other keys; edit its config.json")
        if not isinstance(model["path"], str) or not model["path"]:
            raise ValueError(f"model.path: must be a folder path, got {model['path']!r:.40}")
        if model_folder is None:
            raise ValueError("model.path: a model folder can only be submitted through a node (swarmnode submit)")
        return ModelSpec("hf", files=model_folder(model["path"]))
    if "arch" not in model:
        raise ValueError("model.arch: missing, required (or model.path, a local model folder)")
    if model["arch"] == "hf":
        raise ValueError("model.arch: 'hf' is written by the node; name the folder with model.path")
    if model["arch"] == "script":
        raise ValueError("model.arch: 'script' is a Python script's own model; start its run with swarmnode.Optimizer")
    return ModelSpec(model["arch"], tuple((k, v) for k, v in model.items() if k != "arch"))  # sorted there


def _known(table: dict[str, Any], prefix: str, names: list[str]) -> None:
    for key in table:
        if key not in names:
            shown = key if key.isidentifier() else repr(key)  # a quoted TOML key may hold anything
            raise ValueError(f"{prefix}{shown}: unknown key (known: {', '.join(names)})")
