"""A trained job's export as the model folder serving takes (config.json + safetensors, its tokenizer beside it).

    folder = servable_folder(path, work_dir, tokenizer=None)    # then: swarmnode serve FOLDER (node/cli/serve.py)

What ``path`` may be:
  * a model folder (config.json): served as it is -- a model folder job's full fine-tune exports one, and an
    adapter job exported with --merge holds one under merged/;
  * an adapter job's export (adapter_config.json): its merged/ folder; without one, an error saying how to get it;
  * a federated job's export of an arch job (manifest.json naming gpt2, llama or bert in its spec, and
    model.safetensors): the arch's model rebuilt from the spec's config, the exported tensors loaded into it --
    every name and shape, strictly -- and saved with save_pretrained under ``work_dir``;
  * a pipeline job's trained shards (manifest.msgpack, or the job folder holding trained/): every stage loaded with
    load_stage's checks (the manifest's signature by its own splitter, each shard's size and sha256, every tensor's
    name and shape), their tensors put together into the whole model, saved under ``work_dir``.
``tokenizer``: a folder whose tokenizer files are copied beside the model (an export carries none; the byte-level
models need none). Only public transformers classes, from its namespace; nothing is downloaded.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import safetensors.torch
import torch
from torch import nn

from node.ml.models import build_model, quiet_transformers
from node.ml.splitter import load_stage, read_manifest
from protocol.transfer.shards import MANIFEST_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model")
REBUILT_ARCHS = ("gpt2", "llama", "bert")  # a federated arch job's export rebuilt as a transformers model folder


def servable_folder(path: pathlib.Path, work_dir: pathlib.Path, tokenizer: pathlib.Path | None = None) -> pathlib.Path:
    """The model folder to serve for ``path`` (see the module docstring); ValueError naming what is missing."""
    path = pathlib.Path(path).expanduser().resolve()
    if tokenizer is not None and not any((tokenizer / n).is_file() for n in TOKENIZER_FILES):
        raise ValueError(f"--tokenizer {tokenizer}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder")
    if (path / "config.json").is_file():
        folder = path
    elif (path / "adapter_config.json").is_file():
        if not (path / "merged" / "config.json").is_file():
            raise ValueError(f"{path}: an adapter job's export without its merged model; export it with --merge "
                             "(swarmnode job ID --export DIR --merge) and serve it")
        folder = path / "merged"
    elif (path / MANIFEST_FILE).is_file() or (path / "trained" / MANIFEST_FILE).is_file():
        folder = _save(_from_shards(path if (path / MANIFEST_FILE).is_file() else path / "trained"), work_dir)
    elif (path / "manifest.json").is_file() and (path / "model.safetensors").is_file():
        folder = _save(_from_export(path), work_dir)
    else:
        raise ValueError(f"{path}: neither a model folder (config.json) nor a job's export (manifest.json + "
                         "model.safetensors, adapter_config.json, or a pipeline job's trained shards)")
    if tokenizer is not None:
        if folder != work_dir:  # never write into the export itself
            shutil.copytree(folder, work_dir, dirs_exist_ok=True)
            folder = work_dir
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copy2(tokenizer / name, folder / name)
    return folder


def _save(model: nn.Module, work_dir: pathlib.Path) -> pathlib.Path:
    """``model`` (a transformers PreTrainedModel) saved with its public save_pretrained."""
    work_dir.mkdir(parents=True, exist_ok=True)
    save_pretrained = getattr(model, "save_pretrained")  # noqa: B009 (nn.Module's type does not declare it)
    with quiet_transformers():
        save_pretrained(str(work_dir), safe_serialization=True)
    return work_dir


def _from_export(path: pathlib.Path) -> nn.Module:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        model_spec = manifest["spec"]["model"]
        arch, overrides, seed = model_spec["arch"], dict(model_spec["overrides"]), manifest["spec"]["seed"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}/manifest.json: not a job export's manifest ({type(e).__name__}: {e})") from None
    if arch not in REBUILT_ARCHS:
        raise ValueError(f"{path}: a {arch!r} job's model is not a transformers model folder; serving takes "
                         f"{', '.join(REBUILT_ARCHS)} exports, model folders and pipeline shards")
    module = build_model(arch, overrides, seed).module
    tensors = safetensors.torch.load_file(str(path / "model.safetensors"))
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}/model.safetensors does not match the spec's {arch} model: "
                         f"{str(e).splitlines()[0][:200]}") from None
    return module.eval()


def _from_shards(shard_dir: pathlib.Path) -> nn.Module:
    import transformers

    manifest = read_manifest(shard_dir, trusted_signers=None)
    trusted = [manifest.splitter]  # the manifest must carry its own splitter's signature
    tensors: dict[str, torch.Tensor] = {}
    for index in range(len(manifest.shards)):
        stage = load_stage(shard_dir, index, trusted_signers=trusted)
        tensors |= {name: t.detach() for name, t in stage.state_dict().items()}
    cls = getattr(transformers, manifest.arch)
    with quiet_transformers():
        model = cls(cls.config_class.from_dict(manifest.config))
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"{shard_dir}: the shards hold {unknown[0]!r}, which a {manifest.arch} does not have")
    tied = {t.target for t in manifest.tied}
    missing = sorted(n for n in own if n not in tensors and n not in tied)
    if missing:
        raise ValueError(f"{shard_dir}: no shard holds {missing[0]!r}")
    model.load_state_dict({n: t for n, t in tensors.items() if n not in tied}, strict=False)
    return model.eval()


__all__ = ["servable_folder"]
