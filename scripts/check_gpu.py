"""Check that training runs on a CUDA device: a short federated job of 2 real nodes started with `--device cuda`, and
the same local training in one process on the same device; prints the step times and their ratio.

    .venv/bin/python scripts/check_gpu.py                          # cuda, fp32
    .venv/bin/python scripts/check_gpu.py --precision bf16         # autocast bf16 (refused by GPUs without it)
    .venv/bin/python scripts/check_gpu.py --device cpu --rounds 2 --local-steps 3   # the same script on the CPU
    .venv/bin/python scripts/check_gpu.py --json out.json --keep-dir /tmp/gpu        # figures as JSON, homes kept

How: node/devtools/localswarm.py LocalSwarm starts 2 `swarmnode run --device DEVICE` processes on loopback (both on
the same GPU when there is one), each with its own IID half of the pystdlib-bytes corpus (node/ml/datasets.py). The
job (LLaMA of width 256 and 4 layers, as scripts/bench_federated.py's text part: 3.2 M parameters, untied so that its
export works; AdamW, dense FedAvg; no evaluation: eval_every > rounds) is submitted from node 0 and followed to the
end with the CLI. Each node's step
time is its rounds' local_seconds / local_steps from its export's report.json (node/jobs/federated/export.py), the
first round left out (CUDA context, kernel selection, allocator warm-up). The baseline builds the same model and
trains it with the same LocalTrainer (node/jobs/federated/local_training.py) on node 0's slice on the same device:
one warm-up step, then 3 timed runs of --local-steps steps, as a node's round runs them (torch.cuda.synchronize
before reading the clock), the median divided by --local-steps. Ratio = node step
time / baseline step time: what running inside a node (a thread of the daemon's event loop, a second node sharing the
GPU) costs per step. The script also checks that both nodes report one model hash per round (bit-identical survivors).

Exit codes: 0 done; 2 no CUDA device (when --device names one) or a bad argument; 1 the job failed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from node.devtools.localswarm import LocalSwarm, wait_for  # noqa: E402

CLI = [sys.executable, "-m", "node.cli"]
DATASET = "pystdlib-bytes"  # node/ml/datasets.py: the standard library's *.py files as 128-byte windows
MODEL = {"arch": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4}  # scripts/bench_federated.py TEXT_MODEL_LLAMA
LR, WEIGHT_DECAY = 1e-3, 0.1  # scripts/bench_federated.py TEXT_LR, TEXT_WEIGHT_DECAY (nanoGPT's)


def job(args) -> str:
    """The job file (TOML) both nodes run."""
    model = "\n".join(f"{k} = {json.dumps(v)}" for k, v in MODEL.items())
    return (f'name = "check-gpu"\ndataset = "{DATASET}"\ntask = "causal-lm"\nrounds = {args.rounds}\n'
            f"local_steps = {args.local_steps}\nbatch_size = {args.batch}\nseed = 0\ndensity = 1.0\n"
            f'min_participants = 2\nmax_participants = 2\nround_timeout_s = 300\neval_every = {args.rounds + 1}\n'
            f'precision = "{args.precision}"\n\n[model]\n{model}\n\n'
            f'[inner]\nkind = "adamw"\nlr = {LR}\nweight_decay = {WEIGHT_DECAY}\n\n[outer]\nkind = "fedavg"\n')


def cli(*argv: str, timeout: float = 60) -> str:
    out = subprocess.run([*CLI, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"swarmnode {argv[0]} failed ({out.returncode}): {out.stderr.strip()[-400:]}")
    return out.stdout


def run_swarm(args, root: pathlib.Path) -> dict:
    swarm = LocalSwarm(root / "swarm", 2, swarm="check-gpu", dataset=DATASET, scheme="iid",
                       extra_args=["--device", args.device, "--benchmark-seconds", "0.1"])
    try:
        swarm.start(timeout=120)
        swarm.wait_converged(60)
        peers = json.loads(cli("peers", "--json", "--home", str(swarm.nodes[0].home)))
        devices = [p["capability"].get("train_device") for p in peers]
        print(f"2 nodes up; they train on {devices}", flush=True)
        path = root / "check-gpu.toml"
        path.write_text(job(args))
        job_id = json.loads(cli("submit", str(path), "--json", "--home", str(swarm.nodes[0].home)).splitlines()[0])[
            "job_id"]
        reports = [n.home / "jobs" / job_id / "report.json" for n in swarm.nodes]

        def done() -> bool:
            info = json.loads(cli("job", job_id, "--json", "--home", str(swarm.nodes[0].home)).splitlines()[-1])
            if info["state"] in ("failed", "cancelled"):
                raise RuntimeError(f"job {job_id} ended {info['state']}: {info['declines']}")
            if info["declines"] and info["takers"] == 0 and info["round"] == 0:
                raise RuntimeError(f"job {job_id} declined: {info['declines']}")
            return info["state"] == "done" and all(r.exists() for r in reports)

        t0 = time.monotonic()
        wait_for(done, args.deadline, f"job {job_id} to finish on both nodes", interval=1.0)
        print(f"job {job_id} done in {time.monotonic() - t0:.1f} s", flush=True)
        per_node, hashes = [], {}
        for node, report in zip(swarm.nodes, reports):
            own = [e for e in json.loads(report.read_text()) if e.get("reported_by") == node.peer_id and e["ok"]]
            for e in own:
                hashes.setdefault(e["round"], set()).add(e["model_hash"])
            steps = [e["local_seconds"] / args.local_steps for e in own[1:] if e["local_seconds"] > 0]
            per_node.append(statistics.median(steps) if steps else float("nan"))
        return {"devices": devices, "node_step_s": per_node,
                "bit_identical": all(len(h) == 1 for h in hashes.values()) and bool(hashes),
                "data": [str(n.home / "data" / DATASET) for n in swarm.nodes]}
    finally:
        swarm.stop()


def baseline(args, data_dir: str) -> float:
    """Median seconds per local step of the same model and optimizer in this process, on the same device."""
    from node.jobs.federated.local_training import LocalTrainer, make_inner_optimizer
    from node.ml.datasets import batches, load_node_data
    from node.ml.models import build_model, flatten_params
    from node.runtime.device import resolve_device, synchronize

    device = resolve_device(args.device)
    data = load_node_data(data_dir, dataset=DATASET)
    overrides = {k: v for k, v in MODEL.items() if k != "arch"}
    bundle = build_model(MODEL["arch"], overrides, seed=0)
    optimizer = make_inner_optimizer(bundle.module, "adamw", LR, weight_decay=WEIGHT_DECAY)
    trainer = LocalTrainer(bundle, optimizer, batches(data, args.batch, 0), device, args.precision)
    params = flatten_params(bundle.module)
    trainer.run(params, 1)  # warm-up: CUDA context, kernels, the optimizer's state
    times = []
    for _ in range(3):  # each as one round's local steps: load the parameters, train, flatten them back
        synchronize(device)
        t = time.perf_counter()
        trainer.run(params, args.local_steps)
        synchronize(device)
        times.append((time.perf_counter() - t) / args.local_steps)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="128-byte windows per step")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds the job may take")
    parser.add_argument("--json", type=pathlib.Path, help="also write the figures here")
    parser.add_argument("--keep-dir", type=pathlib.Path, help="keep the nodes' homes here")
    args = parser.parse_args()
    if args.rounds < 2 or args.local_steps < 1 or args.batch < 1:
        parser.error("--rounds >= 2 (the first is warm-up), --local-steps and --batch >= 1")
    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"check_gpu: no CUDA device: torch {torch.__version__} sees none, so --device {args.device} cannot "
              f"run here (try --device cpu to check the script itself)", file=sys.stderr)
        return 2
    from node.runtime.device import resolve_device
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"check_gpu: {e}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, precision {args.precision}", flush=True)
    with tempfile.TemporaryDirectory(prefix="check-gpu-") as tmp:
        root = args.keep_dir or pathlib.Path(tmp)
        try:
            swarm = run_swarm(args, root)
        except (RuntimeError, TimeoutError) as e:
            print(f"check_gpu: {e}", file=sys.stderr)
            return 1
        base = baseline(args, swarm["data"][0])
    node_step = statistics.mean(swarm["node_step_s"])
    result = {"device": str(device), "device_name": name, "torch": torch.__version__, "precision": args.precision,
              "model": MODEL, "batch": args.batch, "local_steps": args.local_steps, "rounds": args.rounds,
              "node_step_s": swarm["node_step_s"], "baseline_step_s": base, "ratio": node_step / base,
              "nodes_train_on": swarm["devices"], "bit_identical": swarm["bit_identical"]}
    print(f"step time: nodes {', '.join(f'{s * 1e3:.1f} ms' for s in swarm['node_step_s'])}; one process "
          f"{base * 1e3:.1f} ms; ratio {node_step / base:.2f}; survivors bit-identical: {swarm['bit_identical']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if swarm["bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
