"""The ``swarmnode`` command: run a node, talk to it, or start a local development swarm.

    swarmnode run --listen /ip4/0.0.0.0/tcp/31337            # first node of a new swarm
    swarmnode run --join /ip4/198.51.100.7/tcp/31337/p2p/12D3KooW...   # a volunteer joining it
    swarmnode status | peers | leave  [--json]               # ask the running daemon (same --home)
    swarmnode dev-swarm --nodes 4 [--demo]                   # N nodes on loopback
    swarmnode data add digits --slice 0/4 | data list     # this node's own slice of a dataset (never shared)
    swarmnode submit job.toml --follow | jobs | job ID [--follow] [--export DIR] | cancel ID
    swarmnode split MODEL_DIR --stages 3 --strategy balanced --out DIR   # plan stages, write signed shards

Every expected failure prints one line ``swarmnode: error: ...`` and exits 1 (run time) or 2 (bad input).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import shutil
import shlex
import signal
import sys
import tempfile
import time

from node.runtime.config import resolve
from node.runtime.errors import EXIT_FAILURE, EXIT_USAGE, NodeError

log = logging.getLogger("swarmnode")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", help="node directory: keys, control socket, state (default ~/.swarmnode; SWARMNODE_HOME)")
    p.add_argument("--config", type=pathlib.Path, help="TOML config file (SWARMNODE_CONFIG)")
    p.add_argument("--control", help="'unix' (default) or tcp://127.0.0.1:PORT (SWARMNODE_CONTROL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmnode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start a node daemon (foreground)")
    _add_common(run)
    run.add_argument("--listen", action="append", help="libp2p listen multiaddr, repeatable (default /ip4/0.0.0.0/tcp/0)")
    run.add_argument("--announce", action="append", help="public multiaddr to announce, repeatable")
    run.add_argument("--join", action="append", help="bootstrap peer multiaddr ending in /p2p/<peer id>, repeatable")
    run.add_argument("--swarm", help="swarm name (default 'default')")
    run.add_argument("--identity", help="Ed25519 key file (default <home>/identity.key)")
    run.add_argument("--heartbeat", type=float, help="seconds between record refreshes (default 10)")
    run.add_argument("--ttl", type=float, help="seconds a record lives without refresh (default 30)")
    run.add_argument("--join-attempts", type=int, help="bootstrap attempts before exit code 2 (default 5)")
    run.add_argument("--join-backoff", type=float, help="first retry delay in seconds, doubling (default 1)")
    run.add_argument("--benchmark-seconds", type=float, help="matmul micro-benchmark budget (default 0.3)")
    run.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    run.add_argument("--data", help="directory of this node's datasets (<data>/<dataset>/, default <home>/data; "
                                    "fill it with `swarmnode data add`); never shared")

    for name, text in [("status", "show the local node"), ("peers", "list the swarm's live nodes"),
                       ("leave", "withdraw from the swarm and stop the daemon")]:
        _add_common(sub.add_parser(name, help=text))

    submit = sub.add_parser("submit", help="publish a federated training job from a TOML file")
    _add_common(submit)
    submit.add_argument("job_file", type=pathlib.Path)
    submit.add_argument("--follow", action="store_true", help="show progress until the job ends")
    jobs = sub.add_parser("jobs", help="list the swarm's jobs")
    _add_common(jobs)
    job = sub.add_parser("job", help="show one job")
    _add_common(job)
    job.add_argument("job_id")
    job.add_argument("--follow", action="store_true", help="show progress until the job ends")
    job.add_argument("--export", metavar="DIR", type=pathlib.Path,
                     help="write the job's model, manifest, report and curve into DIR (after --follow, if given)")
    cancel = sub.add_parser("cancel", help="cancel a job you submitted")
    _add_common(cancel)
    cancel.add_argument("job_id")

    data = sub.add_parser("data", help="this node's own datasets: add a slice of a bundled dataset, list them")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    data_add = data_sub.add_parser("add", help="write this node's slice of a bundled dataset into its data directory")
    _add_common(data_add)
    data_add.add_argument("--data", help="the node's data directory (default <home>/data; as `run --data`)")
    data_add.add_argument("dataset", help="a bundled dataset: digits, wine, breast_cancer or pystdlib-bytes")
    data_add.add_argument("--slice", default="0/1", metavar="I/N",
                          help="this node's part I of N equal-sized parts (0-based; default 0/1: the whole train split)")
    data_add.add_argument("--scheme", default="iid", choices=("iid", "label-skew", "shards"),
                          help="how the N parts are drawn: iid (default), label-skew (Dirichlet 0.5) or shards")
    data_add.add_argument("--seed", type=int, default=0,
                          help="partition seed; every node of a swarm uses the same one (default 0)")
    data_list = data_sub.add_parser("list", help="list the datasets in this node's data directory")
    _add_common(data_list)
    data_list.add_argument("--data", help="the node's data directory (default <home>/data)")

    split = sub.add_parser("split", help="plan pipeline stages of a local model and write signed shards")
    _add_common(split)
    split.add_argument("model", help="a local model folder (config.json + weights: GPT-2, LLaMA or BERT) or "
                                     "'minilm' for the bundled all-MiniLM-L6-v2")
    split.add_argument("--stages", type=int, help="number of stages (layer_wise, balanced)")
    split.add_argument("--strategy", choices=("layer_wise", "balanced", "memory_aware"),
                       help="how to cut: equal layers, balanced parameters (default), or sized to --host machines")
    split.add_argument("--host", action="append", metavar="MEM_GIB:TFLOPS",
                       help="memory_aware: one per stage, in stage order, e.g. --host 8:20 --host 24:80")
    split.add_argument("--out", type=pathlib.Path, required=True, help="directory for the shards and manifest")

    dev = sub.add_parser("dev-swarm", help="start N local nodes on loopback; Ctrl-C stops them all")
    dev.add_argument("--nodes", type=int, default=4)
    dev.add_argument("--dir", type=pathlib.Path, help="where the nodes' homes go (default: a temporary directory)")
    dev.add_argument("--swarm", default="dev")
    dev.add_argument("--demo", action="store_true", help="print the peers table (and run --job), then stop every node")
    dev.add_argument("--dataset", help="give each node its own non-IID slice of this bundled dataset (e.g. digits)")
    dev.add_argument("--job", type=pathlib.Path, help="job file to submit from the first node and follow")
    dev.add_argument("--churn", action="store_true", help="with --job: SIGKILL a node mid-job, start a fresh one")
    return parser


def _check_utf8(args: argparse.Namespace) -> None:
    """NodeError naming the first argument that is not valid UTF-8: os.fsdecode turns such bytes into lone
    surrogates, which the control API (protobuf strings), gRPC targets and libp2p cannot carry."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            text = str(v) if isinstance(v, (str, pathlib.PurePath)) else ""
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise NodeError(f"{name.replace('_', '-')}: {text!r:.80} is not valid UTF-8", EXIT_USAGE) from None


def _read_job_file(path: pathlib.Path) -> str:
    """A job file's text for the daemon; NodeError if it cannot be read or is not UTF-8 (the daemon parses it)."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise NodeError(f"cannot read job file {path}: {e.strerror or e}", EXIT_USAGE) from None
    except UnicodeDecodeError as e:
        raise NodeError(f"job file {path} is not UTF-8 text (byte {e.start})", EXIT_USAGE) from None


def _config_from(args: argparse.Namespace):
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "json", "config", "job_file", "job_id", "follow",
                                                          "export", "model", "stages", "strategy", "host", "out",
                                                          "data_command", "dataset", "slice", "scheme", "seed")}
    return resolve(flags, config_file=args.config)


def self_command() -> str:
    """How the user can run this same swarmnode again from any directory: the `swarmnode` on PATH if it is this
    one, else this program's absolute path (or the interpreter with -m node.cli)."""
    argv0 = pathlib.Path(sys.argv[0])
    if argv0.name == "swarmnode":
        on_path = shutil.which("swarmnode")
        if on_path and pathlib.Path(on_path).resolve() == argv0.resolve():
            return "swarmnode"
        return shlex.quote(str(argv0.resolve()))
    return f"{shlex.quote(sys.executable)} -m node.cli"


# ---- output --------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _age(t: float) -> str:
    return f"{max(0.0, time.time() - t):.0f}s ago"


def table(header: list[str], rows: list[list[str]], footer: str) -> str:
    """Left-aligned columns two spaces apart, as wide as their widest cell, then a footer line."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join([*lines, footer])


def capability_summary(cap) -> dict:
    gpus = [{"name": g.name, "memory_bytes": g.memory_bytes, "compute_capability": f"{g.cc_major}.{g.cc_minor}"} for g in cap.gpus]
    return {
        "gpus": gpus,
        "cpu_cores": cap.cpu_cores,
        "ram_bytes": cap.ram_bytes,
        "disk_free_bytes": cap.disk_free_bytes,
        "tflops_fp32": cap.tflops_fp32,
        "tflops_bf16": cap.tflops_bf16 if cap.HasField("tflops_bf16") else None,
        "platform": cap.platform,
    }


def peers_json(resp) -> list[dict]:
    return [
        {"peer_id": p.peer_id, "addrs": list(p.addrs), "version": p.version, "capability": capability_summary(p.capability),
         "last_seen": p.last_seen, "expires_at": p.expires_at, "is_self": p.is_self}
        for p in resp.peers
    ]


def format_peers_table(resp) -> str:
    header = ["PEER ID", "ADDRESS", "GPU", "VRAM", "CORES", "RAM", "TFLOPS fp32/bf16", "VERSION", "LAST SEEN"]
    rows = []
    for p in resp.peers:
        cap = p.capability
        if cap.gpus:
            names = sorted({g.name for g in cap.gpus})
            gpu = f"{len(cap.gpus)}x {names[0]}" + ("" if len(names) == 1 else " (mixed)")
            vram = _gib(sum(g.memory_bytes for g in cap.gpus))
        else:
            gpu, vram = "none (CPU only)", "-"
        bf16 = f"{cap.tflops_bf16:.2f}" if cap.HasField("tflops_bf16") else "-"
        addr = (p.addrs[0].split("/p2p/")[0] if p.addrs else "-") + (f" (+{len(p.addrs) - 1})" if len(p.addrs) > 1 else "")
        rows.append([p.peer_id + (" *" if p.is_self else ""), addr, gpu, vram, str(cap.cpu_cores), _gib(cap.ram_bytes),
                     f"{cap.tflops_fp32:.3f}/{bf16}", p.version, _age(p.last_seen)])
    return table(header, rows, f"{len(rows)} node(s); * = this node")


# ---- commands ------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from node.runtime.home import check_data_dir, check_home_writable

    config = _config_from(args)
    check_home_writable(config.home_dir)  # before the heavy imports: a bad home fails in a blink, in one line
    check_data_dir(config.data)

    from node.daemon import run_daemon  # heavy imports (torch, hivemind) only for the daemon

    level = getattr(logging, config.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_root_logger")
    logging.getLogger().setLevel(level)
    logging.getLogger("hivemind").setLevel(logging.DEBUG if level == logging.DEBUG else logging.ERROR)

    def on_ready(daemon) -> None:
        if args.json:
            print(json.dumps({"peer_id": daemon.peer_id, "addrs": list(daemon.addrs), "swarm": config.swarm}), flush=True)
            return
        me, other = self_command(), shlex.quote(f"{config.home_dir}-2")
        print(f"swarmnode: node {daemon.peer_id} is up in swarm '{config.swarm}'. Others can join with "
              f"(another machine may keep the default --home):")
        for addr in daemon.addrs:
            print(f"  {me} run --home {other} --swarm {config.swarm} --join {addr}")
        print(f"talk to it:  {me} status|peers|jobs|leave --home {shlex.quote(str(config.home_dir))}", flush=True)

    asyncio.run(run_daemon(config, on_ready=on_ready))
    return 0


def job_json(info) -> dict:
    nan_to_none = lambda x: None if x != x else x  # noqa: E731
    return {"job_id": info.job_id, "name": info.name, "submitter": info.submitter, "state": info.state,
            "round": info.round, "rounds": info.rounds, "model_hash": info.model_hash,
            "participants": list(info.participants), "train_loss": nan_to_none(info.train_loss),
            "eval_metric": nan_to_none(info.eval_metric), "bytes_exchanged": info.bytes_exchanged,
            "round_time_s": info.round_time_s, "summary": info.summary, "declined": info.declined,
            "local_round": info.local_round if info.local_model_hash else None,
            "local_model_hash": info.local_model_hash or None,
            "stage_hosts": [group.split(",") for group in info.stage_hosts] or None,
            "declines": [{"peer_id": d.peer_id, "reason": d.reason} for d in info.declines], "takers": info.takers}


def format_job_line(info) -> str:
    loss = f"{info.train_loss:.4f}" if info.train_loss == info.train_loss else "-"
    metric = f"{info.eval_metric:.4f}" if info.eval_metric == info.eval_metric else "-"
    bar = "#" * min(20, max(0, round(20 * info.round / max(1, info.rounds))))  # a peer may claim round > rounds
    return (f"[{bar:<20}] round {info.round}/{info.rounds}  {info.state:<9} participants {len(info.participants)}  "
            f"loss {loss}  eval {metric}  {info.bytes_exchanged / 1e3:.1f} kB  {info.round_time_s:.2f} s")


def format_jobs_table(resp) -> str:
    header = ["JOB ID", "NAME", "MODEL", "STATE", "ROUND", "PARTICIPANTS", "EVAL", "THIS NODE"]
    rows = [[j.job_id, j.name, j.summary, j.state, f"{j.round}/{j.rounds}", str(len(j.participants)),
             f"{j.eval_metric:.4f}" if j.eval_metric == j.eval_metric else "-",
             f"declined: {j.declined}" if j.declined else "-"] for j in resp.jobs]
    return table(header, rows, f"{len(rows)} job(s)")


def nobody_takes(info, waited_s: float) -> bool:
    """True when no node has taken part in a running job for longer than its round timeout: every node
    declined, or none is there to take it. (A paused job has participants: it waits for more.)"""
    return info.takers == 0 and info.state == "running" and info.round == 0 and waited_s > info.round_timeout_s


def job_updates(client, job_id: str, follow: bool, as_json: bool = False, clock=time.monotonic):
    """(info, the line to print or None when it says what the last one said, declines not seen before) for each
    state the daemon sends; with ``follow``, a NodeError (exit 1) once nobody_takes the job, naming the declines."""
    start, last, seen = clock(), None, set()
    for info in client.job(job_id, follow=follow):
        line = json.dumps(job_json(info)) if as_json else format_job_line(info)
        new = [d for d in info.declines if d.peer_id not in seen]
        seen |= {d.peer_id for d in new}
        yield info, (line if line != last else None), new
        last = line
        if follow and nobody_takes(info, clock() - start):
            why = (f"{len(info.declines)} node(s) declined it: " + "; ".join(f"{d.peer_id[-8:]}: {d.reason}"
                                                                            for d in info.declines[:3])
                   + (" ..." if len(info.declines) > 3 else "")
                   if info.declines else "no node declined it either: is any node of the swarm running?")
            raise NodeError(f"no node has taken part in job {job_id} within its round timeout "
                            f"({info.round_timeout_s:.0f} s); {why}", EXIT_FAILURE)


def follow_job(client, job_id: str, follow: bool, as_json: bool) -> int:
    info = None
    for info, line, new in job_updates(client, job_id, follow, as_json):
        if line is not None:
            print(line, flush=True)
        for d in new if not as_json else ():  # JSON lines carry them in "declines"
            print(f"  declined by {d.peer_id}: {d.reason}", flush=True)
    return 0 if info is None or info.state != "cancelled" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from node.api.client import ControlClient

    with ControlClient(_config_from(args)) as client:
        if args.command == "submit":
            text = _read_job_file(args.job_file)
            job_id = client.submit(text, str(args.job_file)).job_id
            print(json.dumps({"job_id": job_id}) if args.json else f"submitted job {job_id}", flush=True)
            return follow_job(client, job_id, True, args.json) if args.follow else 0
        if args.command == "jobs":
            resp = client.jobs()
            print(json.dumps([job_json(j) for j in resp.jobs]) if args.json else format_jobs_table(resp))
            return 0
        if args.command == "job":
            code = follow_job(client, args.job_id, args.follow, args.json)
            if args.export is None or code != 0:
                return code
            written = client.export(args.job_id, str(args.export.expanduser().resolve()))
            print(json.dumps({"files": list(written.files), "round": written.round, "model_hash": written.model_hash})
                  if args.json else f"wrote job {args.job_id} after {written.round} rounds (model {written.model_hash[:16]}...): "
                  + ", ".join(written.files), flush=True)
            return 0
        cancelled = client.cancel(args.job_id).cancelled
        print(json.dumps({"cancelled": cancelled}) if args.json else
              (f"cancelled job {args.job_id}" if cancelled else "the cancellation could not be stored"))
        return 0 if cancelled else 1


def cmd_client(args: argparse.Namespace) -> int:
    from node.api.client import ControlClient

    with ControlClient(_config_from(args)) as client:
        if args.command == "status":
            s = client.status()
            if args.json:
                print(json.dumps({"peer_id": s.peer_id, "addrs": list(s.addrs), "swarm": s.swarm, "version": s.version,
                                  "uptime_s": s.uptime_s, "peers_seen": s.peers_seen,
                                  "last_heartbeat_age_s": s.last_heartbeat_age_s, "home": s.home, "pid": s.pid,
                                  "capability": capability_summary(s.capability)}))
            else:
                cap = capability_summary(s.capability)
                gpus = ", ".join(f"{g['name']} ({_gib(g['memory_bytes'])}, cc {g['compute_capability']})" for g in cap["gpus"])
                print(f"peer id    {s.peer_id}\nswarm      {s.swarm}\nversion    {s.version}\nuptime     {s.uptime_s:.0f} s"
                      f"\npeers      {s.peers_seen} at last read\nheartbeat  {s.last_heartbeat_age_s:.1f} s ago"
                      f"\nhardware   {gpus or 'CPU only'}; {cap['cpu_cores']} cores, {_gib(cap['ram_bytes'])} RAM, "
                      f"{cap['tflops_fp32']:.3f} TFLOPS fp32\naddresses")
                for a in s.addrs:
                    print(f"  {a}")
        elif args.command == "peers":
            resp = client.peers()
            print(json.dumps(peers_json(resp)) if args.json else format_peers_table(resp))
        else:
            resp = client.leave()
            print(json.dumps({"withdrawn": resp.withdrawn}) if args.json else
                  ("left the swarm; the daemon is stopping" if resp.withdrawn else
                   "the daemon is stopping; its record could not be withdrawn and will expire with its TTL"))
    return 0


def run_demo_job(client, job_file: pathlib.Path, swarm, churn: bool) -> bool:
    """Submit ``job_file`` from the first node and follow it; with ``churn``, SIGKILL the last node a third of
    the way through and start a fresh node (with the dead one's data slice) that joins the running job. True
    when the job ended done and every live participant exported the same model."""
    from node.devtools.localswarm import wait_for

    text = _read_job_file(job_file)
    job_id = client.submit(text, str(job_file)).job_id
    print(f"\nsubmitted {job_file} as job {job_id}; each node trains on its own slice, only top-k updates move",
          flush=True)
    info, churned, fresh = None, not churn, None
    for info, line, new in job_updates(client, job_id, True):
        if line is not None:
            print(line, flush=True)
        for d in new:
            print(f"  declined by {d.peer_id}: {d.reason}", flush=True)
        if not churned and info.round >= max(1, info.rounds // 3):
            victim = swarm.nodes[-1]
            victim.kill_hard()
            print(f"-- SIGKILLed {victim.home.name} ({victim.peer_id[-8:]}) mid-job", flush=True)
            fresh = swarm.add_node(home=swarm.root / f"node{len(swarm.nodes)}", data_index=swarm.n - 1)
            fresh.wait_ready(60)
            print(f"-- started {fresh.home.name} ({fresh.peer_id[-8:]}): it downloads the current model and joins",
                  flush=True)
            churned = True
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


def _parse_slice(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise NodeError(f"--slice {text!r}: expected I/N, e.g. 0/4 (part 0 of 4)", EXIT_USAGE) from None
    if not sep or not 0 <= i < n or n > 4096:
        raise NodeError(f"--slice {text!r}: expected I/N with 0 <= I < N <= 4096", EXIT_USAGE)
    return i, n


def format_data_table(entries: list[dict], data_dir: pathlib.Path) -> str:
    header = ["NAME", "TASK", "TRAIN", "TEST", "ITEM", "CLASSES", "SLICE", "SCHEME"]
    rows = []
    for e in entries:
        if e["error"]:
            rows.append([e["name"], "unusable: " + e["error"], "", "", "", "", "", ""])
            continue
        item = "x".join(map(str, e["item_shape"])) + f" {e['dtype']}"
        rows.append([e["name"], e["task"], str(e["train"]), str(e["test"]), item, str(e["classes"] or "-"),
                     e["slice"], e["scheme"]])
    return table(header, rows, f"{len(rows)} dataset(s) in {data_dir}")


def cmd_data(args: argparse.Namespace) -> int:
    from node.ml.datasets import DATASETS, list_node_data, write_node_data

    config = _config_from(args)
    data_dir = config.data_dir
    if args.data_command == "list":
        try:
            entries = list_node_data(data_dir)
        except OSError as e:
            raise NodeError(f"cannot read data directory {data_dir}: {e.strerror}", EXIT_USAGE) from None
        print(json.dumps(entries) if args.json else format_data_table(entries, data_dir))
        return 0
    if args.dataset not in DATASETS:
        raise NodeError(f"unknown dataset {args.dataset!r}; bundled: {', '.join(DATASETS)}", EXIT_USAGE)
    index, count = _parse_slice(args.slice)
    if args.seed < 0:
        raise NodeError(f"--seed must be >= 0, got {args.seed}", EXIT_USAGE)
    try:
        write_node_data(args.dataset, data_dir / args.dataset, count, index, args.scheme, args.seed)
        (entry,) = [e for e in list_node_data(data_dir) if e["name"] == args.dataset]
    except ValueError as e:
        raise NodeError(f"data add {args.dataset}: {e}", EXIT_USAGE) from None
    except OSError as e:
        raise NodeError(f"cannot write to data directory {data_dir}: {e.strerror}", EXIT_USAGE) from None
    if args.json:
        print(json.dumps(entry))
    else:
        print(f"wrote slice {entry['slice']} ({args.scheme}) of {args.dataset}: {entry['train']} train items, "
              f"{entry['test']} test items, to {data_dir / args.dataset}; it never leaves this node")
    return 0


def _hosts(specs: list[str]):
    from protocol.planning.stage_plan import Host

    hosts = []
    for spec in specs:
        mem, sep, tflops = spec.partition(":")
        try:
            hosts.append(Host(float(mem) * 2**30, float(tflops)))
        except ValueError:
            raise NodeError(f"--host {spec!r}: expected MEM_GIB:TFLOPS with positive numbers, e.g. 8:20", EXIT_USAGE) from None
        if not sep:
            raise NodeError(f"--host {spec!r}: expected MEM_GIB:TFLOPS, e.g. 8:20", EXIT_USAGE)
    return hosts


def cmd_split(args: argparse.Namespace) -> int:
    from node.runtime.identity import load_or_create_key
    from node.ml.models import minilm_path
    from node.ml.splitter import load_model_dir, plan_for_model, split_model

    if (args.strategy == "memory_aware") != bool(args.host):
        raise NodeError("--host goes with --strategy memory_aware (one per stage), and memory_aware needs them", EXIT_USAGE)
    if args.host and args.stages is not None and args.stages != len(args.host):
        raise NodeError(f"--stages {args.stages} but {len(args.host)} --host given: one host per stage", EXIT_USAGE)
    if not args.host and args.stages is None:
        raise NodeError("--stages N is required (or --strategy memory_aware with one --host per stage)", EXIT_USAGE)
    path = minilm_path() if args.model == "minilm" else pathlib.Path(args.model).expanduser()
    try:
        model = load_model_dir(path)
        plan = plan_for_model(model, _hosts(args.host) if args.host else args.stages, args.strategy)
    except ValueError as e:
        raise NodeError(str(e), EXIT_USAGE) from None
    key_path = _config_from(args).identity_path
    key, created = load_or_create_key(key_path)
    if created:
        print(f"swarmnode: created a new identity key at {key_path}: it signs the shard manifest (pass --home to "
              f"sign as a node's own identity)", file=sys.stderr)
    manifest = split_model(model, plan.spans, args.out, key)
    if args.json:
        print(json.dumps({"strategy": plan.strategy, "stages": plan.rows(), "model_hash": manifest.model_hash,
                          "splitter": manifest.splitter, "out": str(args.out),
                          "shards": [{"start": s.start, "end": s.end, "file": s.file, "size": s.size, "sha256": s.sha256}
                                     for s in manifest.shards]}, default=str))
        return 0
    print(f"{manifest.arch}, {manifest.num_layers} layers, {plan.strategy} into {len(plan.spans)} stages "
          f"(cost = parameters):")
    print(plan.table())
    print(f"wrote {len(manifest.shards)} shards + manifest to {args.out}, signed by {manifest.splitter} "
          f"(model {manifest.model_hash[:16]}...)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_utf8(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "dev-swarm":
            return cmd_dev_swarm(args)
        if args.command == "split":
            return cmd_split(args)
        if args.command == "data":
            return cmd_data(args)
        from node.runtime.home import check_home_readable

        check_home_readable(_config_from(args).home_dir)
        if args.command in ("submit", "jobs", "job", "cancel"):
            return cmd_jobs(args)
        return cmd_client(args)
    except NodeError as e:
        print(f"swarmnode: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # a file problem no check foresaw: still one line, naming the file
        where = f"{e.filename}: " if e.filename else ""
        print(f"swarmnode: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
