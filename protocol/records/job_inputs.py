"""What a job brings beyond a built-in model and dataset: the declared schema of the participants' own data, the
files of a model folder, a LoRA adapter, and the compute precision. All part of the signed, immutable JobSpec.

    DataSpec("tabular", features=("age", "income"), label="churned", classes=("no", "yes"))
    DataSpec("text", block_size=128, tokenizer="bytes")               # causal LM on a folder of text files
    DataSpec("image", classes=("cat", "dog"), side=32, channels=3)    # an image folder, one subfolder per class
    ModelFile("model.safetensors", 1234, "ab12...")                   # one file of a model folder
    AdapterSpec(r=8, alpha=16, dropout=0.05, target_modules=("c_attn",))

A DataSpec declares what each participant's local data must hold, never the data: every node checks its own
files against it (node/ml/user_data.py) and declines with the reason on a mismatch. Model sizes (an mlp's
inputs and classes, a cnn's channels and side) come from it, so every participant builds the same model.

A model folder travels as its manifest (relative path, size, sha256 of every file) inside the spec, so the
submitter's signature on the job record covers every byte of the weights; nodes fetch the files from peers that
hold them and check each against the manifest before reading it (node/jobs/model_files.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from protocol.records.values import MAX_NAME, check_choice, check_float, check_int, set_field, show

PRECISIONS = ("fp32", "bf16", "fp16")
DATA_KINDS = ("tabular", "text", "image")
TOKENIZERS = ("bytes", "model")  # byte-level ids 0..255, or the tokenizer shipped in the job's model folder
ADAPTER_KINDS = ("lora",)
MAX_FEATURES = 128
MAX_CLASSES = 256
MAX_CLASS_NAME = 48
MAX_BLOCK_SIZE = 8192
MAX_IMAGE_SIDE = 512
MAX_MODEL_FILES = 48
MAX_MODEL_FILE_NAME = 160
MAX_MODEL_FILE_BYTES = 1 << 40
MAX_ADAPTER_RANK = 1024
MAX_TARGET_MODULES = 16
_FILE_RE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_MODULE_RE = re.compile(r"[A-Za-z0-9_.]+")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _strings(field: str, value: Any, limit: int, longest: int, pattern: re.Pattern | None = None) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field}: must be a list of strings, got {show(value)}")
    if len(value) > limit:
        raise ValueError(f"{field}: at most {limit} entries, got {len(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not 1 <= len(item) <= longest or (pattern and not pattern.fullmatch(item)):
            raise ValueError(f"{field}[{i}]: must be 1-{longest} characters"
                             f"{' of ' + pattern.pattern if pattern else ''}, got {show(item)}")
    if len(set(value)) != len(value):
        raise ValueError(f"{field}: an entry is listed twice")
    return tuple(value)


@dataclass(frozen=True)
class DataSpec:
    """The participants' data as the job declares it. ``classes`` are the label values (as text; an image
    folder's subfolder names) in class-index order; a label outside them is a mismatch."""

    kind: str
    features: tuple[str, ...] = ()  # tabular: the numeric feature columns, in the model's input order
    label: str = ""  # tabular: the label column; text: "" (causal LM) or a label column/field (classification)
    classes: tuple[str, ...] = ()  # classification: label values in class-index order
    block_size: int = 128  # text: tokens per window (a causal LM predicts block_size tokens per window)
    tokenizer: str = "bytes"  # text: "bytes" or "model" (the tokenizer files in the job's model folder)
    side: int = 0  # image: every image is resized to side x side
    channels: int = 0  # image: 1 (greyscale) or 3 (RGB)

    def __post_init__(self) -> None:
        check_choice("data.kind", self.kind, DATA_KINDS)
        set_field(self, "features", _strings("data.features", self.features, MAX_FEATURES, MAX_NAME))
        set_field(self, "classes", _strings("data.classes", self.classes, MAX_CLASSES, MAX_CLASS_NAME))
        if not isinstance(self.label, str) or len(self.label) > MAX_NAME:
            raise ValueError(f"data.label: must be a column name of at most {MAX_NAME} characters, "
                             f"got {show(self.label)}")
        check_int("data.block_size", self.block_size, 1, MAX_BLOCK_SIZE)
        check_choice("data.tokenizer", self.tokenizer, TOKENIZERS)
        check_int("data.side", self.side, 0, MAX_IMAGE_SIDE)
        check_int("data.channels", self.channels, 0, 3)
        if self.classes and len(self.classes) < 2:
            raise ValueError("data.classes: a classifier needs at least 2 classes")
        if self.kind == "tabular":
            if not self.features:
                raise ValueError("data.features: a tabular dataset needs its feature columns")
            if not self.label:
                raise ValueError("data.label: a tabular dataset needs its label column")
            if self.label in self.features:
                raise ValueError(f"data.label: {self.label!r} is also a feature column")
        elif self.features:
            raise ValueError(f"data.features: only for kind 'tabular', got kind {self.kind!r}")
        if self.kind == "image":
            if self.side < 1 or self.channels not in (1, 3):
                raise ValueError("data.side, data.channels: an image dataset needs side >= 1 and channels 1 or 3")
            if not self.classes:
                raise ValueError("data.classes: an image dataset needs its classes (the subfolder names)")
            if self.label:
                raise ValueError("data.label: an image folder's label is its subfolder; leave label out")
        elif self.side or self.channels:
            raise ValueError(f"data.side, data.channels: only for kind 'image', got kind {self.kind!r}")
        if self.kind != "text" and self.tokenizer != "bytes":
            raise ValueError(f"data.tokenizer: only for kind 'text', got kind {self.kind!r}")
        if self.label and not self.classes:
            raise ValueError(f"data.classes: label {self.label!r} needs the list of its classes")
        if self.classes and self.kind == "text" and not self.label:
            raise ValueError("data.label: a text classification dataset needs its label field")

    @property
    def task(self) -> str:
        return "classification" if self.classes else "causal-lm"


@dataclass(frozen=True)
class ModelFile:
    """One file of a model folder: its path relative to the folder (forward slashes), size and sha256."""

    name: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        name = self.name
        if (not isinstance(name, str) or not 1 <= len(name) <= MAX_MODEL_FILE_NAME or not _FILE_RE.fullmatch(name)
                or any(part in (".", "..") for part in name.split("/"))):
            raise ValueError(f"model.files: {show(name)} is not a relative path of at most "
                             f"{MAX_MODEL_FILE_NAME} characters of [A-Za-z0-9._-/]")
        check_int(f"model.files[{name}].size", self.size, 0, MAX_MODEL_FILE_BYTES)
        if not isinstance(self.sha256, str) or not _SHA_RE.fullmatch(self.sha256):
            raise ValueError(f"model.files[{name}].sha256: must be 64 lowercase hex digits, got {show(self.sha256)}")


def check_model_files(files: Any) -> tuple[ModelFile, ...]:
    """A model folder's manifest: 1..MAX_MODEL_FILES distinct files, sorted by name, config.json among them."""
    if not isinstance(files, (list, tuple)) or not all(isinstance(f, ModelFile) for f in files):
        raise ValueError(f"model.files: must be a list of model files, got {show(files)}")
    if not 1 <= len(files) <= MAX_MODEL_FILES:
        raise ValueError(f"model.files: a model folder of 1-{MAX_MODEL_FILES} files, got {len(files)}")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError("model.files: a file is listed twice")
    if "config.json" not in names:
        raise ValueError("model.files: a model folder needs its config.json")
    return tuple(sorted(files, key=lambda f: f.name))


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter (Hu et al. 2021) trained on a frozen base model through peft; only its parameters train
    and cross the wire. ``alpha`` scales the update by alpha / r (peft's lora_alpha); ``target_modules`` names
    the base model's modules to adapt (empty: peft's default for the architecture)."""

    kind: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice("adapter.kind", self.kind, ADAPTER_KINDS)
        check_int("adapter.r", self.r, 1, MAX_ADAPTER_RANK)
        set_field(self, "alpha", check_float("adapter.alpha", self.alpha, gt=0, le=1e6))
        set_field(self, "dropout", check_float("adapter.dropout", self.dropout, ge=0, lt=1))
        set_field(self, "target_modules", _strings("adapter.target_modules", self.target_modules,
                                                   MAX_TARGET_MODULES, MAX_NAME, _MODULE_RE))


__all__ = ["ADAPTER_KINDS", "AdapterSpec", "DATA_KINDS", "DataSpec", "MAX_MODEL_FILES", "ModelFile", "PRECISIONS",
           "TOKENIZERS", "check_model_files"]
