"""Stage host: one replica of one pipeline stage, serving forward and backward over libp2p streams.

    host = StageHost(p2p, dht, "job1", 1, stage, StageConfig(swarm="s", optimizer="adamw", lr=1e-3))
    await host.start()      # stream handlers, the averager, the DHT heartbeat (replica record)
    ...                     # a PipelineTrainer (node/jobs/pipeline/trainer.py) drives it
    await host.stop()

Protocols (protocol/pipeline/control.py names them and holds the messages; one stream per request and reply):
    .../pipe/{pipeline}/s{i}/forward    ForwardRequest -> ForwardReply | ErrorReply   (protocol/pipeline/activations.py)
    .../pipe/{pipeline}/s{i}/backward   BackwardRequest -> BackwardReply | ErrorReply
    .../pipe/{pipeline}/s{i}/control    Status | Commit | EndStep | Resync | Advance | Discard | DirectOpen
                                        -> reply | ControlError
    .../pipe/{pipeline}/state           StateRequest -> StateHead + chunks (this stage, or a backup held here)
    .../pipe/{pipeline}/backup          StateHead + chunks -> BackupAck (another stage's state, kept in memory)
    direct TCP (StageConfig.direct)     sealed frames (protocol/pipeline/direct.py): forward / backward request ->
                                        reply, many per persistent connection; a session (DirectOpen -> DirectOffer
                                        on the control stream) is handed out only over authenticated libp2p

A step, as one replica sees it:
    forward(mb)    keeps (input, output) under (mb, requesting peer); the input requires grad unless token ids
    backward(mb)   autograd of that output against the sent gradient: parameter gradients go to a PENDING slot
                   of (mb, peer), the input gradient goes back
    commit(ids)    the pending slots of exactly these ids (from the same peer) join the step's accumulator
    end_step       the replicas named in the trainer's group average their mean gradients (top-k Averager with
                   error feedback, weight = micro-batches committed here) and apply the same optimizer step
                   (torch SGD/AdamW, foreach=False, on CPU: deterministic), so their parameters stay
                   bit-identical; stale activations and uncommitted slots are dropped; the step counter moves on.
                   Forward and backward run on the node's device (node/jobs/pipeline/stage_device.py).

Why it is built this way -- the races it handles:
  * A micro-batch retried after a replica died mid-backward: every attempt has its own id and its gradient
    waits in a pending slot; only attempts the trainer commits count, so nothing is counted twice, and the
    slots of abandoned attempts are dropped at the step end (and bounded by ``max_inflight`` and a TTL).
  * A backward from a peer other than the one that sent the forward, or for an unknown/expired micro-batch,
    or a gradient of the wrong shape: refused with an ErrorReply; the table is keyed by (mb, peer).
  * Requests of another step (a trainer behind or ahead, a late retry): refused, naming the host's step.
  * A duplicated commit or end_step (the trainer retried after a lost reply): a commit of an id already counted
    is acknowledged again without adding it twice; a second end_step of the same step gets the first reply.
  * The trainer uncounted this replica's commits (it believed it dead): end_step names the ids the trainer
    counts here; if they are not exactly what was committed, the accumulator is discarded and the replica joins
    the round with an empty update and near-zero weight, so it still applies the same average as the others.
  * Forward, backward, optimizer step and state snapshots all run on one worker thread, in arrival order, so a
    snapshot never sees half a step and no forward reads parameters while the optimizer writes them.
  * A malformed frame (bad msgpack, wrong dtype/shape, NaN, oversize length prefix): ErrorReply with a one-line
    reason before anything is allocated from it (protocol/pipeline/activations.py); the host keeps serving.
  * The direct path (a plain TCP listener beside p2pd): node/jobs/pipeline/direct_server.py says what it refuses.
  * State from a peer (takeover, resync, backups): size bounded by this stage's own parameter count before a
    byte is read, sha256-checked, then every tensor name, shape and dtype checked against this stage and
    optimizer, and the parameters' hash against the sender's claim.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from node.jobs.pipeline.direct_server import DirectServer
from node.jobs.pipeline.stage_config import StageConfig, StageHooks
from node.jobs.pipeline.stage_device import StageCompute
from node.jobs.pipeline.stage_state import (
    OPTIMIZERS,
    Refused,
    fetch_state,
    receive_body,
    send_state,
    state_bound,
    state_from_bytes,
    state_to_bytes,
)
from node.ml.models import params_sha256
from node.ml.stages import Stage
from protocol.allreduce.averager import Averager
from protocol.allreduce.codecs import quantize_values
from protocol.allreduce.messages import TensorSpec
from protocol.allreduce.rounds import RoundConfig
from protocol.allreduce.sparsify import ErrorFeedbackSparsifier, SparseUpdate
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.pipeline.activations import (
    BackwardReply,
    BackwardRequest,
    ErrorReply,
    ExpectedTensor,
    ForwardReply,
    ForwardRequest,
    activation_from_wire,
    activation_to_wire,
    max_frame_bytes,
)
from protocol.pipeline.control import (
    CONTROL_BOUND,
    Advance,
    BackupAck,
    Commit,
    CommitReply,
    ControlError,
    DirectOffer,
    DirectOpen,
    Discard,
    EndStep,
    EndStepReply,
    MemberRecord,
    Resync,
    StateHead,
    StateRequest,
    Status,
    StatusReply,
    control_from_wire,
    control_to_wire,
    member_record_to_wire,
    one_line,
    pipe_protocol,
    stage_key,
    stage_protocol,
)
from protocol.streams import Stream, open_stream, serve_on, stop_serving
from protocol.wire import WireError

logger = logging.getLogger(__name__)
ZERO_WEIGHT = 1e-9  # a replica with nothing committed joins the average with this weight and an empty update


@dataclass
class _Act:
    x: torch.Tensor
    out: torch.Tensor
    expires: float


@dataclass
class _Slot:
    grad: torch.Tensor  # (N,) float32, this micro-batch's parameter gradient
    expires: float


class StageHost:
    """One replica of stage ``index`` of pipeline ``pipeline_id`` (see the module docstring). ``manifest`` (the
    signed shard manifest) lets it hold state backups of the other stages; ``dht`` None: no heartbeat and no
    averaging (a stage with this one replica), for tests."""

    def __init__(self, p2p: P2P, dht: DHTNode | None, pipeline_id: str, index: int, stage: Stage,
                 config: StageConfig | None = None, hooks: StageHooks | None = None, manifest=None,
                 clock: Clock = SYSTEM_CLOCK, device: torch.device | None = None):
        config = config or StageConfig()
        self.p2p, self.dht, self.pipeline_id, self.index, self.stage = p2p, dht, pipeline_id, index, stage
        self.config, self.hooks, self.manifest, self.clock = config, hooks or StageHooks(), manifest, clock
        self.me = p2p.peer_id.to_base58()
        stage.train()
        self._named = [(n, p) for n, p in stage.named_parameters()]
        self._params = [p for _, p in self._named]
        self.size = sum(p.numel() for p in self._params)
        self._optimizer = config.optimizer_for(self._params)
        self._compute = StageCompute(stage, device, config.precision)  # forward/backward on the node's device
        self._sparsifier = ErrorFeedbackSparsifier(self.size, config.density, "exact", seed=index)
        self.step = 0  # the step being accumulated = optimizer steps completed
        self.params_hash = params_sha256(stage)
        self._acts: collections.OrderedDict[tuple[int, str], _Act] = collections.OrderedDict()
        self._pending: dict[tuple[int, str], _Slot] = {}
        self._acc: torch.Tensor | None = None  # (N,) float32 sum of the committed gradients
        self._committed: set[tuple[int, str]] = set()
        self._last_end: EndStepReply | None = None
        self._end_lock = asyncio.Lock()
        self._seen: collections.Counter = collections.Counter()
        self.backups: dict[int, tuple[StateHead, bytes]] = {}  # other stages' states held here
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"stage{index}")
        self._heartbeat: asyncio.Task | None = None
        self._direct = DirectServer(config, self._serve, self._bound, f"stage {index}", clock)
        max_seq = config.max_seq or int(getattr(stage.config, "n_positions", 0) or stage.config.max_position_embeddings)
        h = stage.hidden_size
        if stage.is_first:
            self._in = ExpectedTensor.token_ids(config.max_batch, max_seq, int(stage.config.vocab_size))
        else:
            self._in = ExpectedTensor.hidden(config.max_batch, max_seq, h)
        if stage.is_last and stage.output == "class-logits":
            raise ValueError("a classification head's stage cannot be pipeline-trained here (output (B, C))")
        width = int(stage.config.vocab_size) if stage.is_last and stage.output == "logits" else h
        self._out = ExpectedTensor.hidden(config.max_batch, max_seq, width)  # bounds the gradient sent back
        self._averager = None
        if dht is not None:
            rc = RoundConfig(swarm=config.swarm, tensor=TensorSpec(f"pipe-{pipeline_id}-s{index}", self.size),
                             matchmaking_time=config.matchmaking_time, part_timeout=config.part_timeout,
                             result_timeout=config.result_timeout, commit_timeout=config.commit_timeout,
                             value_codec=config.value_codec, result_value_codec="fp32")
            self._averager = Averager(p2p, dht, rc, clock=clock)

    # ---- life cycle ----------------------------------------------------------------------------------------

    def _names(self) -> dict[str, Callable]:
        sp = lambda kind: stage_protocol(self.config.swarm, self.pipeline_id, self.index, kind)  # noqa: E731
        pp = lambda kind: pipe_protocol(self.config.swarm, self.pipeline_id, kind)  # noqa: E731
        return {sp("forward"): self._on_forward, sp("backward"): self._on_backward, sp("control"): self._on_control,
                pp("state"): self._on_state, pp("backup"): self._on_backup}

    async def start(self) -> None:
        await serve_on(self.p2p, self._names(), logger, f"stage {self.index}: stream handler")
        if self.config.direct:
            await self._direct.start(self.p2p)
        if self._averager is not None:
            await self._averager.start()
        if self.dht is not None:
            await self._announce(self.dht)
            self._heartbeat = asyncio.create_task(self._beat(self.dht), name=f"stage{self.index}-heartbeat")

    async def stop(self) -> None:
        if self._heartbeat is not None and self.dht is not None:  # (a heartbeat runs only with a DHT node)
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            try:  # shadow our record so trainers stop routing here before it expires
                await asyncio.wait_for(self._announce(self.dht, "gone"), 2.0)
            except Exception as e:
                logger.debug("could not withdraw the replica record: %s", e)
        self.stop_direct()
        await stop_serving(self.p2p, self._names(), logger)
        if self._averager is not None:
            await self._averager.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def _announce(self, dht: DHTNode, role: str = "replica") -> None:
        expires, now = get_dht_time() + self.config.ttl, self.clock.time()
        rec = MemberRecord(role, self.config.throughput, self.step, now)
        await dht.store(stage_key(self.config.swarm, self.pipeline_id, self.index), member_record_to_wire(rec), expires,
                        subkey=self.me)
        for stage, (head, _) in list(self.backups.items()):
            await dht.store(stage_key(self.config.swarm, self.pipeline_id, stage),
                            member_record_to_wire(MemberRecord("backup", 0.0, head.step, now)), expires, subkey=self.me)

    async def _beat(self, dht: DHTNode) -> None:
        while True:
            await self.clock.sleep(self.config.heartbeat)
            try:
                await self._announce(dht)
            except Exception as e:
                logger.warning("heartbeat failed: %s", e)

    async def _exec(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _hook(self, kind: str, step: int) -> None:
        self._seen[kind, step] += 1
        if self.hooks.before is not None:
            await self.hooks.before(kind, step, self._seen[kind, step])

    # ---- forward / backward --------------------------------------------------------------------------------

    async def _on_forward(self, stream: Stream) -> None:
        await self._on_hop("forward", stream)

    async def _on_backward(self, stream: Stream) -> None:
        await self._on_hop("backward", stream)

    async def _on_hop(self, kind: str, stream: Stream) -> None:
        try:
            data = await stream.receive(self._bound(kind), self.config.io_timeout)
        except WireError as e:  # an oversize length prefix
            reply = activation_to_wire(ErrorReply(0, f"{kind} refused: {one_line(e)}"))
        else:
            reply = await self._serve(kind, stream.peer, data)
        await stream.send(reply)

    def _bound(self, kind: str) -> int:
        return max_frame_bytes(self._in if kind == "forward" else self._out)

    async def _serve(self, kind: str, peer: str, data: bytes) -> bytes:
        """The reply frame to one forward or backward request frame of ``peer`` (libp2p or direct path)."""
        mb = 0
        try:
            if kind == "forward":
                req = activation_from_wire(data, ForwardRequest, self._in)
                mb = req.micro_batch
                if not isinstance(req, ForwardRequest):  # activation_from_wire gives the type asked for
                    raise Refused(f"a {type(req).__name__} is not a forward request")
                if req.pipeline != self.pipeline_id or req.stage != self.index:
                    raise Refused(f"this is stage {self.index} of {self.pipeline_id}, not {req.stage} of "
                                  f"{req.pipeline}")
                await self._hook("forward", req.step)
                return activation_to_wire(ForwardReply(mb, await self._exec(self._forward, req, peer)),
                                          self.config.wire_dtype)
            back = activation_from_wire(data, BackwardRequest, self._out)
            mb = back.micro_batch
            await self._hook("backward", self.step)
            return activation_to_wire(BackwardReply(mb, await self._exec(self._backward, back, peer)),
                                      self.config.wire_dtype)
        except (ValueError, RuntimeError) as e:  # WireError, Refused, a torch error from odd input
            return activation_to_wire(ErrorReply(mb, f"{kind} refused: {one_line(e)}"))

    # ---- the direct data path (node/jobs/pipeline/direct_server.py) ---------------------------------------

    @property
    def direct_endpoint(self) -> tuple[str, int] | None:
        """(IP, port) of the direct listener, once started."""
        return self._direct.endpoint

    def stop_direct(self) -> None:
        """Close the direct listener and every direct connection (hops go on over libp2p)."""
        self._direct.stop()

    def _expire(self) -> None:  # an activation or pending gradient past activation_ttl is gone for every request
        now = self.clock.monotonic()
        for table in (self._acts, self._pending):
            for key in [k for k, v in table.items() if v.expires < now]:
                del table[key]

    def _forward(self, req: ForwardRequest, peer: str) -> torch.Tensor:
        if req.step != self.step:
            raise Refused(f"stage is at step {self.step}, not {req.step}")
        if not req.train:  # evaluation: nothing kept for a backward
            return self._compute.evaluate(req.tensor)
        key = (req.micro_batch, peer)
        if key in self._acts or key in self._pending or key in self._committed:
            raise Refused(f"micro-batch {req.micro_batch:016x} was already forwarded")
        self._expire()
        if len(self._acts) + len(self._pending) >= self.config.max_inflight:
            raise Refused(f"busy: {self.config.max_inflight} micro-batches in flight")
        x, out = self._compute.forward(req.tensor)  # on the node's device: (b, T, H) or logits (b, T, V)
        self._acts[key] = _Act(x, out, self.clock.monotonic() + self.config.activation_ttl)
        return self._compute.to_wire(out)

    def _backward(self, req: BackwardRequest, peer: str) -> torch.Tensor | None:
        self._expire()
        act = self._acts.get(key := (req.micro_batch, peer))
        if act is None:
            raise Refused(f"no forward of micro-batch {req.micro_batch:016x} from this peer in step {self.step}")
        if req.grad.shape != act.out.shape:
            raise Refused(f"gradient of shape {tuple(req.grad.shape)} for an output of {tuple(act.out.shape)}")
        del self._acts[key]
        flat, grad_in = self._compute.backward(act.x, act.out, req.grad)  # (N,) float32, the input's: on the CPU
        self._pending[key] = _Slot(flat, self.clock.monotonic() + self.config.activation_ttl)
        return grad_in

    # ---- control -------------------------------------------------------------------------------------------

    async def _on_control(self, stream: Stream) -> None:
        peer = stream.peer
        try:
            data = await stream.receive(CONTROL_BOUND, self.config.io_timeout)
            msg = control_from_wire(data, (Status, Commit, EndStep, Resync, Advance, Discard, DirectOpen))
            if isinstance(msg, DirectOpen):
                reply: DirectOffer | StatusReply | EndStepReply | ControlError = self._direct.offer(peer)
            elif isinstance(msg, Commit):
                reply = await self._exec(self._commit, msg, peer)
            elif isinstance(msg, EndStep):
                reply = await self.end_step(msg, peer)
            else:  # Status, Discard, Advance, Resync: each answered with the status after it
                if isinstance(msg, Discard):
                    await self._exec(self._discard, msg, peer)
                elif isinstance(msg, Advance):
                    await self.advance(msg.step)
                elif isinstance(msg, Resync):
                    await self.resync(msg.source, msg.step)
                reply = StatusReply(self.step, len(self._committed), self.params_hash)
        except (ValueError, RuntimeError) as e:
            reply = ControlError(one_line(e))
        await stream.send(control_to_wire(reply))

    def _commit(self, msg: Commit, peer: str) -> CommitReply:
        if msg.step != self.step:
            raise Refused(f"stage is at step {self.step}, not {msg.step}")
        self._expire()
        committed, missing = [], []
        for mb in msg.micro_batches:
            key = (mb, peer)
            if key not in self._committed:
                slot = self._pending.pop(key, None)
                if slot is None:
                    missing.append(mb)
                    continue
                self._acc = slot.grad if self._acc is None else self._acc.add_(slot.grad)
                self._committed.add(key)
            committed.append(mb)
        return CommitReply(self.step, tuple(committed), tuple(missing))

    def _discard(self, msg: Discard, peer: str) -> None:
        """Drop ``peer``'s commits (and pending slots) of an attempt it abandoned; the accumulator is a sum, so
        only when every commit held is that trainer's."""
        if msg.step != self.step:
            return  # another step: nothing of that attempt is held here
        if any(trainer != peer for _, trainer in self._committed):
            raise Refused("holds commits of another trainer; they cannot be taken out of the sum")
        self._acc, self._committed = None, set()
        for key in [k for k in self._pending if k[1] == peer]:
            del self._pending[key]

    async def end_step(self, msg: EndStep, peer: str) -> EndStepReply:
        async with self._end_lock:
            if self._last_end is not None and self._last_end.step == msg.step:
                return self._last_end
            if msg.step != self.step:
                raise Refused(f"stage is at step {self.step}, not {msg.step}")
            if self.me not in msg.group:
                raise Refused("this replica is not in the step's group")
            await self._hook("end_step", msg.step)
            mean, committed, discarded = await self._exec(self._take, msg, peer)
            error, members = "", len(msg.group)
            if members == 1:  # alone: the mean, plus whatever error feedback still holds from earlier rounds
                avg, weight, members = self._with_residual(mean), float(committed), 1
            elif self._averager is None:
                raise Refused("this replica has no DHT node to average with its group")
            else:
                avg, weight, error = await self._average(self._averager, msg, mean, committed)
            await self._exec(self._apply, avg)
            backup_ok = None if msg.backup is None else await self._push_backup(msg.backup)
            reply = EndStepReply(msg.step, avg is not None, weight, committed, discarded, members, self.params_hash,
                                 backup_ok, one_line(error))
            self._last_end = reply
            if self.hooks.after_step is not None:
                self.hooks.after_step(reply)
            return reply

    def _take(self, msg: EndStep, peer: str) -> tuple[np.ndarray | None, int, int]:
        """The mean committed gradient (N,) float32 and the commit count, or (None, 0, discarded) when the
        trainer counts other micro-batches here than were committed."""
        acc, committed = self._acc, self._committed
        self._acc, self._committed = None, set()
        if {(mb, peer) for mb in msg.micro_batches} != committed:
            if committed or msg.micro_batches:
                logger.warning("step %d: the trainer counts %d micro-batches here, %d were committed: discarded",
                               msg.step, len(msg.micro_batches), len(committed))
            return None, 0, len(committed)
        if not committed:
            return None, 0, 0
        if acc is None:  # every commit adds to it
            raise RuntimeError(f"step {msg.step}: {len(committed)} commits and no gradient sum")
        mean = (acc / len(committed)).numpy()  # (N,) float32
        if not np.isfinite(mean).all():  # diverged: withheld, as node/jobs/federated/runner.py withholds a NaN update
            logger.warning("step %d: non-finite gradient withheld", msg.step)
            return None, 0, len(committed)
        return mean, len(committed), 0

    def _with_residual(self, mean: np.ndarray | None) -> np.ndarray | None:
        """``mean`` plus the error-feedback residual, which is emptied (a replica stepping alone sends nothing)."""
        residual = np.asarray(self._sparsifier.residual)
        held = np.flatnonzero(residual)
        if held.size == 0:
            return mean
        values = residual[held].copy()
        self._sparsifier.restore(SparseUpdate(held.astype(np.int64), -values, self.size))  # v[held] = 0
        out = np.zeros(self.size, np.float32) if mean is None else mean.copy()
        out[held] += values
        return out

    async def _average(self, averager: Averager, msg: EndStep, mean: np.ndarray | None, committed: int):
        """The group's weighted average (N,) float32, or None when the round applied nothing."""
        averager.config = dataclasses.replace(averager.config, expected_group=len(msg.group), min_group=2,
                                              max_group=max(2, len(msg.group)))
        update: SparseUpdate | Callable[[], SparseUpdate]
        if mean is None:  # nothing to contribute, but we must apply what the others apply
            update, weight = SparseUpdate(np.zeros(0, np.int64), np.zeros(0, np.float32), self.size), ZERO_WEIGHT
        else:
            codec = self.config.value_codec
            update = lambda: self._sparsifier.select(mean, quantize=lambda v: quantize_values(v, codec))  # noqa: E731
            weight = float(committed)
        outcome = await averager.step(f"{self.pipeline_id}/s{self.index}/step{msg.step}", update, weight)
        if mean is not None:  # (a zero-weight member's returned mass is in units of its 1e-9 weight: meaningless)
            self._sparsifier.restore(outcome.returned)
        rep = outcome.report
        applied = [w for w, ok in zip(rep.span_weights, rep.spans_applied) if ok]
        if outcome.average is None:
            return None, 0.0, rep.error or "the averaging round applied nothing"
        partial = "" if all(rep.spans_applied) else f"{rep.spans_applied.count(False)} span(s) not applied"
        return outcome.average.to_dense(), float(round(min(applied), 6)), partial

    def _apply(self, avg: np.ndarray | None) -> None:
        """The optimizer step on the averaged gradient (if any); then the next step begins."""
        if avg is not None:
            g = torch.from_numpy(avg)
            offset = 0
            for p in self._params:
                p.grad = g[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            self._optimizer.step()
            self._compute.sync()
            for p in self._params:
                p.grad = None
        self.step += 1
        self._acts.clear()
        self._pending.clear()
        self.params_hash = params_sha256(self.stage)

    # ---- state: snapshots, loading, serving, backups ---------------------------------------------------------

    def snapshot(self) -> tuple[StateHead, bytes]:
        """This replica's parameters and optimizer state as safetensors bytes (call on the worker thread)."""
        data = state_to_bytes(self._named, self._optimizer)
        return StateHead(self.index, self.step, len(data), hashlib.sha256(data).hexdigest(), self.params_hash), data

    def state_bound(self) -> int:
        """The most state bytes this stage can need (node/jobs/pipeline/stage_state.py state_bound)."""
        return state_bound(self.size, len(self._params), self.config.optimizer)

    def skip_to(self, step: int) -> None:
        """Label the state held as step ``step`` (before start, or on the worker thread as ``advance`` does): the
        newest state anyone had of this stage is older than the trainer's step, its updates in between died with
        the stage's last replica, and the pipeline goes on from the trainer's step rather than stop."""
        if step < self.step:
            raise ValueError(f"cannot go back from step {self.step} to {step}")
        self.step, self._last_end = step, None

    def load_state(self, head: StateHead, data: bytes) -> None:
        """Adopt a state fetched from a peer (call on the worker thread, or before start); Refused if unfit."""
        params, state = state_from_bytes(head, data, self.index, self._named, OPTIMIZERS[self.config.optimizer])
        with torch.no_grad():
            for n, p in self._named:
                p.copy_(params[n])
        self._compute.sync()
        self._optimizer.load_state_dict({"state": state, "param_groups": self._optimizer.state_dict()["param_groups"]})
        self.params_hash = params_sha256(self.stage)
        self.step, self._last_end = head.step, None
        self._drop_step_work()

    def _drop_step_work(self) -> None:
        """Forget every activation, pending gradient and commit held of the step (the state under them changed)."""
        self._acts.clear()
        self._pending.clear()
        self._acc, self._committed = None, set()

    async def advance(self, step: int) -> None:
        """Skip to ``step`` while serving (the trainer's Advance): nothing held of the current step is kept."""
        async with self._end_lock:
            await self._exec(self._advance, step)

    def _advance(self, step: int) -> None:
        if step < self.step:
            raise Refused(f"stage is at step {self.step}, past {step}")
        if step > self.step:
            logger.warning("stage %d: advanced from step %d to the trainer's step %d: no replica or backup of this "
                           "stage had the updates in between", self.index, self.step, step)
        self.skip_to(step)
        self._drop_step_work()

    async def resync(self, source: str, min_step: int) -> None:
        """Load the state of ``min_step`` or later from ``source`` (a replica of this stage)."""
        head, data = await fetch_state(self.p2p, [source], pipe_protocol(self.config.swarm, self.pipeline_id, "state"),
                                       self.index, self.state_bound(), min_step, self.config.io_timeout)
        async with self._end_lock:
            await self._exec(self.load_state, head, data)

    async def _on_state(self, stream: Stream) -> None:
        data = await stream.receive(CONTROL_BOUND, self.config.io_timeout)
        try:
            req = control_from_wire(data, StateRequest)
            if req.stage == self.index:
                head, body = await self._exec(self.snapshot)
            elif req.stage in self.backups:
                head, body = self.backups[req.stage]
            else:
                raise Refused(f"no state of stage {req.stage} here")
            if head.step < req.min_step:
                raise Refused(f"state of stage {req.stage} is at step {head.step}, not {req.min_step}")
        except ValueError as e:
            await stream.send(control_to_wire(ControlError(one_line(e))))
            return
        await send_state(stream, head, body)

    def _backup_bound(self, stage: int) -> int:
        if self.manifest is None or not 0 <= stage < len(self.manifest.shards) or stage == self.index:
            raise Refused(f"no backups of stage {stage} taken here")
        return 4 * self.manifest.shards[stage].size + (1 << 20)

    async def _on_backup(self, stream: Stream) -> None:
        try:
            head = control_from_wire(await stream.receive(CONTROL_BOUND, self.config.io_timeout), StateHead)
            data = await receive_body(stream, head, self._backup_bound(head.stage), self.config.io_timeout)
            held = self.backups.get(head.stage)
            if held is None or held[0].step <= head.step:
                self.backups[head.stage] = (head, data)
            ack = BackupAck(True, "")
        except ValueError as e:
            ack = BackupAck(False, one_line(e))
        await stream.send(control_to_wire(ack))
        if ack.ok and self.dht is not None:
            await self._announce(self.dht)

    async def _push_backup(self, target: str) -> bool:
        head, data = await self._exec(self.snapshot)
        try:
            async with asyncio.timeout(self.config.io_timeout), open_stream(
                    self.p2p, target, pipe_protocol(self.config.swarm, self.pipeline_id, "backup")) as stream:
                await send_state(stream, head, data)
                ack = control_from_wire(await stream.receive(CONTROL_BOUND), BackupAck)
            if not ack.ok:
                logger.warning("backup to %s refused: %s", target[-8:], ack.reason)
            return ack.ok
        except Exception as e:
            logger.warning("backup to %s failed: %s: %s", target[-8:], type(e).__name__, e)
            return False


__all__ = ["StageHost"]
