"""Split a model into signed stage shards on disk, and rebuild a stage from its shard.

    manifest = split_model(model_or_dir, [(0, 2), (2, 4)], out_dir, key)
        # out_dir/stage-0000.safetensors, out_dir/stage-0001.safetensors, out_dir/manifest.msgpack
    manifest = read_manifest(out_dir, trusted_signers={peer_id}, expected_model_hash=h)   # signature checked
    stage = load_stage(out_dir, 1, trusted_signers={peer_id}, expected_model_hash=h)      # sha256 checked first
    stage = stage_from_bytes(manifest, 1, data)                                           # shard bytes from a peer

The spans come from the planner (protocol/planning/stage_plan.py); here they are only checked (non-empty, contiguous,
covering every layer). Each shard is the stage's tensors as node/ml/stages.py stage_tensors gives them: the
stage's state_dict under the unsplit model's names (a tie inside one stage stored once) plus its
non-persistent buffers, in safetensors format (no pickle). The manifest (protocol/transfer/shards.py) lists every
shard's layer range, byte size and sha256, the architecture and config, the tied weights and the model hash
(node/ml/models.py params_sha256 of the unsplit model), signed by the splitter's Ed25519 key.

Crash safety: every file is written with node/runtime/files.py atomic_write (temporary file, fsync, rename), the
manifest last. A split interrupted half-way leaves the old manifest beside some new shards, whose hashes it does not
match, so they are refused rather than mixed.

Loading never trusts a byte before checking it: the manifest's signature (and, when given, its signer and
model hash), then the shard's size and sha256, and only then the safetensors parser; the stage is built on
the meta device from the manifest's config and filled with exactly the tensors it expects (names, shapes,
dtypes). Every refusal is a one-line ValueError (protocol.transfer.shards.ShardError).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import safetensors
import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from node.ml.models import STATE_COPIES, params_sha256, quiet_transformers
from node.ml.stages import (
    SUPPORTED,
    Span,
    Stage,
    arch_of,
    check_spans,
    cut_stage,
    dtype_name,
    empty_stage,
    find_ties,
    load_stage_tensors,
    num_layers_of,
    stage_tensors,
)
from node.runtime.files import atomic_write
from protocol.planning.stage_assign import NodeSpec, best_group_order
from protocol.planning.stage_plan import Host, StagePlan, plan_stages
from protocol.records.peer_keys import peer_id_of
from protocol.transfer.shards import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    ShardError,
    ShardInfo,
    ShardManifest,
    canonical_config_json,
    check_shard_bytes,
    manifest_from_wire,
    manifest_to_wire,
    sign_manifest,
    verify_manifest,
)

# Config keys left out of the manifest: where the model was read from is a local path, not part of the model
# (and would make two splits of the same model on two machines differ).
_LOCAL_CONFIG_KEYS = ("_name_or_path",)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def shard_file_name(index: int) -> str:
    return f"stage-{index:04d}.safetensors"


def load_model_dir(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A supported model from a local folder (config.json + weights), never the network: the class is the
    config's ``architectures[0]``."""
    path = pathlib.Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: no readable config.json ({type(e).__name__})") from None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(archs, list) or not archs or archs[0] not in SUPPORTED:
        raise ValueError(f"{path}: config.json architectures {archs!r:.80} name none of {', '.join(SUPPORTED)}")
    import transformers

    with quiet_transformers():
        return getattr(transformers, archs[0]).from_pretrained(str(path), local_files_only=True, dtype=dtype)


def stage_memory(model: nn.Module, micro_batch: int = 1, seq: int | None = None) -> tuple[list[float], float, float]:
    """(bytes per layer, extra bytes of the first stage, of the last) a stage host needs to train ``model``'s layers:
    STATE_COPIES fp32 copies of their parameters (weights, gradients, optimizer state, accumulator, error feedback;
    node/ml/models.py) plus the activations one micro-batch of ``micro_batch`` x ``seq`` tokens saves for backward
    in each (default: the model's context), as node/ml/analyze.py (``swarmnode analyze``) counts them; the last
    stage also holds the gradient of its logits."""
    from node.ml.analyze import analyze_module
    from node.ml.stages import layer_costs

    costs = layer_costs(model)
    per_param = costs.bytes_per_param * STATE_COPIES
    config: Any = model.config
    seq = seq or int(getattr(config, "n_positions", None) or config.max_position_embeddings)
    a = analyze_module(model, micro_batch, seq)
    blocks = [float(r.activation_bytes) for r in a.rows[1:-1]]
    if len(blocks) != costs.num_layers:  # the traced stack is not the stage layout's: spread its activations evenly
        blocks = [sum(blocks) / costs.num_layers] * costs.num_layers
    return ([c * per_param + act for c, act in zip(costs.layer_params, blocks)],
            costs.embed_params * per_param + a.rows[0].activation_bytes,
            costs.head_params * per_param + a.rows[-1].activation_bytes + a.largest_saved)


def plan_for_model(model: nn.Module, stages: int | Sequence[Host], strategy: str | None = None,
                   memory: tuple[list[float], float, float] | None = None) -> StagePlan:
    """Cut ``model`` by parameter count: ``stages`` is a count (layer_wise / balanced) or the hosts, in stage
    order, for memory_aware, which also needs each stage's training memory (``memory``: stage_memory's, computed
    here at one micro-batch when not given)."""
    from node.ml.stages import layer_costs

    costs = layer_costs(model)
    options: dict = {"first_extra": float(costs.embed_params), "last_extra": float(costs.head_params)}
    if not isinstance(stages, int):
        layer_bytes, first, last = memory or stage_memory(model)
        options |= {"layer_bytes": layer_bytes, "first_extra_bytes": first, "last_extra_bytes": last}
    return plan_stages([float(c) for c in costs.layer_params], stages, strategy=strategy, **options)


def memory_aware_plan(model: nn.Module, nodes: Sequence[NodeSpec], stages: int, replicas: int,
                      micro_batch: int = 1) -> tuple[StagePlan, list[list[NodeSpec]]]:
    """(plan, groups) for ``model`` on ``stages * replicas`` nodes: replica groups by memory, in the order along
    the pipeline whose memory_aware plan has the smallest slowest stage (protocol/planning/stage_assign.py
    best_group_order), each stage sized by stage_memory at ``micro_batch``; ValueError naming why when the model
    fits no order."""
    memory = stage_memory(model, micro_batch)
    return best_group_order(lambda hosts: plan_for_model(model, hosts, "memory_aware", memory), nodes, stages,
                            replicas)


def split_model(model_or_dir: nn.Module | str | os.PathLike, spans: Sequence[Span], out_dir: str | os.PathLike,
                key: Ed25519PrivateKey) -> ShardManifest:
    """Write one safetensors shard per span and the signed manifest into ``out_dir``; return the manifest.
    ``model_or_dir`` is a supported transformers model (SUPPORTED) or a local folder holding one. The model is
    not modified."""
    model = model_or_dir if isinstance(model_or_dir, nn.Module) else load_model_dir(model_or_dir)
    arch = arch_of(model)
    n = num_layers_of(model)
    spans = check_spans(spans, n)
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1:
        raise ValueError(f"split_model: parameters of mixed dtypes {sorted(map(dtype_name, dtypes))}; convert the "
                         "model to one dtype first")
    dtype = dtype_name(dtypes.pop())
    hf_config: Any = model.config  # a transformers config object, which nn.Module's attribute typing cannot name
    config = {k: v for k, v in hf_config.to_dict().items() if k not in _LOCAL_CONFIG_KEYS}
    out = pathlib.Path(out_dir)
    shards = []
    with torch.no_grad():
        model_hash = params_sha256(model)
        for i, (start, end) in enumerate(spans):
            # One metadata key only: safetensors writes its metadata map in hash order, which varies between runs,
            # and the same model must give the same bytes (and so the same sha256) every time.
            data = safetensors.torch.save(stage_tensors(cut_stage(model, start, end)), metadata={"format": "pt"})
            name = shard_file_name(i)
            atomic_write(out / name, data, mode=0o644)
            shards.append(ShardInfo(start=start, end=end, file=name, sha256=hashlib.sha256(data).hexdigest(),
                                    size=len(data)))
            del data
    manifest = ShardManifest(model_hash=model_hash, arch=arch, config_json=canonical_config_json(config),
                             num_layers=n, dtype=dtype, shards=tuple(shards), tied=find_ties(model),
                             splitter=peer_id_of(key.public_key()))
    manifest = sign_manifest(manifest, key)
    atomic_write(out / MANIFEST_FILE, manifest_to_wire(manifest), mode=0o644)
    return manifest


def _read_bounded(path: pathlib.Path, size_limit: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > size_limit:
            raise ShardError(f"{what} {path.name}: {size} bytes, more than the {size_limit} expected")
        return path.read_bytes()
    except OSError as e:
        raise ShardError(f"{what} {path}: cannot read ({e.strerror or type(e).__name__})") from None


def read_manifest(shard_dir: str | os.PathLike, *, trusted_signers: Iterable[str] | None = None,
                  expected_model_hash: str | None = None) -> ShardManifest:
    """The verified manifest in ``shard_dir`` (signature always; signer and model when given)."""
    data = _read_bounded(pathlib.Path(shard_dir) / MANIFEST_FILE, MAX_MANIFEST_BYTES, "shard manifest")
    return verify_manifest(manifest_from_wire(data), trusted_signers=trusted_signers,
                           expected_model_hash=expected_model_hash)


def load_stage(shard_dir: str | os.PathLike, index: int, *, trusted_signers: Iterable[str] | None = None,
               expected_model_hash: str | None = None) -> Stage:
    """Stage ``index`` rebuilt from ``shard_dir`` (manifest verified, then the shard's size and sha256)."""
    manifest = read_manifest(shard_dir, trusted_signers=trusted_signers, expected_model_hash=expected_model_hash)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(manifest.shards):
        raise ShardError(f"shard index {index!r:.20} outside [0, {len(manifest.shards)})")
    info = manifest.shards[index]
    data = _read_bounded(pathlib.Path(shard_dir) / info.file, info.size, "shard")
    return _build(manifest, index, data)


def stage_from_bytes(manifest: ShardManifest, index: int, data: bytes, *,
                     trusted_signers: Iterable[str] | None = None, expected_model_hash: str | None = None) -> Stage:
    """Stage ``index`` from shard bytes received from a peer; the manifest is verified here too."""
    verify_manifest(manifest, trusted_signers=trusted_signers, expected_model_hash=expected_model_hash)
    return _build(manifest, index, data)


def _build(manifest: ShardManifest, index: int, data: bytes) -> Stage:
    check_shard_bytes(manifest, index, data)  # size and sha256 before the parser sees a byte
    info = manifest.shards[index]
    where = f"shard {index} ({info.file})"
    if manifest.arch not in SUPPORTED:
        raise ShardError(f"{where}: architecture {manifest.arch} is not one this node can host")
    try:
        tensors = safetensors.torch.load(bytes(data))
    except (safetensors.SafetensorError, ValueError, RuntimeError) as e:
        raise ShardError(f"{where}: not a safetensors file ({str(e).splitlines()[0][:120]})") from None
    try:
        stage = empty_stage(manifest.arch, manifest.config, info.start, info.end, _DTYPES[manifest.dtype])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ShardError(f"{where}: cannot build {manifest.arch} from the manifest's config "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if stage.num_layers != manifest.num_layers:
        raise ShardError(f"{where}: the config gives {stage.num_layers} layers, the manifest {manifest.num_layers}")
    if set(stage.ties) != set(manifest.tied):
        raise ShardError(f"{where}: the manifest's tied weights {[(t.target, t.source) for t in manifest.tied]} "
                         f"differ from the model's {[(t.target, t.source) for t in stage.ties]}")
    try:
        return load_stage_tensors(stage, tensors)
    except ValueError as e:
        raise ShardError(f"{where}: {e}") from None


__all__ = ["load_model_dir", "load_stage", "memory_aware_plan", "plan_for_model", "read_manifest", "shard_file_name",
           "split_model", "stage_from_bytes", "stage_memory"]
