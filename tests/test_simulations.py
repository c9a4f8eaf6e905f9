"""The swarm simulator (simulations/): engine, reuse of protocol planning, churn calibration, round-time model,
federated and pipeline behaviour under churn, and the CLI. All seeded and fast (a few seconds in total)."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from protocol.allreduce.codecs import smallest_encoding
from protocol.allreduce.matchmaking import make_plan
from protocol.allreduce.sparsify import SparseUpdate
from protocol.planning.partition import plan_spans, span_sizes
from protocol.planning.stage_assign import NodeSpec, assign_nodes
from simulations.churn import HOUR, ChurnConfig, ChurnProcess
from simulations.engine import Clock, Engine
from simulations.federated import FederatedConfig
from simulations.model import GPUS, MBIT, PopulationConfig, draw_nodes
from simulations.pipeline import PipelineConfig, PipelineSim
from simulations.roundtime import (
    BENCH_BURST_BYTES,
    COSTS,
    NETNS_ROUND_S,
    butterfly,
    fair_cpu_share,
    payload_bytes,
    phases,
    predict_round_time,
)
from simulations.swarm import Swarm, SwarmConfig

REPO = pathlib.Path(__file__).resolve().parents[1]

SMALL_FED = FederatedConfig(params=20_000_000, local_steps=5)  # quick rounds for small swarms
SMALL_PIPE = PipelineConfig(layers=8, stages=4, search_budget=20_000)  # small enough for a proven optimum


def small_swarm(churn: float, *, nodes: int = 200, hours: float = 2.0, seed: int = 7, **kw) -> dict:
    config = SwarmConfig(nodes=nodes, hours=hours, seed=seed, churn=ChurnConfig(churn), federated=SMALL_FED,
                         pipeline=SMALL_PIPE, pipeline_nodes=10, **kw)
    return Swarm(config).run()


# ---- engine --------------------------------------------------------------------------------------------------


def test_engine_fires_events_in_time_order_with_fifo_ties_and_moves_the_injected_clock():
    clock = Clock(100.0)
    engine = Engine(clock)
    seen = []
    engine.at(103.0, lambda: seen.append(("c", clock.now())))
    engine.at(101.0, lambda: seen.append(("a", clock.now())))
    engine.at(102.0, lambda: seen.append(("b1", clock.now())))
    engine.at(102.0, lambda: seen.append(("b2", clock.now())))
    cancelled = engine.at(101.5, lambda: seen.append(("never", clock.now())))
    cancelled.cancel()

    def chain():  # a callback scheduling more work now and later
        seen.append(("chain", clock.now()))
        engine.after(0.0, lambda: seen.append(("same-time", clock.now())))
        engine.after(10.0, lambda: seen.append(("late", clock.now())))

    engine.at(102.5, chain)
    assert engine.run(until=105.0) == 6
    assert seen == [("a", 101.0), ("b1", 102.0), ("b2", 102.0), ("chain", 102.5), ("same-time", 102.5),
                    ("c", 103.0)]
    assert clock.now() == 105.0 and engine.clock is clock  # the clock it was given, left at `until`
    assert engine.pending() == 1
    engine.run()
    assert seen[-1] == ("late", 112.5) and clock.now() == 112.5


def test_engine_refuses_the_past_and_the_clock_never_goes_back():
    engine = Engine()
    engine.run(until=5.0)
    with pytest.raises(ValueError):
        engine.at(4.0, print)
    with pytest.raises(ValueError):
        engine.after(-1.0, print)
    with pytest.raises(ValueError):
        engine.at(math.nan, print)
    with pytest.raises(ValueError):
        engine.clock.advance_to(1.0)


def test_swarm_runs_on_the_clock_it_is_given():
    clock = Clock()
    swarm = Swarm(SwarmConfig(nodes=50, hours=0.5, churn=ChurnConfig(0.0), federated=SMALL_FED, pipeline=None),
                  clock=clock)
    report = swarm.run()
    assert swarm.engine.clock is clock and clock.now() == 0.5 * HOUR
    assert report["timeline"][-1]["t_h"] == 0.5


# ---- reuse of the protocol's planning code ----------------------------------------------------------------


def test_simulated_spans_are_protocol_partition_spans():
    rng = np.random.default_rng(0)
    bws = (rng.uniform(10, 1000, 16) * MBIT).tolist()
    b = butterfly(bws, [0.01] * 16, 124_439_808, 0.01)
    assert b.spans == tuple(span_sizes(124_439_808, bws))
    ids = [f"n{i:07d}" for i in range(16)]
    plan = make_plan("r", ids[0], dict(zip(ids, bws)), FederatedConfig().round_config().tensor, 0.0, 2, 16)
    assert [e - s for s, e in plan.spans] == list(b.spans)
    assert list(plan.spans) == plan_spans(FederatedConfig().params, bws)


def test_groups_in_the_swarm_use_make_plan_spans():
    swarm = Swarm(SwarmConfig(nodes=120, hours=0.25, churn=ChurnConfig(0.0), federated=SMALL_FED, pipeline=None))
    swarm.run()
    checked = 0
    for g in swarm.fed.groups:
        if g.cache is None:
            continue
        (members, _), b, _ = g.cache
        bws = [g.members[m].bw for m in members]
        assert b.spans == tuple(span_sizes(SMALL_FED.params, bws))
        assert list(members) == sorted(members)  # make_plan's member order
        checked += 1
    assert checked >= 5


def test_payload_bytes_match_the_real_codec():
    rng = np.random.default_rng(1)
    for length, density in ((3_000_000, 0.01), (500_000, 0.15), (200_000, 0.6)):
        nnz = round(length * density)
        idx = np.sort(rng.choice(length, nnz, replace=False)).astype(np.int64)
        real = smallest_encoding(SparseUpdate(idx, rng.standard_normal(nnz).astype(np.float32), length)).nbytes
        assert payload_bytes(length, nnz) == pytest.approx(real, rel=0.02)


def test_benchmark_bytes_and_round_time_match_the_testbed():
    """README: 4 peers, 10M params, 1%: 1.75% of the dense butterfly's bytes with fp16 values (issue 17's fair-speed
    run, Rice-coded indices since; 1.90% with the earlier delta-varint indices); 0.353 s (exact) and 0.291 s
    (approx) per round on 100 Mbit/s netns links (tbf, 256 KiB bucket) with 4 peers on 2 cores. Neither run is
    in the calibration (scripts/calibrate_roundtime.py), and the machine's other load then is unknown: a generous
    tolerance. tests/test_simulation_validation.py holds the model to 25% against real nodes."""
    b = butterfly([12.5e6] * 4, [0.0] * 4, 10_000_000, 0.01)
    dense = 2 * 3 / 4 * 4 * 10_000_000
    assert b.sent.mean() / dense == pytest.approx(0.0175, rel=0.03)
    for select, measured in NETNS_ROUND_S.items():
        predicted = predict_round_time([(12.5e6, 0.0)] * 4, 10_000_000, 0.01, select=select, cpu_share=0.5,
                                       burst_bytes=BENCH_BURST_BYTES)
        assert predicted == pytest.approx(measured, rel=0.35), select
    slow = predict_round_time([(1.25e6, 0.05)] * 4, 10_000_000, 0.01)
    fast = predict_round_time([(125e6, 0.005)] * 4, 10_000_000, 0.01)
    bigger = predict_round_time([(1.25e6, 0.05)] * 16, 10_000_000, 0.01)
    assert fast < slow < bigger


def test_cpu_terms_scale_with_the_share_and_the_group():
    """Uncapped links: the round is CPU work / cpu_share; more members cost more per member (streams, DHT)."""
    wide = [(1e12, 0.0)]
    t4 = predict_round_time(wide * 4, 4_000_000, 0.01, cpu_share=0.5)
    assert predict_round_time(wide * 4, 4_000_000, 0.01, cpu_share=0.25) == pytest.approx(2 * t4, rel=0.05)
    t8, t16 = (predict_round_time(wide * n, 4_000_000, 0.01, cpu_share=0.5) for n in (8, 16))
    assert t4 < t8 < t16 and t16 - t8 > t8 - t4  # the (n - 1)^2 term
    assert predict_round_time(wide * 4, 4_000_000, 0.01, select="approx", cpu_share=0.5) < t4
    zero = COSTS.__class__(param_s={"exact": 0.0, "approx": 0.0}, peer_s=0.0, pair_s=0.0, round_s=0.0,
                           codec_rate=math.inf)
    assert predict_round_time(wide * 4, 4_000_000, 0.01, cpu_share=0.5, costs=zero) == pytest.approx(0.01, abs=1e-3)


def test_token_bucket_passes_its_burst_at_line_rate():
    """tc tbf: the first burst_bytes of each phase's transfer cost no link time; the rest goes at the rate."""
    nodes = [(6.25e6, 0.0)] * 4  # 50 Mbit/s
    b = butterfly([6.25e6] * 4, [0.0] * 4, 1_000_000, 0.01)
    assert b.sent.max() * 1.05 < BENCH_BURST_BYTES  # a 1M round fits in the bucket
    plain, shaped = (predict_round_time(nodes, 1_000_000, 0.01, cpu_share=0.5, burst_bytes=x)
                     for x in (0.0, BENCH_BURST_BYTES))
    wide = predict_round_time([(1e12, 0.0)] * 4, 1_000_000, 0.01, cpu_share=0.5)
    assert shaped == pytest.approx(wide, rel=1e-4) and plain > shaped
    big = butterfly([6.25e6] * 4, [0.0] * 4, 10_000_000, 0.01, burst_bytes=BENCH_BURST_BYTES)
    ph = phases(big, 10_000_000, cpu_share=1.0)
    assert ph.reduce_scatter_s == pytest.approx(max(0.0, big.rs_wire.max() - BENCH_BURST_BYTES) / 6.25e6)
    assert 0 < ph.all_gather_s <= big.ag_wire.max() / 6.25e6


def test_fair_cpu_share_is_max_min_fair():
    assert fair_cpu_share(2, 4) == 0.5 and fair_cpu_share(2, 1) == 1.0  # at most one core per member
    assert fair_cpu_share(2, 4, [1.0]) == pytest.approx(0.4)  # a busy session counts as one more member
    assert fair_cpu_share(2, 4, [0.1, 0.2]) == pytest.approx((2 - 0.3) / 4)  # light ones keep what they use
    assert fair_cpu_share(2, 8, [0.6, 0.6, 0.6]) == pytest.approx(2 / 11)
    for bad in ((0, 4), (2, 0)):
        with pytest.raises(ValueError):
            fair_cpu_share(*bad)
    with pytest.raises(ValueError):
        fair_cpu_share(2, 4, [-1.0])


def test_predict_round_time_rejects_bad_input():
    with pytest.raises(ValueError):
        predict_round_time([], 10, 0.1)
    with pytest.raises(ValueError):
        predict_round_time([(0.0, 0.0)], 10, 0.1)
    with pytest.raises(ValueError):
        predict_round_time([(1e6, 0.0)], 10, 1.5)


# ---- population and churn -------------------------------------------------------------------------------------


def test_population_draws_links_and_real_gpus_reproducibly():
    config = PopulationConfig()
    a = draw_nodes(config, 2000, np.random.default_rng(5))
    b = draw_nodes(config, 2000, np.random.default_rng(5))
    assert a == b
    mbit = np.array([x.bandwidth / MBIT for x in a])
    assert mbit.min() >= 10 and mbit.max() <= 1000 and 60 < np.median(mbit) < 160  # log-uniform: median 100
    assert {x.gpu for x in a} == set(range(len(GPUS)))
    assert all(x.tflops == pytest.approx(config.mfu * GPUS[x.gpu].train_tflops) for x in a)
    assert all(g.source and g.fp32_tflops > 0 for g in GPUS)


@pytest.mark.parametrize("family,shape", [("lognormal", 1.5), ("pareto", 2.5)])
def test_churn_matches_the_configured_fraction_per_hour(family, shape):
    n, rate, hours = 2000, 0.3, 48
    churn = ChurnProcess(ChurnConfig(rate, family, shape), np.random.default_rng(11))
    engine = Engine()
    state = {"alive": 0, "left": 0, "node_s": 0.0, "t": 0.0}

    def tick():
        state["node_s"] += state["alive"] * (engine.now() - state["t"])
        state["t"] = engine.now()

    def leave():
        tick()
        state["alive"] -= 1
        state["left"] += 1

    def join(remaining):
        tick()
        state["alive"] += 1
        engine.after(remaining, leave)

    def arrive():
        join(churn.session())
        engine.after(churn.next_arrival_gap(n), arrive)

    for remaining in churn.initial_remaining(n):
        join(float(remaining))
    engine.after(churn.next_arrival_gap(n), arrive)
    engine.run(until=hours * HOUR)
    tick()
    mean_alive = state["node_s"] / (hours * HOUR)
    assert mean_alive == pytest.approx(n, rel=0.05)
    assert state["left"] / (mean_alive * hours) == pytest.approx(rate, rel=0.08)


def test_churn_config_validates():
    assert math.isinf(ChurnProcess(ChurnConfig(0.0), np.random.default_rng(0)).session())
    for bad in (dict(rate_per_hour=1.5), dict(rate_per_hour=-0.1), dict(family="pareto", shape=1.0),
                dict(family="weibull")):
        with pytest.raises(ValueError):
            ChurnConfig(**bad)


# ---- the swarm under churn ------------------------------------------------------------------------------------


def test_no_churn_means_no_failed_rounds_and_the_pipeline_at_its_reference():
    report = small_swarm(0.0)
    s = report["summary"]
    assert s["rounds_completed"] > 500
    assert s["failed_fraction"] == 0 and s["aborted_fraction"] == 0 and s["departures"] == 0
    assert s["delayed_mass_per_node_mean"] == 0 and s["recovery_fraction"] == 0
    assert all(r["pipeline_rate"] == r["pipeline_reference"] > 0 for r in report["timeline"])
    assert s["pipeline_ratio_min"] == 1.0


def test_more_churn_fails_more_rounds_and_delays_more_mass():
    reports = [small_swarm(c, nodes=300, hours=3) for c in (0.0, 0.2, 0.6)]
    failed = [r["summary"]["failed_fraction"] for r in reports]
    returned = [r["summary"]["returned_fraction"] for r in reports]
    delayed = [r["summary"]["delayed_mass_per_node_mean"] for r in reports]
    recovery = [r["summary"]["recovery_fraction"] for r in reports]
    assert failed[0] == 0 < failed[1] < failed[2]
    assert returned[0] == 0 < returned[1] < returned[2]
    # churn delays mass, but its mean at 300 nodes x 3 h does not order 0.2 vs 0.6 reliably: with the earlier
    # round-time model seeds 1, 3 and 4 already gave 0.2 >= 0.6 (seed 7 passed by luck); with the recalibrated one
    # seed 7 gives 0.00089 vs 0.00079
    assert delayed[0] == 0 < min(delayed[1:])
    assert recovery[0] == 0 < recovery[1] < recovery[2]
    measured = [r["summary"]["churn_per_hour_measured"] for r in reports]
    assert measured[0] == 0 and measured[1] < measured[2]


def test_pipeline_throughput_never_beats_the_proven_optimum():
    report = small_swarm(0.5, hours=6, seed=3)
    rows = report["timeline"]
    assert all(r["pipeline_reference_optimal"] for r in rows)  # small enough for the exact search
    assert all(r["pipeline_rate"] <= r["pipeline_reference"] * (1 + 1e-9) for r in rows)
    assert all(r["pipeline_reference"] <= r["pipeline_upper_bound"] * (1 + 1e-9) for r in rows)
    assert any(r["pipeline_rate"] < r["pipeline_reference"] for r in rows)  # churn does cost something


def test_pipeline_sim_counts_only_replicas_that_hold_their_shard():
    sim = PipelineSim(SMALL_PIPE)
    rng = np.random.default_rng(2)
    specs = []
    for i, d in enumerate(x for x in draw_nodes(PopulationConfig(), 40, rng) if x.memory_bytes >= sim.min_memory):
        specs.append((sim.spec(f"n{i:03d}", d.tflops, d.bandwidth, d.memory_bytes), d.bandwidth))
    specs = specs[:8]
    sim.start(0.0, specs)
    full = sim.throughput(0.0)
    assert full == pytest.approx(assign_nodes(sim.plan, [s for s, _ in specs], search_budget=20_000).min_rate)
    victim = sim.assignment.stages[sim.assignment.bottleneck][0].node_id
    sim.leave(10.0, victim)
    assert sim.throughput(10.0) <= sim.reference()[0] * (1 + 1e-9)
    sim.join(20.0, NodeSpec("joiner", 50.0, 1e12), 12.5e6)
    assert sim.ready_at["joiner"] > 20.0  # it downloads its shard first
    before = sim.throughput(20.0)
    assert sim.throughput(sim.ready_at["joiner"]) >= before


def test_same_seed_same_report():
    a = small_swarm(0.3, nodes=150, hours=1, seed=9)
    b = small_swarm(0.3, nodes=150, hours=1, seed=9)
    c = small_swarm(0.3, nodes=150, hours=1, seed=10)
    assert a["summary"] == b["summary"] and a["timeline"] == b["timeline"]
    assert a["summary"] != c["summary"]


# ---- the CLI --------------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_the_json_report_and_pngs(tmp_path):
    out = tmp_path / "sim"
    done = run_cli("--nodes", "200", "--hours", "1", "--out", str(out), "--seed", "1")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["nodes"] == 200 and len(report["timeline"]) == 6
    for key in ("rounds_per_hour", "failed_fraction", "delayed_mass_per_node_mean", "wire_mb_per_node_h",
                "recovery_fraction", "pipeline_time_ratio"):
        assert key in report["summary"]
    check = report["testbed_check"]
    assert abs(check["exact"]["error"]) < 0.35 and abs(check["approx"]["error"]) < 0.35
    for name in ("timeline.png", "population.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in done.stdout


@pytest.mark.parametrize("args", [["--churn", "1.5"], ["--nodes", "0"], ["--nodes", "ten"], ["--hours", "0"],
                                  ["--density", "2"], ["--min-group", "8", "--max-group", "4"], ["--bogus"]])
def test_cli_bad_flags_fail_in_one_line_with_status_2(args, tmp_path):
    done = run_cli(*args, "--out", str(tmp_path / "never"))
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "error" in done.stderr
    assert not (tmp_path / "never").exists()
