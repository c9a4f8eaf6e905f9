"""A federated job's rounds on three nodes over real libp2p daemons (one test process, three p2pd):
every round applies, every node ends each round with the same model hash, and the model learns."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time

from node.jobs.federated.runner import JobRunner
from node.ml.datasets import load_node_data, write_node_data
from node.runtime.p2pd import OwnedP2PDaemon
from protocol.records.job_spec import InnerOpt, JobSpec, ModelSpec, OuterOpt

NODES = 3
# Three P2P clients share this test's event loop. Once, in a full-suite run under load, the garbage
# collector found a StreamWriter left unclosed after asyncio.run had closed the loop ("unclosed
# StreamWriter" ResourceWarning); it did not reproduce with tracemalloc in later runs, so its owner (our
# round streams or hivemind's p2pd client) is not pinned down yet: see the issue #3/#4 notes. Daemons run one
# client per process, where this cannot surface as a test failure; only this module ignores that warning.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def spec(outer: OuterOpt) -> JobSpec:
    return JobSpec(name="digits-test", model=ModelSpec("mlp", {"hidden": 64}), dataset="digits",
                   task="classification", rounds=4, inner=InnerOpt("sgd", 0.1, momentum=0.9), local_steps=15,
                   batch_size=32, outer=outer, density=0.05, min_participants=2, max_participants=8,
                   round_timeout_s=30.0)


async def stop_all(runners: list, dhts: list, daemons: list) -> None:
    for runner in runners:
        await runner.stop()
    for dht in dhts:
        await dht.shutdown()
    for daemon in daemons:
        await daemon.stop()


async def start_node(tmp_path, i: int, job: JobSpec, daemons: list, dhts: list, n_nodes: int = 2,
                     expected_group: int | None = None) -> JobRunner:
    """Node i: its p2pd (joining the first one's), DHT node, label-skewed digits slice, and a started runner."""
    write_node_data("digits", tmp_path / f"data{i}", n_nodes=n_nodes, node_index=i, scheme="label-skew", seed=0)
    join = [str((await daemons[0].p2p.get_visible_maddrs())[0])] if daemons else []
    daemon = OwnedP2PDaemon()
    daemons.append(daemon)
    p2p = await daemon.start(identity_path=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=join)
    dhts.append(await DHTNode.create(p2p=p2p, initial_peers=join or None, ensure_bootstrap_success=bool(join)))
    runner = JobRunner(p2p, dhts[-1], "jobtest", "job1", job, load_node_data(tmp_path / f"data{i}", dataset="digits"),
                       expected_group=expected_group)
    await runner.start()
    return runner


async def run_job(tmp_path, job: JobSpec) -> list[list]:
    daemons, dhts, runners = [], [], []
    try:
        for i in range(NODES):
            runners.append(await start_node(tmp_path, i, job, daemons, dhts, n_nodes=NODES, expected_group=NODES))
        assert len({r.model_hash for r in runners}) == 1, "every node must start from the same seeded model"
        before = runners[0].evaluate()["accuracy"]
        rounds = []
        for _ in range(job.rounds):
            rounds.append(await asyncio.gather(*(runner.run_round() for runner in runners)))
        return [before, rounds]
    finally:
        await stop_all(runners, dhts, daemons)


@pytest.mark.parametrize("outer", [OuterOpt("fedavg"), OuterOpt("diloco", lr=0.7, momentum=0.9, nesterov=True)],
                         ids=["fedavg", "diloco"])
def test_federated_rounds_keep_every_node_bit_identical_and_learn(tmp_path, outer):
    before, rounds = asyncio.run(run_job(tmp_path, spec(outer)))
    for results in rounds:
        assert all(res.ok for res in results), [res.error for res in results]
        assert len({res.model_hash for res in results}) == 1, "nodes diverged after a round"
        assert all(len(res.participants) == NODES and res.samples == 15 * 32 for res in results)
        assert all(res.bytes_sent > 0 for res in results)
    final = rounds[-1][0].metrics["accuracy"]
    assert final > before + 0.3, (before, final)  # label-skewed slices, yet the shared model learns


def test_a_lone_node_pauses_on_the_same_round_then_resumes_sending_its_kept_update(tmp_path):
    """Below min_participants a round is tried again under the same id (so paused nodes meet), and the
    update computed for it is resent from error feedback, not trained a second time."""
    job = dataclasses.replace(spec(OuterOpt("fedavg")), round_timeout_s=12.0)  # 2 s matchmaking windows

    async def scenario():
        daemons, dhts, runners = [], [], []
        try:
            runners.append(await start_node(tmp_path, 0, job, daemons, dhts))
            alone = [await runners[0].run_round() for _ in range(2)]
            runners.append(await start_node(tmp_path, 1, job, daemons, dhts))
            together = await asyncio.gather(*(r.run_round() for r in runners))
            return alone, together, runners[0].next_round
        finally:
            await stop_all(runners, dhts, daemons)

    alone, together, next_round = asyncio.run(scenario())
    assert [(r.round, r.ok, r.paused) for r in alone] == [(0, False, True), (0, False, True)], [r.error for r in alone]
    assert alone[0].local_seconds > 0 and alone[1].local_seconds == 0  # trained once, then resent
    assert all(r.ok and r.round == 0 for r in together), [r.error for r in together]
    assert together[0].model_hash == together[1].model_hash and next_round == 1
    # the kept update, weighed as trained
    assert together[0].local_seconds == 0 and together[0].samples == alone[0].samples
    assert together[1].local_seconds > 0


def test_a_dead_leaders_declaration_is_skipped_when_the_round_is_retried(tmp_path):
    """A declaration outlives its peer in the DHT. Here one that sorts before every real peer id (so it would
    lead) sits under round 0's key: the live nodes wait for its plan in vain once, then skip it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protocol.allreduce.matchmaking import declaration_to_wire, declared_subkey, round_key
    from protocol.records.peer_keys import peer_id_of

    job = dataclasses.replace(spec(OuterOpt("fedavg")), round_timeout_s=12.0)

    async def scenario():
        daemons, dhts, runners = [], [], []
        try:
            for i in range(2):
                runners.append(await start_node(tmp_path, i, job, daemons, dhts))
            ghost = "~"  # a real peer id (readers ignore any other) that sorts before both live ones
            while ghost > min(r.averager.peer_id for r in runners):
                ghost = peer_id_of(Ed25519PrivateKey.generate().public_key())
            round_id = f"job1/r0/{runners[0].model_hash[:16]}"
            key = round_key("jobtest", runners[0].averager.config.tensor.name, round_id)
            assert await dhts[0].store(key, declaration_to_wire(1e6), get_dht_time() + 60,
                                       subkey=declared_subkey(ghost))
            first = await asyncio.gather(*(r.run_round() for r in runners))
            second = await asyncio.gather(*(r.run_round() for r in runners))
            return first, second
        finally:
            await stop_all(runners, dhts, daemons)

    first, second = asyncio.run(scenario())
    assert all(r.paused and "no leader sent a plan" in r.error for r in first), [r.error for r in first]
    assert all(r.ok and r.round == 0 for r in second), [r.error for r in second]
    assert second[0].model_hash == second[1].model_hash
