"""Span planning for the butterfly all-reduce: who owns which slice of the flat vector (pure, no I/O).

Each member owns one contiguous span and aggregates everyone's contributions for it, so the bytes a
member receives in reduce-scatter and sends in all-gather grow with its span. Spans are sized in
proportion to each member's advertised bandwidth (as hivemind's load_balancing does with an LP; here
the closed form for the bandwidth-only cost model): a member with twice the bandwidth gets twice the span.
Members advertising zero bandwidth (client-only) own nothing but still contribute and receive.
"""

from __future__ import annotations

from collections.abc import Sequence


def span_sizes(total: int, bandwidths: Sequence[float]) -> list[int]:
    """Split ``total`` elements proportionally to ``bandwidths`` (largest-remainder rounding, deterministic)."""
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if not bandwidths:
        raise ValueError("at least one member is needed")
    if any(not (b >= 0) or b == float("inf") for b in bandwidths):
        raise ValueError(f"bandwidths must be finite and >= 0, got {list(bandwidths)}")
    scale = max(bandwidths)
    if scale == 0:
        raise ValueError("at least one member must have a positive bandwidth")
    shares = [b / scale for b in bandwidths]  # in [0, 1]: no overflow however large the bandwidths
    weight = sum(shares)
    exact = [total * (s / weight) for s in shares]
    sizes = [int(x) for x in exact]
    remainder = total - sum(sizes)
    # ties go to the earlier member, so every peer computes the same plan
    order = sorted(range(len(bandwidths)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[:remainder]:
        sizes[i] += 1
    return sizes


def plan_spans(total: int, bandwidths: Sequence[float]) -> list[tuple[int, int]]:
    """[start, end) of each member's span, in member order; spans tile [0, total) exactly."""
    spans, start = [], 0
    for size in span_sizes(total, bandwidths):
        spans.append((start, start + size))
        start += size
    return spans
