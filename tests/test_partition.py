"""protocol/planning/partition.py: spans tile the vector, follow bandwidth, break ties the same way on every peer."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from protocol.planning.partition import plan_spans, span_sizes


def assert_tiles(spans: list[tuple[int, int]], total: int) -> None:
    assert spans[0][0] == 0
    assert spans[-1][1] == total
    for (_, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 == b0
    assert all(start <= end for start, end in spans)


def random_bandwidths(rng: random.Random, n: int) -> list[float]:
    """Zeros, small integers (many ties), and floats over a wide range of magnitudes; never all zero."""
    while True:
        bws = []
        for _ in range(n):
            r = rng.random()
            if r < 0.2:
                bws.append(0.0)
            elif r < 0.5:
                bws.append(float(rng.randint(1, 4)))
            else:
                bws.append(rng.random() * 10.0 ** rng.randint(-6, 12))
        if sum(bws) > 0:
            return bws


def random_total(rng: random.Random) -> int:
    return rng.choice([rng.randint(0, 20), rng.randint(0, 10**6), rng.randint(0, 2**34)])


def test_property_sizes_tile_and_follow_bandwidth():
    rng = random.Random(20240611)
    for _ in range(2000):
        n = rng.randint(1, 12)
        bws = random_bandwidths(rng, n)
        total = random_total(rng)
        sizes = span_sizes(total, bws)
        assert len(sizes) == n
        assert sum(sizes) == total
        assert all(isinstance(s, int) and s >= 0 for s in sizes)
        weight = sum(Fraction(b) for b in bws)
        for size, b in zip(sizes, bws):
            exact = Fraction(total) * Fraction(b) / weight
            # largest-remainder rounding: within 1 of the exact share (float slack for 2**34-sized totals)
            assert abs(size - exact) <= 1 + Fraction(1, 10**6), (total, bws, sizes)
            if b == 0:
                assert size == 0


def test_property_plan_spans_tile_and_match_sizes():
    rng = random.Random(7)
    for _ in range(1000):
        n = rng.randint(1, 12)
        bws = random_bandwidths(rng, n)
        total = random_total(rng)
        spans = plan_spans(total, bws)
        assert len(spans) == n
        assert_tiles(spans, total)
        assert [end - start for start, end in spans] == span_sizes(total, bws)


def test_proportional_to_bandwidth_exactly_when_divisible():
    assert span_sizes(12, [1, 2, 3]) == [2, 4, 6]
    assert span_sizes(100, [3.0, 1.0]) == [75, 25]
    assert plan_spans(12, [1, 2, 3]) == [(0, 2), (2, 6), (6, 12)]


def test_a_member_with_twice_the_bandwidth_gets_twice_the_span():
    assert span_sizes(3000, [12.5e6, 25e6]) == [1000, 2000]


@pytest.mark.parametrize(
    "total, bws, expected",
    [
        (1, [1, 1, 1], [1, 0, 0]),  # equal remainders: the earlier member wins
        (2, [1, 1, 1], [1, 1, 0]),
        (5, [1, 1, 1], [2, 2, 1]),
        (3, [1, 1, 1, 1], [1, 1, 1, 0]),
        (6, [1, 1, 2], [2, 1, 3]),  # remainders .5 .5 0: one extra, to the first
        (7, [1, 1, 2], [2, 2, 3]),  # remainders .75 .75 .5: the two largest get one each
        (10, [1, 3], [3, 7]),  # remainders .5 .5: earlier member first
        (10, [3, 1], [8, 2]),
    ],
)
def test_deterministic_tie_breaking(total, bws, expected):
    assert span_sizes(total, bws) == expected
    assert span_sizes(total, tuple(bws)) == expected  # any sequence type
    assert span_sizes(total, [float(b) for b in bws]) == expected


def test_same_inputs_same_plan_every_time():
    rng = random.Random(3)
    bws = random_bandwidths(rng, 9)
    first = plan_spans(987_654, bws)
    assert all(plan_spans(987_654, list(bws)) == first for _ in range(5))


def test_largest_remainder_wins_over_member_order():
    # exact shares 1.2, 1.8: the second member's larger remainder takes the extra element
    assert span_sizes(3, [2, 3]) == [1, 2]


def test_zero_bandwidth_members_get_empty_spans():
    assert span_sizes(5, [0, 1, 0, 1]) == [0, 3, 0, 2]
    assert plan_spans(5, [0, 1, 0, 1]) == [(0, 0), (0, 3), (3, 3), (3, 5)]
    assert span_sizes(7, [0.0, 0.0, 2.5]) == [0, 0, 7]
    assert plan_spans(1, [0, 1e-9]) == [(0, 0), (0, 1)]


def test_single_member_owns_everything():
    assert plan_spans(17, [4.0]) == [(0, 17)]


def test_total_zero_gives_empty_spans():
    assert span_sizes(0, [1, 2, 0]) == [0, 0, 0]
    assert plan_spans(0, [1, 2, 0]) == [(0, 0), (0, 0), (0, 0)]


@pytest.mark.parametrize(
    "total, bws, needle",
    [
        (10, [], "at least one member"),
        (10, [1.0, -1.0], "finite and >= 0"),
        (10, [-0.5], "finite and >= 0"),
        (10, [1.0, math.nan], "finite and >= 0"),
        (10, [math.inf, 1.0], "finite and >= 0"),
        (10, [-math.inf, 1.0], "finite and >= 0"),
        (10, [0.0, 0.0], "positive bandwidth"),
        (10, [0], "positive bandwidth"),
        (-1, [1.0], "total must be >= 0"),
    ],
)
def test_value_errors(total, bws, needle):
    with pytest.raises(ValueError, match=needle):
        span_sizes(total, bws)
    with pytest.raises(ValueError, match=needle):
        plan_spans(total, bws)


@pytest.mark.parametrize("total, bws, expected", [(10, [1e308, 1.0], [10, 0]), (10, [1e308, 1e308], [5, 5])])
def test_huge_finite_bandwidths_still_tile(total, bws, expected):
    assert span_sizes(total, bws) == expected
