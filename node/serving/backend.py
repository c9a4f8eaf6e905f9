"""A served model as the HTTP API's Backend (node/serving/local.py): requests go through its stage hosts.

    backend = SwarmBackend(client, ByteText(), name="tiny-gpt2", max_context=128)
    runner, url = await start_http(backend, "127.0.0.1", 0, token_path)     # node/serving/http_api.py

The same interface as LocalBackend (one process), so the endpoint, its limits and its batching are the same
whichever runs the model; only where the layers are differs. Embedding batches the HTTP layer merges
(batching.py EmbedBatcher) travel as one pass through the stages; each completion is one session of its own.
"""

from __future__ import annotations

from node.serving.client import InferenceClient
from node.serving.local import check_kind
from node.serving.text import TextCodec


class SwarmBackend:
    def __init__(self, client: InferenceClient, text: TextCodec, *, name: str, max_context: int | None = None):
        self.client, self.text, self.name = client, text, name
        self.kind = check_kind(client.model.kind)
        self.max_context = client.model.max_tokens if max_context is None else min(max_context,
                                                                                    client.model.max_tokens)

    async def embed(self, batch: list[list[int]]) -> list[list[float]]:
        return await self.client.embed(batch)

    async def generate(self, prompt: list[int], max_new_tokens: int, temperature: float, seed: int | None,
                       stop: list[list[int]] | None = None) -> tuple[list[int], str]:
        return await self.client.generate(prompt, max_new_tokens, temperature, seed, stop)


__all__ = ["SwarmBackend"]
