"""A stranger's validly signed job that names an absurd model (issue 14's probe: a 120,000-layer MLP froze every
daemon for ~120 s, its memory estimate and model build running on the event loop): every node sizes it by formula
(node/ml/analyze.py size_bound) before it builds or reads anything, declines with the reason, and keeps answering
its control API within a second throughout. The stranger is a real DHT node with its own p2pd and key that never
joined as a swarmnode peer; it stores signed JobRecords directly, as a hostile client would."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator
from hivemind.utils.timed_storage import get_dht_time

from node.jobs.board import JOB_TTL_S
from node.ml.datasets import write_node_data
from node.runtime.p2pd import OwnedP2PDaemon
from protocol.records.job_records import JobRecord, job_record_to_wire, jobs_key
from protocol.records.job_spec import InnerOpt, JobSpec, ModelSpec
from protocol.records.job_validation import SignedJobRecordValidator
from protocol.records.peer_keys import peer_id_of
from tests.conftest import run_cli

SWARM = "hostile"
DEEP = JobSpec("deep", ModelSpec("mlp", (("layers", 120_000), ("hidden", 8))), "digits", "classification", 3,
               InnerOpt("sgd", 0.1))
WIDE = JobSpec("wide", ModelSpec("mlp", (("layers", 64), ("hidden", 1 << 20))), "digits", "classification", 3,
               InnerOpt("sgd", 0.1))


async def store_as_stranger(bootstrap: str, specs: list[JobSpec]) -> list[str]:
    key = Ed25519PrivateKey.generate()
    daemon = OwnedP2PDaemon()
    p2p = await daemon.start(identity_path=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=[bootstrap])
    dht = await DHTNode.create(p2p=p2p, initial_peers=[bootstrap],
                               record_validator=CompositeValidator([SignedJobRecordValidator(SWARM, key)]))
    try:
        ids = []
        for spec in specs:
            record = JobRecord.create(spec, peer_id_of(key.public_key()), secrets.token_hex(8), time.time())
            assert await dht.store(jobs_key(SWARM), job_record_to_wire(record), get_dht_time() + JOB_TTL_S,
                                   subkey=record.job_id)
            ids.append(record.job_id)
        return ids
    finally:
        await dht.shutdown()
        await daemon.stop()


@pytest.mark.timeout(120)
def test_a_strangers_absurd_jobs_are_declined_by_formula_without_stalling_any_node(node_factory, tmp_path):
    nodes = []
    for i in range(2):
        write_node_data("digits", tmp_path / f"data{i}" / "digits", n_nodes=2, node_index=i, seed=0)
        # nodes that accept anyone's jobs (the default, members, declines the stranger before sizing anything:
        # tests/test_admission.py): the formula must protect them too
        args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", SWARM, "--data", str(tmp_path / f"data{i}"),
                "--accept-jobs-from", "anyone"]
        nodes.append(node_factory(f"n{i}", args + (["--join", nodes[0].addr] if nodes else [])).wait_ready())
    job_ids = asyncio.run(store_as_stranger(nodes[0].addr, [DEEP, WIDE]))
    expected = {job_ids[0]: "has 120,001 layers; a node builds at most 4,096",
                job_ids[1]: "training needs about"}

    worst, declined = 0.0, {}
    deadline = time.monotonic() + 45
    clients = [n.client() for n in nodes]
    try:
        while time.monotonic() < deadline and len(declined) < 4:
            for node, client in zip(nodes, clients):
                t0 = time.monotonic()
                client.status()  # the daemon's event loop answers (its control API runs on it)
                worst = max(worst, time.monotonic() - t0)
                for job in client.jobs().jobs:
                    if job.declined:
                        declined[(node.home.name, job.job_id)] = job.declined
            time.sleep(0.05)
    finally:
        for client in clients:
            client.close()
    assert len(declined) == 4, declined
    for (_, job_id), reason in declined.items():
        assert expected[job_id] in reason, reason
    print(f"worst control API latency while the jobs arrived: {worst * 1000:.0f} ms")
    assert worst < 1.0
    for node in nodes:
        listed = json.loads(run_cli("jobs", "--json", "--home", str(node.home)).stdout)
        assert {j["job_id"] for j in listed} == set(job_ids)
        assert not (node.home / "jobs").exists()  # nothing was built, trained or written
