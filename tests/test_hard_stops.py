"""Hard stops (issue 14): a node SIGTERMed in the middle of a round's local training exits within 5 s with its
record withdrawn; `swarmnode cancel` stops local work on every participant within a step (their CPU time stops
growing) and the round is abandoned; a node SIGKILLed in the middle of writing its job export, restarted on the
same home, ends with a complete export (manifest present, the model file matching it, no `.tmp` left).

The slow job: an MLP on digits with far more local steps than a test waits for, so that a node is inside
LocalTrainer.run (a worker thread) whenever the test acts; only the stop flag checked between steps ends it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import psutil
import pytest

from node.daemon import EXPORT_STOP_ENV, STOP_AT_ENV
from node.devtools.localswarm import wait_for
from node.jobs.federated.export import FILES
from node.ml.datasets import write_node_data
from tests.conftest import run_cli
from tests.test_jobs_integration import JOB, start_nodes

# ~55 s with real daemons: in `make chaos` (CI's own step) so that `make test` stays under 10 minutes on 2 cores
pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
EXIT_WITHIN_S = 5.0
SLOW_JOB = (JOB.replace("rounds = 5", "rounds = 2").replace("local_steps = 10", "local_steps = 500000")
            .replace("round_timeout_s = 30", "round_timeout_s = 120").replace("hidden = 64", "hidden = 256"))


def cpu_s(node) -> float:
    """CPU seconds the node's Python process has used (every thread)."""
    t = psutil.Process(node.proc.pid).cpu_times()
    return t.user + t.system


def cpu_rate(node, window: float = 0.5):
    """A wait_for condition factory: the node's CPU use (seconds per second) over each ``window``."""
    last = [time.monotonic(), cpu_s(node)]

    def rate() -> float | None:
        now, used = time.monotonic(), cpu_s(node)
        if now - last[0] < window:
            return None
        r = (used - last[1]) / (now - last[0])
        last[:] = [now, used]
        return r

    return rate


def wait_training(node, timeout: float = 60.0) -> None:
    """Until the node took part in the job and burns CPU as local training does (> half a core over 0.5 s)."""
    wait_for(lambda: "taking part in job" in node.log_path.read_text(errors="replace"), timeout,
             f"{node.home.name} to take part")
    rate = cpu_rate(node)
    wait_for(lambda: (r := rate()) is not None and r > 0.5, timeout, f"{node.home.name} to train", interval=0.1)


def wait_idle(node, timeout: float) -> None:
    """Until the node's CPU use falls to what an idle node spends (heartbeats, board polls)."""
    rate = cpu_rate(node)
    wait_for(lambda: (r := rate()) is not None and r < 0.25, timeout, f"{node.home.name} to stop training",
             interval=0.1)


def submit(node, tmp_path, text: str) -> str:
    job_file = tmp_path / "job.toml"
    job_file.write_text(text)
    result = run_cli("submit", str(job_file), "--json", "--home", str(node.home))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[0])["job_id"]


def test_sigterm_in_the_middle_of_local_training_exits_within_5s_and_withdraws_the_record(node_factory, tmp_path):
    a, b = start_nodes(node_factory, tmp_path, ["digits", "digits"])
    submit(a, tmp_path, SLOW_JOB)
    wait_training(b)
    p2pds = [p for p in b.descendants() if p.name() == "p2pd"]
    t0 = time.monotonic()
    b.send(signal.SIGTERM)
    try:
        code = b.proc.wait(EXIT_WITHIN_S)
    except Exception:
        pytest.fail(f"{b.home.name} did not exit within {EXIT_WITHIN_S:.0f} s of SIGTERM: {b.log_tail()}")
    assert code == 0 and time.monotonic() - t0 < EXIT_WITHIN_S, b.log_tail()
    _, alive = psutil.wait_procs(p2pds, timeout=EXIT_WITHIN_S)
    assert not alive, "p2pd outlived its node"
    assert b.peer_id not in a.peer_ids(), "the stopped node's record was not withdrawn"
    assert "Traceback" not in b.log_path.read_text(errors="replace")


@pytest.mark.parametrize("phase", ["matchmaking", "reduce_scatter", "commit"])
def test_sigterm_in_the_middle_of_an_all_reduce_round_exits_within_5s(node_factory, tmp_path, phase):
    """The node freezes itself (SIGSTOP) at PHASE of round 1, gets SIGTERM while frozen, and is let go: from that
    moment it has 5 s to exit with its record withdrawn, mid-round, while its peer waits on it."""
    a, b = start_nodes(node_factory, tmp_path, ["digits", "digits"], envs={1: {STOP_AT_ENV: f"{phase}:1"}})
    submit(a, tmp_path, JOB)
    wait_for(lambda: psutil.Process(b.proc.pid).status() == psutil.STATUS_STOPPED, 60, f"{b.home.name} to freeze")
    p2pds = [p for p in b.descendants() if p.name() == "p2pd"]
    b.send(signal.SIGTERM)
    t0 = time.monotonic()
    b.send(signal.SIGCONT)
    try:
        code = b.proc.wait(EXIT_WITHIN_S)
    except Exception:
        pytest.fail(f"{b.home.name} did not exit within {EXIT_WITHIN_S:.0f} s of SIGTERM at {phase}: {b.log_tail()}")
    assert code == 0 and time.monotonic() - t0 < EXIT_WITHIN_S, b.log_tail()
    _, alive = psutil.wait_procs(p2pds, timeout=EXIT_WITHIN_S)
    assert not alive, "p2pd outlived its node"
    wait_for(lambda: b.peer_id not in a.peer_ids(), 5, "the stopped node's record to be withdrawn")
    assert "Traceback" not in b.log_path.read_text(errors="replace")
    assert a.proc.poll() is None


def test_cancel_stops_local_work_on_every_participant_within_a_step(node_factory, tmp_path):
    nodes = start_nodes(node_factory, tmp_path, ["digits", "digits"])
    job_id = submit(nodes[0], tmp_path, SLOW_JOB)
    for n in nodes:
        wait_training(n)
    cancelled = run_cli("cancel", job_id, "--json", "--home", str(nodes[0].home))
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout) == {"cancelled": True}, cancelled.stderr
    t0 = time.monotonic()
    for n in nodes:  # the submitter at once; the other at its next board poll (1 s), then within one step
        wait_idle(n, 8.0)
    assert time.monotonic() - t0 < 8.0
    for n in nodes:  # the round was abandoned (no update sent): no round of the job completed anywhere
        log = n.log_path.read_text(errors="replace")
        assert f"job {job_id} was cancelled; round 0 abandoned" in log, n.log_tail(20)
        assert "Traceback" not in log
    assert all(n.proc.poll() is None for n in nodes)


def test_sigkill_in_the_middle_of_an_export_is_completed_after_the_restart(node_factory, tmp_path):
    args = []
    for i in range(2):
        write_node_data("digits", tmp_path / f"data{i}" / "digits", n_nodes=2, node_index=i, scheme="iid", seed=0)
        args.append(["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "jobs", "--data", str(tmp_path / f"data{i}")])
    a = node_factory("n0", args[0]).wait_ready()
    b_args = [*args[1], "--join", a.addr]
    # the fault hook: b freezes (SIGSTOP) just before writing report.json of its export
    b = node_factory("n1", b_args, env={**os.environ, EXPORT_STOP_ENV: "report.json"}).wait_ready()
    job_id = submit(a, tmp_path, JOB.replace("rounds = 5", "rounds = 2"))
    folder_a, folder_b = a.home / "jobs" / job_id, b.home / "jobs" / job_id
    wait_for(lambda: psutil.Process(b.proc.pid).status() == psutil.STATUS_STOPPED, 90, "b to stop mid-export")
    b.kill_hard()
    (folder_b / ".report.json.torn0001.tmp").write_bytes(b'[{"round": 0, "ok"')  # what a torn write leaves
    assert (folder_b / "model.safetensors").exists() and not (folder_b / "manifest.json").exists()
    wait_for(lambda: (folder_a / "manifest.json").exists(), 30, "a's export")

    node_factory("n1", b_args).wait_ready()  # restarted without the hook
    wait_for(lambda: (folder_b / "manifest.json").exists(), 40, "the interrupted export to be redone")
    assert sorted(p.name for p in folder_b.iterdir()) == sorted(FILES), "a .tmp file was left"
    manifest = json.loads((folder_b / "manifest.json").read_text())
    assert manifest["file_sha256"] == hashlib.sha256((folder_b / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["model_hash"] == json.loads((folder_a / "manifest.json").read_text())["model_hash"]
    assert manifest["rounds"] == 2
    assert [r["round"] for r in json.loads((folder_b / "report.json").read_text()) if r["ok"]] == [0, 1]
