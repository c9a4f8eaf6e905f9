"""node/jobs/spec.py: job files (TOML) -> JobSpec, defaults, and one-line errors that name the file and field."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from node.jobs.spec import DILOCO_DEFAULTS, job_spec_from_toml, load_job_file
from node.runtime.errors import EXIT_USAGE, NodeError
from protocol.records.job_spec import InnerOpt, JobSpec, ModelSpec, OuterOpt

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "digits.toml"


def job(**changes) -> dict:
    """A valid job document (as parsed TOML); ``changes`` set keys, ``None`` deletes one, "inner.lr" nests."""
    doc = {"name": "t", "dataset": "digits", "task": "classification", "rounds": 3,
           "model": {"arch": "mlp", "hidden": 16}, "inner": {"lr": 0.1}}
    for dotted, value in changes.items():
        *tables, key = dotted.split(".")
        target = doc
        for table in tables:
            target = target.setdefault(table, {})
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    return doc


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # strings, ints, finite floats


def render(doc: dict) -> str:
    """The TOML text of a job document: top-level keys, then one [table] per dict."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write(tmp_path: pathlib.Path, text: str | bytes, name: str = "job.toml") -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def load_error(path) -> str:
    with pytest.raises(NodeError) as info:
        load_job_file(path)
    assert info.value.exit_code == EXIT_USAGE == 2
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


# ---- files that load -----------------------------------------------------------------------------------


def test_example_file_loads():
    spec = load_job_file(EXAMPLE)
    assert spec == JobSpec(
        name="digits-demo", model=ModelSpec("mlp", {"hidden": 128}), dataset="digits", task="classification",
        rounds=30, inner=InnerOpt("sgd", 0.1, momentum=0.9), local_steps=20, batch_size=32,
        outer=OuterOpt("fedavg"), density=0.01, min_participants=2, max_participants=8, round_timeout_s=60.0,
        seed=0, eval_every=1)
    assert load_job_file(str(EXAMPLE)) == spec  # str or Path


def test_defaults(tmp_path):
    spec = load_job_file(write(tmp_path, render(job())))
    assert (spec.local_steps, spec.batch_size, spec.density, spec.seed, spec.eval_every) == (10, 32, 1.0, 0, 1)
    assert (spec.min_participants, spec.max_participants, spec.round_timeout_s) == (2, 8, 60.0)
    assert spec.inner == InnerOpt("sgd", 0.1, weight_decay=0.0, momentum=0.0)
    assert spec.outer == OuterOpt("fedavg", lr=1.0, momentum=0.0, nesterov=False)
    assert spec.model.config() == {"hidden": 16}


def test_diloco_defaults_and_overrides():
    spec = job_spec_from_toml(job(**{"outer.kind": "diloco"}))
    assert spec.outer == OuterOpt("diloco", **DILOCO_DEFAULTS) == OuterOpt("diloco", 0.7, 0.9, True)
    spec = job_spec_from_toml(job(**{"outer.kind": "diloco", "outer.lr": 0.5, "outer.nesterov": False}))
    assert spec.outer == OuterOpt("diloco", lr=0.5, momentum=0.9, nesterov=False)
    # no momentum: Nesterov has nothing to look ahead with, so its default follows (a short job's setting, README)
    spec = job_spec_from_toml(job(**{"outer.kind": "diloco", "outer.lr": 0.8, "outer.momentum": 0.0}))
    assert spec.outer == OuterOpt("diloco", lr=0.8, momentum=0.0, nesterov=False)


def test_causal_lm_with_transformer_overrides(tmp_path):
    doc = job(task="causal-lm", dataset="pystdlib-bytes", model={
        "arch": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 256, "resid_pdrop": 0.0,
        "activation_function": "gelu_new", "tie_word_embeddings": True})
    doc["inner"] = {"kind": "adamw", "lr": 3e-4, "weight_decay": 0.1}
    spec = load_job_file(write(tmp_path, render(doc)))
    assert spec.model.arch == "gpt2" and spec.task == "causal-lm"
    assert spec.model.config() == {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 256, "resid_pdrop": 0.0,
                                   "activation_function": "gelu_new", "tie_word_embeddings": True}
    assert spec.inner == InnerOpt("adamw", 3e-4, weight_decay=0.1)


def test_integer_learning_rate_is_a_float():
    spec = job_spec_from_toml(job(**{"inner.lr": 1, "round_timeout_s": 5}))
    assert type(spec.inner.lr) is float and type(spec.round_timeout_s) is float


# ---- files that do not ------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert "no such job file" in load_error(tmp_path / "absent.toml")


def test_directory_instead_of_file(tmp_path):
    assert "cannot read" in load_error(tmp_path)


def test_invalid_toml(tmp_path):
    assert "not valid TOML" in load_error(write(tmp_path, 'name = "x"\nrounds = \n'))


def test_not_utf8(tmp_path):
    assert "not UTF-8" in load_error(write(tmp_path, b'name = "\xff\xfe"\n'))


def test_duplicate_key_is_invalid_toml(tmp_path):
    assert "not valid TOML" in load_error(write(tmp_path, render(job()) + "[inner]\nlr = 1.0\n"))


BAD = [
    # (changes to the valid job, the message after "<file>: ")
    ({"epochs": 3}, "epochs: unknown key"),
    ({"inner.nesterov": True}, "inner.nesterov: unknown key (known: kind, lr, weight_decay, momentum)"),
    ({"outer.lr_decay": 0.5}, "outer.lr_decay: unknown key"),
    ({"inner.sub": {"x": 1}}, "inner.sub: unknown key"),
    ({"inner.a b": 1}, "inner.'a b': unknown key"),
    ({"name": None}, "name: missing, required"),
    ({"dataset": None}, "dataset: missing, required"),
    ({"task": None}, "task: missing, required"),
    ({"rounds": None}, "rounds: missing, required"),
    ({"model": None}, "model: missing (a [model] table), required"),
    ({"inner": None}, "inner: missing (a [inner] table), required"),
    ({"model.arch": None}, "model.arch: missing, required"),
    ({"inner.lr": None}, "inner.lr: missing, required"),
    ({"model": "mlp"}, "model: must be a table ([model]), got 'mlp'"),
    ({"outer": 1}, "outer: must be a table ([outer]), got 1"),
    ({"rounds": "ten"}, "rounds: must be an integer, got 'ten'"),
    ({"rounds": 1.5}, "rounds: must be an integer, got 1.5"),
    ({"rounds": True}, "rounds: must be an integer, got True"),
    ({"rounds": 0}, "rounds: must be >= 1, got 0"),
    ({"rounds": 10**7}, "rounds: must be <= 1000000, got 10000000"),
    ({"local_steps": 0}, "local_steps: must be >= 1, got 0"),
    ({"batch_size": -4}, "batch_size: must be >= 1, got -4"),
    ({"seed": -1}, "seed: must be >= 0, got -1"),
    ({"seed": 2**32}, "seed: must be <= 4294967295"),
    ({"eval_every": 0}, "eval_every: must be >= 1, got 0"),
    ({"density": 0}, "density: must be > 0, got 0"),
    ({"density": 1.5}, "density: must be <= 1, got 1.5"),
    ({"density": "1%"}, "density: must be a number, got '1%'"),
    ({"density": float("nan")}, "density: must be finite, got nan"),
    ({"min_participants": 0}, "min_participants: must be >= 1, got 0"),
    ({"max_participants": 1000}, "max_participants: must be <= 256, got 1000"),
    ({"min_participants": 4, "max_participants": 3}, "max_participants: must be >= min_participants (4), got 3"),
    ({"round_timeout_s": 0}, "round_timeout_s: must be > 0, got 0"),
    ({"round_timeout_s": float("inf")}, "round_timeout_s: must be finite, got inf"),
    ({"name": "my job"}, "name: must be 1-64 characters of [A-Za-z0-9._-], got 'my job'"),
    ({"name": 5}, "name: must be a string, got 5"),
    ({"name": "x" * 65}, "name: must be 1-64 characters"),
    ({"dataset": ""}, "dataset: must be 1-64 characters"),
    ({"dataset": "../etc"}, "dataset: must be 1-64 characters"),
    ({"task": "regression"},
     "task: must be one of 'classification', 'causal-lm', 'custom', 'embedding', got 'regression'"),
    ({"task": "causal-lm"}, "task: arch 'mlp' trains for 'classification', got 'causal-lm'"),
    ({"model.arch": "resnet"},
     "model.arch: must be one of 'gpt2', 'llama', 'bert', 'minilm', 'mlp', 'cnn', 'hf', 'script', got 'resnet'"),
    ({"model.hidden": [128, 64]}, "model.hidden: must be a number, string or boolean, got [128, 64]"),
    ({"model.config": {"hidden": 1}}, "model.config: must be a number, string or boolean"),
    ({"model.dropout": float("nan")}, "model.dropout: must be finite, got nan"),
    ({"model.my-key": 1}, "model: 'my-key' is not a valid config name"),
    ({"model.act": "x" * 65}, "model.act: longer than 64 characters"),
    ({"inner.lr": -1}, "inner.lr: must be > 0, got -1"),
    ({"inner.lr": 0.0}, "inner.lr: must be > 0, got 0.0"),
    ({"inner.lr": "fast"}, "inner.lr: must be a number, got 'fast'"),
    ({"inner.kind": "adam"}, "inner.kind: must be one of 'sgd', 'adamw', got 'adam'"),
    ({"inner.momentum": 1.0}, "inner.momentum: must be < 1, got 1.0"),
    ({"inner.weight_decay": -0.1}, "inner.weight_decay: must be >= 0, got -0.1"),
    ({"inner.kind": "adamw", "inner.momentum": 0.9}, "inner.momentum: applies to sgd only"),
    ({"outer.kind": "sgd"}, "outer.kind: must be one of 'fedavg', 'diloco', got 'sgd'"),
    ({"outer.kind": "fedavg", "outer.lr": 0.5}, "outer.lr: fedavg averages the models (lr 1.0)"),
    ({"outer.momentum": 0.9}, "outer.momentum: fedavg has no momentum"),
    ({"outer.kind": "diloco", "outer.nesterov": 1}, "outer.nesterov: must be true or false, got 1"),
    ({"outer.kind": "diloco", "outer.momentum": 0.0, "outer.nesterov": True}, "outer.nesterov: needs momentum > 0"),
    ({"outer.kind": "diloco", "outer.lr": 100}, "outer.lr: must be <= 10, got 100"),
]


@pytest.mark.parametrize("changes, expected", BAD, ids=[b[1].split(":")[0] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_field_is_named(tmp_path, changes, expected):
    path = write(tmp_path, render(job(**changes)))
    assert load_error(path).startswith(f"{path}: {expected}")


def test_first_unknown_key_reported_even_with_other_errors():
    with pytest.raises(NodeError, match=r"^job\.toml: epochs: unknown key"):
        job_spec_from_toml(job(epochs=1, rounds=0), "job.toml")


def test_error_message_example_from_the_issue():
    with pytest.raises(NodeError) as info:
        job_spec_from_toml(job(**{"inner.lr": -1}), "job.toml")
    assert str(info.value) == "job.toml: inner.lr: must be > 0, got -1"


def test_check_model_hook_names_the_field(tmp_path):
    def check(model: ModelSpec) -> None:
        for name in model.config():
            if name not in ("hidden", "layers"):
                raise ValueError(f"model.{name}: not a config key of {model.arch!r} (known: hidden, layers)")

    path = write(tmp_path, render(job(**{"model.hiden": 64})))
    with pytest.raises(NodeError) as info:
        load_job_file(path, check_model=check)
    assert str(info.value) == f"{path}: model.hiden: not a config key of 'mlp' (known: hidden, layers)"
    assert load_job_file(write(tmp_path, render(job()), "ok.toml"), check_model=check).model.config() == {"hidden": 16}


PIPELINE_JOB = """
kind = "pipeline"
name = "pipe"
dataset = "pystdlib-bytes"
[pipeline]
stages = 2
replicas = 2
micro_batch = 4
micro_batches = 2
steps = 5
[model]
arch = "gpt2"
tie_word_embeddings = false
[inner]
kind = "adamw"
lr = 0.003
"""


def test_pipeline_job(tmp_path):
    spec = load_job_file(write(tmp_path, PIPELINE_JOB))
    assert spec.kind == "pipeline" and spec.rounds == 5 and spec.batch_size == 8 and spec.task == "causal-lm"
    assert (spec.pipeline.stages, spec.pipeline.replicas, spec.pipeline.strategy) == (2, 2, "balanced")
    federated = (PIPELINE_JOB.replace('kind = "pipeline"\n', "").split("[pipeline]")[0]
                 + "rounds = 3\ntask = \"causal-lm\"\n[model]\narch = \"gpt2\"\n[inner]\nlr = 0.1\n")
    assert load_job_file(write(tmp_path, federated)).kind == "federated"


@pytest.mark.parametrize("change, field", [
    (("steps = 5\n", ""), "pipeline.steps: missing"),
    (("stages = 2\n", ""), "pipeline.stages: missing"),
    (("replicas = 2", "replicas = 0"), "pipeline.replicas: must be >= 1"),
    (("stages = 2", "stages = 2\nlayers = 3"), "pipeline.layers: unknown key"),
    (('dataset = "pystdlib-bytes"', 'dataset = "pystdlib-bytes"\nrounds = 5'), "rounds: not used by a pipeline job"),
    (('kind = "pipeline"', 'kind = "relay"'), "kind: must be one of"),
    (("[pipeline]\n", "[pipe]\n"), "pipe: unknown key"),
    (('steps = 5', 'steps = "five"'), "pipeline.steps: must be an integer"),
])
def test_pipeline_job_errors(tmp_path, change, field):
    assert field in load_error(write(tmp_path, PIPELINE_JOB.replace(*change)))


def test_values_choose_the_parts_value_codec_and_travel_only_when_not_fp16():
    from protocol.records.job_spec import job_spec_from_wire, job_spec_to_wire
    from protocol.wire import unpack_bounded

    plain = job_spec_from_toml(job())
    assert plain.values == "fp16" and "values" not in unpack_bounded(job_spec_to_wire(plain), 1 << 14)
    for values in ("int8", "int4", "int2"):
        spec = job_spec_from_toml(job(values=values))
        assert job_spec_from_wire(job_spec_to_wire(spec)) == spec and spec.values == values
    for bad in ("fp32", "int3", "bf16"):
        with pytest.raises(NodeError, match="values: must be one of 'fp16', 'int8', 'int4', 'int2'"):
            job_spec_from_toml(job(values=bad))


def test_result_density_is_global_top_k_and_travels_only_below_one():
    from protocol.records.job_spec import job_spec_from_wire, job_spec_to_wire
    from protocol.wire import unpack_bounded

    plain = job_spec_from_toml(job())
    assert plain.result_density == 1.0 and "result_density" not in unpack_bounded(job_spec_to_wire(plain), 1 << 14)
    spec = job_spec_from_toml(job(result_density=0.01))
    assert job_spec_from_wire(job_spec_to_wire(spec)) == spec and spec.result_density == 0.01
    for bad in (0, 1.5, -0.1, "all"):
        with pytest.raises(NodeError, match="result_density: must be"):
            job_spec_from_toml(job(result_density=bad))



SERVE = 'kind = "serve"\nname = "tiny"\n[pipeline]\nstages = 2\n[model]\narch = "gpt2"\nn_layer = 2\n'


def test_a_served_model_needs_only_its_model_and_stages(tmp_path):
    from protocol.records.job_spec import job_spec_from_wire, job_spec_to_wire

    spec = load_job_file(write(tmp_path, SERVE))
    assert spec.kind == "serve" and spec.task == "causal-lm" and spec.pipeline.stages == 2 and spec.rounds == 1
    assert job_spec_from_wire(job_spec_to_wire(spec)) == spec
    for text, expected in (('dataset = "digits"\n' + SERVE, "dataset: not used by a served model"),
                           ('task = "classification"\n' + SERVE, "task: a served model generates"),
                           (SERVE + '[inner]\nlr = 0.1\n', "inner: not used by a served model"),
                           (SERVE.replace("stages = 2", "stages = 2\nmicro_batch = 4"),
                            "pipeline.micro_batch: unknown key")):
        assert expected in load_error(write(tmp_path, text)), text
    assert "'embedding' is for served models" in load_error(write(tmp_path, render(job(task="embedding"))))
