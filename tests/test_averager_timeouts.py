"""The timeout logic of the all-reduce round (protocol/allreduce/averager.py), on a virtual clock (tests/clocks.py).

The fast counterpart of the real-process rounds in which a member dies in matchmaking or a group never forms
(tests/test_allreduce_integration.py test_member_sigkilled_in_each_phase[matchmaking], ~27 s, and `make chaos`'s
tests/test_chaos.py): there the deadlines pass in real seconds between real processes; here an Averager runs
matchmaking against an in-memory DHT whose declarations the test scripts, and each deadline is reached at once and
checked at its exact virtual time:
  * a leader (the smallest declared peer id) that never sends a plan: the member waits matchmaking_time +
    2 * invite_timeout for it after discovery, then the round ends without a group (nothing applied, the update
    handed back whole);
  * a retry of that round id skips the dead leader (a suspect), so it does not wait for it again;
  * a round that ran blocks its id for the round's budget, and is forgotten (its id free again) after it.
No stream is ever opened on these paths: the stand-in p2p records any dial, and the tests check there was none.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from protocol.allreduce.averager import Averager
from protocol.allreduce.matchmaking import (
    declaration_to_wire,
    declared_subkey,
    round_key,
    started_subkey,
    started_to_wire,
)
from protocol.allreduce.messages import TensorSpec
from protocol.allreduce.rounds import RoundConfig, RoundOutcome
from protocol.allreduce.sparsify import SparseUpdate
from tests.clocks import VirtualClock
from tests.test_wire_bytes import ID_A, ID_B, ID_C

LEADER, ME, LATE = sorted([ID_A, ID_B, ID_C])  # the smallest id leads (matchmaking.choose_leader)
TENSOR = TensorSpec("grads", 100)
CONFIG = RoundConfig(swarm="timeouts", tensor=TENSOR, matchmaking_time=3.0, invite_timeout=1.5, result_timeout=10.0,
                     commit_timeout=2.0)
BUDGET = 3.0 + 2 * 1.5 + 10.0 + 2.0 + 5.0  # a round's state is kept this long (RoundConfig.round_budget)


class NoStreamsP2P:
    """The part of hivemind's P2P an Averager touches on these paths: its peer id; any dial is recorded."""

    def __init__(self, me: str):
        self.peer_id = PeerID.from_base58(me)
        self.dialed: list[tuple[str, str]] = []

    async def call_binary_stream_handler(self, peer, protocol):
        self.dialed.append((peer.to_base58(), protocol))
        raise ConnectionRefusedError("no stream expected in this test")


@dataclasses.dataclass
class Item:
    value: bytes
    expiration_time: float = 0.0  # long past on the DHT's clock: matchmaking bounds only how far ahead it is


@dataclasses.dataclass
class Found:
    value: dict[str, Item]


class RoundDHT:
    """The part of hivemind's DHTNode matchmaking uses, in memory: every round's key holds the ``scripted`` entries
    (subkey -> bytes) plus what was stored under it."""

    def __init__(self, scripted: dict[str, bytes]):
        self.scripted = scripted
        self.stored: dict[str, dict[str, bytes]] = {}

    async def store(self, key, value, expiration_time, subkey=None) -> bool:
        self.stored.setdefault(key, {})[subkey] = value
        return True

    async def get(self, key, latest=False):
        entries = {**self.scripted, **self.stored.get(key, {})}
        return Found({subkey: Item(raw) for subkey, raw in entries.items()}) if entries else None


def update() -> SparseUpdate:
    return SparseUpdate(np.array([1, 5, 42, 99], np.int64), np.array([0.5, -1.0, 2.0, 0.25], np.float32), TENSOR.size)


def averager(scripted: dict[str, bytes]) -> tuple[Averager, VirtualClock, RoundDHT, NoStreamsP2P]:
    clock, dht, p2p = VirtualClock(), RoundDHT(scripted), NoStreamsP2P(ME)
    return Averager(p2p, dht, CONFIG, clock=clock), clock, dht, p2p


async def timed_step(avg: Averager, clock: VirtualClock, round_id: str) -> tuple[RoundOutcome, float, float]:
    """The outcome, the virtual seconds the round took, and how many of them it slept in discovery's polls."""
    start, slept = clock.monotonic(), len(clock.sleeps)
    outcome = await avg.step(round_id, update(), 2.0)
    return outcome, clock.monotonic() - start, sum(clock.sleeps[slept:])


def assert_no_group(outcome: RoundOutcome) -> None:
    """Nothing applied; the whole update comes back for the error-feedback buffer."""
    report = outcome.report
    assert report.no_group and not report.ok and report.members == () and report.spans_applied == ()
    assert outcome.average is None
    sent = update()
    assert np.array_equal(outcome.returned.indices, sent.indices)
    assert np.array_equal(outcome.returned.values, sent.values)
    assert outcome.returned.size == sent.size


def test_a_leader_that_sends_no_plan_ends_the_round_without_a_group_after_the_plan_wait():
    avg, clock, dht, p2p = averager({declared_subkey(LEADER): declaration_to_wire(1e6)})  # declared, then died
    outcome, took, discovery = asyncio.run(timed_step(avg, clock, "r1"))
    assert_no_group(outcome)
    assert outcome.report.error == "no group: no leader sent a plan in time"
    assert discovery == pytest.approx(CONFIG.matchmaking_time)  # read the declarations for the whole window
    # then waited for the leader's plan for matchmaking_time + 2 * invite_timeout, and not a moment longer
    assert took - discovery == pytest.approx(CONFIG.matchmaking_time + 2 * CONFIG.invite_timeout)
    assert took <= BUDGET  # within the round's own window
    mine = {declared_subkey(ME): declaration_to_wire(CONFIG.bandwidth)}
    assert dht.stored[round_key(CONFIG.swarm, TENSOR.name, "r1")] == mine
    assert p2p.dialed == []


def test_a_retry_of_the_round_skips_the_leader_that_sent_no_plan():
    avg, clock, dht, p2p = averager({declared_subkey(LEADER): declaration_to_wire(1e6)})  # it outlives its peer

    async def scenario():
        first = await timed_step(avg, clock, "r1")
        retry = await timed_step(avg, clock, "r1")  # the same id: nobody ran it
        return first, retry

    (first, took_first, _), (retry, took_retry, discovery) = asyncio.run(scenario())
    assert_no_group(first)
    assert_no_group(retry)
    assert took_first == pytest.approx(2 * CONFIG.matchmaking_time + 2 * CONFIG.invite_timeout)
    # the suspect is passed over: this member would lead a group of one (below min_group), without waiting
    assert retry.report.error == "no group: fewer than min_group members"
    assert took_retry == pytest.approx(CONFIG.matchmaking_time) and discovery == pytest.approx(took_retry)
    assert p2p.dialed == []  # it invited nobody: the dead leader was its only candidate


def test_a_round_that_ran_blocks_its_id_until_its_budget_has_passed():
    # every round here finds a group already started without this member: it fails at once, having run
    avg, clock, _, p2p = averager({declared_subkey(LEADER): declaration_to_wire(1e6),
                                   declared_subkey(LATE): declaration_to_wire(1e6),
                                   started_subkey(LEADER): started_to_wire([LEADER, LATE])})

    async def scenario():
        ran = await avg.step("r1", update())
        assert not ran.report.no_group and not ran.ok and ran.average is None
        assert "the round started without this peer" in ran.report.error and clock.monotonic() == 0.0
        with pytest.raises(ValueError, match="round 'r1' already ran on this member"):
            await avg.step("r1", update())
        clock.advance(BUDGET)
        await avg.step("r2", update())  # at r1's budget exactly: r1 is still remembered
        with pytest.raises(ValueError, match="round 'r1' already ran on this member"):
            await avg.step("r1", update())
        clock.advance(0.5)  # past r1's budget: forgotten by its own retry, its id free again (r2 is still kept)
        again = await avg.step("r1", update())
        assert "the round started without this peer" in again.report.error
        with pytest.raises(ValueError, match="round 'r2' already ran on this member"):
            await avg.step("r2", update())

    asyncio.run(scenario())
    assert p2p.dialed == []
