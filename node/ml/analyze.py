"""What a model costs to train, per top-level block and in total: parameters, FLOPs, memory (``swarmnode analyze``).

    a = analyze_arch("gpt2", {"n_layer": 2}, batch=8, seq=128)      # a built-in architecture (node/ml/models.py)
    a = analyze_folder("./my-model", batch=8, seq=128)              # a local Hugging Face folder (config.json only)
    m = a.memory("bf16", "adamw")                                   # weights, gradients, optimizer, activations
    need = estimate_memory_bytes("gpt2", {}, batch_size=32)         # what a node checks before taking a job

How the numbers are found. The model is built on torch's meta device (shapes only: nothing allocated, no weights
read) and one training step is traced there at the given batch: forward with eager attention, cross-entropy loss,
backward.
  * parameters: counted once each (tied weights once), in the row of the block that owns them; the rows are the
    children of the model's largest ModuleList or Sequential (GPT-2's ``transformer.h``, LLaMA's ``model.layers``,
    BERT's ``encoder.layer``, an MLP's layers), plus what runs before them (embeddings) and after (final norm,
    head, loss).
  * FLOPs: torch.utils.flop_counter.FlopCounterMode over forward + backward (matmuls, convolutions, attention),
    divided by the batch: training FLOPs per sample (about 6 x parameters x tokens for a transformer).
  * activations: the bytes of every tensor autograd saves for backward (torch.autograd.graph.saved_tensors_hooks),
    each tensor once, parameters excluded, at fp32. Under autocast (bf16, fp16) matmul inputs are saved at 16 bits
    but norms, softmax and residual sums stay fp32, so the saved bytes are HALF_ACTIVATIONS of fp32's rather than
    the half that Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") assume.
    Eager attention materialises the (B, heads, S, S) scores: an upper bound for GPUs whose SDPA kernels (flash,
    memory-efficient) do not keep them.
  * training memory = weights (fp32) + gradients (fp32, trainable parameters) + optimizer state (AdamW: exp_avg
    and exp_avg_sq; SGD: the momentum buffer when momentum > 0) + activations + the largest gradient backward holds
    at once (the loss's input, e.g. the logits) + under autocast the 16-bit weight copies autocast caches.
A federated participant also keeps HOST_COPIES fp32 vectors of the trainable parameters in CPU memory (the round's
start, the local result, the pseudo-gradient, the error-feedback residual, the outer momentum): estimate_memory_bytes
adds them, and job_memory says which bytes go on the training device and which stay on the host. tests/test_analyze.py
checks the total against the peak memory of one real training step.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from node.ml.models import ARCHS, CAUSAL_LM, meta_module, quiet_transformers, resolve_overrides, token_limits
from node.runtime.device import BYTES_PER_VALUE, check_precision_name

FP32_BYTES = 4
OPTIMIZER_COPIES = {"adamw": 2, "sgd": 1}  # fp32 state per trainable parameter (torch.optim; sgd: with momentum)
HOST_COPIES = 5  # federated round vectors kept on the CPU (see the module docstring)
# Saved-for-backward bytes under autocast as a share of fp32's: measured 0.53-0.55 for GPT-2 and LLaMA blocks under
# CPU autocast (bf16 and fp16; peak RSS of a training step, tests/test_analyze.py), rounded up to 5/8.
HALF_ACTIVATIONS = 0.625
BEFORE, AFTER = "(before the blocks)", "(after the blocks)"
# The deepest model a node builds or traces: 32x the deepest released LLMs (Llama 3.1 405B: 126 layers). A peer's
# job may name any depth (a 120,000-layer MLP froze every daemon for ~120 s before this bound), so size_bound
# computes parameters and depth from the config alone, before a module exists.
MAX_BLOCKS = 4096
MINILM_PARAMS, MINILM_LAYERS = 22_713_216, 6  # all-MiniLM-L6-v2 (the package's model/config.json) without a head


@dataclass(frozen=True)
class SizeBound:
    """A model's size from its config alone (no module built): parameters (within a few percent; tied weights
    once) and its depth (blocks: layers of a stack, conv blocks)."""

    params: int
    blocks: int

    def training_bytes(self, optimizer: str = "adamw", momentum: float = 0.0) -> int:
        """A lower bound of its fp32 training memory: weights, gradients, optimizer state (no activations)."""
        return self.params * FP32_BYTES * (2 + _optimizer_copies(optimizer, momentum))


def size_bound(arch: str, cfg: Mapping[str, Any]) -> SizeBound:
    """Parameters and depth of ``arch`` with the resolved config ``cfg`` (node/ml/models.py resolve_overrides),
    by formula: instant for any config a peer may send."""
    c = {k: int(v) for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool)}
    untied = not cfg.get("tie_word_embeddings", True)
    if arch == "mlp":
        h, layers = c["hidden"], c["layers"]
        width = c["inputs"] if layers == 0 else h
        stack = c["inputs"] * h + h + (layers - 1) * (h * h + h) if layers else 0
        params = stack + width * c["classes"] + c["classes"]
        return SizeBound(params, layers + 1)
    if arch == "cnn":
        params, c_in, c_out = 0, c["in_channels"], c["channels"]
        for _ in range(c["blocks"]):
            params += c_in * c_out * 9 + c_out
            c_in, c_out = c_out, c_out * 2
        flat = c_in * (c["side"] >> c["blocks"]) ** 2
        params += flat * c["hidden"] + c["hidden"] + c["hidden"] * c["classes"] + c["classes"]
        return SizeBound(params, c["blocks"] + 2)
    if arch == "gpt2":
        d, v, layers = c["n_embd"], c["vocab_size"], c["n_layer"]
        params = v * d + c["n_positions"] * d + layers * (12 * d * d + 13 * d) + 2 * d + (v * d if untied else 0)
        return SizeBound(params, layers)
    if arch == "llama":
        d, v, layers, ff = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["intermediate_size"]
        kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
        params = v * d + layers * (2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d) + d + (v * d if untied else 0)
        return SizeBound(params, layers)
    if arch == "bert":
        d, layers, ff = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
        embeddings = (c["vocab_size"] + c["max_position_embeddings"] + 2) * d + 2 * d
        block = 4 * d * d + 4 * d + 2 * d * ff + ff + d + 4 * d
        return SizeBound(embeddings + layers * block + d * d + d + d * c["classes"] + c["classes"], layers)
    if arch == "minilm":
        return SizeBound(MINILM_PARAMS + 384 * c["classes"] + c["classes"], MINILM_LAYERS)
    raise ValueError(f"no size formula for arch {arch!r}")


def check_buildable(arch: str, cfg: Mapping[str, Any]) -> SizeBound:
    """The bound of ``arch``/``cfg``; ValueError (one line) when it is deeper than MAX_BLOCKS, before anything is
    built or traced."""
    bound = size_bound(arch, cfg)
    if bound.blocks > MAX_BLOCKS:
        raise ValueError(f"model {arch!r} has {bound.blocks:,} layers; a node builds at most {MAX_BLOCKS:,}")
    return bound


@dataclass(frozen=True)
class Row:
    """One top-level block (or what runs before / after the blocks)."""

    name: str
    params: int
    trainable: int
    flops: int  # forward + backward FLOPs of the traced batch
    activation_bytes: int  # saved for backward at fp32, the traced batch


@dataclass(frozen=True)
class Memory:
    """Training memory in bytes at one precision."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    workspace: int  # the largest gradient backward holds at once, and autocast's 16-bit weight copies

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace


@dataclass(frozen=True)
class Analysis:
    model: str  # the arch name or the folder
    batch: int
    seq: int | None  # tokens per sample (None: feature-vector models)
    rows: tuple[Row, ...]
    largest_saved: int  # bytes (fp32) of the largest tensor saved for backward: its gradient is transient memory

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable(self) -> int:
        return sum(r.trainable for r in self.rows)

    @property
    def flops_per_sample(self) -> int:
        return sum(r.flops for r in self.rows) // self.batch

    def row_memory(self, row: Row, precision: str = "fp32", optimizer: str = "adamw", momentum: float = 0.0) -> Memory:
        """``row``'s part of the training memory (no workspace: that is the whole model's)."""
        copies = _optimizer_copies(optimizer, momentum)
        scale = 1.0 if check_precision_name(precision) == "fp32" else HALF_ACTIVATIONS
        return Memory(row.params * FP32_BYTES, row.trainable * FP32_BYTES, row.trainable * FP32_BYTES * copies,
                      int(row.activation_bytes * scale), 0)

    def memory(self, precision: str = "fp32", optimizer: str = "adamw", momentum: float = 0.0) -> Memory:
        parts = [self.row_memory(r, precision, optimizer, momentum) for r in self.rows]
        scale = 1.0 if precision == "fp32" else HALF_ACTIVATIONS
        casts = self.params * BYTES_PER_VALUE[precision] if precision != "fp32" else 0  # autocast's weight cache
        return Memory(sum(p.weights for p in parts), sum(p.gradients for p in parts), sum(p.optimizer for p in parts),
                      sum(p.activations for p in parts), int(self.largest_saved * scale) + casts)

    def to_json(self, precision: str, optimizer: str = "adamw") -> dict:
        def mem(m: Memory) -> dict:
            return {"weights": m.weights, "gradients": m.gradients, "optimizer": m.optimizer,
                    "activations": m.activations, "workspace": m.workspace, "total": m.total}
        precisions = sorted({"fp32", precision}, key=("fp32", "bf16", "fp16").index)
        return {"model": self.model, "batch": self.batch, "seq": self.seq, "optimizer": optimizer,
                "params": self.params, "trainable": self.trainable, "flops_per_sample": self.flops_per_sample,
                "layers": [{"name": r.name, "params": r.params, "flops_per_sample": r.flops // self.batch,
                            "memory": {p: mem(self.row_memory(r, p, optimizer)) for p in precisions}}
                           for r in self.rows],
                "memory": {p: mem(self.memory(p, optimizer)) for p in precisions}}


def _optimizer_copies(optimizer: str, momentum: float) -> int:
    if optimizer not in OPTIMIZER_COPIES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_COPIES)}, got {optimizer!r:.40}")
    return 0 if optimizer == "sgd" and momentum == 0 else OPTIMIZER_COPIES[optimizer]


# ---- tracing one training step on the meta device -------------------------------------------------------------

def _block_container(model: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the ModuleList / Sequential holding the most parameters: the model's stack of blocks."""
    best: tuple[int, str, nn.Module] | None = None
    for path, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0:
            n = sum(p.numel() for p in m.parameters())
            if best is None or n > best[0]:
                best = (n, path, m)
    if best is None:
        return "", model
    return best[1], best[2]


def trace(model: nn.Module, inputs: dict[str, torch.Tensor], loss_of: Callable[[Any], torch.Tensor], name: str,
          batch: int, seq: int | None) -> Analysis:
    """One forward + backward of meta-device ``model`` on meta ``inputs``; see the module docstring."""
    path, container = _block_container(model)
    blocks = list(container.named_children()) if container is not model else list(model.named_children())
    prefix = f"{path}." if path else ""
    names = [BEFORE, *(prefix + n for n, _ in blocks), AFTER]
    state = {"row": 0}
    saved: list[torch.Tensor] = []  # kept alive so that each tensor's id stays its own
    seen: set[int] = set()
    act = [0] * len(names)
    largest = [0]
    param_ids = {id(p) for p in model.parameters()}
    owner_row: dict[int, int] = {}  # id(parameter) -> row, for parameters outside the blocks
    module_row: dict[int, int] = {}  # id(module) -> the row it first ran in, for modules outside the blocks

    def enter(i: int):
        def hook(module, args):
            state["row"] = i
        return hook

    def leave(module, args, out):
        state["row"] = len(names) - 1

    def note_params(module, args):
        module_row.setdefault(id(module), state["row"])
        for p in module.parameters(recurse=False):
            owner_row.setdefault(id(p), state["row"])

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in seen and id(t) not in param_ids:
            seen.add(id(t))
            saved.append(t)
            size = t.numel() * FP32_BYTES if t.is_floating_point() else t.numel() * t.element_size()
            act[state["row"]] += size
            largest[0] = max(largest[0], size)
        return t

    block_ids = {id(m) for _, b in blocks for m in b.modules()}
    handles = []
    for i, (_, b) in enumerate(blocks, start=1):
        handles += [b.register_forward_pre_hook(enter(i)), b.register_forward_hook(leave)]
    for m in model.modules():
        if id(m) not in block_ids and m is not model:
            handles.append(m.register_forward_pre_hook(note_params))
    counter = FlopCounterMode(display=False, depth=1000)  # every module's own count
    try:
        with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_of(model(**inputs)).backward()
    finally:
        for h in handles:
            h.remove()
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    flops = [0] * len(names)
    for i, (n, _) in enumerate(blocks, start=1):
        flops[i] = counts.get(f"{root}.{prefix}{n}", 0)
    before_leaves = [p for p, m in model.named_modules() if p and not any(True for _ in m.children())
                     and id(m) not in block_ids and module_row.get(id(m)) == 0]
    flops[0] = sum(counts.get(f"{root}.{p}", 0) for p in before_leaves)
    flops[-1] = max(0, counts.get("Global", 0) - sum(flops[:-1]))
    params, trainable = [0] * len(names), [0] * len(names)
    for i, (_, b) in enumerate(blocks, start=1):
        ids = {id(p) for p in b.parameters()}
        params[i] = sum(p.numel() for p in model.parameters() if id(p) in ids)
        trainable[i] = sum(p.numel() for p in model.parameters() if id(p) in ids and p.requires_grad)
    inside = {id(p) for _, b in blocks for p in b.parameters()}
    for p in model.parameters():  # named once each: tied weights count in the first row that uses them
        if id(p) not in inside:
            row = owner_row.get(id(p), 0)
            params[row] += p.numel()
            trainable[row] += p.numel() if p.requires_grad else 0
    rows = tuple(Row(n, params[i], trainable[i], flops[i], act[i]) for i, n in enumerate(names))
    return Analysis(name, batch, seq, rows, largest[0])


def _eager(model: nn.Module) -> None:
    """Eager attention for a transformers model (its masks are built without reading values; see the docstring)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter("eager")


def _check_size(name: str, value: Any, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (limit is not None and value > limit):
        bound = f" in [1, {limit}]" if limit is not None else " >= 1"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r:.40}")
    return value


def _token_inputs(model: nn.Module, causal: bool, batch: int, seq: int):
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")  # (B, S)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def loss(out) -> torch.Tensor:
        logits = getattr(out, "logits", None)  # (B, S, V) or (B, C)
        if logits is None:  # a base model (no head): its hidden states stand for the output
            return out[0].float().mean()
        target = ids if causal else torch.zeros(batch, dtype=torch.long, device="meta")
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
    return inputs, loss


def _trace_tokens(model: nn.Module, causal: bool, name: str, batch: int, seq: int) -> Analysis:
    """Causal LMs need the all-ones mask given (else transformers checks position ids for packing, reading values);
    encoders need it left out (else they check it for padding): try both."""
    inputs, loss = _token_inputs(model, causal, batch, seq)
    try:
        return trace(model, inputs, loss, name, batch, seq)
    except (RuntimeError, NotImplementedError):
        inputs.pop("attention_mask")
        try:
            return trace(model, inputs, loss, name, batch, seq)
        except (RuntimeError, NotImplementedError) as e:
            raise ValueError(f"{name}: cannot trace a training step on the meta device "
                             f"({str(e).splitlines()[0][:120]})") from None


def analyze_arch(arch: str, overrides: Mapping[str, Any] | None = None, batch: int = 32, seq: int | None = None,
                 num_classes: int | None = None, num_features: int | None = None) -> Analysis:
    """A built-in architecture (node/ml/models.py ARCHS) with ``overrides``; ``seq`` defaults to the model's
    longest sequence (token models). ValueError (one line) for a bad arch, override or size. Cached: a node asks
    again for every job it sees at every poll."""
    cfg = resolve_overrides(arch, overrides, num_classes, num_features)
    _check_size("batch", batch)
    check_buildable(arch, cfg)  # by formula, before a module is built
    return _analyze_arch(arch, tuple(sorted(cfg.items())), batch, seq)


@functools.lru_cache(maxsize=64)
def _analyze_arch(arch: str, items: tuple, batch: int, seq: int | None) -> Analysis:
    cfg = dict(items)
    with quiet_transformers():
        model = meta_module(arch, cfg)
    _eager(model)
    if arch in ("mlp", "cnn"):
        width = int(cfg["inputs"]) if arch == "mlp" else int(cfg["in_channels"]) * int(cfg["side"]) ** 2
        x = torch.zeros(batch, width, device="meta")  # (B, F)
        y = torch.zeros(batch, dtype=torch.long, device="meta")
        return trace(model, {"x": x}, lambda out: nn.functional.cross_entropy(out, y), arch, batch, None)
    context = token_limits(arch, cfg)[1]
    seq = context if seq is None else _check_size("seq", seq, context)
    return _trace_tokens(model, ARCHS[arch].task == CAUSAL_LM, arch, batch, seq)


AUTO_CLASSES = (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                ("ForMaskedLM", "AutoModelForMaskedLM"))


def analyze_folder(path: str | pathlib.Path, batch: int = 32, seq: int | None = None,
                   task: str | None = None) -> Analysis:
    """A local Hugging Face folder: only its config.json is read (no weights, never remote code). The model class
    follows the config's ``architectures`` (…ForCausalLM, …ForSequenceClassification, …ForMaskedLM) or ``task``."""
    import transformers

    from node.ml.hf_models import read_config
    from node.ml.model_folder import check_no_remote_code

    folder = pathlib.Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json (a model folder, or a built-in arch: {', '.join(ARCHS)})")
    check_no_remote_code(folder, [])
    _check_size("batch", batch)
    config = read_config(folder)
    archs = [str(a) for a in getattr(config, "architectures", None) or ()]
    wanted = {"causal-lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification"}
    cls_name = wanted.get(task or "") or next((auto for a in archs for end, auto in AUTO_CLASSES if a.endswith(end)),
                                              "AutoModelForCausalLM")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = getattr(text, "n_positions", None) or getattr(text, "max_position_embeddings", None) or 512
    seq = min(int(context), 512) if seq is None else _check_size("seq", seq, int(context))
    try:
        with torch.device("meta"), quiet_transformers():
            model = getattr(transformers, cls_name).from_config(config, attn_implementation="eager")
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ValueError(f"{folder}: transformers cannot build {cls_name} from its config "
                         f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    return _trace_tokens(model, cls_name != "AutoModelForSequenceClassification", str(folder), batch, seq)


def analyze_module(model: nn.Module, batch: int, seq: int) -> Analysis:
    """A transformers causal LM or classifier already built (e.g. a model to split): traced on a meta copy built
    from its config, so its own weights are neither touched nor copied."""
    config: Any = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "config_class"):
        raise ValueError(f"{type(model).__name__} is not a transformers model")
    with torch.device("meta"), quiet_transformers():
        meta = type(model)(config)
    _eager(meta)
    causal = not type(model).__name__.endswith("ForSequenceClassification")
    return _trace_tokens(meta, causal, type(model).__name__, batch, seq)


def analyze(target: str, overrides: Mapping[str, Any] | None = None, batch: int = 32,
            seq: int | None = None) -> Analysis:
    """``target`` is a built-in arch name or a model folder (``swarmnode analyze``)."""
    if target in ARCHS:
        return analyze_arch(target, overrides, batch, seq)
    if overrides:
        raise ValueError("--set applies to built-in architectures; a folder's sizes are its config.json")
    return analyze_folder(target, batch, seq)


# ---- what a node checks before it takes a job ----------------------------------------------------------------

def job_memory(analysis: Analysis, precision: str = "fp32", optimizer: str = "adamw",
               momentum: float = 0.0) -> tuple[int, int]:
    """(bytes on the training device, bytes in host RAM besides) for a federated participant: the training memory
    where it trains, and HOST_COPIES fp32 vectors of the trainable parameters in CPU memory."""
    return analysis.memory(precision, optimizer, momentum).total, analysis.trainable * FP32_BYTES * HOST_COPIES


def estimate_memory_bytes(arch: str, overrides: Mapping[str, Any] | None, batch_size: int = 32,
                          seq_len: int | None = None, num_classes: int | None = None, precision: str = "fp32",
                          optimizer: str = "adamw", momentum: float = 0.0) -> int:
    """Bytes one node needs to train ``arch`` in a federated job on the CPU: job_memory's two parts together."""
    device, host = job_memory(analyze_arch(arch, overrides, batch_size, seq_len, num_classes), precision, optimizer,
                              momentum)
    return device + host


def format_analysis(a: Analysis, precision: str, optimizer: str = "adamw") -> str:
    """The table ``swarmnode analyze`` prints."""
    precisions = ["fp32"] + ([precision] if precision != "fp32" else [])

    def mib(n: int) -> str:
        return f"{n / 2**20:,.1f}"

    header = ["LAYER", "PARAMS", "GFLOPs/sample"] + [f"MiB {p}" for p in precisions]
    rows = [[r.name, f"{r.params:,}", f"{r.flops / a.batch / 1e9:.4f}"]
            + [mib(a.row_memory(r, p, optimizer).total) for p in precisions]
            for r in a.rows if r.params or r.flops or r.activation_bytes]
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(x, widths)))
             for x in [header, *rows]]
    seq = f", {a.seq} tokens" if a.seq else ""
    lines += ["", f"{a.model}: {a.params:,} parameters ({a.trainable:,} trainable), "
                  f"{a.flops_per_sample / 1e9:.4f} GFLOPs per sample (forward + backward), batch {a.batch}{seq}, "
                  f"optimizer {optimizer}"]
    for p in precisions:
        m = a.memory(p, optimizer)
        lines.append(f"training memory {p}: {mib(m.total)} MiB = weights {mib(m.weights)} + gradients "
                     f"{mib(m.gradients)} + optimizer {mib(m.optimizer)} + activations {mib(m.activations)} + "
                     f"workspace {mib(m.workspace)}")
    return "\n".join(lines)


def analysis_json(a: Analysis, precision: str, optimizer: str = "adamw") -> str:
    return json.dumps(a.to_json(precision, optimizer), indent=2)


__all__ = ["Analysis", "HOST_COPIES", "Memory", "Row", "analysis_json", "analyze", "analyze_arch", "analyze_folder",
           "analyze_module", "estimate_memory_bytes", "format_analysis", "job_memory", "trace"]
