"""How long one all-reduce round takes and how many bytes it moves: the model behind the simulator.

    from simulations.roundtime import predict_round_time
    predict_round_time([(12.5e6, 0.0)] * 4, 10_000_000, 0.01, select="exact", cpu_share=0.5)   # ~0.4 s

A round (protocol/allreduce/averager.py) is: matchmaking (declare + read the round's DHT key, invite, plan) while the
member's top-k selection runs in a thread, then a butterfly over spans sized by bandwidth
(protocol/planning/partition.py): reduce-scatter (each member sends every owner its part of the owner's span) and
all-gather (each owner sends its span's aggregate to every member), then a commit exchange. For a group of n with
spans s_j = span_sizes(P, bandwidths)[j] and k = round(density * P):
  part to owner j    k * s_j / P entries of a span of s_j (the top-k is spread evenly over the vector)
  result of span j   s_j * (1 - (1 - density)^n) entries: the union of n independent top-k selections, as in
                     scripts/bench_allreduce.py (random vectors); with result_density, at most that share of s_j
  bytes              frame headers from protocol.wire.message_to_wire + payloads from protocol.allreduce.codecs'
                     smallest_encoding (sparse rice / bitmap or dense, fp16 values), measured once per
                     density on a synthetic update of 2**20 entries and scaled to the span length
  member i sends     sum_{j != i} part_j + (n - 1) * result_i;  receives (n - 1) * part_i + sum_{j != i} result_j
A round's time is latency + link + CPU, phase by phase:
  latency   RTT = 2 * (lat_a + lat_b) for the two farthest members; DHT store + get of ceil(log20 N) hops each,
            invite + plan 2.5 RTT (these overlap the selection), reduce-scatter 1.5 RTT (stream open + part),
            all-gather 0.5 RTT, commit 2 RTT
  link      the busiest member: max(sent, received) * WIRE_OVERHEAD / bandwidth per phase (flows share each
            link; reduce-scatter ends before all-gather starts). A token-bucket shaper (burst_bytes: tc tbf on
            the netns testbed; 0 for a plain link) passes its first burst_bytes at line rate: the bucket is full
            when the round starts (the link idled through matchmaking), the reduce-scatter drains it, and it
            refills at the link rate while the owner sums the parts and encodes its result
  CPU       per member, in CPU-seconds of one core (CpuCosts, below), divided by cpu_share, the fraction of a
            core each member gets (fair_cpu_share: cores / members on an idle machine):
              params * param_s[select]   top-k selection and the round's other per-parameter work
              (n - 1) * peer_s           per other member: its part and commit streams, each a libp2p stream
                                         through p2pd with its own unix-socket connection and handler task on
                                         both ends, and its share of the DHT store/get and the invites
              (n - 1)^2 * pair_s         what grows with the square of the group (measured, not itemised): a
                                         member's DHT traffic grows with n (hivemind's DHTProtocol, wrapped and
                                         counted: ~20 finds served per member and round with 8 peers, ~45 with
                                         16) and every reply carries the round's dictionary of n declarations
              round_s                    per round, whatever the group and vector
              codec entries / codec_rate encode parts, decode and sum them, encode the result, decode results
            Encoding and decoding parts and results streams with their transfers and hides behind a slower
            link (up to the link time); summing the parts and encoding the result sits between the two phases.
            The members of the testbed (4-16 processes with their p2pd on 2 cores) are CPU-bound: round time x
            cpu_share is the per-member CPU work, whatever the group size.
Calibration (scripts/calibrate_roundtime.py; its docstring has the commands): param_s, peer_s, pair_s and round_s
are fitted to real rounds on the netns testbed without link caps (4, 6 and 8 peers x 1M, 4M and 10M parameters,
12 peers x 1M and 4M, exact top-k; 4 and 8 peers x 10M approximate), with cpu_share from fair_cpu_share and the
CPU the machine's other sessions used in the second before each round; the link part has no fitted constant and
is checked on one capped configuration (8 peers, 10M, 25 Mbit/s). Held out: every other capped configuration of
4-8 peers (the two of tests/test_simulation_validation.py among them), 12 peers capped and 16 peers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from protocol.allreduce.codecs import EncodedUpdate, smallest_encoding
from protocol.allreduce.messages import CommitFrame, GroupPlan, PartFrame, ResultFrame, TensorSpec, message_to_wire
from protocol.allreduce.sparsify import SparseUpdate
from protocol.planning.partition import span_sizes

# --- protocol constants ----------------------------------------------------------------------------------------
POLL_S = 0.02  # Averager._matchmake polls the DHT every 20 ms while it waits for the expected group
PEER_ID_CHARS = 52  # base58 of an Ed25519 libp2p peer id ("12D3KooW" + 44 characters)
ROUND_ID_CHARS = 26  # f"{job_id}/r{round}" with a 16-hex-digit job id (node/jobs/federated/runner.py)
FRAME_PREFIX = 4  # protocol/streams.py: every frame is preceded by a 4-byte length
# TCP/IPv4 headers with timestamps (52 B) + Ethernet header (14 B) per 1448-byte segment (MSS at MTU 1500); tc tbf
# and a home router count them against the link rate. libp2p's Noise (16 B MAC per <= 64 KiB) and yamux (12 B
# per frame) framing add < 0.1% and are left out.
WIRE_OVERHEAD = (1448 + 52 + 14) / 1448
DHT_BUCKET = 20  # hivemind.dht.node.DHTNode.create(bucket_size=20): a lookup resolves ~log2(20) bits per hop
#                  (Kademlia's log N hop bound with k-buckets of 20; an assumption, not measured here)
CALIBRATION_ENTRIES = 1 << 20  # synthetic update length for measuring the codec's bytes per entry (at 1%:
#                                 10,486 entries, so the mean varint length is known to well under 1%)


@dataclass(frozen=True)
class CpuCosts:
    """Per-member CPU-seconds of one core per round (see the module docstring)."""

    param_s: dict  # {"exact": s, "approx": s} per parameter of the vector: selection and per-parameter work
    peer_s: float  # per other member of the group: streams through p2pd, DHT and invite traffic
    pair_s: float  # per (other member)^2: work that grows with the square of the group
    round_s: float  # per round
    codec_rate: float  # entries per second: encode, decode or sum of one sparse entry


# --- measured on this project ------------------------------------------------------------------------------------
# codec_rate: README, sparsifier table: delta-varint encode + decode of 100k indices took 2.2 ms on one core.
# param_s, peer_s, pair_s, round_s: fitted by `sudo .venv/bin/python scripts/calibrate_roundtime.py --reps 2
# --heldout` (the training runs of the module docstring); the 100 runs it measured are in
# docs/calibration_roundtime.jsonl and `.venv/bin/python scripts/calibrate_roundtime.py --load
# docs/calibration_roundtime.jsonl` refits them and prints the table of the README (peer_s came out 3e-12: the
# per-other-member cost is not separable from the pair term on 4-16 peers, so it is 0 here): round time x
# fair_cpu_share - codec work = params * param_s + (n - 1) * peer_s + (n - 1)^2 * pair_s + round_s, least squares
# on the relative error of configuration medians. For scale, ErrorFeedbackSparsifier.select alone takes 5.6 ms
# per million parameters on an idle core (README: 56.3 ms for 10M); with 4-12 processes sharing 2 cores and their
# caches, the whole per-parameter work of a round costs about twice that.
COSTS = CpuCosts(param_s={"exact": 1.127e-08, "approx": 7.600e-09}, peer_s=0.0, pair_s=9.274e-04,
                 round_s=2.372e-02, codec_rate=100_000 / 2.2e-3)
# --- the README's benchmark (scripts/bench_allreduce.py), checked by simulations.run's report -----------------------
NETNS_ROUND_S = {"exact": 0.353, "approx": 0.291}  # --netns --rate-mbit 100 --rounds 5: 4 peers, 10M params, 1%
BENCH_PEERS, BENCH_PARAMS, BENCH_DENSITY = 4, 10_000_000, 0.01
BENCH_CPU_SHARE = 0.5  # 4 peer processes on the benchmark machine's 2 cores
BENCH_BURST_BYTES = 256 * 1024  # scripts/netns_testbed.py: tc tbf ... burst 256kb (KiB, in tc's units)


def fair_cpu_share(cores: float, members: int, others: Sequence[float] = ()) -> float:
    """The fraction of one core each of ``members`` busy processes gets on ``cores`` cores beside other
    processes that want ``others`` cores each: max-min fairness (water-filling). Linux CFS with autogroups
    shares the CPU this way between sessions (every peer process runs in its own session with its p2pd): a
    session that wants less than an equal share keeps what it wants, the others split the rest evenly.
    At most 1: the model counts a member's CPU work on one core."""
    if cores <= 0 or members < 1:
        raise ValueError(f"need cores > 0 and members >= 1, got {cores}, {members}")
    if any(not d >= 0 for d in others):
        raise ValueError("other processes' demands must be >= 0")
    left, count = float(cores), members + len(others)
    for d in sorted(others):  # ascending: a demand below the current equal split is met in full
        if d * count >= left:
            break
        left -= d
        count -= 1
    return min(1.0, left / count)


def dht_hops(swarm_size: int) -> int:
    """Round trips of one DHT store or get in a swarm of ``swarm_size``: ceil(log_20 N), at least 1."""
    return max(1, math.ceil(math.log(max(swarm_size, 2)) / math.log(DHT_BUCKET)))


@lru_cache(maxsize=4096)
def _bytes_per_entry(density: float, value_codec: str) -> float:
    """Payload bytes per vector element of an update of this density, measured with the real codec."""
    if density <= 0:
        return 0.0
    rng = np.random.default_rng(12345)  # fixed: the measurement, not the simulation, owns this draw
    n = CALIBRATION_ENTRIES
    nnz = min(n, max(1, round(density * n)))
    idx = np.sort(rng.choice(n, size=nnz, replace=False)).astype(np.int64)  # (nnz,) uniform support
    vals = rng.standard_normal(nnz).astype(np.float32)  # (nnz,)
    return smallest_encoding(SparseUpdate(idx, vals, n), value_codec).nbytes / n


def payload_bytes(length: float, nnz: float, value_codec: str = "fp16") -> float:
    """Bytes of smallest_encoding() for ``nnz`` uniformly spread entries of a span of ``length``."""
    if length <= 0 or nnz <= 0:
        return 0.0
    density = float(f"{min(1.0, nnz / length):.3g}")  # 3 significant digits: a bounded cache
    return _bytes_per_entry(density, value_codec) * length


@lru_cache(maxsize=512)
def frame_overheads(n: int) -> tuple[float, float, float, float]:
    """Bytes on the wire besides payloads, from the real wire format, for a group of n:
    (per part stream, per result frame, per commit frame, plan frame)."""
    ids = tuple(f"12D3KooW{i:044d}" for i in range(n))
    rid, tensor = "r" * ROUND_ID_CHARS, TensorSpec("job-" + "0" * 16, 10**9)
    empty = EncodedUpdate("delta-varint", "fp16", 10**6, b"", b"")
    part = message_to_wire(PartFrame(rid, ids[0], tensor, (10**8, 2 * 10**8), 1.0, 0.01, empty))
    result = message_to_wire(ResultFrame(rid, ids[0], tensor, (10**8, 2 * 10**8), ids, 1.0, empty))
    commit = message_to_wire(CommitFrame(rid, ids[0], (True,) * n))
    plan = message_to_wire(GroupPlan(rid, ids[0], ids, tuple((10**8, 2 * 10**8) for _ in ids), tensor, 1.7e9))
    return (len(part) + 2 * FRAME_PREFIX + ROUND_ID_CHARS, len(result) + FRAME_PREFIX,
            len(commit) + FRAME_PREFIX, len(plan) + FRAME_PREFIX)


@dataclass(frozen=True)
class Butterfly:
    """Traffic of one group's reduce-scatter and all-gather, and its link-limited times without a token bucket."""

    spans: tuple[int, ...]  # span_sizes(params, bandwidths): elements each member owns
    sent: np.ndarray  # (n,) bytes each member writes (parts, results, commit, the leader's plan)
    received: np.ndarray  # (n,) bytes each member reads
    rs_s: float  # reduce-scatter transfer time (busiest link, no bucket)
    ag_s: float  # all-gather transfer time (busiest link, no bucket)
    codec_entries: float  # the busiest member's encode/decode/sum work, in entries
    rtt_s: float  # round trip between the two farthest members
    bandwidth: np.ndarray  # (n,) bytes/s
    burst: np.ndarray  # (n,) bytes a token-bucket shaper passes at line rate after an idle spell (0: none)
    rs_wire: np.ndarray  # (n,) bytes on the wire in reduce-scatter: max(sent, received) * WIRE_OVERHEAD
    ag_wire: np.ndarray  # (n,) the same in all-gather
    stream_entries: np.ndarray  # (n,) codec work that streams with the transfers: encode parts, decode parts
    #                             as they arrive, decode the other owners' results
    gap_entries: np.ndarray  # (n,) codec work between the phases: sum the parts, encode and decode the own result
    part_bytes: np.ndarray | None = None  # (n,) bytes of one member's part for owner j (frame included)
    result_bytes: np.ndarray | None = None  # (n,) bytes of owner j's result frame to one member

    @property
    def total_bytes(self) -> float:
        return float(self.sent.sum())


def butterfly(bandwidths: Sequence[float], latencies: Sequence[float], params: int, density: float, *,
              result_density: float | None = None, value_codec: str = "fp16",
              spans: Sequence[int] | None = None, burst_bytes: float | Sequence[float] = 0.0) -> Butterfly:
    """The byte and time model of the module docstring; ``spans`` defaults to protocol.planning.partition.span_sizes."""
    bw = np.asarray(bandwidths, float)  # (n,) bytes/s
    lat = np.asarray(latencies, float)  # (n,) s
    n = bw.size
    if n < 1 or lat.size != n:
        raise ValueError("need one latency per member and at least one member")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if params < 1:
        raise ValueError(f"params must be >= 1, got {params}")
    burst = np.broadcast_to(np.asarray(burst_bytes, float), (n,)).copy()  # (n,)
    if not np.all(burst >= 0):
        raise ValueError("burst_bytes must be >= 0")
    sizes = tuple(span_sizes(params, bw.tolist())) if spans is None else tuple(int(s) for s in spans)
    s = np.asarray(sizes, float)  # (n,) span lengths
    k = max(1, round(density * params))
    part_nnz = k * s / params  # (n,) entries of each member's part for owner j
    union = 1.0 - (1.0 - density) ** n
    res_nnz = s * union
    if result_density is not None:
        res_nnz = np.minimum(res_nnz, np.maximum(1.0, np.round(result_density * s)))
    per_part, per_result, per_commit, plan = frame_overheads(n)
    part = np.array([payload_bytes(L, z, value_codec) for L, z in zip(s, part_nnz)]) + per_part  # (n,) to owner j
    result = np.array([payload_bytes(L, z, value_codec) for L, z in zip(s, res_nnz)]) + per_result  # (n,)
    rs_out, rs_in = part.sum() - part, (n - 1) * part
    ag_out, ag_in = (n - 1) * result, result.sum() - result
    if n == 1:  # a group of one exchanges nothing
        rs_out = rs_in = ag_out = ag_in = np.zeros(1)
    rs_wire = np.maximum(rs_out, rs_in) * WIRE_OVERHEAD  # (n,)
    ag_wire = np.maximum(ag_out, ag_in) * WIRE_OVERHEAD  # (n,)
    rs_s = float(np.max(rs_wire / bw)) if n > 1 else 0.0
    ag_s = float(np.max(ag_wire / bw)) if n > 1 else 0.0
    control = (n - 1) * per_commit
    sent = rs_out + ag_out + control
    sent[0] += (n - 1) * plan  # the leader (members are in peer-id order; whichever it is, the sum is right)
    received = rs_in + ag_in + control + np.where(np.arange(n) == 0, 0.0, plan)
    stream = k + n * part_nnz + (res_nnz.sum() - res_nnz)  # (n,) encode parts, decode parts, decode others' results
    gap = n * part_nnz + 2 * res_nnz  # (n,) sum the parts, encode the own result and decode it
    if n == 1:
        stream, gap = np.zeros(1), np.zeros(1)
    top2 = np.sort(lat)[-2:] if n > 1 else np.zeros(1)
    return Butterfly(sizes, sent, received, rs_s, ag_s, float((stream + gap).max()),
                     float(2 * top2.sum()) if n > 1 else 0.0, bw, burst, rs_wire, ag_wire, stream, gap, part, result)


@dataclass(frozen=True)
class Phases:
    """Seconds of each part of a round that no member's failure disturbed (see the module docstring)."""

    matchmaking_s: float  # DHT store + get, invite, plan (latencies): after the last member declared
    select_s: float  # top-k selection and the other per-parameter CPU work; runs while matchmaking goes on
    reduce_scatter_s: float  # latency + link time beyond the token bucket
    all_gather_s: float
    commit_s: float
    cpu_s: float  # per-peer and codec CPU work of the busiest member, less the codec work hidden behind the links
    overhead_s: float  # per-round CPU work

    @property
    def total_s(self) -> float:
        return (max(self.matchmaking_s, self.select_s) + self.reduce_scatter_s + self.all_gather_s
                + self.commit_s + self.cpu_s + self.overhead_s)


def phases(b: Butterfly, params: int, *, select: str = "exact", cpu_share: float = 1.0, swarm_size: int = 4,
           overhead_s: float | None = None, costs: CpuCosts = COSTS) -> Phases:
    if select not in costs.param_s:
        raise ValueError(f"select must be one of {tuple(costs.param_s)}, got {select!r}")
    if not 0 < cpu_share <= 1:
        raise ValueError(f"cpu_share must be in (0, 1], got {cpu_share}")
    n, rtt = len(b.spans), b.rtt_s
    rs_s = ag_s = hidden = 0.0
    if n > 1:
        gap = b.gap_entries / costs.codec_rate / cpu_share  # (n,) s between a member's two phases
        rs_link = np.maximum(0.0, b.rs_wire - b.burst) / b.bandwidth  # (n,)
        refill = np.minimum(b.burst, np.maximum(0.0, b.burst - b.rs_wire) + b.bandwidth * gap)  # (n,) tokens
        ag_link = np.maximum(0.0, b.ag_wire - refill) / b.bandwidth  # (n,)
        rs_s, ag_s = float(rs_link.max()), float(ag_link.max())
        hidden = min(float(b.stream_entries.max()) / costs.codec_rate / cpu_share, rs_s + ag_s)
    cpu = ((n - 1) * costs.peer_s + (n - 1) ** 2 * costs.pair_s
           + b.codec_entries / costs.codec_rate) / cpu_share - hidden
    return Phases(
        matchmaking_s=2 * dht_hops(swarm_size) * rtt + POLL_S / 2 + 2.5 * rtt,
        select_s=params * costs.param_s[select] / cpu_share,
        reduce_scatter_s=1.5 * rtt + rs_s,
        all_gather_s=0.5 * rtt + ag_s,
        commit_s=2 * rtt,
        cpu_s=cpu,
        overhead_s=costs.round_s / cpu_share if overhead_s is None else overhead_s)


def predict_round_time(nodes: Sequence[tuple[float, float]], params: int, density: float, *,
                       select: str = "exact", result_density: float | None = None, value_codec: str = "fp16",
                       cpu_share: float = 1.0, swarm_size: int | None = None, overhead_s: float | None = None,
                       burst_bytes: float | Sequence[float] = 0.0, costs: CpuCosts = COSTS) -> float:
    """Seconds of one round for a group whose members all declared at once (expected_group reached), from
    the first member's step() to the last member's commit, selection included.

    nodes: (bandwidth bytes/s, one-way latency s) per member. params: vector length; density: top-k fraction.
    select: "exact" or "approx" top-k; cpu_share: the share of one core each member gets (fair_cpu_share: 0.5
    for 4 peers on the testbed's 2 cores); swarm_size: peers in the DHT (default: the group); overhead_s: None =
    costs.round_s / cpu_share; burst_bytes: each member's token-bucket depth (scripts/netns_testbed.py's tbf:
    BENCH_BURST_BYTES; 0 for a plain link); costs: the CPU constants (default: the calibrated COSTS).
    """
    if not nodes:
        raise ValueError("at least one member is needed")
    bw = [float(b) for b, _ in nodes]
    lat = [float(t) for _, t in nodes]
    if any(not b > 0 for b in bw) or any(not t >= 0 for t in lat):
        raise ValueError("bandwidths must be > 0 and latencies >= 0")
    b = butterfly(bw, lat, params, density, result_density=result_density, value_codec=value_codec,
                  burst_bytes=burst_bytes)
    return phases(b, params, select=select, cpu_share=cpu_share, swarm_size=swarm_size or len(nodes),
                  overhead_s=overhead_s, costs=costs).total_s
