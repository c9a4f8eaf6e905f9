"""What a stage replica runs with: StageConfig (every replica of a stage uses the same) and its hook points.

    host = StageHost(p2p, dht, "job1", 1, stage, StageConfig(swarm="s", optimizer="adamw", lr=1e-3))
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from node.jobs.pipeline.stage_state import OPTIMIZERS
from node.runtime.device import check_precision_name
from protocol.allreduce.sparsify import check_density
from protocol.pipeline.control import EndStepReply


@dataclass(frozen=True)
class StageConfig:
    swarm: str = "swarmnode"
    optimizer: str = "adamw"  # "sgd" | "adamw"; every replica of a stage must use the same settings
    lr: float = 1e-3
    momentum: float = 0.0  # sgd
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8
    density: float = 0.01  # top-k fraction of the stage's gradient each replica sends per step
    value_codec: str = "fp16"  # gradient values in the averaging round ("fp32": exact)
    wire_dtype: str | None = None  # activations/gradients sent back as float16/bfloat16
    precision: str = "fp32"  # autocast of forward/backward on the node's device (node/jobs/pipeline/stage_device.py)
    max_batch: int = 64  # the largest micro-batch accepted
    max_seq: int | None = None  # default: the model's position count
    max_inflight: int = 256  # activations + pending slots held at once
    activation_ttl: float = 300.0
    throughput: float = 1.0  # announced routing weight (micro-batches/s this replica offers)
    heartbeat: float = 2.0
    ttl: float = 6.0
    io_timeout: float = 30.0  # reading one request, pushing one backup
    matchmaking_time: float = 3.0
    part_timeout: float = 10.0
    result_timeout: float = 20.0
    commit_timeout: float = 3.0
    # The direct data path (protocol/pipeline/direct.py): forward/backward frames over a plain TCP listener, encrypted
    # and authenticated with a key handed out over libp2p. False: every hop goes through libp2p streams only.
    direct: bool = True
    direct_host: str | None = None  # the address to listen on; default: the IP of the libp2p listen address
    direct_sessions: int = 256  # offered sessions not yet used by a connection, at most (the oldest dropped)
    direct_session_ttl: float = 60.0  # an offered session must be used within this many seconds
    direct_idle: float = 600.0  # a direct connection with no request for this long is closed
    direct_connections: int = 1024  # open direct connections at most (a new one beyond is closed at once)

    def optimizer_for(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """This stage's optimizer over ``params`` (foreach=False: the same float order on every replica)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   foreach=False)
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                                 foreach=False)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")
        check_density(self.density)
        check_precision_name(self.precision)
        if self.max_batch < 1 or self.max_inflight < 1 or min(self.heartbeat, self.ttl, self.io_timeout) <= 0:
            raise ValueError("max_batch, max_inflight, heartbeat, ttl and io_timeout must be positive")


@dataclass
class StageHooks:
    """Hook points (tests, node/devtools/stage_peer.py): ``before(kind, step, n)`` runs before the n-th (from 1)
    forward / backward / end_step of a step is served (a fault hook may freeze the process there); ``after_step``
    receives every end_step reply."""

    before: Callable[[str, int, int], Awaitable[None]] | None = None
    after_step: Callable[[EndStepReply], None] | None = None
