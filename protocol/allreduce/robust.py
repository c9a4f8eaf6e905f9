"""Byzantine-robust aggregation of one span, and the members' check of an owner's result (pure numpy).

An owner aggregates the parts its span received (each: sparse indices, values, the sender's weight):

    mean           the weighted mean (FedAvg): one member can move it anywhere. No defence; the default of a bare
                   RoundConfig, so the protocol's exact conservation tests hold.
    centered_clip  CenteredClip (Karimireddy, He, Jaggi 2021; BTARD, Gorbunov et al. 2022): from the
                   coordinate-wise median, CLIP_ITERATIONS steps of v += sum_i w_i c_i (x_i - v) / sum_i w_i with
                   c_i = min(1, tau / |x_i - v|) and tau = CLIP_SCALE x the lower median of the distances |x_i - v|:
                   while fewer than half the members are hostile, tau is on the honest scale, so a member moves the
                   result by at most ~tau w_i / W whatever it sends. Each member learns the fraction ``kept`` of
                   its part the result holds (c_i) and keeps the rest in its error feedback; the result is the
                   fixed point's form sum_i w_i c_i x_i / sum_i w_i c_i with total weight sum_i w_i c_i, so an honest
                   member's clipped mass is delayed, not lost (produced = held + applied). The job default.
    trimmed_mean   coordinate-wise: per entry, the TRIM fraction largest and smallest values dropped.
    median         coordinate-wise median.
The three robust ones first drop gross outliers -- parts over OUTLIER x the lower-median distance from the
coordinate-wise median (an honest part of one job is rarely twice as far as the typical one) -- so a scaled or
1e30 part has no influence at all, and aggregate the rest. The coordinate-wise two treat a sparse part's absent
entries as zeros: with top-k parts of different supports,
most entries have one non-zero value among the members, which trimming and the median then drop, so they
shrink honest rounds too (the byzantine table in the README measures it); they suit dense jobs (density 1), and
what they drop is lost (they are not weighted sums).

Evidence against a member (``outliers``): its part lies more than OUTLIER times the lower-median distance from
the result (for centered_clip: kept < 1 / OUTLIER). A rejected part (NaN, bad frame) is evidence too (the
averager). Evidence in EXCLUDE_AFTER consecutive rounds excludes the member from the job (the runner).

A member checks each owner's result against its own part of that span (``result_suspicion``), the rule:
  * its L2 norm may not exceed RESULT_NORM_BOUND x the member's own part's norm in the span (a robust aggregate
    is within ~(1 + CLIP_SCALE) x an honest part's scale; honest parts of one job differ by far less than the
    bound), and
  * if the owner included this member's part unclipped (kept >= SIGN_TEST_KEPT of it), the result may not point
    against that part by more than SIGN_MARGIN / (members included) of the part's squared norm: a sign-flipped
    honest aggregate does (early in a job the parts share a direction, and the flip turns the part's own share
    of the result, 1/n of its squared norm and more, negative). Honest parts may cancel: at FedAvg's fixed point
    (members with different local optima, long local training) the weighted parts sum to ~0, so an honest result
    is ~0 and its inner product with a part hovers around zero, on either side (found with dense AdamW updates,
    scripts/bench_script_optimizer.py); the margin keeps those honest rounds clean -- an unclipped part's own
    share keeps the inner product above -(1 - kept)/n of its squared norm -- at the price of not judging a
    flipped result that is itself ~0, whose harm is as small.
A member whose own part has no entries in the span does not judge it. A suspicious result is not held: the member
votes it missing in the commit, so no member applies the span (the commit rule) and every member's part of it
goes back to its error feedback. This catches a scaled, sign-flipped or noised average; an owner that knows every
member's part and biases its span while keeping each member's norm and sign test is bounded, not caught
(replicated spans would be the stronger check: twice the reduce-scatter bytes, not built).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.allreduce.codecs import quantize_values
from protocol.allreduce.messages import ResultFrame
from protocol.allreduce.sparsify import SparseUpdate

__all__ = ["AGGREGATORS", "EXCLUDE_AFTER", "SpanAggregate", "aggregate_span", "check_owner_result", "result_suspicion"]

AGGREGATORS = ("mean", "trimmed_mean", "median", "centered_clip")
CLIP_SCALE = 2.0
CLIP_ITERATIONS = 10
TRIM = 0.25
OUTLIER = 4.0
EXCLUDE_AFTER = 3
RESULT_NORM_BOUND = 10.0
SIGN_TEST_KEPT = 0.9  # the sign test judges a result only for a member whose part it kept at least this much of
SIGN_MARGIN = 0.5  # ... and flags it when result . part < -SIGN_MARGIN / n * |part|^2 (n: parts included)


@dataclass(frozen=True)
class SpanAggregate:
    values: np.ndarray  # (span,) float32: the aggregate, dense
    total_weight: float
    kept: tuple[float, ...]  # per part in the given order: the fraction of it the aggregate holds (1.0 = whole)
    outliers: tuple[int, ...]  # positions (in the given order) of parts that are evidence against their sender


def aggregate_span(parts: list[tuple[np.ndarray, np.ndarray, float]], length: int, method: str) -> SpanAggregate:
    """Aggregate ``parts`` (indices, values, weight) of a span of ``length`` entries with ``method``."""
    if method not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {method!r}")
    weights = np.array([w for _, _, w in parts], np.float64)
    total = float(weights.sum())
    if method == "mean":  # the protocol's historical sum, in the same order and precision
        acc = np.zeros(length, np.float32)
        for idx, vals, w in parts:
            acc[idx] += np.float32(w) * vals
        return SpanAggregate(acc / np.float32(total), total, (1.0,) * len(parts), ())
    # only the union of the parts' supports: elsewhere every part, the median and so every center are 0
    union = np.unique(np.concatenate([idx for idx, _, _ in parts])) if parts else np.zeros(0, np.int64)
    dense = np.zeros((len(parts), union.size), np.float64)
    for row, (idx, vals, _) in enumerate(parts):
        dense[row, np.searchsorted(union, idx)] = vals
    # gross outliers first: parts over OUTLIER x the lower-median distance from the coordinate-wise median
    start = np.median(dense, axis=0)
    distance = np.linalg.norm(dense - start, axis=1)
    scale = _lower_median(distance)
    live = distance <= OUTLIER * scale if scale > 0 else np.ones(len(parts), bool)
    x, w = dense[live], weights[live]
    if method == "centered_clip":
        center, clipped = _centered_clip(x, w)
    elif method == "median":
        center, clipped = np.median(x, axis=0), np.ones(len(x))
    else:
        center, clipped = _trimmed_mean(x, w), np.ones(len(x))
    kept = np.zeros(len(parts))
    kept[live] = clipped
    total = float(weights[live] @ clipped)  # centered_clip: the weight its fixed point holds; else the live parts'
    final = np.linalg.norm(dense - center, axis=1)
    scale = _lower_median(final[live])
    outliers = tuple(int(i) for i in np.flatnonzero(~live | (final > OUTLIER * scale))) if scale > 0 else \
        tuple(int(i) for i in np.flatnonzero(~live))
    values = np.zeros(length, np.float32)
    values[union] = center
    return SpanAggregate(values, total, tuple(float(k) for k in kept), outliers)


def _lower_median(x: np.ndarray) -> float:
    """The (n-1)//2-th smallest: with a hostile minority, an honest member's value."""
    return float(np.partition(x, (x.size - 1) // 2)[(x.size - 1) // 2]) if x.size else 0.0


def _centered_clip(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.median(x, axis=0)
    for _ in range(CLIP_ITERATIONS):
        distance = np.linalg.norm(x - v, axis=1)
        tau = CLIP_SCALE * _lower_median(distance)
        if tau == 0:
            break
        kept = np.minimum(1.0, tau / np.maximum(distance, 1e-300))
        step = (w * kept) @ (x - v) / w.sum()
        v = v + step
        if np.linalg.norm(step) <= 1e-7 * max(float(np.linalg.norm(v)), 1e-30):
            break
    distance = np.linalg.norm(x - v, axis=1)
    tau = CLIP_SCALE * _lower_median(distance)
    kept = np.minimum(1.0, tau / np.maximum(distance, 1e-300)) if tau > 0 else np.ones(len(x))
    # the fixed point's own form, exactly: v = sum_i w_i c_i x_i / sum_i w_i c_i, so that with the total weight
    # sum_i w_i c_i and each member keeping (1 - c_i) of its part, no mass is lost (produced = held + applied)
    return (w * kept) @ x / (w * kept).sum(), kept


def _trimmed_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    n = len(x)
    cut = int(TRIM * n)
    if cut == 0 or n - 2 * cut < 1:
        return (w @ x) / w.sum()
    order = np.argsort(x, axis=0, kind="stable")
    keep = np.zeros_like(x, dtype=bool)
    np.put_along_axis(keep, order[cut:n - cut], True, axis=0)
    ww = np.where(keep, w[:, None], 0.0)
    return (ww * x).sum(axis=0) / ww.sum(axis=0)


def result_suspicion(result: np.ndarray, own: np.ndarray, own_kept: float, included: int) -> str:
    """Why a member does not trust an owner's aggregate of a span ("" if it does): ``result`` and ``own`` (this
    member's part as sent) dense over the span; ``own_kept``: the fraction of the part the owner says it kept (0:
    not included), ``included``: how many parts it included."""
    mine = float(np.linalg.norm(own.astype(np.float64)))
    if mine == 0.0:
        return ""
    norm = float(np.linalg.norm(result.astype(np.float64)))
    if not np.isfinite(norm) or norm > RESULT_NORM_BOUND * mine:
        return f"result norm {norm:.3g} is over {RESULT_NORM_BOUND:g}x this member's part ({mine:.3g})"
    dot = float(result.astype(np.float64) @ own.astype(np.float64))
    if own_kept >= SIGN_TEST_KEPT and dot < -SIGN_MARGIN / max(included, 1) * mine * mine:
        return (f"result points against this member's included part (inner product {dot:.3g}, below "
                f"-{SIGN_MARGIN:g}/{included} of the part's squared norm)")
    return ""


def check_owner_result(result: ResultFrame, decoded: SparseUpdate, piece: SparseUpdate, me: str,
                       value_codec: str) -> str:
    """result_suspicion of an owner's decoded aggregate against ``piece``, this member's part of the span (sent
    rounded to ``value_codec``), with the fraction of it the owner says it kept (0 if not listed)."""
    share = (result.kept[result.included.index(me)] if result.kept else 1.0) if me in result.included else 0.0
    sent = SparseUpdate(piece.indices, quantize_values(piece.values, value_codec), piece.size)
    return result_suspicion(decoded.to_dense(), sent.to_dense(), share, len(result.included))
