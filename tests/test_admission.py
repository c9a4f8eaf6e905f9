"""Whose jobs a node runs and how many (node/jobs/policy.py, applied by node/jobs/manager.py), with real daemons:
a node run with ``--accept-jobs-from self`` declines another node's job with the reason; a node with
``--max-jobs 1`` declines a second job with the reason and takes it once the first ends; a node with the default
(members) declines the job of a stranger that never joined the swarm (its own p2pd and key, storing a validly
signed job, as issue 14's probe did). Every reason reaches the swarm as a signed decline (``swarmnode job ID``)."""

from __future__ import annotations

import asyncio

import pytest

from node.devtools.localswarm import wait_for
from node.ml.datasets import write_node_data
from protocol.records.job_spec import InnerOpt, JobSpec, ModelSpec
from tests.conftest import run_cli
from tests.test_hostile_jobs import SWARM, store_as_stranger
from tests.test_jobs_integration import JOB

# a long job that n0 runs alone (min_participants 2: it waits, paused, for a second participant) until cancelled
LONG_JOB = JOB.replace("rounds = 5", "rounds = 1000")
FAIR = JobSpec("fair", ModelSpec("mlp", (("hidden", 16),)), "digits", "classification", 3, InnerOpt("sgd", 0.1))


def job_info(node, job_id: str):
    client = node.client()
    try:
        return next(client.job(job_id))
    finally:
        client.close()


def declines(node, job_id: str) -> dict[str, str]:
    return {d.peer_id: d.reason for d in job_info(node, job_id).declines}


def submit(node, path) -> str:
    client = node.client()
    try:
        return client.submit(path.read_text(), str(path)).job_id
    finally:
        client.close()


def cancel(node, job_id: str) -> None:
    client = node.client()
    try:
        assert client.cancel(job_id).cancelled
    finally:
        client.close()


@pytest.mark.slow  # ~20-30 s with two daemons: in `make chaos` (CI's own step); the rule itself: test_job_policy.py
@pytest.mark.timeout(150)
def test_a_node_runs_only_the_jobs_and_as_many_as_its_owner_allows(node_factory, tmp_path):
    for i in range(2):
        write_node_data("digits", tmp_path / f"data{i}" / "digits", n_nodes=2, node_index=i, seed=0)
    base = ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", SWARM]
    n0 = node_factory("n0", [*base, "--data", str(tmp_path / "data0"), "--max-jobs", "1"]).wait_ready()
    n1 = node_factory("n1", [*base, "--data", str(tmp_path / "data1"), "--join", n0.addr,
                             "--accept-jobs-from", "self"]).wait_ready()
    (tmp_path / "a.toml").write_text(LONG_JOB.replace("digits-test", "first"))
    (tmp_path / "b.toml").write_text(LONG_JOB.replace("digits-test", "second"))

    first = submit(n0, tmp_path / "a.toml")
    wait_for(lambda: n1.peer_id in declines(n0, first) and job_info(n0, first).takers >= 1, 30,
             "n1 to decline the first job and n0 to take it", interval=0.2)
    assert declines(n0, first)[n1.peer_id] == ("this node runs only its own jobs (accept_jobs_from = self); "
                                               f"submitter ...{n0.peer_id[-8:]} is another node")
    second = submit(n0, tmp_path / "b.toml")
    wait_for(lambda: {n0.peer_id, n1.peer_id} <= set(declines(n1, second)), 30, "both nodes to decline the second job",
             interval=0.2)
    assert declines(n1, second)[n0.peer_id] == "this node already runs 1 job(s) (max_jobs = 1)"
    shown = run_cli("job", second, "--home", str(n0.home))  # what the submitter's user sees
    assert f"declined by {n0.peer_id}: this node already runs 1 job(s) (max_jobs = 1)" in shown.stdout, shown.stdout

    stranger_job = asyncio.run(store_as_stranger(n0.addr, [FAIR]))[0]
    wait_for(lambda: {n0.peer_id, n1.peer_id} <= set(declines(n0, stranger_job)), 30,
             "both nodes to decline the stranger's job", interval=0.2)
    assert "(accept_jobs_from = members); submitter" in declines(n0, stranger_job)[n0.peer_id]
    assert "has no live peer record in this swarm" in declines(n0, stranger_job)[n0.peer_id]

    cancel(n0, first)
    # the slot is free: n0 takes the second job after all, its progress replacing its decline
    wait_for(lambda: n0.peer_id not in declines(n0, second) and job_info(n0, second).takers >= 1, 30,
             "n0 to take the second job once the first ended", interval=0.2)
    cancel(n0, second)
