"""One node's side of a federated round: local steps on its own data, the pseudo-gradient, the outer step.

Round r on node i, every participant starting from the same global parameters theta_r (checked by hash):

    theta_i   = local_train(theta_r)              inner optimizer, local_steps minibatches of the node's data
    delta_i   = theta_r - theta_i                 the pseudo-gradient: the only thing that leaves the node,
                                                  top-k compressed with error feedback
    delta_bar = sum_i w_i delta_i / sum_i w_i     the top-k all-reduce (protocol/allreduce/averager.py), w_i = samples
    theta_r+1 = outer_step(theta_r, delta_bar)    FedAvg (McMahan et al. 2017): theta_r - lr * delta_bar,
                                                  lr 1 = the weighted mean of the local models;
                                                  DiLoCo (Douillard et al. 2023): SGD with Nesterov momentum
                                                  on delta_bar (their setting: lr 0.7, momentum 0.9)

The outer step is plain float32 numpy in a fixed order, so every participant that applies the same
delta_bar (bit-identical by the all-reduce's construction) to the same theta_r and the same momentum
buffer gets bit-identical theta_r+1. The inner optimizer's state stays on the node (as in DiLoCo).

The local steps run on the node's device (node/runtime/device.py: --device) under autocast in the job's
precision, with a GradScaler for fp16 (a step whose scaled gradient overflows is skipped, the scale halves; the
pseudo-gradient is still theta_r minus whatever parameters the steps left). Parameters stay float32 on the device
and come back as CPU float32 numpy, so theta_i, delta_i and everything after are the same kind of vector on every
node, whatever device or precision each one trained with.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from node.ml.models import ModelBundle, flatten_params, load_flat_params
from node.runtime.device import autocast, check_precision, grad_scaler, to_device
from protocol.allreduce.sparsify import SparseUpdate

OUTER_KINDS = ("fedavg", "diloco")
INNER_KINDS = ("sgd", "adamw")


class OuterOptimizer:
    """The global step every participant applies identically; its momentum is part of the job's state."""

    def __init__(self, kind: str, size: int, lr: float = 1.0, momentum: float = 0.0, nesterov: bool = False):
        if kind not in OUTER_KINDS:
            raise ValueError(f"outer optimizer must be one of {OUTER_KINDS}, got {kind!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"outer lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.kind, self.size = kind, size
        self.lr, self.momentum, self.nesterov = np.float32(lr), np.float32(momentum), bool(nesterov)
        self.velocity = np.zeros(size, np.float32) if momentum > 0 else None  # (N,) float32

    def step(self, params: np.ndarray, pseudo_grad: SparseUpdate | np.ndarray) -> np.ndarray:
        """New parameters (N,) float32 from ``params`` and the averaged pseudo-gradient."""
        if params.dtype != np.float32 or params.shape != (self.size,):
            raise ValueError(f"params must be float32 ({self.size},), got {params.dtype} {params.shape}")
        g = pseudo_grad.to_dense() if isinstance(pseudo_grad, SparseUpdate) else pseudo_grad
        if g.dtype != np.float32 or g.shape != (self.size,):
            raise ValueError(f"pseudo-gradient must be float32 ({self.size},), got {g.dtype} {g.shape}")
        if self.velocity is None:
            return params - self.lr * g
        self.velocity *= self.momentum
        self.velocity += g
        direction = g + self.momentum * self.velocity if self.nesterov else self.velocity
        return params - self.lr * direction

    def state(self) -> np.ndarray | None:
        """What a joining node must download along with the parameters (a copy)."""
        return None if self.velocity is None else self.velocity.copy()

    def load_state(self, velocity: np.ndarray | None) -> None:
        if (velocity is None) != (self.velocity is None):
            raise ValueError("outer optimizer state does not match its momentum setting")
        if velocity is not None and self.velocity is not None:  # both or neither, as just checked
            if velocity.dtype != np.float32 or velocity.shape != (self.size,) or not np.isfinite(velocity).all():
                raise ValueError(f"outer momentum must be finite float32 ({self.size},)")
            self.velocity[...] = velocity


@dataclass(frozen=True)
class LocalResult:
    params: np.ndarray  # (N,) float32 after local training
    samples: int  # examples seen: the node's weight in the average
    mean_loss: float  # nan if any step's loss was not finite
    finite: bool  # False: the update must not be sent (the node re-syncs instead)
    stopped: bool = False  # the stop flag was set between two steps: nothing to send (job cancelled, node stopping)


def make_inner_optimizer(module: torch.nn.Module, kind: str, lr: float, momentum: float = 0.0,
                         weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"inner optimizer must be one of {INNER_KINDS}, got {kind!r}")


class LocalTrainer:
    """Runs the inner loop on this node's minibatches; the optimizer state persists across rounds. The module
    moves to ``device`` (its parameters in place, so ``optimizer`` keeps them); ValueError (one line) when the
    device cannot train at ``precision``."""

    def __init__(self, bundle: ModelBundle, optimizer: torch.optim.Optimizer, batches: Iterator,
                 device: torch.device | None = None, precision: str = "fp32"):
        self.device = torch.device("cpu") if device is None else device
        check_precision(self.device, precision)
        self.bundle, self.optimizer, self.batches, self.precision = bundle, optimizer, batches, precision
        bundle.module.to(self.device)
        self.scaler = grad_scaler(self.device, precision)  # fp16 only; its scale persists across rounds

    def run(self, params: np.ndarray, steps: int, stop: threading.Event | None = None) -> LocalResult:
        """``steps`` inner steps from ``params``; ``stop`` is checked before each step (set by another thread when
        the job is cancelled or the node stops): once set, the run returns at once with ``stopped``."""
        if steps < 1:
            raise ValueError(f"local steps must be >= 1, got {steps}")
        model = self.bundle.module
        load_flat_params(model, params)
        model.train()
        losses, samples = [], 0
        for _ in range(steps):
            if stop is not None and stop.is_set():
                return LocalResult(params, samples, float("nan"), False, stopped=True)
            batch = to_device(next(self.batches), self.device)
            with autocast(self.device, self.precision):
                loss = self.bundle.loss(model, batch)
            if not torch.isfinite(loss):
                return LocalResult(params, samples, float("nan"), False)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                self.optimizer.step()
            else:  # fp16: scaled backward; the step is skipped when a gradient overflowed
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            losses.append(loss.item())
            samples += int(batch[0].shape[0])
        new = flatten_params(model)
        finite = bool(np.isfinite(new).all())
        return LocalResult(new, samples, float(np.mean(losses)) if finite else float("nan"), finite)


def pseudo_gradient(start: np.ndarray, local: np.ndarray) -> np.ndarray:
    """theta_r - theta_i, (N,) float32: what the node contributes to the round."""
    if start.shape != local.shape or start.dtype != np.float32 or local.dtype != np.float32:
        raise ValueError("start and local parameters must be float32 vectors of one shape")
    return start - local
