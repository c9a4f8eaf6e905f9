"""What one member applies after an all-reduce round, and what goes back into its error feedback (pure numpy).

    average, returned = settle(update, plan, me, decoded, included, final, rounding, weight, "fp16")

For each span of the plan: if the round applied it (``final``), the span owner's decoded average joins
``average``; this member's own part of the span comes back whole unless the owner included it, and then only its
wire rounding comes back (the part was sent rounded to ``value_codec``). The owner of a span that was applied
also takes back what its own aggregate lost on the wire (fp16 rounding, and the entries global top-k left out),
scaled from the group's weight to its own: nothing is lost (produced = held + applied).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protocol.allreduce.codecs import quantize_values
from protocol.allreduce.messages import GroupPlan
from protocol.allreduce.sparsify import SparseUpdate


def span_of(update: SparseUpdate, span: tuple[int, int]) -> SparseUpdate:
    """The entries of ``update`` in ``span``, indexed from the span's start."""
    lo, hi = np.searchsorted(update.indices, span, side="left")
    return SparseUpdate(update.indices[lo:hi] - span[0], update.values[lo:hi], span[1] - span[0])


def owner_residual(exact: SparseUpdate, decoded: SparseUpdate) -> tuple[np.ndarray, np.ndarray]:
    """exact - decoded over the span: fp16 rounding, plus any entries global top-k left out."""
    if decoded.nnz == decoded.size and exact.nnz < exact.size:  # sent dense
        return decoded.indices, exact.to_dense() - decoded.values
    values = exact.values.copy()  # decoded's support is a subset of exact's
    values[np.searchsorted(exact.indices, decoded.indices)] -= decoded.values
    return exact.indices, values


def settle(update: SparseUpdate, plan: GroupPlan, me: str, decoded: Sequence[SparseUpdate | None],
           included: Sequence[tuple[str, ...]], final: Sequence[bool],
           rounding: tuple[SparseUpdate, SparseUpdate, float] | None, weight: float,
           value_codec: str, kept: Sequence[tuple[float, ...]] = ()) -> tuple[SparseUpdate, SparseUpdate]:
    """(the average to apply, everything to put back into error feedback), both over the whole tensor.

    ``decoded[i]`` / ``included[i]``: span i's decoded average and who its owner included (for spans this member
    got a result of); ``rounding``: (exact, decoded, total weight) of this member's own span aggregate, if any;
    ``weight``: this member's weight in the round; ``kept[i]``: per member of ``included[i]``, the fraction of its
    part span i's robust aggregate holds (() or missing: whole) -- the rest of this member's part comes back."""
    size = update.size
    avg_idx, avg_val = [], []
    back_idx, back_val = [], []
    for i, (span, ok) in enumerate(zip(plan.spans, final)):
        piece = span_of(update, span)
        if ok:
            got = decoded[i]
            if got is None:  # the caller marks a span final only once it holds the span's decoded average
                raise RuntimeError(f"span {i} is final but has no decoded average")
            avg_idx.append(got.indices + span[0])
            avg_val.append(got.values)
        if ok and me in included[i]:  # applied: only the wire rounding (and what a robust aggregate clipped) comes back
            fractions = kept[i] if i < len(kept) else ()
            share = np.float32(fractions[included[i].index(me)]) if fractions else np.float32(1.0)
            back_val.append(piece.values - share * quantize_values(piece.values, value_codec))
        else:
            back_val.append(piece.values)
        back_idx.append(piece.indices + span[0])
    mine = plan.members.index(me)
    if final[mine] and rounding is not None:
        exact, own_decoded, total = rounding  # what our span's average lost on the wire, in our units
        span = plan.spans[mine]
        idx, residual = owner_residual(exact, own_decoded)
        residual = residual * np.float32(total / weight)
        nz = np.flatnonzero(residual)
        back_idx.append(idx[nz] + span[0])
        back_val.append(residual[nz])
    idx = np.concatenate(back_idx) if back_idx else np.zeros(0, np.int64)
    val = np.concatenate(back_val).astype(np.float32) if back_val else np.zeros(0, np.float32)
    uniq, inverse = np.unique(idx, return_inverse=True)
    summed = np.bincount(inverse, weights=val, minlength=uniq.size).astype(np.float32)
    keep = summed != 0
    average = SparseUpdate(np.concatenate(avg_idx) if avg_idx else np.zeros(0, np.int64),
                           np.concatenate(avg_val) if avg_val else np.zeros(0, np.float32), size)
    return average, SparseUpdate(uniq[keep].astype(np.int64), summed[keep], size)
