"""Hostile members in federated rounds: the defence of protocol/allreduce/robust.py, as the simulator plays it.

    verdict = judge([m.hostile for m in members], lost, "centered_clip")   # once per round, over the plan's members

A hostile member (FederatedConfig.byzantine: the fraction drawn hostile when nodes join, simulations/swarm.py) sends
a part far from the honest ones and, as a span owner, a wrong aggregate of its span (the faults of
scripts/bench_byzantine.py: parts of 1e30, sign-flipped x100 or noise; an owner's aggregate scaled or sign-flipped).
What a round does with it depends on the job's aggregator (protocol.allreduce.robust.AGGREGATORS):
  mean     no defence: the weighted mean takes its part in and nobody checks an owner's result (the averager checks
           results only under a robust aggregator), so a round that applies anything applies a ruined model (with
           real daemons, scripts/bench_byzantine.py: held-out accuracy near chance). Nothing is evidence, so it is
           never excluded and poisons every round it takes part in.
  robust   centered_clip, trimmed_mean, median, while the hostile members are fewer than half of the round's
           (robust.py: only then is the reference distance an honest one). Every honest owner drops the hostile part
           as a gross outlier (over robust.OUTLIER x the lower-median distance: no influence at all), so its update is
           not applied (``dropped``). Its own span's result fails the members' check (robust.result_suspicion): each
           votes it missing, so nobody applies that span and every honest member's part of it goes back to its
           error feedback (``vetoed``) -- as for an owner that died, but with no wait, the result being rejected on
           arrival. Both are evidence against it; node/jobs/federated/runner.py excludes a member after
           robust.EXCLUDE_AFTER consecutive rounds with evidence, and the averager refuses it from then on: it leaves
           its group for the job (``strike``).
           With half or more of the round hostile, the defence's premise fails: counted as poisoned, no evidence
           (the worst case; an honest member might even be named), and the runner's count starts again.
Simplifications: every honest member of a group counts the same rounds (one strike count per hostile member; in
the daemon each member counts the rounds it saw); honest parts are not clipped or trimmed (centered_clip's clipping
delays honest mass, it does not lose it; the coordinate-wise aggregators' shrinkage of sparse parts is measured with
real daemons by scripts/bench_byzantine.py, not here); a hostile member that stays within the checks' bounds (a
bounded bias, robust.py) is not modelled; an excluded member does not come back under a new identity; a hostile
member's timing (training, declaring, its link) is an honest one's. Its update is not honest mass: it holds no
error-feedback mass and is counted in none of the mass figures.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from protocol.allreduce.robust import AGGREGATORS, EXCLUDE_AFTER

__all__ = ["CLEAN", "Verdict", "check_aggregator", "check_fraction", "judge", "strike"]


@dataclass(frozen=True)
class Verdict:
    """What a round's hostile members do to it (positions are in the plan's member order)."""

    hostile: tuple[int, ...]  # the hostile members of the plan
    defended: bool  # a robust aggregator and a hostile minority: parts dropped, spans vetoed, evidence against them
    vetoed: tuple[int, ...]  # hostile owners, alive through the exchange, whose span nobody applies (defended only)

    def poisoned(self, applied: bool) -> bool:
        """A round that applied anything with an undefended hostile part in it."""
        return applied and bool(self.hostile) and not self.defended


CLEAN = Verdict((), True, ())


def check_aggregator(name: str) -> None:
    if name not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {name!r}")


def check_fraction(byzantine: float) -> None:
    if not 0.0 <= byzantine <= 1.0:  # also refuses NaN
        raise ValueError(f"byzantine must be a fraction in [0, 1], got {byzantine!r}")


def judge(hostile: Sequence[bool], lost: Collection[int], aggregator: str) -> Verdict:
    """The verdict on a round whose plan members are hostile where ``hostile`` says; ``lost``: positions of owners
    that died before serving their span (their span is lost anyway, not vetoed)."""
    positions = tuple(i for i, h in enumerate(hostile) if h)
    if not positions:
        return CLEAN
    defended = aggregator != "mean" and 2 * len(positions) < len(hostile)
    vetoed = tuple(i for i in positions if i not in lost) if defended else ()
    return Verdict(positions, defended, vetoed)


def strike(strikes: int) -> tuple[int, bool]:
    """One more consecutive round with evidence (runner._weigh_evidence): the new count, and whether it excludes."""
    strikes += 1
    return strikes, strikes >= EXCLUDE_AFTER
