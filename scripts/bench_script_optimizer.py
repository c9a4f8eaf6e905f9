"""swarmnode.Optimizer beside hivemind.Optimizer (issue 15): one model, one data split, 4 processes on loopback each.

    .venv/bin/python scripts/bench_script_optimizer.py            # -> docs/bench_script_optimizer.json + a table
    .venv/bin/python scripts/bench_script_optimizer.py --rounds 10 --local-steps 20 --only swarmnode-dense,hivemind

Every participant trains examples/own_script.py's MLP (30 -> 32 -> 2) with AdamW (lr 0.01) on its quarter of
scikit-learn's bundled breast-cancer table (a fifth of its rows kept for validation), 16 rows a step. An outer
step happens every --local-steps steps of each participant:

  swarmnode-topk   swarmnode.Optimizer, FedAvg, top-k density 0.01 with error feedback (the default), min_peers 4
  swarmnode-dense  swarmnode.Optimizer, FedAvg, density 1.0
  hivemind         hivemind.Optimizer(use_local_updates=True, target_batch_size = 4 x local_steps x 16): local
                   AdamW steps, the parameters averaged (uncompressed) once the swarm has seen that many samples,
                   matchmaking_time 2 s

Figures per system, over its 4 processes: wall time per outer step (from the first process's first step to the
last process's last), bytes per member (what the member's p2pd -- the same go-libp2p daemon for both, from
hivemind's wheel -- wrote, per /proc/PID/io: the network and its own client together; and, for swarmnode, the
bytes its rounds sent and received, from its progress), and the final validation accuracy (mean). Each process
prints one JSON line at the end; the driver prints a table and the ratios. OMP_NUM_THREADS=1 in every process.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import own_script  # noqa: E402

SYSTEMS = ("swarmnode-topk", "swarmnode-dense", "hivemind")
BATCH = 16


def p2pd_written(pid: int) -> int:
    """Bytes the go-libp2p daemon under ``pid`` wrote (write syscalls: network and its client socket)."""
    total = 0
    for child in psutil.Process(pid).children(recursive=True):
        if "p2pd" in child.name():
            try:
                total += child.io_counters().write_chars
            except (psutil.Error, AttributeError):
                pass
    return total


def wait_for_go(go: pathlib.Path) -> None:
    """Every process starts training together, once all are up (else the first trains its rounds alone)."""
    while not go.exists():
        time.sleep(0.05)


def worker(args) -> None:
    torch.manual_seed(args.part)
    x, y = own_script.read_csv(args.csv)
    xv, yv, xt, yt = own_script.split(x, y)
    model = own_script.make_model(x.shape[1], 2, 32, args.part)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    order = own_script.batch_order(len(yt), args.part, BATCH)
    out: dict = {"part": args.part}
    if args.system.startswith("swarmnode"):
        import swarmnode

        swarm = swarmnode.Swarm(join=args.join, home=args.home, swarm="bench", listen=["/ip4/127.0.0.1/tcp/0"],
                                device="cpu")
        print(json.dumps({"addrs": list(swarm.addrs)}), flush=True)
        wait_for_go(args.go)
        opt = swarmnode.Optimizer(inner, swarm=swarm, run_id="bench", model=model, local_steps=args.local_steps,
                                  rounds=args.rounds, outer="fedavg", min_peers=args.peers, batch_size=BATCH,
                                  density=1.0 if args.system.endswith("dense") else 0.01, round_timeout=60.0)
        t0 = time.time()
        for i in order:
            loss_fn(model(xt[i]), yt[i]).backward()
            opt.step()
            opt.zero_grad()
            if opt.finished:
                break
        out |= {"t0": t0, "t1": time.time(), "rounds": opt.rounds_done, "p2pd_written": p2pd_written(os.getpid())}
        report = swarm.jobs.federated.rounds.get(opt.job_id)
        if report is not None:  # the rounds this node ran: what its all-reduce sent and received
            out["round_bytes"] = sum(r.bytes_sent + r.bytes_received for r in report.own)
        out["accuracy"] = own_script.accuracy(model, xv, yv)
        print(json.dumps(out), flush=True)
        swarm.shutdown()
        return
    import hivemind

    dht = hivemind.DHT(start=True, initial_peers=args.join, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    print(json.dumps({"addrs": [str(a) for a in dht.get_visible_maddrs()]}), flush=True)
    wait_for_go(args.go)
    opt = hivemind.Optimizer(dht=dht, run_id="bench", optimizer=inner, target_batch_size=args.peers *
                             args.local_steps * BATCH, batch_size_per_step=BATCH, use_local_updates=True,
                             matchmaking_time=2.0, averaging_timeout=30.0, verbose=False)
    opt.load_state_from_peers()
    t0 = time.time()
    for i in order:
        loss_fn(model(xt[i]), yt[i]).backward()
        opt.step()
        opt.zero_grad()
        if opt.local_epoch >= args.rounds:
            break
    out |= {"t0": t0, "t1": time.time(), "rounds": opt.local_epoch, "p2pd_written": p2pd_written(os.getpid()),
            "accuracy": own_script.accuracy(model, xv, yv)}
    print(json.dumps(out), flush=True)
    opt.shutdown()
    dht.shutdown()


def run_system(system: str, work: pathlib.Path, args) -> dict:
    csvs = [work / f"rows{i}.csv" for i in range(args.peers)]
    for i, path in enumerate(csvs):
        if not path.exists():
            own_script.write_csv(path, i, args.peers)
    procs, lines = [], []
    join: list[str] = []
    try:
        for i in range(args.peers):
            cmd = [sys.executable, __file__, "--worker", system, "--part", str(i), "--csv", str(csvs[i]),
                   "--home", str(work / f"{system}-{i}"), "--rounds", str(args.rounds), "--local-steps",
                   str(args.local_steps), "--peers", str(args.peers), "--go", str(work / f"{system}.go"),
                   *[a for j in join for a in ("--join", j)]]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(work / f"{system}-{i}.err", "w"),
                                    text=True, cwd=ROOT)
            procs.append(proc)
            first = json.loads(proc.stdout.readline() or "{}")  # its address
            if not join:
                join = first.get("addrs", [])[:1]
        (work / f"{system}.go").touch()  # all are up: go
        results: list[dict] = []

        def read(p: subprocess.Popen) -> None:
            for line in p.stdout:
                if line.startswith("{"):
                    results.append(json.loads(line))

        readers = [threading.Thread(target=read, args=(p,), daemon=True) for p in procs]
        for r in readers:
            r.start()
        for p in procs:
            p.wait(args.timeout)
        for r in readers:
            r.join(5)
        lines = results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if len(lines) != args.peers:
        return {"system": system, "error": f"{len(lines)} of {args.peers} processes reported (see {work}/*.err)"}
    rounds = min(x["rounds"] for x in lines)
    wall = max(x["t1"] for x in lines) - min(x["t0"] for x in lines)
    out = {"system": system, "rounds": rounds, "s_per_outer_step": round(wall / max(rounds, 1), 3),
           "p2pd_written_per_member": int(statistics.mean(x["p2pd_written"] for x in lines)),
           "accuracy": round(statistics.mean(x["accuracy"] for x in lines), 4)}
    if all("round_bytes" in x for x in lines):
        out["round_bytes_per_member"] = int(statistics.mean(x["round_bytes"] for x in lines))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=SYSTEMS)
    ap.add_argument("--part", type=int, default=0)
    ap.add_argument("--csv", type=pathlib.Path)
    ap.add_argument("--home", default="")
    ap.add_argument("--join", action="append", default=[])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--go", type=pathlib.Path, help="(worker) start training once this file exists")
    ap.add_argument("--only", default=",".join(SYSTEMS))
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "bench_script_optimizer.json")
    args = ap.parse_args()
    if args.worker:
        args.system = args.worker
        return worker(args)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bso-"))
    results = []
    for system in args.only.split(","):
        results.append(run_system(system, work, args))
        print(json.dumps(results[-1]), flush=True)
    ok = {r["system"]: r for r in results if "error" not in r}
    print("| system | rounds | s per outer step | p2pd bytes written per member | round bytes per member | accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['system']} | failed: {r['error']} | | | | |")
            continue
        print(f"| {r['system']} | {r['rounds']} | {r['s_per_outer_step']:.2f} | {r['p2pd_written_per_member']:,} "
              f"| {r.get('round_bytes_per_member', '-')} | {r['accuracy']:.3f} |")
    if "hivemind" in ok:
        for name in ("swarmnode-topk", "swarmnode-dense"):
            if name in ok:
                a, b = ok[name], ok["hivemind"]
                print(f"{name} / hivemind: time per outer step {a['s_per_outer_step'] / b['s_per_outer_step']:.2f}x, "
                      f"p2pd bytes {a['p2pd_written_per_member'] / b['p2pd_written_per_member']:.2f}x, "
                      f"accuracy {(a['accuracy'] - b['accuracy']) * 100:+.1f} pt")
    args.out.write_text(json.dumps({"command": " ".join(["scripts/bench_script_optimizer.py", *sys.argv[1:]]),
                                    "peers": args.peers, "rounds": args.rounds, "local_steps": args.local_steps,
                                    "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
