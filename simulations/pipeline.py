"""Pipeline training under churn: the swarm's incremental node -> stage assignment against the best from scratch.

A model too large for one volunteer is cut into stages (protocol.planning.stage_plan.plan_stages, real) and served by
replicas (protocol.planning.stage_assign, real). The swarm keeps its assignment incrementally, as a daemon would:
rebalance_join places a joiner, rebalance_leave refills a stage left without replicas (moves nodes), and a node
serves only once it has downloaded its stage's shard (bf16 weights, at its own bandwidth). Throughput is the
slowest stage's sum of *ready* replicas' throughput / its cost, in samples/s. The reference is
assign_nodes over every live pool node, all ready at once (``optimal`` when its branch and bound finished
within search_budget); the aggregate bound sum(throughput) / sum(cost) is above every assignment.

Model (LLaMA-2-7B shapes: Touvron et al. 2023, 32 layers, d 4096, SwiGLU d_ff 11008, vocab 32000):
  layer cost   6 * params_layer * seq + 6 * seq^2 * d FLOPs per sample (Kaplan et al. 2020, 2.1: 6N per token
               plus the attention context term), params_layer = 4 d^2 + 3 d d_ff
  head         6 * d * vocab * seq FLOPs on the last stage; the embedding lookup costs memory, not FLOPs
  memory       16 bytes per parameter: fp16 weights and gradients + fp32 master weights and Adam moments
               (Rajbhandari et al., "ZeRO", SC 2020, section 3.1)
  node speed   min(its effective TFLOPS, what its link carries): a sample crosses a stage boundary as fp16
               activations forward and fp16 gradients back, seq * d * 2 bytes each, so a replica moves
               2 * seq * d * 2 bytes each way per sample; bandwidth / that * (a middle stage's cost) is the
               link's limit in TFLOPS-equivalents (protocol/pipeline/activations.py carries fp16 on the wire)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.planning.stage_assign import Assignment, Move, NodeSpec, assign_nodes, rebalance_join, rebalance_leave
from protocol.planning.stage_plan import StagePlan, plan_stages


@dataclass(frozen=True)
class PipelineConfig:
    layers: int = 32
    d_model: int = 4096
    d_ff: int = 11008
    vocab: int = 32000
    seq_len: int = 2048
    stages: int = 16
    strategy: str = "balanced"
    train_bytes_per_param: float = 16.0  # ZeRO, section 3.1 (mixed-precision Adam)
    shard_bytes_per_param: float = 2.0  # a joiner downloads bf16 weights; optimizer state starts empty
    activation_bytes: float = 2.0  # fp16 activations and gradients between stages
    # assign_nodes' branch and bound for the reference. Its greedy start was already within 0.1% of the aggregate
    # bound for 200 drawn nodes, and budgets of 1 to 20,000 gave the same rate (measured at 32 and 200 nodes)
    search_budget: int = 200

    def __post_init__(self) -> None:
        if min(self.layers, self.d_model, self.d_ff, self.vocab, self.seq_len, self.stages) < 1:
            raise ValueError("pipeline sizes must be >= 1")
        if self.stages > self.layers:
            raise ValueError(f"cannot cut {self.layers} layers into {self.stages} stages")

    @property
    def layer_params(self) -> int:
        return 4 * self.d_model ** 2 + 3 * self.d_model * self.d_ff

    def plan(self) -> StagePlan:
        """Stage cuts by cost (TFLOP per sample), with each stage's training memory."""
        layer = (6 * self.layer_params * self.seq_len + 6 * self.seq_len ** 2 * self.d_model) / 1e12
        embed = self.vocab * self.d_model
        return plan_stages([layer] * self.layers, self.stages, strategy=self.strategy,
                           last_extra=6 * embed * self.seq_len / 1e12,
                           layer_bytes=self.layer_params * self.train_bytes_per_param,
                           first_extra_bytes=embed * self.train_bytes_per_param,
                           last_extra_bytes=embed * self.train_bytes_per_param)

    def link_tflops(self, bandwidth: float, plan: StagePlan) -> float:
        """The TFLOPS-equivalent a link of ``bandwidth`` bytes/s sustains on a middle stage."""
        per_sample = 2 * self.seq_len * self.d_model * self.activation_bytes  # bytes each way
        return bandwidth / per_sample * sorted(plan.costs)[len(plan.costs) // 2]


def _min_rate(plan: StagePlan, groups) -> float:
    """The slowest stage's samples/s: the definition of protocol.planning.stage_assign's Assignment.rates."""
    rates = []
    for cost, g in zip(plan.costs, groups):
        if not g:
            return 0.0
        rates.append(math.inf if cost == 0 else math.fsum(g) / cost)
    return min(rates)


def _to_stage(move: Move) -> int:
    """The stage a joining or relocated node now downloads (a leaver's move has none)."""
    if move.to_stage is None:
        raise RuntimeError(f"node {move.node_id} left: it has no stage to download")
    return move.to_stage


class PipelineSim:
    """The pool's incremental assignment, with per-node shard downloads before a node serves."""

    def __init__(self, config: PipelineConfig, plan: StagePlan | None = None) -> None:
        self.config = config
        self.plan = plan or config.plan()
        self.nodes: dict[str, tuple[NodeSpec, float]] = {}  # id -> (spec, bandwidth)
        self.ready_at: dict[str, float] = {}
        self.assignment: Assignment | None = None
        self.moves = 0
        self.stalls = 0  # times the incremental policy could not keep every stage served
        self._ref_key: tuple | None = None
        self._ref: tuple[float, bool] = (0.0, False)

    @property
    def min_memory(self) -> float:
        return min(self._stage_bytes())

    def _stage_bytes(self) -> tuple[float, ...]:
        if self.plan.memory is None:  # PipelineConfig.plan() always gives layer_bytes
            raise ValueError("the pipeline simulation needs a plan with each stage's memory")
        return self.plan.memory

    def spec(self, nid: str, tflops: float, bandwidth: float, memory_bytes: float) -> NodeSpec:
        return NodeSpec(nid, min(tflops, self.config.link_tflops(bandwidth, self.plan)), memory_bytes)

    def _shard_s(self, nid: str, stage: int) -> float:
        params = self._stage_bytes()[stage] / self.config.train_bytes_per_param
        return params * self.config.shard_bytes_per_param / self.nodes[nid][1]

    def start(self, now: float, specs: list[tuple[NodeSpec, float]], warm: bool = True) -> None:
        """The initial pool; ``warm``: its nodes already hold their shards (the swarm was running before t=0)."""
        for spec, bw in specs:
            self.nodes[spec.node_id] = (spec, bw)
        self._reassign(now, warm=warm)

    def _reassign(self, now: float, warm: bool = False) -> None:
        """Assign the whole pool from scratch (at start, or when the incremental policy is stuck)."""
        before = {} if self.assignment is None else {x.node_id: i for i, g in enumerate(self.assignment.stages)
                                                     for x in g}
        try:
            self.assignment = assign_nodes(self.plan, [s for s, _ in self.nodes.values()],
                                           search_budget=self.config.search_budget)
        except ValueError:  # too few nodes, or none fits some stage: the pipeline is down until joins
            self.assignment = None
            return
        for stage, group in enumerate(self.assignment.stages):
            for x in group:
                if warm:
                    self.ready_at[x.node_id] = now
                elif before.get(x.node_id) != stage:
                    self.moves += x.node_id in before
                    self.ready_at[x.node_id] = now + self._shard_s(x.node_id, stage)

    def join(self, now: float, spec: NodeSpec, bandwidth: float) -> None:
        self.nodes[spec.node_id] = (spec, bandwidth)
        self._ref_key = None
        if self.assignment is None:
            return self._reassign(now)
        r = rebalance_join(self.plan, self.assignment, spec)
        self.assignment = r.assignment
        self.ready_at[spec.node_id] = now + self._shard_s(spec.node_id, _to_stage(r.moves[0]))

    def leave(self, now: float, nid: str) -> None:
        if self.nodes.pop(nid, None) is None:
            return
        self.ready_at.pop(nid, None)
        self._ref_key = None
        if self.assignment is None:
            return self._reassign(now)
        try:
            r = rebalance_leave(self.plan, self.assignment, nid)
        except ValueError:
            self.stalls += 1
            self.assignment = None
            return self._reassign(now)
        self.assignment = r.assignment
        for move in r.relocated:
            self.moves += 1
            self.ready_at[move.node_id] = now + self._shard_s(move.node_id, _to_stage(move))

    def next_ready(self, now: float) -> float:
        """The next time a download finishes (inf if none is under way)."""
        return min((t for t in self.ready_at.values() if t > now), default=math.inf)

    def throughput(self, now: float) -> float:
        """Samples/s of the incremental assignment, counting only replicas that hold their shard."""
        if self.assignment is None:
            return 0.0
        groups = [[x.throughput for x in g if self.ready_at.get(x.node_id, math.inf) <= now]
                  for g in self.assignment.stages]
        return _min_rate(self.plan, groups)

    def reference(self) -> tuple[float, bool]:
        """(samples/s, proven optimal) of assign_nodes over the live pool, all ready; cached per membership."""
        key = tuple(sorted(self.nodes))
        if key != self._ref_key:
            try:
                a = assign_nodes(self.plan, [s for s, _ in self.nodes.values()],
                                 search_budget=self.config.search_budget)
                self._ref = (a.min_rate, a.optimal)
            except ValueError:
                self._ref = (0.0, True)
            self._ref_key = key
        return self._ref

    def upper_bound(self) -> float:
        """sum(throughput) / sum(cost): no assignment of these nodes does better."""
        total = math.fsum(self.plan.costs)
        return math.fsum(s.throughput for s, _ in self.nodes.values()) / total if total > 0 else math.inf
