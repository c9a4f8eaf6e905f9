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
import pathlib
from collections.abc import Callable

from node.ml.datasets import (
    BYTE_VOCAB,
    CAUSAL_LM,
    CLASSIFICATION,
    DATASETS,
    FEATURES,
    TOKENS,
    DatasetInfo,
    NodeData,
    NoLocalData,
    load_node_data,
)
from node.ml.hf_models import build_hf_model, hf_job_config, load_tokenizer, verified_folder
from node.ml.models import ModelBundle, build_model, resolve_overrides, takes_tokens, token_limits
from node.ml.user_data import SOURCE_FILE, DataMismatch, find_source, load_for_job
from protocol.records.job_inputs import DataSpec
from protocol.records.job_spec import JobSpec

_HOLDS = {FEATURES: "float feature vectors", TOKENS: "token ids"}


def dataset_info(name: str, data: DataSpec | None = None) -> DatasetInfo:
    """The schema of a dataset a job may name: a bundled one, or the participants' own data as the job declares
    it (``data``); ValueError listing the bundled ones for an unknown name without a declaration."""
    if data is not None:
        return declared_info(name, data)
    info = DATASETS.get(name)
    if info is None:
        raise ValueError(f"dataset: unknown dataset {name!r}; bundled: {', '.join(DATASETS)} (or declare your own "
                         f"data in a [data] table)")
    return info


def declared_info(name: str, data: DataSpec) -> DatasetInfo:
    """A DatasetInfo from a job's [data] declaration: features, images or token windows, and the classes."""
    classes = len(data.classes) or None
    task = CLASSIFICATION if classes else CAUSAL_LM
    if data.kind == "tabular":
        return DatasetInfo(name, task, classes, (len(data.features),), "the participants' own tables")
    if data.kind == "image":
        return DatasetInfo(name, task, classes, (data.channels * data.side * data.side,),
                           "the participants' own image folders")
    vocab = BYTE_VOCAB if data.tokenizer == "bytes" else None
    shape = (data.block_size,) if classes else (data.block_size + 1,)
    return DatasetInfo(name, task, classes, shape, "the participants' own text", TOKENS, vocab)


def load_job_data(spec: JobSpec, data_dir: pathlib.Path, tokenizer=None) -> NodeData:
    """This node's data for ``spec``: its slice of a bundled dataset, or its own files bound to the dataset's name
    (node/ml/user_data.py) read as the job declares. NoLocalData when the node has none under that name,
    DataMismatch (the reason to decline) or ValueError when what it has does not fit."""
    if spec.data is None:
        if (data_dir / spec.dataset / SOURCE_FILE).is_file():
            raise DataMismatch(f"this node's {spec.dataset!r} is its own data; the job names the bundled dataset "
                               f"without declaring it ([data])")
        return load_node_data(data_dir / spec.dataset, dataset=spec.dataset)
    source = find_source(data_dir, spec.dataset)
    if source is None:
        if (data_dir / spec.dataset).is_dir():
            raise DataMismatch(f"this node's {spec.dataset!r} is a slice of a bundled dataset; the job declares "
                               f"its own {spec.data.kind} data")
        raise NoLocalData(f"no local data bound to dataset {spec.dataset!r}")
    if spec.data.tokenizer == "model" and tokenizer is None:  # the job's verified folder; ModelFilesMissing before
        tokenizer = token_ids(load_tokenizer(verified_folder(spec.model.files)))
    return load_for_job(source, spec.data, spec.seed, tokenizer)


def token_ids(tokenizer) -> Callable[[str], list[int]]:
    """A transformers tokenizer as the text reader calls it: one document in, its ids out (no special tokens:
    the windows are cut from the running text)."""
    return lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def job_model_config(spec: JobSpec) -> dict:
    """The resolved model config of ``spec`` (its overrides, sizes from the dataset); ValueError if the model
    cannot train on the dataset, naming the field."""
    info = dataset_info(spec.dataset, spec.data)
    arch = spec.model.arch
    if info.task != spec.task:
        raise ValueError(f"task: dataset {spec.dataset!r} is for {info.task}, the job says {spec.task!r}")
    wants = TOKENS if takes_tokens(arch) else FEATURES
    if wants != info.inputs:
        raise ValueError(f"model.arch: {arch!r} takes {_HOLDS[wants]}; dataset {spec.dataset!r} holds "
                         f"{_HOLDS[info.inputs]} ({info.describe()})")
    if arch == "hf":  # a model folder: sizes from its config.json, once fetched (node/ml/hf_models.py)
        window = info.feature_shape[0] - (0 if info.num_classes else 1) if spec.kind == "federated" else None
        return hf_job_config(spec, info.num_classes, info.vocab, window)
    features = math.prod(info.feature_shape) if info.inputs == FEATURES else None
    overrides = spec.model.config()
    if arch == "cnn" and spec.data is not None and spec.data.kind == "image":  # the declared images' shape
        overrides = {"in_channels": spec.data.channels, "side": spec.data.side, **overrides}
    try:
        cfg = resolve_overrides(arch, overrides, num_classes=info.num_classes, num_features=features)
    except ValueError as e:
        raise ValueError(f"model: {e}") from None
    if info.inputs == TOKENS:
        # a pipeline's trainer cuts each window to the model's context (node/jobs/pipeline/pipeline_jobs.py); a
        # federated participant trains on whole windows, so they must fit
        window = info.feature_shape[0] - (0 if info.num_classes else 1) if spec.kind == "federated" else None
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
    if spec.model.arch == "hf":  # its verified folder's weights (+ a seeded LoRA adapter): node/ml/hf_models.py
        return build_hf_model(spec, job_model_config(spec))
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


__all__ = ["build_job_model", "data_misfit", "dataset_info", "declared_info", "job_model_config", "load_job_data"]
