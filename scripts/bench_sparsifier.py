"""Top-k sparsifier and sparse-codec throughput on one core, and wire bytes at 1% density (issue 3, items 1, 4;
the int8 / int4 / int2 values of issue 17).

    .venv/bin/python scripts/bench_sparsifier.py                        # 10M params, 1%, prints the tables
    .venv/bin/python scripts/bench_sparsifier.py --size 1000000 --repeats 3

One core, enforced three ways before any work: the process pins itself to a single CPU
(os.sched_setaffinity), OMP/OpenBLAS/MKL thread counts are set to 1 before numpy and torch load, and
torch.set_num_threads(1). (numpy's elementwise ops, partition, sort and packbits are single-threaded
anyway; the pinning makes sure of it.) Throughput = vector length / median wall time of --repeats calls
after one warm-up call, so "params/s" is per core.

Input: a standard normal float32 vector (seed 0) stands in for a gradient; top-k cost depends on the values
only through ties, which a normal vector has none of. Bytes: payload bytes as protocol/allreduce/codecs.py encodes
them; msgpack framing (codec names, nnz, round id: tens of bytes per frame) is not counted.
The butterfly estimate encodes MEMBERS independent gradients' top-k: their supports barely overlap, the
worst case for the all-gather (real gradients' supports overlap more, so the union is sparser).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/torch load their thread pools

import argparse  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from protocol.allreduce.codecs import (  # noqa: E402
    decode_indices,
    decode_values,
    encode_indices,
    encode_values,
    extract_update,
    smallest_encoding,
)
from protocol.allreduce.sparsify import ErrorFeedbackSparsifier, SparseUpdate, topk_approx, topk_exact  # noqa: E402

SIZE = 10_000_000  # issue 3, measurement 1: "a 10M-parameter vector"
DENSITY = 0.01  # issue 3: "configurable density (default 1%)"
MEMBERS = 4  # issue 3, measurement 2: "4 peers"
DENSE_BYTES_PER_PARAM = 4  # the baseline: fp32 dense


def pin_one_core() -> int:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    return cpu


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def butterfly_bytes(grads: list[np.ndarray], k: int, value_codec: str) -> list[int]:
    """Payload bytes each member sends in one sparse butterfly (reduce-scatter, then all-gather)."""
    n, size = len(grads), grads[0].size
    bounds = np.linspace(0, size, n + 1).astype(np.int64)  # equal spans (equal advertised bandwidth)
    updates = [SparseUpdate(idx := topk_exact(g, k), g[idx], size) for g in grads]  # (k,) each
    sent = [0] * n
    aggregates = [np.zeros(bounds[s + 1] - bounds[s], np.float32) for s in range(n)]
    for m, u in enumerate(updates):  # reduce-scatter: member m sends span s of its update to owner s
        for s in range(n):
            lo, hi = np.searchsorted(u.indices, bounds[s : s + 2])
            part = SparseUpdate(u.indices[lo:hi] - bounds[s], u.values[lo:hi], int(bounds[s + 1] - bounds[s]))
            encoded = smallest_encoding(part, value_codec)
            aggregates[s] += extract_update(encoded, part.size).to_dense()
            if s != m:
                sent[m] += encoded.nbytes
    for s, agg in enumerate(aggregates):  # all-gather: owner s sends its summed span to the n-1 others
        nz = np.flatnonzero(agg).astype(np.int64)
        sent[s] += (n - 1) * smallest_encoding(SparseUpdate(nz, agg[nz], agg.size), value_codec).nbytes
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--density", type=float, default=DENSITY)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cpu = pin_one_core()
    size, k, reps = args.size, max(1, round(args.density * args.size)), args.repeats
    x = np.random.default_rng(0).standard_normal(size).astype(np.float32)  # (size,)
    rng = np.random.default_rng(1)
    print(f"one core: pinned to CPU {cpu}, torch threads {torch.get_num_threads()}, numpy {np.__version__}, "
          f"torch {torch.__version__}; size {size:,}, density {args.density:g} (k = {k:,}), median of {reps}")

    # ---- top-k selection ----
    xt = torch.from_numpy(x)
    exact_sp = ErrorFeedbackSparsifier(size, args.density, "exact")
    approx_sp = ErrorFeedbackSparsifier(size, args.density, "approx")
    rows = [
        ("topk_exact(x, k)            partition", timed(lambda: topk_exact(x, k), reps)),
        ("topk_approx(x, k, rng)      sampled", timed(lambda: topk_approx(x, k, rng), reps)),
        ("torch.topk(|x|, k)          reference", timed(lambda: torch.topk(xt.abs(), k, sorted=False), reps)),
        ("ErrorFeedbackSparsifier.select exact", timed(lambda: exact_sp.select(x), reps)),
        ("ErrorFeedbackSparsifier.select approx", timed(lambda: approx_sp.select(x), reps)),
    ]
    counts = [topk_approx(x, k, np.random.default_rng(s)).size / k for s in range(20)]
    print(f"\n{'top-k at 1 core':<40} {'ms':>8} {'M params/s':>11}")
    for name, t in rows:
        print(f"{name:<40} {t * 1e3:8.1f} {size / t / 1e6:11.1f}")
    print(f"approx count / k over 20 seeds: min {min(counts):.3f}, max {max(counts):.3f} (guaranteed 0.9..1.1)")

    # ---- codecs on the 1% update ----
    idx = topk_exact(x, k)
    vals = x[idx]
    print(f"\n{'codec (1 core), on the k entries':<32} {'bytes':>11} {'enc ms':>7} {'dec ms':>7} "
          f"{'enc+dec M entries/s':>20} {'M params/s':>11}")
    for name in ("rice", "delta-varint", "bitmap"):
        _, payload = encode_indices(idx, size, name)
        te = timed(lambda name=name: encode_indices(idx, size, name), reps)
        td = timed(lambda name=name, payload=payload: decode_indices(name, payload, size, k), reps)
        print(f"{'indices ' + name:<32} {len(payload):11,} {te * 1e3:7.2f} {td * 1e3:7.2f} "
              f"{k / (te + td) / 1e6:20.1f} {size / (te + td) / 1e6:11.1f}")
    for name in ("fp16", "fp32", "int8", "int4", "int2"):
        payload = encode_values(vals, name)
        te = timed(lambda name=name: encode_values(vals, name), reps)
        td = timed(lambda name=name, payload=payload: decode_values(name, payload, k), reps)
        print(f"{'values ' + name:<32} {len(payload):11,} {te * 1e3:7.2f} {td * 1e3:7.2f} "
              f"{k / (te + td) / 1e6:20.1f} {size / (te + td) / 1e6:11.1f}")

    # ---- bytes per member ----
    dense = DENSE_BYTES_PER_PARAM * size
    dense_bf = 2 * (MEMBERS - 1) * dense // MEMBERS  # reduce-scatter + all-gather, fp32
    grads = [np.random.default_rng(10 + m).standard_normal(size).astype(np.float32) for m in range(MEMBERS)]
    print(f"\nbytes per member against dense fp32 ({dense:,} B for one update, {dense_bf:,} B sent per member in a "
          f"{MEMBERS}-member butterfly); the butterfly picks the smallest index codec (rice since issue 17)")
    print(f"{'values':<7} {'update, varint idx':>19} {'update, rice idx':>17} {'B/entry':>8} {'x fewer':>8} "
          f"{'butterfly sent':>15} {'x fewer':>8}")
    for name in ("fp16", "int8", "int4", "int2"):
        value_len = len(encode_values(vals, name))
        varint = len(encode_indices(idx, size, "delta-varint")[1]) + value_len
        rice = len(encode_indices(idx, size, "rice")[1]) + value_len
        mean = statistics.mean(butterfly_bytes(grads, k, name))
        print(f"{name:<7} {varint:19,} {rice:17,} {rice / k:8.2f} {dense / rice:8.0f} {mean:15,.0f} "
              f"{dense_bf / mean:8.0f}")


if __name__ == "__main__":
    main()
