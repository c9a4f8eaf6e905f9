"""Pipeline stages: a transformers model cut into contiguous layer ranges [start, end), one module per range.

    stages = cut_model(model, [(0, 2), (2, 4)])   # the stages hold the model's own submodules (no copy)
    h = stages[0](input_ids)                      # first stage: int64 (B, T) -> float (B, T, H)
    logits = stages[1](h)                         # last stage:  float (B, T, H) -> (B, T, V) for a causal LM
    costs = layer_costs(model)                    # parameter counts per block + embedding/head extras (planner)
    sync_tied_grads(stages)                       # after a pipeline backward: GPT-2's tied embedding/head

What each stage owns (names are the unsplit model's own: a stage's state_dict keys are a subset of the
model's, e.g. "transformer.h.3.attn.c_attn.weight", so the union of the stages' tensors is the model's):
  - first stage: the embeddings (token + position: GPT-2 wte/wpe + embedding dropout; LLaMA embed_tokens;
    BERT's word/position/token-type embeddings and their LayerNorm);
  - every stage: its blocks, held in a ModuleDict keyed by the global layer index; LLaMA stages also carry a
    copy of the rotary embedding (no parameters) and compute cos/sin for their own layers;
  - last stage: the final norm and the head (GPT-2 ln_f + lm_head; LLaMA norm + lm_head; BertModel: its pooler,
    applied only by ``pool``; BertForSequenceClassification: pooler + dropout + classifier).
Supported classes: SUPPORTED (GPT2LMHeadModel, LlamaForCausalLM, BertModel, BertForSequenceClassification).

Stage.forward(x, attention_mask=None, position_ids=None, token_type_ids=None)
  x:              first stage int64 token ids (B, T); any other stage the previous stage's output (B, T, H)
  attention_mask: optional (B, T), 1 = token, 0 = padding; the same tensor goes to every stage (it is batch
                  metadata, like the token count), and each stage builds its 4-D mask from it
                  (node/ml/attention_masks.py: the format the stage's attention implementation reads, "sdpa" by
                  default or "eager", pinned on the model when it is cut)
  position_ids:   optional (1 or B, T); GPT-2 and LLaMA default to arange(T) in every stage, with a cache
                  to the positions after the cached tokens
  cache:          GPT-2 and LLaMA: optional transformers DynamicCache, one session's keys and values for this
                  stage's layers (inference, node/serving/), filled as the stage runs; one unpadded sequence
  returns:        (B, T, H) hidden states, or from the last stage: logits (B, T, V) for causal LMs, the last
                  hidden state (B, T, H) for BertModel, class logits (B, C) for BertForSequenceClassification

Tied weights (GPT-2's lm_head.weight is transformer.wte.weight). When one stage holds both, they stay one
Parameter. When the first and last stage differ, the last stage holds its own copy of the tensor, so the
stages can live in separate processes. In the unsplit model autograd adds the head's and the embedding's
contributions into one gradient; split, each copy receives only its own part. Both holders must therefore
apply the SUM of the two gradients (tied_grad_sum; in one process sync_tied_grads does it; across processes
the last stage sends its head gradient to the first and both apply the sum). Equal start values + equal
gradients + the same deterministic optimizer keep the copies equal, bit for bit.

Only transformers' public API is used: model and config classes from its namespace, each block called
through its forward (keyword arguments filtered by the block's signature; a tuple output, as older versions
return, gives its [0]), PreTrainedModel.set_attn_implementation to pin the attention the masks are built
for. The masks are this project's own (node/ml/attention_masks.py; transformers' builders are in an undocumented
module whose signatures change between minor releases). LLaMA layers take position_embeddings=(cos, sin)
from the model-level rotary embedding. BERT's position_ids/token_type_ids and LLaMA's inv_freq are
non-persistent buffers, kept in stage_tensors so a stage rebuilt on the meta device gets them back without
recomputation. Checked against the locked transformers (requirements.lock) by tests/test_splitter.py.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from node.ml.attention_masks import (
    DEFAULT_ATTENTION,
    bidirectional_mask,
    causal_mask,
    check_attention,
    continuation_mask,
    pin_attention,
)
from protocol.transfer.shards import TiedWeight

Span = tuple[int, int]


@dataclass(frozen=True)
class _Layout:
    family: str  # "gpt2" | "llama" | "bert": which forward
    output: str  # "logits" (B, T, V) | "hidden" (B, T, H) | "class-logits" (B, C)
    layers: str  # path of the ModuleList of blocks
    first: tuple[str, ...]  # paths the first stage owns
    every: tuple[str, ...]  # parameter-free paths every stage copies
    last: tuple[str, ...]  # paths the last stage owns; a path whose attribute is None is skipped


SUPPORTED: dict[str, _Layout] = {
    "GPT2LMHeadModel": _Layout("gpt2", "logits", "transformer.h",
                               ("transformer.wte", "transformer.wpe", "transformer.drop"), (),
                               ("transformer.ln_f", "lm_head")),
    "LlamaForCausalLM": _Layout("llama", "logits", "model.layers", ("model.embed_tokens",), ("model.rotary_emb",),
                                ("model.norm", "lm_head")),
    "BertModel": _Layout("bert", "hidden", "encoder.layer", ("embeddings",), (), ("pooler",)),
    "BertForSequenceClassification": _Layout("bert", "class-logits", "bert.encoder.layer", ("bert.embeddings",), (),
                                             ("bert.pooler", "dropout", "classifier")),
}


def _layout(arch: str) -> _Layout:
    if arch not in SUPPORTED:
        raise ValueError(f"cannot cut a {arch} into stages; supported: {', '.join(SUPPORTED)}")
    return SUPPORTED[arch]


def arch_of(model: nn.Module) -> str:
    """The transformers class name of ``model``; ValueError if it is not one this module can cut."""
    arch = type(model).__name__
    _layout(arch)
    return arch


def _blocks_of(model: nn.Module, layout: _Layout) -> nn.ModuleList:
    blocks = model.get_submodule(layout.layers)
    if not isinstance(blocks, nn.ModuleList):  # as every SUPPORTED architecture keeps them
        raise ValueError(f"{type(model).__name__}.{layout.layers} is a {type(blocks).__name__}, not a ModuleList")
    return blocks


def num_layers_of(model: nn.Module) -> int:
    return len(_blocks_of(model, _layout(arch_of(model))))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_spans(spans: Sequence[Span], num_layers: int) -> tuple[Span, ...]:
    """``spans`` as a tuple if they are non-empty, contiguous and cover [0, num_layers); ValueError if not."""
    if not isinstance(spans, (list, tuple)) or not spans:
        raise ValueError(f"spans must be a non-empty list of (start, end) layer ranges, got {spans!r:.80}")
    out, expected = [], 0
    for i, span in enumerate(spans):
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise ValueError(f"spans[{i}] must be a (start, end) pair of integers, got {span!r:.40}")
        start, end = span
        if start != expected or end <= start:
            raise ValueError(f"spans[{i}] = ({start}, {end}): spans must be non-empty and contiguous, the next one "
                             f"starting at layer {expected}")
        out.append((start, end))
        expected = end
    if expected != num_layers:
        raise ValueError(f"spans cover layers [0, {expected}), the model has {num_layers}")
    return tuple(out)


def _check_range(start: Any, end: Any, num_layers: int) -> None:
    if (isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int) or not isinstance(end, int)
            or not 0 <= start < end <= num_layers):
        raise ValueError(f"layer range [{start!r:.20}, {end!r:.20}) must be non-empty and inside [0, {num_layers})")


# ---------------------------------------------------------------------------------------- calling transformers

@functools.cache
def _accepted(fn: Any) -> tuple[frozenset[str], bool]:
    """(explicitly named parameters, whether it takes **kwargs) of a callable's signature."""
    params = inspect.signature(fn).parameters.values()
    named = frozenset(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def _call_named(fn: Any, *args: Any, **candidates: Any) -> Any:
    """Call ``fn`` with only those ``candidates`` its signature names (mask builders: a version that does not
    know an argument must not receive it through **kwargs)."""
    named, _ = _accepted(fn)
    return fn(*args, **{k: v for k, v in candidates.items() if k in named})


CACHE_KEYWORDS = ("cache", "past_key_values")  # a block's key/value cache argument: transformers 5.25+, before


def _call_layer(layer: nn.Module, hidden: torch.Tensor, cache: Any = None, **kwargs: Any) -> torch.Tensor:
    """Run one block as the unsplit model does: keywords the block's forward takes (all of them if it has
    **kwargs, as the installed model then passes them too); a tuple output (older versions) gives its [0].
    ``cache`` (a transformers Cache) goes under the name the block's signature gives it, with use_cache."""
    named, var_kw = _accepted(type(layer).forward)
    if cache is not None:
        name = next((k for k in CACHE_KEYWORDS if k in named), None)
        if name is None:
            raise ValueError(f"{type(layer).__name__}.forward takes no key/value cache ({', '.join(CACHE_KEYWORDS)})")
        kwargs |= {name: cache, "use_cache": True}
    out = layer(hidden, **(kwargs if var_kw else {k: v for k, v in kwargs.items() if k in named}))
    return out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------------------------------------------ the stage

def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` under the dotted ``path`` of ``root``, creating empty parent modules as needed."""
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        if not hasattr(node, name):
            node.add_module(name, nn.Module())
        node = getattr(node, name)
    node.add_module(leaf, module)


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(module_path) if module_path else root, leaf, value)


class Stage(nn.Module):
    """Layers [start, end) of a model of ``num_layers`` (see the module docstring). Build with cut_model /
    cut_stage (from a model) or empty_stage + load_stage_tensors (from a shard)."""

    def __init__(self, arch: str, config: Any, start: int, end: int, num_layers: int,
                 parts: Mapping[str, nn.Module], layers: Mapping[int, nn.Module], ties: Iterable[TiedWeight],
                 attention: str = DEFAULT_ATTENTION):
        super().__init__()
        layout = _layout(arch)
        self.arch, self.family, self.output, self.config = arch, layout.family, layout.output, config
        self.attention = check_attention(attention)  # the implementation its blocks use (pinned on the model)
        self.start, self.end, self.num_layers = start, end, num_layers
        self.is_first, self.is_last = start == 0, end == num_layers
        self.ties = tuple(ties)  # every tie of the unsplit model; this stage may hold either side, both or none
        self.hidden_size = int(config.hidden_size)
        self._layers_path = layout.layers
        for path, module in parts.items():
            _attach(self, path, module)
        _attach(self, layout.layers, nn.ModuleDict({str(i): layers[i] for i in range(start, end)}))

    def extra_repr(self) -> str:
        return f"arch={self.arch}, layers=[{self.start}, {self.end}) of {self.num_layers}, attention={self.attention}"

    def part(self, path: str) -> nn.Module:
        return self.get_submodule(path)

    def blocks(self) -> list[nn.Module]:
        blocks = self.get_submodule(self._layers_path)
        if not isinstance(blocks, nn.ModuleDict):  # __init__ attaches the stage's blocks as one
            raise RuntimeError(f"{self._layers_path} is a {type(blocks).__name__}, not the stage's ModuleDict")
        return list(blocks.values())

    # -- forward ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                cache: Any = None) -> torch.Tensor:
        if self.is_first:
            if x.dtype != torch.long or x.dim() != 2:
                raise ValueError(f"stage [{self.start}, {self.end}) of {self.arch} takes int64 token ids (B, T), got "
                                 f"{x.dtype} {tuple(x.shape)}")
        elif not x.is_floating_point() or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"stage [{self.start}, {self.end}) of {self.arch} takes hidden states (B, T, "
                             f"{self.hidden_size}), got {x.dtype} {tuple(x.shape)}")
        b, t = x.shape[:2]
        if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must be (B, T) = {(b, t)}, got {tuple(attention_mask.shape)}")
        if token_type_ids is not None and (self.family != "bert" or not self.is_first):
            raise ValueError("token_type_ids go to the first stage of a BERT model only")
        if self.family == "bert":
            if cache is not None:
                raise ValueError(f"{self.arch} is an encoder: it keeps no key/value cache")
            return self._forward_bert(x, attention_mask, position_ids, token_type_ids)
        past = 0 if cache is None else cache.get_seq_length(self.start)  # tokens this stage holds (its first layer)
        if cache is not None and (attention_mask is not None or position_ids is not None):
            raise ValueError("with a key/value cache a stage takes one unpadded sequence at consecutive positions")
        if position_ids is None:  # what GPT2Model / LlamaModel use: the positions after the cached ones
            position_ids = torch.arange(past, past + t, device=x.device).unsqueeze(0)  # (1, T)
        if self.family == "gpt2":
            return self._forward_gpt2(x, attention_mask, position_ids, cache, past)
        return self._forward_llama(x, attention_mask, position_ids, cache, past)

    def _mask(self, h: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
              past: int) -> torch.Tensor | None:
        if not past:
            return causal_mask(self.attention, h, attention_mask, position_ids)
        return continuation_mask(self.attention, h, past)

    def _forward_gpt2(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                      cache: Any = None, past: int = 0) -> torch.Tensor:
        h = x
        if self.is_first:
            inputs_embeds = self.part("transformer.wte")(x)  # (B, T, H)
            h = inputs_embeds + self.part("transformer.wpe")(position_ids)  # + (1, T, H)
            h = self.part("transformer.drop")(h)
        mask = self._mask(h, attention_mask, position_ids, past)
        for block in self.blocks():
            h = _call_layer(block, h, cache, attention_mask=mask, position_ids=position_ids)
        if self.is_last:
            h = self.part("transformer.ln_f")(h)
            h = self.part("lm_head")(h)  # (B, T, V)
        return h

    def _forward_llama(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                       cache: Any = None, past: int = 0) -> torch.Tensor:
        h = self.part("model.embed_tokens")(x) if self.is_first else x  # (B, T, H)
        mask = self._mask(h, attention_mask, position_ids, past)
        position_embeddings = self.part("model.rotary_emb")(h, position_ids)  # cos, sin: (1, T, head_dim) each
        for layer in self.blocks():
            h = _call_layer(layer, h, cache, attention_mask=mask, position_embeddings=position_embeddings,
                            position_ids=position_ids)
        if self.is_last:
            h = self.part("model.norm")(h)
            h = self.part("lm_head")(h)  # (B, T, V)
        return h

    def _prefix(self) -> str:
        return "bert." if self.arch == "BertForSequenceClassification" else ""

    def _forward_bert(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None) -> torch.Tensor:
        p = self._prefix()
        h = x
        if self.is_first:
            h = _call_named(self.part(p + "embeddings").forward, input_ids=x, position_ids=position_ids,
                            token_type_ids=token_type_ids, inputs_embeds=None, past_key_values_length=0,
                            cache_length=0)
        mask = bidirectional_mask(self.attention, h, attention_mask, position_ids)
        for layer in self.blocks():
            h = _call_layer(layer, h, attention_mask=mask, position_ids=position_ids)
        if self.is_last and self.output == "class-logits":
            pooled = self.pool(h)  # (B, H)
            return self.part("classifier")(self.part("dropout")(pooled))  # (B, C)
        return h  # (B, T, H)

    def pool(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler (tanh(dense(first token))): (B, T, H) -> (B, H); last stage only."""
        pooler = _optional_submodule(self, self._prefix() + "pooler") if self.family == "bert" else None
        if pooler is None:
            raise ValueError(f"stage [{self.start}, {self.end}) of {self.arch} has no pooler")
        return pooler(last_hidden)


# ------------------------------------------------------------------------------------------------- cutting

def find_ties(model: nn.Module) -> tuple[TiedWeight, ...]:
    """Every parameter the model holds under more than one name: (later name -> first name)."""
    first_name: dict[int, str] = {}
    ties = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            ties.append(TiedWeight(target=name, source=first_name[id(param)]))
        else:
            first_name[id(param)] = name
    return tuple(ties)


def _owned_paths(model: nn.Module, layout: _Layout, start: int, end: int, n: int) -> list[str]:
    paths = list(layout.first) if start == 0 else []
    paths += layout.every
    if end == n:
        paths += [p for p in layout.last if _optional_submodule(model, p) is not None]
    return paths


def _optional_submodule(model: nn.Module, path: str) -> nn.Module | None:
    parent, _, leaf = path.rpartition(".")
    return getattr(model.get_submodule(parent) if parent else model, leaf, None)


def _names_under(path: str, module: nn.Module) -> set[str]:
    return {f"{path}.{n}" for n, _ in module.named_parameters(remove_duplicate=False)}


def cut_stage(model: nn.Module, start: int, end: int, attention: str = DEFAULT_ATTENTION) -> Stage:
    """The stage for layers [start, end) of ``model``. It holds the model's own submodules (training the stage
    trains the model; cut a copy.deepcopy to keep the model apart), except: the rotary embedding is copied per
    stage, and a tied tensor whose source lives in another stage is a fresh copy (see the module docstring).
    ``attention`` ("sdpa" or "eager") is pinned on ``model`` (node/ml/attention_masks.py pin_attention), so the model
    and its stages attend the same way."""
    arch = arch_of(model)
    pin_attention(model, attention)
    layout = _layout(arch)
    n = num_layers_of(model)
    _check_range(start, end, n)
    ties = find_ties(model)
    all_layers = _blocks_of(model, layout)
    layers = {i: all_layers[i] for i in range(start, end)}
    owned: set[str] = set()
    paths = _owned_paths(model, layout, start, end, n)
    for path in paths:
        owned |= _names_under(path, model.get_submodule(path))
    for i in range(start, end):
        owned |= _names_under(f"{layout.layers}.{i}", layers[i])
    parts: dict[str, nn.Module] = {}
    for path in paths:
        module = model.get_submodule(path)
        copies = {t.target.removeprefix(path + ".") for t in ties
                  if t.target.startswith(path + ".") and t.source not in owned}
        if path in layout.every:
            module = copy.deepcopy(module)
        elif copies:
            # Deep-copy the module but share every tensor except the tied ones (memo maps id -> same object).
            keep = {id(t): t for name, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                                            module.named_buffers(remove_duplicate=False))
                    if name not in copies}
            module = copy.deepcopy(module, memo=keep)
        parts[path] = module
    return Stage(arch, model.config, start, end, n, parts, layers, ties, attention)


def cut_model(model: nn.Module, spans: Sequence[Span], attention: str = DEFAULT_ATTENTION) -> list[Stage]:
    """One Stage per span; the spans must cover the model's layers contiguously (check_spans)."""
    spans = check_spans(spans, num_layers_of(model))
    return [cut_stage(model, start, end, attention) for start, end in spans]


# ------------------------------------------------------------------------------------ tensors of a stage

def _nonpersistent_buffers(stage: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that state_dict leaves out (registered with persistent=False), by their dotted names."""
    persistent = set(stage.state_dict(keep_vars=True))
    return {name: buf for name, buf in stage.named_buffers() if name not in persistent}


def _shared_targets(stage: Stage) -> dict[str, str]:
    """Ties whose two sides are in this one stage: target -> source (the file stores the source only)."""
    names = {n for n, _ in stage.named_parameters(remove_duplicate=False)}
    return {t.target: t.source for t in stage.ties if t.target in names and t.source in names}


def stage_tensors(stage: Stage) -> dict[str, torch.Tensor]:
    """Everything needed to rebuild the stage: its state_dict (a tie inside the stage stored once, under the
    source name) plus its non-persistent buffers (rotary inv_freq, BERT position ids). Detached, contiguous."""
    tensors = dict(stage.state_dict())
    for target in _shared_targets(stage):
        del tensors[target]
    for name, buf in _nonpersistent_buffers(stage).items():
        tensors[name] = buf
    return {name: t.detach().contiguous() for name, t in tensors.items()}


def empty_stage(arch: str, config: Mapping[str, Any] | Any, start: int, end: int,
                dtype: torch.dtype = torch.float32, attention: str = DEFAULT_ATTENTION) -> Stage:
    """The stage's structure on the meta device (no memory, no init): the model is built on meta from
    ``config`` (a dict as config.to_dict() gives it, or a config object) and cut; fill with load_stage_tensors."""
    import transformers

    from node.ml.models import quiet_transformers

    _layout(arch)
    cls = getattr(transformers, arch)
    if isinstance(config, Mapping):
        config = cls.config_class.from_dict(dict(config))
    with torch.device("meta"), quiet_transformers():
        model = cls(config)
    stage = cut_stage(model, start, end, attention)
    if dtype != torch.float32:
        stage.to(dtype)
    return stage


def load_stage_tensors(stage: Stage, tensors: Mapping[str, torch.Tensor]) -> Stage:
    """Put ``tensors`` (as stage_tensors made them) into ``stage`` (typically an empty_stage), re-tying the ties
    inside the stage; ValueError naming the first missing/unexpected/mis-shaped tensor. Returns ``stage``."""
    shared = _shared_targets(stage)
    expected = {k: v for k, v in stage.state_dict(keep_vars=True).items() if k not in shared}
    buffers = _nonpersistent_buffers(stage)
    expected.update(buffers)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    where = f"stage [{stage.start}, {stage.end}) of {stage.arch}"
    if missing:
        raise ValueError(f"{where}: tensor {missing[0]!r} missing ({len(missing)} in all)")
    if unexpected:
        raise ValueError(f"{where}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for name, want in expected.items():
        got = tensors[name]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"{where}: tensor {name!r} has shape {shape}, expected {tuple(want.shape)}")
        exact = isinstance(want, nn.Parameter)  # buffers may keep their own float dtype (fp32 inv_freq)
        if (got.dtype != want.dtype) if exact else (got.is_floating_point() != want.is_floating_point()):
            raise ValueError(f"{where}: tensor {name!r} is {dtype_name(got.dtype)}, expected {dtype_name(want.dtype)}")
    state = {k: tensors[k] for k in expected if k not in buffers}
    state.update({target: tensors[source] for target, source in shared.items()})
    stage.load_state_dict(state, strict=True, assign=True)
    for name in buffers:
        _set_tensor(stage, name, tensors[name])
    for target, source in shared.items():
        _set_tensor(stage, target, stage.get_parameter(source))
    left = [n for n, t in itertools.chain(stage.named_parameters(), stage.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{where}: tensor {left[0]!r} was not loaded")
    return stage


# ----------------------------------------------------------------------------------------------- tied grads

def tied_grad_sum(*grads: torch.Tensor | None) -> torch.Tensor:
    """The gradient every holder of a tied tensor applies: the sum of the holders' own gradients (None = a
    holder whose copy got no gradient this step). As autograd does for the one shared tensor of the unsplit
    model: d loss / d W = (through the embedding lookup) + (through the LM head)."""
    present = [g for g in grads if g is not None]
    if not present:
        raise ValueError("tied_grad_sum: no gradient to combine")
    total = present[0].detach().clone()
    for g in present[1:]:
        if g.shape != total.shape:
            raise ValueError(f"tied_grad_sum: shapes {tuple(total.shape)} and {tuple(g.shape)} differ")
        total += g.to(total.device)
    return total


def sync_tied_grads(stages: Sequence[Stage]) -> None:
    """In one process: for each tie whose copies live in different stages, set every copy's .grad to
    tied_grad_sum of their grads (separate processes exchange the two gradients and call tied_grad_sum)."""
    if not stages:
        return
    for tie in stages[0].ties:
        holders: dict[int, nn.Parameter] = {}
        for stage in stages:
            params = dict(stage.named_parameters(remove_duplicate=False))
            for name in (tie.source, tie.target):
                if name in params:
                    holders.setdefault(id(params[name]), params[name])
        if len(holders) < 2 or all(p.grad is None for p in holders.values()):
            continue
        total = tied_grad_sum(*(p.grad for p in holders.values()))
        for p in holders.values():
            p.grad = total.clone()


# ------------------------------------------------------------------------------------------------ costs

@dataclass(frozen=True)
class LayerCosts:
    """Parameter counts a stage planner needs (bytes = count * bytes_per_param)."""

    layer_params: tuple[int, ...]  # per block, in layer order
    embed_params: int  # extra for the first stage: embeddings (+ BERT's embedding LayerNorm)
    head_params: int  # extra for the last stage: final norm + head, counting a tied head (a copy when split)
    tied_params: int  # of head_params, those shared with the embeddings: not counted twice by a single stage
    bytes_per_param: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)

    @property
    def total_params(self) -> int:
        """The unsplit model's parameter count (ties once)."""
        return sum(self.layer_params) + self.embed_params + self.head_params - self.tied_params

    def stage_params(self, start: int, end: int) -> int:
        """Parameters held by the stage of layers [start, end)."""
        if not 0 <= start < end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) outside [0, {self.num_layers})")
        first, last = start == 0, end == self.num_layers
        return (sum(self.layer_params[start:end]) + (self.embed_params if first else 0)
                + (self.head_params if last else 0) - (self.tied_params if first and last else 0))


def layer_costs(model: nn.Module) -> LayerCosts:
    """Per-block and embedding/head parameter counts of ``model`` (works on a meta-device model too)."""
    layout = _layout(arch_of(model))
    n = num_layers_of(model)

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    def names(paths: Iterable[str]) -> dict[str, int]:
        out = {}
        for path in paths:
            module = _optional_submodule(model, path)
            if module is not None:
                out.update({f"{path}.{k}": p.numel() for k, p in module.named_parameters(remove_duplicate=False)})
        return out

    first, last = names(layout.first), names(layout.last)
    tied = sum(last[t.target] for t in find_ties(model) if t.target in last and t.source in first)
    blocks = _blocks_of(model, layout)
    params = list(model.parameters())
    return LayerCosts(layer_params=tuple(count(blocks[i]) for i in range(n)), embed_params=sum(first.values()),
                      head_params=sum(last.values()), tied_params=tied,
                      bytes_per_param=params[0].element_size() if params else 4)


def layer_costs_for(arch: str, config: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> LayerCosts:
    """layer_costs of ``arch`` built from ``config`` on the meta device: nothing allocated, no checkpoint read."""
    import transformers

    from node.ml.models import quiet_transformers

    _layout(arch)
    cls = getattr(transformers, arch)
    with torch.device("meta"), quiet_transformers():
        model = cls(cls.config_class.from_dict(dict(config))).to(dtype)
    return layer_costs(model)


__all__ = ["LayerCosts", "SUPPORTED", "Stage", "arch_of", "check_spans", "cut_model", "cut_stage", "dtype_name",
           "empty_stage", "find_ties", "layer_costs", "layer_costs_for", "load_stage_tensors", "num_layers_of",
           "stage_tensors", "sync_tied_grads", "tied_grad_sum"]
