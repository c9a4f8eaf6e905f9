"""Round time and wire bytes of swarmnode's top-k all-reduce vs hivemind and torch gloo, side by side in one run.

    .venv/bin/python scripts/bench_allreduce.py                      # loopback, 4 peers, 10M params
    .venv/bin/python scripts/bench_allreduce.py --netns --rate-mbit 100   # each peer in its own namespace
    .venv/bin/python scripts/bench_allreduce.py --size 1000000 --rounds 3  # quicker
    .venv/bin/python scripts/bench_allreduce.py --mode approx --values int2,fp16 --json out.json  # issue 17

Each system runs 4 peers as separate processes averaging a (size,) float32 vector and reports the median
over rounds of the slowest member's time (rows, names as --skip takes them; a --skip entry drops the rows
named so or starting with it and "-": "hivemind" drops every hivemind row):
  swarmnode-<codec>  node/devtools/reduce_peer.py, top-k at --density with error feedback, values (parts
             and owners' results) in each --values codec (reduce_peer --value-codec/--result-value-codec),
             expected group 4 (matchmaking ends once all 4 declared); time = step(), including matchmaking
             and the top-k selection, which runs in a thread while matchmaking goes on
  hivemind-dense / -fp16 / -8bit  hivemind.averaging.DecentralizedAverager with compression=NoCompression(),
             Float16Compression(), Uniform8BitQuantization(); target_group_size 4; time = step(), including
             hivemind's matchmaking (min_matchmaking_time 2 s, ends once the group of 4 is full); -8bit runs
             with patch_hivemind_8bit() (hivemind 1.1.12's 8-bit decoder fails under numpy 2.4: see there);
             "rel.err": the largest relative L2 error of a member's result vs the exact mean over the rounds
  hivemind-powersgd  hivemind.optim.power_sgd_averager.PowerSGDGradientAverager, rank --powersgd-rank, over
             one parameter whose gradient is the vector viewed as a matrix (10M: 3125 x 3200; PowerSGD leaves
             1-D tensors uncompressed); fresh gradient + accumulate_grads_(1) per round, time = step()
  gloo-dense torch.distributed all_reduce (SUM) over gloo tcp; time = all_reduce (after a barrier); with
             --netns the gloo ranks run in the namespaces too (GLOO_SOCKET_IFNAME=eth0, rank 0 the tcp store)
  gloo-ddp-powersgd  torch DDP of nn.Linear(3200, 3125, bias=False) (10M weights) with the
             ddp_comm_hooks.powerSGD_hook (rank --powersgd-rank, start_powerSGD_iter 2, error feedback and
             warm start on, 3 warm-up iterations); time = loss.backward() incl. the hooked all-reduce
swarmnode, hivemind: one round every --period seconds (all peers start round r at start_at + r * period);
gloo: rounds back to back, each after a barrier.
Bytes sent per member per round ("sent MB"): swarmnode: frames its round wrote as reduce_peer reports them
(headers included; libp2p/TLS framing and DHT traffic not); hivemind and gloo: from each wire format's size
formula (butterfly / ring: 2 (n-1)/n of the vector; hivemind parts of 2**19 compressed bytes, an 8-bit part
carries a 1032-byte codebook; PowerSGD: the P (m x r) and Q (n x r) fp32 factors; DDP: the hook's own count
of compressed elements). With --netns every row also gets "eth0 MB": bytes its namespace's eth0 sent per
round (IP/TCP/TLS headers, DHT traffic and stragglers included; total over the rounds / rounds).
Link-time lower bound = sent bytes per member / link rate (--netns only; "-" on loopback), and round / bound.
With --netns the peers run in the namespaces of scripts/netns_testbed.py, egress capped by tbf (needs root).
Issue #3 targets: bytes <= 2.5% of dense; loopback time <= 1/4 of hivemind's; capped: >= 20x faster.
Issue #17 targets: hivemind-8bit / ours >= 5 at 100 Mbit/s; on loopback ours <= 2x gloo-dense (10M, 1%).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

HIVEMIND_CONFIGS = ("dense", "fp16", "8bit", "powersgd")
HIVEMIND_PART_BYTES = 2**19  # hivemind.averaging.partition.DEFAULT_PART_SIZE_BYTES (after compression)
HIVEMIND_8BIT_OVERHEAD = 8 + 256 * 4  # Quantization.compress: int64 codebook length + 256 float32 codebook


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matrix_shape(size: int) -> tuple[int, int]:
    """(m, n), m <= n, m * n = size, m the largest divisor of size up to sqrt(size): 10M -> (2500, 4000)."""
    m = max(d for d in range(1, int(size**0.5) + 1) if size % d == 0)
    return m, size // m


def tx_bytes(pid: int | str = "self", dev: str = "eth0", netns: bool = True) -> int | None:
    """Bytes ``dev`` of the network namespace of process ``pid`` has sent (None: not --netns, or no such device)."""
    if not netns:  # on loopback the peers share the root namespace: its eth0 is the machine's, not a member's
        return None
    try:
        lines = pathlib.Path(f"/proc/{pid}/net/dev").read_text().splitlines()
    except OSError:
        return None
    for line in lines[2:]:
        name, _, fields = line.partition(":")
        if name.strip() == dev:
            return int(fields.split()[8])
    return None


# ---- worker roles (run as subprocesses of this script) -------------------------------------------------


def patch_hivemind_8bit() -> None:
    """hivemind 1.1.12's Quantization.extract does int(np.frombuffer(buffer, count=1)), which numpy >= 2.4 refuses
    (TypeError: only 0-dimensional arrays ...): every 8-bit part then fails to decode on its receiver, hivemind drops
    those senders, and step() still returns with each member's own vector (measured: 1/4 of the bytes, error sqrt(3)
    vs the exact mean). The same function with the length read as [0], set before the averager forks."""
    import numpy as np
    import torch
    from hivemind.compression.quantization import Quantization

    def extract(self, serialized_tensor):
        buffer = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)

    Quantization.extract = extract


def hivemind_worker(args) -> None:
    import hivemind
    import torch
    from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

    patch_hivemind_8bit()

    dht = hivemind.DHT(initial_peers=args.join or None, host_maddrs=[f"/ip4/{args.ip}/tcp/0"], start=True)
    print(json.dumps({"event": "ready", "addr": str(dht.get_visible_maddrs()[0])}), flush=True)
    common = dict(dht=dht, start=True, prefix=f"bench-{args.config}", target_group_size=args.peers,
                  min_group_size=args.peers, min_matchmaking_time=2.0, request_timeout=2.0, allreduce_timeout=120.0,
                  next_chunk_timeout=30.0, sender_timeout=30.0, reducer_timeout=60.0)  # shaped links: slow, not dead
    if args.config == "powersgd":
        from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

        param = torch.nn.Parameter(torch.zeros(matrix_shape(args.size)))  # (m, n) float32
        param.grad = torch.zeros_like(param)
        averager = PowerSGDGradientAverager([param], args.powersgd_rank, warn=False, **common)
        if averager._uncompressed_gradients_indexes:
            raise SystemExit(f"PowerSGD left the {tuple(param.shape)} gradient uncompressed")
    else:
        compression = {"dense": NoCompression, "fp16": Float16Compression, "8bit": Uniform8BitQuantization}
        averager = hivemind.averaging.DecentralizedAverager([torch.zeros(args.size)],  # (size,) float32
                                                            compression=compression[args.config](), **common)
    times, errors, tx0, netns = [], [], None, args.ip != "127.0.0.1"

    def vector(seed: int, r: int) -> torch.Tensor:  # (size,) float32: member seed's vector in round r
        return torch.randn(args.size, generator=torch.Generator().manual_seed(seed * 100_003 + r))

    for r in range(args.rounds):
        fresh = vector(args.seed, r)  # this round's vector, made before the round starts
        if args.config == "powersgd":
            param.grad.copy_(fresh.view(param.shape))
            averager.accumulate_grads_(batch_size=1)
        else:
            with averager.get_tensors() as tensors:
                tensors[0].copy_(fresh)
        delay = args.start_at + r * args.period - time.time()
        if delay > 0:
            time.sleep(delay)
        tx0 = tx_bytes(netns=netns) if tx0 is None else tx0
        t0 = time.perf_counter()
        try:
            ok = averager.step(timeout=args.period * 2)
        except Exception as e:  # hivemind raises AllreduceException when no group formed
            print(f"round {r} failed: {e}", file=sys.stderr, flush=True)
            ok = False
        times.append(time.perf_counter() - t0 if ok else None)
        if ok and args.config != "powersgd":  # what the round delivered vs the exact mean (outside the timing)
            exact = sum(vector(seed, r) for seed in range(args.peers)) / args.peers
            with averager.get_tensors() as tensors:
                errors.append(float((tensors[0] - exact).norm() / exact.norm()))
        print(f"round {r}: {times[-1]} rel.err {errors[-1:]}", file=sys.stderr, flush=True)
    time.sleep(1.0)  # stragglers: what the others still fetch from this member
    tx1 = tx_bytes(netns=netns)
    print(json.dumps({"event": "done", "times": times, "rel_err": errors, "tx": None if tx0 is None else tx1 - tx0}),
          flush=True)
    averager.shutdown()
    dht.shutdown()


def gloo_worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=args.rank,
                            world_size=args.peers)
    times, warmup, numel, tx0, netns = [], 1, None, None, args.ip != "127.0.0.1"
    if args.config == "ddp-powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
        from torch.nn.parallel import DistributedDataParallel

        torch.manual_seed(args.seed)
        m, n = matrix_shape(args.size)
        model = DistributedDataParallel(torch.nn.Linear(n, m, bias=False))  # weight (m, n) float32
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd_rank,
                                            start_powerSGD_iter=2)  # the lowest DDP allows with error feedback
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        warmup = 3  # iterations 0-1 are vanilla all-reduce, then buckets are rebuilt
        for i in range(warmup + args.rounds):
            if i == warmup:
                numel, tx0 = state.compression_stats()[2], tx_bytes(netns=netns)
            model.zero_grad()
            loss = model(torch.randn(8, n)).square().mean()  # forward outside the timed region
            dist.barrier()
            t0 = time.perf_counter()
            loss.backward()  # the hook all-reduces P and Q before backward returns
            times.append(time.perf_counter() - t0)
        numel = (state.compression_stats()[2] - numel) / args.rounds  # elements all-reduced per round
    else:
        tensor = torch.randn(args.size)  # (size,) float32
        for i in range(warmup + args.rounds):
            tx0 = tx_bytes(netns=netns) if i == warmup else tx0
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - t0)
    dist.barrier()
    tx1 = tx_bytes(netns=netns)
    dist.destroy_process_group()
    print(json.dumps({"event": "done", "times": times[warmup:], "numel": numel,  # first calls set up connections
                      "tx": None if tx0 is None else tx1 - tx0}), flush=True)


# ---- drivers ---------------------------------------------------------------------------------------------


def run_swarmnode(args, codec: str, hosts, out: pathlib.Path) -> dict:
    from node.devtools.reduce_peer import PeerProcess

    out.mkdir(parents=True, exist_ok=True)
    go = out / "start_at"  # written once every peer is ready: round 0 never races start-up
    common = ["--size", str(args.size), "--density", str(args.density), "--rounds", str(args.rounds),
              "--period", str(args.period), "--start-at", f"file:{go}", "--expected-group", str(args.peers),
              "--matchmaking-time", "3", "--part-timeout", "20", "--result-timeout", "40", "--commit-timeout", "5",
              "--mode", args.mode, *(["--result-density", str(args.result_density)] if args.result_density else []),
              "--value-codec", codec, "--result-value-codec", codec,
              "--bandwidth", str(args.rate_mbit * 1e6 / 8 if args.netns else 1e9)]
    procs, tx = [], {}
    try:
        for i, host in enumerate(hosts):
            listen = f"/ip4/{host.ip}/tcp/0"
            join = ["--join", procs[0].wait_event(60, "ready", event="ready")["addr"]] if procs else []
            procs.append(PeerProcess(out / f"sn{i}", [*common, "--seed", str(i), "--listen", listen, *join],
                                     prefix=host.prefix()).start())
        for p in procs:
            p.wait_event(120, "ready", event="ready")
        start_at = time.time() + 2.0
        go.write_text(str(start_at))
        sampler = threading.Timer(1.9, lambda: tx.update(before=[tx_bytes(p.proc.pid, netns=args.netns)
                                                                  for p in procs]))
        sampler.start()  # each namespace's eth0 counter just before round 0
        for p in procs:
            p.wait_event(args.rounds * args.period + 120, "done", event="done")
        time.sleep(1.0)  # stragglers
        sampler.join()
        after = [tx_bytes(p.proc.pid, netns=args.netns) for p in procs]
        rounds = [p.rounds() for p in procs]
    finally:
        for p in procs:
            p.stop()
    per_round, sent, matchmaking, phases = [], [], [], []
    for r in range(args.rounds):
        events = [peer[r] for peer in rounds]
        if not all(e["ok"] for e in events):
            continue
        assert len({e["hash"] for e in events}) == 1, "bit-identity violated"
        per_round.append(max(e["round_s"] for e in events))
        sent.append(max(e["sent"] for e in events))
        matchmaking.append(max((e.get("phases") or {}).get("matchmaking", float("nan")) for e in events))
        phases.append({k: max((e.get("phases") or {}).get(k, float("nan")) for e in events)
                       for k in ("matchmaking", "butterfly", "commit")}
                      | {"select": max((e.get("select_s") or 0.0) for e in events)})
    result = {"times": per_round, "sent_max": sent, "ok_rounds": len(per_round), "matchmaking_s": matchmaking,
              "phases": phases}  # per round, each phase's slowest member (select: in a thread, under matchmaking)
    if None not in after and None not in tx.get("before", [None]):
        result["tx"] = max(a - b for a, b in zip(after, tx["before"])) / args.rounds
    return result


def run_workers(role: str, args, hosts, extra, logs: pathlib.Path, env=None) -> list[dict]:
    procs = []
    try:
        for i, host in enumerate(hosts):
            cmd = [*host.prefix(), sys.executable, __file__, "--role", role, "--size", str(args.size), "--rounds",
                   str(args.rounds), "--period", str(args.period), "--peers", str(args.peers), "--seed", str(i),
                   "--ip", host.ip, "--powersgd-rank", str(args.powersgd_rank), *extra(i, procs)]
            with open(logs / f"{role}{i}.log", "w") as err:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                              env=None if env is None else {**os.environ, **env}))
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


def tx_per_round(results: list[dict], rounds: int) -> float | None:
    txs = [res.get("tx") for res in results]
    return None if None in txs else max(txs) / rounds


def run_hivemind(args, config: str, hosts, logs: pathlib.Path) -> dict:
    start_at = time.time() + 15.0
    first_addr: list[str] = []

    def extra(i, procs):
        common = ["--start-at", str(start_at), "--config", config]
        if i == 0:
            return common
        if not first_addr:
            first_addr.append(json.loads(procs[0].stdout.readline())["addr"])
        return [*common, "--join", first_addr[0]]

    results = run_workers("hivemind", args, hosts, extra, logs)
    per_round = []
    for r in range(args.rounds):
        ts = [res["times"][r] for res in results]
        if all(t is not None for t in ts):
            per_round.append(max(ts))
    errors = [e for res in results for e in res.get("rel_err", [])]
    return {"times": per_round, "ok_rounds": len(per_round), "tx": tx_per_round(results, args.rounds),
            "rel_err": max(errors) if errors else None}


def run_gloo(args, config: str, hosts, logs: pathlib.Path) -> dict:
    port = free_port()  # on loopback; in a fresh namespace any port is free
    env = {"GLOO_SOCKET_IFNAME": "eth0"} if args.netns else None
    results = run_workers("gloo", args, hosts, lambda i, procs: ["--rank", str(i), "--port", str(port), "--master",
                                                                 hosts[0].ip, "--config", config], logs, env)
    per_round = [max(res["times"][r] for res in results) for r in range(args.rounds)]
    return {"times": per_round, "numel": results[0].get("numel"), "tx": tx_per_round(results, args.rounds)}


class _Plain:
    """A loopback 'host': no namespace."""

    ip = "127.0.0.1"

    def prefix(self) -> list[str]:
        return []


# ---- rows: what each system sends, and the table ----------------------------------------------------------


def butterfly(n: int, nbytes: float) -> float:
    """Bytes a member sends in a reduce-scatter + all-gather (butterfly or ring) of an nbytes vector."""
    return 2 * (n - 1) / n * nbytes


def hivemind_sent(args, config: str) -> float:
    if config == "powersgd":
        m, n = matrix_shape(args.size)
        return butterfly(args.peers, 4 * (m + n) * args.powersgd_rank)  # P then Q, fp32, no compression
    bytes_per_value, overhead = {"dense": (4, 0), "fp16": (2, 0), "8bit": (1, HIVEMIND_8BIT_OVERHEAD)}[config]
    parts = -(-args.size // (HIVEMIND_PART_BYTES // bytes_per_value))
    return butterfly(args.peers, args.size * bytes_per_value + parts * overhead)


def describe(args, name: str) -> tuple[str, str]:
    m, n = matrix_shape(args.size)
    gtopk = f", global top-k {args.result_density:.0%}" if args.result_density else ""
    if name.startswith("swarmnode-"):
        codec = name.split("-", 1)[1]
        return "swarmnode", f"top-k {args.density:.0%} {args.mode} + EF, {codec} parts+results{gtopk}"
    return {"hivemind-dense": ("hivemind Averager", "NoCompression (fp32)"),
            "hivemind-fp16": ("hivemind Averager", "Float16Compression"),
            "hivemind-8bit": ("hivemind Averager", "Uniform8BitQuantization"),
            "hivemind-powersgd": ("hivemind PowerSGDGradAvg", f"rank {args.powersgd_rank}, grad {m}x{n}"),
            "gloo-dense": ("torch gloo all_reduce", "dense fp32"),
            "gloo-ddp-powersgd": ("torch DDP gloo", f"powerSGD_hook rank {args.powersgd_rank}, {m}x{n}")}[name]


def make_row(args, name: str, res: dict) -> dict:
    system, config = describe(args, name)
    row = {"name": name, "system": system, "config": config, **res}
    if name.startswith("swarmnode-") and res.get("sent_max"):
        row["sent"], row["sent_source"] = statistics.median(res["sent_max"]), "reported"
    elif name.startswith("hivemind-"):
        row["sent"], row["sent_source"] = hivemind_sent(args, name.split("-", 1)[1]), "formula"
    elif name == "gloo-dense":
        row["sent"], row["sent_source"] = butterfly(args.peers, 4 * args.size), "formula"
    elif name == "gloo-ddp-powersgd" and res.get("numel"):
        row["sent"], row["sent_source"] = butterfly(args.peers, 4 * res["numel"]), "formula"
    row["median_s"] = statistics.median(res["times"]) if res.get("times") else None
    if args.netns and row.get("sent") and row["median_s"]:
        row["bound_s"] = row["sent"] / (args.rate_mbit * 1e6 / 8)
        row["round_over_bound"] = row["median_s"] / row["bound_s"]
    return row


def print_table(args, rows: list[dict]) -> None:
    where = f"{args.peers} peers in network namespaces, egress {args.rate_mbit:g} Mbit/s" if args.netns else \
        f"{args.peers} peers on loopback"
    print(f"all-reduce of {args.size:,} float32, {where}, median of {args.rounds} rounds (cpu {os.cpu_count()} cores)")
    print(f"{'system':<25} {'configuration':<48} {'round s':>8} {'ok':>5} {'sent MB':>8} {'(how)':<9} "
          f"{'eth0 MB':>8} {'bound s':>8} {'rnd/bnd':>8} {'rel.err':>8}")

    def num(v, fmt):
        return f"{'-':>{fmt.split('.')[0]}}" if v is None else format(v, fmt)

    for row in rows:
        ok = f"{row.get('ok_rounds', len(row['times']))}/{args.rounds}"
        tx = row.get("tx") / 1e6 if row.get("tx") is not None else None
        sent = row["sent"] / 1e6 if row.get("sent") is not None else None
        print(f"{row['system']:<25} {row['config']:<48} {num(row['median_s'], '8.3f')} {ok:>5} "
              f"{num(sent, '8.3f')} {row.get('sent_source', '-'):<9} {num(tx, '8.3f')} "
              f"{num(row.get('bound_s'), '8.3f')} {num(row.get('round_over_bound'), '8.1f')} "
              f"{num(row.get('rel_err'), '8.4f')}")
    med = {row["name"]: row["median_s"] for row in rows if row["median_s"]}
    dense_bytes = butterfly(args.peers, 4 * args.size)
    for row in rows:
        ours = row["name"]
        if not ours.startswith("swarmnode-") or ours not in med:
            continue
        if "hivemind-8bit" in med:
            goal = " (issue 17 goal at 100 Mbit/s: >= 5x)" if args.netns else ""
            print(f"hivemind-8bit / {ours}: {med['hivemind-8bit'] / med[ours]:.1f}x{goal}")
        if "hivemind-dense" in med:
            print(f"hivemind-dense / {ours}: {med['hivemind-dense'] / med[ours]:.1f}x")
        if "gloo-dense" in med:
            goal = "" if args.netns else " (issue 17 goal on loopback: <= 2x)"
            print(f"{ours} / gloo-dense: {med[ours] / med['gloo-dense']:.1f}x{goal}")
        if row.get("sent"):
            print(f"{ours} wire bytes sent per member: {row['sent']:,.0f} vs dense fp32 butterfly "
                  f"{dense_bytes:,.0f} = {row['sent'] / dense_bytes:.2%}; matchmaking (slowest member) median "
                  f"{statistics.median(row['matchmaking_s']):.3f} s of the round; phases (slowest member, median): "
                  + ", ".join(f"{k} {statistics.median(p[k] for p in row['phases']):.3f} s"
                              for k in ("select", "matchmaking", "butterfly", "commit")))


def selected(names: list[str], skip: set[str]) -> list[str]:
    return [n for n in names if not any(n == s or n.startswith(s + "-") for s in skip)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["driver", "hivemind", "gloo"], default="driver")
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--mode", choices=["exact", "approx"], default="exact")
    parser.add_argument("--result-density", type=float, default=None,
                        help="owners send only this fraction of their span's average (global top-k)")
    parser.add_argument("--values", default="fp16",
                        help="comma list of swarmnode value codecs (fp16, int8, int4, int2), one row each")
    parser.add_argument("--powersgd-rank", type=int, default=4)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--period", type=float, default=None, help="seconds between round starts")
    parser.add_argument("--netns", action="store_true")
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--skip", default="", help="comma list of rows or families to skip: swarmnode, hivemind, "
                        "gloo, swarmnode-int2, hivemind-dense, hivemind-fp16, hivemind-8bit, hivemind-powersgd, "
                        "gloo-dense, gloo-ddp-powersgd")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    # worker-only
    parser.add_argument("--config", default="dense")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--join", action="append", default=[])
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--master", default="127.0.0.1")
    args = parser.parse_args()
    if args.period is None:
        args.period = 12.0 if args.netns else 5.0
    if args.role == "hivemind":
        return hivemind_worker(args)
    if args.role == "gloo":
        return gloo_worker(args)

    codecs = [c for c in args.values.split(",") if c]
    bad = set(codecs) - {"fp16", "int8", "int4", "int2"}
    if bad:
        parser.error(f"unknown --values codec(s): {', '.join(sorted(bad))}")
    names = selected([*(f"swarmnode-{c}" for c in codecs), *(f"hivemind-{c}" for c in HIVEMIND_CONFIGS),
                      "gloo-dense", "gloo-ddp-powersgd"], set(args.skip.split(",")) - {""})
    report = {"size": args.size, "density": args.density, "mode": args.mode, "result_density": args.result_density,
              "values": codecs, "powersgd_rank": args.powersgd_rank, "peers": args.peers, "rounds": args.rounds,
              "period": args.period, "netns": args.netns, "rate_mbit": args.rate_mbit if args.netns else None,
              "cpus": os.cpu_count()}
    results, errors = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-ar-") as tmp:
        if args.netns:
            from netns_testbed import testbed

            ctx = testbed(args.peers, args.rate_mbit)
        else:
            ctx = contextlib.nullcontext([_Plain()] * args.peers)
        with ctx as hosts:
            for name in names:
                family, config = name.split("-", 1)
                print(f"[{time.strftime('%H:%M:%S')}] running {name}", file=sys.stderr, flush=True)
                logs = pathlib.Path(tmp) / name
                logs.mkdir()
                try:
                    if family == "swarmnode":
                        results[name] = run_swarmnode(args, config, hosts, logs)
                    elif family == "hivemind":
                        results[name] = run_hivemind(args, config, hosts, logs)
                    else:
                        results[name] = run_gloo(args, config, hosts, logs)
                except Exception as e:  # one system failing must not lose the others' rows
                    errors[name] = f"{type(e).__name__}: {e}"
                    print(f"{name} failed: {errors[name]}", file=sys.stderr, flush=True)
    rows = [make_row(args, name, res) for name, res in results.items()]
    for old, new in [("swarmnode", f"swarmnode-{codecs[0]}" if codecs else ""), ("hivemind", "hivemind-dense"),
                     ("gloo", "gloo-dense")]:  # the keys of earlier versions of this report
        if new in results:
            report[old] = results[new]
    report["rows"], report["errors"] = rows, errors
    print_table(args, rows)
    for name, err in errors.items():
        print(f"{name}: FAILED, {err[:300]}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
