"""The vocabulary of a pipeline training step (node/jobs/pipeline/trainer.py): its settings, what it reports,
how it fails, and its loss.

    trainer = PipelineTrainer(p2p, dht, job_id, shard_dir, TrainerConfig(micro_batch_size=4))
    report: StepReport = await trainer.step(x, y)      # PipelineError if the step cannot complete
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from protocol.pipeline.control import EndStepReply


class PipelineError(RuntimeError):
    """A step could not complete (a micro-batch ran out of attempts, or a stage has no replica)."""


class HopError(Exception):
    """One request to one replica failed; the replica is excluded for the rest of the step."""

    def __init__(self, peer: str, reason: str):
        super().__init__(f"{peer[-8:]}: {reason}")
        self.peer, self.reason = peer, reason


@dataclass(frozen=True)
class TrainerConfig:
    swarm: str = "swarmnode"
    micro_batch_size: int = 4
    hop_timeout: float = 30.0  # one request and its reply (a forward or backward of one micro-batch)
    end_step_timeout: float = 120.0  # a stage's averaging round and optimizer step
    max_attempts: int = 4  # per micro-batch per step, the first try included
    max_inflight: int = 8  # micro-batches in the pipeline at once
    wire_dtype: str | None = None  # "float16" / "bfloat16": activations and gradients on the wire
    replica_wait: float = 60.0  # how long a hop waits for a replica of a stage to appear
    backup_every: int = 1  # push each stage's state to a replica of the next stage every N steps (0: never)
    seed: int = 0  # replica choice
    direct: bool = True  # hops over the replicas' direct TCP paths when offered (encrypted; see stage_host.py)
    direct_retry: float = 60.0  # after a direct failure, a replica is reached over libp2p only for this long
    direct_connect_timeout: float = 5.0  # opening a direct connection (a firewalled one falls back to libp2p)
    device: str = "cpu"  # where the trainer computes the loss and its gradient (the node's --device, resolved)

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.max_attempts < 1 or self.max_inflight < 1 or self.backup_every < 0:
            raise ValueError("micro_batch_size, max_attempts and max_inflight must be >= 1, backup_every >= 0")
        if min(self.hop_timeout, self.end_step_timeout, self.replica_wait) <= 0:
            raise ValueError("timeouts must be > 0")


@dataclass(frozen=True)
class StageStep:
    """One stage's end of a step: each live replica's reply (None: it did not answer)."""

    stage: int
    replies: dict[str, EndStepReply | None]
    committed: int  # micro-batches counted by the replicas (the trainer's count when all went well)
    applied: bool  # every replica that answered took the optimizer step
    in_sync: bool  # every replica that answered holds the same parameters

    @property
    def hashes(self) -> dict[str, str]:
        return {p: r.params_hash for p, r in self.replies.items() if r is not None}


@dataclass(frozen=True)
class StepReport:
    step: int
    loss: float  # mean over the step's micro-batches
    micro_batches: int
    retries: int  # failed attempts + reruns after a replica's commits were lost
    seconds: float
    stages: tuple[StageStep, ...]
    stage_busy: tuple[float, ...] = ()  # per stage: seconds from request to checked reply of its answered hops


def causal_lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (b, T, V) against next tokens y (b, T), as node/ml/models.py's bundle loss."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
