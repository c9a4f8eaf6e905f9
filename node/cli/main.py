"""The ``swarmnode`` command: run a node, talk to it, or start a local development swarm.

    swarmnode run --listen /ip4/0.0.0.0/tcp/31337            # first node of a new swarm
    swarmnode run --join /ip4/198.51.100.7/tcp/31337/p2p/12D3KooW...   # a volunteer joining it
    swarmnode status | peers | doctor | leave  [--json]      # ask the running daemon (same --home)
    swarmnode dev-swarm --nodes 4 [--demo]                   # N nodes on loopback
    swarmnode data add digits --slice 0/4 | data list     # this node's own slice of a dataset (never shared)
    swarmnode data add churn ./churn.csv --format csv --label churned   # or your own files, read in place
    swarmnode submit job.toml --follow | jobs | job ID [--follow] [--export DIR [--merge]] | cancel ID
    swarmnode split MODEL_DIR --stages 3 --strategy balanced --out DIR   # plan stages, write signed shards
    swarmnode analyze gpt2|MODEL_DIR --batch 8 --seq 128 --precision bf16   # params, FLOPs, training memory
    swarmnode swarm create lab | id | invite PEER_ID --out F | join-cert F    # a private swarm: members only
    swarmnode run --accept-jobs-from self|members|anyone|PEER_IDS --max-jobs 1 --max-job-memory 4GiB  # whose jobs
    swarmnode serve MODEL_DIR|minilm --stages 2 | generate NAME "prompt" | embed NAME "text" ...  # inference

Every expected failure prints one line ``swarmnode: error: ...`` and exits 1 (run time) or 2 (bad input).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from node.cli.analyze import add_parser as add_analyze_parser
from node.cli.analyze import cmd_analyze
from node.cli.commands import cmd_client, cmd_data, cmd_jobs, cmd_run, cmd_split, config_from
from node.cli.serve import add_parsers as add_serve_parsers
from node.cli.serve import cmd_embed, cmd_generate, cmd_serve
from node.cli.swarm import add_parser as add_swarm_parser
from node.cli.swarm import cmd_swarm
from node.runtime.errors import EXIT_FAILURE, EXIT_USAGE, NodeError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", help="node directory: keys, control socket, state (default ~/.swarmnode; SWARMNODE_HOME)")
    p.add_argument("--config", type=pathlib.Path, help="TOML config file (SWARMNODE_CONFIG)")
    p.add_argument("--control", help="'unix' (default) or tcp://127.0.0.1:PORT (SWARMNODE_CONTROL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmnode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start a node daemon (foreground)")
    _add_common(run)
    run.add_argument("--listen", action="append",
                     help="libp2p listen multiaddr, repeatable (default /ip4/0.0.0.0/tcp/0)")
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
    run.add_argument("--dashboard", help="HOST:PORT of this node's dashboard page and /metrics (default "
                                         "127.0.0.1:0, any free port on loopback; 'off'); off loopback every request "
                                         "needs the token in <home>/dashboard.token")
    run.add_argument("--http", help="HOST:PORT of the HTTP endpoints (OpenAI-compatible) of the models this node "
                                    "serves (`swarmnode serve`; default 127.0.0.1:0, any free port on loopback); off "
                                    "loopback every request needs the token in <home>/jobs/JOB/http.token")
    run.add_argument("--reachability", choices=("auto", "public", "private"),
                     help="whether peers can open connections to this node: auto (default: peers dial back to "
                          "check), public, or private (behind a NAT: reached through relays)")
    run.add_argument("--no-relay-service", dest="relay_service", action="store_false", default=None,
                     help="do not relay for peers behind NATs (a reachable node does by default, within bounds)")
    run.add_argument("--device", help="where this node trains: auto (the first CUDA device torch sees, else cpu; "
                                      "default), cpu, cuda or cuda:N (SWARMNODE_DEVICE)")
    limits = run.add_argument_group("whose jobs this node runs, and its limits (a declined job says why)")
    limits.add_argument("--accept-jobs-from", metavar="WHO",
                        help="'members' (default: submitters with a live peer record in the swarm, or a certificate "
                             "of a private swarm), 'self' (only this node's own jobs), 'anyone', or peer ids; "
                             "comma-separated")
    limits.add_argument("--max-jobs", type=int, help="jobs taken part in at once (default 2)")
    limits.add_argument("--max-job-memory", metavar="SIZE",
                        help="most training memory one job may need by its estimate, e.g. 8GiB (default: the "
                             "device's free memory)")
    limits.add_argument("--max-job-steps", type=int,
                        help="most local steps a job may ask (rounds x local_steps; default 1000000, 0: no bound)")
    limits.add_argument("--max-job-hours", type=float,
                        help="decline a job whose rounds x round_timeout_s exceeds this, leave one running longer "
                             "(default 0: no bound)")
    limits.add_argument("--cpu-threads", type=int, help="torch threads of a job's local training (default: all cores)")
    limits.add_argument("--gpu-memory-fraction", type=float,
                        help="share of the CUDA device's memory jobs may allocate, e.g. 0.5 (default: all)")
    limits.add_argument("--swarm-cert", help="this node's membership certificate of a private swarm "
                                             "(default <home>/swarm.cert; see `swarmnode swarm`)")

    for name, text in [("status", "show the local node"), ("peers", "list the swarm's live nodes"),
                       ("doctor", "check this node's reachability, relays and every peer, and say what to do"),
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
    job.add_argument("--merge", action="store_true",
                     help="with --export, an adapter job's merged model too (DIR/merged: base + adapter)")
    cancel = sub.add_parser("cancel", help="cancel a job you submitted")
    _add_common(cancel)
    cancel.add_argument("job_id")
    add_serve_parsers(sub, _add_common)

    data = sub.add_parser("data", help="this node's own datasets: bind its files to a name, or add a slice of a "
                                       "bundled dataset; list them")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    data_add = data_sub.add_parser("add", help="bind NAME to this node's own files at PATH (read in place, never "
                                               "copied or shared), or write its slice of a bundled dataset")
    _add_common(data_add)
    data_add.add_argument("--data", help="the node's data directory (default <home>/data; as `run --data`)")
    data_add.add_argument("dataset", metavar="NAME",
                          help="the dataset name jobs use; without PATH a bundled dataset: digits, wine, "
                               "breast_cancer or pystdlib-bytes")
    data_add.add_argument("path", nargs="?", type=pathlib.Path, metavar="PATH",
                          help="a file or folder of this node's own data (with --format)")
    data_add.add_argument("--format", choices=("csv", "parquet", "jsonl", "text", "imagefolder"),
                          help="PATH's format: csv, parquet, jsonl (a file or a folder of them), text (a folder, one "
                               "document per file) or imagefolder (one subfolder per class)")
    data_add.add_argument("--label", default="", help="the label column (csv, parquet, jsonl)")
    data_add.add_argument("--text-field", default="", help="the text column of csv/parquet/jsonl text data")
    data_add.add_argument("--slice", default="0/1", metavar="I/N",
                          help="this node's part I of N equal-sized parts (0-based; default 0/1: the whole train "
                               "split)")
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

    add_analyze_parser(sub)
    add_swarm_parser(sub, _add_common)

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_utf8(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "dev-swarm":
            from node.cli.dev import cmd_dev_swarm

            return cmd_dev_swarm(args)
        if args.command == "split":
            return cmd_split(args)
        if args.command == "analyze":
            return cmd_analyze(args)
        if args.command == "data":
            return cmd_data(args)
        if args.command == "swarm":
            return cmd_swarm(args)
        from node.runtime.home import check_home_readable

        check_home_readable(config_from(args).home_dir)
        if args.command in ("submit", "jobs", "job", "cancel"):
            return cmd_jobs(args)
        if args.command in ("serve", "generate", "embed"):
            return {"serve": cmd_serve, "generate": cmd_generate, "embed": cmd_embed}[args.command](args,
                                                                                                 config_from(args))
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
