"""Runs trained from a Python script's own loop (swarmnode.Optimizer): the script does the local steps, this node's
federated machinery does all the rest (the top-k all-reduce with error feedback, the outer step, the hash check
and re-sync, state download for joiners, checkpoints, progress records, export).

    layout = ParameterLayout.of([(name, tuple(p.shape)) for name, p in model.named_parameters()])
    spec = script_spec("my-run", layout.file, local_steps=100, ...)      # arch "script", its one model file
    bridge = ScriptBridge(layout, flat_params)                          # the script's side
    await jobs.federated.attach_script(job_id, bridge, layout)            # FederatedJobs runs it (ScriptRunner)
    start = bridge.next_start(timeout)        # in the script's thread: the global parameters to train from
    bridge.deliver(local_params, samples, loss)       # after local_steps steps: the round goes on without it

A run is a job like any other on the board (``swarmnode jobs`` lists it, ``job ID --export`` writes its model);
its model is named by the layout of its parameters (names and shapes, in order: ``layout.json``, whose sha256 the
signed spec carries), so a script whose model differs is refused before it averages anything. Daemons that run
no script for it never take part and never decline it. Several scripts starting one run id at the same moment
may each store a record: every node takes the lowest job id among the running ones of that name (``canonical``),
and a script that stored another withdraws it.

The bridge turns the runner's local training (node/jobs/federated/local_training.py LocalTrainer.run, called in a
worker thread) into a hand-over: ``run`` publishes the start parameters and waits until the script delivers the
parameters its local steps left (or the job is halted); the script waits in ``next_start`` until the runner
wants the next window -- after the round, after a re-sync, or never again when the run is over (``finished``).
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from node.jobs.board import POLL_S, JobView
from node.jobs.federated.local_training import LocalResult
from node.jobs.federated.runner import JobRunner
from protocol.clock import Clock
from protocol.records.job_inputs import ModelFile
from protocol.records.job_spec import SCRIPT_LAYOUT, InnerOpt, JobSpec, ModelSpec, OuterOpt
from protocol.records.values import check_name

MAX_LAYOUT_TENSORS = 100_000
MAX_LAYOUT_BYTES = 16 * 2**20  # a layout file fetched from a peer is bounded
SCRIPT_DATASET = "script"  # the dataset name of every script run: each script reads its own data


@dataclass(frozen=True)
class ParameterLayout:
    """The names and shapes of a model's trained parameters, in the order they are flattened."""

    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.tensors) <= MAX_LAYOUT_TENSORS:
            raise ValueError(f"a model of 1-{MAX_LAYOUT_TENSORS:,} parameter tensors, got {len(self.tensors):,}")
        names = [n for n, _ in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("a parameter name appears twice")
        for name, shape in self.tensors:
            if not isinstance(name, str) or not 1 <= len(name) <= 512:
                raise ValueError(f"parameter name {name!r:.60}: must be 1-512 characters")
            if not isinstance(shape, tuple) or not all(isinstance(d, int) and 0 <= d < 2**40 for d in shape):
                raise ValueError(f"parameter {name}: shape {shape!r:.60} is not a tuple of sizes")

    @classmethod
    def of(cls, named: Iterable[tuple[str, tuple[int, ...]]]) -> ParameterLayout:
        return cls(tuple((str(n), tuple(int(d) for d in s)) for n, s in named))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors)

    def to_bytes(self) -> bytes:
        return json.dumps({"format": "swarmnode-layout-1", "tensors": [[n, list(s)] for n, s in self.tensors]},
                          separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ParameterLayout:
        """ValueError (one line) if ``data`` is not a layout file."""
        if len(data) > MAX_LAYOUT_BYTES:
            raise ValueError(f"a layout file over {MAX_LAYOUT_BYTES} bytes")
        try:
            obj = json.loads(data)
            if obj.get("format") != "swarmnode-layout-1":
                raise ValueError("not a swarmnode layout file")
            return cls.of((n, tuple(s)) for n, s in obj["tensors"])
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"not a layout file: {e}") from None

    @property
    def file(self) -> ModelFile:
        data = self.to_bytes()
        return ModelFile(SCRIPT_LAYOUT, len(data), hashlib.sha256(data).hexdigest())

    def summary(self) -> str:
        return f"{len(self.tensors):,} tensors, {self.size:,} parameters"

    def difference(self, other: ParameterLayout) -> str:
        """Why a model of layout ``other`` cannot join a run of this layout ("" if it can)."""
        if other == self:
            return ""
        for i, ((name, shape), (oname, oshape)) in enumerate(zip(self.tensors, other.tensors)):
            if name != oname or shape != oshape:
                return (f"parameter {i} is {name} {list(shape)} in the run, {oname} {list(oshape)} in this script "
                        f"(run: {self.summary()}; script: {other.summary()})")
        return f"the run's model has {self.summary()}, this script's {other.summary()}"

    def tensors_of(self, params: np.ndarray) -> dict[str, torch.Tensor]:
        """Flat float32 parameters as named tensors (an export of the run's model)."""
        if params.shape != (self.size,):
            raise ValueError(f"{params.size} parameters for a layout of {self.size}")
        out, offset = {}, 0
        for name, shape in self.tensors:
            n = math.prod(shape)
            out[name] = torch.from_numpy(params[offset:offset + n].copy()).reshape(shape)
            offset += n
        return out


def script_spec(run_id: str, layout: ParameterLayout, *, rounds: int, local_steps: int, batch_size: int,
                inner: InnerOpt, outer: OuterOpt, density: float, min_participants: int, max_participants: int,
                round_timeout_s: float, aggregator: str, values: str = "fp16", result_density: float = 1.0) -> JobSpec:
    """The signed spec of a script run (ValueError naming the field if unfit)."""
    check_name("run_id", run_id)
    return JobSpec(name=run_id, model=ModelSpec("script", files=(layout.file,)), dataset=SCRIPT_DATASET,
                   task="custom", rounds=rounds, inner=inner, local_steps=local_steps, batch_size=batch_size,
                   outer=outer, density=density, min_participants=min_participants,
                   max_participants=max_participants, round_timeout_s=round_timeout_s, aggregator=aggregator,
                   values=values, result_density=result_density)


def is_script_run(spec: JobSpec) -> bool:
    return spec.model.arch == "script"


def script_layout(spec: JobSpec, folder: pathlib.Path) -> ParameterLayout | None:
    """A script run's layout from its verified model folder (node/jobs/model_files.py); None for other jobs."""
    if not is_script_run(spec):
        return None
    layout = ParameterLayout.from_bytes((folder / SCRIPT_LAYOUT).read_bytes())
    if layout.file != spec.model.files[0]:
        raise ValueError(f"{SCRIPT_LAYOUT} does not match the run's signed manifest")
    return layout


def submitters_start(view: JobView, peer_id: str, model_hash: str) -> str | None:
    """Before round 0: the submitter's initial model hash, if it differs from this node's ``model_hash`` (a script
    run: each script starts from its own weights; the run starts from its submitter's, downloaded)."""
    if view.record.submitter == peer_id:
        return None
    return next((p.model_hash for p in view.at_best if p.writer == view.record.submitter and p.round == 0
                 and p.model_hash != model_hash), None)


async def await_submitter(view: JobView, peer_id: str, clock: Clock) -> None:
    """Before a joiner's first round: wait (a round timeout at most) until the submitter's progress is on the board
    or the run is past round 0, so that the joiner starts from the run's weights instead of announcing its own
    (scripts starting at the same moment would otherwise run round 0 from as many models and re-sync)."""
    deadline = clock.monotonic() + view.record.spec.round_timeout_s
    while (view.record.submitter != peer_id and view.round == 0 and clock.monotonic() < deadline
           and not any(p.writer == view.record.submitter for p in view.at_best)):
        await clock.sleep(POLL_S / 2)


def canonical(job_ids: Iterable[str]) -> str | None:
    """The one run every node takes among several stored for one run id at once: the lowest job id."""
    return min(job_ids, default=None)


class RunEnded(RuntimeError):
    """The run this script trains in is over (its last round done) or stopped (cancelled, the node stopping)."""


class ScriptBridge:
    """The hand-over between a script's thread and the runner: LocalTrainer's interface on the runner's side
    (``run``, ``device``), ``next_start`` / ``deliver`` on the script's."""

    def __init__(self, layout: ParameterLayout, initial: np.ndarray, metric: str = "accuracy",
                 evaluate: Callable[[np.ndarray], dict] | None = None):
        if initial.dtype != np.float32 or initial.shape != (layout.size,):
            raise ValueError(f"initial parameters must be float32 ({layout.size},)")
        self.layout, self.initial, self.metric = layout, initial, metric
        self.device = torch.device("cpu")  # the script trains where it likes; what crosses here is CPU numpy
        self._evaluate = evaluate
        self._cond = threading.Condition()
        self._start: np.ndarray | None = None  # what the runner wants trained next (None: nothing yet)
        self._window = 0  # bumped by every run(): the script's next_start waits for a new one
        self._taken = 0  # the last window the script took
        self._result: LocalResult | None = None
        self._ended: str | None = None  # why the run is over for this script
        self.final: tuple[np.ndarray, int] | None = None  # the run's last parameters and rounds, once finished

    # ---- the runner's side (a worker thread) ----------------------------------------------------------------

    def run(self, params: np.ndarray, steps: int, stop: threading.Event | None = None) -> LocalResult:
        with self._cond:
            self._start, self._result = params, None
            self._window += 1
            self._cond.notify_all()
            while self._result is None and self._ended is None and not (stop is not None and stop.is_set()):
                self._cond.wait(0.2)
            result, self._result = self._result, None
        if result is None:  # halted, or the script left: nothing is sent
            return LocalResult(params, 0, float("nan"), False, stopped=True)
        return result

    def evaluate(self, params: np.ndarray) -> dict:
        return {} if self._evaluate is None else dict(self._evaluate(params))

    def end(self, reason: str, final: tuple[np.ndarray, int] | None = None) -> None:
        """The run is over for this script: its last round done (``final``: parameters, rounds) or stopped."""
        with self._cond:
            if self._ended is None:
                self._ended, self.final = reason, final
            self._cond.notify_all()

    # ---- the script's side --------------------------------------------------------------------------------------

    @property
    def ended(self) -> str | None:
        return self._ended

    def next_start(self, timeout: float | None = None) -> np.ndarray:
        """Wait for the parameters of the next local window; RunEnded once the run is over, TimeoutError after
        ``timeout`` seconds. Waits in short slices, so Ctrl-C reaches the script."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._window == self._taken:
                if self._ended is not None:
                    raise RunEnded(self._ended)
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no round started within {timeout:g} s")
                self._cond.wait(0.2)
            self._taken = self._window
            assert self._start is not None
            return self._start

    def deliver(self, params: np.ndarray, samples: int, mean_loss: float) -> None:
        """The parameters the script's local steps left, with the samples they saw (the script's weight)."""
        if params.dtype != np.float32 or params.shape != self.initial.shape:
            raise ValueError(f"parameters must be float32 ({self.initial.size},)")
        finite = bool(np.isfinite(params).all())
        with self._cond:
            self._result = LocalResult(params, samples, mean_loss if finite else float("nan"), finite)
            self._cond.notify_all()


class ScriptRunner(JobRunner):
    """JobRunner whose local steps are the script's (through its ScriptBridge) and whose model is its layout."""

    def __init__(self, p2p, dht, swarm: str, job_id: str, spec: JobSpec, bridge: ScriptBridge, **kwargs):
        self.bridge = bridge
        self._setup(p2p, dht, swarm, job_id, spec, bridge.initial.copy(), bridge, **kwargs)

    def evaluate(self) -> dict:
        return self.bridge.evaluate(self.params.copy())
