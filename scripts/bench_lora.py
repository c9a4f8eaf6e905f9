"""LoRA vs full fine-tuning of one model folder through the real daemon (issue #13): bytes per round and eval loss
after the same rounds. Every figure comes from real node processes on loopback.

    .venv/bin/python scripts/bench_lora.py                       # -> docs/bench_lora.json, a table on stdout
    .venv/bin/python scripts/bench_lora.py --rounds 4 --keep-dir /tmp/bl   # shorter; homes kept

How: a GPT-2 of node/ml/models.py's gpt2 size (n_embd 128, 4 layers, 4 heads, byte vocabulary 256, context 128:
~0.8 M params) is first pretrained here for --pretrain-steps AdamW steps on the union of the nodes' slices of
"pystdlib-bytes", then saved with save_pretrained(safe_serialization=True): a small but real checkpoint. One
LocalSwarm of --nodes `swarmnode run` processes (each its own p2pd, home and shard of the corpus) runs two
federated jobs on that folder, one after the other, same seed, same rounds, local steps, batch, optimizer and
density: [adapter] LoRA (r 8, alpha 16, peft's default targets for GPT-2: c_attn) and full fine-tuning (every
weight). Both are submitted from node 0 with `[model] path` (the other nodes fetch and verify the folder) and
followed to the end with the CLI. From each participant's report.json: bytes sent + received per completed
round (the all-reduce's wire bytes, fp16 values + indices; node/jobs/federated/runner.py RoundResult), and the
eval loss (nats/byte on the held-out files, node/jobs/federated/runner.py evaluate) after the last round; the
parameters each job trains and sends come from its manifest (tensors) and model hash agreement is checked.

Threads: OMP_NUM_THREADS=1 for every node and this process (nodes share 2 cores).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every node process (see docstring)

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from node.devtools.localswarm import LocalSwarm, wait_for  # noqa: E402

CLI = [sys.executable, "-m", "node.cli"]
MODEL = {"n_embd": 128, "n_layer": 4, "n_head": 4, "vocab_size": 256, "n_positions": 128}  # node/ml/models.py gpt2
LORA = {"r": 8, "alpha": 16.0}  # peft's LoraConfig examples and the LoRA paper's common r = 8 (Hu et al. 2021)
LR = 1e-3  # nanoGPT's baby byte/char-level models (config/train_shakespeare_char.py)
BATCH, LOCAL_STEPS = 8, 10  # scripts/bench_federated.py's text part: 8 windows of 128 bytes, 10 steps a round
DATASET = "pystdlib-bytes"


def pretrain(folder: pathlib.Path, homes: list[pathlib.Path], steps: int) -> None:
    """A checkpoint worth fine-tuning: the gpt2-sized model trained ``steps`` AdamW steps here, then saved."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from node.ml.datasets import batches, load_node_data

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**MODEL, bos_token_id=None, eos_token_id=None))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    streams = [batches(load_node_data(h / "data" / DATASET, dataset=DATASET), BATCH, 0) for h in homes]
    for step in range(steps):
        x, y = next(streams[step % len(streams)])  # (B, 128) int64 each
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder, safe_serialization=True)
    print(f"pretrained {steps} steps (last loss {loss.item():.3f}) -> {folder}", flush=True)


def job_toml(name: str, args, adapter: bool) -> str:
    text = (f'name = "{name}"\ndataset = "{DATASET}"\ntask = "causal-lm"\nrounds = {args.rounds}\n'
            f"local_steps = {LOCAL_STEPS}\nbatch_size = {BATCH}\ndensity = {args.density}\n"
            f"min_participants = {args.nodes}\nround_timeout_s = 120\neval_every = {args.rounds}\n"
            f'[model]\npath = "./base"\n[inner]\nkind = "adamw"\nlr = {LR}\n')
    if adapter:
        text += f"[adapter]\nr = {LORA['r']}\nalpha = {LORA['alpha']}\n"
    return text


def run(swarm: LocalSwarm, work: pathlib.Path, name: str, args, adapter: bool) -> dict:
    path = work / f"{name}.toml"
    path.write_text(job_toml(name, args, adapter))
    t0 = time.monotonic()
    out = subprocess.run([*CLI, "submit", str(path), "--follow", "--json", "--home", str(swarm.nodes[0].home)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120 + 120 * args.rounds)
    if out.returncode != 0:
        raise RuntimeError(f"{name}: submit --follow failed: {out.stderr.strip()[-500:]}")
    events = [json.loads(line) for line in out.stdout.splitlines()]
    job_id, final = events[0]["job_id"], events[-1]
    homes = [n.home / "jobs" / job_id for n in swarm.nodes if n.peer_id in final["participants"]]
    wait_for(lambda: all((h / "manifest.json").exists() for h in homes), 60, f"{name}'s exports")
    reports = [json.loads((h / "report.json").read_text()) for h in homes]
    manifests = [json.loads((h / "manifest.json").read_text()) for h in homes]
    per_round = [r["bytes_sent"] + r["bytes_received"] for rep in reports for r in rep if r["ok"]]
    last = [r["metrics"] for rep in reports for r in rep if r["ok"] and r["metrics"]]
    return {"job_id": job_id, "wall_s": round(time.monotonic() - t0, 1), "rounds": final["round"],
            "participants": len(final["participants"]),
            "hashes_agree": len({m["model_hash"] for m in manifests}) == 1,
            "bytes_per_round_per_node": round(statistics.mean(per_round)),
            "eval_loss": round(statistics.mean(m["loss"] for m in last), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--keep-dir", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "bench_lora.json")
    args = parser.parse_args()
    work = args.keep_dir or pathlib.Path(tempfile.mkdtemp(prefix="bench-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    swarm = LocalSwarm(work / "swarm", args.nodes, swarm="bench-lora", dataset=DATASET, scheme="shards")
    try:
        swarm.start()
        swarm.wait_converged(60)
        pretrain(work / "base", [n.home for n in swarm.nodes], args.pretrain_steps)
        results = {"lora": run(swarm, work, "bench-lora", args, True),
                   "full": run(swarm, work, "bench-full", args, False)}
    finally:
        swarm.stop()
    from safetensors.torch import load_file
    for name, r in results.items():  # what each job trains and sends: the flat vector's length
        weights = (next(work.rglob(f"jobs/{r['job_id']}/adapter_model.safetensors")) if name == "lora" else
                   work / "base" / "model.safetensors")  # GPT-2's tied lm_head is stored once
        r["trained_params"] = sum(t.numel() for t in load_file(weights).values())
    ratio = results["full"]["bytes_per_round_per_node"] / results["lora"]["bytes_per_round_per_node"]
    summary = {"command": " ".join(["scripts/bench_lora.py", *sys.argv[1:]]), "model": MODEL, "lora": LORA,
               "nodes": args.nodes, "rounds": args.rounds, "local_steps": LOCAL_STEPS, "batch": BATCH,
               "density": args.density, "pretrain_steps": args.pretrain_steps, "results": results,
               "bytes_ratio_full_over_lora": round(ratio, 1)}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'':6} {'trained params':>15} {'bytes/round/node':>17} {'eval loss':>10} {'wall s':>7} hashes agree")
    for name, r in results.items():
        print(f"{name:6} {r['trained_params']:>15,} {r['bytes_per_round_per_node']:>17,} {r['eval_loss']:>10.4f} "
              f"{r['wall_s']:>7.1f} {r['hashes_agree']}")
    print(f"full fine-tuning sends {ratio:.1f}x the bytes of LoRA per round -> {args.out}")


if __name__ == "__main__":
    main()
