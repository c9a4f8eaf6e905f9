"""The whole swarm dies at once (issue 14, bullet 7): three daemons run a federated job; after every one of them has
checkpointed at least 3 rounds, all three are SIGKILLed together, p2pd and all (a power cut: the DHT's job record and
progress die with them), then restarted on the same homes. The job must resume from each node's own newest
checkpoint, never before the last round all of them had completed, converge (a node one round behind downloads the
later round from the node ahead), finish, and leave one model hash in every export, whose report still holds every
round completed before the cut.

To be sure two nodes stand one round apart, the test removes the newest checkpoint of the third node before the
restart: that is what its disk holds if the power went after it applied the round but before its checkpoint landed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import psutil
import pytest

from node.devtools.localswarm import LOOPBACK, wait_for
from node.jobs.federated.checkpoints import MANIFEST, CheckpointStore, checkpoint_dir
from tests.test_hard_stops import submit
from tests.test_jobs_integration import JOB, start_nodes

# ~60-90 s with real daemons on 2 cores: in `make chaos`
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
ROUNDS = 14
POWER_CUT_JOB = JOB.replace("rounds = 5", f"rounds = {ROUNDS}").replace("local_steps = 10", "local_steps = 40")


def newest_completed(node, job_id: str) -> int:
    """Rounds completed in the node's newest complete checkpoint (its manifest written), from the folder name."""
    folders = CheckpointStore(checkpoint_dir(node.home, job_id)).folders()
    return max((int(f.name.split(".c")[1]) for f in folders if (f / MANIFEST).exists()), default=0)


def power_cut(nodes) -> None:
    """SIGKILL every node's whole process group (Python process and p2pd) back to back, then reap them."""
    procs = [psutil.Process(n.proc.pid) for n in nodes]
    children = [c for p in procs for c in p.children(recursive=True)]
    for n in nodes:
        os.killpg(n.proc.pid, signal.SIGKILL)
    for n in nodes:
        n.proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"processes outlived the power cut: {alive}"


def ok_rounds(history: list[dict]) -> set[tuple[int, str]]:
    return {(e["round"], e["model_hash"]) for e in history if e.get("ok")}


def test_the_whole_swarm_killed_at_once_resumes_from_its_checkpoints_and_ends_with_one_model(node_factory, tmp_path):
    nodes = start_nodes(node_factory, tmp_path, ["digits", "digits", "digits"])
    job_id = submit(nodes[0], tmp_path, POWER_CUT_JOB)
    wait_for(lambda: min(newest_completed(n, job_id) for n in nodes) >= 3, 150, "3 checkpointed rounds on every node")
    power_cut(nodes)

    # what each node's disk holds; the third node loses its newest checkpoint (it had not landed)
    third = CheckpointStore(checkpoint_dir(nodes[2].home, job_id))
    complete = [f for f in third.folders() if (f / MANIFEST).exists()]
    for folder in third.folders() if len(complete) > 1 else []:
        if folder >= complete[-1]:
            shutil.rmtree(folder)
    on_disk = [CheckpointStore(checkpoint_dir(n.home, job_id)).load_latest() for n in nodes]
    assert all(c is not None for c in on_disk)
    completed = [c.completed for c in on_disk]
    common, ahead = min(completed), max(completed)
    assert common >= 2 and ahead < ROUNDS, completed
    before = {i: n.log_path.stat().st_size for i, n in enumerate(nodes)}

    # the power comes back: the same homes, new ports; the submitter first (it puts the job record back)
    restarted = []
    for i in range(3):
        args = ["--listen", LOOPBACK, "--swarm", "jobs", "--data", str(tmp_path / f"data{i}")]
        if restarted:
            args += ["--join", restarted[0].addr]
        restarted.append(node_factory(f"n{i}", args).wait_ready())
    exports = [n.home / "jobs" / job_id / "manifest.json" for n in restarted]
    wait_for(lambda: all(p.exists() for p in exports), 200, "every node to finish the job and export it")

    logs = [n.log_path.read_text(errors="replace")[before[i]:] for i, n in enumerate(restarted)]
    for i, log in enumerate(logs):  # each resumed from its own disk, not from round 0
        assert f"resumed from this node's checkpoint at round {completed[i]} " in log, log[-3000:]
        synced = [int(r) for r in re.findall(r"synced to round (\d+)", log)]
        assert all(r >= ahead for r in synced), (i, synced, completed)  # never back before the node ahead
        if completed[i] < ahead:
            assert synced, f"node {i} was behind ({completed[i]} < {ahead}) and did not download the later round"
        assert "Traceback" not in log and "not written" not in log, log[-3000:]
    assert "its record is back on the board" in logs[0]

    manifests = [json.loads(p.read_text()) for p in exports]
    assert len({m["model_hash"] for m in manifests}) == 1, [m["model_hash"] for m in manifests]
    assert all(m["rounds"] == ROUNDS for m in manifests)
    # nothing completed is lost: every round the node ahead had on disk is in every final report, same model
    completed_before = ok_rounds(on_disk[completed.index(ahead)].history)
    assert len(completed_before) == ahead
    for n, m in zip(restarted, manifests):
        report = json.loads((n.home / "jobs" / job_id / "report.json").read_text())
        assert completed_before <= ok_rounds(report), n.home.name
        assert len(ok_rounds(report)) == ROUNDS and [e for e in report if e["ok"]][-1]["model_hash"] == m["model_hash"]
