"""Round time and bytes of a 4-member federated job with 0, 1 and 2 members behind NATs (relayed), on the NAT
testbed at 100 Mbit/s, in one run; and the relays' own traffic.

    sudo .venv/bin/python scripts/bench_nat.py                   # the README's table (about 6 minutes)
    sudo .venv/bin/python scripts/bench_nat.py --density 1.0 --json docs/bench_nat_dense.json   # dense parts
    .venv/bin/python scripts/bench_nat.py --hop 256        # the relay hop alone: one stream, direct vs relayed

Each case builds scripts/nat_testbed.py with 4 - k public hosts and k home hosts (each home behind its own
masquerading router with no inbound port; tc tbf at --rate-mbit on every leg), starts real nodes (`swarmnode run`
in each namespace; the home nodes find out they are private and reserve relays with the public ones), submits one
job (digits, an MLP of --hidden units x --layers, top-k --density, every node a member) and follows it. With k >= 1
it runs twice: relayed members owning no span of the all-reduce (relayed_span_share 0, the default, as hivemind's
client-mode peers) and owning a full one (share 1), to measure which is faster.

Figures per case: median wall time per round (between successive round completions seen by the first node), the
all-reduce bytes the first node exchanged in its last round, and the bytes the public nodes relayed per round
(their relay service's counter, read from `swarmnode status`, before and after the job).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from node.devtools.localswarm import NodeProcess, wait_for  # noqa: E402
from node.ml.datasets import write_node_data  # noqa: E402
from scripts.nat_testbed import missing, nat_testbed  # noqa: E402

NODE_ARGS = ["--heartbeat", "2", "--ttl", "8", "--benchmark-seconds", "0.05"]


def job_toml(args) -> str:
    return f"""
name = "nat-bench"
dataset = "digits"
task = "classification"
rounds = {args.rounds}
local_steps = 5
batch_size = 32
density = {args.density}
min_participants = 4
round_timeout_s = 60
[model]
arch = "mlp"
hidden = {args.hidden}
layers = {args.layers}
[inner]
kind = "sgd"
lr = 0.05
momentum = 0.9
"""


def relayed_bytes(nodes) -> int:
    total = 0
    for n in nodes:
        with n.client() as client:
            total += client.status().relay.bytes_relayed
    return total


def run_case(root: pathlib.Path, k: int, share: float, args) -> dict:
    with nat_testbed(4 - k, k, rate_mbit=args.rate_mbit) as (public, homes):
        hosts = public + homes
        nodes: list[NodeProcess] = []
        try:
            for i, host in enumerate(hosts):
                data = root / f"data{i}"
                write_node_data("digits", data / "digits", n_nodes=4, node_index=i, seed=0)
                extra = ["--join", nodes[0].addr] if nodes else []
                n = NodeProcess(root / f"k{k}-s{share}-{i}", [*NODE_ARGS, "--listen", f"/ip4/{host.ip}/tcp/0",
                                                                "--swarm", "bench", "--data", str(data), *extra],
                                env=dict(os.environ, SWARMNODE_RELAYED_SPAN_SHARE=str(share)), prefix=host.prefix())
                nodes.append(n.start())
                if i == 0:
                    n.wait_ready(90)
            for n in nodes:
                n.wait_ready(90)
            ids = {n.peer_id for n in nodes}
            wait_for(lambda: nodes[0].peer_ids() == ids, 90, "all four nodes listed")
            if k:
                def relays_known() -> bool:
                    with nodes[0].client() as c:
                        return all(p.relays for p in c.peers().peers if p.reachability == "private") and \
                            sum(p.reachability == "private" for p in c.peers().peers) == k
                wait_for(relays_known, 90, "the home nodes' relays in their records")
            before = relayed_bytes(nodes[:4 - k])
            with nodes[0].client() as client:
                job_id = client.submit(job_toml(args), "nat-bench.toml").job_id
            seen: dict[int, float] = {}
            final = None
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with nodes[0].client() as client:
                    info = next(client.job(job_id))
                seen.setdefault(info.round, time.monotonic())
                if info.state in ("done", "failed", "cancelled"):
                    final = info
                    break
                time.sleep(0.05)
            if final is None or final.state != "done":
                raise SystemExit(f"case k={k} share={share}: the job did not finish ({final and final.state})")
            rounds = sorted(r for r in seen if r >= 1)
            per_round = [seen[b] - seen[a] for a, b in zip(rounds, rounds[1:])]
            relayed = relayed_bytes(nodes[:4 - k]) - before
            return {"relayed_members": k, "relayed_span_share": share if k else None,
                    "round_s_median": statistics.median(per_round) if per_round else float("nan"),
                    "allreduce_bytes_last_round": final.bytes_exchanged, "relay_bytes_per_round":
                    relayed / max(1, final.round), "eval": final.eval_metric, "rounds": final.round}
        finally:
            for n in nodes:
                n.stop()


async def relay_hop(total_mb: int, frame_kib: int = 1024) -> dict:
    """Throughput of one stream on loopback, direct and through a relay (real p2pd daemons, the relay's copy and
    both ends' sealing included): what the relay's hop costs per byte, with no link limit in the way."""
    import logging

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from node.runtime.identity import write_p2p_identity
    from node.runtime.p2pd import OwnedP2PDaemon
    from protocol.records.peer_keys import peer_id_of
    from protocol.relay.circuits import RelayNames, RelayService
    from protocol.relay.routes import RelayRouter
    from protocol.streams import open_stream, serve_on

    log = logging.getLogger("bench")
    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    ids = [peer_id_of(k.public_key()) for k in keys]
    names, daemons, p2ps = RelayNames("bench"), [], []
    frame, frames = bytes(frame_kib * 1024), total_mb * 1024 // frame_kib
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i in range(3):  # 0 relay, 1 target, 2 origin
                path = pathlib.Path(tmp) / f"{i}.key"
                write_p2p_identity(keys[i], path)
                boot = [f"{(await p2ps[0].get_visible_maddrs())[0]}/p2p/{ids[0]}"] if i else []
                daemon = OwnedP2PDaemon()
                p2ps.append(await daemon.start(identity_path=str(path), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                               bootstrap=boot))
                daemons.append(daemon)
            service = RelayService(ids[0], p2ps[0].raw_stream, names)
            await serve_on(p2ps[0], service.handlers(), log)

            async def sink(stream) -> None:
                for _ in range(frames):
                    await stream.receive(len(frame) + 16, 60.0)
                await stream.send(b"done")

            await serve_on(p2ps[1], {"swarmnode/bench/sink": sink}, log)
            routers = [RelayRouter(ids[i], keys[i], names, p2ps[i].raw_stream, p2ps[i].stream_handlers.get)
                       for i in (1, 2)]
            await p2ps[1].add_binary_stream_handler(names.stop, routers[0].on_stop)
            await routers[0].reserve(ids[0])
            routers[0].relays = (ids[0],)
            out = {}
            for route in ("direct", "relayed", "direct", "relayed"):  # interleaved, the second pass counts
                p2ps[2].router = routers[1] if route == "relayed" else None
                routers[1].set_routes({ids[1]: (ids[0],)} if route == "relayed" else {})
                start = time.perf_counter()
                async with open_stream(p2ps[2], ids[1], "swarmnode/bench/sink") as stream:
                    for _ in range(frames):
                        await stream.send(frame)
                    assert await stream.receive(16, 60.0) == b"done"
                out[route] = total_mb * 2**20 / (time.perf_counter() - start)
            out["relay_s_per_byte"] = 1 / out["relayed"] - 1 / out["direct"]
            out["relayed_bytes_counted"] = service.stats.bytes_relayed
            return out
        finally:
            for daemon in reversed(daemons):
                await daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    parser.add_argument("--hop", type=int, metavar="MB", help="only the relay hop on loopback: MB through one stream, "
                        "direct and relayed (no root needed)")
    args = parser.parse_args()
    if args.hop:
        import asyncio

        hop = asyncio.run(relay_hop(args.hop))
        print(f"{args.hop} MB in 1 MiB frames on loopback: direct {hop['direct'] / 2**20:.1f} MiB/s, relayed "
              f"{hop['relayed'] / 2**20:.1f} MiB/s ({hop['direct'] / hop['relayed']:.2f}x the time); the hop costs "
              f"{hop['relay_s_per_byte']:.2e} s per byte")
        if args.json:
            args.json.write_text(json.dumps(hop, indent=1))
        return
    reason = missing()
    if reason:
        raise SystemExit(f"cannot build the NAT testbed: {reason}")
    cases = [(0, 0.0), (1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-nat-") as tmp:
        for k, share in cases:
            row = run_case(pathlib.Path(tmp), k, share, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]["round_s_median"]
    print(f"\n{args.hidden}x{args.layers} MLP, density {args.density}, {args.rate_mbit:g} Mbit/s, {args.rounds} rounds")
    print("relayed | span share | s/round | x no NAT | all-reduce B/round (node 0) | relayed B/round | eval")
    for r in rows:
        share = "-" if r["relayed_span_share"] is None else f"{r['relayed_span_share']:g}"
        print(f"{r['relayed_members']}/4 | {share} | {r['round_s_median']:.3f} | {r['round_s_median'] / base:.2f} | "
              f"{r['allreduce_bytes_last_round']:,} | {r['relay_bytes_per_round']:,.0f} | {r['eval']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
