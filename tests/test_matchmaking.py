"""protocol/allreduce/matchmaking.py: leader choice, the leader's plan, DHT entry wire forms, one invite per round,
and `discover` driven by an injected clock and sleep (no real waiting)."""

from __future__ import annotations

import asyncio
import math

import msgpack
import pytest

from protocol.allreduce.matchmaking import (
    MAX_DECLARATION_BYTES,
    MatchState,
    Seen,
    choose_leader,
    declaration_from_wire,
    declaration_to_wire,
    discover,
    make_plan,
    started_from_wire,
    started_to_wire,
)
from protocol.allreduce.messages import GroupPlan, TensorSpec
from protocol.planning.partition import plan_spans
from protocol.wire import WireError

TENSOR = TensorSpec("grads", 1000)
A, B, C, D, E = "peerA", "peerB", "peerC", "peerD", "peerE"


# ---- choose_leader -----------------------------------------------------------------------------------------


def test_leader_is_the_smallest_id_seen():
    assert choose_leader([C, B, D], me=E) == B
    assert choose_leader([C, D], me=A) == A


def test_leader_alone():
    assert choose_leader([], me=C) == C


def test_leader_same_for_every_peer_with_the_same_view():
    view = [D, B, C, E]
    assert {choose_leader([p for p in view if p != me], me) for me in view} == {B}
    assert choose_leader([B, B, C], me=B) == B  # own declaration read back from the DHT


# ---- make_plan ---------------------------------------------------------------------------------------------


def plan(bandwidths, leader=A, min_group=1, max_group=64, tensor=TENSOR):
    return make_plan("r1", leader, bandwidths, tensor, 123.5, min_group, max_group)


def test_plan_fields_and_sorted_members():
    p = plan({C: 1.0, A: 1.0, B: 2.0})
    assert isinstance(p, GroupPlan)
    assert p.round_id == "r1" and p.leader == A and p.tensor == TENSOR and p.deadline == 123.5
    assert p.members == (A, B, C)
    assert p.spans == (tuple(plan_spans(1000, [1.0, 2.0, 1.0])))
    assert p.spans == ((0, 250), (250, 750), (750, 1000))


def test_plan_includes_a_leader_that_is_not_the_smallest_id():
    p = plan({A: 1.0, B: 1.0, D: 1.0}, leader=D)
    assert p.leader == D and p.members == (A, B, D)


def test_plan_spans_follow_each_members_bandwidth_not_dict_order():
    p = plan({D: 0.0, B: 3.0, A: 1.0})
    assert p.members == (A, B, D)
    assert p.spans == ((0, 250), (250, 1000), (1000, 1000))  # zero bandwidth: contributes, owns nothing


def test_plan_all_zero_bandwidth_falls_back_to_equal_spans():
    p = plan({A: 0.0, B: 0.0, C: 0.0, D: 0.0})
    assert p.spans == ((0, 250), (250, 500), (500, 750), (750, 1000))


def test_plan_capped_at_max_group_keeps_the_leader():
    bws = {p: 1.0 for p in (A, B, C, D, E)}
    p = plan(bws, leader=E, max_group=3)
    assert p.members == (A, B, E)  # the leader plus the smallest other ids
    assert len(p.spans) == 3
    p = plan(bws, leader=A, max_group=2)
    assert p.members == (A, B)
    p = plan(bws, leader=C, max_group=1)
    assert p.members == (C,) and p.spans == ((0, 1000),)


def test_plan_none_below_min_group():
    assert plan({A: 1.0, B: 1.0}, min_group=3) is None
    assert plan({A: 1.0}, min_group=2) is None
    assert plan({A: 1.0, B: 1.0}, min_group=2).members == (A, B)


def test_plan_capped_at_max_group_equal_to_min_group():
    # max_group >= min_group is enforced, so capping alone never makes a plan too small
    assert plan({p: 1.0 for p in (A, B, C, D)}, min_group=3, max_group=3).members == (A, B, C)


def test_plan_tensor_of_size_zero():
    p = plan({A: 1.0, B: 1.0}, tensor=TensorSpec("grads", 0))
    assert p.spans == ((0, 0), (0, 0))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(min_group=0, max_group=4), "min_group"),
        (dict(min_group=3, max_group=2), "min_group"),
        (dict(min_group=-1, max_group=-1), "min_group"),
    ],
)
def test_plan_bad_group_bounds(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        make_plan("r1", A, {A: 1.0, B: 1.0}, TENSOR, 0.0, **kwargs)


def test_plan_leader_must_be_a_member():
    with pytest.raises(ValueError, match="leader"):
        make_plan("r1", C, {A: 1.0, B: 1.0}, TENSOR, 0.0, 1, 4)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_plan_bad_bandwidth_is_a_value_error(bad):
    with pytest.raises(ValueError):
        plan({A: 5.0, B: bad})


# ---- declarations and started markers on the wire ------------------------------------------------------------


@pytest.mark.parametrize("bw", [0.0, 1.0, 12.5e6, 1e14, 3])
def test_declaration_round_trip(bw):
    data = declaration_to_wire(bw)
    assert isinstance(data, bytes) and len(data) <= MAX_DECLARATION_BYTES
    out = declaration_from_wire(data)
    assert out == float(bw) and type(out) is float


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x93\x01\x02",  # truncated array
        msgpack.packb(1.0),  # not a map
        msgpack.packb({}),
        msgpack.packb({"bandwidth": 1.0}),
        msgpack.packb({"bw": "1.0"}),
        msgpack.packb({"bw": None}),
        msgpack.packb({"bw": True}),  # bool is not a number here
        msgpack.packb({"bw": -1.0}),
        msgpack.packb({"bw": math.nan}),
        msgpack.packb({"bw": math.inf}),
        msgpack.packb({"bw": 1e15}),
        msgpack.packb({"bw": 1.0}) + b"\x00",  # trailing bytes
        msgpack.packb({"bw": 1.0, "pad": "x" * MAX_DECLARATION_BYTES}),  # huge
        b"\x00" * (MAX_DECLARATION_BYTES + 1),
        msgpack.packb(msgpack.ExtType(1, b"x")),
    ],
)
def test_declaration_garbage_is_a_wire_error(data):
    with pytest.raises(WireError):
        declaration_from_wire(data)


@pytest.mark.parametrize("data", [None, "bw", 1.0, bytearray(declaration_to_wire(1.0)), {"bw": 1.0}])
def test_declaration_not_bytes_is_a_wire_error(data):
    with pytest.raises(WireError, match="not bytes"):
        declaration_from_wire(data)


@pytest.mark.parametrize("members", [(), (A,), (A, B, C), tuple(f"p{i:062d}" for i in range(100))])
def test_started_round_trip(members):
    assert started_from_wire(started_to_wire(members)) == members
    assert started_from_wire(started_to_wire(list(members))) == members


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([A, B]),  # not a map
        msgpack.packb({}),
        msgpack.packb({"members": A}),
        msgpack.packb({"members": None}),
        msgpack.packb({"members": [A, 1]}),
        msgpack.packb({"members": [A, b"peerB"]}, use_bin_type=True),
        msgpack.packb({"members": ["p" * 65]}),  # longer than a peer id
        msgpack.packb({"members": [A]}) + b"\x01",
        msgpack.packb({"members": [f"p{i:060d}" for i in range(1100)]}),  # over 64 KiB
    ],
)
def test_started_garbage_is_a_wire_error(data):
    with pytest.raises(WireError):
        started_from_wire(data)


@pytest.mark.parametrize("data", [None, [A], "members"])
def test_started_not_bytes_is_a_wire_error(data):
    with pytest.raises(WireError, match="not bytes"):
        started_from_wire(data)


# ---- MatchState -----------------------------------------------------------------------------------------


def test_accepts_exactly_one_invite_per_round():
    state = MatchState("r1", TENSOR)
    assert state.accepting
    assert state.accept_invite_from(A) is True
    assert not state.accepting
    assert state.accept_invite_from(A) is False  # not even the same leader twice
    assert state.accept_invite_from(B) is False


def test_a_peer_that_leads_accepts_no_invite():
    state = MatchState("r1", TENSOR)
    state.accepting = False
    assert state.accept_invite_from(A) is False


# ---- discover, with an injected clock and sleep ---------------------------------------------------------------


class FakeTime:
    """A clock that moves only when someone sleeps (or reads slowly)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class FakeDHT:
    """store/read callables; ``views[i]`` is what read number i returns (the last one repeats)."""

    def __init__(self, views: list[Seen], time: FakeTime | None = None, read_cost: float = 0.0) -> None:
        self.views, self.time, self.read_cost = views, time, read_cost
        self.events: list[str] = []

    async def store(self) -> bool:
        self.events.append("store")
        return True

    async def read(self) -> Seen:
        n = self.events.count("read")
        self.events.append("read")
        if self.time is not None:
            self.time.now += self.read_cost
        return self.views[min(n, len(self.views) - 1)]

    @property
    def reads(self) -> int:
        return self.events.count("read")


def run_discover(dht: FakeDHT, t: FakeTime, me: str = "me", expected=None, matchmaking_time=1.0, poll=0.25) -> Seen:
    return asyncio.run(discover(dht.store, dht.read, me, expected, matchmaking_time, poll=poll,
                                clock=t.clock, sleep=t.sleep))


def test_discover_returns_as_soon_as_expected_peers_are_seen():
    t = FakeTime()
    views = [Seen({A: 1.0}), Seen({A: 1.0, B: 2.0}), Seen({A: 1.0, B: 2.0, C: 3.0}), Seen({A: 1.0, B: 2.0, C: 3.0,
                                                                                           D: 4.0})]
    dht = FakeDHT(views)
    seen = run_discover(dht, t, expected=4)  # me + A, B, C
    assert seen == views[2]
    assert dht.reads == 3
    assert t.sleeps == [0.25, 0.25]
    assert t.now < 1000.0 + 1.0  # well before the deadline


def test_discover_expected_counts_me_once_when_my_own_declaration_is_read_back():
    t = FakeTime()
    dht = FakeDHT([Seen({"me": 1.0, A: 1.0})])
    seen = run_discover(dht, t, expected=3)
    assert seen.declared == {"me": 1.0, A: 1.0}
    assert t.now >= 1000.0 + 1.0  # waited for the deadline: only two distinct peers
    assert dht.reads == 5


def test_discover_expected_one_returns_on_the_first_read():
    t = FakeTime()
    dht = FakeDHT([Seen({})])
    assert run_discover(dht, t, expected=1) == Seen({})
    assert dht.reads == 1 and t.sleeps == []


def test_discover_returns_at_the_deadline_otherwise():
    t = FakeTime()
    dht = FakeDHT([Seen({A: 1.0})])
    seen = run_discover(dht, t, expected=5, matchmaking_time=1.0, poll=0.25)
    assert seen == Seen({A: 1.0})
    assert t.now >= 1000.0 + 1.0
    assert dht.reads == 5  # at t = 0, .25, .5, .75, 1.0
    assert t.sleeps == [0.25] * 4


def test_discover_without_expected_reads_until_the_deadline():
    t = FakeTime(start=0.0)
    dht = FakeDHT([Seen({A: 1.0, B: 1.0, C: 1.0})])
    run_discover(dht, t, expected=None, matchmaking_time=1.0, poll=0.25)
    assert t.now >= 1.0 and dht.reads == 5


def test_discover_last_sleep_is_clamped_to_the_deadline():
    t = FakeTime(start=0.0)
    dht = FakeDHT([Seen({})])
    run_discover(dht, t, expected=None, matchmaking_time=0.6, poll=0.25)
    assert dht.reads == 4  # at 0, .25, .5, .6
    assert t.sleeps[:2] == [0.25, 0.25] and t.sleeps[2] == pytest.approx(0.1)
    assert t.now >= 0.6 and t.now == pytest.approx(0.6)


def test_discover_slow_reads_still_end_at_the_deadline():
    t = FakeTime(start=0.0)
    dht = FakeDHT([Seen({})], time=t, read_cost=0.4)
    run_discover(dht, t, expected=None, matchmaking_time=1.0, poll=0.25)
    assert dht.reads == 2  # read at 0 (ends .4), sleep .25, read at .65 (ends 1.05): past the deadline
    assert t.now == pytest.approx(1.05)
    assert all(s >= 0 for s in t.sleeps)


def test_discover_returns_immediately_when_the_round_already_started():
    t = FakeTime()
    started = Seen({A: 1.0}, started=(A, B))
    dht = FakeDHT([started])
    assert run_discover(dht, t, expected=None) == started
    assert dht.reads == 1 and t.sleeps == []


def test_discover_started_seen_later_ends_the_wait():
    t = FakeTime()
    views = [Seen({A: 1.0}), Seen({A: 1.0}), Seen({A: 1.0}, started=())]  # even an empty started group counts
    dht = FakeDHT(views)
    assert run_discover(dht, t, expected=10) == views[2]
    assert dht.reads == 3 and t.sleeps == [0.25, 0.25]


def test_discover_stores_exactly_once_before_reading():
    t = FakeTime()
    dht = FakeDHT([Seen({A: 1.0})])
    run_discover(dht, t, expected=None)
    assert dht.events[0] == "store"
    assert dht.events.count("store") == 1
    assert dht.events[1:] == ["read"] * 5


def test_discover_deadline_counts_from_after_the_store():
    t = FakeTime(start=0.0)

    async def slow_store() -> bool:
        t.now += 10.0  # a slow DHT store must not eat the matchmaking window
        return True

    reads = []

    async def read() -> Seen:
        reads.append(t.now)
        return Seen({})

    asyncio.run(discover(slow_store, read, "me", None, 1.0, poll=0.5, clock=t.clock, sleep=t.sleep))
    assert reads == [10.0, 10.5, 11.0]
