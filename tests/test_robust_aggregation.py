"""Byzantine-robust span aggregation and the members' result check (protocol/allreduce/robust.py), the wire form of
a robust result, error feedback of clipped mass, the job field, exclusion bookkeeping and the signed record of it."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from node.jobs.federated.runner import JobRunner
from node.jobs.spec import job_spec_from_toml
from protocol.allreduce.codecs import extract_update, quantize_values, smallest_encoding
from protocol.allreduce.faults import Fault, mangle_part, mangle_result
from protocol.allreduce.messages import (
    GroupPlan,
    PartFrame,
    ResultFrame,
    TensorSpec,
    message_from_wire,
    message_to_wire,
)
from protocol.allreduce.robust import (
    AGGREGATORS,
    EXCLUDE_AFTER,
    RESULT_NORM_BOUND,
    aggregate_span,
    result_suspicion,
)
from protocol.allreduce.rounds import RoundConfig
from protocol.allreduce.settle import settle
from protocol.allreduce.sparsify import SparseUpdate
from protocol.records.job_records import (
    MAX_EXCLUDED,
    MAX_JOB_PROGRESS_BYTES,
    JobProgress,
    job_progress_from_wire,
    job_progress_to_wire,
)
from protocol.records.job_spec import spec_from_map, spec_to_map
from protocol.wire import WireError

L = 2000
PEER = "12D3KooW" + "A" * 44


def honest_parts(rng, n, k=40, drift=0.5, weight=320.0):
    """n top-k parts of one job: a shared direction plus each member's own noise, as pseudo-gradients are."""
    shared = rng.normal(size=L)
    out = []
    for _ in range(n):
        g = drift * shared + rng.normal(size=L)
        idx = np.sort(np.argsort(-np.abs(g))[:k])
        out.append((idx, g[idx].astype(np.float32), weight))
    return out


def mean_of(parts):
    return aggregate_span(parts, L, "mean").values


@pytest.mark.parametrize("seed", range(5))
def test_mean_is_the_historical_weighted_sum(seed):
    parts = honest_parts(np.random.default_rng(seed), 4)
    parts[1] = (parts[1][0], parts[1][1], 100.0)
    acc = np.zeros(L, np.float32)
    for idx, vals, w in parts:
        acc[idx] += np.float32(w) * vals
    agg = aggregate_span(parts, L, "mean")
    assert np.array_equal(agg.values, acc / np.float32(sum(w for *_, w in parts)))
    assert agg.kept == (1.0,) * 4 and agg.outliers == () and agg.total_weight == 1060.0


def hostile(kind, rng, like):
    idx, vals, w = like
    if kind == "huge":
        return np.arange(L), np.full(L, 1e30, np.float32), w
    if kind == "flip100":
        return idx, -100 * vals, w
    if kind == "scaled":
        return idx, 50 * vals, w
    if kind == "noise":
        return np.arange(L), rng.normal(size=L).astype(np.float32) * 10, w
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["huge", "flip100", "scaled", "noise"])
@pytest.mark.parametrize("method", ["centered_clip", "trimmed_mean"])
def test_one_hostile_part_of_four_has_no_influence_and_is_named(kind, method):
    rng = np.random.default_rng(1)
    parts = honest_parts(rng, 3)
    bad = hostile(kind, rng, parts[0])
    agg = aggregate_span([*parts, bad], L, method)
    assert np.allclose(agg.values, mean_of(parts), rtol=1e-5, atol=1e-6)
    assert agg.kept[3] == 0.0 and agg.outliers == (3,)
    assert agg.total_weight == pytest.approx(3 * 320.0)


def test_mean_has_no_defence():
    rng = np.random.default_rng(1)
    parts = honest_parts(rng, 3)
    with np.errstate(all="ignore"):
        agg = aggregate_span([*parts, hostile("flip100", rng, parts[0])], L, "mean")
    assert np.linalg.norm(agg.values - mean_of(parts)) > 10 * np.linalg.norm(mean_of(parts))


@pytest.mark.parametrize("seed", range(40))
def test_honest_members_are_never_evidence(seed):
    """False positives would exclude honest volunteers: none in 40 honest groups of 3-8 members."""
    rng = np.random.default_rng(seed)
    parts = honest_parts(rng, 3 + seed % 6, drift=rng.uniform(0, 2))
    for method in AGGREGATORS[1:]:
        assert aggregate_span(parts, L, method).outliers == (), method


def test_centered_clip_bounds_a_stealthy_member_and_conserves_mass():
    """A member on the honest scale but 3x further out is clipped (kept < 1), not dropped; sum_i w_i c_i x_i equals
    total_weight x the result, the identity that lets each member keep (1 - c_i) of its part."""
    rng = np.random.default_rng(3)
    parts = honest_parts(rng, 5)
    idx, vals, w = parts[0]
    parts.append((idx, -3.0 * vals, w))
    agg = aggregate_span(parts, L, "centered_clip")
    assert 0 < agg.kept[-1] < 1 and 5 not in agg.outliers
    applied = np.zeros(L)
    for (i, v, wt), c in zip(parts, agg.kept):
        applied[i] += wt * c * v.astype(np.float64)
    assert np.allclose(agg.total_weight * agg.values, applied, rtol=1e-5, atol=1e-4)
    honest = mean_of(parts[:5])
    shift = np.linalg.norm(agg.values - honest)
    assert shift < np.linalg.norm(mean_of(parts) - honest)  # better than no defence


def test_median_of_dense_parts_ignores_a_minority():
    rng = np.random.default_rng(4)
    base = rng.normal(size=L).astype(np.float32)
    parts = [(np.arange(L), base + 0.01 * rng.normal(size=L).astype(np.float32), 1.0) for _ in range(4)]
    parts.append((np.arange(L), -base, 1.0))  # on the honest scale: not an outlier, outvoted per entry
    agg = aggregate_span(parts, L, "median")
    assert np.abs(agg.values - base).max() < 0.05


def test_unknown_aggregator_is_refused():
    with pytest.raises(ValueError, match="aggregator must be one of"):
        aggregate_span([], L, "krum")
    with pytest.raises(ValueError, match="aggregator must be one of"):
        RoundConfig("s", TensorSpec("t", 10), aggregator="krum")
    with pytest.raises(ValueError, match="max_weight"):
        RoundConfig("s", TensorSpec("t", 10), max_weight=0)


def test_result_check_catches_scaled_flipped_and_spares_honest():
    rng = np.random.default_rng(5)
    parts = honest_parts(rng, 4)
    honest = aggregate_span(parts, L, "centered_clip").values
    own = np.zeros(L, np.float32)
    own[parts[0][0]] = parts[0][1]
    assert result_suspicion(honest, own, 1.0, 4) == ""
    assert "over" in result_suspicion(honest * (2 * RESULT_NORM_BOUND), own, 1.0, 4)
    assert "against" in result_suspicion(-honest, own, 1.0, 4)
    assert result_suspicion(-honest, own, 0.0, 4) == ""  # not included: a sign says nothing
    assert result_suspicion(-honest, own, 0.5, 4) == ""  # mostly clipped: the result may well point elsewhere
    assert result_suspicion(honest * 1e3, np.zeros(L, np.float32), 1.0, 4) == ""  # no part here: no judgement
    assert result_suspicion(np.full(L, np.inf, np.float32), own, 1.0, 4) != ""


@pytest.mark.parametrize("method", ["mean", "centered_clip"])
def test_honest_parts_that_cancel_at_fedavgs_fixed_point_are_not_suspected(method):
    """Members with different local optima, long local training: the weighted parts sum to ~0 (the FedAvg fixed
    point), so the result is ~0 and points against some parts; no member may take that for a flipped result (a
    dense AdamW run excluded honest owners so before the margin)."""
    rng = np.random.default_rng(11)
    for trial in range(50):
        dense = rng.normal(size=(4, L)).astype(np.float32)
        dense[3] = -dense[:3].sum(axis=0) + 0.3 * rng.normal(size=L).astype(np.float32)  # ~cancel, with noise
        parts = [(np.arange(L), dense[i], 160.0) for i in range(4)]
        agg = aggregate_span(parts, L, method)
        kept = agg.kept if agg.kept else (1.0,) * 4
        for i in range(4):
            assert result_suspicion(agg.values, dense[i], kept[i], 4) == "", (trial, i)


def result_frame(kept=()):
    payload = smallest_encoding(SparseUpdate(np.array([1, 5]), np.array([0.5, -1.0], np.float32), 10), "fp16")
    return ResultFrame("r1", PEER, TensorSpec("t", 100), (0, 10), (PEER, PEER[:-1] + "B"), 2.0, payload, kept)


def test_kept_travels_only_when_something_was_clipped():
    plain, clipped = result_frame(), result_frame((1.0, 0.25))
    assert b"kept" not in message_to_wire(plain)  # the wire of an unclipped result is unchanged
    for frame in (plain, clipped):
        raw = message_to_wire(frame)
        assert message_from_wire(raw, len(raw), ResultFrame) == frame


@pytest.mark.parametrize("kept", [(1.0,), (1.0, 1.5), (1.0, -0.1), (1.0, float("nan"))])
def test_bad_kept_is_a_wire_error(kept):
    raw = message_to_wire(result_frame(kept))
    with pytest.raises(WireError, match="kept"):
        message_from_wire(raw, len(raw), ResultFrame)


def test_a_clipped_member_keeps_the_rest_of_its_part():
    update = SparseUpdate(np.array([2, 7]), np.array([1.0, -2.0], np.float32), 10)
    plan = GroupPlan("r", "a", ("a", "b"), ((0, 5), (5, 10)), TensorSpec("t", 10), 0.0)
    decoded = [SparseUpdate(np.array([2]), np.array([0.5], np.float32), 5),
               SparseUpdate(np.array([2]), np.array([-1.0], np.float32), 5)]
    _, back = settle(update, plan, "a", decoded, [("a", "b"), ("a", "b")], (True, True), None, 1.0, "fp32",
                     [(), (0.25, 1.0)])
    assert np.allclose(back.to_dense(), [0, 0, 0, 0, 0, 0, 0, -1.5, 0, 0])  # span 0 whole, span 1: 3/4 of -2


def part_frame(span_len=50):
    vals = np.linspace(-1, 1, 10).astype(np.float32)
    payload = smallest_encoding(SparseUpdate(np.arange(0, 50, 5), quantize_values(vals), span_len), "fp16")
    return PartFrame("j/r3/abc", PEER, TensorSpec("t", 100), (0, span_len), 32.0, 0.2, payload)


@pytest.mark.parametrize("fault", [Fault.HUGE, Fault.FLIP100, Fault.NOISE, Fault.HEAVY])
def test_hostile_part_faults_are_well_formed(fault):
    frame = part_frame()
    raw = mangle_part(fault, frame, message_to_wire(frame), seed=1)
    got = message_from_wire(raw, len(raw), PartFrame)
    values = extract_update(got.payload, 50).values
    assert np.isfinite(values).all()
    assert {Fault.HUGE: values.max() == np.float32(1e30), Fault.FLIP100: values[0] == 100.0,
            Fault.NOISE: values.size == 50, Fault.HEAVY: got.weight == 1e12}[fault]


@pytest.mark.parametrize("fault, factor", [(Fault.RESULT_SCALED, 100.0), (Fault.RESULT_FLIPPED, -1.0)])
def test_hostile_result_faults(fault, factor):
    frame = result_frame()
    raw = mangle_result(fault, frame, message_to_wire(frame))
    got = message_from_wire(raw, len(raw), ResultFrame)
    assert np.array_equal(extract_update(got.payload, 10).values, factor * np.array([0.5, -1.0], np.float32))
    with pytest.raises(ValueError, match="not a result fault"):
        mangle_result(Fault.HUGE, frame, raw)


def test_evidence_in_consecutive_rounds_excludes_a_member():
    """JobRunner._weigh_evidence on a runner's bookkeeping alone: EXCLUDE_AFTER rounds in a row exclude, a clean
    round in between resets, the runner itself is never counted."""
    averager = types.SimpleNamespace(peer_id="me", excluded=set())
    runner = types.SimpleNamespace(averager=averager, strikes={}, excluded={}, job_id="j")
    weigh = JobRunner._weigh_evidence
    members = ("me", "x", "y")
    for r in range(EXCLUDE_AFTER - 1):
        weigh(runner, r, members, {"x": "its part was rejected: NaN", "y": "outlier", "me": "?"})
    weigh(runner, 9, members, {"x": "its part was rejected: NaN"})  # y clean: back to 0
    assert runner.excluded == {"x": f"rounds {10 - EXCLUDE_AFTER}-9: its part was rejected: NaN"}
    assert averager.excluded == {"x"} and runner.strikes["y"] == 0 and "me" not in runner.strikes


def test_exclusions_ride_in_signed_progress_and_are_bounded():
    base = JobProgress("a" * 16, PEER, 3, "", "running")
    assert b"excluded" not in job_progress_to_wire(base)  # unchanged bytes when nobody is excluded
    other = PEER[:-1] + "C"
    marked = dataclasses.replace(base, excluded=(other,), evidence=("rounds 1-3: outlier",))
    assert job_progress_from_wire(job_progress_to_wire(marked)) == marked
    with pytest.raises(ValueError, match="evidence"):
        dataclasses.replace(base, excluded=(other,), evidence=())
    with pytest.raises(ValueError, match="evidence"):
        dataclasses.replace(base, excluded=(other,), evidence=("x" * 201,))


def test_aggregator_is_a_job_field_left_off_the_wire_at_its_default():
    plain = job_spec_from_toml({"name": "t", "dataset": "digits", "task": "classification", "rounds": 3,
                                "model": {"arch": "mlp", "hidden": 16}, "inner": {"lr": 0.1}})
    assert plain.aggregator == "centered_clip" and "aggregator" not in spec_to_map(plain)
    mean = dataclasses.replace(plain, aggregator="mean")
    assert spec_to_map(mean)["aggregator"] == "mean" and spec_from_map(spec_to_map(mean)) == mean
    with pytest.raises(ValueError, match="aggregator"):
        dataclasses.replace(plain, aggregator="krum")


def test_a_full_progress_record_with_the_most_exclusions_fits_its_bound():
    digits = "123456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # base58
    peers = [PEER[:-2] + digits[i // len(digits)] + digits[i % len(digits)] for i in range(256)]
    full = JobProgress("a" * 16, PEER, 3, "f" * 64, "running", participants=tuple(peers),
                       excluded=tuple(peers[:MAX_EXCLUDED]), evidence=("e" * 200,) * MAX_EXCLUDED)
    assert len(job_progress_to_wire(full)) <= MAX_JOB_PROGRESS_BYTES
    with pytest.raises(ValueError, match="excluded"):
        dataclasses.replace(full, excluded=tuple(peers[:MAX_EXCLUDED + 1]), evidence=("e",) * (MAX_EXCLUDED + 1))
