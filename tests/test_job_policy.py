"""node/jobs/policy.py (whose jobs a node runs, and its per-job limits), the config keys and flags that set it
(node/runtime/config.py), and node/runtime/device.py apply_compute_limits. Pure functions: no node, no DHT."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from node.jobs.policy import (
    JobLimits,
    concurrency_refusal,
    declared_hours,
    job_refusal,
    job_steps,
    memory_refusal,
    size_refusal,
    trust_refusal,
)
from node.runtime.config import check_accept_jobs_from, parse_size, resolve
from node.runtime.device import apply_compute_limits
from node.runtime.errors import NodeError
from protocol.records.job_records import MAX_REASON
from protocol.records.job_spec import InnerOpt, JobSpec, ModelSpec, PipelineSpec
from tests.clocks import VirtualClock
from tests.test_wire_bytes import ID_A, ID_B, ID_C

ME, FRIEND, STRANGER = ID_A, ID_B, ID_C
SPEC = JobSpec("digits", ModelSpec("mlp"), "digits", "classification", 30, InnerOpt("sgd", 0.1), local_steps=20,
               round_timeout_s=60.0)
GIB = 2**30


def test_defaults_are_what_a_volunteer_expects():
    limits = JobLimits()
    assert limits.accept_from == ("members",) and limits.max_jobs == 2 and limits.max_job_steps == 1_000_000
    assert limits.max_job_memory == 0 and limits.max_job_seconds is None
    config = resolve({}, env={})  # the config's defaults are the same
    assert JobLimits(config.accept_jobs_from, config.max_jobs, config.max_job_memory, config.max_job_steps,
                     config.max_job_hours, config.cpu_threads, config.gpu_memory_fraction) == limits
    assert not job_refusal(limits, SPEC, FRIEND, ME, member=True, running=0)  # the demo's job, from a member


@pytest.mark.parametrize("accept, submitter, member, expected", [
    (("self",), ME, False, ""),
    (("self",), FRIEND, True, "this node runs only its own jobs (accept_jobs_from = self)"),
    (("members",), FRIEND, True, ""),
    (("members",), STRANGER, False, "has no live peer record in this swarm"),
    (("members",), ME, False, ""),  # its own jobs, whatever the list says
    (("anyone",), STRANGER, False, ""),
    ((FRIEND,), FRIEND, False, ""),
    ((FRIEND,), STRANGER, True, "is not in this node's accept_jobs_from"),
    ((FRIEND,), ME, False, ""),
    (("self", FRIEND), STRANGER, False, "is not in this node's accept_jobs_from"),
    (("members", FRIEND), FRIEND, False, ""),
])
def test_whose_jobs_a_node_runs(accept, submitter, member, expected):
    reason = trust_refusal(accept, submitter, ME, member)
    assert (expected in reason and reason) if expected else reason == ""
    if reason:
        assert submitter[-8:] in reason and len(reason) <= MAX_REASON and reason.isprintable()


def test_a_private_swarm_names_the_missing_certificate():
    assert "holds no valid membership certificate" in trust_refusal(("members",), STRANGER, ME, False, private=True)


def test_at_most_max_jobs_at_once():
    limits = JobLimits(max_jobs=1)
    assert concurrency_refusal(limits, 0) == ""
    assert concurrency_refusal(limits, 1) == "this node already runs 1 job(s) (max_jobs = 1)"
    assert job_refusal(limits, SPEC, FRIEND, ME, True, 1) == concurrency_refusal(limits, 1)
    # whose job it is comes first: a stranger's is declined as such even when no slot is free
    assert "accept_jobs_from" in job_refusal(limits, SPEC, STRANGER, ME, False, 1)


def test_job_length_in_steps_and_declared_hours():
    assert job_steps(SPEC) == 30 * 20 and declared_hours(SPEC) == pytest.approx(0.5)
    probe = dataclasses.replace(SPEC, rounds=1_000_000, local_steps=1_000_000)  # issue 14's probe
    reason = size_refusal(JobLimits(), probe)
    assert reason == ("the job asks for 1,000,000,000,000 local steps (rounds x local_steps); this node runs at most "
                      "1,000,000 per job (max_job_steps)")
    assert size_refusal(JobLimits(max_job_steps=0), probe) == ""  # 0: no bound
    assert size_refusal(JobLimits(max_job_hours=0.25), SPEC) == ("the job may run 0.5 h (rounds x round_timeout_s); "
                                                                 "this node gives a job at most 0.25 h (max_job_hours)")
    assert size_refusal(JobLimits(max_job_hours=1), SPEC) == ""
    assert JobLimits(max_job_hours=1.5).max_job_seconds == 5400.0


def test_a_pipeline_jobs_steps_count_its_micro_batches():
    spec = dataclasses.replace(SPEC, model=ModelSpec("gpt2"), dataset="pystdlib-bytes", task="causal-lm",
                               kind="pipeline", pipeline=PipelineSpec(stages=2, micro_batches=8), rounds=200_000)
    assert job_steps(spec) == 1_600_000
    assert "(rounds x micro_batches)" in size_refusal(JobLimits(), spec)


def test_per_job_memory():
    limits = JobLimits(max_job_memory=2 * GIB)
    assert memory_refusal(limits, GIB, GIB, "cpu", 64 * GIB) == ""
    assert memory_refusal(limits, 2 * GIB, GIB // 2, "cpu", 64 * GIB) == (
        "training needs about 2.50 GiB; this node gives a job at most 2.00 GiB (max_job_memory)")
    assert memory_refusal(JobLimits(), 60 * GIB, 0, "cpu", 64 * GIB) == ""  # 0: the device's free memory decides
    half = JobLimits(gpu_memory_fraction=0.5)
    assert memory_refusal(half, 30 * GIB, 40 * GIB, "cuda", 80 * GIB, "cuda:0") == ""  # host RAM is not the GPU's
    assert memory_refusal(half, 41 * GIB, 0, "cuda", 80 * GIB, "cuda:0") == (
        "training needs about 41.00 GiB on cuda:0; this node lets jobs use 40.00 GiB of it (gpu_memory_fraction = 0.5)")
    assert memory_refusal(half, 41 * GIB, 0, "cpu", 80 * GIB) == ""  # a fraction of a GPU bounds nothing on a CPU


@pytest.mark.parametrize("changes, needle", [
    ({"accept_from": ()}, "accept_jobs_from must list one or more"),
    ({"accept_from": "members"}, "accept_jobs_from must list"),
    ({"accept_from": ("friends",)}, "'friends' is neither self, members, anyone nor a peer id"),
    ({"max_jobs": 0}, "max_jobs must be >= 1"),
    ({"max_job_memory": -1}, "max_job_memory must be an integer >= 0"),
    ({"cpu_threads": 1.5}, "cpu_threads must be an integer >= 0"),
    ({"max_job_hours": float("inf")}, "max_job_hours must be a finite number >= 0"),
    ({"gpu_memory_fraction": 1.5}, "gpu_memory_fraction must be in [0, 1]"),
])
def test_bad_limits_are_refused_naming_the_setting(changes, needle):
    with pytest.raises(ValueError) as info:
        JobLimits(**changes)
    assert needle in str(info.value)


def test_config_keys_flags_and_environment(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(f'accept_jobs_from = ["self", "{FRIEND}", "self"]\nmax_jobs = 1\nmax_job_memory = "1.5GiB"\n'
                      'max_job_steps = 0\nmax_job_hours = 12\ncpu_threads = 2\ngpu_memory_fraction = 0.25\n')
    got = resolve({}, env={}, config_file=config)
    assert got.accept_jobs_from == ("self", FRIEND) and got.max_jobs == 1 and got.max_job_memory == 3 * 2**29
    assert (got.max_job_steps, got.max_job_hours, got.cpu_threads, got.gpu_memory_fraction) == (0, 12.0, 2, 0.25)
    flags = resolve({"accept_jobs_from": f"members,{FRIEND}", "max_job_memory": "512MiB"},
                    env={"SWARMNODE_MAX_JOBS": "3", "SWARMNODE_ACCEPT_JOBS_FROM": "anyone"}, config_file=config)
    assert flags.accept_jobs_from == ("members", FRIEND) and flags.max_job_memory == 2**29 and flags.max_jobs == 3
    assert resolve({}, env={"SWARMNODE_MAX_JOB_MEMORY": "4096"}).max_job_memory == 4096
    for bad, needle in [({"accept_jobs_from": "friends"}, "neither self, members, anyone nor a peer id"),
                        ({"max_jobs": 0}, "max_jobs must be >= 1"),
                        ({"max_job_memory": "lots"}, "expected a size such as 8GiB"),
                        ({"gpu_memory_fraction": 2.0}, "gpu_memory_fraction must be in [0, 1]")]:
        with pytest.raises(NodeError) as info:
            resolve(bad, env={})
        assert needle in str(info.value)


def test_sizes_and_entries():
    assert [parse_size(s) for s in ("8GiB", "512 MiB", "1.5GB", "100", "2kb")] == [8 * GIB, 2**29, 1_500_000_000,
                                                                                  100, 2000]
    for bad in ("", "GiB", "-1GiB", "1e9", "8 GiBs"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert check_accept_jobs_from(["anyone", "anyone"]) == ("anyone",)
    with pytest.raises(ValueError, match="neither"):
        check_accept_jobs_from(["12D3KooWnotapeerid"])


def test_compute_limits_set_torch_threads_and_leave_a_cpu_device_memory_alone():
    before = torch.get_num_threads()
    try:
        assert apply_compute_limits(torch.device("cpu"), 1, 0.5) == ["1 torch thread(s) per job"]
        assert torch.get_num_threads() == 1
        assert apply_compute_limits(torch.device("cpu"), 0, 0.0) == []
    finally:
        torch.set_num_threads(before)


# ---- the manager applies it (node/jobs/manager.py), over an in-memory DHT and a stand-in job kind ------------

class MemoryDHT:
    """The part of hivemind's DHTNode the job board uses: stores succeed and are kept; reads find nothing new."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, object]] = []

    async def store(self, key, value, expiration_time, subkey=None) -> bool:
        self.stored.append((key, subkey))
        return True

    async def get(self, key, latest=False):
        return None


class StandInKind:
    """A job kind that can always take part and runs until released."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.started: list[str] = []
        self.release = asyncio.Event()

    def why_not(self, view) -> tuple[str, str]:
        self.asked.append(view.job_id)
        return "", ""

    async def run(self, view) -> None:
        self.started.append(view.job_id)
        await self.release.wait()


def manager_with(tmp_path, clock, member: bool = True, **limits):
    from node.jobs.board import JobView
    from node.jobs.manager import JobManager
    from protocol.records.job_records import JobRecord

    async def is_member(peer: str) -> bool:
        return member

    manager = JobManager(None, MemoryDHT(), "policy", ME, tmp_path / "home", tmp_path / "data", clock=clock,
                         limits=JobLimits(**limits), is_member=is_member)
    kind = StandInKind()
    manager.kinds["federated"] = kind
    for i in range(2):
        record = JobRecord.create(dataclasses.replace(SPEC, name=f"job{i}"), FRIEND, f"n{i}", clock.time())
        manager.board.views[record.job_id] = JobView(record)
    return manager, kind, list(manager.board.views.values())


async def settle(condition, turns: int = 200) -> None:
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def test_the_manager_declines_a_job_beyond_max_jobs_and_takes_it_once_a_slot_frees(tmp_path):
    async def scenario():
        manager, kind, (first, second) = manager_with(tmp_path, VirtualClock(), max_jobs=1)
        await manager.poll()
        await settle(lambda: kind.started and second.declined)
        assert kind.started == [first.job_id] and kind.asked == [first.job_id]  # sized only what it may run
        assert second.declined == "this node already runs 1 job(s) (max_jobs = 1)"
        assert manager.running == {first.job_id}
        kind.release.set()  # the first job ends
        await settle(lambda: not manager.running)
        await manager.poll()
        await settle(lambda: len(kind.started) == 2)
        assert kind.started == [first.job_id, second.job_id] and not second.declined
        await asyncio.gather(*manager._tasks.values())  # (release is set: the second run ends at once)

    asyncio.run(scenario())


def test_the_manager_leaves_a_job_after_max_job_hours_and_declines_a_strangers(tmp_path):
    async def scenario():
        clock = VirtualClock()
        manager, kind, (job, _) = manager_with(tmp_path, clock, max_job_hours=2)
        await manager._decide(job)  # the run never ends by itself: the 2 h deadline (virtual) ends it
        assert kind.started == [job.job_id] and 7200.0 in clock.sleeps
        assert job.declined == "left the job after 2 h on this node (max_job_hours = 2)" and not manager.running
        outsider, kind, (job, _) = manager_with(tmp_path, clock, member=False)
        await outsider._decide(job)
        assert kind.asked == [] and "accept_jobs_from = members" in job.declined  # declined before any sizing
        assert len(outsider.board.dht.stored) == 1  # its signed decline, for the swarm to see

    asyncio.run(scenario())
