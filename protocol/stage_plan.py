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

Assigning nodes (Assignment). A stage's throughput is math.fsum(its replicas' throughputs) / its cost (inf
for a zero-cost stage, 0 without replicas); the swarm's is the minimum. Petals places servers by this rule:
choose_best_blocks (petals/server/block_selection.py) puts a server on the span whose sorted per-block
throughputs are smallest, i.e. the bottleneck, and should_choose_other_blocks moves one only when that raises
the swarm's minimum (Borzunov et al., "Petals: Collaborative Inference and Fine-tuning of Large Models",
ACL 2023 demos, arXiv:2209.01188). SWARM parallelism rebalances training the same way, moving peers from
over-served stages to the bottleneck (Ryabinin et al., "SWARM Parallelism: Training Large Models Can Be
Surprisingly Communication-Efficient", ICML 2023, arXiv:2301.11913, "adaptive swarm rebalancing").
* ``assign_nodes``: maximising the minimum is NP-hard in general (machine covering), so a maximum bipartite
  matching first gives every stage a replica it fits (costliest stages, fastest nodes first), the other
  nodes water-fill the bottleneck, fastest first (Petals' rule), then a branch and bound proves that optimal
  or improves it unless ``search_budget`` runs out (``Assignment.optimal`` says which).
* ``rebalance_join``: the new node goes to the fitting stage where it raises the sorted stage throughputs
  most (the bottleneck if it fits there); nobody else moves.
* ``rebalance_leave``: if the leaver's stage keeps a replica nothing moves; otherwise one node comes from a
  stage with >= 2 replicas, chosen so the sorted stage throughputs end largest (the stage with the most slack
  gives), or, when memory allows no single move, the shortest chain of moves (breadth-first search).
Ties go to the lower stage index, then the lower node id.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from itertools import accumulate
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Optional, Sequence, Union

STRATEGIES = ("layer_wise", "balanced", "memory_aware")
_SAFE = 1.0 + 1e-9  # inflates float upper bounds past any rounding of sums of < 10**6 terms
_SEARCH_NODES = 256  # the exact search recurses once per node; larger swarms keep the greedy assignment


def _number(name: str, value: object, *, allow_inf: bool = False) -> float:
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
    return [_number(f"{name}[{i}]", v) for i, v in enumerate(values)]


def _stage_count(num_stages: object, num_layers: int) -> int:
    if isinstance(num_stages, bool) or not isinstance(num_stages, Integral):
        raise ValueError(f"num_stages must be an int, got {num_stages!r}")
    num_stages = int(num_stages)
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {num_stages} stages: need 1 <= stages <= layers")
    return num_stages


def _segment_sums(values: list[float], first: float, last: float) -> Callable[[int, int], float]:
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
    cost = _segment_sums(costs, _number("first_extra", first_extra), _number("last_extra", last_extra))
    memory = None
    if layer_bytes is not None:
        if isinstance(layer_bytes, Real) and not isinstance(layer_bytes, bool):
            per_layer = [_number("layer_bytes", layer_bytes)] * len(costs)
        else:
            per_layer = _numbers("layer_bytes", layer_bytes)
            if len(per_layer) != len(costs):
                raise ValueError(f"layer_bytes has {len(per_layer)} entries for {len(costs)} layers")
        ends = _number("first_extra_bytes", first_extra_bytes), _number("last_extra_bytes", last_extra_bytes)
        memory = _segment_sums(per_layer, *ends)
    return len(costs), cost, memory


@dataclass(frozen=True)
class Host:
    """A machine a stage is planned for: the memory it gives the stage (bytes; inf = no limit) and its speed."""

    memory_bytes: float
    tflops: float

    def __post_init__(self) -> None:
        _number("Host.memory_bytes", self.memory_bytes, allow_inf=True)
        if _number("Host.tflops", self.tflops) == 0:
            raise ValueError("Host.tflops must be > 0, got 0")


@dataclass(frozen=True)
class StagePlan:
    """Contiguous layer ranges [start, end) that tile [0, num_layers), with each stage's cost (and memory)."""

    strategy: str
    spans: tuple[tuple[int, int], ...]
    costs: tuple[float, ...]
    memory: Optional[tuple[float, ...]] = None  # bytes per stage, when layer_bytes was given
    hosts: Optional[tuple[Host, ...]] = None  # memory_aware: stage i is planned for hosts[i]

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


def _optimal_cuts(n: int, k: int, value: Callable[[int, int, int], Optional[float]]) -> Optional[tuple[int, ...]]:
    """Cut points (0, ..., n) minimising the tie-break key of the module docstring; None if nothing fits.

    value(stage, a, b) is the figure of merit (cost or time) of layers [a, b) as that stage, None where the
    stage cannot hold them. best[b] is (merits sorted down, sizes sorted down, negated sizes in order, cuts).
    """
    best = {0: ((), (), (), (0,))}
    for j in range(k):
        nxt = {}
        for b in range(j + 1, n - (k - 1 - j) + 1):
            choice = None
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
    return _plan("balanced", _optimal_cuts(n, _stage_count(num_stages, n), lambda j, a, b: cost(a, b)), model)


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

    def time(j: int, a: int, b: int) -> Optional[float]:
        return None if memory(a, b) > hosts[j].memory_bytes else cost(a, b) / hosts[j].tflops

    cuts = _optimal_cuts(n, k, time)
    if cuts is None:
        need, have = memory(0, n), math.fsum(h.memory_bytes for h in hosts)
        why = (f"it needs {need:.4g} bytes and the {k} hosts have {have:.4g} in total" if need > have else
               f"no contiguous split of its {n} layers ({need:.4g} bytes) fits each of the {k} hosts' memory in "
               f"the given order ({', '.join(f'{h.memory_bytes:.4g}' for h in hosts)} bytes)")
        raise ValueError(f"the model does not fit: {why}")
    return _plan("memory_aware", cuts, model, tuple(hosts))


def plan_stages(layer_costs: Sequence[float], stages: Union[int, Sequence[Host]], *,
                strategy: Optional[str] = None, **options) -> StagePlan:
    """One front door: ``stages`` is a stage count (layer_wise, or balanced by default) or a list of Host
    (memory_aware). ``options`` are the keyword arguments of the chosen planner."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if isinstance(stages, Integral) and not isinstance(stages, bool):
        strategy = strategy or "balanced"
        if strategy not in ("layer_wise", "balanced"):
            raise ValueError(f"strategy {strategy!r} takes a list of hosts, not a stage count")
        return (plan_layer_wise if strategy == "layer_wise" else plan_balanced)(layer_costs, stages, **options)
    if strategy not in (None, "memory_aware"):
        raise ValueError(f"strategy {strategy!r} takes a stage count, not a list of hosts")
    return plan_memory_aware(layer_costs, stages, **options)


# ----------------------------------------------------------------------------------------- node assignment


@dataclass(frozen=True)
class NodeSpec:
    """A node to place: its throughput (stage cost units per second, e.g. TFLOPS for FLOP costs) and memory."""

    node_id: str
    throughput: float
    memory_bytes: float = math.inf  # inf: memory unknown or no limit

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError(f"node_id must be a non-empty str, got {self.node_id!r}")
        _number(f"throughput of node {self.node_id!r}", self.throughput)
        _number(f"memory_bytes of node {self.node_id!r}", self.memory_bytes, allow_inf=True)


def _rate(cost: float, throughputs: Sequence[float]) -> float:
    if not throughputs:
        return 0.0
    return math.inf if cost == 0 else math.fsum(throughputs) / cost


def _fits(plan: StagePlan, node: NodeSpec, stage: int) -> bool:
    return plan.memory is None or node.memory_bytes >= plan.memory[stage]


@dataclass(frozen=True)
class Assignment:
    """Which nodes serve each stage (sorted by node id) and each stage's throughput."""

    stages: tuple[tuple[NodeSpec, ...], ...]
    rates: tuple[float, ...]
    optimal: bool = False  # True when assign_nodes proved no assignment has a larger min_rate

    def __post_init__(self) -> None:
        if len(self.rates) != len(self.stages):
            raise ValueError(f"{len(self.rates)} rates for {len(self.stages)} stages")
        ids = [x.node_id for group in self.stages for x in group]
        if len(set(ids)) != len(ids):
            raise ValueError("a node appears more than once in the assignment")

    @property
    def min_rate(self) -> float:
        return min(self.rates)

    @property
    def bottleneck(self) -> int:
        return self.rates.index(self.min_rate)

    def stage_of(self, node_id: str) -> int:
        found = [i for i, group in enumerate(self.stages) if any(x.node_id == node_id for x in group)]
        if not found:
            raise ValueError(f"node {node_id!r} is not in the assignment")
        return found[0]

    def rows(self) -> list[dict]:
        return [{"stage": i, "replicas": [x.node_id for x in g], "throughput": math.fsum(x.throughput for x in g),
                 "rate": r} for i, (g, r) in enumerate(zip(self.stages, self.rates))]


@dataclass(frozen=True)
class Move:
    """node_id went from from_stage to to_stage; None for a node that joined (from) or left (to)."""

    node_id: str
    from_stage: Optional[int]
    to_stage: Optional[int]


@dataclass(frozen=True)
class Rebalance:
    assignment: Assignment
    moves: tuple[Move, ...]

    @property
    def relocated(self) -> tuple[Move, ...]:
        """The moves of nodes that stay in the swarm but change stage."""
        return tuple(m for m in self.moves if m.from_stage is not None and m.to_stage is not None)


def _assignment(plan: StagePlan, groups: Sequence[Sequence[NodeSpec]], optimal: bool) -> Assignment:
    stages = tuple(tuple(sorted(g, key=lambda x: x.node_id)) for g in groups)
    rates = tuple(_rate(c, [x.throughput for x in g]) for c, g in zip(plan.costs, stages))
    return Assignment(stages, rates, optimal)


def _check_nodes(nodes: object) -> list[NodeSpec]:
    if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Sequence):
        raise ValueError(f"nodes must be a sequence of NodeSpec, got {type(nodes).__name__}")
    if not all(isinstance(x, NodeSpec) for x in nodes):
        raise ValueError("nodes must be NodeSpec instances")
    ids = [x.node_id for x in nodes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"node ids must be unique, got {sorted(i for i in set(ids) if ids.count(i) > 1)} twice")
    return list(nodes)


def _matching(nodes: Sequence[int], stages: Sequence[int], ok: Callable[[int, int], bool]) -> Optional[dict]:
    """node -> stage giving each stage its own node with ok(node, stage), or None (Kuhn's augmenting paths;
    stages are served in the given order, each by the first free node in the given order)."""
    owner: dict[int, int] = {}

    def augment(s: int, seen: set) -> bool:
        for i in nodes:
            if i not in seen and ok(i, s):
                seen.add(i)
                if i not in owner or augment(owner[i], seen):
                    owner[i] = s
                    return True
        return False

    return owner if all(augment(s, set()) for s in stages) else None


def assign_nodes(plan: StagePlan, nodes: Sequence[NodeSpec], *, search_budget: int = 20_000) -> Assignment:
    """Each node on one stage it fits, every stage with >= 1 replica, maximising the slowest stage's throughput.

    Greedy start, then branch and bound; optimal unless ``search_budget`` search nodes run out (see .optimal).
    """
    nodes = _check_nodes(nodes)
    if isinstance(search_budget, bool) or not isinstance(search_budget, int) or search_budget < 1:
        raise ValueError(f"search_budget must be an int >= 1, got {search_budget!r}")
    k = plan.num_stages
    if len(nodes) < k:
        raise ValueError(f"{len(nodes)} nodes cannot serve {k} stages: every stage needs at least one replica")
    order = sorted(nodes, key=lambda x: (-x.throughput, -x.memory_bytes, x.node_id))  # alike nodes adjacent
    fits = [[_fits(plan, x, s) for s in range(k)] for x in order]
    for x, row in zip(order, fits):
        if not any(row):
            raise ValueError(f"node {x.node_id!r} fits no stage: it has {x.memory_bytes:.4g} bytes, "
                             f"the smallest stage needs {min(plan.memory):.4g}")
    cover = _matching(range(len(order)), sorted(range(k), key=lambda s: (-plan.costs[s], s)), lambda i, s: fits[i][s])
    if cover is None:  # costliest stages get the fastest nodes first
        raise ValueError(f"cannot give every stage a replica: stages need {list(plan.memory)} bytes, the nodes "
                         f"have {sorted(x.memory_bytes for x in nodes)}")
    choice = [cover.get(i) for i in range(len(order))]
    load = [math.fsum(order[i].throughput for i, s in cover.items() if s == stage) for stage in range(k)]
    for i, x in enumerate(order):  # the rest water-fill the bottleneck, fastest first (Petals' rule)
        if choice[i] is None:
            choice[i] = min((s for s in range(k) if fits[i][s]), key=lambda s: (_rate(plan.costs[s], [load[s]]), s))
            load[choice[i]] += x.throughput
    optimal = False
    if len(order) <= _SEARCH_NODES:
        choice, optimal = _branch_and_bound(plan, order, fits, choice, search_budget)
    groups = [[] for _ in range(k)]
    for x, s in zip(order, choice):
        groups[s].append(x)
    return _assignment(plan, groups, optimal)


def _branch_and_bound(plan, order, fits, incumbent, budget) -> tuple[list[int], bool]:
    """Try node -> stage choices (fastest node first, lowest-rate stage first) for a larger exact min rate.

    Bounds no completion can beat: all throughput / all positive cost, and per stage (its load + the fastest
    remaining nodes that fit it, as many as it can still get while every empty stage gets one) / its cost.
    Float bounds are inflated by _SAFE; within that margin of the best the stage bound is redone with fsum.
    Symmetry: nodes alike (throughput, fitting stages) take non-decreasing stages; of stages alike (cost,
    memory, replica throughputs) when a kind of node starts, the lower index gets at least as many of it.
    """
    costs, k, n = plan.costs, plan.num_stages, len(order)
    t = [x.throughput for x in order]
    mem = plan.memory or (None,) * k
    pos = [[j for j in range(n) if fits[j][s]] for s in range(k)]
    top = [_segment_sums([t[j] for j in pos[s]], 0.0, 0.0) for s in range(k)]  # exact sums of runs of pos[s]
    kind_start = [0] * n
    for i in range(1, n):
        same = t[i] == t[i - 1] and fits[i] == fits[i - 1]
        kind_start[i] = kind_start[i - 1] if same else i
    positive = math.fsum(c for c in costs if c > 0)
    aggregate = math.fsum(t) / positive * _SAFE if positive > 0 else math.inf
    members, load, choice, pred = [[] for _ in range(k)], [0.0] * k, [0] * n, [[None] * k for _ in range(n)]
    state = {"expanded": 0, "empty": k, "choice": list(incumbent),
             "best": min(_rate(c, [t[i] for i in range(n) if incumbent[i] == s]) for s, c in enumerate(costs))}

    def runs(i: int, s: int) -> tuple[int, int]:
        first = bisect_left(pos[s], i)
        can_get = n - i - state["empty"] + (0 if members[s] else 1)
        return first, first + max(0, min(can_get, len(pos[s]) - first))

    def prune(i: int) -> bool:
        if n - i < state["empty"] or any(not members[s] and runs(i, s)[0] == len(pos[s]) for s in range(k)):
            return True
        ub = min([aggregate] + [(load[s] + top[s](*runs(i, s))) * _SAFE / costs[s] for s in range(k) if costs[s] > 0])
        if ub > state["best"] * _SAFE * _SAFE:
            return False
        if ub <= state["best"]:
            return True
        tight = min(_rate(costs[s], members[s] + [t[j] for j in pos[s][slice(*runs(i, s))]]) for s in range(k))
        return tight <= state["best"]

    def solve_matching(i: int) -> bool:
        empty, rest = [s for s in range(k) if not members[s]], range(i, n)
        fixed = min((_rate(costs[s], members[s]) for s in range(k) if members[s]), default=math.inf)
        values = sorted({_rate(costs[s], [t[j]]) for s in empty for j in rest if fits[j][s]})
        lo, hi, found = 0, len(values) - 1, None
        while lo <= hi:  # the largest threshold that still lets every empty stage have its own node
            mid = (lo + hi) // 2
            match = _matching(rest, empty, lambda j, s: fits[j][s] and _rate(costs[s], [t[j]]) >= values[mid])
            lo, hi, found = (mid + 1, hi, (values[mid], match)) if match else (lo, mid - 1, found)
        if found is not None and min(fixed, found[0]) > state["best"]:
            state["best"] = min(fixed, found[0])
            state["choice"] = choice[:i] + [found[1][j] for j in rest]
        return True

    def visit(i: int) -> bool:  # False once the budget is spent
        state["expanded"] += 1
        if state["expanded"] > budget:
            return False
        if i == n:
            value = min(_rate(c, g) for c, g in zip(costs, members))
            if value > state["best"]:
                state["best"], state["choice"] = value, list(choice)
            return True
        if prune(i):
            return True
        if n - i == state["empty"]:  # each node left must fill its own empty stage: a bottleneck matching
            return solve_matching(i)
        first = kind_start[i]
        if first == i:  # a new kind of node: note which stages are alike right now
            last: dict = {}
            for s in range(k):
                alike = (costs[s], mem[s], tuple(members[s]))
                pred[i][s] = last.get(alike)
                last[alike] = s
        taken = choice[first:i]
        allowed = [s for s in range(k) if fits[i][s] and (first == i or s >= choice[i - 1])
                   and (pred[first][s] is None or taken.count(s) < taken.count(pred[first][s]))]
        for s in sorted(allowed, key=lambda s: (_rate(costs[s], [load[s]] if members[s] else []), s)):
            state["empty"] -= not members[s]
            members[s].append(t[i])
            load[s] += t[i]
            choice[i] = s
            finished = visit(i + 1)
            members[s].pop()
            load[s] = math.fsum(members[s])  # undo without drift
            state["empty"] += not members[s]
            if not finished:
                return False
        return True

    completed = visit(0)
    return state["choice"], completed


def _same_plan(plan: StagePlan, assignment: Assignment) -> list[list[NodeSpec]]:
    if not isinstance(assignment, Assignment) or len(assignment.stages) != plan.num_stages:
        raise ValueError(f"the assignment does not match the plan's {plan.num_stages} stages")
    return [list(g) for g in assignment.stages]


def rebalance_join(plan: StagePlan, assignment: Assignment, node: NodeSpec) -> Rebalance:
    """Place a joining node where it raises the sorted stage throughputs most (the bottleneck if it fits)."""
    groups = _same_plan(plan, assignment)
    _check_nodes([x for g in groups for x in g] + [node])
    options = [s for s in range(plan.num_stages) if _fits(plan, node, s)]
    if not options:
        raise ValueError(f"node {node.node_id!r} fits no stage: it has {node.memory_bytes:.4g} bytes, "
                         f"the smallest stage needs {min(plan.memory):.4g}")

    def outcome(s: int) -> tuple:
        rates = list(assignment.rates)
        rates[s] = _rate(plan.costs[s], [x.throughput for x in groups[s]] + [node.throughput])
        return tuple(sorted(rates))

    target = max(options, key=outcome)  # the first of equals: the lowest stage
    groups[target].append(node)
    return Rebalance(_assignment(plan, groups, False), (Move(node.node_id, None, target),))


def rebalance_leave(plan: StagePlan, assignment: Assignment, node_id: str) -> Rebalance:
    """Remove a node; if its stage is left without a replica, refill it with as few moves as possible."""
    groups = _same_plan(plan, assignment)
    k, gone = plan.num_stages, assignment.stage_of(node_id)
    groups[gone] = [x for x in groups[gone] if x.node_id != node_id]
    moves = [Move(node_id, gone, None)]
    if sum(len(g) for g in groups) < k:
        raise ValueError(f"{sum(len(g) for g in groups)} nodes cannot serve {k} stages once {node_id!r} leaves")
    if groups[gone]:
        return Rebalance(_assignment(plan, groups, False), tuple(moves))
    donors = [(d, x) for d in range(k) if len(groups[d]) >= 2 for x in groups[d] if _fits(plan, x, gone)]

    def outcome(d: int, x: NodeSpec) -> tuple:
        rates = list(assignment.rates)
        rates[d] = _rate(plan.costs[d], [y.throughput for y in groups[d] if y is not x])
        rates[gone] = _rate(plan.costs[gone], [x.throughput])
        return tuple(sorted(rates))

    if donors:  # max() keeps the first of equals: the lowest stage, then the lowest node id
        d, x = max(donors, key=lambda donor: outcome(*donor))
        chain = [Move(x.node_id, d, gone)]
    else:
        chain = _refill_chain(plan, groups, gone)
    if chain is None:
        raise ValueError(f"no node can take over stage {gone} after {node_id!r} leaves: "
                         f"none with the {plan.memory[gone]:.4g} bytes it needs can be spared")
    by_id = {x.node_id: x for g in groups for x in g}
    for m in chain:
        groups[m.from_stage] = [x for x in groups[m.from_stage] if x.node_id != m.node_id]
        groups[m.to_stage].append(by_id[m.node_id])
    return Rebalance(_assignment(plan, groups, False), tuple(moves + chain))


def _refill_chain(plan: StagePlan, groups: list[list[NodeSpec]], empty: int) -> Optional[list[Move]]:
    """Fewest moves that refill ``empty``: x1 from d1 to empty, x2 from d2 to d1, ..., ending at a stage
    with >= 2 replicas (breadth-first over stages). Returned donor-first, so no other stage is ever empty."""
    parent: dict[int, Optional[tuple[str, int]]] = {empty: None}
    queue = deque([empty])
    while queue:
        need = queue.popleft()
        for d in range(plan.num_stages):
            if d in parent:
                continue
            for x in groups[d]:
                if not _fits(plan, x, need):
                    continue
                if len(groups[d]) >= 2:
                    chain, cur = [Move(x.node_id, d, need)], need
                    while parent[cur] is not None:
                        moved, to = parent[cur]
                        chain.append(Move(moved, cur, to))
                        cur = to
                    return chain
                parent[d] = (x.node_id, need)
                queue.append(d)
                break
    return None
