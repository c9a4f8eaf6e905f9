"""Train in a swarm run from your own training loop: wrap your torch optimizer.

    swarm = swarmnode.Swarm(join=[ADDR], home="~/.swarmnode/run1")
    opt = swarmnode.Optimizer(torch.optim.AdamW(model.parameters(), lr=3e-4), swarm=swarm, run_id="my-run",
                              model=model, local_steps=100, outer="diloco", density=0.01, min_peers=2)
    while not opt.finished:
        for batch in loader:
            loss = model(**batch).loss; loss.backward(); opt.step(loss=loss); opt.zero_grad()
            if opt.finished:
                break

Each participant runs the same script on its own data and device. ``step`` is your optimizer's step; every
``local_steps`` steps it hands the parameters to the node, which averages the pseudo-gradients (start minus local
parameters) of the run's members with the top-k all-reduce and error feedback, applies the outer step (FedAvg or
DiLoCo's Nesterov SGD) identically on every member (checked by hash, re-synced when not) and gives the new global
parameters back, which ``step`` loads into the model before it returns. ``step`` blocks for that round; your
optimizer's own state (AdamW's moments) stays local, as in DiLoCo.

Creating the Optimizer joins the run named ``run_id`` (or starts it, with these settings; a joiner takes the run's
settings) and loads the run's current parameters into the model (``load_state_from_peers`` is that step, for
hivemind users). The run binds the names and shapes of the trained parameters: a script whose model differs is
refused with the first difference. A script killed and started again on the same ``home`` resumes from its
node's checkpoint and catches up; Ctrl-C leaves cleanly. The run ends after ``rounds`` rounds (``finished``; the
model then holds the final parameters and the node has written them under ``<home>/jobs/<job id>/``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from node.jobs.federated.script_runs import ParameterLayout, RunEnded, ScriptBridge, script_spec
from protocol.records.job_spec import MAX_ROUNDS, InnerOpt, OuterOpt
from swarmnode.swarm import Swarm

OUTER_DEFAULTS = {"fedavg": (1.0, 0.0), "diloco": (0.7, 0.9)}  # (lr, momentum): DiLoCo's setting, Nesterov


def trained_parameters(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None
                       ) -> list[tuple[str, torch.Tensor]]:
    """The optimizer's parameters in a fixed order, named as in ``model`` (else by their place in its groups)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if model is None:
        return [(f"param_groups.{g}.{i}", p) for g, group in enumerate(optimizer.param_groups)
                for i, p in enumerate(group["params"])]
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"the optimizer holds {len(missing)} parameters that are not the model's")
    return [(names[id(p)], p) for p in params]


def flatten(params: Iterable[torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params]).numpy().copy()


def load_into(params: Iterable[torch.Tensor], flat: np.ndarray) -> None:
    src, offset = torch.from_numpy(flat), 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(src[offset:offset + n].view(p.shape))
            offset += n


class Optimizer:
    def __init__(self, optimizer: torch.optim.Optimizer, *, swarm: Swarm, run_id: str, model: torch.nn.Module | None
                 = None, local_steps: int = 100, outer: str = "diloco", outer_lr: float | None = None,
                 outer_momentum: float | None = None, density: float = 0.01, min_peers: int = 2, max_peers: int = 8,
                 rounds: int = MAX_ROUNDS, batch_size: int = 1, aggregator: str = "centered_clip",
                 round_timeout: float = 600.0, evaluate: Callable[[], dict] | None = None, metric: str = "accuracy",
                 join_timeout: float | None = 600.0, values: str = "fp16", result_density: float = 1.0):
        """``batch_size``: samples per step (a member's weight is the samples it saw; ``step(batch_size=...)`` for
        varying batches). ``evaluate``: called with the model holding each round's new parameters, returns
        metrics (``metric`` names the one progress records show). ``round_timeout``: how long members wait for
        each other at a round (local steps run at different speeds). ``values`` ("fp16", "int8", "int4", "int2") and
        ``result_density``: how compactly a round's parts and results travel (the job fields). ValueError or
        NodeError (one line) if the settings are unfit or the run trains another model."""
        if outer not in OUTER_DEFAULTS:
            raise ValueError(f"outer: 'fedavg' or 'diloco', got {outer!r}")
        lr, momentum = OUTER_DEFAULTS[outer]
        self.inner, self.swarm = optimizer, swarm
        self._named = trained_parameters(optimizer, model)
        self._params = [p for _, p in self._named]
        self.layout = ParameterLayout.of((n, tuple(p.shape)) for n, p in self._named)
        spec = script_spec(
            run_id, self.layout, rounds=rounds, local_steps=local_steps, batch_size=batch_size,
            inner=InnerOpt("adamw" if isinstance(optimizer, torch.optim.AdamW) else "sgd",
                           float(optimizer.param_groups[0].get("lr", 1e-3))),
            outer=OuterOpt(outer, lr if outer_lr is None else outer_lr, momentum if outer_momentum is None else
                           outer_momentum, nesterov=outer == "diloco"),
            density=density, min_participants=min_peers, max_participants=max_peers, round_timeout_s=round_timeout,
            aggregator=aggregator, values=values, result_density=result_density)
        self._evaluate = evaluate
        self.bridge = ScriptBridge(self.layout, flatten(self._params), metric,
                                   None if evaluate is None else self._evaluate_at)
        view = swarm.call(swarm.jobs.join_script_run(spec, self.layout, self.bridge))
        self.job_id, self.spec = view.job_id, view.record.spec  # a joiner trains with the run's settings
        self._steps = self._samples = 0
        self._losses: list[float] = []
        self.finished = False
        self._start: np.ndarray | None = None  # the current window's start: the run's parameters as of its round
        self._next_window(join_timeout)

    # ---- the torch.optim.Optimizer surface ------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def step(self, closure: Callable[[], float] | None = None, *, batch_size: int | None = None,
             loss: torch.Tensor | float | None = None):
        """Your optimizer's step; every ``local_steps`` steps, the run's round (blocking). RunEnded once the run
        is over (``finished``). ``loss`` (or the closure's) is reported in the run's progress."""
        if self.finished:
            raise RunEnded(self.bridge.ended or f"run {self.spec.name!r} is over")
        result = self.inner.step(closure) if closure is not None else self.inner.step()
        self.after_step(batch_size=batch_size, loss=result if loss is None else loss)
        return result

    def after_step(self, *, batch_size: int | None = None, loss: torch.Tensor | float | None = None) -> None:
        """Count a step your code (or a framework: swarmnode/callbacks.py) took with the wrapped optimizer itself;
        every ``local_steps`` steps, the run's round (blocking), whose parameters it loads into the model."""
        if self.finished:
            return
        if loss is not None:
            self._losses.append(float(loss.detach() if isinstance(loss, torch.Tensor) else loss))
        self._steps += 1
        self._samples += self.spec.batch_size if batch_size is None else int(batch_size)
        if self._steps >= self.spec.local_steps:
            finite = [v for v in self._losses if math.isfinite(v)]
            self.bridge.deliver(flatten(self._params), self._samples, float(np.mean(finite)) if finite else math.nan)
            self._steps = self._samples = 0
            self._losses = []
            self._next_window(None)

    # ---- the run ------------------------------------------------------------------------------------------------

    def load_state_from_peers(self, timeout: float | None = None) -> None:
        """Load the run's current parameters into the model (the constructor did, and every round does; for
        hivemind users' scripts, which call it after joining). ``timeout``: unused, kept for their signature."""
        if self._start is not None and not self.finished:
            load_into(self._params, self._start)

    def _next_window(self, timeout: float | None) -> None:
        """Wait until the node wants the next local window and load its start parameters into the model; at the end
        of the run, its final parameters (``finished``)."""
        try:
            self._start = self.bridge.next_start(timeout)
        except RunEnded:
            self.finished = True
            if self.bridge.final is not None:
                load_into(self._params, self.bridge.final[0])
            return
        load_into(self._params, self._start)

    @property
    def local_step(self) -> int:
        """Steps taken in the current local window (0 right after a round)."""
        return self._steps

    @property
    def ended(self) -> str | None:
        """Why the run is over for this script (finished, stopped, or ended while it was behind); None while on."""
        return self.bridge.ended

    @property
    def rounds_done(self) -> int:
        state = self.swarm.jobs.local_state(self.job_id)
        return 0 if state is None else state[0]

    @property
    def model_hash(self) -> str:
        state = self.swarm.jobs.local_state(self.job_id)
        return "" if state is None else state[1]

    def _evaluate_at(self, params: np.ndarray) -> dict:
        """In the node's worker thread, while the script waits for the round: the new parameters' metrics."""
        assert self._evaluate is not None
        load_into(self._params, params)
        return self._evaluate()

    def leave(self) -> None:
        """Stop training in the run (the node stays up; Swarm.shutdown stops it)."""
        if not self.finished:
            self.finished = True
            self.swarm.call(self.swarm.jobs.leave_script_run(self.job_id), 10.0)
