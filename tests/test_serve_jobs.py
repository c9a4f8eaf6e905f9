"""Served models through the real CLI and daemons (node/jobs/serve/serve_jobs.py, node/cli/serve.py): `swarmnode serve`
places a tiny GPT-2 folder's 2 stages and the bundled MiniLM's 3 stages on other daemons; `swarmnode generate`
returns transformers' own greedy tokens and `swarmnode embed` the unsplit encoder's embeddings, through the
submitting daemon's OpenAI-compatible endpoint; bad requests and bad serve commands are one-line errors; cancelling
stops the endpoint and every host."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
import transformers

from node.devtools.localswarm import wait_for
from node.ml.models import minilm_path
from node.serving.local import mean_pool
from node.serving.text import ByteText
from tests.conftest import run_cli
from tests.test_bad_input import assert_one_line_error
from tests.test_pipeline_jobs import start_pipeline_swarm
from tests.test_serving_exports import gpt2_export

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
PROMPT = "def main():\n    "


def tiny_gpt2_folder(path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_layer=4, n_embd=32, n_head=2, n_positions=96,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(str(path), safe_serialization=True)
    return model


@pytest.mark.slow  # ~60 s, 4 daemons: in `make chaos` (CI's own step), keeping `make test` under 10 minutes
@pytest.mark.timeout(420)
def test_serve_generate_and_embed_across_daemons(node_factory, tmp_path):
    nodes = start_pipeline_swarm(node_factory, tmp_path, 4)  # the serving node and 3 stage hosts
    home = ["--home", str(nodes[0].home)]
    model = tiny_gpt2_folder(tmp_path / "tiny-gpt2")
    ids = ByteText(128).encode(PROMPT)
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                  pad_token_id=0)[0, len(ids):].tolist()

    for args, message in ((["serve", str(tmp_path), "--stages", "2"], "neither a model folder"),
                          (["serve", str(tmp_path / "tiny-gpt2"), "--stages", "9"], "pipeline.stages"),
                          (["serve", str(tmp_path / "tiny-gpt2"), "--stages", "2", "--replicas", "2"],
                           "need 4 hosts"),
                          (["generate", "nothing-served", "hi"], "no model 'nothing-served' is served")):
        assert_one_line_error(run_cli(*args, *home), 2, message)

    served = run_cli("serve", str(tmp_path / "tiny-gpt2"), "--stages", "2", "--json", *home, timeout=180)
    assert served.returncode == 0, served.stderr[-2000:]
    info = json.loads(served.stdout)
    assert info["model"] == "tiny-gpt2" and info["kind"] == "causal-lm" and info["url"].startswith("http://127.0.0.1:")
    out = run_cli("generate", "tiny-gpt2", PROMPT, "--max-tokens", "24", "--json", *home, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    reply = json.loads(out.stdout)
    assert ByteText(128).encode(reply["choices"][0]["text"]) == expected
    assert reply["usage"]["completion_tokens"] == 24
    plain = run_cli("generate", info["job_id"], PROMPT, "--max-tokens", "24", *home, timeout=120)
    assert plain.stdout.rstrip("\n") == ByteText(128).decode(expected).rstrip("\n")
    too_long = run_cli("generate", "tiny-gpt2", PROMPT, "--max-tokens", "500", *home)
    assert_one_line_error(too_long, 2, "the endpoint refused")

    # the stage hosts: two of the three other daemons serve a stage each, the third is not assigned
    def hosting() -> list[dict]:
        views = [json.loads(run_cli("job", info["job_id"], "--json", "--home", str(n.home)).stdout.splitlines()[-1])
                 for n in nodes[1:]]
        return views if sum(bool(v["local_model_hash"]) for v in views) == 2 else []

    wait_for(hosting, 30, "two daemons to report hosting a stage", interval=0.5)

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    encoder = transformers.BertModel.from_pretrained(str(minilm_path()), local_files_only=True,
                                                     add_pooling_layer=False).eval()
    texts = ["Volunteers pool their GPUs.", "A model split over three hosts."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = mean_pool(encoder(**enc).last_hidden_state, enc["attention_mask"])
    served = run_cli("serve", "minilm", "--stages", "3", "--json", *home, timeout=240)
    assert served.returncode == 0, served.stderr[-2000:]
    minilm = json.loads(served.stdout)
    assert minilm["kind"] == "encoder" and minilm["url"] != info["url"]
    out = run_cli("embed", "minilm", *texts, *home, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (torch.tensor(json.loads(out.stdout)) - reference).abs().max().item() <= 1e-5
    assert_one_line_error(run_cli("generate", "minilm", "hi", *home), 2, "is an encoder: use /v1/embeddings")

    cancelled = run_cli("cancel", info["job_id"], *home)
    assert cancelled.returncode == 0, cancelled.stderr

    def endpoint_gone() -> bool:
        try:
            urllib.request.urlopen(info["url"] + "/models", timeout=5)
        except (urllib.error.URLError, ConnectionError):
            return True
        return False

    wait_for(endpoint_gone, 30, "the cancelled model's endpoint to stop", interval=0.5)
    wait_for(lambda: not (nodes[0].home / "jobs" / info["job_id"] / "serving.json").exists(), 10, "serving.json gone")

    # a federated job's export served directly: the trained model's own greedy tokens
    trained = gpt2_export(tmp_path)
    ids = ByteText().encode(PROMPT)
    with torch.no_grad():
        expected = trained.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                    pad_token_id=0)[0, len(ids):].tolist()
    served = run_cli("serve", str(tmp_path / "export"), "--stages", "2", "--name", "trained", "--json", *home,
                     timeout=180)
    assert served.returncode == 0, served.stderr[-2000:]
    out = run_cli("generate", "trained", PROMPT, "--max-tokens", "16", "--json", *home, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # (a 256-byte vocabulary: bytes that are not UTF-8 come back as U+FFFD, as the endpoint's text decodes them)
    assert json.loads(out.stdout)["choices"][0]["text"] == ByteText().decode(expected)
    assert json.loads(out.stdout)["usage"]["completion_tokens"] == 16


@pytest.mark.chaos  # ~60 s, 4 daemons and a SIGKILL: in `make chaos` (CI's own step)
@pytest.mark.timeout(420)
def test_a_served_stages_host_killed_is_replaced_and_requests_still_get_the_same_tokens(node_factory, tmp_path):
    nodes = start_pipeline_swarm(node_factory, tmp_path, 4)  # the serving node, 2 stage hosts and a spare
    home = ["--home", str(nodes[0].home)]
    model = tiny_gpt2_folder(tmp_path / "tiny-gpt2")
    ids = ByteText(128).encode(PROMPT)
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                  pad_token_id=0)[0, len(ids):].tolist()
    served = run_cli("serve", str(tmp_path / "tiny-gpt2"), "--stages", "2", "--json", *home, timeout=180)
    assert served.returncode == 0, served.stderr[-2000:]
    job_id = json.loads(served.stdout)["job_id"]

    def stage_hosts() -> list[list[str]]:
        return json.loads(run_cli("job", job_id, "--json", *home).stdout.splitlines()[-1])["stage_hosts"]

    def ask() -> list[int]:
        out = run_cli("generate", "tiny-gpt2", PROMPT, "--max-tokens", "24", "--json", *home, timeout=240)
        assert out.returncode == 0, out.stderr[-2000:]
        return ByteText(128).encode(json.loads(out.stdout)["choices"][0]["text"])

    assert ask() == expected
    before = stage_hosts()
    victim = next(n for n in nodes[1:] if n.peer_id == before[1][0])
    victim.kill_hard()  # SIGKILL: its stage, its sessions and its p2pd go at once
    assert ask() == expected  # the endpoint waits for the stage's new host and replays
    after = stage_hosts()
    assert after[0] == before[0] and after[1] != before[1] and victim.peer_id not in after[1], (before, after)
    print(f"stage 1 moved from {before[1][0][-8:]} to {after[1][0][-8:]}")
