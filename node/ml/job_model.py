"""The model a job trains, sized by its dataset, and whether this node's data fits it.

    cfg = job_model_config(spec)             # the arch's config, input and output sizes from the dataset
    bundle = build_job_model(spec)           # what every participant builds: same config, same seed, same hash
    reason = data_misfit(spec, cfg, data)    # "" when this node's slice fits the model, else why not

Sizes come from the dataset's public schema (node/ml/datasets.py DATASETS), never from one node's files, so every
participant builds the same model: a classifier's head has the dataset's number of classes, an mlp takes its
number of features and a cnn its images (in_channels x side x side values; side = sqrt(features) unless
overridden). Token models (gpt2, llama, bert, minilm) need a token dataset whose ids fit their vocabulary and
whose windows fit their context. A job whose model cannot fit its dataset is refused at submission with the
reason (ValueError here, one line at the CLI); a node whose own slice does not match (another block size, a
damaged file) declines it with the reason.
"""

from __future__ import annotations

import math

from node.ml.datasets import DATASETS, FEATURES, TOKENS, DatasetInfo, NodeData
from node.ml.models import ModelBundle, build_model, resolve_overrides, takes_tokens, token_limits
from protocol.records.job_spec import JobSpec

_HOLDS = {FEATURES: "float feature vectors", TOKENS: "token ids"}


def dataset_info(name: str) -> DatasetInfo:
    """The schema of a dataset a job may name; ValueError listing the known ones."""
    info = DATASETS.get(name)
    if info is None:
        raise ValueError(f"dataset: unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return info


def job_model_config(spec: JobSpec) -> dict:
    """The resolved model config of ``spec`` (its overrides, sizes from the dataset); ValueError if the model
    cannot train on the dataset, naming the field."""
    info = dataset_info(spec.dataset)
    arch = spec.model.arch
    if info.task != spec.task:
        raise ValueError(f"task: dataset {spec.dataset!r} is for {info.task}, the job says {spec.task!r}")
    wants = TOKENS if takes_tokens(arch) else FEATURES
    if wants != info.inputs:
        raise ValueError(f"model.arch: {arch!r} takes {_HOLDS[wants]}; dataset {spec.dataset!r} holds "
                         f"{_HOLDS[info.inputs]} ({info.describe()})")
    features = math.prod(info.feature_shape) if info.inputs == FEATURES else None
    try:
        cfg = resolve_overrides(arch, spec.model.config(), num_classes=info.num_classes, num_features=features)
    except ValueError as e:
        raise ValueError(f"model: {e}") from None
    if info.inputs == TOKENS:
        # a pipeline's trainer cuts each window to the model's context (node/jobs/pipeline/pipeline_jobs.py); a
        # federated participant trains on whole windows, so they must fit
        window = info.feature_shape[0] - 1 if spec.kind == "federated" else None
        _check_tokens(arch, cfg, info.vocab or 0, window, spec.dataset)
    return cfg


def _check_tokens(arch: str, cfg: dict, vocab: int, window: int | None, dataset: str) -> None:
    model_vocab, context = token_limits(arch, cfg)
    if model_vocab < vocab:
        raise ValueError(f"model: {arch!r} has a vocabulary of {model_vocab}; dataset {dataset!r} uses token ids up "
                         f"to {vocab - 1}")
    if window is not None and context < window:
        raise ValueError(f"model: {arch!r} takes at most {context} tokens; dataset {dataset!r} has "
                         f"{window}-token windows")


def build_job_model(spec: JobSpec) -> ModelBundle:
    """The job's model with its seeded init: the same on every node (the job's first model hash)."""
    return build_model(spec.model.arch, job_model_config(spec), spec.seed)


def data_misfit(spec: JobSpec, cfg: dict, data: NodeData) -> str:
    """Why this node's slice cannot train the job's model ("" if it can): the dataset or task differ, the
    items have another shape than the model takes, or a label is outside its classes."""
    if data.dataset != spec.dataset:
        return f"this node's data is {data.dataset!r}, the job trains on {spec.dataset!r}"
    if data.task != spec.task:
        return f"this node's {data.dataset!r} data is for {data.task}, the job is {spec.task}"
    arch, shape = spec.model.arch, tuple(data.x.shape[1:])
    if takes_tokens(arch):
        model_vocab, context = token_limits(arch, cfg)
        if len(shape) != 1 or shape[0] - 1 > context:
            return f"this node's {data.dataset!r} windows have shape {shape}; the model takes at most {context} tokens"
        if data.x.size and int(data.x.max()) >= model_vocab:
            return (f"this node's {data.dataset!r} data holds token id {int(data.x.max())} >= the vocabulary "
                    f"{model_vocab}")
    else:
        width = cfg["inputs"] if arch == "mlp" else cfg["in_channels"] * cfg["side"] ** 2
        if math.prod(shape) != width:
            return f"this node's {data.dataset!r} items have {math.prod(shape)} features; the model takes {width}"
    if spec.task == "classification" and data.labels.size:
        top = int(max(data.labels.max(), data.test_labels.max() if data.test_labels.size else 0))
        if data.labels.min() < 0 or top >= cfg["classes"]:
            return f"this node's {data.dataset!r} labels reach {top}; the model has {cfg['classes']} classes"
    return ""


__all__ = ["build_job_model", "data_misfit", "dataset_info", "job_model_config"]
