"""A trained job's export as the model folder serving takes (config.json + safetensors, its tokenizer beside it).

    folder = servable_folder(path, work_dir, tokenizer=None)    # then: swarmnode serve FOLDER (node/cli/serve.py)

What ``path`` may be:
  * a model folder (config.json): served as it is -- a model folder job's full fine-tune exports one, and an
    adapter job exported with --merge holds one under merged/;
  * an adapter job's export (adapter_config.json): its merged/ folder, or else the adapter merged into its base
    folder found in this node's model store (it took part in the job; every file checked against the export's
    spec) -- peft's merge_and_unload, saved under ``work_dir``; an export whose base is not here says so;
  * a federated job's export of an arch job (manifest.json naming gpt2, llama or bert in its spec, and
    model.safetensors): the arch's model rebuilt from the spec's config, the exported tensors loaded into it --
    every name and shape, strictly -- and saved with save_pretrained under ``work_dir``;
  * a pipeline job's trained shards (manifest.msgpack, or the job folder holding trained/): every stage loaded with
    load_stage's checks (the manifest's signature by its own splitter, each shard's size and sha256, every tensor's
    name and shape), their tensors put together into the whole model, saved under ``work_dir``.
``tokenizer``: a folder whose tokenizer files are copied beside the model (an export carries none: a model folder
job's base folder in the store lends its own; the byte-level models need none). Only public transformers classes,
from its namespace; nothing is downloaded.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import safetensors.torch
import torch
from torch import nn

from node.ml.hf_models import manifest_digest, quiet_dependencies
from node.ml.model_folder import check_folder_against
from node.ml.models import build_model, quiet_transformers
from node.ml.splitter import load_model_dir, load_stage, read_manifest
from protocol.records.job_inputs import ModelFile
from protocol.transfer.shards import MANIFEST_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model")
REBUILT_ARCHS = ("gpt2", "llama", "bert")  # a federated arch job's export rebuilt as a transformers model folder


def servable_folder(path: pathlib.Path, work_dir: pathlib.Path, tokenizer: pathlib.Path | None = None,
                    models: pathlib.Path | None = None) -> pathlib.Path:
    """The model folder to serve for ``path`` (see the module docstring); ValueError naming what is missing.
    ``models``: the node's model store (<home>/models), where a model folder job's base folder is found."""
    path = pathlib.Path(path).expanduser().resolve()
    if tokenizer is not None and not any((tokenizer / n).is_file() for n in TOKENIZER_FILES):
        raise ValueError(f"--tokenizer {tokenizer}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder")
    if (path / "config.json").is_file():
        folder = path
    elif (path / "adapter_config.json").is_file():
        if (path / "merged" / "config.json").is_file():
            folder = path / "merged"
        else:
            folder = _save(_merged(path, _base_folder(path, models)), work_dir)
    elif (path / MANIFEST_FILE).is_file() or (path / "trained" / MANIFEST_FILE).is_file():
        folder = _save(_from_shards(path if (path / MANIFEST_FILE).is_file() else path / "trained"), work_dir)
    elif (path / "manifest.json").is_file() and (path / "model.safetensors").is_file():
        folder = _save(_from_export(path), work_dir)
    else:
        raise ValueError(f"{path}: neither a model folder (config.json) nor a job's export (manifest.json + "
                         "model.safetensors, adapter_config.json, or a pipeline job's trained shards)")
    if tokenizer is None and not any((folder / n).is_file() for n in TOKENIZER_FILES) and models is not None:
        base = _base_folder(path, models, required=False)  # a model folder job's export: its base's tokenizer
        if base is not None and any((base / n).is_file() for n in TOKENIZER_FILES):
            tokenizer = base
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


def _base_folder(path: pathlib.Path, models: pathlib.Path | None, required: bool = True) -> pathlib.Path | None:
    """The model folder job's base folder in the node's store, checked against the export's spec (every file's size
    and sha256); None (or, when ``required``, ValueError saying why) if the export names none or it is not there."""
    try:
        spec = json.loads((path / "manifest.json").read_text())["spec"]
        files = tuple(ModelFile(f["name"], f["size"], f["sha256"]) for f in spec["model"]["files"])
    except (OSError, ValueError, KeyError, TypeError):
        files = ()
    if not files:
        if required:
            raise ValueError(f"{path}: an adapter export whose manifest.json names no base model folder; export it "
                             "with --merge (swarmnode job ID --export DIR --merge) and serve DIR")
        return None
    folder = None if models is None else models / manifest_digest(files)
    if folder is None or not folder.is_dir():
        if required:
            raise ValueError(f"{path}: its base model folder is not in this node's model store; export it with --merge "
                             "(swarmnode job ID --export DIR --merge) on a node that took part, and serve DIR")
        return None
    check_folder_against(folder, files)
    return folder


def _merged(adapter: pathlib.Path, base: pathlib.Path | None) -> nn.Module:
    """The base model with the adapter merged into its weights (peft's PeftModel.from_pretrained, merge_and_unload)."""
    from peft import PeftModel

    assert base is not None  # _base_folder(required=True)
    with quiet_dependencies():
        model = PeftModel.from_pretrained(load_model_dir(base), str(adapter), is_trainable=False)
        return model.merge_and_unload().eval()


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
