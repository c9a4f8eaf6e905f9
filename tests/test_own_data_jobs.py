"""Jobs on the participants' own data, through the real CLI and daemons: four nodes each bind their own CSV rows
(three with `swarmnode data add`, one through its config's [datasets.NAME] table), train one model declared by a
[data] table to one hash, while a fifth node whose CSV lacks a declared column declines with the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_jobs_integration import manifest

JOB = """
name = "churn-test"
dataset = "churn"
task = "classification"
rounds = 4
local_steps = 10
batch_size = 16
min_participants = 4
round_timeout_s = 40
[model]
arch = "mlp"
hidden = 32
[inner]
lr = 0.2
[data]
kind = "tabular"
features = ["tenure", "spend", "calls"]
label = "churned"
classes = ["no", "yes"]
"""


def write_rows(path, seed: int, rows: int = 120, columns=("tenure", "spend", "calls")):
    """This node's own customers: churned when tenure + spend < 0 (features already scaled)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    with open(path, "w") as f:
        f.write(",".join(columns) + ",churned\n")
        for r in x:
            f.write(f"{r[0]:.4f},{r[1]:.4f},{r[2]:.4f},{'yes' if r[0] + r[1] < 0 else 'no'}\n")


# ~30 s with five daemons: in `make chaos` (CI's own step) so that `make test` stays under 10 minutes on 2 cores;
# reading, checking and declining on own data is covered in `make test` by tests/test_user_data.py
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_four_nodes_train_on_their_own_csv_rows_and_a_mismatch_declines(node_factory, tmp_path):
    nodes = []
    for i in range(5):
        csv = tmp_path / f"customers{i}.csv"
        write_rows(csv, seed=i, columns=("tenure", "spend", "calls") if i < 4 else ("tenure", "spend", "region"))
        args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "own"]
        if i == 3:  # bound by the node's config instead of `data add`
            config = tmp_path / "n3.toml"
            config.write_text(f'[datasets.churn]\npath = "{csv}"\nformat = "csv"\nlabel = "churned"\n')
            args += ["--config", str(config)]
        if nodes:
            args += ["--join", nodes[0].addr]
        node = node_factory(f"n{i}", args)
        nodes.append(node.wait_ready() if not i else node)
        if i != 3:
            added = run_cli("data", "add", "churn", str(csv), "--format", "csv", "--label", "churned",
                            "--home", str(node.home))
            assert added.returncode == 0, added.stderr
    for node in nodes[1:]:
        node.wait_ready()
    listed = run_cli("data", "list", "--json", "--home", str(nodes[3].home), "--config", str(tmp_path / "n3.toml"))
    assert json.loads(listed.stdout)[0]["rows"] == 120, listed.stdout
    job_file = tmp_path / "churn.toml"
    job_file.write_text(JOB)
    result = run_cli("submit", str(job_file), "--follow", "--json", "--home", str(nodes[0].home), timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    last = events[-1]
    assert last["state"] == "done" and last["round"] == 4 and len(last["participants"]) == 4, last
    assert last["eval_metric"] > 0.8, last  # each node's held-out rows
    hashes = {manifest(n, last["job_id"])["model_hash"] for n in nodes[:4]}
    assert hashes == {last["model_hash"]}
    reason = "this node's 'churn' has no column 'calls' (it has tenure, spend, region, churned)"
    declines = {d["peer_id"]: d["reason"] for e in events[1:] for d in e["declines"]}
    assert declines == {nodes[4].peer_id: reason}, declines
    jobs = json.loads(run_cli("jobs", "--json", "--home", str(nodes[4].home)).stdout)
    assert jobs[0]["declined"] == reason
    for node in nodes[:4]:  # nothing of a node's rows left it: its job folder holds the model and its reports
        assert not any(p.suffix == ".csv" for p in (node.home / "jobs").rglob("*"))
