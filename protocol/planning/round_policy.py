"""The federated round policy: what a participant decides after each round attempt (pure; no I/O).

    policy = RoundPolicy()
    decision = policy.after_round(ok=True, members=4, paused=False)   # decision.expected_group == 4
    decision = policy.after_round(ok=True, members=3, paused=False)   # the group shrank: expected_group None
    next_id = meeting_round(own_next, [p.next_round for p in peers_at_this_round_and_model])
    majority = outvoted(own_hash, {peer: hash, ...}, last_members, me)  # a hash to re-sync to, or None

node/jobs/federated/federated_jobs.py runs one RoundPolicy per job it takes part in; simulations/federated.py
runs one per simulated group, so the simulator's groups decide exactly as the daemon does.

The rules, and why:
  * Expected group: after an applied round, the next round's matchmaking ends as soon as that many members
    have declared (RoundConfig.expected_group), instead of waiting out its window. After a failed round, or
    an applied round whose group shrank, it waits the full window once: those left out are often alive,
    merely late (a slow local step), and a window ended early by the smaller count would leave them out again
    for good.
  * Pause: a round that found fewer than min_participants ready formed no group (NoGroup): nobody ran it and
    its id is tried again. The participant says "paused" once per pause (not on every retry) and "resumed"
    when a round is applied again.
  * Meeting round: paused members retry their own next id; members that drifted apart (one retried an id the
    other already gave up) meet on the largest next round id that any peer at the same round with the same
    model published (a paused peer publishes the id it retries).
  * Outvoted: a member whose model hash after a round differs from what more participants published re-syncs
    to the majority's. A tie counts only once every member of the last round has reported (then the larger
    hash wins, so two nodes that disagree never both switch): a half-known vote must not move a node off the
    right model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RoundDecision:
    expected_group: int | None  # end the next matchmaking once this many declared; None: wait the full window
    announce_pause: bool = False  # the job just paused here: say so (once)
    resumed: bool = False  # a round applied after a pause
    publish: bool = False  # an applied round: publish its progress
    align: bool = False  # paused: meet the peers at this round and model on their largest next id (meeting_round)


class RoundPolicy:
    """One participant's policy for one job (see the module docstring)."""

    def __init__(self) -> None:
        self.last_size = 0  # members of the last applied round
        self.paused = False

    def after_round(self, ok: bool, members: int, paused: bool) -> RoundDecision:
        """The decision after an attempt: ``ok`` (its average was applied), its group's ``members``, ``paused``
        (it found fewer than min_participants and formed no group)."""
        shrank = ok and members < self.last_size
        expected = members if ok and not shrank else None
        if ok:
            self.last_size = members
        if paused:
            announce, self.paused = not self.paused, True
            return RoundDecision(expected, announce_pause=announce, align=True)
        if not ok:  # nothing changed here; a failed round is in the report, not in the progress
            return RoundDecision(expected)
        resumed, self.paused = self.paused, False
        return RoundDecision(expected, resumed=resumed, publish=True)


def meeting_round(own_next: int, peers_next: Iterable[int]) -> int:
    """The round id to try next while paused: the largest next id that a peer at this node's round with its model
    published, if later than its own."""
    return max([own_next, *peers_next])


def outvoted(own_hash: str, reports: Mapping[str, str], last_members: Iterable[str], me: str) -> str | None:
    """The model hash that more participants published for this node's round than this node's own (``reports``:
    every other writer's hash for that round), if any; ties per the module docstring."""
    others = {peer: h for peer, h in reports.items() if peer != me}
    if not others:
        return None
    votes = Counter(others.values())
    votes[own_hash] += 1
    mine = votes[own_hash]
    complete = set(last_members) <= set(others) | {me}
    best = max(votes, key=lambda h: (votes[h], h))
    if best == own_hash or (votes[best] == mine and not complete):
        return None
    return best
