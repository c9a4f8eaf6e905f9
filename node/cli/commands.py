"""The swarmnode commands that run a node, talk to one, manage its data or split a model (the parser and the
dispatch are in node/cli/main.py; dev-swarm in node/cli/dev.py).

Each ``cmd_x(args)`` returns the exit code; an expected failure raises NodeError (one line, exit 1 or 2).
Heavy imports (torch, hivemind, gRPC) happen inside the command that needs them, so ``swarmnode --help`` and
the client commands start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import shlex
import shutil
import sys
import time

from node.api.serde import doctor_json, export_json, job_json, peers_json, status_json
from node.cli.format import (
    format_data_table,
    format_doctor,
    format_job_line,
    format_jobs_table,
    format_peers_table,
    format_sources_table,
    format_status,
)
from node.runtime.config import NodeConfig, resolve
from node.runtime.errors import EXIT_FAILURE, EXIT_USAGE, NodeError


def read_job_file(path: pathlib.Path) -> str:
    """A job file's text for the daemon; NodeError if it cannot be read or is not UTF-8 (the daemon parses it)."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise NodeError(f"cannot read job file {path}: {e.strerror or e}", EXIT_USAGE) from None
    except UnicodeDecodeError as e:
        raise NodeError(f"job file {path} is not UTF-8 text (byte {e.start})", EXIT_USAGE) from None


def config_from(args: argparse.Namespace) -> NodeConfig:
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "json", "config", "job_file", "job_id",
                                                          "follow", "export", "merge", "model", "stages", "strategy",
                                                          "host",
                                                          "out", "data_command", "dataset", "slice", "scheme", "seed")}
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


def cmd_run(args: argparse.Namespace) -> int:
    from node.runtime.home import check_data_dir, check_home_writable

    config = config_from(args)
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
            print(json.dumps({"peer_id": daemon.peer_id, "addrs": list(daemon.addrs), "swarm": config.swarm,
                              "dashboard": daemon.dashboard_url}), flush=True)
            return
        me, other = self_command(), shlex.quote(f"{config.home_dir}-2")
        print(f"swarmnode: node {daemon.peer_id} is up in swarm '{config.swarm}'. Others can join with "
              f"(another machine may keep the default --home):")
        for addr in daemon.addrs:
            print(f"  {me} run --home {other} --swarm {config.swarm} --join {addr}")
        print(f"talk to it:  {me} status|peers|jobs|leave --home {shlex.quote(str(config.home_dir))}")
        if daemon.dashboard_url:
            print(f"watch it:    {daemon.dashboard_url}  (the page; /metrics for Prometheus)")
        sys.stdout.flush()

    asyncio.run(run_daemon(config, on_ready=on_ready, hard_exit=True))
    return 0


def nobody_takes(info, waited_s: float) -> bool:
    """True when no node has taken part in a running job for longer than its round timeout: every node
    declined, or none is there to take it. (A paused job has participants: it waits for more.)"""
    return info.takers == 0 and info.state == "running" and info.round == 0 and waited_s > info.round_timeout_s


def job_updates(client, job_id: str, follow: bool, as_json: bool = False, clock=time.monotonic):
    """(info, the line to print or None when it says what the last one said, a line per decline or exclusion not
    seen before) for each state the daemon sends; with ``follow``, a NodeError (exit 1) once nobody_takes the job,
    naming the declines."""
    start, last, seen = clock(), None, set()
    for info in client.job(job_id, follow=follow):
        line = json.dumps(job_json(info)) if as_json else format_job_line(info)
        notes = [f"  declined by {d.peer_id}: {d.reason}" for d in info.declines]
        notes += [f"  excluded {x.peer_id} (by {x.by[-8:]}): {x.evidence}" for x in info.exclusions]
        new = [n for n in notes if n not in seen]
        seen |= set(new)
        yield info, (line if line != last else None), new
        last = line
        if follow and nobody_takes(info, clock() - start):
            why = (f"{len(info.declines)} node(s) declined it: " + "; ".join(f"{d.peer_id[-8:]}: {d.reason}"
                                                                            for d in info.declines[:3])
                   + (" ..." if len(info.declines) > 3 else "")
                   if info.declines else "no node declined it either: is any node of the swarm running?")
            raise NodeError(f"no node has taken part in job {job_id} within its round timeout "
                            f"({info.round_timeout_s:.0f} s); {why}", EXIT_FAILURE)


def follow_job(client, job_id: str, follow: bool, as_json: bool, console=None) -> int:
    """Print the job's states: following on a terminal, a live bar with the time left (node/cli/progress.py);
    else a line per change (JSON with ``as_json``). ``console``: a rich Console (default: stdout's)."""
    state = None  # the last state the daemon sent (None: it sent none)
    if follow and not as_json:
        from rich.console import Console

        from node.cli.progress import JobDisplay

        console = console or Console()
        if console.is_terminal:
            with JobDisplay(console) as display:
                for info, _, new in job_updates(client, job_id, follow):
                    state = info.state
                    display.show(info, new)
            return 0 if state != "cancelled" else 1
    for info, line, new in job_updates(client, job_id, follow, as_json):
        state = info.state
        if line is not None:
            print(line, flush=True)
        for note in new if not as_json else ():  # JSON lines carry them in "declines" and "exclusions"
            print(note, flush=True)
    return 0 if state != "cancelled" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from node.api.client import ControlClient

    with ControlClient(config_from(args)) as client:
        if args.command == "submit":
            text = read_job_file(args.job_file)
            job_id = client.submit(text, str(args.job_file)).job_id
            print(json.dumps({"job_id": job_id}) if args.json else f"submitted job {job_id}", flush=True)
            return follow_job(client, job_id, True, args.json) if args.follow else 0
        if args.command == "jobs":
            resp = client.jobs()
            print(json.dumps([job_json(j) for j in resp.jobs]) if args.json else format_jobs_table(resp))
            return 0
        if args.command == "job":
            if args.merge and args.export is None:
                raise NodeError("--merge goes with --export DIR (the merged model is written there)", EXIT_USAGE)
            code = follow_job(client, args.job_id, args.follow, args.json)
            if args.export is None or code != 0:
                return code
            written = client.export(args.job_id, str(args.export.expanduser().resolve()), merge=args.merge)
            print(json.dumps(export_json(written)) if args.json else
                  f"wrote job {args.job_id} after {written.round} rounds (model {written.model_hash[:16]}...): "
                  + ", ".join(written.files), flush=True)
            return 0
        cancelled = client.cancel(args.job_id).cancelled
        print(json.dumps({"cancelled": cancelled}) if args.json else
              (f"cancelled job {args.job_id}" if cancelled else "the cancellation could not be stored"))
        return 0 if cancelled else 1


def cmd_client(args: argparse.Namespace) -> int:
    from node.api.client import ControlClient

    with ControlClient(config_from(args)) as client:
        if args.command == "status":
            s = client.status()
            print(json.dumps(status_json(s)) if args.json else format_status(s))
        elif args.command == "peers":
            resp = client.peers()
            print(json.dumps(peers_json(resp)) if args.json else format_peers_table(resp))
        elif args.command == "doctor":
            report = client.doctor()
            print(json.dumps(doctor_json(report)) if args.json else format_doctor(report))
        else:
            resp = client.leave()
            print(json.dumps({"withdrawn": resp.withdrawn}) if args.json else
                  ("left the swarm; the daemon is stopping" if resp.withdrawn else
                   "the daemon is stopping; its record could not be withdrawn and will expire with its TTL"))
    return 0


def _parse_slice(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise NodeError(f"--slice {text!r}: expected I/N, e.g. 0/4 (part 0 of 4)", EXIT_USAGE) from None
    if not sep or not 0 <= i < n or n > 4096:
        raise NodeError(f"--slice {text!r}: expected I/N with 0 <= I < N <= 4096", EXIT_USAGE)
    return i, n


def cmd_data(args: argparse.Namespace) -> int:
    from node.ml.datasets import DATASETS, list_node_data, write_node_data
    from node.ml.user_data import config_sources, list_sources

    config = config_from(args)
    data_dir = config.data_dir
    if args.data_command == "list":
        try:
            configured = config_sources(config.datasets, "config")
            own = list_sources(data_dir, configured)
            entries = [e for e in list_node_data(data_dir) if e["name"] not in {o["name"] for o in own}]
        except (OSError, ValueError) as e:
            raise NodeError(f"cannot read data directory {data_dir}: {getattr(e, 'strerror', None) or e}",
                            EXIT_USAGE) from None
        tables = [format_data_table(entries, data_dir)] if entries or not own else []
        print(json.dumps(entries + own) if args.json else "\n".join(tables + [format_sources_table(own)] * bool(own)))
        return 0
    if args.path is not None:
        return _add_own_data(args, data_dir)
    if args.format or args.label or args.text_field:
        raise NodeError("--format, --label and --text-field describe your own files: give their PATH", EXIT_USAGE)
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


def _add_own_data(args: argparse.Namespace, data_dir: pathlib.Path) -> int:
    from node.ml.user_data import add_source

    if args.format is None:
        raise NodeError("data add NAME PATH: --format is required (csv, parquet, jsonl, text or imagefolder)",
                        EXIT_USAGE)
    try:
        entry = add_source(data_dir, args.dataset, args.path, args.format, label=args.label,
                           text_field=args.text_field)
    except ValueError as e:
        raise NodeError(f"data add {args.dataset}: {e}", EXIT_USAGE) from None
    except OSError as e:
        raise NodeError(f"data add {args.dataset}: cannot read {args.path} or write {data_dir}: "
                        f"{e.strerror or e}", EXIT_USAGE) from None
    if args.json:
        print(json.dumps(entry))
    else:
        columns = ", ".join(f"{k} ({v})" for k, v in list(entry["schema"].items())[:8])
        print(f"bound {args.dataset} to {entry['path']} ({args.format}): {entry['rows']} rows; {columns}; schema "
              f"{entry['schema_sha256'][:12]}; read in place, it never leaves this node")
    return 0


def _hosts(specs: list[str]):
    from protocol.planning.stage_plan import Host

    hosts = []
    for spec in specs:
        mem, sep, tflops = spec.partition(":")
        try:
            hosts.append(Host(float(mem) * 2**30, float(tflops)))
        except ValueError:
            raise NodeError(f"--host {spec!r}: expected MEM_GIB:TFLOPS with positive numbers, e.g. 8:20",
                            EXIT_USAGE) from None
        if not sep:
            raise NodeError(f"--host {spec!r}: expected MEM_GIB:TFLOPS, e.g. 8:20", EXIT_USAGE)
    return hosts


def cmd_split(args: argparse.Namespace) -> int:
    from node.ml.models import minilm_path
    from node.ml.splitter import load_model_dir, plan_for_model, split_model
    from node.runtime.identity import load_or_create_key

    if (args.strategy == "memory_aware") != bool(args.host):
        raise NodeError("--host goes with --strategy memory_aware (one per stage), and memory_aware needs them",
                        EXIT_USAGE)
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
    key_path = config_from(args).identity_path
    key, created = load_or_create_key(key_path)
    if created:
        print(f"swarmnode: created a new identity key at {key_path}: it signs the shard manifest (pass --home to "
              f"sign as a node's own identity)", file=sys.stderr)
    manifest = split_model(model, plan.spans, args.out, key)
    if args.json:
        print(json.dumps({"strategy": plan.strategy, "stages": plan.rows(), "model_hash": manifest.model_hash,
                          "splitter": manifest.splitter, "out": str(args.out),
                          "shards": [{"start": s.start, "end": s.end, "file": s.file, "size": s.size,
                                      "sha256": s.sha256} for s in manifest.shards]}, default=str))
        return 0
    print(f"{manifest.arch}, {manifest.num_layers} layers, {plan.strategy} into {len(plan.spans)} stages "
          f"(cost = parameters):")
    print(plan.table())
    print(f"wrote {len(manifest.shards)} shards + manifest to {args.out}, signed by {manifest.splitter} "
          f"(model {manifest.model_hash[:16]}...)")
    return 0
