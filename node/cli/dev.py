"""``swarmnode dev-swarm``: N real nodes on loopback (node/devtools/localswarm.py), and the demo job that
``make demo`` runs on them.

    swarmnode dev-swarm --nodes 4 --dataset digits --job examples/demo.toml --churn --demo
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import shutil
import signal
import tempfile
import time

from node.cli.commands import job_updates, read_job_file, self_command
from node.cli.format import format_peers_table
from node.runtime.errors import EXIT_FAILURE, EXIT_USAGE, NodeError


def run_demo_job(client, job_file: pathlib.Path, swarm, churn: bool) -> bool:
    """Submit ``job_file`` from the first node and follow it; with ``churn``, SIGKILL the last node a third of
    the way through and start a fresh node (with the dead one's data slice) that joins the running job. True
    when the job ended done and every live participant exported the same model."""
    from node.devtools.localswarm import wait_for

    text = read_job_file(job_file)
    job_id = client.submit(text, str(job_file)).job_id
    print(f"\nsubmitted {job_file} as job {job_id}; each node trains on its own slice, only top-k updates move",
          flush=True)
    info, churned, fresh = None, not churn, None
    for info, line, new in job_updates(client, job_id, True):
        if line is not None:
            print(line, flush=True)
        for note in new:
            print(note, flush=True)
        if not churned and info.round >= max(1, info.rounds // 3):
            victim = swarm.nodes[-1]
            victim.kill_hard()
            print(f"-- SIGKILLed {victim.home.name} ({victim.peer_id[-8:]}) mid-job", flush=True)
            fresh = swarm.add_node(home=swarm.root / f"node{len(swarm.nodes)}", data_index=swarm.n - 1)
            fresh.wait_ready(60)
            print(f"-- started {fresh.home.name} ({fresh.peer_id[-8:]}): it downloads the current model and joins",
                  flush=True)
            churned = True
    if info is None:  # the daemon's stream always carries at least the job's current state
        raise RuntimeError(f"the node sent no state for job {job_id}")
    print(f"\njob {job_id} {info.state}: final eval {info.eval_metric:.4f} after {info.round} rounds; "
          f"model hash {info.model_hash[:16]}...", flush=True)
    if info.state != "done":
        return False
    manifests = {}
    for node in swarm.nodes:
        path = node.home / "jobs" / job_id / "manifest.json"
        if node.proc is not None and node.proc.poll() is None:
            try:
                wait_for(path.exists, 30, f"{node.home.name}'s export", interval=0.2)
                manifests[node.home.name] = json.loads(path.read_text())
            except TimeoutError:
                pass
    hashes = {m["model_hash"] for m in manifests.values()}
    print(f"participants that exported the model: {', '.join(manifests)}; same model hash on all: "
          f"{'yes' if hashes == {info.model_hash} else 'NO: ' + str(sorted(hashes))}", flush=True)
    if fresh is not None and fresh.home.name in manifests:
        print(f"{fresh.home.name} joined mid-job and took part in {manifests[fresh.home.name]['rounds_this_node']} "
              f"of the {info.round} rounds", flush=True)
    out = swarm.nodes[0].home / "jobs" / job_id
    print(f"model, manifest, round report and curve: {out}/{{model.safetensors,manifest.json,report.json,curve.png}}",
          flush=True)
    return hashes == {info.model_hash}


def cmd_dev_swarm(args: argparse.Namespace) -> int:
    from node.devtools.localswarm import LocalSwarm

    if not 1 <= args.nodes <= 64:
        raise NodeError(f"--nodes must be between 1 and 64, got {args.nodes}", EXIT_USAGE)
    root = args.dir or pathlib.Path(tempfile.mkdtemp(prefix="swarmnode-dev-"))
    swarm = LocalSwarm(root, args.nodes, swarm=args.swarm, dataset=args.dataset)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    ok = True
    try:
        t0 = time.monotonic()
        print(f"starting {args.nodes} nodes on loopback under {root} ...", flush=True)
        swarm.start()
        swarm.wait_converged()
        print(f"all {args.nodes} nodes see each other after {time.monotonic() - t0:.1f} s\n", flush=True)
        with swarm.nodes[0].client() as c:
            print(format_peers_table(c.peers()), flush=True)
            if args.job is not None:
                ok = run_demo_job(c, args.job, swarm, args.churn)
        if not args.demo:
            me = self_command()
            print(f"\njoin from another terminal:  {me} run --swarm {args.swarm} --listen /ip4/127.0.0.1/tcp/0 "
                  f"--home {shlex.quote(str(root / 'mynode'))} --join {swarm.nodes[0].addr}")
            print(f"ask a node:                   {me} peers --home {shlex.quote(str(swarm.nodes[0].home))}   "
                  f"(homes: {root}/node*)")
            print("Ctrl-C stops every node.", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        swarm.stop()
        print(f"stopped {len(swarm.nodes)} nodes", flush=True)
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else EXIT_FAILURE
