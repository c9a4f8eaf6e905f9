"""The byzantine suite (issue #14): federated jobs with hostile members, against the honest run with the same seed.
Every figure comes from real `swarmnode run` processes on loopback, one fresh swarm per scenario.

    .venv/bin/python scripts/bench_byzantine.py                        # -> docs/bench_byzantine.json + a table
    .venv/bin/python scripts/bench_byzantine.py --only honest:centered_clip,huge:centered_clip   # a subset
    .venv/bin/python scripts/bench_byzantine.py --aggregation-cost   # an owner's aggregation and a member's check

A scenario is FAULT:AGGREGATOR[:NODES:HOSTILE]: NODES daemons (default --nodes), the last HOSTILE of them (default
--hostile) started with SWARMNODE_FAULT_BYZANTINE=FAULT:--from (node/daemon.py; protocol/allreduce/faults.py), so
they behave honestly for the first rounds and then, in every round: ``huge`` parts of 1e30, ``flip100`` their part
sign-flipped x100, ``noise`` N(0, 1) in every entry, ``heavy`` a claimed weight of 1e12, ``nan`` a NaN value, and as
span owners ``result_scaled`` (their aggregate x100) or ``result_flipped`` (sign-flipped) to every member.
``honest`` runs no fault; ``crash`` SIGKILLs the last HOSTILE members once a round of --from is reported (they are
simply lost, with their data: the floor any defence can reach, since an excluded member's samples are lost too). The
job is the demo's (examples/digits.toml: an MLP on digits, top-k density 0.01, SGD 0.1 momentum 0.9, FedAvg) with
--rounds rounds and min_participants = the honest count, on an IID split (so that excluding a member costs no
classes; the members' samples are still a quarter fewer once one is excluded, which the ``crash`` row measures).
Accuracy is the mean held-out accuracy the honest participants report after the last round (report.json); the round
time is the median wall time of their completed rounds; exclusions are the signed ones in the honest nodes' progress
records. A job not done after --stall-s (a ruined model whose rounds no longer complete) is reported stalled, with
the round and the last accuracy its progress records showed.

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
import threading  # noqa: E402
import time  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from node.devtools.localswarm import LocalSwarm, wait_for  # noqa: E402

CLI = [sys.executable, "-m", "node.cli"]
DEFAULT = ("honest:mean,honest:centered_clip,honest:trimmed_mean,honest:median,"
           "huge:mean,flip100:mean,huge:centered_clip,flip100:centered_clip,noise:centered_clip,heavy:centered_clip,"
           "nan:centered_clip,result_scaled:centered_clip,result_flipped:centered_clip,"
           "honest:centered_clip:8:2,huge:centered_clip:8:2,flip100:centered_clip:8:2")


def job_toml(aggregator: str, rounds: int, honest: int, seed: int) -> str:
    return (f'name = "byz"\ndataset = "digits"\ntask = "classification"\nrounds = {rounds}\nlocal_steps = 20\n'
            f"batch_size = 32\nseed = {seed}\ndensity = 0.01\nmin_participants = {honest}\nmax_participants = 8\n"
            f'round_timeout_s = 60\neval_every = 1\naggregator = "{aggregator}"\n'
            '[model]\narch = "mlp"\nhidden = 128\n[inner]\nkind = "sgd"\nlr = 0.1\nmomentum = 0.9\n')


def run(work: pathlib.Path, fault: str, aggregator: str, nodes: int, hostile: int, args) -> dict:
    if fault == "honest":
        hostile = 0
    envs = {} if fault == "crash" else {
        i: {"SWARMNODE_FAULT_BYZANTINE": f"{fault}:{args.from_round}"} for i in range(nodes - hostile, nodes)}
    name = f"{fault}-{aggregator}-{nodes}-{hostile}"
    short = name.replace("centered_clip", "cc").replace("trimmed_mean", "tm").replace("result_", "r")
    # a short folder: each node's control socket path must fit a unix socket's 107 bytes
    swarm = LocalSwarm(work / short, nodes, swarm=f"byz-{name}"[:60], dataset="digits", scheme="iid", envs=envs)
    try:
        swarm.start(120)
        swarm.wait_converged(60)
        path = work / f"{short}.toml"
        path.write_text(job_toml(aggregator, args.rounds, nodes - hostile, args.seed))
        t0 = time.monotonic()
        crashed = swarm.nodes[nodes - hostile:] if fault == "crash" else []
        lines, code, stderr = follow(swarm, path, args, crashed)
        if code is None:  # stalled (a ruined model): what it reached by then
            last = json.loads(lines[-1]) if lines else {}
            return {"scenario": name, "fault": fault, "aggregator": aggregator, "nodes": nodes, "hostile": hostile,
                    "stalled_at_round": last.get("round", 0), "accuracy": last.get("eval_metric") or 0.0,
                    "wall_s": round(time.monotonic() - t0, 1)}
        if code != 0:
            raise RuntimeError(f"{name}: submit --follow failed: {stderr.strip()[-500:]}")
        events = [json.loads(line) for line in lines]
        job_id, final = events[0]["job_id"], events[-1]
        honest_nodes = swarm.nodes[:nodes - hostile]
        homes = [n.home / "jobs" / job_id for n in honest_nodes]
        wait_for(lambda: all((h / "manifest.json").exists() for h in homes), 120, f"{name}'s exports")
        reports = [json.loads((h / "report.json").read_text()) for h in homes]
        manifests = [json.loads((h / "manifest.json").read_text()) for h in homes]
        hostile_ids = {n.peer_id for n in swarm.nodes[nodes - hostile:]}
        excluded = {(x["peer_id"], x["by"]) for e in events for x in e.get("exclusions", [])}
        accuracy = [next(r["metrics"]["accuracy"] for r in reversed(rep) if r["ok"] and r["metrics"])
                    for rep in reports]
        return {"scenario": name, "fault": fault, "aggregator": aggregator, "nodes": nodes, "hostile": hostile,
                "rounds": final["round"], "wall_s": round(time.monotonic() - t0, 1),
                "accuracy": round(statistics.mean(accuracy), 4),
                "round_s": round(statistics.median(r["seconds"] for rep in reports for r in rep if r["ok"]), 3),
                "hashes_agree": len({m["model_hash"] for m in manifests}) == 1,
                "hostile_excluded_by": sorted({by[-8:] for peer, by in excluded  # by honest nodes
                                               if peer in hostile_ids and by not in hostile_ids}),
                "honest_excluded": sorted({peer[-8:] for peer, _ in excluded if peer not in hostile_ids})}
    finally:
        swarm.stop()


def follow(swarm: LocalSwarm, path: pathlib.Path, args, crash: list) -> tuple[list[str], int | None, str]:
    """`submit --follow --json` from the first node: its lines, exit code (None: stalled past --stall-s) and stderr.
    The nodes in `crash` are SIGKILLed as soon as a line reports round --from."""
    with subprocess.Popen([*CLI, "submit", str(path), "--follow", "--json", "--home", str(swarm.nodes[0].home)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        timer = threading.Timer(args.stall_s, proc.kill)
        timer.start()
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if crash and json.loads(line).get("round", 0) >= args.from_round:
                    for node in crash:
                        node.kill_hard()
                    crash = []
            stderr = proc.stderr.read() if proc.stderr else ""
            proc.wait()
        finally:
            stalled = not timer.is_alive() and proc.returncode != 0
            timer.cancel()
    return lines, None if stalled else proc.returncode, stderr


def aggregation_cost(repeats: int = 5) -> None:
    """Seconds an owner spends aggregating its span, per aggregator, and a member checking one result, side by side
    in one process: top-k parts (density 0.01) of members' pseudo-gradients sharing a direction, as in a job."""
    import numpy as np

    from protocol.allreduce.robust import AGGREGATORS, aggregate_span, result_suspicion

    print("| members | span entries | " + " | ".join(AGGREGATORS) + " | member's result check |")
    print("| --- | --- |" + " --- |" * (len(AGGREGATORS) + 1))
    for members, span in [(4, 250_000), (8, 125_000), (16, 62_500), (8, 1_250_000)]:
        rng = np.random.default_rng(0)
        shared, k = rng.normal(size=span), max(1, span // 100)
        parts = []
        for _ in range(members):
            g = 0.5 * shared + rng.normal(size=span)
            idx = np.sort(np.argpartition(-np.abs(g), k)[:k])
            parts.append((idx, g[idx].astype(np.float32), 640.0))
        cells = []
        for method in AGGREGATORS:
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                agg = aggregate_span(parts, span, method)
                times.append(time.perf_counter() - t)
            cells.append(f"{statistics.median(times) * 1e3:.1f} ms")
        own = np.zeros(span, np.float32)
        own[parts[0][0]] = parts[0][1]
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            result_suspicion(agg.values, own, 1.0, members)
            times.append(time.perf_counter() - t)
        print(f"| {members} | {span:,} | " + " | ".join(cells) + f" | {statistics.median(times) * 1e3:.1f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=DEFAULT, help="comma-separated FAULT:AGGREGATOR[:NODES:HOSTILE]")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--hostile", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--from-round", type=int, default=2, help="the first hostile round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stall-s", type=float, default=240.0, help="a job not done by then is reported stalled")
    parser.add_argument("--keep-dir", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "bench_byzantine.json")
    parser.add_argument("--aggregation-cost", action="store_true", help="only time the aggregators (no nodes)")
    args = parser.parse_args()
    if args.aggregation_cost:
        return aggregation_cost()
    work = args.keep_dir or pathlib.Path(tempfile.mkdtemp(prefix="bench-byz-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for scenario in args.only.split(","):
        fault, aggregator, *size = scenario.split(":")
        nodes, hostile = (int(size[0]), int(size[1])) if size else (args.nodes, args.hostile)
        try:
            results.append(run(work, fault, aggregator, nodes, hostile, args))
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:
            results.append({"scenario": f"{fault}-{aggregator}-{nodes}-{hostile}", "fault": fault,
                            "aggregator": aggregator, "nodes": nodes, "hostile": hostile, "error": str(e)[:300]})
        print(json.dumps(results[-1]), flush=True)
    honest = {(r["aggregator"], r["nodes"]): r["accuracy"] for r in results
              if r["fault"] == "honest" and "accuracy" in r}
    print("| members | hostile | fault | aggregator | accuracy | vs honest, same aggregator | round s | hostile "
          "excluded by | honest excluded | one hash |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['nodes']} | {r['hostile']} | {r['fault']} | {r['aggregator']} | failed: {r['error'][:80]} "
                  "| | | | | |")
            continue
        if "stalled_at_round" in r:
            print(f"| {r['nodes']} | {r['hostile']} | {r['fault']} | {r['aggregator']} | {r['accuracy'] or 0:.3f} "
                  f"| stalled at round {r['stalled_at_round']} | | | | |")
            continue
        base = honest.get((r["aggregator"], r["nodes"]))
        delta = f"{(r['accuracy'] - base) * 100:+.1f} pt" if base is not None else "-"
        print(f"| {r['nodes']} | {r['hostile']} | {r['fault']} | {r['aggregator']} | {r['accuracy']:.3f} | {delta} "
              f"| {r['round_s']:.2f} | {len(r['hostile_excluded_by'])} of {r['nodes'] - r['hostile']} "
              f"| {len(r['honest_excluded'])} | {r['hashes_agree']} |")
    args.out.write_text(json.dumps({"command": " ".join(["scripts/bench_byzantine.py", *sys.argv[1:]]),
                                    "rounds": args.rounds, "from_round": args.from_round, "seed": args.seed,
                                    "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
