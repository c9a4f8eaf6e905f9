"""``--follow`` on a terminal draws node/cli/progress.py's live bar with the time left; off a terminal it prints
format.py's lines (what every integration test and log reads). A rich Console writing into a buffer stands in for
the terminal; the job states are the control API's own JobInfo messages."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys

import pytest
from rich.console import Console

from node.api.rpc import control_pb2 as pb
from node.cli.commands import follow_job
from node.cli.format import format_job_line
from node.cli.progress import JobDisplay
from tests.conftest import REPO

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def info(round_: int, state: str = "running", declines: tuple[tuple[str, str], ...] = ()) -> pb.JobInfo:
    return pb.JobInfo(job_id="6c1f00aa", name="digits", state=state, round=round_, rounds=5,
                      participants=["12D3KooWA", "12D3KooWB"], train_loss=0.25 + 0.01 * round_,
                      eval_metric=float("nan"), bytes_exchanged=123_456, round_time_s=1.5, takers=2,
                      round_timeout_s=60.0, declines=[pb.Decline(peer_id=p, reason=r) for p, r in declines])


class Client:
    """What follow_job reads of node/api/client.py's ControlClient: job() streams the job's states."""

    def __init__(self, states: list[pb.JobInfo]):
        self.states = states

    def job(self, job_id: str, follow: bool = False):
        yield from self.states


def terminal(width: int = 160) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=width, color_system=None), out


def test_the_time_left_follows_the_pace_of_the_rounds_seen_while_following():
    now = [0.0]
    console, out = terminal()
    with JobDisplay(console, clock=lambda: now[0]) as display:
        display.show(info(2), [])  # 2 rounds done before following began: no pace from them
        for r, t in ((3, 10.0), (4, 20.0)):  # then a round every 10 s
            now[0] = t
            display.show(info(r), [])
        task = display.progress.tasks[0]
        assert (task.completed, task.total) == (4, 5)
        assert task.time_remaining == 10  # 1 round left at 1 round / 10 s
    last = ANSI.sub("", out.getvalue()).splitlines()[-1]
    assert "4/5" in last and "ETA 0:00:10" in last and "participants 2" in last and "loss 0.2900" in last, last


def test_a_peer_claiming_more_rounds_than_the_job_has_fills_the_bar_and_no_more():
    console, _ = terminal()
    with JobDisplay(console, clock=lambda: 0.0) as display:
        display.show(info(9, "done"), [])
        assert display.progress.tasks[0].completed == 5


def test_follow_on_a_terminal_draws_the_bar_and_prints_each_decline_once_above_it():
    console, out = terminal()
    decline = (("12D3KooWCdecliner", "no local data for dataset 'digits'"),)
    states = [info(0, declines=decline), info(1, declines=decline), info(5, "done", declines=decline)]
    assert follow_job(Client(states), "6c1f00aa", True, False, console=console) == 0
    text = ANSI.sub("", out.getvalue())
    assert text.count("declined by 12D3KooWCdecliner: no local data for dataset 'digits'") == 1
    assert "5/5" in text.splitlines()[-1] and "done" in text.splitlines()[-1]


def test_follow_off_a_terminal_prints_a_line_per_change(capsys):
    console = Console(file=io.StringIO(), force_terminal=False)
    states = [info(1), info(1), info(2), info(2, "cancelled")]
    assert follow_job(Client(states), "6c1f00aa", True, False, console=console) == 1  # cancelled: exit 1
    assert capsys.readouterr().out.splitlines() == [format_job_line(s) for s in (states[0], states[2], states[3])]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_submit_follow_in_a_real_terminal_draws_the_bar_to_the_end(node_factory, tmp_path):
    """The real CLI with its stdout on a pseudo-terminal, following a real 2-node job to its end."""
    from tests.test_jobs_integration import JOB, start_nodes

    nodes = start_nodes(node_factory, tmp_path, ["digits", "digits"])
    job_file = tmp_path / "job.toml"
    job_file.write_text(JOB)
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "150"}
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "submit", str(job_file), "--follow", "--home",
                             str(nodes[0].home)], stdout=follower, stderr=subprocess.PIPE, cwd=REPO, env=env)
    os.close(follower)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                break
            if not chunk:
                break
            out += chunk
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-1500:]
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = ANSI.sub("", out.decode(errors="replace")).replace("\r", "\n")
    assert "submitted job" in text and "ETA" in text, text[-1500:]
    last = [line for line in text.splitlines() if "ETA" in line][-1]
    assert "5/5" in last and "done" in last and "participants 2" in last, last
