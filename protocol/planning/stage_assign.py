"""Which node serves which stage of a StagePlan (protocol/planning/stage_plan.py): pure, no I/O.

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
* ``replica_groups``: nodes grouped for a memory_aware plan (protocol/planning/stage_plan.py plan_memory_aware sizes
  stage i for the i-th group's smallest memory and summed throughput).
* ``follow_live``: an assignment (node ids per stage) brought up to date with the live nodes, as a daemon
  sees them: the dead leave, newcomers join by rebalance_join's rule, empty stages refill by
  rebalance_leave's (node/jobs/pipeline/pipeline_jobs.py runs it for a pipeline job while it trains).
Ties go to the lower stage index, then the lower node id.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from protocol.planning.stage_plan import SAFE, Host, StagePlan, check_number, segment_sums

_SEARCH_NODES = 256  # the exact search recurses once per node; larger swarms keep the greedy assignment


@dataclass(frozen=True)
class NodeSpec:
    """A node to place: its throughput (stage cost units per second, e.g. TFLOPS for FLOP costs) and memory."""

    node_id: str
    throughput: float
    memory_bytes: float = math.inf  # inf: memory unknown or no limit

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError(f"node_id must be a non-empty str, got {self.node_id!r}")
        check_number(f"throughput of node {self.node_id!r}", self.throughput)
        check_number(f"memory_bytes of node {self.node_id!r}", self.memory_bytes, allow_inf=True)


def _rate(cost: float, throughputs: Sequence[float]) -> float:
    if not throughputs:
        return 0.0
    return math.inf if cost == 0 else math.fsum(throughputs) / cost


def _fits(plan: StagePlan, node: NodeSpec, stage: int) -> bool:
    return plan.memory is None or node.memory_bytes >= plan.memory[stage]


def _needs(plan: StagePlan) -> tuple[float, ...]:
    """Bytes per stage, for messages about nodes that fit no stage: a plan without memory figures rules no
    node out (_fits), so it never gets here; it would need 0 bytes."""
    return plan.memory if plan.memory is not None else (0.0,) * plan.num_stages


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
    from_stage: int | None
    to_stage: int | None


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


def _matching(nodes: Sequence[int], stages: Sequence[int], ok: Callable[[int, int], bool]) -> dict | None:
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
                             f"the smallest stage needs {min(_needs(plan)):.4g}")
    cover = _matching(range(len(order)), sorted(range(k), key=lambda s: (-plan.costs[s], s)), lambda i, s: fits[i][s])
    if cover is None:  # costliest stages get the fastest nodes first
        raise ValueError(f"cannot give every stage a replica: stages need {list(_needs(plan))} bytes, the nodes "
                         f"have {sorted(x.memory_bytes for x in nodes)}")
    load = [math.fsum(order[i].throughput for i, s in cover.items() if s == stage) for stage in range(k)]
    choice: list[int] = []
    for i, x in enumerate(order):  # the rest water-fill the bottleneck, fastest first (Petals' rule)
        to = cover.get(i)
        if to is None:
            to = min((s for s in range(k) if fits[i][s]), key=lambda s: (_rate(plan.costs[s], [load[s]]), s))
            load[to] += x.throughput
        choice.append(to)
    optimal = False
    if len(order) <= _SEARCH_NODES:
        choice, optimal = branch_and_bound(plan, order, fits, choice, search_budget)
    groups: list[list[NodeSpec]] = [[] for _ in range(k)]
    for x, s in zip(order, choice):
        groups[s].append(x)
    return _assignment(plan, groups, optimal)


def branch_and_bound(plan, order, fits, incumbent, budget) -> tuple[list[int], bool]:
    """Try node -> stage choices (fastest node first, lowest-rate stage first) for a larger exact min rate.

    Bounds no completion can beat: all throughput / all positive cost, and per stage (its load + the fastest
    remaining nodes that fit it, as many as it can still get while every empty stage gets one) / its cost.
    Float bounds are inflated by SAFE; within that margin of the best the stage bound is redone with fsum.
    Symmetry: nodes alike (throughput, fitting stages) take non-decreasing stages; of stages alike (cost,
    memory, replica throughputs) when a kind of node starts, the lower index gets at least as many of it.
    """
    costs, k, n = plan.costs, plan.num_stages, len(order)
    t = [x.throughput for x in order]
    mem = plan.memory or (None,) * k
    pos = [[j for j in range(n) if fits[j][s]] for s in range(k)]
    top = [segment_sums([t[j] for j in pos[s]], 0.0, 0.0) for s in range(k)]  # exact sums of runs of pos[s]
    kind_start = [0] * n
    for i in range(1, n):
        same = t[i] == t[i - 1] and fits[i] == fits[i - 1]
        kind_start[i] = kind_start[i - 1] if same else i
    positive = math.fsum(c for c in costs if c > 0)
    aggregate = math.fsum(t) / positive * SAFE if positive > 0 else math.inf
    members: list[list[float]] = [[] for _ in range(k)]
    pred: list[list[int | None]] = [[None] * k for _ in range(n)]
    load, choice = [0.0] * k, [0] * n
    state = {"expanded": 0, "empty": k, "choice": list(incumbent),
             "best": min(_rate(c, [t[i] for i in range(n) if incumbent[i] == s]) for s, c in enumerate(costs))}

    def runs(i: int, s: int) -> tuple[int, int]:
        first = bisect_left(pos[s], i)
        can_get = n - i - state["empty"] + (0 if members[s] else 1)
        return first, first + max(0, min(can_get, len(pos[s]) - first))

    def prune(i: int) -> bool:
        if n - i < state["empty"] or any(not members[s] and runs(i, s)[0] == len(pos[s]) for s in range(k)):
            return True
        ub = min([aggregate] + [(load[s] + top[s](*runs(i, s))) * SAFE / costs[s] for s in range(k) if costs[s] > 0])
        if ub > state["best"] * SAFE * SAFE:
            return False
        if ub <= state["best"]:
            return True
        tight = min(_rate(costs[s], members[s] + [t[j] for j in pos[s][slice(*runs(i, s))]]) for s in range(k))
        return tight <= state["best"]

    def solve_matching(i: int) -> bool:
        empty, rest = [s for s in range(k) if not members[s]], range(i, n)
        fixed = min((_rate(costs[s], members[s]) for s in range(k) if members[s]), default=math.inf)
        values = sorted({_rate(costs[s], [t[j]]) for s in empty for j in rest if fits[j][s]})

        def at_least(v: float) -> Callable[[int, int], bool]:  # node j may have empty stage s for threshold v
            return lambda j, s: fits[j][s] and _rate(costs[s], [t[j]]) >= v

        lo, hi, found = 0, len(values) - 1, None
        while lo <= hi:  # the largest threshold that still lets every empty stage have its own node
            mid = (lo + hi) // 2
            match = _matching(rest, empty, at_least(values[mid]))
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
                   and ((p := pred[first][s]) is None or taken.count(s) < taken.count(p))]
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


def replica_groups(nodes: Sequence[NodeSpec], stages: int, replicas: int) -> list[tuple[Host, tuple[NodeSpec, ...]]]:
    """For memory_aware planning of a job with ``replicas`` hosts per stage: the ``stages * replicas`` nodes
    cut into groups of ``replicas`` by memory (largest first, then throughput, then id), each described as the
    Host a stage planned for it sees: the smallest memory of the group (every replica holds the whole stage)
    and the group's summed throughput (the replicas share the stage's micro-batches)."""
    nodes = _check_nodes(nodes)
    if stages < 1 or replicas < 1 or len(nodes) != stages * replicas:
        raise ValueError(f"{stages} stages x {replicas} replicas need {stages * replicas} nodes, got {len(nodes)}")
    ranked = sorted(nodes, key=lambda x: (-x.memory_bytes, -x.throughput, x.node_id))
    groups = [tuple(ranked[i * replicas:(i + 1) * replicas]) for i in range(stages)]
    return [(Host(min(x.memory_bytes for x in g), max(math.fsum(x.throughput for x in g), 1e-12)), g)
            for g in groups]


def even_groups(groups: list[list[NodeSpec]], costs: Sequence[float], replicas: int) -> list[list[NodeSpec]]:
    """assign_nodes' groups moved to exactly ``replicas`` per stage: the slowest host of the fullest stage moves
    to the costliest short stage until none is short (the caller passes stages * replicas nodes)."""
    groups = [sorted(g, key=lambda x: (-x.throughput, x.node_id)) for g in groups]
    while True:
        short = [s for s, g in enumerate(groups) if len(g) < replicas]
        if not short:
            return groups
        full = max(range(len(groups)), key=lambda s: (len(groups[s]), -s))
        to = max(short, key=lambda s: (costs[s], -s))
        groups[to].append(groups[full].pop())


def best_group_order(plan_for: Callable[[list[Host]], StagePlan], nodes: Sequence[NodeSpec], stages: int,
                     replicas: int) -> tuple[StagePlan, list[list[NodeSpec]]]:
    """(plan, groups): the nodes grouped by memory (replica_groups), and the order of the groups along the
    pipeline whose plan (``plan_for(hosts in stage order)``, a memory_aware planner that raises ValueError when
    the model does not fit) has the smallest slowest stage: every distinct order for up to 6 stages, groups
    alike in memory and speed counted once; largest memory first beyond. ValueError naming why when the model
    fits no order."""
    pairs = replica_groups(nodes, stages, replicas)
    orders = itertools.permutations(range(stages)) if stages <= 6 else [tuple(range(stages))]
    best: tuple[StagePlan, list[list[NodeSpec]]] | None = None
    error, seen = "", set()
    for order in orders:
        hosts = tuple(pairs[i][0] for i in order)
        if hosts in seen:
            continue
        seen.add(hosts)
        try:
            plan = plan_for(list(hosts))
        except ValueError as e:
            error = error or str(e)
            continue
        if best is None or max(plan.times) < max(best[0].times):
            best = plan, [list(pairs[i][1]) for i in order]
    if best is None:
        raise ValueError(error)
    return best


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
                         f"the smallest stage needs {min(_needs(plan)):.4g}")

    target = _join_target(plan, assignment, node, options)
    groups[target].append(node)
    return Rebalance(_assignment(plan, groups, False), (Move(node.node_id, None, target),))


def _join_target(plan: StagePlan, assignment: Assignment, node: NodeSpec, options: Sequence[int]) -> int:
    """The stage among ``options`` where ``node`` raises the sorted stage throughputs most (lowest on ties)."""
    def outcome(s: int) -> tuple:
        rates = list(assignment.rates)
        rates[s] = _rate(plan.costs[s], [x.throughput for x in assignment.stages[s]] + [node.throughput])
        return tuple(sorted(rates))

    return max(options, key=outcome)  # the first of equals: the lowest stage


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
    chain = _refill(plan, groups, assignment.rates, gone)
    if chain is None:
        raise ValueError(f"no node can take over stage {gone} after {node_id!r} leaves: "
                         f"none with the {_needs(plan)[gone]:.4g} bytes it needs can be spared")
    return Rebalance(_assignment(plan, groups, False), tuple(moves + chain))


def follow_live(plan: StagePlan, hosts: Sequence[Sequence[str]], live: Sequence[NodeSpec], *,
                max_per_stage: int) -> Rebalance:
    """The assignment ``hosts`` (node ids per stage) brought up to date with the ``live`` nodes: the hosts not
    among them leave, the live nodes not yet placed join (fastest first, each by rebalance_join's rule while
    a stage has room for it under ``max_per_stage``), and a stage left without a replica is refilled by
    rebalance_leave's rule. Moves list the leavers, then the joiners, then the relocations (donor first).
    ValueError when some stage cannot get a replica."""
    live = _check_nodes(live)
    if len(hosts) != plan.num_stages:
        raise ValueError(f"the assignment has {len(hosts)} stages, the plan {plan.num_stages}")
    by_id = {x.node_id: x for x in live}
    placed = {p for g in hosts for p in g}
    groups = [[by_id[p] for p in g if p in by_id] for g in hosts]
    moves = [Move(p, s, None) for s, g in enumerate(hosts) for p in g if p not in by_id]
    assignment = _assignment(plan, groups, False)
    for node in sorted((x for x in live if x.node_id not in placed), key=lambda x: (-x.throughput, x.node_id)):
        room = [s for s, g in enumerate(assignment.stages) if len(g) < max_per_stage and _fits(plan, node, s)]
        if not room:
            continue
        target = _join_target(plan, assignment, node, room)
        groups = [list(g) for g in assignment.stages]
        groups[target].append(node)
        assignment = _assignment(plan, groups, False)
        moves.append(Move(node.node_id, None, target))
    groups = [list(g) for g in assignment.stages]
    for empty in [s for s, g in enumerate(groups) if not g]:
        chain = _refill(plan, groups, _assignment(plan, groups, False).rates, empty)
        if chain is None:
            raise ValueError(f"stage {empty} has no live host and no live node can take it over")
        moves.extend(chain)
    return Rebalance(_assignment(plan, groups, False), tuple(moves))


def _refill(plan: StagePlan, groups: list[list[NodeSpec]], rates: Sequence[float], gone: int) -> list[Move] | None:
    """Refill the empty stage ``gone`` in place (``groups`` is changed): the single move from a stage with
    >= 2 replicas after which the sorted stage throughputs are largest (``rates``: before the move), else the
    shortest chain of moves; None when memory allows neither."""
    k = plan.num_stages
    donors = [(d, x) for d in range(k) if len(groups[d]) >= 2 for x in groups[d] if _fits(plan, x, gone)]

    def outcome(d: int, x: NodeSpec) -> tuple:
        after = list(rates)
        after[d] = _rate(plan.costs[d], [y.throughput for y in groups[d] if y is not x])
        after[gone] = _rate(plan.costs[gone], [x.throughput])
        return tuple(sorted(after))

    chain: list[Move] | None
    if donors:  # max() keeps the first of equals: the lowest stage, then the lowest node id
        d, x = max(donors, key=lambda donor: outcome(*donor))
        chain = [Move(x.node_id, d, gone)]
    else:
        chain = _refill_chain(plan, groups, gone)
    if chain is None:
        return None
    by_id = {x.node_id: x for g in groups for x in g}
    for m in chain:
        if m.from_stage is None or m.to_stage is None:  # both refill paths only move nodes between stages
            raise RuntimeError(f"refill move {m} is not a relocation")
        groups[m.from_stage] = [x for x in groups[m.from_stage] if x.node_id != m.node_id]
        groups[m.to_stage].append(by_id[m.node_id])
    return chain


def _refill_chain(plan: StagePlan, groups: list[list[NodeSpec]], empty: int) -> list[Move] | None:
    """Fewest moves that refill ``empty``: x1 from d1 to empty, x2 from d2 to d1, ..., ending at a stage
    with >= 2 replicas (breadth-first over stages). Returned donor-first, so no other stage is ever empty."""
    parent: dict[int, tuple[str, int] | None] = {empty: None}
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
                    while (step := parent[cur]) is not None:
                        moved, to = step
                        chain.append(Move(moved, cur, to))
                        cur = to
                    return chain
                parent[d] = (x.node_id, need)
                queue.append(d)
                break
    return None
