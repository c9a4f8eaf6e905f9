"""What the serving API runs a model through (``Backend``), and the backend that runs a whole model in this process.

    backend = LocalBackend(model, ByteText(), name="gpt2-bytes", kind="causal-lm", max_context=128)
    tokens, finish = await backend.generate(prompt_ids, max_new_tokens=20, temperature=0.0, seed=None)
    vectors = await backend.embed([[101, 7592, 102], [101, 102]])      # an encoder: one unit vector per input

The HTTP layer (node/serving/http_api.py) checks every request against ``max_context`` and ``text.vocab_size``
before it calls a backend, so a backend sees only non-empty inputs of valid ids that fit; a ValueError a backend
raises anyway is the client's 400, anything else a 503.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Protocol

import torch
from torch import nn

from node.ml.models import CAUSAL_LM, PAD_TOKEN_ID
from node.serving.text import TextCodec

ENCODER = "encoder"
KINDS = (CAUSAL_LM, ENCODER)
FINISH_LENGTH, FINISH_STOP = "length", "stop"
# The keyword a transformers causal LM's forward takes its KV cache by, newest first: transformers 5.25 renamed
# ``past_key_values`` to ``cache`` (GPT2LMHeadModel.forward(input_ids, cache, ..., use_cache) returns
# CausalLMOutputWithCrossAttentions(logits, cache)); older releases and remote code still use the old name.
CACHE_NAMES = ("cache", "past_key_values")


class Backend(Protocol):
    """A model the HTTP API serves: a whole model here (LocalBackend) or one split across peers."""

    name: str  # the model's name as clients pass it in "model"
    kind: str  # "causal-lm" or "encoder"
    max_context: int  # the most tokens of prompt + generated (causal) or of one input (encoder)
    text: TextCodec

    async def embed(self, batch: list[list[int]]) -> list[list[float]]:
        """One vector per input, in order: the mean of the last hidden states over the input's tokens
        (sentence-transformers' mean pooling, as all-MiniLM-L6-v2 is used), L2-normalised. Inputs may differ in
        length."""
        ...

    async def generate(self, prompt: list[int], max_new_tokens: int, temperature: float, seed: int | None,
                       stop: list[list[int]] | None = None) -> tuple[list[int], str]:
        """(new tokens, finish reason). "length": ``max_new_tokens`` were made; "stop": the new tokens end with one
        of ``stop``'s id sequences (included: the caller cuts the text). Temperature 0 is greedy (argmax), above it
        sampling from softmax(logits / temperature) with a generator seeded by ``seed`` (None: fresh randomness), so
        one seed on one backend gives one text."""
        ...


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def ends_with_stop(tokens: list[int], stop: list[list[int]] | None) -> bool:
    """Whether ``tokens`` ends with one of the non-empty sequences of ``stop``."""
    return any(seq and len(tokens) >= len(seq) and tokens[-len(seq):] == seq for seq in stop or ())


def next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """The next id from one position's logits (V,): argmax at temperature 0, else a sample. On the CPU, in float32:
    a seed then gives the same text whichever device computed the logits (up to their own rounding)."""
    logits = logits.detach().to("cpu", torch.float32)
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers' Pooling(mean) makes them for all-MiniLM-L6-v2: the mean of the
    last hidden states over each row's real tokens (mask 1; padding contributes nothing), L2-normalised, float32.
    (B, T, H), (B, T) -> (B, H)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # (B, H)
    return nn.functional.normalize(pooled.float(), p=2, dim=1)


def seeded_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # fresh randomness from the OS, not torch's global RNG (which training code may have seeded)
    else:
        generator.manual_seed(seed)
    return generator


class LocalBackend:
    """A whole transformers model in this process, on one torch device.

    The module is put in eval mode and moved to ``device`` (in place: it is this backend's from then on). Every
    forward runs under torch.no_grad in a worker thread (asyncio.to_thread), so the event loop keeps answering other
    requests; torch releases the GIL inside its kernels. Concurrent calls run in parallel threads over the one
    module, which is safe for inference (no state is written) -- the HTTP layer bounds how many.

    causal-lm: a transformers causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...). Generation feeds the prompt once,
    then one token per step with transformers' own KV cache: the public forward returns it and takes it back on the
    next call, under the keyword its signature names (CACHE_NAMES).
    encoder: a transformers encoder (BertModel, or a task model over one such as BertForSequenceClassification,
    whose public ``base_model`` is the encoder: its last hidden states are what sentence-transformers pools).
    """

    def __init__(self, model: nn.Module, text: TextCodec, *, name: str, kind: str, max_context: int,
                 device: str | torch.device = "cpu"):
        if not isinstance(name, str) or not name or len(name) > 256 or not name.isprintable():
            raise ValueError(f"model name must be 1 to 256 printable characters, got {name!r:.80}")
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
            raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
        self.name, self.kind, self.max_context, self.text = name, check_kind(kind), max_context, text
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._encoder: nn.Module = model
        self._cache_arg = ""
        self._keep_last = False
        if kind == CAUSAL_LM:
            params = inspect.signature(model.forward).parameters
            names = [n for n in CACHE_NAMES if n in params]
            if "input_ids" not in params or "use_cache" not in params or not names:
                raise ValueError(f"model {name!r}: a causal-lm needs a transformers forward(input_ids, use_cache, "
                                 f"{' | '.join(CACHE_NAMES)}), {type(model).__name__}.forward has none")
            self._cache_arg = names[0]
            # logits_to_keep=1: the prompt's forward computes the LM head at its last position only (all we sample)
            self._keep_last = "logits_to_keep" in params
        else:
            base = getattr(model, "base_model", None)  # transformers' PreTrainedModel.base_model (itself for BertModel)
            self._encoder = base if isinstance(base, nn.Module) else model

    # ------------------------------------------------------------------------------------------------- embed

    async def embed(self, batch: list[list[int]]) -> list[list[float]]:
        if self.kind != ENCODER:
            raise ValueError(f"model {self.name} is a causal LM: it makes no embeddings")
        if not batch or any(not row for row in batch):
            raise ValueError("embed: every input needs at least one token")
        return await asyncio.to_thread(self._embed, batch)

    def _embed(self, batch: list[list[int]]) -> list[list[float]]:
        width = max(len(row) for row in batch)
        ids = torch.full((len(batch), width), PAD_TOKEN_ID, dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T), 1 = a real token
        for i, row in enumerate(batch):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.no_grad():
            hidden = self._encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
            vectors = mean_pool(hidden, mask)  # (B, H), unit length
        return vectors.cpu().tolist()

    # ---------------------------------------------------------------------------------------------- generate

    async def generate(self, prompt: list[int], max_new_tokens: int, temperature: float, seed: int | None,
                       stop: list[list[int]] | None = None) -> tuple[list[int], str]:
        if self.kind != CAUSAL_LM:
            raise ValueError(f"model {self.name} is an encoder: it generates no text")
        if not prompt:
            raise ValueError("generate: the prompt needs at least one token")
        if max_new_tokens < 1 or len(prompt) + max_new_tokens > self.max_context:
            raise ValueError(f"generate: {len(prompt)} prompt tokens + {max_new_tokens} new ones do not fit "
                             f"the model's context of {self.max_context}")
        if not temperature >= 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
        return await asyncio.to_thread(self._generate, list(prompt), max_new_tokens, temperature,
                                       seeded_generator(seed), stop)

    def _generate(self, prompt: list[int], max_new_tokens: int, temperature: float, generator: torch.Generator,
                  stop: list[list[int]] | None) -> tuple[list[int], str]:
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)  # (1, T): the prompt, then one token
        extra: dict[str, object] = {"logits_to_keep": 1} if self._keep_last else {}
        new: list[int] = []
        with torch.no_grad():
            while True:
                out = self.model(input_ids=ids, use_cache=True, **extra)
                new.append(next_token(out.logits[0, -1], temperature, generator))  # logits (1, T, V)
                if ends_with_stop(new, stop):
                    return new, FINISH_STOP
                if len(new) == max_new_tokens:
                    return new, FINISH_LENGTH
                # The output field is named as the keyword (CausalLMOutputWithPast.cache in 5.25, past_key_values
                # before); a ModelOutput leaves None fields out of its keys, hence .get
                cache = next((out.get(n) for n in (self._cache_arg, *CACHE_NAMES) if out.get(n) is not None), None)
                if cache is None:
                    raise RuntimeError(f"model {self.name}: forward(use_cache=True) returned no {self._cache_arg}")
                extra[self._cache_arg] = cache
                ids = torch.tensor([[new[-1]]], dtype=torch.long, device=self.device)  # (1, 1)
