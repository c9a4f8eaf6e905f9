"""The simulator's members behind NATs (simulations/relays.py): spans by scaled bandwidth through the real
make_plan, relayed bytes only between private members, the relay hop in the round trip, and whole swarms."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.allreduce.matchmaking import make_plan
from protocol.allreduce.messages import TensorSpec
from simulations.churn import ChurnConfig
from simulations.federated import FederatedConfig
from simulations.relays import RELAY_S_PER_BYTE, planning_bandwidths, relay_cpu_s, relayed_bytes, with_relays
from simulations.roundtime import butterfly
from simulations.swarm import Swarm, SwarmConfig

BW, LAT = [12.5e6, 12.5e6, 5e6, 5e6], [0.01, 0.02, 0.03, 0.04]


def test_private_members_own_their_share_of_a_span_and_a_group_of_them_splits_evenly():
    assert planning_bandwidths(BW, [False, False, True, True], 0.0) == [12.5e6, 12.5e6, 0.0, 0.0]
    assert planning_bandwidths(BW, [False, False, True, True], 0.5) == [12.5e6, 12.5e6, 2.5e6, 2.5e6]
    ids = [f"p{i}" for i in range(4)]
    plan = make_plan("r", ids[0], dict(zip(ids, planning_bandwidths(BW, [False, False, True, True], 0.0))),
                     TensorSpec("t", 1000), 1.0, 2, 4)
    assert [e - s for s, e in plan.spans] == [500, 500, 0, 0]
    everyone = make_plan("r", ids[0], dict(zip(ids, planning_bandwidths(BW, [True] * 4, 0.0))),
                         TensorSpec("t", 1000), 1.0, 2, 4)
    assert [e - s for s, e in everyone.spans] == [250] * 4


def test_only_traffic_between_private_members_is_relayed_and_it_pays_the_hop():
    b = butterfly(BW, LAT, 1_000_000, 0.01)
    assert not relayed_bytes(b, [False, False, False, True]).any()  # one private member: all its peers are public
    assert relay_cpu_s(b, [True, False, False, False]) == 0.0 and with_relays(b, [True, False, False, False],
                                                                             LAT, 0.02) is b
    nat = [False, False, True, True]
    moved = relayed_bytes(b, nat)
    assert moved[0] == moved[1] == 0 and moved[2] > 0 and moved[3] > 0
    # member 2: its part to owner 3 and owner 3's result to it, plus owner 2's part from 3 and result to 3
    assert moved[2] == pytest.approx(b.part_bytes[3] + b.result_bytes[3] + b.part_bytes[2] + b.result_bytes[2])
    assert relay_cpu_s(b, nat) == pytest.approx(moved.max() * RELAY_S_PER_BYTE)
    hop = with_relays(b, nat, LAT, 0.02)
    assert hop.rtt_s == pytest.approx(2 * (0.03 + 0.04) + 4 * 0.02) and hop.rtt_s > b.rtt_s
    spans = [400_000, 400_000, 100_000, 100_000]  # a smaller share moves fewer bytes through the relays
    assert relayed_bytes(butterfly(BW, LAT, 1_000_000, 0.01, spans=spans), nat).max() < moved.max()


def run(natted: float, share: float, seed: int = 7) -> dict:
    fed = FederatedConfig(params=20_000_000, local_steps=5, natted=natted, relayed_span_share=share)
    return Swarm(SwarmConfig(nodes=200, hours=2, seed=seed, churn=ChurnConfig(0.0), federated=fed,
                             pipeline=None)).run()["summary"]


def test_swarms_with_more_private_members_round_slower_and_span_ownership_barely_matters():
    plain, half, half_spans, most = run(0.0, 0.0), run(0.5, 0.0), run(0.5, 1.0), run(0.9, 0.0)
    assert plain["natted_members"] == 0 and 70 < half["natted_members"] < 130 and most["natted_members"] > 150
    assert plain["failed_fraction"] == half["failed_fraction"] == most["failed_fraction"] == 0
    rate = [s["rounds_per_hour_per_group"] for s in (plain, half, half_spans, most)]
    assert rate[0] > rate[1] > rate[3]  # more private members, more pairs whose round trips cross a relay
    # owning spans: their links carry part of the load, the relays copy the parts between private members; as on
    # the NAT testbed (scripts/bench_nat.py: 5.381 vs 5.384 s per round) the two come out within 2%
    assert abs(rate[2] - rate[1]) / rate[1] < 0.02
    np.testing.assert_equal(run(0.0, 1.0)["rounds_completed"], plain["rounds_completed"])  # no one private
    with pytest.raises(ValueError, match="relayed_span_share"):
        FederatedConfig(relayed_span_share=1.5)
    with pytest.raises(ValueError, match="fraction"):
        FederatedConfig(natted=-0.1)
