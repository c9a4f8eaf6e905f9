"""Round time and wire bytes of swarmnode's top-k all-reduce vs hivemind (dense) and torch gloo, one run.

    .venv/bin/python scripts/bench_allreduce.py                      # loopback, 4 peers, 10M params
    .venv/bin/python scripts/bench_allreduce.py --netns --rate-mbit 100   # each peer in its own namespace
    .venv/bin/python scripts/bench_allreduce.py --size 1000000 --rounds 3  # quicker

Each system runs 4 peers as separate processes averaging a (size,) float32 vector, one round every
--period seconds (all peers start round r at start_at + r * period), and reports the median over rounds:
  swarmnode: node/devtools/reduce_peer.py, top-k at --density with error feedback, fp16 parts and results,
             expected group 4 (matchmaking ends once all 4 declared); time = step() including the top-k
             selection, which runs in a thread while matchmaking goes on
  hivemind:  hivemind.averaging.DecentralizedAverager, NoCompression, target_group_size 4; time = step()
  gloo:      torch.distributed all_reduce (SUM) over tcp on loopback; time = all_reduce (loopback only)
Wire bytes per member: frames swarmnode's round wrote (headers included; libp2p/TLS framing and DHT
traffic not included), against the dense fp32 butterfly's 2 * (n-1)/n * 4 * size bytes sent per member.
With --netns the peers run in the namespaces of scripts/netns_testbed.py, egress capped by tbf.
Issue #3 targets: bytes <= 2.5% of dense; loopback time <= 1/4 of hivemind's; capped: >= 20x faster.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- worker roles (run as subprocesses of this script) -------------------------------------------------


def hivemind_worker(args) -> None:
    import hivemind
    import torch

    dht = hivemind.DHT(initial_peers=args.join or None, host_maddrs=[f"/ip4/{args.ip}/tcp/0"], start=True)
    print(json.dumps({"event": "ready", "addr": str(dht.get_visible_maddrs()[0])}), flush=True)
    tensor = torch.randn(args.size, generator=torch.Generator().manual_seed(args.seed))  # (size,) float32
    averager = hivemind.averaging.DecentralizedAverager(
        [tensor], dht, start=True, prefix="bench", target_group_size=args.peers, min_group_size=args.peers,
        min_matchmaking_time=2.0, request_timeout=2.0, allreduce_timeout=120.0,
        next_chunk_timeout=30.0, sender_timeout=30.0, reducer_timeout=60.0)  # shaped links are slow, not dead
    times = []
    for r in range(args.rounds):
        delay = args.start_at + r * args.period - time.time()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        try:
            ok = averager.step(timeout=args.period * 2)
        except Exception as e:  # hivemind raises AllreduceException when no group formed
            print(f"round {r} failed: {e}", file=sys.stderr, flush=True)
            ok = False
        times.append(time.perf_counter() - t0 if ok else None)
        print(f"round {r}: {times[-1]}", file=sys.stderr, flush=True)
    print(json.dumps({"event": "done", "times": times}), flush=True)
    averager.shutdown()
    dht.shutdown()


def gloo_worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.peers)
    tensor = torch.randn(args.size)  # (size,) float32
    times = []
    for _ in range(args.rounds + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    print(json.dumps({"event": "done", "times": times[1:]}), flush=True)  # first call sets up connections


# ---- drivers ---------------------------------------------------------------------------------------------


def run_swarmnode(args, hosts, out: pathlib.Path) -> dict:
    from node.devtools.reduce_peer import PeerProcess

    go = out / "start_at"  # written once every peer is ready: round 0 never races start-up
    common = ["--size", str(args.size), "--density", str(args.density), "--rounds", str(args.rounds),
              "--period", str(args.period), "--start-at", f"file:{go}", "--expected-group", str(args.peers),
              "--matchmaking-time", "3", "--part-timeout", "20", "--result-timeout", "40", "--commit-timeout", "5",
              "--mode", args.mode, *(["--result-density", str(args.result_density)] if args.result_density else []),
              "--bandwidth", str(args.rate_mbit * 1e6 / 8 if args.netns else 1e9)]
    procs = []
    try:
        for i, host in enumerate(hosts):
            listen = f"/ip4/{host.ip}/tcp/0"
            join = ["--join", procs[0].wait_event(60, "ready", event="ready")["addr"]] if procs else []
            procs.append(PeerProcess(out / f"sn{i}", [*common, "--seed", str(i), "--listen", listen, *join],
                                     prefix=host.prefix()).start())
        for p in procs:
            p.wait_event(120, "ready", event="ready")
        go.write_text(str(time.time() + 2.0))
        for p in procs:
            p.wait_event(args.rounds * args.period + 120, "done", event="done")
        rounds = [p.rounds() for p in procs]
    finally:
        for p in procs:
            p.stop()
    per_round, sent = [], []
    for r in range(args.rounds):
        events = [peer[r] for peer in rounds]
        if not all(e["ok"] for e in events):
            continue
        assert len({e["hash"] for e in events}) == 1, "bit-identity violated"
        per_round.append(max(e["round_s"] for e in events))
        sent.append(max(e["sent"] for e in events))
    return {"times": per_round, "sent_max": sent, "ok_rounds": len(per_round)}


def run_workers(role: str, args, hosts, extra, logs: pathlib.Path) -> list[dict]:
    procs = []
    try:
        for i, host in enumerate(hosts):
            cmd = [*host.prefix(), sys.executable, __file__, "--role", role, "--size", str(args.size), "--rounds",
                   str(args.rounds), "--period", str(args.period), "--peers", str(args.peers), "--seed", str(i),
                   "--ip", host.ip, *extra(i, procs)]
            with open(logs / f"{role}{i}.log", "w") as err:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True))
        results = []
        for i, p in enumerate(procs):
            lines = [json.loads(line) for line in p.stdout if line.startswith("{")]
            p.wait(args.rounds * args.period * 3 + 300)
            done = next((e for e in lines if e["event"] == "done"), None)
            if done is None:
                tail = (logs / f"{role}{i}.log").read_text()[-800:]
                raise RuntimeError(f"{role} worker {i} exited with {p.returncode} before finishing: {tail}")
            results.append(done)
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def run_hivemind(args, hosts, logs: pathlib.Path) -> dict:
    start_at = time.time() + 15.0
    first_addr: list[str] = []

    def extra(i, procs):
        if i == 0:
            return ["--start-at", str(start_at)]
        if not first_addr:
            first_addr.append(json.loads(procs[0].stdout.readline())["addr"])
        return ["--start-at", str(start_at), "--join", first_addr[0]]

    results = run_workers("hivemind", args, hosts, extra, logs)
    per_round = []
    for r in range(args.rounds):
        ts = [res["times"][r] for res in results]
        if all(t is not None for t in ts):
            per_round.append(max(ts))
    return {"times": per_round, "ok_rounds": len(per_round)}


def run_gloo(args, logs: pathlib.Path) -> dict:
    port = free_port()
    results = run_workers("gloo", args, [_Plain()] * args.peers,
                          lambda i, procs: ["--rank", str(i), "--port", str(port)], logs)
    per_round = [max(res["times"][r] for res in results) for r in range(args.rounds)]
    return {"times": per_round}


class _Plain:
    """A loopback 'host': no namespace."""

    ip = "127.0.0.1"

    def prefix(self) -> list[str]:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["driver", "hivemind", "gloo"], default="driver")
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--mode", choices=["exact", "approx"], default="exact")
    parser.add_argument("--result-density", type=float, default=None,
                        help="owners send only this fraction of their span's average (global top-k)")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--period", type=float, default=None, help="seconds between round starts")
    parser.add_argument("--netns", action="store_true")
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--skip", default="", help="comma list of systems to skip: swarmnode,hivemind,gloo")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    # worker-only
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--join", action="append", default=[])
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.period is None:
        args.period = 12.0 if args.netns else 5.0
    if args.role == "hivemind":
        return hivemind_worker(args)
    if args.role == "gloo":
        return gloo_worker(args)

    skip = set(args.skip.split(",")) - {""}
    report = {"size": args.size, "density": args.density, "mode": args.mode, "result_density": args.result_density,
              "peers": args.peers, "rounds": args.rounds,
              "netns": args.netns, "rate_mbit": args.rate_mbit if args.netns else None}
    with tempfile.TemporaryDirectory(prefix="bench-ar-") as tmp:
        if args.netns:
            from netns_testbed import testbed

            ctx = testbed(args.peers, args.rate_mbit)
        else:
            import contextlib

            ctx = contextlib.nullcontext([_Plain()] * args.peers)
        with ctx as hosts:
            if "swarmnode" not in skip:
                report["swarmnode"] = run_swarmnode(args, hosts, pathlib.Path(tmp))
            if "hivemind" not in skip:
                report["hivemind"] = run_hivemind(args, hosts, pathlib.Path(tmp))
        if "gloo" not in skip and not args.netns:
            report["gloo"] = run_gloo(args, pathlib.Path(tmp))

    dense_bytes = 2 * (args.peers - 1) / args.peers * 4 * args.size
    med = {k: statistics.median(v["times"]) for k, v in report.items() if isinstance(v, dict) and v.get("times")}
    where = f"{args.peers} peers in network namespaces, egress {args.rate_mbit:g} Mbit/s" if args.netns else \
        f"{args.peers} peers on loopback"
    print(f"all-reduce of {args.size:,} float32, {where}, median of {args.rounds} rounds (cpu {os.cpu_count()} cores)")
    print(f"{'system':<58} {'round s':>9} {'rounds ok':>10}")
    gtopk = f", global top-k {args.result_density:.0%}" if args.result_density else ""
    for name, label in [("swarmnode", f"swarmnode top-k {args.density:.0%} ({args.mode}) + EF, fp16{gtopk}"),
                        ("hivemind", "hivemind DecentralizedAverager (dense)"), ("gloo", "torch.distributed gloo")]:
        if name in med:
            ok = report[name].get("ok_rounds", len(report[name]["times"]))
            print(f"{label:<58} {med[name]:9.3f} {ok:>7}/{args.rounds}")
    if "swarmnode" in med and "hivemind" in med:
        print(f"hivemind / swarmnode: {med['hivemind'] / med['swarmnode']:.1f}x")
    if "swarmnode" in med and "gloo" in med:
        print(f"swarmnode / gloo: {med['swarmnode'] / med['gloo']:.1f}x")
    if report.get("swarmnode", {}).get("sent_max"):
        sent = statistics.median(report["swarmnode"]["sent_max"])
        print(f"wire bytes sent per member: {sent:,.0f} vs dense fp32 butterfly {dense_bytes:,.0f} "
              f"= {sent / dense_bytes:.2%}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
