"""Serving benchmark (issue #19): generation through 2 and 3 served stages on loopback vs one process, with the
key/value cache and without. Every distributed figure comes from real stage-host processes, each with its own p2pd.

    .venv/bin/python scripts/bench_serving.py                 # ~3 min -> docs/bench_serving.json
    .venv/bin/python scripts/bench_serving.py --new-tokens 32 --repeats 2     # quicker

The model: the byte-level GPT-2 of the pipeline benchmark (n_embd 256, 4 heads, 128 positions) with 6 layers and
its own LM head (tie_word_embeddings False), seeded; split into 2 and 3 stages of equal layers by
node/ml/splitter.py split_model (signed shards). For each stage count, one `python -m node.devtools.serve_peer`
process per stage (node/serving/host.py InferenceHost, eval mode, torch's default threads) and the client
(node/serving/client.py InferenceClient) in this process with its own p2pd and DHT node; hops over the hosts' direct
TCP paths (sealed; sessions asked for over libp2p), and, as "libp2p only", over libp2p streams. A run generates
--new-tokens tokens greedily after a --prompt-tokens prompt and records each token's time as the client sees it
(the first one: the prefill of the prompt through every stage); the medians over --repeats runs are printed:

  tokens/s          new tokens / the run's wall time (prefill included)
  ms/token          the median time of one token after the first (a step through every stage)
  prefill ms        the first token's time

Baselines in this process, on the same weights: transformers' generate (its own key/value cache), and the same
greedy loop without a cache (the whole sequence through the model for every token: what the client does with
use_cache=False). Every configuration's tokens are checked equal to generate's before a figure is kept. The
machine has 2 cores: the stage processes, their p2pd and the client share them, so the ratios are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import tempfile
import time

import torch
import transformers
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.node import DHTNode

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.devtools.reduce_peer import PeerProcess  # noqa: E402
from node.ml.splitter import split_model  # noqa: E402
from node.runtime.p2pd import OwnedP2PDaemon  # noqa: E402
from node.serving.client import ClientConfig, InferenceClient, ServedModel  # noqa: E402

SWARM = "benchserve"
LAYERS, WIDTH, POSITIONS, VOCAB = 6, 256, 128, 256


def build() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_layer=LAYERS, n_embd=WIDTH, n_head=4, n_positions=POSITIONS,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def local_runs(model, prompt: list[int], new: int, repeats: int) -> dict:
    out = {}
    for name in ("generate", "no_cache"):
        walls, steps, tokens = [], [], []
        for _ in range(repeats):
            times, ids = [], list(prompt)
            t0 = time.perf_counter()
            with torch.no_grad():
                if name == "generate":
                    # generate's own cache; per-token times from a streamer-free loop would change what is timed
                    gen = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new,
                                         min_new_tokens=new, pad_token_id=0)
                    ids = gen[0].tolist()
                else:
                    for _ in range(new):
                        t = time.perf_counter()
                        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
                        times.append(time.perf_counter() - t)
            walls.append(time.perf_counter() - t0)
            steps.append(statistics.median(times[1:]) if times else None)
            tokens = ids[len(prompt):]
        out[name] = {"tokens_per_s": new / statistics.median(walls),
                     "ms_per_token": None if steps[0] is None else 1e3 * statistics.median(steps),
                     "prefill_ms": None, "tokens": tokens}
    return out


async def distributed(shards: pathlib.Path, stages: int, prompt: list[int], new: int, repeats: int,
                      work: pathlib.Path) -> dict:
    procs: list[PeerProcess] = []
    daemon, dht = OwnedP2PDaemon(), None
    try:
        for i in range(stages):
            join = ["--join", procs[0].wait_event(60, "ready", event="ready")["addr"]] if procs else []
            procs.append(PeerProcess(work / f"s{stages}-{i}", ["--shards", str(shards), "--stage", str(i), "--swarm",
                                                                SWARM, "--serve", f"bench{stages}", "--max-tokens",
                                                                str(POSITIONS), *join],
                                     module="node.devtools.serve_peer").start())
        ready = [p.wait_event(60, "ready", event="ready") for p in procs]
        p2p = await daemon.start(identity_path=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=[ready[0]["addr"]])
        dht = await DHTNode.create(p2p=p2p, initial_peers=[ready[0]["addr"]], ensure_bootstrap_success=True)
        model = ServedModel(stages, WIDTH, VOCAB, "causal-lm", POSITIONS)
        clients = {direct: InferenceClient(p2p, dht, f"bench{stages}", model, ClientConfig(swarm=SWARM, direct=direct))
                   for direct in (True, False)}
        out = {}
        for client in clients.values():
            await client.generate(prompt, 2)  # warm-up: streams and direct sessions opened, first-call costs paid
        for name, cache, direct in (("cache", True, True), ("cache, libp2p only", True, False),
                                    ("no_cache", False, True)):
            walls, steps, prefills, tokens = [], [], [], []
            client = clients[direct]
            for _ in range(repeats):
                t0 = time.perf_counter()
                tokens, _ = await client.generate(prompt, new, use_cache=cache)
                walls.append(time.perf_counter() - t0)
                steps.append(statistics.median(client.step_seconds[1:]))
                prefills.append(client.step_seconds[0])
            out[name] = {"tokens_per_s": new / statistics.median(walls), "ms_per_token": 1e3 * statistics.median(steps),
                         "prefill_ms": 1e3 * statistics.median(prefills), "tokens": tokens}
        return out
    finally:
        if dht is not None:
            await dht.shutdown()
        await daemon.stop()
        for p in procs:
            p.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "bench_serving.json")
    args = parser.parse_args()
    model = build()
    prompt = list(pathlib.Path(json.__file__).read_bytes()[:args.prompt_tokens])
    results = {"one process": local_runs(model, prompt, args.new_tokens, args.repeats)}
    expected = results["one process"]["generate"]["tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        for stages in (2, 3):
            shards = pathlib.Path(tmp) / f"shards{stages}"
            per = LAYERS // stages
            split_model(model, [(i * per, (i + 1) * per) for i in range(stages)], shards, Ed25519PrivateKey.generate())
            results[f"{stages} stages"] = asyncio.run(distributed(shards, stages, prompt, args.new_tokens,
                                                                  args.repeats, pathlib.Path(tmp)))
    base = results["one process"]["generate"]["tokens_per_s"]
    print(f"GPT-2 {LAYERS} layers x {WIDTH}, {sum(p.numel() for p in model.parameters()):,} params; prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new, greedy; medians of {args.repeats} runs")
    print(f"{'configuration':<36}{'tokens/s':>10}{'ms/token':>10}{'prefill ms':>12}{'vs generate':>13}  same tokens")
    for where, runs in results.items():
        for name, r in runs.items():
            same = r["tokens"] == expected
            step = "-" if r["ms_per_token"] is None else f"{r['ms_per_token']:.1f}"
            prefill = "-" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}"
            print(f"{where + ', ' + name:<36}{r['tokens_per_s']:>10.1f}{step:>10}{prefill:>12}"
                  f"{r['tokens_per_s'] / base:>12.2f}x  {same}")
            if not same:
                raise SystemExit(f"{where}, {name}: the tokens differ from generate's")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": {
        w: {n: {k: v for k, v in r.items() if k != "tokens"} for n, r in runs.items()} for w, runs in results.items()}},
        indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
