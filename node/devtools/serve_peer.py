"""A standalone process serving one replica of one stage of a served model, for the multi-process tests and the
serving benchmark.

    python -m node.devtools.serve_peer --shards DIR --stage 1 --out DIR [--join MADDR] [--serve ID] [--swarm NAME]

It loads its stage from the signed shard directory (node/ml/splitter.py load_stage: manifest signature, the shard's
size and sha256, every tensor checked), runs its own p2pd and DHT node and serves the stage with
node/serving/host.py InferenceHost until SIGTERM. JSON lines on stdout: ready (peer id, address, stage), done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal

from hivemind.dht.node import DHTNode

from node.ml.splitter import load_stage, read_manifest
from node.runtime.p2pd import OwnedP2PDaemon
from node.serving.host import HostConfig, InferenceHost
from protocol.transfer.shards import ShardError


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=pathlib.Path, required=True, help="the signed shard directory (manifest.msgpack)")
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--join", action="append", default=[])
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--swarm", default="swarmnode")
    p.add_argument("--serve", default="srv", help="the served model's id")
    p.add_argument("--trusted-signer", action="append", default=None, help="accept manifests signed by this peer only")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--session-ttl", type=float, default=120.0)
    p.add_argument("--ttl", type=float, default=6.0, help="the DHT record's lifetime (heartbeats every ttl / 3)")
    p.add_argument("--throughput", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


async def main(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    manifest = read_manifest(args.shards, trusted_signers=args.trusted_signer)
    if not 0 <= args.stage < len(manifest.shards):
        raise ShardError(f"--stage {args.stage}: the manifest has stages 0..{len(manifest.shards) - 1}")
    stage = load_stage(args.shards, args.stage, trusted_signers=args.trusted_signer)
    daemon, dht, host = OwnedP2PDaemon(), None, None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        p2p = await daemon.start(identity_path=None, host_maddrs=[args.listen], bootstrap=args.join)
        dht = await DHTNode.create(p2p=p2p, initial_peers=args.join or None, ensure_bootstrap_success=bool(args.join))
        config = HostConfig(swarm=args.swarm, max_tokens=args.max_tokens, max_sessions=args.max_sessions,
                            max_cached_tokens=args.max_sessions * args.max_tokens, session_ttl_s=args.session_ttl,
                            ttl=args.ttl, throughput=args.throughput)
        host = InferenceHost(p2p, dht, args.serve, args.stage, stage, config)
        await host.start()
        emit(event="ready", peer_id=host.me, addr=str((await p2p.get_visible_maddrs())[0]), stage=args.stage,
             pid=os.getpid())
        await stop.wait()
        emit(event="done", served=host.served)
        return 0
    finally:
        if host is not None:
            await host.stop()
        if dht is not None:
            await dht.shutdown()
        await daemon.stop()


if __name__ == "__main__":
    import logging
    import sys

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except (ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
