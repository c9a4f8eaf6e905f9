"""The client side of a served model: routes a request through one replica per stage (node/serving/host.py).

    client = InferenceClient(p2p, dht, "srv1", ServedModel(stages=2, hidden=64, vocab=256, kind="causal-lm"),
                             ClientConfig(swarm="s"))
    tokens, reason = await client.generate(prompt_ids, max_new_tokens=32, temperature=0.0)
    vectors = await client.embed([[101, 7592, 102], [101, 102]])     # encoders: mean-pooled, L2-normalised

Generation (a causal LM): the prompt goes through every stage once (the prefill; the last stage returns the last
position's logits only), then one token at a time, each stage continuing its session's key/value cache. Greedy
(temperature 0) takes the argmax in float32, as transformers' generate does; sampling draws from
softmax(logits / temperature) with a torch.Generator seeded by ``seed``. Without a cache (``use_cache`` False,
the benchmark's baseline) every token sends the whole sequence through again.

Fail-over: a hop that fails (no reply within hop_timeout, the host gone, InferError, a reply that does not decode)
excludes that replica for the request, and the session starts over under a new id on a path of live replicas:
the prefix so far (prompt + tokens generated) is replayed from position 0, so the output is the one an unbroken
run gives (greedy, or sampling: the generator's draws depend on the tokens only, never on the path). At most
max_attempts paths per request; a stage with no live replica waits replica_wait seconds for one.

Replicas are found as the training pipeline finds them: the DHT records under protocol/pipeline/control.py
stage_key (one subkey per replica, refreshed by its heartbeat; "gone" when it stopped), chosen at random weighted
by the throughput each announces.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import secrets
from dataclasses import dataclass

import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from node.jobs.pipeline.direct_client import DirectFailure, DirectPool
from node.serving.local import ends_with_stop, mean_pool, next_token, seeded_generator
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.pipeline.activations import ExpectedTensor
from protocol.pipeline.control import (
    CONTROL_BOUND,
    ControlError,
    DirectOffer,
    DirectOpen,
    MemberRecord,
    check_peer_id,
    control_from_wire,
    control_to_wire,
    member_record_from_wire,
    stage_key,
    stage_protocol,
)
from protocol.pipeline.inference import (
    InferError,
    InferReply,
    InferRequest,
    infer_from_wire,
    infer_to_wire,
    max_infer_bytes,
)
from protocol.streams import request

logger = logging.getLogger(__name__)


class ServingError(RuntimeError):
    """A request could not be served (no live replica of a stage, or out of attempts)."""


class HopFailed(Exception):
    def __init__(self, peer: str, reason: str):
        super().__init__(f"{peer[-8:]}: {reason}")
        self.peer, self.reason = peer, reason


@dataclass(frozen=True)
class ServedModel:
    """What the client must know of the model to check replies: from its manifest."""

    stages: int
    hidden: int
    vocab: int  # the head's width (a causal LM's logits)
    kind: str  # "causal-lm" | "encoder"
    max_tokens: int = 512


@dataclass(frozen=True)
class ClientConfig:
    swarm: str = "swarmnode"
    hop_timeout: float = 30.0
    replica_wait: float = 30.0
    max_attempts: int = 4
    max_batch: int = 64
    seed: int | None = None  # replica choice
    wire_dtype: str | None = None
    direct: bool = True  # hops over the hosts' direct TCP paths when offered (encrypted; libp2p otherwise)
    direct_retry: float = 60.0  # after a direct failure, a host is reached over libp2p only for this long
    direct_connect_timeout: float = 5.0


class InferenceClient:
    def __init__(self, p2p: P2P, dht: DHTNode | None, serve_id: str, model: ServedModel, config: ClientConfig,
                 clock: Clock = SYSTEM_CLOCK, replicas: dict[int, list[str]] | None = None):
        if dht is None and replicas is None:
            raise ValueError("pass a DHT node or an explicit replicas map")
        self.p2p, self.dht, self.serve_id, self.model = p2p, dht, serve_id, model
        self.config, self.clock = config, clock
        self._explicit = replicas
        self._rng = random.Random(config.seed)
        self.replays = 0  # sessions started over after a failed hop (all requests)
        self.path: list[str] = []  # the replicas the latest generation runs through, one per stage
        self.direct = DirectPool(p2p, self._open_direct, config.direct_retry, config.direct_connect_timeout, clock)
        self.step_seconds: list[float] = []  # the latest generation's: each token's time (the first: the prefill)
        self.hops = 0
        self.paths: collections.Counter[str] = collections.Counter()  # "direct" / "libp2p": hops answered over each

    def close(self) -> None:
        """Close the idle direct connections (a hop in flight closes its own when it ends)."""
        self.direct.close()

    # ---- replicas ----------------------------------------------------------------------------------------

    async def replicas(self, stage: int) -> dict[str, MemberRecord]:
        if self._explicit is not None:
            return {p: MemberRecord("replica", 1.0, 0, 0.0) for p in self._explicit.get(stage, [])}
        assert self.dht is not None  # __init__: one of the two
        found = await self.dht.get(stage_key(self.config.swarm, self.serve_id, stage), latest=True)
        out: dict[str, MemberRecord] = {}
        if found is not None and isinstance(found.value, dict):
            for peer, item in found.value.items():
                try:
                    rec = member_record_from_wire(item.value)
                    if rec.role == "replica":
                        out[check_peer_id(peer, "subkey")] = rec
                except ValueError as e:
                    logger.debug("ignoring the record of %r: %s", peer, e)
        return out

    async def _path(self, excluded: set[str]) -> list[str]:
        path = []
        for stage in range(self.model.stages):
            deadline = self.clock.monotonic() + self.config.replica_wait
            while True:
                live = {p: r for p, r in (await self.replicas(stage)).items() if p not in excluded}
                if live:
                    peers = sorted(live)
                    path.append(self._rng.choices(peers, weights=[max(live[p].throughput, 1e-6) for p in peers])[0])
                    break
                if self.clock.monotonic() > deadline:
                    raise ServingError(f"no live replica of stage {stage} within {self.config.replica_wait:g} s")
                await self.clock.sleep(0.25)
        return path

    # ---- one hop -----------------------------------------------------------------------------------------

    def _expect(self, stage: int, rows: int, tokens: int, last: bool) -> ExpectedTensor:
        final = stage == self.model.stages - 1
        width = self.model.vocab if final and self.model.kind == "causal-lm" else self.model.hidden
        return ExpectedTensor(("float32", "float16", "bfloat16"), (rows, 1 if final and last else tokens, width),
                              "float32")

    async def _open_direct(self, peer: str, stage: int) -> DirectOffer:
        raw = await request(self.p2p, peer, stage_protocol(self.config.swarm, self.serve_id, stage, "control"),
                            control_to_wire(DirectOpen()), CONTROL_BOUND)
        reply = control_from_wire(raw, (DirectOffer, ControlError))
        if isinstance(reply, ControlError):
            raise HopFailed(peer, reply.reason)
        return reply

    async def _send(self, peer: str, stage: int, data: bytes, bound: int) -> bytes:
        """The reply frame: over the host's direct path when it offers one (and it has not failed lately), else --
        or after a direct failure, in the time left -- over a libp2p stream. The request keeps its session and
        start: a host that did serve the direct copy refuses a second one (its cache moved on), and the session
        is replayed elsewhere -- never continued twice."""
        timeout = self.config.hop_timeout
        loop = asyncio.get_running_loop()
        try:
            if self.config.direct and self.direct.usable(peer):
                t0 = loop.time()
                try:
                    async with asyncio.timeout(timeout):
                        raw = await self.direct.exchange(peer, stage, "forward", data, bound)
                    self.paths["direct"] += 1
                    return raw
                except DirectFailure as e:
                    self.direct.failed(peer, str(e))
                    timeout = max(timeout - (loop.time() - t0), 0.001)
            protocol = stage_protocol(self.config.swarm, self.serve_id, stage, "infer")
            async with asyncio.timeout(timeout):
                raw = await request(self.p2p, peer, protocol, data, bound)
            self.paths["libp2p"] += 1
            return raw
        except TimeoutError:
            raise HopFailed(peer, f"no reply within {self.config.hop_timeout:g} s") from None
        except HopFailed:
            raise
        except Exception as e:  # hang-ups, p2pd "peer unreachable", oversized replies
            raise HopFailed(peer, f"{type(e).__name__}: {e}") from None

    async def _hop(self, peer: str, req: InferRequest) -> torch.Tensor:
        rows, tokens = req.tensor.shape[:2]
        expect = self._expect(req.stage, rows, tokens, req.last)
        raw = await self._send(peer, req.stage, infer_to_wire(req, self.config.wire_dtype), max_infer_bytes(expect))
        try:
            reply = infer_from_wire(raw, InferReply, expect, session=req.session)
        except ValueError as e:
            raise HopFailed(peer, f"bad reply: {e}") from None
        if isinstance(reply, InferError):
            raise HopFailed(peer, reply.reason)
        self.hops += 1
        assert isinstance(reply, InferReply)
        return reply.tensor

    async def _through(self, path: list[str], session: int, start: int, x: torch.Tensor, keep: bool, last: bool,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x
        for stage, peer in enumerate(path):
            h = await self._hop(peer, InferRequest(self.serve_id, stage, session, start, h, keep, last, mask))
        return h

    # ---- requests ----------------------------------------------------------------------------------------

    async def embed(self, batch: list[list[int]]) -> list[list[float]]:
        """One vector per input (token ids with the model's special tokens already added)."""
        if self.model.kind != "encoder":
            raise ServingError("this model is a causal LM: it generates, it does not embed")
        if not batch or len(batch) > self.config.max_batch or not all(batch):
            raise ServingError(f"embed takes 1 to {self.config.max_batch} non-empty inputs")
        longest = max(len(ids) for ids in batch)
        if longest > self.model.max_tokens:
            raise ServingError(f"an input of {longest} tokens exceeds the model's {self.model.max_tokens}")
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        excluded: set[str] = set()
        for attempt in range(1, self.config.max_attempts + 1):
            path = await self._path(excluded)
            try:
                hidden = await self._through(path, new_session_id(), 0, ids, keep=False, last=False, mask=mask)
                return mean_pool(hidden, mask).tolist()
            except HopFailed as e:
                logger.warning("embedding: hop failed (attempt %d): %s", attempt, e)
                excluded.add(e.peer)
        raise ServingError(f"embedding failed on {self.config.max_attempts} paths")

    async def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
                       stop: list[list[int]] | None = None, use_cache: bool = True) -> tuple[list[int], str]:
        """(new tokens, "length" | "stop"): see the module docstring."""
        if self.model.kind != "causal-lm":
            raise ServingError("this model is an encoder: it embeds, it does not generate")
        if not prompt or len(prompt) + max_new_tokens > self.model.max_tokens:
            raise ServingError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) must be 1 to "
                               f"{self.model.max_tokens} tokens")
        generator = seeded_generator(seed)
        tokens, attempts = list(prompt), 0
        new: list[int] = []
        excluded: set[str] = set()
        path, session, held = await self._path(excluded), new_session_id(), 0  # held: tokens the path's caches hold
        self.path, self.step_seconds = path, []
        while len(new) < max_new_tokens:
            fresh = tokens[held:] if use_cache else tokens
            x = torch.tensor([fresh], dtype=torch.long)
            t0 = self.clock.monotonic()
            try:
                logits = await self._through(path, session, held, x, keep=use_cache, last=True)
            except HopFailed as e:
                attempts += 1
                logger.warning("generation: hop failed after %d tokens (attempt %d): %s; replaying the prefix of %d "
                               "tokens", len(new), attempts, e, len(tokens))
                if attempts >= self.config.max_attempts:
                    raise ServingError(f"generation failed on {attempts} paths: {e}") from None
                excluded.add(e.peer)
                path, session, held = await self._path(excluded), new_session_id(), 0
                self.path = path
                self.replays += 1
                continue
            held = len(tokens) if use_cache else 0
            self.step_seconds.append(self.clock.monotonic() - t0)
            token = next_token(logits[0, -1], temperature, generator)
            tokens.append(token)
            new.append(token)
            if ends_with_stop(new, stop):
                return new, "stop"
        return new, "length"


def new_session_id() -> int:
    return secrets.randbits(64) or 1


__all__ = ["ClientConfig", "InferenceClient", "ServedModel", "ServingError", "new_session_id"]
