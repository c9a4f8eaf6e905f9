"""Issue 17 quality: a byte-level LM trained by 4 members with DiLoCo and compressed pseudo-gradients, against
dense DiLoCo and synchronous data-parallel on the same tokens.

    .venv/bin/python scripts/bench_compression.py                      # GPT-2 config, the table -> docs/
    .venv/bin/python scripts/bench_compression.py --arch llama
    .venv/bin/python scripts/bench_compression.py --configs topk-int2 --outer-lr 0.5 --tag lr05   # one variant
    .venv/bin/python scripts/bench_compression.py --rounds 4 --local-steps 4 --eval-windows 64      # smoke
    .venv/bin/python scripts/bench_compression.py --configs topk-int2 --warmup-rounds 6 --tag warmup  # density warm-up

Task: pystdlib-bytes (this Python's standard library sources as bytes; node/ml/datasets.py), windows of --block
bytes, the training windows cut into 4 iid slices as a job's nodes hold them (node/ml/datasets.py partition), the
held-out files for evaluation (--eval-windows evenly spaced windows, loss in nats per byte). Model: the gpt2 or
llama architecture of node/ml/models.py at its defaults (0.83 / 0.86 M parameters with a 64-byte context), the same
seeded init in every run. Every member draws its minibatches from its own seeded stream, the same in every run, so
every configuration sees exactly the same tokens:

  centralized    one model trained alone on the same windows, batch B: 4x the optimizer steps of sync-dp (what the
                 README's earlier "federated / centralized" ratio compared against)
  sync-dp        synchronous data-parallel: every step the 4 members' gradients are averaged densely (fp32) and
                 one AdamW step is taken on the shared model -- the anchor the issue names (global batch 4 x B)
  diloco-dense   DiLoCo (Douillard et al. 2023): each member takes H AdamW steps from the global model, the
                 pseudo-gradient (global - local) is averaged and the outer Nesterov SGD step is applied; the
                 exchange is what a job with density 1.0 sends (fp16 values, dense)
  topk-fp16      the same with top-k (--density) + error feedback, fp16 values (a job's default)
  topk-int8/int4/int2   ... with the job field values = int8 / int4 / int2
  gtopk-int4/int2  top-k int4 / int2 parts and the owners' results cut to their top --result-density (default:
                 --density) of the span's average (global top-k, RoundConfig.result_density; the rest stays in the
                 owner's error feedback)
  ctopk-int2     chunked top-k: the top --density of every block of 4,096 consecutive entries instead of the whole
                 vector's (SparseLoCo's chunk-wise selection), so every tensor sends in proportion to its size
  stopk-int2     top-k int2, plus every entry of the small tensors (<= 1,024 entries: norm gains, biases) each
                 round, as DGC leaves small layers uncompressed
  randk-int2     a shared random mask instead of top-k: every member sends the same --density entries, drawn from
                 a seed of the round, so no index bytes at all (DeMo / SparseLoCo's alternative), int2 values

How the compressed exchange is computed (what protocol/allreduce/averager.py's butterfly does, in one process):
each member's ErrorFeedbackSparsifier selects its update (select_quantizer(values) rounds fp16 there; integer
values are rounded per span piece below); the vector is cut into 4 equal spans (equal bandwidth), each member's
piece of span s is encoded with codecs.smallest_encoding (the bytes counted unless the member owns s) and decoded,
and the piece's rounding goes back into that member's error feedback; the owner averages the decoded pieces,
encodes the average (bytes counted x 3 receivers), and takes back what its result lost on the wire, scaled to its
own weight (x 4); the decoded averages are the pseudo-gradient of the outer step (node/jobs/federated/
local_training.py OuterOptimizer), applied identically by all. So produced = held + applied, as in the real round.
The real multi-process round is covered by tests/test_allreduce_integration.py; this script measures learning and
bytes. Bytes per member per round = what its parts and results carry (payload bytes; frame headers of ~100 B per
frame not counted), against the dense fp32 butterfly's 2 * 3/4 * 4 * N bytes; "update x" = one member's whole update
in its codec against 4 * N bytes (the per-peer figure SparseLoCo and INTELLECT-1 quote).

--warmup-rounds W: the top-k configurations start at --warmup-density and reach --density geometrically after W
rounds (the residual carries over); their bytes per round then include the denser first rounds.
Runs go to a process pool (--jobs, one torch thread each); the table, the curves (PNG) and a JSON land under docs/.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from node.jobs.federated.local_training import OuterOptimizer  # noqa: E402
from node.ml.datasets import load_dataset, partition  # noqa: E402
from node.ml.models import build_model, flatten_params, param_count  # noqa: E402
from protocol.allreduce.codecs import extract_update, select_quantizer, smallest_encoding  # noqa: E402
from protocol.allreduce.settle import owner_residual, span_of  # noqa: E402
from protocol.allreduce.sparsify import ErrorFeedbackSparsifier, SparseUpdate, topk_exact  # noqa: E402
from protocol.planning.partition import span_sizes  # noqa: E402

PEERS = 4  # the issue: "federated over 4 nodes"
CONFIGS = ("centralized", "sync-dp", "diloco-dense", "topk-fp16", "topk-int8", "topk-int4", "topk-int2", "gtopk-int4",
           "gtopk-int2", "ctopk-int2", "stopk-int2", "randk-int2")
SMALL = 1024  # stopk: tensors of at most this many entries (norm gains, biases) go whole every round
BLOCK = 4096  # ctopk: entries per block, each block keeps its own top density x BLOCK (SparseLoCo's chunked top-k)
DEFAULT_CONFIGS = ("centralized", "sync-dp", "diloco-dense", "topk-fp16", "topk-int4", "topk-int2", "gtopk-int2",
                   "randk-int2")


def set_params(model: torch.nn.Module, vec: np.ndarray) -> None:
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.from_numpy(vec.copy()), [p for p in model.parameters()
                                                                          if p.requires_grad])


class Data:
    """Each member's slice of training windows and its seeded batch stream; the fixed evaluation windows."""

    def __init__(self, args) -> None:
        d = load_dataset("pystdlib-bytes", args.seed, block_size=args.block)
        self.slices = [d.x[partition(d.x.shape[0], PEERS, m, "iid", args.seed)] for m in range(PEERS)]
        pick = np.linspace(0, d.test_x.shape[0] - 1, args.eval_windows).astype(np.int64)
        self.eval = torch.from_numpy(d.test_x[pick].astype(np.int64))  # (E, block + 1)
        self.batch = args.batch

    def streams(self, seed: int) -> list[np.random.Generator]:
        return [np.random.default_rng([seed, m]) for m in range(PEERS)]

    def next(self, member: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.slices[member][rng.integers(0, len(self.slices[member]), self.batch)]
                             .astype(np.int64))  # (B, block + 1)
        return w[:, :-1], w[:, 1:]


@torch.no_grad()
def eval_loss(bundle, data: Data) -> float:
    bundle.module.eval()
    losses = [float(bundle.loss(bundle.module, (w[:, :-1], w[:, 1:]))) for w in data.eval.split(64)]
    bundle.module.train()
    return float(np.mean(losses))


class CompressedExchange:
    """One round's butterfly over 4 equal spans, with error feedback on both sides (see the module docstring)."""

    def __init__(self, size: int, density: float, values: str, shared_mask: bool, seed: int,
                 result_density: float | None = None, chunked: bool = False,
                 always: np.ndarray | None = None, ef_decay: float = 1.0) -> None:
        self.size, self.values, self.shared_mask, self.seed = size, values, shared_mask, seed
        self.ef_decay = ef_decay  # SparseLoCo's error-feedback decay: the held-back residual x this each round
        self.chunked = chunked
        self.always = always  # (m,) int64 positions sent every round (stopk), or None
        self.result_density = result_density
        self.sparsifiers = [ErrorFeedbackSparsifier(size, density, "exact", seed=m) for m in range(PEERS)]
        self.k = self.sparsifiers[0].k
        bounds = np.cumsum([0] + span_sizes(size, [1.0] * PEERS))
        self.spans = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]  # owner m holds span m

    def _select(self, m: int, delta: np.ndarray, rnd: int) -> SparseUpdate:
        sp = self.sparsifiers[m]
        if not self.shared_mask and not self.chunked and self.always is None:
            return sp.select(delta, quantize=select_quantizer(self.values))
        sp.restore(SparseUpdate(np.arange(self.size, dtype=np.int64), delta, self.size))
        if self.always is not None:  # the top-k of the rest, plus the small tensors whole
            mags = np.abs(sp.residual)
            mags[self.always] = 0.0
            idx = np.union1d(topk_exact(mags, self.k), self.always)
        elif self.chunked:  # top density x BLOCK of each block of the accumulator (the last block padded with zeros)
            padded = np.zeros(-(-self.size // BLOCK) * BLOCK, np.float32)
            padded[:self.size] = np.abs(sp.residual)
            blocks = padded.reshape(-1, BLOCK)
            kb = max(1, round(sp.density * BLOCK))
            top = np.argpartition(blocks, BLOCK - kb, axis=1)[:, BLOCK - kb:]  # (blocks, kb)
            flat = (top + np.arange(blocks.shape[0])[:, None] * BLOCK).reshape(-1)
            idx = np.sort(flat[(flat < self.size) & (padded[flat] > 0)])
        else:
            idx = np.sort(np.random.default_rng([self.seed, rnd]).choice(self.size, self.k, replace=False))
        taken = SparseUpdate(idx.astype(np.int64), sp.residual[idx].copy(), self.size)
        sp.restore(SparseUpdate(taken.indices, -taken.values, self.size))
        return taken

    def set_density(self, density: float) -> None:
        """A new k for the next rounds (density warm-up); the held-back residual carries over."""
        if round(density * self.size) == self.k:
            return
        for m, old in enumerate(self.sparsifiers):
            new = ErrorFeedbackSparsifier(self.size, density, "exact", seed=m)
            new.restore(SparseUpdate(np.arange(self.size, dtype=np.int64), old.residual.copy(), self.size))
            self.sparsifiers[m] = new
        self.k = self.sparsifiers[0].k

    def __call__(self, deltas: list[np.ndarray], rnd: int) -> tuple[np.ndarray, list[int], list[int]]:
        """(the averaged pseudo-gradient (size,), bytes each member sent, bytes of each member's whole update)."""
        if self.ef_decay < 1.0:  # drop (1 - beta) of what each member held back (no longer conserved, by design)
            for sp in self.sparsifiers:
                nz = np.flatnonzero(sp.residual).astype(np.int64)
                sp.restore(SparseUpdate(nz, -np.float32(1.0 - self.ef_decay) * sp.residual[nz], self.size))
        updates = [self._select(m, d, rnd) for m, d in enumerate(deltas)]
        whole = [smallest_encoding(u, self.values).nbytes for u in updates]
        if self.shared_mask:  # the receivers know the mask: only the values travel
            whole = [len(smallest_encoding(u, self.values).values) for u in updates]
        sent = [0] * PEERS
        average = np.zeros(self.size, np.float32)
        for owner, span in enumerate(self.spans):
            total = np.zeros(span[1] - span[0], np.float32)
            for m, u in enumerate(updates):
                piece = span_of(u, span)
                enc = smallest_encoding(piece, self.values)
                got = extract_update(enc, piece.size)
                if m != owner:
                    sent[m] += len(enc.values) if self.shared_mask else enc.nbytes
                total[got.indices] += got.values
                back = piece.values - got.values  # this piece's wire rounding (0 for fp16: select rounded it)
                if np.any(back):
                    self.sparsifiers[m].restore(SparseUpdate(piece.indices + span[0], back, self.size))
            exact_avg = total / np.float32(PEERS)
            nz = np.flatnonzero(exact_avg).astype(np.int64)
            exact = SparseUpdate(nz, exact_avg[nz], exact_avg.size)
            sent_avg = exact
            if self.result_density is not None:  # global top-k: the owner sends its average's largest entries
                keep = np.sort(topk_exact(exact.values, min(exact.nnz, max(1, round(self.result_density
                                                                                   * exact.size)))))
                sent_avg = SparseUpdate(exact.indices[keep], exact.values[keep], exact.size)
            enc = smallest_encoding(sent_avg, self.values)
            decoded = extract_update(enc, exact.size)
            sent[owner] += (PEERS - 1) * (len(enc.values) if self.shared_mask else enc.nbytes)
            average[span[0] + decoded.indices] = decoded.values
            idx, residual = owner_residual(exact, decoded)
            residual = residual * np.float32(PEERS)  # group weight / own weight
            keep = np.flatnonzero(residual)
            if keep.size:
                self.sparsifiers[owner].restore(SparseUpdate(idx[keep] + span[0], residual[keep], self.size))
        return average, sent, whole


def small_positions(module: torch.nn.Module) -> np.ndarray:
    """Positions in the flat parameter vector of the tensors with at most SMALL entries."""
    out, offset = [], 0
    for p in (p for p in module.parameters() if p.requires_grad):
        if p.numel() <= SMALL:
            out.append(np.arange(offset, offset + p.numel(), dtype=np.int64))
        offset += p.numel()
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def model_overrides(args) -> dict:
    """--model KEY=VALUE pairs as the model config's overrides (ints, floats, true/false, else strings)."""
    out: dict = {}
    for pair in args.model:
        key, _, raw = pair.partition("=")
        value: object = {"true": True, "false": False}.get(raw.lower(), raw)
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                pass
        out[key] = value
    return out


def run_config(config: str, args) -> dict:
    torch.set_num_threads(1)
    data = Data(args)
    context = "n_positions" if args.arch == "gpt2" else "max_position_embeddings"
    overrides = {context: args.block} | model_overrides(args)
    bundles = [build_model(args.arch, overrides, seed=args.seed) for _ in range(PEERS)]
    size = param_count(bundles[0].module)
    theta = flatten_params(bundles[0].module)  # (N,) the global model
    streams = data.streams(args.seed)
    curve = [(0, eval_loss(bundles[0], data))]
    started = time.perf_counter()
    sent_per_round, whole_per_update = [], []
    if config in ("sync-dp", "centralized"):
        model = bundles[0]
        opt = torch.optim.AdamW(model.module.parameters(), lr=args.inner_lr, weight_decay=0.0)
        for step in range(1, args.rounds * args.local_steps + 1):
            opt.zero_grad()
            for m in range(PEERS):  # sync-dp: mean of the 4 members' mean losses = the average gradient
                (model.loss(model.module, data.next(m, streams[m])) / PEERS).backward()
                if config == "centralized":  # the same batches one after another, a step each
                    opt.step()
                    opt.zero_grad()
            opt.step()
            if step % (args.local_steps * args.eval_every) == 0:
                curve.append((step // args.local_steps, eval_loss(model, data)))
        final_bundle = model
    else:
        density = 1.0 if config == "diloco-dense" else args.density
        values = "fp16" if config == "diloco-dense" else config.split("-")[1]
        exchange = CompressedExchange(size, density, values, config.startswith("randk"), args.seed,
                                      (args.result_density or args.density) if config.startswith("gtopk") else None,
                                      chunked=config.startswith("ctopk"), always=small_positions(bundles[0].module)
                                      if config.startswith("stopk") else None, ef_decay=args.ef_decay)
        outer = OuterOptimizer("diloco", size, lr=args.outer_lr, momentum=args.outer_momentum,
                               nesterov=args.outer_momentum > 0)
        opts = [torch.optim.AdamW(b.module.parameters(), lr=args.inner_lr, weight_decay=0.0) for b in bundles]
        for rnd in range(1, args.rounds + 1):
            if args.warmup_rounds and config != "diloco-dense" and rnd <= args.warmup_rounds + 1:
                # geometric from --warmup-density at round 1 to --density at round warmup_rounds + 1
                frac = (rnd - 1) / args.warmup_rounds
                exchange.set_density(args.warmup_density ** (1 - frac) * args.density ** frac)
            deltas = []
            for m, (b, opt) in enumerate(zip(bundles, opts)):
                set_params(b.module, theta)
                for _ in range(args.local_steps):
                    opt.zero_grad()
                    b.loss(b.module, data.next(m, streams[m])).backward()
                    opt.step()
                deltas.append((theta - flatten_params(b.module)).astype(np.float32))
            average, sent, whole = exchange(deltas, rnd)
            sent_per_round.append(float(np.mean(sent)))
            whole_per_update.append(float(np.mean(whole)))
            theta = outer.step(theta, average).astype(np.float32)
            if rnd % args.eval_every == 0:
                set_params(bundles[0].module, theta)
                curve.append((rnd, eval_loss(bundles[0], data)))
        final_bundle = bundles[0]
        set_params(final_bundle.module, theta)
    dense_butterfly = 2 * (PEERS - 1) / PEERS * 4 * size
    out = {"config": config, "params": size, "final_eval_loss": eval_loss(final_bundle, data), "curve": curve,
           "seconds": time.perf_counter() - started}
    if sent_per_round:
        sent, whole = float(np.mean(sent_per_round)), float(np.mean(whole_per_update))
        out |= {"sent_bytes_per_member_round": sent, "update_bytes": whole,
                "x_fewer_butterfly": dense_butterfly / sent, "x_fewer_update": 4 * size / whole}
    else:  # dense fp32 gradients every step: the butterfly's bytes, local_steps times per "round"
        out |= {"sent_bytes_per_member_round": dense_butterfly * args.local_steps, "update_bytes": 4.0 * size,
                "x_fewer_butterfly": 1 / args.local_steps, "x_fewer_update": 1.0}
    print(f"{config:<13} loss {out['final_eval_loss']:.4f}  {out['seconds']:.0f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma list of {CONFIGS}")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--local-steps", type=int, default=16, help="H: inner steps per round")
    ap.add_argument("--batch", type=int, default=16, help="windows per member per step")
    ap.add_argument("--block", type=int, default=64, help="bytes per window (the model's context)")
    ap.add_argument("--inner-lr", type=float, default=2e-3)
    ap.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo's outer lr (Douillard et al.: 0.7)")
    ap.add_argument("--outer-momentum", type=float, default=0.9, help="Nesterov momentum (DiLoCo: 0.9)")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--result-density", type=float, default=None,
                    help="gtopk configurations: the fraction of each span's average its owner sends "
                    "(default: --density)")
    ap.add_argument("--warmup-rounds", type=int, default=0,
                    help="density warm-up: from --warmup-density down to --density over this many rounds")
    ap.add_argument("--warmup-density", type=float, default=0.1)
    ap.add_argument("--ef-decay", type=float, default=1.0,
                    help="error-feedback decay beta (SparseLoCo): the residual is scaled by it before each selection")
    ap.add_argument("--eval-windows", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=4, help="rounds between evaluations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                    help="a model config override, e.g. tie_word_embeddings=true (repeatable)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the output files")
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {CONFIGS}")
    stem = ROOT / "docs" / f"bench_compression_{args.arch}{'_' + args.tag if args.tag else ''}"
    print(f"{args.arch}, {PEERS} members, {args.rounds} rounds x {args.local_steps} steps x batch {args.batch} x "
          f"{args.block} bytes, inner AdamW lr {args.inner_lr}, outer lr {args.outer_lr} momentum "
          f"{args.outer_momentum}, density {args.density}{', model ' + ' '.join(args.model) if args.model else ''}",
          flush=True)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.starmap(run_config, [(c, args) for c in configs])
    anchor = {r["config"]: r["final_eval_loss"] for r in results}
    ref = anchor.get("diloco-dense")
    print("\n| config | eval loss (nats/byte) | vs dense DiLoCo | sent / member / round | x fewer than dense fp32 "
          "butterfly | one update | x fewer than dense fp32 |\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        rel = f"{r['final_eval_loss'] / ref - 1:+.2%}" if ref else "-"
        if r["config"] == "centralized":  # one process: nothing travels
            print(f"| centralized | {r['final_eval_loss']:.4f} | {rel} | - | - | - | - |")
            continue
        print(f"| {r['config']} | {r['final_eval_loss']:.4f} | {rel} | {r['sent_bytes_per_member_round']:,.0f} B | "
              f"{r['x_fewer_butterfly']:.1f}x | {r['update_bytes']:,.0f} B | {r['x_fewer_update']:.0f}x |")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    plot(results, args, stem.with_suffix(".png"))
    print(f"\nwrote {stem}.json and .png")


def plot(results: list[dict], args, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        rounds, losses = zip(*r["curve"])
        ax.plot(rounds, losses, label=r["config"] if r["config"] in ("sync-dp", "centralized") else
                f"{r['config']} (update {r['x_fewer_update']:.0f}x, round {r['x_fewer_butterfly']:.0f}x)")
    ax.set_xlabel(f"round ({args.local_steps} local steps of {PEERS} x {args.batch} windows)")
    ax.set_ylabel("eval loss (nats/byte)")
    ax.set_title(f"{args.arch}: DiLoCo with compressed pseudo-gradients, {PEERS} members\n(x: fewer bytes than dense "
                 "fp32)", fontsize=10)
    ax.set_ylim(top=min(max(max(c[1] for c in r["curve"][1:]) for r in results) + 0.3, math.log(256)))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
