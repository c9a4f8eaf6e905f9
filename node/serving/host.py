"""One replica of one stage of a served model: forward only, in eval mode, with each session's key/value cache.

    host = InferenceHost(p2p, dht, "srv1", index, stage, HostConfig(swarm="s"), device=torch.device("cuda"))
    await host.start()      # serves swarmnode/<swarm>/pipe/<serve id>/s<i>/infer, announces itself in the DHT
    await host.stop()       # withdraws its record ("gone") and its handler

A request (protocol/pipeline/inference.py InferRequest) carries the stage's input and a session: ``keep`` False is one
pass that leaves nothing behind (an encoder's batch, or generation without a cache); ``keep`` True runs the tokens
through the stage with the session's transformers DynamicCache (node/ml/stages.py Stage.forward(cache=...)) and
keeps it for the next token. The cache must hold exactly ``start`` tokens before the request (start 0 opens the
session afresh): anything else is refused with InferError(held=...) and the client replays the prefix, so a lost
reply or an evicted session can never continue the wrong text.

Why it is bounded this way (peers may be hostile, and a host serves strangers):
  * Every input is checked on decode against what this stage takes (protocol/pipeline/inference.py): token ids in
    the vocabulary for the first stage, (B, T, hidden) floats for the others, B <= max_batch, T <= max_tokens, a
    padding mask only for encoders, a cached session only with B = 1.
  * Sessions: at most max_sessions caches, at most max_tokens tokens each (the model's context), and at most
    max_cached_tokens over all of them; a session idle for session_ttl_s is dropped (the injected clock's
    monotonic time), and beyond a bound the least recently used goes first. A client whose session was dropped
    gets InferError and replays: memory stays bounded whatever the clients do.
  * One worker thread computes (torch in the executor, never in the event loop), so two requests of one session
    cannot interleave: the length check and the cache update happen in the same call.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from node.jobs.pipeline.direct_server import DirectServer
from node.jobs.pipeline.stage_config import StageConfig
from node.ml.stages import Stage
from node.runtime.device import autocast, check_precision
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.pipeline.activations import ExpectedTensor
from protocol.pipeline.control import (
    CONTROL_BOUND,
    ControlError,
    DirectOpen,
    MemberRecord,
    control_from_wire,
    control_to_wire,
    member_record_to_wire,
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
    padding_mask,
)
from protocol.streams import Stream, serve_on, stop_serving
from protocol.wire import WireError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostConfig:
    swarm: str = "swarmnode"
    max_batch: int = 64  # rows of one request (encoders' batches; a cached session has 1)
    max_tokens: int = 512  # tokens of one request, and of one session's cache (the model's context)
    max_sessions: int = 64
    max_cached_tokens: int = 64 * 512  # over all sessions
    session_ttl_s: float = 120.0
    io_timeout: float = 30.0
    ttl: float = 10.0  # the DHT record's lifetime; heartbeats every ttl / 3
    throughput: float = 1.0  # the routing weight it announces
    precision: str = "fp32"
    wire_dtype: str | None = None  # float tensors in replies as float16/bfloat16
    direct: bool = True  # also serve requests over a direct TCP path (node/jobs/pipeline/direct_server.py)
    direct_host: str | None = None  # its listen address; default: the IP of the libp2p listen address

    def __post_init__(self) -> None:
        if min(self.max_batch, self.max_tokens, self.max_sessions, self.max_cached_tokens) < 1:
            raise ValueError("max_batch, max_tokens, max_sessions and max_cached_tokens must be >= 1")
        if min(self.session_ttl_s, self.io_timeout, self.ttl) <= 0:
            raise ValueError("session_ttl_s, io_timeout and ttl must be > 0")


@dataclass
class _Session:
    cache: object  # transformers DynamicCache
    tokens: int
    used: float  # clock.monotonic() of its last request


class InferenceHost:
    def __init__(self, p2p: P2P, dht: DHTNode | None, serve_id: str, index: int, stage: Stage, config: HostConfig,
                 clock: Clock = SYSTEM_CLOCK, device: torch.device | None = None):
        self.p2p, self.dht, self.serve_id, self.index = p2p, dht, serve_id, index
        self.config, self.clock = config, clock
        self.device = torch.device("cpu") if device is None else device
        check_precision(self.device, config.precision)
        self.stage = stage.to(self.device).eval()
        self.causal = stage.family != "bert"
        self.sessions: collections.OrderedDict[int, _Session] = collections.OrderedDict()  # least recent first
        self.served = 0  # requests answered with an output
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"serve-s{index}")
        self._heartbeat: asyncio.Task | None = None
        cfg = stage.config
        b, t = config.max_batch, config.max_tokens
        self._in = ExpectedTensor.token_ids(b, t, int(cfg.vocab_size)) if stage.is_first else \
            ExpectedTensor.hidden(b, t, stage.hidden_size)
        self._mask = None if self.causal else padding_mask(b, t)
        self.me = p2p.peer_id.to_base58()
        # the direct path carries inference frames as its "forward" requests (a served stage takes no backward)
        self._direct = DirectServer(StageConfig(swarm=config.swarm, io_timeout=config.io_timeout,
                                                direct_host=config.direct_host),
                                    lambda kind, peer, data: self._answer(data), self._frame_bound,
                                    f"served stage {index}", clock)

    @property
    def protocol(self) -> str:
        return stage_protocol(self.config.swarm, self.serve_id, self.index, "infer")

    def _names(self) -> dict:
        return {self.protocol: self._on_infer,
                stage_protocol(self.config.swarm, self.serve_id, self.index, "control"): self._on_control}

    async def start(self) -> None:
        await serve_on(self.p2p, self._names(), logger, f"served stage {self.index}")
        if self.config.direct:
            await self._direct.start(self.p2p)
        if self.dht is not None:
            await self._announce(self.dht)
            self._heartbeat = asyncio.create_task(self._beat(self.dht), name=f"serve-s{self.index}-heartbeat")

    async def stop(self) -> None:
        if self._heartbeat is not None and self.dht is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            try:  # shadow the record so clients stop routing here before it expires
                await asyncio.wait_for(self._announce(self.dht, "gone"), 2.0)
            except Exception as e:
                logger.debug("could not withdraw the served stage's record: %s", e)
        self._direct.stop()
        await stop_serving(self.p2p, list(self._names()), logger)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.sessions.clear()

    async def _announce(self, dht: DHTNode, role: str = "replica") -> None:
        rec = MemberRecord(role, self.config.throughput, 0, self.clock.time())
        await dht.store(stage_key(self.config.swarm, self.serve_id, self.index), member_record_to_wire(rec),
                        get_dht_time() + self.config.ttl, subkey=self.me)

    async def _beat(self, dht: DHTNode) -> None:
        while True:
            await self.clock.sleep(self.config.ttl / 3)
            try:
                await self._announce(dht)
            except Exception as e:
                logger.warning("served stage %d: heartbeat failed: %s", self.index, e)

    # ---- requests ----------------------------------------------------------------------------------------

    def _frame_bound(self, kind: str) -> int:
        return max_infer_bytes(self._in, self._mask) if kind == "forward" else 0

    async def _on_infer(self, stream: Stream) -> None:
        try:
            data = await stream.receive(self._frame_bound("forward"), self.config.io_timeout)
        except WireError as e:  # an oversize length prefix
            await stream.send(infer_to_wire(InferError(0, f"refused: {e}")))
            return
        await stream.send(await self._answer(data))

    async def _answer(self, data: bytes) -> bytes:
        """The reply frame to one request frame (libp2p stream or direct path)."""
        reply: InferReply | InferError
        try:
            req = infer_from_wire(data, InferRequest, self._in, mask=self._mask)
            if not isinstance(req, InferRequest):  # infer_from_wire gives the type asked for
                raise WireError(f"a {type(req).__name__} is not a request")
            reply = await self._exec(self.serve, req)
        except (ValueError, RuntimeError) as e:  # WireError, a refusal below, a torch error from odd input
            reply = InferError(0, f"refused: {e}")
        return infer_to_wire(reply, self.config.wire_dtype)

    async def _on_control(self, stream: Stream) -> None:
        """DirectOpen -> DirectOffer: a session on the direct path for the peer libp2p authenticated."""
        try:
            control_from_wire(await stream.receive(CONTROL_BOUND, self.config.io_timeout), DirectOpen)
            reply = self._direct.offer(stream.peer) if self.config.direct else ControlError("no direct path here")
        except (ValueError, RuntimeError) as e:  # WireError, Refused (no listener)
            reply = ControlError(str(e)[:200])
        await stream.send(control_to_wire(reply))

    async def _exec(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def serve(self, req: InferRequest) -> InferReply | InferError:
        """The reply to one checked request (in the worker thread)."""
        if req.serve != self.serve_id or req.stage != self.index:
            return InferError(req.session, f"this is stage {self.index} of {self.serve_id}, not {req.stage} of "
                                           f"{req.serve}")
        self._expire()
        b, t = req.tensor.shape[:2]
        session: _Session | None = None
        if req.keep:
            if not self.causal:
                return InferError(req.session, f"{self.stage.arch} is an encoder: it keeps no session")
            if b != 1:
                return InferError(req.session, f"a session is one sequence, not {b}")
            if req.start + t > self.config.max_tokens:
                return InferError(req.session, f"{req.start} + {t} tokens exceed the context of "
                                               f"{self.config.max_tokens}")
            found = self._session(req)
            if isinstance(found, InferError):
                return found
            session = found
        elif req.start:
            return InferError(req.session, "a one-shot pass starts at 0")
        try:
            with torch.no_grad(), autocast(self.device, self.config.precision):
                mask = None if req.mask is None else req.mask.to(self.device)
                out = self.stage(req.tensor.to(self.device), attention_mask=mask,
                                 cache=None if session is None else session.cache)
        except Exception:
            if session is not None:  # its cache may hold part of the tokens: never continue from it
                self.sessions.pop(req.session, None)
            raise
        if session is not None:
            session.tokens += t
        if req.last and self.stage.is_last and out.dim() == 3:
            out = out[:, -1:]
        self.served += 1
        return InferReply(req.session, out.detach().float().cpu())

    def _session(self, req: InferRequest) -> _Session | InferError:
        from transformers import DynamicCache  # the public cache class; imported where it is used (start-up cost)

        now = self.clock.monotonic()
        found = self.sessions.get(req.session)
        if req.start == 0:  # a new session (or a replay of this one from the start)
            self.sessions.pop(req.session, None)
            self._make_room(req.tensor.shape[1])
            found = self.sessions[req.session] = _Session(DynamicCache(), 0, now)
        elif found is None or found.tokens != req.start:
            held = 0 if found is None else found.tokens
            return InferError(req.session, f"session holds {held} tokens here, not {req.start}: replay it", held)
        else:
            self._make_room(req.tensor.shape[1], keep=req.session)
        found.used = now
        self.sessions.move_to_end(req.session)
        return found

    def _expire(self) -> None:
        cutoff = self.clock.monotonic() - self.config.session_ttl_s
        for sid in [s for s, v in self.sessions.items() if v.used < cutoff]:
            del self.sessions[sid]

    def _make_room(self, tokens: int, keep: int | None = None) -> None:
        """Drop the least recently used sessions (not ``keep``) until one more fits the bounds."""
        def over() -> bool:
            held = sum(s.tokens for s in self.sessions.values())
            count = len(self.sessions) + (keep is None)
            return count > self.config.max_sessions or held + tokens > self.config.max_cached_tokens

        while over():
            victim = next((s for s in self.sessions if s != keep), None)
            if victim is None:
                return
            del self.sessions[victim]

    def cached_tokens(self) -> int:
        return sum(s.tokens for s in self.sessions.values())


__all__ = ["HostConfig", "InferenceHost"]
