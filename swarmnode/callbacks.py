"""The swarm run's rounds inside a Hugging Face `transformers.Trainer`: a callback, nothing else changes.

    swarm = swarmnode.Swarm(join=[ADDR], home="~/.swarmnode/hf-run")
    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[SwarmCallback(swarm, run_id="my-run", local_steps=50, outer="diloco")])
    trainer.train()          # every 50 optimizer steps: the run's round; it stops when the run's last round is done

At the start of training the callback wraps the Trainer's optimizer in a swarmnode.Optimizer (which loads the run's
current parameters into the model); after each optimizer step it counts the step (Optimizer.after_step), so the
Trainer's own loop, gradient accumulation, schedules and logging stay as they are. Each step's weight is
per_device_train_batch_size x gradient_accumulation_steps samples.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from swarmnode.optimizer import Optimizer
from swarmnode.swarm import Swarm


class SwarmCallback(TrainerCallback):
    def __init__(self, swarm: Swarm, run_id: str, **settings: Any):
        """``settings``: swarmnode.Optimizer's (local_steps, outer, density, min_peers, rounds, ...)."""
        self.swarm, self.run_id, self.settings = swarm, run_id, settings
        self.optimizer: Optimizer | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("SwarmCallback needs the Trainer's model and optimizer (transformers >= 4.0 passes both)")
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.optimizer = Optimizer(optimizer, swarm=self.swarm, run_id=self.run_id, model=model,
                                   **{"batch_size": batch, **self.settings})
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.optimizer is not None:
            self.optimizer.after_step()
            if self.optimizer.finished:
                control.should_training_stop = True
        return control
