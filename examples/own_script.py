"""Your own training script in a swarm run: a torch model on a CSV of your own rows, with swarmnode.Optimizer.

    # a CSV of rows to train on (here: a third of the breast-cancer table that ships with scikit-learn)
    python examples/own_script.py --write-csv rows0.csv --part 0 --of 3
    # the first participant starts the run; the others join it through the first one's address
    python examples/own_script.py --csv rows0.csv --home /tmp/s0 --listen /ip4/127.0.0.1/tcp/0
    python examples/own_script.py --csv rows1.csv --home /tmp/s1 --join /ip4/127.0.0.1/tcp/PORT/p2p/12D3KooW...

The CSV's last column is the class label (an integer); the others are features. Each script keeps a fifth of its
rows for validation. It prints one JSON line when it is up ({"addrs": ...}), one per round it evaluated, and one at
the end with the run's final model hash and the accuracy before and after.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import swarmnode  # noqa: E402


def write_csv(path: pathlib.Path, part: int, of: int, seed: int = 0) -> None:
    from sklearn.datasets import load_breast_cancer  # bundled with scikit-learn: no download

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))[part::of]
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    np.savetxt(path, np.column_stack([x[order], y[order]]), delimiter=",", header=header, comments="", fmt="%.6g")


def read_csv(path: pathlib.Path) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    x, y = rows[:, :-1].astype(np.float32), rows[:, -1].astype(np.int64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)  # each participant scales its own rows
    return torch.from_numpy(x), torch.from_numpy(y)


def make_model(features: int, classes: int, hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # this script's own initial weights (a joiner starts from the run's anyway)
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


def batch_order(n: int, seed: int, size: int = 16):
    """Index batches of this script's rows, epoch after epoch, in its own seeded order."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=g).split(size)


def split(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(validation x, y, training x, y): a fifth of the rows for validation."""
    n_val = max(1, len(y) // 5)
    return x[:n_val], y[:n_val], x[n_val:], y[n_val:]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", type=pathlib.Path)
    ap.add_argument("--write-csv", type=pathlib.Path, help="write a CSV of rows (--part of --of) and exit")
    ap.add_argument("--part", type=int, default=0)
    ap.add_argument("--of", type=int, default=1)
    ap.add_argument("--home", default="~/.swarmnode/own-script")
    ap.add_argument("--join", action="append", default=[])
    ap.add_argument("--listen", action="append", default=[])
    ap.add_argument("--swarm", default="default")
    ap.add_argument("--run-id", default="own-script")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--outer", default="fedavg", choices=["fedavg", "diloco"])
    ap.add_argument("--min-peers", type=int, default=2)
    ap.add_argument("--aggregator", default="centered_clip", choices=["centered_clip", "mean", "trimmed_mean",
                                                                       "median"])
    ap.add_argument("--seed", type=int, default=0, help="this script's own initial weights and batch order")
    ap.add_argument("--hidden", type=int, default=32, help="a different width is a different model (refused)")
    ap.add_argument("--round-timeout", type=float, default=60.0, help="seconds members wait for each other")
    ap.add_argument("--linger", type=float, default=0.0,
                    help="seconds to stay up after the run, serving its final model to exporters and late nodes")
    args = ap.parse_args()
    if args.write_csv:
        return write_csv(args.write_csv, args.part, args.of)
    if args.csv is None:
        ap.error("--csv (or --write-csv) is required")
    x, y = read_csv(args.csv)
    xv, yv, xt, yt = split(x, y)
    model = make_model(x.shape[1], 2, args.hidden, args.seed)  # the table's two classes
    before = accuracy(model, xv, yv)
    with swarmnode.Swarm(join=args.join, home=args.home, swarm=args.swarm,
                         listen=args.listen or ["/ip4/0.0.0.0/tcp/0"], device="cpu") as swarm:
        print(json.dumps({"addrs": list(swarm.addrs), "peer_id": swarm.peer_id}), flush=True)
        opt = swarmnode.Optimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2), swarm=swarm, run_id=args.run_id, model=model,
            local_steps=args.local_steps, rounds=args.rounds, outer=args.outer, density=args.density,
            min_peers=args.min_peers, batch_size=16, round_timeout=args.round_timeout, aggregator=args.aggregator,
            evaluate=lambda: {"accuracy": accuracy(model, xv, yv)})
        opt.load_state_from_peers()  # as hivemind scripts do; the Optimizer has loaded the run's parameters already
        print(json.dumps({"joined": opt.job_id, "round": opt.rounds_done}), flush=True)
        loss_fn = torch.nn.CrossEntropyLoss()
        for i in batch_order(len(yt), args.seed):
            if opt.finished:  # the run is over (it may have been when this script joined: opt.ended says why)
                break
            loss = loss_fn(model(xt[i]), yt[i])
            loss.backward()
            opt.step(batch_size=len(i), loss=loss)
            opt.zero_grad()
            if opt.finished:
                break
            if opt.local_step == 0:  # a round just ended
                print(json.dumps({"round": opt.rounds_done, "hash": opt.model_hash[:16]}), flush=True)
        print(json.dumps({"done": True, "job_id": opt.job_id, "rounds": opt.rounds_done, "model_hash": opt.model_hash,
                          "accuracy_before": before, "accuracy_after": accuracy(model, xv, yv), "ended": opt.ended}),
              flush=True)
        time.sleep(args.linger)


if __name__ == "__main__":
    try:
        main()
    except (swarmnode.NodeError, ValueError) as e:  # a bad setting, an unreachable peer, a run of another model
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: the Swarm's `with` has left the run and stopped the node
        sys.exit("interrupted: left the run")
