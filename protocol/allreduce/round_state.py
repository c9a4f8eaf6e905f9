"""One member's state of one all-reduce round: what protocol/allreduce/averager.py reads and writes as it runs."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from protocol.allreduce.matchmaking import MatchState
from protocol.allreduce.messages import GroupPlan
from protocol.allreduce.sparsify import SparseUpdate

__all__ = ["RoundState"]


@dataclass
class RoundState:
    """One member's state of one all-reduce round (protocol/allreduce/averager.py runs it)."""

    round_id: str
    update: SparseUpdate | None  # None until a deferred selection finishes
    weight: float
    match: MatchState
    plan: GroupPlan | None = None
    parts: dict[str, tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict)
    rejected: set[str] = field(default_factory=set)
    parts_in: asyncio.Event = field(default_factory=asyncio.Event)
    result_bytes: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    have: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    commits: dict[str, tuple[bool, ...]] = field(default_factory=dict)
    commits_in: asyncio.Event = field(default_factory=asyncio.Event)
    first_result_served: bool = False
    rounding: tuple[SparseUpdate, SparseUpdate, float] | None = None  # (exact, decoded, total weight) of our span
    results: list | None = None  # per span: (ResultFrame, decoded SparseUpdate) or None
    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    expires: float = 0.0
    no_group: bool = False  # ended in matchmaking without a group: step() may run this round id again
    suspects: set[str] = field(default_factory=set)  # leaders this id waited for in vain (dead, or cut off)
    votes_missing: tuple[str, ...] = ()  # members whose commit vote this member decided without
    evidence: dict[str, str] = field(default_factory=dict)  # peer -> what this round held against it

    @property
    def offer(self) -> asyncio.Future[GroupPlan | None]:
        """match.plan, which step() creates with the round: the leader's plan, None if it sent no usable one."""
        if self.match.plan is None:
            raise RuntimeError(f"round {self.round_id}: no plan future")
        return self.match.plan

    def group(self) -> GroupPlan:
        """The plan, for the phases after matchmaking (step() sets it before any of them runs)."""
        if self.plan is None:
            raise RuntimeError(f"round {self.round_id}: no plan yet")
        return self.plan

    def selected(self) -> SparseUpdate:
        """The update, for the phases after matchmaking (step() awaits a deferred selection before them)."""
        if self.update is None:
            raise RuntimeError(f"round {self.round_id}: no update yet")
        return self.update
