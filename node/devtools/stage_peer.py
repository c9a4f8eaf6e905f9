"""A standalone process hosting one replica of one pipeline stage, for the multi-process tests and demos.

    python -m node.devtools.stage_peer --shards DIR --stage 1 --out DIR [--join MADDR] [--pipeline ID] [--swarm NAME]
        [--optimizer adamw --lr 1e-3 --density 0.01] [--take-over] [--stop-at backward:1:2]

It loads its stage from the signed shard directory (node/ml/splitter.py load_stage: manifest signature, then the
shard's size and sha256, then every tensor checked), or, when the shard file is not there, fetches it from the
pipeline's peers with protocol/transfer/shard_transfer.py fetch_shard (sha256-verified) first. It runs its own p2pd and
DHT node, serves every shard file of its directory to others (ShardServer), and hosts the stage with
node/jobs/pipeline/stage_host.py StageHost until SIGTERM.

--take-over: this process replaces a replica (typically the last one of its stage, killed): before serving, it
fetches the stage's latest state -- parameters and optimizer state at the last completed step -- from a
surviving replica or from a node holding a backup of it (every step end, one replica of each stage pushes its
state to a replica of the next stage: node/jobs/pipeline/trainer.py TrainerConfig.backup_every), the newest announced
first, verifies it (size bound, sha256, tensor names/shapes, parameter hash) and starts at that step. With no
state anywhere it exits non-zero unless --fresh-state allows starting from the shard's parameters.

JSON lines on stdout: ready (peer id, address, stage, step, parameter hash, where the state came from), frozen
(the fault hook fired), step (each end_step: committed micro-batches, parameter hash, ...), error (then exit 2),
done. Fault hook for tests: --stop-at forward:STEP[:N] | backward:STEP[:N] | end_step:STEP SIGSTOPs the process
just before it serves the N-th (default first) such request of STEP, for the test to SIGKILL it exactly there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import sys
import time

from hivemind.dht.node import DHTNode

from node.devtools.reduce_peer import PeerProcess
from node.jobs.pipeline.stage_config import StageConfig, StageHooks
from node.jobs.pipeline.stage_host import StageHost
from node.jobs.pipeline.stage_state import Refused, fetch_state, holders
from node.ml.splitter import load_stage, read_manifest, stage_from_bytes
from node.runtime.p2pd import OwnedP2PDaemon
from protocol.pipeline.control import EndStepReply, pipe_protocol
from protocol.transfer.shard_transfer import ShardServer, fetch_shard, shard_protocol
from protocol.transfer.shards import ShardError


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def parse_stop_at(spec: str | None) -> tuple[str, int, int] | None:
    """"backward:1:2" -> ("backward", 1, 2): the 2nd backward of step 1; the count defaults to 1."""
    if spec is None:
        return None
    parts = spec.split(":")
    if parts[0] not in ("forward", "backward", "end_step") or not 2 <= len(parts) <= 3 or not all(
            p.isdigit() for p in parts[1:]):
        raise argparse.ArgumentTypeError(f"--stop-at KIND:STEP[:N] with KIND forward|backward|end_step, got {spec!r}")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=pathlib.Path, required=True, help="the signed shard directory (manifest.msgpack)")
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--join", action="append", default=[])
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--swarm", default="swarmnode")
    p.add_argument("--pipeline", default="pipe")
    p.add_argument("--trusted-signer", action="append", default=None, help="accept manifests signed by this peer only")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--value-codec", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--wire-dtype", default=None)
    p.add_argument("--throughput", type=float, default=1.0)
    p.add_argument("--heartbeat", type=float, default=2.0)
    p.add_argument("--ttl", type=float, default=6.0)
    p.add_argument("--matchmaking-time", type=float, default=3.0)
    p.add_argument("--part-timeout", type=float, default=10.0)
    p.add_argument("--result-timeout", type=float, default=20.0)
    p.add_argument("--take-over", action="store_true", help="fetch the stage's latest state before serving")
    p.add_argument("--fresh-state", action="store_true", help="with --take-over: start from the shard if no state")
    p.add_argument("--state-wait", type=float, default=60.0, help="seconds to wait for a shard or state holder")
    p.add_argument("--stop-at", type=parse_stop_at, default=None)
    return p.parse_args(argv)


async def wait_holders(dht, args, stages, me: str, what: str) -> list[tuple[int, str]]:
    deadline = time.monotonic() + args.state_wait
    while True:
        found = [(s, p) for s, p in await holders(dht, args.swarm, args.pipeline, stages) if p != me]
        if found or time.monotonic() > deadline:
            if not found:
                raise Refused(f"no peer announced {what} within {args.state_wait:g} s")
            return found
        await asyncio.sleep(0.25)


async def main(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(args.shards, trusted_signers=args.trusted_signer)
    if not 0 <= args.stage < len(manifest.shards):
        raise ShardError(f"--stage {args.stage}: the manifest has stages 0..{len(manifest.shards) - 1}")
    info = manifest.shards[args.stage]
    stage = load_stage(args.shards, args.stage, trusted_signers=args.trusted_signer) if (
        args.shards / info.file).exists() else None  # a corrupt shard is refused here, before any p2pd starts
    daemon, dht, server, host = OwnedP2PDaemon(), None, None, None
    try:
        p2p = await daemon.start(identity_path=None, host_maddrs=[args.listen], bootstrap=args.join)
        dht = await DHTNode.create(p2p=p2p, initial_peers=args.join or None, ensure_bootstrap_success=bool(args.join))
        me = p2p.peer_id.to_base58()
        t0 = time.monotonic()
        if stage is None:
            peers = await wait_holders(dht, args, range(len(manifest.shards)), me, "any stage")
            await fetch_shard(p2p, [p for _, p in peers], info, args.shards / info.file,
                              protocol_name=shard_protocol(args.swarm))
            stage = stage_from_bytes(manifest, args.stage, (args.shards / info.file).read_bytes(),
                                     trusted_signers=args.trusted_signer)
        config = StageConfig(swarm=args.swarm, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                             weight_decay=args.weight_decay, density=args.density, value_codec=args.value_codec,
                             wire_dtype=args.wire_dtype, throughput=args.throughput, heartbeat=args.heartbeat,
                             ttl=args.ttl, matchmaking_time=args.matchmaking_time, part_timeout=args.part_timeout,
                             result_timeout=args.result_timeout)

        async def before(kind: str, step: int, n: int) -> None:
            if args.stop_at == (kind, step, n):
                emit(event="frozen", at=kind, step=step, n=n, pid=os.getpid())
                os.kill(os.getpid(), signal.SIGSTOP)  # frozen mid-step; the test SIGKILLs us here

        def after_step(r: EndStepReply) -> None:
            emit(event="step", step=r.step, applied=r.applied, weight=r.weight, committed=r.committed,
                 discarded=r.discarded, members=r.members, hash=r.params_hash, backup_ok=r.backup_ok, error=r.error)

        host = StageHost(p2p, dht, args.pipeline, args.stage, stage, config, StageHooks(before, after_step), manifest)
        state_from = None
        if args.take_over:
            try:
                peers = await wait_holders(dht, args, [args.stage], me, f"the state of stage {args.stage}")
                head, data = await fetch_state(p2p, [p for _, p in peers],
                                               pipe_protocol(args.swarm, args.pipeline, "state"), args.stage,
                                               host.state_bound(), timeout=10.0)
                host.load_state(head, data)
                state_from = [p for _, p in peers]
            except Refused as e:
                if not args.fresh_state:
                    raise
                emit(event="warning", warning=f"starting from the shard's parameters: {e}")
        local = {i.sha256: args.shards / i.file for i in manifest.shards}
        server = ShardServer(p2p, shard_protocol(args.swarm), lambda sha: local.get(sha) if sha in local and
                             local[sha].exists() else None)
        await server.start()
        await host.start()
        emit(event="ready", peer_id=me, addr=str((await p2p.get_visible_maddrs())[0]), pid=os.getpid(),
             stage=args.stage, step=host.step, hash=host.params_hash, state_from=state_from,
             setup_s=round(time.monotonic() - t0, 3))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        return 0
    finally:
        if host is not None:
            await host.stop()
        if server is not None:
            await server.stop()
        if dht is not None:
            await dht.shutdown()
        await daemon.stop()
        emit(event="done")


class StagePeerProcess(PeerProcess):
    """Launch ``python -m node.devtools.stage_peer`` (from the repository root) in its own process group and follow its
    JSON events (PeerProcess's start, event reader, wait_event and stop)."""

    def __init__(self, out: pathlib.Path, args: list[str], prefix: list[str] | None = None):
        super().__init__(out, args, prefix, module="node.devtools.stage_peer",
                         cwd=pathlib.Path(__file__).resolve().parents[2])  # the repository root

    def steps(self) -> dict[int, dict]:
        with self._lock:
            return {e["step"]: e for e in self.events if e["event"] == "step"}


def run(argv=None) -> int:
    import logging

    logging.basicConfig(level=os.environ.get("SWARMNODE_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(main(parse_args(argv)))
    except (ShardError, Refused, OSError) as e:  # a refused manifest/shard/state, an unreadable directory
        emit(event="error", error=str(e))
        print(f"stage_peer: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
