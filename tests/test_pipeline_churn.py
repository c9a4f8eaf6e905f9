"""Pipeline training with real stage processes (node/devtools/stage_peer.py, each with its own p2pd) on loopback, and
the trainer in this test process: a replica SIGKILLed mid-step (frozen by its fault hook exactly at a backward)
loses nothing and counts nothing twice; the last replica of a stage SIGKILLed mid-step is replaced by a new
process that fetches the shard and the stage's latest state, and training resumes (recovery time printed); a
corrupted shard is refused and the process exits non-zero; a replica killed inside the averaging round leaves its
twin consistent. The model is the untied tiny GPT-2 of tests/test_pipeline.py."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from hivemind.dht.node import DHTNode

from node.devtools.localswarm import wait_for
from node.devtools.stage_peer import StagePeerProcess
from node.jobs.pipeline.steps import TrainerConfig
from node.jobs.pipeline.trainer import PipelineTrainer
from node.ml.models import build_model
from node.runtime.p2pd import OwnedP2PDaemon
from protocol.transfer.shards import MANIFEST_FILE
from tests.test_pipeline import UNTIED_GPT2, batch, split, wait_replicas

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
SWARM, PIPE = "churn", "job"
FAST = ["--swarm", SWARM, "--pipeline", PIPE, "--heartbeat", "0.5", "--ttl", "4", "--optimizer", "adamw",
        "--lr", "3e-3", "--density", "0.5", "--matchmaking-time", "3", "--part-timeout", "5", "--result-timeout", "10"]
STEPS = 4
MICRO = 4  # micro-batches per step: batch 8, micro-batch size 2


@pytest.fixture
def shards(tmp_path):
    return split(build_model("gpt2", UNTIED_GPT2, 0).module, [(0, 2), (2, 4)], tmp_path / "shards")


@pytest.fixture
def peers(tmp_path):
    started: list[StagePeerProcess] = []

    def launch(name: str, args: list[str]) -> StagePeerProcess:
        p = StagePeerProcess(tmp_path / name, [*FAST, *args]).start()
        started.append(p)
        return p

    try:
        yield launch
    finally:
        for p in started:
            p.stop()


@contextlib.asynccontextmanager
async def trainer_node(join: str):
    daemon, dht = OwnedP2PDaemon(), None
    try:
        p2p = await daemon.start(identity_path=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=[join])
        dht = await DHTNode.create(p2p=p2p, initial_peers=[join], ensure_bootstrap_success=True)
        yield p2p, dht
    finally:
        if dht is not None:
            await dht.shutdown()
        await daemon.stop()


def freeze_then_kill(victim: StagePeerProcess, timeout: float = 90) -> float:
    """Wait for the victim's fault hook to freeze it, SIGKILL it; the kill's time.monotonic()."""
    victim.wait_event(timeout, "the fault hook", event="frozen")
    wait_for(lambda: psutil.Process(victim.proc.pid).status() == psutil.STATUS_STOPPED, 10, "the victim to freeze")
    victim.proc.send_signal(signal.SIGKILL)  # a real SIGKILL, mid-step
    victim.proc.wait(10)
    return time.monotonic()


def show(reports) -> None:
    for r in reports:
        stages = "; ".join(f"s{st.stage}: " + ", ".join(f"{p[-4:]}={rep.committed if rep else 'x'}"
                                                        for p, rep in st.replies.items()) for st in r.stages)
        print(f"step {r.step}: loss {r.loss:.4f}, {r.micro_batches} micro-batches, {r.retries} retries, "
              f"{r.seconds:.1f} s; commits {stages}")


@pytest.mark.chaos  # ~30 s of real processes and kills each: in `make chaos` (CI's own step), not `make test`
@pytest.mark.timeout(300)
def test_replica_killed_mid_backward_loses_and_double_counts_nothing(shards, peers):
    # The victim announces 100x the throughput of its twin, so (nearly) every micro-batch goes through it until it
    # freezes at the second backward of step 1: the first micro-batch of that step is then already committed
    # there (max_inflight 1: one micro-batch at a time), and must be counted again on the twin.
    s0a = peers("s0a", ["--shards", str(shards), "--stage", "0"])
    addr = s0a.wait_event(90, "ready", event="ready")["addr"]
    s0b = peers("s0b", ["--shards", str(shards), "--stage", "0", "--join", addr])
    s1a = peers("s1a", ["--shards", str(shards), "--stage", "1", "--join", addr])
    victim = peers("s1b", ["--shards", str(shards), "--stage", "1", "--join", addr, "--throughput", "100",
                           "--stop-at", "backward:1:2"])
    for p in (s0b, s1a, victim):
        p.wait_event(90, "ready", event="ready")
    victim_id = victim.wait_event(1, "ready", event="ready")["peer_id"]

    async def scenario():
        async with trainer_node(addr) as (p2p, dht):
            trainer = PipelineTrainer(p2p, dht, PIPE, shards, TrainerConfig(
                swarm=SWARM, micro_batch_size=2, max_inflight=1, hop_timeout=8, end_step_timeout=60, seed=0))
            await wait_replicas(trainer, {0: 2, 1: 2})
            killer = asyncio.ensure_future(asyncio.to_thread(freeze_then_kill, victim))
            reports = [await trainer.step(*batch(step)) for step in range(STEPS)]
            await killer
            return reports

    reports = asyncio.run(scenario())
    show(reports)
    for r in reports:
        assert r.micro_batches == MICRO and math.isfinite(r.loss)
        for stage in r.stages:  # every micro-batch counted exactly once per stage, by the replicas themselves
            assert stage.committed == MICRO and stage.applied and stage.in_sync, (r.step, stage)
    assert reports[1].retries >= 2  # the frozen attempt, and the micro-batch whose commit died with the victim
    assert victim_id not in reports[1].stages[1].hashes and len(reports[1].stages[1].hashes) == 1
    assert reports[-1].loss < reports[0].loss
    # the survivors' own accounts agree: per step and stage, their committed counts sum to the trainer's
    for step in range(STEPS):
        for twins in ((s0a, s0b), (s1a, victim)):
            events = [p.steps()[step] for p in twins if step in p.steps()]
            assert sum(e["committed"] for e in events) == MICRO, (step, events)
            assert len({e["hash"] for e in events}) == 1
    assert victim.steps()[0]["committed"] >= 1 and 1 not in victim.steps()


@pytest.mark.chaos  # ~30 s of real processes and kills each: in `make chaos` (CI's own step), not `make test`
@pytest.mark.timeout(300)
def test_last_replica_of_a_stage_killed_is_taken_over_with_its_state(shards, peers, tmp_path):
    s0 = peers("s0", ["--shards", str(shards), "--stage", "0"])
    addr = s0.wait_event(90, "ready", event="ready")["addr"]
    victim = peers("s1", ["--shards", str(shards), "--stage", "1", "--join", addr, "--stop-at", "forward:2"])
    victim.wait_event(90, "ready", event="ready")
    bare = tmp_path / "bare-shards"  # only the manifest: the newcomer fetches its shard from a peer
    bare.mkdir()
    shutil.copy(shards / MANIFEST_FILE, bare / MANIFEST_FILE)
    newcomer: list[StagePeerProcess] = []

    def kill_and_replace() -> float:
        killed = freeze_then_kill(victim)
        newcomer.append(peers("s1-new", ["--shards", str(bare), "--stage", "1", "--join", addr, "--take-over"]))
        return killed

    async def scenario():
        async with trainer_node(addr) as (p2p, dht):
            trainer = PipelineTrainer(p2p, dht, PIPE, shards, TrainerConfig(
                swarm=SWARM, micro_batch_size=2, hop_timeout=8, end_step_timeout=60, replica_wait=120, seed=0))
            await wait_replicas(trainer, {0: 1, 1: 1})
            killer = asyncio.ensure_future(asyncio.to_thread(kill_and_replace))
            reports, done = [], {}
            for step in range(STEPS):
                reports.append(await trainer.step(*batch(step)))
                done[step] = time.monotonic()
            return reports, done, await killer

    reports, done, killed = asyncio.run(scenario())
    show(reports)
    recovery = done[2] - killed
    ready = newcomer[0].wait_event(1, "ready", event="ready")
    print(f"\nlast replica of stage 1 SIGKILLed mid-step 2: the newcomer was serving after {ready['setup_s']:.1f} s "
          f"of setup (shard + state fetch) and step 2 completed {recovery:.1f} s after the kill")
    assert ready["step"] == 2 and ready["state_from"]  # the state as of the last completed step ...
    assert ready["hash"] == victim.steps()[1]["hash"]  # ... is exactly the killed replica's
    assert (bare / shards.joinpath("stage-0001.safetensors").name).read_bytes() == \
        (shards / "stage-0001.safetensors").read_bytes()
    for r in reports:
        assert r.micro_batches == MICRO and math.isfinite(r.loss)
        for stage in r.stages:
            assert stage.committed == MICRO and stage.applied, (r.step, stage)
    assert reports[2].retries >= 1 and reports[-1].loss < reports[0].loss
    assert [e["step"] for e in newcomer[0].steps().values()] == [2, 3]


@pytest.mark.chaos  # ~30 s of real processes and kills each: in `make chaos` (CI's own step), not `make test`
@pytest.mark.timeout(300)
def test_replica_killed_in_the_averaging_round_leaves_its_twin_consistent(shards, peers):
    """Killed inside end_step (after the status round): its micro-batches of that step die with it, and its twin's
    round finds no group, so the twin applies nothing then; the twin's gradient stays in error feedback and goes
    into its next step, when it steps alone."""
    s0 = peers("s0", ["--shards", str(shards), "--stage", "0"])
    addr = s0.wait_event(90, "ready", event="ready")["addr"]
    twin = peers("s1a", ["--shards", str(shards), "--stage", "1", "--join", addr])
    victim = peers("s1b", ["--shards", str(shards), "--stage", "1", "--join", addr, "--stop-at", "end_step:1"])
    for p in (twin, victim):
        p.wait_event(90, "ready", event="ready")

    async def scenario():
        async with trainer_node(addr) as (p2p, dht):
            trainer = PipelineTrainer(p2p, dht, PIPE, shards, TrainerConfig(
                swarm=SWARM, micro_batch_size=2, hop_timeout=8, end_step_timeout=60, seed=0))
            await wait_replicas(trainer, {0: 1, 1: 2})
            killer = asyncio.ensure_future(asyncio.to_thread(freeze_then_kill, victim))
            reports = [await trainer.step(*batch(step)) for step in range(STEPS)]
            await killer
            return reports

    reports = asyncio.run(scenario())
    show(reports)
    one = reports[1].stages[1]
    assert one.replies[victim.wait_event(1, "ready", event="ready")["peer_id"]] is None  # died in the round
    assert not one.applied and one.in_sync  # the twin applied nothing, alone: still one state
    assert twin.steps()[1]["applied"] is False and "no group" in twin.steps()[1]["error"]
    assert all(twin.steps()[s]["applied"] and twin.steps()[s]["members"] == 1 for s in (2, 3))
    for r in reports:
        assert r.micro_batches == MICRO and math.isfinite(r.loss) and r.stages[0].committed == MICRO
    assert reports[-1].loss < reports[0].loss


@pytest.mark.timeout(60)
def test_a_corrupted_shard_is_refused_and_the_process_exits_non_zero(shards, tmp_path):
    bad = tmp_path / "bad-shards"
    shutil.copytree(shards, bad)
    data = bytearray((bad / "stage-0001.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "stage-0001.safetensors").write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "node.devtools.stage_peer", "--shards", str(bad), "--stage", "1",
                           "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2, proc.stderr
    assert "sha256" in proc.stderr and "stage-0001.safetensors" in proc.stderr, proc.stderr
    assert '"event": "error"' in proc.stdout
