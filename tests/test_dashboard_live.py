"""The dashboard of real daemons training a real job (node/api/dashboard.py): its event stream follows the rounds
as they complete, its snapshot says what `swarmnode peers|job --json` say, and GET /metrics, read with
prometheus_client's parser, counts the rounds of the job's report.json."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.devtools.localswarm import wait_for
from tests.conftest import run_cli
from tests.test_jobs_integration import JOB, start_nodes

LIVE_JOB = JOB.replace("local_steps = 10", "local_steps = 300").replace("hidden = 64", "hidden = 256")  # ~1 s rounds

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def dashboard_url(node) -> str:
    return wait_for(lambda: json.loads((node.home / "node.json").read_text()).get("dashboard")
                    if (node.home / "node.json").exists() else None, 30, "node.json's dashboard URL")


def fetch(url: str):
    with urllib.request.urlopen(url, timeout=20) as r:
        assert r.status == 200
        return r.read()


class Events(threading.Thread):
    """Reads the server-sent events of /api/events into ``states`` until the test ends."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.states = url, []

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=60) as r:
                for line in r:
                    if line.startswith(b"data: "):
                        self.states.append(json.loads(line[len(b"data: "):]))
        except OSError:  # the daemon stopped at teardown
            pass


def test_the_dashboard_follows_a_job_and_agrees_with_the_cli(node_factory, tmp_path):
    nodes = start_nodes(node_factory, tmp_path, ["digits", "digits"])
    url = dashboard_url(nodes[0])
    assert url.startswith("http://127.0.0.1:") and "token" not in url
    events = Events(url + "api/events")
    events.start()
    job_file = tmp_path / "job.toml"
    job_file.write_text(LIVE_JOB)
    submitted = run_cli("submit", str(job_file), "--json", "--home", str(nodes[0].home))
    assert submitted.returncode == 0, submitted.stderr[-1500:]
    job_id = json.loads(submitted.stdout)["job_id"]

    def job_in(state: dict) -> dict | None:
        return next((j for j in state["jobs"] if j["job_id"] == job_id), None)

    wait_for(lambda: any((j := job_in(s)) and j["state"] == "done" and j["history"] for s in events.states), 150,
             "the event stream to show the job done")
    rounds_seen = sorted({j["round"] for s in events.states if (j := job_in(s))})
    assert len(rounds_seen) >= 3 and rounds_seen[-1] == 5, rounds_seen  # it followed the rounds as they came

    state = json.loads(fetch(url + "api/state"))
    cli_job = json.loads(run_cli("job", job_id, "--json", "--home", str(nodes[0].home)).stdout)
    page_job = job_in(state)
    assert page_job is not None
    for key in ("state", "round", "rounds", "model_hash", "train_loss", "eval_metric", "participants"):
        assert page_job[key] == cli_job[key], key
    cli_peers = json.loads(run_cli("peers", "--json", "--home", str(nodes[0].home)).stdout)
    assert {p["peer_id"] for p in state["peers"]} == {p["peer_id"] for p in cli_peers}
    assert [p["peer_id"] for p in state["peers"] if p["is_self"]] == [nodes[0].peer_id]
    assert state["host"]["memory_total_bytes"] > 0

    folder = nodes[0].home / "jobs" / job_id
    wait_for(lambda: (folder / "manifest.json").exists(), 60, "the export (its manifest is written last)")
    report = json.loads((folder / "report.json").read_text())
    rounds = report if isinstance(report, list) else report["rounds"]
    metrics = {f.name: f for f in text_string_to_metric_families(fetch(url + "metrics").decode())}
    counted = {s.labels["outcome"]: s.value for s in metrics["swarmnode_rounds"].samples
               if s.name == "swarmnode_rounds_total" and s.labels["job_id"] == job_id}
    assert counted == {"ok": sum(1 for e in rounds if e["ok"]), "failed": sum(1 for e in rounds if not e["ok"])}
    assert counted["ok"] == 5
    assert [s.value for s in metrics["swarmnode_peers"].samples] == [len(cli_peers)]
    done = [s.value for s in metrics["swarmnode_jobs"].samples if s.labels["state"] == "done"]
    assert done == [1]
    count = [s.value for s in metrics["swarmnode_round_seconds"].samples
             if s.name == "swarmnode_round_seconds_count" and s.labels["job_id"] == job_id]
    assert count == [5]
