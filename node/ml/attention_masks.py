"""The 4-D attention masks a pipeline stage hands its blocks, built here from plain torch ops.

    impl = pin_attention(model)                                   # "sdpa" (default) or "eager", set on the model
    mask = causal_mask(impl, hidden, attention_mask, position_ids) # GPT-2 / LLaMA blocks
    mask = bidirectional_mask(impl, hidden, attention_mask)        # BERT blocks

Why not transformers' own builders: they live in ``transformers.masking_utils``, a module outside its
documented API whose signatures change between minor releases (5.24 made ``create_causal_mask`` take a new
required ``cache`` argument, which broke every stage on fresh installs). The blocks themselves only need the
mask in the format their attention function reads, and that format is stable and small:

  implementation  no padding (attention_mask None or all 1)          padding (some 0) or packed sequences
  sdpa            None: causal blocks take torch SDPA's is_causal    bool (B, 1, T, T), True = attend
                  path, bidirectional ones no mask at all
  eager           causal: float (B, 1, T, T) additive mask           float (B, 1, T, T): 0 = attend,
                  (0 = attend, finfo(dtype).min = not); bidirect.    finfo(dtype).min = not
                  None

That is exactly what the unsplit model builds for those two implementations, so a stage's output equals the
unsplit model's bit for bit (tests/test_splitter.py: max abs difference 0.0 in fp32, with and without padding,
and with packed position ids). Which implementation the blocks use is the model's config setting; a stage
does not read it back (that attribute is private), it sets it: ``pin_attention`` calls the public
``PreTrainedModel.set_attn_implementation`` with the implementation the stage will build masks for. Other
implementations (flash-attention kernels, flex attention) are refused with a ValueError: a stage would have to
build their masks too.

Packed sequences (as transformers detects them): without an attention mask, position ids that do not go up
by one start a new sequence, and a token attends only within its own sequence (causally for GPT-2/LLaMA).
"""

from __future__ import annotations

from typing import Any

import torch

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
DEFAULT_ATTENTION = "sdpa"


def check_attention(impl: Any) -> str:
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, "
                         f"got {impl!r:.40}")
    return impl


def pin_attention(model: Any, impl: str = DEFAULT_ATTENTION) -> str:
    """Make ``model`` (a transformers PreTrainedModel, possibly on the meta device) attend with ``impl`` and
    return it. Its blocks read the setting from the config they share with the model, so every stage cut from
    it, and the model itself, uses ``impl`` afterwards."""
    check_attention(impl)
    model.set_attn_implementation(impl)
    return impl


def packed_sequence_ids(position_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """(B, T) int64 sequence index per token when ``position_ids`` (1 or B, T) pack several sequences into a row
    (a position that is not the previous one plus 1 starts the next sequence); None when each row is one."""
    if position_ids is None:
        return None
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must be (1 or B, T) with B = {batch}, got {tuple(position_ids.shape)}")
    position_ids = position_ids.expand(batch, -1)
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)  # (B, T); 1 inside a sequence
    ids = (step != 1).cumsum(-1)
    return None if bool((ids[:, -1] == 0).all()) else ids


def _allowed(hidden: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool,
             sequence_ids: torch.Tensor | None) -> torch.Tensor | None:
    """bool (B, 1, T, T), True = query t may attend key s; None when every pair the pattern allows is kept
    (no padding, no packing), the case SDPA covers without a mask."""
    b, t = hidden.shape[:2]
    device = hidden.device
    padding = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must be (B, T) = {(b, t)}, got {tuple(attention_mask.shape)}")
        padding = attention_mask.to(device=device, dtype=torch.bool)  # (B, T), True = a real token
        if bool(padding.all()):
            padding = None
    if padding is None and sequence_ids is None:
        return None
    allowed = torch.ones(1, 1, t, t, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.tril(allowed)  # key s <= query t
    if sequence_ids is not None:
        same = sequence_ids.to(device)[:, None, :, None] == sequence_ids.to(device)[:, None, None, :]  # (B,1,T,T)
        allowed = allowed & same
    if padding is not None:
        allowed = allowed & padding[:, None, None, :]  # keys that are padding are never attended
    return allowed.expand(b, 1, t, t)


def _as_format(impl: str, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if impl == "sdpa":
        return allowed
    return torch.where(allowed, torch.zeros((), device=allowed.device, dtype=dtype), torch.finfo(dtype).min)


def causal_mask(impl: str, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """The mask GPT-2 and LLaMA blocks take for ``hidden`` (B, T, H) with optional padding ``attention_mask``
    (B, T), 1 = token, and ``position_ids`` (1 or B, T; packing is detected only without an attention mask)."""
    check_attention(impl)
    sequences = packed_sequence_ids(position_ids, hidden.shape[0]) if attention_mask is None else None
    allowed = _allowed(hidden, attention_mask, causal=True, sequence_ids=sequences)
    if allowed is None:
        if impl == "sdpa":
            return None  # SDPA's is_causal=True, as the unsplit model takes it
        t = hidden.shape[1]
        allowed = torch.tril(torch.ones(1, 1, t, t, dtype=torch.bool, device=hidden.device))
        allowed = allowed.expand(hidden.shape[0], 1, t, t)
    return _as_format(impl, allowed, hidden.dtype)


def continuation_mask(impl: str, hidden: torch.Tensor, past: int) -> torch.Tensor | None:
    """The causal mask for ``hidden`` (B, T, H) continuing a sequence whose first ``past`` tokens a key/value cache
    holds: query t attends keys [0, past + t]. One new token attends every key: no mask (as the unsplit model, SDPA
    then runs without is_causal); T > 1 new tokens: (B, 1, T, past + T)."""
    check_attention(impl)
    b, t = hidden.shape[:2]
    if t == 1:
        return None
    keys = torch.arange(past + t, device=hidden.device)
    allowed = (keys[None, :] <= past + torch.arange(t, device=hidden.device)[:, None])[None, None]  # (1, 1, T, P+T)
    return _as_format(impl, allowed.expand(b, 1, t, past + t), hidden.dtype)


def bidirectional_mask(impl: str, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """The mask BERT blocks take: None without padding (or packing), else every real token of its sequence."""
    check_attention(impl)
    sequences = packed_sequence_ids(position_ids, hidden.shape[0]) if attention_mask is None else None
    allowed = _allowed(hidden, attention_mask, causal=False, sequence_ids=sequences)
    return None if allowed is None else _as_format(impl, allowed, hidden.dtype)


__all__ = ["ATTENTION_IMPLEMENTATIONS", "DEFAULT_ATTENTION", "bidirectional_mask", "causal_mask",
           "check_attention", "continuation_mask", "packed_sequence_ids", "pin_attention"]
