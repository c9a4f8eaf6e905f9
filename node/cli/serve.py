"""``swarmnode serve``, ``generate`` and ``embed``: serve a model across the swarm's nodes and ask it.

    swarmnode serve ./my-gpt2 --stages 2 [--replicas 2]     # a model folder, a job's export, or "minilm"
    swarmnode generate my-gpt2 "def main(" --max-tokens 32   # the model's name or its job id
    swarmnode embed minilm "first sentence" "second one"      # JSON: one vector per text

``serve`` submits a served model (kind = "serve", node/jobs/serve/serve_jobs.py) to the local daemon, which places
its stages on live peers as a pipeline job's, then waits for the daemon's endpoint (<home>/jobs/JOB/serving.json)
and prints its URL: an OpenAI-compatible API (POST /v1/completions, /v1/embeddings) any HTTP client can use.
``generate`` and ``embed`` are such clients: they read serving.json and the endpoint's token file (when it is bound
off loopback) from the node's home and POST to it. ``swarmnode cancel JOB`` stops serving.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import urllib.error
import urllib.request

from node.runtime.errors import EXIT_FAILURE, EXIT_USAGE, NodeError

SERVING_FILE = "serving.json"  # what node/jobs/serve/serve_jobs.py writes (the CLI does not import the daemon's code)
ENCODER_CLASSES = ("BertModel",)


def model_folder(model: str, home: pathlib.Path, tokenizer: pathlib.Path | None = None) -> pathlib.Path:
    """The folder to serve: 'minilm', a model folder, or a job's export turned into one under <home>/served/
    (node/ml/servable.py: a federated arch job's export, an adapter's merged model, a pipeline job's trained
    shards)."""
    if model == "minilm" and tokenizer is None:
        from node.ml.models import minilm_path

        try:
            return minilm_path()
        except ValueError as e:
            raise NodeError(str(e), EXIT_USAGE) from None
    path = pathlib.Path(model).expanduser().resolve()
    if (path / "config.json").is_file() and not (path / "manifest.json").is_file() and tokenizer is None:
        return path  # a model folder as it is
    from node.ml.servable import servable_folder

    try:
        return servable_folder(path, home / "served" / path.name, tokenizer, models=home / "models")
    except ValueError as e:
        raise NodeError(str(e), EXIT_USAGE) from None  # it names the folder


def served_task(folder: pathlib.Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise NodeError(f"{folder}/config.json: cannot read it ({e})", EXIT_USAGE) from None
    archs = config.get("architectures") if isinstance(config, dict) else None
    return "embedding" if isinstance(archs, list) and archs and archs[0] in ENCODER_CLASSES else "causal-lm"


def serve_toml(name: str, folder: pathlib.Path, task: str, stages: int, replicas: int, strategy: str) -> str:
    return (f'kind = "serve"\nname = {json.dumps(name)}\ntask = "{task}"\n[pipeline]\nstages = {stages}\n'
            f'replicas = {replicas}\nstrategy = "{strategy}"\n[model]\npath = {json.dumps(str(folder))}\n')


def find_serving(home: pathlib.Path, which: str) -> dict:
    """The serving.json of the served model named ``which`` (or with that job id) this node serves."""
    found = []
    for path in sorted((home / "jobs").glob(f"*/{SERVING_FILE}")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and which in (info.get("job_id"), info.get("model")):
            found.append(info)
    if not found:
        raise NodeError(f"no model {which!r} is served from this node (swarmnode serve MODEL; swarmnode jobs lists the "
                        "swarm's)", EXIT_USAGE)
    if len(found) > 1:
        raise NodeError(f"{len(found)} served models are named {which!r}: name one by its job id "
                        f"({', '.join(i['job_id'] for i in found)})", EXIT_USAGE)
    return found[0]


def post(info: dict, path: str, body: dict, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if info.get("token_file"):
        try:
            headers["Authorization"] = "Bearer " + pathlib.Path(info["token_file"]).read_text().strip()
        except OSError as e:
            raise NodeError(f"{info['token_file']}: cannot read the endpoint's token ({e.strerror or e})") from None
    request = urllib.request.Request(info["url"] + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise NodeError(f"the endpoint refused: {message} (HTTP {e.code})",
                        EXIT_USAGE if 400 <= e.code < 500 else EXIT_FAILURE) from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise NodeError(f"cannot reach the endpoint at {info['url']}: {getattr(e, 'reason', e)}") from None


def cmd_serve(args: argparse.Namespace, config) -> int:
    from node.api.client import ControlClient

    folder = model_folder(args.model, config.home_dir, args.tokenizer)
    task = served_task(folder)
    name = args.name or ("minilm" if args.model == "minilm" else pathlib.Path(args.model).name)
    text = serve_toml(name, folder, task, args.stages, args.replicas, args.strategy)
    with ControlClient(config) as client:
        job_id = client.submit(text, "swarmnode serve").job_id
    serving = config.home_dir / "jobs" / job_id / SERVING_FILE
    deadline = time.monotonic() + args.wait
    while not serving.exists():
        if time.monotonic() > deadline:
            raise NodeError(f"job {job_id}: the endpoint did not come up within {args.wait:g} s (swarmnode job "
                            f"{job_id} says why)", EXIT_FAILURE)
        time.sleep(0.2)
    info = json.loads(serving.read_text())
    print(json.dumps(info) if args.json else
          f"serving {info['model']} ({info['kind']}, {info['stages']} stages) at {info['url']}  (job {job_id}; "
          f"swarmnode cancel {job_id} stops it)", flush=True)
    return 0


def cmd_generate(args: argparse.Namespace, config) -> int:
    info = find_serving(config.home_dir, args.model)
    body: dict = {"model": info["model"], "prompt": args.prompt, "max_tokens": args.max_tokens,
                  "temperature": args.temperature}
    if args.seed is not None:
        body["seed"] = args.seed
    if args.stop:
        body["stop"] = args.stop
    reply = post(info, "/completions", body, args.timeout)
    print(json.dumps(reply) if args.json else reply["choices"][0]["text"], flush=True)
    return 0


def cmd_embed(args: argparse.Namespace, config) -> int:
    info = find_serving(config.home_dir, args.model)
    reply = post(info, "/embeddings", {"model": info["model"], "input": args.texts}, args.timeout)
    vectors = [d["embedding"] for d in sorted(reply["data"], key=lambda d: d["index"])]
    print(json.dumps(reply if args.json else vectors), flush=True)
    return 0


def add_parsers(sub, add_common) -> None:
    serve = sub.add_parser("serve", help="serve a model across the swarm's nodes (an OpenAI-compatible endpoint)")
    add_common(serve)
    serve.add_argument("model", help="a model folder (config.json + safetensors, its tokenizer beside it, or a "
                                     "byte-level model), a job's export (federated, an adapter's with --merge, a "
                                     "pipeline job's folder) or 'minilm' (the bundled all-MiniLM-L6-v2 encoder)")
    serve.add_argument("--tokenizer", type=pathlib.Path, help="a folder whose tokenizer to serve the model with (an "
                                                              "export carries none; byte-level models need none)")
    serve.add_argument("--stages", type=int, required=True, help="stages, each hosted by other nodes")
    serve.add_argument("--replicas", type=int, default=1, help="hosts per stage (default 1)")
    serve.add_argument("--strategy", choices=("layer_wise", "balanced", "memory_aware"), default="balanced")
    serve.add_argument("--name", help="the name clients pass as \"model\" (default: the folder's name)")
    serve.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the endpoint (default 120)")
    generate = sub.add_parser("generate", help="generate text with a model this node serves")
    add_common(generate)
    generate.add_argument("model", help="the served model's name or job id")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", help="stop at this text (up to 4)")
    generate.add_argument("--timeout", type=float, default=300.0)
    embed = sub.add_parser("embed", help="embed texts with a model this node serves (JSON: one vector per text)")
    add_common(embed)
    embed.add_argument("model", help="the served model's name or job id")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--timeout", type=float, default=300.0)


__all__ = ["add_parsers", "cmd_embed", "cmd_generate", "cmd_serve"]
