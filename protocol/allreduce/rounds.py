"""What configures an all-reduce round and what it reports (plain data; the round is protocol/allreduce/averager.py)."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.allreduce.messages import PartFrame, ResultFrame, TensorSpec
from protocol.allreduce.robust import AGGREGATORS
from protocol.allreduce.sparsify import SparseUpdate, check_density


class Phase(enum.Enum):
    MATCHMAKING = "matchmaking"
    REDUCE_SCATTER = "reduce_scatter"  # parts sent, waiting for owners' results
    AGGREGATE = "aggregate"  # this member's span aggregated, about to be served
    ALL_GATHER = "all_gather"  # the first result of this member's span has gone out
    COMMIT = "commit"


@dataclass(frozen=True)
class RoundConfig:
    swarm: str
    tensor: TensorSpec
    min_group: int = 2
    max_group: int = 64
    expected_group: int | None = None  # stop matchmaking as soon as this many peers declared
    matchmaking_time: float = 2.0  # how long to collect declarations otherwise
    invite_timeout: float = 2.0
    part_timeout: float = 5.0  # owners wait this long after the plan for every member's part
    result_timeout: float = 10.0  # members wait this long after the plan for every span's result
    commit_timeout: float = 2.0
    value_codec: str = "fp16"  # parts
    result_value_codec: str = "fp16"  # aggregates (sparse or dense, whichever is smaller)
    # None: an owner sends its span's whole average (the union of the members' top-k). A density: it sends
    # only that fraction of the span, the average's largest entries (global top-k, Shi et al. 2019), and
    # keeps the rest in its own error-feedback buffer, so the mass is delayed, not lost.
    result_density: float | None = None
    bandwidth: float = 12.5e6  # advertised bytes/s (100 Mbit/s); sizes this member's span
    # how an owner aggregates its span (protocol/allreduce/robust.py): "mean" (no defence; exact conservation),
    # "centered_clip", "trimmed_mean" or "median"; with any but "mean", members also check owners' results
    aggregator: str = "mean"
    max_weight: float | None = None  # a part's claimed weight is capped here (a job: its samples per round)

    def __post_init__(self) -> None:
        if not 1 <= self.min_group <= self.max_group:
            raise ValueError(f"need 1 <= min_group <= max_group, got {self.min_group}, {self.max_group}")
        for name in ("matchmaking_time", "invite_timeout", "part_timeout", "result_timeout", "commit_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.bandwidth < 0:
            raise ValueError("bandwidth must be >= 0")
        if self.result_density is not None:
            check_density(self.result_density, "result_density")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {self.aggregator!r}")
        if self.max_weight is not None and not self.max_weight > 0:
            raise ValueError("max_weight must be > 0")

    @property
    def round_budget(self) -> float:
        """How long a round may take at most, matchmaking to commit (and how long its DHT entries live)."""
        return self.matchmaking_time + self.invite_timeout * 2 + self.result_timeout + self.commit_timeout + 5.0

    @classmethod
    def for_job(cls, swarm: str, tensor: TensorSpec, round_timeout_s: float, min_group: int, max_group: int,
                **options: Any) -> RoundConfig:
        """The rounds of a federated job, timed from its round_timeout_s (node/jobs/federated/runner.py runs them;
        simulations/federated.py models them with the same numbers)."""
        t = round_timeout_s
        return cls(swarm=swarm, tensor=tensor, min_group=min_group, max_group=max_group,
                   matchmaking_time=min(5.0, t / 6), part_timeout=t / 4, result_timeout=t / 2,
                   commit_timeout=min(3.0, t / 10), **options)


@dataclass
class RoundHooks:
    """Fault-injection points (see protocol/allreduce/faults.py) and the caller's admission rule; all optional."""

    on_phase: Callable[[Phase, str], Awaitable[None]] | None = None
    outgoing_part: Callable[[PartFrame, bytes], bytes] | None = None  # may replace a part's wire bytes
    outgoing_result: Callable[[ResultFrame, bytes], bytes] | None = None  # may replace an owner's result bytes
    # False for a peer this member must not round with (not admitted to a private swarm): its declarations,
    # invites, parts, results and commit votes are ignored, as those of a member the job excluded
    admit: Callable[[str], bool] | None = None


@dataclass(frozen=True)
class RoundReport:
    round_id: str
    ok: bool
    error: str | None
    leader: str | None
    members: tuple[str, ...]
    excluded: tuple[str, ...]  # senders whose part this member's span rejected or never got
    spans: tuple[tuple[int, int], ...]  # [start, end) of each member's span
    spans_applied: tuple[bool, ...]
    span_weights: tuple[float, ...]  # total weight behind each applied span's average (0 if not applied)
    bytes_sent: dict[str, int]  # per remote peer, frames incl. headers
    bytes_received: dict[str, int]
    phase_seconds: dict[str, float]
    # True when matchmaking ended with fewer than min_group peers and no group was formed: nobody ran this
    # round id, so the caller may step() the same id again (a paused job retries without drifting apart)
    no_group: bool = False
    # members whose commit vote did not arrive within the commit timeout: this member decided without them, so
    # its spans_applied may differ from theirs (the one timing case where survivors can disagree; empty otherwise)
    votes_missing: tuple[str, ...] = ()
    # evidence against members seen in this round, peer -> reason: a part this member's span rejected or found an
    # outlier (protocol/allreduce/robust.py), an owner's result that failed this member's check
    evidence: dict[str, str] = field(default_factory=dict)

    @property
    def total_sent(self) -> int:
        return sum(self.bytes_sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.bytes_received.values())


@dataclass(frozen=True, eq=False)
class RoundOutcome:
    report: RoundReport
    average: SparseUpdate | None  # the aggregate to apply (absent entries are 0); None if nothing applied
    returned: SparseUpdate  # give back to the error-feedback buffer (sparsifier.restore)

    @property
    def ok(self) -> bool:
        return self.report.ok
