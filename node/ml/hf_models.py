"""A job's own model: a verified local Hugging Face folder built with transformers, optionally under a LoRA adapter.

    register_folder(files, "/home/me/.swarmnode/models/3fa2...")  # node/jobs/model_files.py, once verified
    cfg = hf_job_config(spec, classes=10, vocab=256, window=128)  # sizes from config.json, checked against the data
    bundle = build_hf_model(spec, cfg)                             # same parameters on every node
    tokenizer = load_tokenizer(folder)                             # the folder's tokenizer (DataSpec.tokenizer "model")
    files = export_files(bundle.module, merge=True)                # name -> bytes: peft's adapter (+ merged model)

The folder is only ever read from a node's model store, after every file matched the job's signed manifest
(node/jobs/model_files.py); ``verified_folder`` raises ModelFilesMissing until then. Loading never trusts remote
code and never downloads (``local_files_only``, ``trust_remote_code=False``, ``use_safetensors=True``): causal-lm
jobs build ``AutoModelForCausalLM``, classification jobs ``AutoModelForSequenceClassification`` with the job's
classes (a folder that already is a classifier with another number of labels is refused). Weights the folder does
not hold (a new classification head) are initialised from the job's seed, so every node builds the same model.

An [adapter] job wraps the model with peft (``get_peft_model(model, LoraConfig(...))``, its LoRA matrices drawn
from the job's seed): the base weights are frozen (``requires_grad`` False), so the job's parameter vector
(node/ml/models.py flatten_params, params_sha256) is the adapter's trainable parameters only, and only they
train and cross the wire. A classification adapter also trains the new head (peft's ``modules_to_save``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import nn

from node.ml.models import CAUSAL_LM, CLASSIFICATION, STATE_COPIES, ModelBundle, Scalar, quiet_transformers
from protocol.records.job_inputs import AdapterSpec, ModelFile
from protocol.records.job_spec import JobSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
_VERIFIED: dict[str, pathlib.Path] = {}  # manifest digest -> a folder holding exactly those files (this process)
# Warnings peft and transformers raise on their own calls (not ours): GPT-2's Conv1D layers before peft flips
# fan_in_fan_out (we set it), and a deprecated attribute peft still reads.
_DEPENDENCY_WARNINGS = (("fan_in_fan_out is set to False", UserWarning),
                        (".*is_gradient_checkpointing.*", FutureWarning))


class ModelFilesMissing(ValueError):
    """The job's model folder is not (yet) verified on this node: fetch it first (node/jobs/model_files.py)."""


def manifest_digest(files: tuple[ModelFile, ...]) -> str:
    """32 hex digits naming a manifest (every file's name, size and sha256): the folder's name in a model store."""
    canonical = json.dumps([[f.name, f.size, f.sha256] for f in files], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def register_folder(files: tuple[ModelFile, ...], folder: str | pathlib.Path) -> None:
    """Record that ``folder`` holds exactly ``files`` (its caller checked every size and sha256)."""
    _VERIFIED[manifest_digest(files)] = pathlib.Path(folder)


def verified_folder(files: tuple[ModelFile, ...]) -> pathlib.Path:
    """The verified local copy of the model folder ``files`` names; ModelFilesMissing if this node has none."""
    folder = _VERIFIED.get(manifest_digest(files))
    if folder is None or not folder.is_dir():
        raise ModelFilesMissing("the job's model folder is not on this node yet (fetched before round 0)")
    return folder


@contextlib.contextmanager
def quiet_dependencies():
    """transformers' load reports, and the warnings peft and transformers are known to give about each other,
    silenced for the duration."""
    with quiet_transformers(), warnings.catch_warnings():
        for message, category in _DEPENDENCY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def read_config(folder: str | pathlib.Path):
    """The folder's transformers config (never remote code); ValueError in one line if transformers cannot read it."""
    from transformers import AutoConfig
    try:
        with quiet_dependencies():
            return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model: the folder's config.json is not a transformers config: {first[:200]}") from None


def _is_classifier(config) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or ()))


def hf_job_config(spec: JobSpec, classes: int | None, vocab: int | None, window: int | None) -> dict[str, Scalar]:
    """The resolved sizes of a model-folder job: vocab_size, context (longest sequence) and, for
    classification, classes. ValueError (one line) when the folder's model cannot take the data: token ids up
    to ``vocab - 1``, windows of ``window`` tokens (None: not checked), ``classes`` labels."""
    config = read_config(verified_folder(spec.model.files))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_vocab = getattr(text, "vocab_size", None)
    context = getattr(text, "n_positions", None) or getattr(text, "max_position_embeddings", None)
    if not isinstance(model_vocab, int) or not isinstance(context, int):
        raise ValueError(f"model: a {config.model_type!r} folder has no vocab_size / max_position_embeddings; "
                         f"swarmnode trains token models")
    cfg: dict[str, Scalar] = {"vocab_size": model_vocab, "context": context}
    if vocab is not None and model_vocab < vocab:
        raise ValueError(f"model: the folder's {config.model_type!r} has a vocabulary of {model_vocab}; the data uses "
                         f"token ids up to {vocab - 1}")
    if window is not None and context < window:
        raise ValueError(f"model: the folder's {config.model_type!r} takes at most {context} tokens; the data has "
                         f"{window}-token windows")
    if spec.task == CLASSIFICATION:
        if classes is None:
            raise ValueError("model: a classification job needs its classes (data.classes)")
        if _is_classifier(config) and config.num_labels != classes:
            raise ValueError(f"model: the folder's classifier has {config.num_labels} labels, the job's data "
                             f"{classes} classes")
        cfg["classes"] = classes
    return cfg


def lora_config(adapter: AdapterSpec, task: str, model: nn.Module):
    """peft's LoraConfig for ``adapter`` on ``model`` (GPT-2's Conv1D layers store weights transposed:
    fan_in_fan_out)."""
    from peft import LoraConfig
    from transformers import Conv1D
    alpha: Any = adapter.alpha  # peft scales by lora_alpha / r: a float works though it is typed int
    return LoraConfig(r=adapter.r, lora_alpha=alpha, lora_dropout=adapter.dropout,
                      target_modules=list(adapter.target_modules) or None,
                      task_type="CAUSAL_LM" if task == CAUSAL_LM else "SEQ_CLS",
                      fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()))


@dataclass(frozen=True, eq=False)
class HFBundle(ModelBundle):
    """A model folder's bundle: padding (for a classifier's attention mask) is the folder's pad token."""

    pad_token_id: int | None = None

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.long or x.dim() != 2:
            raise ValueError(f"a model folder takes int64 token ids of shape (B, T), got {x.dtype} {tuple(x.shape)}")
        if self.task == CAUSAL_LM:
            return model(input_ids=x, use_cache=False).logits  # (B, T, V)
        mask = torch.ones_like(x) if self.pad_token_id is None else (x != self.pad_token_id).long()
        return model(input_ids=x, attention_mask=mask).logits  # (B, classes)


def build_hf_model(spec: JobSpec, cfg: Mapping[str, Scalar]) -> HFBundle:
    """The job's model from its verified folder (weights from the safetensors, missing ones and a LoRA adapter
    from the job's seed): the same parameters on every node."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    folder = str(verified_folder(spec.model.files))
    load: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True,
                            "dtype": torch.float32}
    with torch.random.fork_rng(devices=[]), quiet_dependencies():
        torch.manual_seed(spec.seed)
        try:
            if spec.task == CAUSAL_LM:
                module = AutoModelForCausalLM.from_pretrained(folder, **load)
            else:
                module = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=cfg["classes"], **load)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"model: transformers cannot build the folder's model for {spec.task}: {first[:200]}") \
                from None
        if spec.adapter is not None:
            from peft import get_peft_model
            module = get_peft_model(module, lora_config(spec.adapter, spec.task, module))
    module.float()
    module.train()
    pad = getattr(module.config, "pad_token_id", None)
    return HFBundle(arch="hf", task=spec.task, module=module, config=MappingProxyType(dict(cfg)), seed=spec.seed,
                    pad_token_id=pad if isinstance(pad, int) else None)


def load_tokenizer(folder: str | pathlib.Path):
    """The tokenizer shipped in a verified model folder (AutoTokenizer, local files only, no remote code);
    ValueError (one line) if the folder has none transformers can read."""
    from transformers import AutoTokenizer
    if not any((pathlib.Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"data.tokenizer: the model folder has no tokenizer ({', '.join(TOKENIZER_FILES)}); save "
                         f"it beside the model (tokenizer.save_pretrained)")
    try:
        with quiet_dependencies():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"data.tokenizer: the model folder has no usable tokenizer: {first[:200]}") from None
    if len(tokenizer) < 2:  # transformers builds an empty one from a config alone
        raise ValueError("data.tokenizer: the model folder's tokenizer has an empty vocabulary")
    return tokenizer


def memory_bytes(files: tuple[ModelFile, ...], adapter: AdapterSpec | None) -> int:
    """What one node needs to hold a model folder job before its config is read: the weights as fp32 (stored
    at 16 bits at worst, so twice the safetensors bytes) and, when every weight trains, STATE_COPIES copies
    (node/ml/models.py); an adapter job keeps the frozen weights once plus a few copies of the adapter (bounded
    by the base's size times r's share, taken as 1/8 here) -- activations come on top (checked after the fetch
    by the training itself)."""
    weights = 2 * sum(f.size for f in files if f.name.endswith(".safetensors"))
    if adapter is None:
        return weights * STATE_COPIES
    return weights + weights * STATE_COPIES // 8


def export_files(module: nn.Module, merge: bool = False) -> dict[str, bytes]:
    """A trained model folder job as files (relative name -> bytes): an adapter job's adapter in peft's format
    (adapter_config.json, adapter_model.safetensors: ``PeftModel.from_pretrained(base, dir)``) and, with
    ``merge``, the merged model under merged/ (``merge_and_unload`` + ``save_pretrained``, safetensors: it
    changes ``module``, so it comes last); a full fine-tune's model folder (config.json, model.safetensors)."""
    from peft import PeftModel
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="swarmnode-export-") as tmp, quiet_dependencies():
        root = pathlib.Path(tmp)
        if isinstance(module, PeftModel):
            for config in module.peft_config.values():
                config.base_model_name_or_path = None  # the node's store path: meaningless elsewhere
            module.save_pretrained(str(root / "adapter"), safe_serialization=True)
            out |= {p.name: p.read_bytes() for p in sorted((root / "adapter").iterdir())
                    if p.name in ("adapter_config.json", "adapter_model.safetensors")}
            if merge:
                merged = cast(Any, module).merge_and_unload()
                merged.save_pretrained(str(root / "merged"), safe_serialization=True)
                out |= {f"merged/{p.name}": p.read_bytes() for p in sorted((root / "merged").iterdir()) if p.is_file()}
        else:
            if merge:
                raise ValueError("--merge: the job trains every weight (no [adapter]); its export is the whole model")
            cast(Any, module).save_pretrained(str(root / "model"), safe_serialization=True)
            out |= {p.name: p.read_bytes() for p in sorted((root / "model").iterdir()) if p.is_file()}
    return out


__all__ = ["HFBundle", "ModelFilesMissing", "build_hf_model", "export_files", "hf_job_config", "load_tokenizer",
           "lora_config", "manifest_digest", "memory_bytes", "quiet_dependencies", "read_config", "register_folder",
           "verified_folder"]
