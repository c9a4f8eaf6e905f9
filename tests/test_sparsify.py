"""protocol/allreduce/sparsify.py: exact and approximate top-k, SparseUpdate, error feedback and DGC momentum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocol.allreduce.codecs import quantize_values
from protocol.allreduce.sparsify import (
    APPROX_TOLERANCE,
    ErrorFeedbackSparsifier,
    SparseUpdate,
    topk_approx,
    topk_exact,
)


def brute_force(x: np.ndarray, k: int) -> np.ndarray:
    """Largest |x| first, lower index first among equal magnitudes (a stable sort), then ascending."""
    return np.sort(np.argsort(-np.abs(x), kind="stable")[:k]).astype(np.int64)


def window(k: int) -> tuple[int, int]:
    return math.ceil(k * (1 - APPROX_TOLERANCE)), math.floor(k * (1 + APPROX_TOLERANCE))


def separates(x: np.ndarray, idx: np.ndarray) -> bool:
    """Every selected magnitude is >= every unselected one."""
    a = np.abs(x)
    mask = np.zeros(x.size, bool)
    mask[idx] = True
    return idx.size in (0, x.size) or a[mask].min() >= a[~mask].max()


# ---- exact --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("n", [1, 7, 1000, 10_007])
def test_exact_matches_brute_force(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    for k in sorted({0, 1, n // 100, n // 3, n - 1, n}):
        got = topk_exact(x, k)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, brute_force(x, k))


@pytest.mark.parametrize("seed", range(8))
def test_exact_ties_go_to_the_lower_index(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 5, size=2000).astype(np.float32)  # many equal magnitudes, both signs
    for k in (1, 17, 500, 999, 1500, 1999):
        np.testing.assert_array_equal(topk_exact(x, k), brute_force(x, k))


def test_exact_all_equal_and_zero() -> None:
    np.testing.assert_array_equal(topk_exact(np.full(10, -2.0, np.float32), 3), [0, 1, 2])
    np.testing.assert_array_equal(topk_exact(np.zeros(10, np.float32), 4), [0, 1, 2, 3])
    np.testing.assert_array_equal(topk_exact(np.array([0, -3, 3, 1], np.float32), 1), [1])
    assert topk_exact(np.zeros(0, np.float32), 0).size == 0


@pytest.mark.parametrize(
    "x, k",
    [
        (np.ones(5, np.float32), -1),
        (np.ones(5, np.float32), 6),
        (np.ones(5, np.float32), True),
        (np.ones(5, np.float32), 2.0),
        (np.ones((2, 3), np.float32), 1),
        (np.ones(5, np.int64), 1),
        ([1.0, 2.0], 1),
        (np.array([1, np.nan, 2], np.float32), 1),
        (np.array([1, np.inf, 2], np.float32), 1),
        (np.array([1, -np.inf, 2], np.float32), 1),
    ],
)
def test_topk_rejects_bad_arguments(x: object, k: object) -> None:
    with pytest.raises(ValueError):
        topk_exact(x, k)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        topk_approx(x, k, np.random.default_rng(0))  # type: ignore[arg-type]


def test_approx_rejects_bad_rng_and_sample_size() -> None:
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError):
        topk_approx(x, 1, 0)  # type: ignore[arg-type]
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError):
            topk_approx(x, 1, np.random.default_rng(0), sample_size=bad)  # type: ignore[arg-type]


# ---- approximate --------------------------------------------------------------------------------------


def test_approx_count_within_ten_percent_over_many_seeds() -> None:
    x = np.random.default_rng(123).standard_normal(400_000).astype(np.float32)
    k = 4000  # 1%
    lo, hi = window(k)
    counts = []
    for seed in range(60):
        idx = topk_approx(x, k, np.random.default_rng(seed), sample_size=100_000)
        assert lo <= idx.size <= hi
        assert idx.dtype == np.int64 and bool(np.all(np.diff(idx) > 0))
        counts.append(idx.size)
    assert separates(x, idx)
    assert len(set(counts)) > 1  # really sampled, not the exact path


@pytest.mark.parametrize("sample_size", [1, 4, 64, 2048])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.5])
def test_approx_refinement_paths_keep_the_guarantee(sample_size: int, density: float) -> None:
    # Tiny samples give bad first estimates, so the too-many, too-few and exact-fallback paths all run.
    x = np.random.default_rng(7).standard_normal(20_000).astype(np.float32)
    k = round(density * x.size)
    lo, hi = window(k)
    for seed in range(15):
        idx = topk_approx(x, k, np.random.default_rng(seed), sample_size=sample_size)
        assert lo <= idx.size <= hi
        assert bool(np.all(np.diff(idx) > 0))
        assert separates(x, idx)


def test_approx_with_heavy_ties_and_zeros() -> None:
    rng = np.random.default_rng(3)
    x = np.zeros(300_000, np.float32)
    x[rng.choice(x.size, 1000, replace=False)] = rng.integers(1, 4, 1000)  # few distinct non-zero values
    for k in (500, 3000):  # inside the non-zeros, and past them into the zero ties
        idx = topk_approx(x, k, np.random.default_rng(0), sample_size=10_000)
        lo, hi = window(k)
        assert lo <= idx.size <= hi and separates(x, idx)


def test_approx_is_deterministic_per_rng_seed_and_exact_when_small() -> None:
    x = np.random.default_rng(5).standard_normal(50_000).astype(np.float32)
    a = topk_approx(x, 500, np.random.default_rng(9), sample_size=1000)
    b = topk_approx(x, 500, np.random.default_rng(9), sample_size=1000)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(topk_approx(x, 500, np.random.default_rng(9), sample_size=50_000),
                                  brute_force(x, 500))
    assert topk_approx(x, 0, np.random.default_rng(0), sample_size=10).size == 0
    assert topk_approx(x, x.size, np.random.default_rng(0), sample_size=10).size == x.size


# ---- SparseUpdate -------------------------------------------------------------------------------------


def test_sparse_update_to_dense() -> None:
    u = SparseUpdate(np.array([0, 3], np.int64), np.array([1.5, -2], np.float32), 5)
    np.testing.assert_array_equal(u.to_dense(), np.array([1.5, 0, 0, -2, 0], np.float32))
    assert u.nnz == 2 and u.to_dense().dtype == np.float32
    assert SparseUpdate(np.empty(0, np.int64), np.empty(0, np.float32), 0).to_dense().size == 0


@pytest.mark.parametrize(
    "indices, values, size",
    [
        ([0, 1], np.zeros(2, np.float32), 3),  # not an array
        (np.array([0, 1], np.int32), np.zeros(2, np.float32), 3),
        (np.array([0, 1], np.int64), np.zeros(2, np.float64), 3),
        (np.array([0, 1], np.int64), np.zeros(3, np.float32), 3),
        (np.array([1, 0], np.int64), np.zeros(2, np.float32), 3),
        (np.array([1, 1], np.int64), np.zeros(2, np.float32), 3),
        (np.array([-1, 1], np.int64), np.zeros(2, np.float32), 3),
        (np.array([0, 3], np.int64), np.zeros(2, np.float32), 3),
        (np.array([0, 1], np.int64), np.zeros(2, np.float32), 1),
        (np.array([[0, 1]], np.int64), np.zeros((1, 2), np.float32), 3),
        (np.array([0], np.int64), np.zeros(1, np.float32), -1),
        (np.array([0], np.int64), np.zeros(1, np.float32), 2.0),
    ],
)
def test_sparse_update_rejects_malformed(indices: object, values: object, size: object) -> None:
    with pytest.raises(ValueError):
        SparseUpdate(indices, values, size)  # type: ignore[arg-type]


# ---- error feedback -----------------------------------------------------------------------------------


def test_k_and_first_selection_is_top_k_of_the_gradient() -> None:
    assert ErrorFeedbackSparsifier(1000).k == 10
    assert ErrorFeedbackSparsifier(10, density=0.01).k == 1  # at least one
    assert ErrorFeedbackSparsifier(10, density=1.0).k == 10
    g = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    sp = ErrorFeedbackSparsifier(1000, density=0.05)
    u = sp.select(g)
    np.testing.assert_array_equal(u.indices, brute_force(g, 50))
    np.testing.assert_array_equal(u.values, g[u.indices])
    expected = g.copy()
    expected[u.indices] = 0
    np.testing.assert_array_equal(sp.residual, expected)


def test_held_back_mass_is_sent_later() -> None:
    sp = ErrorFeedbackSparsifier(4, density=0.25)  # k = 1
    g = np.array([1.0, 0.4, 0.0, 0.0], np.float32)
    assert sp.select(g).indices.tolist() == [0]
    assert sp.select(g).indices.tolist() == [0]  # 1.0 vs 0.8
    u = sp.select(g)  # 1.0 vs 1.2: the small coordinate has built up
    assert u.indices.tolist() == [1] and u.values[0] == pytest.approx(1.2)


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_conservation_exact_with_integer_valued_floats(mode: str) -> None:
    rng = np.random.default_rng(11)
    size = 5000
    sp = ErrorFeedbackSparsifier(size, density=0.01, mode=mode, seed=1, sample_size=512)
    fed = np.zeros(size, np.float64)
    sent = np.zeros(size, np.float64)
    for _ in range(30):
        g = rng.integers(-50, 51, size).astype(np.float32)  # all partial sums stay exact in float32
        fed += g
        u = sp.select(g)
        sent[u.indices] += u.values
    np.testing.assert_array_equal(sent + sp.residual, fed)  # per coordinate, bit for bit
    assert sent.sum() + float(sp.residual.astype(np.float64).sum()) == fed.sum()


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_conservation_with_tolerance_on_random_floats(mode: str) -> None:
    rng = np.random.default_rng(12)
    size = 20_000
    sp = ErrorFeedbackSparsifier(size, density=0.01, mode=mode, seed=2, sample_size=2048)
    fed = np.zeros(size, np.float64)
    sent_total = 0.0
    for _ in range(20):
        g = rng.standard_normal(size).astype(np.float32)
        fed += g
        sent_total += float(sp.select(g).values.astype(np.float64).sum())
    total = sent_total + float(sp.residual.astype(np.float64).sum())
    assert total == pytest.approx(fed.sum(), abs=1e-6 * np.abs(fed).sum())


def test_quantize_hook_keeps_the_rounding_error_and_clipping_in_the_residual() -> None:
    size = 1000
    sp = ErrorFeedbackSparsifier(size, density=0.1)
    g = np.random.default_rng(4).standard_normal(size).astype(np.float32) * np.float32(3.1)
    g[7] = 1e6  # beyond fp16's finite range: clipped to 65504, the rest stays behind
    u = sp.select(g, quantize=lambda v: quantize_values(v, "fp16"))
    np.testing.assert_array_equal(u.values, quantize_values(g[u.indices], "fp16"))
    assert u.values[np.searchsorted(u.indices, 7)] == 65504.0
    assert sp.residual[7] == np.float32(1e6) - np.float32(65504)
    # values - sent is exact in float32 here, so the held-back part plus the sent part is the gradient
    recombined = sp.residual.copy()
    recombined[u.indices] += u.values
    np.testing.assert_array_equal(recombined, g)
    with pytest.raises(ValueError):
        sp.select(g, quantize=lambda v: v.astype(np.float64))


def test_restore_gives_a_failed_round_back() -> None:
    rng = np.random.default_rng(8)
    sp = ErrorFeedbackSparsifier(2000, density=0.02, mode="approx", sample_size=100)
    sp.select(rng.standard_normal(2000).astype(np.float32))
    before = sp.residual.copy()
    u = sp.select(rng.standard_normal(2000).astype(np.float32))
    after_select = sp.residual.copy()
    sp.restore(u)  # the round failed: nothing was delivered
    np.testing.assert_array_equal(sp.residual[u.indices], u.values)
    np.testing.assert_array_equal(np.delete(sp.residual, u.indices), np.delete(after_select, u.indices))
    assert not np.array_equal(sp.residual, before)  # the second gradient is in there too


def test_restore_validates() -> None:
    sp = ErrorFeedbackSparsifier(10)
    with pytest.raises(ValueError):
        sp.restore(SparseUpdate(np.array([1], np.int64), np.ones(1, np.float32), 11))
    with pytest.raises(ValueError):
        sp.restore("update")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sp.restore(SparseUpdate(np.array([1], np.int64), np.array([np.nan], np.float32), 10))


def reference_dgc(grads: list[np.ndarray], k: int, m: float) -> tuple[list[SparseUpdate], np.ndarray]:
    u = np.zeros_like(grads[0])
    v = np.zeros_like(grads[0])
    out = []
    for g in grads:
        u = np.float32(m) * u + g
        v = v + u
        idx = brute_force(v, k)
        out.append(SparseUpdate(idx, v[idx].copy(), v.size))
        v[idx] = 0
        u[idx] = 0
    return out, v


def test_momentum_correction_matches_the_dgc_recursion() -> None:
    rng = np.random.default_rng(21)
    grads = [rng.standard_normal(3000).astype(np.float32) for _ in range(12)]
    sp = ErrorFeedbackSparsifier(3000, density=0.01, momentum=0.9)
    expected, v = reference_dgc(grads, sp.k, 0.9)
    for g, want in zip(grads, expected):
        got = sp.select(g)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(sp.residual, v)


def test_momentum_factor_masking_and_accumulated_velocity() -> None:
    m, steps = 0.5, 6
    sp = ErrorFeedbackSparsifier(100, density=0.01, momentum=m)  # k = 1
    g = np.zeros(100, np.float32)
    g[0], g[1] = 1000.0, 1.0  # coordinate 0 is sent every step, coordinate 1 never
    for _ in range(steps):
        u = sp.select(g)
        assert u.indices.tolist() == [0]
        assert u.values[0] == 1000.0  # its velocity was masked after each send: no momentum build-up
    # coordinate 1: u_t = (1 - m**t) / (1 - m), v = sum of u_t
    expected = sum((1 - m**t) / (1 - m) for t in range(1, steps + 1))
    assert sp.residual[1] == pytest.approx(expected, rel=1e-6)
    assert sp.residual[0] == 0.0


def test_residual_is_read_only() -> None:
    sp = ErrorFeedbackSparsifier(10)
    with pytest.raises(ValueError):
        sp.residual[0] = 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": -5},
        {"size": 10.0},
        {"size": True},
        {"size": 10, "density": 0.0},
        {"size": 10, "density": 1.5},
        {"size": 10, "density": float("nan")},
        {"size": 10, "density": "0.1"},
        {"size": 10, "mode": "fast"},
        {"size": 10, "momentum": 1.0},
        {"size": 10, "momentum": -0.1},
        {"size": 10, "seed": "0"},
        {"size": 10, "sample_size": 0},
    ],
)
def test_sparsifier_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ErrorFeedbackSparsifier(**kwargs)


@pytest.mark.parametrize(
    "grad",
    [
        np.zeros(10, np.float64),
        np.zeros(11, np.float32),
        np.zeros((2, 5), np.float32),
        np.zeros(10, np.int32),
        [0.0] * 10,
        np.array([0] * 9 + [np.nan], np.float32),
        np.array([0] * 9 + [np.inf], np.float32),
        np.array([-np.inf] + [0] * 9, np.float32),
    ],
)
def test_select_rejects_bad_gradients_and_keeps_state(grad: object) -> None:
    sp = ErrorFeedbackSparsifier(10, density=0.1)
    sp.select(np.arange(10, dtype=np.float32))
    before = sp.residual.copy()
    with pytest.raises(ValueError):
        sp.select(grad)  # type: ignore[arg-type]
    np.testing.assert_array_equal(sp.residual, before)


# ---- approximate select() = accumulate, then topk_approx ---------------------------------------------


def reference_select(v: np.ndarray, u: np.ndarray | None, momentum: float, grad: np.ndarray, k: int,
                     rng: np.random.Generator, sample_size: int) -> np.ndarray:
    """Approx select()'s definition: accumulate (with DGC momentum), then topk_approx of the accumulator."""
    if u is not None:
        u *= np.float32(momentum)
        u += grad
        v += u
    else:
        v += grad
    return topk_approx(v, k, rng, sample_size)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize(("size", "density", "sample_size"), [
    (100_003, 0.01, 4096),   # the first sampled threshold usually fits the +-10% window
    (70_001, 0.05, 64),      # a tiny sample: often too many candidates, cut by an exact top-k
    (1 << 15, 0.2, 1024),    # a dense selection
])
def test_approx_select_equals_accumulate_then_topk_approx(momentum: float, size: int, density: float,
                                                          sample_size: int) -> None:
    rng = np.random.default_rng(7)
    sp = ErrorFeedbackSparsifier(size, density, "approx", momentum=momentum, seed=5, sample_size=sample_size)
    v = np.zeros(size, np.float32)
    u = np.zeros(size, np.float32) if momentum else None
    ref_rng = np.random.default_rng(5)
    for r in range(12):
        grad = rng.standard_normal(size).astype(np.float32)
        if r % 3 == 1:  # heavy tails and exact ties: the thresholds land on repeated values
            grad[:: 5] = np.round(grad[:: 5] * 40)
        if r % 4 == 3:
            grad[rng.integers(0, size, 50)] *= 1e4
        got = sp.select(grad)
        want = reference_select(v, u, momentum, grad, sp.k, ref_rng, sample_size)
        np.testing.assert_array_equal(got.indices, want)
        np.testing.assert_array_equal(got.values, v[want])
        v[want] = 0.0
        if u is not None:
            u[want] = 0.0
        np.testing.assert_array_equal(sp.residual, v)
