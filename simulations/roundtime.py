"""How long one all-reduce round takes and how many bytes it moves: the model behind the simulator.

    from simulations.roundtime import predict_round_time
    predict_round_time([(12.5e6, 0.0)] * 4, 10_000_000, 0.01, select="exact", cpu_share=0.5)   # ~0.38 s

A round (protocol/allreduce.py) is: matchmaking (declare + read the round's DHT key, invite, plan), then a
butterfly over spans sized by bandwidth (protocol/partition.py): reduce-scatter (each member sends every owner
its part of the owner's span) and all-gather (each owner sends its span's aggregate to every member), then a
commit exchange. For a group of n with spans s_j = span_sizes(P, bandwidths)[j] and k = round(density * P):
  part to owner j    k * s_j / P entries of a span of s_j (the top-k is spread evenly over the vector)
  result of span j   s_j * (1 - (1 - density)^n) entries: the union of n independent top-k selections, as in
                     scripts/bench_allreduce.py (random vectors); with result_density, at most that share of s_j
  bytes              frame headers from protocol.wire.message_to_wire + payloads from protocol.codecs'
                     smallest_encoding (sparse delta-varint / bitmap or dense, fp16 values), measured once per
                     density on a synthetic update of 2**20 entries and scaled to the span length
  member i sends     sum_{j != i} part_j + (n - 1) * result_i;  receives (n - 1) * part_i + sum_{j != i} result_j
  phase time         the busiest link: max_i max(sent_i, received_i) * WIRE_OVERHEAD / bandwidth_i (a fluid
                     model: flows share each link, reduce-scatter ends before all-gather starts)
  latency            RTT = 2 * (lat_a + lat_b) for the two farthest members; DHT store + get of ceil(log20 N)
                     hops each, invite + plan 2.5 RTT, reduce-scatter 1.5 RTT (stream open + part),
                     all-gather 0.5 RTT, commit 2 RTT
  CPU                top-k selection (overlaps matchmaking), codec and aggregation work, and a fixed software
                     overhead calibrated on the loopback benchmark (where transfers and latencies are ~0)
Checked against the 100 Mbit/s netns benchmark (4 peers, 10M params, 1%, 4 processes on 2 cores), which the
calibration did not use: predicted 0.386 s (exact top-k) and 0.326 s (approx) against 0.353 s and 0.291 s
measured (+9% and +12%); bytes per member 1.897% of the dense butterfly against 1.90% measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from protocol.codecs import EncodedUpdate, smallest_encoding
from protocol.messages import CommitFrame, GroupPlan, PartFrame, ResultFrame, TensorSpec
from protocol.partition import span_sizes
from protocol.sparsify import SparseUpdate
from protocol.wire import message_to_wire

# --- measured on this project (README.md, "Top-k all-reduce (issue #3)" and the sparsifier table) -------------
SELECT_RATE = {"exact": 10e6 / 56.3e-3, "approx": 10e6 / 25.9e-3}  # params/s/core: ErrorFeedbackSparsifier.select
CODEC_RATE = 100_000 / 2.2e-3  # entries/s/core: delta-varint encode + decode of 100k indices took 2.2 ms
LOOPBACK_ROUND_S = {"exact": 0.304, "approx": 0.218}  # bench_allreduce.py --rounds 9: 4 peers, 10M params, 1%
NETNS_ROUND_S = {"exact": 0.353, "approx": 0.291}  # same, --netns --rate-mbit 100 (tc tbf egress caps)
BENCH_PEERS, BENCH_PARAMS, BENCH_DENSITY = 4, 10_000_000, 0.01
BENCH_CPU_SHARE = 0.5  # 4 peer processes on the benchmark machine's 2 cores
# --- protocol constants ----------------------------------------------------------------------------------------
POLL_S = 0.02  # Averager._matchmake polls the DHT every 20 ms while it waits for the expected group
PEER_ID_CHARS = 52  # base58 of an Ed25519 libp2p peer id ("12D3KooW" + 44 characters)
ROUND_ID_CHARS = 26  # f"{job_id}/r{round}" with a 16-hex-digit job id (node/jobs.py)
FRAME_PREFIX = 4  # protocol/streams.py: every frame is preceded by a 4-byte length
# TCP/IPv4 headers with timestamps (52 B) + Ethernet header (14 B) per 1448-byte segment (MSS at MTU 1500); tc tbf
# and a home router count them against the link rate. libp2p's Noise (16 B MAC per <= 64 KiB) and yamux (12 B
# per frame) framing add < 0.1% and are left out.
WIRE_OVERHEAD = (1448 + 52 + 14) / 1448
DHT_BUCKET = 20  # hivemind.dht.node.DHTNode.create(bucket_size=20): a lookup resolves ~log2(20) bits per hop
#                  (Kademlia's log N hop bound with k-buckets of 20; an assumption, not measured here)
CALIBRATION_ENTRIES = 1 << 20  # synthetic update length for measuring the codec's bytes per entry (at 1%:
#                                 10,486 entries, so the mean varint length is known to well under 1%)


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
    """Traffic and link-limited times of one group's reduce-scatter and all-gather."""

    spans: tuple[int, ...]  # span_sizes(params, bandwidths): elements each member owns
    sent: np.ndarray  # (n,) bytes each member writes (parts, results, commit, the leader's plan)
    received: np.ndarray  # (n,) bytes each member reads
    rs_s: float  # reduce-scatter transfer time (busiest link)
    ag_s: float  # all-gather transfer time (busiest link)
    codec_entries: float  # the busiest member's encode/decode/aggregate work, in entries
    rtt_s: float  # round trip between the two farthest members

    @property
    def total_bytes(self) -> float:
        return float(self.sent.sum())


def butterfly(bandwidths: Sequence[float], latencies: Sequence[float], params: int, density: float, *,
              result_density: float | None = None, value_codec: str = "fp16",
              spans: Sequence[int] | None = None) -> Butterfly:
    """The byte and time model of the module docstring; ``spans`` defaults to protocol.partition.span_sizes."""
    bw = np.asarray(bandwidths, float)  # (n,) bytes/s
    lat = np.asarray(latencies, float)  # (n,) s
    n = bw.size
    if n < 1 or lat.size != n:
        raise ValueError("need one latency per member and at least one member")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if params < 1:
        raise ValueError(f"params must be >= 1, got {params}")
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
    rs_s = float(np.max(np.maximum(rs_out, rs_in) * WIRE_OVERHEAD / bw)) if n > 1 else 0.0
    ag_s = float(np.max(np.maximum(ag_out, ag_in) * WIRE_OVERHEAD / bw)) if n > 1 else 0.0
    control = (n - 1) * per_commit
    sent = rs_out + ag_out + control
    sent[0] += (n - 1) * plan  # the leader (members are in peer-id order; whichever it is, the sum is right)
    received = rs_in + ag_in + control + np.where(np.arange(n) == 0, 0.0, plan)
    work = k + 2 * n * part_nnz + res_nnz + res_nnz.sum()  # (n,) encode parts, decode + sum own span, results
    top2 = np.sort(lat)[-2:] if n > 1 else np.zeros(1)
    return Butterfly(sizes, sent, received, rs_s, ag_s, float(work.max()), float(2 * top2.sum()) if n > 1 else 0.0)


@dataclass(frozen=True)
class Phases:
    """Seconds of each part of a round that no member's failure disturbed (see the module docstring)."""

    matchmaking_s: float  # DHT store + get, invite, plan: after the last member declared
    select_s: float  # top-k selection; runs while matchmaking goes on
    reduce_scatter_s: float
    all_gather_s: float
    commit_s: float
    cpu_s: float  # codec + aggregation work of the busiest member
    overhead_s: float  # fixed software overhead (calibrated)

    @property
    def total_s(self) -> float:
        return (max(self.matchmaking_s, self.select_s) + self.reduce_scatter_s + self.all_gather_s
                + self.commit_s + self.cpu_s + self.overhead_s)


def phases(b: Butterfly, params: int, *, select: str = "exact", cpu_share: float = 1.0, swarm_size: int = 4,
           overhead_s: float | None = None) -> Phases:
    if select not in SELECT_RATE:
        raise ValueError(f"select must be one of {tuple(SELECT_RATE)}, got {select!r}")
    if not 0 < cpu_share <= 1:
        raise ValueError(f"cpu_share must be in (0, 1], got {cpu_share}")
    rtt = b.rtt_s
    return Phases(
        matchmaking_s=2 * dht_hops(swarm_size) * rtt + POLL_S / 2 + 2.5 * rtt,
        select_s=params / SELECT_RATE[select] / cpu_share,
        reduce_scatter_s=1.5 * rtt + b.rs_s,
        all_gather_s=0.5 * rtt + b.ag_s,
        commit_s=2 * rtt,
        cpu_s=b.codec_entries / CODEC_RATE / cpu_share,
        overhead_s=calibrated_overhead_s() if overhead_s is None else overhead_s)


@lru_cache(maxsize=1)
def calibrated_overhead_s() -> float:
    """The benchmark's loopback round time minus everything else the model counts there (transfers and
    latencies are ~0 on loopback), averaged over exact and approximate selection: the per-round cost of p2pd
    streams, msgpack, Python and asyncio that the model does not itemise."""
    fits = []
    for select, measured in LOOPBACK_ROUND_S.items():
        b = butterfly([math.inf] * BENCH_PEERS, [0.0] * BENCH_PEERS, BENCH_PARAMS, BENCH_DENSITY,
                      spans=span_sizes(BENCH_PARAMS, [1.0] * BENCH_PEERS))
        p = phases(b, BENCH_PARAMS, select=select, cpu_share=BENCH_CPU_SHARE, swarm_size=BENCH_PEERS, overhead_s=0.0)
        fits.append(measured - p.total_s)
    return max(0.0, sum(fits) / len(fits))


def predict_round_time(nodes: Sequence[tuple[float, float]], params: int, density: float, *,
                       select: str = "exact", result_density: float | None = None, value_codec: str = "fp16",
                       cpu_share: float = 1.0, swarm_size: int | None = None,
                       overhead_s: float | None = None) -> float:
    """Seconds of one round for a group whose members all declared at once (expected_group reached), from
    the first member's step() to the last member's commit, selection included.

    nodes: (bandwidth bytes/s, one-way latency s) per member. params: vector length; density: top-k fraction.
    select: "exact" or "approx" top-k; cpu_share: the share of one core each member gets (0.5 for 4 peers on the
    benchmark's 2 cores); swarm_size: peers in the DHT (default: the group). overhead_s: None = calibrated.
    """
    if not nodes:
        raise ValueError("at least one member is needed")
    bw = [float(b) for b, _ in nodes]
    lat = [float(t) for _, t in nodes]
    if any(not b > 0 for b in bw) or any(not t >= 0 for t in lat):
        raise ValueError("bandwidths must be > 0 and latencies >= 0")
    b = butterfly(bw, lat, params, density, result_density=result_density, value_codec=value_codec)
    return phases(b, params, select=select, cpu_share=cpu_share, swarm_size=swarm_size or len(nodes),
                  overhead_s=overhead_s).total_s
