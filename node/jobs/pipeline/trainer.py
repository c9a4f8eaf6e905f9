"""Pipeline training: a trainer routes micro-batches through one replica per stage and ends each step.

    trainer = PipelineTrainer(p2p, dht, "job1", shard_dir, TrainerConfig(swarm="s", micro_batch_size=4))
    report = await trainer.step(x, y)      # x, y: int64 (B, T) token ids and next tokens
    logits = await trainer.forward(x)      # (B, T, V), forward only
    # report.loss, .micro_batches, .retries, .seconds, .stages[i].committed, .stage_busy[i] (s of hops answered)

One step (SWARM parallelism, Ryabinin et al. 2023, with top-k averaging inside each stage):
  1. the batch is cut into micro-batches along B; each goes forward through one replica per stage, chosen at
     random weighted by the replicas' announced throughput; the trainer computes the causal-LM loss (mean
     cross-entropy of logits[:, t] against y[:, t]) on the last stage's logits and sends d loss / d logits
     back through the same replicas in reverse;
  2. the trainer commits the micro-batch on each replica of its path (node/jobs/pipeline/stage_host.py: the gradient
     moves from the micro-batch's pending slot into the step's accumulator);
  3. once every micro-batch is counted at every stage, it asks every replica for its status and sends each
     replica of each stage end_step naming the micro-batches counted there; the replicas of a stage average
     their gradients (protocol/allreduce/averager.py) and take the same optimizer step.

Why it is built this way -- the races it handles (the host's side is in node/jobs/pipeline/stage_host.py):
  * A replica fails at a hop (timeout, hang-up, ErrorReply): the micro-batch is retried from the start with a
    NEW micro-batch id on other replicas (the failed one is excluded for the step), so a late reply of the
    failed attempt cannot be mistaken for the retry's (replies carry the id and are checked).
  * A replica dies after some micro-batches were committed on it: its accumulator dies with it. Every
    micro-batch counted there has that stage put back on its to-count list and runs again; the rerun is
    committed only at the stages that still need it (its other pending slots are never committed and are
    dropped at the step end), so each micro-batch counts exactly once per stage.
  * A commit whose reply is lost (the replica may or may not have added it): the replica is treated as failed
    for the step and its commits uncounted; end_step then names the micro-batches the trainer counts there, so
    a replica holding anything else discards its accumulator and joins the average with zero weight --
    every live replica still applies the same average.
  * A replica frozen or killed just before the step end: the status round before end_step finds it; its
    micro-batches are rerun elsewhere before any replica averages.
  * A replica dying during the averaging round: the round's own commit protocol keeps the survivors
    bit-identical; that stage's step counts fewer micro-batches (EndStepReply.weight says how many), or, if the
    round found no group, applies nothing and keeps the survivors' gradients in their error feedback.
  * A replica that failed once but lives (slow, partitioned): skipped until it heartbeats again; a replica
    that missed a step end (behind; or one that was ready only after the first step began) reloads the step's
    state from a live replica of its stage during the status round and takes part in that step's end.
  * No live replica of a stage (the last one died): a hop waits up to ``replica_wait`` seconds for one to appear
    in the DHT (a takeover: node/devtools/stage_peer.py, or the daemon's reassignment in
    node/jobs/pipeline/pipeline_jobs.py), then the step fails. A stage whose only live replicas failed earlier in
    the step (a transient error, or a host that moved there from another stage) fails the step at once instead.
  * A failed step is retried by the caller with new micro-batch ids; before the retry every replica is told to
    Discard what the abandoned attempt committed there, so a single replica holding those commits is not
    failed by every later status round (it would wedge the pipeline). Their replies also give each replica's
    step: a stage none of whose replicas or backups is at the trainer's step (its last replica at that step
    died after the other stages ended it but before its state was backed up, and the new host loaded an older
    backup; or its only replica failed its step end) has its most advanced replicas Advance to the trainer's
    step once every replica record of the stage answers -- that stage loses those updates, the job goes on.
  * The direct data path (protocol/pipeline/direct.py; p2pd's relay costs ~8 ms per 1 MiB hop): a hop goes over a
    persistent TCP connection to the replica, in a session the replica handed out over the authenticated libp2p
    control stream (DirectOpen -> DirectOffer), at an address the libp2p connection to that peer uses. A direct
    failure before a reply (no session, connect refused or timed out, hang-up, a frame refused either way) sends
    the same request over libp2p within the hop's time, and that replica is reached over libp2p only for
    ``direct_retry`` seconds. The request keeps its micro-batch id: a replica that did serve the direct copy
    refuses the second one ("already forwarded"), which fails the hop as any ErrorReply does, so the attempt
    is retried with a new id as above -- nothing is counted twice. A direct hop that times out fails the hop.
    A connection serves one request at a time; the trainer keeps a pool per replica (at most ``max_inflight``
    busy at once), and returns a connection to it only after a complete reply.
  * Replicas of a stage disagreeing after a step (a partitioned averaging round): the trainer compares their
    parameter hashes and tells the minority to resync from the majority.

The messages between trainer, hosts and backup holders (Status, Commit, EndStep, Resync, Discard, state transfer, the
DHT member records) and the protocol names are in protocol/pipeline/control.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass, field

import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from node.jobs.pipeline.direct_client import DirectFailure, DirectPool
from node.jobs.pipeline.steps import HopError, PipelineError, StageStep, StepReport, TrainerConfig, causal_lm_loss
from node.ml.splitter import read_manifest
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.pipeline.activations import (
    FLOAT_DTYPES,
    BackwardReply,
    BackwardRequest,
    ErrorReply,
    ExpectedTensor,
    ForwardReply,
    ForwardRequest,
    activation_from_wire,
    activation_to_wire,
    max_frame_bytes,
    new_micro_batch_id,
)
from protocol.pipeline.control import (
    CONTROL_BOUND,
    Advance,
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
    Status,
    StatusReply,
    check_peer_id,
    control_from_wire,
    control_to_wire,
    member_record_from_wire,
    one_line,
    stage_key,
    stage_protocol,
)
from protocol.streams import request

logger = logging.getLogger(__name__)
CAUSAL_LMS = ("GPT2LMHeadModel", "LlamaForCausalLM")
REALIGN_BACKOFF_S = 30.0  # a replica that failed to catch up is not asked again (nor waited for) for this long


# ---- the trainer -------------------------------------------------------------------------------------------

@dataclass
class _Micro:
    """One logical micro-batch of the step and the stages at which it is not counted yet."""

    index: int
    x: torch.Tensor  # (b, T) int64
    y: torch.Tensor  # (b, T) int64
    needs: set[int]
    loss: float | None = None
    attempts: int = 0


@dataclass
class _Step:
    micros: list[_Micro]
    failed: set[str] = field(default_factory=set)  # replicas excluded for the rest of the step
    commits: dict[str, dict[int, int]] = field(default_factory=dict)  # replica -> {attempt id: micro index}
    stage_of: dict[str, int] = field(default_factory=dict)
    alive: dict[int, list[str]] = field(default_factory=dict)  # per stage, after the status round
    retries: int = 0


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first leaf exception of a (possibly nested) exception group."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


class PipelineTrainer:
    """Drives the stage replicas of one pipeline (see the module docstring). ``replicas`` (stage -> peer ids)
    replaces the DHT lookup, for tests; otherwise replicas are read from the records their hosts keep."""

    def __init__(self, p2p: P2P, dht: DHTNode | None, pipeline_id: str, stages_directory,
                 config: TrainerConfig | None = None, replicas: dict[int, list[str]] | None = None,
                 trusted_signers=None, clock: Clock = SYSTEM_CLOCK):
        config = TrainerConfig() if config is None else config
        self.p2p, self.dht, self.pipeline_id, self.config, self.clock = p2p, dht, pipeline_id, config, clock
        self.device = torch.device(config.device)  # the loss on the logits; everything on the wire is CPU float32
        self.manifest = read_manifest(stages_directory, trusted_signers=trusted_signers)
        if self.manifest.arch not in CAUSAL_LMS:
            raise ValueError(f"pipeline training takes a causal LM ({', '.join(CAUSAL_LMS)}), not {self.manifest.arch}")
        if self.manifest.tied and len(self.manifest.shards) > 1:  # copies in two stages would need their grads summed
            tie = self.manifest.tied[0]
            raise ValueError(f"tied weights across stages ({tie.target} = {tie.source}); split a model built with "
                             "tie_word_embeddings=False for pipeline training")
        if dht is None and replicas is None:
            raise ValueError("pass a DHT node or an explicit replicas map")
        cfg = self.manifest.config
        self.num_stages = len(self.manifest.shards)
        self.hidden = int(cfg.get("n_embd") or cfg["hidden_size"])
        self.vocab = int(cfg["vocab_size"])
        self._explicit = None if replicas is None else {int(k): list(v) for k, v in replicas.items()}
        self._records: dict[int, dict[str, MemberRecord]] = {}
        self._backups: dict[int, dict[str, MemberRecord]] = {}  # per stage: peers holding a backup of its state
        self._realign_after: dict[str, float] = {}  # replica -> clock.monotonic() before which no catch-up is tried
        self._dead: dict[str, float] = {}  # replica -> clock.time() it last failed (skipped until it beats again)
        self._rng = random.Random(config.seed)
        self._abandoned: int | None = None  # a step whose attempt failed: its commits are discarded before a retry
        self.step_no: int | None = None  # the step being trained; learned from the replicas on first use
        self.direct = DirectPool(p2p, lambda peer, stage: self._control(peer, stage, DirectOpen(), DirectOffer),
                                 config.direct_retry, config.direct_connect_timeout, clock)
        self.hops: collections.Counter[str] = collections.Counter()  # "direct" / "libp2p": hops answered over each path
        self.stage_busy = [0.0] * self.num_stages  # this step's seconds of answered hops per stage (StepReport)

    # ---- replicas ------------------------------------------------------------------------------------------

    async def _refresh(self, stage: int) -> None:
        if self._explicit is not None:
            self._records[stage] = {p: MemberRecord("replica", 1.0, 0, 0.0) for p in self._explicit.get(stage, [])}
            return
        if self.dht is None:  # __init__ requires one when no explicit replicas map is given
            raise RuntimeError("no DHT node to read the replica records from")
        found = await self.dht.get(stage_key(self.config.swarm, self.pipeline_id, stage), latest=True)
        records: dict[str, MemberRecord] = {}
        backups: dict[str, MemberRecord] = {}
        if found is not None and isinstance(found.value, dict):
            for peer, item in found.value.items():
                try:
                    rec = member_record_from_wire(item.value)
                    if rec.role in ("replica", "backup"):
                        (records if rec.role == "replica" else backups)[check_peer_id(peer, "subkey")] = rec
                except ValueError as e:
                    logger.debug("ignoring the record of %r: %s", peer, e)
        self._records[stage], self._backups[stage] = records, backups

    def _usable(self, peer: str, rec: MemberRecord) -> bool:
        """Not known to have failed, or heartbeating since (explicit lists have no heartbeats: tried each step)."""
        return peer not in self._dead or self._explicit is not None or rec.beat > self._dead[peer]

    async def _choose(self, stage: int, st: _Step) -> str:
        deadline = self.clock.monotonic() + self.config.replica_wait
        while True:
            cands = {p: r for p, r in self._records.get(stage, {}).items() if p not in st.failed and self._usable(p, r)}
            if cands:
                peers = sorted(cands)
                peer = self._rng.choices(peers, weights=[max(cands[p].throughput, 1e-6) for p in peers])[0]
                st.stage_of[peer] = stage
                return peer
            excluded = [p for p, r in self._records.get(stage, {}).items() if p in st.failed and self._usable(p, r)]
            if excluded:  # alive (beating since it failed) but out of this step: the retried step may use it
                raise PipelineError(f"stage {stage}: its live replicas {[p[-8:] for p in excluded]} failed earlier "
                                    f"in step {self.step_no}")
            if self.clock.monotonic() > deadline:
                raise PipelineError(f"no live replica of stage {stage} within {self.config.replica_wait:g} s")
            await self.clock.sleep(0.25)
            await self._refresh(stage)

    async def replicas(self, stage: int) -> list[str]:
        """The peers currently listed as replicas of ``stage`` (DHT records or the explicit map)."""
        await self._refresh(stage)
        return sorted(self._records.get(stage, {}))

    # ---- one request ---------------------------------------------------------------------------------------

    async def _exchange(self, peer: str, protocol: str, data: bytes, bound: int, timeout: float) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await request(self.p2p, peer, protocol, data, bound)
        except TimeoutError:
            raise HopError(peer, f"no reply within {timeout:g} s") from None
        except Exception as e:  # hang-ups, p2pd "peer unreachable", oversized replies
            raise HopError(peer, f"{type(e).__name__}: {one_line(e)}") from None

    async def _request(self, peer: str, stage: int, kind: str, data: bytes, bound: int) -> bytes:
        """The reply frame to one forward/backward request frame: over the direct path when the replica offers
        one (and it has not failed lately), else -- or after a direct failure, in the time left -- over libp2p."""
        timeout = self.config.hop_timeout
        loop = asyncio.get_running_loop()  # the hop's own time budget is the network's (the loop's clock)
        if self.config.direct and self.direct.usable(peer):
            t0 = loop.time()
            try:
                async with asyncio.timeout(timeout):
                    raw = await self.direct.exchange(peer, stage, kind, data, bound)
                self.hops["direct"] += 1
                return raw
            except TimeoutError:
                self.direct.failed(peer, f"no reply within {timeout:g} s")
                raise HopError(peer, f"no reply within {timeout:g} s (direct path)") from None
            except DirectFailure as e:
                self.direct.failed(peer, str(e))
                timeout = max(timeout - (loop.time() - t0), 0.001)
        raw = await self._exchange(peer, stage_protocol(self.config.swarm, self.pipeline_id, stage, kind), data,
                                   bound, timeout)
        self.hops["libp2p"] += 1
        return raw

    async def close(self) -> None:
        """Close the direct connections (idle ones; a hop in flight closes its own when it ends)."""
        self.direct.close()

    async def _hop(self, peer: str, stage: int, kind: str, msg, expect_type, expect: ExpectedTensor | None, mb: int):
        t0, frame = time.perf_counter(), activation_to_wire(msg, self.config.wire_dtype)
        raw = await self._request(peer, stage, kind, frame, max_frame_bytes(expect))
        try:
            reply = activation_from_wire(raw, expect_type, expect, micro_batch=mb)
        except ValueError as e:
            raise HopError(peer, f"bad {kind} reply: {e}") from None
        if isinstance(reply, ErrorReply):
            raise HopError(peer, reply.reason)
        self.stage_busy[stage] += time.perf_counter() - t0
        return reply

    async def _control(self, peer: str, stage: int, msg, expect: type, timeout: float | None = None):
        raw = await self._exchange(peer, stage_protocol(self.config.swarm, self.pipeline_id, stage, "control"),
                                   control_to_wire(msg), CONTROL_BOUND, timeout or self.config.hop_timeout)
        try:
            reply = control_from_wire(raw, (expect, ControlError))
        except ValueError as e:
            raise HopError(peer, f"bad control reply: {e}") from None
        if isinstance(reply, ControlError):
            raise HopError(peer, reply.reason)
        return reply

    # ---- one attempt of one micro-batch ----------------------------------------------------------------------

    async def _forward_path(self, path: list[str], mb: int, x: torch.Tensor, train: bool = True) -> torch.Tensor:
        b, t = x.shape
        h = x
        for stage, peer in enumerate(path):
            width = self.vocab if stage == self.num_stages - 1 else self.hidden
            expect = ExpectedTensor(FLOAT_DTYPES, (b, t, width), "float32")
            request = ForwardRequest(self.pipeline_id, stage, mb, self._step_no(), h, train)
            h = (await self._hop(peer, stage, "forward", request, ForwardReply, expect, mb)).tensor
        return h  # (b, T, V) logits

    async def _backward_path(self, path: list[str], mb: int, grad: torch.Tensor) -> None:
        b, t = grad.shape[:2]
        for stage in reversed(range(len(path))):
            expect = None if stage == 0 else ExpectedTensor(FLOAT_DTYPES, (b, t, self.hidden), "float32")
            grad = (await self._hop(path[stage], stage, "backward", BackwardRequest(mb, grad), BackwardReply, expect,
                                    mb)).grad

    async def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids x (B, T): one evaluation pass (the hosts keep nothing for a backward)
        through one replica per stage, no retries."""
        await self._ensure_step()
        st = _Step([])
        for s in range(self.num_stages):
            await self._refresh(s)
        path = [await self._choose(s, st) for s in range(self.num_stages)]
        return await self._forward_path(path, new_micro_batch_id(), x, train=False)

    # ---- a step --------------------------------------------------------------------------------------------

    def _step_no(self) -> int:
        if self.step_no is None:  # _ensure_step sets it before any step's work
            raise RuntimeError("the trainer does not know the replicas' step yet")
        return self.step_no

    async def _ensure_step(self) -> None:
        """Learn the step the replicas are at (a restarted trainer resumes where they are)."""
        if self.step_no is not None:
            return
        steps = []
        for stage in range(self.num_stages):
            for peer in await self.replicas(stage):
                try:
                    steps.append((await self._control(peer, stage, Status(0), StatusReply)).step)
                except HopError as e:
                    logger.info("status of %s: %s", peer[-8:], e.reason)
        self.step_no = max(steps, default=0)

    def _fail(self, st: _Step, peer: str, reason: str) -> None:
        """Exclude ``peer`` for the step and uncount its commits: those micro-batches run again for its stage."""
        if peer not in st.failed:
            logger.info("step %s: replica %s failed: %s", self.step_no, peer[-8:], reason)
        st.failed.add(peer)
        self._dead[peer] = self.clock.time()
        lost = st.commits.pop(peer, {})
        for index in lost.values():
            st.micros[index].needs.add(st.stage_of[peer])
        st.retries += len(lost)

    async def _run_micro(self, st: _Step, m: _Micro, limit: asyncio.Semaphore) -> None:
        async with limit:
            while m.needs:
                if m.attempts >= self.config.max_attempts:
                    raise PipelineError(f"step {self.step_no}: micro-batch {m.index} failed {m.attempts} attempts")
                m.attempts += 1
                path = [await self._choose(s, st) for s in range(self.num_stages)]
                mb = new_micro_batch_id()  # a fresh id per attempt: a late reply of an old one cannot pass
                try:
                    logits = (await self._forward_path(path, mb, m.x)).to(self.device).requires_grad_(True)
                    loss = causal_lm_loss(logits, m.y.to(self.device))
                    loss.backward()
                    if logits.grad is None:  # set by loss.backward(): logits is a leaf that requires grad
                        raise RuntimeError("no gradient of the loss with respect to the logits")
                    await self._backward_path(path, mb, logits.grad.cpu())
                except HopError as e:
                    self._fail(st, e.peer, e.reason)
                    st.retries += 1
                    continue
                if m.loss is None:
                    m.loss = loss.detach().item()
                stages = sorted(m.needs)  # commit only where this micro-batch is not counted yet
                results = await asyncio.gather(*(self._control(path[s], s, Commit(self._step_no(), (mb,)), CommitReply)
                                                 for s in stages), return_exceptions=True)
                for s, res in zip(stages, results):
                    peer = path[s]
                    if peer in st.failed:  # failed meanwhile: what it holds is not counted
                        continue
                    if isinstance(res, CommitReply) and mb in res.committed:
                        st.commits.setdefault(peer, {})[mb] = m.index
                        m.needs.discard(s)
                    else:
                        self._fail(st, peer, getattr(res, "reason", None) or f"commit not acknowledged: {res!r:.80}")

    async def _status_round(self, st: _Step) -> None:
        """Ask every replica for its status: the live ones form each stage's group; one that does not answer, is at
        another step, or holds another number of commits than the trainer counts is failed (its micro-batches
        rerun); one behind the trainer's step reloads it (_realign) and joins the group with nothing committed."""
        for stage in range(self.num_stages):
            await self._refresh(stage)
            records = self._records.get(stage, {})
            peers = sorted({p for p, rec in records.items() if p in st.failed or self._usable(p, rec)}
                           | {p for p in st.commits if st.stage_of[p] == stage})  # (even if its record lapsed)
            results = await asyncio.gather(*(self._control(p, stage, Status(self._step_no()), StatusReply)
                                             for p in peers), return_exceptions=True)
            st.alive[stage], behind = [], []
            for peer, res in zip(peers, results):
                st.stage_of[peer] = stage
                if not isinstance(res, StatusReply):
                    self._fail(st, peer, getattr(res, "reason", repr(res)))
                elif res.step != self.step_no:
                    self._fail(st, peer, f"at step {res.step}, the trainer at {self.step_no}")
                    if res.step < self._step_no():
                        behind.append((peer, res.step))
                else:
                    if peer not in st.failed and res.committed != len(st.commits.get(peer, {})):
                        self._fail(st, peer, f"holds {res.committed} commits, the trainer counts "
                                             f"{len(st.commits.get(peer, {}))}")
                    st.alive[stage].append(peer)  # alive: it must average (with nothing, if failed) and step
                    self._dead.pop(peer, None)
            if behind and st.alive[stage]:
                steps = {p: self._step_no() for p in st.alive[stage]} | {p: step for p, step in behind}
                for peer in await self._realign(stage, steps):  # reloaded: nothing held, may serve reruns
                    st.alive[stage].append(peer)
                    st.failed.discard(peer)
                    self._dead.pop(peer, None)
                st.alive[stage].sort()

    async def _realign(self, stage: int, steps: dict[str, int], may_advance: bool = False) -> list[str]:
        """Bring the replicas of ``stage`` whose reported ``steps`` are behind the trainer's to its step; return
        those that now are. They reload the state at the trainer's step (Resync) from a replica that has it, or
        else from a backup holder that announces it: a replica that missed a step end (slow, partitioned, or ready
        only after the job's first step began) -- reloading in the background instead, one whose load takes
        longer than a step would stay behind for good. With no such state anywhere (the stage's last replica at
        that step died, or failed its step end, before its state was backed up) and ``may_advance`` (every
        replica record of the stage answered), the most advanced ones skip to the trainer's step (Advance: the
        stage loses the updates in between) and the others reload from them. A replica that fails to catch up is
        left alone for REALIGN_BACKOFF_S (the step ends without it)."""
        now = self.clock.monotonic()
        behind = sorted(p for p, step in steps.items()
                        if step < self._step_no() and self._realign_after.get(p, 0) <= now)
        at = sorted(p for p, step in steps.items() if step == self.step_no)
        if not behind:
            return []
        done = []
        backups = sorted((-rec.beat, p) for p, rec in self._backups.get(stage, {}).items() if rec.step == self.step_no)
        source = at[0] if at else backups[0][1] if backups else None
        if source is None:
            if not may_advance:
                return []
            newest = max(steps[p] for p in behind)
            leaders = [p for p in behind if steps[p] == newest]
            replies = await asyncio.gather(*(self._control(p, stage, Advance(self._step_no()), StatusReply,
                                                           self.config.end_step_timeout) for p in leaders),
                                           return_exceptions=True)
            at = [p for p, res in zip(leaders, replies) if isinstance(res, StatusReply) and res.step == self.step_no]
            logger.info("step %d: no replica or backup of stage %d at the trainer's step; told %s at step %d to "
                        "advance to it", self.step_no, stage, [p[-8:] for p in leaders], newest)
            done, behind = list(at), [p for p in behind if p not in leaders]
            if not at:
                return []
            source = at[0]
        replies = await asyncio.gather(*(self._control(p, stage, Resync(self._step_no(), source), StatusReply,
                                                       self.config.end_step_timeout) for p in behind),
                                       return_exceptions=True)
        for peer, res in zip(behind, replies):
            if isinstance(res, StatusReply) and res.step == self.step_no and res.committed == 0:
                logger.info("step %d: replica %s (stage %d) caught up from %s", self.step_no, peer[-8:], stage,
                            source[-8:])
                done.append(peer)
                self._realign_after.pop(peer, None)
            else:
                logger.info("step %d: replica %s (stage %d) could not catch up from %s: %s", self.step_no, peer[-8:],
                            stage, source[-8:], getattr(res, "reason", None) or repr(res)[:120])
                self._realign_after[peer] = self.clock.monotonic() + REALIGN_BACKOFF_S
        return done

    async def accumulate(self, x: torch.Tensor, y: torch.Tensor) -> _Step:
        """Forward, backward and commit every micro-batch of (x, y) until each is counted once at every stage."""
        if x.dtype != torch.long or x.dim() != 2 or x.shape != y.shape or y.dtype != torch.long:
            raise ValueError(f"x and y must be int64 (B, T) of one shape, got {x.dtype} {tuple(x.shape)} and "
                             f"{y.dtype} {tuple(y.shape)}")
        n = self.config.micro_batch_size
        if x.shape[0] % n:  # equal micro-batches: the mean of their mean losses is the batch's mean loss
            raise ValueError(f"batch of {x.shape[0]} rows does not split into micro-batches of {n}")
        await self._ensure_step()
        for s in range(self.num_stages):
            await self._refresh(s)
        if self._abandoned is not None and self._abandoned == self.step_no:
            await self._discard_abandoned()
        st = _Step([_Micro(i, x[j:j + n], y[j:j + n], set(range(self.num_stages)))
                    for i, j in enumerate(range(0, x.shape[0], n))])
        limit = asyncio.Semaphore(self.config.max_inflight)
        while True:
            todo = [m for m in st.micros if m.needs]
            if todo:
                try:
                    async with asyncio.TaskGroup() as tg:  # one micro-batch out of attempts cancels the others
                        for m in todo:
                            tg.create_task(self._run_micro(st, m, limit))
                except* PipelineError as group:
                    raise _first(group) from None
                continue
            await self._status_round(st)
            if not any(m.needs for m in st.micros):
                return st

    async def _discard_abandoned(self) -> None:
        """Every replica drops the commits of the attempt at this step that failed (their ids are not the
        retry's; a single replica holding them would otherwise be failed by every status round); replicas its
        replies show behind the trainer's step are brought to it (_realign) -- a failed attempt is how the
        trainer learns that a stage's only replicas missed a step end."""
        peers = [(s, p) for s in range(self.num_stages) for p in self._records.get(s, {})]
        results = await asyncio.gather(*(self._control(p, s, Discard(self._step_no()), StatusReply)
                                         for s, p in peers), return_exceptions=True)
        steps: dict[int, dict[str, int]] = collections.defaultdict(dict)
        unknown = set()  # stages with a replica record that did not answer: alive or not, its step is unknown
        for (s, p), res in zip(peers, results):
            if isinstance(res, StatusReply):
                steps[s][p] = res.step
            else:
                unknown.add(s)
                logger.info("step %d: discarding the abandoned attempt on %s (stage %d) failed: %s", self.step_no,
                            p[-8:], s, getattr(res, "reason", res))
        for s, at in steps.items():
            for peer in await self._realign(s, at, may_advance=s not in unknown):
                self._dead.pop(peer, None)
        self._abandoned = None

    async def end_step(self, st: _Step) -> tuple[StageStep, ...]:
        """end_step on every live replica of every stage, at once; the step number moves on."""
        step, groups = self._step_no(), {s: tuple(st.alive[s]) for s in range(self.num_stages)}
        backup = bool(self.config.backup_every) and self.num_stages > 1 and step % self.config.backup_every == 0
        calls, keys = [], []
        for s, group in groups.items():
            if not group:
                self._abandoned = step
                raise PipelineError(f"step {step}: no live replica of stage {s} at the step end")
            target = groups[(s + 1) % self.num_stages]
            for peer in group:
                counted = () if peer in st.failed else tuple(sorted(st.commits.get(peer, {})))
                to = target[0] if backup and target and peer == group[0] else None
                calls.append(self._control(peer, s, EndStep(step, counted, group, to), EndStepReply,
                                           self.config.end_step_timeout))
                keys.append((s, peer))
        results = await asyncio.gather(*calls, return_exceptions=True)
        self.step_no = step + 1
        out = []
        for s in range(self.num_stages):
            replies = {}
            for (stage, peer), res in zip(keys, results):
                if stage == s:
                    if not isinstance(res, EndStepReply):
                        logger.warning("step %d: end_step on %s (stage %d) failed: %s", step, peer[-8:], s, res)
                        self._dead[peer] = self.clock.time()
                    replies[peer] = res if isinstance(res, EndStepReply) else None
            got = {p: r for p, r in replies.items() if r is not None}
            counts = collections.Counter(r.params_hash for r in got.values())
            if len(counts) > 1:
                await self._resync_minority(s, got, counts)
            out.append(StageStep(s, replies, sum(r.committed for r in got.values()),
                                 bool(got) and all(r.applied for r in got.values()), len(counts) <= 1))
        return tuple(out)

    async def _resync_minority(self, stage: int, got: dict[str, EndStepReply], counts: collections.Counter) -> None:
        """Replicas whose parameters differ from the majority's (ties: the smallest hash) reload from one of it."""
        majority = min(counts, key=lambda h: (-counts[h], h))
        source = min(p for p, r in got.items() if r.params_hash == majority)
        for peer, r in got.items():
            if r.params_hash != majority:
                logger.warning("stage %d: replica %s diverged; resyncing it from %s", stage, peer[-8:], source[-8:])
                try:
                    await self._control(peer, stage, Resync(self._step_no(), source), StatusReply,
                                        self.config.end_step_timeout)
                except HopError as e:
                    logger.warning("resync of %s failed: %s", peer[-8:], e.reason)

    async def step(self, x: torch.Tensor, y: torch.Tensor) -> StepReport:
        """One optimizer step on the batch (x, y): see the module docstring."""
        t0, self.stage_busy = time.perf_counter(), [0.0] * self.num_stages
        try:
            st = await self.accumulate(x, y)
        except PipelineError:
            self._abandoned = self.step_no
            raise
        step = self._step_no()
        stages = await self.end_step(st)
        losses = [m.loss for m in st.micros if m.loss is not None]
        if len(losses) != len(st.micros):  # each was counted: it went forward and backward once at least
            raise RuntimeError(f"step {step}: a counted micro-batch has no loss")
        return StepReport(step, sum(losses) / len(losses), len(st.micros), st.retries, time.perf_counter() - t0, stages,
                          tuple(self.stage_busy))


__all__ = ["CAUSAL_LMS", "PipelineTrainer"]
