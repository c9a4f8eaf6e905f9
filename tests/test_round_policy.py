"""protocol/planning/round_policy.py: the federated round policy, and that the daemon's participant
(node/jobs/federated/federated_jobs.py) and the simulator's groups (simulations/federated.py) both decide through
it: the same sequence of round outcomes gives the same decisions on both.

The participant runs here over a scripted runner (the JobRunner interface, with round outcomes taken from a
list) and an in-memory DHT, on a virtual clock (tests/clocks.py): its decisions, what it publishes and its
catch-up deadline are checked without a network and without waiting. The real rounds over real daemons are
tests/test_job_runner.py's and tests/test_jobs_integration.py's.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from node.jobs.board import POLL_S, JobBoard, JobView
from node.jobs.federated.federated_jobs import FederatedJobs
from node.jobs.federated.runner import RoundResult
from node.ml.datasets import write_node_data
from node.ml.job_model import build_job_model
from node.ml.models import flatten_params
from protocol.planning.round_policy import RoundPolicy, meeting_round, outvoted
from protocol.records.job_records import JobProgress, JobRecord, job_progress_from_wire
from protocol.records.job_spec import InnerOpt, JobSpec, ModelSpec
from protocol.records.peer_keys import peer_id_of
from protocol.transfer.job_state import params_hash
from simulations.federated import Group
from tests.clocks import VirtualClock
from tests.test_wire_bytes import KEY_A, KEY_B, KEY_C, KEY_D

ME, PEER, OTHER, FOURTH = (peer_id_of(k.public_key()) for k in (KEY_A, KEY_B, KEY_C, KEY_D))
H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64

# (applied, members, paused): a job that starts with 4, pauses twice (one retry each), loses a member, regains it
EVENTS = [(True, 4, False), (True, 4, False), (False, 0, True), (False, 0, True), (True, 3, False),
          (True, 3, False), (False, 4, False), (True, 4, False), (True, 2, False), (False, 0, True),
          (True, 4, False), (True, 4, False)]


# ---- the policy alone --------------------------------------------------------------------------------------


def test_expected_group_follows_applied_rounds_and_waits_a_full_window_after_a_shrink_or_failure():
    policy = RoundPolicy()
    assert policy.after_round(True, 4, False).expected_group == 4
    assert policy.after_round(True, 4, False).expected_group == 4
    assert policy.after_round(True, 3, False).expected_group is None  # shrank: those left out get a full window
    assert policy.after_round(True, 3, False).expected_group == 3
    assert policy.after_round(False, 3, False).expected_group is None  # failed
    assert policy.after_round(True, 5, False).expected_group == 5  # grew


def test_a_pause_is_announced_once_and_its_end_once():
    policy = RoundPolicy()
    first, again = policy.after_round(False, 0, True), policy.after_round(False, 0, True)
    assert first.announce_pause and first.align and not first.publish
    assert not again.announce_pause and again.align
    resumed = policy.after_round(True, 2, False)
    assert resumed.resumed and resumed.publish and not resumed.announce_pause
    later = policy.after_round(True, 2, False)
    assert not later.resumed and later.publish
    failed = policy.after_round(False, 2, False)  # a failed group is no pause and publishes nothing
    assert not (failed.publish or failed.announce_pause or failed.resumed or failed.align)


def test_paused_members_meet_on_the_largest_id():
    assert meeting_round(3, []) == 3
    assert meeting_round(3, [5, 4]) == 5
    assert meeting_round(7, [5, 4]) == 7


@pytest.mark.parametrize("own, reports, last, expected", [
    (H1, {}, (), None),  # nobody else reported
    (H1, {PEER: H1, OTHER: H1}, (PEER, OTHER), None),  # everyone agrees
    (H1, {PEER: H2, OTHER: H2}, (PEER, OTHER), H2),  # outvoted 2:1
    (H1, {PEER: H2}, (PEER, OTHER), None),  # a 1:1 tie while a member has not reported: stay
    (H1, {PEER: H2}, (PEER,), H2),  # a complete 1:1 tie: the larger hash wins ...
    (H2, {PEER: H1}, (PEER,), None),  # ... so the node holding it stays, and the two never both switch
    (H1, {PEER: H2, OTHER: H3, ME: H2}, (PEER, OTHER), H3),  # this node's own report is not a second vote
])
def test_outvoted(own, reports, last, expected):
    assert outvoted(own, reports, last, ME) == expected


# ---- the daemon's participant and the simulator's groups decide alike ----------------------------------------


class MemoryDHT:
    """The part of hivemind's DHTNode the job board uses, in memory (stores succeed; nothing to read back)."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, bytes, object]] = []

    async def store(self, key, value, expiration_time, subkey=None) -> bool:
        self.stored.append((key, value, subkey))
        return True

    async def get(self, key, latest=False):
        return None


class ScriptedRunner:
    """JobRunner's interface (what FederatedJobs uses), with each round's outcome taken from ``script``."""

    def __init__(self, p2p, dht, swarm, job_id, spec, data, *, script: list, bandwidth=0.0, hooks=None,
                 after_round=None, clock=None):
        self.job_id, self.spec = job_id, spec
        self.bundle = build_job_model(spec)
        self.params = flatten_params(self.bundle.module)
        self.completed = self.next_round = 0
        self.in_sync = True
        self.expected: list[int | None] = []  # every expect() call
        self.aligned: list[int] = []  # every align_round() call
        self.idle = asyncio.Event()
        self.idle.set()
        self.outcomes = list(script)
        self.on_round = None  # a test's hook, called after each round with the result
        self.excluded: dict[str, str] = {}  # members excluded on evidence (none here)

    @property
    def model_hash(self) -> str:
        return params_hash(self.params)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def expect(self, group_size: int | None) -> None:
        self.expected.append(group_size)

    def align_round(self, next_round: int) -> None:
        self.aligned.append(next_round)
        self.next_round = max(self.next_round, next_round)

    def snapshot(self):
        return self.params.copy(), None, self.completed, self.next_round

    async def run_round(self) -> RoundResult:
        ok, members, paused = self.outcomes.pop(0)
        r = self.next_round
        self.next_round = r if paused else r + 1
        if ok:
            self.completed += 1
        else:
            self.in_sync = bool(members) or paused
        participants = (ME, PEER, OTHER, FOURTH)[:members] if members else ()
        result = RoundResult(r, ok, None if ok else "no group" if paused else "a member died", participants, 0.5, 32,
                             {}, 100, 100, 0.1, 0.05, self.model_hash, paused=paused)
        if self.on_round is not None:
            self.on_round(result)
        return result


def job(rounds: int) -> JobSpec:
    return JobSpec(name="policy", model=ModelSpec("mlp", {"hidden": 8}), dataset="digits", task="classification",
                   rounds=rounds, inner=InnerOpt("sgd", 0.1), round_timeout_s=12.0, min_participants=2)


def participant(tmp_path, spec: JobSpec, script: list, clock: VirtualClock, on_round=None):
    """FederatedJobs over an in-memory board, this node holding a digits slice; the runners it makes."""
    write_node_data("digits", tmp_path / "data" / "digits", n_nodes=2, node_index=0, scheme="iid", seed=0)
    board = JobBoard(MemoryDHT(), "policy", ME, clock)
    made: list[ScriptedRunner] = []

    def factory(*args, **kwargs) -> ScriptedRunner:
        made.append(ScriptedRunner(*args, script=script, **kwargs))
        made[-1].on_round = on_round
        return made[-1]

    jobs = FederatedJobs(None, board, tmp_path / "home", tmp_path / "data", clock=clock, runner_factory=factory)
    record = JobRecord.create(spec, PEER, "n1", 1_700_000_000.0)
    view = board.views.setdefault(record.job_id, JobView(record))
    return jobs, board, view, made


def test_the_participant_and_the_simulator_decide_the_same_from_the_same_rounds(tmp_path):
    spec = job(rounds=sum(ok for ok, _, _ in EVENTS))
    jobs, board, view, made = participant(tmp_path, spec, EVENTS, VirtualClock())
    asyncio.run(jobs.run(view))
    group = Group(0, 0)
    simulated = [group.after_round(ok, members) for ok, members, _ in EVENTS]
    assert made[0].expected == simulated
    assert simulated == [4, 4, None, None, None, 3, None, 4, None, None, 4, 4]


def test_a_pause_is_published_once_and_paused_peers_meet_on_the_largest_round_id(tmp_path):
    clock = VirtualClock()
    script = [(True, 2, False), (False, 0, True), (False, 0, True), (True, 2, False)]
    views: list[JobView] = []

    def before_the_retry(result: RoundResult) -> None:  # a paused peer on the same model already tries round 7
        if result.paused:
            views[0].at_best = (JobProgress(views[0].job_id, PEER, 1, result.model_hash, "paused", next_round=7),)

    jobs, board, view, made = participant(tmp_path, job(rounds=2), script, clock, before_the_retry)
    views.append(view)
    asyncio.run(jobs.run(view))
    published = [(p.state, p.round, p.next_round) for p in
                 (job_progress_from_wire(value) for key, value, subkey in board.dht.stored)]
    assert [state for state, _, _ in published] == ["running", "running", "paused", "done"]
    assert made[0].aligned == [7, 7]  # both paused attempts meet the peer's id
    assert published[-1] == ("done", 2, 8)  # the applied round after the pause ran as round 7
    assert clock.now == 0.0  # nothing in this flow waits on the clock


def test_a_node_left_out_waits_one_round_timeout_for_who_moved_on_then_goes_on(tmp_path):
    clock = VirtualClock()
    script = [(True, 2, False), (False, 0, False), (True, 2, False)]  # round 1: left out (no members, no pause)
    jobs, board, view, made = participant(tmp_path, job(rounds=2), script, clock)
    asyncio.run(jobs.run(view))
    runner = made[0]
    assert runner.completed == 2 and runner.in_sync
    assert set(clock.sleeps) == {POLL_S / 2}  # it polled the board every half second ...
    assert clock.now == pytest.approx(12.0, abs=POLL_S / 2)  # ... for one round timeout, then went on
    assert np.isfinite(runner.params).all()
