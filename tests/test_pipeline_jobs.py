"""Pipeline jobs through the real CLI and daemons (node/jobs/pipeline/pipeline_jobs.py): a tiny untied GPT-2 cut into 2
stages x 2 replicas hosted by four daemons, trained by the submitting daemon on its byte corpus; followed to done, the
loss goes down, the replicas of each stage end with the same parameters, the trained shards are written and
signed; a daemon left out shows "not assigned"; bad pipeline job files are refused with one line naming the
field."""

from __future__ import annotations

import json
import math
import time
import urllib.request
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.devtools.localswarm import wait_for
from node.jobs.pipeline.pipeline_jobs import PipelineJobs
from node.jobs.pipeline.stage_config import StageConfig
from node.jobs.pipeline.stage_host import StageHost
from node.ml.datasets import write_node_data
from node.ml.models import build_model
from node.ml.splitter import load_stage, memory_aware_plan, plan_for_model, read_manifest, split_model
from protocol.planning.stage_assign import NodeSpec
from protocol.planning.stage_plan import Host, plan_from_json, plan_to_json
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


@pytest.mark.slow  # ~40 s with its teardown: in `make chaos` (CI's own step), keeping `make test` under 10 minutes
@pytest.mark.timeout(420)
def test_pipeline_job_trains_across_daemons(node_factory, tmp_path):
    nodes = start_pipeline_swarm(node_factory, tmp_path, 6)  # the trainer, 4 hosts, one left out
    bad = tmp_path / "bad.toml"
    for text, field in ((JOB.replace("stages = 2", "stages = 5"), "pipeline.stages"),
                        (JOB.replace('"balanced"', '"zigzag"'), "pipeline.strategy"),
                        (JOB.replace("tie_word_embeddings = false", "tie_word_embeddings = true"),
                         "model.tie_word_embeddings"),
                        (JOB.replace("replicas = 2", "replicas = 3"), "pipeline.replicas"),
                        (JOB + "x = " + "[" * 1000 + "]" * 1000 + "\n", "not valid TOML: nested too deeply")):
        bad.write_text(text)
        assert_one_line_error(run_cli("submit", str(bad), "--home", str(nodes[0].home)), 2, field)

    job_file = tmp_path / "job.toml"
    # 40 s: --follow gives up when no step is done within one round timeout of the submission; in a CI-like chaos run
    # the four hosts took ~11 s to fetch and load their shards and step 0's first averaging round found no group,
    # so the first step came after 20 s
    job_file.write_text(JOB.replace("round_timeout_s = 20", "round_timeout_s = 40"))
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
    evals = {e["round"]: e["eval_metric"] for e in events[1:] if e.get("eval_metric") is not None}
    print("bits per byte on the test split:", evals)
    assert STEPS in evals and evals[STEPS] < evals[min(evals)], evals  # eval_every = 1 (the default)
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
    check_the_trainers_dashboard(nodes[0], job_id, summary, losses)


def check_the_trainers_dashboard(trainer, job_id: str, summary: dict, losses: dict) -> None:
    """The trainer's dashboard shows every step's throughput and the bottleneck stage, the same entries as the
    export's pipeline.json, each step's loss as --follow printed it, and /metrics the last step's figures."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.test_dashboard_live import dashboard_url, fetch

    url = dashboard_url(trainer)
    job = next(j for j in json.loads(fetch(url + "api/state"))["jobs"] if j["job_id"] == job_id)
    steps = job["history"]
    assert steps == summary["history"] and [e["round"] for e in steps] == list(range(1, STEPS + 1))
    by_round = {e["round"]: e["train_loss"] for e in steps}  # --follow printed some of the steps (it polls)
    assert {r: by_round[r] for r in losses} == {r: pytest.approx(v) for r, v in losses.items()}
    for e in steps:
        assert e["tokens_per_s"] > 0 and e["tokens"] == 4 * 2 * 32, e  # micro_batch x micro_batches x positions
        assert e["stage_replicas"] == [2, 2] and len(e["stage_load_s"]) == 2 and min(e["stage_load_s"]) > 0, e
        assert e["stage_load_s"][e["bottleneck_stage"]] == max(e["stage_load_s"]), e
    with urllib.request.urlopen(url + "metrics", timeout=20) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    speed = {s.labels["job_id"]: s.value for s in families["swarmnode_pipeline_tokens_per_second"].samples}
    assert speed[job_id] == pytest.approx(steps[-1]["tokens_per_s"])
    neck = {s.labels["job_id"]: s.value for s in families["swarmnode_pipeline_bottleneck_stage"].samples}
    assert neck[job_id] == steps[-1]["bottleneck_stage"]
    print("tokens/s per step:", [round(e["tokens_per_s"]) for e in steps], "bottleneck:",
          [e["bottleneck_stage"] for e in steps])


CHURN_STEPS = 250  # ~0.1 s each on an idle machine: the job outlasts the joiner and the kill
CHURN_JOB = JOB.replace("replicas = 2", "replicas = 1\nmax_replicas = 2").replace(f"steps = {STEPS}", (
    f"steps = {CHURN_STEPS}")).replace('"balanced"', '"memory_aware"').replace(
    "round_timeout_s = 20", "round_timeout_s = 20\neval_every = 10")


def stage_hosts(node, job_id: str) -> list[list[str]]:
    """The record's hosts per stage, as `swarmnode job` reports them (the submitter rewrites them)."""
    with node.client() as c:
        info = next(iter(c.job(job_id, follow=False)))
    return [group.split(",") for group in info.stage_hosts]


# ~60 s: in `make chaos` (CI's own step), so that `make test` stays under 10 minutes on 2 cores; the trainer's
# catch-up and advance logic it relies on is also tested in-process in tests/test_pipeline.py (in `make test`)
@pytest.mark.chaos
@pytest.mark.timeout(420)
def test_pipeline_job_places_a_joiner_and_reassigns_a_stage_whose_last_host_died(node_factory, tmp_path):
    """2 stages x 1 host (max_replicas 2, memory_aware). A daemon joining mid-job is placed on the bottleneck stage and
    serves it from the swarm's latest state; then the other stage's only host is SIGKILLed: once its peer record
    expires the trainer moves one host of the 2-replica stage over, which loads the dead stage's state from
    the backup its neighbour held; the job finishes with every stage at the last step and its replicas equal."""
    nodes = start_pipeline_swarm(node_factory, tmp_path, 3)
    trainer = nodes[0]
    job_file = tmp_path / "job.toml"
    job_file.write_text(CHURN_JOB)
    out = run_cli("submit", str(job_file), "--json", "--home", str(trainer.home), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    job_id = json.loads(out.stdout)["job_id"]
    first = stage_hosts(trainer, job_id)
    assert sorted(p for g in first for p in g) == sorted(n.peer_id for n in nodes[1:])
    assert all(len(g) == 1 for g in first)
    wait_for(lambda: job_on(trainer, job_id)["round"] >= 2, 120, "two steps before the joiner", interval=0.5)

    joiner = node_factory("joiner", ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "pipe", "--join", trainer.addr])
    joiner.wait_ready()
    t_join = time.monotonic()

    def joiner_serving():
        view = job_on(joiner, job_id)
        return view if view["local_model_hash"] and view["local_round"] >= 2 else None

    served = wait_for(joiner_serving, 120, "the joiner to load its stage's state and serve it", interval=0.5)
    hosts = stage_hosts(trainer, job_id)
    placed = next(s for s, g in enumerate(hosts) if joiner.peer_id in g)
    assert len(hosts[placed]) == 2 and len(hosts[1 - placed]) == 1, hosts
    print(f"joiner: placed on stage {placed}, serving at step {served['local_round']} after "
          f"{time.monotonic() - t_join:.1f} s")

    victim = next(n for n in nodes[1:] if n.peer_id == hosts[1 - placed][0])
    at_kill = job_on(trainer, job_id)["round"]
    wait_for(lambda: job_on(trainer, job_id)["round"] > at_kill, 60, "a step with the joiner", interval=0.5)
    victim.kill_hard()
    t_kill, at_kill = time.monotonic(), job_on(trainer, job_id)["round"]

    def reassigned():
        h = stage_hosts(trainer, job_id)
        return h if victim.peer_id not in h[1 - placed] and h[1 - placed] else None

    moved = wait_for(reassigned, 60, "the dead stage to be reassigned", interval=0.5)
    assert len(moved[placed]) == 1 and {*moved[placed], *moved[1 - placed]} <= {n.peer_id for n in [*nodes, joiner]}
    wait_for(lambda: job_on(trainer, job_id)["round"] > at_kill + 1, 180, "training to resume", interval=0.5)
    print(f"stage {1 - placed}: its last host SIGKILLed at step {at_kill}; reassigned and two steps done "
          f"{time.monotonic() - t_kill:.1f} s later")

    done = run_cli("job", job_id, "--follow", "--json", "--home", str(trainer.home), timeout=300)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["state"] == "done" and events[-1]["round"] == CHURN_STEPS, events[-1]
    summary = json.loads((trainer.home / "jobs" / job_id / "pipeline.json").read_text())
    assert [s["step"] for s in summary["stages"]] == [CHURN_STEPS, CHURN_STEPS]
    for stage in summary["stages"]:
        assert set(stage["replicas"].values()) == {stage["params_hash"]}, stage
        assert victim.peer_id not in stage["replicas"]


def test_memory_aware_plan_sizes_stages_for_the_chosen_hosts():
    """node/jobs/pipeline/pipeline_jobs.py memory_aware_plan: the group with more memory gets the larger stage,
    whichever order along the pipeline that needs; a model that fits no order is refused naming why."""
    model = build_model("gpt2", {"n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": 32,
                                 "tie_word_embeddings": False}, 0).module
    need = plan_for_model(model, [Host(math.inf, 1.0)], "memory_aware").memory[0]  # the whole model, one stage
    big, small = NodeSpec("big", 1.0, 0.9 * need), NodeSpec("small", 1.0, 0.45 * need)
    plan, groups = memory_aware_plan(model, [small, big], 2, 1)
    by_stage = [g[0].node_id for g in groups]
    for memory, node in zip(plan.memory, by_stage):
        assert memory <= {"big": big, "small": small}[node].memory_bytes
    assert plan.memory[by_stage.index("big")] > plan.memory[by_stage.index("small")]
    with pytest.raises(ValueError, match="the model does not fit"):
        memory_aware_plan(model, [NodeSpec("a", 1.0, 0.3 * need), NodeSpec("b", 1.0, 0.3 * need)], 2, 1)
    assert plan_from_json(plan_to_json(plan)) == plan  # kept in <home>/jobs/J/plan.json for a restarted trainer


RESTART_STEPS = 120


# ~30 s: in `make chaos` (CI's own step), so that `make test` stays under 10 minutes on 2 cores
@pytest.mark.chaos
@pytest.mark.timeout(300)
def test_a_killed_trainer_restarts_and_resumes_where_the_replicas_are(node_factory, tmp_path):
    """The submitter trains; SIGKILL it mid-job and start it again on the same home (same identity, shards,
    plan): it learns the step from the replicas, resumes after its last published step (the replicas drop the
    dead attempt's commits) and finishes with every stage at the last step."""
    nodes = start_pipeline_swarm(node_factory, tmp_path, 3)
    trainer = nodes[0]
    job_file = tmp_path / "job.toml"
    job_file.write_text(JOB.replace("replicas = 2", "replicas = 1").replace(f"steps = {STEPS}", (
        f"steps = {RESTART_STEPS}")).replace("round_timeout_s = 20", "round_timeout_s = 20\neval_every = 10"))
    out = run_cli("submit", str(job_file), "--json", "--home", str(trainer.home), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    job_id = json.loads(out.stdout)["job_id"]
    wait_for(lambda: job_on(nodes[1], job_id)["round"] >= 10, 120, "ten steps", interval=0.2)
    trainer.kill_hard()
    at_kill = job_on(nodes[1], job_id)["round"]
    assert at_kill < RESTART_STEPS
    trainer.args += ["--join", nodes[1].addr]  # it was the swarm's first node; now it rejoins through a host
    trainer.start().wait_ready()
    t0 = time.monotonic()
    wait_for(lambda: job_on(trainer, job_id)["round"] > at_kill + 1, 120, "the trainer to resume", interval=0.5)
    print(f"trainer SIGKILLed after step {at_kill}; restarted, two more steps {time.monotonic() - t0:.1f} s later")
    done = run_cli("job", job_id, "--follow", "--json", "--home", str(trainer.home), timeout=240)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["state"] == "done" and events[-1]["round"] == RESTART_STEPS, events[-1]
    summary = json.loads((trainer.home / "jobs" / job_id / "pipeline.json").read_text())
    assert [s["step"] for s in summary["stages"]] == [RESTART_STEPS] * 2, summary


def test_a_stage_state_older_than_the_trainer_is_taken_at_the_trainers_step(tmp_path):
    """_catch_up: when the newest state anyone holds of a stage is older than the trainer's step (its last
    replica died before that state was backed up), the new host takes it at the trainer's step (those updates
    of the stage are lost; the job goes on) -- but never while some peer announces the trainer's step."""
    model = build_model("gpt2", {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 16,
                                 "tie_word_embeddings": False}, 0).module
    split_model(model, [(0, 1), (1, 2)], tmp_path / "shards", Ed25519PrivateKey.generate())
    view = SimpleNamespace(round=86, record=SimpleNamespace(job_id="j"))

    def host_at(step: int) -> StageHost:
        me = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "me"))  # never started: no transport used
        host = StageHost(me, None, "j", 0, load_stage(tmp_path / "shards", 0), StageConfig(swarm="s"))
        host.skip_to(step)
        return host

    lagging = host_at(85)
    assert "1 step(s) of this stage lost" in PipelineJobs._catch_up(view, lagging, [(85, "p")], "a backup")
    assert lagging.step == 86
    twin = host_at(85)
    assert PipelineJobs._catch_up(view, twin, [(86, "live twin"), (85, "p")], "a backup") == "a backup"
    assert twin.step == 85  # the trainer tells it to resync from its twin instead
    with pytest.raises(ValueError, match="cannot go back"):
        host_at(86).skip_to(85)
