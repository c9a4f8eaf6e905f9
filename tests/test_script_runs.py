"""Runs from the user's own script (issue 15): swarmnode.Swarm / Optimizer over the daemon's round engine.

Fast: the parameter layout, the run's spec, the bridge between a script's thread and the runner. With real
processes (examples/own_script.py, each a whole node in the script; a `swarmnode run` daemon as the bootstrap):
two scripts with density 1.0 and the mean end exactly where plain FedAvg computed in this process ends (to the
fp16 values' tolerance); a script whose model differs is refused with the first difference; the run is listed by
the daemon, which takes no part in it, and exported there with the script's parameter names. In `make chaos`:
three scripts, one SIGKILLed mid-run and started again on its home, all end on one hash above the start; Ctrl-C
leaves cleanly (record withdrawn, p2pd gone); a Hugging Face Trainer takes the run's rounds through the callback.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from node.devtools.localswarm import wait_for
from node.jobs.federated.script_runs import ParameterLayout, RunEnded, ScriptBridge, canonical, script_spec
from node.jobs.spec import job_spec_from_text
from protocol.records.job_spec import InnerOpt, OuterOpt, job_spec_from_wire, job_spec_to_wire
from tests.conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "examples"))
import own_script  # noqa: E402

SCRIPT = REPO / "examples" / "own_script.py"


def spec_of(layout: ParameterLayout, **over):
    args = dict(rounds=3, local_steps=5, batch_size=16, inner=InnerOpt("adamw", 0.01), outer=OuterOpt(),
                density=1.0, min_participants=2, max_participants=8, round_timeout_s=60.0, aggregator="mean")
    return script_spec("my-run", layout, **(args | over))


LAYOUT = ParameterLayout.of([("0.weight", (32, 30)), ("0.bias", (32,)), ("2.weight", (2, 32)), ("2.bias", (2,))])


# ---- fast --------------------------------------------------------------------------------------------------------


def test_a_layout_survives_its_file_and_names_the_first_difference():
    assert ParameterLayout.from_bytes(LAYOUT.to_bytes()) == LAYOUT
    assert LAYOUT.size == 32 * 30 + 32 + 64 + 2
    narrower = ParameterLayout.of([("0.weight", (16, 30)), ("0.bias", (16,)), ("2.weight", (2, 16)), ("2.bias", (2,))])
    assert LAYOUT.difference(LAYOUT) == ""
    assert LAYOUT.difference(narrower).startswith("parameter 0 is 0.weight [32, 30] in the run, 0.weight [16, 30]")
    assert "4 tensors, 1,058 parameters" in LAYOUT.difference(ParameterLayout.of(LAYOUT.tensors[:3]))
    assert LAYOUT.file != narrower.file and LAYOUT.file.name == "layout.json"
    for bad in (b"{}", b"not json", b'{"format": "swarmnode-layout-1", "tensors": [["a", [-1]]]}',
                b'{"format": "swarmnode-layout-1", "tensors": [["a", [1]], ["a", [2]]]}', b"x" * (17 * 2**20)):
        with pytest.raises(ValueError):
            ParameterLayout.from_bytes(bad)
    tensors = LAYOUT.tensors_of(np.arange(LAYOUT.size, dtype=np.float32))
    assert list(tensors) == [n for n, _ in LAYOUT.tensors] and tensors["2.bias"].tolist() == [1056.0, 1057.0]


def test_a_script_run_is_a_signed_job_spec_and_no_job_file_can_name_one():
    spec = spec_of(LAYOUT)
    assert spec.model.arch == "script" and spec.task == "custom" and spec.model.files == (LAYOUT.file,)
    assert job_spec_from_wire(job_spec_to_wire(spec)) == spec
    with pytest.raises(ValueError, match="run_id: must be 1-64 characters"):
        script_spec("my run!", LAYOUT, **{k: getattr(spec, k) for k in (
            "rounds", "local_steps", "batch_size", "inner", "outer", "density", "round_timeout_s", "aggregator")},
            min_participants=2, max_participants=8)
    with pytest.raises(ValueError, match="one file, its layout.json"):
        spec.replace(model=spec.model.__class__("script"))
    with pytest.raises(ValueError, match="task"):
        spec.replace(task="classification")
    with pytest.raises(Exception, match="swarmnode.Optimizer"):
        job_spec_from_text('name = "x"\ndataset = "digits"\ntask = "custom"\nrounds = 1\n[model]\narch = "script"\n'
                           '[inner]\nlr = 0.1\n', "job.toml")
    assert canonical(["b0", "a1", "c2"]) == "a1" and canonical([]) is None


def test_the_bridge_hands_each_window_to_the_script_and_its_result_back():
    start = np.zeros(LAYOUT.size, np.float32)
    bridge = ScriptBridge(LAYOUT, start)
    stop = threading.Event()
    results = []

    def runner() -> None:  # as JobRunner calls LocalTrainer.run, in a worker thread
        params = start
        for _ in range(2):
            local = bridge.run(params, 5, stop)
            results.append(local)
            params = local.params + 1  # "the round"
        bridge.end("finished", (params, 2))

    thread = threading.Thread(target=runner)
    thread.start()
    first = bridge.next_start(5)
    assert (first == 0).all()
    bridge.deliver(first - 0.5, 80, 0.7)
    second = bridge.next_start(5)
    assert (second == 0.5).all()
    bridge.deliver(second.copy(), 64, float("nan"))
    with pytest.raises(RunEnded, match="finished"):
        bridge.next_start(5)
    thread.join(5)
    assert [(r.samples, r.finite) for r in results] == [(80, True), (64, True)]
    assert bridge.final is not None and bridge.final[1] == 2 and (bridge.final[0] == 1.5).all()
    with pytest.raises(ValueError):
        bridge.deliver(np.zeros(3, np.float32), 1, 0.0)
    halted = ScriptBridge(LAYOUT, start)
    stop.set()
    assert halted.run(start, 5, stop).stopped  # the node stops: nothing is sent
    with pytest.raises(TimeoutError):
        ScriptBridge(LAYOUT, start).next_start(0.3)


def test_the_optimizer_names_parameters_from_the_model_and_refuses_foreign_ones():
    from swarmnode.optimizer import flatten, load_into, trained_parameters

    model = own_script.make_model(30, 2, 32, 0)
    opt = torch.optim.AdamW(model.parameters())
    named = trained_parameters(opt, model)
    assert ParameterLayout.of((n, tuple(p.shape)) for n, p in named) == LAYOUT
    flat = flatten([p for _, p in named])
    load_into([p for _, p in named], flat * 0 + 1)
    assert all((p == 1).all() for p in model.parameters())
    with pytest.raises(ValueError, match="not the model's"):
        trained_parameters(torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1), model)
    assert trained_parameters(opt, None)[0][0] == "param_groups.0.0"


# ---- real processes ----------------------------------------------------------------------------------------------


class Script:
    """examples/own_script.py in its own process: its JSON lines, read as they come."""

    def __init__(self, home: pathlib.Path, csv: pathlib.Path, *args: str):
        self.home = home
        self.lines: list[dict] = []
        self._err: str | None = None
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--csv", str(csv), "--home", str(home),
                                      "--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "scripts", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def first(self, key: str, timeout: float) -> dict:
        return wait_for(lambda: next((x for x in self.lines if key in x), None), timeout,
                        f"{key!r} from the script in {self.home.name} ({self.stderr_tail()})")

    def stderr_tail(self) -> str:
        if self.proc.poll() is None:
            return "running"
        if self._err is None:
            self._err = self.proc.stderr.read() if self.proc.stderr else ""
        return self._err[-800:]

    def stop(self) -> None:
        children = psutil.Process(self.proc.pid).children(recursive=True) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)
        for p in psutil.wait_procs(children, timeout=3)[1]:
            p.kill()
        self._reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def scripts(tmp_path):
    made: list[Script] = []

    def make(name: str, csv: pathlib.Path, *args: str) -> Script:
        made.append(Script(tmp_path / name, csv, *args))
        return made[-1]

    try:
        yield make
    finally:
        for s in made:
            s.stop()


def csvs(tmp_path: pathlib.Path, n: int) -> list[pathlib.Path]:
    paths = [tmp_path / f"rows{i}.csv" for i in range(n)]
    for i, p in enumerate(paths):
        own_script.write_csv(p, i, n)
    return paths


def fedavg_in_one_process(paths: list[pathlib.Path], seeds: list[int], rounds: int, steps: int) -> np.ndarray:
    """Plain FedAvg of own_script.py's participants, in this process: every participant trains ``steps`` AdamW
    steps from the round's model on its own rows in its own order; the new model is the sample-weighted mean."""
    from swarmnode.optimizer import flatten, load_into

    data = [own_script.split(*own_script.read_csv(p))[2:] for p in paths]
    models = [own_script.make_model(30, 2, 32, s) for s in seeds]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    orders = [own_script.batch_order(len(y), s) for (_, y), s in zip(data, seeds)]
    glob = flatten(models[0].parameters())  # the run starts from its submitter's (the first script's) weights
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(rounds):
        deltas, weights = [], []
        for model, opt, (x, y), order in zip(models, opts, data, orders):
            load_into(model.parameters(), glob)
            samples = 0
            for _ in range(steps):
                i = next(order)
                loss_fn(model(x[i]), y[i]).backward()
                opt.step()
                opt.zero_grad()
                samples += len(i)
            deltas.append(glob - flatten(model.parameters()))
            weights.append(samples)
        glob = glob - sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    return glob


@pytest.mark.slow  # ~34 s, in `make chaos` (CI's own step): `make test` measured 10:53 on 2 cores
@pytest.mark.timeout(180)
def test_two_scripts_with_dense_updates_end_where_plain_fedavg_ends(node_factory, scripts, tmp_path):
    daemon = node_factory("daemon", ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "scripts"]).wait_ready()
    paths = csvs(tmp_path, 2)
    common = ["--join", daemon.addr, "--rounds", "3", "--local-steps", "5", "--density", "1.0",
              "--aggregator", "mean", "--run-id", "dense", "--linger", "120"]
    first = scripts("s0", paths[0], *common, "--seed", "0")
    job_id = first.first("joined", 90)["joined"]
    # while the run waits for a second member: a script whose model is narrower is refused with the first
    # difference, before it averages anything
    other = scripts("s2", paths[1], *common, "--seed", "2", "--hidden", "16")
    assert other.proc.wait(90) != 0
    err = other.stderr_tail()
    assert "trains another model: parameter 0 is 0.weight [32, 30] in the run, 0.weight [16, 30]" in err, err
    second = scripts("s1", paths[1], *common, "--seed", "1")
    assert second.first("joined", 90)["joined"] == job_id
    ends = [s.first("done", 120) for s in (first, second)]
    assert {e["model_hash"] for e in ends} == {ends[0]["model_hash"]} and all(e["rounds"] == 3 for e in ends)
    files = [s.home / "jobs" / job_id / "model.safetensors" for s in (first, second)]
    wait_for(lambda: all(f.exists() for f in files), 30, "both scripts' exports")
    tensors = load_file(str(files[0]))
    assert set(tensors) == {n for n, _ in LAYOUT.tensors}  # the script's own names
    swarm = np.concatenate([tensors[n].reshape(-1).numpy() for n, _ in LAYOUT.tensors])
    reference = fedavg_in_one_process(paths, [0, 1], rounds=3, steps=5)
    from swarmnode.optimizer import flatten

    assert np.abs(reference - flatten(own_script.make_model(30, 2, 32, 0).parameters())).max() > 0.05  # it trained
    np.testing.assert_allclose(swarm, reference, atol=2e-3)  # the parts cross the wire as fp16
    # the daemon lists the run (it took no part, declined nothing) and exports it under the script's names
    jobs = json.loads(run_cli("jobs", "--json", "--home", str(daemon.home)).stdout)
    run = next(j for j in jobs if j["job_id"] == job_id)
    assert run["name"] == "dense" and run["round"] == 3 and run["declines"] == [] and run["local_round"] is None
    out = tmp_path / "export"
    res = run_cli("job", job_id, "--export", str(out), "--json", "--home", str(daemon.home), timeout=90)
    assert res.returncode == 0, res.stderr
    assert load_file(str(out / "model.safetensors")).keys() == tensors.keys()
    assert json.loads((out / "manifest.json").read_text())["model_hash"] == ends[0]["model_hash"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ctrl_c_leaves_the_run_cleanly(node_factory, scripts, tmp_path):
    daemon = node_factory("daemon", ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "scripts"]).wait_ready()
    script = scripts("s0", csvs(tmp_path, 1)[0], "--join", daemon.addr, "--run-id", "alone")  # waits for a 2nd
    peer = script.first("addrs", 90)["peer_id"]
    script.first("joined", 60)
    wait_for(lambda: peer in {p["peer_id"] for p in json.loads(run_cli("peers", "--json", "--home",
                                                                         str(daemon.home)).stdout)}, 30, "its record")
    children = psutil.Process(script.proc.pid).children(recursive=True)
    t0 = time.monotonic()
    script.proc.send_signal(signal.SIGINT)  # Ctrl-C, while it waits for the run's round
    assert script.proc.wait(10) == 1 and time.monotonic() - t0 < 5.0
    assert "interrupted: left the run" in script.stderr_tail()
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # p2pd went with it
    peers = {p["peer_id"] for p in json.loads(run_cli("peers", "--json", "--home", str(daemon.home)).stdout)}
    assert peer not in peers  # its record was withdrawn, not left to expire


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_three_scripts_one_killed_and_restarted_end_on_one_hash(node_factory, scripts, tmp_path):
    daemon = node_factory("daemon", ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "scripts"]).wait_ready()
    paths = csvs(tmp_path, 3)
    common = ["--join", daemon.addr, "--rounds", "20", "--local-steps", "50", "--run-id", "churn", "--min-peers", "2",
              "--linger", "240"]  # the others may end the run before s2 is back (CI): they serve it its final state
    runs = [scripts("s0", paths[0], *common, "--seed", "0")]
    job_id = runs[0].first("joined", 90)["joined"]
    runs += [scripts(f"s{i}", paths[i], *common, "--seed", str(i)) for i in (1, 2)]
    for s in runs[1:]:
        assert s.first("joined", 90)["joined"] == job_id
    wait_for(lambda: any(x.get("round", 0) >= 3 for x in runs[2].lines if "hash" in x), 120, "round 3")
    victim = runs[2]
    p2pd = [p for p in psutil.Process(victim.proc.pid).children(recursive=True)]
    victim.proc.send_signal(signal.SIGKILL)  # mid-run: its local steps or its round
    ran = max(x["round"] for x in victim.lines if "hash" in x)
    victim.proc.wait(10)
    wait_for(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in p2pd), 10,
             "the killed script's p2pd to go")
    time.sleep(1.0)  # the others go on without it for a moment
    again = scripts("s2", paths[2], *common, "--seed", "2")
    assert again.first("joined", 120)["joined"] == job_id
    ends = [s.first("done", 240) for s in (runs[0], runs[1], again)]
    assert len({e["model_hash"] for e in ends}) == 1, ends
    assert ran < 20, "the script was killed after the run had ended"
    assert all(e["rounds"] == 20 and e["accuracy_after"] > e["accuracy_before"] + 0.1 for e in ends), ends
    jobs = json.loads(run_cli("jobs", "--json", "--home", str(daemon.home)).stdout)
    assert next(j for j in jobs if j["job_id"] == job_id)["state"] in ("running", "done")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_script_back_after_its_run_ended_and_every_member_left_is_told_so(node_factory, scripts, tmp_path):
    daemon = node_factory("daemon", ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "scripts"]).wait_ready()
    paths = csvs(tmp_path, 3)
    common = ["--join", daemon.addr, "--rounds", "6", "--local-steps", "30", "--run-id", "gone", "--min-peers", "2",
              "--round-timeout", "15"]
    runs = [scripts(f"s{i}", paths[i], *common, "--seed", str(i)) for i in range(3)]
    job_id = runs[0].first("joined", 90)["joined"]
    wait_for(lambda: any(x.get("round", 0) >= 2 for x in runs[2].lines if "hash" in x), 120, "round 2")
    runs[2].proc.send_signal(signal.SIGKILL)
    ran = max(x["round"] for x in runs[2].lines if "hash" in x)
    runs[2].proc.wait(10)
    ends = [s.first("done", 120) for s in runs[:2]]
    assert all(e["rounds"] == 6 for e in ends) and ran < 6, (ends, ran)
    for s in runs[:2]:
        assert s.proc.wait(30) == 0  # every member has left: nobody serves the run's final state
    again = scripts("s2", paths[2], *common, "--seed", "2")  # its node resumes from its checkpoint, behind
    t0 = time.monotonic()
    end = again.first("done", 150)
    behind = re.search(r"ended at round 6 while this node was behind at round (\d+), and no participant is left",
                       end["ended"] or "")
    assert end["job_id"] == job_id and behind and ran <= int(behind[1]) < 6, (end, ran)  # from its checkpoint
    assert again.proc.wait(30) == 0 and time.monotonic() - t0 < 150


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_hugging_face_trainer_takes_the_runs_rounds_through_the_callback(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from swarmnode import Swarm
    from swarmnode.callbacks import SwarmCallback

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (64, 8), generator=g)
    data = [{"input_ids": row, "labels": int(row[0] % 2)} for row in ids]
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=40, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no")
    with Swarm(home=tmp_path / "home", swarm="hf", listen=["/ip4/127.0.0.1/tcp/0"], device="cpu") as swarm:
        callback = SwarmCallback(swarm, run_id="hf-run", local_steps=4, rounds=3, min_peers=1, density=0.5)
        state = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
        opt = callback.optimizer
        assert opt is not None and opt.finished and opt.rounds_done == 3
        assert state.global_step == 12  # the run's last round ended the Trainer's loop (max_steps 40)
        export = tmp_path / "home" / "jobs" / opt.job_id / "model.safetensors"
        wait_for(export.exists, 30, "the run's export")
        tensors = load_file(str(export))
        assert "classifier.weight" in tensors and "bert.embeddings.word_embeddings.weight" in tensors
        assert torch.equal(tensors["classifier.weight"], model.classifier.weight.detach())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_federated_trainer_trains_a_run_in_one_call(tmp_path):
    from swarmnode import FederatedTrainer, Swarm

    path = csvs(tmp_path, 1)[0]
    xv, yv, xt, yt = own_script.split(*own_script.read_csv(path))
    model = own_script.make_model(30, 2, 32, 0)
    before = own_script.accuracy(model, xv, yv)
    with Swarm(home=tmp_path / "home", swarm="trainer", listen=["/ip4/127.0.0.1/tcp/0"], device="cpu") as swarm:
        trainer = FederatedTrainer(model, swarm=swarm, run_id="one-call", rounds=3, local_epochs=1, batch_size=32,
                                   lr=1e-2, min_peers=1)
        history = trainer.train((xt, yt), (xv, yv))
        assert [h["round"] for h in history] == [1, 2, 3] and trainer.optimizer is not None
        assert trainer.optimizer.finished and trainer.optimizer.spec.local_steps == -(-len(yt) // 32)
        assert history[-1]["accuracy"] == pytest.approx(own_script.accuracy(model, xv, yv))
        assert history[-1]["accuracy"] > before + 0.2 and history[-1]["loss"] < history[0]["loss"]
        with pytest.raises(ValueError, match="Dataset"):
            FederatedTrainer(model, swarm=swarm, run_id="x").train([1, 2, 3])
