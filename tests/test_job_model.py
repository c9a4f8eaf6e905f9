"""node/ml/job_model.py: a job's model takes its input and output sizes from the dataset's schema, a model that
cannot take the dataset is refused naming the field, and a node's own slice that does not fit is named."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from node.ml.datasets import load_node_data, write_node_data
from node.ml.job_model import build_job_model, data_misfit, job_model_config
from node.ml.models import param_count
from protocol.records.job_spec import InnerOpt, JobSpec, ModelSpec


def spec(arch: str = "mlp", dataset: str = "digits", task: str = "classification", **overrides) -> JobSpec:
    return JobSpec(name="t", model=ModelSpec(arch, overrides), dataset=dataset, task=task, rounds=1,
                   inner=InnerOpt("sgd", 0.1))


@pytest.mark.parametrize("dataset,features,classes", [("digits", 64, 10), ("wine", 13, 3), ("breast_cancer", 30, 2)])
def test_mlp_inputs_and_classes_come_from_the_dataset(dataset, features, classes):
    cfg = job_model_config(spec(dataset=dataset, hidden=16))
    assert (cfg["inputs"], cfg["classes"], cfg["hidden"]) == (features, classes, 16)
    model = build_job_model(spec(dataset=dataset, hidden=16)).module
    assert param_count(model) == features * 16 + 16 + 16 * 16 + 16 + 16 * classes + classes  # 2 hidden layers


def test_every_node_builds_the_same_digits_model_as_before():
    """The sizes of digits are the defaults: jobs submitted before this change keep their first model hash."""
    from node.ml.models import build_model, params_sha256

    job = spec(hidden=32)
    assert params_sha256(build_job_model(job).module) == params_sha256(build_model("mlp", {"hidden": 32}, 0,
                                                                                   num_classes=10).module)


def test_cnn_takes_square_images_and_refuses_feature_vectors():
    assert job_model_config(spec("cnn"))["side"] == 8
    with pytest.raises(ValueError, match=r"model: model 'cnn' takes images .* 13 features .*mlp"):
        job_model_config(spec("cnn", dataset="wine"))
    with pytest.raises(ValueError, match="in_channels x side x side = 3 x 8 x 8"):
        job_model_config(spec("cnn", in_channels=3))


@pytest.mark.parametrize("job,needle", [
    (spec(inputs=13), "override inputs=13 disagrees with the dataset's 64 features"),
    (spec(classes=3), "disagrees with the dataset's 10 classes"),
    (spec(dataset="digitz"), "dataset: unknown dataset 'digitz'; bundled: digits, wine"),
    (spec("minilm"), "model.arch: 'minilm' takes token ids; dataset 'digits' holds float feature vectors"),
    (spec("bert"), "'bert' takes token ids"),
    (spec("gpt2", dataset="digits", task="causal-lm"), "task: dataset 'digits' is for classification"),
    (spec("gpt2", dataset="pystdlib-bytes", task="causal-lm", vocab_size=100), "vocabulary of 100"),
    (spec("llama", dataset="pystdlib-bytes", task="causal-lm", max_position_embeddings=64), "at most 64 tokens"),
])
def test_a_model_that_cannot_take_the_dataset_is_refused_naming_the_field(job, needle):
    with pytest.raises(ValueError, match="^(model|model.arch|dataset|task): ") as e:
        job_model_config(job)
    assert needle in str(e.value), str(e.value)


def test_text_models_fit_the_byte_corpus():
    cfg = job_model_config(spec("gpt2", dataset="pystdlib-bytes", task="causal-lm", n_layer=1))
    assert cfg["vocab_size"] == 256 and cfg["n_positions"] == 128


def test_minilm_is_a_job_architecture():
    """Listed as a model in the README, accepted in job records (it needs a token dataset to train on)."""
    assert spec("minilm").model.arch == "minilm"


def test_a_nodes_own_slice_that_does_not_fit_is_named(tmp_path):
    job = spec(hidden=8)
    cfg = job_model_config(job)
    write_node_data("digits", tmp_path / "digits", 2, 0)
    data = load_node_data(tmp_path / "digits", "digits")
    assert data_misfit(job, cfg, data) == ""
    narrow = dataclasses.replace(data, x=data.x[:, :13])
    assert data_misfit(job, cfg, narrow) == "this node's 'digits' items have 13 features; the model takes 64"
    labels = data.labels.copy()
    labels[0] = 12
    assert "labels reach 12; the model has 10 classes" in data_misfit(job, cfg, dataclasses.replace(data,
                                                                                                    labels=labels))
    assert "is for causal-lm" in data_misfit(job, cfg, dataclasses.replace(data, task="causal-lm"))
    text = spec("gpt2", dataset="pystdlib-bytes", task="causal-lm")
    windows = dataclasses.replace(data, dataset="pystdlib-bytes", task="causal-lm", num_classes=None,
                                  x=np.zeros((4, 201), dtype=np.uint8))  # 200-token windows (another block size)
    assert "the model takes at most 128 tokens" in data_misfit(text, job_model_config(text), windows)
