"""Pipeline jobs through the real CLI and daemons (node/pipelinejobs.py): a tiny untied GPT-2 cut into 2 stages
x 2 replicas hosted by four daemons, trained by the submitting daemon on its byte corpus; followed to done, the
loss goes down, the replicas of each stage end with the same parameters, the trained shards are written and
signed; a daemon left out shows "not assigned"; bad pipeline job files are refused with one line naming the
field."""

from __future__ import annotations

import json
import time

import pytest

from node.datasets import write_node_data
from node.localswarm import wait_for
from node.splitter import read_manifest
from tests.conftest import run_cli
from tests.test_bad_input import assert_one_line_error

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
STEPS = 8
JOB = f"""
kind = "pipeline"
name = "tiny-pipe"
dataset = "pystdlib-bytes"
density = 0.5
round_timeout_s = 20
[pipeline]
stages = 2
strategy = "balanced"
replicas = 2
micro_batch = 4
micro_batches = 2
steps = {STEPS}
[model]
arch = "gpt2"
n_layer = 4
n_embd = 64
n_head = 4
n_positions = 32
tie_word_embeddings = false
[inner]
kind = "adamw"
lr = 0.003
"""


def start_pipeline_swarm(node_factory, tmp_path, n: int):
    """n daemons in swarm "pipe"; the first (the submitter) holds the byte corpus."""
    data = tmp_path / "data0"
    write_node_data("pystdlib-bytes", data / "pystdlib-bytes", n_nodes=1, node_index=0, seed=0)
    args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "pipe"]
    first = node_factory("n0", [*args, "--data", str(data)]).wait_ready()
    nodes = [first] + [node_factory(f"n{i}", [*args, "--join", first.addr]) for i in range(1, n)]
    for node in nodes[1:]:
        node.wait_ready()

    def sees_all() -> bool:
        out = run_cli("peers", "--json", "--home", str(first.home))
        return out.returncode == 0 and len(json.loads(out.stdout)) >= n

    wait_for(sees_all, 60, f"the submitter to see all {n} peers")
    return nodes


def job_on(node, job_id: str) -> dict:
    out = run_cli("job", job_id, "--json", "--home", str(node.home))
    assert out.returncode == 0, out.stderr[-1500:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.timeout(420)
def test_pipeline_job_trains_across_daemons(node_factory, tmp_path):
    nodes = start_pipeline_swarm(node_factory, tmp_path, 6)  # the trainer, 4 hosts, one left out
    bad = tmp_path / "bad.toml"
    for text, field in ((JOB.replace("stages = 2", "stages = 5"), "pipeline.stages"),
                        (JOB.replace('"balanced"', '"zigzag"'), "pipeline.strategy"),
                        (JOB.replace("tie_word_embeddings = false", "tie_word_embeddings = true"),
                         "model.tie_word_embeddings"),
                        (JOB.replace("replicas = 2", "replicas = 3"), "pipeline.replicas")):
        bad.write_text(text)
        assert_one_line_error(run_cli("submit", str(bad), "--home", str(nodes[0].home)), 2, field)

    job_file = tmp_path / "job.toml"
    job_file.write_text(JOB)
    t0 = time.monotonic()
    result = run_cli("submit", str(job_file), "--follow", "--json", "--home", str(nodes[0].home), timeout=360)
    print(f"pipeline job: {STEPS} steps in {time.monotonic() - t0:.1f} s")
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    job_id = events[0]["job_id"]
    assert events[-1]["state"] == "done" and events[-1]["round"] == STEPS, events[-1]
    losses = {e["round"]: e["train_loss"] for e in events[1:] if e.get("train_loss") is not None}
    print("losses:", losses)
    assert losses[STEPS] < losses[min(losses)], losses
    assert events[-1]["bytes_exchanged"] > 0 and len(events[-1]["participants"]) == 4

    out = nodes[0].home / "jobs" / job_id
    summary = json.loads((out / "pipeline.json").read_text())
    assert [s["step"] for s in summary["stages"]] == [STEPS, STEPS]
    for stage in summary["stages"]:  # every replica of a stage holds the same parameters
        assert len(stage["replicas"]) == 2 and set(stage["replicas"].values()) == {stage["params_hash"]}, stage
    submitter = json.loads(run_cli("status", "--json", "--home", str(nodes[0].home)).stdout)["peer_id"]
    trained = read_manifest(out / "trained", trusted_signers=[submitter])
    assert trained.model_hash == summary["model_hash"] and len(trained.shards) == 2

    # each host's own view: the stage it hosts, at the last step, with its stage's hash; one node was left out
    hashes = {s["params_hash"] for s in summary["stages"]}

    def hosts_at_the_end():  # a host applies the last step's average a moment after the trainer's summary
        hosting = [v for v in (job_on(n, job_id) for n in nodes[1:]) if v["local_model_hash"]]
        return len(hosting) == 4 and all(v["local_round"] == STEPS and v["local_model_hash"] in hashes for v in hosting)

    wait_for(hosts_at_the_end, 30, "every host to report the last step with its stage's hash", interval=0.5)
    views = [job_on(n, job_id) for n in nodes[1:]]
    listed = json.loads(run_cli("jobs", "--json", "--home", str(next(
        n for n, v in zip(nodes[1:], views) if not v["local_model_hash"]).home)).stdout)
    assert listed[0]["job_id"] == job_id and listed[0]["declined"] == "not assigned"
