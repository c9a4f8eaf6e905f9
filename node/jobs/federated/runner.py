"""One node's run of a federated job: its model replica, its private data, and the rounds it takes part in.

A round here is node/jobs/federated/local_training.py's math over protocol/allreduce/averager.py's top-k all-reduce:
local steps -> pseudo-gradient -> error-feedback top-k -> all-reduce (weight = samples seen) -> outer step.
Every participant applies the same aggregate (bit-identical by the round's construction) to the same
parameters, so the model hash after each round is the same on all of them.

A failed round changes no parameters and loses no update: the pseudo-gradient goes back into the
error-feedback buffer, and the next attempt from the same parameters sends it again instead of training
a second update from the same starting point (which would count that local work twice). How it failed
decides what comes next:
  * fewer than min_participants ready (``paused``): nobody ran the round, its id is tried again;
  * the group formed and failed (a member died mid-round): the survivors agree on it (the commit
    exchange), so all of them move to the next round id and stay in sync;
  * this node was left out of a round the others ran, or its loss was not finite: ``in_sync`` turns
    False and the daemon re-syncs it from a participant before it contributes again.

The daemon (job discovery, the control API, state download for joiners) drives this class; tests drive
it directly over real libp2p daemons.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from node.jobs.federated.local_training import LocalTrainer, OuterOptimizer, make_inner_optimizer, pseudo_gradient
from node.ml.datasets import NodeData, batches, eval_batches
from node.ml.job_model import build_job_model, data_misfit, job_model_config
from node.ml.models import flatten_params, load_flat_params
from node.runtime.device import autocast, to_device
from protocol.allreduce.averager import Averager
from protocol.allreduce.codecs import select_quantizer
from protocol.allreduce.messages import TensorSpec
from protocol.allreduce.robust import EXCLUDE_AFTER
from protocol.allreduce.rounds import RoundConfig, RoundHooks
from protocol.allreduce.sparsify import ErrorFeedbackSparsifier
from protocol.clock import SYSTEM_CLOCK, Clock
from protocol.records.job_records import MAX_REASON
from protocol.records.job_spec import JobSpec
from protocol.transfer.job_state import params_hash

logger = logging.getLogger(__name__)
EVAL_ITEMS = 2048  # test items per evaluation: all of digits' 450; an even sample of the text test split


@dataclass(frozen=True)
class RoundResult:
    round: int
    ok: bool  # the aggregate was applied
    error: str | None
    participants: tuple[str, ...]
    train_loss: float  # this node's mean local loss (nan if it did not train)
    samples: int
    metrics: dict  # evaluation on the shared test split (empty when not evaluated this round)
    bytes_sent: int
    bytes_received: int
    seconds: float
    local_seconds: float  # spent in local training: the rest is round overhead
    model_hash: str
    paused: bool = False  # fewer than min_participants were ready: the same round is tried again


class JobRunner:
    def __init__(self, p2p: P2P, dht: DHTNode, swarm: str, job_id: str, spec: JobSpec, data: NodeData,
                 expected_group: int | None = None, bandwidth: float = 12.5e6, hooks: RoundHooks | None = None,
                 after_round: Callable[[int, np.ndarray], None] | None = None, clock: Clock = SYSTEM_CLOCK,
                 device: torch.device | None = None):
        misfit = data_misfit(spec, job_model_config(spec), data)
        if misfit:
            raise ValueError(f"job {job_id}: {misfit}")
        self.data = data
        self.bundle = build_job_model(spec)  # sizes from the dataset's schema: the same model on every node
        inner = make_inner_optimizer(self.bundle.module, spec.inner.kind, spec.inner.lr, spec.inner.momentum,
                                     spec.inner.weight_decay)
        # each node draws its own minibatch order from its own slice
        # local steps and evaluation on this node's device, in the job's precision (ValueError if it cannot)
        trainer = LocalTrainer(self.bundle, inner, batches(data, spec.batch_size, spec.seed + data.node_index),
                               device, spec.precision)
        self._setup(p2p, dht, swarm, job_id, spec, flatten_params(self.bundle.module), trainer, expected_group,
                    bandwidth, hooks, after_round, clock)

    def _setup(self, p2p: P2P, dht: DHTNode, swarm: str, job_id: str, spec: JobSpec, params: np.ndarray, trainer,
               expected_group: int | None = None, bandwidth: float = 12.5e6, hooks: RoundHooks | None = None,
               after_round: Callable[[int, np.ndarray], None] | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        """What every runner holds, whoever does its local steps (``trainer``: LocalTrainer's run and device)."""
        self.job_id, self.spec, self.trainer = job_id, spec, trainer
        self.params = params  # (N,) float32, the global model at round start
        size = self.params.size
        self.sparsifier = ErrorFeedbackSparsifier(size, spec.density, "exact", seed=spec.seed)
        self.outer = OuterOptimizer(spec.outer.kind, size, spec.outer.lr, spec.outer.momentum, spec.outer.nesterov)
        tensor = TensorSpec(f"job-{job_id}", size)
        # a part's weight (samples seen) is capped at what the job allows one member per round
        self.averager = Averager(p2p, dht, RoundConfig.for_job(
            swarm, tensor, spec.round_timeout_s, spec.min_participants, spec.max_participants,
            expected_group=expected_group, bandwidth=bandwidth, aggregator=spec.aggregator,
            value_codec=spec.values, result_value_codec=spec.values,
            result_density=None if spec.result_density == 1.0 else spec.result_density,
            max_weight=float(spec.local_steps * spec.batch_size)), hooks, clock)
        self.strikes: dict[str, int] = {}  # member -> consecutive rounds with evidence against it
        self.excluded: dict[str, str] = {}  # member -> the evidence it was excluded on (the averager refuses it)
        self.in_sync = True
        self.after_round = after_round  # fault injection for tests: may modify the new parameters in place
        self._version = 0  # bumped whenever self.params changes
        self._hashed: tuple[int, str] = (-1, "")  # (version, sha256) of the last hashed parameters
        self._unsent: tuple[int, float, int] | None = None  # (samples, loss, params version) of an update
        #                                                     still in error feedback after a failed round
        self.completed = 0  # rounds applied
        self.next_round = 0  # the round id to run next (a failed round consumes its id)
        self._boundary_next = 0  # next_round as of the last round boundary (what snapshot() serves)
        self.idle = asyncio.Event()  # set between rounds: the state may be copied out
        self.idle.set()
        self.halted = threading.Event()  # set by halt(): local training stops at its next step, no update is sent

    def _weigh_evidence(self, r: int, members: tuple[str, ...], evidence: dict[str, str]) -> None:
        """Count each member's consecutive rounds with evidence against it; exclude it after EXCLUDE_AFTER."""
        for peer in members:
            if peer == self.averager.peer_id or peer in self.excluded:
                continue
            self.strikes[peer] = self.strikes.get(peer, 0) + 1 if peer in evidence else 0
            if self.strikes[peer] >= EXCLUDE_AFTER:
                self.excluded[peer] = f"rounds {r - EXCLUDE_AFTER + 1}-{r}: {evidence[peer]}"[:MAX_REASON]
                self.averager.excluded.add(peer)
                logger.warning("job %s: excluded member %s (%s)", self.job_id, peer, self.excluded[peer])

    def expect(self, group_size: int | None) -> None:
        """End matchmaking as soon as this many peers declared (else it waits its full window)."""
        self.averager.config = dataclasses.replace(self.averager.config, expected_group=group_size)

    @property
    def model_hash(self) -> str:
        if self._hashed[0] != self._version:
            self._hashed = (self._version, params_hash(self.params))
        return self._hashed[1]

    async def start(self) -> None:
        await self.averager.start()

    async def stop(self) -> None:
        self.halt()
        await self.averager.stop()

    def halt(self) -> None:
        """Stop for good (the job was cancelled, the node is stopping): local training, in its worker thread,
        returns before its next step, and a round not yet past its local steps sends nothing."""
        self.halted.set()

    def snapshot(self) -> tuple[np.ndarray, np.ndarray | None, int, int]:
        """The state as of the last round boundary, consistent at any moment (even mid-round, when
        ``next_round`` already names the running round): global model and outer momentum (copies), rounds
        completed, and the round id to run next."""
        return self.params.copy(), self.outer.state(), self.completed, self._boundary_next

    def align_round(self, next_round: int) -> None:
        """Between attempts of a paused round: move to a later id a paused peer with the same model tries."""
        if not self.idle.is_set():
            raise RuntimeError("align_round is for between rounds")
        if next_round > self.next_round:
            self.next_round = self._boundary_next = next_round

    def load_state(self, params: np.ndarray, momentum: np.ndarray | None, completed: int, next_round: int,
                   model_hash: str) -> None:
        """Adopt a participant's state (joining mid-job, or catching up after a round we missed)."""
        if params.dtype != np.float32 or params.shape != self.params.shape:
            raise ValueError(f"state has {params.size} parameters, this model {self.params.size}")
        if params_hash(params) != model_hash:
            raise ValueError("downloaded parameters do not match the announced model hash")
        self.outer.load_state(momentum)
        self.params = params.copy()
        self._version += 1
        self.completed, self.next_round, self.in_sync = completed, next_round, True
        self._boundary_next = next_round

    def evaluate(self) -> dict:
        load_flat_params(self.bundle.module, self.params)
        device = self.trainer.device
        with autocast(device, self.spec.precision):
            return self.bundle.evaluate(self.bundle.module, (to_device(b, device) for b in
                                                             eval_batches(self.data, 256, EVAL_ITEMS)))

    async def run_round(self) -> RoundResult:
        """Run round ``next_round``; on success the global model advances and ``completed`` counts it."""
        r = self.next_round
        self.next_round += 1
        self.idle.clear()
        try:
            result = await self._run_round(r)
        finally:
            self.idle.set()
        if result.ok:
            self.completed += 1
        elif result.paused:
            self.next_round = r  # nobody ran it: the same id again, so that paused members meet
        self._boundary_next = self.next_round
        return result

    async def _run_round(self, r: int) -> RoundResult:
        t0 = time.perf_counter()
        start = self.params
        if self._unsent is not None and self._unsent[2] == self._version:
            samples, loss, _ = self._unsent  # resend the update already in error feedback; do not train again
            delta, local_seconds = np.zeros_like(start), 0.0
        else:
            local = await asyncio.to_thread(self.trainer.run, start, self.spec.local_steps,  # keeps the loop serving
                                            self.halted)
            local_seconds = time.perf_counter() - t0
            if local.stopped or self.halted.is_set():  # halted mid-training: no update leaves this node
                return RoundResult(r, False, "halted: the job was cancelled or the node is stopping", (), float("nan"),
                                   0, {}, 0, 0, time.perf_counter() - t0, local_seconds, self.model_hash)
            samples, loss = local.samples, local.mean_loss
            if not local.finite:  # NaN/Inf loss: this node's update is not sent; it sits the round out
                logger.warning("job %s round %d: this node's local loss is not finite (%s): update withheld; "
                               "waiting for a participant to re-sync from", self.job_id, r, local.mean_loss)
                self.in_sync = False
                return RoundResult(r, False, "non-finite loss: update withheld, node must re-sync", (), loss,
                                   samples, {}, 0, 0, time.perf_counter() - t0, local_seconds, self.model_hash)
            delta = pseudo_gradient(start, local.params)  # (N,) float32
        select = lambda: self.sparsifier.select(delta, quantize=select_quantizer(self.spec.values))  # noqa: E731
        # the model hash in the round id: members holding different parameters never average together
        outcome = await self.averager.step(f"{self.job_id}/r{r}/{self.model_hash[:16]}", select, weight=float(samples))
        self.sparsifier.restore(outcome.returned)
        report = outcome.report
        self._weigh_evidence(r, report.members, report.evidence)
        if outcome.ok:
            if outcome.average is None:  # an ok round always applied an average (protocol/allreduce/averager.py)
                raise RuntimeError(f"round {r} of job {self.job_id} succeeded without an average")
            self.params = self.outer.step(start, outcome.average)
            if self.after_round is not None:
                self.after_round(r, self.params)
            self._version += 1
            self._unsent = None
        else:
            self._unsent = (samples, loss, self._version)
            # in a group that failed, the survivors agree (commit exchange); left out of a round, the others
            # may have applied it without us
            self.in_sync = bool(report.members) or report.no_group
        metrics = await asyncio.to_thread(self.evaluate) if outcome.ok and (r + 1) % self.spec.eval_every == 0 else {}
        return RoundResult(r, outcome.ok, report.error, report.members, loss, samples, metrics,
                           report.total_sent, report.total_received, time.perf_counter() - t0, local_seconds,
                           self.model_hash, paused=report.no_group)
