"""Model folder jobs through the real CLI and daemons: a LoRA fine-tune of a tiny GPT-2 saved with save_pretrained
(2 participants, each on its own text files bound with `swarmnode data add --format text`; the base fetched
and verified by the non-submitter), ending with one adapter hash on both and
an eval loss below the start, exported in peft's format (PeftModel.from_pretrained on the base folder) and merged;
a third node that never took part exports it too, refusing the submitter's tampered store copy with the file's
name and fetching it from the other participant; a folder asking for remote code refused at submit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from node.devtools.localswarm import wait_for
from tests.conftest import run_cli
from tests.test_bad_input import assert_one_line_error
from tests.test_hf_models import tiny_gpt2
from tests.test_model_files import flip_a_byte

LORA_JOB = """
name = "lora-test"
dataset = "notes"
task = "causal-lm"
rounds = 3
local_steps = 8
batch_size = 8
density = 0.5
min_participants = 2
round_timeout_s = 30
[data]
kind = "text"
block_size = 64
[model]
path = "./base"
[adapter]
r = 4
alpha = 8.0
[inner]
kind = "adamw"
lr = 0.01
"""


def write_notes(folder, seed: int, documents: int = 12):
    """Plain-text notes: sentences over a small vocabulary, so a byte-level model has something to learn."""
    rng = np.random.default_rng(seed)
    words = ["the", "node", "trains", "a", "model", "on", "its", "own", "text", "and", "shares", "only", "updates"]
    folder.mkdir(parents=True)
    for d in range(documents):
        sentences = [" ".join(rng.choice(words, size=rng.integers(4, 9))) + "." for _ in range(30)]
        (folder / f"note{d:02d}.txt").write_text(" ".join(sentences).capitalize() + "\n")


def start(node_factory, tmp_path, n: int, with_data: int):
    nodes = []
    for i in range(n):
        args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "lora"]
        if nodes:
            args += ["--join", nodes[0].addr]
        nodes.append(node_factory(f"n{i}", args).wait_ready() if not nodes else node_factory(f"n{i}", args))
        if i < with_data:  # this node's own text files: one document per file, bound with `data add`
            write_notes(tmp_path / f"notes{i}", seed=i)
            added = run_cli("data", "add", "notes", str(tmp_path / f"notes{i}"), "--format", "text",
                            "--home", str(nodes[-1].home))
            assert added.returncode == 0, added.stderr
    for node in nodes[1:]:
        node.wait_ready()
    return nodes


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft reads it on load
def test_a_lora_fine_tune_of_a_model_folder(node_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    nodes = start(node_factory, tmp_path, 3, with_data=2)
    tiny_gpt2(tmp_path / "base")
    (tmp_path / "job.toml").write_text(LORA_JOB)
    result = run_cli("submit", str(tmp_path / "job.toml"), "--follow", "--json", "--home", str(nodes[0].home),
                     timeout=150)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    job_id, last = events[0]["job_id"], events[-1]
    assert last["state"] == "done" and last["round"] == 3 and len(last["participants"]) == 2
    paths = [n.home / "jobs" / job_id / "manifest.json" for n in nodes[:2]]
    wait_for(lambda: all(p.exists() for p in paths), 30, "both participants' exports")  # written after the follow
    manifests = [json.loads(p.read_text()) for p in paths]
    assert manifests[0]["model_hash"] == manifests[1]["model_hash"] == last["model_hash"]  # one adapter hash
    assert all("lora_" in name for name in manifests[0]["tensors"])  # only the adapter trained and travelled
    report = json.loads((nodes[0].home / "jobs" / job_id / "report.json").read_text())
    losses = [r["metrics"]["loss"] for r in report if r["ok"] and r["metrics"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert "refused" not in nodes[1].log_path.read_text(errors="replace")  # n1 fetched the base intact
    # the exported adapter is peft's: it loads on the base folder
    exported = nodes[0].home / "jobs" / job_id
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True, use_safetensors=True)
    model = PeftModel.from_pretrained(base, exported).eval()
    with torch.no_grad():
        assert math.isfinite(model(input_ids=torch.arange(16)[None]).logits.sum().item())
    # a node that never took part exports it: the submitter's store copy was altered, so it is refused with the
    # file's name and the base comes from the other participant; --merge writes the merged model too
    store_copy = next((nodes[0].home / "models").glob("[0-9a-f]*")) / "model.safetensors"
    flip_a_byte(store_copy)
    out = tmp_path / "exported"
    written = run_cli("job", job_id, "--export", str(out), "--merge", "--json", "--home", str(nodes[2].home),
                      timeout=120)
    assert written.returncode == 0, written.stderr[-1500:]
    assert json.loads(written.stdout.splitlines()[-1])["model_hash"] == last["model_hash"]
    log = nodes[2].log_path.read_text(errors="replace")
    assert f"model file model.safetensors from {nodes[0].peer_id} refused" in log
    assert {"adapter_config.json", "adapter_model.safetensors", "merged"} <= {p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", local_files_only=True, use_safetensors=True)
    assert merged.config.n_layer == 2
    assert_one_line_error(run_cli("job", job_id, "--merge", "--home", str(nodes[2].home)), 2, "--merge goes with")


def test_a_model_folder_asking_for_remote_code_is_refused_at_submit(node_factory, tmp_path):
    node = node_factory("n0", ["--listen", "/ip4/127.0.0.1/tcp/0"]).wait_ready()
    folder = tiny_gpt2(tmp_path / "base")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "x.Model"}}))
    (tmp_path / "job.toml").write_text(LORA_JOB)
    assert_one_line_error(run_cli("submit", str(tmp_path / "job.toml"), "--home", str(node.home)), 2,
                          "job.toml", "config.json names remote code ('auto_map')", "trust_remote_code")
    assert not (node.home / "models").exists() or not list((node.home / "models").iterdir())


PIPE_JOB = """
kind = "pipeline"
name = "folder-pipe"
dataset = "notes"
round_timeout_s = 20
[data]
kind = "text"
block_size = 32
[pipeline]
stages = 2
micro_batch = 4
micro_batches = 2
steps = 4
[model]
path = "./base"
[inner]
kind = "adamw"
lr = 0.003
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_pipeline_job_cuts_a_model_folder_with_its_pretrained_weights(node_factory, tmp_path):
    """The submitter's own text files and a GPT-2 folder (untied head, as stages need): the stage shards are cut
    from the folder's pretrained weights (the shard manifest's model hash is the folder's), trained over two hosts;
    a folder of a class the stage code cannot cut (tied weights here) is refused naming the field."""
    from node.jobs.pipeline.pipeline_jobs import PIPELINE_CLASSES
    from node.ml.models import params_sha256
    from node.ml.splitter import load_model_dir, read_manifest

    assert "GPT2LMHeadModel" in PIPELINE_CLASSES
    nodes = start(node_factory, tmp_path, 3, with_data=1)
    folder = tiny_gpt2(tmp_path / "base", seed=7, tie_word_embeddings=False)
    pretrained = params_sha256(load_model_dir(folder))
    (tmp_path / "job.toml").write_text(PIPE_JOB)
    result = run_cli("submit", str(tmp_path / "job.toml"), "--follow", "--json", "--home", str(nodes[0].home),
                     timeout=200)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    job_id, last = events[0]["job_id"], events[-1]
    assert last["state"] == "done" and last["round"] == 4, last
    submitter = nodes[0].peer_id
    initial = read_manifest(nodes[0].home / "jobs" / job_id / "shards", trusted_signers=[submitter])
    assert initial.model_hash == pretrained and len(initial.shards) == 2
    trained = read_manifest(nodes[0].home / "jobs" / job_id / "trained", trusted_signers=[submitter])
    assert trained.model_hash != pretrained
    tied = tiny_gpt2(tmp_path / "tied" / "base")  # tie_word_embeddings defaults to true
    (tmp_path / "tied" / "job.toml").write_text(PIPE_JOB)
    assert_one_line_error(run_cli("submit", str(tmp_path / "tied" / "job.toml"), "--home", str(nodes[0].home)), 2,
                          "model.tie_word_embeddings")
    assert tied.is_dir()
