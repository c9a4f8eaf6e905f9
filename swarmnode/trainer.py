"""Federated training in one call, over swarmnode.Optimizer: your model, your data, the swarm's rounds.

    trainer = FederatedTrainer(MyNet(), swarm=swarm, run_id="churn", rounds=30, local_epochs=1, batch_size=32)
    history = trainer.train(train_data, validation_data)     # torch Datasets, or (inputs, targets) tensors
    history[-1]                                              # {"round": 30, "loss": ..., "accuracy": ...}

Each round every member trains ``local_epochs`` passes over its own data (or ``local_steps`` steps: the run's
setting, taken by a joiner from the run), the members' updates are averaged (FedAvg by default, ``outer=
"diloco"`` for DiLoCo) and every member evaluates the new model on its own validation data. ``loss_fn`` defaults
to cross-entropy (classification: ``accuracy`` is reported too); pass any ``loss_fn(outputs, targets)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from swarmnode.optimizer import Optimizer
from swarmnode.swarm import Swarm


def as_dataset(data: Dataset | tuple[torch.Tensor, torch.Tensor]) -> Dataset:
    if isinstance(data, tuple):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data) or len(data[0]) != len(data[1]):
            raise ValueError("data: a Dataset, or (inputs, targets) tensors of one length")
        return TensorDataset(*data)
    if not isinstance(data, Dataset):
        raise ValueError(f"data: a torch Dataset or (inputs, targets) tensors, got {type(data).__name__}")
    return data


class FederatedTrainer:
    def __init__(self, model: torch.nn.Module, *, swarm: Swarm, run_id: str, rounds: int = 100,
                 local_epochs: int = 1, local_steps: int | None = None, batch_size: int = 32, lr: float = 1e-3,
                 optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, outer: str = "fedavg",
                 device: str | torch.device = "cpu", seed: int = 0, **run: Any):
        """``optimizer``: a factory of your inner optimizer from the model's parameters (default AdamW at ``lr``);
        ``run``: more of Optimizer's settings (density, min_peers, round_timeout, aggregator, ...)."""
        self.model, self.swarm, self.run_id, self.rounds = model.to(device), swarm, run_id, rounds
        self.local_epochs, self.local_steps, self.batch_size = local_epochs, local_steps, batch_size
        self.make_optimizer = optimizer or (lambda params: torch.optim.AdamW(params, lr=lr))
        self.loss_fn = loss_fn or torch.nn.functional.cross_entropy
        self.classification = loss_fn is None
        self.outer, self.device, self.seed, self.run = outer, torch.device(device), seed, run
        self.history: list[dict] = []
        self.optimizer: Optimizer | None = None

    def evaluate(self, data: Dataset) -> dict[str, float]:
        """Mean loss (and accuracy, for the default loss) of the model on ``data``."""
        self.model.eval()
        total, loss, correct = 0, 0.0, 0
        with torch.no_grad():
            for x, y in DataLoader(data, batch_size=256):
                x, y = x.to(self.device), y.to(self.device)
                out = self.model(x)
                loss += float(self.loss_fn(out, y)) * len(y)
                if self.classification:
                    correct += int((out.argmax(-1) == y).sum())
                total += len(y)
        self.model.train()
        metrics = {"loss": loss / max(total, 1)}
        if self.classification:
            metrics["accuracy"] = correct / max(total, 1)
        return metrics

    def train(self, train_data: Dataset | tuple, validation_data: Dataset | tuple | None = None) -> list[dict]:
        """Train until the run's last round; return one entry per round this script evaluated."""
        train = as_dataset(train_data)
        valid = as_dataset(validation_data) if validation_data is not None else None
        generator = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(train, batch_size=self.batch_size, shuffle=True, generator=generator, drop_last=False)
        steps = self.local_steps or max(1, self.local_epochs * len(loader))

        def evaluate() -> dict:
            metrics = self.evaluate(valid) if valid is not None else {}
            assert self.optimizer is not None
            self.history.append({"round": self.optimizer.rounds_done + 1, **metrics})
            return metrics

        self.optimizer = opt = Optimizer(
            self.make_optimizer(self.model.parameters()), swarm=self.swarm, run_id=self.run_id, model=self.model,
            local_steps=steps, rounds=self.rounds, batch_size=self.batch_size, outer=self.outer,
            evaluate=evaluate if valid is not None else None,
            metric="accuracy" if self.classification else "loss", **self.run)
        self.model.train()
        while not opt.finished:
            for x, y in loader:
                x, y = x.to(self.device), y.to(self.device)
                loss = self.loss_fn(self.model(x), y)
                loss.backward()
                if math.isfinite(loss.item()):
                    opt.step(batch_size=len(y), loss=loss)
                else:  # a diverged batch: skip it (the step would poison the local model)
                    pass
                opt.zero_grad()
                if opt.finished:
                    break
        return self.history
