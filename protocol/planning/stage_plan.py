"""Stage planning for pipeline training: where to cut a model into stages, and which node serves which stage.

Pure functions on numbers, no I/O, so simulations/ reuses them unchanged (DESIGN.md).

A model too large for one volunteer is cut into contiguous layer ranges, *stages* ([start, end) each), and
every stage is served by one or more replica nodes. A micro-batch passes every stage in order, so the swarm
runs at the pace of its slowest stage, the bottleneck. Costs are one number per transformer block (parameters
or FLOPs); ``first_extra`` (embeddings) is fixed to the first stage, ``last_extra`` (final norm + head) to the
last; optional ``layer_bytes`` (+ ``first_extra_bytes`` / ``last_extra_bytes``) give each stage's memory.

Cutting (StagePlan)
* ``layer_wise``: equal layer counts (they differ by at most one; earlier stages get the extra layer).
* ``balanced``: the smallest possible largest stage cost over all contiguous partitions, exactly: the
  "chains-on-chains" / linear partition problem (Bokhari, IEEE Trans. Computers 1988; Pinar & Aykanat,
  "Fast optimal load balancing algorithms for 1D partitioning", JPDC 2004). Greedy cutting (fill each stage
  up to total/k) is not optimal; a dynamic program over (stages used, layers covered) tries every last cut,
  O(n^2 k) segment evaluations. Ties are common (equal or zero-cost layers) and every peer must compute the
  same plan, so the DP minimises one total key: (1) the stage costs sorted from largest down, compared
  lexicographically (the largest as small as possible, then the second largest, ...); (2) then the layer
  counts sorted from largest down (as even as possible); (3) then earlier stages hold more layers, as in
  layer_wise. Appending the same stage to two prefixes keeps their order under (1)-(3), so keeping the best
  prefix per (stages, layers) state is exact for the whole key.
* ``memory_aware``: stage i runs on hosts[i] (memory bytes, TFLOPS), in the given order. Minimises the
  largest cost_i / tflops_i subject to memory_i <= host memory_i: the same DP without the segments that do
  not fit, the same tie rules on times; ValueError("the model does not fit: ...") when no split fits.
Segment sums are exact (the floats' exact values summed as integers, rounded once): a stage's cost equals
math.fsum of its parts, whatever the cuts.

Node -> stage assignment lives in protocol/planning/stage_assign.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from numbers import Integral, Real
from typing import cast

STRATEGIES = ("layer_wise", "balanced", "memory_aware")
SAFE = 1.0 + 1e-9  # inflates float upper bounds past any rounding of sums of < 10**6 terms (stage_assign too)


def check_number(name: str, value: object, *, allow_inf: bool = False) -> float:
    """``value`` as a float, or ValueError unless it is a real number >= 0 (finite unless allow_inf)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large for a float: {value!r}") from None
    if math.isnan(x) or x < 0 or (math.isinf(x) and not allow_inf):
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number >= 0, got {value!r}")
    return x


def _numbers(name: str, values: object) -> list[float]:
    if isinstance(values, (str, bytes, dict)) or not (hasattr(values, "__len__") and hasattr(values, "__iter__")):
        raise ValueError(f"{name} must be a sequence of numbers, got {type(values).__name__}")  # numpy arrays pass
    return [check_number(f"{name}[{i}]", v) for i, v in enumerate(values)]


def _stage_count(num_stages: object, num_layers: int) -> int:
    if isinstance(num_stages, bool) or not isinstance(num_stages, Integral):
        raise ValueError(f"num_stages must be an int, got {num_stages!r}")
    num_stages = int(num_stages)
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {num_stages} stages: need 1 <= stages <= layers")
    return num_stages


def segment_sums(values: list[float], first: float, last: float) -> Callable[[int, int], float]:
    """seg(a, b) = the exact sum of values[a:b] (+ first if a == 0, + last if b == n), rounded once."""
    ratios = [v.as_integer_ratio() for v in values + [first, last]]  # denominators are powers of two
    shift = max(den.bit_length() - 1 for _, den in ratios)
    ints = [num << (shift - den.bit_length() + 1) for num, den in ratios]
    prefix = [0, *accumulate(ints[:-2])]
    head, tail, scale, n = ints[-2], ints[-1], 1 << shift, len(values)

    def seg(a: int, b: int) -> float:
        return (prefix[b] - prefix[a] + (head if a == 0 else 0) + (tail if b == n else 0)) / scale  # rounds once

    try:
        seg(0, n)
    except OverflowError:
        raise ValueError("the costs add up past the largest float") from None
    return seg


def _model(layer_costs, first_extra, last_extra, layer_bytes, first_extra_bytes, last_extra_bytes):
    """(num_layers, cost(a, b), memory(a, b) or None) after checking every argument."""
    costs = _numbers("layer_costs", layer_costs)
    if not costs:
        raise ValueError("layer_costs is empty: at least one layer is needed")
    cost = segment_sums(costs, check_number("first_extra", first_extra), check_number("last_extra", last_extra))
    memory = None
    if layer_bytes is not None:
        if isinstance(layer_bytes, Real) and not isinstance(layer_bytes, bool):
            per_layer = [check_number("layer_bytes", layer_bytes)] * len(costs)
        else:
            per_layer = _numbers("layer_bytes", layer_bytes)
            if len(per_layer) != len(costs):
                raise ValueError(f"layer_bytes has {len(per_layer)} entries for {len(costs)} layers")
        ends = check_number("first_extra_bytes", first_extra_bytes), check_number("last_extra_bytes", last_extra_bytes)
        memory = segment_sums(per_layer, *ends)
    return len(costs), cost, memory


@dataclass(frozen=True)
class Host:
    """A machine a stage is planned for: the memory it gives the stage (bytes; inf = no limit) and its speed."""

    memory_bytes: float
    tflops: float

    def __post_init__(self) -> None:
        check_number("Host.memory_bytes", self.memory_bytes, allow_inf=True)
        if check_number("Host.tflops", self.tflops) == 0:
            raise ValueError("Host.tflops must be > 0, got 0")


@dataclass(frozen=True)
class StagePlan:
    """Contiguous layer ranges [start, end) that tile [0, num_layers), with each stage's cost (and memory)."""

    strategy: str
    spans: tuple[tuple[int, int], ...]
    costs: tuple[float, ...]
    memory: tuple[float, ...] | None = None  # bytes per stage, when layer_bytes was given
    hosts: tuple[Host, ...] | None = None  # memory_aware: stage i is planned for hosts[i]

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if not self.spans:
            raise ValueError("a stage plan needs at least one stage")
        start = 0
        for i, span in enumerate(self.spans):
            if not (isinstance(span, tuple) and len(span) == 2 and span[0] == start and span[1] > start):
                raise ValueError(f"spans must tile the layers contiguously, stage {i} is {span!r}")
            start = span[1]
        for name in ("costs", "memory", "hosts"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.spans):
                raise ValueError(f"{name} has {len(value)} entries for {len(self.spans)} stages")

    @property
    def num_stages(self) -> int:
        return len(self.spans)

    @property
    def num_layers(self) -> int:
        return self.spans[-1][1]

    @property
    def times(self) -> tuple[float, ...]:
        """cost / host TFLOPS per stage for memory_aware plans; the costs otherwise."""
        if self.hosts is None:
            return self.costs
        return tuple(c / h.tflops for c, h in zip(self.costs, self.hosts))

    @property
    def max_cost(self) -> float:
        return max(self.costs)

    @property
    def bottleneck(self) -> int:
        """The stage with the largest time (cost where no hosts), the lowest index on ties."""
        times = self.times
        return times.index(max(times))

    def rows(self) -> list[dict]:
        """One dict per stage, ready for a table printer or JSON."""
        total = math.fsum(self.costs)
        rows = []
        for i, ((start, end), cost) in enumerate(zip(self.spans, self.costs)):
            row = {"stage": i, "start": start, "end": end, "layers": end - start, "cost": cost,
                   "share": cost / total if total > 0 else 1.0 / self.num_stages}
            if self.memory is not None:
                row["memory_bytes"] = self.memory[i]
            if self.hosts is not None:
                row.update(host_memory_bytes=self.hosts[i].memory_bytes, host_tflops=self.hosts[i].tflops,
                           time=self.times[i])
            rows.append(row)
        return rows

    def table(self) -> str:
        """A fixed-width text table of rows(), one line per stage."""
        rows = self.rows()
        header = list(rows[0])
        cells = [[_cell(row[k]) for k in header] for row in rows]
        widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
        return "\n".join(lines)


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plan(strategy: str, cuts: Sequence[int], model, hosts=None) -> StagePlan:
    _, cost, memory = model
    spans = tuple(zip(cuts[:-1], cuts[1:]))
    memory = None if memory is None else tuple(memory(a, b) for a, b in spans)
    return StagePlan(strategy, spans, tuple(cost(a, b) for a, b in spans), memory, hosts)


def _desc(values: tuple, value) -> tuple:
    return tuple(sorted(values + (value,), reverse=True))


def _optimal_cuts(n: int, k: int, value: Callable[[int, int, int], float | None]) -> tuple[int, ...] | None:
    """Cut points (0, ..., n) minimising the tie-break key of the module docstring; None if nothing fits.

    value(stage, a, b) is the figure of merit (cost or time) of layers [a, b) as that stage, None where the
    stage cannot hold them. best[b] is (merits sorted down, sizes sorted down, negated sizes in order, cuts).
    """
    best: dict[int, tuple[tuple, tuple, tuple, tuple[int, ...]]] = {0: ((), (), (), (0,))}
    for j in range(k):
        nxt: dict[int, tuple[tuple, tuple, tuple, tuple[int, ...]]] = {}
        for b in range(j + 1, n - (k - 1 - j) + 1):
            choice: tuple[tuple, tuple, tuple, tuple[int, ...]] | None = None
            for a, (merits, sizes, order, cuts) in best.items():
                if a >= b:
                    continue
                v = value(j, a, b)
                if v is None:
                    continue
                key = (_desc(merits, v), _desc(sizes, b - a), order + (a - b,))
                if choice is None or key < choice[:3]:
                    choice = key + (cuts + (b,),)
            if choice is not None:
                nxt[b] = choice
        best = nxt
    return best[n][3] if n in best else None


def plan_layer_wise(layer_costs: Sequence[float], num_stages: int, *, first_extra: float = 0.0,
                    last_extra: float = 0.0, layer_bytes=None, first_extra_bytes: float = 0.0,
                    last_extra_bytes: float = 0.0) -> StagePlan:
    """Equal layer counts: they differ by at most one, and the earlier stages get the extra layers."""
    model = _model(layer_costs, first_extra, last_extra, layer_bytes, first_extra_bytes, last_extra_bytes)
    k = _stage_count(num_stages, model[0])
    base, extra = divmod(model[0], k)
    sizes = [base + (1 if i < extra else 0) for i in range(k)]
    return _plan("layer_wise", [sum(sizes[:i]) for i in range(k + 1)], model)


def plan_balanced(layer_costs: Sequence[float], num_stages: int, *, first_extra: float = 0.0,
                  last_extra: float = 0.0, layer_bytes=None, first_extra_bytes: float = 0.0,
                  last_extra_bytes: float = 0.0) -> StagePlan:
    """Contiguous stages with the smallest possible largest cost (exact DP; ties as in the module docstring)."""
    model = _model(layer_costs, first_extra, last_extra, layer_bytes, first_extra_bytes, last_extra_bytes)
    n, cost, _ = model
    cuts = _optimal_cuts(n, _stage_count(num_stages, n), lambda j, a, b: cost(a, b))
    if cuts is None:  # unreachable: every stage holds any layers, and _stage_count keeps stages <= layers
        raise RuntimeError(f"no split of {n} layers into {num_stages} stages")
    return _plan("balanced", cuts, model)


def plan_memory_aware(layer_costs: Sequence[float], hosts: Sequence[Host], *, layer_bytes,
                      first_extra: float = 0.0, last_extra: float = 0.0, first_extra_bytes: float = 0.0,
                      last_extra_bytes: float = 0.0) -> StagePlan:
    """Stage i on hosts[i]: the smallest largest cost_i / tflops_i with every stage fitting its host's memory.

    ``layer_bytes`` (one number for every layer, or one per layer) is required. Raises
    ValueError("the model does not fit: ...") when no contiguous split fits the hosts in the given order.
    """
    if layer_bytes is None:
        raise ValueError("memory_aware planning needs layer_bytes")
    if isinstance(hosts, (str, bytes)) or not isinstance(hosts, Sequence) or not hosts or not all(
            isinstance(h, Host) for h in hosts):
        raise ValueError(f"hosts must be a non-empty sequence of Host, got {hosts!r}")
    model = _model(layer_costs, first_extra, last_extra, layer_bytes, first_extra_bytes, last_extra_bytes)
    n, cost, memory = model
    k = _stage_count(len(hosts), n)

    def time(j: int, a: int, b: int) -> float | None:
        return None if memory(a, b) > hosts[j].memory_bytes else cost(a, b) / hosts[j].tflops

    cuts = _optimal_cuts(n, k, time)
    if cuts is None:
        need, have = memory(0, n), math.fsum(h.memory_bytes for h in hosts)
        why = (f"it needs {need:.4g} bytes and the {k} hosts have {have:.4g} in total" if need > have else
               f"no contiguous split of its {n} layers ({need:.4g} bytes) fits each of the {k} hosts' memory in "
               f"the given order ({', '.join(f'{h.memory_bytes:.4g}' for h in hosts)} bytes)")
        raise ValueError(f"the model does not fit: {why}")
    return _plan("memory_aware", cuts, model, tuple(hosts))


def plan_stages(layer_costs: Sequence[float], stages: int | Sequence[Host], *,
                strategy: str | None = None, **options) -> StagePlan:
    """One front door: ``stages`` is a stage count (layer_wise, or balanced by default) or a list of Host
    (memory_aware). ``options`` are the keyword arguments of the chosen planner."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if isinstance(stages, Integral) and not isinstance(stages, bool):
        strategy = strategy or "balanced"
        if strategy not in ("layer_wise", "balanced"):
            raise ValueError(f"strategy {strategy!r} takes a list of hosts, not a stage count")
        # int(): the planners' _stage_count takes any Integral to int the same way (numpy ints included)
        return (plan_layer_wise if strategy == "layer_wise" else plan_balanced)(layer_costs, int(stages), **options)
    if strategy not in (None, "memory_aware"):
        raise ValueError(f"strategy {strategy!r} takes a stage count, not a list of hosts")
    # cast: mypy does not count int as an Integral, so it keeps int here; what gets here is hosts, or a bool or
    # other non-count that plan_memory_aware refuses with ValueError
    return plan_memory_aware(layer_costs, cast(Sequence[Host], stages), **options)


def plan_to_json(plan: StagePlan) -> bytes:
    """A stage plan as JSON (a submitter keeps its plan beside the shards, <home>/jobs/J/plan.json, for a
    restarted trainer)."""
    return json.dumps({"strategy": plan.strategy, "spans": plan.spans, "costs": plan.costs, "memory": plan.memory,
                       "hosts": None if plan.hosts is None else [[h.memory_bytes, h.tflops] for h in plan.hosts]},
                      indent=1).encode()


def plan_from_json(data: bytes) -> StagePlan:
    obj = json.loads(data)
    return StagePlan(obj["strategy"], tuple(tuple(s) for s in obj["spans"]), tuple(obj["costs"]),
                     None if obj["memory"] is None else tuple(obj["memory"]),
                     None if obj["hosts"] is None else tuple(Host(*h) for h in obj["hosts"]))
