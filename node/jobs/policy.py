"""Which jobs this node takes on, and how much of the machine each one gets: the node owner's rule, as pure
functions of a job's signed spec, its submitter and what the manager counts (no I/O; tests call them directly).

    limits = JobLimits(accept_from=("members",), max_jobs=2, max_job_steps=1_000_000)
    reason = job_refusal(limits, spec, submitter, own_id, member=True, running=1)   # "" to go on, else the decline
    reason = memory_refusal(limits, on_device, on_host, "cpu", total_bytes)         # after the kind sized the job

The settings are node config keys and ``swarmnode run`` flags (node/runtime/config.py):
  * accept_jobs_from: whose jobs this node runs. "self": only its own. "members" (the default): the swarm's
    members: a submitter with a live signed peer record in the swarm (it runs a node there: ``swarmnode peers``
    lists it), or seen with one since this node started; in a private swarm (node/runtime/admission.py) a holder
    of a valid membership certificate. "anyone": any validly signed job. Or a list of peer ids (and words). A
    node's own jobs pass whatever the list says; the limits below still apply to them.
  * max_jobs: jobs this node takes part in at once (a pipeline job counts from its acceptance: the trainer may
    assign this node a stage at any time).
  * max_job_memory: bytes a job's training may need (the analytic estimate of node/ml/analyze.py: weights,
    gradients, optimizer state, activations, the round's vectors); 0: the device's free memory is the bound.
  * max_job_steps: local steps a job may ask of this node: rounds x local_steps (federated), rounds x
    micro_batches (pipeline). The issue's probe asked for 10^12.
  * max_job_hours: the longest a job may keep this node busy: declined when its declared worst case (rounds x
    round_timeout_s: every round running to its timeout) is longer; a job still running after that long on this
    node is left (the manager's deadline). 0: no bound.
  * cpu_threads: torch intra-op threads of each job's local steps (0: torch's default, one per core);
    gpu_memory_fraction: the share of a CUDA device's memory this node's jobs may allocate (0: all of it).
Every refusal is one printable line of at most MAX_REASON characters naming the setting, as other nodes show it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from node.runtime.config import check_accept_jobs_from
from protocol.records.job_records import MAX_REASON
from protocol.records.job_spec import JobSpec
from protocol.records.values import short

GIB = 2**30


@dataclass(frozen=True)
class JobLimits:
    """A node's admission rule and per-job limits (see the module docstring); 0 means "no bound" for the
    numbers."""

    accept_from: tuple[str, ...] = ("members",)
    max_jobs: int = 2
    max_job_memory: int = 0
    max_job_steps: int = 1_000_000
    max_job_hours: float = 0.0
    cpu_threads: int = 0
    gpu_memory_fraction: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "accept_from", check_accept_jobs_from(self.accept_from))
        for name in ("max_jobs", "max_job_memory", "max_job_steps", "cpu_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r:.40}")
        if self.max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {self.max_jobs}")
        if not (math.isfinite(self.max_job_hours) and self.max_job_hours >= 0):
            raise ValueError(f"max_job_hours must be a finite number >= 0, got {self.max_job_hours}")
        if not (math.isfinite(self.gpu_memory_fraction) and 0 <= self.gpu_memory_fraction <= 1):
            raise ValueError(f"gpu_memory_fraction must be in [0, 1] (0: no bound), got {self.gpu_memory_fraction}")

    @property
    def max_job_seconds(self) -> float | None:
        """The wall-clock bound of one job on this node, None when unbounded."""
        return self.max_job_hours * 3600.0 if self.max_job_hours else None


def _line(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:MAX_REASON]


def trust_refusal(accept_from: tuple[str, ...], submitter: str, own_id: str, member: bool,
                  private: bool = False) -> str:
    """"" if this node runs jobs of ``submitter`` under ``accept_from``, else why not. ``member``: the submitter
    is a member of the swarm (the caller's check: a live peer record, or a certificate in a private swarm)."""
    if submitter == own_id or "anyone" in accept_from or submitter in accept_from:
        return ""
    if "members" in accept_from and member:
        return ""
    who = short(submitter)
    if "members" in accept_from:
        what = "holds no valid membership certificate of this private swarm" if private else \
            "has no live peer record in this swarm (it never joined as a node)"
        return _line(f"this node runs jobs of swarm members only (accept_jobs_from = members); submitter {who} {what}")
    if accept_from == ("self",):
        return _line(f"this node runs only its own jobs (accept_jobs_from = self); submitter {who} is another node")
    return _line(f"submitter {who} is not in this node's accept_jobs_from ({len(accept_from)} entries)")


def job_steps(spec: JobSpec) -> int:
    """The local steps a job asks of each node: rounds x local_steps (federated), rounds x micro_batches
    (pipeline: every stage host runs each step's micro-batches)."""
    per_round = spec.pipeline.micro_batches if spec.kind == "pipeline" and spec.pipeline is not None else \
        spec.local_steps
    return spec.rounds * per_round


def declared_hours(spec: JobSpec) -> float:
    """The job's declared worst case: every round runs to its timeout."""
    return spec.rounds * spec.round_timeout_s / 3600.0


def size_refusal(limits: JobLimits, spec: JobSpec) -> str:
    """"" if the job's declared length fits max_job_steps and max_job_hours, else why not."""
    steps = job_steps(spec)
    if limits.max_job_steps and steps > limits.max_job_steps:
        unit = "rounds x micro_batches" if spec.kind == "pipeline" else "rounds x local_steps"
        return _line(f"the job asks for {steps:,} local steps ({unit}); this node runs at most "
                     f"{limits.max_job_steps:,} per job (max_job_steps)")
    hours = declared_hours(spec)
    if limits.max_job_hours and hours > limits.max_job_hours:
        return _line(f"the job may run {hours:,.1f} h (rounds x round_timeout_s); this node gives a job at most "
                     f"{limits.max_job_hours:g} h (max_job_hours)")
    return ""


def concurrency_refusal(limits: JobLimits, running: int) -> str:
    """"" if this node may take one more job while it runs ``running``, else why not."""
    if running >= limits.max_jobs:
        return _line(f"this node already runs {running} job(s) (max_jobs = {limits.max_jobs})")
    return ""


def job_refusal(limits: JobLimits, spec: JobSpec, submitter: str, own_id: str, member: bool, running: int,
                private: bool = False) -> str:
    """The first reason this node declines a job before it sizes it: whose it is, how many it runs, how long it
    is; "" to go on (the job's kind then checks data, model and memory)."""
    return (trust_refusal(limits.accept_from, submitter, own_id, member, private)
            or concurrency_refusal(limits, running) or size_refusal(limits, spec))


def memory_refusal(limits: JobLimits, on_device: int, on_host: int, device_kind: str, device_total: int,
                   device_name: str = "") -> str:
    """"" if a job needing ``on_device`` bytes where it trains and ``on_host`` more of host RAM fits this node's
    limits, else why not. On the CPU both come out of RAM; on a CUDA device gpu_memory_fraction bounds what
    the device part may use."""
    need = on_device + on_host
    if limits.max_job_memory and need > limits.max_job_memory:
        return _line(f"training needs about {need / GIB:.2f} GiB; this node gives a job at most "
                     f"{limits.max_job_memory / GIB:.2f} GiB (max_job_memory)")
    if device_kind == "cuda" and limits.gpu_memory_fraction and on_device > limits.gpu_memory_fraction * device_total:
        share = limits.gpu_memory_fraction * device_total
        return _line(f"training needs about {on_device / GIB:.2f} GiB on {device_name or 'the GPU'}; this node lets "
                     f"jobs use {share / GIB:.2f} GiB of it (gpu_memory_fraction = {limits.gpu_memory_fraction:g})")
    return ""
